"""When a broken stream is tried again, and where a transfer goes on from: decisions `core` makes.

`Backoff` paces the attempts of one stream (a put's, a get's, a ranged
read's or a watch's) or call (a small put's PutFile, a List page, a Stat, a
mount): only UNAVAILABLE (the daemon unreachable, draining, or the
connection cut) is tried again, after exponential delays with jitter, for at
most `retry_seconds` from the first failure since the transfer last moved
forward; anything else is raised at once, and so are the UNAVAILABLE errors
its caller names `at_once` (what `core` says an s3:// drive's calls raise).

`GetPosition` knows how far a Get stream got, and the request that goes on
from there. Where a put goes on from is the daemon's answer to
QueryWriteStatus (`core`); `PutProgress` counts a put's bytes once however
often a cut makes it send them.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable

from .errors import DriveError, StaleIndexError, TooManyStreams, Unavailable
from .pb import drive_pb2 as pb
from .wire import GetMessage, chunk_of

log = logging.getLogger("drive_client")

RETRY_SECONDS = 60.0  # default budget of a stream's retries: $DRIVE_RETRY_SECONDS overrides it
FIRST_DELAY = 0.1  # seconds before the first retry; doubles with each failure after it
MAX_DELAY = 5.0  # the longest wait between two attempts


class Backoff:
    """Pacing of one stream's attempts: exponential delays with jitter, within a budget of seconds; the errors
    `at_once` are never tried again."""

    def __init__(self, budget: float, at_once: tuple[type[DriveError], ...] = ()) -> None:
        self.budget = budget
        self.at_once = at_once
        self._failures = 0
        self._since: float | None = None  # the first failure since the stream last moved forward

    def check(self, error: DriveError) -> None:
        """Raises `error` unless it is worth trying again: UNAVAILABLE but not `at_once`, or a daemon busy with
        other streams (`TooManyStreams`), with retries on."""
        if not isinstance(error, (Unavailable, TooManyStreams)) or isinstance(error, self.at_once) or self.budget <= 0:
            raise error

    def delay(self, error: DriveError) -> float:
        """Seconds to wait before the next attempt after `error`; raises `error` when it is not worth
        trying again, or when waiting would take the stream past its budget."""
        self.check(error)
        return self.pace(error)

    def pace(self, error: DriveError) -> float:
        """`delay` for an attempt the caller has decided to make: raises `error` only past the budget."""
        if self.budget <= 0:
            raise error
        now = time.monotonic()
        if self._since is None:
            self._since = now
        ceiling = min(MAX_DELAY, FIRST_DELAY * 2**self._failures)
        delay = ceiling * (0.5 + random.random() / 2)  # jitter: many clients cut at once come back spread out
        left = self.budget - (now + delay - self._since)
        if left < 0:
            raise error
        self._failures += 1
        log.warning("%s; trying again in %.1f s (for %.0f s more at most)", error, delay, left)
        return delay

    def progressed(self) -> None:
        """The stream moved forward: its next failure starts a new budget."""
        self._failures = 0
        self._since = None


class PutProgress:
    """The progress of a put's files across the streams that carry them: each byte counted once.

    Each stream counts through a `stream` of its own, which starts where
    the stream does (after a cut: the bytes of the files before it, and
    those the daemon holds of the first one); what it sends again up to
    where the broken stream got is not counted again. A stream's counts
    end when the next one starts: the thread reading a broken stream's
    files may still count what it read after the put went on without it.
    """

    def __init__(self, progress: Callable[[int], None]) -> None:
        self._progress = progress
        self._lock = threading.Lock()  # each stream counts from the thread that reads its files
        self._streams = 0  # how many streams started: the last one is counted
        self._position = 0  # where the stream being sent got to, in bytes of the put's files
        self._counted = 0  # the furthest position counted so far

    def stream(self, position: int) -> Callable[[int], None]:
        """The count of a new stream starting at `position`, called with the bytes it sends as they go."""
        with self._lock:
            self._streams += 1
            self._position = position
            number = self._streams

        def count(nbytes: int) -> None:
            with self._lock:
                if number != self._streams:
                    return
                self._position += nbytes
                new = self._position - self._counted
                self._counted = max(self._counted, self._position)
            if new > 0:
                self._progress(new)

        return count


def upload_ids(count: int) -> list[str]:
    """Ids for the resumable uploads of `count` files, unique to this put (PutHeader.upload_id)."""
    token = secrets.token_hex(16)
    return [f"{token}-{index}" for index in range(count)]


class GetPosition:
    """How far a Get stream got (what was handed on to the receiver), and how a new stream goes on from there.

    A get of one file goes on with a ranged read from its first byte not
    handed on, pinned to the version it started with (if_match); its info
    goes on to the receiver, as the sign that the daemon's CRC32C that ends
    it covers the bytes from there on (`transfer.receive_files`). A get of a
    folder asks for the folder again: the daemon sends its files in path
    order, and what was handed on already is skipped: the files before the
    one in progress, and that one's first bytes (it must be the same
    version, or StaleIndexError, as for a pinned read).
    """

    def __init__(self, request: pb.GetRequest) -> None:
        self.request = request
        self.file: pb.FileInfo | None = None  # the file whose bytes are being handed on
        self.sent = 0  # how many of its bytes
        self.done = ""  # the path of the last file handed on whole
        self.moved = 0  # bytes handed on in all: whether the stream moved forward since it broke
        self._replaying = False  # a folder is sent again: what was handed on is skipped
        self._in_file = False  # the replay has reached `file`
        self._skip = 0  # bytes of `file` the replay still skips

    def passed(self, message: GetMessage) -> None:
        """Counts `message` as handed on."""
        data = chunk_of(message)
        if data is not None:
            self.sent += len(data)
            self.moved += len(data)
            return
        kind = message.WhichOneof("message")  # type: ignore[union-attr]
        if kind == "info" and self.file is not None and message.info.path == self.file.path:  # type: ignore[union-attr]
            return  # a ranged read goes on with the same file
        if kind in ("info", "file", "crc32c") and self.file is not None:  # the CRC32C ends its file
            self.done, self.file = self.file.path, None
        if kind == "info":
            self.file, self.sent = message.info, 0  # type: ignore[union-attr]
        elif kind == "file":
            self.done = message.file.info.path  # type: ignore[union-attr]
            self.moved += len(message.file.data)  # type: ignore[union-attr]

    def resumed(self) -> pb.GetRequest:
        """The request that goes on from here, once `passed` has seen all that was handed on."""
        file = self.file
        if file is not None and file.path == self.request.path and not file.folder:
            return pb.GetRequest(
                drive=self.request.drive, path=file.path, component=file.component, offset=self.sent,
                if_match=file.sha256 or file.etag, checksums=self.request.checksums,
            )
        self._replaying, self._in_file, self._skip = True, False, self.sent
        return self.request

    def kept(self, message: GetMessage) -> GetMessage | None:
        """`message` of a resumed stream as it goes on to the receiver; None for what was handed on already."""
        data = chunk_of(message)
        kind = None if data is not None else message.WhichOneof("message")  # type: ignore[union-attr]
        if not self._replaying:
            return message
        if kind in ("info", "file"):
            info = message.info if kind == "info" else message.file.info  # type: ignore[union-attr]
            return self._replayed_file(message, info, kind)
        if not self._in_file:
            return None  # a file handed on whole
        if data is None or self._skip == 0:
            self._replaying = False
            return message
        if len(data) <= self._skip:
            self._skip -= len(data)
            return None
        self._replaying = False
        data, self._skip = data[self._skip:], 0
        return data

    def ended(self) -> None:
        """The stream ended: raises when a folder sent again ended before the file being handed on (deleted)."""
        if self._replaying and self.file is not None and not self._in_file:
            raise _deleted(self.file)

    def _replayed_file(self, message: GetMessage, info: pb.FileInfo, kind: str) -> GetMessage | None:
        """A file's first message in a folder sent again: None while it was handed on already."""
        file = self.file
        if self._in_file or (file is None and info.path > self.done):
            self._replaying = False  # past what was handed on
            return message
        if file is not None and info.path == file.path:
            if kind != "info" or (info.size, info.sha256, info.etag) != (file.size, file.sha256, file.etag):
                raise StaleIndexError(f"{info.path!r} changed while it was read: get it again")
            self._in_file = True
            return None
        if info.path < (file.path if file is not None else self.done) or info.path == self.done:
            return None
        raise _deleted(file)  # type: ignore[arg-type]


def _deleted(file: pb.FileInfo) -> StaleIndexError:
    return StaleIndexError(f"{file.path!r} was deleted while it was read: get it again")
