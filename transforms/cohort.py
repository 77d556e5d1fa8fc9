"""The cohort join: one record per frontal image linked to the ED stay it was taken in.

The rule (SPEC.md, "The default cohort"): a frontal image (ViewPosition in `views`) links to
the same subject's ED stay whose [intime, outtime] holds the study datetime, the latest intime
winning; triage and the patient attach by stay_id / subject_id, vitals and medications only up
to the study time (no look-ahead), CheXpert labels by study_id.

Every table is keyed by subject_id and joined in one CoGroupByKey, so a worker holds one
patient's rows at a time. Before the join, non-frontal images and bad timestamps leave early
and the other tables are cut to the subjects that still have an image and to the columns the
record needs, since the local runner keeps everything crossing the join in memory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import marshal
import decimal
import math
from typing import Any, Iterable, Iterator, Optional, Sequence, TypeVar

import apache_beam as beam

from transforms import records, schema, storage
from transforms.errors import InputError
from transforms.ledger import LEDGER_TAG, Tally
from transforms.tables import (
    columns,
    iter_rows,
    rows_counter,
    table_path,
)

STAGE = "join"
RECORDS_TAG = "records"
METRICS_NAMESPACE = "cohort"
RECORDS_COUNTER = "records"

# The tables JoinCohort reads (the keys of its input dict).
JOIN_TABLES: tuple[str, ...] = (
    "patients", "admissions", "edstays", "triage", "vitalsign", "medrecon", "metadata",
    "chexpert",
)

PATIENT_FIELDS = ("gender", "anchor_age", "anchor_year", "anchor_year_group")
STAY_FIELDS = ("intime", "outtime", "gender", "race", "arrival_transport")
TRIAGE_FIELDS = (
    "temperature", "heartrate", "resprate", "o2sat", "sbp", "dbp", "pain", "acuity",
    "chiefcomplaint",
)
VITAL_FIELDS = (
    "charttime", "temperature", "heartrate", "resprate", "o2sat", "sbp", "dbp", "pain",
)

# What of each table crosses the join (value tuples in this order; subject_id is the key).
# Outcomes (edstays.disposition, ed/diagnosis, patients.dod) are never among them.
_JOIN_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": PATIENT_FIELDS,
    "admissions": ("dischtime",),
    "edstays": ("stay_id", "hadm_id", "intime", "outtime", "gender", "race",
                "arrival_transport"),
    "triage": ("stay_id",) + TRIAGE_FIELDS,
    "vitalsign": ("stay_id",) + VITAL_FIELDS,
    "medrecon": ("stay_id", "charttime", "name"),
    "chexpert": ("study_id",) + schema.CHEXPERT_LABELS,
}

_NOT_FRONTAL = f"{METRICS_NAMESPACE}/{records.DROP_NOT_FRONTAL}"
_BAD_TIME = f"{METRICS_NAMESPACE}/{records.FAIL_BAD_TIMESTAMP}"

_MISSING_LABELS: tuple[float, ...] = (math.nan,) * len(schema.CHEXPERT_LABELS)
_MS = decimal.Decimal("0.001")


def parse_study_datetime(study_date: Any, study_time: Any) -> dt.datetime:
    """The datetime of a study from MIMIC-CXR's StudyDate and StudyTime.

    StudyDate is an int YYYYMMDD; StudyTime a float HHMMSS.fff whose leading zeros were lost
    and which may carry float noise: "0.187" is 00:00:00.187, "5959.25" 00:59:59.250,
    "213014.53100000002" 21:30:14.531. The time is rounded to milliseconds.

    Raises:
        ValueError: either value is blank, not a number, or not a valid date/time.
    """
    date_text = str(study_date).strip() if study_date is not None else ""
    time_text = str(study_time).strip() if study_time is not None else ""
    try:
        date_num = decimal.Decimal(date_text)
        time_num = decimal.Decimal(time_text)
    except decimal.InvalidOperation:
        raise ValueError(
            f"StudyDate/StudyTime not numeric: {date_text[:20]!r}, {time_text[:20]!r}"
        ) from None
    if not date_num.is_finite() or date_num != date_num.to_integral_value():
        raise ValueError(f"StudyDate is not an integer YYYYMMDD: {date_text[:20]!r}")
    ymd = int(date_num)
    if not 10000101 <= ymd <= 99991231:
        raise ValueError(f"StudyDate is not YYYYMMDD: {date_text[:20]!r}")
    day = dt.datetime(ymd // 10000, ymd // 100 % 100, ymd % 100)  # ValueError if invalid
    if not time_num.is_finite() or time_num < 0:
        raise ValueError(f"StudyTime is not HHMMSS.fff: {time_text[:20]!r}")
    hours = int(time_num // 10000)
    minutes = int(time_num // 100 % 100)
    seconds = time_num % 100
    if hours > 23 or minutes > 59 or seconds >= 60:
        raise ValueError(f"StudyTime is not HHMMSS.fff: {time_text[:20]!r}")
    millis = int((seconds * 1000).quantize(decimal.Decimal(1), decimal.ROUND_HALF_EVEN))
    # timedelta carries a rounding of 59.9996 s up into the next minute (or day).
    return day + dt.timedelta(hours=hours, minutes=minutes, milliseconds=millis)


def parse_table_datetime(value: Optional[str]) -> Optional[dt.datetime]:
    """A table datetime ("2180-07-23 21:30:14", also without seconds); None if blank or bad."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed.replace(tzinfo=None)


@dataclasses.dataclass(frozen=True)
class EdStay:
    """One ED stay of a subject, with parsed bounds and the raw fields the record keeps."""

    stay_id: int
    hadm_id: Optional[int]
    intime: dt.datetime
    outtime: dt.datetime
    fields: tuple[Optional[str], ...]  # STAY_FIELDS values


_Stay = TypeVar("_Stay")


def pick_stay(study_time: dt.datetime, stays: Iterable[_Stay]) -> Optional[_Stay]:
    """The stay whose [intime, outtime] (inclusive) holds `study_time`, or None.

    Where several hold it, the latest intime wins; equal intimes go to the larger stay_id,
    so the choice never depends on input order. `stays` are objects with `stay_id`,
    `intime` and `outtime` (e.g. EdStay), all of one subject.
    """
    best = None
    for stay in stays:
        if stay.intime <= study_time <= stay.outtime:
            if best is None or (stay.intime, stay.stay_id) > (best.intime, best.stay_id):
                best = stay
    return best


def _order_key(row: Sequence[Any]) -> tuple:
    """Sort key for rows that may hold None (None sorts last, never compared to a value)."""
    return tuple((v is None, 0 if v is None else v) for v in row)


def pack_rows(rows: Sequence[tuple]) -> bytes:
    """Join rows as one bytes object. Beam's local runner holds every value of a GroupByKey
    as a decoded Python object (a tuple of strings costs ~4x its marshalled bytes there), and
    every element crossing it costs the runner more than the bytes: a subject's consecutive
    rows of one table travel as one element."""
    return marshal.dumps(list(rows), 4)


def unpack_rows(data: bytes) -> list[tuple]:
    return marshal.loads(data)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _is_blank(value: Optional[str]) -> bool:
    return value is None or not value.strip()


class _SplitImagesFn(beam.DoFn):
    """Metadata row -> (subject_id, image) for frontal images with a valid timestamp.

    Non-frontal images go to the `dropped` output as a reason; an unparsable StudyDate or
    StudyTime to the dead-letter output.
    """

    def __init__(self, views: tuple[str, ...]) -> None:
        self._views = frozenset(views)
        cols = columns("metadata")
        self._idx = tuple(
            cols.index(c)
            for c in ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate",
                      "StudyTime")
        )
        self._tally = Tally([_NOT_FRONTAL, _BAD_TIME])

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, row: tuple) -> Iterator[Any]:
        dicom_id, subject_id, study_id, view, date, time = (row[i] for i in self._idx)
        view = (view or "").strip().upper()
        if view not in self._views:
            self._tally.inc(_NOT_FRONTAL)
            yield beam.pvalue.TaggedOutput(records.DROPPED_TAG, records.DROP_NOT_FRONTAL)
            return
        try:
            when = parse_study_datetime(date, time)
        except ValueError as err:
            self._tally.inc(_BAD_TIME)
            yield beam.pvalue.TaggedOutput(
                records.DEAD_LETTER_TAG,
                records.DeadLetter(
                    dicom_id, subject_id, study_id, STAGE, records.FAIL_BAD_TIMESTAMP,
                    f"StudyDate={_short(date)} StudyTime={_short(time)}: {err}",
                ),
            )
            return
        yield subject_id, pack_rows(
            [(dicom_id, study_id, view, when.isoformat(timespec="microseconds"))])


# Largest first: the local runner deals the read's elements to its workers in turn, and the
# largest table is the critical path.
_READ_ORDER: tuple[str, ...] = (
    "medrecon", "vitalsign", "admissions", "edstays", "triage", "patients", "chexpert",
)


class _ReadJoinRowsFn(beam.DoFn):
    """(table name, path) -> that table's rows of the chosen subjects as (subject_id, packed
    join columns of a run of its consecutive rows) on the output tagged with the table's name
    (MIMIC's tables are sorted by subject, so mostly one element per subject and table). Rows
    of other subjects are counted, not parsed (a malformed one is set aside with them; the
    header check still covers every table): reading, filtering and keying are one step, so
    every table is read in one stage that all workers share, and only the cohort's rows
    become elements."""

    def __init__(self, user_project: Optional[str]) -> None:
        self._user_project = user_project
        self._plan = {}
        for name, keep in _JOIN_COLUMNS.items():
            cols = columns(name)
            self._plan[name] = (cols.index("subject_id"), tuple(cols.index(c) for c in keep))
        self._tally = Tally([rows_counter(n) for n in _JOIN_COLUMNS]
                            + [f"join/{n}_set_aside" for n in _JOIN_COLUMNS])

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, element: tuple[str, str], subjects: frozenset) -> Iterator[Any]:
        name, path = element
        subject_at, keep = self._plan[name]
        read = aside = 0
        run_subject, run = None, []  # the current run of one subject's consecutive rows
        for row in iter_rows(schema.TABLES[name], path, self._user_project, subjects):
            read += 1
            if row is None:
                aside += 1
                continue
            if row[subject_at] != run_subject and run:
                yield beam.pvalue.TaggedOutput(name, (run_subject, pack_rows(run)))
                run = []
            run_subject = row[subject_at]
            run.append(tuple(row[i] for i in keep))
        if run:
            yield beam.pvalue.TaggedOutput(name, (run_subject, pack_rows(run)))
        self._tally.inc(rows_counter(name), read)
        self._tally.inc(f"join/{name}_set_aside", aside)


class _KeyBySubjectFn(beam.DoFn):
    """Table row -> (subject_id, the join columns) for subjects that have a frontal image."""

    def __init__(self, name: str) -> None:
        cols = columns(name)
        self._subject = cols.index("subject_id")
        self._keep = tuple(cols.index(c) for c in _JOIN_COLUMNS[name])
        self._set_aside = f"join/{name}_set_aside"
        self._tally = Tally([self._set_aside])

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, row: tuple, subjects: frozenset) -> Iterator[tuple[int, tuple]]:
        subject_id = row[self._subject]
        if subject_id in subjects:
            yield subject_id, pack_rows([tuple(row[i] for i in self._keep)])
        else:
            self._tally.inc(self._set_aside)


class _LinkSubjectFn(beam.DoFn):
    """One subject's joined rows -> a CohortRecord per image linked to a stay.

    Images that link to no stay (or, with aggressive filtering, lack triage or a chief
    complaint) go to the `dropped` output as a reason.
    """

    def __init__(self, aggressive_filtering: bool, image_root: str) -> None:
        self._aggressive = aggressive_filtering
        self._image_root = image_root
        self._tally = Tally(
            [f"{METRICS_NAMESPACE}/{name}" for name in (
                records.DROP_NO_ED_STAY, records.DROP_NO_TRIAGE,
                records.DROP_NO_CHIEF_COMPLAINT, RECORDS_COUNTER, "edstays_bad_time",
                "vitalsign_bad_charttime", "medrecon_bad_charttime",
                "admissions_bad_dischtime",
            )]
            + [f"join/{name}_joined" for name in ("images", *_JOIN_COLUMNS)]
        )

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def _count(self, name: str, n: int = 1) -> None:
        self._tally.inc(f"{METRICS_NAMESPACE}/{name}", n)

    def _timed(self, rows: Iterable[tuple], pos: int, counter: str) -> list:
        """(parsed time, row) for rows whose column `pos` parses, sorted; counts the rest."""
        timed, bad = [], 0
        for row in rows:
            when = parse_table_datetime(row[pos])
            if when is None:
                bad += 1
            else:
                timed.append((when, row))
        self._count(counter, bad)
        timed.sort(key=lambda item: (item[0], _order_key(item[1])))
        return timed

    def _stays(self, rows: Iterable[tuple]) -> list[EdStay]:
        stays, bad = [], 0
        for stay_id, hadm_id, intime, outtime, *rest in rows:
            start, end = parse_table_datetime(intime), parse_table_datetime(outtime)
            if start is None or end is None:
                bad += 1
                continue
            stays.append(EdStay(stay_id, hadm_id, start, end, (intime, outtime, *rest)))
        self._count("edstays_bad_time", bad)
        return stays

    def process(self, element: tuple[int, dict[str, Iterable[tuple]]]) -> Iterator[Any]:
        subject_id, packed = element
        groups = {name: [row for v in runs for row in unpack_rows(v)]
                  for name, runs in packed.items()}
        for name, rows in groups.items():
            self._tally.inc(f"join/{name}_joined", len(rows))
        images = sorted(groups["images"], key=_order_key)
        if not images:
            return
        stays = self._stays(groups["edstays"])
        patient_rows = sorted(groups["patients"], key=_order_key)
        patient = dict(zip(PATIENT_FIELDS, patient_rows[0])) if patient_rows else None
        discharges = [when for when, _ in self._timed(
            groups["admissions"], 0, "admissions_bad_dischtime")]
        by_stay: dict[str, dict[int, list]] = {"triage": {}, "vitalsign": {}, "medrecon": {}}
        for row in sorted(groups["triage"], key=_order_key):
            by_stay["triage"].setdefault(row[0], []).append(row)
        for name in ("vitalsign", "medrecon"):
            for when, row in self._timed(groups[name], 1, f"{name}_bad_charttime"):
                by_stay[name].setdefault(row[0], []).append((when, row))
        labels: dict[int, tuple[float, ...]] = {}
        for row in sorted(groups["chexpert"], key=repr):
            labels.setdefault(row[0], tuple(row[1:]))

        for dicom_id, study_id, view, when_iso in images:
            when = dt.datetime.fromisoformat(when_iso)
            stay = pick_stay(when, stays)
            if stay is None:
                yield self._drop(records.DROP_NO_ED_STAY)
                continue
            triage_rows = by_stay["triage"].get(stay.stay_id)
            triage = dict(zip(TRIAGE_FIELDS, triage_rows[0][1:])) if triage_rows else None
            if self._aggressive:
                if triage is None:
                    yield self._drop(records.DROP_NO_TRIAGE)
                    continue
                if _is_blank(triage["chiefcomplaint"]):
                    yield self._drop(records.DROP_NO_CHIEF_COMPLAINT)
                    continue
            vitals = tuple(
                dict(zip(VITAL_FIELDS, row[1:]))
                for charted, row in by_stay["vitalsign"].get(stay.stay_id, ())
                if charted <= when
            )
            medications = tuple(sorted({
                row[2]
                for charted, row in by_stay["medrecon"].get(stay.stay_id, ())
                if charted <= when and not _is_blank(row[2])
            }))
            self._count(RECORDS_COUNTER)
            yield records.CohortRecord(
                record_id=dicom_id,
                subject_id=subject_id,
                study_id=study_id,
                stay_id=stay.stay_id,
                hadm_id=stay.hadm_id,
                view_position=view,
                study_datetime=when_iso,
                image_path=storage.join(
                    self._image_root, schema.image_relpath(subject_id, study_id, dicom_id)
                ),
                patient=dict(patient) if patient is not None else None,
                stay=dict(zip(STAY_FIELDS, stay.fields)),
                triage=triage,
                vitals=vitals,
                medications=medications,
                prior_admissions=sum(1 for discharged in discharges if discharged < when),
                labels=labels.get(study_id, _MISSING_LABELS),
            )

    def _drop(self, reason: str) -> beam.pvalue.TaggedOutput:
        self._count(reason)
        return beam.pvalue.TaggedOutput(records.DROPPED_TAG, reason)


class JoinCohort(beam.PTransform):
    """Links each frontal CXR image to its ED stay and what was known at the study time.

    Input: the dict of table PCollections from `ReadTables` (keys: JOIN_TABLES; rows as
    tables.columns(name) tuples).
    Output: a dict of PCollections:
        "records" (RECORDS_TAG): records.CohortRecord, one per linked frontal image.
        "dropped" (records.DROPPED_TAG): one reason string per image that is not a record:
            records.DROP_NOT_FRONTAL, DROP_NO_ED_STAY, and with aggressive_filtering
            DROP_NO_TRIAGE, DROP_NO_CHIEF_COMPLAINT.
        "dead_letter" (records.DEAD_LETTER_TAG): records.DeadLetter, stage "join", reason
            records.FAIL_BAD_TIMESTAMP for an unparsable StudyDate/StudyTime.
        "ledger" (LEDGER_TAG): the counts of `transforms.ledger` (rows joined and set aside
            per table, images per outcome).
    Every metadata row ends in exactly one of the first three. Beam counters in namespace
    "cohort" count each reason, the records, and table rows whose time does not parse.

    With `roots` (the three PhysioNet roots), the input is only {"metadata": rows}: the other
    tables are read here, in one stage, keeping only the rows of the subjects the join needs
    (`_ReadJoinRowsFn`), and their rows-read counts are in this ledger. Without it, every
    table comes as rows and is filtered and keyed here.

    With `limit`, only the whole patients chosen by `transforms.subset.ChooseSubjects`
    (about `limit` records, by a hash of `seed`) are joined; the other images are dropped
    as records.DROP_NOT_IN_LIMIT before the join.
    """

    def __init__(
        self,
        *,
        image_root: str,
        views: Sequence[str] = ("AP", "PA"),
        aggressive_filtering: bool = False,
        limit: int = 0,
        seed: int = 42,
        roots: Optional[dict[str, str]] = None,
        user_project: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._roots = dict(roots) if roots else None
        self._user_project = user_project or None
        self._views = tuple(v.strip().upper() for v in views if v.strip())
        if not self._views:
            raise InputError(f"views must name at least one ViewPosition, got {views!r}")
        if not image_root:
            raise InputError("image_root must be a directory or gs:// URI, got nothing")
        if limit < 0:
            raise InputError(f"limit must be >= 0, got {limit}")
        self._image_root = image_root.rstrip("/")
        self._aggressive = aggressive_filtering
        self._limit = int(limit)
        self._seed = int(seed)

    def expand(self, tables: dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        needed = ("metadata",) if self._roots else JOIN_TABLES
        missing = [name for name in needed if name not in tables]
        if missing:
            raise InputError(f"JoinCohort needs the tables {missing}")
        split = tables["metadata"] | "SplitImages" >> beam.ParDo(
            _SplitImagesFn(self._views)
        ).with_outputs(records.DROPPED_TAG, records.DEAD_LETTER_TAG, LEDGER_TAG, main="images")
        images = split.images
        subjects = beam.pvalue.AsSingleton(
            images
            | "ImageSubjects" >> beam.Keys()
            | "SubjectSet" >> beam.CombineGlobally(_ToFrozenSet())
        )
        dropped = [split[records.DROPPED_TAG]]
        ledgers = [split[LEDGER_TAG]]
        if self._limit:
            # Before the join, so only the chosen patients' rows cross it.
            from transforms.subset import ChooseSubjects, KeepSubjects

            if self._roots:  # for the stays' bounds only: the join reads edstays again, counted
                spec = schema.TABLES["edstays"]
                edstays = (
                    images.pipeline
                    | "StaysPath" >> beam.Create([table_path(spec, self._roots)])
                    | "ReadStayBounds" >> beam.FlatMap(
                        lambda path, spec, project: iter_rows(spec, path, project),
                        spec, self._user_project)
                )
            else:
                edstays = tables["edstays"]
            chosen = beam.pvalue.AsSingleton(
                (images, edstays)
                | "ChooseSubjects" >> ChooseSubjects(self._limit, self._seed, subjects))
            kept = images | "KeepChosen" >> KeepSubjects(chosen)
            images, subjects = kept["images"], chosen
            dropped.append(kept[records.DROPPED_TAG])
            ledgers.append(kept[LEDGER_TAG])
        keyed = {"images": images}
        if self._roots:
            paths = [(name, table_path(schema.TABLES[name], self._roots))
                     for name in _READ_ORDER]
            read = (
                images.pipeline
                | "TablePaths" >> beam.Create(paths)
                | "ReadJoinRows" >> beam.ParDo(
                    _ReadJoinRowsFn(self._user_project), subjects=subjects
                ).with_outputs(LEDGER_TAG, *_READ_ORDER)
            )
            keyed.update({name: read[name] for name in _JOIN_COLUMNS})
            ledgers.append(read[LEDGER_TAG])
        else:
            for name in _JOIN_COLUMNS:
                out = tables[name] | f"Key_{name}" >> beam.ParDo(
                    _KeyBySubjectFn(name), subjects=subjects
                ).with_outputs(LEDGER_TAG, main="rows")
                keyed[name] = out.rows
                ledgers.append(out[LEDGER_TAG])
        linked = (
            keyed
            | "GroupBySubject" >> beam.CoGroupByKey()
            | "LinkStays" >> beam.ParDo(
                _LinkSubjectFn(self._aggressive, self._image_root)
            ).with_outputs(records.DROPPED_TAG, LEDGER_TAG, main=RECORDS_TAG)
        )
        dropped.append(linked[records.DROPPED_TAG])
        ledgers.append(linked[LEDGER_TAG])
        return {
            RECORDS_TAG: linked[RECORDS_TAG],
            records.DROPPED_TAG: tuple(dropped) | "AllDropped" >> beam.Flatten(),
            records.DEAD_LETTER_TAG: split[records.DEAD_LETTER_TAG],
            LEDGER_TAG: tuple(ledgers) | "JoinLedger" >> beam.Flatten(),
        }


class _ToFrozenSet(beam.CombineFn):
    """The distinct subject ids as one small frozenset (a side input for the filters)."""

    def create_accumulator(self) -> set:
        return set()

    def add_input(self, accumulator: set, subject_id: int) -> set:
        accumulator.add(subject_id)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[set]) -> set:
        merged = set()
        for accumulator in accumulators:
            merged |= accumulator
        return merged

    def extract_output(self, accumulator: set) -> frozenset:
        return frozenset(accumulator)
