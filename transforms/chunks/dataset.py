"""`ChunkedDataset`: one split of a pipeline output as training records, read lazily.

Two modes, chosen by `mode=` (both are `ChunkedDataset` instances):

- "iterable" (default, for training): a `torch.utils.data.IterableDataset` that reads chunks
  sequentially. Each epoch shuffles the chunk order, then the records within windows of
  consecutive chunks, reproducibly from (seed, epoch). It shards across distributed ranks
  (equal counts per rank) and DataLoader workers, and resumes mid-epoch from `state_dict()`.
- "map" (for evaluation and random access): `len(ds)` and `ds[i]`, a global index found in the
  chunks through cumulative counts and `bisect`. Shuffle and shard with the DataLoader's
  sampler (`DistributedSampler` across ranks); the shuffle/rank options do not apply.

Memory stays bounded whatever the dataset size: a process holds at most `cache_chunks` decoded
chunks (in iterable mode, at least the chunks of one shuffle window), memory-mapped, and never
reads the other chunks up front. Each chunk is checked against metadata.json (size always,
sha256 when `verify`) the first time a process reads it.

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
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.utils.data

from transforms.chunks.errors import ChunkIntegrityError
from transforms.chunks.record import LIST_COLUMNS, PADDED_KEYS, Loading, training_record
from transforms.chunks.storage import (
    DEFAULT_CACHE_BYTES,
    ChunkStore,
    read_metadata,
    split_manifest,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("iterable", "map")


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
            records, rounded up to whole chunks, of the chunk-shuffled stream; default
            `cache_chunks` chunks. A process holds the chunks of one window at once.
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
        shuffle_window: Optional[int] = None,
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
    ) -> None:
        if mode is not None and mode != self._mode:
            raise ValueError(f"{type(self).__name__} is mode {self._mode!r}, not {mode!r}")
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be >= 1, got {cache_chunks}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_window is not None and shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
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
        largest = max(self.counts, default=1)
        if shuffle_window is None:
            self.window_chunks = cache_chunks
        else:
            self.window_chunks = max(1, math.ceil(shuffle_window / largest))
        self.epoch = 0
        self._epoch_set = True  # the next iteration runs self.epoch, not the one after it
        self._consumed = 0
        self._resume: Optional[tuple[int, int]] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()  # decoded chunks stay in their process
        return state

    def _chunk(self, j: int, capacity: int) -> _LoadedChunk:
        chunk = self._cache.get(j)
        if chunk is not None:
            self._cache.move_to_end(j)
            return chunk
        while len(self._cache) >= capacity:
            self._cache.popitem(last=False)
        data = self.store.load(self.chunks[j])
        shape = tuple(data["image"].shape[1:])
        if self.image_size is not None and shape != (self.image_size, self.image_size):
            raise ChunkIntegrityError(
                f"chunk file {self.store.uri(self.chunks[j])} has images of {shape}, "
                f"metadata.json says image_size {self.image_size}"
            )
        chunk = _LoadedChunk(data)
        self._cache[j] = chunk
        return chunk

    def _record(self, j: int, i: int, capacity: int) -> dict:
        record = self._chunk(j, capacity).training_record(i, self._normalize)
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
        images = _batch_buffer((len(locations), channels, *size), self._normalize.dtype)
        masks = _batch_buffer((len(locations), *size), torch.bool)
        records = []
        for k, (j, i) in enumerate(locations):
            record = self._chunk(j, capacity).training_record(
                i, self._normalize, images[k], masks[k]
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


class IterableChunkedDataset(ChunkedDataset, torch.utils.data.IterableDataset):
    """A split as a stream, shuffled per epoch, sharded over ranks and workers, resumable.

    The epoch's order of the whole split is a function of (seed, epoch) and the manifest.
    Rank r takes positions [r * L, (r + 1) * L) of it, L = `len(ds)` records, the same for
    every rank. Within a rank, DataLoader workers share the rank's records (see `batch_size`).

    Epochs: call `set_epoch(e)` before each epoch, as with `DistributedSampler`. An iteration
    that starts with no `set_epoch` (or `load_state_dict`) since the previous one runs the
    next epoch: so persistent DataLoader workers, which never see `set_epoch`, still follow
    a loop over consecutive epochs.

    Resuming: `state_dict()` says the epoch and how many records of this rank's stream were
    consumed; after `load_state_dict(state)` the next iteration yields the rest of that epoch,
    so the records before and after add up to the epoch exactly. The dataset counts the
    records it yielded itself only when it runs in the training process (num_workers=0);
    with workers, pass the count the training loop saw: `state_dict(consumed=batches *
    batch_size)`, and give the dataset the DataLoader's `batch_size` so the stream's order does
    not depend on the workers.
    """

    _mode = "iterable"

    def __len__(self) -> int:
        """Records this rank yields per epoch (summed over its DataLoader workers)."""
        if self.drop_last:
            return self.num_records // self.world_size
        return math.ceil(self.num_records / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration yields."""
        if epoch != self.epoch:
            self._resume = None
        self.epoch = int(epoch)
        self._epoch_set = True
        self._consumed = 0

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Where this rank stands: its epoch and the records of it consumed so far.

        Args:
            consumed: records of this rank's epoch the training loop has consumed; default the
                count this process yielded (right with num_workers=0 only).
        """
        return {
            "epoch": self.epoch,
            "consumed": self._consumed if consumed is None else int(consumed),
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Makes the next iteration continue the epoch of `state` after its consumed records.

        Raises:
            ValueError: the state was taken with another seed or world size, or is out of range.
        """
        for key in ("seed", "world_size"):
            if key in state and state[key] != getattr(self, key):
                mine = getattr(self, key)
                raise ValueError(f"state has {key} {state[key]}, this dataset {mine}")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= len(self):
            raise ValueError(f"state consumed {consumed} records of an epoch of {len(self)}")
        self.epoch = int(state["epoch"])
        self._epoch_set = True
        self._consumed = consumed
        self._resume = (self.epoch, consumed)

    def _blocks(self, skip: int) -> Iterator[range]:
        """This process's share of the rank's stream, as ranges of stream offsets in order.

        The rank's stream is offsets [skip, len(self)); blocks of `batch_size` (default: one
        block per worker) go to the workers in turn, worker w taking blocks w, w + K, ...
        """
        remaining = len(self) - skip
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        block = self.batch_size or max(1, math.ceil(remaining / workers))
        for lo in range(worker * block, remaining, workers * block):
            yield range(skip + lo, skip + min(lo + block, remaining))

    def __iter__(self) -> Iterator[dict]:
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        self._consumed = skip
        if self.num_records == 0:
            return
        order = _EpochOrder(self.counts, self.seed, self.epoch, self.shuffle, self.window_chunks)
        capacity = max(self.cache_chunks, self.window_chunks)
        first = self.rank * len(self)
        for block in self._blocks(skip):
            # Positions past the end wrap around to the epoch's first records: equal rank counts.
            locations = (order.locate((first + k) % self.num_records) for k in block)
            if self.batch_size is None:
                records = (self._record(j, i, capacity) for j, i in locations)
            else:
                records = self._batch_records(list(locations), capacity)
            for record in records:
                self._consumed += 1
                yield record


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
