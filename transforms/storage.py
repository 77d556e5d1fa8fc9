"""Every file the project reads or writes, on local disk or on GCS (gs://), in one place.

No other module branches on gs://. Writes are atomic the native way of each backend: locally
the bytes go to a temporary name in the target's folder and `os.replace` publishes them; on
GCS one upload is already all-or-nothing (a rename there would be a copy plus a delete, two
more writes, and the target would briefly not exist), with `if_generation_match=0` when the
object must not exist yet.

GCS calls go through google-cloud-storage, imported only when a gs:// path is used (the
torch-only loader in `transforms.chunks` uses this module too). Clients are kept one per
thread, billing project and emulator host, and rebuilt in a forked process (DataLoader
workers): a client is not documented as thread-safe, and its connections must not be shared
across fork. `user_project` bills a requester-pays bucket (PhysioNet's) on the bucket handle.
Clients honour STORAGE_EMULATOR_HOST. GCS errors come out as OSErrors naming the path: a
missing object as FileNotFoundError, a refused one as PermissionError, an object that exists
against `if_absent` as FileExistsError.

Transient GCS faults (429, 5xx, a connection reset or a response cut short) are retried here,
by one policy (`retried`: exponential backoff with jitter, Retry-After honoured, at most
`RETRY_ATTEMPTS` tries), for every call: reads, ranged reads, uploads, listings, deletes and
copies. google-cloud-storage retries only calls it deems idempotent (not an unconditional
upload, a copy or a batch), and its own loops are not counted, so it is given `retry=None`.
Our writes are idempotent: the same bytes to the same name. Each retry is counted
(`retry_counts`, `retry_summary`); a permanent error (403, 404, ...) is raised at once.

Local modes: a file this module creates gets its folder's mode without the execute bits, a
folder its parent's mode, whatever the process umask (the way a folder's default ACL works),
so an output is exactly as open as its root folder, which `make_root` sets
(`--output_permissions`: owner and group only by default; the data is credentialed).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import gzip
import hashlib
import io
import logging
import os
import posixpath
import random
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Optional, TypeVar

GCS_PREFIX = "gs://"
TMP_MARK = ".tmp-"  # in the name of a local write not published yet
_BATCH = 100  # calls per GCS batch request (the documented limit)
_RANGE = 16 << 20  # bytes per request of a streaming read's readall()
_GLOB_CHARS = re.compile(r"[*?\[]")
_THREAD = threading.local()
_LOG = logging.getLogger(__name__)
T = TypeVar("T")
# Who may read a local output (--output_permissions): its folders' mode; files drop the x bits.
PERMISSIONS = {"group": 0o750, "owner": 0o700, "world": 0o755}
DEFAULT_PERMISSIONS = "group"


def is_gcs(path: str) -> bool:
    """Whether `path` is a gs:// URI."""
    return path.startswith(GCS_PREFIX)


def split_gcs(uri: str, *, prefix: bool = False) -> tuple[str, str]:
    """(bucket, object name) of a gs://bucket/name URI; with `prefix`, the name may be empty
    (a bucket or a folder: gs://bucket, gs://bucket/folder/).

    Raises:
        ValueError: not a gs:// URI with a bucket (and, unless `prefix`, an object name).
    """
    bucket, _, name = uri[len(GCS_PREFIX):].partition("/") if is_gcs(uri) else ("", "", "")
    if not bucket or not (name or prefix):
        raise ValueError(f"not a gs://bucket/{'prefix' if prefix else 'object'} URI: {uri}")
    return bucket, name


def join(base: str, *parts: str) -> str:
    """`parts` ('/'-separated relative paths) under `base`, a local folder or a gs:// URI."""
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *(piece for part in parts for piece in part.split("/")))


# --- GCS clients and errors -----------------------------------------------------------------

# google-cloud-storage >= 3.x fetches a bucket's metadata in a background thread, for its
# tracing attributes, without the bucket handle's userProject: against a requester-pays bucket
# (PhysioNet's) that call is refused, or billed to no one we chose. This switch turns it off.
_NO_BUCKET_METADATA_FETCH = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"


def _client(user_project: Optional[str]) -> Any:
    """This thread's client for `user_project` (None: the default project)."""
    os.environ.setdefault(_NO_BUCKET_METADATA_FETCH, "true")  # the library reads it per call
    if getattr(_THREAD, "pid", None) != os.getpid():  # a new thread, or a forked process
        _THREAD.pid, _THREAD.clients = os.getpid(), {}
    key = (user_project, os.environ.get("STORAGE_EMULATOR_HOST"))
    client = _THREAD.clients.get(key)
    if client is None:
        from google.cloud import storage

        client = _THREAD.clients[key] = storage.Client(project=user_project)
    return client


def gcs_bucket(name: str, user_project: Optional[str] = None) -> Any:
    """A handle on bucket `name`, on this thread's client, billing `user_project` (a
    requester-pays bucket's reader) for every call made through it; for GCS calls this module
    does not wrap (a server-side rewrite, a listing with checksums, a bucket's location)."""
    user_project = user_project or None  # "" bills no one, like None
    return _client(user_project).bucket(name, user_project=user_project)


def gcs_list(bucket: str, prefix: str = "", *, delimiter: Optional[str] = None,
             user_project: Optional[str] = None) -> Iterator[Any]:
    """The blobs under `prefix` in bucket `bucket`, a page at a time, each page retried on
    its own (`retried`): a fault on page 400 of a large listing repeats that page only.

    Raises:
        google.api_core.exceptions.GoogleAPICallError: a permanent error (the raw cause, for
            the launcher; `list_files` maps it to an OSError).
    """
    handle = gcs_bucket(bucket, user_project)
    token: Optional[str] = None
    while True:
        def page(token: Optional[str] = token) -> tuple[list[Any], Optional[str]]:
            found = handle.client.list_blobs(handle, prefix=prefix, delimiter=delimiter,
                                             page_token=token, retry=None)
            return list(next(found.pages)), found.next_page_token

        blobs, token = retried("list", page)
        yield from blobs
        if token is None:
            return


def _blob(uri: str, user_project: Optional[str] = None) -> Any:
    bucket, name = split_gcs(uri)
    return gcs_bucket(bucket, user_project).blob(name)


def gcs_call_errors() -> tuple[type[Exception], ...]:
    """What a refused or failed GCS call raises, or a lookup of no usable credentials: for the
    launcher's raw calls (staging, preflight), which report the cause rather than an OSError."""
    from google.api_core.exceptions import GoogleAPICallError
    from google.auth.exceptions import GoogleAuthError

    return (GoogleAPICallError, GoogleAuthError)


CREDENTIALS_TIMEOUT_S = 3.0


def credentials_problem(timeout_s: float = CREDENTIALS_TIMEOUT_S) -> Optional[str]:
    """Why no GCS call can be made here, in one line; None when one can (credentials found,
    or an emulator). The lookup is given `timeout_s`: off Google Cloud, google-auth looks for
    a metadata server (seconds per try, longer where its address is not refused)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return None
    found: list[Optional[str]] = []

    def look() -> None:
        import google.auth
        from google.auth.exceptions import GoogleAuthError

        try:
            google.auth.default()
            found.append(None)
        except GoogleAuthError as err:
            found.append(f"no Google credentials ({type(err).__name__})")

    thread = threading.Thread(target=look, daemon=True)  # left behind if it overruns
    thread.start()
    thread.join(timeout_s)
    return found[0] if found else f"no Google credentials found within {timeout_s:g} s"


# --- retries ---------------------------------------------------------------------------------

RETRY_ATTEMPTS = 8  # tries of one call, the first included
RETRY_INITIAL_S = 0.25  # the first backoff; it doubles, with jitter, up to RETRY_MAX_S
RETRY_MAX_S = 16.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_RETRIES: collections.Counter = collections.Counter()  # kind of call -> retries, this process
_RETRIES_LOCK = threading.Lock()


def _transient_types() -> tuple[type[BaseException], ...]:
    import requests
    import urllib3
    from google.auth.exceptions import TransportError
    from google.resumable_media.common import DataCorruption

    # A connection reset, or a body cut short (requests' ChunkedEncodingError, urllib3's
    # ProtocolError, or a download whose checksum then fails).
    return (ConnectionError, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
            requests.Timeout, urllib3.exceptions.ProtocolError, TransportError, DataCorruption)


def is_transient(err: BaseException) -> bool:
    """Whether a failed GCS call may succeed if repeated."""
    from google.api_core.exceptions import GoogleAPICallError

    if isinstance(err, GoogleAPICallError):
        return err.code in _TRANSIENT_STATUS
    return isinstance(err, _transient_types())


def _retry_after(err: BaseException) -> float:
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else 0.0
    except ValueError:  # an HTTP date: use the backoff
        return 0.0


def retried(kind: str, call: Callable[[], T]) -> T:
    """`call()`, repeated after a transient error (`is_transient`) with exponential backoff
    and jitter (at least the response's Retry-After), at most RETRY_ATTEMPTS tries; each retry
    is counted under `kind` ("read", "upload", ...). Other errors propagate at once."""
    delay = RETRY_INITIAL_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as err:
            if attempt == RETRY_ATTEMPTS or not is_transient(err):
                raise
            with _RETRIES_LOCK:
                _RETRIES[kind] += 1
            # Object names hold patient ids: the kind and the error class only.
            _LOG.debug("GCS %s retried after %s (try %d)", kind, type(err).__name__, attempt)
            time.sleep(min(RETRY_MAX_S, max(_retry_after(err), random.uniform(delay / 2, delay))))
            delay = min(RETRY_MAX_S, delay * 2)
    raise AssertionError("unreachable")


def retry_counts() -> dict[str, int]:
    """Retries of GCS calls in this process so far, by kind of call."""
    with _RETRIES_LOCK:
        return dict(_RETRIES)


def retry_summary() -> Optional[str]:
    """One line of `retry_counts`; None when nothing was retried."""
    counts = retry_counts()
    if not counts:
        return None
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    return f"GCS: {sum(counts.values())} calls retried after transient errors ({kinds})"


def error_line(err: Exception) -> str:
    """One line of a storage error: its class and the first line of its message."""
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


@contextlib.contextmanager
def _gcs_errors(path: str) -> Iterator[None]:
    """Turns a failed GCS call on `path` into the OSError a local call would raise."""
    from google.api_core import exceptions as gcs

    try:
        yield
    except gcs.NotFound as err:
        if "bucket" in (err.message or "").lower():  # GCS: "The specified bucket does not exist."
            raise FileNotFoundError(f"no such bucket: {path}") from err
        raise FileNotFoundError(f"no such object: {path}") from err
    except gcs.PreconditionFailed as err:
        raise FileExistsError(f"object exists: {path}") from err
    except gcs.Forbidden as err:
        raise PermissionError(f"{path}: {err.message}") from err
    except gcs.GoogleAPICallError as err:
        raise OSError(f"{path}: {type(err).__name__}: {err.message}") from err


# --- reading ---------------------------------------------------------------------------------

def exists(path: str, user_project: Optional[str] = None) -> bool:
    """Whether a file (or a local folder) exists; `user_project` is billed for gs:// paths."""
    if not is_gcs(path):
        return os.path.exists(path)
    blob = _blob(path, user_project)
    with _gcs_errors(path):
        return retried("read", lambda: blob.exists(retry=None))


def read_bytes(path: str, user_project: Optional[str] = None) -> bytes:
    """The whole file as stored (no decompression).

    Args:
        path: local path or gs:// URI.
        user_project: GCP project billed for a gs:// read (requester-pays buckets).

    Raises:
        FileNotFoundError: no such file or object.
    """
    if not is_gcs(path):
        with open(path, "rb") as handle:
            return handle.read()
    blob = _blob(path, user_project)
    with _gcs_errors(path):
        return retried("read", lambda: blob.download_as_bytes(retry=None))


class _GcsReader(io.RawIOBase):
    """A gs:// object read in ranges, each retried on its own, of the generation found at
    open (an object replaced meanwhile is not read half old, half new); errors are OSErrors."""

    def __init__(self, path: str, user_project: Optional[str]) -> None:
        self._path = path
        bucket, name = split_gcs(path)
        handle = gcs_bucket(bucket, user_project)
        with _gcs_errors(path):
            found = retried("read", lambda: handle.get_blob(name, retry=None))
        if found is None:
            raise FileNotFoundError(f"no such object: {path}")
        # A fresh handle: a loaded one downloads from its mediaLink, which an emulator may
        # have written with another host.
        self._blob = handle.blob(name, generation=found.generation)
        self._size = found.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        start, n = self._pos, min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        with _gcs_errors(self._path):
            data = retried("ranged read", lambda: self._blob.download_as_bytes(
                start=start, end=start + n - 1, checksum=None, retry=None))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        # RawIOBase's would ask for 8 KB at a time, one request each.
        parts = []
        while True:
            part = bytearray(min(_RANGE, max(0, self._size - self._pos)))
            got = self.readinto(part) if part else 0
            if not got:
                return b"".join(parts)
            parts.append(bytes(part[:got]))


def open_read(path: str, user_project: Optional[str] = None) -> BinaryIO:
    """Opens a file for streaming binary reads (no decompression)."""
    if not is_gcs(path):
        return open(path, "rb")
    return io.BufferedReader(_GcsReader(path, user_project), buffer_size=1 << 20)


class _GzipReader(gzip.GzipFile):
    """A GzipFile that closes the stream it reads (GzipFile leaves a given stream open)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_text(path: str, user_project: Optional[str] = None) -> io.TextIOBase:
    """Opens a UTF-8 text file for streaming reads, gunzipped when its name ends in .gz
    (newlines untranslated, as the csv module wants)."""
    raw = open_read(path, user_project)
    binary = _GzipReader(raw) if path.endswith(".gz") else raw
    return io.TextIOWrapper(binary, encoding="utf-8", newline="")


def download(path: str, local_path: str, user_project: Optional[str] = None) -> None:
    """Copies a file (local or gs://) to `local_path`, streaming.

    Raises:
        FileNotFoundError: no such file or object (nothing is left at `local_path`).
    """
    if not is_gcs(path):
        shutil.copyfile(path, local_path)
        return
    blob = _blob(path, user_project)
    with _gcs_errors(path):
        retried("read", lambda: blob.download_to_filename(local_path, retry=None))


def list_files(pattern: str) -> list[str]:
    """Files matching a glob pattern, sorted: `*` and `?` stay within one folder, `**`
    crosses folders. A pattern without wildcards lists the file itself, if it exists."""
    literal = _GLOB_CHARS.split(pattern, 1)[0]
    if literal == pattern:
        found = exists(pattern) if is_gcs(pattern) else os.path.isfile(pattern)
        return [pattern] if found else []
    match = re.compile(_glob_regex(pattern)).match
    return sorted(p for p in _candidates(literal, pattern[len(literal):]) if match(p))


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        char = pattern[i]
        out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
        i += 1
    return "".join(out) + r"\Z"


def _candidates(literal: str, rest: str) -> Iterator[str]:
    """Every file that a pattern starting with `literal` (then `rest`) could match."""
    deep = "/" in rest or "**" in rest
    if is_gcs(literal):
        bucket, _, prefix = literal[len(GCS_PREFIX):].partition("/")
        with _gcs_errors(literal):
            for blob in gcs_list(bucket, prefix, delimiter=None if deep else "/"):
                if not blob.name.endswith("/"):  # folder placeholders
                    yield f"{GCS_PREFIX}{bucket}/{blob.name}"
        return
    folder = os.path.dirname(literal) or "."
    if not os.path.isdir(folder):
        return
    if not deep:
        for entry in os.scandir(folder):
            if entry.is_file():
                yield os.path.join(folder, entry.name)
        return
    for root, _, names in os.walk(folder):
        for name in names:
            yield os.path.join(root, name)


# --- writing ---------------------------------------------------------------------------------

def _mode_of(folder: str) -> int:
    return stat.S_IMODE(os.stat(folder).st_mode) & 0o2777  # setgid kept: group sharing


def _make_folders(folder: str) -> None:
    """os.makedirs(folder, exist_ok=True), each new folder given its parent's mode."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    mode = _mode_of(folder or ".")
    for new in reversed(missing):
        try:
            os.mkdir(new, mode & 0o777)
        except FileExistsError:
            continue  # another thread's, which sets its mode
        os.chmod(new, mode)  # mkdir's mode passed through the umask


def _create_local(path: str) -> BinaryIO:
    """A new file for writing, with its folder's mode less x (never wider, even briefly)."""
    mode = _mode_of(os.path.dirname(path) or ".") & 0o666
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def make_root(folder: str, permissions: str = DEFAULT_PERMISSIONS) -> None:
    """Creates local `folder` if needed and sets its mode to `PERMISSIONS[permissions]`: what
    this module creates under it inherits it. Nothing for a gs:// folder (the bucket's IAM
    says who reads it)."""
    if is_gcs(folder):
        return
    _make_folders(folder)
    os.chmod(folder, PERMISSIONS[permissions])


def _local_tmp(path: str) -> str:
    _make_folders(os.path.dirname(path) or ".")
    return f"{path}{TMP_MARK}{uuid.uuid4().hex}"


def _publish_local(tmp: str, path: str, if_absent: bool) -> None:
    try:
        if if_absent:
            os.link(tmp, path)  # fails if `path` exists, atomically
            os.remove(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _upload(path: str, if_absent: bool, send: Any, md5: Optional[str] = None) -> None:
    """`send(blob, **options)` uploads the bytes; `md5` (base64, as GCS reports it) lets an
    `if_absent` upload whose first try landed but whose answer was lost tell its own object
    from another's."""
    from google.api_core.exceptions import PreconditionFailed

    blob, tries = _blob(path), []
    options = {"if_generation_match": 0} if if_absent else {}

    def attempt() -> None:
        tries.append(1)
        try:
            send(blob, retry=None, **options)
        except PreconditionFailed:
            if len(tries) > 1 and md5 is not None:
                retried("read", lambda: blob.reload(retry=None))
                if blob.md5_hash == md5:
                    return
            raise

    with _gcs_errors(path):
        retried("upload", attempt)


def write_bytes(path: str, data: bytes, *, if_absent: bool = False) -> None:
    """Writes `data` to `path` atomically: a reader sees the old file, or none, or all of it.

    Locally a temporary file in the same folder is renamed over `path` (folders are made as
    needed); on GCS it is one upload.

    Args:
        if_absent: fail instead of replacing an existing file.

    Raises:
        FileExistsError: `if_absent` and the file exists.
    """
    if is_gcs(path):
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode() if if_absent else None
        _upload(path, if_absent, lambda blob, **kw: blob.upload_from_string(data, **kw), md5)
        return
    tmp = _local_tmp(path)
    try:
        with _create_local(tmp) as handle:
            handle.write(data)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _publish_local(tmp, path, if_absent)


class AtomicWriter(io.RawIOBase):
    """A file written streaming and published at once by `commit()` (see `open_write`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # GCS: spooled to a local temporary file and uploaded at commit, so that the object
        # appears only then (an upload stream would publish whatever it has when closed).
        self._tmp = None if is_gcs(path) else _local_tmp(path)
        self._file: BinaryIO = (_create_local(self._tmp) if self._tmp
                                else tempfile.TemporaryFile())

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def commit(self) -> None:
        """Publishes the bytes written at `path`, replacing any file there."""
        if self._tmp is not None:
            self._file.close()
            _publish_local(self._tmp, self.path, if_absent=False)
        else:
            def send(blob: Any, **kw: Any) -> None:
                self._file.seek(0)  # each try sends it all
                blob.upload_from_file(self._file, **kw)

            _upload(self.path, False, send)
            self._file.close()
        super().close()

    def discard(self) -> None:
        """Drops the bytes written; `path` is left as it was."""
        self._file.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp)
        super().close()

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def open_write(path: str) -> AtomicWriter:
    """Opens `path` for a streaming write published at `commit()` (or on leaving a `with`
    block without an error; `discard()`, or an error there, leaves `path` as it was)."""
    return AtomicWriter(path)


def copy(pairs: Iterable[tuple[str, str]]) -> None:
    """Copies files, (source, target) each: server-side and batched on GCS."""
    pairs = list(pairs)
    remote = [(s, t) for s, t in pairs if is_gcs(s)]
    for source, target in pairs:
        if not is_gcs(source):
            with open(source, "rb") as src, open_write(target) as dst:
                shutil.copyfileobj(src, dst)
    for start in range(0, len(remote), _BATCH):
        group = remote[start:start + _BATCH]
        with _gcs_errors(group[0][0]):  # copying a source to a name again is idempotent
            retried("copy", lambda: _copy_objects(group))


def _copy_objects(group: list[tuple[str, str]]) -> None:
    with _client(None).batch():  # raises for a failed call inside
        for source, target in group:
            (src_bucket, src_name), (dst_bucket, dst_name) = map(split_gcs, (source, target))
            gcs_bucket(src_bucket).copy_blob(gcs_bucket(src_bucket).blob(src_name),
                                             gcs_bucket(dst_bucket), dst_name, retry=None)


# --- deleting --------------------------------------------------------------------------------

def delete(paths: Iterable[str]) -> None:
    """Deletes files; missing ones are ignored. On GCS in batch requests."""
    remote = []
    for path in paths:
        if is_gcs(path):
            remote.append(split_gcs(path))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    for start in range(0, len(remote), _BATCH):
        _delete_objects(remote[start:start + _BATCH])


def _delete_objects(objects: list[tuple[str, str]]) -> None:
    with _gcs_errors(f"{GCS_PREFIX}{objects[0][0]}/{objects[0][1]}"):
        left = retried("delete", lambda: _delete_batch(objects))
    for (bucket, name), response in left:
        raise OSError(f"cannot delete {GCS_PREFIX}{bucket}/{name}: HTTP "
                      f"{response.status_code} {response.reason}")


def _delete_batch(objects: list[tuple[str, str]]) -> list[tuple[tuple[str, str], Any]]:
    """Deletes `objects` in one batch; the calls refused for good, with their responses.

    Raises:
        GoogleAPICallError: a transient failure of the batch or of a call in it (deleting
            again is harmless: a missing object is no error).
    """
    from google.api_core.exceptions import from_http_status

    with _client(None).batch(raise_exception=False) as batch:
        for bucket, name in objects:
            gcs_bucket(bucket).delete_blob(name, retry=None)
    # The batch keeps each call's response (the public API raises for the last failure only).
    done = list(zip(objects, batch._responses))
    for _, response in done:
        if response.status_code in _TRANSIENT_STATUS:
            raise from_http_status(response.status_code, response.reason or "", response=response)
    return [(obj, r) for obj, r in done if r.status_code not in (200, 204, 404)]


def delete_tree(path: str) -> None:
    """Deletes a local folder (or file) or every object under a gs:// prefix, if any."""
    if is_gcs(path):
        delete(list_files(path.rstrip("/") + "/**"))
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def temporaries(folder: str) -> list[str]:
    """Temporary files that interrupted writes left in `folder` (`TMP_MARK` in their name)."""
    return list_files(join(folder, f"*{TMP_MARK}*"))


# --- moving and describing ------------------------------------------------------------------

def move_many(pairs: Iterable[tuple[str, str]]) -> None:
    """Renames files, (source, target) each: locally `os.replace` (folders made as needed); on
    GCS batched server-side copies, then batched deletes of the sources (no byte goes through
    this machine).

    Raises:
        FileNotFoundError: a source is missing (locally; on GCS the batch raises OSError).
    """
    pairs = list(pairs)
    for source, target in pairs:
        if is_gcs(source) != is_gcs(target):
            raise ValueError(f"cannot move {source} to {target}: not on one store")
        if not is_gcs(source):
            _make_folders(os.path.dirname(target))  # the root's mode, as every local write
            os.replace(source, target)
    remote = [(s, t) for s, t in pairs if is_gcs(s)]
    copy(remote)
    delete(s for s, _ in remote)


class FileStat(NamedTuple):
    """What changes when a file's content does, read without reading the content."""

    size: int
    version: int  # mtime in ns locally; the generation on GCS (a new upload is a new one)
    crc32c: str = ""  # GCS's own checksum (base64); "" locally
    md5: str = ""  # GCS's (base64; a composite object has none); "" locally


def file_stat(path: str, user_project: Optional[str] = None) -> FileStat:
    """A file's `FileStat`: one metadata call on GCS, a stat locally.

    Raises:
        FileNotFoundError: no such file.
    """
    if not is_gcs(path):
        info = os.stat(path)
        return FileStat(info.st_size, info.st_mtime_ns)
    blob = _blob(path, user_project)
    with _gcs_errors(path):
        retried("read", lambda: blob.reload(retry=None))
    return FileStat(int(blob.size), int(blob.generation), blob.crc32c or "", blob.md5_hash or "")
