"""Sizes of what crosses side inputs and shuffles at the real dataset's scale.

Builds the split assignment for 65,000 patients (the `AsSingleton` side input of the chunk and
metadata stages) and 107,949 record references (the only per-record payload that crosses the
GroupByKeys), encodes them with the coders Beam uses for them, and prints the sizes. Records'
images and token ids never cross either: they are written, in their group's chunk, where they
are made.

    .venv/bin/python benchmarks/side_inputs.py [--patients 65000] [--records 107949]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=65_000)
    parser.add_argument("--records", type=int, default=107_949)
    args = parser.parse_args()

    from apache_beam.coders import registry

    from transforms.write.groups import RecordRef
    from transforms.splits import SplitAssignment, hash_split

    rng = random.Random(0)
    ratios = (0.7, 0.15, 0.15)
    subjects = rng.sample(range(10_000_000, 20_000_000), args.patients)
    assignment = SplitAssignment({s: hash_split(s, ratios, 42) for s in subjects}, 42, ratios)
    coder = registry.get_coder(SplitAssignment)
    assignment_bytes = len(coder.encode(assignment))

    ref_coder = registry.get_coder(RecordRef)
    sizes = []
    for i in range(1000):  # the per-ref size is uniform; 1,000 give the mean
        subject = subjects[i % len(subjects)]
        study = 50_000_000 + i
        record_id = f"{subject}_{study}_{rng.getrandbits(128):032x}"
        ref = RecordRef(
            record_id=record_id, subject_id=subject, study_id=study, stratum="AP|triage_and_vitals|abnormal",
            labels=tuple(rng.choice((1.0, 0.0, -1.0, float("nan"))) for _ in range(14)),
            note_tokens=rng.randrange(150, 600),  # the report's facts: note length and the
            clinical_missing=tuple(sorted(rng.sample(range(26), 8))),  # ~8 of 26 missing
        )
        sizes.append(len(ref_coder.encode(ref)))
    ref_bytes = sum(sizes) / len(sizes)
    print(json.dumps({
        "command": " ".join([sys.executable] + sys.argv),
        "patients": args.patients,
        "split_assignment_side_input_bytes": assignment_bytes,
        "records": args.records,
        "record_ref_bytes_each": round(ref_bytes),
        "record_refs_shuffled_total_mb": round(ref_bytes * args.records / 2**20, 1),
        "largest_group_mb (GroupBySplit, train = 70%)": round(
            ref_bytes * args.records * 0.7 / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
