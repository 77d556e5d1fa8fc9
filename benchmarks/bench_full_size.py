"""Exactness, memory and time at MIMIC's full size, against the generator's own answer.

Join-only: `--runs` consecutive `--compute_indices_only` runs of the default local runner on
a full-size synthetic dataset (`python -m synthetic.mimic --scale mimic
--no_images`), the first `--cold` of them after dropping the page cache (root only). Each run:
wall time, peak RSS of the whole process tree, whether stratification_indices.json is
byte-identical to the first run's, and whether its patient set equals the answer's
(`answer/cohort.csv.gz`, written by the generator without any pipeline code).

End to end (`--end_to_end`, on a dataset generated with images): one full run; the record ids
of the written chunks and failed/ must be exactly the answer's dicom_ids.

    .venv/bin/python -m synthetic.mimic --scale mimic --no_images \
        --output_dir /work/fullsize
    .venv/bin/python benchmarks/bench_full_size.py --data /work/fullsize --runs 5 --cold 2
    .venv/bin/python benchmarks/bench_full_size.py --data /work/fullsize_img --end_to_end
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import run_measured  # noqa: E402


def answer(data: Path) -> tuple[set[str], set[int]]:
    """The generator's linked dicom_ids and their patients."""
    with gzip.open(data / "answer" / "cohort.csv.gz", "rt", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {r["dicom_id"] for r in rows}, {int(r["subject_id"]) for r in rows}


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.build_dataset",
            "--mimic_iv_dir", str(data / "mimic-iv"), "--mimic_ed_dir", str(data / "mimic-iv-ed"),
            "--mimic_cxr_dir", str(data / "mimic-cxr-jpg"), "--output_dir", str(out), *extra]


def join_runs(data: Path, work: Path, runs: int, cold: int, extra: list[str]) -> int:
    _, patients = answer(data)
    first_digest, failures = None, 0
    print(f"answer: {len(patients)} patients")
    for run in range(runs):
        out = work / f"join-{run}"
        shutil.rmtree(out, ignore_errors=True)
        cache = "cold" if run < cold and drop_caches() else "warm"
        code, wall, peak = run_measured(_command(data, out, "--compute_indices_only", *extra),
                                        str(work / f"join-{run}.log"))
        indices = out / "stratification_indices.json"
        if code != 0 or not indices.exists():
            failures += 1
            print(f"run {run + 1} ({cache}): FAILED exit {code}, {wall:.1f} s, peak "
                  f"{peak / 2**30:.2f} GB; see {work / f'join-{run}.log'}")
            continue
        data_bytes = indices.read_bytes()
        digest = hashlib.sha256(data_bytes).hexdigest()
        first_digest = first_digest or digest
        found = {int(s) for s in json.loads(data_bytes)["patients"]}
        exact = found == patients
        failures += not exact or digest != first_digest
        print(f"run {run + 1} ({cache}): {wall:.1f} s, peak {peak / 2**30:.2f} GB, "
              f"{len(found)} patients, {'exact' if exact else 'NOT EXACT'} "
              f"(missing {len(patients - found)}, extra {len(found - patients)}), "
              f"indices {'identical' if digest == first_digest else 'DIFFER'} "
              f"(sha256 {digest[:12]})")
    return failures


def _one_cv2_thread() -> None:
    import cv2

    cv2.setNumThreads(1)  # as the pipeline's image DoFn: one core per worker


def _image_work(path: str) -> int:
    from transforms.images import preprocess_image

    image, _ = preprocess_image(Path(path).read_bytes(), size=518)
    return image.size


def image_tight_loop(data: Path, n: int, workers: int = 2) -> float:
    """Records/s of the image preprocessing alone on `workers` processes, over `n` cohort
    images: what the pipeline's sustained rate is compared with."""
    import multiprocessing as mp

    with gzip.open(data / "answer" / "cohort.csv.gz", "rt", newline="") as handle:
        rows = [r for _, r in zip(range(n), csv.DictReader(handle))]
    from transforms.join.schema import image_relpath

    paths = [str(data / "mimic-cxr-jpg" / image_relpath(int(r["subject_id"]),
                                                        int(r["study_id"]), r["dicom_id"]))
             for r in rows]
    with mp.get_context("spawn").Pool(workers, initializer=_one_cv2_thread) as pool:
        pool.map(_image_work, paths[:workers * 4])  # imports and warm-up
        started = time.monotonic()
        pool.map(_image_work, paths, chunksize=8)
        return len(paths) / (time.monotonic() - started)


_PROGRESS = re.compile(r"^(\S+ \S+) INFO progress: (\d+) records preprocessed, ([\d.]+) "
                       r"records/s(?:, \d+% of (\d+))?")


def _progress(log: Path) -> list[tuple[float, int, float, int]]:
    """(time, records done, rate, total) of each progress line of a run's log."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        m = _PROGRESS.match(line)
        if m:
            when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((when, int(m.group(2)), float(m.group(3)), int(m.group(4) or 0)))
    return found


def end_to_end(data: Path, work: Path, extra: list[str], tight_n: int) -> int:
    import torch

    dicom_ids, _ = answer(data)
    tight = image_tight_loop(data, tight_n) if tight_n else float("nan")
    print(f"image-only tight loop, 2 processes, {tight_n} images: {tight:.1f} records/s")
    out = work / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    samplers: list = []
    log = work / "e2e.log"
    cache = "cold" if drop_caches() else "warm (not root: could not drop the page cache)"
    code, wall, peak = run_measured(_command(data, out, *extra), str(log),
                                    sampler_out=samplers, disk=str(work))
    print(f"end to end ({cache} page cache): exit {code}, {wall:.1f} s ({wall / 60:.1f} min), "
          f"peak {peak / 2**30:.2f} GB; log {log}")
    lines = _progress(log)
    if lines:
        sampler, (t_last, done, rate, total) = samplers[0], lines[-1]
        t80 = next((t for t, d, _, tot in lines if tot and d >= 0.8 * tot), t_last)
        first = lines[0][0]
        end = sampler.cpu[-1][0] if sampler.cpu else t_last
        print(f"preprocessing: {done} records at {rate:.1f} records/s sustained "
              f"(pipeline / image-only loop = {rate / tight:.2f}); cores busy "
              f"{sampler.cores_busy(first, t80):.2f} before 80%, "
              f"{sampler.cores_busy(t80, t_last):.2f} in the last 20%")
        print(f"after preprocessing (chunks, metadata): {end - t_last:.0f} s, cores busy "
              f"{sampler.cores_busy(t_last, end):.2f}")
    if code != 0:
        return 1
    meta = json.loads((out / "metadata.json").read_text())
    written = []
    for chunk in meta["chunks"]:
        loaded = torch.load(out / chunk["path"], weights_only=True, mmap=True)
        written += loaded["record_id"]
    failed_file = out / "failed" / "failed-00000-of-00001.jsonl"
    failed = [json.loads(line)["record_id"] for line in failed_file.read_text().splitlines()]
    found = set(written) | set(failed)
    exact = found == dicom_ids and len(written) + len(failed) == len(found)
    print(f"records: {len(written)} written + {len(failed)} failed = {len(found)}; answer "
          f"{len(dicom_ids)}: {'exact' if exact else 'NOT EXACT'} (missing "
          f"{len(dicom_ids - found)}, extra {len(found - dicom_ids)})")
    print(f"rate end to end: {len(written) / wall:.1f} records/s")
    loop_s = len(found) / tight
    print(f"wall / image-only loop time for the same {len(found)} images ({loop_s:.0f} s): "
          f"{wall / loop_s:.2f}")
    dataset = sum(c["bytes"] for c in meta["chunks"])
    grown = samplers[0].disk_peak - samplers[0].disk_start
    print(f"disk: peak {grown / 2**30:.2f} GiB above the start, finished dataset "
          f"{dataset / 2**30:.2f} GiB in chunks: {grown / dataset:.2f} x")
    return 0 if exact else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="generated dataset root")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_full_size"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", type=int, default=2, help="runs after dropping the cache")
    parser.add_argument("--end_to_end", action="store_true")
    parser.add_argument("--tight_loop_only", action="store_true",
                        help="only the image-only tight loop (on a dataset with images)")
    parser.add_argument("--tight_loop_images", type=int, default=1000,
                        help="images in the image-only tight loop of --end_to_end (0: skip)")
    args, extra = parser.parse_known_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"python {' '.join(sys.argv)}  ({os.cpu_count()} cores)")
    if args.tight_loop_only:
        n = args.tight_loop_images
        print(f"image-only tight loop, 2 processes, {n} images: "
              f"{image_tight_loop(args.data, n):.1f} records/s")
        return 0
    if args.end_to_end:
        return end_to_end(args.data, args.work, extra, args.tight_loop_images)
    return 1 if join_runs(args.data, args.work, args.runs, args.cold, extra) else 0


if __name__ == "__main__":
    sys.exit(main())
