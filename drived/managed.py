"""ManagedDrives: the semantics of `lit://` drives over a storage Backend and a Coordinator.

Namespaces (one per drive and component, see `drived.paths`), ownership
(`allow_duplicates`, deletes of one's own files only), listing across
components, ambiguity, folders, gets that wait for a put to commit, and
watches. Bytes, listings and file metadata come from the `Backend`; claims,
the change feed and wake-ups from the `Coordinator`; neither knows the
other, and this module knows neither implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import random
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from drive_client.errors import (
    AlreadyExists,
    AmbiguousPathError,
    EventsExpired,
    InvalidArgument,
    NotFound,
    NothingDeleted,
    ResourceExhausted,
    StaleIndexError,
    Unavailable,
    WaitTimeout,
)

from .backends.base import (
    Backend,
    Damaged,
    EndsBefore,
    Holder,
    Holding,
    Misplaced,
    NotDurable,
    ObjectInfo,
    Removed,
    StoredFileError,
    Upload,
    each_root,
)
from .checksums import ClientChecksums
from .config import ANSWER_ENTRIES_BYTES, Named, answer_entry_bytes, flag
from .coordinator import Change, Claim, Coordinator, Event, Unpublished, version_of
from .drives import FileStream
from .entry import Entry
from .paths import component_key, object_key, relative_path
from .quota import Quotas, Room
from .requests import (
    DeleteRequest,
    GetRequest,
    ListRequest,
    MountRequest,
    PutHeader,
    QueryWriteStatusRequest,
    StatRequest,
    WatchRequest,
)
from .uploads import HeldUploads, Resumable

EARLY_CHECK_MIN_SIZE = 1 << 20
GET_PAGE = 1000  # files a folder get walks at a time
# Files a folder delete walks at a time (~1.5 MB of names; with --storage, 10 LISTs). Not fewer: each page of a
# folder on the local backend reads the folder's entries again (its deletes changed it), 0.3 s for 200,000 of them.
DELETE_PAGE = 10_000
DELETE_BATCH = 100  # files a folder delete removes at most after one confirm of its claim (one round trip)
# A stat, get or List naming no component looks in each of up to this many components as in one it names; past them,
# only in those `Backend.holders` says may hold its path. Asking costs each that does a request more on S3, which a few
# pay for nothing; the many that hold nothing there (most, in a drive of thousands) cost one lstat or LIST each, not a
# stat and a folder check, or a folder read.
FEW_COMPONENTS = 8

T = TypeVar("T")
log = logging.getLogger("drived")

# What one component holds at a listed path: a folder (True), a file (False), or a file already looked at, its info
# (the listed path itself, which `_names_after` looks at to tell a file: its entry is made of that look, not another).
Held = bool | ObjectInfo


def _entry(path: str, component: str, info: ObjectInfo) -> Entry:
    return Entry(
        path=path, size=info.size, sha256=info.sha256, mtime_ns=info.generation,
        component=component, generation=info.generation, crc32c=info.crc32c,
    )


def _shown(drive: str, path: str) -> str:
    return f"{path!r} in lit://{drive}"


@contextlib.contextmanager
def _named(drive: str, component: str, path: str) -> Iterator[None]:
    """Names a StoredFileError raised inside (said of the file's key in the store) as the client knows the file."""
    try:
        yield
    except StoredFileError as err:
        raise err.named(f"lit://{drive}", component, path) from None


def _is_version(info: ObjectInfo, version: str) -> bool:
    """Whether `info` is the version a put recorded (`Change.version`: a CRC32C or a sha256); True when it cannot
    tell (nothing recorded, or no CRC32C stored)."""
    if len(version) == len(info.sha256):
        return version == info.sha256
    return not version or info.crc32c is None or version == version_of(info.sha256, info.crc32c)


async def _to_its_end(change: Awaitable[T]) -> T:
    """Awaits `change` (a change of the store and its event, inside its claim) to its end, even when the caller is
    cancelled meanwhile: then the cancel is raised once it ended.

    A client that goes away while the store makes a change does not stop it
    (the store's worker thread or request runs on): cut there, the change
    was made but never published (no watch saw it), and a delete gave its
    claim up before its file was gone (a put of the path meanwhile was then
    deleted by it).
    """
    running = asyncio.ensure_future(change)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # its caller is gone: nobody is answered
        raise


async def _confirm_if(claim: Claim, kind: Holding, changing: list[Change], found: Holding) -> None:
    """As a `Backend.delete`'s `looked`: confirms `claim` with `changing` (the changes it records from now on) when
    the delete's look found `kind` at its key."""
    if found == kind:
        await claim.confirm(changing)


class ManagedPut:
    """One file being put into a `lit://` drive (a `drived.drives.PendingPut`), once `writing` its upload."""

    upload: Upload
    _write: Callable[[bytes | memoryview], Awaitable[None]]

    def __init__(self, drives: ManagedDrives, header: PutHeader, max_bytes: int, room: Room | None) -> None:
        self.header = header
        self.path = header.path
        self.offset = header.write_offset
        self.max_bytes = max_bytes
        self.room = room  # the drive's quota room when the put began (None: no quota)
        self._drives = drives

    def writing(self, upload: Upload) -> ManagedPut:
        """Writes `upload` from now on."""
        self.upload = upload
        self._write = upload.write
        return self

    async def write(self, data: bytes | memoryview) -> None:
        try:  # as `_named` does, without a context manager made for every chunk
            await self._write(data)
        except StoredFileError as err:
            raise err.named(self.header.drive.uri, self.header.component, self.path) from None

    def over_limit(self, received: int) -> ResourceExhausted:
        return self._drives.over_limit(self.header, received, self.room)

    async def commit(self, sent: ClientChecksums, received: int) -> Entry:
        return await self._drives.commit_put(self, sent, received)

    async def abort(self) -> None:
        await self.upload.abort()

    async def suspend(self) -> None:
        await self.abort()  # not resumable: nothing is kept


class ResumablePut(ManagedPut):
    """One stream's part of a resumable upload (a header with an `upload_id`, see `drived.uploads`), once
    `taking` it: held when its stream ends before the finish."""

    _resumable: Resumable

    def taking(self, resumable: Resumable) -> ResumablePut:
        """Writes `resumable` from now on (the registry made this put its writer)."""
        self._resumable = resumable
        self.upload = resumable.upload
        self._write = functools.partial(resumable.write, self)
        return self

    async def commit(self, sent: ClientChecksums, received: int) -> Entry:
        return await self._drives.uploads.committed(
            self._resumable, self, functools.partial(ManagedPut.commit, self, sent, received)
        )

    async def abort(self) -> None:
        await self._drives.uploads.abort(self._resumable, self)

    async def suspend(self) -> None:
        await self._drives.uploads.suspend(self._resumable, self)


class ManagedDrives:
    """All `lit://` drives kept in one backend (a `drived.drives.Drives`).

    `uploads` holds its resumable uploads between their streams; `max_file_size` (0: none) bounds each file
    and `quota` (0: none) each drive's bytes (`drived.quota`), resumed files included; `named` names those
    settings as they were given, in refusals.
    """

    def __init__(
        self, backend: Backend, coordinator: Coordinator, uploads: HeldUploads, max_file_size: int = 0, quota: int = 0,
        named: Named = flag,
    ) -> None:
        self.backend = backend
        self.coordinator = coordinator
        self.uploads = uploads
        self.max_file_size = max_file_size or sys.maxsize
        self.named = named
        self.quotas = Quotas(backend, coordinator, quota, named) if quota else None

    @property
    def bytes_on_this_host(self) -> bool:
        return self.backend.on_this_host

    async def components(self, drive: str) -> list[str]:
        """The components that hold something in `drive`, sorted."""
        return sorted(await self.backend.subfolders(drive))

    async def _check_duplicates(self, drive: str, component: str, path: str) -> None:
        """Refuses a path that another component holds as a file or a folder, or that lies below its file.

        A file in one component and a folder of the same path in another would make every later get of
        the path without a component ambiguous, so they are duplicates too.
        """
        others = [other for other in await self.components(drive) if other != component]
        if not others:
            return
        held = await self.backend.first_occupant([component_key(drive, other) for other in others], path)
        if held is None:
            return
        i, held_path, folder = held
        if folder:
            what = f"is a folder of component {others[i]!r}"
        elif held_path == path:
            what = f"is already held by component {others[i]!r}"
        else:
            what = f"is below {held_path!r}, a file of component {others[i]!r}"
        raise AlreadyExists(
            f"{_shown(drive, path)} {what}; pick another path, or open the drive with allow_duplicates=True "
            "(`drive put --allow-duplicates`)"
        )

    async def begin_put(self, put: PutHeader) -> ManagedPut | ResumablePut:
        """Starts the upload of one file; one of unknown or large size is checked for ownership first.

        A header with an `upload_id` makes the upload resumable, and with a
        `write_offset` resumes the one held under that id (`drived.uploads`).

        The check that decides is the one at commit; this one only spares
        the upload of bytes that would be refused, which for a small file
        costs less than the check.
        """
        drive = put.drive.name
        max_bytes = self.max_file_size
        if put.size is not None and put.size > max_bytes:
            raise self.over_limit(put, put.size, None)
        room = None
        if self.quotas is not None:
            # Read once: the refusals below and the stream's say the same.
            room = await self.quotas.room(drive, await self._own_size(put))
            max_bytes = min(max_bytes, room.bytes)
            if put.size is not None and put.size > max_bytes:
                raise self.over_limit(put, put.size, room)
        if not put.allow_duplicates and (put.size is None or put.size > EARLY_CHECK_MIN_SIZE):
            await self._check_duplicates(drive, put.component, put.path)
        if put.write_offset > max_bytes:  # the bytes held already pass a limit
            raise self.over_limit(put, put.write_offset, room)
        if put.write_offset:
            resumed = ResumablePut(self, put, max_bytes, room)
            return resumed.taking(await self.uploads.resume(put, resumed))
        with _named(drive, put.component, put.path):
            try:
                upload = await self.backend.start_upload(object_key(drive, put.component, put.path))
            except Misplaced:
                if not put.allow_duplicates:  # refused as a duplicate first, as the commit refuses it
                    await self._check_duplicates(drive, put.component, put.path)
                raise
        if put.upload_id:
            started = ResumablePut(self, put, max_bytes, room)
            return started.taking(await self.uploads.start(put, upload, started))
        return ManagedPut(self, put, max_bytes, room).writing(upload)

    async def _own_size(self, put: PutHeader) -> int:
        """What the file the caller already holds at the put's path counts in the drive's usage (0 when none): a
        put replacing it needs quota only for the difference."""
        return await self.backend.counted_size(object_key(put.drive.name, put.component, put.path))

    def over_limit(self, put: PutHeader, received: int, room: Room | None) -> ResourceExhausted:
        """The refusal of a put that has (or, by its header, will have) `received` bytes, past its limit; `room`:
        its quota room (None: not known, because the quota is not what it passes)."""
        if received > self.max_file_size:
            return ResourceExhausted(
                f"{_shown(put.drive.name, put.path)} has more than {self.max_file_size:,} bytes, the largest file "
                f"this drived stores ({self.named('max_file_size')}): nothing was stored"
            )
        assert room is not None  # the other limit
        return room.refusal(received)

    async def query_upload(self, query: QueryWriteStatusRequest) -> tuple[int, Entry | None]:
        return await self.uploads.status((query.drive.name, query.component, query.upload_id), query.path)

    async def commit_put(self, put: ManagedPut, sent: ClientChecksums, received: int) -> Entry:
        """Verifies and commits a put: ownership and the quota are checked again inside the path's claim (and
        the backend's commit checks the folders there, and the coordinator holds the quota's room), so that the
        checks and the commit are one step for every daemon sharing the coordinator. The backend's commit confirms the
        claim right before the object becomes visible, after the work it does on the store (which may take
        seconds): a put whose claim lapsed meanwhile (the coordinator out of reach for longer than its expiry,
        or the claim lost with its data) fails UNAVAILABLE and stores nothing, since another put of the path
        may have committed. Runs to its end when its caller is cancelled: every byte is in, and what it stores
        is published. A put that fails ends its upload here, whatever failed (its claim that could not be taken
        too): nothing else ends a store's upload, or gives back the memory and descriptor it holds."""
        try:
            return await _to_its_end(self._commit_put(put, sent, received))
        except BaseException:
            await put.abort()
            raise

    async def _commit_put(self, put: ManagedPut, sent: ClientChecksums, received: int) -> Entry:
        header, drive = put.header, put.header.drive.name
        unsynced: Exception | None = None
        async with self.coordinator.claim(drive, header.path) as claim:
            await self._settle_left(claim, drive)
            # The duplicate check runs beside the commit's own checks of the place (`Upload.commit`): on a store,
            # their round trips at once. With a quota it runs beside the read of the caller's own file instead, and
            # ends before the put holds room: a put it refuses holds none that another put of the drive needs. Its
            # refusal is the put's, whatever else failed, as when it ran first.
            duplicates = None if header.allow_duplicates else asyncio.ensure_future(
                self._check_duplicates(drive, header.component, header.path))
            try:
                # Read again inside the claim: the file may have been replaced since the put began. The commit
                # replaces the version read here (`Upload.replacing`).
                added = received - await put.upload.replacing() if self.quotas else 0
                if self.quotas and duplicates is not None:
                    await duplicates
                async with self._holding(drive, object_key(drive, header.component, header.path), added):
                    with _named(drive, header.component, header.path):
                        changing = [Change("put", header.path, header.component,
                                           version_of(sent.sha256, sent.crc32c))]
                        confirm = functools.partial(claim.confirm, changing)
                        try:
                            info = await put.upload.commit(sent, header.size, confirm, duplicates)
                        except NotDurable as visible:  # counted and reported as the others see it, then answered
                            info, unsynced = visible.info, visible.error
            except BaseException:
                if duplicates is not None:
                    await duplicates
                raise
            entry = _entry(header.path, header.component, info)
            # A put that failed answers no query as complete, as this daemon's own memory of completions does not.
            await self.coordinator.publish(drive, "put", entry, claim, upload="" if unsynced else header.upload_id)
        if unsynced:
            raise unsynced
        return entry

    def _holding(self, drive: str, key: str, added: int) -> AbstractAsyncContextManager[None]:
        """The drive's quota room for a commit of the file at `key` that adds `added` bytes (nothing to hold without
        a quota)."""
        return self.quotas.adding(drive, key, added) if self.quotas else contextlib.nullcontext()

    async def _file_info(self, drive: str, component: str, path: str) -> ObjectInfo | None:
        """The stored file's info (None when there is none)."""
        with _named(drive, component, path):
            return await self.backend.stat(object_key(drive, component, path))

    async def _may_hold(self, drive: str, components: list[str], path: str) -> list[tuple[str, Holder]]:
        """Those of `components` that may hold `path`, each with what was seen there: all of a few (nothing seen),
        those `Backend.holders` names of many (a drive may have thousands)."""
        if len(components) <= FEW_COMPONENTS:
            return [(c, Holder(i)) for i, c in enumerate(components)]
        held = await self.backend.holders([component_key(drive, c) for c in components], path)
        return [(components[h.index], h) for h in held]

    async def _locate(self, drive: str, path: str, component: str) -> list[tuple[str, ObjectInfo | None]]:
        """Which components hold `path`: (component, file info), or (component, None) for a folder; of many, looked
        in ROOTS_AT_ONCE at a time."""
        if not path:  # the top, which every component the drive's listing finds holds
            if component:
                return [(component, None)] if await self.backend.is_folder(component_key(drive, component)) else []
            return [(c, None) for c in await self.components(drive)]
        components = [component] if component else await self.components(drive)
        holders = await self._may_hold(drive, components, path)
        return [held async for _, held in each_root(holders, lambda holder: self._held(drive, path, *holder)) if held]

    async def _held(self, drive: str, path: str, component: str, seen: Holder) -> tuple[str, ObjectInfo | None] | None:
        """What `component` holds at `path`: (it, the file's info), (it, None) for a folder, or None; what
        `Backend.holders` saw (a folder, no object at the path) is not asked of the store again (a file is: its info,
        and whether drived wrote it, are in its metadata, which the look did not read)."""
        if seen.folder:
            return component, None
        info = await self._file_info(drive, component, path) if seen.file else None
        if info:
            return component, info
        return (component, None) if await self.backend.is_folder(object_key(drive, component, path)) else None

    async def _locate_or_wait(
        self, drive: str, path: str, component: str, wait_seconds: float
    ) -> list[tuple[str, ObjectInfo | None]]:
        """Like `_locate`, but waits up to `wait_seconds` for a put to commit the path.

        Once it has looked, it looks again only when the drive's feed has a put
        that may have made the path: any other change of the drive wakes it too,
        and would otherwise cost every waiting get a look in the store (on S3,
        requests for each component).
        """
        self.coordinator.check_open()
        owner = f" of component {component!r}" if component else ""
        if wait_seconds <= 0:
            hits = await self._locate(drive, path, component)
            if not hits:
                raise NotFound(f"{_shown(drive, path)}{owner} does not exist")
            return hits
        deadline = time.monotonic() + wait_seconds
        async with self.coordinator.changes(drive) as changes:  # followed for the whole wait
            seen: int | None = None  # the drive's latest sequence when it last looked
            while True:
                try:
                    latest = await changes.latest()  # taken before looking: a put after it ends the wait
                    look = seen is None or await self._put_of(drive, path, component, seen, latest)
                except Unavailable:  # only the wait needs the coordinator: a stored file is answered without it
                    if hits := await self._locate(drive, path, component):
                        return hits
                    raise
                if look and (hits := await self._locate(drive, path, component)):
                    return hits
                seen = latest
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"{_shown(drive, path)}{owner} did not appear within {wait_seconds:g} s")
                await changes.wait(seen, remaining)

    async def _put_of(self, drive: str, path: str, component: str, after: int, until: int) -> bool:
        """Whether the drive's events after sequence `after`, up to `until`, hold a put that may have made `path`
        (of `component`, when named): of the path, or of a file below it. True when they are no longer kept."""
        below = f"{path}/" if path else ""
        while after < until:
            try:
                events = await self.coordinator.since(drive, after)
            except EventsExpired:
                return True
            if not events:  # none kept after all: look rather than miss one
                return True
            for event in events:
                made = event.entry
                if (event.kind == "put" and (not component or made.component == component)
                        and (made.path == path or made.path.startswith(below))):
                    return True
            after = events[-1].sequence
        return False

    @staticmethod
    def _ambiguous(drive: str, path: str, components: list[str]) -> AmbiguousPathError:
        names = ", ".join(repr(c) for c in sorted(set(components)))
        return AmbiguousPathError(
            f"{_shown(drive, path)} is held by several components ({names}): pass component_name (`drive get` or "
            "`drive stat` with `--only`) to choose one"
        )

    async def stat(self, stat: StatRequest) -> Entry:
        drive, path = stat.drive.name, stat.path
        hits = await self._locate_or_wait(drive, path, stat.component, 0)
        files = [(c, info) for c, info in hits if info is not None]
        if not files:
            owner = hits[0][0] if len(hits) == 1 else ""
            return Entry(path=path, component=owner, folder=True)
        if len(hits) > 1:
            raise self._ambiguous(drive, path, [c for c, _ in hits])
        return _entry(path, *files[0])

    async def open_files(self, get: GetRequest) -> AsyncIterator[FileStream]:
        """The file at the path, or every file under the folder, each with its chunks."""
        drive, path = get.drive.name, get.path
        hits = await self._locate_or_wait(drive, path, get.component, get.wait_seconds)
        owner, found = hits[0]
        if len(hits) == 1 and found is not None:
            get.check_version(found.sha256, "sha256")  # first: a pinned read of a file since shortened is stale
            get.check_range(found.size)
            with _named(drive, owner, path):  # the file may have changed since it was found
                try:
                    info, chunks = await self.backend.read(object_key(drive, owner, path), get.offset, get.limit)
                except EndsBefore as err:  # past the end of a version other than the one pinned: that read is stale
                    get.check_version(err.sha256, "sha256")
                    raise
            try:
                get.check_version(info.sha256, "sha256")
            except StaleIndexError:
                await chunks.aclose()
                raise
            yield _entry(path, owner, info), chunks
            return
        if any(info is not None for _, info in hits):
            raise self._ambiguous(drive, path, [c for c, _ in hits])
        get.check_folder()
        holders = [c for c, _ in hits]
        if len(holders) > 1:  # a clash is refused before any file is sent
            async for _ in self._files_under(drive, path, holders):
                pass
        async for owner, file_path in self._files_under(drive, path, holders):
            try:
                with _named(drive, owner, file_path):
                    info, chunks = await self.backend.read(object_key(drive, owner, file_path))
            except NotFound:
                continue  # deleted since it was listed
            yield _entry(file_path, owner, info), chunks

    async def _files_under(self, drive: str, path: str, components: list[str]) -> AsyncIterator[tuple[str, str]]:
        """(component, path) of every file under a folder, in path order; AmbiguousPathError on a clash (a file of
        several components, or one's file where another has a folder), once the walk reaches it. Read `GET_PAGE`
        files at a time (`_merged`): a get of a folder of millions of files holds some pages of their names while
        it sends them, not all."""
        # Files that files after them may lie below: those below "f" come between "f/" and "f0" ('0' follows '/').
        above: list[tuple[str, str]] = []  # (file path, its component)
        async with contextlib.aclosing(self._merged(drive, components, path, True, "", GET_PAGE)) as merged:
            async for file_path, holders in merged:
                if len(holders) > 1:
                    raise self._ambiguous(drive, file_path, [c for c, _ in holders])
                above = [(f, c) for f, c in above if file_path < f"{f}0"]
                for f, c in above:
                    if file_path.startswith(f"{f}/"):
                        raise self._ambiguous(drive, f, [c, holders[0][0]])
                above.append((file_path, holders[0][0]))
                yield holders[0][0], file_path

    async def _merged(self, drive: str, components: list[str], path: str, recursive: bool, start_after: str,
                      limit: int, fileless: frozenset[str] = frozenset()
                      ) -> AsyncGenerator[tuple[str, list[tuple[str, Held]]], None]:
        """(path, [(component, what it holds there)] in component order) of what `components` hold under `path` (see
        `_names_after`) after `start_after`, in path order; those of `fileless` hold no object at `path` (what
        `Backend.holders` saw).

        Each component's names are read a chunk at a time, when the merge
        needs its next one: a share of `limit` (the names the caller takes at
        most) and one first, then twice as many each time, up to `limit` and
        one. A page of a folder that many components hold costs about the
        page, not `limit` names of each component; the one more tells of a
        component that holds no more than its share (one file each, of more
        components than `limit`) that it ended, without a read that finds
        nothing. The first reads are ROOTS_AT_ONCE at a time.
        """
        if not components:  # a drive nothing was put in
            return
        largest = limit + 1
        sizes = [-(-limit // len(components)) + 1] * len(components)  # each component's next read
        chunks: list[list[tuple[str, Held]]] = [[] for _ in components]
        read = [0] * len(components)  # how much of each chunk went into `heap`
        ended = [False] * len(components)  # whether a component's last read was not full: nothing follows
        heap: list[tuple[str, int, Held]] = []  # each component's next name: (path, its index, what it holds there)

        async def read_chunk(i: int, after: str) -> None:
            """Reads component `i`'s next chunk of names, those after `after`."""
            chunks[i] = list(await self._names_after(drive, components[i], path, recursive, after, sizes[i],
                                                     components[i] not in fileless))
            read[i] = 0
            ended[i] = len(chunks[i]) < sizes[i]
            sizes[i] = min(2 * sizes[i], largest)

        def take(i: int) -> None:
            """Puts component `i`'s next name of its chunk in `heap`, when the chunk has one."""
            if read[i] < len(chunks[i]):
                name, held = chunks[i][read[i]]
                read[i] += 1
                heapq.heappush(heap, (name, i, held))

        async def advance(i: int, after: str) -> None:
            """Puts component `i`'s next name after `after` in `heap`, reading its next chunk when it needs one."""
            if read[i] == len(chunks[i]) and not ended[i]:
                await read_chunk(i, after)
            take(i)

        async for i, _ in each_root(range(len(components)), lambda i: read_chunk(i, start_after)):
            take(i)
        while heap:
            name, i, held = heapq.heappop(heap)
            holders = [(components[i], held)]
            await advance(i, name)
            while heap and heap[0][0] == name:
                _, j, also = heapq.heappop(heap)
                holders.append((components[j], also))
                await advance(j, name)
            yield name, holders

    async def list_entries(self, listing: ListRequest) -> tuple[list[Entry], bool]:
        """Entries under the path in path order after `start_after`: at most `limit`, and whether more remain.

        Each component's names come sorted from the backend; the page starts
        where bisection finds `start_after` (a recursive page walks the
        folders from there on, and stops after `limit`), is merged across
        components, and only its files are stat'ed (size, sha256). A page of a
        big folder or tree therefore costs the page, once the backend
        remembers the folders. A page of long paths ends where its answer's
        message would be full (its names say how long its entries are), before
        any of its files is stat'ed. A page whose every file went away since its
        folder was read is passed over: a page with more after it has an entry
        to go on from. Of many components, only those that may hold the path
        are read (`FEW_COMPONENTS`).
        """
        drive, path, limit, start_after = listing.drive.name, listing.path, listing.limit, listing.start_after
        components = [listing.component] if listing.component else await self.components(drive)
        fileless: frozenset[str] = frozenset()
        if path:  # every component holds the top
            may_hold = await self._may_hold(drive, components, path)
            components = [c for c, _ in may_hold]
            fileless = frozenset(c for c, seen in may_hold if not seen.file)
        while True:
            page: list[tuple[str, list[tuple[str, Held]]]] = []  # path, (component, what it holds) in component order
            more = False
            size = 0  # the most its entries take in the answer: a page of long paths ends before its message would
            names = self._merged(drive, components, path, listing.recursive, start_after, limit, fileless)
            async with contextlib.aclosing(names) as merged:
                async for name, holders in merged:
                    size += answer_entry_bytes(name, holders[0][0])
                    if len(page) == limit or (page and size > ANSWER_ENTRIES_BYTES):
                        more = True
                        break
                    page.append((name, holders))
            # ROOTS_AT_ONCE at a time: each entry of a file may be a HEAD, a round trip to a store
            listed = [entry async for _, entry in each_root(page, lambda named: self._listed(drive, *named))]
            entries = [entry for entry in listed if entry is not None]
            if entries or not more:
                return entries, more
            start_after = page[-1][0]

    async def _listed(self, drive: str, path: str, holders: list[tuple[str, Held]]) -> Entry | None:
        """A listing's entry: the file or folder of its component; the first one's size when several hold it.

        None when the file went away since its folder was read. Of several, one whose file went away or is not
        drived's (an object something else put in the bucket) holds nothing, as it does for a stat.
        """
        if len(holders) > 1:
            looks = each_root(holders, lambda holder: self._still_held(drive, path, *holder))
            holders = [holder async for _, holder in looks if holder is not None]
            if not holders:
                return None
        owner, held = holders[0]
        shared = len(holders) > 1
        if held is True:
            return Entry(path=path, component="" if shared else owner, folder=True)
        try:
            info = held if isinstance(held, ObjectInfo) else await self.backend.stat(object_key(drive, owner, path))
        except Damaged:  # listed with what is known of it; a stat or get of it says what is wrong
            return Entry(path=path, component="" if shared else owner)
        if info is None:
            return None
        return Entry(path=path, size=info.size, mtime_ns=info.generation) if shared else _entry(path, owner, info)

    async def _still_held(self, drive: str, path: str, component: str, held: Held) -> tuple[str, Held] | None:
        """(`component`, what it holds at `path`: its file's info once looked at), or None for a file that went away
        or that drived did not write."""
        if held is not False:
            return component, held
        try:
            info = await self.backend.stat(object_key(drive, component, path))
        except Damaged:  # listed with what is known of it, as a lone holder's is
            return component, held
        return (component, info) if info else None

    async def _names_after(
        self, drive: str, component: str, path: str, recursive: bool, start_after: str, limit: int, file: bool = True
    ) -> Iterator[tuple[str, Held]]:
        """(path, what it is) of what one component holds under `path` after `start_after`, in path order.

        The file itself, with its info, when `path` is one; not looked for when `file` is False (the component was
        seen holding no object there). Recursive: at most `limit` of them.
        """
        key = object_key(drive, component, path)
        ckey = component_key(drive, component)
        if recursive:
            keys = await self.backend.walk(key, f"{ckey}/{start_after}", limit)  # each "<component key>/<path>"
            base = len(ckey) + 1
            names: Iterator[tuple[str, Held]] = ((k[base:], False) for k in keys)
            if keys:
                return names
        else:
            listing = await self.backend.list_folder(key, f"{ckey}/{start_after}", limit)
            prefix = f"{path}/" if path else ""
            names = ((prefix + n, n in listing.folders) for n in listing.names)
            if listing.names:
                return names
        if file and path and path > start_after and (info := await self._file_info(drive, component, path)):
            return iter([(path, info)])
        return iter(())

    async def delete(self, delete: DeleteRequest) -> int:
        """Removes the caller's file, or every file of its under a folder, with the objects drived did not write there;
        the count of its files removed (1 where it removed such objects alone).

        Inside the path's claim (which excludes the puts of the path and of
        every path below it), so that what a file's size takes from the
        quota is the size of the version deleted, two deletes of one file
        count it once, and the feed orders a delete and the puts of its path
        as they happened.
        """
        drive, path, component = delete.drive.name, delete.path, delete.component
        key = object_key(drive, component, path)
        deleted = 0
        async with self.coordinator.claim(drive, path) as claim:
            await self._settle_left(claim, drive)
            # Recorded only when the store's look finds a file there, before its removal: a record left by a holder
            # that died is settled as the delete of a file once the path holds none, and a folder's files (or
            # nothing) are no file at the path.
            record = functools.partial(_confirm_if, claim, "file", [
                Change("delete", path, component, request=delete.request_id)])
            removed = await self._delete(claim, delete, key, path, record if self.coordinator.records_changes else None)
            if removed is not None and removed.file:
                return 1
            foreign = removed is not None  # whether it removed objects drived did not write (no read showed them)
            # Walked DELETE_PAGE files at a time, in path order, each page deleted before the next is read: a folder
            # of millions of files holds a page of their names, not all of them. No put adds a file below the path
            # meanwhile (the claim excludes them). Also below an object drived did not write (removed above, as the
            # README says): reads show the path as the folder of those files.
            after = ""
            while keys := await self.backend.walk(key, after, DELETE_PAGE):
                after = keys[-1]
                for below in await self._delete_files(claim, delete, keys):
                    deleted += below.file
                    foreign = foreign or not below.file
        if deleted:
            return deleted  # the files alone: the count a retry whose answer was lost finds in the request's deletes
        if foreign:
            return 1  # objects drived did not write alone, at the path or below: the caller named them, answered as one
        # Once the claim ended: nothing changed. A retry after an attempt whose answer was lost finds what that attempt
        # removed in its request's record; only a retry that found nothing pays for the look.
        if delete.retry:
            earlier = await self.coordinator.deleted_by(drive, delete.request_id, component, path)
            if earlier:
                return earlier
        raise (NothingDeleted if delete.retry else NotFound)(
            f"component {component!r} owns nothing at {_shown(drive, path)}; "
            "a file can only be deleted by the component that put it"
        )

    async def _delete_files(self, claim: Claim, delete: DeleteRequest, keys: list[str]) -> list[Removed]:
        """Deletes the caller's files at `keys` in turn, as a folder delete does, and the objects drived did not write
        among them; what it removed."""
        drive, component = delete.drive.name, delete.component
        removals: list[Removed] = []
        # A big folder's walk and deletes, or a slow store's, may outlast an unrenewed claim: it is confirmed
        # before each DELETE_BATCH files (which it records as its changes), and again before the next file once
        # a third of its TTL went by since.
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [(key, relative_path(key, drive, component)) for key in keys[start:start + DELETE_BATCH]]
            changing = [Change("delete", file, component, request=delete.request_id) for _, file in batch]
            await claim.confirm(changing)
            confirmed_at = time.monotonic()
            begun = 0  # files of the batch whose delete began: the others are untouched when it stops
            try:
                for key, file in batch:
                    if time.monotonic() - confirmed_at >= self.coordinator.claim_ttl / 3:
                        await claim.confirm()
                        confirmed_at = time.monotonic()
                    begun += 1
                    # The record of an object drived did not write is dropped before its removal (a confirm with the
                    # files after it: those before were published): a holder dying after would leave it to be
                    # settled as the delete of a file no read showed. Costs a round trip only for such an object.
                    unrecord = functools.partial(_confirm_if, claim, "foreign", changing[begun:])
                    looked = unrecord if self.coordinator.records_changes else None
                    if (removed := await self._delete(claim, delete, key, file, looked)) is not None:
                        removals.append(removed)
            except BaseException:  # a cancel, a lapsed claim, the store: what was not begun was not made
                claim.unmade([Change("delete", file, component) for _, file in batch[begun:]])
                raise
        return removals

    async def _delete(self, claim: Claim, delete: DeleteRequest, key: str, path: str,
                      looked: Callable[[Holding], Awaitable[None]] | None) -> Removed | None:
        """Deletes the file at `key` (`path` of the caller's) and announces it at once, tagged with the request's id
        (a walk that stops midway has announced every file it removed); with a quota, what it counted (read by the
        delete itself) leaves the drive's usage. An object drived did not write is removed unannounced: no read showed
        it, nor does a retry's look at the request's deletes count it. Runs to its end when its caller is cancelled (a
        folder delete stops after it). `looked`: as `Backend.delete`'s."""
        return await _to_its_end(self._delete_file(claim, delete, key, path, looked))

    async def _delete_file(self, claim: Claim, delete: DeleteRequest, key: str, path: str,
                           looked: Callable[[Holding], Awaitable[None]] | None) -> Removed | None:
        removed = await self.backend.delete(key, looked)
        if removed is None:
            return None
        drive = delete.drive.name
        if self.quotas:
            await self.quotas.deleted(drive, key, removed.size)
        if removed.file:
            await self.coordinator.publish(drive, "delete", Entry(path=path, component=delete.component), claim,
                                           request=delete.request_id)
        return removed

    async def settle_unpublished(self) -> None:
        """Publishes the changes whose claims ended before their events were (`Coordinator.unpublished`: their
        daemon died, or lost the coordinator, between the store's change and the publish), each as the store has
        its path now, inside a claim on the path; looks every half claim TTL on average, until cancelled. The
        periods are drawn at random (a quarter to three quarters of the TTL): the first replica to look at a drive
        takes its changes for a TTL, and replicas on fixed periods would leave them to the same one every time,
        also when that one cannot settle them."""
        if not self.coordinator.records_changes:  # none to settle
            return
        while True:
            await asyncio.sleep(self.coordinator.claim_ttl * random.uniform(0.25, 0.75))
            try:
                found = await self.coordinator.unpublished()
            except Exception as err:  # the coordinator away, or an answer not understood: looked for again later
                log.warning("looking for unpublished changes failed", extra={"fields": {
                    "error": f"{type(err).__name__}: {err}"}})
                continue
            for unpublished in found:
                try:
                    # Within a TTL: a claim in the way (a long folder delete above) holds up only this change, which
                    # a replica takes again a TTL later.
                    async with asyncio.timeout(self.coordinator.claim_ttl):
                        await self._settle(unpublished)
                except Exception as err:  # whatever one change raises, the others are settled
                    log.warning("an unpublished change could not be settled; tried again after --claim-ttl",
                                extra={"fields": {"drive": unpublished.drive, "path": unpublished.change.path,
                                                  "error": f"{type(err).__name__}: {err}"}})

    async def _settle(self, unpublished: Unpublished) -> None:
        drive, change = unpublished.drive, unpublished.change
        async with self.coordinator.claim(drive, change.path):
            stored = await self._stored_at(drive, change)
            await self.coordinator.settle(unpublished, stored)
        log.info("settled a change whose daemon did not publish it", extra={"fields": {
            "drive": drive, "path": change.path, "component": change.component, "kind": change.kind,
            "stored": stored is not None}})

    async def _settle_left(self, claim: Claim, drive: str) -> None:
        """Publishes, inside `claim` and before its own change, the changes at, above or below its path that holders
        who died left unpublished (`Claim.unsettled`): the replicas' look for them comes up to a TTL later, after
        this change, which would be reported first, or make a put it deletes or replaces never reported."""
        for unpublished in claim.unsettled:
            await self.coordinator.settle(unpublished, await self._stored_at(drive, unpublished.change))

    async def _stored_at(self, drive: str, change: Change) -> Entry | None:
        """What the store holds at the path of `change`, as `Coordinator.settle` is told it."""
        try:
            info = await self._file_info(drive, change.component, change.path)
        except Damaged as err:
            # A file is there (no delete was made) whose version cannot be told (no put is reported): settled as a
            # change not made, rather than looked at again every TTL while the file stays damaged.
            log.warning("an unpublished change of a damaged file is not reported", extra={"fields": {
                "drive": drive, "path": change.path, "component": change.component, "error": str(err)}})
            return Entry(path=change.path, component=change.component) if change.kind == "delete" else None
        if info and change.kind == "put" and not _is_version(info, change.version):
            return None  # a put whose version never became visible (its replica died, or the store failed, first)
        if info is None and change.kind == "delete" and await self.backend.holding(
                object_key(drive, change.component, change.path)) == "foreign":
            # Recorded with the folder's files before any was looked at, by a holder that died before it reached this
            # object: its removal was not made (a watch hears of no such object's removal in any case).
            return Entry(path=change.path, component=change.component)
        return _entry(change.path, change.component, info) if info else None

    async def mount(self, mount: MountRequest) -> tuple[int, float]:
        raise InvalidArgument(f"{mount.drive.uri} is a lit:// drive: only s3:// drives are mounted")

    async def watch(self, watch: WatchRequest) -> tuple[int, AsyncIterator[Event | int]]:
        last = await self.coordinator.last(watch.drive.name)
        if watch.after_sequence > last:
            # `last` is at least every sequence the drive gave: nothing would ever follow this point.
            raise EventsExpired(
                f"{watch.drive.uri} has no event {watch.after_sequence}: its latest is {last}. Resume from a "
                "sequence this drive's watch reported, or list the drive, then watch from now (after_sequence 0)"
            )
        start = watch.after_sequence or last
        return start, self._watched(watch, start)

    async def _watched(self, watch: WatchRequest, after: int) -> AsyncIterator[Event | int]:
        """The events the watch reports; after a read of the feed whose last event it does not report, that event's
        sequence: a watch of one folder on a drive busy elsewhere learns how far it read, so that it resumes from
        there after a cut, not from its last report, which the feed may have dropped since."""
        async for events in self.coordinator.follow(watch.drive.name, after):
            for event in events:
                if watch.reports(event.entry.path, event.entry.component):
                    yield event
            last = events[-1]
            if not watch.reports(last.entry.path, last.entry.component):
                yield last.sequence
