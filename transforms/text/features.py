"""The fixed clinical feature vector of a record, with a mask of what was observed.

`clinical_features(record)` turns a `CohortRecord`'s raw CSV strings into `FEATURE_NAMES`
order: float32 values and a bool mask that is True where the value was observed and valid.
Missing, unparsable and physiologically impossible values are 0.0 with mask False; they
never raise. Everything here is a pure function of the record.

The features (FEATURE_NAMES, 26 of them):
    age_years                 age at the study, years
    gender_male               1 male, 0 female
    arrival_{ambulance, walk_in, helicopter, other, unknown}   one-hot arrival transport
    triage_{temperature (F), heartrate (bpm), resprate (/min), o2sat (%), sbp, dbp (mmHg)}
    triage_pain (0-10), triage_acuity (ESI 1-5)
    last_{temperature, heartrate, resprate, o2sat, sbp, dbp, pain}   same units, see below
    n_vitals_rows             vitalsign rows at or before the study
    n_medications             medrecon names at or before the study
    prior_admissions          admissions discharged before the study
    hours_since_ed_arrival    hours from the ED intime to the study

Decisions (documented once, here):
- Age at the study follows MIMIC-IV's anchor rule: anchor_age + (study year - anchor_year).
  MIMIC-IV caps anchor_age at 91, so the oldest ages are censored, not exact.
- Temperature is charted in degrees F. A value in CELSIUS_RANGE (30-43) cannot be a living
  patient's Fahrenheit temperature but is a plausible Celsius one, so it is converted
  (C * 9/5 + 32); every other value outside TEMPERATURE_F_RANGE is missing. A value such as
  986 (a lost decimal point) is not guessed at: it is missing.
- Pain is free text. Only a plain number 0-10 is a pain score; a few explicit "no pain" words
  ("denies", "none", "no pain", "no") mean 0; anything else ("uta", "unable", "13", "8-9",
  "critical") is missing.
- Acuity (ESI) must be a whole number 1-5 ("3.0" is fine, "2.5" is not).
- Gender comes from patients, else from the ED stay; "M" is 1, "F" is 0, anything else missing.
- Arrival transport is one-hot over ARRIVAL_CATEGORIES. A recorded value outside them counts
  as OTHER; a blank one leaves all five missing (MIMIC's own "UNKNOWN" is a recorded value).
- "last_*" are the vitals known just before the X-ray: per vital, the most recent vitalsign row
  at or before the study time whose value is valid (last observation carried forward), since
  e.g. temperature is often not retaken with the other vitals.
- Counts (vitalsign rows, medications, prior admissions) are always observed, 0 included.
- Hours from ED arrival (intime) to the study: valid within HOURS_SINCE_ARRIVAL_RANGE.
- Outcome fields (disposition, diagnoses, outtime, hadm_id, dod) are never read.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from transforms.records import CohortRecord

# Plausibility ranges, inclusive. Values outside are data-entry errors, not patients.
TEMPERATURE_F_RANGE = (85.0, 110.0)
CELSIUS_RANGE = (30.0, 43.0)
HEARTRATE_RANGE = (20.0, 300.0)
RESPRATE_RANGE = (2.0, 80.0)
O2SAT_RANGE = (50.0, 100.0)
SBP_RANGE = (40.0, 300.0)
DBP_RANGE = (10.0, 200.0)
PAIN_RANGE = (0.0, 10.0)
ACUITY_RANGE = (1.0, 5.0)
AGE_RANGE = (0.0, 120.0)
HOURS_SINCE_ARRIVAL_RANGE = (0.0, 720.0)

VITALS: tuple[str, ...] = ("temperature", "heartrate", "resprate", "o2sat", "sbp", "dbp")
_VITAL_RANGES: dict[str, tuple[float, float]] = {
    "heartrate": HEARTRATE_RANGE,
    "resprate": RESPRATE_RANGE,
    "o2sat": O2SAT_RANGE,
    "sbp": SBP_RANGE,
    "dbp": DBP_RANGE,
}
ARRIVAL_CATEGORIES: tuple[str, ...] = ("AMBULANCE", "WALK IN", "HELICOPTER", "OTHER", "UNKNOWN")
PAIN_NONE_WORDS = frozenset({"denies", "none", "no pain", "no"})

_TRIAGE_NAMES = tuple(f"triage_{v}" for v in VITALS)
_LAST_NAMES = tuple(f"last_{v}" for v in VITALS)
FEATURE_NAMES: tuple[str, ...] = (
    "age_years",
    "gender_male",
    *(f"arrival_{c.lower().replace(' ', '_')}" for c in ARRIVAL_CATEGORIES),
    *_TRIAGE_NAMES,
    "triage_pain",
    "triage_acuity",
    *_LAST_NAMES,
    "last_pain",
    "n_vitals_rows",
    "n_medications",
    "prior_admissions",
    "hours_since_ed_arrival",
)
NUM_FEATURES = len(FEATURE_NAMES)
_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def parse_number(raw: object) -> Optional[float]:
    """A finite float from a CSV cell ("98.6", " 72 "), else None (blank, text, nan, inf)."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    else:
        text = str(raw).strip()
        if not _NUMBER.fullmatch(text):
            return None
        value = float(text)
    return value if math.isfinite(value) else None


def _in_range(value: Optional[float], bounds: tuple[float, float]) -> Optional[float]:
    if value is None or not bounds[0] <= value <= bounds[1]:
        return None
    return value


def parse_temperature_f(raw: object) -> Optional[float]:
    """Temperature in degrees F; Celsius-looking values (30-43) are converted."""
    value = parse_number(raw)
    if value is not None and CELSIUS_RANGE[0] <= value <= CELSIUS_RANGE[1]:
        value = round(value * 9.0 / 5.0 + 32.0, 2)
    return _in_range(value, TEMPERATURE_F_RANGE)


def parse_vital(name: str, raw: object) -> Optional[float]:
    """One vital sign (a name of VITALS), None where missing or implausible."""
    if name == "temperature":
        return parse_temperature_f(raw)
    return _in_range(parse_number(raw), _VITAL_RANGES[name])


def parse_pain(raw: object) -> Optional[float]:
    """A 0-10 pain score from free text; None for "uta", "unable", "13", "8-9", blank, ..."""
    if raw is None:
        return None
    text = " ".join(str(raw).strip().lower().split())
    if text in PAIN_NONE_WORDS:
        return 0.0
    return _in_range(parse_number(text), PAIN_RANGE)


def parse_acuity(raw: object) -> Optional[float]:
    """ESI acuity 1-5 ("3.0" -> 3.0); None if blank, fractional or out of range."""
    value = _in_range(parse_number(raw), ACUITY_RANGE)
    return value if value is not None and value.is_integer() else None


def parse_datetime(raw: object) -> Optional[dt.datetime]:
    """An ISO or MIMIC ("2180-07-23 21:30:00") timestamp, None if blank or malformed."""
    if not raw:
        return None
    try:
        return dt.datetime.fromisoformat(str(raw).strip())
    except ValueError:
        return None


def age_at_study(patient: Optional[Mapping[str, Optional[str]]], study_year: Optional[int]
                 ) -> Optional[float]:
    """anchor_age + (study year - anchor_year); None where an input is missing or implausible."""
    if not patient or study_year is None:
        return None
    anchor_age = parse_number(patient.get("anchor_age"))
    anchor_year = parse_number(patient.get("anchor_year"))
    if anchor_age is None or anchor_year is None or not anchor_year.is_integer():
        return None
    return _in_range(anchor_age + (study_year - anchor_year), AGE_RANGE)


def _gender_male(record: CohortRecord) -> Optional[float]:
    for source in (record.patient or {}, record.stay or {}):
        value = (source.get("gender") or "").strip().upper()
        if value in ("M", "F"):
            return 1.0 if value == "M" else 0.0
    return None


def arrival_category(raw: Optional[str]) -> Optional[str]:
    """The ARRIVAL_CATEGORIES entry of a raw arrival_transport; None when blank."""
    text = " ".join((raw or "").strip().upper().split())
    if not text:
        return None
    return text if text in ARRIVAL_CATEGORIES else "OTHER"


def _last_valid(rows: Sequence[Mapping[str, Optional[str]]], name: str) -> Optional[float]:
    parse = parse_pain if name == "pain" else lambda raw: parse_vital(name, raw)
    for row in reversed(rows):
        value = parse(row.get(name))
        if value is not None:
            return value
    return None


def parse_clinical(record: CohortRecord) -> dict[str, Optional[float]]:
    """Every feature of FEATURE_NAMES by name, None where missing or invalid."""
    study_time = parse_datetime(record.study_datetime)
    stay = record.stay or {}
    values: dict[str, Optional[float]] = dict.fromkeys(FEATURE_NAMES)
    values["age_years"] = age_at_study(record.patient, study_time.year if study_time else None)
    values["gender_male"] = _gender_male(record)
    arrival = arrival_category(stay.get("arrival_transport"))
    if arrival is not None:
        for category in ARRIVAL_CATEGORIES:
            values[f"arrival_{category.lower().replace(' ', '_')}"] = float(category == arrival)
    triage = record.triage or {}
    for vital in VITALS:
        values[f"triage_{vital}"] = parse_vital(vital, triage.get(vital))
        values[f"last_{vital}"] = _last_valid(record.vitals, vital)
    values["triage_pain"] = parse_pain(triage.get("pain"))
    values["triage_acuity"] = parse_acuity(triage.get("acuity"))
    values["last_pain"] = _last_valid(record.vitals, "pain")
    values["n_vitals_rows"] = float(len(record.vitals))
    values["n_medications"] = float(len(record.medications))
    values["prior_admissions"] = float(record.prior_admissions)
    intime = parse_datetime(stay.get("intime"))
    if intime is not None and study_time is not None:
        hours = (study_time - intime).total_seconds() / 3600.0
        values["hours_since_ed_arrival"] = _in_range(hours, HOURS_SINCE_ARRIVAL_RANGE)
    return values


def feature_arrays(values: Mapping[str, Optional[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [F] values with 0.0 where missing, bool [F] mask) in FEATURE_NAMES order."""
    data = np.zeros(NUM_FEATURES, dtype=np.float32)
    mask = np.zeros(NUM_FEATURES, dtype=np.bool_)
    for name, value in values.items():
        if value is not None:
            data[_INDEX[name]] = value
            mask[_INDEX[name]] = True
    return data, mask


def clinical_features(record: CohortRecord) -> tuple[np.ndarray, np.ndarray]:
    """The record's clinical feature vector and its observed-value mask (see module doc)."""
    return feature_arrays(parse_clinical(record))


# Abnormal-finding thresholds, used for the note and the knowledge-retrieval query.
FEVER_F = 100.4  # 38.0 degrees C
HYPOTHERMIA_F = 95.0  # 35.0 degrees C
TACHYCARDIA_BPM = 100.0  # above
BRADYCARDIA_BPM = 60.0  # below
TACHYPNEA_PER_MIN = 20.0  # above (SIRS)
BRADYPNEA_PER_MIN = 10.0  # below
HYPOXIA_O2SAT = 92.0  # below (ESI danger zone)
HYPOTENSION_SBP = 90.0  # below
SEVERE_HYPERTENSION = (180.0, 120.0)  # SBP or DBP at or above
SHOCK_INDEX = 1.0  # heart rate / SBP at or above
SEVERE_PAIN = 7.0  # at or above
HIGH_ACUITY_ESI = 2.0  # ESI 1-2
FINDINGS: tuple[str, ...] = (
    "fever", "hypothermia", "tachycardia", "bradycardia", "tachypnea", "bradypnea", "hypoxia",
    "hypotension", "severe hypertension", "elevated shock index", "severe pain",
    "high triage acuity",
)


def abnormal_findings(values: Mapping[str, Optional[float]], prefix: str) -> tuple[str, ...]:
    """Named abnormal findings of one set of vitals ("triage" or "last"), in FINDINGS order."""
    temp, hr, rr, spo2, sbp, dbp = (values.get(f"{prefix}_{v}") for v in VITALS)
    pain = values.get(f"{prefix}_pain")
    checks = (
        ("fever", temp is not None and temp >= FEVER_F),
        ("hypothermia", temp is not None and temp < HYPOTHERMIA_F),
        ("tachycardia", hr is not None and hr > TACHYCARDIA_BPM),
        ("bradycardia", hr is not None and hr < BRADYCARDIA_BPM),
        ("tachypnea", rr is not None and rr > TACHYPNEA_PER_MIN),
        ("bradypnea", rr is not None and rr < BRADYPNEA_PER_MIN),
        ("hypoxia", spo2 is not None and spo2 < HYPOXIA_O2SAT),
        ("hypotension", sbp is not None and sbp < HYPOTENSION_SBP),
        ("severe hypertension",
         (sbp is not None and sbp >= SEVERE_HYPERTENSION[0])
         or (dbp is not None and dbp >= SEVERE_HYPERTENSION[1])),
        ("elevated shock index", hr is not None and sbp is not None and hr / sbp >= SHOCK_INDEX),
        ("severe pain", pain is not None and pain >= SEVERE_PAIN),
    )
    findings = [name for name, present in checks if present]
    acuity = values.get(f"{prefix}_acuity")
    if acuity is not None and acuity <= HIGH_ACUITY_ESI:
        findings.append("high triage acuity")
    return tuple(findings)


def all_abnormal_findings(values: Mapping[str, Optional[float]]) -> tuple[str, ...]:
    """Findings at triage or in the last vitals before the study, in FINDINGS order."""
    present = set(abnormal_findings(values, "triage")) | set(abnormal_findings(values, "last"))
    return tuple(name for name in FINDINGS if name in present)
