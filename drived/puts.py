"""PutStream: the files of one Put stream, committed while the next ones arrive.

Checks the order of messages (header, data..., finish, for each file). A
file's commit (verify, fsync, rename) runs as a task while the stream goes on
receiving, so a folder of small files is not one fsync after another. A
stream carries at most `MAX_FILES_PER_STREAM` files, fewer when their paths are
long: each one's entry is kept for the answer, which must stay within the
message limit. At most
`MAX_COMMITS_IN_FLIGHT` run at once, holding at most `MAX_BYTES_IN_FLIGHT` of
buffered bytes between them (a commit holds at most a chunk). The answer waits
for every commit.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from drive_client.errors import InvalidArgument
from drive_client.handoff import PUT
from drive_client.pb import drive_pb2 as pb
from drive_client.uri import DEFAULT_COMPONENT
from drive_client.wire import SMALL_FILE, PutMessage, chunk_of

from .backends.base import ClientTooSlow
from .checksums import ClientChecksums
from .config import ANSWER_ENTRIES_BYTES, answer_entry_bytes
from .drives import PendingPut
from .entry import Entry
from .handoff import READ_SIZE, Handoffs, taking
from .requests import sent_checksums

MAX_COMMITS_IN_FLIGHT = 64  # the more commits wait together, the more the commit worker does at once
MAX_BYTES_IN_FLIGHT = 16 << 20
MAX_FILES_PER_STREAM = 10_000  # the answer lists them all


class PutStream:
    """Receives the messages of one Put stream in order; `results` gives the committed files."""

    def __init__(self, begin: Callable[[pb.PutHeader], Awaitable[PendingPut]], handoffs: Handoffs | None) -> None:
        self._begin = begin  # decodes a header and starts its file in its drive
        self._handoffs = handoffs  # the files handed over by clients of this host; None: the daemon takes none
        self._pending: PendingPut | None = None
        self._handed = False  # whether the pending file's bytes were read from a file handed over
        self._commits: list[asyncio.Task[Entry]] = []
        self._file_start = 0  # the stream's byte count at the current file's first byte (negative for a resumed
        # file whose first bytes came in an earlier stream)
        self._stop_at = 0  # the stream's byte count past which the current file is over its limit
        self._running = self._held = 0  # commits in flight, and the bytes they hold
        self._room = asyncio.Event()  # set when a commit ends
        self._failure: BaseException | None = None  # the first commit that failed
        self._answer_bytes = 0  # what the files' entries take in the answer, at most
        self.bytes = 0

    async def receive(self, message: PutMessage | pb.PutFileRequest) -> None:
        """Takes the stream's next message; a PutFile call's request is one whole file, as a `file` message."""
        if self._failure is not None:  # fail the stream as soon as a commit failed
            raise self._failure
        if isinstance(message, pb.PutFileRequest):
            await self._receive_file(message)
            return
        data = chunk_of(message)
        if data is not None:
            if self._pending is None:
                raise InvalidArgument("a Put stream must start each file with a header before its data")
            if self._handed:
                raise InvalidArgument("a handed-over file's bytes are read from the file: its header is followed by "
                                      "its finish, and no data")
            await self._write(self._pending, data)
            return
        kind = message.WhichOneof("message")  # type: ignore[union-attr]
        if kind == "header" and message.header.handoff:  # type: ignore[union-attr]
            await self._receive_handed(message.header)  # type: ignore[union-attr]
        elif kind == "header":
            await self._start(message.header)  # type: ignore[union-attr]
        elif kind == "finish":
            if self._pending is None:
                raise InvalidArgument("a finish arrived with no file started: send a header first")
            await self._finish(sent_checksums(message.finish, optional=self._handed))  # type: ignore[union-attr]
        elif kind == "file":
            await self._receive_file(message.file)  # type: ignore[union-attr]
        else:
            raise InvalidArgument("an empty PutRequest: send a header, data, finish or file")

    async def _receive_file(self, whole: pb.PutFileRequest) -> None:
        if whole.header.handoff:
            raise InvalidArgument("a handoff token goes in the header of a Put stream's file, not with its bytes")
        await self._start(whole.header)
        assert self._pending is not None  # set by _start
        sent = sent_checksums(whole)
        await self._write(self._pending, whole.data)
        await self._finish(sent)

    async def _receive_handed(self, header: pb.PutHeader) -> None:
        """A file handed over by a client of this host (`drived.handoff`): its bytes are read here, from the file;
        the finish that follows the header commits it."""
        handoffs = taking(self._handoffs)
        handed = handoffs.claim(header.handoff, PUT)
        try:
            if header.write_offset or not header.HasField("size"):
                raise InvalidArgument("a handed-over file is put whole: its header gives its size, and no "
                                      "write_offset")
            handoffs.check_unchanged(handed, header.path, header.size)
            await self._start(header)
            assert self._pending is not None  # set by _start
            position = 0
            while position < header.size:
                data = await handoffs.read(handed, position, min(READ_SIZE, header.size - position))
                if not data:  # shorter than its size: refused below
                    break
                position += len(data)
                await self._write(self._pending, data)
            handoffs.check_unchanged(handed, header.path, header.size, read=position)
            self._handed = True  # committed at its finish, as a file whose bytes came: a stream cut before it
            # (its client interrupted as the call started) commits nothing
        finally:
            handoffs.release(handed)

    async def _start(self, header: pb.PutHeader) -> None:
        if self._pending is not None:
            raise InvalidArgument(f"a new file arrived before the finish of {self._pending.path!r}")
        if len(self._commits) == MAX_FILES_PER_STREAM:
            raise InvalidArgument(
                f"a Put stream carries at most {MAX_FILES_PER_STREAM} files: the first {MAX_FILES_PER_STREAM} are "
                "stored; send the rest in another stream"
            )
        self._answer_bytes += answer_entry_bytes(header.path, header.component or DEFAULT_COMPONENT)
        if self._answer_bytes > ANSWER_ENTRIES_BYTES:
            raise InvalidArgument(
                f"a Put stream's answer lists its files within the message limit, which the paths of its first "
                f"{len(self._commits)} files take: those are stored; send {header.path!r} and the rest in another "
                "stream"
            )
        self._pending = await self._begin(header)
        self._file_start = self.bytes - self._pending.offset
        self._stop_at = self._file_start + self._pending.max_bytes

    async def _write(self, pending: PendingPut, data: bytes | memoryview) -> None:
        """Writes the next bytes of the current file, unless they take it past its limit."""
        if self.bytes + len(data) > self._stop_at:
            raise pending.over_limit(self.bytes + len(data) - self._file_start)
        self.bytes += len(data)  # received, and the upload's once handed to it (writes are cancel-safe)
        try:
            await pending.write(data)
        except ClientTooSlow:
            self.bytes -= len(data)  # refused whole: none of it was taken
            raise

    async def _finish(self, sent: ClientChecksums) -> None:
        """Commits the current file as a task of its own, once there is room for it (until then it is the file in
        progress, which `close` suspends or aborts when the stream ends)."""
        put = self._pending
        assert put is not None  # checked by the callers
        received = self.bytes - self._file_start
        # What the commit holds: a bigger file than SMALL_FILE is on disk as it arrives, but for its last chunk.
        held = min(received, SMALL_FILE)
        while self._running == MAX_COMMITS_IN_FLIGHT or (self._running and self._held + held > MAX_BYTES_IN_FLIGHT):
            self._room.clear()
            await self._room.wait()
        self._pending, self._handed = None, False
        self._running += 1
        self._held += held
        task = asyncio.create_task(put.commit(sent, received))
        task.add_done_callback(functools.partial(self._committed, held))
        self._commits.append(task)

    def _committed(self, held: int, task: asyncio.Task[Entry]) -> None:
        """Makes room and keeps the first failure (DataLoss, ALREADY_EXISTS, disk full)."""
        self._running -= 1
        self._held -= held
        self._room.set()
        if self._failure is None and not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    async def results(self) -> list[Entry]:
        """At the end of the stream: every committed file, in the order sent."""
        if self._pending is not None:
            raise InvalidArgument(
                f"the Put stream ended before the finish of {self._pending.path!r}: it is not stored (with an "
                "upload_id, what arrived is held for a resume)"
            )
        return list(await asyncio.gather(*self._commits))

    async def close(self, keep: bool) -> None:
        """Ends an unfinished file, suspended when `keep` (held when resumable) or else discarded, and lets the
        commits in flight end (they are valid files)."""
        if self._pending is not None:
            await (self._pending.suspend() if keep else self._pending.abort())
            self._pending = None
        await asyncio.gather(*self._commits, return_exceptions=True)
