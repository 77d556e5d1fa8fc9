"""`run_dataflow.sh --dry-run` on a machine with no Google credentials: it plans, it says what
it could not check, and it does not wait for a metadata server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.test_dataflow import BUCKET, SCRIPT, _write_config
from transforms import storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["refused", "silent"])
def metadata_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """host:port of a metadata server that refuses connections, or accepts and never answers
    (as where its address is routed nowhere: google-auth then waits seconds per try)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    if request.param == "refused":
        sock.close()
        yield address
        return
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield address
    stop.set()
    sock.close()
    for conn in held:
        conn.close()


def _offline(home: Path, metadata: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
                        "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CONFIG")}
    return {**env, "HOME": str(home), "PYTHON": sys.executable,
            "GCE_METADATA_HOST": metadata, "GCE_METADATA_IP": metadata}


@pytest.mark.parametrize("stage", [False, True], ids=["dry-run", "stage-dry-run"])
def test_a_dry_run_without_credentials_plans_and_names_what_it_did_not_check(
        tmp_path: Path, metadata_server: str, stage: bool) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = _write_config(tmp_path / "cfg.json", stage_to=f"gs://{BUCKET}/physionet-copy")
    started = time.monotonic()
    done = subprocess.run(
        [str(SCRIPT), "--config", str(config), "--dry-run", *(["--stage"] if stage else [])],
        capture_output=True, text=True, env=_offline(home, metadata_server), cwd=REPO,
        timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "Command:" in done.stdout and "Estimate for" in done.stdout
    noted = [line for line in done.stderr.splitlines() if "no Google credentials" in line]
    assert len(noted) == 1, done.stderr
    if stage:
        assert noted[0].startswith("staging plan not made:")
        assert f"gs://{BUCKET}/physionet-copy/" in done.stdout  # the command reads the copy
    else:
        assert noted[0].startswith("stage_to not checked:")
        assert "--mimic_iv_dir gs://mimiciv-3.1.physionet.org" in done.stdout
    # Start-up (~2 s) plus at most the lookup's bound, not google-auth's own retries.
    assert elapsed < storage.CREDENTIALS_TIMEOUT_S + 8, elapsed


def test_credentials_are_found_where_they_are(tmp_path: Path) -> None:
    # conftest points GOOGLE_APPLICATION_CREDENTIALS at a fake user credential file.
    assert storage.credentials_problem() is None
