"""Records written once, as chunks: the layout, the rename-or-assemble step, and resuming a run.

The pipeline runs here are real (join, MiniLM notes, JPEG decoding) on a small generated
dataset with planted broken images, so groups really come out short.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines import build_dataset
from synthetic.mimic import generate
from transforms.write.layout import group_of, group_starts, lay_out_chunks, record_order_key
from transforms.write.resume import run_fingerprint
from transforms.write.write_chunks import ChunkInfo, PlacedChunk, place_chunks

CHUNK = 5


# --- the layout (pure) ---------------------------------------------------------------------

def test_with_no_failure_every_group_is_its_chunk() -> None:
    plans = lay_out_chunks("train", [5, 5, 5, 3], 5)
    assert [(p.index, p.count, p.group, p.parts) for p in plans] == [
        (0, 4, 0, ((0, 0, 5),)), (1, 4, 1, ((1, 0, 5),)), (2, 4, 2, ((2, 0, 5),)),
        (3, 4, 3, ((3, 0, 3),))]


def test_short_groups_are_topped_up_from_the_end_of_the_split() -> None:
    # Group 1 lost two records, group 2 all of them: the last records fill the holes.
    plans = lay_out_chunks("val", [5, 3, 0, 5, 4], 5)
    assert [p.records for p in plans] == [5, 5, 5, 2]
    assert [p.group for p in plans] == [0, None, None, None]
    assert plans[1].parts == ((1, 0, 3), (4, 2, 4))
    assert plans[2].parts == ((3, 2, 5), (4, 0, 2))
    assert plans[3].parts == ((3, 0, 2),)  # the ends met inside group 3


@pytest.mark.parametrize("seed", range(300))
def test_layout_places_every_written_record_once_in_full_chunks(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randint(1, 6)
    groups = rng.randint(0, 9)
    written = [rng.choice([size] * 3 + list(range(size + 1))) for _ in range(groups)]
    plans = lay_out_chunks("test", written, size)
    total = sum(written)
    assert len(plans) == -(-total // size) and all(p.count == len(plans) for p in plans)
    assert [p.index for p in plans] == list(range(len(plans)))
    assert all(p.records == size for p in plans[:-1])
    assert not plans or 1 <= plans[-1].records <= size
    placed = [(g, i) for p in plans for g, first, end in p.parts for i in range(first, end)]
    assert sorted(placed) == [(g, i) for g in range(groups) for i in range(written[g])]
    for p in plans:
        if p.group is not None:  # renamed as written: exactly its group, whole
            assert p.parts == ((p.group, 0, written[p.group]),)
    # Groups that lost nothing and lend nothing keep their bytes: all but a few.
    full = [g for g in range(groups - 1) if written[g] == size]
    renamed = {p.group for p in plans if p.group is not None}
    shortfall = sum(size - w for w in written[:-1])
    assert len(set(full) - renamed) <= shortfall // size + 2


def test_groups_are_consecutive_runs_of_the_record_order() -> None:
    keys = [record_order_key(7, f"r{i}") for i in range(23)]
    starts = group_starts(list(reversed(keys)), 5)
    ordered = sorted(keys)
    assert [group_of(starts, k) for k in ordered] == [i // 5 for i in range(23)]
    with pytest.raises(ValueError, match="r3 reached the layout twice"):
        group_starts(keys + keys[3:4], 5)


def test_a_retried_commit_finds_its_chunks_in_place(tmp_path: Path) -> None:
    out = str(tmp_path)
    data = b"chunk bytes"
    source = tmp_path / "_tmp" / "groups" / "g.pt"
    source.parent.mkdir(parents=True)
    source.write_bytes(data)
    info = ChunkInfo("train/train-00000-of-00001.pt", "train", 0, 1, len(data),
                     hashlib.sha256(data).hexdigest())
    placed = [PlacedChunk(info, str(source))]
    place_chunks(out, placed)
    place_chunks(out, placed)  # the commit ran again after the move
    assert (tmp_path / info.path).read_bytes() == data and not source.exists()
    (tmp_path / info.path).unlink()
    with pytest.raises(FileNotFoundError, match="neither in"):
        place_chunks(out, placed)


def test_the_run_fingerprint_follows_what_shapes_the_bytes() -> None:
    config = {"image_size": 518, "seed": 42, "max_failed_fraction": 0.01, "report_examples": 0}
    provenance = {"versions": {"torch": "2.13.0"},
                  "provenance": {"embedding_model_sha256": "a", "git_commit": "c1"}}
    base = run_fingerprint(config, provenance)
    # A setting that changes no byte, or a commit with the same source, keeps the groups.
    assert run_fingerprint({**config, "max_failed_fraction": 0.5, "report_examples": 3},
                           provenance) == base
    assert run_fingerprint(config, {**provenance, "provenance": {
        "embedding_model_sha256": "a", "git_commit": "c2"}}) == base
    for changed in ({**config, "image_size": 256}, {**config, "seed": 1}):
        assert run_fingerprint(changed, provenance) != base
    assert run_fingerprint(config, {**provenance, "versions": {"torch": "2.14.1"}}) != base
    assert run_fingerprint(config, {**provenance, "provenance": {
        "embedding_model_sha256": "b"}}) != base


# --- the pipeline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    # 2 broken files of each kind among ~110 records: groups come out short.
    return generate(str(tmp_path_factory.mktemp("mimic")), n_patients=60, seed=11,
                    image_height=320, image_width=288, image_pool=4, faults=2)


def _argv(data, out: Path, *extra: str) -> list[str]:
    return ["--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
            "--mimic_cxr_dir", data.mimic_cxr_dir, "--output_dir", str(out),
            "--image_size", "32", "--chunk_size", str(CHUNK), "--max_text_length", "96",
            "--max_failed_fraction", "0.2", *extra]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _reused(stdout: str) -> int:
    for line in stdout.splitlines():
        if line.strip().startswith("resumed:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def clean(synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "dataset"
    build_dataset.run(_argv(synthetic, out, "--direct_running_mode", "in_memory",
                            "--direct_num_workers", "1"))
    return out


def test_chunks_are_full_and_hold_every_good_record_once(clean: Path) -> None:
    meta = json.loads((clean / "metadata.json").read_text())
    assert meta["format_version"] == 2
    assert sum(meta["failed"].values()) >= 8  # the planted faults, as dead letters
    seen = []
    for split in ("train", "val", "test"):
        entries = [c for c in meta["chunks"] if c["split"] == split]
        assert [c["records"] for c in entries[:-1]] == [CHUNK] * (len(entries) - 1)
        for entry in entries:
            chunk = torch.load(clean / entry["path"], weights_only=True)
            assert chunk["n"] == entry["records"] and chunk["split"] == split
            assert "index" not in chunk and "count" not in chunk  # format version 2
            seen += chunk["record_id"]
    failed = [json.loads(line)["record_id"]
              for line in (clean / "failed/failed-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(seen) == len(set(seen)) == meta["total_records"]
    assert not set(seen) & set(failed)
    assert not (clean / "_tmp").exists()


def _aborted(synthetic, out: Path, *extra: str) -> None:
    """A run that did all the preprocessing, then stopped before it committed (too many
    failed records for --max_failed_fraction 0): what a crash at the commit leaves."""
    with pytest.raises(Exception) as stopped:  # the runner wraps the step's RunAborted
        build_dataset.run(_argv(synthetic, out, "--max_failed_fraction", "0", *extra))
    line, code = build_dataset.aborted_line(stopped.value)
    assert "records failed" in line and code == 1
    assert not (out / "metadata.json").exists()


def test_a_rerun_after_a_crash_reuses_every_finished_group(synthetic, clean, tmp_path,
                                                           capsys) -> None:
    out = tmp_path / "dataset"
    _aborted(synthetic, out)
    assert list((out / "_tmp" / "groups").glob("*.pt"))
    capsys.readouterr()
    meta = build_dataset.run(_argv(synthetic, out, "--direct_num_workers", "2"))
    assert _reused(capsys.readouterr().out) == meta["total_records"]  # nothing recomputed
    assert _tree(out) == _tree(clean)


def test_missing_or_corrupt_groups_are_recomputed_not_published(synthetic, clean, tmp_path,
                                                                capsys) -> None:
    out = tmp_path / "dataset"
    _aborted(synthetic, out)
    sidecars = sorted((out / "_tmp" / "groups").glob("*.json"))
    written = {p: len(json.loads(p.read_text())["refs"]) for p in sidecars}
    lost = sidecars[0]
    lost.unlink()  # killed before its sidecar was written
    truncated, flipped = sidecars[1].with_suffix(".pt"), sidecars[2].with_suffix(".pt")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one pixel: torch.load would not notice
    flipped.write_bytes(bytes(data))
    capsys.readouterr()
    meta = build_dataset.run(_argv(synthetic, out))
    redone = written[lost] + written[sidecars[1]] + written[sidecars[2]]
    assert _reused(capsys.readouterr().out) == meta["total_records"] - redone
    assert _tree(out) == _tree(clean)


def test_a_changed_image_size_reuses_nothing(synthetic, tmp_path, capsys) -> None:
    out = tmp_path / "dataset"
    _aborted(synthetic, out)
    capsys.readouterr()
    meta = build_dataset.run(_argv(synthetic, out, "--image_size", "24"))
    assert _reused(capsys.readouterr().out) == 0
    chunk = torch.load(out / meta["chunks"][0]["path"], weights_only=True)
    assert chunk["image"].shape[1:] == (24, 24)


def test_overwrite_starts_clean(synthetic, clean, tmp_path, capsys) -> None:
    out = tmp_path / "dataset"
    _aborted(synthetic, out)
    build_dataset.run(_argv(synthetic, out))
    capsys.readouterr()
    build_dataset.run(_argv(synthetic, out, "--overwrite"))
    assert _reused(capsys.readouterr().out) == 0
    assert _tree(out) == _tree(clean)


def test_kill_9_mid_run_then_a_rerun_gives_the_clean_bytes(synthetic, clean, tmp_path) -> None:
    out = tmp_path / "dataset"
    command = [sys.executable, "-m", "pipelines.build_dataset", *_argv(synthetic, out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    groups = out / "_tmp" / "groups"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(groups.glob("*.json"))) < 6:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metadata.json").exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _reused(result.stdout) >= CHUNK  # the groups finished before the kill
    assert _tree(out) == _tree(clean)


def test_gcs_output_has_no_temporaries_and_the_same_chunks(synthetic, clean, gcs_emulator
                                                           ) -> None:
    from google.cloud import storage

    out = f"{gcs_emulator}/written-once"
    meta = build_dataset.run(_argv(synthetic, out))
    bucket, prefix = out[len("gs://"):].split("/", 1)
    names = [b.name[len(prefix) + 1:] for b in storage.Client().list_blobs(bucket,
                                                                           prefix=prefix + "/")]
    assert not [n for n in names if n.startswith("_tmp/")]
    local = json.loads((clean / "metadata.json").read_text())
    assert [(c["path"], c["sha256"]) for c in meta["chunks"]] == [
        (c["path"], c["sha256"]) for c in local["chunks"]]
