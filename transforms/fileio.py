"""Small file helpers over Beam's FileSystems, so every path may be local or gs://.

Writes are atomic: bytes go to a temporary name beside the target, then a rename publishes
them, so a reader never sees a half-written file.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import threading
import uuid
from typing import Iterable, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def join(base: str, *parts: str) -> str:
    """Joins path parts; works for local paths and gs:// URIs."""
    if base.startswith("gs://"):
        return posixpath.join(base, *parts)
    return FileSystems.join(base, *parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def read_bytes(path: str, user_project: Optional[str] = None) -> bytes:
    """Reads a whole file as stored (no decompression).

    Args:
        path: local path or gs:// URI.
        user_project: GCP project billed for a gs:// read (requester-pays buckets, such as
            PhysioNet's). Beam 2.77's GCS filesystem has no way to bill a user project (its
            `GcsIO` calls `client.bucket(name)` without one), so such reads go through
            google-cloud-storage directly. Ignored for local paths.

    Raises:
        FileNotFoundError: the file or object does not exist (local or gs://).
    """
    from google.api_core import exceptions as gcs_errors  # only with apache-beam[gcp]

    try:
        if user_project and path.startswith("gs://"):
            return _requester_pays_blob(path, user_project).download_as_bytes()
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return handle.read()
    except gcs_errors.NotFound as exc:
        raise FileNotFoundError(f"no such object: {path}") from exc


_THREAD_CLIENTS = threading.local()


def _requester_pays_blob(path: str, user_project: str):
    """The blob at a gs:// `path`, on a bucket handle that bills `user_project`.

    One client per thread and project: building one costs a credentials lookup, and clients
    are not documented as thread-safe. The client honours STORAGE_EMULATOR_HOST.
    """
    from google.cloud import storage

    clients = getattr(_THREAD_CLIENTS, "clients", None)
    if clients is None:
        clients = _THREAD_CLIENTS.clients = {}
    client = clients.get(user_project)
    if client is None:
        client = clients[user_project] = storage.Client(project=user_project)
    bucket_name, _, blob_name = path[len("gs://") :].partition("/")
    if not bucket_name or not blob_name:
        raise ValueError(f"not a gs://bucket/object path: {path}")
    return client.bucket(bucket_name, user_project=user_project).blob(blob_name)


def open_text_gz(path: str) -> io.TextIOBase:
    """Opens a .csv.gz (or plain .csv) for streaming text reads."""
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", newline="")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def write_bytes(path: str, data: bytes) -> None:
    """Writes bytes to `path` atomically: a temporary name, then a rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def delete(paths: Iterable[str]) -> None:
    """Deletes files (or local directories) that exist; missing ones are ignored."""
    present = [p for p in paths if FileSystems.exists(p)]
    if present:
        FileSystems.delete(present)


def list_files(pattern: str) -> list[str]:
    """Paths matching a glob pattern, sorted."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)
