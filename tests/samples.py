"""Preprocessed samples as the text and image stages leave them, for the write-path tests that
need records without running MiniLM and the JPEG decoder."""

from __future__ import annotations

import numpy as np

from tests.test_splits import labels_with, make_cohort
from transforms.records import CohortRecord

IMAGE = 16
FEATURES = ("heartrate", "o2sat", "age", "pain")


def make_sample(record: CohortRecord) -> dict:
    """The sample the image and text stages leave: numpy arrays, a tiny image."""
    n = int(record.record_id.split("-")[1])
    rng = np.random.default_rng(n)
    length = 4 + n % 6
    return {
        "cohort": record,
        "image": rng.integers(0, 256, (IMAGE, IMAGE), dtype=np.uint8),
        "image_box": np.array([2, 0, IMAGE - 4, IMAGE], dtype=np.int32),
        "enhanced_note": f"Note of record {n}.",
        "text_input_ids": rng.integers(1, 30000, length).astype(np.int32),
        "attention_segments": [("special", 0, 1), ("triage", 1, length - 1),
                               ("special", length - 1, length)],
        "clinical_data": np.arange(len(FEATURES), dtype=np.float32) + n,
        "clinical_mask": np.array([True, n % 2 == 0, True, False]),
        "retrieved_knowledge": [f"kb-{n % 5}"],
    }


def make_cohort_records(n_patients: int = 24) -> list[CohortRecord]:
    records, n = [], 0
    for i in range(n_patients):
        for k in range(1 + i % 3):
            labels = labels_with(Edema=1.0, Atelectasis=-1.0) if i % 3 == 0 else None
            records.append(make_cohort(n, 10_000 + i, view="PA" if (i + k) % 3 == 0 else "AP",
                                       triage=i % 4 != 0, vitals=i % 2, labels=labels,
                                       hadm_id=None if n % 5 == 0 else 1))
            n += 1
    return records
