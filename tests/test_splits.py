"""The patient-level stratified split: pure assignment, indices file, and the Beam pass."""

from __future__ import annotations

import collections
import json
import logging
import math
import random
from typing import Optional

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.join import schema
from transforms.errors import InputError
from transforms.records import CohortRecord
from transforms.splits import (
    SPLITS,
    PatientStratum,
    SplitAssignment,
    SplitPatients,
    assign_splits,
    check_ratios,
    clinical_availability,
    hash_split,
    indices_bytes,
    label_summary,
    make_assignment,
    parse_indices,
    patient_stratum,
    read_indices,
    record_stratum,
    reuse_splits,
    write_indices,
)

NAN = float("nan")
NO_FINDING = schema.CHEXPERT_LABELS.index("No Finding")
STRATA = [
    f"{view}|{clinical}|{labels}"
    for view in ("AP", "PA")
    for clinical in ("triage_and_vitals", "partial", "none")
    for labels in ("abnormal", "no_finding", "unlabeled")
]


def runner_options(*extra: str) -> PipelineOptions:
    return PipelineOptions(["--runner=FnApiRunner", *extra])


def labels_with(**values: float) -> tuple[float, ...]:
    """14 labels, NaN but for the named ones (names with spaces as underscores)."""
    out = [NAN] * len(schema.CHEXPERT_LABELS)
    for name, value in values.items():
        out[schema.CHEXPERT_LABELS.index(name.replace("_", " "))] = value
    return tuple(out)


def make_cohort(
    n: int,
    subject_id: int,
    *,
    view: str = "AP",
    triage: bool = True,
    vitals: int = 1,
    labels: Optional[tuple[float, ...]] = None,
    hadm_id: Optional[int] = 1,
) -> CohortRecord:
    """A minimal CohortRecord number `n` of patient `subject_id`."""
    return CohortRecord(
        record_id=f"dicom-{n:05d}",
        subject_id=subject_id,
        study_id=50000000 + n,
        stay_id=30000000 + n,
        hadm_id=None if hadm_id is None else 20000000 + n,
        view_position=view,
        study_datetime=f"2180-01-{1 + n % 28:02d}T10:00:00",
        image_path=f"/nowhere/dicom-{n:05d}.jpg",
        patient={"gender": "F", "anchor_age": "60", "anchor_year": "2180",
                 "anchor_year_group": "2008 - 2010"},
        stay={"intime": "2180-01-01 08:00:00", "outtime": "2180-01-01 20:00:00",
              "gender": "F", "race": "WHITE", "arrival_transport": "WALK IN"},
        triage={"chiefcomplaint": "Dyspnea", "heartrate": "90"} if triage else None,
        vitals=tuple({"charttime": "2180-01-01 09:00:00", "heartrate": "88"}
                     for _ in range(vitals)),
        medications=(),
        prior_admissions=0,
        labels=labels if labels is not None else labels_with(No_Finding=1.0),
    )


def synthetic_patients(n_records: int, seed: int, big: int = 0) -> list[PatientStratum]:
    """Patients of 1-5 records over uneven strata, about n_records in all (+ one of `big`)."""
    rng = random.Random(seed)
    weights = [rng.random() ** 2 + 0.01 for _ in STRATA]
    patients, total = [], 0
    while total < n_records:
        k = min(1 if rng.random() < 0.7 else rng.randint(2, 5), n_records - total)
        patients.append(PatientStratum(10_000_000 + len(patients), rng.choices(STRATA, weights)[0],
                                       k))
        total += k
    if big:
        patients.append(PatientStratum(19_999_999, STRATA[0], big))
    return patients


def shares(patients: list[PatientStratum], assignment: dict[int, str]):
    overall: collections.Counter = collections.Counter()
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for p in patients:
        overall[assignment[p.subject_id]] += p.n_records
        per[p.stratum][assignment[p.subject_id]] += p.n_records
    return overall, per


# --- stratification keys -------------------------------------------------------------------

@pytest.mark.parametrize(
    "labels, expected",
    [
        (labels_with(), "unlabeled"),
        (labels_with(No_Finding=1.0), "no_finding"),
        (labels_with(Edema=0.0, Atelectasis=0.0), "no_finding"),
        (labels_with(Edema=1.0), "abnormal"),
        (labels_with(Pneumonia=-1.0, No_Finding=0.0), "abnormal"),
    ],
)
def test_label_summary(labels: tuple[float, ...], expected: str) -> None:
    assert label_summary(labels) == expected


@pytest.mark.parametrize(
    "triage, vitals, expected",
    [(True, 2, "triage_and_vitals"), (True, 0, "partial"), (False, 1, "partial"),
     (False, 0, "none")],
)
def test_clinical_availability(triage: bool, vitals: int, expected: str) -> None:
    assert clinical_availability(make_cohort(1, 1, triage=triage, vitals=vitals)) == expected


def test_record_stratum_joins_the_three_keys() -> None:
    record = make_cohort(1, 1, view="PA", triage=False, vitals=0, labels=labels_with(Edema=1.0))
    assert record_stratum(record) == "PA|none|abnormal"


def test_patient_stratum_is_the_most_common_then_smallest() -> None:
    expected = PatientStratum(7, "AP|none|x", 4)
    assert patient_stratum(7, {"PA|none|x": 1, "AP|none|x": 3}) == expected
    assert patient_stratum(7, {"PA|none|x": 2, "AP|none|x": 2}).stratum == "AP|none|x"


# --- ratios --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "ratios",
    [(0.7, 0.2, 0.2), (1.2, -0.1, -0.1), (0.5, 0.5), (0.7, 0.15, 0.15, 0.0), (NAN, 0.5, 0.5)],
)
def test_bad_ratios_are_rejected_naming_them(ratios) -> None:
    with pytest.raises(ValueError, match=r"sum to 1, got \(") as err:
        check_ratios(ratios)
    assert str(ratios[0]) in str(err.value)
    with pytest.raises(ValueError):
        assign_splits([PatientStratum(1, "a", 1)], ratios)


# --- assign_splits -------------------------------------------------------------------------

@pytest.mark.parametrize("big", [0, 60])
def test_record_shares_close_to_ratios_overall_and_per_stratum(big: int) -> None:
    patients = synthetic_patients(3000, seed=1, big=big)
    assert 1600 < len(patients) < 1800
    assignment = assign_splits(patients, (0.7, 0.15, 0.15), seed=42)
    assert set(assignment) == {p.subject_id for p in patients}
    assert set(assignment.values()) == set(SPLITS)
    overall, per = shares(patients, assignment)
    total = sum(overall.values())
    for split, ratio in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(overall[split] / total - ratio) <= 0.02, (split, overall)
    large = [s for s, counts in per.items() if sum(counts.values()) >= 200]
    assert len(large) >= 4
    for stratum in large:
        n = sum(per[stratum].values())
        for split, ratio in zip(SPLITS, (0.7, 0.15, 0.15)):
            assert abs(per[stratum][split] / n - ratio) <= 0.05, (stratum, per[stratum])


def test_one_patient_with_a_tenth_of_the_records_keeps_the_split_shares() -> None:
    patients = synthetic_patients(3000, seed=1, big=300)
    assignment = assign_splits(patients, (0.7, 0.15, 0.15), seed=42)
    overall, _ = shares(patients, assignment)
    for split, ratio in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(overall[split] / 3300 - ratio) <= 0.02, overall


def test_other_ratios_are_followed() -> None:
    patients = synthetic_patients(3000, seed=2)
    overall, _ = shares(patients, assign_splits(patients, (0.5, 0.2, 0.3), seed=1))
    assert [round(overall[s] / 3000, 2) for s in SPLITS] == [0.5, 0.2, 0.3]


def test_a_zero_ratio_split_gets_no_patient() -> None:
    patients = synthetic_patients(500, seed=3)
    assert set(assign_splits(patients, (0.8, 0.2, 0.0)).values()) == {"train", "val"}
    assert set(assign_splits(patients, (1.0, 0.0, 0.0)).values()) == {"train"}


def test_assignment_is_deterministic_and_seeded() -> None:
    patients = synthetic_patients(2000, seed=4)
    first = assign_splits(patients, seed=42)
    shuffled = list(patients)
    random.Random(0).shuffle(shuffled)
    assert assign_splits(shuffled, seed=42) == first
    other = assign_splits(patients, seed=43)
    changed = sum(first[s] != other[s] for s in first)
    assert changed > len(first) * 0.2


def test_a_patient_listed_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="subject 5 is listed twice"):
        assign_splits([PatientStratum(5, "a", 1), PatientStratum(5, "b", 2)])


def test_hash_split_follows_ratios_and_is_stable() -> None:
    draws = [hash_split(sid, (0.6, 0.4, 0.0), seed=9) for sid in range(5000)]
    assert draws == [hash_split(sid, (0.6, 0.4, 0.0), seed=9) for sid in range(5000)]
    counts = collections.Counter(draws)
    assert counts["test"] == 0
    assert abs(counts["train"] / 5000 - 0.6) < 0.03


# --- indices -------------------------------------------------------------------------------

def test_indices_round_trip_and_bytes_are_deterministic(tmp_path) -> None:
    patients = synthetic_patients(300, seed=5)
    assignment = make_assignment(patients, (0.7, 0.15, 0.15), seed=42)
    path = str(tmp_path / "stratification_indices.json")
    write_indices(path, assignment)
    data = (tmp_path / "stratification_indices.json").read_bytes()
    reordered = SplitAssignment(dict(reversed(list(assignment.splits.items()))), 42,
                                (0.7, 0.15, 0.15))
    assert indices_bytes(reordered) == data
    doc = json.loads(data)
    assert doc["seed"] == 42 and doc["ratios"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    assert sum(doc["n_patients"].values()) == len(patients)
    back = read_indices(path)
    assert back == assignment
    assert not back.reused


def test_reused_indices_keep_known_patients_and_count_new_ones(caplog) -> None:
    old = synthetic_patients(300, seed=6)
    saved = make_assignment(old, (0.7, 0.15, 0.15), seed=42)
    new = [PatientStratum(1, STRATA[0], 2), PatientStratum(2, STRATA[1], 1)]
    with caplog.at_level(logging.WARNING):
        reused = reuse_splits(old[:100] + new, saved)
    assert reused.patients_not_in_indices == 2
    assert "2 of 102 patients are not in the reused stratification indices" in caplog.text
    assert all(reused.splits[p.subject_id] == saved.splits[p.subject_id] for p in old[:100])
    assert reused.splits[1] == hash_split(1, saved.ratios, saved.seed)
    assert set(reused.splits) == {p.subject_id for p in old[:100]} | {1, 2}


@pytest.mark.parametrize(
    "data, match",
    [
        (b"not json", "is not JSON"),
        (b'{"version": 7}', "has version 7"),
        (b'{"version": 1, "seed": 1, "ratios": {"train": 1, "val": 0, "test": 0}, '
         b'"patients": {"5": "holdout"}}', r"unknown splits \['holdout'\]"),
        (b'{"version": 1, "seed": 1, "patients": {}}', "bad seed, ratios or patients"),
    ],
)
def test_malformed_indices_are_input_errors(data: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_indices(data, "idx.json")


def test_missing_indices_file_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="nope.json cannot be read"):
        read_indices(str(tmp_path / "nope.json"))


# --- the Beam pass -------------------------------------------------------------------------

def _cohort(n_patients: int) -> list[CohortRecord]:
    records, n = [], 0
    for i in range(n_patients):
        for k in range(1 + i % 3):
            records.append(make_cohort(
                n, 10_000 + i, view="PA" if (i + k) % 4 == 0 else "AP", triage=i % 5 != 0,
                vitals=i % 2, labels=labels_with(Edema=1.0) if i % 3 == 0 else None))
            n += 1
    return records


def test_split_patients_matches_the_pure_assignment() -> None:
    cohort = _cohort(40)
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for record in cohort:
        counts[record.subject_id][record_stratum(record)] += 1
    expected = make_assignment([patient_stratum(s, c) for s, c in counts.items()],
                               (0.6, 0.2, 0.2), seed=3)
    with BeamTestPipeline(options=runner_options()) as p:
        out = p | beam.Create(cohort) | SplitPatients((0.6, 0.2, 0.2), seed=3)
        assert_that(out, equal_to([expected]))


def test_split_patients_reuses_indices() -> None:
    cohort = _cohort(30)
    saved = SplitAssignment({r.subject_id: "test" for r in cohort[:20]}, 5, (0.0, 0.0, 1.0))
    known = {r.subject_id for r in cohort[:20]}
    unknown = {r.subject_id for r in cohort} - known

    def check(outputs: list[SplitAssignment]) -> None:
        (assignment,) = outputs
        assert assignment.patients_not_in_indices == len(unknown)
        # The file's ratios (all test) also rule the patients it lacks.
        assert set(assignment.splits) == known | unknown
        assert set(assignment.splits.values()) == {"test"}
        assert assignment.seed == 5 and not math.isnan(assignment.ratios[0])

    with BeamTestPipeline(options=runner_options()) as p:
        out = p | beam.Create(cohort) | SplitPatients(indices=saved)
        assert_that(out, check)
