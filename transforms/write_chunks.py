"""Fixed-size chunk files, laid out after the heavy stages so failed records leave no holes.

The refs of the records that made it through preprocessing (`SpillRef`) are grouped by split;
within a split they are ordered by a sha256 of (seed, record_id), so chunk `i` holds the
records at positions [i * chunk_size, (i + 1) * chunk_size) of that order: every chunk is full
but the last of each split, and names and contents do not depend on bundling or worker count.
Only refs cross the two GroupByKeys; the writer reads one chunk's records back from their
temporary files, writes the chunk atomically (`transforms.storage.write_bytes`) and deletes
them.

The pipeline's output stages, in order (`transforms.spill.SpillSamples`, `WriteChunks`,
`transforms.metadata.WriteMetadata`):

    refs = samples | SpillSamples(output_dir)
    chunks = (refs, assignment) | WriteChunks(output_dir, chunk_size, seed)
    {"chunks": chunks, "refs": refs, ...} | WriteMetadata(output_dir, config, ...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import storage
from transforms.chunks.format import chunk_relpath, decode_chunk, decode_record, encode_chunk
from transforms.spill import SpillRef, to_chunk_record
from transforms.splits import SplitAssignment


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    """One written chunk, as metadata.json lists it."""

    path: str  # relative to the output dir, e.g. "train/train-00000-of-00003.pt"
    split: str
    index: int
    records: int
    bytes: int
    sha256: str


# ((split, chunk index), (offset in the chunk, chunks in the split, ref))
Slot = tuple[tuple[str, int], tuple[int, int, SpillRef]]


def chunk_count(n_records: int, chunk_size: int) -> int:
    """How many chunks `n_records` records fill: ceil(n / chunk_size)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return math.ceil(n_records / chunk_size)


def record_order_key(seed: int, record_id: str) -> bytes:
    """The record's place in its split's chunk order (a stable hash, the same on every worker)."""
    return hashlib.sha256(f"chunk:{seed}:{record_id}".encode()).digest()


def lay_out_split(
    split: str, refs: Iterable[SpillRef], chunk_size: int, seed: int
) -> Iterator[Slot]:
    """Places every ref of `split` in its chunk: a pure function of the record ids and seed.

    Raises:
        ValueError: two refs with one record_id (a record spilled twice upstream).
    """
    ordered = sorted(refs, key=lambda r: (record_order_key(seed, r.record_id), r.record_id))
    for before, after in zip(ordered, ordered[1:]):
        if before.record_id == after.record_id:
            raise ValueError(f"record {before.record_id} reached the chunk writer twice")
    count = chunk_count(len(ordered), chunk_size)
    for position, ref in enumerate(ordered):
        index, offset = divmod(position, chunk_size)
        yield (split, index), (offset, count, ref)


def _lay_out(
    element: tuple[str, Iterable[SpillRef]], chunk_size: int, seed: int
) -> Iterator[Slot]:
    split, refs = element
    return lay_out_split(split, refs, chunk_size, seed)


def _key_by_split(ref: SpillRef, assignment: SplitAssignment) -> tuple[str, SpillRef]:
    return assignment.split_of(ref.subject_id), ref


class _WriteChunkFn(beam.DoFn):
    """Assembles one chunk from its records' temporary files and writes it atomically."""

    def __init__(self, output_dir: str) -> None:
        self._output_dir = output_dir

    def setup(self) -> None:
        self._chunks = Metrics.counter("chunks", "chunks_written")
        self._records = Metrics.counter("chunks", "records_written")

    def process(self, element: tuple[tuple[str, int], Iterable[tuple]]) -> Iterator[ChunkInfo]:
        (split, index), slots = element
        slots = sorted(slots, key=lambda slot: slot[0])
        if [offset for offset, _, _ in slots] != list(range(len(slots))):
            raise ValueError(f"chunk {split}/{index} has gaps or repeats in its offsets")
        count = slots[0][1]
        refs = [ref for _, _, ref in slots]
        relpath = chunk_relpath(split, index, count)
        path = storage.join(self._output_dir, relpath)
        try:
            data = self._encode(refs, split, index, count)
        except FileNotFoundError:
            data = self._written_before(path, refs)
        else:
            storage.write_bytes(path, data)
        info = ChunkInfo(
            path=relpath,
            split=split,
            index=index,
            records=len(refs),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        del data
        storage.delete([ref.path for ref in refs])
        self._chunks.inc()
        self._records.inc(len(refs))
        yield info

    @staticmethod
    def _encode(refs: list[SpillRef], split: str, index: int, count: int) -> bytes:
        records = []
        for ref in refs:
            record = decode_record(storage.read_bytes(ref.path))
            record["split"] = split
            records.append(record)
        return encode_chunk(records, split=split, index=index, count=count)

    @staticmethod
    def _written_before(path: str, refs: list[SpillRef]) -> bytes:
        """A retried bundle whose first attempt wrote the chunk and deleted its records."""
        if not storage.exists(path):
            raise FileNotFoundError(
                f"the temporary records of {path} are missing and the chunk was never written"
            )
        data = storage.read_bytes(path)
        if decode_chunk(data)["record_id"] != [ref.record_id for ref in refs]:
            raise ValueError(f"{path} exists with other records and its temporaries are gone")
        return data


class WriteChunks(beam.PTransform):
    """Writes the spilled records of each split as fixed-size chunk files.

    Input: a tuple `(refs, assignment)`: the `SpillRef`s of `SpillSamples`, and the
        one-element `SplitAssignment` PCollection of `splits.SplitPatients` (read here as a
        side input).
    Output: `ChunkInfo`, one per chunk written to
        `{output_dir}/{split}/{split}-{index:05d}-of-{count:05d}.pt`: every chunk holds
        exactly `chunk_size` records but the last of each split. No dead letters: a record
        that failed upstream never became a ref, so it takes no place in any chunk.

    Args:
        output_dir: local dir or gs:// URI of the dataset.
        chunk_size: records per chunk.
        seed: seed of the record order within each split.
    """

    def __init__(self, output_dir: str, chunk_size: int, seed: int) -> None:
        super().__init__()
        chunk_count(0, chunk_size)  # validates chunk_size
        self._output_dir = output_dir.rstrip("/")
        self._chunk_size = int(chunk_size)
        self._seed = int(seed)

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        refs, assignment = inputs
        return (
            refs
            | "KeyBySplit" >> beam.Map(_key_by_split, beam.pvalue.AsSingleton(assignment))
            | "GroupBySplit" >> beam.GroupByKey()
            | "LayOutChunks" >> beam.FlatMap(_lay_out, self._chunk_size, self._seed)
            | "GroupByChunk" >> beam.GroupByKey()
            | "WriteChunk" >> beam.ParDo(_WriteChunkFn(self._output_dir))
        )
