"""End-to-end pipeline benchmark on generated data with real-size JPEGs.

Prints, for one size: records written, wall time, records/s end to end and for the
preprocessing stage (fixed start-up removed by a --limit 50 run on the same inputs), peak RSS of
all processes, stored bytes per record; and the same preprocessing functions in a tight loop on
2 processes over the same records, with the ratio pipeline / tight loop.

    .venv/bin/python benchmarks/bench_pipeline.py --patients 1030      # ~2,000 records
    .venv/bin/python benchmarks/bench_pipeline.py --patients 10600 --no_tight_loop  # ~20,000

Beside ours it runs the old approach (benchmarks/baseline_old.py) on the same records, unless
--no_baseline: one process holding every processed record in RAM, stopped at
--baseline_max_rss_gb so that it reports instead of being OOM-killed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import run_measured  # noqa: E402


def _generate(root: Path, patients: int, seed: int):
    from synthetic.mimic import generate

    stamp = root / "generated.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    data = generate(str(root), n_patients=patients, seed=seed)
    roots = {"mimic_iv_dir": data.mimic_iv_dir, "mimic_ed_dir": data.mimic_ed_dir,
             "mimic_cxr_dir": data.mimic_cxr_dir, "counts": data.counts}
    stamp.write_text(json.dumps(roots))
    return roots


def _pipeline(roots: dict, out: Path, log: Path, *extra: str) -> tuple[float, int, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.build_dataset",
           "--mimic_iv_dir", roots["mimic_iv_dir"], "--mimic_ed_dir", roots["mimic_ed_dir"],
           "--mimic_cxr_dir", roots["mimic_cxr_dir"], "--output_dir", str(out), *extra]
    code, wall, peak = run_measured(cmd, str(log))
    if code != 0:
        raise SystemExit(f"pipeline failed ({code}); see {log}")
    return wall, peak, json.loads((out / "metadata.json").read_text())


def _cohort(roots: dict, path: Path) -> list:
    """The cohort records, through the pipeline's own ReadTables + JoinCohort."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.join import schema
    from transforms.join.cohort import RECORDS_TAG, JoinCohort
    from transforms.join.tables import ReadTables

    if path.exists():
        return pickle.loads(path.read_bytes())
    dirs = {schema.MIMIC_IV: roots["mimic_iv_dir"], schema.MIMIC_ED: roots["mimic_ed_dir"],
            schema.MIMIC_CXR: roots["mimic_cxr_dir"]}

    def save(items):
        path.write_bytes(pickle.dumps(sorted(items, key=lambda r: r.record_id)))

    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        joined = (p | ReadTables(dirs)
                  | JoinCohort(image_root=roots["mimic_cxr_dir"]))
        _ = joined[RECORDS_TAG] | beam.combiners.ToList() | beam.Map(save)
    return pickle.loads(path.read_bytes())


def _tight_worker(args) -> tuple[float, float, int]:
    """One process: load once, then text + image + record encoding for its share."""
    records, barrier_time = args
    from transforms import storage
    from transforms.chunks.format import encode_record
    from transforms.images import preprocess_image
    from transforms.text.notes import NoteBuilder, load_text_resources
    from transforms.records import sample_from
    from transforms.write.groups import to_chunk_record

    builder = NoteBuilder(load_text_resources())
    while time.time() < barrier_time:  # both processes start the clock together
        time.sleep(0.01)
    start = time.time()
    done = 0
    for i in range(0, len(records), 32):
        samples = builder.build([sample_from(r) for r in records[i:i + 32]])
        for sample in samples:
            if not isinstance(sample, dict):
                continue
            try:
                image, box = preprocess_image(storage.read_bytes(sample["cohort"].image_path))
            except Exception:  # noqa: BLE001 - faults are dead letters in the pipeline too
                continue
            encode_record(to_chunk_record({**sample, "image": image, "image_box": box}, ""))
            done += 1
    return start, time.time(), done


def _tight_loop(records: list) -> float:
    halves = [records[0::2], records[1::2]]
    barrier = time.time() + 60  # time for both to load the model
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_tight_worker, [(h, barrier) for h in halves])
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return sum(r[2] for r in results) / (end - start)


def _baseline(roots: dict, cohort_path: Path, work: Path, max_rss_gb: float) -> dict:
    """The old one-process, all-in-RAM approach on the same records, measured the same way."""
    _cohort(roots, cohort_path)
    log = work / "baseline.log"
    cmd = [sys.executable, str(REPO / "benchmarks" / "baseline_old.py"), "--cohort",
           str(cohort_path), "--out", str(work / "baseline-out"), "--max_rss_gb", str(max_rss_gb)]
    code, wall, peak = run_measured(cmd, str(log))
    if code != 0:
        raise SystemExit(f"baseline failed ({code}); see {log}")
    result = json.loads(log.read_text().strip().splitlines()[-1])
    result.update(wall_s=round(wall, 1), peak_rss_mb=round(peak / 2**20))
    if result["records_held"]:
        result["peak_rss_mb_per_1000_records"] = round(peak / 2**20 / result["records_held"] * 1000)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1030)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work_dir", default="/tmp/bench_pipeline")
    parser.add_argument("--no_tight_loop", action="store_true")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the old in-memory approach (benchmarks/baseline_old.py)")
    parser.add_argument("--baseline_max_rss_gb", type=float, default=12.0)
    args = parser.parse_args()

    work = Path(args.work_dir)
    data_dir = work / f"data-p{args.patients}-s{args.seed}"
    data_dir.mkdir(parents=True, exist_ok=True)
    roots = _generate(data_dir, args.patients, args.seed)
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"inputs: {args.patients} patients, {roots['counts']['images']} images "
          f"({roots['counts']['frontal_in_stay']} frontal in an ED stay), 2544x3056 JPEGs")

    # A first small run warms the page cache (Python, torch, the model); the second gives the
    # fixed start-up cost (imports, model load, join of the full tables) on warm caches.
    _pipeline(roots, work / "out-limit", work / "warmup.log", "--limit", "50")
    wall_small, peak_small, small = _pipeline(roots, work / "out-limit", work / "limit.log",
                                              "--limit", "50")
    wall, peak, meta = _pipeline(roots, work / "out", work / "full.log")
    n = meta["total_records"]
    chunk_bytes = sum(c["bytes"] for c in meta["chunks"])
    stage_rate = (n - small["total_records"]) / max(wall - wall_small, 1e-9)
    figures = {
        "records": n,
        "limit_run_records": small["total_records"],
        "wall_s": round(wall, 1),
        "records_per_s_end_to_end": round(n / wall, 1),
        "fixed_startup_s (--limit 50 run)": round(wall_small, 1),
        "preprocessing_records_per_s (startup removed)": round(stage_rate, 1),
        "peak_rss_all_processes_mb": round(peak / 2**20),
        "peak_rss_limit50_run_mb": round(peak_small / 2**20),
        "stored_bytes_per_record": round(chunk_bytes / n),
        "failed": meta["failed"],
    }
    if not args.no_baseline:
        figures["baseline_old_in_memory"] = _baseline(
            roots, data_dir / "cohort.pkl", work, args.baseline_max_rss_gb)
    if not args.no_tight_loop:
        records = _cohort(roots, data_dir / "cohort.pkl")
        tight = _tight_loop(records)
        figures["tight_loop_2_processes_records_per_s"] = round(tight, 1)
        figures["pipeline_over_tight_loop"] = round(stage_rate / tight, 3)
    print(json.dumps(figures, indent=2))
    (work / f"figures-p{args.patients}.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
