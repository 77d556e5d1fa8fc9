"""Reading a pipeline output: metadata.json and verified local copies of its chunk files.

Output directories may be local or gs:// URIs (read through `transforms.storage`, whose GCS
client is created lazily and anew in each DataLoader worker). Remote chunks are downloaded into
a local cache directory, named by their sha256 (so a file there is one that was verified), and evicted
least recently used first once the cache holds more than `cache_bytes`. Workers on one machine
share the cache; a per-chunk lock file keeps them from downloading the same chunk twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import tempfile
from typing import Any, Optional

import torch

from transforms import storage
from transforms.chunks.errors import ChunkIntegrityError, IncompleteOutputError, MissingChunkError
from transforms.chunks.format import READABLE_VERSIONS, check_chunk

METADATA_NAME = "metadata.json"
DEFAULT_CACHE_BYTES = 4 << 30
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError)


def read_metadata(output_dir: str) -> dict:
    """The output's metadata.json, whose presence means the output is complete.

    Raises:
        IncompleteOutputError: no metadata.json in `output_dir`.
        ValueError: a format_version this reader does not know.
    """
    path = storage.join(output_dir, METADATA_NAME)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise IncompleteOutputError(
            f"output is incomplete: no {METADATA_NAME} in {output_dir}") from None
    meta = json.loads(data)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has format_version {version!r}; this reader knows "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return meta


def split_manifest(meta: dict, split: str) -> list[dict]:
    """The chunk entries of `split` in index order, checked against the split's record count.

    Raises:
        ValueError: an unknown split, or a manifest that does not add up.
    """
    if f"n_{split}" not in meta:
        known = sorted({c["split"] for c in meta["chunks"]} | {"train", "val", "test"})
        raise ValueError(f"unknown split {split!r}; this output has {known}")
    entries = sorted((c for c in meta["chunks"] if c["split"] == split), key=lambda c: c["index"])
    for entry in entries:
        missing = [k for k in ("path", "index", "records", "bytes", "sha256") if k not in entry]
        if missing:
            raise ValueError(f"metadata.json: chunk entry {entry} lacks {missing}")
    if [c["index"] for c in entries] != list(range(len(entries))):
        raise ValueError(f"metadata.json: the {split} chunk indices are not 0..{len(entries) - 1}")
    total = sum(int(c["records"]) for c in entries)
    if total != meta[f"n_{split}"]:
        raise ValueError(
            f"metadata.json: the {split} chunks hold {total} records, n_{split} says "
            f"{meta[f'n_{split}']}"
        )
    return entries


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a"):
        pass


def _sha256_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ChunkStore:
    """Loads the chunk files of one output directory, checked against their manifest entries.

    Each chunk is checked the first time this process reads it: its size always, its sha256
    when `verify` is set, once per machine while the file is unchanged (a marker under
    `cache_dir/verified` records it; gs:// copies are verified when downloaded). Decoded
    chunks are memory-mapped (`torch.load(mmap=True)`): a chunk costs the pages of the records
    actually read, and those pages are file-backed (shared and reclaimable).

    Args:
        output_dir: a local directory or a gs:// URI.
        cache_dir: where gs:// chunks are downloaded; default a directory under the system
            temporary directory, shared by every reader on the machine.
        cache_bytes: the size above which the least recently used cached chunks are deleted.
        verify: check each chunk's sha256 at its first read.
    """

    def __init__(
        self,
        output_dir: str,
        *,
        cache_dir: Optional[str] = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        verify: bool = True,
    ) -> None:
        self.output_dir = output_dir.rstrip("/") if storage.is_gcs(output_dir) else output_dir
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "chunked-dataset-cache")
        self.cache_bytes = int(cache_bytes)
        self.verify = verify
        self._verified: set[str] = set()

    def uri(self, entry: dict) -> str:
        """Where the chunk of `entry` is stored."""
        return storage.join(self.output_dir, entry["path"])

    def load(self, entry: dict) -> dict:
        """The decoded chunk of `entry`, after checking it against the entry.

        Raises:
            MissingChunkError: the chunk file does not exist.
            ChunkIntegrityError: its size, sha256, records or header differ from the entry,
                or it does not decode.
        """
        for attempt in range(3):
            path = self.local_path(entry)
            try:
                chunk = torch.load(path, weights_only=True, mmap=True)
                break
            except FileNotFoundError:
                # Another worker evicted the cached copy between our check and our open.
                if attempt == 2 or not storage.is_gcs(self.output_dir):
                    raise MissingChunkError(f"chunk file missing: {self.uri(entry)}") from None
            except _LOAD_ERRORS as err:
                raise ChunkIntegrityError(
                    f"chunk file {self.uri(entry)} does not decode: {type(err).__name__}: {err}"
                ) from err
        try:
            check_chunk(chunk, self.uri(entry))
        except ValueError as err:
            raise ChunkIntegrityError(str(err)) from err
        # Version 1 headers also named the chunk's index; version 2 chunks are named by the
        # manifest alone (their sha256 is checked against it).
        fields = ("split", "index", "records") if chunk["format_version"] == 1 else (
            "split", "records")
        header = tuple(chunk["n" if f == "records" else f] for f in fields)
        expected = tuple(entry[f] for f in fields)
        if header != expected:
            raise ChunkIntegrityError(
                f"chunk file {self.uri(entry)} holds ({', '.join(fields)}) {header}, "
                f"metadata.json says {expected}"
            )
        return chunk

    def local_path(self, entry: dict) -> str:
        """A local file holding the chunk of `entry`, checked (and downloaded for gs://)."""
        if storage.is_gcs(self.output_dir):
            return self._cached_copy(entry)
        path = self.uri(entry)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise MissingChunkError(f"chunk file missing: {path}") from None
        if path not in self._verified:
            marker = self._marker(path, stat, entry) if self.verify else None
            if marker is None or not os.path.exists(marker):
                self._check(path, stat.st_size, entry, lambda: _sha256_file(path))
                if marker is not None:
                    _touch(marker)
            self._verified.add(path)
        return path

    def _marker(self, path: str, stat: os.stat_result, entry: dict) -> str:
        """A file whose presence says `path`, as it is now, was verified on this machine.

        DataLoader workers are new processes every epoch (unless persistent) and, with
        batch-sized blocks, each reads nearly every chunk: without this, each would hash it.
        The name binds the sha256 to the file's identity, size and change times.
        """
        key = f"{os.path.abspath(path)}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|"
        key += f"{stat.st_mtime_ns}|{stat.st_ctime_ns}|{entry['sha256']}"
        name = hashlib.sha256(key.encode()).hexdigest()
        return os.path.join(self.cache_dir, "verified", name)

    def _check(self, uri: str, size: int, entry: dict, sha256: Any) -> None:
        if size != entry["bytes"]:
            raise ChunkIntegrityError(
                f"chunk file {uri} has {size} bytes, metadata.json says {entry['bytes']}"
            )
        if self.verify:
            digest = sha256()
            if digest != entry["sha256"]:
                raise ChunkIntegrityError(
                    f"chunk file {uri} has sha256 {digest}, metadata.json says {entry['sha256']}"
                )

    def _cached_copy(self, entry: dict) -> str:
        os.makedirs(os.path.join(self.cache_dir, "locks"), exist_ok=True)
        name = f"{entry['sha256']}.pt"
        path = os.path.join(self.cache_dir, name)
        with open(os.path.join(self.cache_dir, "locks", name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.path.exists(path):
                    os.utime(path)  # most recently used
                    return path
                self._download(entry, path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._evict(keep=path)
        return path

    def _download(self, entry: dict, path: str) -> None:
        uri = self.uri(entry)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            try:
                storage.download(uri, tmp)
            except FileNotFoundError:
                raise MissingChunkError(f"chunk file missing: {uri}") from None
            self._check(uri, os.path.getsize(tmp), entry, lambda: _sha256_file(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _evict(self, keep: str) -> None:
        """Deletes the least recently used cached chunks while the cache is over its cap."""
        files = []
        for item in os.scandir(self.cache_dir):
            if item.name.endswith(".pt") and item.is_file():
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                files.append((stat.st_mtime_ns, stat.st_size, item.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.cache_bytes:
                break
            if path == keep:
                continue
            try:
                # A reader that has it mapped keeps its pages; the name goes.
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size
