"""ChunkedDataset inside training loops: torchdata's StatefulDataLoader resume, elastic ranks,
the shuffle's reach, gs:// prefetch and `columns=`, on a small output of the real encoder."""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from tests.chunk_fixtures import upload_tree, write_dataset
from tests.gcs_proxy import CountingProxy
from transforms.chunks import ChunkedDataset, collate_records

# torchdata 0.11 calls a deprecated torch API; 3 workers on this 2-core machine are on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
              pytest.mark.filterwarnings("ignore:This DataLoader will create")]

N = 70  # chunks of 5: 14 chunks
BATCH = 8
WINDOW = 15  # records: windows of 3 chunks, so that windows and their edges are exercised


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("training") / "out"
    write_dataset(root, {"train": N, "val": 0, "test": 0}, chunk_size=5, image_size=16)
    return root


def dataset(output: Path, **kwargs) -> ChunkedDataset:
    options = {"seed": 7, "batch_size": BATCH, "shuffle_window": WINDOW} | kwargs
    return ChunkedDataset(str(output), "train", **options)


def ids(loader, batches: int | None = None) -> list[str]:
    out = []
    for k, batch in enumerate(loader):
        out += batch["record_id"]
        if batches is not None and k + 1 == batches:
            break
    return out


def stateful(ds, num_workers: int) -> StatefulDataLoader:
    return StatefulDataLoader(ds, batch_size=BATCH, num_workers=num_workers,
                              collate_fn=collate_records)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_stateful_dataloader_resumes_exactly(output: Path, num_workers: int) -> None:
    """Stopped after 3 batches and resumed from the loader's state in a fresh loader, the
    loader yields exactly the rest of the uninterrupted epoch, in its order."""
    full = ids(stateful(dataset(output), num_workers))
    assert sorted(full) == sorted(set(full)) and len(full) == N
    loader = stateful(dataset(output), num_workers)
    before = ids(loader, batches=3)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    del loader
    resumed = stateful(dataset(output), num_workers)
    resumed.load_state_dict(state)
    assert before + ids(resumed) == full
    resumed.dataset.set_epoch(1)  # the next epoch is whole again
    next_epoch = dataset(output)
    next_epoch.set_epoch(1)
    assert ids(resumed) == ids(stateful(next_epoch, num_workers))


@pytest.mark.parametrize("before_workers,after_workers", [(2, 0), (2, 3), (0, 2), (1, 2)])
def test_loader_state_resumes_on_other_worker_counts(
    output: Path, before_workers: int, after_workers: int
) -> None:
    """The loader's state loaded into the dataset resumes with any num_workers."""
    full = ids(stateful(dataset(output), 0))
    loader = stateful(dataset(output), before_workers)
    before = ids(loader, batches=3)
    state = json.loads(json.dumps(loader.state_dict()))
    ds = dataset(output)
    ds.load_state_dict(state)
    assert before + ids(stateful(ds, after_workers)) == full


def test_loader_state_between_snapshots_resumes_exactly(output: Path) -> None:
    """A state taken between worker snapshots (snapshot_every_n_steps=2) counts the batches
    delivered since the last one."""
    full = ids(stateful(dataset(output), 0))
    loader = StatefulDataLoader(dataset(output), batch_size=BATCH, num_workers=2,
                                collate_fn=collate_records, snapshot_every_n_steps=2)
    before = ids(loader, batches=3)
    ds = dataset(output)
    ds.load_state_dict(loader.state_dict())
    assert before + ids(stateful(ds, 1)) == full


def test_worker_state_into_other_workers_is_refused(output: Path) -> None:
    loader = stateful(dataset(output, world_size=2, rank=0), 2)
    ids(loader, batches=2)
    state = loader.state_dict()
    elsewhere = stateful(dataset(output, world_size=4, rank=0), 2)
    elsewhere.load_state_dict(state)
    with pytest.raises(ValueError, match=r"ds\.load_state_dict\(loader\.state_dict\(\)\)"):
        ids(elsewhere)


def _rank_epoch(output: Path, world: int, state: dict | None, batches: int | None,
                num_workers: int = 1) -> tuple[list[list[str]], list[dict]]:
    """Each rank's records (`batches` each, in step) and the states of its loader."""
    out, states = [], []
    for rank in range(world):
        ds = dataset(output, rank=rank, world_size=world)
        if state is not None:
            ds.load_state_dict(state)
        loader = stateful(ds, num_workers)
        out.append(ids(loader, batches))
        states.append(json.loads(json.dumps(loader.state_dict())))
    return out, states


def _merged(intervals: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in intervals:
        if out and start <= out[-1][1]:
            out[-1][1] = end
        else:
            out.append([start, end])
    return out


@pytest.mark.parametrize("before,after", [(2, 4), (4, 2), (3, 2)])
def test_elastic_resume_covers_the_epoch(output: Path, before: int, after: int) -> None:
    """A state from any rank of a `before`-rank job resumes an `after`-rank job: no record is
    missing, and the only repeats are the padding that keeps ranks equal."""
    first, loader_states = _rank_epoch(output, before, None, batches=2)
    dataset_states = []
    for rank, loader_state in enumerate(loader_states):
        ds = dataset(output, rank=rank, world_size=before)
        ds.load_state_dict(loader_state)
        dataset_states.append(ds.state_dict())
    assert all(s == dataset_states[0] for s in dataset_states)  # the same on every rank
    part = -(-N // before)  # each rank's contiguous part of the epoch's order
    assert dataset_states[0]["consumed"] == _merged([[r * part, r * part + 2 * BATCH]
                                                     for r in range(before)])
    rest, _ = _rank_epoch(output, after, loader_states[-1], batches=None)
    seen = [rid for part in first + rest for rid in part]
    counts = collections.Counter(seen)
    assert len(counts) == N  # every record
    remaining = N - before * 2 * BATCH
    padding = -(-remaining // after) * after - remaining
    assert len(seen) - N == padding
    assert {len(part) for part in rest} == {-(-remaining // after)}  # equal per rank


def test_plain_dataloader_with_workers_resumes_from_a_count(output: Path) -> None:
    full = ids(DataLoader(dataset(output), batch_size=BATCH, collate_fn=collate_records))
    ds = dataset(output)
    before = ids(DataLoader(ds, batch_size=BATCH, num_workers=2, collate_fn=collate_records), 4)
    state = ds.state_dict(consumed=4 * BATCH)
    resumed = dataset(output)
    resumed.load_state_dict(state)
    after = ids(DataLoader(resumed, batch_size=BATCH, num_workers=2, collate_fn=collate_records))
    assert before + after == full


def test_shuffle_is_reproducible_and_mixes_across_chunks(output: Path) -> None:
    def epoch(seed: int, epoch: int, **kwargs) -> list[str]:
        ds = ChunkedDataset(str(output), "train", seed=seed, batch_size=BATCH, **kwargs)
        ds.set_epoch(epoch)
        return ids(DataLoader(ds, batch_size=BATCH, collate_fn=collate_records))

    default = epoch(3, 0)
    assert epoch(3, 0) == default and epoch(3, 1) != default and epoch(4, 0) != default
    assert sorted(epoch(3, 1)) == sorted(default)

    def distinct_chunks(order: list[str]) -> list[int]:
        batches = [order[k : k + BATCH] for k in range(0, N - BATCH + 1, BATCH)]
        return [len({int(r.split("-")[1]) // 5 for r in b}) for b in batches]

    # The former default, windows of 2 chunks: a batch draws from 2, or 4 across two windows.
    assert max(distinct_chunks(epoch(3, 0, shuffle_window=10))) <= 4
    # The default window holds the whole split here: 8 records from 14 chunks.
    assert sum(distinct_chunks(default)) / len(distinct_chunks(default)) >= 5


def test_memory_holds_one_window_of_chunks(output: Path) -> None:
    ds = dataset(output)
    most = 0
    for _ in DataLoader(ds, batch_size=BATCH, collate_fn=collate_records):
        most = max(most, len(ds._cache))
    assert most == ds.window_chunks == 3


def test_columns_load_only_the_fields_asked(output: Path) -> None:
    full = ChunkedDataset(str(output), "train", mode="map")[11]
    ds = ChunkedDataset(str(output), "train", mode="map", columns=["labels", "record_id"])
    record = ds[11]
    assert set(record) == {"labels", "record_id"}
    assert record["record_id"] == full["record_id"]
    torch.testing.assert_close(record["labels"], full["labels"], equal_nan=True)
    images = dataset(output, columns=("image_tensor", "labels"))
    batch = next(iter(DataLoader(images, batch_size=BATCH, num_workers=1,
                                 collate_fn=collate_records)))
    assert set(batch) == {"image_tensor", "labels"}
    assert batch["image_tensor"].shape == (BATCH, 3, 16, 16)
    with pytest.raises(ValueError, match="columns must be a non-empty subset"):
        ChunkedDataset(str(output), "train", columns=["image"])


def test_gcs_prefetch_never_delays_the_chunk_the_reader_needs(
    output: Path, gcs_emulator: str, tmp_path: Path
) -> None:
    uri = f"{gcs_emulator}/prefetch-first/out"
    upload_tree(output, uri)
    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    proxy = CountingProxy(emulator, latency_s=0.2)  # downloads started together overlap
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
    try:
        ds = ChunkedDataset(uri, "train", seed=7, batch_size=4, shuffle_window=5,
                            cache_dir=str(tmp_path / "cache"), prefetch=3)
        it = iter(DataLoader(ds, batch_size=4, collate_fn=collate_records))
        next(it)  # one window of one chunk
        deadline = time.monotonic() + 20
        while len(list((tmp_path / "cache").glob("*.pt"))) < 4:
            assert time.monotonic() < deadline, "the prefetch did not download ahead"
            time.sleep(0.05)
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator
        proxy.close()
    chunk_events = [path for _, path in proxy.events if path.endswith(".pt")]
    first = chunk_events[0]
    # Every request and response of the reader's first chunk, before any other chunk's.
    assert set(chunk_events[: chunk_events.count(first)]) == {first}
    assert len(set(chunk_events)) == 4


def test_gcs_prefetch_downloads_ahead_within_the_cap(
    output: Path, gcs_emulator: str, tmp_path: Path
) -> None:
    uri = f"{gcs_emulator}/prefetch-test/out"
    upload_tree(output, uri)
    meta = json.loads((output / "metadata.json").read_text())
    chunk_bytes = max(c["bytes"] for c in meta["chunks"])

    def first_batch_then_cache(prefetch: int, cache: Path, cap: float = 100) -> set[str]:
        ds = ChunkedDataset(uri, "train", seed=7, batch_size=4, shuffle_window=5,
                            cache_dir=str(cache), cache_bytes=int(cap * chunk_bytes),
                            prefetch=prefetch)
        it = iter(DataLoader(ds, batch_size=4, collate_fn=collate_records))
        next(it)  # the first batch: one window of one chunk, 4 of its 5 records
        deadline = time.monotonic() + 20
        while prefetch and len(list(cache.glob("*.pt"))) < 1 + prefetch:
            assert time.monotonic() < deadline, "the prefetch did not download ahead"
            time.sleep(0.05)
        return {p.name for p in cache.glob("*.pt")}

    assert len(first_batch_then_cache(0, tmp_path / "off")) == 1  # on first touch only
    assert len(first_batch_then_cache(3, tmp_path / "on")) == 4  # and the next 3
    ds = ChunkedDataset(uri, "train", seed=7, batch_size=4, shuffle_window=5, prefetch=6,
                        cache_dir=str(tmp_path / "capped"), cache_bytes=int(3.5 * chunk_bytes))
    epoch = ids(DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_records))
    assert sorted(epoch) == sorted(f"dicom-{n:05d}" for n in range(N))
    cached = list((tmp_path / "capped").glob("*.pt"))
    assert sum(p.stat().st_size for p in cached) <= 3.5 * chunk_bytes
