"""Quotas: how many bytes each `lit://` drive holds, and the refusal of a put that would take it past `--quota`.

A drive's usage is the bytes of its files, all components together (what a
file's content takes; the stored file's header and the store's own overhead
are not counted). It is counted from the backend the first time this daemon
needs it after start-up (`Backend.usage`: a walk of the drive's folder on the
local disk, a listing of its prefix in S3), and from then on this daemon
adds what its commits add and subtracts what its deletes remove.

On the local disk the count, which a drive's first put after start-up waits
for, takes each file's content size from the stored file's size (an lstat;
`stored.content_size`) and reads no file. Sizes are all it sees: a file of
an earlier release (format 1) counts at most 4 bytes per started MiB less
than it holds, and one whose header is damaged counts as if it were sound.
A put replacing a file, and a delete, take off what the file counts by that
same measure (`Backend.counted_size`), so the count stays what a count from
scratch would find.

A put is checked three times: when it starts (a header that gives the size,
and the room left bounds how many bytes the stream may send), as its bytes
arrive (the stream stops at that room, see `drived.puts`), and at its commit,
where the check and the count are one step in the event loop, so concurrent
puts into one drive cannot together pass the quota. A put that replaces the
caller's own file needs room only for what it adds. Refusals are
RESOURCE_EXHAUSTED with the numbers, and store nothing.

Several daemons sharing one store (`--storage`) each count the drive once and
then see only their own puts and deletes: together they can take a drive past
its quota by what the others stored since each counted. A restart counts
again. A shared count belongs to the coordinator, which does not keep one yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from drive_client.errors import ResourceExhausted

from .backends.base import Backend


@dataclass
class _Usage:
    used: int  # bytes of the drive's committed files
    reserved: int = 0  # bytes that commits in progress add


def _bytes(count: int) -> str:
    return f"{count:,} bytes"


class Quotas:
    """The usage of each drive this daemon has put into or deleted from, against one quota for every drive."""

    def __init__(self, backend: Backend, quota: int) -> None:
        self.backend = backend
        self.quota = quota
        self._usage: dict[str, asyncio.Future[_Usage]] = {}

    async def _of(self, drive: str) -> _Usage:
        """The drive's usage, counted once (concurrent first callers share one count)."""
        counting = self._usage.get(drive)
        if counting is None:
            counting = self._usage[drive] = asyncio.ensure_future(self._count(drive))
        try:
            return await asyncio.shield(counting)
        except Exception:
            if self._usage.get(drive) is counting:
                del self._usage[drive]  # a failed count (the store unreachable) is tried again next time
            raise

    async def _count(self, drive: str) -> _Usage:
        return _Usage(await self.backend.usage(drive))  # a drive's key is its name (drived.paths)

    def _refusal(self, drive: str, usage: _Usage, asked: int) -> ResourceExhausted:
        held = f"holds {_bytes(usage.used)}"
        if usage.reserved:
            held += f" and puts in progress add {_bytes(usage.reserved)}"
        return ResourceExhausted(
            f"lit://{drive} {held}; this put asks for {_bytes(asked)} more, over its quota of {_bytes(self.quota)} "
            "(--quota): nothing was stored. Delete files from the drive, or ask for a larger quota"
        )

    async def room(self, drive: str, replaced: int) -> int:
        """The bytes a put may send that replaces a file of `replaced` bytes (0 for a new path)."""
        usage = await self._of(drive)
        return self.quota - usage.used - usage.reserved + replaced

    def refusal(self, drive: str, asked: int) -> ResourceExhausted:
        """The refusal of a put that asks for `asked` more bytes than the drive has room for (its usage counted)."""
        return self._refusal(drive, self._usage[drive].result(), asked)

    @asynccontextmanager
    async def adding(self, drive: str, added: int) -> AsyncIterator[None]:
        """Holds room for a commit that adds `added` bytes (less than 0 when it frees some) for the body of an
        `async with`, which commits: ResourceExhausted before the body when there is not enough room. The
        bytes count as used when the body ends, and the room goes back when it fails."""
        usage = await self._of(drive)
        if added > 0 and usage.used + usage.reserved + added > self.quota:
            raise self._refusal(drive, usage, added)
        # What a commit frees is room once it committed, not while it runs: it may still fail.
        held = max(added, 0)
        usage.reserved += held
        try:
            yield
        finally:
            usage.reserved -= held
        usage.used += added

    def deleted(self, drive: str, size: int) -> None:
        """A file of `size` bytes was deleted from the drive.

        Not counted yet: the count, when it comes, finds the drive without the
        file. A count running just then may or may not have seen it (a drift
        of one file until the daemon restarts).
        """
        counting = self._usage.get(drive)
        if counting is not None and counting.done() and not counting.exception():
            counting.result().used -= size
