"""Same-host puts and gets without their bytes on the wire: the client hands the daemon an open file.

A client on the daemon's host sends an open regular file over a Unix socket
in Linux's abstract namespace (`socket_name`: one per port, seen only inside
the daemon's network namespace) with SCM_RIGHTS, and gets a token back. A
put's file, open for reading (`PUT`): the Put header that carries the token
has the daemon read the file itself (`drived.puts`). A get's destination,
open for writing (`GET`): the Get that carries the token has the daemon
write the file's bytes into it itself (`write`). Either spares the client
its reads or writes, checksums and gRPC messages, and the daemon its side of
them. Holding a descriptor is no right the client did not have: it opened
the file, and its call is authorized as any other (a daemon run as root writes
with root's exemptions, though: `_refused_file`). What a client the socket
refuses, or whose token the call does not find here (it expired, or another
daemon has the socket), moves its bytes in a stream instead.

Bounded whatever clients do: at most `MAX_CONNECTING` handoffs at once, each
given `HANDOFF_SECONDS` to send its file; at most `MAX_HELD` files held until
their call, each for `HOLD_SECONDS`; every one counted among the reads of the
process's descriptors. Files are read and written in `THREADS` threads of
their own: a read or write that hangs (a stuck network or FUSE mount) ties
up one of them for good, its call gives up on it after `STUCK_SECONDS` (the
client moves the bytes), and once half of them are tied up the socket
refuses handoffs. At most `WRITING` gets are written at once, each holding up
to two batches of `WRITE_SIZE` bytes: another Get that names a token is
refused, and its client fetches the bytes in streams.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import fcntl
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from drive_client.errors import HandoffNotHeld, ResourceExhausted, StaleIndexError
from drive_client.files import Version, version
from drive_client.handoff import GET, PUT, socket_name

from . import metrics
from .descriptors import Descriptors

log = logging.getLogger("drived")

MAX_CONNECTING = 16
HANDOFF_SECONDS = 2.0
MAX_HELD = 64
HOLD_SECONDS = 30.0
THREADS = 8
STUCK_SECONDS = 10.0  # a read or write this old counts as hung
READ_SIZE = 1 << 20
# A get's bytes are written this many at a time (a thread hop each), the next batch read and checked meanwhile: 1 GiB
# from the page cache went at ~1,500 MB/s a chunk at a time, ~2,100 in 4 MiB batches, ~2,270 in 8 MiB (bench/WHY.md).
WRITE_SIZE = 8 << 20
WRITING = 2  # gets written at once: the two cores of a small host are busy with two
T = TypeVar("T")


def _refused_file(request: bytes, st: os.stat_result, fd: int) -> str:
    """Why `fd` (its stat `st`) is not a file the handoff of `request` takes, or "": a regular file (not an O_PATH
    handle) open for reading for a put; for a get, one open for writing, not O_APPEND (its writes land at their
    offset, which O_APPEND ignores), with no setuid or setgid bit, and not in memory."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not stat.S_ISREG(st.st_mode) or flags & os.O_PATH:
        return "only an open regular file is handed over (no folder, pipe, device or O_PATH handle)"
    if request == PUT and flags & os.O_ACCMODE == os.O_WRONLY:
        return "a file handed over to be put is open for reading"
    if request == GET and (flags & os.O_ACCMODE == os.O_RDONLY or flags & os.O_APPEND):
        return "a file handed over for a get is open for writing, without O_APPEND"
    if request == GET and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        # A daemon run as root keeps these bits as it writes (CAP_FSETID), where the client's own write drops them.
        return "a file handed over for a get has no setuid or setgid bit"
    if request == GET and _in_memory(fd):
        return ("a file handed over for a get is not in memory (tmpfs, /dev/shm, a memfd), whose pages would count "
                "against the daemon's memory")
    return ""


def _in_memory(fd: int) -> bool:
    """Whether `fd` is a file of tmpfs or hugetlbfs (/dev/shm, a memfd), whose pages stay charged to the memory of
    the process that writes them: only those answer F_GET_SEALS."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return True


@dataclass
class HandedFile:
    """A file a client handed over, held until its call reads it (a Put) or writes it (a Get)."""

    fd: int
    request: bytes  # PUT or GET
    version: Version
    expiry: asyncio.TimerHandle  # its end while no call has claimed it
    busy: asyncio.Future[Any] | None = None  # the read or write in a thread: the descriptor is closed after it


class Handoffs:
    """The handoff socket of one daemon and the files handed over through it."""

    def __init__(self, port: int, descriptors: Descriptors) -> None:
        self.name = socket_name(port)
        self._descriptors = descriptors
        self._held: dict[str, HandedFile] = {}
        self._connecting = 0
        self._threads = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="drived-handoff")
        self._in_flight: dict[asyncio.Future[Any], float] = {}  # reads and writes in threads, by their start
        self._writing = 0  # gets being written (`write`)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> bool:
        """Listens; False (logged) when the name is taken: another daemon of this network namespace serves the same
        port on another address, and clients stream to this one."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            listener.bind("\0" + self.name)
        except OSError as err:
            listener.close()
            log.warning("no same-host handoff: its socket is taken", extra={"fields": {
                "socket": "@" + self.name, "error": str(err)}})
            return False
        listener.listen(MAX_CONNECTING)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)
        return True

    def close(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for token in list(self._held):
            self._expire(token)
        for task in self._tasks:
            task.cancel()
        self._threads.shutdown(wait=False)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            connection, _ = self._listener.accept()
        except OSError:  # gone before it was taken, or no descriptor left: the client streams instead
            return
        if self._connecting >= MAX_CONNECTING:
            connection.close()
            return
        self._connecting += 1
        task = asyncio.ensure_future(self._serve(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: socket.socket) -> None:
        """Takes one file and answers `ok TOKEN`, or `busy REASON` (then the client streams)."""
        loop = asyncio.get_running_loop()
        try:
            readable: asyncio.Future[None] = loop.create_future()

            def ready() -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(connection.fileno(), ready)
            try:
                await asyncio.wait_for(readable, HANDOFF_SECONDS)
            finally:
                loop.remove_reader(connection.fileno())
            fds = array.array("i")
            message, ancillary, flags, _ = connection.recvmsg(64, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            answer = self._take(b"" if flags & socket.MSG_TRUNC else message, list(fds))
            try:
                connection.send(answer.encode())
            except OSError:  # its client left, tired of waiting on a stopped daemon: it moves the bytes in a stream
                if answer.startswith("ok "):
                    self._expire(answer.removeprefix("ok "))
                answer = "busy"
            metrics.HANDOFFS.labels("taken" if answer.startswith("ok ") else "refused").inc()
        except (OSError, asyncio.TimeoutError):
            pass  # a client that sent nothing in time, or left: it has no token
        finally:
            connection.close()
            self._connecting -= 1

    def _take(self, message: bytes, fds: list[int]) -> str:
        """Holds the one file handed over, or closes what came and says why not."""
        try:
            if message not in (PUT, GET) or len(fds) != 1:
                return f"busy the handoff takes one file with the request {PUT.decode()} or {GET.decode()}"
            fd = fds.pop()
            st = os.fstat(fd)
            refusal = _refused_file(message, st, fd) or self._refusal()
            if refusal:
                os.close(fd)
                return "busy " + refusal
            try:
                self._descriptors.take_read()
            except ResourceExhausted as err:  # the process's descriptors are spoken for
                os.close(fd)
                return f"busy {err}"
            token = secrets.token_hex(16)
            expiry = asyncio.get_running_loop().call_later(HOLD_SECONDS, self._expire, token)
            self._held[token] = HandedFile(fd, message, version(st), expiry)
            return "ok " + token
        finally:
            for fd in fds:
                os.close(fd)

    def _refusal(self) -> str:
        if len(self._held) >= MAX_HELD:
            return f"{MAX_HELD} files handed over wait for their call"
        now = time.monotonic()
        if sum(now - started > STUCK_SECONDS for started in self._in_flight.values()) >= THREADS // 2:
            return "reads or writes of files handed over hang"
        return ""

    def _expire(self, token: str) -> None:
        handed = self._held.pop(token, None)
        if handed is not None:
            handed.expiry.cancel()  # when not the expiry itself: the stop, or a client that left
            self.release(handed)

    def claim(self, token: str, request: bytes) -> HandedFile:
        """The file handed over with `token` for `request` (PUT or GET), now the caller's to `release`;
        HandoffNotHeld when there is none."""
        handed = self._held.get(token)
        if handed is None or handed.request != request:
            raise HandoffNotHeld(
                f"{HandoffNotHeld.mark}no file handed over for a {request.decode()} with this token is held here: it "
                f"expired ({HOLD_SECONDS:g} s), or another daemon on this host holds the socket; move the file's "
                "bytes in a stream"
            )
        del self._held[token]
        handed.expiry.cancel()
        return handed

    async def _in_thread(self, handed: HandedFile, what: str, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` on the handed file, `what` (a read, a write), in one of the handoff's threads."""
        busy = asyncio.wrap_future(self._threads.submit(work, handed.fd, *args))
        handed.busy = busy
        self._in_flight[busy] = time.monotonic()
        busy.add_done_callback(self._in_flight.pop)
        try:
            return await asyncio.wait_for(asyncio.shield(busy), STUCK_SECONDS)
        except asyncio.TimeoutError:  # its thread stays tied up; the call does not wait on it
            raise HandoffNotHeld(f"{HandoffNotHeld.mark}a {what} of the file handed over took more than "
                                 f"{STUCK_SECONDS:g} s (a hung mount?); move its bytes in a stream") from None
        except OSError as err:  # the client moves the bytes itself, and meets the error itself
            raise HandoffNotHeld(f"{HandoffNotHeld.mark}a {what} of the file handed over failed here ({err}); move "
                                 "its bytes in a stream") from None

    async def read(self, handed: HandedFile, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the file from `offset`."""
        return await self._in_thread(handed, "read", os.pread, size, offset)

    async def write(self, handed: HandedFile, chunks: AsyncIterable[bytes | memoryview]) -> int:
        """Writes `chunks` into the file from its start, WRITE_SIZE bytes at a time while the next are read and
        checked, and cuts it to their size (a file longer before keeps no tail); answers that size. HandoffNotHeld
        when WRITING gets are being written already."""
        if self._writing >= WRITING:
            raise HandoffNotHeld(f"{HandoffNotHeld.mark}{WRITING} gets are being written into files handed over, the "
                                 "most at once: move these bytes in a stream")
        self._writing += 1
        size = 0
        batch: list[bytes | memoryview] = []
        batched = 0
        writing: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                batch.append(chunk)
                batched += len(chunk)
                if batched < WRITE_SIZE:
                    continue
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(self._in_thread(handed, "write", _pwrite_all, batch, size))
                size += batched
                batch, batched = [], 0
            if writing is not None:
                await writing
            if batch:
                await self._in_thread(handed, "write", _pwrite_all, batch, size)
                size += batched
            await self._in_thread(handed, "write", os.ftruncate, size)
        finally:
            self._writing -= 1
            if writing is not None and not writing.done():  # its thread goes on: `release` closes the file after it
                writing.cancel()
            elif writing is not None and not writing.cancelled():
                writing.exception()  # a write that failed while the reads failed first: what they raised is answered
        metrics.HANDOFFS.labels("written").inc()
        return size

    def check_unchanged(self, handed: HandedFile, path: str, size: int, read: int | None = None) -> None:
        """Refuses a file written to since it was handed over, or not of the size its header gives: what is read
        may mix two versions of it. `read`: the bytes read of it, which end before its size in a file of /proc or
        /sys whose size is not what it holds."""
        if version(os.fstat(handed.fd)) != handed.version or size != handed.version[0]:
            raise StaleIndexError(
                f"the local file handed over for {path!r} changed while it was being put (its size, modification or "
                "change time moved; nothing of it was stored): put it again once it is written"
            )
        if read is not None and read < size:
            raise StaleIndexError(
                f"the local file handed over for {path!r} ended after {read} of the {size} bytes its size gives (a "
                "file of /proc or /sys; nothing of it was stored): put a copy of it"
            )

    def release(self, handed: HandedFile) -> None:
        """Closes the file once no read or write of it is in flight (a closed number could be another file's by
        then)."""
        def close(_: object = None) -> None:
            os.close(handed.fd)
            self._descriptors.give_read()

        if handed.busy is not None and not handed.busy.done():
            handed.busy.add_done_callback(close)
        else:
            close()


def taking(handoffs: Handoffs | None) -> Handoffs:
    """`handoffs`, for a call that names a token; HandoffNotHeld when the daemon takes no files (None: its --handoff
    is off)."""
    if handoffs is None:
        raise HandoffNotHeld(f"{HandoffNotHeld.mark}this daemon takes no files handed over (its --handoff is off): "
                             "move the file's bytes in a stream")
    return handoffs


def _pwrite_all(fd: int, chunks: list[bytes | memoryview], offset: int) -> None:
    """Writes all of `chunks`, one after the other, at `offset` (os.pwritev may take part of them)."""
    views = [memoryview(chunk) for chunk in chunks]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]
