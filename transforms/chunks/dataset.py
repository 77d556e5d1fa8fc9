"""`ChunkedDataset`: one split of a pipeline output as training records, read lazily.

Two modes, chosen by `mode=` (both are `ChunkedDataset` instances):

- "iterable" (default, for training): a `torch.utils.data.IterableDataset` that reads chunks
  sequentially. Each epoch shuffles the chunk order, then the records within windows of
  consecutive chunks (4096 records by default), reproducibly from (seed, epoch). It shards
  across distributed ranks (equal counts per rank) and DataLoader workers, and resumes
  mid-epoch, through torchdata's `StatefulDataLoader` or its own `state_dict()`, on any
  number of workers and ranks (see `IterableChunkedDataset`).
- "map" (for evaluation and random access): `len(ds)` and `ds[i]`, a global index found in the
  chunks through cumulative counts and `bisect`. Shuffle and shard with the DataLoader's
  sampler (`DistributedSampler` across ranks); the shuffle/rank options do not apply.

Memory stays bounded whatever the dataset size: a process holds at most `cache_chunks` decoded
chunks (in iterable mode, at least the chunks of one shuffle window), memory-mapped, and never
reads the other chunks up front: its resident memory is the pages of the records it read from
them, at most one window's (about 0.3 MB a record at 518 x 518, file-backed and reclaimable).
Each chunk is checked against metadata.json (size always, sha256 when `verify`) the first time
a process reads it. gs:// chunks are downloaded into a capped local cache, the next ones in
background threads (`prefetch`).

`columns=` keeps only some fields of each record; an image not asked for is neither
normalised nor masked, the loader's main costs.

Each record is a dict:
    image_tensor        float32 [C, S, S] (or image_dtype), (uint8 / 255 - mean) / std per
                        channel, the grey image replicated to C = len(mean) channels (3,
                        ImageNet mean and std, by default); with image_dtype=torch.uint8 the
                        stored image, uint8 [1, S, S], for `normalize_images` on the device
    attention_mask      bool [S, S], True on real pixels (inside image_box), False on padding
    image_box           int32 [4], (top, left, height, width) of the real pixels
    text_input_ids      int64 [T]
    text_attention_mask int64 [T], ones (`collate_records` pads it with zeros)
    attention_segments  list of [name, start, end] token ranges (end exclusive)
    enhanced_note       str
    clinical_data       float32 [F];  clinical_mask bool [F], True = observed and valid
    labels              float32 [14], CheXpert order, NaN = missing
    record_id, view_position, split, study_datetime: str; subject_id, study_id, stay_id: int;
    hadm_id: int or None; retrieved_knowledge: list of str
"""

from __future__ import annotations

import bisect
import collections
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.utils.data

from transforms.chunks.errors import ChunkIntegrityError
from transforms.chunks.record import (
    LIST_COLUMNS,
    PADDED_KEYS,
    TRAINING_FIELDS,
    Loading,
    training_record,
)
from transforms.storage import is_gcs
from transforms.chunks.prefetch import ChunkPrefetcher, prefetch_depth
from transforms.chunks.storage import (
    DEFAULT_CACHE_BYTES,
    ChunkStore,
    read_metadata,
    split_manifest,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("iterable", "map")
DEFAULT_SHUFFLE_WINDOW = 4096
DEFAULT_PREFETCH = 8


class _Normalizer:
    """uint8 [S, S] -> float [C, S, S], (x / 255 - mean[c]) / std[c], fast.

    The hot path of the loader. Measured on this project's 2-core VM, one thread, S = 518:
    the textbook `(img.float() / 255 - m) / s` per channel and a stack takes 1.3-1.7 ms; a
    256-entry look-up table with index_select 0.7 ms; a broadcast multiply-add 0.65 ms; this,
    0.25-0.4 ms: one uint8 -> float copy into the first output channel, then one fused
    `bias + scale * x` per channel from that copy (the first channel last, in place), with no
    temporary and no second pass. Writing into fresh memory costs more than the arithmetic
    here (about 1.5 us per 4 KiB page fault, 1.2 ms per float32 image), hence the batch
    buffers of `ChunkedDataset._batch_records`.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
    ) -> None:
        if not (dtype.is_floating_point or dtype == torch.uint8):
            raise ValueError(f"image_dtype must be a floating point dtype or torch.uint8, "
                             f"got {dtype}")
        _check_mean_std(mean, std)
        self.scale = [1.0 / (255.0 * s) for s in std]
        self.bias = [torch.tensor(-m / s, dtype=torch.float32) for m, s in zip(mean, std)]
        self.dtype = dtype
        # uint8: the stored grey image as it is, [1, S, S]; normalize_images does the rest on
        # the training device.
        self.channels = 1 if dtype == torch.uint8 else len(mean)

    def __call__(self, image: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            out = torch.empty((self.channels, *image.shape), dtype=self.dtype)
        first = out[0]
        first.copy_(image)
        if self.dtype == torch.uint8:
            return out
        for c in range(1, len(self.scale)):
            torch.add(self.bias[c], first, alpha=self.scale[c], out=out[c])
        torch.add(self.bias[0], first, alpha=self.scale[0], out=first)
        return out


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean {mean} and std {std} must have one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"std {std} must be positive")


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [..., 1, S, S] images (`image_dtype=torch.uint8`) -> dtype [..., C, S, S],
    (x / 255 - mean[c]) / std[c]: what the loader's float modes deliver, computed on whatever
    device `images` is on. Moving uint8 to the GPU and normalising there moves 12x fewer bytes
    through the DataLoader than float32 [3, S, S] (see BENCHMARKS.md).
    """
    _check_mean_std(mean, std)
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 1:
        raise ValueError(f"normalize_images takes uint8 [..., 1, S, S] images, got "
                         f"{images.dtype} {tuple(images.shape)}")
    shape = (len(mean), 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32,
                         device=images.device).view(shape)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32,
                        device=images.device).view(shape)
    return torch.addcmul(bias, images.to(torch.float32), scale).to(dtype)


class _LoadedChunk:
    """A decoded chunk with the columns its records' training forms read as Python lists."""

    __slots__ = ("data", "lists")

    def __init__(self, data: dict) -> None:
        self.data = data
        self.lists = {column: data[column].tolist() for column in LIST_COLUMNS}

    def training_record(
        self,
        i: int,
        normalize: _Normalizer,
        image_out: Optional[torch.Tensor] = None,
        mask_out: Optional[torch.Tensor] = None,
    ) -> dict:
        """Record `i` for training (`record.training_record`); its image and mask go into
        `image_out` and `mask_out` (slots of a batch buffer) when given."""
        return training_record(self.data, i, Loading(self.lists, normalize, image_out, mask_out))


def _no_image(image: torch.Tensor, out: Optional[torch.Tensor] = None) -> None:
    """The normaliser of a record read without its image (`columns=`): no work."""
    return None


def _distributed_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; in shared memory inside a DataLoader worker, as
    `default_collate` allocates it, so that the batch reaches the training process uncopied."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)


class ChunkedDataset(torch.utils.data.Dataset):
    """One split of a pipeline output (local directory or gs:// URI), read lazily.

    `ChunkedDataset(..., mode="iterable")` is an `IterableChunkedDataset` and
    `ChunkedDataset(..., mode="map")` a `MapChunkedDataset`; see the module docstring.

    Args:
        output_dir: the pipeline's --output_dir (holding metadata.json).
        split: "train", "val" or "test".
        mode: "iterable" (default) or "map".
        shuffle: iterable mode: shuffle chunks, then records within windows, every epoch.
        seed: iterable mode: the shuffle seed (non-negative); the order is a function of
            (seed, epoch, the manifest) and of nothing else.
        shuffle_window: iterable mode: records are shuffled within windows of this many
            records, rounded up to whole chunks, of the chunk-shuffled stream (a batch of 32
            then draws from ~26 chunks, where windows of 2 chunks gave 2). A process holds
            the chunks of one window at once, and the pages of the records it read of them.
        batch_size: iterable mode: the DataLoader's batch size (recommended). The stream is
            cut into blocks of batch_size records; workers take them in turn, which the
            DataLoader's round robin puts back in order, so the stream is the same for any
            num_workers and resumes exactly; and the images and masks of a block are built
            straight into one batch buffer that `collate_records` hands on without a copy
            (the fast path). Without it, records come one by one and each worker reads one
            contiguous part of the rank's records.
        cache_chunks: decoded chunks a process keeps (least recently used goes first).
        cache_dir: where gs:// chunks are downloaded (default under the temporary directory).
        cache_bytes: cap of that download cache; least recently used files are deleted.
        verify: check each chunk's sha256 against metadata.json at its first read.
        mean: per-channel mean of the [0, 1] image; its length is the channel count.
        std: per-channel standard deviation.
        image_dtype: dtype of image_tensor. float16 or bfloat16 halve the bytes that the loader
            writes per image, its main cost (about 2x the records/s per worker here), for
            mixed-precision training. torch.uint8 delivers the stored grey image as it is,
            [1, S, S], 12x fewer bytes than float32 [3, S, S]: normalise it on the training
            device with `normalize_images` (mean and std are then unused here).
        transform: applied to each record dict; returns the record dict to yield.
        rank: iterable mode: this process's rank; default torch.distributed's, else 0.
        world_size: iterable mode: number of ranks; default torch.distributed's, else 1.
        drop_last: iterable mode: with several ranks, drop the epoch's last records so that
            every rank gets N // world_size; otherwise (default) the epoch wraps around to
            its first records so that every rank gets ceil(N / world_size).
        columns: the record fields to load (see the module docstring); default all.
        prefetch: gs:// chunks each process keeps downloaded ahead of its reads (a few
            threads at a time, after its first chunk); fewer where they would not fit in
            `cache_bytes` (shared by the DataLoader workers); 0 downloads each chunk at its
            first read.

    Raises:
        IncompleteOutputError: no metadata.json in output_dir.
        ValueError: an unknown split, mode or format_version, or a bad option.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ChunkedDataset":
        if cls is ChunkedDataset:
            mode = kwargs.get("mode", "iterable")
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            cls = IterableChunkedDataset if mode == "iterable" else MapChunkedDataset
        return object.__new__(cls)

    _mode = ""

    def __init__(
        self,
        output_dir: str,
        split: str,
        *,
        mode: Optional[str] = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
        batch_size: Optional[int] = None,
        cache_chunks: int = 2,
        cache_dir: Optional[str] = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        verify: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        image_dtype: torch.dtype = torch.float32,
        transform: Optional[Callable[[dict], dict]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        columns: Optional[Sequence[str]] = None,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        if mode is not None and mode != self._mode:
            raise ValueError(f"{type(self).__name__} is mode {self._mode!r}, not {mode!r}")
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be >= 1, got {cache_chunks}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if columns is not None and (not columns or set(columns) - set(TRAINING_FIELDS)):
            raise ValueError(f"columns must be a non-empty subset of {TRAINING_FIELDS}, got "
                             f"{list(columns)}")
        if rank is None or world_size is None:
            default_rank, default_world = _distributed_rank_world()
            rank = default_rank if rank is None else rank
            world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size {world_size})")
        self.output_dir = output_dir
        self.split = split
        self.metadata = read_metadata(output_dir)
        self.chunks = split_manifest(self.metadata, split)
        self.counts = [int(c["records"]) for c in self.chunks]
        self.starts = [0]
        for count in self.counts:
            self.starts.append(self.starts[-1] + count)
        self.num_records = self.starts[-1]
        self.image_size = self.metadata.get("image_size")
        self.store = ChunkStore(
            output_dir, cache_dir=cache_dir, cache_bytes=cache_bytes, verify=verify
        )
        self.cache_chunks = cache_chunks
        self.transform = transform
        self._normalize = _Normalizer(mean, std, image_dtype)
        self._cache: collections.OrderedDict[int, _LoadedChunk] = collections.OrderedDict()
        # Iterable mode only.
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.columns = None if columns is None else frozenset(columns)
        self.prefetch = prefetch
        largest = max(self.counts, default=1)
        self.window_chunks = max(1, math.ceil(shuffle_window / largest))
        self.epoch = 0
        self._epoch_set = True  # the next iteration runs self.epoch, not the one after it
        self._base: list = []  # the epoch's positions consumed before this iteration
        self._yielded = 0
        self._resume: Optional[tuple[int, list, int]] = None
        self._prefetcher: Optional[ChunkPrefetcher] = None
        self._scratch: Optional[torch.Tensor] = None  # the unused masks of `columns=`

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()  # decoded chunks stay in their process
        state["_prefetcher"] = None  # its threads too
        return state

    def _chunk(self, j: int, capacity: int) -> _LoadedChunk:
        chunk = self._cache.get(j)
        if chunk is not None:
            self._cache.move_to_end(j)
            return chunk
        while len(self._cache) >= capacity:
            self._cache.popitem(last=False)
        if self._prefetcher is not None:
            self._prefetcher.claim(j)
        data = self.store.load(self.chunks[j])
        if self._prefetcher is not None:
            self._prefetcher.advance()  # the next downloads start once this one is local
        shape = tuple(data["image"].shape[1:])
        if self.image_size is not None and shape != (self.image_size, self.image_size):
            raise ChunkIntegrityError(
                f"chunk file {self.store.uri(self.chunks[j])} has images of {shape}, "
                f"metadata.json says image_size {self.image_size}"
            )
        chunk = _LoadedChunk(data)
        self._cache[j] = chunk
        return chunk

    def _selected_record(
        self,
        chunk: _LoadedChunk,
        i: int,
        image_out: Optional[torch.Tensor] = None,
        mask_out: Optional[torch.Tensor] = None,
    ) -> dict:
        """`training_record` kept to `columns`: an image not asked for is not normalised and
        its mask goes to a scratch buffer, the loader's main costs."""
        if self.columns is None:
            return chunk.training_record(i, self._normalize, image_out, mask_out)
        normalize = self._normalize if "image_tensor" in self.columns else _no_image
        if "attention_mask" not in self.columns:
            mask_out = self._scratch_mask(tuple(chunk.data["image"].shape[1:]))
        record = chunk.training_record(i, normalize, image_out, mask_out)
        return {key: value for key, value in record.items() if key in self.columns}

    def _scratch_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._scratch is None or tuple(self._scratch.shape) != shape:
            self._scratch = torch.empty(shape, dtype=torch.bool)
        return self._scratch

    def _record(self, j: int, i: int, capacity: int) -> dict:
        record = self._selected_record(self._chunk(j, capacity), i)
        if self.transform is not None:
            record = self.transform(record)
        return record

    def _batch_records(self, locations: Sequence[tuple[int, int]], capacity: int) -> list[dict]:
        """The records at (chunk, offset) `locations`, their images and masks written straight
        into one batch buffer each: `collate_records` then stacks them without a copy.

        Filling fresh memory is the loader's main cost (on the project's VM a 4 KiB page fault
        costs about 1.5 us, so 2 ms per float [3, 518, 518] image): this writes each image once,
        where a record of its own then a stack writes it twice.
        """
        if not locations:
            return []
        size = tuple(self._chunk(locations[0][0], capacity).data["image"].shape[1:])
        channels = self._normalize.channels
        n = len(locations)
        images = masks = None
        if self.columns is None or "image_tensor" in self.columns:
            images = _batch_buffer((n, channels, *size), self._normalize.dtype)
        if self.columns is None or "attention_mask" in self.columns:
            masks = _batch_buffer((n, *size), torch.bool)
        records = []
        for k, (j, i) in enumerate(locations):
            record = self._selected_record(
                self._chunk(j, capacity), i,
                None if images is None else images[k], None if masks is None else masks[k],
            )
            if self.transform is not None:
                record = self.transform(record)
            records.append(record)
        return records


class MapChunkedDataset(ChunkedDataset):
    """Random access to a split: `len(ds)` records, `ds[i]` (see `ChunkedDataset`).

    Records are numbered in chunk-index order. A sampler that jumps between chunks at every
    record costs a chunk open per record (memory-mapped, so only the record's pages are read).
    """

    _mode = "map"

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        j, i = self._locate(int(index))
        return self._record(j, i, self.cache_chunks)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """The records at `indices`, as one batch buffer (the DataLoader's batched fetch)."""
        locations = [self._locate(int(index)) for index in indices]
        return self._batch_records(locations, self.cache_chunks)

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += self.num_records
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} is outside the split's {self.num_records}")
        j = bisect.bisect_right(self.starts, index) - 1
        return j, index - self.starts[j]


class _EpochOrder:
    """The epoch's order of a split's records, as (chunk, offset) by position, lazily.

    Chunks are permuted, cut into windows of `window` consecutive chunks, and the records of
    each window permuted; only the windows asked for are materialised.
    """

    def __init__(
        self, counts: Sequence[int], seed: int, epoch: int, shuffle: bool, window: int
    ) -> None:
        self.counts = counts
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        n_chunks = len(counts)
        if shuffle:
            order = np.random.default_rng((seed, epoch, 0)).permutation(n_chunks)
        else:
            order = np.arange(n_chunks)
        self.windows = [order[k : k + window].tolist() for k in range(0, n_chunks, window)]
        self.starts = [0]
        for chunks in self.windows:
            self.starts.append(self.starts[-1] + sum(counts[j] for j in chunks))
        self._current = -1
        self._pairs: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, position: int) -> tuple[int, int]:
        w = bisect.bisect_right(self.starts, position) - 1
        if w != self._current:
            self._pairs = self._window(w)
            self._current = w
        return self._pairs[position - self.starts[w]]

    def _window(self, w: int) -> list[tuple[int, int]]:
        pairs = [(j, i) for j in self.windows[w] for i in range(self.counts[j])]
        if self.shuffle:
            perm = np.random.default_rng((self.seed, self.epoch, 1, w)).permutation(len(pairs))
            pairs = [pairs[k] for k in perm.tolist()]
        return pairs


def _merge(intervals: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sorted, disjoint, non-empty [start, end) intervals covering the same positions."""
    merged: list[list[int]] = []
    for start, end in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


class _Remaining:
    """The epoch's positions outside `consumed` (merged intervals), in order, by offset."""

    def __init__(self, consumed: Sequence[Sequence[int]], n: int) -> None:
        self.intervals: list[tuple[int, int]] = []
        previous = 0
        for start, end in consumed:
            if start > previous:
                self.intervals.append((previous, start))
            previous = end
        if n > previous:
            self.intervals.append((previous, n))
        self.starts = [0]
        for start, end in self.intervals:
            self.starts.append(self.starts[-1] + end - start)

    def __len__(self) -> int:
        return self.starts[-1]

    def position(self, offset: int) -> int:
        k = bisect.bisect_right(self.starts, offset) - 1
        return self.intervals[k][0] + offset - self.starts[k]

    def take(self, lo: int, hi: int) -> list[list[int]]:
        """The positions of offsets [lo, hi), as intervals."""
        out = []
        for (start, end), first in zip(self.intervals, self.starts):
            a, b = max(lo, first), min(hi, first + end - start)
            if a < b:
                out.append([start + a - first, start + b - first])
        return out


def _rank_length(remaining: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return remaining // world_size
    return -(-remaining // world_size)


def _consumed_after(
    base: Sequence[Sequence[int]], n: int, world_size: int, drop_last: bool, records: int
) -> list[list[int]]:
    """The epoch's consumed positions once each of `world_size` ranks, having started from
    `base`, has consumed `records` of its stream (ranks move in step: one batch each)."""
    remaining = _Remaining(base, n)
    length = _rank_length(len(remaining), world_size, drop_last)
    records = min(max(int(records), 0), length)
    consumed = [list(c) for c in base]
    for rank in range(world_size):
        lo = rank * length
        consumed += remaining.take(lo, min(lo + records, len(remaining)))
    return _merge(consumed)


def _worker_blocks(length: int, worker: int, workers: int, block: int) -> Iterator[range]:
    """Worker `worker`'s share of a rank stream of `length` records: blocks of `block`
    offsets, the workers taking them in turn."""
    for lo in range(worker * block, length, workers * block):
        yield range(lo, min(lo + block, length))


def _loader_dataset_state(state: dict) -> dict:
    """The dataset state in a torchdata `StatefulDataLoader` state: of its one process, or of
    the worker that delivered the last batch, moved on by the batches since the snapshot."""
    if "_snapshot" not in state:
        return state["dataset_state"]  # num_workers=0: taken when the state was
    workers = state["_snapshot"]["_worker_snapshots"].values()
    states = [w["dataset_state"] for w in workers if w and w.get("dataset_state")]
    if not states:
        raise ValueError("the loader state holds no ChunkedDataset state")
    latest = max(states, key=lambda s: (s["epoch"], s["worker"]["rank_records"] or 0))
    worker = latest["worker"]
    if worker["rank_records"] is None:
        raise ValueError(
            f"a loader state of {worker['workers']} workers taken without the dataset's "
            f"batch_size cannot resume on other workers or ranks: give ChunkedDataset the "
            f"DataLoader's batch_size"
        )
    steps = int(state.get("_steps_since_snapshot", 0))
    records = worker["rank_records"] + steps * (worker["batch_size"] or 1)
    consumed = _consumed_after(worker["base"], latest["records"], worker["world_size"],
                               worker["drop_last"], records)
    return {key: latest[key] for key in ("epoch", "seed", "records")} | {"consumed": consumed}


class IterableChunkedDataset(ChunkedDataset, torch.utils.data.IterableDataset):
    """A split as a stream, shuffled per epoch, sharded over ranks and workers, resumable.

    Order: the epoch's order of the whole split is a function of (seed, epoch) and the
    manifest. Rank r of W takes the r-th of W equal contiguous parts of it (ceil(N / W) records
    each, the last part padded by wrapping around to the first records; or N // W with
    `drop_last`), so that a rank reads its own chunks. Within a rank, DataLoader workers take blocks of
    `batch_size` records in turn; the DataLoader's round robin puts them back in order, so
    what the training loop sees does not depend on num_workers.

    Epochs: call `set_epoch(e)` before each epoch, as with `DistributedSampler`. An iteration
    that starts with no `set_epoch` (or `load_state_dict`) since the previous one runs the
    next epoch: so persistent DataLoader workers, which never see `set_epoch`, still follow
    a loop over consecutive epochs.

    Resuming: the state is the epoch and the set of its positions consumed by all ranks
    together (ranks consume in step, one batch each per training step), so it is the same on
    every rank and holds no world size or worker count. Resumed, the ranks share the epoch's
    remaining positions as above, in order: the records before and after add up to the
    epoch, with repeats only in the padding that keeps ranks equal. Three ways to take it:

    - torchdata's `StatefulDataLoader`: `loader.state_dict()` / `loader.load_state_dict()`
      snapshot and restore each worker's place: exactly the rest of the uninterrupted epoch,
      for the same num_workers and world size (the loader itself requires the same
      num_workers). To resume on another num_workers or world size, load the loader's state
      into the dataset instead: `ds.load_state_dict(loader.state_dict())` before building the
      new loader (this needs the dataset's `batch_size` with more than one worker).
    - a plain `DataLoader`: `ds.state_dict(consumed=batches * batch_size)`, the records this
      rank consumed since the iteration began (the dataset cannot count them in workers).
    - num_workers=0: `ds.state_dict()` counts the records it yielded.
    """

    _mode = "iterable"

    def __len__(self) -> int:
        """Records this rank yields per whole epoch (summed over its DataLoader workers)."""
        return _rank_length(self.num_records, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration yields."""
        if epoch != self.epoch:
            self._resume = None
            self._base = []
        self.epoch = int(epoch)
        self._epoch_set = True
        self._yielded = 0

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Where the epoch stands: the same dict on every rank, loadable on any world size.

        Args:
            consumed: records this rank has consumed since the iteration began; default the
                count this process yielded (right with num_workers=0 only).

        Returns:
            {"epoch", "seed", "records", "consumed": [[start, end], ...] positions of the
            epoch's order}; inside a DataLoader worker (torchdata's `StatefulDataLoader`
            snapshots each), also "worker": that worker's place in its schedule.
        """
        records = self._yielded if consumed is None else int(consumed)
        info = torch.utils.data.get_worker_info()
        in_worker = info is not None and consumed is None
        worker = None
        if in_worker:
            records, worker = self._worker_place(info.id, info.num_workers)
        state = {
            "epoch": self.epoch,
            "seed": self.seed,
            "records": self.num_records,
            "consumed": _consumed_after(self._base, self.num_records, self.world_size,
                                        self.drop_last, records or 0),
        }
        if worker is not None:
            state["worker"] = worker
        return state

    def _worker_place(self, worker: int, workers: int) -> tuple[Optional[int], dict]:
        """This worker's records yielded, and the records of the rank's stream delivered up
        to its last one: all of them before it, the DataLoader delivering batches in order
        (None where its blocks are not batches, so that the others' are unknown)."""
        length = _rank_length(len(_Remaining(self._base, self.num_records)), self.world_size,
                              self.drop_last)
        block = self._block(length, workers)
        rank_records: Optional[int] = 0
        if self._yielded:
            last = self._yielded - 1
            rank_records = (worker + last // block * workers) * block + last % block + 1
        if self.batch_size is None and workers > 1:
            rank_records = None
        return rank_records, {
            "id": worker, "workers": workers, "world_size": self.world_size,
            "batch_size": self.batch_size, "drop_last": self.drop_last,
            "base": self._base, "yielded": self._yielded, "rank_records": rank_records,
        }

    def load_state_dict(self, state: dict) -> None:
        """Makes the next iteration continue the epoch of `state` on this rank.

        Args:
            state: `state_dict()` of any rank of any world size, or a `StatefulDataLoader`'s
                `state_dict()` (whatever its num_workers).

        Raises:
            ValueError: a state of another seed or split, or of a DataLoader worker restored
                into another worker count or world size.
        """
        if "_snapshot" in state or "_num_yielded" in state:
            state = _loader_dataset_state(state)
        if state["seed"] != self.seed:
            raise ValueError(f"state has seed {state['seed']}, this dataset {self.seed}")
        if state["records"] != self.num_records:
            raise ValueError(f"state is of a split of {state['records']} records, this "
                             f"dataset has {self.num_records}")
        base, skip = _merge(state["consumed"]), 0
        if base and (base[0][0] < 0 or base[-1][1] > self.num_records):
            raise ValueError(f"state consumed {base} lies outside [0, {self.num_records})")
        info = torch.utils.data.get_worker_info()
        worker = state.get("worker")
        if worker is not None and info is not None:  # StatefulDataLoader restoring a worker
            mine = {"id": info.id, "workers": info.num_workers, "world_size": self.world_size,
                    "batch_size": self.batch_size, "drop_last": self.drop_last}
            theirs = {key: worker[key] for key in mine}
            if theirs != mine:
                raise ValueError(
                    f"a DataLoader worker's state {theirs} cannot restore worker {mine}: to "
                    f"resume on other workers or ranks, call ds.load_state_dict("
                    f"loader.state_dict()) and do not load the state into the loader"
                )
            base, skip = worker["base"], worker["yielded"]
        self.epoch = int(state["epoch"])
        self._epoch_set = True
        self._base = base
        self._yielded = skip
        self._resume = (self.epoch, base, skip)

    def _block(self, length: int, workers: int) -> int:
        return self.batch_size or max(1, math.ceil(length / workers))

    def __iter__(self) -> Iterator[dict]:
        # Eager, not a generator: torchdata's StatefulDataLoader takes the state right after
        # iter(), and it must be the new iteration's.
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        base: list = []
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            _, base, skip = self._resume
        self._resume = None
        self._base, self._yielded = base, skip
        return self._stream(base, skip)

    def _stream(self, base: list, skip: int) -> Iterator[dict]:
        remaining = _Remaining(base, self.num_records)
        length = _rank_length(len(remaining), self.world_size, self.drop_last)
        if length == 0:
            return
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        block = self._block(length, workers)
        first = self.rank * length

        def positions(offsets: range) -> Iterator[int]:
            # Past the end of the remaining positions: the padding wraps to their first.
            for k in offsets:
                yield remaining.position((first + k) % len(remaining))

        def own_offsets() -> Iterator[range]:
            left = skip
            for offsets in _worker_blocks(length, worker, workers, block):
                if left >= len(offsets):
                    left -= len(offsets)
                    continue
                yield offsets[left:]
                left = 0

        order = self._order()
        capacity = self._capacity()
        self._prefetcher = self._start_prefetch(positions, own_offsets)
        try:
            for offsets in own_offsets():
                locations = [order.locate(p) for p in positions(offsets)]
                if self.batch_size is None:
                    records = (self._record(j, i, capacity) for j, i in locations)
                else:
                    records = self._batch_records(locations, capacity)
                for record in records:
                    self._yielded += 1
                    yield record
        finally:
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None

    def _order(self) -> _EpochOrder:
        return _EpochOrder(self.counts, self.seed, self.epoch, self.shuffle, self.window_chunks)

    def _capacity(self) -> int:
        return max(self.cache_chunks, self.window_chunks if self.shuffle else 1)

    def _start_prefetch(
        self,
        positions: Callable[[range], Iterator[int]],
        own_offsets: Callable[[], Iterator[range]],
    ) -> Optional[ChunkPrefetcher]:
        """A prefetcher of the gs:// chunks this process will read, in order of first use."""
        if not (self.prefetch and is_gcs(self.output_dir)):
            return None
        info = torch.utils.data.get_worker_info()
        largest = max((int(c["bytes"]) for c in self.chunks), default=1)
        ahead = prefetch_depth(self.prefetch, self.store.cache_bytes, largest,
                               1 if info is None else info.num_workers)
        if ahead == 0:
            return None
        order = self._order()  # its own: it runs ahead of the reader's

        def upcoming() -> Iterator[int]:
            for offsets in own_offsets():
                for p in positions(offsets):
                    yield order.locate(p)[0]

        return ChunkPrefetcher(self.store, self.chunks, upcoming(), ahead)


def _consecutive_views(values: list) -> Optional[torch.Tensor]:
    """The [len(values), ...] tensor whose rows `values` are, where they are consecutive
    equal-shaped rows of one storage (records built into a batch buffer), else None."""
    first = values[0]
    if not first.is_contiguous():
        return None
    storage = first.untyped_storage()
    step = first.numel() * first.element_size()
    for k, value in enumerate(values):
        if (
            value.dtype != first.dtype
            or value.shape != first.shape
            or not value.is_contiguous()
            or value.untyped_storage().data_ptr() != storage.data_ptr()
            or value.data_ptr() != first.data_ptr() + k * step
        ):
            return None
    batch = torch.empty(0, dtype=first.dtype)
    return batch.set_(storage, first.storage_offset(), (len(values), *first.shape))


def _stack(key: str, values: list) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack {key!r}: the records' shapes differ: {sorted(shapes)}")
    batch = _consecutive_views(values)
    if batch is not None:
        return batch
    # default_collate allocates the batch in shared memory inside DataLoader workers.
    return torch.utils.data.default_collate(values)


def _pad(values: list, pad_id: int) -> torch.Tensor:
    longest = max((v.numel() for v in values), default=0)
    out = _batch_buffer((len(values), longest), values[0].dtype).fill_(pad_id)
    for row, value in zip(out, values):
        row[: value.numel()] = value
    return out


def collate_records(records: Sequence[dict], *, pad_id: int = 0) -> dict:
    """Batches record dicts: pads text, stacks tensors, keeps the rest as lists.

    `text_input_ids` is padded with `pad_id` and `text_attention_mask` with 0 to the longest
    text of the batch; other tensors are stacked (their shapes must agree); strings, ids,
    None, segments and lists become lists, one entry per record.

    Raises:
        ValueError: no records, records with different keys, or tensors that cannot stack.
    """
    if not records:
        raise ValueError("cannot collate an empty batch")
    keys = list(records[0])
    batch: dict[str, Any] = {}
    for key in keys:
        try:
            values = [r[key] for r in records]
        except KeyError:
            raise ValueError(f"records of one batch have different keys: {key!r}") from None
        if key in PADDED_KEYS:
            batch[key] = _pad(values, pad_id if key == "text_input_ids" else 0)
        elif all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = _stack(key, values)
        else:
            batch[key] = values
    return batch
