"""The run's ledger: every row and record accounted for, counted where it was emitted.

Beam counters are for people (a DoFn cannot read them, and a runner may drop them). The
ledger is data: each counting DoFn keeps a `Tally`, which increments the Beam counter and, at
the end of the bundle, emits the bundle's counts as `(name, n)` on the `LEDGER_TAG` output.
The counts are summed into a small side input of the step that commits the output, where
`check_conservation` checks the equations of SPEC.md ("Conservation"): each table's rows read
= rows joined + rows set aside by a counted rule; metadata rows = not frontal + bad time + not
in --limit + joined images; joined images = no ED stay (+ aggressive drops) + records; records
= failed + spilled; spilled = written; with --split official, the split table's rows read = rows
that reached the assignment. Counted by the emitter, a count lost in transit breaks
an equation as surely as a lost row, so a lossy run fails with one line and commits nothing.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.errors import RunAborted

LEDGER_TAG = "ledger"
# The share of records that may fail (dead letters) before a run refuses to commit.
DEFAULT_MAX_FAILED_FRACTION = 0.01
# What the commit step counts of its own inputs (they crossed shuffles and side inputs too).
ARRIVED_CHUNK_RECORDS = "arrived/chunk_records"
ARRIVED_SPLIT_RECORDS = "arrived/split_stats_records"
ARRIVED_DEAD_LETTERS = "arrived/dead_letters"
ARRIVED_DROPPED = "arrived/dropped"
ARRIVED_ASSIGNED_RECORDS = "arrived/assigned_records"
ARRIVED_SPLIT_TABLE_ROWS = "arrived/split_table_rows"  # --split official only


class ConservationError(RunAborted):
    """Rows or records were lost between stages, or too many failed: the run must not commit.
    Every message ends with MARK."""


class Tally:
    """One DoFn's counts, as Beam counters and as ledger entries, by full name "namespace/name".

    Call `start()` in `start_bundle`, `inc()` while processing, and `yield from flush()` in
    `finish_bundle` (with `LEDGER_TAG` among the ParDo's outputs). Counts are kept in a dict
    and reach the Beam counters once per bundle: a Beam counter costs a lookup of the metrics
    container per call, and tables are counted row by row.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._counters = {name: Metrics.counter(*name.split("/", 1)) for name in names}
        self._counts: dict[str, int] = dict.fromkeys(self._counters, 0)

    def start(self) -> None:
        self._counts = dict.fromkeys(self._counters, 0)

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def flush(self) -> Iterator[beam.pvalue.TaggedOutput]:
        counts, self._counts = self._counts, dict.fromkeys(self._counters, 0)
        for name, n in sorted(counts.items()):
            if n:
                self._counters[name].inc(n)
                yield beam.pvalue.TaggedOutput(
                    LEDGER_TAG, GlobalWindows.windowed_value((name, n)))


@beam.typehints.with_input_types(tuple[str, int])
@beam.typehints.with_output_types(tuple[str, int])
class SumLedger(beam.PTransform):
    """Flattens ledger outputs and sums them per name: a PCollection of (name, total), to be
    read as `beam.pvalue.AsDict`."""

    def expand(self, ledgers: Sequence[beam.PCollection]) -> beam.PCollection:
        return (
            tuple(ledgers)
            | "FlattenLedger" >> beam.Flatten()
            | "SumPerName" >> beam.CombinePerKey(sum)
        )


def _join_equations(ledger: Mapping[str, int], tables: Sequence[str]) -> list[tuple]:
    """(stage, left name, left value, right names, right value) for the join's equations."""
    get = lambda name: int(ledger.get(name, 0))  # noqa: E731
    equations = []
    for table in tables:
        read = f"tables/{table}_rows"
        if table == "metadata":
            parts = ["cohort/not_frontal", "cohort/bad_timestamp", "cohort/not_in_limit",
                     "join/images_joined"]
        else:
            parts = [f"join/{table}_set_aside", f"join/{table}_joined"]
        equations.append((f"join ({table})", read, get(read), parts, sum(get(p) for p in parts)))
    parts = ["cohort/no_ed_stay", "cohort/no_triage", "cohort/no_chief_complaint",
             "cohort/records"]
    equations.append(("link", "join/images_joined", get("join/images_joined"), parts,
                      sum(get(p) for p in parts)))
    return equations


def check_conservation(
    ledger: Mapping[str, int], tables: Sequence[str], *, committed: bool = True
) -> None:
    """Raises ConservationError naming the first stage whose counts do not add up.

    Args:
        ledger: summed ledger entries, plus the `arrived/...` counts of the commit's inputs.
        tables: the tables the join read (their `tables/<name>_rows` must be present).
        committed: False for --compute_indices_only (only the join and the split are checked).
    """
    get = lambda name: int(ledger.get(name, 0))  # noqa: E731
    equations = _join_equations(ledger, tables)
    equations.append(("split", ARRIVED_ASSIGNED_RECORDS, get(ARRIVED_ASSIGNED_RECORDS),
                      ["cohort/records"], get("cohort/records")))
    if ARRIVED_SPLIT_TABLE_ROWS in ledger:
        equations.append(("split table", "tables/split_rows", get("tables/split_rows"),
                          [ARRIVED_SPLIT_TABLE_ROWS], get(ARRIVED_SPLIT_TABLE_ROWS)))
    if committed:
        dropped = ["cohort/not_frontal", "cohort/not_in_limit", "cohort/no_ed_stay",
                   "cohort/no_triage", "cohort/no_chief_complaint"]
        failed = sorted(name for name in ledger if "/failed/" in name)
        equations += [
            ("preprocess", "cohort/records", get("cohort/records"),
             failed + ["spill/records_spilled"],
             sum(get(n) for n in failed) + get("spill/records_spilled")),
            ("chunks", "spill/records_spilled", get("spill/records_spilled"),
             [ARRIVED_CHUNK_RECORDS], get(ARRIVED_CHUNK_RECORDS)),
            ("split statistics", "spill/records_spilled", get("spill/records_spilled"),
             [ARRIVED_SPLIT_RECORDS], get(ARRIVED_SPLIT_RECORDS)),
            ("dropped images", ARRIVED_DROPPED, get(ARRIVED_DROPPED), dropped,
             sum(get(n) for n in dropped)),
            ("dead letters", ARRIVED_DEAD_LETTERS, get(ARRIVED_DEAD_LETTERS),
             ["cohort/bad_timestamp"] + failed,
             get("cohort/bad_timestamp") + sum(get(n) for n in failed)),
        ]
    missing = [f"tables/{t}_rows" for t in tables if f"tables/{t}_rows" not in ledger]
    if missing:
        raise ConservationError(f"conservation check failed: no count of {', '.join(missing)}")
    for stage, left, left_value, parts, right_value in equations:
        if left_value != right_value:
            detail = " + ".join(f"{p.split('/', 1)[1]} {get(p)}" for p in parts if get(p))
            raise ConservationError(
                f"conservation check failed at {stage}: {left.split('/', 1)[1]} {left_value} "
                f"!= {detail or 0} = {right_value} ({left_value - right_value:+d}); "
                "nothing was committed")
