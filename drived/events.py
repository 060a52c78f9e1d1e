"""EventLog: the numbered puts and deletes of each managed drive, for Watch and for waiting gets.

Kept in memory: the last `retain` events of each drive since the daemon
started. Sequence numbers start at the daemon's start time in microseconds,
so they keep increasing across restarts and a resume from a previous run is
recognised as too old instead of being answered with the wrong events.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from drive_client.errors import DriveError, Unavailable

from .entry import Entry


class EventsGone(DriveError):
    """The events after a resume point are no longer kept."""

    status = grpc.StatusCode.OUT_OF_RANGE


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int
    kind: str  # "put" or "delete"
    entry: Entry


@dataclass
class _DriveEvents:
    events: deque[Event]
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class EventLog:
    """Publishes events and lets readers wait for the next one."""

    def __init__(self, retain: int = 10_000) -> None:
        self._retain = retain
        self._start = time.time_ns() // 1000  # the sequence before the first event of this run
        self._last = self._start
        self._drives: dict[str, _DriveEvents] = {}
        self._closed = False

    def _drive(self, drive: str) -> _DriveEvents:
        found = self._drives.get(drive)
        if found is None:
            found = self._drives[drive] = _DriveEvents(deque(maxlen=self._retain))
        return found

    def last(self, drive: str) -> int:
        """The sequence of the drive's latest event (the start of this run if none)."""
        events = self._drive(drive).events
        return events[-1].sequence if events else self._start

    def publish(self, drive: str, kind: str, entry: Entry) -> None:
        self._last += 1
        state = self._drive(drive)
        state.events.append(Event(self._last, kind, entry))
        state.changed.set()
        state.changed = asyncio.Event()

    def since(self, drive: str, after: int) -> list[Event]:
        """The drive's events after sequence `after`; EventsGone when some of them were dropped."""
        events = self._drive(drive).events
        oldest_kept = events[0].sequence - 1 if len(events) == self._retain else self._start
        if after < oldest_kept:
            raise EventsGone(
                f"events of lit://{drive} after sequence {after} are no longer kept "
                "(the daemon restarted, or more than the retained number happened): list the drive, then watch from now"
            )
        return [e for e in events if e.sequence > after]

    def changed(self, drive: str) -> asyncio.Event:
        """An asyncio.Event set by the drive's next publish, or by `close`.

        Take it before looking for what you wait for, then wait on it, so an
        event published in between is not missed.
        """
        return self._drive(drive).changed

    def check_open(self) -> None:
        """Raises Unavailable once the log is closed (the daemon is shutting down)."""
        if self._closed:
            raise Unavailable("drived is shutting down: reconnect and retry")

    def close(self) -> None:
        """Wakes every waiter, which then answers UNAVAILABLE."""
        self._closed = True
        for state in self._drives.values():
            state.changed.set()
