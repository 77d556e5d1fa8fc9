"""Reading the input tables: a fail-fast header check, then compact rows per table.

A `.csv.gz` cannot be split, so each file is streamed by one DoFn (csv handles quoted fields
with commas and newlines). `reshuffle=True` spreads its rows over the workers for heavy work
fused after the read; it is off by default because the one consumer, JoinCohort, does only
cheap keying before its CoGroupByKey, which redistributes the rows anyway: a Reshuffle there
doubles the shuffled bytes on Dataflow and made the local join 3.4x slower (26 s vs 7.6 s
for 180k rows on the FnApiRunner).

Rows are plain tuples of the spec's `required` columns, in that order (`columns(name)`), with
blanks as None: Beam's local runner holds every element crossing a GroupByKey in memory, and
the real ED tables have millions of rows, so a row carries only what the pipeline reads.
Id columns (`ID_COLUMNS`) arrive as ints and CheXpert labels as floats (NaN when blank); every
other value stays the raw string, for the feature stage to parse and flag.

A row whose id or label does not parse is a fault of the table, not of one record: the read
fails with an `InputError` naming the file, the line and the column, rather than guessing.

PhysioNet's buckets are requester-pays: `user_project` is the project billed for the reads
(see `transforms.storage`).
"""

from __future__ import annotations

import csv
import math
import sys
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

import apache_beam as beam

from transforms import schema, storage
from transforms.errors import InputError
from transforms.ledger import LEDGER_TAG, Tally

# Columns parsed as integers while reading (blank allowed only where NULLABLE_IDS says so).
ID_COLUMNS = frozenset({"subject_id", "hadm_id", "stay_id", "study_id"})
# Id columns that may be blank, per table (edstays.hadm_id: ED visits without admission).
NULLABLE_IDS: dict[str, frozenset[str]] = {"edstays": frozenset({"hadm_id"})}
# Columns parsed as floats (NaN when blank), per table.
FLOAT_COLUMNS: dict[str, frozenset[str]] = {"chexpert": frozenset(schema.CHEXPERT_LABELS)}

# Free-text fields (e.g. chief complaints) may exceed csv's 128 KiB default.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, zlib.error, csv.Error)


def columns(name: str) -> tuple[str, ...]:
    """The columns of a row of table `name`, in tuple order."""
    return schema.TABLES[name].required


def column_index(name: str, column: str) -> int:
    """Position of `column` in a row of table `name` (ValueError if it is not read)."""
    return columns(name).index(column)


def table_path(spec: schema.TableSpec, roots: dict[str, str]) -> str:
    """Full path (local or gs://) of a table under its root.

    Raises:
        InputError: the table's root flag is not set.
    """
    root = roots.get(spec.root)
    if not root:
        raise InputError(f"--{spec.root} is not set (needed for {spec.relpath})")
    return storage.join(root.rstrip("/"), spec.relpath)


def _display(spec: schema.TableSpec, path: str) -> str:
    return f"{spec.relpath} ({path})"


def _read_header(
    spec: schema.TableSpec, path: str, user_project: Optional[str] = None
) -> list[str]:
    """The header of one table, read without touching the rest of the file."""
    try:
        with storage.open_text(path, user_project) as handle:
            header = next(csv.reader(handle), None)
    except _READ_ERRORS as err:
        raise InputError(
            f"{_display(spec, path)} cannot be read as gzip-compressed UTF-8 CSV: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not header:
        raise InputError(f"{_display(spec, path)} is empty (no header line)")
    return _clean_header(header)


def _clean_header(header: list[str]) -> list[str]:
    cleaned = [name.strip() for name in header]
    if cleaned:
        cleaned[0] = cleaned[0].lstrip("\ufeff")
    return cleaned


def _missing_message(spec: schema.TableSpec, path: str, missing: list[str]) -> str:
    names = ", ".join(repr(m) for m in missing)
    noun = "column" if len(missing) == 1 else "columns"
    return f"{_display(spec, path)} is missing {noun} {names}"


def check_tables(
    roots: dict[str, str],
    names: Iterable[str] = schema.INPUT_TABLES,
    user_project: Optional[str] = None,
) -> None:
    """Fails fast, before any pipeline work, if a table or one of its columns is missing.

    Reads only each file's header (local or gs://; `user_project` is billed for gs:// reads
    from requester-pays buckets). Every problem found is reported at once. An optional table
    (schema.TableSpec.optional) that is absent is fine.

    Raises:
        InputError: naming each missing root flag, missing or unreadable file, and missing
            column, e.g. "hosp/patients.csv.gz (/data/hosp/patients.csv.gz) is missing
            column 'anchor_age'".
    """
    problems: list[str] = []
    for name in names:
        spec = schema.TABLES[name]
        try:
            path = table_path(spec, roots)
            if not _checked_exists(spec, path, user_project):
                if not spec.optional:
                    problems.append(f"{spec.relpath} not found: {path}")
                continue
            header = _read_header(spec, path, user_project)
        except InputError as err:
            problems.append(str(err))
            continue
        missing = [c for c in spec.required if c not in header]
        if missing:
            problems.append(_missing_message(spec, path, missing))
    if problems:
        raise InputError("; ".join(problems))


def _checked_exists(spec: schema.TableSpec, path: str, user_project: Optional[str]) -> bool:
    try:
        return storage.exists(path, user_project)
    except OSError as err:
        hint = "" if user_project else " (a requester-pays bucket needs --requester_pays_project)"
        raise InputError(
            f"cannot check {_display(spec, path)}: {type(err).__name__}: {err}{hint}"
        ) from err


IMAGE_SAMPLE = 20  # frontal images whose files are checked before any work


def check_image_root(
    roots: dict[str, str],
    image_root: str,
    views: Iterable[str],
    user_project: Optional[str] = None,
    sample: int = IMAGE_SAMPLE,
) -> None:
    """Fails fast when the images are not where the run will read them (a wrong or empty
    --cxr_image_root would otherwise make every record a dead letter).

    Checks the files of the first `sample` frontal images of the metadata table; one found is
    enough (a few missing files are dead letters, not a wrong root).

    Raises:
        InputError: none of the sampled images exists, naming the root and one path.
    """
    spec = schema.TABLES["metadata"]
    frontal = {v.strip().upper() for v in views}
    cols = columns("metadata")
    at = {c: cols.index(c) for c in ("dicom_id", "subject_id", "study_id", "ViewPosition")}
    paths = []
    for row in iter_rows(spec, table_path(spec, roots), user_project):
        if (row[at["ViewPosition"]] or "").strip().upper() in frontal:
            relpath = schema.image_relpath(row[at["subject_id"]], row[at["study_id"]],
                                           row[at["dicom_id"]])
            paths.append(storage.join(image_root.rstrip("/"), relpath))
            if len(paths) >= sample:
                break
    if not paths:
        return  # no frontal image at all: the cohort is empty, which the run reports
    try:
        if any(storage.exists(path, user_project) for path in paths):
            return
    except OSError as err:
        raise InputError(
            f"cannot check the images under {image_root}: {type(err).__name__}: {err}"
        ) from err
    raise InputError(
        f"none of the first {len(paths)} frontal images of the metadata table is under the "
        f"image root {image_root} (e.g. {paths[0]}): check --cxr_image_root / --mimic_cxr_dir")


def parse_int(value: str) -> int:
    """An integer id as written by MIMIC's exports ("123", or "123.0" from float columns).

    Raises:
        ValueError: not an integer.
    """
    try:
        return int(value)
    except ValueError:
        number = float(value)  # ValueError propagates for text
        if not number.is_integer():
            raise ValueError(f"not an integer: {value!r}") from None
        return int(number)


def _parse_float(value: str) -> float:
    number = float(value)
    if math.isnan(number):
        raise ValueError("NaN written out")
    return number


def row_parser(
    name: str, header: list[str], display: str
) -> Callable[[list[str], int], tuple[Any, ...]]:
    """Builds the function that turns one CSV row (a list of fields) into a compact tuple.

    Args:
        name: the table name in schema.TABLES.
        header: the file's header (must hold every required column).
        display: how errors name the file.
    """
    spec = schema.TABLES[name]
    positions = [header.index(c) for c in spec.required]
    nullable = NULLABLE_IDS.get(name, frozenset())
    floats = FLOAT_COLUMNS.get(name, frozenset())
    kinds = []
    for column in spec.required:
        if column in ID_COLUMNS:
            kinds.append("nullable_id" if column in nullable else "id")
        elif column in floats:
            kinds.append("float")
        else:
            kinds.append("str")
    width = len(header)
    plan = list(zip(spec.required, positions, kinds))

    def parse(fields: list[str], line: int) -> tuple[Any, ...]:
        if len(fields) != width:
            raise InputError(
                f"{display} line {line} has {len(fields)} fields, the header has {width}"
            )
        out: list[Any] = []
        for column, pos, kind in plan:
            raw = fields[pos]
            if raw == "" or raw.isspace():
                if kind == "id":
                    raise InputError(f"{display} line {line}: column {column!r} is blank")
                out.append(math.nan if kind == "float" else None)
                continue
            if kind == "str":
                out.append(raw)
                continue
            try:
                out.append(_parse_float(raw) if kind == "float" else parse_int(raw))
            except ValueError:
                expected = "a number" if kind == "float" else "an integer"
                raise InputError(
                    f"{display} line {line}: column {column!r} is not {expected}: "
                    f"{raw[:20]!r}"
                ) from None
        return tuple(out)

    return parse


def iter_rows(
    spec: schema.TableSpec,
    path: str,
    user_project: Optional[str] = None,
    subjects: Optional[frozenset] = None,
) -> Iterator[Optional[tuple[Any, ...]]]:
    """Streams the compact rows of one table file (see the module docstring).

    With `subjects`, a row of any other subject_id is yielded as None, unparsed beyond its
    subject_id: most rows of the ED tables belong to patients without a chest X-ray, and the
    caller counts what it skips.

    Raises:
        InputError: unreadable file, missing column, or a row whose id/label does not parse.
    """
    display = _display(spec, path)
    try:
        with storage.open_text(path, user_project) as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise InputError(f"{display} is empty (no header line)")
            header = _clean_header(header)
            missing = [c for c in spec.required if c not in header]
            if missing:
                raise InputError(_missing_message(spec, path, missing))
            parse = row_parser(spec.name, header, display)
            subject_at = header.index("subject_id") if subjects is not None else -1
            width = len(header)
            for fields in reader:
                if not fields:  # a blank line
                    continue
                if subject_at >= 0 and len(fields) == width:
                    try:
                        skip = parse_int(fields[subject_at]) not in subjects
                    except ValueError:
                        skip = False  # the full parse names the bad value
                    if skip:
                        yield None
                        continue
                yield parse(fields, reader.line_num)
    except _READ_ERRORS as err:
        raise InputError(
            f"{display} cannot be read as gzip-compressed UTF-8 CSV: "
            f"{type(err).__name__}: {err}"
        ) from err


class _ReadCsvFn(beam.DoFn):
    """Path -> the compact rows of that table file."""

    def __init__(self, spec: schema.TableSpec, user_project: Optional[str]) -> None:
        self._spec = spec
        self._user_project = user_project
        self._counter = rows_counter(spec.name)
        self._tally = Tally([self._counter])

    def start_bundle(self) -> None:
        self._tally.start()

    def process(self, path: str) -> Iterator[tuple[Any, ...]]:
        for row in iter_rows(self._spec, path, self._user_project):
            self._tally.inc(self._counter)
            yield row

    def finish_bundle(self):
        yield from self._tally.flush()


def rows_counter(name: str) -> str:
    """The counter (and ledger entry) of the rows read from table `name`."""
    return f"tables/{name}_rows"


class ReadTable(beam.PTransform):
    """Reads one table file.

    Input: the pipeline (PBegin). Output: a dict: "rows", a PCollection of tuples of
    `columns(spec.name)` (ids as int, CheXpert labels as float, other blanks None, other values
    raw strings), with `reshuffle` redistributed so heavy work after it spreads over workers;
    and LEDGER_TAG, the rows read (`transforms.ledger`). No dead
    letters: a malformed table fails the pipeline with an InputError naming the file, line
    and column.
    """

    def __init__(
        self,
        spec: schema.TableSpec,
        path: str,
        reshuffle: bool = False,
        user_project: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._spec = spec
        self._path = path
        self._reshuffle = reshuffle
        self._user_project = user_project or None

    def expand(self, pbegin):
        read = (
            pbegin
            | "Path" >> beam.Create([self._path])
            | "Rows" >> beam.ParDo(_ReadCsvFn(self._spec, self._user_project)).with_outputs(
                LEDGER_TAG, main="rows")
        )
        rows = read.rows
        if self._reshuffle:
            rows = rows | "Spread" >> beam.Reshuffle()
        return {"rows": rows, LEDGER_TAG: read[LEDGER_TAG]}


class ReadTables(beam.PTransform):
    """Reads the input tables.

    Input: the pipeline (PBegin). Output: dict table name -> PCollection of compact row
    tuples (see ReadTable), and LEDGER_TAG -> the rows read per table. Call
    `check_tables(roots, names)` before building the pipeline,
    so a missing file or column fails before any work.
    """

    def __init__(
        self,
        roots: dict[str, str],
        names: Iterable[str] = schema.INPUT_TABLES,
        reshuffle: bool = False,
        user_project: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._roots = dict(roots)
        self._names = tuple(names)
        self._reshuffle = reshuffle
        self._user_project = user_project or None
        unknown = [n for n in self._names if n not in schema.TABLES]
        if unknown:
            raise InputError(f"unknown tables {unknown}; known: {sorted(schema.TABLES)}")

    def expand(self, pbegin) -> dict[str, beam.PCollection]:
        read = {
            name: pbegin
            | f"Read_{name}"
            >> ReadTable(
                schema.TABLES[name],
                table_path(schema.TABLES[name], self._roots),
                reshuffle=self._reshuffle,
                user_project=self._user_project,
            )
            for name in self._names
        }
        tables = {name: out["rows"] for name, out in read.items()}
        tables[LEDGER_TAG] = (
            tuple(out[LEDGER_TAG] for out in read.values()) | "RowsRead" >> beam.Flatten())
        return tables

