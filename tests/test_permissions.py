"""Who may read a local output: owner and group by default, whatever the umask."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from pipelines import build_dataset
from synthetic.mimic import generate
from tests.test_end_to_end import _argv
from transforms import storage
from transforms.write import dataset_card


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Relative path ("." for the root) -> permission bits, of every folder and file."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_modes(root: Path, folder_mode: int) -> None:
    for rel, mode in modes(root).items():
        is_dir = (root / rel).is_dir()
        want = folder_mode if is_dir else folder_mode & 0o666
        assert mode == want, f"{rel}: {mode:04o}, expected {want:04o}"


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
@pytest.mark.parametrize("preset", sorted(storage.PERMISSIONS))
def test_every_local_write_takes_the_roots_mode(tmp_path: Path, mask: int,
                                                preset: str) -> None:
    root = tmp_path / "out"
    with umask(mask):
        storage.make_root(str(root), preset)
        storage.write_bytes(str(root / "train" / "deep" / "a.pt"), b"a")
        storage.write_bytes(str(root / "b.json"), b"b", if_absent=True)
        with storage.open_write(str(root / "failed" / "c.jsonl")) as handle:
            handle.write(b"c")
        storage.copy([(str(root / "b.json"), str(root / "report" / "d.png"))])
    assert len(modes(root)) == 9  # the root, 4 folders, 4 files
    assert_modes(root, storage.PERMISSIONS[preset])


def test_make_root_narrows_an_existing_open_folder(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    storage.make_root(str(root))
    assert stat.S_IMODE(root.stat().st_mode) == 0o750


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    return generate(str(tmp_path_factory.mktemp("mimic")), n_patients=16, seed=5,
                    image_height=160, image_width=128, image_pool=2, faults=1)


def _run(synthetic, out: Path, *extra: str) -> None:
    build_dataset.run(_argv(synthetic, out, "--runner", "DirectRunner",
                            "--direct_running_mode", "in_memory", "--direct_num_workers", "1",
                            "--max_failed_fraction", "0.5", *extra))


def test_a_run_and_its_overwrite_are_closed_to_others_whatever_the_umask(
        synthetic, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    with umask(0o000):
        _run(synthetic, out)
    written = modes(out)
    # Every kind of file the run writes is there, and none of them is open to others.
    assert {"metadata.json", dataset_card.CARD_NAME, "report.html", "failed",
            "stratification_indices.json", "train"} <= set(written)
    assert_modes(out, 0o750)
    card = (out / dataset_card.CARD_NAME).read_text()
    assert "folders 0750 and files 0640" in card and "credentialed PhysioNet users" in card

    with umask(0o022):
        _run(synthetic, out, "--overwrite")
    assert set(modes(out)) == set(written)
    assert_modes(out, 0o750)

    with umask(0o022):
        _run(synthetic, out, "--overwrite", "--output_permissions", "owner")
    assert_modes(out, 0o700)
    assert "folders 0700 and files 0600" in (out / dataset_card.CARD_NAME).read_text()


def test_an_interrupted_runs_temporaries_and_its_resume_are_closed_to_others(
        synthetic, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dataset"
    with umask(0o000):
        # Preprocessed, then refused at the commit: the groups stay in _tmp for the re-run.
        with pytest.raises(Exception) as stopped:
            _run(synthetic, out, "--max_failed_fraction", "0")
        assert "records failed" in build_dataset.aborted_line(stopped.value)[0]
        assert any((out / "_tmp").rglob("*.pt"))
        assert_modes(out, 0o750)
        _run(synthetic, out)
    assert "resumed:" in capsys.readouterr().out
    assert not (out / "_tmp").exists()
    assert_modes(out, 0o750)
