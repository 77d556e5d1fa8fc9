"""The approach this project replaces, for side-by-side benchmarks: one process that keeps every
processed record in RAM, then splits by record and saves one file per split.

It runs the same note and image functions as the pipeline over the same cohort records, but
holds what the old code held: a float32 [3, S, S] image tensor, a float32 [S, S] mask, the
token ids and the note per record, all in one list. Its memory therefore grows with the
number of records. So that a benchmark can finish on a 24 GiB machine, it stops once its own
RSS passes --max_rss_gb and reports how many records it held (the old job was OOM-killed
instead). Prints one JSON object.

    .venv/bin/python benchmarks/baseline_old.py --cohort /tmp/bench_pipeline/data-p1030-s7/cohort.pkl \\
        --out /tmp/bench_pipeline/baseline-out
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _old_record(sample: dict, image, box) -> dict:
    """What the old code accumulated per record: float tensors, not uint8."""
    import numpy as np
    import torch

    grey = torch.from_numpy(image.astype(np.float32) / 255.0)
    mask = torch.zeros_like(grey)
    top, left, height, width = (int(v) for v in box)
    mask[top:top + height, left:left + width] = 1.0
    return {
        "record_id": sample["cohort"].record_id,
        "subject_id": sample["cohort"].subject_id,
        "image_tensor": grey.expand(3, -1, -1).clone(),
        "attention_mask": mask,
        "text_input_ids": torch.as_tensor(sample["text_input_ids"], dtype=torch.int64),
        "enhanced_note": sample["enhanced_note"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True, help="pickled cohort records (bench_pipeline)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_rss_gb", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch

    from transforms import storage
    from transforms.images import preprocess_image
    from transforms.notes import NoteBuilder, load_text_resources
    from transforms.records import sample_from

    records = pickle.loads(Path(args.cohort).read_bytes())
    started = time.monotonic()
    builder = NoteBuilder(load_text_resources())
    held: list[dict] = []
    stopped_at_cap = False
    for i in range(0, len(records), 32):
        for sample in builder.build([sample_from(r) for r in records[i:i + 32]]):
            if not isinstance(sample, dict):
                continue
            try:
                image, box = preprocess_image(storage.read_bytes(sample["cohort"].image_path))
            except Exception:  # noqa: BLE001 - the old code skipped unreadable images
                continue
            held.append(_old_record(sample, image, box))
        if _rss_bytes() > args.max_rss_gb * 2**30:
            stopped_at_cap = True
            break
    processed_s = time.monotonic() - started

    # The old split: shuffle records (not patients) and save each split whole.
    random.Random(args.seed).shuffle(held)
    n = len(held)
    cuts = {"train": held[: int(0.7 * n)], "val": held[int(0.7 * n): int(0.85 * n)],
            "test": held[int(0.85 * n):]}
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stored = 0
    for split, items in cuts.items():
        buffer = io.BytesIO()
        torch.save(items, buffer)
        (out / f"{split}.pt").write_bytes(buffer.getvalue())
        stored += buffer.tell()
    subjects = {s: {r["subject_id"] for r in items} for s, items in cuts.items()}
    print(json.dumps({
        "command": " ".join([sys.executable] + sys.argv),
        "records_in_cohort": len(records),
        "records_held": n,
        "stopped_at_rss_cap": stopped_at_cap,
        "rss_cap_gb": args.max_rss_gb,
        "processing_s": round(processed_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "records_per_s": round(n / processed_s, 1),
        "final_rss_mb": round(_rss_bytes() / 2**20),
        "stored_bytes_per_record": round(stored / max(n, 1)),
        "patients_in_two_splits": len((subjects["train"] & subjects["test"])
                                      | (subjects["train"] & subjects["val"])
                                      | (subjects["val"] & subjects["test"])),
    }))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
