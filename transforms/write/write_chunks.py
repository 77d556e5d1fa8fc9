"""Fixed-size chunk files from the written groups: renamed into place, rewritten only if short.

`PreprocessGroups` has written every group of `chunk_size` records as a chunk file under
`_tmp/groups/`. Once all are written, `WriteChunks` lays out each split's final chunks
(`transforms.write.layout.lay_out_chunks`: every chunk full but the last of its split). A
chunk that is a group as written (it lost no record) keeps that file: no byte is read or
written. A chunk that failures left short, and the split's last chunk, is assembled from slices
of the groups' files into `_tmp/assembled/`. Each chunk leaves as a `PlacedChunk`: its manifest
entry and the temporary file that the commit (`transforms.write.metadata`) renames to its name,
once the run's counts add up, so an interrupted or refused run publishes nothing and keeps
every file a re-run can reuse. Names and contents do not depend on bundling, worker count or
restarts. Only `GroupInfo`s (ids, paths, hashes) cross the shuffles.

The pipeline's output stages, in order (`transforms.write.groups.PreprocessGroups`,
`WriteChunks`, `transforms.write.metadata.WriteMetadata`):

    written = (records, assignment) | PreprocessGroups(output_dir, chunk_size, seed, ...)
    chunks = written[GROUPS_TAG] | WriteChunks(output_dir)
    {"chunks": chunks, "refs": written[REFS_TAG], ...} | WriteMetadata(output_dir, config, ...)
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import storage
from transforms.chunks.format import chunk_relpath, decode_chunk, encode_chunk, record_at
from transforms.write.groups import GroupInfo
from transforms.write.layout import ChunkPlan, lay_out_chunks
from transforms.write.resume import tmp_dir


ASSEMBLED_DIR = "assembled"


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    """One written chunk, as metadata.json lists it."""

    path: str  # relative to the output dir, e.g. "train/train-00000-of-00003.pt"
    split: str
    index: int
    records: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class PlacedChunk:
    """A chunk ready to publish: its manifest entry and the temporary file holding it."""

    info: ChunkInfo
    source: str


def plan_split(element: tuple[str, Iterable[GroupInfo]], chunk_size: int
               ) -> Iterator[tuple[ChunkPlan, dict[int, GroupInfo]]]:
    """Each final chunk of a split with the groups it is made of.

    Raises:
        ValueError: a group missing or reported twice (a record lost upstream).
    """
    split, infos = element
    by_group = {}
    for info in infos:
        if info.group in by_group:
            raise ValueError(f"group {split}/{info.group} reached the chunk writer twice")
        by_group[info.group] = info
    if sorted(by_group) != list(range(len(by_group))):
        raise ValueError(f"the {split} groups are not 0..{len(by_group) - 1}")
    written = [len(by_group[g].record_ids) for g in range(len(by_group))]
    for plan in lay_out_chunks(split, written, chunk_size):
        yield plan, {g: by_group[g] for g, _, _ in plan.parts}


class _WriteChunkFn(beam.DoFn):
    """Readies one final chunk: its group's file as it stands, or one assembled from slices."""

    def __init__(self, output_dir: str) -> None:
        self._output_dir = output_dir
        self._chunks = Metrics.counter("chunks", "chunks_written")
        self._assembled = Metrics.counter("chunks", "chunks_assembled")
        self._records = Metrics.counter("chunks", "records_written")

    def process(self, element: tuple[ChunkPlan, dict[int, GroupInfo]]) -> Iterator[PlacedChunk]:
        plan, groups = element
        relpath = chunk_relpath(plan.split, plan.index, plan.count)
        if plan.group is not None:
            info = groups[plan.group]
            source, size, sha256 = info.path, info.bytes, info.sha256
        else:
            data = _assemble(plan, groups)
            source = storage.join(tmp_dir(self._output_dir), ASSEMBLED_DIR, relpath)
            storage.write_bytes(source, data)  # a retried bundle writes the same bytes
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
            self._assembled.inc()
        self._chunks.inc()
        self._records.inc(plan.records)
        yield PlacedChunk(ChunkInfo(path=relpath, split=plan.split, index=plan.index,
                                    records=plan.records, bytes=size, sha256=sha256), source)


def place_chunks(output_dir: str, chunks: Iterable[PlacedChunk]) -> None:
    """Renames each chunk's temporary file to its name (the commit's first step). A chunk
    already in place (the commit ran before and was retried) is checked, not moved again.

    Raises:
        FileNotFoundError: a chunk neither in its temporary file nor in place.
        ValueError: a chunk in place with other bytes.
    """
    pairs = [(c.source, storage.join(output_dir, c.info.path), c.info) for c in chunks]
    present = set(storage.list_files(storage.join(tmp_dir(output_dir), "**")))
    for source, target, info in pairs:
        if source in present:
            continue
        try:
            data = storage.read_bytes(target)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the chunk {info.path} is neither in {source} nor in place") from None
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise ValueError(f"{target} exists with other bytes and {source} is gone")
    storage.move_many([(s, t) for s, t, _ in pairs if s in present])


def _assemble(plan: ChunkPlan, groups: dict[int, GroupInfo]) -> bytes:
    """The chunk's bytes from slices of its groups' files (each file read once)."""
    chunks: dict[int, tuple[dict, dict]] = {}  # group -> (decoded chunk, its list columns)
    records = []
    for group, first, end in plan.parts:
        info = groups[group]
        if group not in chunks:
            data = storage.read_bytes(info.path)
            if hashlib.sha256(data).hexdigest() != info.sha256:
                raise ValueError(f"{info.path} changed after it was written")
            chunk = decode_chunk(data)
            chunks[group] = chunk, {"text_offsets": chunk["text_offsets"].tolist()}
        chunk, lists = chunks[group]
        records += [record_at(chunk, i, lists=lists) for i in range(first, end)]
    return encode_chunk(records, split=plan.split)


def _key_by_split(info: GroupInfo) -> tuple[str, GroupInfo]:
    return info.split, info


@beam.typehints.with_input_types(GroupInfo)
@beam.typehints.with_output_types(PlacedChunk)
class WriteChunks(beam.PTransform):
    """Readies the written groups as each split's fixed-size chunk files.

    Input: `GroupInfo` of every group (`PreprocessGroups`' GROUPS_TAG output).
    Output: `PlacedChunk`, one per chunk to publish at `{output_dir}/{split}/{split}-
        {index:05d}-of-{count:05d}.pt` (`place_chunks`, at the commit): every chunk holds
        exactly `chunk_size` records but the last of each split. No dead letters: a record
        that failed upstream is in no group's file.

    Args:
        output_dir: local dir or gs:// URI of the dataset.
        chunk_size: records per chunk (the groups' size).
    """

    def __init__(self, output_dir: str, chunk_size: int) -> None:
        super().__init__()
        self._output_dir = output_dir.rstrip("/")
        self._chunk_size = int(chunk_size)

    def expand(self, groups: beam.PCollection) -> beam.PCollection:
        return (
            groups
            | "KeyBySplit" >> beam.Map(_key_by_split)
            | "GroupBySplit" >> beam.GroupByKey()
            | "LayOutChunks" >> beam.FlatMap(plan_split, self._chunk_size)
            # Assembling a short chunk reads its groups: spread the chunks over the workers.
            | "Spread" >> beam.Reshuffle()
            | "WriteChunk" >> beam.ParDo(_WriteChunkFn(self._output_dir))
        )
