"""The cohort join: StudyDate/StudyTime parsing, stay matching, and JoinCohort end to end."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.test_tables import make_roots, write_table
from transforms import records
from transforms.join import schema
from transforms.join.cohort import (
    METRICS_NAMESPACE,
    RECORDS_TAG,
    EdStay,
    JoinCohort,
    parse_study_datetime,
    parse_table_datetime,
    pick_stay,
)
from transforms.ledger import LEDGER_TAG
from transforms.join.tables import FLOAT_COLUMNS, ReadTables, check_tables, columns

D = dt.datetime


def fn_api_pipeline() -> test_pipeline.TestPipeline:
    return test_pipeline.TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "study_date, study_time, expected",
    [
        ("21800723", "0.187", D(2180, 7, 23, 0, 0, 0, 187000)),
        ("21800723", "5959.25", D(2180, 7, 23, 0, 59, 59, 250000)),
        ("21800723", "84723.0", D(2180, 7, 23, 8, 47, 23)),
        ("21800723", "213014.53100000002", D(2180, 7, 23, 21, 30, 14, 531000)),
        ("21800723", "213014.99999999997", D(2180, 7, 23, 21, 30, 15)),
        ("21800723", "235959.9996", D(2180, 7, 24, 0, 0, 0)),  # rounds into the next day
        ("21800723", "0", D(2180, 7, 23)),
        (21800723, 84723.0, D(2180, 7, 23, 8, 47, 23)),  # numbers as well as strings
        ("21800723.0", " 120000 ", D(2180, 7, 23, 12)),
    ],
)
def test_parse_study_datetime(study_date: Any, study_time: Any, expected: D) -> None:
    assert parse_study_datetime(study_date, study_time) == expected


@pytest.mark.parametrize(
    "study_date, study_time",
    [
        ("21800723", None),
        ("21800723", ""),
        ("", "120000"),
        ("21800723", "12:30:00"),
        ("21800723", "246000"),  # hour 24
        ("21800723", "126100"),  # minute 61
        ("21800723", "120060"),  # second 60
        ("21800723", "-5"),
        ("21800723", "nan"),
        ("21801345", "120000"),  # month 13
        ("21800230", "120000"),  # 30 February
        ("2180723", "120000"),  # seven digits
        ("21800723.5", "120000"),
        ("2180-07-23", "120000"),
    ],
)
def test_parse_study_datetime_rejects_invalid(study_date: Any, study_time: Any) -> None:
    with pytest.raises(ValueError):
        parse_study_datetime(study_date, study_time)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2180-07-23 21:30:14", D(2180, 7, 23, 21, 30, 14)),
        ("2180-07-23 21:30", D(2180, 7, 23, 21, 30)),
        ("2180-07-23T21:30:14.5", D(2180, 7, 23, 21, 30, 14, 500000)),
        (" 2180-07-23 21:30:14 ", D(2180, 7, 23, 21, 30, 14)),
        ("", None),
        (None, None),
        ("not a time", None),
    ],
)
def test_parse_table_datetime(text: Any, expected: Any) -> None:
    assert parse_table_datetime(text) == expected


def _stay(stay_id: int, intime: D, outtime: D) -> EdStay:
    return EdStay(stay_id, None, intime, outtime, ())


STAY = _stay(1, D(2180, 1, 1, 8), D(2180, 1, 1, 9))


@pytest.mark.parametrize(
    "when, linked",
    [
        (D(2180, 1, 1, 8), True),  # exactly at intime
        (D(2180, 1, 1, 9), True),  # exactly at outtime
        (D(2180, 1, 1, 7, 59, 59), False),
        (D(2180, 1, 1, 9, 0, 1), False),
        (D(2180, 1, 1, 7, 59, 59, 999000), False),
    ],
)
def test_pick_stay_bounds_are_inclusive(when: D, linked: bool) -> None:
    assert (pick_stay(when, [STAY]) is STAY) == linked


def test_pick_stay_latest_intime_wins_whatever_the_order() -> None:
    early = _stay(7, D(2180, 1, 1, 10), D(2180, 1, 1, 14))
    late = _stay(3, D(2180, 1, 1, 12), D(2180, 1, 1, 20))
    when = D(2180, 1, 1, 13)
    assert pick_stay(when, [early, late]) is late
    assert pick_stay(when, [late, early]) is late
    assert pick_stay(D(2180, 1, 1, 11), [late, early]) is early


def test_pick_stay_equal_intimes_go_to_the_larger_stay_id() -> None:
    a = _stay(5, D(2180, 1, 1, 10), D(2180, 1, 1, 14))
    b = _stay(9, D(2180, 1, 1, 10), D(2180, 1, 1, 12))
    assert pick_stay(D(2180, 1, 1, 11), [a, b]) is b
    assert pick_stay(D(2180, 1, 1, 11), [b, a]) is b


def test_pick_stay_none_without_stays() -> None:
    assert pick_stay(D(2180, 1, 1), []) is None


# --- JoinCohort on tiny in-memory tables ----------------------------------------------------

S1, S2, S3 = 10000001, 10000002, 10000003
IMAGE_ROOT = "gs://cxr-bucket/mimic-cxr-jpg"


def row(table: str, **values: Any) -> tuple:
    """A row of `table` as ReadTables emits it (blank ids None, blank labels NaN)."""
    floats = FLOAT_COLUMNS.get(table, frozenset())
    return tuple(values.get(c, math.nan if c in floats else None) for c in columns(table))


def image(dicom_id: str, subject_id: int, study_id: int, view: Any, date: str, time: str):
    return row("metadata", dicom_id=dicom_id, subject_id=subject_id, study_id=study_id,
               ViewPosition=view, StudyDate=date, StudyTime=time)


def stay(subject_id: int, stay_id: int, intime: str, outtime: str, hadm_id: Any = None):
    return row("edstays", subject_id=subject_id, stay_id=stay_id, hadm_id=hadm_id,
               intime=intime, outtime=outtime, gender="F", race="WHITE",
               arrival_transport="WALK IN")


def vital(stay_id: int, charttime: str, heartrate: str) -> tuple:
    return row("vitalsign", subject_id=S1, stay_id=stay_id, charttime=charttime,
               heartrate=heartrate, pain="uta")


def med(stay_id: int, charttime: str, name: str) -> tuple:
    return row("medrecon", subject_id=S1, stay_id=stay_id, charttime=charttime, name=name)


TABLES: dict[str, list[tuple]] = {
    "metadata": [
        image("d-overlap", S1, 501, "AP", "21800101", "130000.0"),
        image("d-at-intime", S1, 502, "PA", "21800201", "80000"),
        image("d-at-outtime", S1, 502, "AP", "21800201", "90000.0"),
        image("d-before", S1, 503, "AP", "21800201", "75959"),  # S2's stay holds it
        image("d-after", S1, 503, "PA", "21800201", "90001"),
        image("d-lateral", S1, 501, "LATERAL", "21800101", "130000.0"),
        image("d-ll", S1, 501, "LL", "21800101", "130000.0"),
        image("d-null", S1, 501, None, "21800101", "130000.0"),
        image("d-badtime", S1, 504, "AP", "21800101", "12:30"),
        image("d-baddate", S1, 504, "PA", "21801345", "123000"),
        image("d-s3", S3, 601, "ap", "21800301", "110000"),
    ],
    "edstays": [
        stay(S1, 31, "2180-01-01 10:00:00", "2180-01-01 14:00:00"),
        stay(S1, 32, "2180-01-01 12:00:00", "2180-01-01 20:00:00", hadm_id=20000001),
        stay(S1, 33, "2180-02-01 08:00:00", "2180-02-01 09:00"),
        stay(S2, 41, "2180-02-01 07:00:00", "2180-02-01 10:00:00"),
        stay(S3, 51, "2180-03-01 10:00:00", "2180-03-01 12:00:00"),
    ],
    "triage": [
        row("triage", subject_id=S1, stay_id=32, temperature="986.0", pain="uta",
            acuity="2.0", chiefcomplaint="Chest pain"),
        row("triage", subject_id=S2, stay_id=41, chiefcomplaint="Dyspnea"),
        row("triage", subject_id=S3, stay_id=51, heartrate="88"),  # no chief complaint
    ],
    "vitalsign": [
        vital(32, "2180-01-01 12:30:00", "90"),
        vital(32, "2180-01-01 13:00:01", "120"),  # a second after the study
        vital(32, "2180-01-01 13:00:00", "95"),  # exactly at the study time
        vital(31, "2180-01-01 12:45:00", "70"),  # the other (not linked) stay
    ],
    "medrecon": [
        med(32, "2180-01-01 12:00:00", "Zoloft"),
        med(32, "2180-01-01 11:00:00", "Aspirin"),
        med(32, "2180-01-01 12:10:00", "Aspirin"),
        med(32, "2180-01-01 13:30:00", "Lisinopril"),  # after the study
        med(33, "2180-02-01 08:30:00", "Metformin"),  # after d-at-intime, before d-at-outtime
    ],
    "admissions": [
        row("admissions", subject_id=S1, hadm_id=1, dischtime="2179-12-01 10:00:00"),
        row("admissions", subject_id=S1, hadm_id=2, dischtime="2180-01-01 13:00:00"),
        row("admissions", subject_id=S1, hadm_id=3, dischtime="2180-06-01 00:00:00"),
        row("admissions", subject_id=S2, hadm_id=4, dischtime="2170-01-01 00:00:00"),
    ],
    "patients": [
        row("patients", subject_id=S1, gender="F", anchor_age="52", anchor_year="2180",
            anchor_year_group="2014 - 2016"),
        row("patients", subject_id=S2, gender="M", anchor_age="70", anchor_year="2170",
            anchor_year_group="2008 - 2010"),
    ],
    "chexpert": [
        row("chexpert", subject_id=S1, study_id=501, Edema=1.0, **{"No Finding": 0.0}),
        row("chexpert", subject_id=S3, study_id=999, Edema=-1.0),  # another study
    ],
}


def create_tables(p: beam.Pipeline, tables: dict[str, list[tuple]]) -> dict:
    return {name: p | f"Create_{name}" >> beam.Create(rows) for name, rows in tables.items()}


def _link(record: records.CohortRecord) -> tuple:
    return (record.record_id, record.subject_id, record.stay_id, record.hadm_id,
            record.view_position, record.study_datetime, record.prior_admissions,
            record.medications)


def _labels(record: records.CohortRecord) -> tuple:
    return record.record_id, tuple("nan" if math.isnan(v) else v for v in record.labels)


def _dead(letter: records.DeadLetter) -> tuple:
    return letter.record_id, letter.subject_id, letter.study_id, letter.stage, letter.reason


def _check_overlap_record(actual: list[records.CohortRecord]) -> None:
    (record,) = [r for r in actual if r.record_id == "d-overlap"]
    assert record.image_path == (
        "gs://cxr-bucket/mimic-cxr-jpg/files/p10/p10000001/s501/d-overlap.jpg"
    )
    assert record.patient == {"gender": "F", "anchor_age": "52", "anchor_year": "2180",
                              "anchor_year_group": "2014 - 2016"}
    assert record.stay == {"intime": "2180-01-01 12:00:00", "outtime": "2180-01-01 20:00:00",
                           "gender": "F", "race": "WHITE", "arrival_transport": "WALK IN"}
    assert record.triage == {
        "temperature": "986.0", "heartrate": None, "resprate": None, "o2sat": None,
        "sbp": None, "dbp": None, "pain": "uta", "acuity": "2.0", "chiefcomplaint": "Chest pain",
    }
    assert [(v["charttime"], v["heartrate"]) for v in record.vitals] == [
        ("2180-01-01 12:30:00", "90"), ("2180-01-01 13:00:00", "95")]
    assert set(record.vitals[0]) == {"charttime", "temperature", "heartrate", "resprate",
                                     "o2sat", "sbp", "dbp", "pain"}
    for other in actual:
        if other.subject_id == S3:
            assert other.patient is None  # no patients row
            assert other.triage["chiefcomplaint"] is None
        assert "disposition" not in other.stay


EXPECTED_LINKS = [
    ("d-overlap", S1, 32, 20000001, "AP", "2180-01-01T13:00:00.000000", 1,
     ("Aspirin", "Zoloft")),
    ("d-at-intime", S1, 33, None, "PA", "2180-02-01T08:00:00.000000", 2, ()),
    ("d-at-outtime", S1, 33, None, "AP", "2180-02-01T09:00:00.000000", 2, ("Metformin",)),
    ("d-s3", S3, 51, None, "AP", "2180-03-01T11:00:00.000000", 0, ()),
]


def test_join_cohort_links_frontal_images_to_their_stay() -> None:
    p = fn_api_pipeline()
    out = create_tables(p, TABLES) | JoinCohort(image_root=IMAGE_ROOT + "/")
    recs = out[RECORDS_TAG]
    assert_that(recs | "Links" >> beam.Map(_link), equal_to(EXPECTED_LINKS), label="Links")
    assert_that(recs, _check_overlap_record, label="OverlapRecord")
    edema = schema.CHEXPERT_LABELS.index("Edema")
    no_finding = schema.CHEXPERT_LABELS.index("No Finding")
    labelled = ["nan"] * 14
    labelled[edema], labelled[no_finding] = 1.0, 0.0
    assert_that(
        recs | "Labels" >> beam.Map(_labels),
        equal_to([
            ("d-overlap", tuple(labelled)),
            ("d-at-intime", ("nan",) * 14),  # the study has no CheXpert row
            ("d-at-outtime", ("nan",) * 14),
            ("d-s3", ("nan",) * 14),
        ]),
        label="Labels",
    )
    assert_that(
        out[records.DROPPED_TAG],
        equal_to([records.DROP_NOT_FRONTAL] * 3 + [records.DROP_NO_ED_STAY] * 2),
        label="Dropped",
    )
    assert_that(
        out[records.DEAD_LETTER_TAG] | "DeadIds" >> beam.Map(_dead),
        equal_to([
            ("d-badtime", S1, 504, "join", records.FAIL_BAD_TIMESTAMP),
            ("d-baddate", S1, 504, "join", records.FAIL_BAD_TIMESTAMP),
        ]),
        label="DeadLetters",
    )
    assert_that(
        out[records.DEAD_LETTER_TAG] | "DeadDetail" >> beam.Map(lambda d: d.detail),
        equal_to([
            "StudyDate='21800101' StudyTime='12:30': StudyDate/StudyTime not numeric: "
            "'21800101', '12:30'",
            "StudyDate='21801345' StudyTime='123000': month must be in 1..12",
        ]),
        label="DeadDetail",
    )
    result = p.run()
    result.wait_until_finish()

    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))[
            "counters"
        ]
    }
    assert counters["records"] == 4
    assert counters[records.DROP_NOT_FRONTAL] == 3
    assert counters[records.DROP_NO_ED_STAY] == 2
    assert counters[records.FAIL_BAD_TIMESTAMP] == 2
    assert counters["records"] + counters[records.DROP_NOT_FRONTAL] + counters[
        records.DROP_NO_ED_STAY] + counters[records.FAIL_BAD_TIMESTAMP] == len(TABLES["metadata"])


def test_join_cohort_aggressive_filtering_drops_missing_triage_and_complaint() -> None:
    with fn_api_pipeline() as p:
        out = create_tables(p, TABLES) | JoinCohort(
            image_root=IMAGE_ROOT, aggressive_filtering=True)
        assert_that(out[RECORDS_TAG] | beam.Map(lambda r: r.record_id),
                    equal_to(["d-overlap"]), label="Kept")
        assert_that(
            out[records.DROPPED_TAG],
            equal_to([records.DROP_NOT_FRONTAL] * 3 + [records.DROP_NO_ED_STAY] * 2
                     + [records.DROP_NO_TRIAGE] * 2 + [records.DROP_NO_CHIEF_COMPLAINT]),
            label="Dropped",
        )


def test_join_cohort_views_are_configurable() -> None:
    with fn_api_pipeline() as p:
        out = create_tables(p, TABLES) | JoinCohort(image_root=IMAGE_ROOT, views=("LATERAL",))
        assert_that(out[RECORDS_TAG] | beam.Map(lambda r: (r.record_id, r.stay_id)),
                    equal_to([("d-lateral", 32)]), label="Lateral")
        assert_that(out[records.DROPPED_TAG] | beam.combiners.Count.PerElement(),
                    equal_to([(records.DROP_NOT_FRONTAL, 10)]), label="Dropped")


def test_join_cohort_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="views"):
        JoinCohort(image_root=IMAGE_ROOT, views=(" ",))
    with pytest.raises(ValueError, match="image_root"):
        JoinCohort(image_root="")


# --- from files: ReadTables then JoinCohort -------------------------------------------------


def _count_by_kind(out: dict) -> beam.PCollection:
    kinds = (
        out[RECORDS_TAG] | "RecordKind" >> beam.Map(lambda _: "record"),
        out[records.DROPPED_TAG],
        out[records.DEAD_LETTER_TAG] | "DeadKind" >> beam.Map(lambda d: d.reason),
    ) | "AllKinds" >> beam.Flatten()
    return kinds | "CountKinds" >> beam.combiners.Count.PerElement()


def test_join_cohort_from_csv_gz_never_reads_the_disposition(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_table(roots, "patients", [{"subject_id": S1, "gender": "F", "anchor_age": "52",
                                     "anchor_year": "2180", "anchor_year_group": "2014 - 2016",
                                     "dod": "2180-09-09"}])
    write_table(roots, "admissions", [])
    write_table(roots, "edstays", [{
        "subject_id": S1, "stay_id": 33, "hadm_id": "20000001",
        "intime": "2180-02-01 08:00:00", "outtime": "2180-02-01 09:00:00", "gender": "F",
        "race": "WHITE", "arrival_transport": "AMBULANCE", "disposition": "EXPIRED",
    }])
    write_table(roots, "triage", [{"subject_id": S1, "stay_id": 33,
                                   "chiefcomplaint": "Dyspnea, fever"}])
    write_table(roots, "vitalsign", [{"subject_id": S1, "stay_id": 33,
                                      "charttime": "2180-02-01 08:10:00", "rhythm": "AFib",
                                      "heartrate": "101"}])
    write_table(roots, "medrecon", [{"subject_id": S1, "stay_id": 33,
                                     "charttime": "2180-02-01 08:05:00", "name": "Aspirin",
                                     "etcdescription": "Platelet Aggregation Inhibitors"}])
    write_table(roots, "metadata", [
        {"dicom_id": "d-1", "subject_id": S1, "study_id": 502, "ViewPosition": "PA",
         "StudyDate": "21800201", "StudyTime": "83000.123"},
        {"dicom_id": "d-2", "subject_id": S1, "study_id": 502, "ViewPosition": "LATERAL",
         "StudyDate": "21800201", "StudyTime": "83000.123"},
        {"dicom_id": "d-3", "subject_id": S1, "study_id": 503, "ViewPosition": "AP",
         "StudyDate": "21800201", "StudyTime": "120000"},
        {"dicom_id": "d-4", "subject_id": S1, "study_id": 503, "ViewPosition": "AP",
         "StudyDate": "", "StudyTime": "120000"},
    ])
    write_table(roots, "chexpert", [{"subject_id": S1, "study_id": 502, "Edema": "1.0"}])
    check_tables(roots)

    def no_outcomes(actual: list[records.CohortRecord]) -> None:
        (record,) = actual
        text = repr(record)
        assert "EXPIRED" not in text and "disposition" not in text  # edstays outcome
        assert "2180-09-09" not in text  # patients.dod
        assert "AFib" not in text and "Platelet" not in text  # columns not read
        assert record.vitals == ({"charttime": "2180-02-01 08:10:00", "temperature": None,
                                  "heartrate": "101", "resprate": None, "o2sat": None,
                                  "sbp": None, "dbp": None, "pain": None},)
        assert record.medications == ("Aspirin",)
        assert record.triage["chiefcomplaint"] == "Dyspnea, fever"
        assert record.hadm_id == 20000001
        assert record.study_datetime == "2180-02-01T08:30:00.123000"

    with fn_api_pipeline() as p:
        out = p | ReadTables(roots) | JoinCohort(image_root=roots[schema.MIMIC_CXR])
        assert_that(out[RECORDS_TAG], no_outcomes, label="NoOutcomes")
        assert_that(
            _count_by_kind(out),
            equal_to([("record", 1), (records.DROP_NOT_FRONTAL, 1),
                      (records.DROP_NO_ED_STAY, 1), (records.FAIL_BAD_TIMESTAMP, 1)]),
            label="Counts",
        )


def test_join_cohort_on_the_synthetic_dataset_accounts_for_every_image(tmp_path: Path) -> None:
    synthetic_mimic = pytest.importorskip("synthetic.mimic")
    data = synthetic_mimic.generate(
        str(tmp_path / "mimic"), n_patients=30, seed=7, image_height=32, image_width=32,
        image_pool=2,
    )
    roots = {schema.MIMIC_IV: data.mimic_iv_dir, schema.MIMIC_ED: data.mimic_ed_dir,
             schema.MIMIC_CXR: data.mimic_cxr_dir}
    check_tables(roots)
    counts = data.counts
    expected = {
        "record": counts["frontal_in_stay"],
        records.DROP_NOT_FRONTAL: counts["images"] - counts["frontal_images"],
        records.DROP_NO_ED_STAY: counts["frontal_images"] - counts["frontal_in_stay"],
    }
    assert all(expected.values()), expected  # the sample exercises every outcome

    def images_exist(actual: list[records.CohortRecord]) -> None:
        missing = [r.image_path for r in actual if not Path(r.image_path).is_file()]
        assert not missing, missing[:3]

    with fn_api_pipeline() as p:
        out = p | ReadTables(roots) | JoinCohort(image_root=data.mimic_cxr_dir)
        assert_that(_count_by_kind(out), equal_to(sorted(expected.items())), label="Counts")
        assert_that(out[RECORDS_TAG], images_exist, label="ImagesExist")


def test_join_reading_the_files_itself_gives_the_same_records(tmp_path: Path) -> None:
    """JoinCohort(roots=...) reads and filters the tables in one step; the records are the
    same as when every table comes in as rows, and its ledger counts every row read."""
    synthetic_mimic = pytest.importorskip("synthetic.mimic")
    data = synthetic_mimic.generate(
        str(tmp_path / "mimic"), n_patients=40, seed=8, image_height=32, image_width=32,
        image_pool=2, images=False)
    roots = {schema.MIMIC_IV: data.mimic_iv_dir, schema.MIMIC_ED: data.mimic_ed_dir,
             schema.MIMIC_CXR: data.mimic_cxr_dir}
    with fn_api_pipeline() as p:
        from_rows = p | "Rows" >> ReadTables(roots) | "JoinRows" >> JoinCohort(
            image_root=data.mimic_cxr_dir)
        from_files = (
            p | "Metadata" >> ReadTables(roots, names=["metadata"])
            | "JoinFiles" >> JoinCohort(image_root=data.mimic_cxr_dir, roots=roots))
        expected = from_rows[RECORDS_TAG] | "AllRows" >> beam.combiners.ToList()
        _ = (from_files[RECORDS_TAG] | "AllFiles" >> beam.combiners.ToList()
             | beam.Map(_same, beam.pvalue.AsSingleton(expected)))
        read = (from_files[LEDGER_TAG] | beam.CombinePerKey(sum)
                | beam.Filter(lambda kv: kv[0] == "tables/vitalsign_rows"))
        assert_that(read, equal_to([("tables/vitalsign_rows", data.counts["vitalsign"])]),
                    label="VitalsRead")


def _same(got: list, want: list) -> None:
    key = lambda r: r.record_id  # noqa: E731
    assert len(got) == len(want) > 0
    assert [repr(r) for r in sorted(got, key=key)] == [repr(r) for r in sorted(want, key=key)]
