"""Progress logging of long local runs: the line a user reads, and the pass-through transform."""

import logging

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.progress import LogProgress, progress_line


def test_progress_line_gives_rate_share_and_eta():
    line = progress_line(done=250, elapsed=10.0, total=1000)
    assert "250 records preprocessed" in line
    assert "25.0 records/s" in line
    assert "25% of 1000" in line
    assert "ETA 30 s" in line


def test_progress_line_without_total_has_no_eta():
    line = progress_line(done=5, elapsed=2.0, total=None)
    assert "2.5 records/s" in line and "ETA" not in line


def test_log_progress_passes_every_element_and_logs_the_eta(caplog):
    caplog.set_level(logging.INFO, logger="transforms.progress")
    with TestPipeline(runner="FnApiRunner") as p:
        items = p | beam.Create(list(range(40)))
        total = items | beam.combiners.Count.Globally()
        out = items | LogProgress(interval_s=0.0, total=total)
        assert_that(out, equal_to(list(range(40))))
    lines = [r.getMessage() for r in caplog.records if r.name == "transforms.progress"]
    assert lines, "no progress line was logged"
    assert all("of 40" in line and "ETA" in line for line in lines)
