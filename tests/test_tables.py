"""Reading the input tables: the fail-fast header check and ReadTables, local and gs://."""

from __future__ import annotations

import csv
import gzip
import io
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms import schema, storage
from transforms.errors import InputError
from transforms.tables import ReadTables, check_tables, column_index, columns, iter_rows


def fn_api_pipeline() -> test_pipeline.TestPipeline:
    return test_pipeline.TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


def csv_gz(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    """A gzip-compressed CSV as pandas/PhysioNet write them (minimal quoting, blanks empty)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return gzip.compress(text.getvalue().encode("utf-8"), mtime=0)


def write_table(
    roots: dict[str, str],
    name: str,
    rows: Iterable[dict[str, object]] = (),
    drop_columns: Sequence[str] = (),
) -> str:
    """Writes table `name` with its full published header under its root; returns the path.

    `rows` give values by column name (missing ones blank).
    """
    spec = schema.TABLES[name]
    header = [c for c in spec.columns if c not in drop_columns]
    path = storage.join(roots[spec.root], spec.relpath)
    storage.write_bytes(path, csv_gz(header, ([r.get(c) for c in header] for r in rows)))
    return path


def make_roots(base: str) -> dict[str, str]:
    return {
        schema.MIMIC_IV: storage.join(base, "mimic-iv"),
        schema.MIMIC_ED: storage.join(base, "mimic-iv-ed"),
        schema.MIMIC_CXR: storage.join(base, "mimic-cxr-jpg"),
    }


def write_empty_tables(roots: dict[str, str], skip: Sequence[str] = ()) -> None:
    for name in schema.INPUT_TABLES:
        if name not in skip:
            write_table(roots, name)


# --- check_tables ---------------------------------------------------------------------------


def test_check_tables_accepts_complete_inputs(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_empty_tables(roots)
    check_tables(roots)  # no error


def test_check_tables_names_file_and_missing_column(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_empty_tables(roots, skip=["patients"])
    path = write_table(roots, "patients", drop_columns=["anchor_age"])
    with pytest.raises(InputError) as caught:
        check_tables(roots)
    assert str(caught.value) == (
        f"hosp/patients.csv.gz ({path}) is missing column 'anchor_age'"
    )


def test_check_tables_reports_every_problem_at_once(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_empty_tables(roots, skip=["triage", "medrecon"])
    write_table(roots, "triage", drop_columns=["pain", "chiefcomplaint"])
    with pytest.raises(InputError) as caught:
        check_tables(roots)
    message = str(caught.value)
    assert "ed/triage.csv.gz" in message
    assert "missing columns 'pain', 'chiefcomplaint'" in message
    medrecon = storage.join(roots[schema.MIMIC_ED], "ed/medrecon.csv.gz")
    assert f"ed/medrecon.csv.gz not found: {medrecon}" in message


def test_check_tables_names_missing_file(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_empty_tables(roots, skip=["chexpert"])
    expected = storage.join(roots[schema.MIMIC_CXR], "mimic-cxr-2.0.0-chexpert.csv.gz")
    with pytest.raises(InputError, match="mimic-cxr-2.0.0-chexpert.csv.gz not found: ") as caught:
        check_tables(roots)
    assert str(caught.value).endswith(expected)


def test_check_tables_names_a_file_that_is_not_gzip(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_empty_tables(roots)
    path = storage.join(roots[schema.MIMIC_ED], "ed/edstays.csv.gz")
    Path(path).write_bytes(b"subject_id,hadm_id,stay_id\n1,2,3\n")  # plain text, .gz name
    with pytest.raises(InputError, match=r"ed/edstays.csv.gz \(.*edstays.csv.gz\) cannot be read"):
        check_tables(roots)


def test_check_tables_names_the_unset_root_flag(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_empty_tables(roots)
    roots[schema.MIMIC_ED] = ""
    with pytest.raises(InputError, match="--mimic_ed_dir is not set"):
        check_tables(roots, names=["edstays"])


# --- reading rows ---------------------------------------------------------------------------

EDSTAY = {
    "subject_id": 10000032, "hadm_id": None, "stay_id": 33258284,
    "intime": "2180-07-23 05:54:00", "outtime": "2180-07-23 21:30:00", "gender": "F",
    "race": "WHITE", "arrival_transport": "AMBULANCE", "disposition": "ADMITTED",
}


def test_iter_rows_keeps_required_columns_as_compact_tuples(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    triage = {
        "subject_id": 10000032, "stay_id": 33258284, "temperature": "98.6",
        "pain": "uta", "acuity": "2.0",
        "chiefcomplaint": 'Chest pain, "crushing"\nradiating',  # quotes, comma and newline
    }
    write_table(roots, "triage", [triage, {"subject_id": 10000033, "stay_id": 30000001}])
    path = write_table(roots, "edstays", [EDSTAY])

    (stay,) = iter_rows(schema.TABLES["edstays"], path)
    assert stay == (10000032, None, 33258284, "2180-07-23 05:54:00", "2180-07-23 21:30:00",
                    "F", "WHITE", "AMBULANCE")
    assert "disposition" not in columns("edstays")  # an outcome: never read

    triage_path = storage.join(roots[schema.MIMIC_ED], "ed/triage.csv.gz")
    first, second = iter_rows(schema.TABLES["triage"], triage_path)
    assert first[column_index("triage", "chiefcomplaint")] == 'Chest pain, "crushing"\nradiating'
    assert first[column_index("triage", "pain")] == "uta"
    assert first[column_index("triage", "heartrate")] is None
    assert second == (10000033, 30000001) + (None,) * 9


def test_iter_rows_names_file_line_and_column_of_a_bad_id(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    path = write_table(roots, "edstays", [EDSTAY, dict(EDSTAY, stay_id="3325828x")])
    with pytest.raises(InputError) as caught:
        list(iter_rows(schema.TABLES["edstays"], path))
    assert str(caught.value) == (
        f"ed/edstays.csv.gz ({path}) line 3: column 'stay_id' is not an integer: '3325828x'"
    )


def test_iter_rows_rejects_a_blank_subject_id(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    path = write_table(roots, "edstays", [dict(EDSTAY, subject_id=None)])
    with pytest.raises(InputError, match=r"line 2: column 'subject_id' is blank"):
        list(iter_rows(schema.TABLES["edstays"], path))


def test_iter_rows_names_a_truncated_gzip(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    path = write_table(roots, "edstays", [EDSTAY] * 200)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"ed/edstays.csv.gz .* cannot be read .*EOFError"):
        list(iter_rows(schema.TABLES["edstays"], path))


def _chexpert_row(subject_id: int, study_id: int, **labels: Optional[str]) -> dict:
    return {"subject_id": subject_id, "study_id": study_id, **labels}


def _labels_repr(row: tuple) -> tuple:
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row)


def test_read_tables_reads_csv_gz(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    write_table(roots, "edstays", [EDSTAY, dict(EDSTAY, stay_id=33258285, hadm_id="22595853")])
    write_table(roots, "chexpert", [_chexpert_row(10000032, 50414267, Edema="-1.0",
                                                  **{"No Finding": "1.0"})])
    check_tables(roots, names=["edstays", "chexpert"])
    edema = schema.CHEXPERT_LABELS.index("Edema")
    no_finding = schema.CHEXPERT_LABELS.index("No Finding")
    expected_labels = ["nan"] * 14
    expected_labels[edema], expected_labels[no_finding] = -1.0, 1.0

    with fn_api_pipeline() as p:
        tables = p | ReadTables(roots, names=["edstays", "chexpert"])
        assert_that(
            tables["edstays"] | "StayIds" >> beam.Map(lambda r: (r[2], r[1])),
            equal_to([(33258284, None), (33258285, 22595853)]),
            label="EdStays",
        )
        assert_that(
            tables["chexpert"] | "LabelsRepr" >> beam.Map(_labels_repr),
            equal_to([(10000032, 50414267, *expected_labels)]),
            label="ChexpertLabels",
        )


def test_read_tables_fails_the_pipeline_naming_the_bad_row(tmp_path: Path) -> None:
    roots = make_roots(str(tmp_path))
    path = write_table(roots, "edstays", [EDSTAY, dict(EDSTAY, subject_id="abc")])
    with pytest.raises(Exception, match=r"line 3: column 'subject_id' is not an integer") as err:
        with fn_api_pipeline() as p:
            _ = p | ReadTables(roots, names=["edstays"])
    assert path in str(err.value)


def test_gcs_round_trip(gcs_emulator: str) -> None:
    roots = make_roots(f"{gcs_emulator}/tables-round-trip")
    write_table(roots, "edstays", [EDSTAY])
    write_table(roots, "patients", [{"subject_id": 10000032, "gender": "F", "anchor_age": 52,
                                     "anchor_year": 2180, "anchor_year_group": "2014 - 2016"}])
    check_tables(roots, names=["edstays", "patients"])

    with fn_api_pipeline() as p:
        tables = p | ReadTables(roots, names=["edstays", "patients"], reshuffle=True)
        assert_that(
            tables["patients"],
            equal_to([(10000032, "F", "52", "2180", "2014 - 2016")]),
            label="PatientsFromGcs",
        )
        assert_that(tables["edstays"] | beam.Map(lambda r: r[2]), equal_to([33258284]),
                    label="StaysFromGcs")

    write_table(roots, "admissions", drop_columns=["dischtime"])
    admissions = storage.join(roots[schema.MIMIC_IV], "hosp/admissions.csv.gz")
    with pytest.raises(InputError) as caught:
        check_tables(roots, names=["patients", "admissions"])
    assert str(caught.value) == (
        f"hosp/admissions.csv.gz ({admissions}) is missing column 'dischtime'"
    )


def test_gcs_requester_pays_round_trip(gcs_emulator: str) -> None:
    """With a billing project, gs:// tables go through google-cloud-storage directly."""
    roots = make_roots(f"{gcs_emulator}/tables-requester-pays")
    write_table(roots, "edstays", [EDSTAY, dict(EDSTAY, stay_id=33258285)])
    check_tables(roots, names=["edstays"], user_project="billed-project")
    with pytest.raises(InputError, match="ed/triage.csv.gz not found: gs://"):
        check_tables(roots, names=["triage"], user_project="billed-project")

    with fn_api_pipeline() as p:
        tables = p | ReadTables(roots, names=["edstays"], user_project="billed-project")
        assert_that(tables["edstays"] | beam.Map(lambda r: r[2]),
                    equal_to([33258284, 33258285]), label="StaysBilled")
