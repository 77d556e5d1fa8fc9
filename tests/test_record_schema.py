"""The record schema: every declared field survives spill -> chunk -> record -> training record
in its declared form, and the table is complete enough to drive all of them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_splits import labels_with, make_cohort
from tests.samples import FEATURES, IMAGE, make_sample
from transforms.chunks.dataset import IMAGENET_MEAN, IMAGENET_STD, _LoadedChunk, _Normalizer
from transforms.chunks.format import (
    CHUNK_FIELDS,
    decode_chunk,
    decode_record,
    encode_chunk,
    encode_record,
    record_at,
)
from transforms.chunks.record import (
    ENCODINGS,
    FIELDS,
    STAGES,
    SUMMARISED,
    SUMMARY_KINDS,
    Field,
)
from transforms.write.metadata import _SplitStatsFn
from transforms.write.groups import RecordRef, record_ref, to_chunk_record

TENSOR_KINDS = ("tensor", "image", "ragged")


def _spill(tmp_path: Path, n: int) -> tuple[dict, RecordRef, bytes]:
    """A sample as the stages leave it, the ref `PreprocessGroups` emits for it, and its
    record as the chunk format encodes it on its own."""
    labels = labels_with(Edema=1.0, Atelectasis=-1.0) if n % 2 else None
    sample = make_sample(make_cohort(n, 100 + n, hadm_id=None if n == 0 else 7, labels=labels))
    chunk_record = to_chunk_record(sample, "")
    return sample, record_ref(sample["cohort"], chunk_record), encode_record(chunk_record)


def _stage_value(field: Field, sample: dict, split: str):
    if field.stage == "cohort":
        return getattr(sample["cohort"], field.name)
    return split if field.stage == "split" else sample[field.name]


def _same(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a, nan=-9.0) if a.is_floating_point() else a,
            torch.nan_to_num(b, nan=-9.0) if b.is_floating_point() else b)
    return a == b and type(a) is type(b)


def _assert_declared_form(field: Field, value, name: str) -> None:
    assert isinstance(value, torch.Tensor), name
    assert value.dtype == field.dtype and value.dim() == len(field.shape), name
    for want, got in zip(field.shape, value.shape):
        assert isinstance(want, str) or got == want, name


def test_every_field_round_trips_from_the_stages_to_the_training_record(tmp_path) -> None:
    spilled = [_spill(tmp_path, n) for n in range(3)]
    records = []
    for _, _, data in spilled:
        record = decode_record(data)
        assert list(record) == [f.name for f in FIELDS]
        records.append({**record, "split": "val"})
    chunk = decode_chunk(encode_chunk(records, split="val"))
    # The chunk stores its header, then the schema's fields in order (a ragged one followed
    # by its offsets), the split once in the header.
    columns = [c for f in FIELDS if not f.per_chunk for c in (f.name, f.offsets) if c]
    assert list(chunk) == list(CHUNK_FIELDS) == ["format_version", "split", "n", *columns]

    loaded_chunk = _LoadedChunk(chunk)
    normalize = _Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    for i, (sample, _, _) in enumerate(spilled):
        got = record_at(chunk, i)
        loaded = loaded_chunk.training_record(i, normalize)
        assert list(loaded) == [k for f in FIELDS for k in (f.loaded_name, f.mask) if k]
        for field in FIELDS:
            want = _stage_value(field, sample, "val")
            value = got[field.name]
            if field.kind in TENSOR_KINDS:
                _assert_declared_form(field, value, field.name)
                want = torch.from_numpy(np.asarray(want)).to(field.dtype)
            elif field.kind == "segments":
                want = [list(s) for s in want]
            assert _same(value, want), field.name
            if field.kind not in ("image", "ragged"):  # loaded as they are (checked below)
                assert _same(loaded[field.loaded_name], value), field.name
        ids = loaded["text_input_ids"]
        assert ids.dtype == torch.int64 and ids.tolist() == got["text_input_ids"].tolist()
        assert loaded["text_attention_mask"].tolist() == [1] * ids.numel()
        assert loaded["image_tensor"].shape == (3, IMAGE, IMAGE)
        top, left, height, width = got["image_box"].tolist()
        assert loaded["attention_mask"].sum() == height * width
        assert loaded["attention_mask"][top : top + height, left : left + width].all()


def test_the_spill_ref_carries_each_summarised_fields_fact(tmp_path) -> None:
    sample, ref, _ = _spill(tmp_path, 1)
    labels = sample["cohort"].labels
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(ref.labels, labels))
    assert ref.note_tokens == len(sample["text_input_ids"])
    assert ref.clinical_missing == tuple(np.flatnonzero(~sample["clinical_mask"]))
    # Each summarised field gets its per-split entry in metadata.json.
    fn = _SplitStatsFn(FEATURES, 64)
    stats = fn.extract_output(fn.add_input(fn.create_accumulator(), ("train", ref)))
    for field in SUMMARISED:
        assert field.summary.key in stats["train"] and field.summary.key in stats["test"]
    assert stats["train"]["labels"]["Edema"]["positive"] == 1
    assert stats["train"]["clinical_missing"]["pain"] == 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image", torch.zeros(IMAGE, IMAGE - 2, dtype=torch.uint8),
         r"'image' must be of shape \(S, S\), S = 16"),
        ("clinical_mask", torch.ones(len(FEATURES) + 1, dtype=torch.bool),
         r"'clinical_mask' must be of shape \(F,\), F = 4"),
        ("image_box", torch.zeros(3, dtype=torch.int32), r"'image_box' must be of shape \(4,\)"),
        ("text_input_ids", torch.zeros(2, 2, dtype=torch.int32), "int32 with 1 dims"),
        ("hadm_id", 1.5, "'hadm_id' must be an int"),
        ("retrieved_knowledge", ["kb-1", 2], "'retrieved_knowledge' must be a str"),
    ],
)
def test_declared_shapes_and_types_are_enforced(tmp_path, field, value, message) -> None:
    record = to_chunk_record(make_sample(make_cohort(0, 100)), "train")
    record[field] = value
    with pytest.raises(ValueError, match=message):
        encode_record(record)


def test_named_sizes_must_agree_across_a_chunk_but_ragged_lengths_may_differ() -> None:
    records = [to_chunk_record(make_sample(make_cohort(n, 100)), "train") for n in range(2)]
    assert records[0]["text_input_ids"].numel() != records[1]["text_input_ids"].numel()
    encode_chunk(records, split="train")
    records[1]["image"] = torch.zeros(IMAGE + 2, IMAGE + 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="different image shapes"):
        encode_chunk(records, split="train")


def test_the_schema_declares_what_each_kind_needs() -> None:
    names = [f.name for f in FIELDS]
    assert len(set(names)) == len(names)
    ref_attributes = {f.name for f in dataclasses.fields(RecordRef)}
    for field in FIELDS:
        assert field.kind in ENCODINGS and field.stage in STAGES and field.doc, field.name
        if field.kind in TENSOR_KINDS:
            assert field.dtype is not None and field.shape, field.name
        if field.kind == "ragged":
            assert len(field.shape) == 1 and field.offsets and field.mask, field.name
        if field.kind == "image":
            assert field.shape == ("S", "S") and field.bounds in names and field.mask
        if field.kind == "segments":
            assert field.spans in names[: names.index(field.name)], field.name
        if field.summary is not None:
            assert field.summary.kind in SUMMARY_KINDS, field.name
            assert field.summary.key in ref_attributes, field.name  # RecordRef carries it
