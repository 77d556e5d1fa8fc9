"""Which inputs a dataset was made from: each table's path, size and checksum, and a digest of
the cohort's image list, in metadata.json and the card."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import json
import os
from pathlib import Path

from tests.gcs_proxy import CountingProxy
from tests.test_end_to_end import built, synthetic  # noqa: F401  (a real run)
from transforms import storage
from transforms.storage import FileStat
from transforms.join import schema
from transforms.write import dataset_card
from transforms.write.provenance import add_tallies, image_list_digest, image_tally, table_file


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


def _digest_of(lines: list[str]) -> str:
    """The documented rule, written out apart from the code: sum of sha256s mod 2**256."""
    total = sum(int(hashlib.sha256(line.encode()).hexdigest(), 16) for line in lines)
    return f"{total % 2**256:064x}"


def test_the_image_list_digest_follows_its_rule_in_any_order() -> None:
    images = [("files/p10/p10000002/s2/b.jpg", FileStat(900, 123)),
              ("files/p10/p10000001/s1/a.jpg", FileStat(700, 456, "AAAAAA==", "md5")),
              ("files/p10/p10000001/s1/c.jpg", None)]
    tallies = [image_tally(path, identity) for path, identity in images]
    digest = image_list_digest(add_tallies(tallies))
    assert digest == image_list_digest(add_tallies([add_tallies(tallies[2:]),
                                                    add_tallies(reversed(tallies[:2]))]))
    assert digest["images"] == 3 and digest["bytes"] == 1600
    assert digest["digest"] == _digest_of([
        "files/p10/p10000002/s2/b.jpg\t900\t", "files/p10/p10000001/s1/a.jpg\t700\tAAAAAA==",
        "files/p10/p10000001/s1/c.jpg\tmissing\t"])
    # The version part of the identity (mtime, generation) is not the content: left out.
    assert image_tally(*images[0]) == image_tally(images[0][0], FileStat(900, 999))
    assert image_tally(*images[0]) != image_tally(images[0][0], FileStat(901, 123))


def test_a_run_records_the_cohorts_image_list(built: Path, synthetic) -> None:  # noqa: F811
    with gzip.open(Path(synthetic.answer_dir) / "cohort.csv.gz", "rt") as handle:
        answer = list(csv.DictReader(handle))
    lines = []
    for row in answer:  # the generator's linked images, as the files on disk
        relpath = schema.image_relpath(int(row["subject_id"]), int(row["study_id"]),
                                       row["dicom_id"])
        path = Path(synthetic.mimic_cxr_dir) / relpath
        lines.append(f"{relpath}\t{path.stat().st_size if path.exists() else 'missing'}\t")
    images = json.loads((built / "metadata.json").read_text())["provenance"]["inputs"]["images"]
    assert images["images"] == len(answer)
    assert images["digest"] == _digest_of(lines)
    assert images["digest"] in (built / dataset_card.CARD_NAME).read_text()


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
