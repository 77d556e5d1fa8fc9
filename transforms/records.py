"""The records that flow between stages, defined once.

`CohortRecord` is what `JoinCohort` emits: one frontal image linked to its ED stay, with the
raw (unparsed, string) facts known at the study time. `DeadLetter` is a record that could not be
processed. Reasons are stable snake_case constants, counted per reason and written to `failed/`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

# Why a metadata image is not a record (counted, not dead letters).
DROP_NOT_FRONTAL = "not_frontal"
DROP_NO_ED_STAY = "no_ed_stay"
DROP_NO_TRIAGE = "no_triage"  # only with --aggressive_filtering
DROP_NO_CHIEF_COMPLAINT = "no_chief_complaint"  # only with --aggressive_filtering
DROP_NOT_IN_LIMIT = "not_in_limit"  # only with --limit: the patient was not chosen
DROP_REASONS = (DROP_NOT_FRONTAL, DROP_NO_ED_STAY, DROP_NO_TRIAGE, DROP_NO_CHIEF_COMPLAINT,
                DROP_NOT_IN_LIMIT)

# Why a record failed processing (dead letters).
FAIL_IMAGE_MISSING = "image_missing"
FAIL_IMAGE_EMPTY = "image_empty"
FAIL_IMAGE_TRUNCATED = "image_truncated"
FAIL_IMAGE_NOT_AN_IMAGE = "image_not_an_image"
FAIL_IMAGE_UNREADABLE = "image_unreadable"
FAIL_BAD_TIMESTAMP = "bad_timestamp"
FAIL_TEXT = "text_failed"
FAIL_REASONS = (
    FAIL_IMAGE_MISSING,
    FAIL_IMAGE_EMPTY,
    FAIL_IMAGE_TRUNCATED,
    FAIL_IMAGE_NOT_AN_IMAGE,
    FAIL_IMAGE_UNREADABLE,
    FAIL_BAD_TIMESTAMP,
    FAIL_TEXT,
)

# Output tags. A stage with several outputs returns a dict of PCollections keyed by these
# (and `ledger.LEDGER_TAG`); a stage with one output returns the PCollection itself.
SAMPLES_TAG = "samples"  # sample dicts on their way through the text and image stages
DEAD_LETTER_TAG = "dead_letter"  # records.DeadLetter of every stage that has any
DROPPED_TAG = "dropped"  # reasons of images that are not records (the join)


@dataclasses.dataclass(frozen=True)
class CohortRecord:
    """One frontal image linked to an ED stay, with what was known at the study time.

    Values from the CSVs stay raw strings (None when blank): parsing and plausibility checks
    belong to the feature stage, which flags them in a mask instead of crashing.
    """

    record_id: str  # dicom_id
    subject_id: int
    study_id: int
    stay_id: int
    hadm_id: Optional[int]
    view_position: str
    study_datetime: str  # ISO 8601, e.g. "2180-07-23T21:30:14.531000"
    image_path: str  # full path or gs:// URI of the JPEG
    patient: Optional[dict[str, Optional[str]]]  # gender, anchor_age, anchor_year, anchor_year_group
    stay: dict[str, Optional[str]]  # intime, outtime, gender, race, arrival_transport
    triage: Optional[dict[str, Optional[str]]]  # the triage row's columns, None without one
    vitals: tuple[dict[str, Optional[str]], ...]  # vitalsign rows with charttime <= study time
    medications: tuple[str, ...]  # medrecon names with charttime <= study time, sorted
    prior_admissions: int  # admissions of this subject discharged before the study time
    labels: tuple[float, ...]  # 14 CheXpert labels in schema.CHEXPERT_LABELS order, NaN missing


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A record that could not be processed: its ids, the stage and a stable reason."""

    record_id: str
    subject_id: int
    study_id: int
    stage: str
    reason: str
    detail: str = ""  # never patient text: file paths, exception types, sizes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def of(cls, record: CohortRecord, stage: str, reason: str, detail: str = "") -> "DeadLetter":
        return cls(record.record_id, record.subject_id, record.study_id, stage, reason, detail)


def sample_from(record: CohortRecord) -> dict[str, Any]:
    """Start the per-record sample dict that the preprocessing stages fill in."""
    return {"cohort": record}
