"""Staging a copy: the plan's pure parts, then real copies between two buckets of the GCS
emulator, through a recording proxy that shows every request's billing project."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os

import pytest

from pipelines import stage
from pipelines.stage import ObjectInfo, StageObject
from tests.gcs_proxy import CountingProxy
from transforms.join import schema
from transforms.errors import InputError

SOURCE_BUCKET = "mimic-stage-src.physionet.org"
DEST_BUCKET = "stage-dest"
BILLING = "stage-billing-project"  # a project no other test's cached client uses


# ----------------------------------------------------------------------------- pure parts
def test_staged_uri_and_roots_keep_the_source_bucket_and_path():
    roots = {schema.MIMIC_IV: "gs://mimiciv-3.1.physionet.org",
             schema.MIMIC_ED: "gs://mimic-iv-ed-2.2.physionet.org/",
             schema.MIMIC_CXR: "gs://mimic-cxr-jpg-2.1.0.physionet.org/v2"}
    staged = stage.staged_roots(roots, "gs://mine/copy/")
    assert staged == {
        "mimic_iv_dir": "gs://mine/copy/mimiciv-3.1.physionet.org",
        "mimic_ed_dir": "gs://mine/copy/mimic-iv-ed-2.2.physionet.org",
        "mimic_cxr_dir": "gs://mine/copy/mimic-cxr-jpg-2.1.0.physionet.org/v2",
        "cxr_image_root": "gs://mine/copy/mimic-cxr-jpg-2.1.0.physionet.org/v2",
    }
    assert stage.staged_uri("gs://b/x/y.jpg", "gs://mine") == "gs://mine/b/x/y.jpg"


@pytest.mark.parametrize("uri", ["/local/dir", "s3://b/x", "gs://", "gs:///x"])
def test_split_gs_rejects_what_is_not_a_bucket_path(uri):
    with pytest.raises(InputError, match="gs://"):
        stage.split_gs(uri)


def _stay_row(subject, stay, intime, outtime):
    values = {"subject_id": subject, "hadm_id": None, "stay_id": stay, "intime": intime,
              "outtime": outtime, "gender": "F", "race": "WHITE", "arrival_transport": "WALK IN"}
    return tuple(values[c] for c in schema.TABLES["edstays"].required)


def _image_row(dicom, subject, study, view, date, clock):
    values = {"dicom_id": dicom, "subject_id": subject, "study_id": study,
              "ViewPosition": view, "StudyDate": date, "StudyTime": clock}
    return tuple(values[c] for c in schema.TABLES["metadata"].required)


def test_linked_image_paths_follow_the_joins_rule():
    stays = stage.stays_by_subject([
        _stay_row(10000001, 1, "2180-01-01 10:00:00", "2180-01-01 12:00:00"),
        _stay_row(10000002, 2, "bad", "2180-01-01 12:00:00"),  # left out, as the join does
        None,  # a row of another subject, skipped by iter_rows
    ])
    rows = [
        _image_row("in", 10000001, 50, "PA", "21800101", "110000.0"),
        _image_row("at_outtime", 10000001, 51, " ap ", "21800101", "120000"),  # inclusive
        _image_row("after", 10000001, 52, "PA", "21800101", "120000.001"),
        _image_row("lateral", 10000001, 53, "LATERAL", "21800101", "110000"),
        _image_row("bad_time", 10000001, 54, "PA", "21800101", "xx"),
        _image_row("bad_stay", 10000002, 55, "PA", "21800101", "110000"),
        _image_row("no_stay", 10000003, 56, "PA", "21800101", "110000"),
        None,
    ]
    paths = list(stage.linked_image_paths(rows, stays, ["AP", "PA"]))
    assert paths == ["files/p10/p10000001/s50/in.jpg", "files/p10/p10000001/s51/at_outtime.jpg"]
    assert list(stage.linked_image_paths(rows, stays, ["LATERAL"])) == [
        "files/p10/p10000001/s53/lateral.jpg"]


def test_plan_copies_copies_what_is_absent_or_differs():
    same, size, crc, new = (ObjectInfo(10, "AAAA"), ObjectInfo(11, "BBBB"),
                            ObjectInfo(12, "CCCC"), ObjectInfo(13, "DDDD"))
    wanted = [("gs://s/t.csv.gz", "gs://d/s/t.csv.gz"), ("gs://s/a", "gs://d/s/a"),
              ("gs://s/b", "gs://d/s/b"), ("gs://s/c", "gs://d/s/c"),
              ("gs://s/gone", "gs://d/s/gone")]
    sources = {"gs://s/t.csv.gz": same, "gs://s/a": size, "gs://s/b": crc, "gs://s/c": new}
    existing = {"gs://d/s/t.csv.gz": same, "gs://d/s/a": ObjectInfo(99, "BBBB"),
                "gs://d/s/b": ObjectInfo(12, "XXXX"), "gs://d/s/extra": same}
    plan = stage.plan_copies(wanted, sources, existing, tables=1, listed=9)
    assert [o.dest for o in plan.objects] == [
        "gs://d/s/a", "gs://d/s/b", "gs://d/s/c", "gs://d/s/t.csv.gz"]
    assert [o.dest for o in plan.to_copy] == ["gs://d/s/a", "gs://d/s/b", "gs://d/s/c"]
    assert plan.missing == ("gs://s/gone",)
    assert (plan.tables, plan.images, plan.bytes, plan.copy_bytes) == (1, 3, 46, 36)


def test_estimate_states_cost_and_time_from_the_listed_figures():
    objects = tuple(StageObject(f"gs://s/{i}", f"gs://d/s/{i}", 1_500_000, "AAAA")
                    for i in range(100_000))
    plan = stage.StagePlan(objects=objects, to_copy=objects, missing=(), tables=0,
                           images=100_000, listed=400_000)
    est = stage.estimate(plan, workers=32)
    # 100,000 rewrites + 400 list calls + the manifest, Class A at $0.005 per 1,000.
    assert est.operations_usd == pytest.approx(100_401 * 0.005 / 1000)
    assert est.storage_usd_month == pytest.approx(150 * 0.020)
    assert est.transfer_usd_if_cross_location == pytest.approx(150 * 0.02)
    assert est.seconds == pytest.approx(max(100_000 * 0.25 / 32, 150e9 / 400e6))
    text = stage.plan_text(plan, est, "gs://d", 32)
    assert "100,000 objects" in text and "150.00 GB" in text and "$3.00/month" in text


# ----------------------------------------------------------------------------- the emulator
def _client():
    from google.cloud import storage

    return storage.Client(project="test-project")


@pytest.fixture(scope="module")
def source_dataset(gcs_emulator):
    """A synthetic MIMIC (one image of each fault kind) in a PhysioNet-named source bucket."""
    from synthetic.mimic import generate

    client = _client()
    for name in (SOURCE_BUCKET, DEST_BUCKET):
        if client.lookup_bucket(name) is None:
            client.create_bucket(name)
    return generate(f"gs://{SOURCE_BUCKET}/physionet", n_patients=60, seed=7,
                    image_height=64, image_width=64, image_pool=4, faults=1)


@pytest.fixture(scope="module")
def proxy(source_dataset):
    """Points google-cloud-storage at the recording proxy for this module's stage runs (the
    dataset is generated before, so no cached client of other tests goes through it)."""
    upstream = os.environ["STORAGE_EMULATOR_HOST"]
    server = CountingProxy(upstream)
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    yield server
    os.environ["STORAGE_EMULATOR_HOST"] = upstream
    server.close()


def _roots(data) -> dict[str, str]:
    return {schema.MIMIC_IV: data.mimic_iv_dir, schema.MIMIC_ED: data.mimic_ed_dir,
            schema.MIMIC_CXR: data.mimic_cxr_dir}


def _answer_images(data) -> set[str]:
    """The generator's own cohort (not the pipeline's code), as source URIs of the JPEGs."""
    bucket, name = stage.split_gs(f"{data.answer_dir}/cohort.csv.gz")
    raw = _client().bucket(bucket).blob(name).download_as_bytes()
    rows = csv.DictReader(io.StringIO(gzip.decompress(raw).decode()))
    return {f"{data.mimic_cxr_dir}/" + schema.image_relpath(int(r["subject_id"]),
                                                           int(r["study_id"]), r["dicom_id"])
            for r in rows}


def _listing(uri: str) -> dict[str, bytes]:
    bucket, prefix = stage.split_gs(uri)
    return {f"gs://{bucket}/{b.name}": b.download_as_bytes()
            for b in _client().list_blobs(bucket, prefix=prefix)}


def _source_requests(server: CountingProxy) -> list[tuple[str, str, dict]]:
    marker = f"/b/{SOURCE_BUCKET}/"
    return [r for r in server.requests if marker in r[1] + "/"]


def _rewrites(server: CountingProxy) -> list[str]:
    return [path for method, path, _ in server.requests if "/rewriteTo/" in path]


def test_stage_copies_the_tables_and_exactly_the_cohorts_images(source_dataset, proxy, capsys):
    data = source_dataset
    roots = _roots(data)
    stage_to = f"gs://{DEST_BUCKET}/physionet-copy"
    answer = _answer_images(data)
    missing = {f"{data.mimic_cxr_dir}/" + p for p in _answer_missing(data)}
    assert len(answer) > 20 and len(missing) == 1
    tables = [f"{roots[schema.TABLES[n].root]}/{schema.TABLES[n].relpath}"
              for n in (*schema.INPUT_TABLES, "split")]
    expected = {stage.staged_uri(uri, stage_to) for uri in tables + sorted(answer - missing)}

    # The dry run plans and copies nothing.
    proxy.reset()
    report = stage.run_stage(roots, stage_to, BILLING, dry_run=True, workers=4)
    out = capsys.readouterr().out
    assert f"objects: {len(expected)} ({len(tables)} tables, {len(answer) - 1} cohort images)" \
        in out
    assert "cohort images absent from the source: 1" in out and "storage: $" in out
    assert _listing(stage_to) == {} and _rewrites(proxy) == []
    assert report.plan.missing == tuple(sorted(missing))

    # The copy: exactly the tables and the cohort's images, same bytes, and the manifest.
    proxy.reset()
    report = stage.run_stage(roots, stage_to, BILLING, workers=4, progress_seconds=0.05)
    calls = _source_requests(proxy)
    staged = _listing(stage_to)
    manifest_uri = f"{stage_to}/{stage.MANIFEST_NAME}"
    assert set(staged) == expected | {manifest_uri}
    sources = _listing(f"gs://{SOURCE_BUCKET}/physionet")
    for uri in expected:
        assert staged[uri] == sources["gs://" + uri[len(stage_to) + 1:]], uri
    manifest = json.loads(staged[manifest_uri])
    assert {f"{stage_to}/{o['name']}" for o in manifest["objects"]} == expected
    assert manifest["staged_roots"] == report.staged_roots
    assert all(o["size"] == len(staged[f"{stage_to}/{o['name']}"]) for o in manifest["objects"])
    assert len(_rewrites(proxy)) == len(expected) == report.copied

    # Every call against the source bucket billed the requester-pays project: listing,
    # table reads and rewrites.
    kinds = {"list" if path.endswith("/o") else "rewrite" if "/rewriteTo/" in path
             else "download" if path.startswith("/download/") else "get"
             for _, path, _ in calls}
    assert kinds == {"list", "rewrite", "download", "get"}
    assert [c[:2] for c in calls if c[2].get("userProject") != [BILLING]] == []

    # The staged copy is what the job's rule reads: planning from it finds nothing to copy.
    restaged = stage.make_plan(stage.staged_roots(roots, stage_to), f"gs://{DEST_BUCKET}/again",
                               BILLING, workers=2)
    assert {o.source for o in restaged.objects} == expected

    # A re-run copies nothing and leaves the manifest as it was.
    proxy.reset()
    again = stage.run_stage(roots, stage_to, BILLING, workers=4)
    assert (again.plan.to_copy, again.manifest_written) == ((), False)
    assert _rewrites(proxy) == [] and _listing(stage_to) == staged
    assert [r for r in proxy.requests if r[0] in ("POST", "PUT", "PATCH", "DELETE")] == []

    # One changed destination object: only it is copied again.
    changed = sorted(u for u in expected if u.endswith(".jpg"))[3]
    bucket, name = stage.split_gs(changed)
    _client().bucket(bucket).blob(name).upload_from_string(b"not the source's bytes")
    proxy.reset()
    third = stage.run_stage(roots, stage_to, BILLING, workers=4)
    assert [o.dest for o in third.plan.to_copy] == [changed]
    assert len(_rewrites(proxy)) == 1 and _listing(stage_to) == staged


def _answer_missing(data) -> list[str]:
    """Relative paths of the planted missing images (in the answer, absent from the source)."""
    bucket, name = stage.split_gs(f"{data.answer_dir}/cohort.csv.gz")
    raw = _client().bucket(bucket).blob(name).download_as_bytes()
    rows = csv.DictReader(io.StringIO(gzip.decompress(raw).decode()))
    gone = set(data.faults["missing"])
    return [schema.image_relpath(int(r["subject_id"]), int(r["study_id"]), r["dicom_id"])
            for r in rows if r["dicom_id"] in gone]


def test_a_failed_copy_is_counted_and_named(source_dataset, proxy):
    item = StageObject(f"gs://{SOURCE_BUCKET}/physionet/no/such.jpg",
                       f"gs://{DEST_BUCKET}/failed/no/such.jpg", 5, "AAAAAA==")
    progress = stage.copy_objects([item], BILLING, workers=2)
    assert progress.done == 1 and len(progress.failed) == 1
    source, error = progress.failed[0]
    assert source == item.source and error.startswith("NotFound")


def test_cli_dry_run_and_bad_input(source_dataset, proxy, capsys):
    data = source_dataset
    args = ["--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
            "--mimic_cxr_dir", data.mimic_cxr_dir, "--requester_pays_project", BILLING]
    assert stage.main(args + ["--stage_to", f"gs://{DEST_BUCKET}/cli", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"stage plan for gs://{DEST_BUCKET}/cli:") and "time: ~" in out
    assert _listing(f"gs://{DEST_BUCKET}/cli") == {}
    assert stage.main(args + ["--stage_to", "/tmp/local-copy", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: staging copies between gs:// locations") and err.count("\n") == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"views": [" ", ""]}, "--views must name at least one ViewPosition"),
    ({"user_project": ""}, "needs --requester_pays_project"),
    ({"workers": 0}, "--workers must be >= 1, got 0"),
])
def test_bad_arguments_stop_before_any_call(kwargs, message):
    args = {"roots": {}, "stage_to": "gs://mine/copy", "user_project": BILLING, **kwargs}
    with pytest.raises(InputError, match=message):
        stage.run_stage(**args)


# ----------------------------------------------------------------------------- the launcher
def test_the_launcher_stages_then_submits_reading_the_copy(source_dataset, proxy, tmp_path,
                                                           capsys):
    from pipelines import dataflow_config as dc
    from tests.test_dataflow import edited_example

    data = source_dataset
    stage_to = f"gs://{DEST_BUCKET}/launcher-copy"
    config = tmp_path / "dataflow_config.json"
    config.write_text(json.dumps({
        **edited_example(), "project": "test-project", "bucket": DEST_BUCKET,
        **_roots(data), "output_dir": f"gs://{DEST_BUCKET}/launcher-out",
        "requester_pays_project": BILLING, "stage_to": stage_to}))
    staged = stage.staged_roots(_roots(data), stage_to)
    assert set(staged) == {"mimic_iv_dir", "mimic_ed_dir", "mimic_cxr_dir", "cxr_image_root"}

    # Not staged yet: the job would read PhysioNet's bucket, and the dry run says so.
    dc.main(["--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    assert f"--mimic_cxr_dir {data.mimic_cxr_dir}" in out
    assert f"--requester_pays_project {BILLING}" in out
    assert f"note: the job reads PhysioNet's buckets ({SOURCE_BUCKET})" in err

    # --stage --dry-run: the plan, then the command that reads the copy, and an estimate that
    # follows the command line's override. Nothing is copied.
    dc.main(["--config", str(config), "--stage", "--dry-run", "--max_num_workers", "16"])
    out = capsys.readouterr().out
    assert out.index(f"stage plan for {stage_to}:") < out.index("Command:") < out.index(
        "Estimate for")
    assert "cohort images absent from the source: 1" in out
    for key, root in staged.items():
        assert f"--{key} {root}" in out
    assert "--requester_pays_project" not in out and "workers:     16 x" in out
    assert _listing(stage_to) == {}

    # --stage copies and exits; the next run reads the copy and says so in one line.
    dc.main(["--config", str(config), "--stage", "--views", "AP,PA"])
    out = capsys.readouterr().out
    assert f"{stage_to}/{stage.MANIFEST_NAME}" in _listing(stage_to)
    assert out.splitlines()[-1] == ("./run_dataflow.sh (without --stage) now submits the job, "
                                    "reading the staged copy")
    dc.main(["--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    assert err == (f"reading the staged copy: {stage_to} holds {stage.MANIFEST_NAME}, so the "
                   "three roots and cxr_image_root point under it (no --requester_pays_project)"
                   "\n")
    for key, root in staged.items():
        assert f"--{key} {root}" in out
    assert "--requester_pays_project" not in out and f"gs://{SOURCE_BUCKET}" not in out

    # The preflight of that job finds the copy complete, and its reads bill no one.
    job = dc.job_config(dc.load(config), out=lambda line: None)
    lines: list[str] = []
    proxy.reset()
    dc.check_before_submission(job, ("AP", "PA"), out=lines.append)
    assert [line for line in lines if "error" in line] == []
    assert lines[-1] == "preflight: inputs, output_dir and temp_location checked"
    assert proxy.requests and [r for r in proxy.requests if "userProject" in r[2]] == []


def test_the_launcher_stage_needs_stage_to(source_dataset, tmp_path, capsys):
    from pipelines import dataflow_config as dc
    from tests.test_dataflow import edited_example

    config = tmp_path / "dataflow_config.json"
    config.write_text(json.dumps({**edited_example(), **_roots(source_dataset)}))
    with pytest.raises(SystemExit) as done:
        dc.main(["--config", str(config), "--stage", "--dry-run"])
    assert done.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {config}: --stage needs 'stage_to', a gs:// folder in your bucket (in the "
        "config, or --stage_to gs://BUCKET/physionet-copy)\n")
