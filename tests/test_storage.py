"""transforms.storage on local disk and on the GCS emulator, behind a proxy that counts calls."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.gcs_proxy import CountingProxy, proxied, write_ops
from transforms import storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gcs(gcs_emulator: str) -> Iterator[CountingProxy]:
    """Clients created during the test reach the emulator through a counting proxy."""
    with proxied() as proxy:
        yield proxy


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh folder: local, or a gs:// prefix (through the counting proxy)."""
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("gcs")
    return f"{request.getfixturevalue('gcs_emulator')}/{request.node.name}"


BOTH = pytest.mark.parametrize("root", ["local", "gcs"], indirect=True)


# --- paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base, parts, expected", [
    ("gs://b/out", ("train/x.pt",), "gs://b/out/train/x.pt"),
    ("gs://b/out/", ("a", "b"), "gs://b/out/a/b"),
    ("/data/out", ("train/x.pt",), os.path.join("/data/out", "train", "x.pt")),
    ("rel", ("a",), os.path.join("rel", "a")),
])
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize("uri, expected", [
    ("gs://bucket/a/b.txt", ("bucket", "a/b.txt")),
    ("gs://bucket/dir/", ("bucket", "dir/")),
])
def test_split_gcs(uri: str, expected: tuple[str, str]) -> None:
    assert storage.is_gcs(uri) and storage.split_gcs(uri) == expected


@pytest.mark.parametrize("uri", ["gs://bucket", "gs://bucket/", "gs:///name", "/local/file"])
def test_split_gcs_rejects_what_names_no_object(uri: str) -> None:
    with pytest.raises(ValueError, match="not a gs://bucket/object URI"):
        storage.split_gcs(uri)


def test_importing_storage_imports_neither_beam_nor_gcs() -> None:
    code = ("import sys, transforms.storage; "
            "print(sorted(m for m in ('apache_beam', 'google.cloud.storage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == "[]"


# --- both backends -------------------------------------------------------------------------

@BOTH
def test_write_read_replace(root: str) -> None:
    path = storage.join(root, "a/b/file.bin")
    assert not storage.exists(path)
    storage.write_bytes(path, b"first")
    storage.write_bytes(path, b"second")
    assert storage.exists(path) and storage.read_bytes(path) == b"second"
    with storage.open_read(path) as handle:
        assert handle.read() == b"second"
    assert storage.list_files(storage.join(root, "**")) == [path]  # no temporary left


@BOTH
def test_if_absent_refuses_to_replace(root: str) -> None:
    path = storage.join(root, "once.json")
    storage.write_bytes(path, b"kept", if_absent=True)
    with pytest.raises(FileExistsError, match="once.json"):
        storage.write_bytes(path, b"other", if_absent=True)
    assert storage.read_bytes(path) == b"kept"
    assert storage.list_files(storage.join(root, "*")) == [path]


@BOTH
def test_missing_files_raise_file_not_found_naming_the_path(root: str, tmp_path: Path) -> None:
    path = storage.join(root, "absent.bin")
    for call in (storage.read_bytes, lambda p: storage.open_read(p).read(),
                 lambda p: storage.download(p, str(tmp_path / "copy"))):
        with pytest.raises(FileNotFoundError, match="absent.bin"):
            call(path)
    assert not (tmp_path / "copy").exists()
    storage.delete([path])  # missing: ignored
    storage.delete_tree(storage.join(root, "nothing"))


@BOTH
def test_list_files_star_stays_in_one_folder(root: str) -> None:
    names = ["a.txt", "b.csv", "sub/c.txt", "sub/deep/d.txt", "a.txt.tmp-123"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    at = {name: storage.join(root, name) for name in names}
    assert storage.list_files(storage.join(root, "*.txt")) == [at["a.txt"]]
    assert storage.list_files(storage.join(root, "sub", "*")) == [at["sub/c.txt"]]
    assert storage.list_files(storage.join(root, "**.txt")) == sorted(
        at[n] for n in ("a.txt", "sub/c.txt", "sub/deep/d.txt"))
    assert storage.list_files(storage.join(root, "a.txt")) == [at["a.txt"]]
    assert storage.list_files(storage.join(root, "missing/*")) == []
    assert storage.temporaries(root) == [at["a.txt.tmp-123"]]
    storage.delete_tree(storage.join(root, "sub"))
    assert storage.list_files(storage.join(root, "**")) == sorted(
        at[n] for n in ("a.txt", "a.txt.tmp-123", "b.csv"))


@BOTH
def test_open_text_streams_gzip_and_plain(root: str) -> None:
    text = "a,b\n1,\"x\ny\"\n" * 1000
    storage.write_bytes(storage.join(root, "t.csv.gz"), gzip.compress(text.encode()))
    storage.write_bytes(storage.join(root, "t.csv"), text.encode())
    for name in ("t.csv.gz", "t.csv"):
        with storage.open_text(storage.join(root, name)) as handle:
            assert handle.read() == text


@BOTH
def test_open_write_publishes_only_at_commit(root: str) -> None:
    path = storage.join(root, "stream.bin")
    storage.write_bytes(path, b"old")
    writer = storage.open_write(path)
    writer.write(b"new ")
    writer.write(b"bytes")
    assert storage.read_bytes(path) == b"old"
    writer.commit()
    assert storage.read_bytes(path) == b"new bytes"
    with pytest.raises(RuntimeError):
        with storage.open_write(path) as handle:
            handle.write(b"half")
            raise RuntimeError("failed mid-way")
    assert storage.read_bytes(path) == b"new bytes"
    assert storage.list_files(storage.join(root, "**")) == [path]


@BOTH
def test_copy(root: str) -> None:
    pairs = [(storage.join(root, f"src/{i}"), storage.join(root, f"dst/x/{i}")) for i in range(3)]
    for i, (source, _) in enumerate(pairs):
        storage.write_bytes(source, bytes([i]) * 10)
    storage.copy(pairs)
    assert [storage.read_bytes(t) for _, t in pairs] == [bytes([i]) * 10 for i in range(3)]


# --- local only ----------------------------------------------------------------------------

def test_a_failed_local_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(path), "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_local_write_replaces_a_hard_link_without_touching_its_twin(tmp_path: Path) -> None:
    original = tmp_path / "a"
    original.write_bytes(b"shared")
    os.link(original, tmp_path / "b")
    storage.write_bytes(str(tmp_path / "b"), b"own")
    assert original.read_bytes() == b"shared" and (tmp_path / "b").read_bytes() == b"own"


# --- GCS only: the calls made --------------------------------------------------------------

def test_a_gcs_write_is_one_upload(gcs: CountingProxy, gcs_emulator: str) -> None:
    path = f"{gcs_emulator}/calls/one.bin"
    storage.write_bytes(path, b"x" * 1000)
    gcs.reset()
    storage.write_bytes(path, b"y" * 1000)  # a replacement too: no delete, no copy
    assert gcs.counts() == {"upload": 1}
    gcs.reset()
    storage.write_bytes(path, b"z" * (9 << 20))  # past the one-request limit: resumable
    counts = gcs.counts()
    assert counts["upload"] == 1 and write_ops(counts) == 1, counts
    assert storage.read_bytes(path) == b"z" * (9 << 20)


def test_requester_pays_bills_the_user_project(gcs: CountingProxy, gcs_emulator: str,
                                               tmp_path: Path) -> None:
    path = f"{gcs_emulator}/billed/table.csv.gz"
    storage.write_bytes(path, gzip.compress(b"a,b\n1,2\n"))
    gcs.reset()
    assert storage.exists(path, "billed-project")
    assert storage.read_bytes(path, user_project="billed-project") == gzip.compress(b"a,b\n1,2\n")
    with storage.open_text(path, "billed-project") as handle:
        assert handle.read() == "a,b\n1,2\n"
    storage.download(path, str(tmp_path / "copy"), user_project="billed-project")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{gcs_emulator}/billed/absent", user_project="billed-project")
    # Object calls only: the client's background fetch of bucket metadata (a cache of its
    # own) is not one of ours.
    calls = [r for r in gcs.requests if "/o" in r.path]
    unbilled = [r for r in calls if r.query.get("userProject") != ["billed-project"]]
    assert len(calls) >= 5 and not unbilled, unbilled
    gcs.reset()
    storage.read_bytes(path)
    assert gcs.requests and all("userProject" not in r.query for r in gcs.requests)


def test_delete_is_batched_and_ignores_missing_objects(gcs: CountingProxy,
                                                       gcs_emulator: str) -> None:
    paths = [f"{gcs_emulator}/batch/{i:03d}" for i in range(150)]
    for path in paths[:140]:
        storage.write_bytes(path, b"1")
    gcs.reset()
    storage.delete(paths)
    assert gcs.counts() == {"delete": 150}
    assert storage.list_files(f"{gcs_emulator}/batch/*") == []


def test_a_gcs_run_writes_a_few_objects_per_chunk_not_per_record(
        gcs: CountingProxy, gcs_emulator: str, tmp_path: Path) -> None:
    """Each group: its chunk and its sidecar (two uploads), then one copy into place; the
    other files of the run are one upload each. No object per record."""
    from pipelines import build_dataset
    from synthetic.mimic import generate

    data = generate(str(tmp_path / "mimic"), n_patients=30, seed=4, image_height=256,
                    image_width=224, image_pool=2)
    out = f"{gcs_emulator}/run"
    gcs.reset()
    meta = build_dataset.run([
        "--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
        "--mimic_cxr_dir", data.mimic_cxr_dir, "--output_dir", out, "--image_size", "32",
        "--chunk_size", "8", "--max_text_length", "64"])
    counts = gcs.counts()
    chunks = len(meta["chunks"])
    published = storage.list_files(f"{out}/**")
    # + 1: _tmp/run.json, the run's fingerprint
    assert counts["upload"] == 2 * chunks + (len(published) - chunks) + 1, (counts, published)
    assert counts["copy"] == chunks, counts  # no failed record: every group is its chunk
    # Deletes: each moved group file, each sidecar, run.json, and the start's clearing of an
    # old report.html and DATASET_CARD.md (absent here).
    assert counts["delete"] == 2 * chunks + 3, counts
    assert write_ops(counts) == 5 * chunks + (len(published) - chunks) + 4 < meta["total_records"]


# --- clients -------------------------------------------------------------------------------

def _child_client_check(parent_client_id: int, path: str, queue: multiprocessing.Queue) -> None:
    client = storage._client(None)
    queue.put((id(client) != parent_client_id, storage.read_bytes(path)))


def test_clients_are_per_thread_and_rebuilt_after_fork(gcs: CountingProxy,
                                                       gcs_emulator: str) -> None:
    path = f"{gcs_emulator}/clients/file"
    storage.write_bytes(path, b"data")
    mine = storage._client(None)
    assert storage._client(None) is mine
    assert storage._client("billed-project") is not mine
    other = []
    thread = threading.Thread(target=lambda: other.append(storage._client(None)))
    thread.start()
    thread.join()
    assert other[0] is not mine
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_client_check, args=(id(mine), path, queue))
    child.start()
    fresh, data = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and fresh and data == b"data"
