"""`--limit`: keep a deterministic subset of whole patients, about N records in all."""

from __future__ import annotations

import hashlib

import apache_beam as beam

from transforms.records import CohortRecord


def patient_draw(subject_id: int, seed: int) -> float:
    """A stable uniform draw in [0, 1) per patient (hashlib: the same on every worker)."""
    digest = hashlib.sha256(f"limit:{seed}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def keep_patient(record: CohortRecord, total: int, limit: int, seed: int) -> bool:
    if total <= limit:
        return True
    return patient_draw(record.subject_id, seed) < limit / total


class LimitPatients(beam.PTransform):
    """Keeps the records of a hash-chosen subset of patients, about `limit` records.

    Input: CohortRecords. Output: the CohortRecords of the kept patients (whole patients, so
    the split stays patient-level). The record count reaches the filter as a side input.
    """

    def __init__(self, limit: int, seed: int) -> None:
        super().__init__()
        self._limit = limit
        self._seed = seed

    def expand(self, records):
        total = records | "CountRecords" >> beam.combiners.Count.Globally()
        return records | "KeepChosenPatients" >> beam.Filter(
            keep_patient, beam.pvalue.AsSingleton(total), self._limit, self._seed
        )
