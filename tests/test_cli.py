"""The strict command line: unknown flags stop the run, Beam's flags pass, --version,
--log_level and a quiet log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import transforms
from pipelines import build_dataset, cli
from transforms.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipelines.build_dataset", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["--chunksize", "10"], "unknown flag --chunksize (did you mean --chunk_size?)"),
    (["--chunksize=10"], "unknown flag --chunksize (did you mean --chunk_size?)"),
    (["--seed", "1", "--output-dir", "x"], "unknown flag --output-dir (did you mean "
     "--output_dir?)"),
    (["--image_sz", "224", "--runnr", "DirectRunner"],
     "unknown flag --image_sz (did you mean --image_size?), unknown flag --runnr (did you "
     "mean --runner?)"),
    (["--zzzzzzzz"], "unknown flag --zzzzzzzz"),
    (["--chunk", "10"], "unknown flag --chunk (did you mean --chunk_size?)"),  # no prefixes
    (["--seed", "1", "train"], "unexpected argument 'train'"),
    (["--chunk_size", "ten"], "argument --chunk_size: invalid int value: 'ten'"),
    (["--log_level", "LOUD"], "argument --log_level: invalid choice: 'LOUD'"),
])
def test_unknown_flags_are_named_with_the_nearest_known_one(argv, message) -> None:
    with pytest.raises(InputError) as err:
        cli.check_flags(argv)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv", [
    ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
     "--temp_location", "gs://b/t", "--staging_location", "gs://b/s", "--setup_file",
     "./setup.py", "--sdk_container_image", "gcr.io/p/i", "--no_save_main_session",
     "--experiments=use_runner_v2", "--num_workers", "2", "--max_num_workers", "8",
     "--worker_machine_type", "n1-standard-4", "--disk_size_gb", "50",
     "--service_account_email", "a@p.iam.gserviceaccount.com", "--no_use_public_ips",
     "--subnetwork", "regions/r/subnetworks/s", "--template_location", "gs://b/tpl",
     "--number_of_worker_harness_threads", "4"],
    ["--runner=DirectRunner", "--direct_num_workers", "4", "--direct_running_mode",
     "multi_processing"],
    ["--mimic_iv_dir", "a", "--mimic_ed_dir", "b", "--mimic_cxr_dir", "c", "--chunk_size",
     "3", "--aggressive_filtering", "--overwrite", "--log_level", "debug", "--version"],
    [],
])
def test_beam_and_pipeline_flags_are_accepted(argv) -> None:
    cli.check_flags(argv)


def test_every_registered_pipeline_option_is_known() -> None:
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        PipelineOptions,
        SetupOptions,
        WorkerOptions,
    )

    known = set(cli.known_flags())
    for cls in (GoogleCloudOptions, WorkerOptions, SetupOptions):
        assert cls in PipelineOptions.__subclasses__()
    assert {"--runner", "--project", "--region", "--temp_location", "--direct_num_workers",
            "--setup_file", "--sdk_container_image", "--chunk_size", "--log_level",
            "--version"} <= known


def test_run_stops_on_an_unknown_flag_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"unknown flag --chunksize \(did you mean "
                                         r"--chunk_size\?\)"):
        build_dataset.run(["--output_dir", str(out), "--chunksize", "10"])
    assert not out.exists() and not (tmp_path / "out_synthetic_mimic").exists()


def test_the_module_exits_2_with_one_line_naming_the_flag(tmp_path: Path) -> None:
    done = _module("--output_dir", str(tmp_path / "out"), "--chunksize", "10")
    assert done.returncode == 2
    assert done.stderr == "error: unknown flag --chunksize (did you mean --chunk_size?)\n"
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()


def test_version_prints_the_projects_version_and_exits_0(tmp_path: Path) -> None:
    done = _module("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mimic-multimodal-beam {transforms.__version__}\n"
    setup = (REPO / "setup.py").read_text()
    assert "version=_version()" in setup  # one version string: transforms.__version__


@pytest.mark.parametrize("argv, level", [
    ([], logging.INFO), (["--log_level", "DEBUG"], logging.DEBUG),
    (["--log_level=warning"], logging.WARNING), (["--seed", "1", "--log_level", "ERROR"],
                                                 logging.ERROR),
])
def test_log_level(argv, level) -> None:
    assert cli.log_level(argv) == level


def test_a_bad_log_level_names_the_choices() -> None:
    with pytest.raises(InputError, match="--log_level must be one of DEBUG, INFO, WARNING, "
                                         "ERROR, got 'LOUD'"):
        cli.log_level(["--log_level", "LOUD"])


def test_help_lists_log_level_and_version() -> None:
    text = build_dataset.help_text()
    assert "--log_level" in text and "--version" in text and "(default: INFO)" in text


def test_quiet_third_party_silences_progress_bars_and_library_warnings(monkeypatch) -> None:
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    saved = {name: logging.getLogger(name).level for name in ("matplotlib", "transformers")}
    try:
        with _no_warning_filter_leak():
            cli.quiet_third_party()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        assert logging.getLogger("matplotlib").level == logging.ERROR
        assert logging.getLogger("transformers").level == logging.ERROR
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class _no_warning_filter_leak:
    """Restores the warning filters quiet_third_party adds (tests share the process)."""

    def __enter__(self):
        import warnings

        self._filters = list(warnings.filters)

    def __exit__(self, *exc):
        import warnings

        warnings.filters[:] = self._filters
        return False
