"""The Coordinator: what the daemons serving the same managed drives share.

`ManagedDrives` holds the semantics of `lit://` drives; what differs between
one daemon and several replicas of it is behind this one small interface:

- ownership: the ownership check and the commit of one path run under a
  claim on that path, one holder at a time;
- the change feed: each drive's puts and deletes, numbered (Watch);
- wake-ups: a get waiting for a path, and a watch waiting for the next
  change, wake when the drive's feed moves on (`changes`);
- unpublished changes: a change a claim's holder was about to make is
  recorded with the claim's confirm, so that when the holder never publishes
  it (it died, or lost the coordinator, between the store's change and the
  publish) another daemon learns of it (`unpublished`) and publishes what the
  store has (`settle`): every change reaches the feed, late rather than never.
- usage: each drive's bytes, counted once from the store and then kept by
  every commit and delete, with the room commits in progress hold, so that
  the quota (`drived.quota`) bounds the drive whichever daemons put into it.
- completions: the file a resumable upload stored, recorded with its put's
  event, so that a client cut after its commit learns of it from any daemon
  (`completion`), also one asking while the commit is under way (`committing`);
  the in-process coordinator records none, as the daemon's own memory of them
  (`drived.uploads`) is all there is.

`InProcessCoordinator` (`drived.events`) serves one daemon;
`RedisCoordinator` (`drived.redis_coordinator`: a lock key per claimed path,
a Stream per drive) serves replicas. `ManagedDrives` never knows which one it
has.

Drives are named by their `lit://` name, paths as `drived.requests` made
them. Every method may be called concurrently from many tasks. Failures are
`drive_client.errors` types: `Unavailable` when the coordinator cannot be
reached or is closed (or a claim lapsed), `EventsExpired` when a feed no
longer holds what was asked for.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal

from drive_client.errors import Unavailable

from .entry import Entry

EventKind = Literal["put", "delete"]
EVENTS_KEPT = 10_000  # events of one drive a feed keeps: a watch further behind answers EventsExpired
# Events `since` answers at most: a watch whose client stopped reading holds the events of its last answer, also
# those its feed has dropped since (with 4 KB paths, ~5 MB for a page).
PAGE = 1000
CLAIM_TTL = 10.0  # seconds a shared claim outlives a daemon that died holding it (--claim-ttl)


def version_of(sha256: str, crc32c: int | None) -> str:
    """What a put's `Change` records of the version it stores: its CRC32C when known, else its sha256."""
    return f"{crc32c:08x}" if crc32c is not None else sha256


def shutting_down() -> Unavailable:
    """What a call that needs the coordinator answers once the daemon is shutting down (`Coordinator.close`)."""
    return Unavailable("shutting down: reconnect and retry")


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a drive: a committed put, or a deleted file (its path and component only)."""

    sequence: int
    kind: EventKind
    entry: Entry
    request: str = ""  # a delete's: the request id of the Delete that made it ("": none was sent)


@dataclass(frozen=True, slots=True)
class Change:
    """A change of the store that a claim's holder is about to make: the put or the delete of `component`'s file at
    `path`."""

    kind: EventKind
    path: str
    component: str
    version: str = ""  # a put's: what tells its version from others (`version_of`); "" when not known
    request: str = ""  # a delete's: the request id of the Delete making it, which its settle publishes ("": none)


@dataclass(frozen=True, slots=True)
class Unpublished:
    """A change whose claim ended before its event was published (`Coordinator.unpublished`)."""

    drive: str
    change: Change
    mark: str  # how the coordinator knows it (what `settle` drops)


@dataclass(frozen=True, slots=True)
class Usage:
    """A drive's count for its quota: the bytes of its committed files, and the bytes commits in progress add."""

    used: int
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    """Room held for one commit (`Coordinator.reserve`) until `Coordinator.unreserve` says how the commit ended."""

    drive: str
    added: int  # what the commit adds to the drive's usage (less than 0 when it frees some)
    place: str  # the key of the file it commits (`drived.paths.object_key`): where a count's listing passes it
    count: str = ""  # which count of the drive holds it (a shared coordinator counts a drive again now and then)
    recount: str = ""  # the count being made again when it was made, which holds it too once made ("": none)

    @property
    def held(self) -> int:
        """What it holds: what a commit frees is room once it committed, not while it runs (it may still fail)."""
        return max(self.added, 0)


Passed = Callable[[str], Awaitable[None]]  # told the key of the last file of each page a count listed
# The store's count of a drive's bytes (`Backend.usage`), telling `Passed` (when given) where its listing is.
Count = Callable[[Passed | None], Awaitable[int]]


class Claim:
    """A claim held: what `Coordinator.claim` gives the body of its `async with`.

    This one cannot be lost (the in-process coordinator's); a shared
    coordinator's claim can, when its holder could not renew it in time.
    """

    # The changes at, above or below its path whose claims ended before their events were published, found as it was
    # taken (none in a coordinator whose claims end only with their daemon, the in-process one): its holder settles
    # them before its own change, for the feed then orders each path's changes as the store had them, and a change
    # stored and then replaced or deleted is still reported.
    unsettled: Sequence[Unpublished] = ()

    async def confirm(self, changing: Sequence[Change] | None = None) -> None:
        """Makes sure the claim is still held, right before the step it guards (a put's commit, a batch of a folder
        delete's files).

        A shared implementation asks the coordinator, and renews the claim for
        a whole TTL from now, so the step has that long before the claim could
        lapse; the confirms of many claims asked together may share one round
        trip. Raises Unavailable when the claim is no longer held (it lapsed,
        or the coordinator lost it) or cannot be confirmed: the step must not
        be taken.

        `changing`: the changes the step may make (in place of those an
        earlier confirm of this claim gave; None keeps them). A shared
        implementation (`records_changes`) records them with the renewal, and
        drops each when its event is published in this claim (`publish`) or
        when the claim's body ends without raising; one left when the claim ended
        otherwise (its holder died, or raised after the step) is handed out by
        `unpublished`, unless the body said it was not made (`unmade`).
        """

    def unmade(self, changes: Sequence[Change]) -> None:
        """Says that these changes, recorded by a confirm, were not made (their step never began): their records are
        dropped when the claim ends, also when its body raises, rather than left to be settled one by one."""


class Changes(abc.ABC):
    """One drive's feed as a task follows it: what `Coordinator.changes` gives the body of its `async with`."""

    @abc.abstractmethod
    async def latest(self) -> int:
        """The sequence of the drive's latest event (as `Coordinator.last`).

        Take it before looking at what is awaited, then `wait` after it: a
        publish in between makes the wait return at once. A shared
        implementation asks the coordinator once and then learns each
        event's sequence from its wake-up. Raises Unavailable.
        """

    @abc.abstractmethod
    async def wait(self, after: int, timeout: float | None) -> None:
        """Returns once the drive has an event after sequence `after`, or after `timeout` seconds.

        Returns at once when such an event exists already. `timeout` None
        waits without limit. May return early although nothing changed (a
        caller looks again and, if need be, waits again). Raises Unavailable
        when the coordinator is closed (at once, and for a wait in progress
        as soon as `close` is called) or cannot be reached.
        """


class Coordinator(abc.ABC):
    """Ownership claims, the change feed and wake-ups of the managed drives."""

    claim_ttl = CLAIM_TTL  # seconds a claim stays held unrenewed (a shared one's --claim-ttl)
    records_changes = False  # whether `Claim.confirm` records the changes it is given (for `unpublished`)
    records_completions = False  # whether `publish` records the completion of the upload it is given

    @abc.abstractmethod
    def claim(self, drive: str, path: str) -> AbstractAsyncContextManager[Claim]:
        """Holds the claim on `path` of `drive` for the body of an `async with`.

        At most one holder at a time for each (drive, path), across every
        daemon that shares this coordinator; the others wait their turn, in
        no promised order. A claim also excludes claims of the folders above
        its path and of the paths below it (`a` and `a/b` are never held at
        once); claims of other paths never wait for each other. A put checks
        ownership and folders and commits inside the claim, so two puts of
        one new path by different components cannot both pass the ownership
        check, nor puts of `a` and `a/b` both pass the folder check. Not
        reentrant.

        A claim whose holder died (a killed replica) is released after a
        bounded time, so no path stays blocked for ever: a shared
        implementation gives the claim an expiry and renews it for as long
        as the holder is alive and inside the `async with`. A holder that
        cannot renew it in time (the coordinator out of reach, or too slow,
        for longer than the expiry) loses it: the body calls the `Claim`'s
        `confirm` right before the step the claim guards.

        Raises Unavailable, before the body runs, when the claim cannot be
        taken (the coordinator is unreachable).
        """

    @abc.abstractmethod
    async def publish(self, drive: str, kind: EventKind, entry: Entry, claim: Claim | None = None,
                      upload: str = "", request: str = "") -> int:
        """Appends a change to the drive's feed and returns its sequence number; `claim`: the claim it is made in,
        whose record of the change (`Claim.confirm`) it drops (none: any record of the change); `upload`: the id of
        the resumable upload a put completes ("": none), whose completion a coordinator that `records_completions`
        records in the same step (`completion`); `request`: the request id of the Delete that made a delete ("":
        none), kept with the event and counted in the request's record in the same step (`deleted_by`).

        Sequence numbers increase strictly within a drive, in the order of
        the publishes, and are never given twice: not after a restart of the
        daemon, nor after the coordinator lost its data (a shared
        implementation starts from the clock, as the in-process one does), so
        a resume from before such a loss is refused with EventsExpired instead
        of being answered with other events. A put publishes inside its
        path's claim, so the feed orders the puts of one path as they
        committed. Every `Changes.wait` on the drive returns. The feed keeps a
        bounded number of events; publishing drops the oldest beyond it.
        Raises Unavailable.
        """

    @abc.abstractmethod
    async def last(self, drive: str) -> int:
        """The sequence of the drive's latest event: where a watch "from now" starts.

        For a drive without kept events, a number no smaller than any
        sequence it had, so that its next event comes after it. Raises
        Unavailable.
        """

    @abc.abstractmethod
    async def since(self, drive: str, after: int) -> list[Event]:
        """The drive's kept events after sequence `after`, oldest first; [] when there are none yet.

        Raises EventsExpired when some events after `after` are no longer kept
        (dropped to stay within the bounds, lost with the coordinator's data,
        or numbered before this feed began), because the caller cannot learn
        what it missed. May answer with only the first of many events; the
        caller asks again after the last one it got. Raises Unavailable.
        """

    @abc.abstractmethod
    async def deleted_by(self, drive: str, request: str, component: str, path: str) -> int:
        """How many deletes of `component`'s files in the drive were published with the request id `request`
        (`publish`, and `settle` for one its daemon did not publish): what the earlier attempts of a Delete removed.

        Read from a record of the request kept beside the feed, not from the
        feed, so one lookup however busy the drive: a shared implementation
        keeps it for --upload-expiry after the request's latest delete, within
        the completions' bytes (it forgets the oldest first); the in-process
        one while the feed keeps one of the request's events, and not past a
        restart. 0 once forgotten, or lost with the coordinator's data. A
        shared implementation that has no record also looks over the feed, a
        page a call, for events of `component`'s files at or below `path`
        that daemons of the previous release tagged with it (they keep no
        record), during a rolling update. Raises Unavailable.
        """

    @abc.abstractmethod
    def changes(self, drive: str) -> AbstractAsyncContextManager[Changes]:
        """The drive's feed, followed for the body of an `async with`: its latest sequence, and waits for more.

        A get waiting for a path holds one for its whole wait: a shared
        implementation listens to the drive once, not once per look.
        """

    async def follow(self, drive: str, after: int) -> AsyncIterator[list[Event]]:
        """Every event of the drive after sequence `after`, in order, as they are published, in the batches each
        read of the feed gives (none empty); never ends.

        Raises EventsExpired and Unavailable as `since` and `Changes.wait`
        do. Written on `since` and `changes`, for every coordinator.
        """
        async with self.changes(drive) as changes:
            while True:
                events = await self.since(drive, after)
                if events:
                    after = events[-1].sequence
                    yield events
                await changes.wait(after, None)

    def committing(self, drive: str, component: str, upload: str) -> AbstractAsyncContextManager[None]:
        """Marks the commit of `component`'s resumable upload `upload` in `drive` as under way, for the body of an
        `async with`: from before it waits for its path's claim to its `publish` with this `upload`, which ends the
        mark in the step that records the completion (the body's end does not, unless it raises), so that a
        `completion` asked with `wait` while it runs waits for its end.

        A coordinator that `records_completions` renews the mark as a claim
        is renewed: one whose daemon died ends after the claim TTL. Never
        raises: a mark not made (logged) leaves the queries elsewhere
        answering as if no commit ran. Nothing in the in-process coordinator:
        its daemon knows its own commits (`drived.uploads`).
        """
        return contextlib.nullcontext()

    async def completion(self, drive: str, component: str, upload: str, wait: bool = False) -> Entry | None:
        """The file that `component`'s resumable upload `upload` stored in `drive`, as its publish recorded it; None
        when none is recorded. `wait`: while a daemon's commit of the upload is under way (`committing`), waits for
        its end rather than answer None; a bounded number of callers wait at once, past which TooManyStreams.

        A coordinator that `records_completions` keeps each for the daemons'
        --upload-expiry after its publish, or after the latest
        `keep_completions` of it, unless a shared one's bytes for them are
        taken by later ones (it forgets the oldest first): whichever daemon
        committed the upload, any daemon answers a client cut after the
        commit. Raises Unavailable.
        None in the in-process coordinator: its daemon's memory
        (`drived.uploads`) holds them.
        """
        return None

    async def keep_completions(self, uploads: Sequence[tuple[str, str, str]]) -> None:  # noqa: B027 - none recorded
        """Keeps the recorded completions of `uploads` (drive, component, upload id) for --upload-expiry from now
        (those of streams still running); one forgotten already stays so. Never raises: one not kept is forgotten
        at its time (logged)."""

    async def unpublished(self) -> list[Unpublished]:
        """Changes recorded by confirms (`Claim.confirm`) whose claims ended before their events were published.

        A bounded number, each handed to one caller about once a claim TTL
        (to another, or again, while it is not settled): the caller settles
        each inside a claim on its path (`settle`). None in a coordinator
        whose claims end only with their daemon, which takes the feed with it
        (the in-process one).
        """
        return []

    async def settle(self, unpublished: Unpublished, stored: Entry | None) -> None:  # noqa: B027 - none unpublished
        """Publishes what `unpublished` changed, as the store has its path now (`stored`: the file, None when there
        is none), and drops it; nothing when it was settled or published meanwhile.

        A put whose file is stored is published as a put of that file, a
        delete whose file is gone as a delete; otherwise the change was not
        made (its holder stopped before it) and nothing is published. The
        caller passes None for a put whose version is not the one stored
        (`Change.version`): it was not made either.
        """

    @abc.abstractmethod
    async def usage(self, drive: str, count: Count) -> Usage:
        """The drive's usage, as every daemon sharing the coordinator sees it.

        `count` gives the drive's bytes when the coordinator has no count of
        the drive: at its first use, and for a shared implementation after
        its data was lost. A shared implementation also counts the drive
        again once its count's time ran out (a count kept for ever would keep
        for ever what it missed, such as a commit whose daemon died in it):
        in the background, answering from the count it replaces meanwhile.
        Of the counts made at once, one is kept. Raises Unavailable, and what
        `count` raises when the call waits for it.
        """

    @abc.abstractmethod
    async def reserve(self, drive: str, place: str, added: int, quota: int, count: Count
                      ) -> tuple[Usage, Reservation | None]:
        """Holds room for a commit of the file at key `place` that adds `added` bytes to the drive when its usage
        leaves that much within `quota` (or when the commit adds nothing): the usage found, and the Reservation, None
        when there is not enough room (nothing is held).

        The check and the hold are one step for every daemon sharing the
        coordinator, so commits at once through different daemons cannot
        together pass the quota. The caller ends the reservation with
        `unreserve` once the commit ended. `count` and errors as `usage`.
        """

    @abc.abstractmethod
    async def unreserve(self, reservation: Reservation, committed: bool) -> None:
        """Ends `reservation`: what its commit added counts as used when it `committed`, else its room comes back.

        Never raises: the store has changed (or not) already. A shared
        implementation that cannot reach the coordinator leaves the count off
        by this commit until the drive is counted again; so does a count made
        again that began after the reservation and was made before its end.
        """

    @abc.abstractmethod
    async def deleted(self, drive: str, place: str, size: int) -> None:
        """The file at key `place`, of `size` bytes, was deleted from the drive: its usage loses them, when it is
        counted.

        A drive not counted yet is not changed: its count, when it comes,
        finds the drive without the file (a count running just then may or
        may not have seen it: off by one file until the drive is counted
        again). Never raises, as `unreserve`.
        """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepares the coordinator before the daemon serves (SystemExit with the reason when it cannot)."""

    @abc.abstractmethod
    def check_open(self) -> None:
        """Raises Unavailable once `close` was called (the daemon is shutting down); costs no I/O.

        A lookup calls it first, so that a get or stat that arrives while the
        daemon drains is told to retry elsewhere rather than answered NOT_FOUND.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stops the coordinator (the daemon is shutting down).

        Every `Changes.wait`, in progress or later, raises Unavailable, so waiting
        gets and watches answer at once rather than hold the shutdown.
        Claims held are released as their holders leave them, and claims and
        publishes still work: puts finishing in the grace period commit.
        Idempotent.
        """

    async def disconnect(self) -> None:  # noqa: B027 - optional hook
        """Releases the coordinator's connections, after `close` and after the last call ended."""


async def set_within(event: asyncio.Event, timeout: float | None) -> None:
    """Returns once `event` is set, or after `timeout` seconds (None: no limit).

    Not asyncio.wait_for: before Python 3.12 it swallows a cancel of its
    caller that comes as the wait ends, and the caller then goes on (a watch
    whose client went away waited for ever, holding its stream's place).
    """
    setting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([setting], timeout=timeout)
    finally:
        setting.cancel()


def folders_above(path: str) -> list[str]:
    """The folders that hold `path`, outermost first: "a/b/c" -> ["a", "a/b"]."""
    return [path[:i] for i, c in enumerate(path) if c == "/"]
