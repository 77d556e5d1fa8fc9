"""The patient-level stratified split: an analyze pass over the cohort's metadata.

`SplitPatients` reads the joined `CohortRecord`s (ids and raw facts, no images), computes each
record's stratum, reduces them to one stratum per patient, and assigns every patient to
"train", "val" or "test" in one global step; the result reaches later stages as an
`AsSingleton` side input.

Stratification keys, per record (`record_stratum`), joined as "view|clinical|labels":
    view_position  the record's ViewPosition ("AP", "PA", ... as in --views).
    clinical       "triage_and_vitals" (a triage row and at least one vitalsign row charted
                   at or before the study), "partial" (one of the two), "none".
    labels         "unlabeled" (all 14 CheXpert labels missing), "abnormal" (any finding
                   other than "No Finding" positive or uncertain), "no_finding" (otherwise:
                   labelled, nothing positive or uncertain).
Three coarse keys keep strata large enough (at most 3 x 3 x views) for per-stratum shares to
mean something. A patient's stratum is the stratum most of its records have (ties: the
smallest name), since a patient goes to one split whole.

Assignment (`assign_splits`): within each stratum (in sorted order) patients are taken in the
order of a sha256 of (seed, subject_id) and each goes to the split furthest below its
record-count target. Targets accumulate over the strata already done, so the rounding of small
strata does not pile up in one split, and a patient with many records moves the split it lands
in past its target rather than breaking the balance of the others.

Reused indices (`--stratification_indices`): patients found there keep their split. A patient
absent from them gets a split drawn from a sha256 of (the file's seed, subject_id) against the
file's ratios (`hash_split`), is counted in `SplitAssignment.patients_not_in_indices` (and in
metadata.json), and a warning gives the count. Patients of the file absent from this cohort are
left out of this output's indices.

The official split (`--split official`): MIMIC-CXR-JPG's `mimic-cxr-2.0.0-split.csv.gz`, one row
per image (dicom_id, study_id, subject_id, split), for comparison with published work. It is
read on the analyze path and reduced to one `SubjectSplit` per subject (`subject_split`), which
reaches the assignment as an `AsDict` side input (~65k subjects for MIMIC). Rules:
    splits         "train" -> train, "validate" -> val, "test" -> test; any other value fails
                   the run, naming it.
    conflicts      MIMIC's split is by subject; a subject with rows in several splits would be
                   a fault of the table, and goes to the most restrictive of them (test, then
                   val, then train), so no image of the official test (or validate) set is
                   trained on. Counted (`patients_with_conflicting_splits`) and logged.
    absent         a cohort patient without a row gets `hash_split` against --train/val/test
                   ratios and --seed, as for reused indices; counted (`patients_not_in_table`)
                   and logged, never silent.
Table subjects outside the cohort are not in the output's indices; their rows are counted, so
the conservation check sees every row read (`OfficialCounts.table_rows`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam

from transforms.join import schema

from transforms import storage
from transforms.errors import InputError, TableValueError
from transforms.ledger import ARRIVED_ASSIGNED_RECORDS, ARRIVED_SPLIT_TABLE_ROWS
from transforms.records import CohortRecord

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_RATIOS: tuple[float, float, float] = (0.70, 0.15, 0.15)
DEFAULT_SEED = 42
INDICES_VERSION = 1
INDICES_NAME = "stratification_indices.json"
STRATIFICATION_KEYS: tuple[str, ...] = ("view_position", "clinical", "labels")

# Where a run's splits come from (metadata.json "split_source"); --split chooses between the
# first two, --stratification_indices makes the third.
STRATIFIED = "stratified"
OFFICIAL = "official"
INDICES = "indices"
SPLIT_CHOICES: tuple[str, ...] = (STRATIFIED, OFFICIAL)
# The official table's split names, and ours; most restrictive first (see "conflicts").
OFFICIAL_NAMES: dict[str, str] = {"test": "test", "validate": "val", "train": "train"}
_RESTRICTIVE = ("test", "val", "train")

CLINICAL_FULL = "triage_and_vitals"
CLINICAL_PARTIAL = "partial"
CLINICAL_NONE = "none"
LABELS_UNLABELED = "unlabeled"
LABELS_ABNORMAL = "abnormal"
LABELS_NO_FINDING = "no_finding"

_NO_FINDING_INDEX = schema.CHEXPERT_LABELS.index("No Finding")
_RATIO_TOLERANCE = 1e-6

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PatientStratum:
    """One patient as the split sees it: its stratum and how many records it holds."""

    subject_id: int
    stratum: str
    n_records: int


class SubjectSplit(NamedTuple):
    """One subject of the official split table: its split (ours), rows, and whether its rows
    named more than one split."""

    split: str
    rows: int
    conflicting: bool


@dataclasses.dataclass(frozen=True)
class OfficialCounts:
    """How an official assignment was made (metadata.json "official_split").

    Attributes:
        patients_from_table: cohort patients whose split the table gave.
        patients_not_in_table: cohort patients without a row, assigned by `hash_split`.
        patients_with_conflicting_splits: cohort patients whose rows named several splits
            (put in the most restrictive).
        table_rows: every row of the table, of cohort patients or not (conservation).
    """

    patients_from_table: int
    patients_not_in_table: int
    patients_with_conflicting_splits: int
    table_rows: int


@dataclasses.dataclass(frozen=True)
class SplitAssignment:
    """Every cohort patient's split, and how it was made.

    Attributes:
        splits: subject_id -> "train" | "val" | "test".
        seed: the seed of the assignment (the indices file's seed when reused).
        ratios: (train, val, test) shares (the indices file's when reused); with the official
            split, those `hash_split` drew patients absent from the table against.
        patients_not_in_indices: with reused indices, the patients the file did not hold
            (assigned by `hash_split`); None when the split was not reused.
        records: how many records the assignment was made from (the conservation check
            compares it with the join's count); None when read from a file.
        source: STRATIFIED, OFFICIAL or INDICES.
        official: the official split's counts; None for the other sources.
    """

    splits: Mapping[int, str]
    seed: int
    ratios: tuple[float, float, float]
    patients_not_in_indices: Optional[int] = None
    records: Optional[int] = dataclasses.field(default=None, compare=False)
    source: str = STRATIFIED
    official: Optional[OfficialCounts] = None

    @property
    def reused(self) -> bool:
        return self.source == INDICES

    def arrived(self) -> dict[str, int]:
        """The ledger entries of what reached the assignment (`transforms.ledger`)."""
        entries = {ARRIVED_ASSIGNED_RECORDS: self.records}
        if self.official is not None:
            entries[ARRIVED_SPLIT_TABLE_ROWS] = self.official.table_rows
        return entries

    def split_of(self, subject_id: int) -> str:
        """The split of `subject_id`.

        Raises:
            KeyError: the patient is not in the assignment (not in the cohort it was made of).
        """
        try:
            return self.splits[subject_id]
        except KeyError:
            raise KeyError(f"subject {subject_id} has no split in the assignment") from None


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """`ratios` as a (train, val, test) tuple of floats.

    Raises:
        ValueError: not three finite values >= 0 that sum to 1 (the message names them).
    """
    values = tuple(float(r) for r in ratios)
    if (
        len(values) != len(SPLITS)
        or not all(math.isfinite(r) and r >= 0 for r in values)
        or abs(sum(values) - 1.0) > _RATIO_TOLERANCE
    ):
        raise ValueError(
            f"split ratios (train, val, test) must be three values >= 0 that sum to 1, "
            f"got {tuple(ratios)}"
        )
    return values  # type: ignore[return-value]


def clinical_availability(record: CohortRecord) -> str:
    has_triage = record.triage is not None
    has_vitals = len(record.vitals) > 0
    if has_triage and has_vitals:
        return CLINICAL_FULL
    return CLINICAL_PARTIAL if has_triage or has_vitals else CLINICAL_NONE


def label_summary(labels: Sequence[float]) -> str:
    """"unlabeled", "abnormal" or "no_finding" for 14 CheXpert labels (NaN missing)."""
    present = [v for v in labels if not math.isnan(v)]
    if not present:
        return LABELS_UNLABELED
    findings = (v for i, v in enumerate(labels) if i != _NO_FINDING_INDEX)
    if any(v in (1.0, -1.0) for v in findings):
        return LABELS_ABNORMAL
    return LABELS_NO_FINDING


def record_stratum(record: CohortRecord) -> str:
    """The record's stratum: "view|clinical|labels", e.g. "AP|triage_and_vitals|abnormal"."""
    return "|".join(
        (record.view_position, clinical_availability(record), label_summary(record.labels))
    )


def patient_stratum(subject_id: int, counts: Mapping[str, int]) -> PatientStratum:
    """The patient's stratum from its records' strata counts: the most common, ties smallest."""
    if not counts:
        raise ValueError(f"subject {subject_id} has no records")
    stratum = min(counts, key=lambda s: (-counts[s], s))
    return PatientStratum(subject_id, stratum, sum(counts.values()))


def _draw(kind: str, seed: int, key: object) -> bytes:
    return hashlib.sha256(f"{kind}:{seed}:{key}".encode()).digest()


def hash_split(subject_id: int, ratios: Sequence[float], seed: int) -> str:
    """A split drawn for one patient from a stable hash against `ratios` (no stratification).

    Used for patients that reused indices do not hold.
    """
    ratios = check_ratios(ratios)
    u = int.from_bytes(_draw("unknown", seed, subject_id)[:8], "big") / 2**64
    edge = 0.0
    for split, ratio in zip(SPLITS, ratios):
        edge += ratio
        if u < edge and ratio > 0:
            return split
    return max((r, -i, s) for i, (s, r) in enumerate(zip(SPLITS, ratios)))[2]


def _records(patients: Iterable[PatientStratum]) -> int:
    return sum(p.n_records for p in patients)


def assign_splits(
    patients: Iterable[PatientStratum],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = DEFAULT_SEED,
) -> dict[int, str]:
    """Assigns every patient to one split, stratified, by record counts (see module docstring).

    A pure function of the patients (in any order), the ratios and the seed.

    Raises:
        ValueError: bad ratios, a patient listed twice, or one without records.
    """
    ratios = check_ratios(ratios)
    by_stratum: dict[str, list[PatientStratum]] = collections.defaultdict(list)
    seen: set[int] = set()
    for patient in patients:
        if patient.subject_id in seen:
            raise ValueError(f"subject {patient.subject_id} is listed twice")
        if patient.n_records < 1:
            raise ValueError(f"subject {patient.subject_id} has {patient.n_records} records")
        seen.add(patient.subject_id)
        by_stratum[patient.stratum].append(patient)

    # carry[k]: records split k is owed (+) or holds beyond its share (-) over the strata done.
    carry = [0.0] * len(SPLITS)
    remaining = sum(_records(members) for members in by_stratum.values())
    result: dict[int, str] = {}
    for stratum in sorted(by_stratum, key=lambda s: (-_records(by_stratum[s]), s)):
        members = sorted(
            by_stratum[stratum], key=lambda p: (_draw("split", seed, p.subject_id), p.subject_id)
        )
        total = _records(members)
        # The carry is spread over the strata left in proportion to their size, so it skews
        # none of them much, and no split gathers the rounding of many small strata.
        targets = [r * total + c * total / remaining for r, c in zip(ratios, carry)]
        assigned = [0] * len(SPLITS)
        for patient in members:
            # Ties go to the earlier split (train first); a zero-ratio split is never below.
            k = max(range(len(SPLITS)), key=lambda j: (targets[j] - assigned[j], -j))
            assigned[k] += patient.n_records
            result[patient.subject_id] = SPLITS[k]
        for k, ratio in enumerate(ratios):
            carry[k] += ratio * total - assigned[k]
        remaining -= total
    return result


def reuse_splits(
    patients: Iterable[PatientStratum], indices: SplitAssignment
) -> SplitAssignment:
    """The saved splits for the cohort's patients; `hash_split` for those the file lacks."""
    splits: dict[int, str] = {}
    unknown = 0
    for patient in patients:
        saved = indices.splits.get(patient.subject_id)
        if saved is None:
            unknown += 1
            saved = hash_split(patient.subject_id, indices.ratios, indices.seed)
        splits[patient.subject_id] = saved
    if unknown:
        _LOG.warning(
            "%d of %d patients are not in the reused stratification indices; each was "
            "assigned by a stable hash against the indices' ratios",
            unknown, len(splits),
        )
    return SplitAssignment(dict(sorted(splits.items())), indices.seed, indices.ratios, unknown,
                           source=INDICES)


def subject_split(subject_id: int, counts: Mapping[str, int]) -> SubjectSplit:
    """One subject's official split from its rows' split values and how many rows name each.

    Raises:
        TableValueError: a value other than train, validate or test (the message names it).
    """
    unknown = sorted((name for name in counts if name not in OFFICIAL_NAMES), key=str)
    if unknown:
        raise TableValueError(
            f"{schema.TABLES['split'].relpath}: subject {subject_id} has split {unknown[0]!r}; "
            f"allowed: {', '.join(sorted(OFFICIAL_NAMES))}; {TableValueError.MARK}")
    ours = {OFFICIAL_NAMES[name] for name, n in counts.items() if n}
    split = next(s for s in _RESTRICTIVE if s in ours)
    return SubjectSplit(split, sum(counts.values()), len(ours) > 1)


def table_splits(rows: Iterable[tuple[int, str]]) -> dict[int, SubjectSplit]:
    """Every subject of the official table from its (subject_id, split) rows, by
    `subject_split`: the pure form of `SplitPatients`' reduction of the table."""
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for subject_id, split in rows:
        counts[subject_id][split] += 1
    return {sid: subject_split(sid, c) for sid, c in sorted(counts.items())}


def official_assignment(
    patients: Iterable[PatientStratum],
    table: Mapping[int, SubjectSplit],
    ratios: Sequence[float],
    seed: int,
) -> SplitAssignment:
    """The cohort's patients in the official table's splits; `hash_split` (against `ratios`,
    `seed`) for those without a row (see the module docstring)."""
    ratios = check_ratios(ratios)
    splits: dict[int, str] = {}
    absent = conflicting = 0
    for patient in patients:
        entry = table.get(patient.subject_id)
        if entry is None:
            absent += 1
            splits[patient.subject_id] = hash_split(patient.subject_id, ratios, seed)
        else:
            conflicting += entry.conflicting
            splits[patient.subject_id] = entry.split
    relpath = schema.TABLES["split"].relpath
    if absent:
        _LOG.warning("%d of %d patients are not in %s; each was assigned by a stable hash "
                     "against --train/val/test_ratio", absent, len(splits), relpath)
    if conflicting:
        _LOG.warning("%d patients have rows of several splits in %s; each went to the most "
                     "restrictive (test, val, train)", conflicting, relpath)
    counts = OfficialCounts(
        patients_from_table=len(splits) - absent,
        patients_not_in_table=absent,
        patients_with_conflicting_splits=conflicting,
        table_rows=sum(entry.rows for entry in table.values()),
    )
    return SplitAssignment(dict(sorted(splits.items())), seed, ratios, source=OFFICIAL,
                           official=counts)


def make_assignment(
    patients: Iterable[PatientStratum],
    ratios: Sequence[float],
    seed: int,
    indices: Optional[SplitAssignment] = None,
    table: Optional[Mapping[int, SubjectSplit]] = None,
) -> SplitAssignment:
    """The split of every patient: computed here, reused from `indices`, or the official
    `table`'s (`table_splits`), whichever is given."""
    patients = list(patients)
    n_records = sum(p.n_records for p in patients)
    if indices is not None:
        return dataclasses.replace(reuse_splits(patients, indices), records=n_records)
    if table is not None:
        return dataclasses.replace(official_assignment(patients, table, ratios, seed),
                                   records=n_records)
    splits = assign_splits(patients, ratios, seed)
    return SplitAssignment(dict(sorted(splits.items())), seed, tuple(ratios), records=n_records)


def indices_bytes(assignment: SplitAssignment) -> bytes:
    """stratification_indices.json for `assignment`: sorted keys, no timestamps. An official
    split's file says so ("split_source") and has no stratification keys."""
    counts = collections.Counter(assignment.splits.values())
    official = assignment.source == OFFICIAL
    doc = {
        "version": INDICES_VERSION,
        "seed": assignment.seed,
        "ratios": dict(zip(SPLITS, assignment.ratios)),
        "stratification_keys": [] if official else list(STRATIFICATION_KEYS),
        "n_patients": {split: counts.get(split, 0) for split in SPLITS},
        "patients": {str(sid): split for sid, split in sorted(assignment.splits.items())},
    }
    if official:
        doc["split_source"] = OFFICIAL
    return (json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def write_indices(path: str, assignment: SplitAssignment) -> None:
    """Writes stratification_indices.json to `path` (local or gs://), atomically."""
    storage.write_bytes(path, indices_bytes(assignment))


def parse_indices(data: bytes, source: str = "stratification indices") -> SplitAssignment:
    """The assignment that `indices_bytes` wrote.

    Raises:
        InputError: not JSON, an unknown version, or bad fields (the message names `source`).
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{source} is not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != INDICES_VERSION:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise InputError(
            f"{source} has version {version!r}; this pipeline reads version {INDICES_VERSION}"
        )
    try:
        ratios = check_ratios([doc["ratios"][split] for split in SPLITS])
        seed = int(doc["seed"])
        splits = {int(sid): split for sid, split in doc["patients"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{source}: bad seed, ratios or patients: {err}") from None
    bad = sorted({s for s in splits.values() if s not in SPLITS})
    if bad:
        raise InputError(f"{source}: unknown splits {bad}; allowed {list(SPLITS)}")
    return SplitAssignment(dict(sorted(splits.items())), seed, ratios)


def read_indices(path: str) -> SplitAssignment:
    """Reads a stratification_indices.json (local or gs://) for reuse.

    Raises:
        InputError: the file is missing or malformed (the message names it).
    """
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        raise InputError(
            f"--stratification_indices {path} cannot be read: {type(err).__name__}"
        ) from None
    return parse_indices(data, source=path)


def _subject_and_stratum(record: CohortRecord) -> tuple[int, str]:
    return record.subject_id, record_stratum(record)


_TABLE_COLUMNS = schema.TABLES["split"].required
_TABLE_SUBJECT = _TABLE_COLUMNS.index("subject_id")
_TABLE_SPLIT = _TABLE_COLUMNS.index("split")


def _subject_and_table_split(row: tuple) -> tuple[int, str]:
    return row[_TABLE_SUBJECT], row[_TABLE_SPLIT]


def _keyed_subject_split(subject_id: int, counts: Mapping[str, int]) -> tuple[int, SubjectSplit]:
    return subject_id, subject_split(subject_id, counts)


class _CountValuesFn(beam.CombineFn):
    """Per key: how many times each value occurs (a patient's strata, a subject's official
    splits)."""

    def create_accumulator(self) -> collections.Counter:
        return collections.Counter()

    def add_input(self, accumulator: collections.Counter, value: str) -> collections.Counter:
        accumulator[value] += 1
        return accumulator

    def merge_accumulators(
        self, accumulators: Iterable[collections.Counter]
    ) -> collections.Counter:
        merged: collections.Counter = collections.Counter()
        for accumulator in accumulators:
            merged.update(accumulator)
        return merged

    def extract_output(self, accumulator: collections.Counter) -> dict[str, int]:
        return dict(sorted(accumulator.items(), key=lambda item: str(item[0])))


@beam.typehints.with_input_types(CohortRecord)
@beam.typehints.with_output_types(SplitAssignment)
class SplitPatients(beam.PTransform):
    """Assigns every patient of the cohort to train, val or test (the analyze pass).

    Input: records.CohortRecord (the joined metadata; no images are touched).
    Output: a PCollection of exactly one `SplitAssignment`, to be read downstream as
        `beam.pvalue.AsSingleton(...)`. No dead letters: every record has a stratum. A value
        of the official table other than train, validate or test fails the run (InputError).

    Args:
        ratios: (train, val, test) record shares, already checked (`pipelines.config`).
        seed: seed of the patient order (and of `hash_split` for new patients).
        indices: a `read_indices` result to reuse instead of computing the split.
        table: the rows of the official split table (`ReadTable` of schema.TABLES["split"])
            to follow instead of computing the split (`--split official`).
    """

    def __init__(
        self,
        ratios: Sequence[float] = DEFAULT_RATIOS,
        seed: int = DEFAULT_SEED,
        indices: Optional[SplitAssignment] = None,
        table: Optional[beam.PCollection] = None,
    ) -> None:
        super().__init__()
        self._ratios = tuple(float(r) for r in ratios)
        self._seed = int(seed)
        self._indices = indices
        self._table = table

    def expand(self, cohort: beam.PCollection) -> beam.PCollection:
        patients = (
            cohort
            | "RecordStrata" >> beam.Map(_subject_and_stratum)
            | "CountPatientStrata" >> beam.CombinePerKey(_CountValuesFn())
            | "PatientStratum" >> beam.MapTuple(patient_stratum)
            | "AllPatients" >> beam.combiners.ToList()
        )
        if self._table is None:
            return patients | "Assign" >> beam.Map(
                make_assignment, self._ratios, self._seed, self._indices)
        # One small entry per subject of the table (~65k for MIMIC), not one per image.
        subjects = (
            self._table
            | "TableSubjectSplit" >> beam.Map(_subject_and_table_split)
            | "CountSubjectSplits" >> beam.CombinePerKey(_CountValuesFn())
            | "SubjectSplit" >> beam.MapTuple(_keyed_subject_split)
        )
        return patients | "Assign" >> beam.Map(
            make_assignment, self._ratios, self._seed, None, beam.pvalue.AsDict(subjects))


@beam.typehints.with_input_types(SplitAssignment)
class WriteIndices(beam.PTransform):
    """Writes stratification_indices.json (alone, for --compute_indices_only).

    Input: the one-element `SplitAssignment` PCollection of `SplitPatients`.
    Output: the path written (one element).

    Args:
        path: where the file goes.
        ledger: the join's summed ledger (`transforms.ledger`) as an AsDict side input: the
            file is written only if the join's counts add up.
        tables: the tables the join read.
    """

    def __init__(self, path: str, ledger=None, tables: Sequence[str] = ()) -> None:
        super().__init__()
        self._path = path
        self._ledger = ledger
        self._tables = tuple(tables)

    def expand(self, assignment: beam.PCollection) -> beam.PCollection:
        if self._ledger is None:
            return assignment | "WriteIndicesFile" >> beam.Map(self._write)
        return assignment | "WriteIndicesFile" >> beam.Map(self._write, self._ledger)

    def _write(self, assignment: SplitAssignment, ledger=None) -> str:
        if ledger is not None:
            from transforms.ledger import check_conservation

            check_conservation({**ledger, **assignment.arrived()}, self._tables,
                               committed=False)
        write_indices(self._path, assignment)
        return self._path
