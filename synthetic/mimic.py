"""Synthetic MIMIC-IV, MIMIC-IV-ED and MIMIC-CXR-JPG, in the real PhysioNet layout and schema.

Writes, under `--output_dir` (local or gs://):

    mimic-iv/hosp/{patients,admissions}.csv.gz
    mimic-iv-ed/ed/{edstays,triage,vitalsign,medrecon,diagnosis}.csv.gz
    mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz
    mimic-cxr-jpg/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg

with the columns of `transforms.join.schema.TABLES` and the quirks of the real files: dates shifted
into 2100-2200 per patient, StudyTime floats with lost leading zeros and float noise
(`5959.25`, `213014.53100000002`), the real ViewPosition mix (null included), several stays per
patient (some overlapping), about half the frontal images outside any ED stay, stays without
triage, implausible vitals (temperature 986, o2sat 1000), free-text pain ("uta", "13"),
CheXpert 1.0/0.0/-1.0/blank with some studies unlabelled, and hadm_id blank unless admitted.

Images are greyscale JPEGs at the real size by default (2544x3056, 1-2 MB) with texture from
real radiographs; a pool of distinct encoded images is reused through hard links (local) or
server-side copies (gs://). `faults` plants broken files (missing, empty, truncated, not an
image) among the frontal images inside an ED stay, to exercise the pipeline's dead letters.

The split table holds one split per subject, as MIMIC-CXR's does (weights of the real table).
`split_missing` leaves that many subjects with a linked frontal image (the first, by
subject_id) out of it, to exercise the rule of `--split official` for absent patients; it draws
no random number, so every other file is the same as without it.

`--scale mimic` writes MIMIC's real size instead (`MIMIC_ROW_COUNTS`, each table within ~2%):
364,627 patients, 546,028 admissions, 425,087 ED stays (nearly all triaged), 1.56M vitalsign
and 2.99M medrecon rows, 377,110 images in 227,827 studies of 65,379 subjects (64.5% AP/PA).
About 205k patients have ED stays, a quarter of them X-rays; most X-rayed patients have ED
stays, some not; the rest are only in hosp; the groups interleave over the subject_id range.
About 112k frontal images of ~48k patients fall inside an ED stay. `--scale 0.01` is the same
shape at 1% of the size. `--no_images` writes every table (the same bytes) but no JPEG, for
join-only runs.

The answer: `OUTPUT_DIR/answer/cohort.csv.gz` (dicom_id, subject_id, study_id, stay_id, sorted
by dicom_id) holds one row per frontal image (AP or PA) whose study moment lies inside an ED
stay of its subject, [intime, outtime] inclusive, the latest intime winning (ties: the larger
stay_id); computed from the generator's own datetimes (`linked_stay`), not the pipeline's
code. Study moments have millisecond resolution and survive the StudyDate/StudyTime round trip
exactly, so a correct reader of the CSVs gets the same set. Planted faults are linked images,
so they are in it. `answer/summary.json` holds the counts (linked images and patients, rows
per table, images, frontal images) and the arguments.

Everything is a pure function of the arguments: the same arguments give byte-identical CSVs.

Usage:
    python -m synthetic.mimic --output_dir /tmp/mimic --n_patients 2000 --seed 0
    python -m synthetic.mimic --output_dir /tmp/fullsize --scale mimic --no_images
"""

from __future__ import annotations

import argparse
import csv
import bisect
import dataclasses
import datetime as dt
import gzip
import io
import itertools
import json
import logging
import math
import random
import sys
import time
from typing import Any, Optional, Sequence


from transforms.join import schema


from transforms import storage
from synthetic.images import (
    DEFAULT_RADIOGRAPH_DIR,
    FAULT_KINDS,
    FAULT_MISSING,
    EncodedImage,
    ImageTreeWriter,
    encode_pool,
    fault_bytes,
    load_radiographs,
    pool_without_pixels,
)

MIMIC_IV_SUBDIR = "mimic-iv"
MIMIC_ED_SUBDIR = "mimic-iv-ed"
MIMIC_CXR_SUBDIR = "mimic-cxr-jpg"
_ROOT_SUBDIRS = {
    schema.MIMIC_IV: MIMIC_IV_SUBDIR,
    schema.MIMIC_ED: MIMIC_ED_SUBDIR,
    schema.MIMIC_CXR: MIMIC_CXR_SUBDIR,
}


class _Weighted:
    """A weighted choice prepared once: `pick` draws as `rng.choices(values, weights)[0]` does.

    The same single `rng.random()` call and the same bisection over the same cumulative sums,
    so results are identical to `random.choices`, without rebuilding the sums on every draw.
    """

    def __init__(self, weighted: Sequence[tuple[Any, float]]) -> None:
        self.values, self.weights = zip(*weighted)
        self.cumulative = list(itertools.accumulate(self.weights))
        self.total = self.cumulative[-1] + 0.0
        self.mean = (
            sum(v * w for v, w in weighted) / self.total
            if all(isinstance(v, (int, float)) for v in self.values) else math.nan
        )

    def share(self, values: Sequence[Any]) -> float:
        """The chance that a draw is one of `values`."""
        return sum(w for v, w in zip(self.values, self.weights) if v in values) / self.total

    def pick(self, rng: random.Random) -> Any:
        return self.values[
            bisect.bisect(self.cumulative, rng.random() * self.total, 0, len(self.values) - 1)
        ]


FRONTAL_VIEWS = ("AP", "PA")
_SUBJECT_RANGE = (10000032, 19999999)
_STUDY_RANGE = (50000000, 59999999)
_STAY_RANGE = (30000000, 39999999)
_HADM_RANGE = (20000000, 29999999)

# Weighted choices: (value, weight). Weights follow the published tables roughly.
_VIEWS = _Weighted((
    ("AP", 39.0), ("PA", 25.0), ("LATERAL", 22.0), ("LL", 9.0), ("", 4.0),
    ("AP AXIAL", 0.3), ("PA LLD", 0.2), ("AP LLD", 0.2), ("LAO", 0.1), ("RAO", 0.1),
    ("XTABLE LATERAL", 0.1),
))
_VIEW_CODE_MEANING = {
    "AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral",
    "LL": "left lateral", "AP AXIAL": "antero-posterior", "PA LLD": "postero-anterior",
    "AP LLD": "antero-posterior", "LAO": "left anterior oblique",
    "RAO": "right anterior oblique", "XTABLE LATERAL": "lateral", "": "",
}
_STAYS_PER_PATIENT = _Weighted(((1, 45), (2, 30), (3, 15), (4, 10)))
_IMAGES_PER_STUDY = _Weighted(((1, 30), (2, 50), (3, 20)))
_GENDERS = _Weighted((("F", 52), ("M", 48)))
_RACES = _Weighted((
    ("WHITE", 58), ("BLACK/AFRICAN AMERICAN", 18), ("HISPANIC/LATINO - PUERTO RICAN", 3),
    ("HISPANIC OR LATINO", 3), ("ASIAN", 3), ("ASIAN - CHINESE", 1.5),
    ("WHITE - OTHER EUROPEAN", 2), ("BLACK/CAPE VERDEAN", 1.5), ("OTHER", 4), ("UNKNOWN", 4),
    ("UNABLE TO OBTAIN", 1), ("PATIENT DECLINED TO ANSWER", 1),
))
_ARRIVAL = _Weighted((
    ("WALK IN", 52), ("AMBULANCE", 40), ("UNKNOWN", 6), ("OTHER", 1.5), ("HELICOPTER", 0.5),
))
_DISPOSITIONS = _Weighted((
    ("ADMITTED", 46), ("HOME", 44), ("TRANSFER", 3), ("LEFT WITHOUT BEING SEEN", 1.5),
    ("LEFT AGAINST MEDICAL ADVICE", 1.5), ("ELOPED", 1.2), ("OTHER", 2.5), ("EXPIRED", 0.3),
))
_ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")
_CHIEF_COMPLAINTS = _Weighted((
    ("Dyspnea", 8), ("Chest pain", 8), ("SOB", 6), ("Cough, Fever", 3), ("Abd pain", 6),
    ("s/p Fall", 6), ("Weakness", 4), ("Transfer", 4), ("Fever", 3),
    ("Altered mental status", 3),
    ("Cough", 3), ("Syncope", 2), ("Abnormal labs", 2), ("Dizziness", 2), ("N/V", 2),
    ("Hypoxia", 2), ("CHEST PAIN", 1.5), ("DYSPNEA", 1.5), ("Abd pain, Nausea", 1.5),
    ("Back pain", 1.5), ("Headache", 1.5), ("Lethargy", 1), ("Palpitations", 1), ("ETOH", 1),
    ("Wound eval", 1), ("Leg swelling", 1), ("R Flank pain", 0.5), ("MVC", 1),
    ("Hematemesis", 0.5),
    ("SI", 0.8), ("Hyperglycemia", 0.5), ("Tachycardia", 0.5), ("L Leg pain", 0.5),
    ("Chest pain, Dyspnea", 1), ("BRBPR", 0.4), ("Pneumonia", 0.6),
))
_PAIN = _Weighted((
    ("0", 30), ("1", 1), ("2", 2), ("3", 3), ("4", 4), ("5", 5), ("6", 5), ("7", 6), ("8", 8),
    ("9", 4), ("10", 8), ("", 4), ("uta", 3), ("UTA", 1), ("unable", 1.5), ("13", 0.5),
    ("denies", 1), ("Critical", 0.3), ("8-9", 0.5), ("0-10", 0.2), ("ok", 0.2), ("c/o", 0.2),
))
_ACUITY = _Weighted(
    (("1.0", 6), ("2.0", 33), ("3.0", 53), ("4.0", 6), ("5.0", 0.3), ("", 1.7))
)
_RHYTHM = _Weighted((
    ("", 90), ("Sinus Rhythm", 4), ("Normal Sinus Rhythm", 3), ("Sinus Tachycardia", 1.5),
    ("Atrial Fibrillation", 1), ("Paced Rhythm", 0.5),
))
# Implausible values real triage/vitals carry (typos, Celsius, missing decimal points).
_IMPLAUSIBLE = {
    "temperature": ("986.0", "36.8", "0.0", "9.8"),
    "heartrate": ("0.0", "1000.0", "880.0"),
    "resprate": ("0.0", "180.0"),
    "o2sat": ("1000.0", "9.0", "0.0"),
    "sbp": ("0.0", "1400.0"),
    "dbp": ("0.0", "7400.0", "640.0"),
}
_VITAL_NAMES = tuple(_IMPLAUSIBLE)
# Enhanced Therapeutic Class (etccode -> etcdescription) of the drugs below.
_ETC = {
    "48": "Calcium Channel Blockers - Dihydropyridines",
    "53": "Beta-Blockers - Beta-1 Selective",
    "54": "Beta-Blockers - Alpha and Beta Blocking Agents",
    "59": "ACE Inhibitors",
    "60": "Angiotensin Receptor Blockers (ARBs)",
    "319": "Antidepressant - Selective Serotonin Reuptake Inhibitors (SSRIs)",
    "321": "Antidepressant - Triazolopyridines",
    "326": "Analgesic or Antipyretic Non-Opioid",
    "415": "Antihyperlipidemic - HMG CoA Reductase Inhibitors (statins)",
    "418": "Thyroid Hormones",
    "1028": "Glucocorticoids",
    "1071": "Laxative - Stimulant",
    "1072": "Laxative - Stool Softeners",
    "1126": "Anticoagulants - Coumarin",
    "1210": "Iron Replacement",
    "1218": "Multivitamin Preparations",
    "1220": "Folic Acid Preparations",
    "2714": "Loop Diuretics",
    "2715": "Thiazide and Related Diuretics",
    "3039": "Proton Pump Inhibitors",
    "5574": "Antihyperglycemic - Biguanide Type",
    "5575": "Insulin Long Acting",
    "5617": "Vitamin D Preparations",
    "5857": "Benign Prostatic Hypertrophy (BPH) Therapy - Alpha-Blockers",
    "5968": "Asthma/COPD Therapy - Anticholinergic Agents, Inhaled Long Acting",
    "5969": "Asthma Therapy - Leukotriene Receptor Antagonists",
    "5970": "Asthma/COPD Therapy - Beta 2-Adrenergic Agents, Inhaled, Short Acting",
    "5977": "Asthma/COPD - Glucocorticoid and Beta-Agonist Combinations",
    "5999": "Platelet Aggregation Inhibitors",
    "6001": "Analgesic Opioid Agonists",
    "6027": "Anticonvulsant - Gamma Aminobutyric Acid (GABA) Analogs",
    "6381": "Anticoagulant - Factor Xa Inhibitors",
}
# name, gsn, ndc, etccodes (one medrecon row per class, etc_rn 1, 2, ...)
_DRUGS = (
    ("Lisinopril", "000388", "68180051301", ("59",)),
    ("Metformin", "010857", "65862000801", ("5574",)),
    ("Albuterol Sulfate", "028090", "59310057922", ("5970",)),
    ("Aspirin", "004380", "63739043601", ("326", "5999",)),
    ("Atorvastatin", "029968", "00071015523", ("415",)),
    ("Amlodipine", "016926", "00069152066", ("48",)),
    ("Metoprolol Succinate", "022942", "00186109205", ("53",)),
    ("Metoprolol Tartrate", "005022", "00378001801", ("53",)),
    ("Furosemide", "008208", "00054429731", ("2714",)),
    ("Omeprazole", "019887", "62175013643", ("3039",)),
    ("Pantoprazole", "027462", "00008084181", ("3039",)),
    ("Levothyroxine", "006649", "00074662490", ("418",)),
    ("Gabapentin", "021413", "00071080524", ("6027",)),
    ("Sertraline", "016388", "00049490066", ("319",)),
    ("Acetaminophen", "004489", "00904198261", ("326",)),
    ("Insulin Glargine", "050384", "00088250033", ("5575",)),
    ("Warfarin", "006559", "00056017270", ("1126",)),
    ("Apixaban", "066826", "00003089321", ("6381",)),
    ("Tiotropium Bromide", "048863", "00597007541", ("5968",)),
    ("Fluticasone-Salmeterol", "047074", "00173069700", ("5977",)),
    ("Prednisone", "006747", "00054474125", ("1028",)),
    ("Losartan", "019694", "00006095254", ("60",)),
    ("Hydrochlorothiazide", "008182", "00172208380", ("2715",)),
    ("Tamsulosin", "026873", "00597005801", ("5857",)),
    ("Docusate Sodium", "002643", "00536106101", ("1072",)),
    ("Senna", "003027", "00536341801", ("1071",)),
    ("Vitamin D3", "065127", "00904582460", ("5617",)),
    ("Multivitamin", "049106", "00536462901", ("1218",)),
    ("Clopidogrel", "045315", "63653117103", ("5999",)),
    ("Carvedilol", "021776", "00007413920", ("54",)),
    ("Oxycodone", "004222", "00406055262", ("6001",)),
    ("Trazodone", "016371", "50111056101", ("321",)),
    ("Montelukast", "028399", "00006011731", ("5969",)),
    ("Ferrous Sulfate", "001612", "00904759160", ("1210",)),
    ("Folic Acid", "001734", "00603316221", ("1220",)),
)
# icd_code, icd_version, icd_title
_DIAGNOSES = (
    ("R079", 10, "Chest pain, unspecified"),
    ("R0602", 10, "Shortness of breath"),
    ("J189", 10, "Pneumonia, unspecified organism"),
    ("I509", 10, "Heart failure, unspecified"),
    ("J449", 10, "Chronic obstructive pulmonary disease, unspecified"),
    ("R55", 10, "Syncope and collapse"),
    ("W19XXXA", 10, "Unspecified fall, initial encounter"),
    ("R509", 10, "Fever, unspecified"),
    ("N390", 10, "Urinary tract infection, site not specified"),
    ("R1010", 10, "Upper abdominal pain, unspecified"),
    ("I10", 10, "Essential (primary) hypertension"),
    ("E119", 10, "Type 2 diabetes mellitus without complications"),
    ("U071", 10, "COVID-19"),
    ("R05", 10, "Cough"),
    ("A419", 10, "Sepsis, unspecified organism"),
    ("78650", 9, "CHEST PAIN NOS"),
    ("78605", 9, "SHORTNESS OF BREATH"),
    ("486", 9, "PNEUMONIA, ORGANISM NOS"),
    ("4280", 9, "CHF NOS"),
    ("7802", 9, "SYNCOPE AND COLLAPSE"),
    ("E8889", 9, "FALL NOS"),
    ("7806", 9, "FEVER, UNSPECIFIED"),
    ("4019", 9, "HYPERTENSION NOS"),
)
# (probability of 1.0, of 0.0, of -1.0); blank otherwise.
_CHEXPERT_PROBS = {
    "Atelectasis": (0.20, 0.01, 0.05), "Cardiomegaly": (0.20, 0.06, 0.03),
    "Consolidation": (0.06, 0.04, 0.02), "Edema": (0.12, 0.10, 0.06),
    "Enlarged Cardiomediastinum": (0.03, 0.04, 0.05), "Fracture": (0.02, 0.005, 0.003),
    "Lung Lesion": (0.03, 0.003, 0.006), "Lung Opacity": (0.23, 0.01, 0.02),
    "No Finding": (0.0, 0.0, 0.0), "Pleural Effusion": (0.24, 0.12, 0.03),
    "Pleural Other": (0.01, 0.0, 0.003), "Pneumonia": (0.07, 0.03, 0.08),
    "Pneumothorax": (0.05, 0.20, 0.005), "Support Devices": (0.30, 0.003, 0.001),
}
_SPLITS = _Weighted((("train", 97.8), ("validate", 0.8), ("test", 1.4)))
_ADMISSION_TYPE_WEIGHTS = (
    ("EW EMER.", 40), ("OBSERVATION ADMIT", 15), ("EU OBSERVATION", 15), ("URGENT", 10),
    ("DIRECT EMER.", 8), ("ELECTIVE", 7), ("SURGICAL SAME DAY ADMISSION", 5),
)
_ED_ADMISSION_TYPES = _Weighted(_ADMISSION_TYPE_WEIGHTS[:5])
_OLD_ADMISSION_TYPES = _Weighted(_ADMISSION_TYPE_WEIGHTS[5:] + _ADMISSION_TYPE_WEIGHTS[3:4])
_OLD_ADMISSION_LOCATIONS = _Weighted((
    ("PHYSICIAN REFERRAL", 40), ("TRANSFER FROM HOSPITAL", 25), ("CLINIC REFERRAL", 20),
    ("WALK-IN/SELF REFERRAL", 10), ("PROCEDURE SITE", 5),
))
_DISCHARGE_LOCATIONS = _Weighted((
    ("HOME", 40), ("HOME HEALTH CARE", 25), ("SKILLED NURSING FACILITY", 15), ("", 12),
    ("REHAB", 5), ("CHRONIC/LONG TERM ACUTE CARE", 3),
))
_INSURANCE = _Weighted(
    (("Medicare", 45), ("Private", 25), ("Medicaid", 18), ("Other", 10), ("", 2))
)
_LANGUAGE = _Weighted(
    (("English", 88), ("Spanish", 4), ("Chinese", 1.5), ("Russian", 1.5), ("", 5))
)
_MARITAL = _Weighted(
    (("MARRIED", 40), ("SINGLE", 33), ("WIDOWED", 12), ("DIVORCED", 8), ("", 7))
)
_STUDY_DESCRIPTIONS = (
    "CHEST (PA AND LAT)", "CHEST (PORTABLE AP)", "CHEST (PRE-OP PA & LAT)",
    "CHEST PORT. LINE PLACEMENT", "CHEST (SINGLE VIEW)", "",
)

_OLDER_ADMISSIONS = _Weighted(((0, 60), (1, 28), (2, 12)))

# `scale="mimic"`: MIMIC's published row counts (MIMIC-IV 3.1 hosp, MIMIC-IV-ED 2.2,
# MIMIC-CXR-JPG 2.1.0 metadata), which the full-size plan aims at.
MIMIC_ROW_COUNTS: dict[str, int] = {
    "patients": 364_627, "admissions": 546_028, "edstays": 425_087, "triage": 425_087,
    "vitalsign": 1_564_610, "medrecon": 2_987_342, "metadata": 377_110, "studies": 227_827,
    "cxr_subjects": 65_379,
}
# Patients by what they have, at full size. About 205k patients have ED stays, of whom about a
# quarter have X-rays; most X-rayed patients have ED stays, some do not; the rest appear only in
# hosp (patients, admissions).
MIMIC_GROUPS: dict[str, int] = {
    "ed_and_cxr": 55_000, "ed_only": 150_000, "cxr_only": 10_379, "neither": 149_248,
}
_GROUP_HAS = {  # group -> (has ED stays, has X-rays)
    "ed_and_cxr": (True, True), "ed_only": (True, False), "cxr_only": (False, True),
    "neither": (False, False),
}
_MIMIC_STAYS_PER_PATIENT = _Weighted((
    (1, 57), (2, 21), (3, 9), (4, 5), (5, 2.7), (6, 1.8), (8, 1.3), (10, 0.9), (15, 0.6),
    (25, 0.3),
))
_MIMIC_STUDIES_PER_PATIENT = _Weighted((
    (1, 36), (2, 19.5), (3, 12), (4, 8.5), (5, 6), (6, 4.5), (7, 3.5), (8, 3), (10, 3),
    (13, 2), (18, 1.3), (25, 0.7),
))
_MIMIC_IMAGES_PER_STUDY = _Weighted(((1, 45.5), (2, 44.5), (3, 9), (4, 1)))
_MIMIC_VIEWS = _Weighted((  # 64.5% AP or PA, as in MIMIC-CXR-JPG
    ("AP", 40.0), ("PA", 24.5), ("LATERAL", 21.5), ("LL", 9.0), ("", 4.0),
    ("AP AXIAL", 0.3), ("PA LLD", 0.2), ("AP LLD", 0.2), ("LAO", 0.1), ("RAO", 0.1),
    ("XTABLE LATERAL", 0.1),
))
# Older admissions of hosp-only patients (the ones seen by MIMIC-IV but never by ED or CXR).
_MIMIC_HOSP_ONLY_ADMISSIONS = _Weighted(((0, 21), (1, 31), (2, 25), (3, 14), (4, 9)))


@dataclasses.dataclass(frozen=True)
class _Profile:
    """The count distributions and chances one scale draws from."""

    stays_per_patient: _Weighted
    studies_per_patient: Optional[_Weighted]  # None: 1 + min(14, int(expovariate(1 / 2.6)))
    images_per_study: _Weighted
    views: _Weighted
    study_in_stay: float  # chance a study falls inside one of the patient's stays
    first_study_in_stay: bool  # the patient's first study always inside a stay
    no_triage: float
    no_vitals: float
    older_admissions: _Weighted
    hosp_only_admissions: _Weighted


_SMALL_PROFILE = _Profile(
    stays_per_patient=_STAYS_PER_PATIENT, studies_per_patient=None,
    images_per_study=_IMAGES_PER_STUDY, views=_VIEWS, study_in_stay=0.5,
    first_study_in_stay=False, no_triage=0.03, no_vitals=0.05,
    older_admissions=_OLDER_ADMISSIONS, hosp_only_admissions=_OLDER_ADMISSIONS,
)
# At full size every stay but a few has triage (MIMIC-IV-ED: one triage row per stay), and the
# first study of a patient with ED stays is taken in one of them (most CXRs come from the ED).
_MIMIC_PROFILE = _Profile(
    stays_per_patient=_MIMIC_STAYS_PER_PATIENT, studies_per_patient=_MIMIC_STUDIES_PER_PATIENT,
    images_per_study=_MIMIC_IMAGES_PER_STUDY, views=_MIMIC_VIEWS, study_in_stay=0.365,
    first_study_in_stay=True, no_triage=0.002, no_vitals=0.08,
    older_admissions=_OLDER_ADMISSIONS, hosp_only_admissions=_MIMIC_HOSP_ONLY_ADMISSIONS,
)
_MEDRECON_ROWS_PER_DRUG = sum(len(d[3]) for d in _DRUGS) / len(_DRUGS)


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    """How many patients of each group (`MIMIC_GROUPS` keys) one MIMIC-shaped scale writes."""

    factor: float
    groups: dict[str, int]

    @property
    def n_patients(self) -> int:
        return sum(self.groups.values())


def plan_scale(scale: str | float) -> ScalePlan:
    """The patients per group for `scale`: "mimic" (full size) or a fraction of it (0.01).

    Raises:
        ValueError: `scale` is neither "mimic" nor a number in (0, 10].
    """
    if isinstance(scale, str) and scale.strip().lower() == "mimic":
        factor = 1.0
    else:
        try:
            factor = float(scale)
        except (TypeError, ValueError):
            factor = math.nan
        if not 0 < factor <= 10:  # also rejects nan
            raise ValueError(
                f"scale={scale!r}: must be 'mimic' or a fraction of MIMIC's size in (0, 10]"
            )
    groups = {name: round(count * factor) for name, count in MIMIC_GROUPS.items()}
    if not groups["ed_and_cxr"]:
        raise ValueError(f"scale={scale!r}: too small, no patient with ED stays and X-rays")
    return ScalePlan(factor, groups)


def expected_counts(plan: ScalePlan) -> dict[str, float]:
    """The expected rows per table (and linked frontal images) of `plan`, from its distributions.

    Keys as `MIMIC_ROW_COUNTS`, plus frontal_images and linked_images (frontal images inside a
    stay of their subject); what the generator draws comes within a few per cent of these.
    """
    profile, groups = _MIMIC_PROFILE, plan.groups
    ed = groups["ed_and_cxr"] + groups["ed_only"]
    cxr = groups["ed_and_cxr"] + groups["cxr_only"]
    stays = ed * profile.stays_per_patient.mean
    p_admitted = _DISPOSITIONS.share(("ADMITTED",))
    studies_each = profile.studies_per_patient.mean
    frontal_per_study = profile.images_per_study.mean * profile.views.share(FRONTAL_VIEWS)
    linked_studies = 1 + (studies_each - 1) * profile.study_in_stay
    return {
        "patients": plan.n_patients,
        "admissions": stays * p_admitted + (ed + groups["cxr_only"])
        * profile.older_admissions.mean + groups["neither"] * profile.hosp_only_admissions.mean,
        "edstays": stays,
        "triage": stays * (1 - profile.no_triage),
        "vitalsign": stays * (1 - profile.no_vitals) * 4.0,  # randint(1, 7)
        "medrecon": stays * (1 - 0.15) * 8.0 * _MEDRECON_ROWS_PER_DRUG,  # randint(1, 15) drugs
        "metadata": cxr * studies_each * profile.images_per_study.mean,
        "studies": cxr * studies_each,
        "cxr_subjects": cxr,
        "frontal_images": cxr * studies_each * frontal_per_study,
        "linked_images": groups["ed_and_cxr"] * linked_studies * frontal_per_study,
    }


@dataclasses.dataclass(frozen=True)
class GeneratedDataset:
    """Where the synthetic dataset was written and what it holds.

    `counts` keys: patients, admissions, stays, stays_admitted, stays_overlapping,
    stays_without_triage, triage, vitalsign, medrecon, diagnosis, studies,
    studies_without_chexpert, images, frontal_images, frontal_in_stay (the default cohort,
    faulted images included), linked_patients, ed_subjects, cxr_subjects, pool_images,
    images_written, and one `faults_<kind>` per fault kind.
    `faults` maps each fault kind to the sorted dicom_ids planted with it.
    `answer_dir` holds the expected cohort (`cohort.csv.gz`) and `summary.json`.
    `not_in_split`: the subjects left out of the split table (`split_missing`).
    """

    mimic_iv_dir: str
    mimic_ed_dir: str
    mimic_cxr_dir: str
    counts: dict[str, int]
    faults: dict[str, tuple[str, ...]]
    answer_dir: str = ""
    not_in_split: tuple[int, ...] = ()


@dataclasses.dataclass
class _Stay:
    stay_id: int
    intime: dt.datetime
    outtime: dt.datetime
    disposition: str
    hadm_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Image:
    """One image to write: its relative path, its pool entry, and whether the cohort takes it."""

    dicom_id: str
    relpath: str
    pool_index: int
    frontal_in_stay: bool


def _pick(rng: random.Random, weighted: _Weighted) -> Any:
    return weighted.pick(rng)


def _fmt_time(value: dt.datetime) -> str:
    # "YYYY-MM-DD HH:MM:SS" as strftime gives it (years >= 1000), at a fraction of the cost.
    return value.isoformat(" ", "seconds")


def study_time_text(moment: dt.datetime, noise: int = 0) -> str:
    """StudyTime as MIMIC-CXR writes it: HHMMSS.fff as a float, leading zeros lost.

    `noise` moves the value that many ulps (float noise of the real files, e.g.
    `213014.53100000002`); 00:59:59.250 is `5959.25`, 21:30:14 is `213014.0`.
    """
    value = (
        moment.hour * 10000 + moment.minute * 100 + moment.second + moment.microsecond / 1e6
    )
    for _ in range(abs(noise)):
        value = math.nextafter(value, math.inf if noise > 0 else -math.inf)
    return repr(value)


def linked_stay(moment: dt.datetime, stays: Sequence[_Stay]) -> Optional[_Stay]:
    """The stay holding `moment` ([intime, outtime] inclusive); the latest intime wins, ties
    the larger stay_id. Written here, apart from the pipeline's code, as the answer's rule."""
    best = None
    for stay in stays:
        if stay.intime <= moment <= stay.outtime and (
            best is None or (stay.intime, stay.stay_id) > (best.intime, best.stay_id)
        ):
            best = stay
    return best


def _dicom_id(rng: random.Random) -> str:
    digits = f"{rng.getrandbits(160):040x}"
    return "-".join(digits[i : i + 8] for i in range(0, 40, 8))


class _Ids:
    """Unique random ids in the real ranges, drawn from the generator's one random stream."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[object] = set()

    def draw(self, low: int, high: int) -> int:
        while True:
            value = self._rng.randint(low, high)
            if value not in self._used:
                self._used.add(value)
                return value

    def dicom(self) -> str:
        while True:
            value = _dicom_id(self._rng)
            if value not in self._used:
                self._used.add(value)
                return value


class _CsvGz:
    """A .csv.gz written streaming, published by `commit()` (`storage.open_write`).

    The gzip header carries no name and mtime 0, so equal rows give equal bytes.
    """

    def __init__(self, path: str, columns: Sequence[str]) -> None:
        self.path = path
        self.rows = 0
        self._raw = storage.open_write(path)
        self._gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6
        )
        self._text = io.TextIOWrapper(self._gz, encoding="utf-8", newline="")
        self._writer = csv.writer(self._text, lineterminator="\n")
        self._writer.writerow(columns)
        self._width = len(columns)
        self._closed = False

    def write(self, row: Sequence[object]) -> None:
        if len(row) != self._width:  # a programming error: the schema and the row disagree
            raise AssertionError(f"{self.path}: row has {len(row)} values, header {self._width}")
        self._writer.writerow(["" if v is None else v for v in row])
        self.rows += 1

    def close(self) -> None:
        self._closed = True
        self._text.flush()
        self._text.detach()
        self._gz.close()

    def commit(self) -> None:
        self._raw.commit()

    def discard(self) -> None:
        if not self._closed:
            self.close()
        self._raw.discard()


class _Generator:
    """Generates one patient at a time and streams its rows to the ten tables."""

    def __init__(
        self, rng: random.Random, tables: dict[str, _CsvGz], pool: Sequence[EncodedImage],
        profile: _Profile = _SMALL_PROFILE, split_missing: int = 0,
    ) -> None:
        self.rng = rng
        self.split_missing = split_missing
        # Subjects left out of the split table (see the module docstring).
        self.not_in_split: list[int] = []
        self.ids = _Ids(rng)
        self.tables = tables
        self.pool = pool
        self.profile = profile
        self.images: list[_Image] = []
        # The expected cohort: (dicom_id, subject_id, study_id, stay_id) per linked frontal image.
        self.answer: list[tuple[str, int, int, int]] = []
        self.counts: dict[str, int] = {
            "stays_admitted": 0, "stays_overlapping": 0, "stays_without_triage": 0,
            "studies": 0, "studies_without_chexpert": 0, "frontal_images": 0,
            "frontal_in_stay": 0, "ed_subjects": 0, "cxr_subjects": 0,
        }

    def patient(self, subject_id: int, *, ed: bool = True, cxr: bool = True) -> None:
        """Writes one patient's rows to every table, dates near a random anchor_year.

        `ed`: the patient has ED stays; `cxr`: X-ray studies. Without either, only hosp rows.
        """
        rng = self.rng
        gender = _pick(rng, _GENDERS)
        race = _pick(rng, _RACES)
        anchor_year = rng.randint(2105, 2190)
        anchor_age = min(91, int(rng.triangular(18, 92, 68)))
        start = dt.datetime(anchor_year, 1, 1) + dt.timedelta(days=rng.uniform(0, 365))
        span = dt.timedelta(days=rng.uniform(30, 3 * 365))

        stays = self._stays(start, span) if ed else []
        admissions = self._admissions(subject_id, start, stays, race, hosp_only=not (ed or cxr))
        if stays:
            self.counts["ed_subjects"] += 1
            self._ed_rows(subject_id, gender, race, stays)
        linked_before = len(self.answer)
        study_images = self._studies(subject_id, start, span, stays) if cxr else []
        linked = len(self.answer) > linked_before

        dod = ""
        expired = [s for s in stays if s.disposition == "EXPIRED"]
        if expired:
            dod = expired[-1].outtime.strftime("%Y-%m-%d")
        elif rng.random() < 0.04:
            last = max([s.outtime for s in stays] + admissions, default=start)
            dod = (last + dt.timedelta(days=rng.uniform(1, 700))).strftime("%Y-%m-%d")
        self.tables["patients"].write(
            (subject_id, gender, anchor_age, anchor_year, rng.choice(_ANCHOR_YEAR_GROUPS), dod)
        )
        if study_images:
            self.counts["cxr_subjects"] += 1
            split = _pick(rng, _SPLITS)  # drawn either way: the rest stays the same
            if linked and len(self.not_in_split) < self.split_missing:
                self.not_in_split.append(subject_id)
                return
            for dicom_id, study_id in study_images:
                self.tables["split"].write((dicom_id, study_id, subject_id, split))

    def _stays(self, start: dt.datetime, span: dt.timedelta) -> list[_Stay]:
        rng = self.rng
        stays: list[_Stay] = []
        for _ in range(_pick(rng, self.profile.stays_per_patient)):
            hours = min(40.0, max(0.5, rng.lognormvariate(math.log(5.0), 0.6)))
            if stays and rng.random() < 0.12:
                # A second registration while the first is still open: overlapping stays.
                prev = max(stays, key=lambda s: s.intime)
                intime = prev.intime + (prev.outtime - prev.intime) * rng.uniform(0.2, 0.9)
                self.counts["stays_overlapping"] += 1
            else:
                intime = start + span * rng.random()
            intime = intime.replace(second=0, microsecond=0)
            outtime = (intime + dt.timedelta(hours=hours)).replace(second=0, microsecond=0)
            stays.append(
                _Stay(self.ids.draw(*_STAY_RANGE), intime, outtime, _pick(rng, _DISPOSITIONS))
            )
        stays.sort(key=lambda s: (s.intime, s.stay_id))
        return stays

    def _admissions(
        self, subject_id: int, start: dt.datetime, stays: list[_Stay], race: str,
        hosp_only: bool = False,
    ) -> list[dt.datetime]:
        """Admissions for the admitted stays plus some older ones; returns their dischtimes."""
        rng = self.rng
        rows, dischtimes = [], []
        insurance, language, marital = (
            _pick(rng, _INSURANCE), _pick(rng, _LANGUAGE), _pick(rng, _MARITAL),
        )
        provider = "P" + "".join(rng.choices("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        for stay in stays:
            if stay.disposition != "ADMITTED":
                continue
            stay.hadm_id = self.ids.draw(*_HADM_RANGE)
            self.counts["stays_admitted"] += 1
            admit = stay.intime + (stay.outtime - stay.intime) * rng.uniform(0.3, 0.95)
            admit = admit.replace(second=0, microsecond=0)
            disch = admit + dt.timedelta(minutes=rng.randint(12 * 60, 12 * 24 * 60))
            died = rng.random() < 0.02
            dischtimes.append(disch)
            rows.append((
                subject_id, stay.hadm_id, _fmt_time(admit), _fmt_time(disch),
                _fmt_time(disch) if died else "", _pick(rng, _ED_ADMISSION_TYPES), provider,
                "EMERGENCY ROOM", "DIED" if died else _pick(rng, _DISCHARGE_LOCATIONS),
                insurance, language, marital, race, _fmt_time(stay.intime),
                _fmt_time(stay.outtime), 1 if died else 0,
            ))
        older = self.profile.hosp_only_admissions if hosp_only else self.profile.older_admissions
        for _ in range(_pick(rng, older)):
            admit = start - dt.timedelta(days=rng.uniform(20, 900))
            admit = admit.replace(second=0, microsecond=0)
            disch = admit + dt.timedelta(minutes=rng.randint(12 * 60, 10 * 24 * 60))
            dischtimes.append(disch)
            rows.append((
                subject_id, self.ids.draw(*_HADM_RANGE), _fmt_time(admit), _fmt_time(disch), "",
                _pick(rng, _OLD_ADMISSION_TYPES), provider,
                _pick(rng, _OLD_ADMISSION_LOCATIONS), _pick(rng, _DISCHARGE_LOCATIONS),
                insurance, language, marital, race, "", "", 0,
            ))
        rows.sort(key=lambda r: r[1])
        for row in rows:
            self.tables["admissions"].write(row)
        return dischtimes

    def _vitals(self) -> tuple[str, str, str, str, str, str]:
        rng = self.rng
        gauss, draw = rng.gauss, rng.random
        # In _VITAL_NAMES order: temperature, heartrate, resprate, o2sat, sbp, dbp.
        values = [
            f"{round(gauss(98.2, 0.8), 1):.1f}",
            f"{round(min(180, max(40, gauss(88, 18)))):.1f}",
            f"{round(min(40, max(8, gauss(18, 2.5)))):.1f}",
            f"{min(100, round(100 - abs(gauss(1.5, 2.5)))):.1f}",
            f"{round(min(240, max(70, gauss(135, 22)))):.1f}",
            f"{round(min(140, max(30, gauss(77, 14)))):.1f}",
        ]
        if draw() < 0.04:
            index = rng.randrange(len(_VITAL_NAMES))  # as rng.choice(_VITAL_NAMES)
            values[index] = rng.choice(_IMPLAUSIBLE[_VITAL_NAMES[index]])
        for index in range(6):
            if draw() < 0.045:
                values[index] = ""
        return tuple(values)

    def _ed_rows(self, subject_id: int, gender: str, race: str, stays: list[_Stay]) -> None:
        rng = self.rng
        for stay in stays:
            self.tables["edstays"].write((
                subject_id, stay.hadm_id, stay.stay_id, _fmt_time(stay.intime),
                _fmt_time(stay.outtime), gender, race, _pick(rng, _ARRIVAL), stay.disposition,
            ))
        for stay in stays:
            if rng.random() < self.profile.no_triage:
                self.counts["stays_without_triage"] += 1
                continue
            complaint = _pick(rng, _CHIEF_COMPLAINTS) if rng.random() > 0.005 else ""
            self.tables["triage"].write(
                (subject_id, stay.stay_id, *self._vitals(), _pick(rng, _PAIN),
                 _pick(rng, _ACUITY), complaint)
            )
        for stay in stays:
            duration = stay.outtime - stay.intime
            count = 0 if rng.random() < self.profile.no_vitals else rng.randint(1, 7)
            times = sorted(
                (stay.intime + duration * rng.random()).replace(second=0, microsecond=0)
                for _ in range(count)
            )
            for charttime in times:
                vitals = list(self._vitals())
                if rng.random() < 0.45:
                    vitals[0] = ""  # temperature is often not retaken
                self.tables["vitalsign"].write((
                    subject_id, stay.stay_id, _fmt_time(charttime), *vitals, _pick(rng, _RHYTHM),
                    _pick(rng, _PAIN),
                ))
        for stay in stays:
            count = 0 if rng.random() < 0.15 else rng.randint(1, 15)
            duration = stay.outtime - stay.intime
            # Reconciliation happens once or twice a stay, sometimes after the X-ray.
            moments = sorted(
                (stay.intime + duration * rng.random()).replace(second=0, microsecond=0)
                for _ in range(rng.randint(1, 2))
            )
            drugs = rng.sample(_DRUGS, min(count, len(_DRUGS)))
            rows = []
            for name, gsn, ndc, codes in drugs:
                charttime = _fmt_time(rng.choice(moments))
                for etc_rn, code in enumerate(codes, start=1):
                    rows.append((subject_id, stay.stay_id, charttime, name, gsn, ndc, etc_rn,
                                 code, _ETC[code]))
            for row in sorted(rows, key=lambda r: (r[2], r[3], r[6])):
                self.tables["medrecon"].write(row)
        for stay in stays:
            version = 9 if rng.random() < 0.3 else 10
            codes = [d for d in _DIAGNOSES if d[1] == version]
            for seq_num, (code, icd_version, title) in enumerate(
                rng.sample(codes, rng.randint(1, 3)), start=1
            ):
                self.tables["diagnosis"].write(
                    (subject_id, stay.stay_id, seq_num, code, icd_version, title)
                )

    def _study_moment(
        self, start: dt.datetime, span: dt.timedelta, stays: list[_Stay], inside: bool = False
    ) -> dt.datetime:
        """Inside a stay (at least a minute from its bounds) when `inside`, else by the
        profile's chance (half, by default); otherwise at least 5 minutes outside every stay."""
        rng = self.rng
        if stays and (inside or rng.random() < self.profile.study_in_stay):
            stay = rng.choice(stays)
            inner = stay.outtime - stay.intime - dt.timedelta(minutes=2)
            moment = stay.intime + dt.timedelta(minutes=1) + inner * rng.random() ** 1.3
        else:
            margin = dt.timedelta(minutes=5)
            earliest, window = start - dt.timedelta(days=30), span + dt.timedelta(days=90)
            for _ in range(50):
                moment = earliest + window * rng.random()
                if not any(s.intime - margin <= moment <= s.outtime + margin for s in stays):
                    break
            else:
                moment = max(s.outtime for s in stays) + dt.timedelta(days=rng.uniform(1, 30))
        millis = 0 if rng.random() < 0.15 else rng.randrange(1000)
        return moment.replace(microsecond=millis * 1000)

    def _studies(
        self, subject_id: int, start: dt.datetime, span: dt.timedelta, stays: list[_Stay]
    ) -> list[tuple[str, int]]:
        """Writes the patient's studies (metadata, chexpert); returns (dicom_id, study_id)s."""
        rng = self.rng
        profile = self.profile
        if profile.studies_per_patient is None:
            n_studies = 1 + min(14, int(rng.expovariate(1 / 2.6)))
        else:
            n_studies = _pick(rng, profile.studies_per_patient)
        studies = []
        for index in range(n_studies):
            inside = profile.first_study_in_stay and index == 0
            moment = self._study_moment(start, span, stays, inside)
            views = [
                _pick(rng, profile.views) for _ in range(_pick(rng, profile.images_per_study))
            ]
            studies.append((self.ids.draw(*_STUDY_RANGE), moment, views))
        studies.sort(key=lambda s: s[0])
        written = []
        for study_id, moment, views in studies:
            self.counts["studies"] += 1
            link = linked_stay(moment, stays)
            in_stay = link is not None
            if "AP" in views:
                description = "CHEST (PORTABLE AP)"
            elif "PA" in views:
                description = rng.choice(_STUDY_DESCRIPTIONS[:1] * 4 + _STUDY_DESCRIPTIONS[2:3])
            else:
                description = rng.choice(_STUDY_DESCRIPTIONS)
            noise = rng.choice((-1, 1)) if moment.microsecond and rng.random() < 0.3 else 0
            date_text, time_text = int(moment.strftime("%Y%m%d")), study_time_text(moment, noise)
            images = sorted((self.ids.dicom(), view) for view in views)
            for dicom_id, view in images:
                index = rng.randrange(len(self.pool))
                frontal = view in FRONTAL_VIEWS
                orientation = ("Erect" if view in ("PA", "LATERAL") else "Recumbent") \
                    if rng.random() < 0.6 else ""
                self.tables["metadata"].write((
                    dicom_id, subject_id, study_id, description, view, self.pool[index].height,
                    self.pool[index].width, date_text, time_text,
                    description if description and rng.random() < 0.9 else "",
                    _VIEW_CODE_MEANING[view], orientation,
                ))
                self.counts["frontal_images"] += frontal
                self.counts["frontal_in_stay"] += frontal and in_stay
                if frontal and link is not None:
                    self.answer.append((dicom_id, subject_id, study_id, link.stay_id))
                self.images.append(_Image(
                    dicom_id, schema.image_relpath(subject_id, study_id, dicom_id), index,
                    frontal and in_stay,
                ))
                written.append((dicom_id, study_id))
            self._chexpert(subject_id, study_id)
        return written

    def _chexpert(self, subject_id: int, study_id: int) -> None:
        rng = self.rng
        if rng.random() < 0.07:
            self.counts["studies_without_chexpert"] += 1
            return
        labels = dict.fromkeys(schema.CHEXPERT_LABELS, "")
        if rng.random() < 0.3:
            labels["No Finding"] = "1.0"
            if rng.random() < 0.3:
                labels["Support Devices"] = "1.0"
        else:
            for label, (p_pos, p_neg, p_unc) in _CHEXPERT_PROBS.items():
                draw = rng.random()
                if draw < p_pos:
                    labels[label] = "1.0"
                elif draw < p_pos + p_neg:
                    labels[label] = "0.0"
                elif draw < p_pos + p_neg + p_unc:
                    labels[label] = "-1.0"
            if "1.0" not in labels.values() and rng.random() < 0.8:
                labels["No Finding"] = "1.0"
        self.tables["chexpert"].write((subject_id, study_id, *labels.values()))


def _root_dirs(output_dir: str) -> dict[str, str]:
    return {root: storage.join(output_dir, sub) for root, sub in _ROOT_SUBDIRS.items()}


def _validate(n_patients: int, image_height: int, image_width: int, image_pool: int,
              faults: int, split_missing: int = 0) -> None:
    capacity = _SUBJECT_RANGE[1] - _SUBJECT_RANGE[0] + 1
    if not 1 <= n_patients <= capacity:
        raise ValueError(f"n_patients={n_patients}: must be between 1 and {capacity}")
    if image_height < 16 or image_width < 16:
        raise ValueError(
            f"image size {image_height}x{image_width}: image_height and image_width must be >= 16"
        )
    if image_pool < 1:
        raise ValueError(f"image_pool={image_pool}: must be >= 1")
    if faults < 0:
        raise ValueError(f"faults={faults}: must be >= 0")
    if split_missing < 0:
        raise ValueError(f"split_missing={split_missing}: must be >= 0")


ANSWER_SUBDIR = "answer"
ANSWER_COLUMNS = ("dicom_id", "subject_id", "study_id", "stay_id")


def generate(
    output_dir: str,
    *,
    n_patients: int = 200,
    seed: int = 0,
    image_height: int = 3056,
    image_width: int = 2544,
    image_pool: int = 48,
    faults: int = 0,
    radiograph_dir: Optional[str] = None,
    scale: Optional[str | float] = None,
    images: bool = True,
    split_missing: int = 0,
) -> GeneratedDataset:
    """Writes a synthetic MIMIC-IV / MIMIC-IV-ED / MIMIC-CXR-JPG dataset under `output_dir`.

    Also writes the expected default cohort beside it, computed from the generator's own
    datetimes: `output_dir/answer/cohort.csv.gz` and `output_dir/answer/summary.json`.

    Args:
        output_dir: local directory or gs:// URI; the three roots are created beneath it.
        n_patients: number of patients (each with 1-4 ED stays and ~6 images on average);
            ignored when `scale` is given.
        seed: the random seed; equal arguments give byte-identical CSVs.
        image_height: JPEG height in pixels (some pool images are landscape or shorter).
        image_width: JPEG width in pixels.
        image_pool: number of distinct encoded JPEGs whose bytes every image reuses.
        faults: number of frontal in-stay images made into each fault kind (missing, empty,
            truncated, not an image).
        radiograph_dir: folder of seed radiograph PNGs (default: the two NIH ChestX-ray14 PNGs
            bundled in synthetic/radiographs/).
        scale: "mimic" for MIMIC's published row counts (`MIMIC_ROW_COUNTS`, within ~2%), or a
            fraction of them (0.01); None for the small `n_patients` dataset.
        images: False writes every table but no JPEG (join-only runs); the CSVs are the same.
        split_missing: subjects with a linked frontal image left out of the split table (the
            first ones by subject_id); every other file is unchanged.

    Returns:
        The three root directories, counts, the planted faults and the answer's directory.

    Raises:
        ValueError: bad arguments, or more faults asked for than frontal in-stay images exist.
        FileNotFoundError: no seed radiographs.
    """
    plan = plan_scale(scale) if scale is not None else None
    if plan is not None:
        n_patients = plan.n_patients
    _validate(n_patients, image_height, image_width, image_pool, faults, split_missing)
    started = time.monotonic()
    roots = _root_dirs(output_dir)
    if images:
        pool = encode_pool(
            load_radiographs(radiograph_dir or DEFAULT_RADIOGRAPH_DIR), image_height,
            image_width, image_pool, seed,
        )
        logging.info("encoded %d pool images in %.1f s", len(pool), time.monotonic() - started)
    else:
        pool = pool_without_pixels(image_height, image_width, image_pool, seed)

    rng = random.Random(seed)
    subject_ids = sorted(rng.sample(range(_SUBJECT_RANGE[0], _SUBJECT_RANGE[1] + 1), n_patients))
    if plan is None:
        has = [(True, True)] * n_patients
    else:
        # Groups interleave over the whole id range, as in MIMIC (no block of CXR subjects).
        has = [_GROUP_HAS[name] for name, count in plan.groups.items() for _ in range(count)]
        rng.shuffle(has)
    tables = {
        name: _CsvGz(storage.join(roots[spec.root], spec.relpath), spec.columns)
        for name, spec in schema.TABLES.items()
    }
    answer_dir = storage.join(output_dir, ANSWER_SUBDIR)
    cohort = _CsvGz(storage.join(answer_dir, "cohort.csv.gz"), ANSWER_COLUMNS)
    try:
        profile = _SMALL_PROFILE if plan is None else _MIMIC_PROFILE
        generator = _Generator(rng, tables, pool, profile, split_missing)
        for index, (subject_id, (ed, cxr)) in enumerate(zip(subject_ids, has)):
            generator.patient(subject_id, ed=ed, cxr=cxr)
            if index % 50_000 == 49_999:
                logging.info("%d of %d patients in %.1f s", index + 1, n_patients,
                             time.monotonic() - started)
        for table in tables.values():
            table.close()
        for row in sorted(generator.answer):
            cohort.write(row)
        cohort.close()
        planted = _choose_faults(rng, generator.images, faults)
        logging.info("tables written in %.1f s", time.monotonic() - started)
        if images:
            _write_images(roots[schema.MIMIC_CXR], generator.images, pool, planted)
            logging.info("images written in %.1f s", time.monotonic() - started)
    except BaseException:
        for table in (*tables.values(), cohort):
            table.discard()
        raise
    # The tables are published last: their presence means the images are in place.
    for table in tables.values():
        table.commit()

    counts = {name: tables[name].rows for name in ("patients", "admissions")}
    counts["stays"] = tables["edstays"].rows
    counts.update({n: tables[n].rows for n in ("triage", "vitalsign", "medrecon", "diagnosis")})
    counts.update(generator.counts)
    counts["images"] = len(generator.images)
    counts["linked_patients"] = len({row[1] for row in generator.answer})
    counts["pool_images"] = len(pool)
    counts["images_written"] = int(images)
    by_kind = {
        kind: tuple(sorted(d for d, k in planted.items() if k == kind)) for kind in FAULT_KINDS
    }
    counts.update({f"faults_{kind}": len(ids) for kind, ids in by_kind.items()})
    cohort.commit()
    # Written only when asked for, so that the summary of every other run stays the same.
    missing = ({"split_missing": split_missing, "not_in_split": generator.not_in_split}
               if split_missing else {})
    _write_summary(answer_dir, {
        **missing,
        "rule": "one row per frontal image (ViewPosition AP or PA) whose study datetime lies in "
        "[intime, outtime] of an ED stay of the same subject; of several, the latest intime, "
        "ties to the larger stay_id",
        "cohort": "cohort.csv.gz: dicom_id, subject_id, study_id, stay_id; sorted by dicom_id",
        "faults_note": "planted faults are linked images, so they are in cohort.csv.gz; the "
        "pipeline makes them dead letters (failed records), not cohort losses",
        "arguments": {
            "scale": scale, "n_patients": n_patients, "seed": seed, "images": images,
            "image_height": image_height, "image_width": image_width,
            "image_pool": image_pool, "faults": faults,
        },
        "linked_images": len(generator.answer),
        "linked_patients": counts["linked_patients"],
        "linked_stays": len({row[3] for row in generator.answer}),
        "images": counts["images"],
        "frontal_images": counts["frontal_images"],
        "studies": counts["studies"],
        "ed_subjects": counts["ed_subjects"],
        "cxr_subjects": counts["cxr_subjects"],
        "rows": {name: table.rows for name, table in tables.items()},
        "faults": {kind: list(ids) for kind, ids in by_kind.items()},
    })
    logging.info("generated %d images in %.1f s", counts["images"], time.monotonic() - started)
    return GeneratedDataset(
        mimic_iv_dir=roots[schema.MIMIC_IV],
        mimic_ed_dir=roots[schema.MIMIC_ED],
        mimic_cxr_dir=roots[schema.MIMIC_CXR],
        counts=counts,
        faults=by_kind,
        answer_dir=answer_dir,
        not_in_split=tuple(generator.not_in_split),
    )


def _write_summary(answer_dir: str, summary: dict[str, Any]) -> None:
    """summary.json, written atomically."""
    storage.write_bytes(storage.join(answer_dir, "summary.json"),
                        json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n")


def _choose_faults(rng: random.Random, images: Sequence[_Image], faults: int) -> dict[str, str]:
    """dicom_id -> fault kind, `faults` of each kind among the frontal in-stay images."""
    if not faults:
        return {}
    eligible = [image.dicom_id for image in images if image.frontal_in_stay]
    needed = faults * len(FAULT_KINDS)
    if needed > len(eligible):
        raise ValueError(
            f"faults={faults} needs {needed} frontal images inside an ED stay, but only "
            f"{len(eligible)} were generated; raise n_patients or lower faults"
        )
    chosen = rng.sample(eligible, needed)
    return {dicom_id: FAULT_KINDS[i // faults] for i, dicom_id in enumerate(chosen)}


def _write_images(
    cxr_root: str, images: Sequence[_Image], pool: Sequence[EncodedImage], planted: dict[str, str]
) -> None:
    writer = ImageTreeWriter(cxr_root)
    for image in images:
        kind = planted.get(image.dicom_id)
        if kind is None:
            writer.write_pooled(image.relpath, image.pool_index, pool[image.pool_index])
        elif kind == FAULT_MISSING:
            writer.remove(image.relpath)  # a previous run may have left a file there
        else:
            writer.write(image.relpath, fault_bytes(kind, pool[image.pool_index]))
    writer.flush()


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m synthetic.mimic",
        description="Write a synthetic MIMIC-IV / MIMIC-IV-ED / MIMIC-CXR-JPG dataset in the "
        "real PhysioNet layout (local or gs://).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", required=True,
                        help="local directory or gs:// URI; mimic-iv/, mimic-iv-ed/ and "
                        "mimic-cxr-jpg/ are written beneath it")
    parser.add_argument("--n_patients", type=int, default=None,
                        help="number of patients (~6 images and ~1.9 cohort records each); "
                        "200 unless --scale is given")
    parser.add_argument("--scale", default=None,
                        help="'mimic': MIMIC's published size (364,627 patients, 425,087 ED "
                        "stays, 377,110 images, ...; ~4 min for the tables), or a fraction of "
                        "it, e.g. 0.01; replaces --n_patients")
    parser.add_argument("--no_images", action="store_true",
                        help="write every table (identical CSVs) but no JPEG: for join-only runs")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; equal flags give byte-identical CSVs")
    parser.add_argument("--image_height", type=int, default=3056, help="JPEG height in pixels")
    parser.add_argument("--image_width", type=int, default=2544, help="JPEG width in pixels")
    parser.add_argument("--image_pool", type=int, default=48,
                        help="distinct encoded JPEGs whose bytes all images reuse")
    parser.add_argument("--faults", type=int, default=0,
                        help="frontal in-stay images made into each fault kind: missing, "
                        "empty, truncated, not an image")
    parser.add_argument("--split_missing", type=int, default=0,
                        help="subjects with a linked frontal image left out of the split "
                        "table (for --split official's rule for absent patients)")
    parser.add_argument("--radiograph_dir", default=None,
                        help="folder of seed radiograph PNGs for the image texture (default: "
                        "the two NIH ChestX-ray14 PNGs bundled in synthetic/radiographs/)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> GeneratedDataset:
    """The CLI: generates the dataset and prints where it went and what it holds."""
    args = _parse_args(argv)
    if args.scale is not None and args.n_patients is not None:
        sys.exit("error: give --n_patients or --scale, not both")
    try:
        result = generate(
            args.output_dir, n_patients=200 if args.n_patients is None else args.n_patients,
            seed=args.seed, image_height=args.image_height, image_width=args.image_width,
            image_pool=args.image_pool, faults=args.faults, radiograph_dir=args.radiograph_dir,
            scale=args.scale, images=not args.no_images, split_missing=args.split_missing,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"--mimic_iv_dir  {result.mimic_iv_dir}")
    print(f"--mimic_ed_dir  {result.mimic_ed_dir}")
    print(f"--mimic_cxr_dir {result.mimic_cxr_dir}")
    print(f"answer          {result.answer_dir}/cohort.csv.gz, summary.json")
    print(" ".join(f"{key}={value}" for key, value in result.counts.items()))
    for kind, dicom_ids in result.faults.items():
        if dicom_ids:
            print(f"fault {kind}: {' '.join(dicom_ids)}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
