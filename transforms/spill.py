"""Spill each processed sample to a temporary file and carry on with a small reference.

Beam's local runner holds in memory every element that crosses a GroupByKey or waits for a
side input (measured: 2,000 records of 1 MiB through one GroupByKey peaked at 11.6 GB; the
same records on a fused path, 165 MB). So the heavy sample never crosses such a point: right
after preprocessing, on the fused path, `SpillSamples` writes it as `encode_record` bytes to
`{output_dir}/_tmp/records/` and emits a `SpillRef` of a few hundred bytes. The split, the chunk
layout and the statistics move only refs; the chunk writer reads the records back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import storage
from transforms.chunks import record
from transforms.chunks.format import encode_record
from transforms.ledger import LEDGER_TAG, Tally
from transforms.records import CohortRecord
from transforms.splits import record_stratum

TMP_DIR = "_tmp"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")


@dataclasses.dataclass(frozen=True)
class SpillRef:
    """A spilled record: where its bytes are and what the split and the metadata need."""

    record_id: str
    subject_id: int
    study_id: int
    stratum: str  # splits.record_stratum
    labels: tuple[float, ...]  # 14 CheXpert labels, NaN missing
    path: str  # the encode_record bytes (split "")
    nbytes: int
    # Facts the dataset report needs (`record.record_facts`: labels above, these, one per
    # summarised field), carried here so no heavy payload is shuffled for them.
    note_tokens: int = 0  # tokens of the enhanced note (after truncation)
    clinical_missing: tuple[int, ...] = ()  # indices of the clinical features that are missing


def tmp_dir(output_dir: str) -> str:
    """Where the run keeps its temporary files (removed once metadata.json is written)."""
    return storage.join(output_dir, TMP_DIR)


def spill_path(output_dir: str, record_id: str) -> str:
    """The temporary file of one record. A function of the record id alone, so a retried
    bundle rewrites the same file instead of leaving a second one."""
    name = record_id if _SAFE_NAME.match(record_id) else "h-" + hashlib.sha256(
        record_id.encode()
    ).hexdigest()
    return storage.join(tmp_dir(output_dir), "records", f"{name}.pt")


def to_chunk_record(sample: dict, split: str) -> dict:
    """The chunk format's per-record dict (torch tensors) of a preprocessed sample.

    Each field (`record.FIELDS`) comes from the stage that fills it: the `CohortRecord`'s
    attribute of its name, the sample's key of its name (the image and text stages' numpy
    arrays and lists), or `split`.

    Args:
        sample: `{"cohort": CohortRecord, ...}` with a key per image and text field.
        split: the record's split ("" while it is not known yet).

    Raises:
        KeyError: a stage's key is missing from the sample.
    """
    cohort: CohortRecord = sample["cohort"]

    def stage_value(field: record.Field) -> Any:
        if field.stage == "cohort":
            return getattr(cohort, field.name)
        if field.stage == "split":
            return split
        return sample[field.name]

    return record.from_stages(stage_value)


REFS_TAG = "refs"
SPILLED = "spill/records_spilled"


class _SpillFn(beam.DoFn):
    def __init__(self, output_dir: str) -> None:
        self._output_dir = output_dir

    def setup(self) -> None:
        self._tally = Tally([SPILLED])
        self._bytes = Metrics.counter("spill", "bytes_spilled")

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, sample: dict) -> Iterator[SpillRef]:
        cohort: CohortRecord = sample["cohort"]
        chunk_record = to_chunk_record(sample, split="")
        data = encode_record(chunk_record)
        path = spill_path(self._output_dir, cohort.record_id)
        storage.write_bytes(path, data)
        self._tally.inc(SPILLED)
        self._bytes.inc(len(data))
        yield SpillRef(
            record_id=cohort.record_id,
            subject_id=int(cohort.subject_id),
            study_id=int(cohort.study_id),
            stratum=record_stratum(cohort),
            path=path,
            nbytes=len(data),
            **record.record_facts(chunk_record),
        )


class SpillSamples(beam.PTransform):
    """Writes each preprocessed sample to a temporary file; emits a small `SpillRef`.

    Input: preprocessed sample dicts (see `to_chunk_record`), on the fused path right after
        the last preprocessing stage.
    Output: a dict: `SpillRef`s, one per sample (`result[REFS_TAG]`), and the
        records spilled (`result[LEDGER_TAG]`, see `transforms.ledger`). No dead letters: a
        sample the chunk format rejects (wrong dtype or shape) is a programming error and
        fails the pipeline (ValueError), and storage errors are left to the runner's retries (the write is idempotent).

    Args:
        output_dir: the pipeline's output dir; files go under `{output_dir}/_tmp/records/`.
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self._output_dir = output_dir.rstrip("/")

    def expand(self, samples: beam.PCollection) -> dict[str, beam.PCollection]:
        out = samples | "SpillRecord" >> beam.ParDo(_SpillFn(self._output_dir)).with_outputs(
            LEDGER_TAG, main=REFS_TAG)
        return {REFS_TAG: out[REFS_TAG], LEDGER_TAG: out[LEDGER_TAG]}
