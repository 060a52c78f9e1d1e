"""Single-flight mounts of `s3://bucket/prefix/` locations, and their current indexes.

`mount` always re-indexes, but concurrent mounts of one location share one
indexing run (the first starts it, the others await the same task). Until a
run completes, `index` keeps answering with the previous complete index, so
lists and gets during a re-index never see a half-built one. A failed run
leaves the previous index in place.

The indexes held take at most `memory` bytes: past it the least recently used
are dropped, and indexed again at their next use. The listings of the runs in
progress take at most as much again between them (and each run its index
beside its listing, for the moment it builds it); one that would pass it fails
RESOURCE_EXHAUSTED, so no client makes the daemon hold more by mounting many
locations or a huge one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from drive_client.errors import InvalidArgument, ResourceExhausted

from .. import metrics
from ..config import Named, flag
from .index import S3Index
from .pages import ListingStats

log = logging.getLogger(__name__)

_Key = tuple[str, str]
# What a held index costs beside its arrays: its objects, its entry here and its metric's series,
# about 1.4 KB for a short name. Counting only the arrays (16 bytes for an empty location) would let
# a client that mounts many small locations make the daemon hold far more than `memory`.
_ENTRY_BYTES = 1536


def _uri(key: _Key) -> str:
    return f"s3://{key[0]}/{key[1]}"


def _held_bytes(key: _Key, index: S3Index) -> int:
    """The memory holding `index` as the index of `key` takes: its arrays, and its name twice (the key and the
    metric's label) on top of the rest."""
    return index.nbytes() + _ENTRY_BYTES + 2 * len(_uri(key).encode())


class S3Mounts:
    """The indexes of the mounted s3:// locations of one daemon."""

    def __init__(self, *, concurrency: int = 16, page_size: int = 1000, memory: int = 2 << 30,
                 named: Named = flag) -> None:
        self.concurrency = concurrency
        self.page_size = page_size  # MaxKeys per ListObjectsV2 call
        self.memory = memory  # bytes the held indexes take at most, and the runs in progress between them
        self.memory_setting = named("s3_index_memory")  # as it was given, which a refusal names
        self.stats = ListingStats()  # requests and indexing runs, over all locations
        self._indexes: OrderedDict[_Key, S3Index] = OrderedDict()  # the least recently used first
        self._held = 0  # what the held indexes take (`_held_bytes`), kept as they come and go
        self._building = 0  # bytes the listed runs of the runs in progress hold (taken on their threads)
        self._building_lock = threading.Lock()
        self._inflight: dict[_Key, asyncio.Task[tuple[S3Index, float]]] = {}
        self._client: Any = None
        self._closed = False
        # Each run blocks one of these threads (its listing fans out on threads of its own).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-mount")

    def _listing_client(self) -> Any:
        if self._client is None:  # created lazily, on a worker thread: boto3 setup is slow
            from .lister import make_listing_client

            self._client = make_listing_client(self.concurrency + 4)
        return self._client

    def _index_blocking(self, bucket: str, prefix: str) -> tuple[S3Index, float]:
        # boto3 loads here, at the first mount, on this worker thread: a daemon that serves no s3:// drive never
        # loads it, and the event loop goes on serving while it loads (~0.2 s; Python's import lock makes the other
        # threads wait for the one loading it)
        from .lister import build_index

        t0 = time.perf_counter()
        taken = 0

        def take(nbytes: int) -> None:
            nonlocal taken
            with self._building_lock:
                if self._building + nbytes > self.memory:
                    raise ResourceExhausted(
                        f"indexing s3://{bucket}/{prefix} passed the daemon's {self.memory_setting} "
                        f"({self.memory} bytes) with the other mounts in progress: mount a narrower prefix, "
                        "retry when other mounts have ended, or raise it"
                    )
                self._building += nbytes
                taken += nbytes

        try:
            index, result = build_index(
                self._listing_client(), bucket, prefix,
                concurrency=self.concurrency, page_size=self.page_size, stats=self.stats, take=take,
            )
        finally:
            with self._building_lock:
                self._building -= taken
        seconds = time.perf_counter() - t0
        log.info("indexed s3://%s/%s: %d objects, %d requests, %.3f s",
                 bucket, prefix, index.objects, result.requests, seconds)
        return index, seconds

    async def _run(self, key: _Key) -> tuple[S3Index, float]:
        loop = asyncio.get_running_loop()
        index, seconds = await loop.run_in_executor(self._executor, functools.partial(self._index_blocking, *key))
        if not self._closed:
            replaced = self._indexes.get(key)
            self._indexes[key] = index  # readers switch to the new index in one step...
            self._indexes.move_to_end(key)
            self._held += _held_bytes(key, index) - (0 if replaced is None else _held_bytes(key, replaced))
            metrics.INDEX_OBJECTS.labels(_uri(key)).set(index.objects)
            metrics.MOUNT_DURATION.observe(seconds)
            self._drop_beyond_memory()
        if self._inflight.get(key) is asyncio.current_task():
            del self._inflight[key]  # ...and in the same step the run stops being "in progress"
        return index, seconds

    def _drop_beyond_memory(self) -> None:
        """Drops the least recently used indexes, never the most recent (the one just made), until those held fit
        in `memory`."""
        while self._held > self.memory and len(self._indexes) > 1:
            key, dropped = self._indexes.popitem(last=False)
            freed = _held_bytes(key, dropped)
            self._held -= freed
            metrics.INDEX_OBJECTS.remove(_uri(key))
            log.info("dropped the index of %s (%d objects, %d bytes): --s3-index-memory is %d bytes; its next use "
                     "indexes it again", _uri(key), dropped.objects, freed, self.memory)
        metrics.INDEX_BYTES.set(self._held)

    async def mount(self, bucket: str, prefix: str) -> tuple[int, float]:
        """Re-indexes `s3://bucket/prefix`; returns (objects, seconds).

        Joins the run in progress for that location, if any. Raises NotFound
        (no bucket), PermissionDenied, Unavailable (endpoint unreachable or
        failing after retries), ResourceExhausted (past `memory`).
        """
        index, seconds = await self._indexed(bucket, prefix)
        return index.objects, seconds

    async def _indexed(self, bucket: str, prefix: str) -> tuple[S3Index, float]:
        if self._closed:
            raise RuntimeError("S3Mounts is closed")
        if prefix and not prefix.endswith("/"):
            raise InvalidArgument(f"an s3 drive is a folder: use prefix {prefix + '/'!r}, not {prefix!r}")
        key = (bucket, prefix)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._run(key))
            self._inflight[key] = task

            def done(t: asyncio.Task[tuple[S3Index, float]], key: _Key = key) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled():
                    t.exception()  # retrieved here, so an unawaited failure is not logged as lost

            task.add_done_callback(done)
        # shield: a cancelled caller does not cancel the run the others wait for
        return await asyncio.shield(task)

    async def index(self, bucket: str, prefix: str) -> S3Index:
        """The current index of `s3://bucket/prefix`, mounting it first if it is not held."""
        key = (bucket, prefix)
        index = self._indexes.get(key)
        if index is None:
            index, _ = await self._indexed(bucket, prefix)
        else:
            self._indexes.move_to_end(key)
        return index

    def mounted(self, bucket: str, prefix: str) -> bool:
        """Whether a complete index of the location is held."""
        return (bucket, prefix) in self._indexes

    def indexing(self, bucket: str, prefix: str) -> bool:
        """Whether an indexing run of the location is in progress."""
        return (bucket, prefix) in self._inflight

    async def close(self) -> None:
        """Waits for runs in progress (their threads cannot be interrupted) and drops the indexes."""
        self._closed = True
        tasks = list(self._inflight.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._indexes.clear()
        self._held = 0
        self._client = None
        self._executor.shutdown(wait=False)
