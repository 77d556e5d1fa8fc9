"""Progress of long local runs: records finished, rate, and ETA, logged every few seconds.

On Dataflow the same figures are the `progress` counters in the job's metrics.

A ParDo that waits on a side input is not fused with its producer: put after the image stage,
an ETA side input would hold every reference back and log nothing until the end. So the total
enters at the head of the heavy path (`Progress.total`, where the records wait for the join
anyway) and is kept per process for the `Progress.log` step at its tail, fused with it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

_log = logging.getLogger(__name__)


class _RunProgress:
    """One run's finished records across all threads of one worker process."""

    def __init__(self) -> None:
        self.done = 0
        self.total: Optional[int] = None
        self.started: Optional[float] = None
        self.last_log = 0.0


_LOCK = threading.Lock()
_RUNS: dict[str, _RunProgress] = {}


def _run(run_id: str) -> _RunProgress:
    return _RUNS.setdefault(run_id, _RunProgress())


def progress_line(done: int, elapsed: float, total: Optional[int]) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"progress: {done} records preprocessed, {rate:.1f} records/s"
    if total and rate > 0:
        left = max(total - done, 0)
        line += f", {done / total:.0%} of {total}, ETA {left / rate:.0f} s"
    return line


class _NoteTotalFn(beam.DoFn):
    def __init__(self, run_id: str) -> None:
        self._run_id = run_id

    def process(self, element, total):
        with _LOCK:
            _run(self._run_id).total = total
        yield element


class _LogProgressFn(beam.DoFn):
    def __init__(self, run_id: str, interval_s: float) -> None:
        self._run_id = run_id
        self._interval_s = interval_s
        self._records = Metrics.counter("progress", "records_preprocessed")

    def process(self, element):
        self._records.inc()
        now = time.monotonic()
        with _LOCK:
            run = _run(self._run_id)
            first = run.started is None
            if first:  # no rate yet: the first line comes one interval later
                run.started = run.last_log = now
            run.done += 1
            due = not first and now - run.last_log >= self._interval_s
            if due:
                run.last_log = now
                line = progress_line(run.done, now - run.started, run.total)
        if due:
            _log.info(line)
        yield element


class Progress:
    """The two pass-through steps of one run's progress log.

        progress = Progress()
        heavy = records | "NoteTotal" >> progress.total(record_count) | ...stages...
        done = heavy | "LogProgress" >> progress.log()

    `total(count)` takes a singleton PCollection (the number of records) for the ETA;
    `log()` counts what passes and logs the rate every `interval_s`.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self._run_id = uuid.uuid4().hex
        self._interval_s = interval_s

    def total(self, count: beam.PCollection) -> beam.PTransform:
        return beam.ParDo(_NoteTotalFn(self._run_id), total=beam.pvalue.AsSingleton(count))

    def log(self) -> beam.PTransform:
        return beam.ParDo(_LogProgressFn(self._run_id, self._interval_s))
