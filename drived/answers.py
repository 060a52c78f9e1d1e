"""Answer room: the memory of List answers that their clients have yet to take.

A unary answer stays in the daemon until its client reads it: gRPC holds the
serialized message while the client's flow-control window is shut, and ends
the call only once it is sent. A List answer takes up to a message (4 MiB), so
a client that asks for many big pages and stops reading would make the daemon
hold every one of them. Each List takes room for the largest answer before it
builds its own, keeps what its answer takes once built, and gives it back when
its call ends (the client took the answer, or went away). A List that finds no
room waits for it: it is never refused, and a host whose clients stall waits
behind its own answers (`PER_PEER`) while the others are answered.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from .config import MESSAGE_LIMIT
from .limits import peer_host

PER_PEER = 8 * MESSAGE_LIMIT  # a client host's answers not yet taken (32 MiB)
TOTAL = 4 * PER_PEER  # every host's (128 MiB)


class AnswerRoom:
    """The room for List answers not yet taken, in all and per client host (`drived.limits.peer_host`)."""

    def __init__(self, total: int = TOTAL, per_peer: int = PER_PEER) -> None:
        self.total = total
        self.per_peer = per_peer
        self.used = 0
        self._by_peer: Counter[str] = Counter()
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}  # per host, first come first served

    async def take(self, peer: str) -> Held:
        """Room for the largest answer, for a call of `peer` (a gRPC peer); waits until there is some."""
        host = peer_host(peer)
        if host not in self._waiting and self._fits(host):
            self._add(host, MESSAGE_LIMIT)
            return Held(self, host, MESSAGE_LIMIT)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(host, deque()).append(waiter)
        try:
            await waiter  # its room is taken for it as it is woken (`give_back`)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back(host, MESSAGE_LIMIT)
            else:
                self._drop_waiter(host, waiter)
            raise
        return Held(self, host, MESSAGE_LIMIT)

    def _fits(self, host: str) -> bool:
        return self.used + MESSAGE_LIMIT <= self.total and self._by_peer[host] + MESSAGE_LIMIT <= self.per_peer

    def _add(self, host: str, size: int) -> None:
        self.used += size
        self._by_peer[host] += size
        if not self._by_peer[host]:
            del self._by_peer[host]

    def _drop_waiter(self, host: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(host)
        if queue is not None and waiter in queue:  # not handed out and dropped by `give_back` already
            queue.remove(waiter)
            if not queue:
                del self._waiting[host]

    def give_back(self, host: str, size: int) -> None:
        """Frees `size` bytes of `host`'s room, and hands room to the calls waiting for it."""
        self._add(host, -size)
        for waiting, queue in list(self._waiting.items()):
            while queue and self._fits(waiting):
                waiter = queue.popleft()
                if not waiter.cancelled():  # its call was cancelled, and is yet to learn it
                    self._add(waiting, MESSAGE_LIMIT)
                    waiter.set_result(None)
            if not queue:
                del self._waiting[waiting]


class Held:
    """One call's room: all of it until its answer is built (`keep`), and what that answer takes until the call
    ends (`release`)."""

    def __init__(self, room: AnswerRoom, host: str, size: int) -> None:
        self._room = room
        self._host = host
        self.size = size

    def keep(self, size: int) -> None:
        """Keeps `size` bytes (the answer built, at most what is held) and gives back the rest."""
        spare = self.size - min(size, self.size)
        self.size -= spare
        if spare:
            self._room.give_back(self._host, spare)

    def release(self) -> None:
        """Gives back all the call holds; once."""
        self.keep(0)
