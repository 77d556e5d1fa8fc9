"""Peak resident memory of a whole process tree, sampled from /proc (no psutil here)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional, Sequence


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and its live descendants."""
    ticks, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
        stack += _children(pid)
    return ticks / os.sysconf("SC_CLK_TCK")


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


def _disk_used(folder: str) -> int:
    info = os.statvfs(folder)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


class PeakSampler:
    """Samples a process tree's RSS every `interval` seconds in a thread; keeps the peak, and
    (wall time, CPU seconds) once a second in `cpu` for how many cores were busy when."""

    def __init__(self, pid: int, interval: float = 0.1, disk: Optional[str] = None) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self.cpu: list[tuple[float, float]] = []
        # With `disk`: bytes used on that folder's file system, at the start and at the peak.
        self._disk = disk
        self.disk_start = self.disk_peak = _disk_used(disk) if disk else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            if self._disk:
                self.disk_peak = max(self.disk_peak, _disk_used(self._disk))
            now = time.time()
            if now - last >= 1.0:
                self.cpu.append((now, tree_cpu_seconds(self.pid)))
                last = now
            self._stop.wait(self.interval)

    def cores_busy(self, start: float, end: float) -> float:
        """Mean cores busy between two wall times (time.time()) from the samples."""
        inside = [(t, c) for t, c in self.cpu if start <= t <= end]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: Sequence[str], log_path: str, env: dict | None = None,
                 sampler_out: list | None = None, disk: Optional[str] = None
                 ) -> tuple[int, float, int]:
    """Runs `cmd`, returns (exit code, wall seconds, peak RSS bytes of its process tree).
    The sampler (with its CPU samples, and the disk use of `disk`'s file system when given)
    is appended to `sampler_out` when given."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                env=env or os.environ.copy())
        with PeakSampler(proc.pid, disk=disk) as sampler:
            code = proc.wait()
    if sampler_out is not None:
        sampler_out.append(sampler)
    return code, time.monotonic() - started, sampler.peak
