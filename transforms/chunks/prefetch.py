"""Background download of the gs:// chunks a reader needs next, within the cache cap.

A remote epoch otherwise stalls at every chunk boundary: `ChunkStore` downloads a chunk the
first time a record of it is read. `ChunkPrefetcher` walks the reader's own schedule (the
chunks in the order of their first use) and keeps `ahead` of them queued, downloading or
downloaded, with at most `DOWNLOAD_THREADS` in flight. Each thread has its own `ChunkStore` (so
its own GCS client) and goes through `ChunkStore.local_path`, the same download-verify-cache
path as the reader: its per-chunk lock makes a reader that reaches a chunk still in flight wait
for that download rather than start a second one.

The chunk the reader needs now never waits behind prefetches: nothing is prefetched before the
reader's first chunk is local, and a chunk the reader reaches while it is still queued is taken
off the queue and downloaded by the reader itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Iterable, Iterator, Sequence

from transforms.chunks.storage import ChunkStore

# Downloads in flight at once. A download waits mostly on the network (first-byte latency, one
# stream's bandwidth), so a few streams hide it; more only compete with the reader for CPU
# (sha256 checks, HTTP) and, on a shared NIC, for bandwidth.
DOWNLOAD_THREADS = 4


def prefetch_depth(requested: int, cache_bytes: int, chunk_bytes: int, readers: int) -> int:
    """How many chunks one reader may keep ahead: `requested`, less where `readers` processes
    (DataLoader workers) sharing one cache of `cache_bytes` would push their next chunks out of
    it before use (one chunk of each is the one being read)."""
    fits = cache_bytes // max(chunk_bytes, 1) // max(readers, 1) - 1
    return max(0, min(requested, fits))


class ChunkPrefetcher:
    """Downloads the chunks of `upcoming` (chunk indices in order of first use), keeping
    `ahead` of them queued or downloaded, in at most `DOWNLOAD_THREADS` background threads.

    The reader calls `claim(j)` before it reads chunk `j` and `advance()` once `j` is local:
    `j` leaves the window, and the next ones of `upcoming` are queued. Download errors are
    left to the reader, whose own read of the chunk raises them with the chunk named.

    Args:
        store: the reader's store; each thread builds its own with the same settings.
        entries: the split's manifest entries, indexed by chunk.
        upcoming: chunk indices in the order the reader will first use them.
        ahead: chunks queued, downloading or downloaded but not yet read, at most.
    """

    def __init__(
        self, store: ChunkStore, entries: Sequence[dict], upcoming: Iterable[int], ahead: int
    ) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self._settings = (store.output_dir, store.cache_dir, store.cache_bytes, store.verify)
        self._entries = entries
        self._upcoming: Iterator[int] = iter(upcoming)
        self._ahead = ahead
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            min(ahead, DOWNLOAD_THREADS), "chunk-prefetch"
        )
        self._pending: collections.OrderedDict[int, concurrent.futures.Future] = (
            collections.OrderedDict()
        )
        self._seen: set[int] = set()

    def claim(self, j: int) -> None:
        """Marks chunk `j` as the reader's: a queued download of it is dropped (the reader
        downloads it now rather than after the queue ahead of it), and it is never queued."""
        self._seen.add(j)
        future = self._pending.pop(j, None)
        if future is not None:
            future.cancel()  # False once started: the reader then waits for that download

    def advance(self) -> None:
        """Queues the next downloads; called once the reader's chunk is local."""
        self._fill()

    def close(self) -> None:
        """Cancels the downloads not started; one in progress finishes into the cache."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            j = next(self._upcoming, None)
            if j is None:
                return
            if j not in self._seen:
                self._seen.add(j)
                self._pending[j] = self._pool.submit(self._download, j)

    def _download(self, j: int) -> None:
        store = getattr(self._local, "store", None)
        if store is None:
            output_dir, cache_dir, cache_bytes, verify = self._settings
            store = ChunkStore(output_dir, cache_dir=cache_dir, cache_bytes=cache_bytes,
                               verify=verify)
            self._local.store = store
        try:
            store.local_path(self._entries[j])
        except Exception:  # noqa: BLE001 - the reader's own read reports it, naming the chunk
            pass
