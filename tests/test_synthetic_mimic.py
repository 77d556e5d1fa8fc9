"""The synthetic MIMIC generator: layout and schema, determinism, quirks, images, faults, gs://."""

from __future__ import annotations

import collections
import csv
import datetime as dt
import gzip
import json
import os
import re
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest

from synthetic import mimic
from synthetic.mimic import GeneratedDataset, generate, study_time_text
from transforms.join import schema
from transforms import storage
from synthetic.images import FAULT_KINDS

SMALL = dict(image_height=384, image_width=320, image_pool=4)
TIME = "%Y-%m-%d %H:%M:%S"


def roots_of(result: GeneratedDataset) -> dict[str, str]:
    return {
        schema.MIMIC_IV: result.mimic_iv_dir,
        schema.MIMIC_ED: result.mimic_ed_dir,
        schema.MIMIC_CXR: result.mimic_cxr_dir,
    }


def table_path(result: GeneratedDataset, name: str) -> str:
    spec = schema.TABLES[name]
    return storage.join(roots_of(result)[spec.root], spec.relpath)


def read_table(result: GeneratedDataset, name: str) -> list[dict[str, str]]:
    with storage.open_text(table_path(result, name)) as handle:
        return list(csv.DictReader(handle))


def study_datetime(row: dict[str, str]) -> dt.datetime:
    """StudyDate + StudyTime as the cohort rule reads them (leading zeros lost)."""
    value = float(row["StudyTime"])
    hours, rest = divmod(value, 10000)
    minutes, seconds = divmod(rest, 100)
    assert hours < 24 and minutes < 60 and seconds < 60, row["StudyTime"]
    day = dt.datetime.strptime(row["StudyDate"], "%Y%m%d")
    return day + dt.timedelta(hours=hours, minutes=minutes, seconds=round(seconds, 3))


def linked_stay(row: dict[str, str], stays: list[dict[str, str]]) -> Optional[dict[str, str]]:
    """The SPEC's rule: the containing stay of the same subject with the latest intime (ties:
    the larger stay_id)."""
    moment = study_datetime(row)
    inside = [
        s for s in stays
        if dt.datetime.strptime(s["intime"], TIME) <= moment
        <= dt.datetime.strptime(s["outtime"], TIME)
    ]
    return max(inside, key=lambda s: (s["intime"], int(s["stay_id"]))) if inside else None


def cohort_from_files(result: GeneratedDataset) -> set[tuple[str, str, str, str]]:
    """The default cohort recomputed from the written CSVs alone, read with csv and gzip."""
    ed, cxr = Path(result.mimic_ed_dir), Path(result.mimic_cxr_dir)
    with gzip.open(ed / "ed" / "edstays.csv.gz", "rt", newline="") as handle:
        stays = collections.defaultdict(list)
        for stay in csv.DictReader(handle):
            stays[stay["subject_id"]].append(stay)
    cohort = set()
    with gzip.open(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["ViewPosition"] not in ("AP", "PA"):
                continue
            stay = linked_stay(row, stays[row["subject_id"]])
            if stay is not None:
                cohort.add((row["dicom_id"], row["subject_id"], row["study_id"], stay["stay_id"]))
    return cohort


def answer_of(result: GeneratedDataset) -> tuple[list[tuple[str, ...]], dict]:
    """The generator's answer: cohort.csv.gz rows in file order, and summary.json."""
    with gzip.open(Path(result.answer_dir) / "cohort.csv.gz", "rt", newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["dicom_id", "subject_id", "study_id", "stay_id"]
        rows = [tuple(r) for r in reader]
    summary = json.loads((Path(result.answer_dir) / "summary.json").read_text())
    return rows, summary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDataset:
    out = tmp_path_factory.mktemp("synthetic")
    return generate(str(out), n_patients=60, seed=7, faults=1, **SMALL)


@pytest.fixture(scope="module")
def tables(dataset: GeneratedDataset) -> dict[str, list[dict[str, str]]]:
    return {name: read_table(dataset, name) for name in schema.TABLES}


@pytest.mark.parametrize(
    "moment, noise, text",
    [
        (dt.datetime(2180, 7, 23, 21, 30, 14, 531000), 1, "213014.53100000002"),
        (dt.datetime(2180, 7, 23, 21, 30, 14, 531000), 0, "213014.531"),
        (dt.datetime(2180, 7, 23, 0, 59, 59, 250000), 0, "5959.25"),
        (dt.datetime(2180, 7, 23, 0, 0, 0, 187000), 0, "0.187"),
        (dt.datetime(2180, 7, 23, 8, 47, 23), 0, "84723.0"),
    ],
)
def test_study_time_text_loses_leading_zeros(moment: dt.datetime, noise: int, text: str) -> None:
    assert study_time_text(moment, noise) == text


def test_every_table_has_the_published_header(dataset: GeneratedDataset) -> None:
    assert dataset.mimic_iv_dir.endswith("mimic-iv")
    assert dataset.mimic_ed_dir.endswith("mimic-iv-ed")
    assert dataset.mimic_cxr_dir.endswith("mimic-cxr-jpg")
    for name, spec in schema.TABLES.items():
        path = table_path(dataset, name)
        with gzip.open(path, "rt", newline="") as handle:
            header = next(csv.reader(handle))
        assert tuple(header) == spec.columns, name
    leftovers = [p for p in Path(dataset.mimic_cxr_dir).parent.rglob("*.tmp-*")]
    assert leftovers == []


def test_counts_match_the_tables(
    dataset: GeneratedDataset, tables: dict[str, list[dict[str, str]]]
) -> None:
    counts = dataset.counts
    assert counts["patients"] == len(tables["patients"]) == 60
    assert counts["stays"] == len(tables["edstays"])
    assert counts["images"] == len(tables["metadata"]) == len(tables["split"])
    assert counts["studies"] == len({r["study_id"] for r in tables["metadata"]})
    frontal = [r for r in tables["metadata"] if r["ViewPosition"] in ("AP", "PA")]
    assert counts["frontal_images"] == len(frontal)

    stays = collections.defaultdict(list)
    for stay in tables["edstays"]:
        stays[stay["subject_id"]].append(stay)
    linked = [r for r in frontal if linked_stay(r, stays[r["subject_id"]])]
    # The default cohort, recomputed from the files by the SPEC's rule.
    assert counts["frontal_in_stay"] == len(linked)
    assert 0.3 < len(linked) / len(frontal) < 0.7  # about half the frontal images in a stay
    assert 0.55 < len(frontal) / len(tables["metadata"]) < 0.75


def test_ids_and_dates_look_real(tables: dict[str, list[dict[str, str]]]) -> None:
    assert all(re.fullmatch(r"1\d{7}", r["subject_id"]) for r in tables["patients"])
    assert all(re.fullmatch(r"3\d{7}", r["stay_id"]) for r in tables["edstays"])
    assert all(re.fullmatch(r"2\d{7}", r["hadm_id"]) for r in tables["admissions"])
    assert all(re.fullmatch(r"5\d{7}", r["study_id"]) for r in tables["metadata"])
    dicom = r"[0-9a-f]{8}(-[0-9a-f]{8}){4}"
    assert all(re.fullmatch(dicom, r["dicom_id"]) for r in tables["metadata"])
    assert len({r["dicom_id"] for r in tables["metadata"]}) == len(tables["metadata"])

    years = [int(r["StudyDate"][:4]) for r in tables["metadata"]]
    years += [int(r["intime"][:4]) for r in tables["edstays"]]
    years += [int(r["admittime"][:4]) for r in tables["admissions"]]
    years += [int(r["charttime"][:4]) for r in tables["vitalsign"] + tables["medrecon"]]
    assert 2100 <= min(years) and max(years) <= 2200
    anchor = {r["subject_id"]: int(r["anchor_year"]) for r in tables["patients"]}
    assert all(abs(int(r["intime"][:4]) - anchor[r["subject_id"]]) <= 5 for r in tables["edstays"])
    assert all(18 <= int(r["anchor_age"]) <= 91 for r in tables["patients"])
    assert {r["gender"] for r in tables["patients"]} == {"F", "M"}


def test_real_quirks_are_present(
    dataset: GeneratedDataset, tables: dict[str, list[dict[str, str]]]
) -> None:
    metadata = tables["metadata"]
    times = [r["StudyTime"] for r in metadata]
    assert any(float(t) < 100000 for t in times)  # leading zeros lost
    assert any(len(t.split(".")[1]) > 3 for t in times)  # float noise
    assert all(study_datetime(r) for r in metadata)  # every StudyTime is a valid time of day
    views = collections.Counter(r["ViewPosition"] for r in metadata)
    assert {"AP", "PA", "LATERAL", "LL", ""} <= set(views)
    assert max(collections.Counter(r["study_id"] for r in metadata).values()) >= 2

    stays = tables["edstays"]
    triaged = {r["stay_id"] for r in tables["triage"]}
    untriaged = {s["stay_id"] for s in stays} - triaged
    assert 0 < dataset.counts["stays_without_triage"] == len(untriaged)
    for stay in stays:  # hadm_id blank exactly when not admitted
        assert (stay["hadm_id"] == "") == (stay["disposition"] != "ADMITTED")
    assert {s["hadm_id"] for s in stays if s["hadm_id"]} <= {
        a["hadm_id"] for a in tables["admissions"]
    }
    by_subject = collections.defaultdict(list)
    for stay in stays:
        by_subject[stay["subject_id"]].append((stay["intime"], stay["outtime"]))
    overlapping = [
        s for s in by_subject.values()
        if any(a[0] < b[0] < a[1] for a in s for b in s if a != b)
    ]
    assert overlapping and max(len(s) for s in by_subject.values()) >= 3

    vitals = tables["triage"] + tables["vitalsign"]
    implausible = [
        r for r in vitals
        if (r["temperature"] and float(r["temperature"]) > 200)
        or (r["o2sat"] and float(r["o2sat"]) > 100)
        or r["heartrate"] == "0.0"
        or (r["dbp"] and float(r["dbp"]) > 500)
    ]
    assert implausible
    pains = {r["pain"] for r in vitals}
    assert {"uta", "", "0"} <= pains and pains - {str(i) for i in range(11)} - {""}
    assert {r["acuity"] for r in tables["triage"]} <= {"1.0", "2.0", "3.0", "4.0", "5.0", ""}
    assert any("," in r["chiefcomplaint"] for r in tables["triage"])

    labelled = {r["study_id"] for r in tables["chexpert"]}
    assert 0 < dataset.counts["studies_without_chexpert"] == len(
        {r["study_id"] for r in metadata} - labelled
    )
    values = {r[label] for r in tables["chexpert"] for label in schema.CHEXPERT_LABELS}
    assert values == {"1.0", "0.0", "-1.0", ""}
    assert {r["split"] for r in tables["split"]} <= {"train", "validate", "test"}
    assert len({(r["subject_id"], r["split"]) for r in tables["split"]}) == 60  # per patient


def test_charted_rows_fall_inside_the_stay_and_some_after_the_study(
    tables: dict[str, list[dict[str, str]]]
) -> None:
    stays = {s["stay_id"]: s for s in tables["edstays"]}
    by_subject = collections.defaultdict(list)
    for stay in tables["edstays"]:
        by_subject[stay["subject_id"]].append(stay)
    for name in ("vitalsign", "medrecon"):
        for row in tables[name]:
            stay = stays[row["stay_id"]]
            assert stay["intime"] <= row["charttime"] <= stay["outtime"], name
    study_times = collections.defaultdict(list)
    for row in tables["metadata"]:
        stay = linked_stay(row, by_subject[row["subject_id"]])
        if stay:
            study_times[stay["stay_id"]].append(study_datetime(row))
    for name in ("vitalsign", "medrecon"):
        after = [
            r for r in tables[name] if r["stay_id"] in study_times
            and dt.datetime.strptime(r["charttime"], TIME) > min(study_times[r["stay_id"]])
        ]
        before = [
            r for r in tables[name] if r["stay_id"] in study_times
            and dt.datetime.strptime(r["charttime"], TIME) <= min(study_times[r["stay_id"]])
        ]
        assert after and before, name


def test_images_decode_at_the_metadata_size(
    dataset: GeneratedDataset, tables: dict[str, list[dict[str, str]]]
) -> None:
    faulted = {d for ids in dataset.faults.values() for d in ids}
    inodes = set()
    for row in tables["metadata"]:
        if row["dicom_id"] in faulted:
            continue
        path = os.path.join(
            dataset.mimic_cxr_dir,
            schema.image_relpath(int(row["subject_id"]), int(row["study_id"]), row["dicom_id"]),
        )
        data = Path(path).read_bytes()
        assert data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9"), path
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert pixels is not None and pixels.dtype == np.uint8, path
        assert pixels.shape == (int(row["Rows"]), int(row["Columns"])), path
        inodes.add(os.stat(path).st_ino)
    # A pool of encoded images reused through hard links, not one file per image.
    assert len(inodes) <= SMALL["image_pool"]


def test_faults_plant_the_broken_files(
    dataset: GeneratedDataset, tables: dict[str, list[dict[str, str]]]
) -> None:
    rows = {r["dicom_id"]: r for r in tables["metadata"]}
    assert set(dataset.faults) == set(FAULT_KINDS)
    assert all(len(ids) == 1 for ids in dataset.faults.values())
    stays = collections.defaultdict(list)
    for stay in tables["edstays"]:
        stays[stay["subject_id"]].append(stay)

    def path_of(kind: str) -> str:
        row = rows[dataset.faults[kind][0]]
        assert row["ViewPosition"] in ("AP", "PA")  # a cohort record, so a dead letter
        assert linked_stay(row, stays[row["subject_id"]]) is not None
        return os.path.join(
            dataset.mimic_cxr_dir,
            schema.image_relpath(int(row["subject_id"]), int(row["study_id"]), row["dicom_id"]),
        )

    assert not os.path.exists(path_of("missing"))
    assert os.path.getsize(path_of("empty")) == 0
    truncated = Path(path_of("truncated")).read_bytes()
    assert truncated.startswith(b"\xff\xd8") and not truncated.endswith(b"\xff\xd9")
    assert 1000 < len(truncated)
    text = Path(path_of("not_an_image")).read_bytes()
    assert text and not text.startswith(b"\xff\xd8")
    assert cv2.imdecode(np.frombuffer(text, np.uint8), cv2.IMREAD_UNCHANGED) is None


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    args = dict(n_patients=12, image_height=48, image_width=40, image_pool=2)
    first = generate(str(tmp_path / "a"), seed=3, **args)
    second = generate(str(tmp_path / "b"), seed=3, **args)
    other = generate(str(tmp_path / "c"), seed=4, **args)
    for name in schema.TABLES:
        data = Path(table_path(first, name)).read_bytes()
        assert Path(table_path(second, name)).read_bytes() == data, name
        assert Path(table_path(other, name)).read_bytes() != data, name
    images_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    images_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert images_a == images_b and len(images_a) == first.counts["images"]
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
               for p in images_a)
    assert first.counts == second.counts


def test_rerun_with_faults_leaves_the_shared_images_intact(tmp_path: Path) -> None:
    """Faults overwrite a hard-linked file by replacing it, never through the link."""
    args = dict(n_patients=10, seed=5, image_height=48, image_width=40, image_pool=1)
    clean = generate(str(tmp_path), **args)
    rerun = generate(str(tmp_path), faults=1, **args)
    faulted = {d for ids in rerun.faults.values() for d in ids}
    good = [p for p in tmp_path.rglob("*.jpg") if p.stem not in faulted]
    assert len(good) == clean.counts["images"] - len(faulted)
    # OpenCV decodes a truncated JPEG with only a warning: check the bytes are whole too.
    assert len({p.read_bytes() for p in good}) == 1
    assert all(p.read_bytes().endswith(b"\xff\xd9") for p in good)
    sizes = {
        r["dicom_id"]: (int(r["Rows"]), int(r["Columns"])) for r in read_table(rerun, "metadata")
    }
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == sizes[p.stem] for p in good)
    assert not any(p.stem in rerun.faults["missing"] for p in tmp_path.rglob("*.jpg"))


def test_bad_arguments_fail_clearly_and_publish_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_patients=0"):
        generate(str(tmp_path), n_patients=0, **SMALL)
    with pytest.raises(ValueError, match="image size 8x320"):
        generate(str(tmp_path), image_height=8, image_width=320)
    with pytest.raises(ValueError, match=r"faults=500 needs 2000 frontal images"):
        generate(str(tmp_path), n_patients=3, faults=500, **SMALL)
    assert list(tmp_path.rglob("*.csv.gz*")) == []


def test_cli_prints_where_and_what(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = mimic.main([
        "--output_dir", str(tmp_path), "--n_patients", "5", "--seed", "1",
        "--image_height", "40", "--image_width", "32", "--image_pool", "2", "--faults", "1",
    ])
    out = capsys.readouterr().out
    assert f"--mimic_cxr_dir {tmp_path}/mimic-cxr-jpg" in out
    assert f"frontal_in_stay={result.counts['frontal_in_stay']}" in out
    assert f"fault missing: {result.faults['missing'][0]}" in out

    with pytest.raises(SystemExit) as exit_info:
        mimic.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--output_dir", "--n_patients", "--seed", "--image_height", "--image_width",
                 "--image_pool", "--faults", "--radiograph_dir"):
        assert flag in help_text

    with pytest.raises(SystemExit, match="faults=99 needs"):
        mimic.main(["--output_dir", str(tmp_path / "x"), "--n_patients", "2",
                              "--faults", "99", "--image_height", "40", "--image_width", "32"])


def test_writes_to_gcs(gcs_emulator: str) -> None:
    result = generate(
        f"{gcs_emulator}/synthetic", n_patients=6, seed=2, image_height=48, image_width=40,
        image_pool=2, faults=1,
    )
    assert result.mimic_cxr_dir == f"{gcs_emulator}/synthetic/mimic-cxr-jpg"
    for name, spec in schema.TABLES.items():
        with storage.open_text(table_path(result, name)) as handle:
            assert tuple(next(csv.reader(handle))) == spec.columns, name
    metadata = read_table(result, "metadata")
    assert len(metadata) == result.counts["images"]
    images = storage.list_files(f"{result.mimic_cxr_dir}/files/**")
    assert len(images) == result.counts["images"] - 1  # the missing one
    missing = result.faults["missing"][0]
    assert not any(missing in path for path in images)
    faulted = {d for ids in result.faults.values() for d in ids}
    row = next(r for r in metadata if r["dicom_id"] not in faulted)
    data = storage.read_bytes(
        storage.join(result.mimic_cxr_dir, schema.image_relpath(
            int(row["subject_id"]), int(row["study_id"]), row["dicom_id"]))
    )
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels.shape == (int(row["Rows"]), int(row["Columns"]))
    empty = result.faults["empty"][0]
    assert [len(storage.read_bytes(p)) for p in images if empty in p] == [0]


def test_answer_is_the_cohort_recomputed_from_the_files(
    dataset: GeneratedDataset, tables: dict[str, list[dict[str, str]]]
) -> None:
    rows, summary = answer_of(dataset)
    assert Path(dataset.answer_dir) == Path(dataset.mimic_cxr_dir).parent / "answer"
    assert rows == sorted(rows) and len(set(rows)) == len(rows)  # sorted by dicom_id
    assert set(rows) == cohort_from_files(dataset)
    # Planted faults are linked images: they stay in the answer (dead letters later).
    faulted = {d for ids in dataset.faults.values() for d in ids}
    assert faulted and faulted <= {r[0] for r in rows}
    assert summary["faults"] == {k: list(v) for k, v in dataset.faults.items()}
    assert summary["linked_images"] == len(rows) == dataset.counts["frontal_in_stay"]
    assert summary["linked_patients"] == len({r[1] for r in rows})
    assert summary["linked_patients"] == dataset.counts["linked_patients"]
    assert summary["rows"] == {name: len(tables[name]) for name in schema.TABLES}
    assert summary["images"] == len(tables["metadata"])
    assert summary["frontal_images"] == dataset.counts["frontal_images"]


def test_scale_plan_aims_at_mimic_row_counts() -> None:
    plan = mimic.plan_scale("mimic")
    assert plan.factor == 1.0 and plan.n_patients == 364_627
    expected = mimic.expected_counts(plan)
    for name, real in mimic.MIMIC_ROW_COUNTS.items():
        assert abs(expected[name] / real - 1) < 0.02, (name, expected[name], real)
    assert 0.63 < expected["frontal_images"] / expected["metadata"] < 0.66
    assert 108_000 < expected["linked_images"] < 116_000
    groups = plan.groups
    ed = groups["ed_and_cxr"] + groups["ed_only"]
    assert 200_000 < ed < 210_000 and 0.2 < groups["ed_and_cxr"] / ed < 0.3
    assert groups["cxr_only"] > 0 and groups["neither"] > 0

    tenth = mimic.plan_scale(0.1)
    assert tenth.groups == {k: round(v / 10) for k, v in groups.items()}
    assert mimic.plan_scale("0.1") == tenth
    for bad in ("big", 0, -1, 11, "nan"):
        with pytest.raises(ValueError, match="scale="):
            mimic.plan_scale(bad)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDataset:
    """MIMIC's shape at 1/500 of its size (~730 patients), tables only."""
    out = tmp_path_factory.mktemp("scaled")
    return generate(str(out), scale=0.002, seed=11, images=False, faults=1)


def test_small_scale_has_mimic_shape_and_the_answer_holds(scaled: GeneratedDataset) -> None:
    plan = mimic.plan_scale(0.002)
    expected = mimic.expected_counts(plan)
    groups = plan.groups
    counts = scaled.counts
    assert counts["patients"] == plan.n_patients
    assert counts["ed_subjects"] == groups["ed_and_cxr"] + groups["ed_only"]
    assert counts["cxr_subjects"] == groups["ed_and_cxr"] + groups["cxr_only"]
    for name, key in (("edstays", "stays"), ("metadata", "images"), ("admissions", "admissions"),
                      ("vitalsign", "vitalsign"), ("medrecon", "medrecon")):
        assert abs(counts[key] / expected[name] - 1) < 0.2, (name, counts[key], expected[name])
    assert abs(counts["frontal_in_stay"] / expected["linked_images"] - 1) < 0.2
    assert counts["stays_without_triage"] <= 0.01 * counts["stays"]
    assert list(Path(scaled.mimic_cxr_dir).rglob("*.jpg")) == []

    patients = {r["subject_id"] for r in read_table(scaled, "patients")}
    with_stays = {r["subject_id"] for r in read_table(scaled, "edstays")}
    with_cxr = {r["subject_id"] for r in read_table(scaled, "metadata")}
    assert with_stays | with_cxr < patients  # hosp-only patients exist
    assert with_cxr - with_stays and with_stays - with_cxr and with_stays & with_cxr
    # CXR subjects interleave with the others over the whole id range.
    ordered = sorted(patients, key=int)
    flags = [s in with_cxr for s in ordered]
    assert sum(a != b for a, b in zip(flags, flags[1:])) > len(with_cxr) // 2

    rows, summary = answer_of(scaled)
    assert set(rows) == cohort_from_files(scaled)
    assert summary["linked_patients"] == len({r[1] for r in rows}) > 0
    assert summary["arguments"]["scale"] == 0.002 and not summary["arguments"]["images"]
    assert {d for ids in scaled.faults.values() for d in ids} <= {r[0] for r in rows}


def test_tables_only_gives_the_same_csvs_and_no_jpeg(tmp_path: Path) -> None:
    args = dict(n_patients=12, seed=3, image_height=48, image_width=40, image_pool=2, faults=1)
    full = generate(str(tmp_path / "full"), **args)
    bare = generate(str(tmp_path / "bare"), images=False, **args)
    assert list((tmp_path / "bare").rglob("*.jpg")) == []
    assert len(list((tmp_path / "full").rglob("*.jpg"))) == full.counts["images"] - 1
    for name in schema.TABLES:
        assert Path(table_path(bare, name)).read_bytes() == Path(
            table_path(full, name)).read_bytes(), name
    assert (Path(bare.answer_dir) / "cohort.csv.gz").read_bytes() == (
        Path(full.answer_dir) / "cohort.csv.gz").read_bytes()
    assert bare.faults == full.faults


def test_scaled_generation_is_deterministic(tmp_path: Path, scaled: GeneratedDataset) -> None:
    again = generate(str(tmp_path), scale=0.002, seed=11, images=False, faults=1)
    for name in schema.TABLES:
        assert Path(table_path(again, name)).read_bytes() == Path(
            table_path(scaled, name)).read_bytes(), name
    for name in ("cohort.csv.gz", "summary.json"):
        assert (Path(again.answer_dir) / name).read_bytes() == (
            Path(scaled.answer_dir) / name).read_bytes(), name


def test_cli_scale_and_no_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = mimic.main([
        "--output_dir", str(tmp_path), "--scale", "0.0005", "--no_images", "--seed", "2",
    ])
    out = capsys.readouterr().out
    assert f"answer          {tmp_path}/answer/cohort.csv.gz" in out
    assert result.counts["images_written"] == 0
    assert result.counts["patients"] == mimic.plan_scale(0.0005).n_patients
    assert list(tmp_path.rglob("*.jpg")) == []
    with pytest.raises(SystemExit, match="not both"):
        mimic.main(["--output_dir", str(tmp_path), "--scale", "mimic",
                              "--n_patients", "5"])
    with pytest.raises(SystemExit, match="scale='huge'"):
        mimic.main(["--output_dir", str(tmp_path), "--scale", "huge"])
    with pytest.raises(SystemExit) as exit_info:
        mimic.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--scale" in help_text and "--no_images" in help_text
