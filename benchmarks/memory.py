"""Peak resident memory of a whole process tree, sampled from /proc (no psutil here)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over `root` and all its descendants."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        stack += _children(pid)
    return total


class PeakSampler:
    """Samples a process tree's RSS every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: Sequence[str], log_path: str, env: dict | None = None) -> tuple[int, float, int]:
    """Runs `cmd`, returns (exit code, wall seconds, peak RSS bytes of its process tree)."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                env=env or os.environ.copy())
        with PeakSampler(proc.pid) as sampler:
            code = proc.wait()
    return code, time.monotonic() - started, sampler.peak
