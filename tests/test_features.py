"""The clinical feature vector: parsing, plausibility, the mask, the age formula."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from transforms.text import features
from transforms.text.features import FEATURE_NAMES
from transforms.records import CohortRecord
from transforms.join.schema import CHEXPERT_LABELS

TRIAGE = {
    "temperature": "98.6", "heartrate": "88.0", "resprate": "18.0", "o2sat": "97.0",
    "sbp": "135.0", "dbp": "77.0", "pain": "7", "acuity": "3.0", "chiefcomplaint": "Dyspnea",
}


def make_record(**overrides: Any) -> CohortRecord:
    """A plausible record of MIMIC shape (raw strings), with fields replaced by `overrides`."""
    base = CohortRecord(
        record_id="02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
        subject_id=10000032,
        study_id=50414267,
        stay_id=33258284,
        hadm_id=None,
        view_position="AP",
        study_datetime="2180-07-23T21:30:14.531000",
        image_path="/data/files/p10/p10000032/s50414267/x.jpg",
        patient={"gender": "F", "anchor_age": "52", "anchor_year": "2180",
                 "anchor_year_group": "2014 - 2016"},
        stay={"intime": "2180-07-23 19:00:00", "outtime": "2180-07-24 01:00:00",
              "gender": "F", "race": "WHITE", "arrival_transport": "AMBULANCE"},
        triage=dict(TRIAGE),
        vitals=(
            {"charttime": "2180-07-23 19:30:00", "temperature": "99.1", "heartrate": "96",
             "resprate": "20", "o2sat": "95", "sbp": "130", "dbp": "75", "pain": "6"},
            {"charttime": "2180-07-23 21:00:00", "temperature": "", "heartrate": "92",
             "resprate": "18", "o2sat": "96", "sbp": "128", "dbp": "70", "pain": "uta"},
        ),
        medications=("Aspirin", "Furosemide", "Lisinopril"),
        prior_admissions=2,
        labels=tuple(math.nan for _ in CHEXPERT_LABELS),
    )
    return dataclasses.replace(base, **overrides)


def _feature(record: CohortRecord, name: str) -> tuple[float, bool]:
    values, mask = features.clinical_features(record)
    index = FEATURE_NAMES.index(name)
    return float(values[index]), bool(mask[index])


def _with_triage(**fields: str | None) -> CohortRecord:
    return make_record(triage={**TRIAGE, **fields})


# ----------------------------------------------------------------------------- pure parsers
@pytest.mark.parametrize("raw, expected", [
    ("98.6", 98.6), (" 101.3 ", 101.3), ("85", 85.0), ("110.0", 110.0),
    ("36.8", 98.24), ("39", 102.2),  # Celsius-looking values are converted
    ("986.0", None), ("9.8", None), ("0.0", None), ("110.1", None), ("84.9", None),
    ("", None), (None, None), ("nan", None), ("inf", None), ("98.6F", None), ("abc", None),
])
def test_temperature(raw, expected) -> None:
    assert features.parse_temperature_f(raw) == pytest.approx(expected)


@pytest.mark.parametrize("name, raw, expected", [
    ("heartrate", "72.0", 72.0), ("heartrate", "0.0", None), ("heartrate", "1000.0", None),
    ("heartrate", "880.0", None), ("heartrate", "19", None), ("heartrate", "300", 300.0),
    ("resprate", "16", 16.0), ("resprate", "0.0", None), ("resprate", "180.0", None),
    ("o2sat", "100.0", 100.0), ("o2sat", "1000.0", None), ("o2sat", "9.0", None),
    ("o2sat", "49", None), ("sbp", "120", 120.0), ("sbp", "0.0", None),
    ("sbp", "1400.0", None), ("dbp", "80", 80.0), ("dbp", "7400.0", None),
    ("dbp", "640.0", None), ("dbp", "", None), ("dbp", "-5", None),
])
def test_vital_plausibility(name, raw, expected) -> None:
    assert features.parse_vital(name, raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("0", 0.0), ("7", 7.0), (" 10 ", 10.0), ("5.5", 5.5), ("denies", 0.0), ("None", 0.0),
    ("uta", None), ("UTA", None), ("unable", None), ("13", None), ("8-9", None),
    ("0-10", None), ("Critical", None), ("ok", None), ("c/o", None), ("", None), (None, None),
    ("-1", None),
])
def test_pain_from_free_text(raw, expected) -> None:
    assert features.parse_pain(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("1.0", 1.0), ("3.0", 3.0), ("5", 5.0), ("2.5", None), ("0", None), ("6.0", None),
    ("", None), (None, None), ("high", None),
])
def test_acuity(raw, expected) -> None:
    assert features.parse_acuity(raw) == expected


@pytest.mark.parametrize("patient, year, expected", [
    ({"anchor_age": "52", "anchor_year": "2180"}, 2180, 52.0),
    ({"anchor_age": "52", "anchor_year": "2180"}, 2185, 57.0),
    ({"anchor_age": "91", "anchor_year": "2150"}, 2153, 94.0),
    ({"anchor_age": "40", "anchor_year": "2180"}, 2178, 38.0),
    ({"anchor_age": "", "anchor_year": "2180"}, 2180, None),
    ({"anchor_age": "52", "anchor_year": "2180.5"}, 2180, None),
    ({"anchor_age": "abc", "anchor_year": "2180"}, 2180, None),
    ({"anchor_age": "52", "anchor_year": "2180"}, None, None),
    (None, 2180, None),
])
def test_age_anchor_formula(patient, year, expected) -> None:
    assert features.age_at_study(patient, year) == expected


@pytest.mark.parametrize("raw, expected", [
    ("AMBULANCE", "AMBULANCE"), ("walk in", "WALK IN"), (" WALK  IN ", "WALK IN"),
    ("HELICOPTER", "HELICOPTER"), ("UNKNOWN", "UNKNOWN"), ("OTHER", "OTHER"),
    ("CAR", "OTHER"), ("", None), (None, None),
])
def test_arrival_category(raw, expected) -> None:
    assert features.arrival_category(raw) == expected


# ----------------------------------------------------------------------------- the vector
def test_vector_shape_dtype_and_names() -> None:
    values, mask = features.clinical_features(make_record())
    assert values.dtype == np.float32 and mask.dtype == np.bool_
    assert values.shape == mask.shape == (len(FEATURE_NAMES),) == (features.NUM_FEATURES,)
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert mask.all()  # every value of the complete record is observed and plausible


def test_feature_order_is_the_documented_contract() -> None:
    vitals = ("temperature", "heartrate", "resprate", "o2sat", "sbp", "dbp")
    assert FEATURE_NAMES == (
        "age_years", "gender_male", "arrival_ambulance", "arrival_walk_in",
        "arrival_helicopter", "arrival_other", "arrival_unknown",
        *(f"triage_{v}" for v in vitals), "triage_pain", "triage_acuity",
        *(f"last_{v}" for v in vitals), "last_pain",
        "n_vitals_rows", "n_medications", "prior_admissions", "hours_since_ed_arrival",
    )


def test_complete_record_values() -> None:
    values, mask = features.clinical_features(make_record())
    got = dict(zip(FEATURE_NAMES, values.tolist()))
    observed = dict(zip(FEATURE_NAMES, mask.tolist()))
    assert got["age_years"] == 52.0 and got["gender_male"] == 0.0
    assert [got[f"arrival_{c}"] for c in ("ambulance", "walk_in", "helicopter", "other",
                                            "unknown")] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert got["triage_temperature"] == pytest.approx(98.6)
    assert (got["triage_heartrate"], got["triage_o2sat"], got["triage_pain"],
            got["triage_acuity"]) == (88.0, 97.0, 7.0, 3.0)
    # Last vitals: the latest valid value per vital (temperature and pain from the earlier row).
    assert got["last_heartrate"] == 92.0 and got["last_dbp"] == 70.0
    assert got["last_temperature"] == pytest.approx(99.1) and got["last_pain"] == 6.0
    assert (got["n_vitals_rows"], got["n_medications"], got["prior_admissions"]) == (2, 3, 2)
    assert got["hours_since_ed_arrival"] == pytest.approx(2.5040, abs=1e-3)
    assert all(observed.values())


@pytest.mark.parametrize("field, raw", [
    ("temperature", "986.0"), ("o2sat", "1000.0"), ("heartrate", "0.0"), ("pain", "uta"),
    ("pain", "13"), ("acuity", "9"), ("sbp", ""), ("dbp", None), ("resprate", "fast"),
])
def test_impossible_or_unparsable_triage_values_are_masked(field, raw) -> None:
    value, observed = _feature(_with_triage(**{field: raw}), f"triage_{field}")
    assert (value, observed) == (0.0, False)
    # The other triage values are unaffected.
    other = "heartrate" if field != "heartrate" else "o2sat"
    assert _feature(_with_triage(**{field: raw}), f"triage_{other}")[1]


def test_record_without_triage_patient_vitals_or_stay_times() -> None:
    record = make_record(triage=None, patient=None, vitals=(), medications=(),
                         prior_admissions=0,
                         stay={"intime": None, "outtime": None, "gender": None, "race": None,
                               "arrival_transport": None})
    values, mask = features.clinical_features(record)
    observed = {n for n, ok in zip(FEATURE_NAMES, mask) if ok}
    assert observed == {"n_vitals_rows", "n_medications", "prior_admissions"}
    assert not values.any()


def test_gender_falls_back_to_the_stay() -> None:
    record = make_record(patient={"gender": "", "anchor_age": "60", "anchor_year": "2180"},
                         stay={**make_record().stay, "gender": "M"})
    assert _feature(record, "gender_male") == (1.0, True)


@pytest.mark.parametrize("arrival, hot", [
    ("WALK IN", "arrival_walk_in"), ("HELICOPTER", "arrival_helicopter"),
    ("UNKNOWN", "arrival_unknown"), ("BUS", "arrival_other"),
])
def test_arrival_one_hot(arrival, hot) -> None:
    record = make_record(stay={**make_record().stay, "arrival_transport": arrival})
    values, mask = features.clinical_features(record)
    arrival_names = [n for n in FEATURE_NAMES if n.startswith("arrival_")]
    got = {n: float(values[FEATURE_NAMES.index(n)]) for n in arrival_names}
    assert got == {n: float(n == hot) for n in arrival_names}
    assert all(mask[FEATURE_NAMES.index(n)] for n in arrival_names)


def test_blank_arrival_is_masked_not_unknown() -> None:
    record = make_record(stay={**make_record().stay, "arrival_transport": ""})
    _, mask = features.clinical_features(record)
    assert not any(mask[FEATURE_NAMES.index(n)] for n in FEATURE_NAMES
                   if n.startswith("arrival_"))


def test_last_vitals_skip_implausible_rows() -> None:
    vitals = (
        {"charttime": "2180-07-23 19:30:00", "heartrate": "110", "o2sat": "91"},
        {"charttime": "2180-07-23 20:30:00", "heartrate": "0.0", "o2sat": "1000.0"},
    )
    record = make_record(vitals=vitals)
    assert _feature(record, "last_heartrate") == (110.0, True)
    assert _feature(record, "last_o2sat") == (91.0, True)
    assert _feature(record, "last_sbp") == (0.0, False)
    assert _feature(record, "n_vitals_rows") == (2.0, True)


@pytest.mark.parametrize("intime, expected", [
    ("2180-07-23 21:00:00", (0.5040, True)),
    ("2180-07-23T21:30:14.531000", (0.0, True)),
    ("2180-07-24 00:00:00", (0.0, False)),  # after the study: impossible, masked
    ("not a time", (0.0, False)),
    (None, (0.0, False)),
])
def test_hours_since_arrival(intime, expected) -> None:
    record = make_record(stay={**make_record().stay, "intime": intime})
    value, observed = _feature(record, "hours_since_ed_arrival")
    assert (round(value, 3), observed) == (round(expected[0], 3), expected[1])


# ----------------------------------------------------------------------------- findings
@pytest.mark.parametrize("fields, expected", [
    ({}, ()),
    ({"temperature": "100.4"}, ("fever",)),
    ({"temperature": "94.0"}, ("hypothermia",)),
    ({"heartrate": "101"}, ("tachycardia",)),
    ({"heartrate": "100"}, ()),
    ({"heartrate": "45"}, ("bradycardia",)),
    ({"resprate": "24"}, ("tachypnea",)),
    ({"o2sat": "89"}, ("hypoxia",)),
    ({"o2sat": "1000.0"}, ()),
    ({"sbp": "85", "heartrate": "90"}, ("hypotension", "elevated shock index")),
    ({"sbp": "190"}, ("severe hypertension",)),
    ({"pain": "8"}, ("severe pain",)),
    ({"pain": "3", "acuity": "2.0"}, ("high triage acuity",)),
])
def test_triage_findings(fields, expected) -> None:
    base = {**TRIAGE, "pain": "3", **fields}
    values = features.parse_clinical(make_record(triage=base, vitals=()))
    assert features.abnormal_findings(values, "triage") == expected


def test_all_findings_merge_triage_and_last_vitals_in_fixed_order() -> None:
    triage = {**TRIAGE, "pain": "0", "heartrate": "120"}
    vitals = ({"charttime": "2180-07-23 20:00:00", "temperature": "101.5", "o2sat": "88"},)
    values = features.parse_clinical(make_record(triage=triage, vitals=vitals))
    assert features.all_abnormal_findings(values) == ("fever", "tachycardia", "hypoxia")
