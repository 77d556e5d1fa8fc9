"""dataflow_config.json -> the exact `python -m pipelines.build_dataset` command, and an estimate.

`run_dataflow.sh` only calls this module:

    ./run_dataflow.sh [--config PATH] [--dry-run] [--local [--limit N]] [--records N]
                      [--compute_indices_only] [--skip-preflight] [extra pipeline flags...]
    ./run_dataflow.sh [--config PATH] --stage [--dry-run]

It validates the config (every message names the key and what is allowed; a value still
holding the example's placeholders is named too), maps its keys onto the pipeline's flags and
Dataflow's worker flags, then runs the pipeline: on the DataflowRunner with `--setup_file
setup.py` (the workers install this project and its requirements from the staged sdist; with
`sdk_container_image` the image has them already), or with `--local` on the DirectRunner on a
`--limit` subset. Before a Dataflow submission a preflight (`pipelines.preflight`) checks
inputs, output and temp location with the user's credentials; an error stops it (exit 2).
`--dry-run` prints the command instead, with an estimate of workers, wall time, cost and worker
memory computed from the per-record costs measured by `benchmarks/measure_costs.py`
(`benchmarks/measured_costs.json`) and list prices (`pipelines.prices`); it writes nothing.

Staging (PhysioNet grants its buckets to the user, not to the workers' service account):
`--stage` copies what the job reads into `stage_to` (`pipelines.stage`; with `--dry-run` it
prints the plan, then the command that will read the copy) and exits. Once `stage_to` holds a
finished copy (its `_manifest.json`), every run reads the copy: the three roots and
`cxr_image_root` point under `stage_to`, and `--requester_pays_project` is dropped (see
`reading_staged_copy`).

The keys, their defaults and checks are rows of one table: the dataset's come from
`pipelines.config.SETTINGS` (the pipeline's flags of the same names), the job's own (project,
region, workers, ...) are in `KEYS` here; `dataflow_config.json.example` is generated from it
(`--write-example`). Keys starting with "_" are comments. Relative local paths in the config are
relative to the config file. A command-line flag of a key (`--max_num_workers 16`,
`--stage_to gs://...`) replaces the config's value before validation and the estimate; other
extra flags go to the pipeline last.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import preflight, stage
from pipelines.config import (
    AS_KEY,
    BEAM,
    DIR,
    GCS,
    INPUT_DIRS,
    SETTINGS,
    DatasetOptions,
    Setting,
    check_ratios,
    check_value,
)
from pipelines.prices import PRICES
from transforms import storage
from transforms.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SETUP_FILE = REPO / "setup.py"
DEFAULT_CONFIG = REPO / "dataflow_config.json"
EXAMPLE_CONFIG = REPO / "dataflow_config.json.example"
MEASURED_COSTS = REPO / "benchmarks" / "measured_costs.json"

# The real dataset (MIMIC-CXR-JPG frontal images linked to an ED stay), for the estimate.
DEFAULT_RECORDS = 107_949
DEFAULT_LOCAL_LIMIT = 200

# Not measured here (no Dataflow access): stated with the estimate, where they can be judged.
ASSUMPTIONS = {
    # Beam's per-element work, (de)serialisation, shuffle and GCS I/O on top of the measured
    # stage costs.
    "overhead_factor": 1.5,
    # Share of worker vCPU time spent on records once workers run (autoscaling ramps, stragglers).
    "utilization": 0.8,
    # VM boot plus `pip install` of the staged sdist's requirements (torch among them) on each
    # worker; a prebuilt --sdk_container_image (the Dockerfile's) skips the install.
    "startup_minutes": 6.0,
    "startup_minutes_with_container": 3.0,
    # Times each record's small reference crosses a shuffle (the record into its group, its
    # ref into the split statistics); the heavy record never does: each group is written once,
    # as its chunk, where it is preprocessed.
    "shuffle_passes": 2,
    # Cloud Storage operations (measured on the emulator, benchmarks/measure_gcs_ops.py):
    # class A per chunk (the group's chunk and sidecar uploads, the copy to its name; deletes
    # are free), class B per record (the source JPEG, its metadata for the resume fingerprint)
    # and per chunk (the look for a finished group to reuse).
    "gcs_writes_per_chunk": 3,
    "gcs_reads_per_record": 2,
    "gcs_reads_per_chunk": 1,
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


def _dataflow(name: str, kind: type, default: Any, help: str, *, flag: Optional[str] = BEAM,
              dataflow_only: bool = True, **checks: Any) -> Setting:
    """A key of the job's own (Beam's flag of the same name unless `flag` is None)."""
    return Setting(name, kind, default, help, flag=flag, key=True,
                   dataflow_only=dataflow_only, in_config=False, recorded=False, **checks)


# Where the job runs and on what: Beam's own flags (and a few keys mapped specially, flag
# None), in the same table style as the dataset's `config.SETTINGS`.
_JOB = (
    _dataflow("project", str, None, "GCP project that runs the Dataflow job.",
              dataflow_only=False, required=True, example="my-gcp-project", placeholder=True,
              pattern=_PROJECT,
              pattern_help="a GCP project id (6-30 lowercase letters, digits or '-', starting "
              "with a letter)"),
    _dataflow("region", str, "us-central1", "Dataflow region; us-central1 is next to "
              "PhysioNet's US buckets.", pattern=_REGION,
              pattern_help="a region such as us-central1"),
    _dataflow("bucket", str, None, "Your bucket (name or gs:// URI): temp_location and "
              "staging_location default to gs://BUCKET/dataflow/temp and .../staging.",
              flag=None, example="my-dataflow-bucket", placeholder=True),
    _dataflow("temp_location", str, None, "gs:// folder for Dataflow temporary files (default "
              "from bucket).", path=GCS),
    _dataflow("staging_location", str, None, "gs:// folder where the sdist and pipeline are "
              "staged (default from bucket).", path=GCS),
    _dataflow("job_name", str, "mimic-multimodal-dataset", "Dataflow job name: lowercase "
              "letters, digits and '-'.", pattern=_JOB_NAME,
              pattern_help="lowercase letters, digits and '-', starting with a letter (at "
              "most 64)"),
)
_WORKERS = (
    _dataflow("machine_type", str, "n1-standard-4", "Worker VM type. n1-standard-4 (4 vCPU, "
              "15 GB) holds 4 SDK processes with the model loaded (~0.85 GB each, measured) "
              "plus records in flight with ~2x headroom (--dry-run shows the sum); highmem "
              "types are not needed."),
    _dataflow("num_workers", int, 2, "Workers at start.", minimum=1),
    _dataflow("max_num_workers", int, 8, "Autoscaling ceiling; the dry-run estimate shows its "
              "effect on time and cost.", minimum=1),
    _dataflow("disk_size_gb", int, 50, "Boot disk per worker; torch and the other "
              "requirements install on it.", minimum=30,
              why="torch and the other requirements install on it"),
    _dataflow("service_account_email", str, None, "Worker service account (unset: the "
              "Compute Engine default one).", pattern=_EMAIL, pattern_help="an e-mail address"),
    _dataflow("network", str, None, "VPC network (unset: default)."),
    _dataflow("subnetwork", str, None, "Subnetwork, e.g. regions/us-central1/subnetworks/NAME "
              "(unset: default)."),
    _dataflow("use_public_ips", bool, None, "false: workers get private IPs only (the "
              "subnetwork then needs Private Google Access and a way to reach PyPI, or use "
              "sdk_container_image); unset: Dataflow default. Becomes --use_public_ips or "
              "--no_use_public_ips.", flag=None),
    _dataflow("sdk_container_image", str, None, "Prebuilt worker image with the requirements "
              "and this project installed (the Dockerfile; faster start, no --setup_file); "
              "unset: Beam's image plus a pip install of the sdist on each worker."),
    _dataflow("number_of_worker_harness_threads", int, None, "Caps concurrent work items per "
              "worker, hence records in flight (unset: Dataflow's default, one per vCPU for "
              "batch).", minimum=1),
    _dataflow("experiments", list, [], "Dataflow experiments, e.g. "
              "[\"no_use_multiple_sdk_containers\"] for one SDK process (one model copy) per "
              "worker instead of one per vCPU. Each becomes --experiments=NAME.", flag=None),
)
_ALLOW_PUBLIC = _dataflow(
    preflight.ALLOW_PUBLIC, bool, False, "true: submit even when a bucket the job reads or "
    "writes (output_dir, temp_location, the staged copy) grants allUsers or "
    "allAuthenticatedUsers access without public access prevention, i.e. publishes "
    "credentialed PhysioNet data; the preflight refuses such a bucket otherwise. Also "
    f"--{preflight.ALLOW_PUBLIC} on the command line.", flag=None, dataflow_only=False)
_EXTRA_FLAGS = _dataflow(
    "extra_flags", list, [], "More pipeline flags, e.g. [\"--aggressive_filtering\", "
    "\"--views\", \"AP,PA\"].", flag=None, dataflow_only=False)

# Every key of dataflow_config.json, in the example's order.
KEYS: tuple[Setting, ...] = (*_JOB, *(s for s in SETTINGS if s.key), *_WORKERS, _ALLOW_PUBLIC,
                             _EXTRA_FLAGS)
KEYS_BY_NAME = {key.name: key for key in KEYS}
# Keys that are `--NAME VALUE` flags of the pipeline or of Beam.
FLAG_KEYS = tuple(key for key in KEYS if key.flag is not None)
# Keys a command-line `--NAME VALUE` sets, replacing the config's value before validation: the
# flags, and the launcher's own single values (`--stage_to gs://...`, `--bucket NAME`) and
# switches (`--allow_public_output`, off unless given).
OVERRIDE_KEYS = tuple(key for key in KEYS if key.flag is not None or key.kind is str
                      or (key.kind is bool and key.default is False))
# The example's stand-ins for the user's own values (a project id, a bucket name), as a word
# anywhere in a value: a config still naming one was copied and not edited.
PLACEHOLDERS = tuple(sorted({
    storage.split_gcs(key.example, prefix=True)[0] if storage.is_gcs(key.example) else key.example
    for key in KEYS if key.placeholder}))
_PLACEHOLDER = re.compile(
    r"(?<![\w-])(?:" + "|".join(map(re.escape, PLACEHOLDERS)) + r")(?![\w-])")


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


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list"}


def _has_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int in Python; a JSON true is not a worker count
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


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
        if not _has_type(value, key.kind):
            raise _error(source, f"key '{name}' must be {_TYPE_NAMES[key.kind]}, "
                         f"got {json.dumps(value)}")
        if key.kind is list and not all(isinstance(v, str) for v in value):
            raise _error(source, f"key '{name}' must be a list of strings, "
                         f"got {json.dumps(value)}")
        values[name] = value
    for key in KEYS:
        if key.required and key.name not in values:
            raise _error(source, f"key '{key.name}' is missing ({key.help})")
        values.setdefault(key.name, key.default)
    return values


def _is_gs(path: str) -> bool:
    return storage.is_gcs(path)


def _check_path(values: dict, key: Setting, source: str, *, dataflow: bool, base: Path) -> None:
    name, path = key.name, values.get(key.name)
    if path is None:
        return
    if _is_gs(path):
        if not _GS_URI.match(path):
            raise _error(source, f"'{name}' is not a valid gs:// URI (gs://BUCKET/PATH), "
                         f"got {path!r}")
        return
    if re.match(r"^[a-z][a-z0-9+.-]*://", path):
        raise _error(source, f"'{name}' must be a gs:// URI or a local path, got {path!r}")
    if dataflow or key.path == GCS:
        raise _error(source, f"'{name}' must be a gs:// URI for Dataflow (workers cannot read "
                     f"this machine's disk), got {path!r}; use --local for local paths")
    resolved = (base / path).resolve() if not os.path.isabs(path) else Path(path)
    if key.path == DIR and not resolved.is_dir():
        raise _error(source, f"'{name}': no such directory {str(resolved)!r}")
    values[name] = str(resolved)


def validate(raw: Any, source: str = "dataflow_config.json", *, dataflow: bool = True,
             base: Optional[Path] = None) -> DataflowConfig:
    """Checks a parsed config; returns it with defaults filled in and locations derived.

    Every key's type, bounds and pattern come from its row of the table (`KEYS`); the checks
    the pipeline makes of its own flags are the same functions (`config.check_value`,
    `config.check_ratios`), naming keys instead of flags.

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
    _check_placeholders(values, source)
    try:
        for key in KEYS:
            check_value(key, values[key.name], AS_KEY)
        check_ratios(values, AS_KEY)
    except InputError as err:
        raise _error(source, str(err)) from None

    bucket = values["bucket"]
    if bucket is not None:
        bucket_uri = bucket if _is_gs(bucket) else f"gs://{bucket}"
        if not _GS_URI.match(bucket_uri) or storage.split_gcs(bucket_uri, prefix=True)[1].strip("/"):
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
    for key in KEYS:
        if key.path is not None:
            _check_path(values, key, source, dataflow=dataflow, base=base)

    if values["num_workers"] > values["max_num_workers"]:
        raise _error(source, f"'num_workers' ({values['num_workers']}) must be <= "
                     f"'max_num_workers' ({values['max_num_workers']})")
    machine_type(values["machine_type"], source)
    for flag in values["extra_flags"]:
        if flag.startswith("--runner") or flag.startswith("--setup_file"):
            raise _error(source, f"'extra_flags' must not set {flag.split('=')[0]}: "
                         "run_dataflow.sh sets it")
    _check_pipeline_flags(values["extra_flags"], f"{source}: 'extra_flags': ")
    return DataflowConfig(source, values)


def _check_placeholders(values: dict[str, Any], source: str) -> None:
    """Every key still holding the example's placeholders, named in one line.

    Raises:
        ConfigError: naming each such key and its value.
    """
    named = [f"'{name}' ({value if isinstance(value, str) else json.dumps(value)})"
             for name, value in values.items()
             if any(isinstance(v, str) and _PLACEHOLDER.search(v)
                    for v in (value if isinstance(value, list) else [value]))]
    if named:
        raise _error(source, f"{', '.join(named)} still hold the example's placeholders "
                     f"({', '.join(PLACEHOLDERS)}): put your own project and bucket there")


def _check_pipeline_flags(flags: Sequence[str], context: str = "") -> None:
    """Flags passed through to the pipeline must be ones it knows (see `pipelines.cli`):
    a mistyped one stops here, before anything is submitted.

    Raises:
        ConfigError: naming the flag and the nearest known one.
    """
    if not flags:
        return
    from pipelines import cli

    try:
        # run_dataflow.sh's own flags are suggested too (`--dry_runn`).
        launcher = [s for action in _parser()._actions for s in action.option_strings]
        cli.check_flags(flags, also_known=launcher)
    except InputError as err:
        raise ConfigError(f"{context}{err}") from None


class _OverrideParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage and SystemExit
        raise ConfigError(message)


def split_overrides(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The command-line flags that set a config key (`--max_num_workers 16`), as key: value,
    and the other arguments, which go to the pipeline as they are.

    Relative local paths given here are relative to the current directory, not the config's.

    Raises:
        ConfigError: a value of the wrong type, naming the flag.
    """
    parser = _OverrideParser(allow_abbrev=False, add_help=False)
    for key in OVERRIDE_KEYS:
        if key.kind is bool and key.flag is None:
            parser.add_argument(f"--{key.name}", action="store_const", const=True, default=None)
        else:
            parser.add_argument(f"--{key.name}", type=key.kind, default=None)
    parsed, rest = parser.parse_known_args(list(args))
    overrides = {name: value for name, value in vars(parsed).items() if value is not None}
    for name, value in overrides.items():
        if KEYS_BY_NAME[name].path is not None and "://" not in value:
            overrides[name] = os.path.abspath(value)
    return overrides, rest


def load(path: str | os.PathLike, *, dataflow: bool = True,
         overrides: Optional[dict[str, Any]] = None) -> DataflowConfig:
    """Reads and validates a config file (relative local paths: relative to the file), with
    `overrides` (key: value, from the command line) replacing its values first."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise ConfigError(f"{name}: no such config file; copy dataflow_config.json.example to "
                          "dataflow_config.json and edit it")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: not valid JSON: {err}") from None
    if isinstance(raw, dict):
        raw = {**raw, **(overrides or {})}
    return validate(raw, name, dataflow=dataflow, base=path.resolve().parent)


_README = [
    "Copy this file to dataflow_config.json and edit the values (my-gcp-project and "
    "my-dataflow-bucket are placeholders: a config still holding them is rejected); keys "
    "starting with '_' are comments. Then: ./run_dataflow.sh --stage --dry-run (the plan of "
    "the copy of the inputs into stage_to, then the job's command and an estimate), "
    "./run_dataflow.sh --stage (copies them), ./run_dataflow.sh --local --limit 200 (a quick "
    "local run of the same config), ./run_dataflow.sh (checks, then submits the job, reading "
    "the copy). null means 'not set' (the default applies). A key's flag on the command line "
    "(e.g. --max_num_workers 16) replaces its value here.",
    "PhysioNet bucket names: check each project's PhysioNet page (Files, Google Cloud "
    "Storage); access needs a credentialed PhysioNet account linked to your Google account.",
    "Generated from the settings table (pipelines/config.py, pipelines/dataflow_config.py): "
    "python -m pipelines.dataflow_config --write-example",
]


def example_text() -> str:
    """dataflow_config.json.example: every key, documented by its row's help, with an example
    value (its default unless the row gives one)."""
    doc: dict[str, Any] = {"_readme": _README}
    for key in KEYS:
        doc[f"_{key.name}"] = key.help + (" Required." if key.required else "")
        doc[key.name] = key.example_value
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- commands
def _flag_args(cfg: DataflowConfig, *, dataflow: bool) -> list[str]:
    args: list[str] = []
    for key in FLAG_KEYS:
        value = cfg[key.name]
        if value is None or (not dataflow and key.dataflow_only):
            continue
        args += [f"--{key.name}", str(value)]
    return args


def pipeline_command(cfg: DataflowConfig, *, local: bool = False,
                     limit: int = DEFAULT_LOCAL_LIMIT, compute_indices_only: bool = False,
                     extra: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The `python -m pipelines.build_dataset ...` argv that the config stands for.

    Dataflow: `--runner DataflowRunner --setup_file <repo>/setup.py --no_save_main_session`
    plus every worker flag; with `sdk_container_image` no `--setup_file` (the image holds this
    project and its requirements, so workers install nothing).
    Local: `--runner DirectRunner --limit N` and the dataset flags only.
    """
    command = [python, "-m", "pipelines.build_dataset"]
    if local:
        command += ["--runner", "DirectRunner", *_flag_args(cfg, dataflow=False),
                    "--limit", str(limit)]
    else:
        # Beam saves __main__ by default on Dataflow with cloudpickle; the code is in the
        # installed package, so nothing from __main__ needs to reach the workers.
        command += ["--runner", "DataflowRunner"]
        if cfg["sdk_container_image"] is None:
            command += ["--setup_file", str(SETUP_FILE)]
        command += ["--no_save_main_session", *_flag_args(cfg, dataflow=True)]
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
    a, prices = ASSUMPTIONS, PRICES
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
    chunks = math.ceil(records / cfg["chunk_size"])
    gcs_ops = (chunks * (a["gcs_writes_per_chunk"] * prices["gcs_class_a_per_1000"]
                         + a["gcs_reads_per_chunk"] * prices["gcs_class_b_per_1000"])
               + records * a["gcs_reads_per_record"] * prices["gcs_class_b_per_1000"]) / 1000

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
    a, p = ASSUMPTIONS, PRICES
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


# ----------------------------------------------------------------------------- staging, preflight
def _roots(cfg: DataflowConfig) -> dict[str, str]:
    return {name: cfg[name] for name in INPUT_DIRS}


def job_views(cfg: DataflowConfig, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The frontal views the job keeps: its `--views` (from `extra_flags` or the command line,
    else the default), which the staged copy and the preflight's image sample follow."""
    flags = PipelineOptions([*cfg["extra_flags"], *extra]).view_as(DatasetOptions)
    return tuple(v.strip().upper() for v in flags.views.split(",") if v.strip())


def is_staged(cfg: DataflowConfig) -> bool:
    """Whether `stage_to` holds a finished copy: its manifest, written last, exists.

    Raises:
        ConfigError: the manifest cannot be looked up (credentials, access).
    """
    from google.auth.exceptions import GoogleAuthError

    manifest = storage.join(cfg["stage_to"], stage.MANIFEST_NAME)
    try:
        return storage.exists(manifest)
    except (OSError, GoogleAuthError) as err:
        raise _error(cfg.source, f"cannot look up {manifest} ('stage_to'): {err}") from None


def reading_staged_copy(cfg: DataflowConfig) -> DataflowConfig:
    """`cfg` pointed at its staged copy: the three roots and `cxr_image_root` under
    `stage_to` (`stage.staged_roots`), and no `requester_pays_project`. The copy is in the
    user's own bucket, and a call that names a billing project needs the caller (the workers'
    service account) to hold serviceusage.services.use on it, which it need not have."""
    staged = stage.staged_roots(_roots(cfg), cfg["stage_to"], cfg["cxr_image_root"])
    return DataflowConfig(cfg.source, {**cfg.values, **staged, "requester_pays_project": None})


def job_config(cfg: DataflowConfig, out: Callable[[str], None] = print, *,
               dry_run: bool = False) -> DataflowConfig:
    """The config the job runs with: `cfg`, or its staged copy once `stage_to` holds one
    (saying so through `out`). A `dry_run` without credentials says it could not look and
    takes `cfg`."""
    if cfg["stage_to"] is None:
        return cfg
    problem = storage.credentials_problem() if dry_run else None
    if problem:
        out(f"stage_to not checked: {problem}; the command below reads the roots in the "
            "config, as if nothing were staged")
        return cfg
    if not is_staged(cfg):
        return cfg
    out(f"reading the staged copy: {cfg['stage_to']} holds {stage.MANIFEST_NAME}, so the "
        "three roots and cxr_image_root point under it (no --requester_pays_project)")
    return reading_staged_copy(cfg)


def run_stage(cfg: DataflowConfig, views: Sequence[str], *, dry_run: bool) -> None:
    """`--stage`: copies what the job reads into `stage_to` (or, with `dry_run`, prints the
    plan), billed to `requester_pays_project`.

    Raises:
        ConfigError: `stage_to` is not set.
        InputError: from `stage.run_stage` (no requester_pays_project, a table absent, ...).
        stage.StageError: some copies failed.
    """
    if cfg["stage_to"] is None:
        raise _error(cfg.source, "--stage needs 'stage_to', a gs:// folder in your bucket "
                     "(in the config, or --stage_to gs://BUCKET/physionet-copy)")
    stage.run_stage(_roots(cfg), cfg["stage_to"], cfg["requester_pays_project"],
                    image_root=cfg["cxr_image_root"], views=views, dry_run=dry_run)


def check_before_submission(job: DataflowConfig, views: Sequence[str],
                            out: Callable[[str], None] = print) -> None:
    """The preflight (`preflight.run_preflight`) of the job as it will run; prints each
    finding through `out`.

    Raises:
        ConfigError: an error among the findings (nothing may be submitted).
    """
    findings = preflight.run_preflight(
        roots=_roots(job), output_dir=job["output_dir"], temp_location=job["temp_location"],
        region=job["region"], image_root=job["cxr_image_root"], views=views,
        user_project=job["requester_pays_project"], allow_public=job[preflight.ALLOW_PUBLIC])
    for finding in findings:
        out(f"preflight: {finding}")
    if preflight.has_errors(findings):
        errors = sum(f.level == preflight.ERROR for f in findings)
        raise _error(job.source, f"the preflight found {errors} error(s) (above); nothing was "
                     "submitted (--skip-preflight submits anyway)")
    out("preflight: inputs, output_dir and temp_location checked")


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
                        help="Print the command and the estimate (with --stage: the plan "
                        "first); submit, copy and write nothing.")
    parser.add_argument("--stage", action="store_true",
                        help="Copy what the job reads from PhysioNet's buckets into stage_to "
                        "and exit; later runs read the copy.")
    parser.add_argument("--skip-preflight", "--skip_preflight", dest="skip_preflight",
                        action="store_true", help="Submit without the preflight checks of "
                        "inputs, output and temp location.")
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
    parser.add_argument("--write-example", "--write_example", dest="write_example",
                        action="store_true", help=f"Rewrite {EXAMPLE_CONFIG.name} from the "
                        "settings table and exit.")
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
    if args.stage and args.local:
        parser.error("--stage copies the inputs for Dataflow's workers; it does not go with "
                     "--local")
    return args, extra


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _note_unstaged(job: DataflowConfig) -> None:
    """Warns a dry run of what the preflight would stop: inputs on PhysioNet's buckets."""
    physionet = preflight.physionet_buckets([*_roots(job).values(), job["cxr_image_root"] or ""])
    if physionet:
        _note(f"note: the job reads PhysioNet's buckets ({', '.join(physionet)}), which "
              "Dataflow's workers cannot read: copy them first with ./run_dataflow.sh --stage "
              "(config key stage_to); until then the preflight stops a submission")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, extra = _parse_args(argv)
    if args.write_example:
        EXAMPLE_CONFIG.write_text(example_text(), encoding="utf-8")
        print(f"wrote {EXAMPLE_CONFIG}")
        return
    try:
        overrides, extra = split_overrides(extra)
        _check_pipeline_flags(extra)
        cfg = load(args.config, dataflow=not args.local, overrides=overrides)
        if args.dry_run:
            print(f"Config: {args.config} (valid)")
        views = job_views(cfg, extra)
        if args.stage:
            if not args.dry_run:
                logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
            problem = storage.credentials_problem() if args.dry_run else None
            if problem:
                _note(f"staging plan not made: {problem} to list the sources with; the "
                      "command and estimate below do not need them")
            else:
                run_stage(cfg, views, dry_run=args.dry_run)
            if not args.dry_run:
                print("./run_dataflow.sh (without --stage) now submits the job, reading the "
                      "staged copy")
                return
            print("Once staged, ./run_dataflow.sh submits the job reading the copy:")
            job = reading_staged_copy(cfg)
        else:
            job = job_config(cfg, out=_note, dry_run=args.dry_run)
        command = pipeline_command(
            job, local=args.local,
            limit=DEFAULT_LOCAL_LIMIT if args.limit is None else args.limit,
            compute_indices_only=args.compute_indices_only, extra=extra)
        if args.dry_run:
            if not args.local and not args.stage:
                _note_unstaged(job)
            print("Command:")
            print(format_command(command))
            if not args.local:
                costs = load_costs(args.costs)
                print(format_estimate(estimate(job, costs, args.records), costs, args.costs))
            return
        if not args.local and not args.skip_preflight:
            check_before_submission(job, views, out=_note)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except stage.StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print("running:\n" + format_command(command), file=sys.stderr, flush=True)
    os.execve(command[0], command, command_environment())


if __name__ == "__main__":
    main()
