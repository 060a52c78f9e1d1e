"""Wake-ups from Redis pub/sub: one subscriber connection per daemon, fanned out to the tasks waiting on a drive.

A daemon may hold thousands of waiting gets and watches; each would cost a
Redis connection if it blocked on Redis itself. Instead the daemon holds one
subscriber connection, subscribed to the channel of every drive that some
task here waits on, and sets that drive's asyncio events when a message
comes. A channel is subscribed while a task listens to it and unsubscribed
when the last one leaves.

The connection is made when a task first needs it and again after it
failed; no task reconnects in the background. The tasks that need it while
it is being made share that making, which is given CONFIRM_TIMEOUT (a
coordinator that accepts connections but does not answer is unreachable),
and which `close` abandons. When the connection fails, every waiting task is
woken (it may have missed a message) and looks again: its next `armed` makes
a new connection, or raises Unavailable.

Pub/sub delivers only to subscribers that the server had subscribed when the
message was published, so a task waits for the confirmation of its
subscription (`armed`) before it looks at what it waits for; from then on
nothing published is missed.

An event's message carries its sequence ("e<sequence>"), so a channel knows
its drive's latest sequence for as long as it stays subscribed: once learnt
from the feed after the subscription was confirmed (`learnt`), it follows
the messages, and the tasks waiting on the drive ask Redis nothing more. A
lost connection makes it unknown again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from drive_client.errors import Unavailable

from .coordinator import shutting_down

# Seconds the subscriber connection may take to be made (connect, AUTH, CLIENT SETNAME ...), and a subscription to
# be confirmed, before the coordinator counts as unreachable.
CONFIRM_TIMEOUT = 5.0

# A new, connected redis.asyncio Connection; when abandoned (cancelled) or failed, it closes what it opened.
Connect = Callable[[], Awaitable[Any]]
Failure = Callable[[BaseException], Unavailable]  # the Unavailable that names the coordinator


class Channel:
    """One drive's channel as the tasks listening to it see it."""

    def __init__(self, wakeups: Wakeups, name: str) -> None:
        self.name = name
        self.users = 0
        self.changed = asyncio.Event()  # set and replaced by the next event of the drive (or a lost connection)
        self.released = asyncio.Event()  # set and replaced by the next claim released in the drive (likewise)
        # The newest sequence of the drive seen (in a message, or learnt from the feed); while `known`, no event
        # published since the subscription was confirmed is newer.
        self.latest = 0
        self.known = False
        self._wakeups = wakeups

    async def armed(self) -> Link:
        """Returns once the subscription is confirmed: every message published from now on is seen.

        Take `changed` or `released` after this, then look at what is
        awaited, then wait on the event. Raises Unavailable.
        """
        link = await self._wakeups.link()
        await link.subscribed(self.name)
        return link

    def learnt(self, link: Link, sequence: int) -> None:
        """The drive's latest sequence, read from its feed after `link` confirmed the subscription."""
        self.latest = max(self.latest, sequence)
        self.known = self.known or not link.failed  # a connection lost meanwhile may have missed messages

    def wake(self, message: bytes) -> None:
        """Sets (and replaces) the event of a message: b"e<sequence>" an event, b"r" a release, b"" both (the
        connection was lost: both may have been missed)."""
        kind, sequence = message[:1], message[1:]
        if kind in (b"e", b""):
            if sequence.isdigit():
                self.latest = max(self.latest, int(sequence))
            else:  # lost, or from a daemon that does not send the sequence: learnt again from the feed
                self.known = False
            self.changed.set()
            self.changed = asyncio.Event()
        if kind in (b"r", b""):
            self.released.set()
            self.released = asyncio.Event()


class Link:
    """One subscriber connection: its subscriptions, and the task reading it."""

    def __init__(self, conn: Any, wakeups: Wakeups) -> None:
        self._conn = conn
        self._wakeups = wakeups
        self.failed = False
        # channel -> its SUBSCRIBE's confirmation: None, or why the connection failed first. The cause, not an
        # exception: each task waiting on it raises its own (one object raised by all gathers their tracebacks).
        self._subscribed: dict[str, asyncio.Future[BaseException | None]] = {}
        # Confirmations not yet received, in the order of the SUBSCRIBEs sent: Redis answers in that order.
        self._unconfirmed: defaultdict[str, deque[asyncio.Future[BaseException | None]]] = defaultdict(deque)
        self._sending = asyncio.Lock()  # commands go out in the order they were asked for (a FIFO lock)
        self._reader = asyncio.ensure_future(self._read())

    async def subscribed(self, name: str) -> None:
        """Subscribes to `name` unless already done on this connection; returns once confirmed."""
        confirmed = self._subscribed.get(name)
        if confirmed is None:
            confirmed = self._subscribed[name] = asyncio.get_running_loop().create_future()
            self._unconfirmed[name].append(confirmed)
            await self._send("SUBSCRIBE", name)
        await asyncio.wait([confirmed], timeout=CONFIRM_TIMEOUT)
        if not confirmed.done():  # fail() gives it the cause
            self.fail(TimeoutError(f"the SUBSCRIBE of {name} was not confirmed within {CONFIRM_TIMEOUT:g} s"))
        failed = confirmed.result()
        if failed is not None:
            raise self._wakeups.failure(failed)

    async def unsubscribe(self, name: str) -> None:
        if self._subscribed.pop(name, None) is not None:
            with contextlib.suppress(Unavailable):  # a failed connection subscribes to nothing
                await self._send("UNSUBSCRIBE", name)

    async def _send(self, *command: str) -> None:
        """Sends `command` after those asked for before it, to its end even if the caller is cancelled:
        a command dropped or cut off would leave the confirmations out of step (or end the connection)."""
        await asyncio.shield(self._wakeups.keep(self._send_in_turn(*command)))

    async def _send_in_turn(self, *command: str) -> None:
        async with self._sending:
            if self.failed:  # never reconnect it: a new connection is a new Link
                raise self._wakeups.failure(ConnectionError("the subscriber connection was lost"))
            try:
                await self._conn.send_command(*command, check_health=False)
            except Exception as err:
                self.fail(err)
                raise self._wakeups.failure(err) from None

    async def _read(self) -> None:
        try:
            while True:
                reply = await self._conn.read_response()
                kind, channel = reply[0], reply[1].decode()
                if kind == b"message":
                    self._wakeups.message(channel, reply[2])
                elif kind == b"subscribe":
                    confirmed = self._unconfirmed[channel].popleft()
                    if not self._unconfirmed[channel]:
                        del self._unconfirmed[channel]
                    if not confirmed.done():
                        confirmed.set_result(None)
        except asyncio.CancelledError:
            self.fail(ConnectionError("the subscriber connection was closed"))
            raise
        except Exception as err:
            self.fail(err)

    def fail(self, err: BaseException) -> None:
        """Ends the connection: its unconfirmed subscriptions raise Unavailable, and every listener wakes."""
        if self.failed:
            return
        self.failed = True
        for pending in self._unconfirmed.values():
            for confirmed in pending:
                if not confirmed.done():
                    confirmed.set_result(err)
        self._unconfirmed.clear()
        self._subscribed.clear()
        self._wakeups.lost(self)
        if self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._wakeups.keep(self._conn.disconnect())


class Wakeups:
    """The drives' channels this daemon listens to, over one subscriber connection."""

    def __init__(self, connect: Connect, failure: Failure) -> None:
        self._connect = connect
        self._failure = failure
        self._channels: dict[str, Channel] = {}
        self._link: Link | None = None
        self._making: asyncio.Future[Link] | None = None  # the connection being made, shared by those who wait for it
        self._background: set[asyncio.Future[Any]] = set()
        self._closed = False

    @asynccontextmanager
    async def listening(self, name: str) -> AsyncIterator[Channel]:
        """The channel `name`, listened to for the body of an `async with` (call `armed` before waiting)."""
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(self, name)
        channel.users += 1
        try:
            yield channel
        finally:
            channel.users -= 1
            if not channel.users:
                del self._channels[name]
                if self._link is not None:
                    await self._link.unsubscribe(name)

    async def link(self) -> Link:
        """The subscriber connection, made now if there is none. Raises Unavailable."""
        if self._closed:
            raise shutting_down()
        if self._link is not None:
            return self._link
        if self._making is None:
            self._making = self.keep(self._make())
        making = self._making
        await asyncio.wait([making])  # a caller cancelled meanwhile leaves the making to the others
        if making.cancelled():  # only `close` cancels it
            raise shutting_down()
        failed = making.exception()
        if failed is not None:  # each task raises its own: one object raised by all gathers their tracebacks
            raise self.failure(failed)
        return making.result()

    async def _make(self) -> Link:
        """Makes the subscriber connection within CONFIRM_TIMEOUT; closes it if `close` came meanwhile. Raises why
        it failed (`link` turns that into each waiting task's Unavailable)."""
        try:
            conn = await asyncio.wait_for(self._connect(), CONFIRM_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"the subscriber connection was not made within {CONFIRM_TIMEOUT:g} s") from None
        finally:
            self._making = None
        if self._closed:
            await conn.disconnect()
            raise shutting_down()
        self._link = Link(conn, self)
        return self._link

    def failure(self, err: BaseException) -> Unavailable:
        """What a task raises when the connection failed with `err`: the coordinator's failure, naming it; once
        `close` was called, the shutdown's Unavailable (the daemon ended the connection, not the coordinator)."""
        return shutting_down() if self._closed else self._failure(err)

    def message(self, name: str, data: bytes) -> None:
        channel = self._channels.get(name)
        if channel is not None:
            channel.wake(data)

    def lost(self, link: Link) -> None:
        """A connection failed: every listener wakes and looks again (it may have missed a message)."""
        if self._link is link:
            self._link = None
        for channel in self._channels.values():
            channel.wake(b"")

    def keep(self, work: Awaitable[Any]) -> asyncio.Future[Any]:
        """Runs `work` to its end in the background (`close` waits for it); its failure is its caller's to see."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # no warning if nobody awaits
        return task

    async def close(self) -> None:
        """Wakes every listener and closes the connection (or abandons its making): the next `armed`, and a
        subscription or connection not confirmed or made yet, raise the shutdown's Unavailable."""
        self._closed = True
        if self._making is not None:
            self._making.cancel()
        if self._link is not None:
            self._link.fail(ConnectionError("drived is shutting down"))
        for channel in self._channels.values():
            channel.wake(b"")
        if self._background:
            await asyncio.wait(set(self._background))
