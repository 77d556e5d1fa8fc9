"""The one settings table (pipelines/config.py): the flags, the typed config, the launcher's keys
and the example config all come from it, and are checked once, before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import build_dataset, config
from pipelines import dataflow_config as dc
from pipelines.config import SETTINGS, DatasetConfig, DatasetOptions, config_from_options
from tests.test_dataflow import edited_example
from transforms.errors import InputError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "dataflow_config.json.example"


def _help_entry(text: str, flag: str) -> str:
    """The help of one flag in `--help`, on one line."""
    text = " ".join(text.split())
    after = text.split(f" {flag} ", 1)[1] if f" {flag} " in text else text.split(f" {flag}", 1)[1]
    return after.split(" --", 1)[0]


@pytest.mark.parametrize("setting", config.PIPELINE_FLAGS, ids=lambda s: s.name)
def test_every_flag_is_in_help_with_its_default(setting: config.Setting) -> None:
    text = build_dataset.help_text()
    assert f"--{setting.name}" in text
    entry = _help_entry(text, f"--{setting.name}")
    assert f"(default: {setting.default})" in entry
    assert setting.help.split()[0] in entry


def test_flag_defaults_are_the_table_defaults_and_the_config_is_typed() -> None:
    options = PipelineOptions([])
    parsed = options.view_as(DatasetOptions)
    for setting in config.PIPELINE_FLAGS:
        assert getattr(parsed, setting.name) == setting.default, setting.name
    cfg = config_from_options(options)
    assert isinstance(cfg, DatasetConfig)
    assert (cfg.image_size, cfg.max_text_length, cfg.chunk_size) == (518, 8192, 50)
    assert cfg.views == ("AP", "PA") and cfg.ratios == (0.70, 0.15, 0.15) and cfg.synthetic
    assert {f.name for f in dataclasses.fields(cfg)} == {
        s.name for s in SETTINGS if s.flag == config.PIPELINE and s.in_config}
    # What metadata.json records: every setting that shapes the output, nothing else.
    assert set(cfg.summary()) == {s.name for s in config.CONFIG_SETTINGS if s.recorded}
    assert not {"output_dir", "overwrite", "requester_pays_project"} & set(cfg.summary())


def _bad_value(setting: config.Setting) -> Any:
    if setting.minimum is not None:
        return setting.kind(setting.minimum - 1)
    return setting.kind(setting.maximum + 1)


_BOUNDED = [s for s in SETTINGS if s.minimum is not None or s.maximum is not None]


@pytest.mark.parametrize("setting", _BOUNDED, ids=lambda s: s.name)
def test_a_value_out_of_range_is_one_line_naming_the_flag(setting: config.Setting) -> None:
    bad = _bad_value(setting)
    with pytest.raises(InputError) as err:
        config_from_options(PipelineOptions([f"--{setting.name}", str(bad)]))
    assert str(err.value).startswith(f"--{setting.name} must be ")
    assert str(err.value).endswith(f"got {bad}") and "\n" not in str(err.value)


_BOUNDED_KEYS = [k for k in dc.KEYS if k.minimum is not None or k.maximum is not None]


@pytest.mark.parametrize("key", _BOUNDED_KEYS, ids=lambda k: k.name)
def test_a_key_out_of_range_is_one_line_naming_the_key(key: config.Setting) -> None:
    bad = _bad_value(key)
    raw = {**edited_example(), key.name: bad}
    with pytest.raises(dc.ConfigError) as err:
        dc.validate(raw, "cfg.json")
    assert str(err.value).startswith(f"cfg.json: '{key.name}' must be ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--train_ratio", "0.8"], "--train_ratio+--val_ratio+--test_ratio must sum to 1, got 1.1"),
    (["--val_ratio", "nan"], "--train_ratio, --val_ratio and --test_ratio must be >= 0"),
    (["--views", " , "], "--views must name at least one ViewPosition"),
    (["--mimic_iv_dir", "a"], "give all three input dirs or none"),
    (["--compute_indices_only", "--stratification_indices", "x.json"],
     "--compute_indices_only computes new indices; it cannot reuse --stratification_indices"),
])
def test_settings_checked_together(argv: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("+", r"\+")):
        config_from_options(PipelineOptions(argv))


def test_the_module_reports_a_bad_value_in_one_line_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.build_dataset", "--output_dir", str(out),
         "--max_text_length", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr == "error: --max_text_length must be >= 8, got 4\n"
    assert not out.exists() and not (tmp_path / "out_synthetic_mimic").exists()


# ----------------------------------------------------------------------------- the launcher
def test_the_example_is_generated_from_the_table() -> None:
    raw = json.loads(EXAMPLE.read_text())
    assert {k for k in raw if not k.startswith("_")} == set(dc.KEYS_BY_NAME)
    assert EXAMPLE.read_text() == dc.example_text(), (
        "dataflow_config.json.example is stale: ./run_dataflow.sh --write-example")
    for key in dc.KEYS:
        assert raw[f"_{key.name}"].startswith(key.help)


def test_dataset_keys_share_the_flags_defaults() -> None:
    for key in dc.KEYS:
        if key.flag == config.PIPELINE:
            assert key is config.SETTINGS_BY_NAME[key.name]
    cfg = dc.validate({k: v for k, v in edited_example().items()
                       if k in ("project", "bucket", "mimic_iv_dir", "mimic_ed_dir",
                                "mimic_cxr_dir", "output_dir")})
    flags = PipelineOptions([]).view_as(DatasetOptions)
    for key in dc.KEYS:
        if key.flag == config.PIPELINE and not key.required:
            assert cfg[key.name] == getattr(flags, key.name), key.name


def test_every_key_becomes_the_flag_of_the_same_meaning() -> None:
    raw = {**edited_example(),
           "cxr_image_root": "gs://images/root", "stratification_indices": "gs://bkt/s.json",
           "embedding_model": "gs://bkt/model", "service_account_email": "a@p.iam.example.com",
           "network": "net", "subnetwork": "regions/r/subnetworks/s", "use_public_ips": False,
           "sdk_container_image": "gcr.io/p/image", "number_of_worker_harness_threads": 3,
           "experiments": ["no_use_multiple_sdk_containers"], "image_size": 64,
           "max_text_length": 256, "chunk_size": 7, "seed": 5, "train_ratio": 0.5,
           "val_ratio": 0.25, "test_ratio": 0.25, "num_workers": 3, "max_num_workers": 5,
           "extra_flags": ["--aggressive_filtering"]}
    cfg = dc.validate(raw)
    parsed = PipelineOptions(dc.pipeline_command(cfg)[3:]).get_all_options()
    for key in dc.FLAG_KEYS:
        assert parsed[key.name] == cfg[key.name], key.name
    # The keys mapped specially.
    assert parsed["use_public_ips"] is False
    assert parsed["experiments"] == ["no_use_multiple_sdk_containers"]
    assert parsed["temp_location"] == "gs://mimic-lab-data/dataflow/temp"
    assert parsed["aggressive_filtering"] is True
    assert {k.name for k in dc.KEYS if k.flag is None} == {
        "bucket", "stage_to", "use_public_ips", "experiments", "extra_flags",
        "allow_public_output"}  # the preflight's, never the job's
    assert not any("allow_public" in arg for arg in dc.pipeline_command(cfg))


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "run_dataflow.sh"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120,
                          cwd=REPO)


def _config(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "dataflow_config.json"
    path.write_text(json.dumps({**edited_example(), **changes}))
    return path


def test_command_line_overrides_apply_before_validation_and_the_estimate(tmp_path: Path
                                                                          ) -> None:
    config_path = _config(tmp_path)
    base = _script("--config", str(config_path), "--dry-run")
    wider = _script("--config", str(config_path), "--dry-run", "--max_num_workers", "16",
                    "--chunk_size=9")
    assert base.returncode == 0 and wider.returncode == 0, wider.stderr
    assert "workers:     8 x n1-standard-4" in base.stdout
    assert "workers:     16 x n1-standard-4" in wider.stdout
    command = wider.stdout.split("Command:\n", 1)[1].split("\nEstimate for", 1)[0]
    assert command.count("--max_num_workers") == 1 and "--max_num_workers 16" in command
    assert command.count("--chunk_size") == 1 and "--chunk_size 9" in command

    bad = _script("--config", str(config_path), "--dry-run", "--max_num_workers", "1")
    assert bad.returncode == 2
    assert bad.stderr == (f"error: {config_path}: 'num_workers' (2) must be <= "
                          "'max_num_workers' (1)\n")
    typo = _script("--config", str(config_path), "--dry-run", "--max_num_workers", "many")
    assert typo.returncode == 2
    assert typo.stderr == "error: argument --max_num_workers: invalid int value: 'many'\n"


def test_an_unknown_config_key_is_named_and_exits_2(tmp_path: Path) -> None:
    config_path = _config(tmp_path, chunk_sise=10)
    done = _script("--config", str(config_path), "--dry-run")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: {config_path}: unknown key 'chunk_sise' (did you mean "
                           "'chunk_size'?); the keys are listed in dataflow_config.json.example\n")


def test_override_paths_are_relative_to_the_current_directory(tmp_path: Path) -> None:
    overrides, rest = dc.split_overrides(["--output_dir", "out", "--views", "AP",
                                          "--image_size", "64"])
    assert overrides == {"output_dir": os.path.abspath("out"), "image_size": 64}
    assert rest == ["--views", "AP"]


# ----------------------------------------------------------------------------- loaded once
def test_the_knowledge_base_is_loaded_once_per_submission(tmp_path: Path, monkeypatch) -> None:
    """Counts real loads: once when the flags are checked, none when the graph is built (the
    transforms take the checked values); the workers then load it once per process."""
    from synthetic.mimic import generate
    from transforms.text import knowledge

    loads: list[str] = []
    real_load = knowledge.load_knowledge_base

    def counted(path=None):
        loads.append(str(path))
        return real_load(path)

    monkeypatch.setattr(knowledge, "load_knowledge_base", counted)
    at_submission: list[int] = []
    real_run = beam.Pipeline.run

    def run(self, *args, **kwargs):
        at_submission.append(len(loads))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(beam.Pipeline, "run", run)
    data = generate(str(tmp_path / "mimic"), n_patients=6, seed=2, image_height=256,
                    image_width=200, image_pool=2, faults=0)
    build_dataset.run([
        "--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
        "--mimic_cxr_dir", data.mimic_cxr_dir, "--output_dir", str(tmp_path / "out"),
        "--image_size", "32", "--max_text_length", "64", "--runner", "DirectRunner",
        "--direct_running_mode", "in_memory", "--direct_num_workers", "1"])
    assert at_submission == [1]
    assert len(loads) <= 2  # + at most one by this process's worker (none if still shared)
