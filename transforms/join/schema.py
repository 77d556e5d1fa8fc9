"""The input tables: where each lives, its real PhysioNet columns, and which ones we need.

Column lists follow the published files' header order (MIMIC-IV 3.1, MIMIC-IV-ED 2.2,
MIMIC-CXR-JPG 2.1.0). `required` is what the pipeline reads; a file lacking one of them fails
fast, before any work, with a message naming the file and the column.
"""

from __future__ import annotations

import dataclasses

MIMIC_IV = "mimic_iv_dir"
MIMIC_ED = "mimic_ed_dir"
MIMIC_CXR = "mimic_cxr_dir"

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One input table: its root flag, path under that root, header and needed columns."""

    name: str
    root: str
    relpath: str
    columns: tuple[str, ...]
    required: tuple[str, ...]
    optional: bool = False


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "patients",
            MIMIC_IV,
            "hosp/patients.csv.gz",
            ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"),
            ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group"),
        ),
        TableSpec(
            "admissions",
            MIMIC_IV,
            "hosp/admissions.csv.gz",
            (
                "subject_id", "hadm_id", "admittime", "dischtime", "deathtime",
                "admission_type", "admit_provider_id", "admission_location",
                "discharge_location", "insurance", "language", "marital_status", "race",
                "edregtime", "edouttime", "hospital_expire_flag",
            ),
            ("subject_id", "hadm_id", "admittime", "dischtime"),
        ),
        TableSpec(
            "edstays",
            MIMIC_ED,
            "ed/edstays.csv.gz",
            (
                "subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender", "race",
                "arrival_transport", "disposition",
            ),
            ("subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender", "race",
             "arrival_transport"),
        ),
        TableSpec(
            "triage",
            MIMIC_ED,
            "ed/triage.csv.gz",
            (
                "subject_id", "stay_id", "temperature", "heartrate", "resprate", "o2sat",
                "sbp", "dbp", "pain", "acuity", "chiefcomplaint",
            ),
            (
                "subject_id", "stay_id", "temperature", "heartrate", "resprate", "o2sat",
                "sbp", "dbp", "pain", "acuity", "chiefcomplaint",
            ),
        ),
        TableSpec(
            "vitalsign",
            MIMIC_ED,
            "ed/vitalsign.csv.gz",
            (
                "subject_id", "stay_id", "charttime", "temperature", "heartrate", "resprate",
                "o2sat", "sbp", "dbp", "rhythm", "pain",
            ),
            (
                "subject_id", "stay_id", "charttime", "temperature", "heartrate", "resprate",
                "o2sat", "sbp", "dbp", "pain",
            ),
        ),
        TableSpec(
            "medrecon",
            MIMIC_ED,
            "ed/medrecon.csv.gz",
            (
                "subject_id", "stay_id", "charttime", "name", "gsn", "ndc", "etc_rn",
                "etccode", "etcdescription",
            ),
            ("subject_id", "stay_id", "charttime", "name"),
        ),
        # The ED discharge diagnosis is an outcome: generated for realism, never read as input.
        TableSpec(
            "diagnosis",
            MIMIC_ED,
            "ed/diagnosis.csv.gz",
            ("subject_id", "stay_id", "seq_num", "icd_code", "icd_version", "icd_title"),
            (),
            optional=True,
        ),
        TableSpec(
            "metadata",
            MIMIC_CXR,
            "mimic-cxr-2.0.0-metadata.csv.gz",
            (
                "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning",
            ),
            ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"),
        ),
        TableSpec(
            "chexpert",
            MIMIC_CXR,
            "mimic-cxr-2.0.0-chexpert.csv.gz",
            ("subject_id", "study_id") + CHEXPERT_LABELS,
            ("subject_id", "study_id") + CHEXPERT_LABELS,
        ),
        TableSpec(
            "split",
            MIMIC_CXR,
            "mimic-cxr-2.0.0-split.csv.gz",
            ("dicom_id", "study_id", "subject_id", "split"),
            ("dicom_id", "study_id", "subject_id", "split"),
        ),
    )
}

# Tables the pipeline reads (diagnosis is an outcome and is never read).
INPUT_TABLES: tuple[str, ...] = (
    "patients", "admissions", "edstays", "triage", "vitalsign", "medrecon", "metadata",
    "chexpert",
)


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """The MIMIC-CXR-JPG path of one image, relative to the image root."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}.jpg"
