"""Spilling, fixed-size chunk writing and the metadata commit, locally and on gs://."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from tests.test_splits import labels_with, make_cohort, runner_options
from transforms import storage
from transforms.chunks.format import decode_chunk, decode_record, encode_record
from transforms.errors import InputError
from transforms.records import DROP_NO_ED_STAY, DROP_NOT_FRONTAL, FAIL_IMAGE_TRUNCATED, FAIL_TEXT
from transforms.records import CohortRecord, DeadLetter
from transforms.ledger import LEDGER_TAG, SumLedger
from transforms.metadata import WriteMetadata, check_output_dir
from transforms.spill import REFS_TAG, SpillRef, SpillSamples, spill_path, to_chunk_record
from transforms.splits import SPLITS, SplitAssignment, SplitPatients, read_indices
from transforms.write_chunks import WriteChunks, _WriteChunkFn, lay_out_split

IMAGE = 16
FEATURES = ("heartrate", "o2sat", "age", "pain")
RATIOS = (0.7, 0.15, 0.15)
CONFIG = {"chunk_size": 4, "seed": 42, "ratios": list(RATIOS), "image_size": IMAGE,
          "max_text_length": 8192}


def make_sample(record: CohortRecord) -> dict:
    """The sample the image and text stages leave: numpy arrays, a tiny image."""
    n = int(record.record_id.split("-")[1])
    rng = np.random.default_rng(n)
    length = 4 + n % 6
    return {
        "cohort": record,
        "image": rng.integers(0, 256, (IMAGE, IMAGE), dtype=np.uint8),
        "image_box": np.array([2, 0, IMAGE - 4, IMAGE], dtype=np.int32),
        "enhanced_note": f"Note of record {n}.",
        "text_input_ids": rng.integers(1, 30000, length).astype(np.int32),
        "attention_segments": [("special", 0, 1), ("triage", 1, length - 1),
                               ("special", length - 1, length)],
        "clinical_data": np.arange(len(FEATURES), dtype=np.float32) + n,
        "clinical_mask": np.array([True, n % 2 == 0, True, False]),
        "retrieved_knowledge": [f"kb-{n % 5}"],
    }


def make_cohort_records(n_patients: int = 24) -> list[CohortRecord]:
    records, n = [], 0
    for i in range(n_patients):
        for k in range(1 + i % 3):
            labels = labels_with(Edema=1.0, Atelectasis=-1.0) if i % 3 == 0 else None
            records.append(make_cohort(n, 10_000 + i, view="PA" if (i + k) % 3 == 0 else "AP",
                                       triage=i % 4 != 0, vitals=i % 2, labels=labels,
                                       hadm_id=None if n % 5 == 0 else 1))
            n += 1
    return records


def dead_letter(record: CohortRecord, reason: str) -> DeadLetter:
    return DeadLetter.of(record, "image" if reason == FAIL_IMAGE_TRUNCATED else "text", reason,
                         "detail")


def run_pipeline(
    out: str,
    cohort: Sequence[CohortRecord],
    *,
    failed: dict[str, str] = {},  # record_id -> reason: never reaches SpillSamples
    chunk_size: int = 4,
    seed: int = 42,
    indices: Optional[SplitAssignment] = None,
    options: Sequence[str] = (),
) -> None:
    """Cohort -> SplitPatients; samples -> SpillSamples -> WriteChunks -> WriteMetadata."""
    samples = [make_sample(r) for r in cohort if r.record_id not in failed]
    dead = [dead_letter(r, failed[r.record_id]) for r in cohort if r.record_id in failed]
    # What the join and the failing stages would have counted for this cohort.
    upstream = [("cohort/not_frontal", 3), ("cohort/no_ed_stay", 1),
                ("join/images_joined", len(cohort) + 1), ("cohort/records", len(cohort))]
    upstream += [(f"{d.stage}/failed/{d.reason}", 1) for d in dead]
    with BeamTestPipeline(options=runner_options(*options)) as p:
        records = p | "Cohort" >> beam.Create(cohort)
        assignment = records | "Split" >> SplitPatients(RATIOS, seed, indices)
        spilled = p | "Samples" >> beam.Create(samples) | "Spill" >> SpillSamples(out)
        refs = spilled[REFS_TAG]
        chunks = (refs, assignment) | "Chunks" >> WriteChunks(out, chunk_size, seed)
        ledger = (spilled[LEDGER_TAG], p | "Upstream" >> beam.Create(upstream)) | SumLedger()
        _ = {
            "chunks": chunks,
            "refs": refs,
            "assignment": assignment,
            "dead_letters": p | "Dead" >> beam.Create(dead),
            "dropped": p | "Dropped" >> beam.Create([DROP_NOT_FRONTAL] * 3 + [DROP_NO_ED_STAY]),
            "ledger": ledger,
        } | "Metadata" >> WriteMetadata(out, {**CONFIG, "chunk_size": chunk_size},
                                         image_size=IMAGE, feature_names=FEATURES,
                                         max_failed_fraction=1.0)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- pure parts and the DoFn ---------------------------------------------------------------

def test_to_chunk_record_converts_a_sample_to_the_chunk_format() -> None:
    record = make_cohort(5, 77, hadm_id=None, labels=labels_with(Edema=1.0))
    sample = make_sample(record)
    out = to_chunk_record(sample, "val")
    assert out["split"] == "val" and out["hadm_id"] is None and out["subject_id"] == 77
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (IMAGE, IMAGE)
    assert out["text_input_ids"].dtype == torch.int32
    assert out["clinical_mask"].dtype == torch.bool
    assert out["attention_segments"][1] == ["triage", 1, len(sample["text_input_ids"]) - 1]
    assert torch.isnan(out["labels"]).sum() == 13 and out["labels"][3] == 1.0
    # It is what the chunk format accepts, and it survives a round trip.
    back = decode_record(encode_record(out))
    assert torch.equal(back["image"], torch.from_numpy(sample["image"]))
    assert back["enhanced_note"] == sample["enhanced_note"]


@pytest.mark.parametrize(
    "record_id, name",
    [("02aa804e-bde0afdd-112c0b34", "02aa804e-bde0afdd-112c0b34.pt"),
     ("../evil", "h-" + hashlib.sha256(b"../evil").hexdigest() + ".pt")],
)
def test_spill_path_is_a_safe_function_of_the_record_id(record_id: str, name: str) -> None:
    assert spill_path("gs://b/out", record_id) == f"gs://b/out/_tmp/records/{name}"


def _refs(n: int) -> list[SpillRef]:
    return [SpillRef(f"r{i}", i, i, "AP|none|unlabeled", (float("nan"),) * 14, f"/t/r{i}", 1)
            for i in range(n)]


def test_lay_out_split_fills_every_chunk_but_the_last_whatever_the_input_order() -> None:
    refs = _refs(11)
    slots = list(lay_out_split("val", refs, 4, seed=1))
    assert list(lay_out_split("val", list(reversed(refs)), 4, seed=1)) == slots
    by_chunk = collections.defaultdict(list)
    for (split, index), (offset, count, ref) in slots:
        assert split == "val" and count == 3
        by_chunk[index].append(offset)
    assert {i: sorted(o) for i, o in by_chunk.items()} == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3],
                                                           2: [0, 1, 2]}
    assert [s[1][2] for s in lay_out_split("val", refs, 4, seed=2)] != [s[1][2] for s in slots]


def test_lay_out_split_rejects_a_record_seen_twice() -> None:
    with pytest.raises(ValueError, match="r3 reached the chunk writer twice"):
        list(lay_out_split("train", _refs(5) + _refs(5)[3:4], 4, seed=1))


def test_chunk_writer_retried_after_it_deleted_its_records_emits_the_same_chunk(tmp_path):
    out = str(tmp_path)
    cohort = [make_cohort(n, 1) for n in range(3)]
    refs = []
    for record in cohort:
        data = encode_record(to_chunk_record(make_sample(record), ""))
        path = spill_path(out, record.record_id)
        storage.write_bytes(path, data)
        refs.append(SpillRef(record.record_id, 1, record.study_id, "s", record.labels, path,
                             len(data)))
    element = (("test", 0), [(i, 1, ref) for i, ref in reversed(list(enumerate(refs)))])
    fn = _WriteChunkFn(out)
    fn.setup()
    (first,) = fn.process(element)
    assert not any(Path(ref.path).exists() for ref in refs)
    chunk = torch.load(tmp_path / first.path, weights_only=True)
    assert chunk["record_id"] == [r.record_id for r in cohort] and chunk["split"] == "test"
    (again,) = fn.process(element)
    assert again == first
    (tmp_path / first.path).unlink()
    with pytest.raises(FileNotFoundError, match="never written"):
        list(fn.process(element))


# --- the pipeline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort() -> list[CohortRecord]:
    return make_cohort_records()


@pytest.fixture(scope="module")
def failed(cohort) -> dict[str, str]:
    return {cohort[3].record_id: FAIL_IMAGE_TRUNCATED, cohort[10].record_id: FAIL_TEXT,
            cohort[11].record_id: FAIL_IMAGE_TRUNCATED}


@pytest.fixture(scope="module")
def built(cohort, failed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "dataset"
    run_pipeline(str(out), cohort, failed=failed,
                 options=["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    return out


def test_chunks_are_full_named_and_hold_every_good_record_once(built, cohort, failed) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    seen: dict[str, str] = {}
    subject_splits: dict[int, set] = collections.defaultdict(set)
    for split in SPLITS:
        files = sorted((built / split).glob("*"))
        count = math.ceil(meta[f"n_{split}"] / 4)
        assert [f.name for f in files] == [f"{split}-{i:05d}-of-{count:05d}.pt"
                                           for i in range(count)]
        sizes = []
        for path in files:
            chunk = torch.load(path, weights_only=True)
            assert chunk["split"] == split and chunk["image"].shape[1:] == (IMAGE, IMAGE)
            sizes.append(chunk["n"])
            for rid, sid in zip(chunk["record_id"], chunk["subject_id"]):
                assert rid not in seen
                seen[rid] = split
                subject_splits[sid].add(split)
        assert all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
        assert sum(sizes) == meta[f"n_{split}"]
    # Failed records leave no hole: the good ones fill the chunks densely.
    assert set(seen) == {r.record_id for r in cohort} - set(failed)
    assert meta["total_records"] == len(cohort) - len(failed)
    assert all(len(splits) == 1 for splits in subject_splits.values())


def test_a_chunk_record_keeps_its_sample(built, cohort) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    entry = meta["chunks"][0]
    chunk = decode_chunk((built / entry["path"]).read_bytes())
    rid = chunk["record_id"][0]
    record = next(r for r in cohort if r.record_id == rid)
    sample = make_sample(record)
    assert torch.equal(chunk["image"][0], torch.from_numpy(sample["image"]))
    assert chunk["enhanced_note"][0] == sample["enhanced_note"]
    assert chunk["hadm_id"][0] == record.hadm_id


def test_metadata_lists_the_chunks_counts_and_distributions(built, cohort, failed) -> None:
    meta = json.loads((built / "metadata.json").read_text())
    for key in ("format_version", "n_train", "n_val", "n_test", "total_records", "image_size",
                "feature_names", "label_names", "chunks", "config", "versions", "dropped",
                "failed", "splits", "stratification"):
        assert key in meta, key
    assert "patients_not_in_indices" not in meta
    assert meta["format_version"] == 1 and meta["image_size"] == IMAGE
    assert meta["feature_names"] == list(FEATURES) and len(meta["label_names"]) == 14
    assert meta["config"]["chunk_size"] == 4
    assert meta["dropped"]["not_frontal"] == 3 and meta["dropped"]["no_ed_stay"] == 1
    assert meta["failed"]["image_truncated"] == 2 and meta["failed"]["text_failed"] == 1
    assert [(c["split"], c["index"]) for c in meta["chunks"]] == sorted(
        ((c["split"], c["index"]) for c in meta["chunks"]), key=lambda t: (SPLITS.index(t[0]),
                                                                          t[1]))
    for entry in meta["chunks"]:
        data = (built / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    good = [r for r in cohort if r.record_id not in failed]
    assert sum(meta["splits"][s]["records"] for s in SPLITS) == len(good)
    assert sum(meta["splits"][s]["patients"] for s in SPLITS) == len({r.subject_id for r in good})
    edema = sum(meta["splits"][s]["labels"]["Edema"]["positive"] for s in SPLITS)
    assert edema == sum(r.labels[3] == 1.0 for r in good)
    views = collections.Counter()
    for s in SPLITS:
        views.update(meta["splits"][s]["stratification_keys"]["view_position"])
        assert sum(meta["splits"][s]["strata"].values()) == meta["splits"][s]["records"]
    assert views == collections.Counter(r.view_position for r in good)


def test_failed_indices_written_and_temporaries_removed(built, cohort, failed) -> None:
    lines = (built / "failed" / "failed-00000-of-00001.jsonl").read_text().splitlines()
    dead = [json.loads(line) for line in lines]
    assert [d["record_id"] for d in dead] == sorted(failed)
    assert {d["record_id"]: d["reason"] for d in dead} == failed
    assert {d["stage"] for d in dead} == {"image", "text"}
    assert not (built / "_tmp").exists()
    assert not [p for p in built.rglob("*") if ".tmp-" in p.name]
    indices = read_indices(str(built / "stratification_indices.json"))
    assert set(indices.splits) == {r.subject_id for r in cohort}


def test_same_bytes_with_other_worker_count_and_running_mode(built, cohort, failed,
                                                             tmp_path) -> None:
    again = tmp_path / "again"
    run_pipeline(str(again), cohort, failed=failed,
                 options=["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    assert tree(again) == tree(built)


def test_reused_indices_give_the_same_split_and_count_new_patients(built, cohort,
                                                                   tmp_path) -> None:
    saved = read_indices(str(built / "stratification_indices.json"))
    newcomer = make_cohort(999, 99_999)
    out = tmp_path / "reused"
    run_pipeline(str(out), cohort + [newcomer], indices=saved)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["patients_not_in_indices"] == 1
    assert meta["stratification"]["reused_indices"] is True
    again = read_indices(str(out / "stratification_indices.json"))
    assert {s: again.splits[s] for s in saved.splits} == saved.splits
    for split in SPLITS:
        for path in (out / split).glob("*.pt"):
            chunk = torch.load(path, weights_only=True)
            assert {saved.splits.get(s, again.splits[s]) for s in chunk["subject_id"]} == {split}


# --- check_output_dir ----------------------------------------------------------------------

def _leftovers(root: Path) -> None:
    for rel in ("train/train-00000-of-00009.pt", "val/val-00000-of-00001.pt",
                "_tmp/records/x.pt", "failed/failed-00000-of-00001.jsonl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"old")
    (root / "notes.txt").write_text("mine")


def test_check_output_dir_stops_on_a_complete_output(tmp_path) -> None:
    _leftovers(tmp_path)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(InputError, match="complete output.*pass --overwrite"):
        check_output_dir(str(tmp_path), overwrite=False)
    assert (tmp_path / "train" / "train-00000-of-00009.pt").exists()


@pytest.mark.parametrize("complete", [True, False])
def test_check_output_dir_clears_a_replaced_or_crashed_run(tmp_path, complete: bool) -> None:
    _leftovers(tmp_path)
    if complete:
        (tmp_path / "metadata.json").write_text("{}")
    check_output_dir(str(tmp_path), overwrite=complete)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_check_output_dir_accepts_a_new_dir(tmp_path) -> None:
    check_output_dir(str(tmp_path / "new"), overwrite=False)
    assert not (tmp_path / "new").exists()


# --- gs:// ---------------------------------------------------------------------------------

def _blobs(prefix: str) -> dict[str, bytes]:
    from google.cloud import storage

    bucket, _, path = prefix[len("gs://"):].partition("/")
    return {b.name[len(path) + 1:]: b.download_as_bytes()
            for b in storage.Client().list_blobs(bucket, prefix=path + "/")}


def test_gcs_output(gcs_emulator: str, cohort, failed, built) -> None:
    out = f"{gcs_emulator}/out"
    check_output_dir(out, overwrite=False)
    run_pipeline(out, cohort[:12], failed={cohort[3].record_id: FAIL_IMAGE_TRUNCATED})
    blobs = _blobs(out)
    meta = json.loads(blobs["metadata.json"])
    assert meta["total_records"] == 11
    assert not [name for name in blobs if name.startswith("_tmp/") or ".tmp-" in name]
    assert "failed/failed-00000-of-00001.jsonl" in blobs
    for entry in meta["chunks"]:
        data = blobs[entry["path"]]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        chunk = torch.load(io.BytesIO(data), weights_only=True)
        assert chunk["n"] == entry["records"]
    with pytest.raises(InputError, match="complete output"):
        check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=True)
    assert sorted(_blobs(out)) == ["stratification_indices.json"]
