"""The chunk file format, version 1: pure functions from records to bytes and back.

A processed record is a plain dict (`RECORD_FIELDS`); the pipeline moves it between stages as
`encode_record` bytes and writes records to chunk files with `encode_chunk`. A chunk is one
columnar dict of plain containers (tensors, strings, ints, None, lists) so that
`torch.load(path, weights_only=True)` reads it without unpickling any object:

    {"format_version": 1, "split", "index", "count", "n",
     "record_id", "subject_id", "study_id", "stay_id", "hadm_id", "view_position",
     "study_datetime",                                  # lists of N values
     "image": uint8 [N, S, S], "image_box": int32 [N, 4],
     "enhanced_note": [N str],
     "text_input_ids": int32 [sum T], "text_offsets": int64 [N + 1],
     "attention_segments": [N lists of [name, start, end]],
     "clinical_data": float32 [N, F], "clinical_mask": bool [N, F], "labels": float32 [N, 14],
     "retrieved_knowledge": [N lists of str]}

Encoding is byte-deterministic: fields are written in a fixed order, every tensor owns exactly
its own storage (a view would otherwise save its whole base), and strings are interned, because
pickle memoizes by object identity: two equal but distinct strings pickle differently from one
string referenced twice, so bytes would otherwise depend on how the records were built.

This module imports torch only (no Beam): training code reads chunks through it.
"""

from __future__ import annotations

import io
import operator
import sys
from typing import Any, Optional, Sequence

import torch

FORMAT_VERSION = 1

N_LABELS = 14

# Per-record fields, in the order encode_record writes and record_at returns them.
RECORD_FIELDS: tuple[str, ...] = (
    "record_id",
    "subject_id",
    "study_id",
    "stay_id",
    "hadm_id",
    "view_position",
    "split",
    "study_datetime",
    "image",
    "image_box",
    "enhanced_note",
    "text_input_ids",
    "attention_segments",
    "clinical_data",
    "clinical_mask",
    "labels",
    "retrieved_knowledge",
)

# Chunk fields, in the order encode_chunk writes them.
CHUNK_FIELDS: tuple[str, ...] = (
    "format_version",
    "split",
    "index",
    "count",
    "n",
    "record_id",
    "subject_id",
    "study_id",
    "stay_id",
    "hadm_id",
    "view_position",
    "study_datetime",
    "image",
    "image_box",
    "enhanced_note",
    "text_input_ids",
    "text_offsets",
    "attention_segments",
    "clinical_data",
    "clinical_mask",
    "labels",
    "retrieved_knowledge",
)

_STR_FIELDS = ("record_id", "view_position", "split", "study_datetime", "enhanced_note")
_INT_FIELDS = ("subject_id", "study_id", "stay_id")
# Per-record tensor fields: dtype and number of dimensions.
_TENSOR_FIELDS: dict[str, tuple[torch.dtype, int]] = {
    "image": (torch.uint8, 2),
    "image_box": (torch.int32, 1),
    "text_input_ids": (torch.int32, 1),
    "clinical_data": (torch.float32, 1),
    "clinical_mask": (torch.bool, 1),
    "labels": (torch.float32, 1),
}


def chunk_name(split: str, index: int, count: int) -> str:
    """The file name of chunk `index` of `count` in `split`, e.g. "train-00000-of-00003.pt"."""
    if not 0 <= index < count:
        raise ValueError(f"chunk index {index} is outside [0, {count})")
    return f"{split}-{index:05d}-of-{count:05d}.pt"


def chunk_relpath(split: str, index: int, count: int) -> str:
    """The chunk's path relative to the output dir, e.g. "train/train-00000-of-00003.pt"."""
    return f"{split}/{chunk_name(split, index, count)}"


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a compact copy of it if it is a view into a larger storage."""
    tensor = tensor.detach()
    nbytes = tensor.numel() * tensor.element_size()
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != nbytes
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _tensor(record: dict, field: str) -> torch.Tensor:
    value = record[field]
    dtype, ndim = _TENSOR_FIELDS[field]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"record field {field!r} must be a torch.Tensor, got {type(value)}")
    if value.dtype != dtype or value.dim() != ndim:
        raise ValueError(
            f"record field {field!r} must be {dtype} with {ndim} dims, "
            f"got {value.dtype} {tuple(value.shape)}"
        )
    return _own_storage(value)


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"record field {field!r} must be a str, got {type(value)}")
    return sys.intern(str(value))


def _int(value: Any, field: str) -> int:
    # operator.index also takes numpy and torch integer scalars, but neither floats nor str.
    if isinstance(value, bool):
        raise ValueError(f"record field {field!r} must be an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"record field {field!r} must be an int, got {type(value)}") from None


def _segments(value: Any, n_tokens: int) -> list[list]:
    segments = []
    for segment in value:
        if len(segment) != 3:
            raise ValueError(f"attention segment {segment!r} is not [name, start, end]")
        name, start, end = segment
        start, end = _int(start, "attention_segments"), _int(end, "attention_segments")
        if not 0 <= start <= end <= n_tokens:
            raise ValueError(
                f"attention segment {name!r} [{start}, {end}) is outside the {n_tokens} tokens"
            )
        segments.append([_str(name, "attention_segments"), start, end])
    return segments


def _canonical_record(record: dict) -> dict:
    """A validated copy of `record` with its fields in `RECORD_FIELDS` order."""
    missing = [f for f in RECORD_FIELDS if f not in record]
    unknown = [f for f in record if f not in RECORD_FIELDS]
    if missing or unknown:
        raise ValueError(f"record fields: missing {missing}, unknown {unknown}")
    out: dict[str, Any] = {}
    for field in RECORD_FIELDS:
        value = record[field]
        if field in _STR_FIELDS:
            out[field] = _str(value, field)
        elif field in _INT_FIELDS:
            out[field] = _int(value, field)
        elif field == "hadm_id":
            out[field] = None if value is None else _int(value, field)
        elif field in _TENSOR_FIELDS:
            out[field] = _tensor(record, field)
        elif field == "attention_segments":
            out[field] = _segments(value, int(record["text_input_ids"].numel()))
        elif field == "retrieved_knowledge":
            out[field] = [_str(v, field) for v in value]
    if out["image"].shape[0] != out["image"].shape[1]:
        raise ValueError(f"record image must be square, got {tuple(out['image'].shape)}")
    if out["image_box"].numel() != 4:
        raise ValueError("record field 'image_box' must hold (top, left, height, width)")
    if out["labels"].numel() != N_LABELS:
        raise ValueError(f"record field 'labels' must hold {N_LABELS} values")
    if out["clinical_data"].shape != out["clinical_mask"].shape:
        raise ValueError("clinical_data and clinical_mask must have the same shape")
    return out


def _save(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def encode_record(record: dict) -> bytes:
    """Serialises one processed record (see `RECORD_FIELDS`) deterministically.

    Raises:
        ValueError: a field is missing, unknown, or of the wrong type, dtype or shape.
    """
    return _save(_canonical_record(record))


def decode_record(data: bytes) -> dict:
    """The record dict that `encode_record` serialised."""
    return _load(data)


def encode_chunk(records: Sequence[dict], *, split: str, index: int, count: int) -> bytes:
    """Serialises the records of chunk `index` of `count` in `split` as one columnar dict.

    The bytes are a pure function of the records' values and their order.

    Raises:
        ValueError: no records, a record of another split, records whose image size or
            number of clinical features differ, or a bad record field.
    """
    if not records:
        raise ValueError(f"chunk {chunk_name(split, index, count)} has no records")
    chunk_name(split, index, count)  # validates index and count
    recs = [_canonical_record(r) for r in records]
    for rec in recs:
        if rec["split"] != split:
            raise ValueError(f"record {rec['record_id']} of split {rec['split']!r} in {split!r}")
    for field in ("image", "clinical_data"):
        shapes = {tuple(r[field].shape) for r in recs}
        if len(shapes) != 1:
            raise ValueError(f"records of one chunk have different {field} shapes: {shapes}")
    lengths = [r["text_input_ids"].numel() for r in recs]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    chunk = {
        "format_version": FORMAT_VERSION,
        "split": sys.intern(split),
        "index": int(index),
        "count": int(count),
        "n": len(recs),
        "record_id": [r["record_id"] for r in recs],
        "subject_id": [r["subject_id"] for r in recs],
        "study_id": [r["study_id"] for r in recs],
        "stay_id": [r["stay_id"] for r in recs],
        "hadm_id": [r["hadm_id"] for r in recs],
        "view_position": [r["view_position"] for r in recs],
        "study_datetime": [r["study_datetime"] for r in recs],
        "image": torch.stack([r["image"] for r in recs]),
        "image_box": torch.stack([r["image_box"] for r in recs]),
        "enhanced_note": [r["enhanced_note"] for r in recs],
        "text_input_ids": torch.cat([r["text_input_ids"] for r in recs]),
        "text_offsets": torch.tensor(offsets, dtype=torch.int64),
        "attention_segments": [r["attention_segments"] for r in recs],
        "clinical_data": torch.stack([r["clinical_data"] for r in recs]),
        "clinical_mask": torch.stack([r["clinical_mask"] for r in recs]),
        "labels": torch.stack([r["labels"] for r in recs]),
        "retrieved_knowledge": [r["retrieved_knowledge"] for r in recs],
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
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version {version!r}; this reader knows {FORMAT_VERSION}"
        )
    missing = [f for f in CHUNK_FIELDS if f not in chunk]
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


def record_at(chunk: dict, i: int, *, offsets: Optional[Sequence[int]] = None) -> dict:
    """The `i`-th record of a decoded chunk, in the per-record form `encode_record` takes.

    Tensors are views into the chunk's tensors (no copy): clone them to keep them after the
    chunk is released, or to serialise them on their own.

    Args:
        chunk: a decoded chunk.
        i: the record's position in the chunk, in [0, chunk_len(chunk)).
        offsets: `chunk["text_offsets"].tolist()`, where the caller has it at hand (faster).
    """
    n = chunk_len(chunk)
    if not 0 <= i < n:
        raise IndexError(f"record {i} is outside the chunk's {n} records")
    if offsets is None:
        start, end = (int(v) for v in chunk["text_offsets"][i : i + 2])
    else:
        start, end = offsets[i], offsets[i + 1]
    return {
        "record_id": chunk["record_id"][i],
        "subject_id": chunk["subject_id"][i],
        "study_id": chunk["study_id"][i],
        "stay_id": chunk["stay_id"][i],
        "hadm_id": chunk["hadm_id"][i],
        "view_position": chunk["view_position"][i],
        "split": chunk["split"],
        "study_datetime": chunk["study_datetime"][i],
        "image": chunk["image"][i],
        "image_box": chunk["image_box"][i],
        "enhanced_note": chunk["enhanced_note"][i],
        "text_input_ids": chunk["text_input_ids"][start:end],
        "attention_segments": chunk["attention_segments"][i],
        "clinical_data": chunk["clinical_data"][i],
        "clinical_mask": chunk["clinical_mask"][i],
        "labels": chunk["labels"][i],
        "retrieved_knowledge": chunk["retrieved_knowledge"][i],
    }
