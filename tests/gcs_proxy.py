"""A counting HTTP proxy in front of the GCS emulator: which JSON API calls a run makes.

Clients reach it through STORAGE_EMULATOR_HOST, so every request of google-cloud-storage
(ours and Beam's) passes through it and is recorded before it is forwarded unchanged.
`write_ops` sorts the recorded requests into object writes the way GCS bills them: one
upload per object created (a resumable upload's chunks belong to its start), a copy or
rewrite, a delete; the calls inside a batch request count one by one.

The emulator ignores preconditions; the proxy answers an upload with `ifGenerationMatch=0`
for an object that exists with 412, as GCS does, so that `if_absent` can be exercised.

Optionally it shapes the link like real GCS, per request (each is its own stream): the first
byte of a response waits `latency_s`, and the body flows at `bytes_per_s`. `events` records,
in order, each request's arrival and the start of its response body.

With `faults` it also misbehaves like a network and a server under load (`Faults`): a seeded
share of requests is answered 503, or 429 with Retry-After, before reaching the emulator, or
reaches it and has its response cut halfway through the body, or delayed; and permanent faults:
403 for every request naming a forbidden object, 404 for every request on a missing bucket.
`injected` counts the faults by kind. A batch request is one request here (a fault answers the
whole batch).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import io
import json
import os
import random
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, NamedTuple

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}
_BATCH_LINE = re.compile(rb"^(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.1", re.M)
_UPLOAD_BUCKET = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")
_NAME = re.compile(rb'"name":\s*"((?:[^"\\]|\\.)*)"')
_BLOCK = 64 * 1024  # bytes written at a time by a throttled response
_OBJECT_PATH = re.compile(r"^/(?:download/|upload/)?storage/v1/b/([^/]+)(?:/o/([^/]+))?")
TRANSIENT = ("503", "429", "cut", "delay")
_PRECONDITION_FAILED = (b'{"error": {"code": 412, "message": "At least one of the pre-conditions '
                        b'you specified did not hold."}}')


class Request(NamedTuple):  # a tuple too: (method, path, query)
    method: str
    path: str  # without the query
    query: dict[str, list[str]]


def _kind(method: str, path: str) -> str:
    if "/copyTo/" in path or "/rewriteTo/" in path or path.endswith("/compose"):
        return "copy"
    if path.startswith("/upload/"):
        return "upload" if method == "POST" else "upload_part"
    if method == "DELETE" and "/o/" in path:
        return "delete"
    return "read" if method == "GET" else f"other {method}"


@dataclasses.dataclass
class Faults:
    """What the proxy does wrong.

    Attributes:
        rate: share of requests given one of `kinds` (drawn by a Random(`seed`)).
        kinds: among TRANSIENT: "503", "429" (with Retry-After `retry_after_s`), "cut" (the
            emulator's response, cut halfway through its body), "delay" (`delay_s` late).
        forbidden: objects ("bucket/name") answered 403 whatever the request.
        missing_buckets: buckets answered 404 whatever the request.
    """

    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = TRANSIENT
    retry_after_s: int = 1
    delay_s: float = 0.2
    forbidden: frozenset[str] = frozenset()
    missing_buckets: frozenset[str] = frozenset()


def _error_body(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message,
                                 "errors": [{"message": message}]}}).encode()


def _named(target: str, body: bytes) -> list[tuple[str, str]]:
    """(bucket, object name or "") of every bucket or object a request names."""
    url = urllib.parse.urlsplit(target)
    paths = [url.path]
    if url.path.startswith("/batch/"):
        paths = [urllib.parse.urlsplit(p.decode()).path for _, p in _BATCH_LINE.findall(body)]
    found = []
    for path in paths:
        match = _OBJECT_PATH.match(path)
        if match:
            found.append((match.group(1), urllib.parse.unquote(match.group(2) or "")))
    upload = _UPLOAD_BUCKET.match(url.path)
    if upload:
        name = urllib.parse.parse_qs(url.query).get("name", [None])[0]
        if name is None:
            named = _NAME.search(body)
            name = json.loads(b'"' + named.group(1) + b'"') if named else ""
        found.append((upload.group(1), name))
    return found


class CountingProxy:
    """Forwards HTTP requests to `target` ("http://host:port") and records each one.

    Args:
        target: the emulator.
        latency_s: delay of each response's first byte.
        bytes_per_s: the rate of each response body; None: unthrottled.
    """

    def __init__(
        self, target: str, latency_s: float = 0.0, bytes_per_s: float | None = None,
        faults: Faults | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(target)
        self._target = (parsed.hostname, parsed.port)
        self._latency_s = latency_s
        self._bytes_per_s = bytes_per_s
        self.faults = faults
        self.injected: collections.Counter = collections.Counter()
        self.requests: list[Request] = []
        self.events: list[tuple[str, str]] = []  # ("request" | "response", path)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _exists_already(self, method: str, target: str, body: bytes) -> bool:
        """Whether this upload asks `ifGenerationMatch=0` of an object that exists."""
        url = urllib.parse.urlsplit(target)
        bucket = _UPLOAD_BUCKET.match(url.path)
        query = urllib.parse.parse_qs(url.query)
        if method != "POST" or not bucket or query.get("ifGenerationMatch") != ["0"]:
            return False
        name = query.get("name", [None])[0]
        if name is None:
            found = _NAME.search(body)
            name = json.loads(b'"' + found.group(1) + b'"') if found else ""
        conn = http.client.HTTPConnection(*self._target, timeout=120)
        conn.request("GET", f"/storage/v1/b/{bucket.group(1)}/o/"
                     f"{urllib.parse.quote(name, safe='')}")
        status = conn.getresponse().status
        conn.close()
        return status == 200

    @property
    def faults(self) -> Faults | None:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults | None) -> None:
        """Faults from now on (None: none), drawn afresh from their seed."""
        self._faults = faults
        self._random = random.Random(faults.seed if faults else 0)

    def _fault(self, target: str, body: bytes) -> str | None:
        """The fault this request gets: "403", "404", one of TRANSIENT, or None."""
        faults = self.faults
        if faults is None:
            return None
        named = _named(target, body)
        with self._lock:
            if any(f"{b}/{n}" in faults.forbidden for b, n in named):
                kind = "403"
            elif any(b in faults.missing_buckets for b, _ in named):
                kind = "404"
            elif faults.rate and self._random.random() < faults.rate:
                kind = self._random.choice(faults.kinds)
            else:
                return None
            self.injected[kind] += 1
        return kind

    def _record(self, method: str, target: str, body: bytes) -> None:
        url = urllib.parse.urlsplit(target)
        found = [Request(method, url.path, urllib.parse.parse_qs(url.query))]
        if url.path.startswith("/batch/"):
            found = [Request(m.decode(), urllib.parse.urlsplit(p.decode()).path,
                             urllib.parse.parse_qs(urllib.parse.urlsplit(p.decode()).query))
                     for m, p in _BATCH_LINE.findall(body)]
        with self._lock:
            self.requests.extend(found)
            self.events.append(("request", url.path))

    def _first_byte(self, target: str) -> None:
        """Waits the first-byte latency, then records the response's start."""
        time.sleep(self._latency_s)
        with self._lock:
            self.events.append(("response", urllib.parse.urlsplit(target).path))

    def _write_body(self, wfile: io.BufferedIOBase, data: bytes) -> None:
        if not self._bytes_per_s:
            wfile.write(data)
            return
        start = time.monotonic()
        for sent in range(0, len(data), _BLOCK):
            time.sleep(max(0.0, start + sent / self._bytes_per_s - time.monotonic()))
            wfile.write(data[sent : sent + _BLOCK])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._record(self.command, self.path, body)
                fault = proxy._fault(self.path, body)
                refused = {"403": (403, "Forbidden: the caller does not have access"),
                           "404": (404, "The specified bucket does not exist."),
                           "503": (503, "Backend Error"), "429": (429, "Rate limit exceeded")}
                if fault in refused:
                    code, message = refused[fault]
                    extra = ({"Retry-After": str(proxy.faults.retry_after_s)}
                             if fault == "429" else {})
                    self._answer(code, _error_body(code, message), extra)
                    return
                if proxy._exists_already(self.command, self.path, body):
                    self._answer(412, _PRECONDITION_FAILED)
                    return
                conn = http.client.HTTPConnection(*proxy._target, timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                proxy._first_byte(self.path)
                if fault == "delay":
                    time.sleep(proxy.faults.delay_s)
                if fault == "cut" and len(data) < 2:
                    self.close_connection = True
                    return
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut":  # the connection drops halfway through the body (or,
                    self.wfile.write(data[: len(data) // 2])  # for none, before the status)
                    self.close_connection = True
                    return
                proxy._write_body(self.wfile, data)

            def _answer(self, code: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        return Handler

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.events.clear()
            self.injected.clear()

    def counts(self) -> collections.Counter:
        """Requests by kind: upload, upload_part, copy, delete, read, other METHOD."""
        with self._lock:
            return collections.Counter(_kind(r.method, r.path) for r in self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __iter__(self) -> Iterator[Request]:
        with self._lock:
            return iter(list(self.requests))


def write_ops(counts: collections.Counter) -> int:
    """Object writes: uploads started, copies or rewrites, deletes."""
    return counts["upload"] + counts["copy"] + counts["delete"]


@contextlib.contextmanager
def proxied(**options) -> Iterator[CountingProxy]:
    """google-cloud-storage clients made inside reach the emulator through a `CountingProxy`
    (`options`: its own), for the tests that count or break requests."""
    upstream = os.environ["STORAGE_EMULATOR_HOST"]
    server = CountingProxy(upstream, **options)
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    try:
        yield server
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = upstream
        server.close()
