"""Progress of long local runs: records finished, rate, and ETA, logged every few seconds.

On Dataflow the same figures are the `progress` counters in the job's metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

_log = logging.getLogger(__name__)


class _ProcessProgress:
    """Counts finished records across all threads of one worker process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.started: Optional[float] = None
        self.last_log = 0.0


_PROGRESS = _ProcessProgress()


def progress_line(done: int, elapsed: float, total: Optional[int]) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"progress: {done} records preprocessed, {rate:.1f} records/s"
    if total and rate > 0:
        left = max(total - done, 0)
        line += f", {done / total:.0%} of {total}, ETA {left / rate:.0f} s"
    return line


class _LogProgressFn(beam.DoFn):
    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._records = Metrics.counter("progress", "records_preprocessed")

    def process(self, element, total=None):
        self._records.inc()
        now = time.monotonic()
        with _PROGRESS.lock:
            first = _PROGRESS.started is None
            if first:  # no rate yet: the first line comes one interval later
                _PROGRESS.started = _PROGRESS.last_log = now
            _PROGRESS.done += 1
            due = not first and now - _PROGRESS.last_log >= self._interval_s
            if due:
                _PROGRESS.last_log = now
                done, elapsed = _PROGRESS.done, now - _PROGRESS.started
        if due:
            _log.info(progress_line(done, elapsed, total))
        yield element


class LogProgress(beam.PTransform):
    """Passes elements through, counting them and logging the rate every `interval_s`.

    Input and output: any PCollection (the spill references). `total`, when given, is a
    singleton side input (the record count) for the ETA.
    """

    def __init__(self, interval_s: float = 10.0, total=None) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._total = total

    def expand(self, pcoll):
        if self._total is None:
            return pcoll | "CountAndLog" >> beam.ParDo(_LogProgressFn(self._interval_s))
        return pcoll | "CountAndLog" >> beam.ParDo(
            _LogProgressFn(self._interval_s), total=beam.pvalue.AsSingleton(self._total))
