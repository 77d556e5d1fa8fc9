"""Measures the per-record costs that `run_dataflow.sh --dry-run` turns into an estimate.

Writes benchmarks/measured_costs.json with, per record and on one core of this machine:
  - image_seconds: `transforms.images.preprocess_image` on full-size (2544 x 3056, ~1.2 MB)
    radiograph JPEGs built from the real NIH radiographs (decode, letterbox, CLAHE);
  - text_seconds: `transforms.text.notes.NoteBuilder.build` on one record at a time (knowledge
    retrieval with the real MiniLM, note assembly, real tokenizer), every query distinct so
    the retrieval cache never helps (real data repeats chief complaints: an upper bound);
  - encode_seconds and record_bytes: `transforms.chunks.encode_record` of the finished record
    (what is spilled and what a chunk file stores per record);
  - ref_bytes: one encoded record reference, what crosses the shuffles instead of the record;
and per SDK process: the resident memory with Beam, torch and the text resources loaded (the
model is loaded once per process), and the peak memory one image in flight adds.
Seconds are process CPU time (time.process_time): a busy machine inflates them less than wall
time would.

Usage:
    .venv/bin/python benchmarks/measure_costs.py [--images 4] [--records 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "measured_costs.json"

HEIGHT, WIDTH = 3056, 2544
_COMPLAINTS = (
    "Dyspnea", "Chest pain", "SOB", "Cough, fever", "Abd pain", "s/p Fall", "Weakness",
    "Hypoxia", "Pneumonia", "CHF exacerbation", "Hemoptysis", "Syncope", "Altered mental status",
    "Palpitations", "Transfer", "Tachycardia", "Back pain", "Wheezing", "Fever", "Leg swelling",
)
_MEDICATIONS = (
    "Aspirin", "Atorvastatin", "Metoprolol Tartrate", "Furosemide", "Lisinopril", "Albuterol",
    "Fluticasone", "Insulin Glargine", "Metformin", "Omeprazole", "Amlodipine", "Warfarin",
    "Levothyroxine", "Gabapentin", "Sertraline", "Tiotropium", "Prednisone", "Docusate",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_jpegs(count: int, seed: int) -> list[bytes]:
    """Full-size radiograph-like JPEGs (quality 95) from the real NIH radiographs."""
    import cv2
    import numpy as np

    from synthetic import images

    sources = synthetic_images.load_radiographs()
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        pixels = synthetic_images.synthesize_radiograph(
            sources[index % len(sources)], HEIGHT, WIDTH, rng)
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


def make_records(count: int) -> list:
    """Varied, plausible ED records (triage, 0-6 vitals rows, 0-15 medications)."""
    from transforms.records import CohortRecord

    records = []
    for n in range(count):
        complaint = f"{_COMPLAINTS[n % len(_COMPLAINTS)]}, {n}"  # distinct query per record
        triage = {
            "temperature": f"{97.0 + (n % 30) / 10:.1f}", "heartrate": str(60 + n % 70),
            "resprate": str(12 + n % 18), "o2sat": str(88 + n % 12), "sbp": str(95 + n % 80),
            "dbp": str(55 + n % 40), "pain": str(n % 11) if n % 7 else "uta",
            "acuity": str(1 + n % 5), "chiefcomplaint": complaint,
        }
        vitals = tuple(
            {"charttime": f"2180-01-01 1{k}:00:00", "temperature": "98.6",
             "heartrate": str(70 + k), "resprate": "18", "o2sat": str(93 + k % 5),
             "sbp": str(120 + k), "dbp": "70", "rhythm": None, "pain": "3"}
            for k in range(n % 7)
        )
        meds = tuple(sorted(_MEDICATIONS[(n + k) % len(_MEDICATIONS)] for k in range(n % 16)))
        records.append(CohortRecord(
            record_id=f"dicom-{n:05d}", subject_id=10000000 + n, study_id=50000000 + n,
            stay_id=30000000 + n, hadm_id=None if n % 3 else 20000000 + n,
            view_position="AP" if n % 2 else "PA",
            study_datetime="2180-01-01T18:30:00", image_path=f"/nonexistent/{n}.jpg",
            patient={"gender": "F" if n % 2 else "M", "anchor_age": str(20 + n % 70),
                     "anchor_year": "2180", "anchor_year_group": "2014 - 2016"},
            stay={"intime": "2180-01-01 10:00:00", "outtime": "2180-01-02 02:00:00",
                  "gender": "F" if n % 2 else "M", "race": "WHITE",
                  "arrival_transport": "AMBULANCE"},
            triage=triage, vitals=vitals, medications=meds, prior_admissions=n % 4,
            labels=tuple(float("nan") if (n + k) % 3 else 1.0 for k in range(14)),
        ))
    return records


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _memory_probe(jpeg_path: str) -> None:
    """Run in a fresh process: the peak memory one image adds (its JPEG bytes, the decode
    buffers and the output), then the resident memory of a process with Beam, torch and the
    text resources loaded."""
    import cv2

    cv2.setNumThreads(1)
    import apache_beam  # noqa: F401  (the SDK process has Beam loaded too)

    from transforms import images


    from transforms.text import notes
    baseline = max(_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    jpeg = Path(jpeg_path).read_bytes()
    images.preprocess_image(jpeg, size=518)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resources = notes.load_text_resources()
    assert resources.tokenizer is not None
    print(json.dumps({"sdk_process_rss_bytes": _rss_bytes(),
                      "image_peak_extra_bytes": max(peak - baseline, len(jpeg))}))


def measure(n_images: int, n_records: int, repeats: int) -> dict:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from transforms import images
    from transforms.text import notes
    from transforms.chunks import encode_record

    jpegs = make_jpegs(n_images, seed=0)
    image_s = statistics.median(
        _median_seconds(lambda data=data: images.preprocess_image(data, size=518), repeats)
        for data in jpegs)
    image, box = images.preprocess_image(jpegs[0], size=518)

    resources = notes.load_text_resources()
    builder = notes.NoteBuilder(resources, max_text_length=8192)
    samples = [{"cohort": r} for r in make_records(n_records)]
    builder.build(samples[:2])  # warm-up (first forward pass allocates)
    start = time.process_time()
    built = [builder.build([sample])[0] for sample in samples[2:]]
    text_s = (time.process_time() - start) / len(built)

    finished = []
    for sample in built:
        record = sample["cohort"]
        finished.append({
            "record_id": record.record_id, "subject_id": record.subject_id,
            "study_id": record.study_id, "stay_id": record.stay_id, "hadm_id": record.hadm_id,
            "view_position": record.view_position, "split": "train",
            "study_datetime": record.study_datetime,
            "image": torch.from_numpy(image), "image_box": torch.from_numpy(box),
            "enhanced_note": sample["enhanced_note"],
            "text_input_ids": torch.as_tensor(sample["text_input_ids"], dtype=torch.int32),
            "attention_segments": sample["attention_segments"],
            "clinical_data": torch.as_tensor(sample["clinical_data"], dtype=torch.float32),
            "clinical_mask": torch.as_tensor(sample["clinical_mask"], dtype=torch.bool),
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "retrieved_knowledge": sample["retrieved_knowledge"],
        })
    start = time.process_time()
    encoded = [encode_record(r) for r in finished]
    encode_s = (time.process_time() - start) / len(finished)
    tokens = statistics.median(len(s["text_input_ids"]) for s in built)

    with tempfile.TemporaryDirectory() as tmp:
        jpeg_path = Path(tmp) / "full_size.jpg"
        jpeg_path.write_bytes(jpegs[0])
        probe = subprocess.run(
            [sys.executable, __file__, "--memory_probe", str(jpeg_path)], check=True,
            capture_output=True, text=True, cwd=REPO,
        )
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    return {
        "_about": "Per-record costs (CPU seconds of one core) and memory, measured by "
                  "benchmarks/measure_costs.py; read by pipelines/dataflow_config.py for the "
                  "run_dataflow.sh --dry-run estimate. Re-measure after changing a stage.",
        "measured_on": dt.date.today().isoformat(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "image_seconds": round(image_s, 4),
        "image_input_bytes": int(statistics.median(len(j) for j in jpegs)),
        "image_source": f"{n_images} synthetic {WIDTH}x{HEIGHT} JPEGs from the real NIH "
                        "radiographs, quality 95",
        "text_seconds": round(text_s, 4),
        "text_tokens_median": int(tokens),
        "text_source": f"{len(built)} records, distinct retrieval queries (no cache hits)",
        "encode_seconds": round(encode_s, 5),
        "record_bytes": int(statistics.median(len(e) for e in encoded)),
        "ref_bytes": _ref_bytes(finished[0]),
        "sdk_process_rss_bytes": memory["sdk_process_rss_bytes"],
        "image_peak_extra_bytes": memory["image_peak_extra_bytes"],
    }


def _ref_bytes(record: dict) -> int:
    """Encoded size of one record reference (what crosses the shuffles instead of the record)."""
    from apache_beam.coders import registry

    from transforms.write.groups import RecordRef

    ref = RecordRef(
        record_id=record["record_id"], subject_id=record["subject_id"],
        study_id=record["study_id"], stratum="AP|triage_and_vitals|abnormal",
        labels=tuple(float(v) for v in record["labels"]),
        note_tokens=len(record["text_input_ids"]),
        clinical_missing=tuple(i for i, seen in enumerate(record["clinical_mask"]) if not seen),
    )
    return len(registry.get_coder(RecordRef).encode(ref))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_probe", metavar="JPEG", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(OUT))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.memory_probe:
        _memory_probe(args.memory_probe)
        return
    result = measure(args.images, args.records, args.repeats)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("reproduce: " + " ".join([".venv/bin/python", "benchmarks/measure_costs.py",
                                    *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
