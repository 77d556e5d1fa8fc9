"""Which inputs a dataset was made from: each table's path, size and checksum, and a digest of
the cohort's image list, in metadata.json and the card."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from tests.gcs_proxy import CountingProxy
from tests.test_end_to_end import built, synthetic  # noqa: F401  (a real run)
from transforms import storage
from transforms.join import schema
from transforms.write import dataset_card
from transforms.write.provenance import image_list_digest, table_file


def test_a_local_table_is_described_by_its_size_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    assert table_file(str(path)) == {"path": str(path), "bytes": path.stat().st_size,
                                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_gcs_table_is_described_from_its_metadata_without_reading_it(gcs_emulator) -> None:
    import google_crc32c

    data = os.urandom(5000)
    path = f"{gcs_emulator}/provenance/hosp/patients.csv.gz"
    storage.write_bytes(path, data)
    upstream = os.environ["STORAGE_EMULATOR_HOST"]
    proxy = CountingProxy(upstream)
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
    try:
        described = table_file(path)
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = upstream
        proxy.close()
    assert described == {
        "path": path, "bytes": 5000,
        "crc32c": base64.b64encode(google_crc32c.Checksum(data).digest()).decode(),
        "md5": base64.b64encode(hashlib.md5(data).digest()).decode()}
    assert [r.path for r in proxy if r.path.startswith("/download/")] == []  # not read


def test_the_image_list_digest_is_over_the_sorted_paths() -> None:
    paths = ["files/p10/p10000002/s2/b.jpg", "files/p10/p10000001/s1/a.jpg"]
    digest = image_list_digest(paths)
    assert digest == image_list_digest(reversed(paths))
    assert digest == {"images": 2, "sha256": hashlib.sha256(
        b"files/p10/p10000001/s1/a.jpg\nfiles/p10/p10000002/s2/b.jpg\n").hexdigest()}


def test_a_run_records_every_table_it_read(built: Path, synthetic) -> None:  # noqa: F811
    meta = json.loads((built / "metadata.json").read_text())
    tables = meta["provenance"]["inputs"]["tables"]
    assert set(tables) == set(schema.INPUT_TABLES)
    for name, entry in tables.items():
        path = Path(entry["path"])
        assert path.name == Path(schema.TABLES[name].relpath).name
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    card = (built / dataset_card.CARD_NAME).read_text()
    assert "Inputs read" in card
    assert all(f"sha256 {t['sha256']}" in card for t in tables.values())
