"""Progress logging of long local runs: the line a user reads, and the pass-through steps."""

import logging
import re

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.progress import Progress, progress_line


def test_progress_line_gives_rate_share_and_eta():
    line = progress_line(done=250, elapsed=10.0, total=1000)
    assert "250 records preprocessed" in line
    assert "25.0 records/s" in line
    assert "25% of 1000" in line
    assert "ETA 30 s" in line


def test_progress_line_without_total_has_no_eta():
    line = progress_line(done=5, elapsed=2.0, total=None)
    assert "2.5 records/s" in line and "ETA" not in line


_EVENTS: list = []  # module level: Beam pickles DoFns, a closure's list would be a copy


def _work(x):
    _EVENTS.append("work")
    return x


def test_progress_logs_while_the_heavy_path_runs(caplog):
    """Lines come out interleaved with the work (the log step is fused with it), each with
    the run's own total and a count that starts from this run."""
    caplog.set_level(logging.INFO, logger="transforms.progress")
    events = _EVENTS

    class _Events(logging.Handler):
        def emit(self, record):
            if record.name == "transforms.progress":
                events.append(record.getMessage())

    handler = _Events()
    logging.getLogger("transforms.progress").addHandler(handler)
    try:
        for _ in range(2):  # a second run in the same process counts from zero again
            events.clear()
            with BeamTestPipeline(runner="FnApiRunner") as p:
                items = p | beam.Create(list(range(40))) | beam.Reshuffle()
                progress = Progress(interval_s=0.0)
                total = items | beam.combiners.Count.Globally()
                out = (items | "Total" >> progress.total(total) | beam.Map(_work)
                       | "Log" >> progress.log())
                assert_that(out, equal_to(list(range(40))))
            lines = [e for e in events if e != "work"]
            assert lines and all("of 40" in line and "ETA" in line for line in lines)
            assert int(re.search(r"(\d+) records", lines[-1]).group(1)) == 40
            # Not all the work first and all the lines after: the log step is fused.
            assert events.index(lines[0]) < len(events) - events[::-1].index("work") - 1
    finally:
        logging.getLogger("transforms.progress").removeHandler(handler)
