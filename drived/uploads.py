"""Resumable uploads: kept between the streams that carry them, expired, resumed and described.

A file whose PutHeader carries an `upload_id` is resumable. When its client
ends or breaks its stream before the finish, its backend `Upload` is suspended (no
descriptor, no buffer: only its bytes in temporary storage and the state of
their checksums, in the Upload object) and held for `expiry` seconds; a
timer then discards it. A Put whose header has a `write_offset` equal to
what is held takes the upload over and writes on; QueryWriteStatus tells
what is held, or that the upload completed, so that a client whose stream broke
after its finish learns the file is stored. A completion is remembered while
the stream that committed it runs (a stream is the task serving its call: the
whole Put of up to `MAX_FILES_PER_STREAM` files, or one PutFile) and for
`expiry` seconds after it ended, so that a client cut late in a long stream
learns of every file it stored, however long ago the first one was. Once their
streams ended, at most `COMPLETED_KEPT` completions of Put streams are
remembered, whose entries take at most `COMPLETED_KEPT_BYTES` (long paths), and
as many of PutFile calls apart: small puts, however many, never push out the
completions that a cut folder put goes on from. A stream
that the daemon ends (a refusal, the idle timeout: see
`drived.service.DriveService.Put`) aborts its upload instead, but for one
ended because its client kept memory from others for too long
(`ClientTooSlow`): that upload is intact, and held as a cut stream's is.

Everything here lives in this daemon's memory: another daemon, or this one
after a restart, holds nothing (NOT_FOUND, and the client starts the file
again from 0). The number of held uploads and their bytes are bounded: past
a bound, the oldest held upload is discarded first. But for completions,
with a coordinator that records them (`Coordinator.completion`: replicas
sharing Redis): the publish of a put records its upload's completion for
`expiry` seconds (within the bytes Redis keeps for them, oldest forgotten
first), so that a client cut after the commit that asks another
daemon learns of the file; those of running streams are kept there for
`expiry` again every third of it (one call for all of them), so that there
too a client cut late in a long stream learns of every file it stored (for
two thirds of `expiry` after the stream ended, at least). A commit is marked
there while it runs, its wait for its path's claim included, so that a query
of its upload that reaches another daemon (and names its path) waits for
its end rather than answer NOT_FOUND.

Ids are scoped by drive and component. One stream writes an upload at a
time: a resume takes it over from a stream that broke on the client's side
but is still open here (its later writes fail), after that stream's write in
flight; the takeover, each write and the suspension are serialised by the
upload's lock. A takeover checks the offset before it stops the old stream
(a refused one leaves that stream writing), and hands the upload on without
holding it: it never pushes another held upload out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from drive_client.errors import InvalidArgument, NotFound, OutOfRange, StaleIndexError

from . import metrics
from .backends.base import ClientTooSlow, Upload
from .config import ANSWER_ENTRIES_BYTES, Named, answer_entry_bytes, flag
from .coordinator import Coordinator
from .entry import Entry
from .puts import MAX_FILES_PER_STREAM
from .requests import PutHeader

log = logging.getLogger("drived")
T = TypeVar("T")

UploadKey = tuple[str, str, str]  # drive name, component, upload id
# Completions remembered at most once their streams ended (each for `expiry` seconds), of Put streams (the whole
# of the two longest: in files, and in their entries' bytes, which a stream's answer bounds) and as many again of
# PutFile calls: a completion's memory grows with its path (some 5 KiB with a 4 KB path, under 1 KiB with a short
# one). Those of running streams are kept whatever their number: each stream holds its files' entries for its
# answer anyway.
COMPLETED_KEPT = 2 * MAX_FILES_PER_STREAM
COMPLETED_KEPT_BYTES = 2 * ANSWER_ENTRIES_BYTES
Call = asyncio.Task[object]  # the task serving one call (a Put stream, a PutFile): it is done when the call ends


def _shown(key: UploadKey) -> str:
    return f"upload {key[2]!r} of component {key[1]!r} in lit://{key[0]}"


@dataclass(eq=False)
class Resumable:
    """One resumable upload, across the streams that carry it."""

    key: UploadKey
    header: PutHeader  # of the stream that started it
    upload: Upload
    writer: object | None = None  # the put writing it now; None while held
    stream: Call | None = None  # the call of that put
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    expiry: asyncio.TimerHandle | None = None  # set while held
    committing: asyncio.Future[Entry] | None = None
    broken: bool = False  # a write failed: what it holds cannot be trusted
    gone: bool = False  # discarded, or committed

    async def write(self, writer: object, data: bytes | memoryview) -> None:
        """Writes `data` for `writer`, which must still be the upload's writer."""
        async with self.lock:
            if self.writer is not writer:
                raise StaleIndexError(
                    f"{_shown(self.key)} was resumed by another stream: this one stops writing it"
                )
            try:
                await self.upload.write(data)
            except asyncio.CancelledError:
                raise  # the upload has the data (writes are cancel-safe)
            except ClientTooSlow:
                raise  # refused whole: what the upload holds is sound, and held for a resume
            except BaseException:
                self.broken = True
                raise


def _entry_bytes(entry: Entry) -> int:
    return answer_entry_bytes(entry.path, entry.component)


def _discarding(resumable: Resumable, why: str) -> None:
    log.info("a resumable upload is discarded", extra={"fields": {
        "drive": resumable.key[0], "component": resumable.key[1], "upload_id": resumable.key[2],
        "path": resumable.header.path, "bytes": resumable.upload.held, "why": why}})


class Completions:
    """The files that resumable uploads stored, once the streams that committed them ended: each remembered for
    `expiry` seconds, at most `kept` of them, whose entries take at most `kept_bytes` (`answer_entry_bytes`); past
    either, the oldest are forgotten first."""

    def __init__(self, expiry: float, kept: int, kept_bytes: int) -> None:
        self.expiry = expiry
        self.kept = kept
        self.kept_bytes = kept_bytes
        self._files: OrderedDict[UploadKey, tuple[float, Entry]] = OrderedDict()  # deadline, file: oldest first
        self._bytes = 0  # what their entries take
        self._forgetting: asyncio.TimerHandle | None = None  # when the oldest one expires

    def add(self, key: UploadKey, entry: Entry) -> None:
        self.discard(key)
        self._files[key] = (asyncio.get_running_loop().time() + self.expiry, entry)
        self._bytes += _entry_bytes(entry)
        self._forget()

    def get(self, key: UploadKey) -> Entry | None:
        remembered = self._files.get(key)
        if remembered is None or remembered[0] <= asyncio.get_running_loop().time():
            return None
        return remembered[1]

    def discard(self, key: UploadKey) -> None:
        remembered = self._files.pop(key, None)
        if remembered is not None:
            self._bytes -= _entry_bytes(remembered[1])

    def _forget(self) -> None:
        """Forgets the files past their expiry, or past `kept` or `kept_bytes`, oldest first; then waits for the
        oldest one left to expire, so that a burst of puts leaves no records behind."""
        loop = asyncio.get_running_loop()
        while self._files:
            deadline, _ = next(iter(self._files.values()))
            if deadline > loop.time() and len(self._files) <= self.kept and self._bytes <= self.kept_bytes:
                break
            self._bytes -= _entry_bytes(self._files.popitem(last=False)[1][1])
        if self._forgetting is None and self._files:
            deadline, _ = next(iter(self._files.values()))
            self._forgetting = loop.call_at(deadline, self._forgot)

    def _forgot(self) -> None:
        self._forgetting = None
        self._forget()

    def close(self) -> None:
        if self._forgetting is not None:
            self._forgetting.cancel()


class HeldUploads:
    """The resumable uploads of one daemon: written, held, committing, and recently completed."""

    def __init__(self, expiry: float, max_uploads: int, max_bytes: int, coordinator: Coordinator,
                 named: Named = flag) -> None:
        self.expiry = expiry
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self.named = named  # these settings as they were given, which messages name
        self.coordinator = coordinator  # where other daemons' completions are found (`Coordinator.completion`)
        self._known: dict[UploadKey, Resumable] = {}  # every upload not yet committed or discarded
        self._held: OrderedDict[UploadKey, Resumable] = OrderedDict()  # the suspended ones, oldest first
        self._held_bytes = 0
        # The completions of ended streams: a Put stream's, and apart a PutFile call's (see the module doc).
        self._completed_put_streams = Completions(expiry, COMPLETED_KEPT, COMPLETED_KEPT_BYTES)
        self._completed_put_files = Completions(expiry, COMPLETED_KEPT, COMPLETED_KEPT_BYTES)
        self._streaming: dict[UploadKey, tuple[Call, Entry]] = {}  # the completions of running streams
        self._streams: dict[Call, tuple[Completions, list[UploadKey]]] = {}  # those running streams, with where
        # their completions go once they end
        self._tasks: set[asyncio.Future[Any]] = set()
        self._keeper: asyncio.Task[None] | None = None  # `_keep_streaming`, while running streams have completions

    # -- streams -------------------------------------------------------------

    async def start(self, header: PutHeader, upload: Upload, writer: object) -> Resumable:
        """Registers a new upload (write_offset 0) written by `writer`; an earlier one of its id is discarded."""
        key = (header.drive.name, header.component, header.upload_id)
        earlier = self._known.get(key)
        if earlier is not None and earlier.committing is None:  # one committing ends by itself
            await self._discard(earlier, "started again from 0")
        self._completed_put_streams.discard(key)
        self._completed_put_files.discard(key)
        self._streaming.pop(key, None)
        resumable = Resumable(key, header, upload, writer, asyncio.current_task())
        self._known[key] = resumable
        return resumable

    async def resume(self, header: PutHeader, writer: object) -> Resumable:
        """Hands the upload `header` resumes to `writer`, at `header.write_offset`.

        NotFound when it is not held (never started, expired, discarded,
        completed, or held by another daemon); InvalidArgument when the
        header's path or size is not the upload's; OutOfRange when the
        offset is not what it holds. A refused resume changes nothing.
        The takeover runs to its end when the resuming stream is cut
        meanwhile (it waits for the old stream's part on its way to the
        store), and the upload is then held as a cut stream's is: cut
        halfway, it was neither written nor held, and never expired.
        """
        key = (header.drive.name, header.component, header.upload_id)
        resumable = self._known.get(key)
        if resumable is None:
            raise NotFound(self._not_held(key))
        first = resumable.header
        if header.path != first.path:
            raise InvalidArgument(f"{_shown(key)} is the upload of {first.path!r}, not of {header.path!r}")
        if header.size is not None and first.size is not None and header.size != first.size:
            raise InvalidArgument(f"{_shown(key)} is of {first.size} bytes, not {header.size}")
        taking = self._track(self._take_over(resumable, header, writer, asyncio.current_task()))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            await self.suspend(resumable, writer)  # once taken over (its lock comes after); a no-op when refused
            await asyncio.wait([taking])
            if not taking.cancelled():
                taking.exception()  # a refusal nobody waits for any more: not left for asyncio to log
            raise

    async def _take_over(self, resumable: Resumable, header: PutHeader, writer: object, stream: Call | None
                         ) -> Resumable:
        """Hands `resumable` to `writer`, of the call `stream` (`resume`)."""
        key, first = resumable.key, resumable.header
        async with resumable.lock:  # after the write in flight of a stream still open here
            if resumable.committing is not None:
                raise NotFound(
                    f"{_shown(key)} has had its finish: nothing to resume (QueryWriteStatus tells the file)"
                )
            if resumable.gone or resumable.broken or not await self._intact(resumable):
                raise NotFound(self._not_held(key))
            held = resumable.upload.held
            if header.write_offset != held:
                raise OutOfRange(
                    f"{_shown(key)} holds {held} bytes, not {header.write_offset}: resume from {held} "
                    "(QueryWriteStatus tells)"
                )
            # A stream still open here (broken on the client's side) stops now: what it wrote goes on with this one.
            if resumable.writer is not None and not await self._release(resumable):
                raise NotFound(self._not_held(key))
            self._unhold(resumable)
            resumable.writer, resumable.stream = writer, stream
            if header.size is None:
                header.size = first.size  # the size the upload began with is checked at its commit all the same
        return resumable

    async def suspend(self, resumable: Resumable, writer: object) -> None:
        """The stream of `writer` ended before the finish: holds what it wrote for `expiry` seconds."""
        await asyncio.shield(self._track(self._suspend(resumable, writer)))

    async def _suspend(self, resumable: Resumable, writer: object) -> None:
        async with resumable.lock:
            if resumable.writer is not writer or resumable.gone:
                return  # taken over by a resumed stream, or discarded
            if not await self._release(resumable):
                return
            self._hold(resumable)
        await self._keep_within_bounds(resumable)

    async def _release(self, resumable: Resumable) -> bool:
        """Stops its writer and suspends the upload (the caller holds its lock); False when it cannot be resumed
        (a write failed) and is discarded."""
        resumable.writer = resumable.stream = None
        if not resumable.broken:
            try:
                await resumable.upload.suspend()
            except Exception as err:  # a write in flight failed: nothing to resume
                log.info("a resumable upload is discarded", extra={"fields": {
                    "upload_id": resumable.key[2], "error": str(err)}})
                resumable.broken = True
        if resumable.broken:
            await self._drop(resumable)
            return False
        return True

    async def committed(self, resumable: Resumable, writer: object, commit: Callable[[], Awaitable[Entry]]) -> Entry:
        """Runs the commit of the upload for `writer`, which must still be its writer (a stream whose finish
        waited for room while another took the upload over commits nothing); the file it stores is remembered
        (see the module doc) whether or not its caller is still waiting when it ends (a stream cut during the
        commit)."""
        if resumable.writer is not writer:
            raise StaleIndexError(f"{_shown(resumable.key)} was resumed by another stream: this one commits nothing")
        resumable.committing = self._track(self._marked(resumable.key, commit))
        resumable.committing.add_done_callback(functools.partial(self._ended_commit, resumable))
        return await asyncio.shield(resumable.committing)

    async def _marked(self, key: UploadKey, commit: Callable[[], Awaitable[Entry]]) -> Entry:
        """Runs `commit` marked as under way for the other daemons' queries (`Coordinator.committing`)."""
        async with self.coordinator.committing(*key):
            return await commit()

    def _ended_commit(self, resumable: Resumable, commit: asyncio.Future[Entry]) -> None:
        """The upload is no longer unfinished; the file a commit stored is remembered with the stream that
        committed it while that runs, else for `expiry` seconds from now."""
        resumable.gone = True
        key = resumable.key
        if self._known.get(key) is resumable:
            del self._known[key]
        if commit.cancelled() or commit.exception() is not None:
            return
        completed = self._completed_put_files if resumable.header.put_file else self._completed_put_streams
        stream = resumable.stream
        if stream is None or stream.done():
            completed.add(key, commit.result())
            return
        self._streaming[key] = (stream, commit.result())
        if self.coordinator.records_completions and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.ensure_future(self._keep_streaming())
        if stream not in self._streams:
            self._streams[stream] = (completed, [])
            stream.add_done_callback(self._ended_stream)
        self._streams[stream][1].append(key)

    def _ended_stream(self, stream: Call) -> None:
        """The stream's completions are remembered for `expiry` seconds from now on."""
        completed, keys = self._streams.pop(stream)
        for key in keys:
            streaming = self._streaming.get(key)
            if streaming is not None and streaming[0] is stream:  # not started again since
                del self._streaming[key]
                completed.add(key, streaming[1])

    async def _keep_streaming(self) -> None:
        """Keeps the coordinator's records of the running streams' completions, every third of `expiry`, for as
        long as there are any."""
        while self._streaming:
            await asyncio.sleep(self.expiry / 3)
            await self.coordinator.keep_completions(list(self._streaming))

    async def abort(self, resumable: Resumable, writer: object) -> None:
        """Discards the upload that `writer` writes (a failed write or commit, a stream the daemon ended); a no-op
        when it is not its writer."""
        async with resumable.lock:
            if resumable.writer is writer and not resumable.gone:
                await self._drop(resumable)

    # -- queries -------------------------------------------------------------

    async def status(self, key: UploadKey, path: str = "") -> tuple[int, Entry | None]:
        """(bytes held, None) for an unfinished upload; (0, the stored file) for a completed one. `path`: the
        upload's file, named by a query that waits for the upload's commit under way on another daemon ("": one that
        does not)."""
        resumable = self._known.get(key)
        if resumable is not None and resumable.committing is not None:
            # The finish arrived: answer with its outcome (a failed commit leaves nothing to resume).
            await asyncio.wait([resumable.committing])
            resumable = None
        if resumable is not None:
            async with resumable.lock:
                if not resumable.gone and await self._intact(resumable):
                    return resumable.upload.held, None
        streaming = self._streaming.get(key)
        if streaming is not None:
            return 0, streaming[1]
        entry = self._completed_put_streams.get(key) or self._completed_put_files.get(key)
        if entry is None:
            # Committed by another daemon, maybe, or being committed by one (Unavailable: the coordinator cannot tell).
            entry = await self.coordinator.completion(*key, wait=bool(path))
        if entry is not None:
            return 0, entry
        raise NotFound(self._not_held(key))

    # -- holding, expiry and bounds ------------------------------------------

    def _hold(self, resumable: Resumable) -> None:
        loop = asyncio.get_running_loop()
        resumable.expiry = loop.call_later(self.expiry, self._expire, resumable)
        self._held[resumable.key] = resumable
        self._held_bytes += resumable.upload.held
        self._count()

    def _unhold(self, resumable: Resumable) -> None:
        if resumable.expiry is not None:
            resumable.expiry.cancel()
            resumable.expiry = None
        if self._held.pop(resumable.key, None) is not None:
            self._held_bytes -= resumable.upload.held
            self._count()

    def _count(self) -> None:
        metrics.HELD_UPLOADS.set(len(self._held))
        metrics.HELD_UPLOAD_BYTES.set(self._held_bytes)

    def _not_held(self, key: UploadKey) -> str:
        return (f"{_shown(key)} is not held by this daemon (never started, expired after "
                f"{self.named('upload_expiry')}, removed when the daemon ended its stream, or held by another "
                "daemon): put the file again from offset 0")

    async def _intact(self, resumable: Resumable) -> bool:
        """Whether the upload still has all its bytes (`Upload.intact`); one that lost them is discarded (the caller
        holds its lock)."""
        if await resumable.upload.intact():
            return True
        _discarding(resumable, "its bytes are gone from the store (the data dir's tmp/ removed)")
        await self._drop(resumable)
        return False

    def _expire(self, resumable: Resumable) -> None:
        self._track(self._discard(resumable, f"expired ({self.named('upload_expiry')} {self.expiry:g} s)",
                                  held_only=True))

    async def _keep_within_bounds(self, newest: Resumable) -> None:
        """Discards held uploads, oldest first, past the bounds; one bigger than all of them at once. Each only if
        still held once its lock is taken: a stream may have resumed it while the discard waited for the lock."""
        if newest.upload.held > self.max_bytes and self._held.get(newest.key) is newest:
            await self._discard(newest, f"larger than {self.named('max_held_bytes')} ({self.max_bytes})",
                                held_only=True)
        while self._held and (len(self._held) > self.max_uploads or self._held_bytes > self.max_bytes):
            oldest = next(iter(self._held.values()))
            await self._discard(oldest, f"the oldest held upload, past {self.named('max_held_uploads')} or "
                                f"{self.named('max_held_bytes')}", held_only=True)

    async def _discard(self, resumable: Resumable, why: str, held_only: bool = False) -> None:
        """Discards the upload, logging `why`; with `held_only`, unless a stream resumed it meanwhile."""
        async with resumable.lock:
            if resumable.gone or (held_only and resumable.writer is not None):
                return
            _discarding(resumable, why)
            await self._drop(resumable)

    async def _drop(self, resumable: Resumable) -> None:
        """Forgets the upload and removes its data (the caller holds its lock)."""
        self._unhold(resumable)
        resumable.gone = True
        resumable.writer = None
        if self._known.get(resumable.key) is resumable:
            del self._known[resumable.key]
        await resumable.upload.abort()

    def _track(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Runs `work` to its end, whoever waits for it; `close` waits for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Discards every held upload once the work under way (`_track`) ended (the daemon stops: nothing here
        outlives it)."""
        self._completed_put_streams.close()
        self._completed_put_files.close()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        for resumable in list(self._held.values()):
            await self._discard(resumable, "the daemon stops")
