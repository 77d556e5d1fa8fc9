"""GCS under faults: transient ones (503, 429, bodies cut short, delays) are retried to the
same result and counted; permanent ones (403, a missing bucket) fail at once, in one line.

The faults come from the recording proxy in front of the real emulator (`tests.gcs_proxy`).
Every injected fault but a delay makes exactly one call fail, so the retries counted must
equal the faults injected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.chunk_fixtures import upload_tree, write_dataset
from tests.gcs_proxy import TRANSIENT, CountingProxy, Faults, proxied
from tests.test_stage import BILLING, DEST_BUCKET, _roots, source_dataset  # noqa: F401
from transforms import storage
from transforms.chunks import ChunkedDataset

REPO = Path(__file__).resolve().parents[1]
RATE = 0.02


@pytest.fixture
def proxy(gcs_emulator: str) -> Iterator[CountingProxy]:
    """A proxy that injects no fault until a test sets `proxy.faults`."""
    with proxied() as server:
        yield server


def _failing(proxy: CountingProxy) -> int:
    """Injected faults that make a call fail (a delay does not)."""
    return sum(proxy.injected[k] for k in TRANSIENT if k != "delay")


def _retries() -> int:
    return sum(storage.retry_counts().values())


def _workload(root: str, n: int) -> dict:
    """Every kind of storage call, once or more per file; what a user would look at after."""
    seen: dict = {"read": [], "streamed": [], "downloaded": [], "exists": []}
    for i in range(n):
        path, data = f"{root}/in/f{i:03d}", bytes([i]) * (100 + 997 * i)
        storage.write_bytes(path, data)
        storage.write_bytes(f"{path}.once", data, if_absent=True)
        with storage.open_write(f"{path}.stream") as handle:
            handle.write(data)
        seen["read"].append(storage.read_bytes(path))
        with storage.open_read(f"{path}.stream") as handle:
            seen["streamed"].append(handle.read(1000) + handle.read())
        local = f"/tmp/test_faults_{os.getpid()}"
        storage.download(f"{path}.once", local)
        seen["downloaded"].append(Path(local).read_bytes())
        seen["exists"].append((storage.exists(path), storage.exists(f"{path}.absent")))
    listed = storage.list_files(f"{root}/in/*")
    storage.copy([(p, p.replace("/in/", "/copied/")) for p in listed if p.endswith(".once")])
    storage.delete([p for p in listed if p.endswith(".stream")])
    seen["final"] = [p[len(root):] for p in storage.list_files(f"{root}/**")]
    seen["copied"] = [storage.read_bytes(p) for p in storage.list_files(f"{root}/copied/*")]
    return seen


def test_storage_calls_under_2_percent_faults_give_the_fault_free_results(
        proxy: CountingProxy, gcs_emulator: str) -> None:
    clean = _workload(f"{gcs_emulator}/faults-clean", 40)
    requests = len(proxy.requests)
    before = _retries()
    proxy.faults = Faults(rate=RATE, seed=0)
    started = time.monotonic()
    assert _workload(f"{gcs_emulator}/faults-faulty", 40) == clean
    elapsed = time.monotonic() - started
    print(f"{requests} requests; faults {dict(proxy.injected)}; retries "
          f"{_retries() - before}; {elapsed:.1f} s")
    assert set(proxy.injected) == set(TRANSIENT), proxy.injected  # every kind, in this run
    assert _retries() - before == _failing(proxy)
    assert "calls retried after transient errors" in storage.retry_summary()


def _on_gcs(tmp_path: Path, uri: str, train: int, other: int) -> tuple[Path, str]:
    """A small written dataset (chunks of 2), locally and uploaded to `uri`."""
    local = tmp_path / "out"
    write_dataset(local, {"train": train, "val": other, "test": other}, chunk_size=2,
                  image_size=16)
    upload_tree(local, uri)
    return local, uri


def _epochs(uri: str, cache: Path) -> list[tuple[str, int]]:
    """Four epochs' records, in order, each from an empty cache (every chunk downloaded)."""
    out = []
    for epoch in range(4):
        ds = ChunkedDataset(uri, "train", seed=3, batch_size=4, cache_dir=str(cache / str(epoch)))
        ds.set_epoch(epoch)
        out += [(r["record_id"], int(r["image_tensor"].sum() * 1000)) for r in ds]
    return out


def test_a_loader_epoch_over_gcs_under_faults_reads_the_same_records(
        proxy: CountingProxy, gcs_emulator: str, tmp_path: Path) -> None:
    local, uri = _on_gcs(tmp_path, f"{gcs_emulator}/faults-loader/out", train=23, other=4)
    clean = _epochs(uri, tmp_path / "clean")
    before = _retries()
    proxy.reset()
    proxy.faults = Faults(rate=RATE, seed=15)
    assert _epochs(uri, tmp_path / "faulty") == clean
    print(f"{len(proxy.requests)} requests; faults {dict(proxy.injected)}; retries "
          f"{_retries() - before}")
    assert _failing(proxy) >= 1 and _retries() - before == _failing(proxy)


def _stage(data, stage_to: str, proxy_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy_url}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.stage", "--mimic_iv_dir", data.mimic_iv_dir,
         "--mimic_ed_dir", data.mimic_ed_dir, "--mimic_cxr_dir", data.mimic_cxr_dir,
         "--requester_pays_project", BILLING, "--stage_to", stage_to, "--workers", "4"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _manifest(stage_to: str) -> str:
    return storage.read_bytes(f"{stage_to}/_manifest.json").decode().replace(stage_to, "STAGE")


def test_staging_under_faults_writes_the_same_manifest(
        source_dataset, proxy: CountingProxy) -> None:  # noqa: F811
    clean_to, faulty_to = (f"gs://{DEST_BUCKET}/faults-{n}" for n in ("clean", "faulty"))
    assert _stage(source_dataset, clean_to, proxy.url).returncode == 0
    proxy.faults = Faults(rate=RATE, seed=1)
    done = _stage(source_dataset, faulty_to, proxy.url)
    assert done.returncode == 0, done.stderr
    proxy.faults = None
    assert _manifest(faulty_to) == _manifest(clean_to)
    print(f"faults {dict(proxy.injected)}; {done.stderr.splitlines()[-1]}")
    assert _failing(proxy) >= 1
    assert (f"GCS: {_failing(proxy)} calls retried after transient errors"
            in done.stderr), done.stderr


def test_an_if_absent_upload_whose_answer_was_lost_is_not_taken_for_anothers(
        proxy: CountingProxy, gcs_emulator: str) -> None:
    # Seed 92 at rate 0.5: the first request is cut, the next five pass.
    cut_first = Faults(rate=0.5, seed=92, kinds=("cut",))
    mine, theirs = (f"{gcs_emulator}/faults-once/{n}" for n in ("mine", "theirs"))
    proxy.faults = cut_first
    storage.write_bytes(mine, b"ours", if_absent=True)  # landed, answer cut, retried: 412
    assert proxy.injected == {"cut": 1} and storage.read_bytes(mine) == b"ours"
    proxy.faults = None
    storage.write_bytes(theirs, b"someone else's")
    proxy.faults = cut_first
    with pytest.raises(FileExistsError, match="faults-once/theirs"):
        storage.write_bytes(theirs, b"ours", if_absent=True)


def test_retries_are_bounded(proxy: CountingProxy, gcs_emulator: str, monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY_INITIAL_S", 0.01)
    monkeypatch.setattr(storage, "RETRY_MAX_S", 0.02)
    path = f"{gcs_emulator}/faults-bounded/file"
    storage.write_bytes(path, b"x")
    proxy.reset()
    before = _retries()
    proxy.faults = Faults(rate=1.0, kinds=("503",))  # down for good
    with pytest.raises(OSError, match="faults-bounded/file: ServiceUnavailable") as caught:
        storage.read_bytes(path)
    assert "\n" not in str(caught.value)
    assert len(proxy.requests) == storage.RETRY_ATTEMPTS
    assert _retries() - before == storage.RETRY_ATTEMPTS - 1


# ----------------------------------------------------------------------------- permanent
def _fails_fast(call, error: type[Exception], match: str) -> str:
    before, started = _retries(), time.monotonic()
    with pytest.raises(error, match=match) as caught:
        call()
    assert time.monotonic() - started < 2 and _retries() == before  # not retried
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_forbidden_object_or_a_missing_bucket_fails_at_once_naming_the_path(
        proxy: CountingProxy, gcs_emulator: str, tmp_path: Path) -> None:
    bucket = gcs_emulator[len("gs://"):]
    denied = f"{gcs_emulator}/faults-permanent/secret.bin"
    storage.write_bytes(denied, b"x")
    proxy.faults = Faults(rate=0.0, forbidden=frozenset({f"{bucket}/faults-permanent/secret.bin"}),
                          missing_buckets=frozenset({"gone-bucket"}))
    for call in (lambda: storage.read_bytes(denied), lambda: storage.open_read(denied),
                 lambda: storage.write_bytes(denied, b"y"),
                 lambda: storage.download(denied, str(tmp_path / "d"))):
        _fails_fast(call, PermissionError, "faults-permanent/secret.bin")
    for call in (lambda: storage.read_bytes("gs://gone-bucket/a"),
                 lambda: storage.list_files("gs://gone-bucket/x/*")):
        _fails_fast(call, FileNotFoundError, "gs://gone-bucket/")


def test_a_forbidden_chunk_stops_the_loader_naming_it(
        proxy: CountingProxy, gcs_emulator: str, tmp_path: Path) -> None:
    local, uri = _on_gcs(tmp_path, f"{gcs_emulator}/faults-loader-403/out", train=4, other=2)
    meta = json.loads((local / "metadata.json").read_text())
    chunk = next(c["path"] for c in meta["chunks"] if c["split"] == "train")
    proxy.faults = Faults(forbidden=frozenset(
        {f"{gcs_emulator[len('gs://'):]}/faults-loader-403/out/{chunk}"}))
    ds = ChunkedDataset(uri, "train", mode="map", cache_dir=str(tmp_path / "cache"))
    _fails_fast(lambda: [ds[i] for i in range(len(ds))], PermissionError, chunk)


def test_staging_from_a_missing_bucket_stops_in_seconds_with_one_line(
        source_dataset, proxy: CountingProxy) -> None:  # noqa: F811
    source = source_dataset.mimic_iv_dir[len("gs://"):].split("/")[0]
    proxy.faults = Faults(missing_buckets=frozenset({source}))
    started = time.monotonic()
    done = _stage(source_dataset, f"gs://{DEST_BUCKET}/faults-missing", proxy.url)
    elapsed = time.monotonic() - started
    print(f"failed in {elapsed:.1f} s: {done.stderr.strip()}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and f"gs://{source}/" in done.stderr
    assert elapsed < 15 and proxy.injected == {"404": proxy.injected["404"]}


# ----------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def gcs_inputs(gcs_emulator: str, tmp_path_factory: pytest.TempPathFactory):
    """A small generated MIMIC on the emulator (tables and images), read through gs://."""
    from synthetic.mimic import generate

    root = tmp_path_factory.mktemp("faults-mimic")
    data = generate(str(root), n_patients=40, seed=7, image_height=160, image_width=128,
                    image_pool=2, faults=1)
    uri = f"{gcs_emulator}/faults-run/in"
    upload_tree(root, uri)
    return {flag: data_dir.replace(str(root), uri)
            for flag, data_dir in (("mimic_iv_dir", data.mimic_iv_dir),
                                   ("mimic_ed_dir", data.mimic_ed_dir),
                                   ("mimic_cxr_dir", data.mimic_cxr_dir))}


def _a_cohort_image(inputs: dict) -> str:
    """The gs:// path of an image that is a record's (the generator's answer names them)."""
    import csv
    import gzip

    from transforms.join import schema

    answer = inputs["mimic_cxr_dir"].rsplit("/", 1)[0] + "/answer/cohort.csv.gz"
    rows = csv.DictReader(gzip.decompress(storage.read_bytes(answer)).decode().splitlines())
    for row in rows:
        path = storage.join(inputs["mimic_cxr_dir"], schema.image_relpath(
            int(row["subject_id"]), int(row["study_id"]), row["dicom_id"]))
        if storage.exists(path):  # not one of the generator's missing files
            return path
    raise AssertionError("no image of the cohort on the emulator")


def _build(inputs: dict, out: str, *extra: str) -> None:
    from pipelines import build_dataset

    argv = [arg for flag, path in inputs.items() for arg in (f"--{flag}", path)]
    build_dataset.run([*argv, "--output_dir", out, "--image_size", "32", "--chunk_size", "4",
                       "--max_text_length", "96", "--max_failed_fraction", "0.5",
                       "--runner", "DirectRunner", "--direct_running_mode", "in_memory",
                       "--direct_num_workers", "1", *extra])


def _published(out: str) -> dict[str, bytes]:
    """Every object of the output by relative name; the output's own name taken out."""
    return {path[len(out) + 1:]: storage.read_bytes(path).replace(out.encode(), b"OUT")
            for path in storage.list_files(f"{out}/**")}


def test_a_run_from_gcs_to_gcs_under_faults_publishes_the_fault_free_bytes(
        proxy: CountingProxy, gcs_emulator: str, gcs_inputs: dict) -> None:
    clean, faulty = (f"{gcs_emulator}/faults-run/{n}" for n in ("clean", "faulty"))
    _build(gcs_inputs, clean)
    requests = len(proxy.requests)
    proxy.reset()
    before = _retries()
    proxy.faults = Faults(rate=RATE, seed=0)
    started = time.monotonic()
    _build(gcs_inputs, faulty)
    elapsed = time.monotonic() - started
    proxy.faults = None
    print(f"{requests} requests; faults {dict(proxy.injected)}; retries {_retries() - before}; "
          f"{elapsed:.1f} s")
    assert _failing(proxy) >= 3, proxy.injected
    assert _retries() - before == _failing(proxy)
    published = _published(faulty)
    assert {"metadata.json", "stratification_indices.json"} <= set(published)
    assert not [name for name in published if name.startswith("_tmp/")]
    assert published == _published(clean)


def test_a_forbidden_image_stops_the_run_at_once_and_commits_nothing(
        proxy: CountingProxy, gcs_emulator: str, gcs_inputs: dict) -> None:
    image = _a_cohort_image(gcs_inputs)
    out = f"{gcs_emulator}/faults-run/denied"
    proxy.faults = Faults(forbidden=frozenset({image[len("gs://"):]}))
    before, started = _retries(), time.monotonic()
    with pytest.raises(Exception, match=image.rsplit("/", 1)[1]):
        _build(gcs_inputs, out)
    elapsed = time.monotonic() - started
    proxy.faults = None
    print(f"stopped after {elapsed:.1f} s")
    assert _retries() == before
    assert not storage.exists(f"{out}/metadata.json")
    assert not [p for p in storage.list_files(f"{out}/**") if "/_tmp/" not in p]
