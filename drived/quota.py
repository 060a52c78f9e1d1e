"""Quotas: how many bytes each `lit://` drive holds, and the refusal of a put that would take it past `--quota`.

A drive's usage is the bytes of its files, all components together (what a
file's content takes; the stored file's header and the store's own overhead
are not counted). The coordinator keeps it (`Coordinator.usage`) for every
daemon that shares it: counted from the backend when the coordinator has no
count of the drive (`Backend.usage`: a walk of the drive's folder on the
local disk, a listing of its prefix in S3), and from then on each commit adds
what it adds and each delete takes off what it removes, whichever daemon
makes them. A lone daemon counts each drive once after start-up. Replicas sharing a Redis
coordinator share one count per drive, made again from the store when the
coordinator lost its data (the puts wait for it, as for a first count) and
`USAGE_KEPT` (an hour) after it was made: then one replica counts the drive
in the background while puts are checked against the count it replaces, so
a drive of millions of files stalls no put while its listing runs, and the
puts and deletes made meanwhile count in the new count (its listing tells
the coordinator how far it went: `Backend.usage`'s `passed`). What a count
misses (a replica killed in a commit, an object something else wrote to
the store, a commit at the moment the listing reads its path's page, or in
progress from before the count to after it) is off until the next count
(`drived.redis_coordinator` says what exactly); a count that fails is tried
again a minute later, then after twice as long each time, up to the hour.

On the local disk the count, which a drive's first put after start-up waits
for, takes each file's content size from the stored file's size (an lstat;
`stored.content_size`) and reads no file. Sizes are all it sees: a file of
an earlier release (format 1) counts at most 4 bytes per started MiB less
than it holds, and one whose header is damaged counts as if it were sound.
A put replacing a file, and a delete, take off what the file counts by that
same measure (`Backend.counted_size`), so the count stays what a count from
scratch would find.

A put is checked three times: when it starts (a header that gives the size,
and the room left as the drive's usage stood then bounds how many bytes the
stream may send), as its bytes arrive (the stream stops at that room, see
`drived.puts`), and at its commit, where the check and the hold of the room
are one step for every daemon that shares the coordinator
(`Coordinator.reserve`), so concurrent puts into one drive cannot together
pass the quota, through one daemon or through several. A put that replaces
the caller's own file needs room only for what it adds. Refusals are
RESOURCE_EXHAUSTED with the numbers, and store nothing; a put whose
coordinator cannot be reached fails UNAVAILABLE, unchecked never.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from drive_client.errors import ResourceExhausted

from .backends.base import Backend
from .config import Named, flag
from .coordinator import Coordinator, Passed, Usage


def _bytes(count: int) -> str:
    return f"{count:,} bytes"


def _refusal(drive: str, usage: Usage, asked: int, quota: int, setting: str) -> ResourceExhausted:
    held = f"holds {_bytes(usage.used)}"
    if usage.reserved:
        held += f" and puts in progress add {_bytes(usage.reserved)}"
    return ResourceExhausted(
        f"lit://{drive} {held}; this put asks for {_bytes(asked)} more, over its quota of {_bytes(quota)} "
        f"({setting}): nothing was stored. Delete files from the drive, or ask for a larger quota"
    )


@dataclass(frozen=True, slots=True)
class Room:
    """The room a put may fill, as its drive's usage stood when the put began."""

    drive: str
    usage: Usage
    quota: int
    replaced: int  # what the caller's file the put replaces counts (0 for a new path)
    setting: str  # the quota's setting as it was given, which the refusal names

    @property
    def bytes(self) -> int:
        """The bytes the put may send."""
        return self.quota - self.usage.used - self.usage.reserved + self.replaced

    def refusal(self, received: int) -> ResourceExhausted:
        """The refusal of the put once it has (or, by its header, will have) `received` bytes, more than `bytes`."""
        return _refusal(self.drive, self.usage, received - self.replaced, self.quota, self.setting)


class Quotas:
    """One quota for every drive, against the usage the coordinator keeps of each."""

    def __init__(self, backend: Backend, coordinator: Coordinator, quota: int, named: Named = flag) -> None:
        self.backend = backend
        self.coordinator = coordinator
        self.quota = quota
        self.setting = named("quota")  # as it was given, which refusals name
        self._counting: dict[str, asyncio.Future[int]] = {}  # the store's counts under way, by drive

    async def _count(self, drive: str, passed: Passed | None) -> int:
        """The store's count of the drive's bytes: the callers that need it at once share one; a count that tells
        where its listing is (`passed`) is its caller's own."""
        if passed is not None:
            return await self.backend.usage(drive, passed)
        counting = self._counting.get(drive)
        if counting is None:
            counting = self._counting[drive] = asyncio.ensure_future(self.backend.usage(drive))  # key: its name
            counting.add_done_callback(lambda _: self._counting.pop(drive))  # a failed one is tried again next time
        return await asyncio.shield(counting)

    async def room(self, drive: str, replaced: int) -> Room:
        """The room of a put beginning now that replaces a file of `replaced` bytes (0 for a new path)."""
        usage = await self.coordinator.usage(drive, functools.partial(self._count, drive))
        return Room(drive, usage, self.quota, replaced, self.setting)

    @asynccontextmanager
    async def adding(self, drive: str, key: str, added: int) -> AsyncIterator[None]:
        """Holds room for a commit of the file at `key` that adds `added` bytes (less than 0 when it frees some) for
        the body of an `async with`, which commits: ResourceExhausted before the body when there is not enough room.
        The bytes count as used when the body ends, and the room goes back when it fails."""
        usage, reservation = await self.coordinator.reserve(
            drive, key, added, self.quota, functools.partial(self._count, drive))
        if reservation is None:
            raise _refusal(drive, usage, added, self.quota, self.setting)
        try:
            yield
        except BaseException:
            await self.coordinator.unreserve(reservation, committed=False)
            raise
        await self.coordinator.unreserve(reservation, committed=True)

    async def deleted(self, drive: str, key: str, size: int) -> None:
        """The file at `key`, of `size` bytes, was deleted from the drive (`Coordinator.deleted`)."""
        await self.coordinator.deleted(drive, key, size)
