"""glibc malloc tuning for local runs.

glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and
memory freed in one arena is not reused by another. The local runner's worker threads each
touch the join's buffers, so the freed join kept up to ~350 MB resident per run at 10,600
patients, and the run's peak varied by 300 MB from run to run. One arena keeps the peak flat
(measured in BENCHMARKS.md) at no measured cost in throughput: the work that matters (JPEG
decoding, OpenCV, torch) allocates its large buffers with mmap, outside the arenas.
"""

from __future__ import annotations

import ctypes
import os
import ctypes.util

_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Caps glibc's malloc arenas for the threads this process starts from now on.

    Returns False where the C library is not glibc, or where the user set MALLOC_ARENA_MAX
    (their choice stands); nothing is changed then.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))
