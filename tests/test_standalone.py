"""The repository stands alone: a fresh clone, with nothing beside it, runs the README's demo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HEAD of this repository, cloned alone into an empty folder (commit before testing)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    head = _git("rev-parse", "HEAD")
    folder = tmp_path_factory.mktemp("fresh")
    target = folder / "clone"
    _git("clone", "--quiet", "--no-checkout", str(REPO), str(target), cwd=folder)
    _git("checkout", "--quiet", head, cwd=target)
    return target


def test_no_tracked_file_reaches_outside_the_repository(clone: Path) -> None:
    outside = "shared" + "/data"  # spelled apart so that this file does not match itself
    hits = [name for name in _git("ls-files", cwd=clone).splitlines()
            if (clone / name).is_file() and outside in (clone / name).read_bytes().decode(
                "utf-8", errors="ignore")]
    assert hits == []
    assert sorted(p.name for p in (clone / "synthetic" / "radiographs").glob("*.png")) == [
        "00000001_000.png", "00027426_000.png"]


def test_a_fresh_clone_runs_the_readme_demo(clone: Path) -> None:
    readme = (clone / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    (module,) = set(re.findall(r"\.venv/bin/python -m (pipelines\.build_dataset)\s*$", setup,
                               re.M))
    out = clone.parent / "demo" / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(clone)
    done = subprocess.run(
        [sys.executable, "-m", module, "--output_dir", str(out),
         "--synthetic_patients", "20", "--synthetic_image_height", "96",
         "--synthetic_image_width", "80"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["total_records"] > 0
    # The clone's own code ran (its commit, from its own checkout), with its bundled images.
    assert meta["provenance"]["git_commit"] == _git("rev-parse", "HEAD", cwd=clone)
    assert (out / "DATASET_CARD.md").is_file() and (out / "report.html").is_file()
    # A quiet log, and a summary that says where to look.
    for noise in ("Loading weights", "Discarding unparseable", "it/s]", "font cache"):
        assert noise not in done.stderr and noise not in done.stdout, noise
    assert f"report: {out / 'report.html'}" in done.stdout
    assert f"dataset card: {out / 'DATASET_CARD.md'}" in done.stdout
