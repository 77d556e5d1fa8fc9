"""The chunk file format, version 2: pure functions from records to bytes and back.

A processed record is a plain dict whose fields `record.FIELDS` declares; the pipeline moves
it between stages as `encode_record` bytes and writes records to chunk files with
`encode_chunk`. A chunk is one columnar dict of plain containers (tensors, strings, ints, None,
lists) so that `torch.load(path, weights_only=True)` reads it without unpickling any object:
the header {"format_version": 2, "split", "n"}, then one column per record
field in `record.FIELDS` order (`CHUNK_FIELDS`): strings, ints and lists as lists of N values,
tensors stacked ([N, *shape], e.g. "image": uint8 [N, S, S]), a ragged tensor concatenated
("text_input_ids": int32 [sum T]) and followed by its offsets ("text_offsets": int64 [N + 1]).

Version 2 drops version 1's "index" and "count" from the header: a chunk's bytes depend on its
records alone, so the pipeline writes each chunk once, while preprocessing, before the number
of chunks of its split is known, and names it at the commit (`transforms.write.layout`).
Version 1 chunks still read (`READABLE_VERSIONS`); their header carries the two fields more.

Encoding is byte-deterministic (`record.check_record`): fields are written in a fixed order,
every tensor owns exactly its own storage (a view would otherwise save its whole base), and
strings are interned, because pickle memoizes by object identity: two equal but distinct
strings pickle differently from one string referenced twice, so bytes would otherwise depend
on how the records were built.

This module imports torch only (no Beam): training code reads chunks through it.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Mapping, Optional, Sequence

import torch

from transforms.chunks.record import COLUMNS, FIELDS, check_record, chunk_columns
from transforms.chunks.record import RECORD_FIELDS  # noqa: F401 (re-exported)
from transforms.chunks.record import record_at as _record_at

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# The chunk's header, around the per-chunk record fields (the split): written first, in order.
_HEADER_BEFORE = ("format_version",)
_HEADER_AFTER = ("n",)
# Chunk fields, in the order encode_chunk writes them.
CHUNK_FIELDS: tuple[str, ...] = (
    *_HEADER_BEFORE, *(f.name for f in FIELDS if f.per_chunk), *_HEADER_AFTER, *COLUMNS
)
# What a version 1 chunk holds besides (its header named the chunk's place in its split).
_V1_FIELDS = ("index", "count")


def chunk_name(split: str, index: int, count: int) -> str:
    """The file name of chunk `index` of `count` in `split`, e.g. "train-00000-of-00003.pt"."""
    if not 0 <= index < count:
        raise ValueError(f"chunk index {index} is outside [0, {count})")
    return f"{split}-{index:05d}-of-{count:05d}.pt"


def chunk_relpath(split: str, index: int, count: int) -> str:
    """The chunk's path relative to the output dir, e.g. "train/train-00000-of-00003.pt"."""
    return f"{split}/{chunk_name(split, index, count)}"


def _save(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def encode_record(record: dict) -> bytes:
    """Serialises one processed record (see `record.FIELDS`) deterministically.

    Raises:
        ValueError: a field is missing, unknown, or of the wrong type, dtype or shape.
    """
    return _save(check_record(record))


def decode_record(data: bytes) -> dict:
    """The record dict that `encode_record` serialised."""
    return _load(data)


def encode_chunk(records: Sequence[dict], *, split: str) -> bytes:
    """Serialises the records of one chunk of `split` as one columnar dict.

    The bytes are a pure function of the records' values and their order (not of where the
    chunk ends up in its split).

    Raises:
        ValueError: no records, a record of another split, records whose image size or
            number of clinical features differ, or a bad record field.
    """
    if not records:
        raise ValueError(f"a chunk of {split} has no records")
    recs = [check_record(r) for r in records]
    header = {"split": sys.intern(split)}
    for rec in recs:
        for name, value in header.items():
            if rec[name] != value:
                raise ValueError(f"record {rec['record_id']} of {name} {rec[name]!r} in "
                                 f"{value!r}")
    chunk = {
        "format_version": FORMAT_VERSION,
        **header,
        "n": len(recs),
        **chunk_columns(recs),
    }
    assert tuple(chunk) == CHUNK_FIELDS
    return _save(chunk)


def check_chunk(chunk: Any, source: str = "chunk") -> dict:
    """`chunk` if it is a chunk dict of a known format version.

    Raises:
        ValueError: not a chunk dict, or an unknown `format_version` (named in the message).
    """
    if not isinstance(chunk, dict) or "format_version" not in chunk:
        raise ValueError(f"{source} is not a chunk: no format_version")
    version = chunk["format_version"]
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{source} has format_version {version!r}; this reader knows "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    required = CHUNK_FIELDS + (_V1_FIELDS if version == 1 else ())
    missing = [f for f in required if f not in chunk]
    if missing:
        raise ValueError(f"{source} lacks the fields {missing}")
    return chunk


def decode_chunk(data: bytes) -> dict:
    """The chunk dict that `encode_chunk` serialised.

    Raises:
        ValueError: an unknown `format_version` or a dict that is not a chunk.
    """
    return check_chunk(_load(data))


def chunk_len(chunk: dict) -> int:
    """The number of records in a decoded chunk."""
    return int(chunk["n"])


def record_at(chunk: dict, i: int, *, lists: Optional[Mapping[str, Sequence[int]]] = None
              ) -> dict:
    """The `i`-th record of a decoded chunk, in the per-record form `encode_record` takes.

    Tensors are views into the chunk's tensors (no copy): clone them to keep them after the
    chunk is released, or to serialise them on their own.

    Args:
        chunk: a decoded chunk.
        i: the record's position in the chunk, in [0, chunk_len(chunk)).
        lists: some of `record.LIST_COLUMNS` (e.g. `{"text_offsets":
            chunk["text_offsets"].tolist()}`), where the caller has them at hand (faster).
    """
    n = chunk_len(chunk)
    if not 0 <= i < n:
        raise IndexError(f"record {i} is outside the chunk's {n} records")
    return _record_at(chunk, i, lists)
