"""Shared fixtures: a real GCS emulator for gs:// paths, fake credentials, real radiographs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RADIOGRAPHS = REPO / "synthetic" / "radiographs"  # bundled: the repository stands alone
TEST_BUCKET = "test-bucket"


def _fake_credentials(tmp_dir: Path) -> Path:
    path = tmp_dir / "fake_adc.json"
    path.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "fake.apps.googleusercontent.com",
                "client_secret": "fake",
                "refresh_token": "fake",
                # A token that never expires: Beam's GCS client passes these credentials
                # explicitly, so without it every gs:// call tries oauth2.googleapis.com.
                "token": "fake-token",
                "expiry": "2999-01-01T00:00:00Z",
            }
        )
    )
    return path


@pytest.fixture(scope="session", autouse=True)
def _offline_google_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without credentials, google-auth spends ~27 s per process looking for them."""
    creds = _fake_credentials(tmp_path_factory.mktemp("creds"))
    os.environ.setdefault("GOOGLE_APPLICATION_CREDENTIALS", str(creds))
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "test-project")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator() -> str:
    """A real gcp-storage-emulator on loopback; yields the gs:// URI of an empty bucket."""
    port = _free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen(
        [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    os.environ["STORAGE_EMULATOR_HOST"] = host
    from google.cloud import storage

    storage.Client(project="test-project").create_bucket(TEST_BUCKET)
    yield f"gs://{TEST_BUCKET}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def radiograph_pngs() -> list[Path]:
    """The two real NIH ChestX-ray14 radiographs (512x512 greyscale PNG)."""
    paths = sorted(RADIOGRAPHS.glob("*.png"))
    assert len(paths) == 2, f"expected the two real radiographs in {RADIOGRAPHS}"
    return paths


@pytest.fixture(scope="session")
def radiograph_jpegs(radiograph_pngs: list[Path], tmp_path_factory: pytest.TempPathFactory):
    """The real radiographs re-encoded as JPEG, as MIMIC-CXR-JPG ships them."""
    import cv2

    out = tmp_path_factory.mktemp("jpegs")
    paths = []
    for png in radiograph_pngs:
        pixels = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        path = out / (png.stem + ".jpg")
        cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths
