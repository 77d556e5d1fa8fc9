"""Beam-only reproduction of the local runner's data-plane loss (for an upstream report).

In `multi_threading` mode the FnApiRunner's embedded SDK worker flushes each output stream
every second from a timer thread (`TimeBasedBufferingClosableOutputStream`,
apache_beam/runners/worker/data_plane.py). The flush holds a lock that the processing
thread's writes never take, so bytes written between the flush's read of the buffer and its
reset vanish, or an element is cut in two. Any bundle that emits for over a second is exposed:
elements go missing, or the runner fails to decode the stream (`Invalid PaneInfoEncoding`).

    python benchmarks/dataplane_repro.py --mode multi_threading            # loses or crashes
    python benchmarks/dataplane_repro.py --mode multi_threading --guarded  # exact
    python benchmarks/dataplane_repro.py --mode in_memory                  # exact

No project code is involved but `pipelines.local_runner.guard_data_plane` with --guarded.
"""

from __future__ import annotations

import argparse
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions


def count_after_group(n: int, keys: int, mode: str, workers: int) -> int:
    """Emits `n` (key, value) pairs from one element, groups them, and counts what arrives."""
    options = PipelineOptions(
        runner="DirectRunner", direct_running_mode=mode, direct_num_workers=workers)
    p = beam.Pipeline(options=options)
    _ = (
        p
        | beam.Create([None])
        | beam.FlatMap(lambda _: ((i % keys, (i, str(i) * 3)) for i in range(n)))
        | beam.GroupByKey()
        | beam.Map(lambda kv: Metrics.counter("repro", "grouped").inc(len(kv[1])))
    )
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("grouped"))["counters"]
    return sum(c.committed for c in counters)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2_000_000, help="elements emitted")
    parser.add_argument("--keys", type=int, default=50_000, help="distinct keys")
    parser.add_argument("--mode", default="multi_threading",
                        choices=("multi_threading", "multi_processing", "in_memory"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--guarded", action="store_true",
                        help="apply pipelines.local_runner.guard_data_plane() first")
    args = parser.parse_args(argv)
    if args.guarded:
        from pipelines.local_runner import guard_data_plane

        guard_data_plane()
    print(f"python {' '.join(sys.argv)}")
    failures = 0
    for run in range(args.runs):
        started = time.monotonic()
        try:
            total = count_after_group(args.n, args.keys, args.mode, args.workers)
            outcome = "exact" if total == args.n else f"LOST {args.n - total}"
        except Exception as err:  # the runner's decode error is what we are showing
            last = str(err).splitlines()[-1][:120]
            total, outcome = None, f"CRASHED {type(err).__name__}: {last}"
        failures += outcome != "exact"
        print(f"run {run + 1}: mode={args.mode} workers={args.workers} guarded={args.guarded} "
              f"counted={total} of {args.n}: {outcome} ({time.monotonic() - started:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
