"""What lets a re-run keep a crashed run's finished work, and what makes it start clean.

A run keeps its written groups (`transforms.write.groups`) under `{output_dir}/_tmp/groups/`
until it commits. A re-run into the same output dir reuses a group only when its fingerprint
matches: a sha256 of the run's fingerprint (every setting that shapes the bytes, the versions
of the packages and models that do, this code's own source), the group's place, its records'
joined facts and each image's identity (size and mtime, or size and GCS generation). The
written file is then checked against the size and sha256 its sidecar recorded; anything else
is recomputed, never trusted.

`_tmp/run.json` holds the run fingerprint of the run that wrote `_tmp/`: a re-run with another
configuration (or `--overwrite`) clears `_tmp/` before it starts, so stale groups never
accumulate on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import threading
from typing import Any, Mapping, Optional, Sequence

from transforms import storage
from transforms.chunks.format import FORMAT_VERSION
from transforms.records import CohortRecord

TMP_DIR = "_tmp"
RUN_NAME = "run.json"
# Settings recorded in metadata.json that change no byte of a chunk: changing them between a
# crash and the re-run keeps the finished groups.
NOT_SHAPING = ("max_failed_fraction", "report_examples", "compute_indices_only")
_CODE_ROOT = pathlib.Path(__file__).resolve().parents[1]  # transforms/

_LOG = logging.getLogger(__name__)


def tmp_dir(output_dir: str) -> str:
    """Where the run keeps its temporary files (removed once metadata.json is written)."""
    return storage.join(output_dir, TMP_DIR)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


def code_digest() -> str:
    """sha256 over the source of the code that shapes the bytes (the `transforms` package)."""
    digest = hashlib.sha256()
    for path in sorted(_CODE_ROOT.rglob("*.py")):
        digest.update(path.relative_to(_CODE_ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(config: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    """The fingerprint of everything but the records that shapes the output's bytes.

    Args:
        config: the recorded configuration (`DatasetConfig.summary()`).
        provenance: `transforms.write.provenance.collect()` (package versions, model digests).
    """
    digests = dict(provenance.get("provenance") or {})
    for volatile in ("git_commit", "git_dirty"):  # the code digest says it exactly
        digests.pop(volatile, None)
    return _sha256_json({
        "format_version": FORMAT_VERSION,
        "config": {k: v for k, v in config.items() if k not in NOT_SHAPING},
        "versions": provenance.get("versions"),
        "digests": digests,
        "code": code_digest(),
    })


def group_fingerprint(run: str, split: str, group: int, records: Sequence[CohortRecord],
                      images: Sequence[Optional[storage.FileStat]]) -> str:
    """The fingerprint of one group: the run's, its place, its records (every joined fact, in
    order) and the identity of each record's image (None: missing)."""
    digest = hashlib.sha256(f"{run}\0{split}\0{group}\0".encode())
    for record, image in zip(records, images, strict=True):
        digest.update(repr(record).encode() + b"\0" + repr(image).encode() + b"\0")
    return digest.hexdigest()


def prepare_tmp(output_dir: str, fingerprint: str, overwrite: bool) -> None:
    """Keeps `_tmp/` of a crashed run with the same fingerprint (its groups are reusable) and
    clears it otherwise (before any work; `record_run` writes the new one's)."""
    folder = tmp_dir(output_dir)
    run_path = storage.join(folder, RUN_NAME)
    previous = None
    if not overwrite:
        try:
            previous = json.loads(storage.read_bytes(run_path)).get("fingerprint")
        except (FileNotFoundError, ValueError, AttributeError):
            previous = None
    if previous != fingerprint:
        if previous is not None:
            _LOG.info("the configuration, code or models changed since the interrupted run in "
                      "%s: starting clean", output_dir)
        storage.delete_tree(folder)
    elif storage.exists(storage.join(folder, "groups")):
        _LOG.info("resuming the interrupted run in %s: its finished groups are reused where "
                  "their inputs are unchanged", output_dir)


_RECORDED: set[str] = set()
_RECORDED_LOCK = threading.Lock()


def record_run(output_dir: str, fingerprint: str, run_id: str) -> None:
    """Writes `_tmp/run.json` before the run's first group (once per worker process and run
    `run_id`, the same bytes from each), so that a re-run knows whose groups `_tmp/` holds.
    Building a job writes nothing."""
    with _RECORDED_LOCK:  # the threads of one process share it
        if run_id in _RECORDED:
            return
        run_path = storage.join(tmp_dir(output_dir), RUN_NAME)
        data = json.dumps({"fingerprint": fingerprint}).encode()
        try:
            same = storage.read_bytes(run_path) == data
        except FileNotFoundError:
            same = False
        if not same:
            storage.write_bytes(run_path, data)
        _RECORDED.add(run_id)
