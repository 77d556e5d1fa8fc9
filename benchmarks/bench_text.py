"""Throughput of the text stage (BuildNotes' work) on synthetic MIMIC-shaped records.

Builds N synthetic CohortRecords (chief complaints drawn like MIMIC-IV-ED's: a few common ones
repeat a lot, plus a long tail of distinct free text), loads the real offline MiniLM, the
bundled knowledge base and the tokenizer once, and runs `NoteBuilder.build` in batches on one
thread, the loop `_BuildNotesFn` runs per bundle. Prints records/s with a cold retrieval
cache, then warm (same records again), the cache hit rate, and where the time goes: features +
query + retrieval + note (embedding of cache misses broken out) and tokenization.

Usage:
    .venv/bin/python benchmarks/bench_text.py [--records 2000] [--batch_size 32]
        [--max_text_length 8192] [--tail_fraction 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transforms.text import notes  # noqa: E402

from transforms import records

from transforms.join import schema

# Common ED chief complaints with rough relative frequencies (MIMIC-IV-ED's head).
COMPLAINTS = (
    ("Dyspnea", 8), ("Chest pain", 8), ("SOB", 6), ("Abd pain", 6), ("s/p Fall", 6),
    ("Weakness", 4), ("Transfer", 4), ("Fever", 3), ("Cough, Fever", 3), ("Cough", 3),
    ("Altered mental status", 3), ("Syncope", 2), ("Abnormal labs", 2), ("Dizziness", 2),
    ("N/V", 2), ("Hypoxia", 2), ("Abd pain, Nausea", 1.5), ("Back pain", 1.5),
    ("Headache", 1.5), ("Lethargy", 1), ("Palpitations", 1), ("ETOH", 1), ("MVC", 1),
    ("Leg swelling", 1), ("Hematemesis", 0.5), ("Chest pain, Dyspnea", 1), ("Pneumonia", 0.6),
)
TAIL_WORDS = ("L", "R", "x2 days", "worsening", "s/p", "chronic", "acute", "since am", "w/")
MEDICATIONS = ("Aspirin", "Lisinopril", "Metformin", "Furosemide", "Albuterol Sulfate",
               "Atorvastatin", "Apixaban", "Metoprolol Succinate", "Omeprazole", "Insulin")


def synthetic_records(n: int, tail_fraction: float, seed: int) -> list[records.CohortRecord]:
    """`n` records of MIMIC shape; a `tail_fraction` share have a one-off complaint."""
    rng = random.Random(seed)
    names, weights = zip(*COMPLAINTS)
    out = []
    for i in range(n):
        complaint = rng.choices(names, weights)[0]
        if rng.random() < tail_fraction:
            complaint = f"{complaint} {rng.choice(TAIL_WORDS)} {i}"
        triage = {
            "temperature": f"{rng.gauss(98.4, 1.0):.1f}",
            "heartrate": f"{round(rng.gauss(90, 18))}.0",
            "resprate": f"{round(rng.gauss(18, 3))}.0",
            "o2sat": f"{min(100, round(100 - abs(rng.gauss(1.5, 3))))}.0",
            "sbp": f"{round(rng.gauss(135, 22))}.0",
            "dbp": f"{round(rng.gauss(77, 14))}.0",
            "pain": rng.choice(("0", "4", "7", "10", "uta", "")),
            "acuity": rng.choice(("1.0", "2.0", "3.0", "3.0", "4.0")),
            "chiefcomplaint": complaint,
        }
        vitals = tuple(
            {"charttime": f"2180-07-23 2{k}:00:00", "temperature": "",
             "heartrate": f"{round(rng.gauss(88, 15))}", "resprate": "18",
             "o2sat": f"{min(100, round(100 - abs(rng.gauss(1.5, 3))))}",
             "sbp": f"{round(rng.gauss(130, 20))}", "dbp": "75", "pain": "3"}
            for k in range(rng.randint(0, 3))
        )
        out.append(records.CohortRecord(
            record_id=f"bench-{i:06d}", subject_id=10000000 + i, study_id=50000000 + i,
            stay_id=30000000 + i, hadm_id=None, view_position=rng.choice(("AP", "PA")),
            study_datetime="2180-07-23T23:30:14.531000", image_path="unused.jpg",
            patient={"gender": rng.choice("MF"), "anchor_age": str(rng.randint(18, 91)),
                     "anchor_year": "2180", "anchor_year_group": "2014 - 2016"},
            stay={"intime": "2180-07-23 19:00:00", "outtime": "2180-07-24 03:00:00",
                  "gender": None, "race": None,
                  "arrival_transport": rng.choice(("AMBULANCE", "WALK IN", "UNKNOWN"))},
            triage=triage, vitals=vitals,
            medications=tuple(sorted(rng.sample(MEDICATIONS, rng.randint(0, 8)))),
            prior_admissions=rng.randint(0, 4),
            labels=tuple(math.nan for _ in schema.CHEXPERT_LABELS),
        ))
    return out


def run_pass(builder: notes.NoteBuilder, resources: notes.TextResources,
             samples: list[dict], batch_size: int) -> dict[str, float]:
    stats = notes.BuildStats()
    before = resources.retriever.stats()
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(samples), batch_size):
        for out in builder.build(samples[i:i + batch_size], stats):
            tokens += len(out["text_input_ids"])
    seconds = time.perf_counter() - start
    after = resources.retriever.stats()
    hits, misses = stats.cache["hits"], stats.cache["misses"]
    return {
        "records_per_s": len(samples) / seconds,
        "seconds": seconds,
        "hit_rate": hits / max(1, hits + misses),
        "misses": misses,
        "embed_s": after["embed_seconds"] - before["embed_seconds"],
        "note_s": stats.prepare_seconds,
        "tokenize_s": stats.tokenize_seconds,
        "mean_tokens": tokens / max(1, stats.built),
        "failed": stats.failed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=notes.DEFAULT_BATCH_SIZE)
    parser.add_argument("--max_text_length", type=int, default=notes.DEFAULT_MAX_TEXT_LENGTH)
    parser.add_argument("--tail_fraction", type=float, default=0.2,
                        help="Share of records whose chief complaint is a one-off string.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    samples = [records.sample_from(r)
               for r in synthetic_records(args.records, args.tail_fraction, args.seed)]
    start = time.perf_counter()
    resources = notes.load_text_resources()
    print(f"load model + embed {len(resources.retriever.snippets)} snippets + tokenizer: "
          f"{time.perf_counter() - start:.1f} s (once per worker process)")
    builder = notes.NoteBuilder(resources, args.max_text_length)
    resources.retriever.clear_cache()
    for label in ("cold cache", "warm cache"):
        r = run_pass(builder, resources, samples, args.batch_size)
        print(
            f"{label}: {r['records_per_s']:.0f} records/s ({args.records} records in "
            f"{r['seconds']:.2f} s); embedding cache hit rate {r['hit_rate']:.1%} "
            f"({r['misses']} texts embedded in {r['embed_s']:.2f} s, "
            f"{1000 * r['embed_s'] / max(1, r['misses']):.1f} ms each); "
            f"features+retrieval+note {r['note_s']:.2f} s, tokenization {r['tokenize_s']:.2f} s "
            f"({r['mean_tokens']:.0f} tokens/note); dead letters {r['failed']}"
        )
    print("reproduce: " + shlex.join([".venv/bin/python", "benchmarks/bench_text.py",
                                      *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
