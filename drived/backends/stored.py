"""A stored file: its format, how a finished upload becomes one, and how its blocks are checked.

Format 2 (magic "DRIVED02"), written by this release:

    header   64 bytes: magic, raw sha256, size, CRC32C of the content,
             block size, the CRC32C of these 56 bytes, and 4 bytes of zeros
    content  `size` bytes
    table    one 4-byte little-endian CRC32C per block of `block size` bytes
             (the last one may be short): the CRC32C of the content from its
             start to the end of that block

The table comes after the content because an upload's size is known only at
its end. Each entry runs from the file's start, not the block's: verifying a
block is one CRC32C pass seeded with the entry before it, and a whole-file
read's CRC32C is the last entry, with no second pass. A ranged read reads
the whole blocks it touches and their entries (`BlockEnds`).

Format 1 (magic "DRIVED01", earlier releases): a 64-byte header of magic,
raw sha256 and size, then the content, no table. Such files stay readable
as they are: the first read of one in a daemon's life checks its whole
content against its sha256 and builds its table in memory (`LegacyTables`),
not on disk, so reading never writes. That sha256 is all format 1 knows: a
file that does not match it is damaged as a whole, every range of it.

A stored file's mtime (in ns) is its generation. Shared by the daemon, which
commits big uploads and reads, and the commit worker, which commits small
ones; no grpc here (see `drived.checksums`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol

from crc32c import crc32c

from ..checksums import BLOCK_SIZE, Checksums, table_entries

MAGIC = b"DRIVED02"
LEGACY_MAGIC = b"DRIVED01"
# magic, raw sha256, size, CRC32C of the content, block size, CRC32C of the 56 bytes before it
HEADER = struct.Struct("<8s32sQIII")
LEGACY_HEADER = struct.Struct("<8s32sQ16x")  # magic, raw sha256, size, padding
HEADER_SIZE = 64  # both formats: the content starts here
ENTRY = 4  # bytes per entry of the block table
TABLE_WINDOW = 1024  # entries read at once (4 KiB: a GiB of content)
BUILDERS = 2  # threads checking format 1 files whole (LegacyTables)
TABLE_OVERHEAD = 320  # bytes a kept format 1 table costs beyond its entries (measured with tracemalloc)


class Layout(NamedTuple):
    """What a stored file's header says."""

    version: int  # 2, or 1 for a file of an earlier release (no block table)
    sha256: bytes
    size: int
    crc32c: int | None  # of the whole content; None in format 1
    block_size: int  # 0 in format 1


class DamagedHeader(Exception):
    """A format 2 header whose own CRC32C does not match it."""


def parse_header(raw: bytes) -> Layout | None:
    """The layout a header describes; None when `raw` is no drived header (too short, unknown magic)."""
    if len(raw) < HEADER_SIZE:
        return None
    if raw[:8] == MAGIC:
        _, sha256, size, content_crc, block_size, header_crc = HEADER.unpack_from(raw)
        if crc32c(raw[:HEADER.size - 4]) != header_crc or block_size <= 0:
            raise DamagedHeader()
        return Layout(2, sha256, size, content_crc, block_size)
    if raw[:8] == LEGACY_MAGIC:
        _, sha256, size = LEGACY_HEADER.unpack_from(raw)
        return Layout(1, sha256, size, None, 0)
    return None


def content_size(stored_size: int) -> int:
    """The content size of a format 2 file in `BLOCK_SIZE` blocks whose whole file is `stored_size` bytes.

    Such a file of n bytes of content is 64 + n + 4 * ceil(n / BLOCK_SIZE)
    bytes, which grows with n: each started block adds BLOCK_SIZE + 4 bytes
    at most, so the blocks are ceil((stored_size - 64) / (BLOCK_SIZE + 4)).
    Read from the size alone (an lstat, no open), a format 1 file (no table)
    comes out at most 4 bytes per started block smaller than its content,
    and a file whose header is damaged as if it were sound.
    """
    rest = stored_size - HEADER_SIZE  # the content and its table
    if rest <= 0:
        return 0
    return rest - ENTRY * -(-rest // (BLOCK_SIZE + ENTRY))


def header(sums: Checksums) -> bytes:
    """The format 2 header of a file whose content `sums` has summed."""
    fields = HEADER.pack(MAGIC, sums.sha256_digest(), sums.size, sums.crc32c, sums.block_size, 0)[:-4]
    return (fields + struct.pack("<I", crc32c(fields))).ljust(HEADER_SIZE, b"\0")


def stored_bytes(data: bytes, sums: Checksums) -> bytes:
    """A whole stored file (header, content, table) holding `data`, which `sums` has summed."""
    return b"".join((header(sums), data, sums.block_table()))


def table_offset(layout: Layout) -> int:
    return HEADER_SIZE + layout.size


class BlockEnds:
    """The CRC32C of a stored file's content up to the end of each block: its table, read a window at a time.

    `at(i)` is block i's entry, `at(-1)` is 0 (nothing before the first
    block). Raises EOFError when the table is cut short. A file of format 1
    passes its table, built by `legacy_block_ends` and kept in `LegacyTables`, as `ends`.
    """

    def __init__(self, fd: int, layout: Layout, ends: array[int] | None = None) -> None:
        self._fd = fd
        self._offset = table_offset(layout)
        self._blocks = -(-layout.size // layout.block_size) if layout.block_size else 0
        self._first = 0
        self._ends = ends if ends is not None else array("I")
        self._read_all = ends is not None

    def tail_size(self) -> int:
        """Bytes of table to read in one go with the content's last block: all of it when none is read yet and
        it is at most a window (a file of at most a GiB: a small file costs one read, not two); else 0."""
        return self._blocks * ENTRY if not self._ends and self._blocks <= TABLE_WINDOW else 0

    def load(self, raw: bytes | memoryview) -> None:
        """Takes the whole table (`tail_size()` bytes), read with the content's end."""
        self._set(0, raw)

    def _set(self, first: int, raw: bytes | memoryview) -> None:
        self._first, self._ends = first, table_entries(raw)

    def at(self, index: int) -> int:
        if index < 0:
            return 0
        position = index - self._first
        if 0 <= position < len(self._ends):
            return self._ends[position]
        self.read_from(index)
        return self._ends[0]

    def holds(self, first: int, last: int) -> bool:
        """Whether the entries of blocks `first` to `last` (at most a window apart) are known without a read."""
        return self._read_all or (self._first <= max(first, 0) and last - self._first < len(self._ends))

    def read_from(self, index: int) -> None:
        """Reads the window of entries from block `index` on."""
        if self._read_all or index >= self._blocks:
            raise EOFError(f"block {index} has no entry")
        count = min(TABLE_WINDOW, self._blocks - index)
        raw = os.pread(self._fd, count * ENTRY, self._offset + index * ENTRY)
        if len(raw) != count * ENTRY:
            raise EOFError("the block table is cut short")
        self._set(index, raw)


class Ends(Protocol):
    """A block table's entries by block (`BlockEnds`, or the entries an S3 object keeps): `at(-1)` is 0, and a
    block with no entry raises EOFError."""

    def at(self, index: int) -> int: ...


def check_blocks(data: memoryview, first: int, block_size: int, ends: Ends, cuts: tuple[int, ...]
                 ) -> tuple[int | None, dict[int, int]]:
    """Verifies `data`, the content of whole blocks from block `first` on (the last may be short).

    Returns (None, CRC32C of the content up to each offset in `cuts`, an
    offset inside the blocks) when every block matches its entry, else (the
    offset of the first damaged block, {}).
    """
    at_cuts: dict[int, int] = {}
    start = first * block_size
    for offset in range(0, len(data), block_size):
        block = data[offset:offset + block_size]
        begin = start + offset
        index = first + offset // block_size
        value, done = ends.at(index - 1), 0
        for cut in cuts:
            if begin < cut < begin + len(block):
                value = crc32c(block[done:cut - begin], value)
                at_cuts[cut] = value
                done = cut - begin
        if crc32c(block[done:], value) != ends.at(index):
            return begin, {}
    return None, at_cuts


class Stopped(Exception):
    """A format 1 file's check given up half way because the daemon stops (`LegacyTables.close`)."""


def legacy_block_ends(fd: int, layout: Layout, block_size: int, stopping: threading.Event) -> array[int] | None:
    """The block table of a format 1 file, once its content matches its sha256 (None when it does not).

    Raises Stopped at the next block once `stopping` is set.
    """
    sums = Checksums(block_size)
    position = 0
    while position < layout.size:
        if stopping.is_set():
            raise Stopped()
        data = os.pread(fd, min(block_size, layout.size - position), HEADER_SIZE + position)
        if not data:
            return None
        sums.update(data)
        position += len(data)
    return sums.block_ends() if sums.sha256_digest() == layout.sha256 else None


Version = tuple[int, int, int]  # a stored file's (device, inode, ctime): see LegacyTables
# A table built by reading the file through the descriptor it is given, given up (Stopped) once the event is set.
Build = Callable[[int, threading.Event], "array[int] | None"]


def version_of(st: os.stat_result) -> Version:
    return st.st_dev, st.st_ino, st.st_ctime_ns


class LegacyTables:
    """The block tables of format 1 files, by file version, each built once and kept in memory; the least used go
    first past `max_bytes` (a table's array, and what keeping it costs: its key, its slot, the array object).

    A version is (device, inode, ctime): a put replaces the file (a new
    inode), and any write or restore in place changes its ctime, so a table
    never outlives the bytes it was built from. A version's table is built
    once however many read it at once: the first read queues the build and
    the others wait for that same Future. A file whose bytes do not match
    its sha256 keeps that verdict (None) as its table, so every read of it is
    refused without reading it again. A build that fails (a read error, a
    file changed in place before its build started) is not kept: the next
    read builds again. Builds read whole files, so they run on threads of
    their own (`BUILDERS`), never holding the threads of the daemon's other
    disk work, in the order they were asked for.

    A build reads through a descriptor of its own: a dup of the descriptor
    of a read still waiting for it, taken when a builder thread is free. So
    it reads the very version its reads opened, even once a put has put
    another at the path; every read can close its own descriptor as soon as
    it goes away; and builds hold at most `BUILDERS` descriptors, queued ones
    none. A build that every read left before it started is not run. Used on
    the event loop only, where the reads close their descriptors too.
    """

    def __init__(self, max_bytes: int = 32 << 20) -> None:  # ~100,000 small files, or 8 TiB in 1 MiB blocks
        self._tables: OrderedDict[Version, array[int] | None] = OrderedDict()  # built; None: damaged
        self._building: dict[Version, asyncio.Future[array[int] | None]] = {}  # queued or running
        self._queued: OrderedDict[Version, Build] = OrderedDict()  # waiting for a builder thread
        self._readers: dict[Version, list[int]] = {}  # the descriptors of the reads waiting for each build
        self._bytes = 0
        self._max_bytes = max_bytes
        self._builders = ThreadPoolExecutor(BUILDERS, thread_name_prefix="drived-legacy")
        self._stopping = threading.Event()  # set by `close`: the builds running give up

    def known(self, version: Version) -> array[int] | None:
        """The table of `version` when it is built (and its file matched its sha256); else None."""
        return self._tables.get(version)

    async def table(self, version: Version, fd: int, build: Build) -> array[int] | None:
        """The table of `version` (None for a file that does not match its sha256), built or being built; else
        built by `build` in a builder thread, through a dup of `fd` (the caller's descriptor of `version`, open
        while it waits here) or of another waiting read's. A read that goes away leaves the build to the others;
        one that all its reads left before it started is not run (reads of many old files, each given up at
        once, queue no whole-file reads)."""
        if version in self._tables:
            self._tables.move_to_end(version)
            return self._tables[version]
        building = self._building.get(version)
        if building is None:
            building = self._building[version] = asyncio.get_running_loop().create_future()
            self._queued[version] = build
        self._readers.setdefault(version, []).append(fd)
        try:
            self._start()
            return await asyncio.shield(building)
        finally:
            readers = self._readers[version]
            readers.remove(fd)
            if not readers:
                del self._readers[version]
                if self._queued.pop(version, None) is not None:  # not started: a read that comes next queues anew
                    del self._building[version]

    def _start(self) -> None:
        """Starts the queued builds, oldest first, while a builder thread is free."""
        while len(self._building) - len(self._queued) < BUILDERS and self._queued:  # running: building, not queued
            version, build = self._queued.popitem(last=False)
            try:
                fd = os.dup(self._readers[version][0])
            except OSError as err:  # out of descriptors: told to the waiting reads, as a failed build is
                self._building.pop(version).set_exception(err)
                continue
            try:
                running = asyncio.get_running_loop().run_in_executor(
                    self._builders, _build_and_close, build, fd, self._stopping)
            except RuntimeError as err:  # the builders are shut down: the daemon stops
                os.close(fd)
                self._building.pop(version).set_exception(err)
                continue
            running.add_done_callback(functools.partial(self._built, version))

    def close(self) -> None:
        """Drops the builds not started (the daemon stops): their reads end CancelledError. Those running end
        Stopped at their next block, their descriptors closed: the daemon's exit, which waits for its threads,
        does not wait for whole files to be read."""
        for version in self._queued:
            self._building.pop(version).cancel()
        self._queued.clear()
        self._stopping.set()
        self._builders.shutdown(wait=False)

    def _built(self, version: Version, running: asyncio.Future[array[int] | None]) -> None:
        building = self._building.pop(version)
        error = running.exception()
        if error is not None:
            building.set_exception(error)  # told to the reads that wait for it; the next read builds again
        else:
            ends = self._tables[version] = running.result()
            building.set_result(ends)
            self._bytes += _kept_bytes(ends)
            while self._bytes > self._max_bytes and len(self._tables) > 1:
                _, dropped = self._tables.popitem(last=False)
                self._bytes -= _kept_bytes(dropped)
        self._start()


def _build_and_close(build: Build, fd: int, stopping: threading.Event) -> array[int] | None:
    """Runs in a builder thread: `build(fd, stopping)`, then closes `fd`, the build's own descriptor."""
    try:
        return build(fd, stopping)
    finally:
        os.close(fd)


def _kept_bytes(ends: array[int] | None) -> int:
    """What keeping a table (or a verdict, None) costs LegacyTables: its entries and TABLE_OVERHEAD."""
    return TABLE_OVERHEAD + (ends.itemsize * len(ends) if ends is not None else 0)


def fsync_folder(folder: str) -> None:
    """Makes the entries of `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp_path: str, path: str) -> list[str]:
    """Renames a finished upload to `path`, creating its folders; returns the folders whose entries it changed.

    Those are `path`'s folder and, when folders had to be made, the folder
    each was made in: the caller fsyncs them all before it acknowledges the
    put, so that a power cut cannot lose a new folder, and the file with it,
    on a file system that does not order its metadata. Raises
    NotADirectoryError when a parent of `path` is a file, and
    IsADirectoryError when `path` is a folder.
    """
    folder = os.path.dirname(path)
    changed = {folder}
    made: list[str] = []
    missing = 0
    try:
        while True:
            try:
                os.rename(tmp_path, path)
                return sorted(changed)
            except FileNotFoundError:  # its folder does not exist yet, or a concurrent delete just removed it
                missing += 1
                if missing == 5:
                    raise
            with contextlib.suppress(FileNotFoundError):  # a parent removed meanwhile by a delete: made again
                _make_folders(folder, changed, made)
    except OSError:  # a full or failing disk, a file in the way: the folders made for the file go (no call leaves one)
        for empty in reversed(made):
            with contextlib.suppress(OSError):  # not empty: another put's file is in it
                os.rmdir(empty)
        raise


def _make_folders(folder: str, changed: set[str], made: list[str]) -> None:
    """Makes `folder` and its missing parents, adding each to `made` and the folder each is made in to `changed`
    first (also when a concurrent put makes it: that put's fsync of it may not have happened yet)."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for new in reversed(missing):
        changed.add(os.path.dirname(new))
        try:
            os.mkdir(new)
            made.append(new)
        except FileExistsError:  # made meanwhile by another put, or a file where a folder has to be
            if not os.path.isdir(new):
                raise NotADirectoryError(errno.ENOTDIR, "a parent folder is a file", new) from None


def make_durable(fd: int) -> int:
    """Stamps the written file `fd` with its generation (its mtime, in ns) and fsyncs it; returns the generation."""
    generation = time.time_ns()
    os.utime(fd, ns=(generation, generation))
    os.fsync(fd)
    return generation
