"""ChunkedDataset over a tiny output written with the real encoder: local dirs and gs://."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.chunk_fixtures import make_record, upload_tree, write_dataset
from transforms.chunks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChunkedDataset,
    ChunkIntegrityError,
    IncompleteOutputError,
    IterableChunkedDataset,
    MapChunkedDataset,
    MissingChunkError,
    collate_records,
    normalize_images,
)

COUNTS = {"train": 22, "val": 5, "test": 3}  # chunks of 4: train has 6, the last of 2
SIZE = 32


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chunks") / "out"
    write_dataset(root, COUNTS, chunk_size=4, image_size=SIZE)
    return root


@pytest.fixture
def copy_of(output: Path, tmp_path: Path) -> Path:
    """A private copy of the output that a test may damage."""
    return Path(shutil.copytree(output, tmp_path / "out"))


def split_ids(split: str) -> list[str]:
    first = {"train": 0, "val": COUNTS["train"], "test": COUNTS["train"] + COUNTS["val"]}[split]
    return [f"dicom-{n:05d}" for n in range(first, first + COUNTS[split])]


def source_record(record_id: str) -> dict:
    n = int(record_id.split("-")[1])
    split = "train" if n < 22 else "val" if n < 27 else "test"
    return make_record(n, split, image_size=SIZE)


def epoch_ids(ds, *, num_workers: int = 0, batch_size: int = 4) -> list[str]:
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_records)
    return [rid for batch in loader for rid in batch["record_id"]]


def test_map_mode_gives_every_record_as_training_tensors(output: Path) -> None:
    ds = ChunkedDataset(str(output), "train", mode="map")
    assert isinstance(ds, MapChunkedDataset) and len(ds) == COUNTS["train"]
    assert [ds[i]["record_id"] for i in range(len(ds))] == split_ids("train")
    rec = ds[-2]  # record 20, letterboxed
    src = source_record(rec["record_id"])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (src["image"].float().div(255).expand(3, SIZE, SIZE) - mean) / std
    assert rec["image_tensor"].dtype == torch.float32
    torch.testing.assert_close(rec["image_tensor"], expected, rtol=0, atol=1e-5)
    top, left, height, width = src["image_box"].tolist()
    box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    box[top : top + height, left : left + width] = True
    assert height < SIZE and torch.equal(rec["attention_mask"], box)
    assert rec["text_input_ids"].dtype == torch.int64
    assert torch.equal(rec["text_input_ids"], src["text_input_ids"].long())
    assert torch.equal(rec["text_attention_mask"], torch.ones_like(rec["text_input_ids"]))
    assert torch.equal(rec["clinical_data"], src["clinical_data"])
    assert torch.equal(rec["clinical_mask"], src["clinical_mask"])
    torch.testing.assert_close(rec["labels"], src["labels"], equal_nan=True)
    for key in ("record_id", "subject_id", "study_id", "stay_id", "hadm_id", "view_position",
                "split", "enhanced_note", "attention_segments", "retrieved_knowledge"):
        assert rec[key] == src[key], key
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_map_mode_batches_through_a_dataloader(output: Path) -> None:
    ds = ChunkedDataset(str(output), "train", mode="map")
    loader = DataLoader(ds, batch_size=5, shuffle=True, collate_fn=collate_records,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        for k, rid in enumerate(batch["record_id"]):
            single = ds[split_ids("train").index(rid)]
            assert torch.equal(batch["image_tensor"][k], single["image_tensor"])
            assert torch.equal(batch["attention_mask"][k], single["attention_mask"])
        seen += batch["record_id"]
    assert sorted(seen) == split_ids("train")


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_every_record_once_per_epoch(output: Path, num_workers: int, batch_size) -> None:
    ds = ChunkedDataset(str(output), "train", seed=1, batch_size=batch_size)
    assert isinstance(ds, IterableChunkedDataset)
    ids = epoch_ids(ds, num_workers=num_workers, batch_size=batch_size or 4)
    assert sorted(ids) == split_ids("train")


def test_order_depends_on_seed_and_epoch_only(output: Path) -> None:
    def order(seed: int, epoch: int, **kwargs) -> list[str]:
        ds = ChunkedDataset(str(output), "train", seed=seed, batch_size=4, **kwargs)
        ds.set_epoch(epoch)
        return epoch_ids(ds, batch_size=4, num_workers=kwargs.pop("num_workers", 0))

    first = order(0, 0)
    assert first != split_ids("train")  # shuffled
    assert order(0, 0) == first
    assert order(0, 1) != first and sorted(order(0, 1)) == sorted(first)
    assert order(1, 0) != first
    # With the DataLoader's batch_size given, workers do not change the order.
    ds = ChunkedDataset(str(output), "train", seed=0, batch_size=4)
    assert epoch_ids(ds, batch_size=4, num_workers=2) == first
    unshuffled = ChunkedDataset(str(output), "train", shuffle=False)
    assert epoch_ids(unshuffled) == split_ids("train")


def test_persistent_workers_follow_the_epochs(output: Path) -> None:
    expected = []
    for epoch in (0, 1):
        ds = ChunkedDataset(str(output), "train", seed=4, batch_size=4)
        ds.set_epoch(epoch)
        expected.append(epoch_ids(ds))
    ds = ChunkedDataset(str(output), "train", seed=4, batch_size=4)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True,
                        collate_fn=collate_records)
    got = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)  # the persistent workers do not see this, yet follow
        got.append([rid for batch in loader for rid in batch["record_id"]])
    assert got == expected and expected[0] != expected[1]


def test_ranks_get_equal_counts_and_together_the_whole_split(output: Path) -> None:
    for split, drop_last in (("train", False), ("val", False), ("val", True)):
        per_rank = []
        for rank in (0, 1):
            ds = ChunkedDataset(str(output), split, rank=rank, world_size=2, seed=3,
                                drop_last=drop_last)
            per_rank.append(epoch_ids(ds, num_workers=1))
            assert len(per_rank[-1]) == len(ds)
        assert len(per_rank[0]) == len(per_rank[1])
        union = set(per_rank[0]) | set(per_rank[1])
        if drop_last:  # 5 records: 2 each, disjoint, one left out
            assert len(per_rank[0]) == 2 and len(union) == 4
        else:  # every record; with 5, 3 each and one record twice
            assert union == set(split_ids(split))
            assert len(per_rank[0]) == -(-COUNTS[split] // 2)


def test_resume_in_process_continues_the_epoch(output: Path) -> None:
    full = epoch_ids(_epoch(output, 2), batch_size=4)
    ds = _epoch(output, 2)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_records)
    before = []
    for batch in loader:
        before += batch["record_id"]
        if len(before) == 12:
            break
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == [[0, 12]]
    resumed = ChunkedDataset(str(output), "train", seed=5, batch_size=4)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    after = epoch_ids(resumed, batch_size=4)
    assert before + after == full


def test_resume_with_workers_continues_the_epoch(output: Path) -> None:
    full = epoch_ids(_epoch(output, 1), batch_size=3)
    loader = DataLoader(_epoch(output, 1, batch_size=3), batch_size=3, num_workers=2,
                        collate_fn=collate_records)
    before = []
    for batches, batch in enumerate(loader, start=1):
        before += batch["record_id"]
        if batches == 3:
            break
    state = loader.dataset.state_dict(consumed=batches * 3)
    resumed = _epoch(output, 0, batch_size=3)
    resumed.load_state_dict(state)
    after = epoch_ids(resumed, batch_size=3, num_workers=2)
    assert before + after == full
    resumed.set_epoch(2)  # the next epoch is whole again
    assert len(epoch_ids(resumed, batch_size=3)) == COUNTS["train"]


def _epoch(output: Path, epoch: int, batch_size: int = 4) -> IterableChunkedDataset:
    ds = ChunkedDataset(str(output), "train", seed=5, batch_size=batch_size)
    ds.set_epoch(epoch)
    return ds


def test_collate_pads_text_and_keeps_ids_as_lists(output: Path) -> None:
    ds = ChunkedDataset(str(output), "train", mode="map")
    records = [ds[0], ds[1], ds[2]]
    lengths = [r["text_input_ids"].numel() for r in records]
    assert len(set(lengths)) == 3
    batch = collate_records(records)
    assert batch["text_input_ids"].shape == (3, max(lengths))
    for k, (rec, length) in enumerate(zip(records, lengths)):
        assert torch.equal(batch["text_input_ids"][k, :length], rec["text_input_ids"])
        assert batch["text_input_ids"][k, length:].eq(0).all()
        assert batch["text_attention_mask"][k].sum() == length
    assert batch["image_tensor"].shape == (3, 3, SIZE, SIZE)
    assert batch["labels"].shape == (3, 14)
    assert batch["record_id"] == [r["record_id"] for r in records]
    assert batch["hadm_id"] == [None, 20000001, 20000002]
    assert batch["attention_segments"][0] == records[0]["attention_segments"]


def test_transform_and_normalisation_options(output: Path) -> None:
    def flip(record: dict) -> dict:
        record["image_tensor"] = record["image_tensor"].flip(-1)
        record["flipped"] = True
        return record

    ds = ChunkedDataset(str(output), "val", mode="map", mean=(0.0,), std=(1.0,), transform=flip)
    rec = ds[0]
    src = source_record(rec["record_id"])
    assert rec["flipped"] is True and rec["image_tensor"].shape == (1, SIZE, SIZE)
    torch.testing.assert_close(rec["image_tensor"][0], src["image"].flip(-1).float() / 255)


def test_half_precision_images(output: Path) -> None:
    full = ChunkedDataset(str(output), "val", mode="map")[1]["image_tensor"]
    half = ChunkedDataset(str(output), "val", mode="map", image_dtype=torch.bfloat16)[1]
    assert half["image_tensor"].dtype == torch.bfloat16
    torch.testing.assert_close(half["image_tensor"].float(), full, rtol=1e-2, atol=2e-2)


def test_uint8_images_normalised_on_the_device_match_the_float_mode(output: Path) -> None:
    """image_dtype=torch.uint8 moves the stored image; normalize_images then gives what the
    float mode would have, for a batch from DataLoader workers."""
    raw = ChunkedDataset(str(output), "val", mode="map", image_dtype=torch.uint8)
    full = ChunkedDataset(str(output), "val", mode="map")
    rec = raw[1]
    assert rec["image_tensor"].dtype == torch.uint8 and rec["image_tensor"].shape == (1, SIZE, SIZE)
    assert torch.equal(rec["image_tensor"][0], source_record(rec["record_id"])["image"])
    torch.testing.assert_close(normalize_images(rec["image_tensor"]), full[1]["image_tensor"],
                               rtol=0, atol=1e-5)
    loader = DataLoader(raw, batch_size=3, num_workers=2, collate_fn=collate_records)
    batch = next(iter(loader))
    assert batch["image_tensor"].shape == (3, 1, SIZE, SIZE)
    expected = torch.stack([full[i]["image_tensor"] for i in range(3)])
    torch.testing.assert_close(normalize_images(batch["image_tensor"]), expected,
                               rtol=0, atol=1e-5)
    half = normalize_images(batch["image_tensor"], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(expected)


def test_corrupted_chunk_is_named(copy_of: Path) -> None:
    assert ChunkedDataset(str(copy_of), "train", mode="map")[9]  # verified once, intact
    path = copy_of / "train" / "train-00002-of-00006.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    ds = ChunkedDataset(str(copy_of), "train", mode="map")
    assert ds[0]["record_id"] == "dicom-00000"  # the other chunks still read
    with pytest.raises(ChunkIntegrityError, match=r"train-00002-of-00006\.pt has sha256"):
        ds[9]
    with pytest.raises(ChunkIntegrityError, match=r"train-00002-of-00006\.pt"):
        epoch_ids(ChunkedDataset(str(copy_of), "train"))


def test_truncated_and_missing_chunks_are_named(copy_of: Path) -> None:
    truncated = copy_of / "val" / "val-00000-of-00002.pt"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ChunkIntegrityError, match=r"val-00000-of-00002\.pt has \d+ bytes"):
        ChunkedDataset(str(copy_of), "val", mode="map", verify=False)[0]
    (copy_of / "test" / "test-00000-of-00001.pt").unlink()
    ds = ChunkedDataset(str(copy_of), "test", mode="map")  # chunks are read lazily
    with pytest.raises(MissingChunkError, match=r"missing: .*test-00000-of-00001\.pt"):
        ds[0]


def test_output_without_metadata_is_incomplete(copy_of: Path) -> None:
    (copy_of / "metadata.json").unlink()
    with pytest.raises(IncompleteOutputError, match="output is incomplete: no metadata.json"):
        ChunkedDataset(str(copy_of), "train")


def test_bad_options_are_rejected(output: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ChunkedDataset(str(output), "dev")
    with pytest.raises(ValueError, match="mode must be one of"):
        ChunkedDataset(str(output), "train", mode="random")
    with pytest.raises(ValueError, match="rank 2"):
        ChunkedDataset(str(output), "train", rank=2, world_size=2)


def test_gcs_output_through_workers(output: Path, gcs_emulator: str, tmp_path: Path) -> None:
    uri = f"{gcs_emulator}/loader-test/out"
    upload_tree(output, uri)
    cache = tmp_path / "cache"
    chunk_bytes = max(c["bytes"] for c in json.loads((output / "metadata.json").read_text())
                      ["chunks"])
    ds = ChunkedDataset(uri, "train", seed=2, batch_size=4, cache_dir=str(cache),
                        cache_bytes=int(2.5 * chunk_bytes))
    assert sorted(epoch_ids(ds, num_workers=2)) == split_ids("train")
    cached = list(cache.glob("*.pt"))
    assert 1 <= len(cached) and sum(p.stat().st_size for p in cached) <= 2.5 * chunk_bytes
    for path in cached:  # named by the sha256 they were verified against
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
    rec = ChunkedDataset(uri, "val", mode="map", cache_dir=str(cache))[4]
    assert rec["record_id"] == split_ids("val")[4]


def test_gcs_missing_chunk_and_metadata(output: Path, gcs_emulator: str, tmp_path: Path) -> None:
    from google.cloud import storage

    uri = f"{gcs_emulator}/loader-missing/out"
    upload_tree(output, uri)
    bucket = storage.Client().bucket(gcs_emulator[len("gs://"):])
    bucket.blob("loader-missing/out/test/test-00000-of-00001.pt").delete()
    ds = ChunkedDataset(uri, "test", mode="map", cache_dir=str(tmp_path))
    with pytest.raises(MissingChunkError, match=r"gs://.*/test/test-00000-of-00001\.pt"):
        ds[0]
    bucket.blob("loader-missing/out/metadata.json").delete()
    with pytest.raises(IncompleteOutputError, match="loader-missing/out"):
        ChunkedDataset(uri, "test")


def test_importing_the_loader_imports_neither_beam_nor_gcs() -> None:
    code = (
        "import sys, transforms.chunks; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'apache_beam', 'transforms'}),"
        " 'google.cloud.storage' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                         check=True, capture_output=True, text=True).stdout.strip()
    assert out == "['transforms'] False"
