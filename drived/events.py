"""Coordination within one daemon: `InProcessCoordinator` over an in-memory `EventLog`.

The `Coordinator` (see `drived.coordinator`) of a daemon that serves its
drives alone: claims are a set of held paths, the change feed is an
`EventLog`, and wake-ups are asyncio events.

Each drive's usage (`Coordinator.usage`) is counted once, at its first use,
and kept in memory: of MAX_COUNTED_DRIVES drives at most, past which the count
of the drive used least recently, and holding no commit's room, is forgotten
and counted again at its next use (a client naming ever new drives, with puts
refused before anything is stored too, would otherwise grow the daemon for as
long as it went on: some 1 KB a drive).

The EventLog holds the numbered puts and deletes of each managed drive, in
memory and bounded: the last `retain` events of a drive, at most
`retain_total` events over all drives, whose entries take at most
`retain_bytes` (an event's memory grows with its path), the drives used least
recently losing their oldest first, and the state of at most `max_drives`
drives besides those a watch or a waiting get follows now. Beside them, the
count of the deletes each Delete request id made (`deleted_by`), kept while
one of its events is. Sequence numbers
start at the daemon's start time in microseconds, so they keep increasing
across restarts and a resume from a previous run is recognised as too old
instead of being answered with the wrong events; so is a resume past events
that were dropped to stay within the bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from drive_client.errors import EventsExpired
from drive_client.uri import DEFAULT_COMPONENT, MAX_PATH_BYTES

from .config import answer_entry_bytes
from .coordinator import (
    EVENTS_KEPT,
    PAGE,
    Changes,
    Claim,
    Coordinator,
    Count,
    Event,
    EventKind,
    Reservation,
    Usage,
    folders_above,
    set_within,
    shutting_down,
)
from .entry import Entry

# What the entries of a lone daemon's events take at most (`answer_entry_bytes`): one drive's EVENTS_KEPT events of
# the longest paths. An event's memory grows with its path (some 0.6 KiB with a short one, 4.7 KiB with 4 KB), so
# these hold about as much as the 100,000 events of short paths that the count bound allows (55-65 MiB).
EVENTS_KEPT_BYTES = EVENTS_KEPT * answer_entry_bytes("p" * MAX_PATH_BYTES, DEFAULT_COMPONENT)


def _event_bytes(event: Event) -> int:
    return answer_entry_bytes(event.entry.path, event.entry.component) + len(event.request)


@dataclass
class _Requested:
    """What the deletes of one Delete request (drive, component, request id) made: a retry's answer."""

    deleted: int = 0  # its delete events published
    kept: int = 0  # of those, the ones the log still keeps: the record goes with the last


@dataclass
class _DriveEvents:
    dropped: int  # the newest sequence no longer kept: a resume from before it misses events
    events: deque[Event] = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    followers: int = 0  # tasks following the drive (`EventLog.followed`): its state is kept while there are any


class EventLog:
    """Publishes events and lets readers wait for the next one."""

    def __init__(self, retain: int = EVENTS_KEPT, retain_total: int = 100_000, retain_bytes: int = EVENTS_KEPT_BYTES,
                 max_drives: int = 10_000) -> None:
        self._retain = retain
        self._retain_total = retain_total
        self._retain_bytes = retain_bytes
        self._max_drives = max_drives
        self._start = time.time_ns() // 1000  # the sequence before the first event of this run
        self._last = self._start
        self._forgotten = self._start  # the newest sequence of any drive whose state was dropped
        self._drives: OrderedDict[str, _DriveEvents] = OrderedDict()  # least recently used first
        self._total = 0
        self._bytes = 0  # what the entries of those events take
        self._requests: dict[tuple[str, str, str], _Requested] = {}  # (drive, component, request id): its deletes
        self._closed = False

    def _drive(self, drive: str) -> _DriveEvents:
        found = self._drives.get(drive)
        if found is None:
            found = self._drives[drive] = _DriveEvents(dropped=self._forgotten)
            while len(self._drives) > self._max_drives and self._forget_least_used():
                pass
        else:
            self._drives.move_to_end(drive)
        return found

    def _forget_least_used(self) -> bool:
        """Forgets the state of the drive used least recently that no task follows, but the last one used; False when
        there is none (the drives followed, which the streams bound, may take the log past `max_drives`)."""
        older = itertools.islice(self._drives.items(), len(self._drives) - 1)
        drive = next((name for name, state in older if not state.followers), None)
        if drive is None:
            return False
        state = self._drives.pop(drive)
        self._total -= len(state.events)
        self._bytes -= sum(map(_event_bytes, state.events))
        for event in state.events:
            self._dropped_request(drive, event)
        self._forgotten = max(self._forgotten, state.events[-1].sequence if state.events else state.dropped)
        state.changed.set()  # its waiters look again and wait on a new state
        return True

    def _drop_oldest(self, drive: str, state: _DriveEvents) -> None:
        event = state.events.popleft()
        state.dropped = event.sequence
        self._total -= 1
        self._bytes -= _event_bytes(event)
        self._dropped_request(drive, event)

    def _dropped_request(self, drive: str, event: Event) -> None:
        """Forgets the record of the event's request once the log keeps none of its events."""
        if not event.request:
            return
        key = (drive, event.entry.component, event.request)
        requested = self._requests[key]
        requested.kept -= 1
        if not requested.kept:
            del self._requests[key]

    def _over_total(self) -> bool:
        return self._total > self._retain_total or self._bytes > self._retain_bytes

    def last(self, drive: str) -> int:
        """The sequence of the drive's latest event (where a watch from now starts)."""
        state = self._drive(drive)
        return state.events[-1].sequence if state.events else state.dropped

    def publish(self, drive: str, kind: EventKind, entry: Entry, request: str = "") -> int:
        """Appends an event (`request`: the id of the Delete that made it); returns its sequence."""
        self._last += 1
        state = self._drive(drive)
        event = Event(self._last, kind, entry, request)
        state.events.append(event)
        self._total += 1
        self._bytes += _event_bytes(event)
        if request:
            requested = self._requests.setdefault((drive, entry.component, request), _Requested())
            requested.deleted += 1
            requested.kept += 1
        if len(state.events) > self._retain:
            self._drop_oldest(drive, state)
        if self._over_total():
            for name, other in self._drives.items():  # least recently used first
                while other.events and self._over_total():
                    self._drop_oldest(name, other)
                if not self._over_total():
                    break
        state.changed.set()
        state.changed = asyncio.Event()
        return self._last

    def since(self, drive: str, after: int) -> list[Event]:
        """The drive's first PAGE events after sequence `after`; EventsExpired when some of them were dropped."""
        state = self._drive(drive)
        if after < state.dropped:
            raise EventsExpired(
                f"events of lit://{drive} after sequence {after} are no longer kept "
                "(the daemon restarted, or more happened than it keeps): list the drive, then watch from now"
            )
        # From the newest back: each wake-up of a waiter costs the events it has not seen.
        newer = list(itertools.takewhile(lambda e: e.sequence > after, reversed(state.events)))
        return newer[:-PAGE - 1:-1]

    def deleted_by(self, drive: str, request: str, component: str) -> int:
        """How many delete events of `component`'s files the Delete with id `request` made, while one is kept."""
        requested = self._requests.get((drive, component, request))
        return requested.deleted if requested else 0

    @contextmanager
    def followed(self, drive: str) -> Iterator[None]:
        """Keeps the drive's state while a task follows it (a watch, a waiting get): a state made again knows only
        that the drive's events are no newer than those of every drive forgotten, so the follower's next read would
        be refused as if it had missed events."""
        state = self._drive(drive)
        state.followers += 1
        try:
            yield
        finally:
            state.followers -= 1

    def changed(self, drive: str) -> asyncio.Event:
        """An asyncio.Event set by the drive's next publish, or by `close`.

        Take it before looking for what you wait for, then wait on it, so an
        event published in between is not missed.
        """
        return self._drive(drive).changed

    def check_open(self) -> None:
        """Raises Unavailable once the log is closed (the daemon is shutting down)."""
        if self._closed:
            raise shutting_down()

    def close(self) -> None:
        """Wakes every waiter, which then answers UNAVAILABLE."""
        self._closed = True
        for state in self._drives.values():
            state.changed.set()


class _LogChanges(Changes):
    """A drive's feed in an EventLog, as a task follows it."""

    def __init__(self, log: EventLog, drive: str) -> None:
        self._log = log
        self._drive = drive

    async def latest(self) -> int:
        return self._log.last(self._drive)

    async def wait(self, after: int, timeout: float | None) -> None:
        self._log.check_open()
        changed = self._log.changed(self._drive)  # nothing runs between this and the check below: no publish is missed
        if self._log.last(self._drive) > after:
            return
        await set_within(changed, timeout)
        if changed.is_set():
            self._log.check_open()


MAX_COUNTED_DRIVES = 10_000


@dataclass
class _Counted:
    used: int
    reserved: int = 0
    reservations: int = 0  # held now: the count is not forgotten while a commit may end one


class InProcessCoordinator(Coordinator):
    """The coordinator of a daemon that serves its drives alone: the claimed paths in memory,
    an EventLog, and its asyncio events as wake-ups."""

    def __init__(self, events_kept: int = EVENTS_KEPT) -> None:
        self.log = EventLog(retain=events_kept, retain_bytes=EVENTS_KEPT_BYTES)  # read now, as a test lowers it
        self._held: set[tuple[str, str]] = set()  # (drive, path) of the claims held
        self._held_below: Counter[tuple[str, str]] = Counter()  # (drive, folder): claims held below it
        self._released = asyncio.Event()  # set and replaced by every release
        self._usage: OrderedDict[str, _Counted] = OrderedDict()  # the least recently used first

    def _free(self, drive: str, path: str) -> bool:
        """Whether no claim is held on `path`, on a folder above it, or below it."""
        return (
            (drive, path) not in self._held
            and not self._held_below[(drive, path)]
            and not any((drive, folder) in self._held for folder in folders_above(path))
        )

    @asynccontextmanager
    async def claim(self, drive: str, path: str) -> AsyncIterator[Claim]:
        while not self._free(drive, path):
            await self._released.wait()  # nothing runs between the check and taking the event
        self._held.add((drive, path))
        self._held_below.update((drive, folder) for folder in folders_above(path))
        try:
            yield Claim()  # held until the body ends: nothing here can take it away
        finally:
            self._held.discard((drive, path))
            for folder in folders_above(path):
                self._held_below[(drive, folder)] -= 1
                if not self._held_below[(drive, folder)]:
                    del self._held_below[(drive, folder)]
            self._released.set()
            self._released = asyncio.Event()

    async def publish(self, drive: str, kind: EventKind, entry: Entry, claim: Claim | None = None,
                      upload: str = "", request: str = "") -> int:
        return self.log.publish(drive, kind, entry, request)

    async def deleted_by(self, drive: str, request: str, component: str, path: str) -> int:
        return self.log.deleted_by(drive, request, component)

    async def last(self, drive: str) -> int:
        return self.log.last(drive)

    async def since(self, drive: str, after: int) -> list[Event]:
        return self.log.since(drive, after)

    @asynccontextmanager
    async def changes(self, drive: str) -> AsyncIterator[Changes]:
        with self.log.followed(drive):
            yield _LogChanges(self.log, drive)

    async def _counted(self, drive: str, count: Count) -> _Counted:
        counted = self._usage.get(drive)
        if counted is None:
            used = await count(None)
            counted = self._usage.setdefault(drive, _Counted(used))  # counts at once: the first to end is kept
        self._usage.move_to_end(drive)
        self._forget_least_used()
        return counted

    def _forget_least_used(self) -> None:
        """Forgets the counts of the drives used least recently past MAX_COUNTED_DRIVES, but the last one used and
        those holding a commit's room."""
        while len(self._usage) > MAX_COUNTED_DRIVES:
            older = itertools.islice(self._usage.items(), len(self._usage) - 1)
            unused = next((drive for drive, counted in older if not counted.reservations), None)
            if unused is None:
                return
            del self._usage[unused]

    async def usage(self, drive: str, count: Count) -> Usage:
        counted = await self._counted(drive, count)
        return Usage(counted.used, counted.reserved)

    async def reserve(self, drive: str, place: str, added: int, quota: int, count: Count
                      ) -> tuple[Usage, Reservation | None]:
        counted = await self._counted(drive, count)  # nothing runs between the check and the hold
        found = Usage(counted.used, counted.reserved)
        if added > 0 and counted.used + counted.reserved + added > quota:
            return found, None
        reservation = Reservation(drive, added, place)
        counted.reserved += reservation.held
        counted.reservations += 1
        return found, reservation

    async def unreserve(self, reservation: Reservation, committed: bool) -> None:
        counted = self._usage[reservation.drive]  # not forgotten while it holds a reservation
        counted.reserved -= reservation.held
        counted.reservations -= 1
        if committed:
            counted.used += reservation.added

    async def deleted(self, drive: str, place: str, size: int) -> None:
        counted = self._usage.get(drive)
        if counted is not None:
            counted.used -= size

    def check_open(self) -> None:
        self.log.check_open()

    async def close(self) -> None:
        self.log.close()
