"""The record schema: every field of a processed record, declared once, in `FIELDS`.

Each `Field` says what the value is (its kind, dtype and shape), which stage fills it, and
how it is summarised in metadata.json. A kind's `_Encoding` (in the spirit of
mosaicml/streaming's encodings registry) turns that one table into every form a record takes:

    stage values --coerce--> record (one record's bytes, `encode_record`) --check--> canonical record
    canonical records --columns--> chunk columns (`encode_chunk`)
    chunk --reader--> record (`record_at`);  chunk --loader--> training record (`ChunkedDataset`)
    record --fact--> the small per-field facts a `RecordRef` carries for metadata.json

Adding a field is one line in `FIELDS` plus the stage code that computes its value (and, for a
summarised field, the `RecordRef` attribute that carries its fact). The fields are listed in
the order records and chunks store them: that order is part of the byte format.

Shapes name their sizes: an int is fixed; a name ("S", "F") must be the same wherever it
appears in one record and, for stacked tensors, across the records of a chunk; a ragged
field's one size ("T") varies from record to record (stored concatenated, with offsets).

This module imports torch only (no Beam, no numpy): training code reads chunks through it.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

# Which stage fills a field: a `CohortRecord` attribute of the same name ("cohort"), the
# preprocessed sample's key of the same name ("images", "notes"), or the record's split.
STAGES = ("cohort", "images", "notes", "split")
# How metadata.json summarises a field per split (see transforms.write.metadata):
#   classes: per position, records by class of value (1.0 positive, 0.0 negative, ...);
#   length:  a histogram of the field's length, capped at a configured limit;
#   missing: per position, the share of records where a mask marks it missing (False).
SUMMARY_KINDS = ("classes", "length", "missing")


@dataclasses.dataclass(frozen=True)
class Summary:
    """How metadata.json summarises a field per split.

    Attributes:
        key: the summary's key in each split's metadata.json entry, and the `RecordRef`
            attribute that carries the record's fact for it.
        kind: one of SUMMARY_KINDS.
        names: the metadata.json list naming the value's positions ("label_names"), if any.
        limit: the configuration key of the length cap ("max_text_length"), for "length".
    """

    key: str
    kind: str
    names: str = ""
    limit: str = ""


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a record.

    Attributes:
        name: the key in records and chunks.
        kind: a key of `ENCODINGS`: str, int, optional_int, tensor, image, ragged, segments,
            str_list.
        stage: which stage fills it (STAGES).
        doc: what the value is.
        dtype: the stored dtype of tensor kinds.
        shape: the per-record shape of tensor kinds (ints fixed, names shared, see above).
        per_chunk: stored once in the chunk's header (every record of a chunk shares it).
        offsets: ragged: the chunk column of per-record start offsets (N + 1 of them).
        spans: segments: the ragged field whose tokens the [name, start, end] spans index.
        bounds: image: the field holding (top, left, height, width) of the real pixels.
        loaded_as: the training record's key for the value (default: `name`).
        loaded_dtype: the training record's dtype (default: `dtype`).
        mask: the training record's key of the value's mask (image: True on real pixels;
            ragged: int64 ones, padded with zeros by `collate_records`).
        summary: how metadata.json summarises it, if it does.
    """

    name: str
    kind: str
    stage: str
    doc: str
    dtype: Optional[torch.dtype] = None
    shape: tuple[Union[int, str], ...] = ()
    per_chunk: bool = False
    offsets: str = ""
    spans: str = ""
    bounds: str = ""
    loaded_as: str = ""
    loaded_dtype: Optional[torch.dtype] = None
    mask: str = ""
    summary: Optional[Summary] = None

    @property
    def encoding(self) -> "_Encoding":
        return ENCODINGS[self.kind]

    @property
    def loaded_name(self) -> str:
        return self.loaded_as or self.name


N_LABELS = 14

FIELDS: tuple[Field, ...] = (
    Field("record_id", "str", "cohort", "dicom_id of the image"),
    Field("subject_id", "int", "cohort", "MIMIC patient id"),
    Field("study_id", "int", "cohort", "MIMIC-CXR study id"),
    Field("stay_id", "int", "cohort", "the linked ED stay"),
    Field("hadm_id", "optional_int", "cohort", "the stay's admission, None without one"),
    Field("view_position", "str", "cohort", "AP or PA (the --views)"),
    Field("split", "str", "split", "train, val or test", per_chunk=True),
    Field("study_datetime", "str", "cohort", "ISO 8601, shifted per patient"),
    Field("image", "image", "images", "the letterboxed grey image", torch.uint8, ("S", "S"),
          bounds="image_box", loaded_as="image_tensor", mask="attention_mask"),
    Field("image_box", "tensor", "images", "(top, left, height, width) of the real pixels",
          torch.int32, (4,)),
    Field("enhanced_note", "str", "notes", "the note built from the ED data"),
    Field("text_input_ids", "ragged", "notes", "the note's token ids", torch.int32, ("T",),
          offsets="text_offsets", loaded_dtype=torch.int64, mask="text_attention_mask",
          summary=Summary("note_tokens", "length", limit="max_text_length")),
    Field("attention_segments", "segments", "notes",
          "[name, start, end] token ranges of the note's sections, end exclusive",
          spans="text_input_ids"),
    Field("clinical_data", "tensor", "notes", "clinical features, 0 where missing",
          torch.float32, ("F",)),
    Field("clinical_mask", "tensor", "notes", "True where the feature is observed and valid",
          torch.bool, ("F",),
          summary=Summary("clinical_missing", "missing", names="feature_names")),
    Field("labels", "tensor", "cohort", "CheXpert labels: 1.0, 0.0, -1.0 uncertain, NaN",
          torch.float32, (N_LABELS,),
          summary=Summary("labels", "classes", names="label_names")),
    Field("retrieved_knowledge", "str_list", "notes", "ids of the retrieved knowledge snippets"),
)

FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
# Per-record fields, in the order records store them.
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS)
# The chunk's per-record columns, in the order the chunk stores them after its header.
COLUMNS: tuple[str, ...] = tuple(
    column for f in FIELDS if not f.per_chunk for column in (f.name, f.offsets) if column
)
# The fields metadata.json summarises per split.
SUMMARISED: tuple[Field, ...] = tuple(f for f in FIELDS if f.summary is not None)


def _error(field: Field, what: str, value: Any) -> ValueError:
    return ValueError(f"record field {field.name!r} must be {what}, got {value}")


def _str(field: Field, value: Any) -> str:
    if not isinstance(value, str):
        raise _error(field, "a str", type(value))
    # Interned: pickle memoizes by identity, so equal strings must be one object for the
    # bytes not to depend on how the record was built.
    return sys.intern(str(value))


def _int(field: Field, value: Any) -> int:
    # operator.index also takes numpy and torch integer scalars, but neither floats nor str.
    if isinstance(value, bool):
        raise _error(field, "an int", "a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise _error(field, "an int", type(value)) from None


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a compact copy of it if it is a view into a larger storage (a view would
    otherwise save its whole base)."""
    tensor = tensor.detach()
    nbytes = tensor.numel() * tensor.element_size()
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != nbytes
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _shape_text(shape: Sequence[Union[int, str]]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class Loading:
    """What the loaded forms of one chunk's records need besides the chunk: columns as Python
    lists (read once per chunk, not per record), the image normaliser and batch slots."""

    __slots__ = ("lists", "normalize", "image_out", "mask_out")

    def __init__(self, lists: Mapping[str, list], normalize: Callable[..., torch.Tensor],
                 image_out: Optional[torch.Tensor], mask_out: Optional[torch.Tensor]) -> None:
        self.lists = lists
        self.normalize = normalize
        self.image_out = image_out
        self.mask_out = mask_out


class _Encoding:
    """How one kind of field is converted, checked, stored and loaded; plain values here."""

    def coerce(self, field: Field, value: Any) -> Any:
        """A stage's value (Python or numpy) in the record's stored type."""
        return value

    def check(self, field: Field, value: Any, record: Mapping[str, Any],
              sizes: dict[str, int]) -> Any:
        """The canonical value (validated; interned strings, compact tensors).

        `record` holds the canonical values of the fields before this one; `sizes` the
        record's named sizes seen so far.
        """
        return value

    def columns(self, field: Field, values: list) -> dict[str, Any]:
        """The chunk columns of the records' canonical values."""
        return {field.name: values}

    # Readers and loaders run once per record read, so each kind compiles a field into a
    # closure once (see _READERS, _LOADERS), with the names it needs bound as locals.

    def reader(self, field: Field) -> Callable[[Mapping[str, Any], int, Mapping], Any]:
        """`read(chunk, i, lists)`: record `i`'s value in the chunk (views into the chunk's
        tensors); `lists` may hold some of `LIST_COLUMNS` as Python lists."""
        name = field.name
        return lambda chunk, i, lists: chunk[name][i]

    def loader(self, field: Field) -> Callable[[Mapping[str, Any], int, Loading, dict], None]:
        """`load(chunk, i, loading, out)`: puts record `i`'s training form into `out`: its
        keys and values (copies, never views into the chunk)."""
        name, key = field.name, field.loaded_name

        def load(chunk, i, loading, out):
            out[key] = chunk[name][i]

        return load


class _Str(_Encoding):
    def check(self, field, value, record, sizes):
        return _str(field, value)


class _Int(_Encoding):
    def coerce(self, field, value):
        return int(value)

    def check(self, field, value, record, sizes):
        return _int(field, value)


class _OptionalInt(_Int):
    def coerce(self, field, value):
        return None if value is None else int(value)

    def check(self, field, value, record, sizes):
        return None if value is None else _int(field, value)


class _StrList(_Encoding):
    def coerce(self, field, value):
        return [str(v) for v in value]

    def check(self, field, value, record, sizes):
        return [_str(field, v) for v in value]

    def loader(self, field):
        name, key = field.name, field.loaded_name

        def load(chunk, i, loading, out):
            out[key] = list(chunk[name][i])

        return load


class _Segments(_Encoding):
    """[name, start, end] spans over the tokens of the field `spans`."""

    def coerce(self, field, value):
        return [[str(name), int(start), int(end)] for name, start, end in value]

    def check(self, field, value, record, sizes):
        n_tokens = int(record[field.spans].numel())
        segments = []
        for segment in value:
            if len(segment) != 3:
                raise ValueError(f"attention segment {segment!r} is not [name, start, end]")
            name, start, end = segment
            start, end = _int(field, start), _int(field, end)
            if not 0 <= start <= end <= n_tokens:
                raise ValueError(
                    f"attention segment {name!r} [{start}, {end}) is outside the {n_tokens} "
                    "tokens"
                )
            segments.append([_str(field, name), start, end])
        return segments

    def loader(self, field):
        name, key = field.name, field.loaded_name

        def load(chunk, i, loading, out):
            out[key] = [list(s) for s in chunk[name][i]]

        return load


class _Tensor(_Encoding):
    """A tensor of `field.dtype` and `field.shape`; the chunk stacks them: [N, *shape]."""

    def coerce(self, field, value):
        if isinstance(value, torch.Tensor):
            return value.detach().to(field.dtype)
        return torch.tensor(value, dtype=field.dtype)  # a copy: numpy arrays, lists

    def check(self, field, value, record, sizes):
        if not isinstance(value, torch.Tensor):
            raise _error(field, "a torch.Tensor", type(value))
        if value.dtype != field.dtype or value.dim() != len(field.shape):
            raise _error(field, f"{field.dtype} with {len(field.shape)} dims",
                         f"{value.dtype} {tuple(value.shape)}")
        for want, got in zip(field.shape, value.shape):
            size = sizes.setdefault(want, got) if isinstance(want, str) else want
            if got != size:
                known = "".join(f", {k} = {sizes[k]}" for k in field.shape if k in sizes)
                raise _error(field, f"of shape {_shape_text(field.shape)}{known}",
                             tuple(value.shape))
        return _own_storage(value)

    def columns(self, field, values):
        return {field.name: torch.stack(values)}

    def loader(self, field):
        name, key = field.name, field.loaded_name

        def load(chunk, i, loading, out):
            # A copy: a view would keep (and, across DataLoader worker processes, move into
            # shared memory) the whole chunk's storage.
            out[key] = chunk[name][i].clone()

        return load


class _Image(_Tensor):
    """A square grey image; loaded as the normaliser's float [C, S, S] (into the batch slot
    when given) and a bool mask, True inside the `bounds` box."""

    def loader(self, field):
        name, key, bounds, mask_key = field.name, field.loaded_name, field.bounds, field.mask

        def load(chunk, i, loading, out):
            image = chunk[name][i]
            top, left, height, width = loading.lists[bounds][i]
            if loading.mask_out is None:
                mask = torch.zeros(image.shape, dtype=torch.bool)
            else:
                mask = loading.mask_out.zero_()
            mask[top : top + height, left : left + width] = True
            out[key] = loading.normalize(image, loading.image_out)
            out[mask_key] = mask

        return load


class _Ragged(_Tensor):
    """A 1-D tensor of varying length; the chunk concatenates them and stores the offsets."""

    def columns(self, field, values):
        offsets = [0]
        for value in values:
            offsets.append(offsets[-1] + value.numel())
        return {field.name: torch.cat(values),
                field.offsets: torch.tensor(offsets, dtype=torch.int64)}

    def reader(self, field):
        name, column = field.name, field.offsets

        def read(chunk, i, lists):
            offsets = lists.get(column)
            if offsets is None:
                start, end = (int(v) for v in chunk[column][i : i + 2])
            else:
                start, end = offsets[i], offsets[i + 1]
            return chunk[name][start:end]

        return read

    def loader(self, field):
        name, key, column, mask_key = field.name, field.loaded_name, field.offsets, field.mask
        dtype = field.loaded_dtype or field.dtype

        def load(chunk, i, loading, out):
            offsets = loading.lists[column]
            start, end = offsets[i], offsets[i + 1]
            out[key] = chunk[name][start:end].to(dtype)
            out[mask_key] = torch.ones(end - start, dtype=torch.int64)

        return load


ENCODINGS: dict[str, _Encoding] = {
    "str": _Str(),
    "int": _Int(),
    "optional_int": _OptionalInt(),
    "str_list": _StrList(),
    "segments": _Segments(),
    "tensor": _Tensor(),
    "image": _Image(),
    "ragged": _Ragged(),
}


def _per_chunk_reader(field: Field) -> Callable[[Mapping[str, Any], int, Mapping], Any]:
    name = field.name
    return lambda chunk, i, lists: chunk[name]


def _per_chunk_loader(field: Field) -> Callable[[Mapping[str, Any], int, Loading, dict], None]:
    name, key = field.name, field.loaded_name

    def load(chunk, i, loading, out):
        out[key] = chunk[name]

    return load


# Each field's reader and loader, in FIELDS order (a field stored in the header: its value).
_READERS = tuple(
    (f.name, _per_chunk_reader(f) if f.per_chunk else f.encoding.reader(f)) for f in FIELDS
)
_LOADERS = tuple(_per_chunk_loader(f) if f.per_chunk else f.encoding.loader(f) for f in FIELDS)
# Columns the loaded forms read as Python lists, once per chunk.
LIST_COLUMNS: tuple[str, ...] = tuple(
    column for f in FIELDS for column in (f.offsets, f.bounds) if column
)
# The training record's keys, in order: each field's loaded name, then its mask if it has one.
TRAINING_FIELDS: tuple[str, ...] = tuple(
    key for f in FIELDS for key in (f.loaded_name, f.mask) if key
)
# Training-record keys padded (not stacked) by collate_records: the ragged fields and masks.
PADDED_KEYS: tuple[str, ...] = tuple(
    key for f in FIELDS if f.kind == "ragged" for key in (f.loaded_name, f.mask)
)


def from_stages(stage_value: Callable[[Field], Any]) -> dict:
    """A record from the stages' values (`stage_value(field)`), in each field's stored type.

    Raises:
        KeyError: a stage's value is missing.
    """
    return {f.name: f.encoding.coerce(f, stage_value(f)) for f in FIELDS}


def check_record(record: Mapping[str, Any]) -> dict:
    """A validated copy of `record` with its fields in `FIELDS` order, canonical values.

    Raises:
        ValueError: a field is missing, unknown, or of the wrong type, dtype or shape.
    """
    missing = [f for f in RECORD_FIELDS if f not in record]
    unknown = [f for f in record if f not in FIELD_BY_NAME]
    if missing or unknown:
        raise ValueError(f"record fields: missing {missing}, unknown {unknown}")
    out: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for field in FIELDS:
        out[field.name] = field.encoding.check(field, record[field.name], out, sizes)
    return out


def chunk_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-record columns of a chunk from canonical records (`check_record`), in
    `COLUMNS` order.

    Raises:
        ValueError: the records' stacked tensors differ in shape.
    """
    columns: dict[str, Any] = {}
    for field in FIELDS:
        if field.per_chunk:
            continue
        values = [r[field.name] for r in records]
        if isinstance(field.encoding, _Tensor) and not isinstance(field.encoding, _Ragged):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(
                    f"records of one chunk have different {field.name} shapes: {shapes}")
        columns.update(field.encoding.columns(field, values))
    return columns


def record_at(chunk: Mapping[str, Any], i: int,
              lists: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """Record `i` of a decoded chunk (see `format.record_at`); `lists` may hold `LIST_COLUMNS`
    as Python lists (faster than reading the tensors)."""
    lists = lists or {}
    return {name: read(chunk, i, lists) for name, read in _READERS}


def training_record(chunk: Mapping[str, Any], i: int, loading: Loading) -> dict:
    """Record `i` of a decoded chunk in its training form (see `ChunkedDataset`)."""
    out: dict[str, Any] = {}
    for load in _LOADERS:
        load(chunk, i, loading, out)
    return out


def missing_features(clinical_mask: Any) -> tuple[int, ...]:
    """Indices of the features a clinical mask marks missing (False): a few small ints."""
    mask = torch.as_tensor(clinical_mask, dtype=torch.bool)
    return tuple(int(i) for i in torch.nonzero(~mask).flatten().tolist())


# A record's fact for each summary kind: small, carried on its `RecordRef`.
_FACTS: dict[str, Callable[[torch.Tensor], Any]] = {
    "classes": lambda value: tuple(float(v) for v in value.tolist()),
    "length": lambda value: int(value.numel()),
    "missing": missing_features,
}


def record_facts(record: Mapping[str, Any]) -> dict[str, Any]:
    """The facts metadata.json summarises, by summary key (the `RecordRef` attributes)."""
    return {f.summary.key: _FACTS[f.summary.kind](record[f.name]) for f in SUMMARISED}
