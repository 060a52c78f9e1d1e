"""LocalBackend: objects as files in a data directory (the embedded default).

Layout: `DATA_DIR/objects/<key>` holds each object (its format is in
`stored.py`), `DATA_DIR/tmp/` the uploads in progress. An upload is written
to `tmp/`, fsynced, and renamed over its key in one step; the rename is what
makes it visible. Whatever `tmp/` holds at start-up is the leftover of a
crash and is removed; a `tmp/` removed while the daemon serves is made again
by the next upload (`LocalBackend.made_tmp_again`). The data dir and `DATA_DIR/lock` are locked by the one daemon that
uses the data dir and its commit worker, for their whole lives
(`lock_data_dir`).
`DATA_DIR/clean-stop` exists while no daemon runs after a clean stop: no
empty folder was left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import shutil
import stat
import sys
import threading
from array import array
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from drive_client.errors import DriveError, InvalidArgument, ResourceExhausted, Unavailable
from drive_client.files import write_all

from ..checksums import BLOCK_SIZE, Checksums, ClientChecksums, range_crc32c
from ..descriptors import Descriptors
from .base import (
    Backend,
    BeforeVisible,
    ChangedWhileRead,
    Chunks,
    Damaged,
    EndsBefore,
    Holder,
    Holding,
    Listing,
    Missing,
    NotDurable,
    ObjectInfo,
    Removed,
    Upload,
    check_received,
    check_size,
    checksum_mismatch,
    is_a_folder,
    names_from,
    parent_is_file,
    position_after,
)
from .commit_worker import CommitWorker, Job, Outcome
from .file_systems import can_hang, file_system
from .folder_cache import FolderCache
from .stored import (
    HEADER_SIZE,
    BlockEnds,
    DamagedHeader,
    Layout,
    LegacyTables,
    Version,
    check_blocks,
    content_size,
    fsync_folder,
    header,
    legacy_block_ends,
    make_durable,
    parse_header,
    place,
    version_of,
)

FLUSH_BYTES = 1 << 20  # an upload buffers small chunks up to this before a disk write
WRITE_BACK_BYTES = 8 << 20  # a big upload has the disk write each this many bytes while more arrive
INLINE_ROOTS = 64  # components a put or stat looks in on the event loop of a local disk; more, in a worker thread
USAGE_PAGE = 1000  # files a count of a drive's bytes reads in one go in a worker thread, between two `passed`
_WRITE_BACK = getattr(os, "POSIX_FADV_DONTNEED", None)
_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux: a read that fails rather than wait for the disk

log = logging.getLogger("drived")
T = TypeVar("T")


class DataDirError(Exception):
    """A data dir the daemon cannot use; the message says why, after the data dir's setting that names it."""


def lock_data_dir(data_dir: str) -> tuple[int, int]:
    """Descriptors holding the locks of `data_dir`, which they keep while open (the kernel drops the locks of a
    process that dies, however it dies); DataDirError when another daemon holds them.

    A second daemon on a data dir in use would remove the first one's uploads
    from `tmp/` at its start-up and then write its own under the same names.
    The locks are on the open files, which the commit worker inherits
    (`CommitWorker`): they stay held until the daemon and its worker have
    both ended. Two locks: the data dir's own, which stays held whatever
    becomes of the files in it (an operator who takes `lock` for a stale
    lock file and removes it lets a second daemon lock a new one), and that
    of `lock`, the one that daemons of earlier versions take.
    """
    folder = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        file = os.open(os.path.join(data_dir, "lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except BaseException:
        os.close(folder)
        raise
    try:
        for fd in (folder, file):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(folder)
        os.close(file)
        raise DataDirError(
            f"in use by another drived (it holds the lock of {data_dir}): give each daemon its own data dir; daemons "
            "that serve the same drives share them through --storage. If a drived on it has just ended, its commit "
            "worker may still hold the lock until its last change to the data dir is done: retry in a moment"
        ) from None
    except OSError as err:  # a file system without locks (a network mount without its lock service): unguarded
        log.warning("the data dir cannot be locked: a second daemon started on it would not be refused",
                    extra={"fields": {"data_dir": data_dir, "error": str(err)}})
    return folder, file


def _taken(marker: str, tmp_dir: str) -> bool:
    """Whether `marker` was there and names `tmp_dir` as it is; the mark is removed, durably: a daemon killed from
    now on leaves no mark."""
    try:
        with open(marker, "rb") as file:
            named = file.read()
    except FileNotFoundError:
        return False
    os.unlink(marker)
    fsync_folder(os.path.dirname(marker))
    try:
        return named == _identity(tmp_dir).encode()
    except FileNotFoundError:
        return False


def _mark(marker: str, tmp_dir: str) -> None:
    """Makes `marker`, durably, naming `tmp_dir` as the stop leaves it."""
    with open(marker, "w") as file:
        file.write(_identity(tmp_dir))
    fsync_folder(os.path.dirname(marker))


def _identity(tmp_dir: str) -> str:
    """What tells `tmp_dir` from the one every start makes anew: a daemon of a version that neither takes nor
    leaves the clean-stop mark, run and killed after a clean stop, leaves a mark that no longer names tmp/."""
    info = os.stat(tmp_dir)
    return f"{info.st_ino} {info.st_ctime_ns}\n"


def _holds(path: str, folder: str) -> bool:
    """Whether `path` is below `folder`."""
    return path.startswith(f"{folder}/")


def _folders_bottom_up(top: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, the names of its entries that are no folders) for `top` and every folder below it, each after the
    folders below it; links are not followed, and a folder that cannot be read is passed over.

    As os.walk(top, topdown=False), without its recursion (once a level before
    Python 3.12): a path may be some 2,000 folders deep, past Python's
    recursion limit.
    """
    levels: list[tuple[str, list[str], list[str]]] = []  # a folder, its files, its sub-folders not walked yet

    def enter(folder: str) -> None:
        files: list[str] = []
        subfolders: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    (subfolders if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
        except OSError:
            return
        levels.append((folder, files, subfolders))

    enter(top)
    while levels:
        folder, files, subfolders = levels[-1]
        if subfolders:
            enter(f"{folder}/{subfolders.pop()}")
        else:
            levels.pop()
            yield folder, files


def _read_cached(fd: int, size: int, offset: int) -> memoryview | None:
    """`size` bytes at `offset` if all are in the page cache (never waits for the disk); else None."""
    if _NOWAIT is None:
        return None
    buffer = bytearray(size)
    try:
        read = os.preadv(fd, [buffer], offset, _NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a file system without RWF_NOWAIT
        return None
    return memoryview(buffer) if read == size else None


def _disk_error(err: Exception, what: str) -> Exception:
    """What a put answers when its use of the data dir failed with `err` (as `LocalBackend.unusable` left it)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"the data dir is full while {what}: free space and retry")
    return err


def _commit_error(err: Exception, key: str) -> Exception:
    """What a put of `key` answers when its commit failed with `err` (as `LocalBackend.unusable` left it: a file
    in the way of tmp/ is not one in the way of `key`)."""
    if isinstance(err, OSError) and err.errno == errno.ENOTDIR:
        return parent_is_file(key)
    if isinstance(err, OSError) and err.errno == errno.EISDIR:
        return is_a_folder(key)
    return _disk_error(err, "committing an upload")


def _check_whole(key: str, layout: Layout, version: Version, fd: int, stopping: threading.Event) -> array[int] | None:
    """Runs in a `LegacyTables` builder thread: the block table of `version` of the format 1 file at `key`, or
    None when its bytes do not match its sha256 (`legacy_block_ends`), read through `fd`, a descriptor of
    that version (a dup of a waiting read's); given up (Stopped) once `stopping` is set.

    A put that replaced the file, or a delete, unlinks that version and
    leaves its bytes as they were: they are checked. ChangedWhileRead
    (a StaleIndexError) when it is still linked but another version by now
    (changed in place): the reads of `version` are told to read the file
    again. Logged: it reads the whole file, however little of it was asked
    for.
    """
    st = os.fstat(fd)
    if st.st_nlink and version_of(st) != version:  # unlinking changes the ctime too, not the bytes
        raise ChangedWhileRead(key, "changed on disk")
    log.info("checking a file of the old format whole", extra={"fields": {"key": key, "bytes": layout.size}})
    return legacy_block_ends(fd, layout, layout.block_size, stopping)


class FileChunks:
    """The bytes [start, end) of one open stored file, each block checked before any of it is yielded.

    Reads whole blocks (those that [start, end) touches), verifies each
    against the file's block table (`stored.check_blocks`), and yields the
    part of them inside the range; a block that does not match raises
    `Damaged` instead. `crc32c` comes from the table and the CRC32Cs at the
    range's two ends, with no second pass over the bytes.

    A cached block is copied in about the time a thread hop takes, so it is
    read on the event loop with RWF_NOWAIT, which never waits for the disk; a
    block that needs the disk is read by a worker thread. The file closes at
    the end, on `aclose`, or when collected, and its descriptor goes back to
    the backend's `descriptors`. A file of format 1 has its sha256 checked
    and its table built once, by its first read, in a worker thread; reads
    that come meanwhile wait for that one (`LegacyTables`). That check reads
    through a dup of a waiting read's descriptor (`_check_whole`):
    it checks the version the reads opened, even if a put has replaced the
    file since, and a read that goes away closes its file at once, whoever
    else waits for the check.
    """

    def __init__(self, backend: LocalBackend, fd: int, key: str, layout: Layout, version: Version,
                 start: int, end: int) -> None:
        self._backend = backend
        self._descriptors = backend.descriptors
        self._fd = fd
        self._key = key
        self._layout = layout
        self._version = version
        self._start = self._position = start
        self._end = end
        self._ends: BlockEnds | None = None
        self._block_size = layout.block_size or BLOCK_SIZE
        self._blocks_per_read = max(1, backend.chunk_size // self._block_size)
        self._before = self._through = 0  # CRC32C of the content before `start`, and up to `position`
        self._reading: asyncio.Future[Any] | None = None

    def __aiter__(self) -> FileChunks:
        return self

    @property
    def crc32c(self) -> int:
        return range_crc32c(self._before, self._through, self._position - self._start)

    async def _block_ends(self) -> BlockEnds:
        if self._layout.version >= 2:
            return BlockEnds(self._fd, self._layout)
        layout = self._layout._replace(block_size=self._block_size)
        build = functools.partial(_check_whole, self._key, layout, self._version)
        ends = await self._backend.legacy_tables.table(self._version, self._fd, build)
        if ends is None:
            raise Damaged(self._key, "its bytes do not match its sha256")
        return BlockEnds(self._fd, layout, ends)

    async def _read(self, size: int, offset: int) -> bytes | memoryview:
        data: bytes | memoryview | None = _read_cached(self._fd, size, offset)
        if data is None:
            data = await self._in_thread(os.pread, self._fd, size, offset)
        return data

    async def _in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`, a read of the file, in a worker thread; shielded, so that a cancelled caller leaves it
        running and known (`_reading`) until the thread is done with the file, which `_close` closes only then."""
        self._reading = asyncio.get_running_loop().run_in_executor(None, work, *args)
        done = await asyncio.shield(self._reading)
        self._reading = None
        return done

    async def __anext__(self) -> memoryview:
        if self._fd < 0 or self._position >= self._end:
            self._close()
            raise StopAsyncIteration
        try:
            return await self._next_checked()
        except BaseException:
            self._close()
            raise

    async def _next_checked(self) -> memoryview:
        """The next chunk: up to `_blocks_per_read` whole blocks read, checked, and cut to [start, end)."""
        if self._ends is None:
            self._ends = await self._block_ends()
        ends, size, total = self._ends, self._block_size, self._layout.size
        block = self._position // size
        last = min(block + self._blocks_per_read, -(-self._end // size))  # the block after those read
        begin, stop = block * size, min(last * size, total)
        tail = ends.tail_size() if stop == total else 0
        data = memoryview(await self._read(stop - begin + tail, HEADER_SIZE + begin))
        if len(data) != stop - begin + tail:
            raise Damaged(self._key, f"it ends at byte {begin + len(data)} of {total}, before its block table")
        if tail:
            ends.load(data[stop - begin:])
            data = data[:stop - begin]
        try:
            if self._backend.file_calls_in_threads and not ends.holds(block - 1, last - 1):
                # Read here, not by `check_blocks` on the event loop, where a pread of a hung data dir holds every
                # call; on a local disk `at` reads the entries as it needs them.
                await self._in_thread(ends.read_from, max(block - 1, 0))
            damaged, at_cuts = check_blocks(data, block, size, ends, (self._start, self._end))
        except EOFError:
            raise Damaged(self._key, "its block table is cut short") from None
        if damaged is not None:
            raise Damaged(self._key, f"the block at byte {damaged} of {total} does not match its CRC32C")
        if self._position == self._start:
            self._before = at_cuts[self._start] if self._start % size else ends.at(block - 1)
        through = min(stop, self._end)
        self._through = at_cuts[through] if through in at_cuts else ends.at(last - 1)
        chunk = data[self._position - begin:through - begin]
        self._position = through
        return chunk

    def _close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        if self._reading is not None:  # cancelled mid-read: close once the worker thread is done with it
            self._reading.add_done_callback(lambda _: self._close_fd(fd))
        else:
            self._close_fd(fd)

    def _close_fd(self, fd: int) -> None:
        os.close(fd)
        self._descriptors.give_read()

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        self._close()


class LocalUpload(Upload):
    """An upload into `tmp/`: small chunks are buffered, big ones written in a worker thread.

    A file whose bytes all fit the buffer is verified, written and committed
    by the backend's commit worker process; a bigger one by worker threads:
    one writes and fsyncs it, then (after the commit's `before_visible`, on
    the event loop) another renames it into place.
    """

    def __init__(self, backend: LocalBackend, key: str, path: str) -> None:
        self._backend = backend
        self._key = key
        self._path = path  # where the object goes, checked by LocalBackend._path
        self._tmp_path = f"{backend.tmp_dir}/{next(backend.upload_numbers)}"
        self._fd = -1
        self._created = False  # whether the temporary file exists (it is closed while suspended)
        self._checksums = Checksums()  # of the bytes written so far, by `_flush` in worker threads
        self._size = 0
        self._written = self._written_back = 0  # bytes in the file, and those the disk was told to write
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0
        self._flushing: asyncio.Future[None] | None = None
        self._committing: asyncio.Future[Any] | None = None
        self._counted = False  # a descriptor is counted for the temporary file (Descriptors.take_upload)
        self._discarding: asyncio.Future[None] | None = None  # the discard of the first `abort`

    def _open(self) -> None:
        """Opens the temporary file at its end: created on the first flush, opened again after `suspend`."""
        if self._fd >= 0:
            return
        flags = os.O_WRONLY | os.O_CLOEXEC | (0 if self._created else os.O_CREAT | os.O_EXCL)
        try:
            self._fd = os.open(self._tmp_path, flags, 0o644)
        except FileNotFoundError:
            if self._created or not self._backend.made_tmp_again():  # created: its bytes went with tmp/
                raise
            self._fd = os.open(self._tmp_path, flags, 0o644)
        self._created = True
        os.lseek(self._fd, HEADER_SIZE + self._written, os.SEEK_SET)  # the header is written at the commit

    def _count_descriptor(self) -> None:
        """Counts the temporary file's descriptor before a worker thread opens it (again, after `suspend`):
        here, not in the worker thread, so that a refusal fails this call, at once."""
        if not self._counted:
            self._backend.descriptors.take_upload()
            self._counted = True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._counted:
            self._counted = False
            self._backend.descriptors.give_upload()

    def _flush(self, chunks: list[bytes | memoryview]) -> None:
        """Runs in a worker thread: sums and appends `chunks` to the temporary file."""
        try:
            self._open()
            for chunk in chunks:
                self._checksums.update(chunk)
                write_all(self._fd, chunk)
                self._written += len(chunk)
            if _WRITE_BACK is not None and self._written - self._written_back >= WRITE_BACK_BYTES:
                # Starts the disk writing these bytes now, so that the commit's fsync finds
                # little left to do. DONTNEED writes dirty pages back without waiting and
                # drops only pages already clean, which pages just written rarely are
                # (a 1 GiB put keeps 98 % of itself in the page cache).
                start = HEADER_SIZE + self._written_back
                os.posix_fadvise(self._fd, start, self._written - self._written_back, _WRITE_BACK)
                self._written_back = self._written
        except OSError as err:
            raise _disk_error(self._backend.unusable(err), "writing an upload") from err

    @property
    def held(self) -> int:
        return self._size

    async def intact(self) -> bool:
        return not self._created or await self._backend.off_loop(os.path.exists, self._tmp_path)

    async def write(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            await self._drain()
            self._start_flush()

    def _start_flush(self) -> None:
        """Hands the pending chunks to a worker thread, not awaited: the next chunk is received meanwhile."""
        self._count_descriptor()
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        self._flushing = asyncio.get_running_loop().run_in_executor(None, self._flush, chunks)

    async def _drain(self) -> None:
        """Waits for the write in flight, if any (at most one chunk is ever in flight).

        Shielded, and forgotten only once done: a cancelled caller leaves the
        write running and known, for whoever waits next (`suspend`, `abort`).
        """
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
            self._flushing = None

    async def suspend(self) -> None:
        await self._drain()
        if self._pending:
            self._start_flush()
            await self._drain()
        await self._backend.off_loop(self._close_fd)  # the close of a written file writes it back, and waits

    def _write_big(self, chunks: list[bytes | memoryview], sent: ClientChecksums, size: int | None) -> int:
        """Runs in a worker thread: writes the rest, verifies, writes the block table and the header, and makes the
        file durable; its generation. `_place_big` then makes it visible."""
        self._flush(chunks)
        sums = self._checksums
        check_received(self._key, sums, sent, size)
        try:
            write_all(self._fd, sums.block_table())  # after the content, where `_flush` left off
            os.pwrite(self._fd, header(sums), 0)
            generation = make_durable(self._fd)
        except OSError as err:
            raise _commit_error(self._backend.unusable(err), self._key) from err
        self._close_fd()
        return generation

    def _place_big(self) -> OSError | None:
        """Runs in a worker thread: renames the file `_write_big` made durable into place and fsyncs the folders
        naming it; the error of an fsync that failed (naming its folder), once the file is visible."""
        try:
            folders = place(self._tmp_path, self._path)
        except OSError as err:
            raise _commit_error(self._backend.unusable(err), self._key) from err
        self._tmp_path = ""  # renamed away: nothing left to discard
        for folder in folders:
            try:
                fsync_folder(folder)
            except OSError as err:
                return OSError(err.errno, err.strerror, folder)
        return None

    async def _commit_small(
        self, data: bytes, sent: ClientChecksums, size: int | None, before_visible: BeforeVisible | None
    ) -> ObjectInfo:
        """Has the commit worker sum, verify, write and commit the file, all of whose bytes are `data`.

        The worker does all of that in one step, in a batch with others: `before_visible` is awaited just before
        that batch is sent (`CommitWorker.submit`), however long the job waited in the queue behind others.
        """
        check_size(self._key, self._size, size)
        job = (self._tmp_path, self._path, data, sent)
        outcome = await self._submitted(job, before_visible)
        if outcome[:2] == ("error", errno.ENOENT) and await self._backend.off_loop(self._backend.made_tmp_again):
            outcome = await self._submitted(job, before_visible)
        if outcome[0] == "mismatch":
            raise checksum_mismatch(self._key, outcome[1])
        if outcome[0] == "error":
            error_number, message = outcome[1:]
            if error_number is None:
                raise Unavailable(message)
            failed = await self._backend.off_loop(self._backend.unusable, OSError(error_number, message))
            raise _commit_error(failed, self._key)
        self._tmp_path = ""  # renamed away: nothing left to discard
        _, generation, _, sha256, crc32c = outcome[:5]
        info = ObjectInfo(self._key, self._size, sha256, generation, crc32c)
        if outcome[0] == "unsynced":
            raise self._not_durable(info, OSError(*outcome[5:]))
        return info

    async def _submitted(self, job: Job, before_visible: BeforeVisible | None) -> Outcome:
        """The outcome of `job` committed by the commit worker."""
        self._committing = self._backend.committer.submit(job, before_visible)
        # Shielded: a cancelled put still lets its commit finish before abort() cleans up.
        return await asyncio.shield(self._committing)

    def _not_durable(self, info: ObjectInfo, err: OSError) -> NotDurable:
        """What a put answers whose file is visible but whose folder `err.filename` could not be made durable:
        UNAVAILABLE, which clients retry. A put acknowledged would claim a durability the file may lack; its retry
        renames the same bytes into the folder again and fsyncs it again (the upload is not answered as complete
        meanwhile: `ManagedDrives.commit_put`)."""
        log.error("a committed file's folder could not be made durable: it is visible, and may not survive a "
                  "power cut", extra={"fields": {"key": self._key, "folder": err.filename, "error": err.strerror}})
        return NotDurable(info, Unavailable(
            f"{self._backend.named}: the put's file is in place, but the fsync of its folder {err.filename} failed "
            f"([Errno {err.errno}] {err.strerror}), so it may not survive a power cut: retry the put (a put of the "
            "same bytes is idempotent); if this recurs, the daemon's disk is failing"))

    async def _in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` in a worker thread; shielded: a cancelled put still lets it finish before abort() cleans
        up."""
        running = asyncio.get_running_loop().run_in_executor(None, work, *args)
        self._committing = running
        return await asyncio.shield(running)

    async def replacing(self) -> int:
        return await self._backend.counted_size(self._key)

    async def commit(
        self, sent: ClientChecksums, size: int | None = None, before_visible: BeforeVisible | None = None,
        checks: asyncio.Future[None] | None = None,
    ) -> ObjectInfo:
        try:
            if checks is not None:  # local looks take no round trip to overlap
                await checks
            await self._drain()
            if not self._created:  # nothing written to disk yet: a small file, committed with others
                data, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
                return await self._commit_small(data, sent, size, before_visible)
            self._count_descriptor()  # its file is closed after a `suspend`
            chunks, self._pending, self._pending_bytes = self._pending, [], 0
            generation = await self._in_thread(self._write_big, chunks, sent, size)
            if before_visible is not None:  # on the event loop, between the worker threads' steps
                await before_visible()
            unsynced = await self._in_thread(self._place_big)
            sums = self._checksums
            info = ObjectInfo(self._key, sums.size, sums.sha256, generation, sums.crc32c)
            if unsynced:
                raise self._not_durable(info, unsynced)
            return info
        finally:
            await self.abort()

    def _discard(self) -> None:
        self._close_fd()
        if self._tmp_path:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # gone with tmp/, a file in its place
                os.unlink(self._tmp_path)

    async def abort(self) -> None:
        self._pending = []
        if self._discarding is None:  # the first abort: the next ones wait for its discard
            self._discarding = self._discard_after(self._committing or self._flushing)
            self._flushing = None
        # Waited for, so that a refused put is answered once its data is gone; shielded, so that a cancelled wait
        # still discards.
        await asyncio.shield(self._discarding)

    def _discard_after(self, running: asyncio.Future[Any] | None) -> asyncio.Future[None]:
        """The discard of the upload once `running` (its write or commit) ended, as `off_loop` makes its calls: the
        close of a written file writes it back, and its unlink waits on the data dir. Closing the file under a
        running write would be unsafe. What `running` failed with was for a put that is over."""
        if running is not None and not running.done():
            return asyncio.ensure_future(self._discard_when_done(running))
        if running is not None and not running.cancelled():
            running.exception()
        return self._backend.started(self._discard)

    async def _discard_when_done(self, running: asyncio.Future[Any]) -> None:
        await asyncio.wait([running])
        await self._discard_after(running)


class LocalBackend(Backend):
    """Objects as files under a data directory."""

    on_this_host = True

    def __init__(self, data_dir: str, descriptors: Descriptors, chunk_size: int = 1 << 20, named: str = "") -> None:
        self.named = named or data_dir  # the data dir as the operator gave it (its setting and value), for messages
        self._data_dir = os.path.realpath(data_dir)
        self.root = os.path.realpath(os.path.join(data_dir, "objects"))
        self.descriptors = descriptors
        self.tmp_dir = os.path.join(self._data_dir, "tmp")
        self.chunk_size = chunk_size
        self.upload_numbers = itertools.count()  # names of the uploads in tmp/, which starts empty
        self.listings = FolderCache()  # each folder read once while unchanged
        self.legacy_tables = LegacyTables()  # block tables of format 1 files, built when first read
        self._closing = threading.Event()  # stops the sweep of empty folders
        self._sweep: asyncio.Future[bool] | None = None
        self._clean_stop = os.path.join(data_dir, "clean-stop")
        self._making_tmp = threading.Lock()
        try:
            os.makedirs(self.root, exist_ok=True)
            self._locks = lock_data_dir(data_dir)  # before tmp/ is emptied: it may be another's
            self._stopped_cleanly = _taken(self._clean_stop, self.tmp_dir)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            os.makedirs(self.tmp_dir, exist_ok=True)
            # Uploads are named by number from an empty tmp/: a leftover that stays would fail the upload given its
            # name, and a tmp/ that cannot be written (immutable, read-only) every put; a link (rmtree does not
            # empty one) may lead to another file system, where an upload cannot be renamed into place.
            if os.path.islink(self.tmp_dir) or os.listdir(self.tmp_dir) or not os.access(self.tmp_dir, os.W_OK):
                raise DataDirError(f"cannot empty {self.tmp_dir}, where uploads are written: make it a folder the "
                                   "daemon can write, holding nothing it cannot remove")
            self._tmp_made = os.stat(self.tmp_dir)  # the mode and owner tmp/ is made again with
        except OSError as err:  # a file there, a missing mount, no permission: the start ends, saying why
            raise DataDirError(f"cannot make its folders: {err.strerror}: {err.filename}") from None
        self.committer = CommitWorker(self._locks)
        self.data_dir_fs = file_system(self.root)
        self.file_calls_in_threads = can_hang(self.data_dir_fs)

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`, a call on the data dir: in a worker thread when its file system can hang (a network or
        FUSE mount whose server is gone), where it then holds its own request only, not every call of the daemon,
        health checks and s3:// drives too; inline on a local disk, where a thread hop costs more than the call."""
        if not self.file_calls_in_threads:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(None, work, *args)

    async def start(self) -> None:
        # A daemon killed between a put's making of its folders and its rename, or between a delete's unlink and
        # its removal of the folders it emptied, leaves empty folders: they list as folders, refuse a put of their
        # path, and no delete reaches them. No call leaves an empty folder, so every one is such a leftover; they
        # are removed while the daemon serves (a put whose new folder goes meanwhile makes it again: `place`).
        # After a clean stop there are none, and the walk of every folder is spared.
        if not self._stopped_cleanly:
            self._sweep = asyncio.get_running_loop().run_in_executor(None, self._remove_empty_folders)

    def _remove_empty_folders(self) -> bool:
        """Removes the empty folders; False when the daemon's close stopped it before it was done."""
        removed = 0
        for folder, files in _folders_bottom_up(self.root):
            if self._closing.is_set():
                return False
            if not files and folder != self.root:
                with contextlib.suppress(OSError):  # not empty: a subfolder holds files, or a put came meanwhile
                    os.rmdir(folder)
                    removed += 1
        if removed:
            log.info("removed empty folders left by a daemon stopped mid-put or mid-delete",
                     extra={"fields": {"count": removed}})
        return True

    async def close(self) -> None:
        self._closing.set()
        swept = self._sweep is None or await self._sweep
        self.legacy_tables.close()
        await self.committer.close()
        if swept:  # no put or delete runs any more, and none left an empty folder
            with contextlib.suppress(OSError):  # not marked: the next start walks the folders
                _mark(self._clean_stop, self.tmp_dir)
        for fd in self._locks:
            os.close(fd)

    def made_tmp_again(self) -> bool:
        """Makes tmp/ again, with the mode and owner the start gave it, when an operator removed it while the daemon
        serves (to free the space of uploads in progress, or mistaking it for a scratch folder); False when something
        is at its path or the data dir itself is gone; True, too, when another put made it meanwhile (its caller tries
        again). When it cannot be made (the data dir read-only), raises what `unusable` answers.

        Looked at only once an upload found tmp/ missing, so that a healthy
        put pays nothing for it. The uploads it held are lost: their resumes
        answer as those of uploads the daemon no longer holds (`intact`).
        """
        with self._making_tmp:  # the puts that find it missing at once make it once
            if os.path.isdir(self.tmp_dir) and not os.path.islink(self.tmp_dir):
                return True
            if os.path.lexists(self.tmp_dir) or self._gone():
                return False
            made = self._tmp_made
            try:
                os.mkdir(self.tmp_dir, 0o700)
                os.chmod(self.tmp_dir, stat.S_IMODE(made.st_mode))
                if (now := os.stat(self.tmp_dir)).st_uid != made.st_uid or now.st_gid != made.st_gid:
                    os.chown(self.tmp_dir, made.st_uid, made.st_gid)
            except OSError as err:
                raise self.unusable(err) from err
        log.warning("tmp/ was removed while drived ran: made again; the uploads it held are lost, and their clients "
                    "put them again", extra={"fields": {"tmp": self.tmp_dir}})
        return True

    def _gone(self) -> bool:
        """Whether the data dir the daemon locked is no longer at its path: removed, or moved away (another folder may
        be in its place). Its lock holds the folder itself open, wherever it went."""
        held = os.fstat(self._locks[0])
        try:
            there = os.stat(self._data_dir)
        except (FileNotFoundError, NotADirectoryError):
            return True
        return (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino)

    def _moved_away(self) -> Unavailable:
        return Unavailable(f"{self.named}: the data dir was removed or moved away while drived ran: put it back there "
                           "(calls work again at once), or restart drived on where it is now")

    def unusable(self, err: Exception) -> Exception:
        """What a put answers whose use of the data dir failed with `err`: UNAVAILABLE, which clients retry, saying
        what the operator is to mend when the data dir is gone or its tmp/ cannot be written; else `err` itself.

        Looked at only once a call failed, so that a healthy put pays nothing
        for it. An error answered as what it is (the disk full, a file in the
        way) is left as it is.
        """
        if not isinstance(err, OSError) or isinstance(err, DriveError):
            return err
        if self._gone():
            return self._moved_away()
        if not (os.path.isdir(self.tmp_dir) and os.access(self.tmp_dir, os.W_OK)):
            return Unavailable(f"{self.named}: cannot write its tmp/ folder, where uploads are written ([Errno "
                               f"{err.errno}] {err.strerror}): make it a folder drived can write; nothing was stored")
        return err

    def _path(self, key: str) -> str:
        """The file or folder of `key`; refuses a key that goes through a symlink in the data dir."""
        return self._lookup(key)[0]

    def _modes(self, key: str, folder: str = "") -> Iterator[int | None]:
        """The st_mode of each part of `key` in turn (below the key of a real `folder`, when given), None for the
        first that does not exist (and nothing after it); refuses a path through a symlink.

        drived never makes links, so one there was planted and could lead out
        of the data dir. One lstat per existing part of the key: cheaper than
        resolving the whole path.
        """
        path = f"{self.root}/{folder}" if folder else self.root
        for name in key.split("/") if key else ():
            path = f"{path}/{name}"
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                yield None  # the rest does not exist yet: drived makes it, with real folders
                return
            if stat.S_ISLNK(mode):
                raise InvalidArgument(f"path {key!r} goes through a symbolic link in the data dir: refused")
            yield mode

    def _lookup(self, key: str) -> tuple[str, int | None]:
        """The path of `key` and its st_mode (None if nothing is there); refuses a path through a symlink."""
        modes = [stat.S_IFDIR, *self._modes(key)]  # the data dir itself (made at start-up), then each part
        return (f"{self.root}/{key}" if key else self.root), modes[-1]

    async def _over_roots(self, look: Callable[[Sequence[str], str], T], roots: Sequence[str], path: str) -> T:
        """`look(roots, path)`: as `off_loop` makes its calls for a few roots, in a worker thread for many. A put or
        stat in a drive of 10,000 components looks in each of them, which on the event loop held every other call of
        the daemon for 0.3-0.8 s; for a few on a local disk, the thread hop costs more than their lstats."""
        if len(roots) > INLINE_ROOTS:
            return await asyncio.get_running_loop().run_in_executor(None, look, roots, path)
        return await self.off_loop(look, roots, path)

    async def first_occupant(self, roots: Sequence[str], path: str) -> tuple[int, str, bool] | None:
        return await self._over_roots(self._first_occupant, roots, path)

    def _first_occupant(self, roots: Sequence[str], path: str) -> tuple[int, str, bool] | None:
        first = path.split("/", 1)[0]
        for i, root in enumerate(roots):
            try:
                os.lstat(f"{self.root}/{root}/{first}")
            except (FileNotFoundError, NotADirectoryError):
                continue  # one lstat for a root that holds nothing where `path` begins, as most roots do
            if (held := self._occupant(root, path)) is not None:
                return i, *held
        return None

    def _occupant(self, root: str, path: str) -> tuple[str, bool] | None:
        """`Backend.occupant`, in one walk that refuses a symbolic link on the way."""
        parts = path.split("/")
        mode: int | None = None
        below_root = itertools.islice(self._modes(f"{root}/{path}"), root.count("/") + 1, None)
        for end, mode in enumerate(below_root, 1):
            if mode is not None and stat.S_ISREG(mode):
                return "/".join(parts[:end]), False
        return (path, True) if mode is not None and stat.S_ISDIR(mode) else None

    async def holders(self, roots: Sequence[str], path: str) -> list[Holder]:
        return await self._over_roots(self._holders, roots, path)

    def _holders(self, roots: Sequence[str], path: str) -> list[Holder]:
        return [Holder(i) for i, root in enumerate(roots) if self._may_hold(root, path)]

    def _may_hold(self, root: str, path: str) -> bool:
        """Whether something is at `path` under folder `root`, or a symbolic link is on the way, which `stat` and
        `is_folder` then refuse as they would without this look. One lstat for a root that holds nothing where
        `path` begins, as most roots do: the walk starts below the root, a real folder (a drive's component)."""
        try:
            return None not in self._modes(path, root)
        except InvalidArgument:
            return True

    async def start_upload(self, key: str) -> Upload:
        path, mode = await self.off_loop(self._lookup, key)
        if mode is not None and stat.S_ISDIR(mode):
            raise is_a_folder(key)
        return LocalUpload(self, key, path)

    def _open_file(self, key: str) -> int:
        """A descriptor of the file or folder at `key`, for reading; Missing when nothing is there.

        Non-blocking: opening a pipe planted there would otherwise wait for a
        writer, on the event loop (a regular file ignores the flag).
        """
        try:
            return os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise Missing(key, "does not exist") from None
            raise

    def _open(self, key: str) -> tuple[int, Layout, Version, ObjectInfo]:
        """Opens `key` and reads its header: (descriptor, layout, version, info); the caller closes the descriptor.

        The version (device, inode, ctime) tells these bytes apart from any
        others that were or will be at `key`.
        """
        fd = self._open_file(key)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Missing(key, "is a folder, not a file")
            try:
                layout = parse_header(os.pread(fd, HEADER_SIZE, 0))
            except DamagedHeader:
                raise Damaged(key, "its header does not match its CRC32C") from None
            if layout is None:  # drived writes every file under objects/ with a header: this one is damaged
                raise Damaged(key, "its header is not one drived writes")
            version = version_of(st)
            crc = layout.crc32c
            if crc is None and (ends := self.legacy_tables.known(version)) is not None:
                crc = ends[-1] if ends else 0  # a format 1 file read before: its table is known
            return fd, layout, version, ObjectInfo(key, layout.size, layout.sha256.hex(), st.st_mtime_ns, crc)
        except BaseException:
            os.close(fd)
            raise

    async def read(self, key: str, offset: int = 0, limit: int = 0) -> tuple[ObjectInfo, Chunks]:
        self.descriptors.take_read()
        opening = self.started(self._open, key)  # the open file pins this version
        try:
            fd, layout, version, info = await asyncio.shield(opening)
        except BaseException:
            opening.add_done_callback(self._give_opened)
            raise
        end = info.size if limit == 0 else min(info.size, offset + limit)
        chunks = FileChunks(self, fd, key, layout, version, offset, end)
        if offset > info.size:
            await chunks.aclose()
            raise EndsBefore(key, f"offset {offset} (it has {info.size} bytes)", sha256=info.sha256)
        return info, chunks

    def started(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`work(*args)` as `off_loop` makes it, as a future its caller can shield or leave: running in a worker
        thread, or inline and done already."""
        if self.file_calls_in_threads:
            return asyncio.get_running_loop().run_in_executor(None, work, *args)
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            done.set_result(work(*args))
        except Exception as err:
            done.set_exception(err)
        return done

    def _give_opened(self, opening: asyncio.Future[tuple[int, Layout, Version, ObjectInfo]]) -> None:
        """Gives back the descriptor of a read that ended before it handed its file on, and closes the file if the
        open made one (for a caller gone meanwhile, when a hung data dir answered late)."""
        if not opening.cancelled() and opening.exception() is None:
            os.close(opening.result()[0])
        self.descriptors.give_read()

    def _stat(self, key: str) -> ObjectInfo | None:
        try:
            fd, _, _, info = self._open(key)
        except Missing:
            return None
        os.close(fd)
        return info

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self.off_loop(self._stat, key)

    async def is_folder(self, key: str) -> bool:
        mode = (await self.off_loop(self._lookup, key))[1]
        return mode is not None and stat.S_ISDIR(mode)

    async def subfolders(self, prefix: str) -> frozenset[str]:
        return (await self.off_loop(self._list, prefix)).folders

    def _list(self, prefix: str) -> Listing:
        listing = self.listings.read(self._path(prefix.rstrip("/")))
        if not listing.names and self._gone():  # not an empty drive: a data dir no longer there
            raise self._moved_away()
        return listing

    def _list_after(self, prefix: str, start_after: str, limit: int | None) -> Listing:
        listing = self._list(prefix)
        base = prefix.rstrip("/")
        start = position_after(listing.names, f"{base}/" if base else "", start_after)
        if not start and limit is None:
            return listing
        names = listing.names[start:] if limit is None else listing.names[start:start + limit]
        return Listing(names, listing.folders, tuple(sorted(names, key=listing.key_of)))

    async def list_folder(self, prefix: str, start_after: str = "", limit: int | None = None) -> Listing:
        return await asyncio.get_running_loop().run_in_executor(None, self._list_after, prefix, start_after, limit)

    def _walk(self, prefix: str, start_after: str, limit: int | None, listings: FolderCache | None = None
              ) -> list[str]:
        base = prefix.rstrip("/")
        return list(itertools.islice(self._keys_after(base, self._path(base), start_after, listings or self.listings),
                                     limit))

    def _keys_after(self, key: str, folder: str, start_after: str, listings: FolderCache) -> Iterator[str]:
        """Keys of the files under `key` (the folder `folder`) after `start_after`, in order, one by one.

        Each folder's listing (see `listings`) is entered by bisection, so what
        comes before `start_after` is neither read nor built. The folders being
        read are a stack, not a recursion: a path may be some 2,000 folders
        deep, past Python's recursion limit.
        """
        levels = [self._children_after(key, folder, start_after, listings)]
        while levels:
            for child, subfolder in levels[-1]:
                if subfolder:
                    levels.append(self._children_after(child, subfolder, start_after, listings))
                    break
                if child > start_after:
                    yield child
            else:
                levels.pop()

    def _children_after(self, key: str, folder: str, start_after: str, listings: FolderCache
                        ) -> Iterator[tuple[str, str]]:
        """(key, its folder's path, or "" for a file) of what is directly under `key` (the folder `folder`), in
        key order, from the first that holds or follows `start_after`."""
        listing = listings.read(folder)
        prefix = f"{key}/" if key else ""
        start = position_after(listing.key_order, prefix, start_after, listing.key_of)
        if start and start_after.startswith(prefix + listing.key_of(listing.key_order[start - 1])):
            start -= 1  # the sub-folder that `start_after` is in
        for name in names_from(listing.key_order, start):
            yield prefix + name, (f"{folder}/{name}" if name in listing.folders else "")

    async def walk(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(None, self._walk, prefix, start_after, limit)

    @staticmethod
    def _counted_size(path: str) -> int:
        """What the file at `path` counts in its drive's usage: its content's size, from its stored size
        (`content_size`), whatever its header says; 0 when nothing is there, or what no put makes (a link, a
        pipe planted there).

        One lstat and no open: a drive's first count after start-up would
        otherwise read a block of every file it holds. A put replacing the
        file and a delete take off what this counted, so the count stays
        what a count from scratch would find.
        """
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):  # deleted or replaced meanwhile, or a parent is a file
            return 0
        return content_size(st.st_size) if stat.S_ISREG(st.st_mode) else 0

    def _usage_page(self, prefix: str, start_after: str, listings: FolderCache) -> tuple[int, str]:
        """The bytes of the next USAGE_PAGE files under `prefix` after key `start_after`, and the last one's key
        ("" when there are none)."""
        keys = self._walk(prefix, start_after, USAGE_PAGE, listings)
        return sum(self._counted_size(f"{self.root}/{key}") for key in keys), keys[-1] if keys else ""

    async def usage(self, prefix: str, passed: Callable[[str], Awaitable[None]] | None = None) -> int:
        # Each page walks from the last one's last key, and so counts the files added ahead of it meanwhile. The
        # folders it is in are kept from page to page while unchanged, whatever their size: read again for each page
        # (the daemon's listings keep none past MAX_BYTES), a folder of 300,000 files took 225 s to count, not 6.
        listings, total, last = FolderCache(sys.maxsize), 0, ""
        while True:
            size, last = await asyncio.get_running_loop().run_in_executor(
                None, self._usage_page, prefix, last, listings)
            if not last:
                return total
            total += size
            listings.keep_only(functools.partial(_holds, f"{self.root}/{last}"))
            if passed is not None:
                await passed(last)

    async def counted_size(self, key: str) -> int:
        return await self.off_loop(self._counted_size_at, key)

    def _counted_size_at(self, key: str) -> int:
        return self._counted_size(self._path(key))

    def _delete(self, key: str) -> int | None:
        path = self._path(key)
        size = self._counted_size(path)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            if self._gone():  # not a file the caller does not have: a data dir no longer there
                raise self._moved_away() from None
            return None
        folder = os.path.dirname(path)
        while folder != self.root and folder.startswith(self.root):
            try:
                os.rmdir(folder)  # only succeeds when empty
            except OSError:
                break
            folder = os.path.dirname(folder)
        return size

    async def delete(self, key: str, looked: Callable[[Holding], Awaitable[None]] | None = None) -> Removed | None:
        # Every object under the root is a file of drived's. The look before the removal is made for `looked` alone (a
        # coordinator that records the change): a delete told nothing stays one call in a worker thread.
        if looked is not None:
            mode = (await self.off_loop(self._lookup, key))[1]
            if mode is None or stat.S_ISDIR(mode):
                return None
            await looked("file")
        size = await asyncio.get_running_loop().run_in_executor(None, self._delete, key)
        return None if size is None else Removed(size)
