"""The chunk format: round trips, torch.load(weights_only=True), determinism, versioning."""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.chunk_fixtures import make_record
from transforms.chunks import (
    CHUNK_FIELDS,
    FORMAT_VERSION,
    RECORD_FIELDS,
    chunk_len,
    chunk_name,
    chunk_relpath,
    decode_chunk,
    decode_record,
    encode_chunk,
    encode_record,
    read_metadata,
    record_at,
)

REPO = Path(__file__).resolve().parents[1]


def assert_same_record(got: dict, want: dict) -> None:
    assert list(got) == list(RECORD_FIELDS)
    for key in RECORD_FIELDS:
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True), key
        else:
            assert a == b, key


def test_record_round_trip() -> None:
    record = make_record(4, "val")
    decoded = decode_record(encode_record(record))
    assert_same_record(decoded, record)
    assert decoded["hadm_id"] is None
    assert math.isnan(decoded["labels"][3])  # a missing label stays NaN


def test_chunk_round_trip_and_record_at() -> None:
    records = [make_record(n, "train") for n in range(5)]
    chunk = decode_chunk(encode_chunk(records, split="train"))
    assert list(chunk) == list(CHUNK_FIELDS)
    assert chunk["format_version"] == FORMAT_VERSION
    assert (chunk["split"], chunk["n"]) == ("train", 5)
    assert "index" not in chunk  # version 2: the bytes do not depend on the chunk's place
    assert chunk_len(chunk) == 5
    assert chunk["image"].dtype == torch.uint8 and chunk["image"].shape == (5, 32, 32)
    assert chunk["text_offsets"].tolist()[-1] == chunk["text_input_ids"].numel()
    for i, record in enumerate(records):
        assert_same_record(record_at(chunk, i), record)
    with pytest.raises(IndexError):
        record_at(chunk, 5)


def test_chunk_file_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / chunk_name("test", 0, 1)
    path.write_bytes(encode_chunk([make_record(1, "test")], split="test"))
    for mmap in (False, True):
        chunk = torch.load(path, weights_only=True, mmap=mmap)
        assert chunk["record_id"] == ["dicom-00001"]
        assert chunk["image"].shape == (1, 32, 32)


def test_encoding_is_deterministic_whatever_the_objects() -> None:
    records = [make_record(n, "train") for n in range(3)]
    first = encode_chunk(records, split="train")
    # Equal values held by other objects: distinct strings, views into larger tensors.
    rebuilt = []
    for record in records:
        other = dict(record)
        other["view_position"] = "".join(list(record["view_position"]))
        other["split"] = "".join(["tr", "ain"])
        padded = torch.zeros(40, 32, dtype=torch.uint8)
        padded[4:36] = record["image"]
        other["image"] = padded[4:36]
        ids = record["text_input_ids"]
        other["text_input_ids"] = torch.cat([ids, ids])[: ids.numel()]
        rebuilt.append(other)
    assert encode_chunk(rebuilt, split="train") == first
    assert encode_record(rebuilt[0]) == encode_record(records[0])
    # A view must not drag its whole base tensor into the file.
    assert len(encode_record(rebuilt[0])) == len(encode_record(records[0]))


def test_encoding_is_identical_in_another_process() -> None:
    code = (
        "import hashlib; from tests.chunk_fixtures import make_record;"
        "from transforms.chunks import encode_chunk;"
        "print(hashlib.sha256(encode_chunk([make_record(n, 'val') for n in range(4)],"
        " split='val')).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    here = encode_chunk([make_record(n, "val") for n in range(4)], split="val")
    assert out == hashlib.sha256(here).hexdigest()


def test_unknown_chunk_version_is_rejected() -> None:
    chunk = decode_chunk(encode_chunk([make_record(0, "train")], split="train"))
    chunk["format_version"] = 3
    buffer = io.BytesIO()
    torch.save(chunk, buffer)
    with pytest.raises(ValueError, match="format_version 3; this reader knows 1, 2"):
        decode_chunk(buffer.getvalue())


def _version_1(chunk: dict, **header) -> bytes:
    """The chunk as format version 1 wrote it: its place in the header."""
    old = {"format_version": 1, "split": chunk["split"], **header,
           **{k: v for k, v in chunk.items() if k not in ("format_version", "split")}}
    buffer = io.BytesIO()
    torch.save(old, buffer)
    return buffer.getvalue()


def test_version_1_chunks_still_read() -> None:
    records = [make_record(n, "val") for n in range(3)]
    chunk = decode_chunk(encode_chunk(records, split="val"))
    old = decode_chunk(_version_1(chunk, index=2, count=5))
    assert (old["format_version"], old["index"], old["count"]) == (1, 2, 5)
    for i, record in enumerate(records):
        assert_same_record(record_at(old, i), record)
    with pytest.raises(ValueError, match=r"lacks the fields \['index', 'count'\]"):
        decode_chunk(_version_1(chunk))


def test_unknown_metadata_version_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"format_version": 7, "chunks": []}))
    with pytest.raises(ValueError, match="format_version 7"):
        read_metadata(str(tmp_path))


def test_names() -> None:
    assert chunk_name("train", 0, 3) == "train-00000-of-00003.pt"
    assert chunk_relpath("val", 12, 100) == "val/val-00012-of-00100.pt"
    with pytest.raises(ValueError, match="outside"):
        chunk_name("train", 3, 3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image", torch.zeros(32, 32, dtype=torch.float32), "'image' must be torch.uint8"),
        ("labels", torch.zeros(13, dtype=torch.float32), "14"),
        ("subject_id", "10000001", "'subject_id' must be an int"),
        ("attention_segments", [["triage", 0, 999]], "outside"),
        ("record_id", None, "'record_id' must be a str"),
    ],
)
def test_bad_records_are_rejected(field: str, value, message: str) -> None:
    record = make_record(0, "train")
    record[field] = value
    with pytest.raises(ValueError, match=message):
        encode_record(record)


def test_missing_and_unknown_fields_are_rejected() -> None:
    record = make_record(0, "train")
    del record["labels"]
    record["extra"] = 1
    with pytest.raises(ValueError, match=r"missing \['labels'\], unknown \['extra'\]"):
        encode_record(record)


def test_chunk_rejects_a_record_of_another_split() -> None:
    with pytest.raises(ValueError, match="split 'val'"):
        encode_chunk([make_record(0, "val")], split="train")
    with pytest.raises(ValueError, match="no records"):
        encode_chunk([], split="train")
