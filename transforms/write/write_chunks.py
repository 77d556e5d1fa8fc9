"""Fixed-size chunk files from the written groups: renamed into place, rewritten only if short.

`PreprocessGroups` has written every group of `chunk_size` records as a chunk file under
`_tmp/groups/`. Once all are written, `WriteChunks` lays out each split's final chunks
(`transforms.write.layout.lay_out_chunks`: every chunk full but the last of its split), then
for each chunk either renames its group's file into place (a group that lost no record: no
byte is read or written) or, for a chunk that failures left short and the split's last chunk,
assembles it from slices of the groups' files. Names and contents do not depend on bundling,
worker count or restarts. Only `GroupInfo`s (ids, paths, hashes) cross the shuffles.

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


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    """One written chunk, as metadata.json lists it."""

    path: str  # relative to the output dir, e.g. "train/train-00000-of-00003.pt"
    split: str
    index: int
    records: int
    bytes: int
    sha256: str


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
    """Puts one final chunk in place: renames its group's file, or assembles it."""

    def __init__(self, output_dir: str) -> None:
        self._output_dir = output_dir
        self._chunks = Metrics.counter("chunks", "chunks_written")
        self._renamed = Metrics.counter("chunks", "chunks_renamed")
        self._records = Metrics.counter("chunks", "records_written")

    def process(self, element: tuple[ChunkPlan, dict[int, GroupInfo]]) -> Iterator[ChunkInfo]:
        plan, groups = element
        relpath = chunk_relpath(plan.split, plan.index, plan.count)
        path = storage.join(self._output_dir, relpath)
        if plan.group is not None:
            info = groups[plan.group]
            _rename(info, path)
            size, sha256 = info.bytes, info.sha256
            self._renamed.inc()
        else:
            data = _assemble(plan, groups)
            storage.write_bytes(path, data)
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        self._chunks.inc()
        self._records.inc(plan.records)
        yield ChunkInfo(path=relpath, split=plan.split, index=plan.index, records=plan.records,
                        bytes=size, sha256=sha256)


def _rename(info: GroupInfo, path: str) -> None:
    """Moves a group's file to its chunk's name; a retried bundle finds it moved already."""
    try:
        storage.move(info.path, path)
    except FileNotFoundError:
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the written group {info.path} is missing and {path} was never written"
            ) from None
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise ValueError(f"{path} exists with other bytes and {info.path} is gone") from None


def _assemble(plan: ChunkPlan, groups: dict[int, GroupInfo]) -> bytes:
    """The chunk's bytes from slices of its groups' files (each file read once)."""
    chunks = {}
    records = []
    for group, first, end in plan.parts:
        info = groups[group]
        if group not in chunks:
            data = storage.read_bytes(info.path)
            if hashlib.sha256(data).hexdigest() != info.sha256:
                raise ValueError(f"{info.path} changed after it was written")
            chunks[group] = decode_chunk(data)
        lists = {"text_offsets": chunks[group]["text_offsets"].tolist()}
        records += [record_at(chunks[group], i, lists=lists) for i in range(first, end)]
    return encode_chunk(records, split=plan.split)


def _key_by_split(info: GroupInfo) -> tuple[str, GroupInfo]:
    return info.split, info


@beam.typehints.with_input_types(GroupInfo)
@beam.typehints.with_output_types(ChunkInfo)
class WriteChunks(beam.PTransform):
    """Puts the written groups in place as each split's fixed-size chunk files.

    Input: `GroupInfo` of every group (`PreprocessGroups`' GROUPS_TAG output).
    Output: `ChunkInfo`, one per chunk at `{output_dir}/{split}/{split}-{index:05d}-of-
        {count:05d}.pt`: every chunk holds exactly `chunk_size` records but the last of each
        split. No dead letters: a record that failed upstream is in no group's file.

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
