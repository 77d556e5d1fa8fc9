"""From generated MIMIC-shaped files through the pipeline to ChunkedDataset, as a user runs it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from pipelines import build_dataset
from synthetic.mimic import generate
from transforms.chunks import ChunkedDataset

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mimic")
    return generate(str(root), n_patients=40, seed=3, image_height=384, image_width=320,
                    image_pool=4, faults=1)


def _argv(data, out: Path, *extra: str) -> list[str]:
    return [
        "--mimic_iv_dir", data.mimic_iv_dir,
        "--mimic_ed_dir", data.mimic_ed_dir,
        "--mimic_cxr_dir", data.mimic_cxr_dir,
        "--output_dir", str(out),
        "--image_size", str(IMAGE_SIZE),
        "--chunk_size", "7",
        "--max_text_length", "256",
        "--max_failed_fraction", "0.1",  # the generator plants 4 broken files in ~70 records
        *extra,
    ]


def _tree_digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def built(synthetic, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out") / "dataset"
    build_dataset.run(_argv(synthetic, out, "--runner", "DirectRunner",
                            "--direct_running_mode", "in_memory", "--direct_num_workers", "1"))
    return out


def test_output_is_complete_and_consistent(built: Path, synthetic) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    total = meta["n_train"] + meta["n_val"] + meta["n_test"]
    assert total == meta["total_records"] > 0
    for chunk in meta["chunks"]:
        data = (built / chunk["path"]).read_bytes()
        assert len(data) == chunk["bytes"]
        assert hashlib.sha256(data).hexdigest() == chunk["sha256"]
    for split in ("train", "val", "test"):
        counts = [c["records"] for c in meta["chunks"] if c["split"] == split]
        n = meta[f"n_{split}"]
        assert len(counts) == math.ceil(n / 7)
        assert all(c == 7 for c in counts[:-1]) and sum(counts) == n
    # The generator's four faulty images are dead letters with their reason, not lost.
    failed_lines = [
        json.loads(line)
        for path in sorted((built / "failed").glob("*"))
        for line in path.read_text().splitlines() if line.strip()
    ]
    assert sum(meta["failed"].values()) == len(failed_lines) >= 4
    assert {d["stage"] for d in failed_lines} >= {"image"}
    indices = json.loads((built / "stratification_indices.json").read_text())
    assert indices


def test_loader_reads_every_record_once_and_no_patient_leaks(built: Path) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    subjects: dict[str, set[int]] = {}
    for split in ("train", "val", "test"):
        ds = ChunkedDataset(str(built), split, mode="map")
        assert len(ds) == meta[f"n_{split}"]
        ids = set()
        subjects[split] = set()
        for i in range(len(ds)):
            rec = ds[i]
            assert rec["image_tensor"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert rec["image_tensor"].dtype == torch.float32
            assert rec["text_input_ids"].numel() <= 256
            assert rec["split"] == split
            ids.add(rec["record_id"])
            subjects[split].add(rec["subject_id"])
        assert len(ids) == len(ds)
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]


def test_same_bytes_with_other_worker_count_and_mode(built: Path, synthetic, tmp_path) -> None:
    again = tmp_path / "again"
    build_dataset.run(_argv(synthetic, again, "--runner", "DirectRunner",
                            "--direct_running_mode", "multi_threading",
                            "--direct_num_workers", "2"))
    assert _tree_digest(again) == _tree_digest(built)


def test_rerun_into_complete_output_stops_without_overwrite(built: Path, synthetic) -> None:
    from transforms.errors import InputError

    with pytest.raises(InputError, match="overwrite"):
        build_dataset.run(_argv(synthetic, built))
