"""Local runs on Beam's DirectRunner: the default mode, and the guard that keeps them exact.

Threads beat processes for this pipeline's image work (OpenCV and torch release the GIL, and
the threads share one embedding model), so local runs default to `multi_threading` with two
workers. Beam 2.77's embedded SDK worker in that mode flushes every output stream once a
second from a timer thread (`TimeBasedBufferingClosableOutputStream` in
apache_beam/runners/worker/data_plane.py) while the processing thread keeps writing into the
same buffer without the flush's lock: bytes written in between vanish or an element is cut in
two. A bundle that emits for over a second (reading a table of millions of rows) loses whole
runs of elements, or the runner fails with `Invalid PaneInfoEncoding`
(`benchmarks/dataplane_repro.py` shows it with Beam alone). `guard_data_plane` makes the timer
never fire, so only the processing thread flushes (by size, and at the end of the bundle): the
time-based flush only serves streaming latency, which a batch run does not need.
"""

from __future__ import annotations

from typing import Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "SwitchingDirectRunner",
                 "BundleBasedDirectRunner")
DEFAULT_MODE = "multi_threading"
DEFAULT_WORKERS = 2
# A week: the embedded worker's periodic flush then never fires within a run.
_NO_TIMED_FLUSH_MS = 7 * 24 * 3600 * 1000


def guard_data_plane() -> None:
    """Turns off the embedded worker's timed flush for the runs this process starts.

    The runner reads `DATA_BUFFER_TIME_LIMIT_MS` when it creates a worker (both ends of the
    data plane), so this must run before `pipeline.run()`; it is harmless for other modes.
    """
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = _NO_TIMED_FLUSH_MS


def is_local(options: PipelineOptions) -> bool:
    return (options.view_as(StandardOptions).runner or "") in LOCAL_RUNNERS


def _given(argv: Sequence[str], flag: str) -> bool:
    """Whether `--flag` was on the command line (with a value after it or after `=`).

    Beam's `get_all_options(drop_default=True)` cannot tell: it drops values equal to Beam's
    own defaults, so an explicit `--direct_running_mode in_memory` looked absent.
    """
    return any(arg == f"--{flag}" or arg.startswith(f"--{flag}=") for arg in argv)


def apply_runner_defaults(options: PipelineOptions, argv: Sequence[str]) -> None:
    """DirectRunner unless --runner says otherwise; for local runs multi_threading with two
    workers unless given explicitly, and the data-plane guard in every local mode."""
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = "DirectRunner"
    if not is_local(options):
        return
    direct = options.view_as(DirectOptions)
    if not _given(argv, "direct_running_mode"):
        direct.direct_running_mode = DEFAULT_MODE
    if not _given(argv, "direct_num_workers"):
        direct.direct_num_workers = DEFAULT_WORKERS
    guard_data_plane()
