"""Same-host puts without their bytes on the wire: the client hands the daemon the open file.

A client on the daemon's host sends an open regular file, read-only, over a
Unix socket in Linux's abstract namespace (`socket_name`: one per port, seen
only inside the daemon's network namespace) with SCM_RIGHTS, and gets a token
back; the Put header that carries the token has the daemon read the file
itself (`drived.puts`), which spares the client its reads, checksums and
sends, and the daemon its receives. Holding a descriptor is no right the client did not have: it
opened the file, and its Put is authorized as any other. What a client the
socket refuses, or whose token the Put does not find here (it expired, or
another daemon has the socket), streams its bytes instead.

Bounded whatever clients do: at most `MAX_CONNECTING` handoffs at once, each
given `HANDOFF_SECONDS` to send its file; at most `MAX_HELD` files held until
their Put, each for `HOLD_SECONDS`; every one counted among the reads of the
process's descriptors. A file is read in `READERS` threads of its own: a read
that hangs (a stuck network or FUSE mount) ties up one of them for good, its
Put gives up on it after `STUCK_SECONDS` (the client sends the bytes), and
once half of them are tied up the socket refuses handoffs.
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
from dataclasses import dataclass

from drive_client.errors import HandoffNotHeld, ResourceExhausted, StaleIndexError
from drive_client.files import Version, version
from drive_client.handoff import REQUEST, socket_name

from . import metrics
from .descriptors import Descriptors

log = logging.getLogger("drived")

MAX_CONNECTING = 16
HANDOFF_SECONDS = 2.0
MAX_HELD = 64
HOLD_SECONDS = 30.0
READERS = 8
STUCK_SECONDS = 10.0  # a read this old counts as hung
READ_SIZE = 1 << 20

def _readable_file(st: os.stat_result, fd: int) -> bool:
    """Whether `fd` (its stat `st`) is a regular file open for reading (not write-only, not an O_PATH handle)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    return stat.S_ISREG(st.st_mode) and not flags & os.O_PATH and flags & os.O_ACCMODE != os.O_WRONLY


@dataclass
class HandedFile:
    """A file a client handed over, held until its Put reads it."""

    fd: int
    version: Version
    expiry: asyncio.TimerHandle  # its end while no Put has claimed it
    reading: asyncio.Future[bytes] | None = None  # the read in a thread: the descriptor is closed after it


class Handoffs:
    """The handoff socket of one daemon and the files handed over through it."""

    def __init__(self, port: int, descriptors: Descriptors) -> None:
        self.name = socket_name(port)
        self._descriptors = descriptors
        self._held: dict[str, HandedFile] = {}
        self._connecting = 0
        self._readers = concurrent.futures.ThreadPoolExecutor(READERS, thread_name_prefix="drived-handoff")
        self._reads: dict[asyncio.Future[bytes], float] = {}  # reads in flight, by their start
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
        self._readers.shutdown(wait=False)

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
            except OSError:  # its client left, tired of waiting on a stopped daemon: it sends the bytes
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
            if message != REQUEST or len(fds) != 1:
                return "busy the handoff takes one file with the request " + REQUEST.decode()
            fd = fds.pop()
            st = os.fstat(fd)
            if not _readable_file(st, fd):
                os.close(fd)
                return "busy only a regular file open for reading is handed over"
            refusal = self._refusal()
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
            self._held[token] = HandedFile(fd, version(st), expiry)
            return "ok " + token
        finally:
            for fd in fds:
                os.close(fd)

    def _refusal(self) -> str:
        if len(self._held) >= MAX_HELD:
            return f"{MAX_HELD} files handed over wait for their Put"
        now = time.monotonic()
        if sum(now - started > STUCK_SECONDS for started in self._reads.values()) >= READERS // 2:
            return "reads of files handed over hang"
        return ""

    def _expire(self, token: str) -> None:
        handed = self._held.pop(token, None)
        if handed is not None:
            handed.expiry.cancel()  # when not the expiry itself: the stop, or a client that left
            self.release(handed)

    def claim(self, token: str) -> HandedFile:
        """The file handed over with `token`, now the caller's to `release`; HandoffNotHeld when there is none."""
        handed = self._held.pop(token, None)
        if handed is None:
            raise HandoffNotHeld(
                f"{HandoffNotHeld.mark}no file handed over with this token is held here: it expired ({HOLD_SECONDS:g} "
                "s), or another daemon on this host holds the socket; send the file's bytes in the stream"
            )
        handed.expiry.cancel()
        return handed

    async def read(self, handed: HandedFile, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the file from `offset`, read in one of the handoff's threads."""
        reading = asyncio.wrap_future(self._readers.submit(os.pread, handed.fd, size, offset))
        handed.reading = reading
        self._reads[reading] = time.monotonic()
        reading.add_done_callback(self._reads.pop)
        try:
            return await asyncio.wait_for(asyncio.shield(reading), STUCK_SECONDS)
        except asyncio.TimeoutError:  # its thread stays tied up; the Put does not wait on it
            raise HandoffNotHeld(f"{HandoffNotHeld.mark}a read of the file handed over took more than "
                                 f"{STUCK_SECONDS:g} s (a hung mount?); send its bytes in the stream") from None
        except OSError as err:  # the client streams it instead, and meets the error itself
            raise HandoffNotHeld(f"{HandoffNotHeld.mark}the file handed over cannot be read here ({err}); send its "
                                 "bytes in the stream") from None

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
        """Closes the file once no read of it is in flight (a closed number could be another file's by then)."""
        def close(_: object = None) -> None:
            os.close(handed.fd)
            self._descriptors.give_read()

        if handed.reading is not None and not handed.reading.done():
            handed.reading.add_done_callback(close)
        else:
            close()
