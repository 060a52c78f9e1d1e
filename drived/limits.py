"""Streams: how many the daemon serves at once, which ones a quiet peer has abandoned, and memory given back.

Every call that moves file bytes or stays open (Put, PutFile, Get, Watch) is a
*stream* here. `Streams.opened` admits it or refuses it with RESOURCE_EXHAUSTED:
at most `max_streams` at once in all, and `max_streams_per_peer` from one
peer, a peer being the client's address without its port (every process of
one host, or everything behind one proxy, is one peer). Calls that only ask
(List, Stat, Delete) take no stream's place, so one client's flood of
streams leaves the daemon answering everyone else; they take one among the
requests arriving (`Streams.arriving`) only while their request arrives.

A Put or Get whose peer has sent (Put) or taken (Get) nothing for
`idle_timeout` seconds while the daemon waited on it, or a call whose request
has not all come in that time, is cancelled, and the
caller answers it UNAVAILABLE; the Put's upload is discarded on the way out.
The time a Get spends waiting for its path to be put, or reading from the
store, is not the peer's and does not count. Nothing runs per message for
this: the call counts its messages and says when it waits on its peer
(`Stream.progress`, `Stream.waiting`), and one task looks at every stream a
few times per timeout.

The same task gives memory back: each received or sent message is a buffer
of up to a message's size, and the malloc settings of `drive_client.malloc`
keep freed buffers for reuse. Each tick, what the allocator holds free past
what a quiet daemon reuses is returned to the system (`release_memory`), so
that what a burst of streams took does not stay with the daemon, whether those
streams ended or stalled holding nothing (a running transfer's few buffers are
below that and stay).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from drive_client.errors import TooManyStreams

from .config import Named, flag

log = logging.getLogger("drived")

MAX_TICK_SECONDS = 1.0  # how often streams are looked at (more often for a short idle timeout)
MIN_TICK_SECONDS = 0.1  # and at most this often, whatever the idle timeout: a tick of nothing spins the loop


def peer_host(peer: str) -> str:
    """A gRPC peer ("ipv4:10.0.0.7:53122", "ipv6:[::1]:53122", "unix:/run/x") without its port."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{address.rpartition(':')[0]}"
    return peer


@dataclass(eq=False)
class Stream:
    """One admitted call: its peer, its task, and what it has moved, for the idle check."""

    method: str
    peer: str
    task: asyncio.Task[object] | None
    idle_limited: bool  # Put and Get: cancelled when their peer goes quiet
    arriving: bool = False  # its request is arriving: cancelled too when its peer goes quiet meanwhile
    progress: int = 0  # messages received or sent
    waiting: bool = False  # waiting on the peer (the next message of a Put, the write of a Get)
    timed_out: bool = False  # cancelled by the idle check
    _seen: int = -1  # `progress` at the last look while waiting
    _quiet_since: float = field(default=0.0)


class Streams:
    """The daemon's open streams: admission, the idle check and giving memory back."""

    def __init__(
        self, max_streams: int, max_per_peer: int, idle_timeout: float,
        release_memory: Callable[[], Awaitable[object]] | None = None, named: Named = flag,
    ) -> None:
        self.max_streams = max_streams
        self.max_per_peer = max_per_peer
        self.idle_timeout = idle_timeout  # 0: no idle check
        self.named = named  # the settings of these limits as given, which refusals name
        self._release_memory = release_memory
        self._open: set[Stream] = set()
        self._per_peer: Counter[str] = Counter()
        self._arriving: set[Stream] = set()  # requests of calls that are no stream, still arriving
        self._arriving_per_peer: Counter[str] = Counter()
        self._answering: set[Stream] = set()  # calls of other services answering for as long as their client stays
        self._answering_per_peer: Counter[str] = Counter()
        self._none_open = asyncio.Event()
        self._none_open.set()
        self._ticking: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return len(self._open)

    @contextmanager
    def opened(self, method: str, peer: str, idle_limited: bool) -> Iterator[Stream]:
        """Admits a stream of `method` from `peer` for the body of a `with`; TooManyStreams when full."""
        stream = Stream(method, peer_host(peer), asyncio.current_task(), idle_limited)
        try:
            with self._admitted(stream, self._open, self._per_peer, "transfers and watches open"):
                self._none_open.clear()
                yield stream
        finally:
            if not self._open:
                self._none_open.set()

    @contextmanager
    def arriving(self, method: str, peer: str, task: asyncio.Task[Any] | None) -> Iterator[Stream]:
        """Admits a call of `method` that is no stream (List, Stat, Delete, ...) from `peer` while the rest of its
        request arrives, as a stream that the idle check ends (by cancelling `task`), for the body of a `with`;
        TooManyStreams when full.

        gRPC holds what has come of a request until all of it has: a client
        that sends part of each of many requests and stalls would hold up to
        a message (4 MiB) each, for as long as it stalls. Such a call takes a
        place here, as many as streams (`drived.service._request`); a whole
        request comes with its call, so no other call waits here.
        """
        stream = Stream(method, peer_host(peer), task, idle_limited=False)
        with self._admitted(stream, self._arriving, self._arriving_per_peer, "requests arriving"):
            yield stream

    @contextmanager
    def answering(self, method: str, peer: str) -> Iterator[None]:
        """Admits a call of another service that answers for as long as its client stays (health's Watch) from
        `peer`, for the body of a `with`; TooManyStreams when full.

        Any client may open such calls, with no token: they take as many
        places as streams, but places of their own, which the drain does not
        wait for (the call ends once the transfers have).
        """
        stream = Stream(method, peer_host(peer), asyncio.current_task(), idle_limited=False)
        with self._admitted(stream, self._answering, self._answering_per_peer, f"{method} calls open"):
            yield

    @contextmanager
    def _admitted(self, stream: Stream, admitted: set[Stream], per_peer: Counter[str], what: str) -> Iterator[None]:
        """Adds `stream` to `admitted` and `per_peer` for the body of a `with`; TooManyStreams when either is full."""
        if per_peer[stream.peer] >= self.max_per_peer:
            raise TooManyStreams(
                f"this client's host has {self.max_per_peer} {what}, the most drived takes from one host "
                f"({self.named('max_streams_per_peer')}): wait for some to end, then retry"
            )
        if len(admitted) >= self.max_streams:
            raise TooManyStreams(f"drived has {self.max_streams} {what}, the most it takes at once "
                                 f"({self.named('max_streams')}): retry later")
        admitted.add(stream)
        per_peer[stream.peer] += 1
        try:
            yield
        finally:
            admitted.discard(stream)
            per_peer[stream.peer] -= 1
            if not per_peer[stream.peer]:
                del per_peer[stream.peer]

    async def wait_closed(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for every open stream to end; True if they did."""
        try:
            await asyncio.wait_for(self._none_open.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def start(self) -> None:
        """Starts looking at the streams (idle check, memory) in a task of the running loop."""
        self._ticking = asyncio.create_task(self._tick_forever())

    async def close(self) -> None:
        if self._ticking is not None:
            self._ticking.cancel()
            await asyncio.gather(self._ticking, return_exceptions=True)

    def tick_seconds(self) -> float:
        if not self.idle_timeout:
            return MAX_TICK_SECONDS
        return max(MIN_TICK_SECONDS, min(MAX_TICK_SECONDS, self.idle_timeout / 4))

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_seconds())
            self.cancel_idle(time.monotonic())
            if self._release_memory is not None:
                started = time.perf_counter()
                await self._release_memory()
                log.debug("memory check", extra={"fields": {"ms": round((time.perf_counter() - started) * 1000, 3)}})

    def cancel_idle(self, now: float) -> None:
        """Cancels each Put or Get, and each call whose request arrives, that has waited on its peer, with no
        message moved, for the idle timeout."""
        if not self.idle_timeout:
            return
        for stream in itertools.chain(self._open, self._arriving):
            if not ((stream.idle_limited or stream.arriving) and stream.waiting) or stream.progress != stream._seen:
                stream._seen = stream.progress
                stream._quiet_since = now
            elif now - stream._quiet_since >= self.idle_timeout and not stream.timed_out and stream.task:
                stream.timed_out = True
                stream.task.cancel()
                log.info("idle stream cancelled", extra={"fields": {
                    "method": stream.method, "peer": stream.peer, "idle_s": round(now - stream._quiet_since, 1),
                }})
