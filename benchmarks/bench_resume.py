"""A run killed at ~80% of its preprocessing, then re-run: how much it redoes, and its bytes.

Three runs of the default local runner on one generated dataset: a clean run; a run into a
second output dir killed with SIGKILL once its progress line reports `--kill_at` of the
records preprocessed; the same command again. Prints the clean run's wall time, when the
kill came, the re-run's wall time and records reused (its summary line), the records it
preprocessed, and whether every output file is byte-identical to the clean run's.

    .venv/bin/python -m synthetic.mimic --output_dir /work/resume_data --n_patients 10600
    .venv/bin/python benchmarks/bench_resume.py --data /work/resume_data
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PROGRESS = re.compile(r"progress: (\d+) records preprocessed, [\d.]+ records/s, \d+% of (\d+)")


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.build_dataset",
            "--mimic_iv_dir", str(data / "mimic-iv"), "--mimic_ed_dir", str(data / "mimic-iv-ed"),
            "--mimic_cxr_dir", str(data / "mimic-cxr-jpg"), "--output_dir", str(out)]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(cmd: list[str], log: Path) -> tuple[int, float, str]:
    started = time.monotonic()
    with open(log, "w") as handle:
        code = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=REPO)
    return code.returncode, time.monotonic() - started, code.stdout


def _killed_at(cmd: list[str], log: Path, share: float) -> tuple[int, int, float]:
    """Runs `cmd` and SIGKILLs it once its progress reaches `share`: (done, total, seconds)."""
    started = time.monotonic()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=handle, cwd=REPO,
                                start_new_session=True)
        while proc.poll() is None:
            found = _PROGRESS.findall(log.read_text(errors="replace"))
            if found and int(found[-1][0]) >= share * int(found[-1][1]):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return int(found[-1][0]), int(found[-1][1]), time.monotonic() - started
            time.sleep(1)
    raise SystemExit(f"the run ended (exit {proc.returncode}) before {share:.0%}; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="generated dataset root")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_resume"))
    parser.add_argument("--kill_at", type=float, default=0.8)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    clean, resumed = args.work / "clean", args.work / "resumed"
    print(f"python benchmarks/bench_resume.py --data {args.data} (2 cores)")

    code, wall, _ = _run(_command(args.data, clean), args.work / "clean.log")
    print(f"clean run: exit {code}, {wall:.0f} s")
    done, total, when = _killed_at(_command(args.data, resumed), args.work / "killed.log",
                                   args.kill_at)
    print(f"killed run: SIGKILL at {done} of {total} records preprocessed "
          f"({done / total:.0%}), {when:.0f} s in")
    code, again, stdout = _run(_command(args.data, resumed), args.work / "rerun.log")
    reused = next((int(line.split()[1]) for line in stdout.splitlines()
                   if line.strip().startswith("resumed:")), 0)
    written = next(int(line.split()[1]) for line in stdout.splitlines()
                   if line.startswith("wrote "))
    print(f"re-run: exit {code}, {again:.0f} s ({again / wall:.2f} of the clean run); "
          f"{reused} of {written} records reused, {written - reused} preprocessed "
          f"({(written - reused) / written:.1%})")
    same = _tree(clean) == _tree(resumed)
    print(f"output byte-identical to the clean run's: {same} "
          f"({len(_tree(clean))} files)")
    return 0 if code == 0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
