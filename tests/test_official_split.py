"""--split official: the official MIMIC-CXR-JPG split table, by subject, from its rows to the
records' splits (pure rules, the Beam pass, the flag, the ledger, and end to end)."""

from __future__ import annotations

import collections
import csv
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import build_dataset
from pipelines.config import DatasetOptions, config_from_options
from synthetic.mimic import generate
from transforms.join import schema
from transforms.chunks import ChunkedDataset
from transforms.join.cohort import JOIN_TABLES
from transforms.errors import InputError
from transforms.ledger import ARRIVED_SPLIT_TABLE_ROWS, ConservationError, check_conservation
from transforms.splits import (
    DEFAULT_RATIOS,
    OFFICIAL,
    OfficialCounts,
    PatientStratum,
    SplitPatients,
    SubjectSplit,
    hash_split,
    indices_bytes,
    make_assignment,
    official_assignment,
    parse_indices,
    patient_stratum,
    record_stratum,
    subject_split,
    table_splits,
)
from transforms.join.tables import ReadTables, check_tables
from tests.test_ledger import _balanced
from tests.test_splits import make_cohort, runner_options
from tests.test_tables import fn_api_pipeline, make_roots, write_table

REPO = Path(__file__).resolve().parents[1]
OURS = {"train": "train", "validate": "val", "test": "test"}
SPLIT_TABLE = schema.TABLES["split"]


# --- pure rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("counts, expected", [
    ({"train": 3}, SubjectSplit("train", 3, False)),
    ({"validate": 2}, SubjectSplit("val", 2, False)),
    ({"test": 1}, SubjectSplit("test", 1, False)),
    # Conflicts go to the most restrictive split: no official test image is trained on.
    ({"train": 5, "test": 1}, SubjectSplit("test", 6, True)),
    ({"train": 1, "validate": 1}, SubjectSplit("val", 2, True)),
    ({"validate": 2, "test": 2, "train": 2}, SubjectSplit("test", 6, True)),
])
def test_subject_split_maps_names_and_resolves_conflicts(counts, expected) -> None:
    assert subject_split(10000032, counts) == expected


@pytest.mark.parametrize("value", ["valid", "TRAIN", None])
def test_an_unknown_split_value_is_an_input_error_naming_it(value) -> None:
    with pytest.raises(InputError, match=rf"mimic-cxr-2.0.0-split.csv.gz: subject 7 has split "
                                         rf"{value!r}; allowed: test, train, validate"):
        subject_split(7, {"train": 1, value: 1})


def test_table_splits_reduces_image_rows_to_one_entry_per_subject() -> None:
    rows = [(1, "train"), (2, "validate"), (1, "train"), (3, "test"), (3, "train"),
            (2, "validate")]
    assert table_splits(rows) == {
        1: SubjectSplit("train", 2, False),
        2: SubjectSplit("val", 2, False),
        3: SubjectSplit("test", 2, True),
    }


def _patients(*subjects: int) -> list[PatientStratum]:
    return [PatientStratum(s, "AP|none|unlabeled", 1 + s % 3) for s in subjects]


def test_official_assignment_follows_the_table_and_hashes_absent_patients(caplog) -> None:
    table = table_splits([(1, "train"), (2, "validate"), (3, "test"), (3, "train"),
                          (99, "test"), (99, "test")])  # 99: not in the cohort
    absent = list(range(100, 140))
    with caplog.at_level(logging.WARNING, logger="transforms.splits"):
        got = official_assignment(_patients(1, 2, 3, *absent), table, DEFAULT_RATIOS, 42)
    assert {s: got.splits[s] for s in (1, 2, 3)} == {1: "train", 2: "val", 3: "test"}
    # Absent patients: the stable hash against the ratios and seed, as for reused indices.
    assert {s: got.splits[s] for s in absent} == {
        s: hash_split(s, DEFAULT_RATIOS, 42) for s in absent}
    assert set(got.splits.values()) == {"train", "val", "test"}
    assert 99 not in got.splits
    assert got.source == OFFICIAL and got.seed == 42 and got.ratios == DEFAULT_RATIOS
    assert got.official == OfficialCounts(patients_from_table=3, patients_not_in_table=40,
                                          patients_with_conflicting_splits=1, table_rows=6)
    assert "40 of 43 patients are not in mimic-cxr-2.0.0-split.csv.gz" in caplog.text
    assert "1 patients have rows of several splits" in caplog.text


def test_official_indices_say_their_source_and_read_back() -> None:
    table = table_splits([(1, "train"), (2, "test")])
    assignment = make_assignment(_patients(1, 2, 3), DEFAULT_RATIOS, 42, table=table)
    assert assignment.records == sum(p.n_records for p in _patients(1, 2, 3))
    doc = json.loads(indices_bytes(assignment))
    assert doc["split_source"] == OFFICIAL and doc["stratification_keys"] == []
    # A later run can reuse them like any indices file.
    assert parse_indices(indices_bytes(assignment)).splits == assignment.splits


# --- the Beam pass -------------------------------------------------------------------------

def _cohort() -> list:
    records, n = [], 0
    for i in range(12):
        for _ in range(1 + i % 3):
            records.append(make_cohort(n, 10_000 + i, view="PA" if i % 2 else "AP"))
            n += 1
    return records


def _table_rows(splits: dict[int, list[str]]) -> list[tuple]:
    """Split table rows (dicom_id, study_id, subject_id, split), one per listed image."""
    return [(f"d{subject}-{k}", 50_000_000 + k, subject, split)
            for subject, names in splits.items() for k, split in enumerate(names)]


def test_split_patients_follows_the_table_read_as_a_side_input() -> None:
    cohort = _cohort()
    named = ["train", "validate", "test"]
    # Subjects 10000..10009 in the table (10004 in two splits), 10010 and 10011 absent, and
    # two subjects without records.
    table = {10_000 + i: [named[i % 3]] * (1 + i % 2) for i in range(10)}
    table[10_004] = ["train", "validate", "train"]
    table.update({90_001: ["test"], 90_002: ["train", "train"]})
    rows = _table_rows(table)
    counts: dict[int, dict[str, int]] = {}
    for record in cohort:
        stratum = record_stratum(record)
        counts.setdefault(record.subject_id, {}).setdefault(stratum, 0)
        counts[record.subject_id][stratum] += 1
    patients = [patient_stratum(s, c) for s, c in counts.items()]
    expected = make_assignment(patients, (0.6, 0.2, 0.2), 3,
                               table=table_splits((r[2], r[3]) for r in rows))

    def check(outputs) -> None:
        (assignment,) = outputs
        assert assignment == expected
        assert assignment.records == len(cohort)
        for subject, names in table.items():
            if subject in counts and subject != 10_004:
                assert assignment.splits[subject] == OURS[names[0]]
        assert assignment.splits[10_004] == "val"
        assert assignment.official == OfficialCounts(10, 2, 1, len(rows))

    with BeamTestPipeline(options=runner_options()) as p:
        table_rows = p | "Table" >> beam.Create(rows)
        out = (p | "Cohort" >> beam.Create(cohort)
               | SplitPatients((0.6, 0.2, 0.2), seed=3, table=table_rows))
        assert_that(out, check)
        assert_that(out | beam.Map(lambda a: a.arrived()[ARRIVED_SPLIT_TABLE_ROWS]),
                    equal_to([len(rows)]), label="TableRowsArrive")


def test_the_table_is_read_from_a_requester_pays_bucket(gcs_emulator: str) -> None:
    roots = make_roots(f"{gcs_emulator}/official-split")
    rows = _table_rows({10_000: ["test", "test"], 10_001: ["validate"], 99: ["train"]})
    write_table(roots, "split", [dict(zip(SPLIT_TABLE.columns, row)) for row in rows])
    check_tables(roots, names=["split"], user_project="billed-project")
    cohort = [make_cohort(0, 10_000), make_cohort(1, 10_001), make_cohort(2, 10_002)]

    def check(outputs) -> None:
        (assignment,) = outputs
        assert dict(assignment.splits) == {
            10_000: "test", 10_001: "val", 10_002: hash_split(10_002, DEFAULT_RATIOS, 42)}
        assert assignment.official == OfficialCounts(2, 1, 0, len(rows))

    with fn_api_pipeline() as p:
        tables = p | ReadTables(roots, names=["split"], user_project="billed-project")
        out = p | beam.Create(cohort) | SplitPatients(table=tables["split"])
        assert_that(out, check)

    path = write_table(roots, "split", drop_columns=["split"])
    with pytest.raises(InputError, match=rf"^{SPLIT_TABLE.relpath} \({path}\) is missing "
                                         "column 'split'$"):
        check_tables(roots, names=["split"], user_project="billed-project")


def test_split_patients_fails_on_an_unknown_split_value() -> None:
    rows = _table_rows({10_000: ["train", "holdout"]})
    with pytest.raises(Exception, match="subject 10000 has split 'holdout'"):
        with BeamTestPipeline(options=runner_options()) as p:
            table_rows = p | "Table" >> beam.Create(rows)
            _ = p | "Cohort" >> beam.Create(_cohort()) | SplitPatients(table=table_rows)


# --- the flag, the ledger ------------------------------------------------------------------

def _config(*argv: str):
    return config_from_options(DatasetOptions(list(argv)))


def test_the_flag_defaults_to_stratified_and_matches_any_case() -> None:
    assert _config().split == "stratified"
    assert _config("--split", "OFFICIAL").split == "official"
    assert _config("--split", "official").summary()["split"] == "official"
    assert "--split {stratified,official}" in build_dataset.help_text()


def test_the_official_split_cannot_reuse_indices() -> None:
    with pytest.raises(InputError, match="--split official follows the official split table; "
                                         "it cannot reuse --stratification_indices"):
        _config("--split", "official", "--stratification_indices", "x.json")


def test_the_ledger_counts_every_split_table_row() -> None:
    ledger = {**_balanced(), "tables/split_rows": 7, ARRIVED_SPLIT_TABLE_ROWS: 7}
    check_conservation(ledger, JOIN_TABLES, committed=False)
    with pytest.raises(ConservationError, match=r"at split table: split_rows 7 != "
                                                r"split_table_rows 6 = 6 \(\+1\)"):
        check_conservation({**ledger, ARRIVED_SPLIT_TABLE_ROWS: 6}, JOIN_TABLES,
                           committed=False)


# --- end to end ----------------------------------------------------------------------------

IMAGE_SIZE = 32


def _read_table(path: str) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def _write_table(path: str, rows: list[dict[str, str]]) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, SPLIT_TABLE.columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    """16 generated patients, 2 of them left out of the split table by the generator. The
    real table's weights put nearly everyone in train, so the splits are rewritten by subject
    across all three, and one cohort patient gets rows of train and test."""
    data = generate(str(tmp_path_factory.mktemp("mimic")), n_patients=16, seed=5,
                    image_height=64, image_width=48, image_pool=2, split_missing=2)
    path = os.path.join(data.mimic_cxr_dir, SPLIT_TABLE.relpath)
    rows = _read_table(path)
    subjects = sorted({r["subject_id"] for r in rows}, key=int)
    names = ("train", "validate", "test")
    for row in rows:
        row["split"] = names[subjects.index(row["subject_id"]) % 3]
    linked = {r["subject_id"] for r in _read_table(os.path.join(data.answer_dir,
                                                                "cohort.csv.gz"))}
    images = collections.Counter(r["subject_id"] for r in rows)
    conflicted = next(s for s in subjects[::3] if s in linked and images[s] > 1)
    next(r for r in rows if r["subject_id"] == conflicted)["split"] = "test"
    _write_table(path, rows)
    return data, rows, int(conflicted)


def _argv(data, out: Path, *extra: str) -> list[str]:
    return [
        "--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
        "--mimic_cxr_dir", data.mimic_cxr_dir, "--output_dir", str(out),
        "--image_size", str(IMAGE_SIZE), "--chunk_size", "5", "--max_text_length", "64",
        "--runner", "DirectRunner", "--direct_running_mode", "in_memory",
        "--direct_num_workers", "1", *extra,
    ]


def test_every_record_is_in_its_subjects_official_split(synthetic, tmp_path: Path) -> None:
    data, rows, conflicted = synthetic
    table: dict[int, set[str]] = {}
    for row in rows:
        table.setdefault(int(row["subject_id"]), set()).add(OURS[row["split"]])
    out = tmp_path / "out"
    meta = build_dataset.run(_argv(data, out, "--split", "official"))

    seen: dict[int, str] = {}
    for split in ("train", "val", "test"):
        dataset = ChunkedDataset(str(out), split, mode="map")
        for i in range(len(dataset)):
            record = dataset[i]
            subject = record["subject_id"]
            assert record["split"] == split
            assert seen.setdefault(subject, split) == split  # patient-level
    absent = set(data.not_in_split)
    assert len(absent) == 2 and absent <= set(seen) and not absent & set(table)
    for subject, split in seen.items():
        if subject in absent:
            assert split == hash_split(subject, DEFAULT_RATIOS, 42)
        elif subject == conflicted:
            assert table[subject] == {"train", "test"} and split == "test"
        else:
            assert {split} == table[subject]
    assert set(seen.values()) == {"train", "val", "test"}

    assert meta["split_source"] == "official" and meta["config"]["split"] == "official"
    assert meta["official_split"] == {
        "table": SPLIT_TABLE.relpath,
        "patients_from_table": len(seen) - 2,
        "patients_not_in_table": 2,
        "patients_with_conflicting_splits": 1,
        "table_rows": len(rows),
    }
    indices = json.loads((out / "stratification_indices.json").read_text())
    assert indices["split_source"] == "official"
    assert {int(s): split for s, split in indices["patients"].items()} == seen
    card = (out / "DATASET_CARD.md").read_text()
    assert (f"The official MIMIC-CXR-JPG split (`{SPLIT_TABLE.relpath}`, by subject; validate "
            f"is val): {len(seen) - 2} patients from the table, 2 absent from it assigned by a "
            "stable hash (seed 42) against the shares train 0.7, val 0.15, test 0.15, 1 with "
            "rows in several splits put in the most restrictive (test, then val).") in card
    assert f"| val | {meta['n_val']} | {len(seen_in(seen, 'val'))} | " in card
    assert "| target share |" in card and "| none |" in card
    assert '<td>split source</td><td data-key="split source.value">official</td>' in (
        out / "report.html").read_text()


def seen_in(seen: dict[int, str], split: str) -> set[int]:
    return {subject for subject, s in seen.items() if s == split}


def _module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipelines.build_dataset", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_a_split_table_missing_or_without_its_split_column_stops_before_any_work(
    tmp_path: Path,
) -> None:
    data = generate(str(tmp_path / "mimic"), n_patients=3, seed=1, images=False)
    path = os.path.join(data.mimic_cxr_dir, SPLIT_TABLE.relpath)
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _read_table(path)]
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, ("dicom_id", "study_id", "subject_id"))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    done = _module(*_argv(data, out, "--split", "official"))
    assert done.returncode == 2
    assert done.stderr == (f"error: {SPLIT_TABLE.relpath} ({path}) is missing column "
                           "'split'\n")
    assert not out.exists()
    os.remove(path)
    with pytest.raises(InputError, match=f"{SPLIT_TABLE.relpath} not found: {path}"):
        build_dataset.run(_argv(data, out, "--split", "official", "--compute_indices_only"))
    assert not out.exists()
    # A stratified run does not read the table: it runs without it, and says its source.
    build_dataset.run(_argv(data, out, "--compute_indices_only"))
    indices = json.loads((out / "stratification_indices.json").read_text())
    assert "split_source" not in indices and indices["stratification_keys"]


def test_a_bad_value_inside_the_split_table_stops_the_run_with_one_line(tmp_path: Path) -> None:
    """Found only while the pipeline reads the table: still one line, exit 2, no commit."""
    data = generate(str(tmp_path / "mimic"), n_patients=3, seed=1, image_height=64,
                    image_width=48, image_pool=2)
    path = os.path.join(data.mimic_cxr_dir, SPLIT_TABLE.relpath)
    rows = _read_table(path)
    linked = {r["subject_id"] for r in _read_table(os.path.join(data.answer_dir,
                                                                "cohort.csv.gz"))}
    bad = next(r for r in rows if r["subject_id"] in linked)  # only the cohort's rows matter
    bad["split"] = "holdout"
    _write_table(path, rows)
    out = tmp_path / "out"
    args = _argv(data, out, "--split", "official", "--compute_indices_only")
    runner = args.index("--direct_running_mode")
    done = _module(*args[:runner], *args[runner + 4:])  # the default local runner
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        f"error: {SPLIT_TABLE.relpath}: subject {bad['subject_id']} has split 'holdout'; "
        "allowed: test, train, validate; nothing was committed\n")
    assert not (out / "stratification_indices.json").exists()


def test_the_generator_leaves_subjects_out_of_the_split_table_and_nothing_else(
    tmp_path: Path,
) -> None:
    full = generate(str(tmp_path / "full"), n_patients=20, seed=2, images=False)
    holed = generate(str(tmp_path / "holed"), n_patients=20, seed=2, images=False,
                     split_missing=3)
    split_path = Path(holed.mimic_cxr_dir) / SPLIT_TABLE.relpath
    linked = {int(r["subject_id"]) for r in _read_table(os.path.join(holed.answer_dir,
                                                                     "cohort.csv.gz"))}
    assert len(holed.not_in_split) == 3 and set(holed.not_in_split) <= linked

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file()}

    before, after = files(tmp_path / "full"), files(tmp_path / "holed")
    changed = {name for name in before if before[name] != after.get(name)}
    assert changed == {str(split_path.relative_to(tmp_path / "holed")), "answer/summary.json"}
    kept = [r for r in _read_table(os.path.join(full.mimic_cxr_dir, SPLIT_TABLE.relpath))
            if int(r["subject_id"]) not in holed.not_in_split]
    assert _read_table(str(split_path)) == kept
    summary = json.loads(after["answer/summary.json"])
    assert summary["not_in_split"] == list(holed.not_in_split)
    assert summary["rows"]["split"] == len(kept)
