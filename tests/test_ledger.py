"""Conservation and the loss guard: a run that loses rows or most records fails, naming why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from synthetic.mimic import generate
from transforms.join import schema
from transforms.join.cohort import JOIN_TABLES, RECORDS_TAG, JoinCohort
from transforms.ledger import LEDGER_TAG, ConservationError, SumLedger, check_conservation
from transforms.splits import SplitPatients, WriteIndices
from transforms.join.tables import ReadTables

REPO = Path(__file__).resolve().parents[1]


def _balanced() -> dict[str, int]:
    ledger = {"tables/metadata_rows": 10, "cohort/not_frontal": 3, "cohort/bad_timestamp": 1,
              "join/images_joined": 6, "cohort/no_ed_stay": 2, "cohort/records": 4,
              "arrived/assigned_records": 4}
    for table in JOIN_TABLES:
        if table != "metadata":
            ledger.update({f"tables/{table}_rows": 9, f"join/{table}_set_aside": 5,
                           f"join/{table}_joined": 4})
    return ledger


def test_balanced_ledger_passes_and_one_lost_row_fails_naming_the_stage() -> None:
    check_conservation(_balanced(), JOIN_TABLES, committed=False)
    lost = {**_balanced(), "join/edstays_joined": 3}
    with pytest.raises(ConservationError, match=r"at join \(edstays\): edstays_rows 9 != "
                                                r"edstays_set_aside 5 \+ edstays_joined 3"):
        check_conservation(lost, JOIN_TABLES, committed=False)
    lost_record = {**_balanced(), "arrived/assigned_records": 3}
    with pytest.raises(ConservationError, match="at split"):
        check_conservation(lost_record, JOIN_TABLES, committed=False)


def test_committed_run_checks_records_through_to_the_chunks() -> None:
    ledger = {**_balanced(), "image/failed/image_missing": 1, "spill/records_spilled": 3,
              "arrived/chunk_records": 3, "arrived/split_stats_records": 3,
              "arrived/dead_letters": 2, "arrived/dropped": 5}
    check_conservation(ledger, JOIN_TABLES)
    with pytest.raises(ConservationError, match="at chunks: records_spilled 3 != chunk_records 2"):
        check_conservation({**ledger, "arrived/chunk_records": 2}, JOIN_TABLES)
    with pytest.raises(ConservationError, match="at preprocess"):
        check_conservation({**ledger, "spill/records_spilled": 2,
                            "arrived/chunk_records": 2, "arrived/split_stats_records": 2},
                           JOIN_TABLES)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mimic")
    return generate(str(root), n_patients=60, seed=11, image_height=256, image_width=224,
                    image_pool=2)


def _roots(data) -> dict[str, str]:
    return {schema.MIMIC_IV: data.mimic_iv_dir, schema.MIMIC_ED: data.mimic_ed_dir,
            schema.MIMIC_CXR: data.mimic_cxr_dir}


def test_a_row_lost_between_read_and_join_fails_the_indices_naming_the_table(
    synthetic, tmp_path: Path
) -> None:
    """A real pipeline with one edstays row lost in transit: the indices are not written."""
    out = tmp_path / "stratification_indices.json"
    with pytest.raises(Exception, match=r"conservation check failed at join \(edstays\)"):
        with BeamTestPipeline(options=PipelineOptions(runner="DirectRunner")) as p:
            tables = p | ReadTables(_roots(synthetic))
            dropped_one = {**tables, "edstays": tables["edstays"]
                           | "LoseOneRow" >> beam.Filter(lambda row: row[2] % 7 != 0)}
            cohort = dropped_one | JoinCohort(image_root=synthetic.mimic_cxr_dir)
            ledger = (tables[LEDGER_TAG], cohort[LEDGER_TAG]) | SumLedger()
            _ = (cohort[RECORDS_TAG] | SplitPatients()
                 | WriteIndices(str(out), beam.pvalue.AsDict(ledger), JOIN_TABLES))
    assert not out.exists()


def _run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.build_dataset", *argv], cwd=REPO,
        capture_output=True, text=True, timeout=timeout)


def _inputs(data) -> list[str]:
    return ["--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
            "--mimic_cxr_dir", data.mimic_cxr_dir]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_wrong_image_root_stops_before_any_work(synthetic, tmp_path: Path) -> None:
    empty = tmp_path / "no-images"
    empty.mkdir()
    result = _run(*_inputs(synthetic), "--cxr_image_root", str(empty),
                  "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = _error_lines(result.stderr)
    assert "image root" in line and str(empty) in line
    assert not (tmp_path / "out").exists()  # nothing was started


def test_too_many_failed_records_fail_the_run_without_metadata(tmp_path: Path) -> None:
    data = generate(str(tmp_path / "mimic"), n_patients=30, seed=5, image_height=256,
                    image_width=224, image_pool=2)
    cohort_images = sorted(Path(data.mimic_cxr_dir, "files").rglob("*.jpg"))
    for path in cohort_images[len(cohort_images) // 2:]:  # the sample check still finds some
        path.unlink()
    out = tmp_path / "out"
    result = _run(*_inputs(data), "--output_dir", str(out), "--image_size", "64",
                  "--max_text_length", "128")
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = _error_lines(result.stderr)
    assert "records failed" in line and "top reason image_missing" in line
    assert "--max_failed_fraction 0.01" in line and ".jpg" in line
    assert "Traceback" not in result.stderr
    assert not (out / "metadata.json").exists()
    assert (out / "failed" / "failed-00000-of-00001.jsonl").read_text().count("\n") > 1


def _counters(stdout: str) -> dict[str, int]:
    lines = stdout.split("counters:\n", 1)[1].splitlines()
    return {k.strip(): int(v) for k, v in (line.split(" = ") for line in lines if " = " in line)}


def test_limit_chooses_whole_patients_before_the_join(synthetic, tmp_path: Path) -> None:
    full = _run(*_inputs(synthetic), "--output_dir", str(tmp_path / "all"),
                "--compute_indices_only")
    limited = _run(*_inputs(synthetic), "--output_dir", str(tmp_path / "some"),
                   "--compute_indices_only", "--limit", "15")
    assert full.returncode == 0 and limited.returncode == 0, limited.stderr[-2000:]
    everything, some = _counters(full.stdout), _counters(limited.stdout)
    # Only the chosen patients' rows crossed the join; the rest were set aside, counted.
    assert some["join/images_joined"] < everything["join/images_joined"]
    assert some["join/vitalsign_joined"] < everything["join/vitalsign_joined"]
    assert some["cohort/not_in_limit"] == (everything["join/images_joined"]
                                           - some["join/images_joined"])
    assert 15 <= some["cohort/records"] < 15 + 20  # about the limit: whole patients
    assert some["tables/edstays_rows"] == everything["tables/edstays_rows"]  # counted once
    patients = json.loads((tmp_path / "some" / "stratification_indices.json").read_text())
    all_patients = json.loads((tmp_path / "all" / "stratification_indices.json").read_text())
    assert set(patients["patients"]) < set(all_patients["patients"])
