"""Small file helpers over Beam's FileSystems, so every path may be local or gs://.

Writes are atomic: bytes go to a temporary name beside the target, then a rename publishes
them, so a reader never sees a half-written file.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import uuid
from typing import Iterable

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def join(base: str, *parts: str) -> str:
    """Joins path parts; works for local paths and gs:// URIs."""
    if base.startswith("gs://"):
        return posixpath.join(base, *parts)
    return FileSystems.join(base, *parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def read_bytes(path: str) -> bytes:
    """Reads a whole file as stored (no decompression)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


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
