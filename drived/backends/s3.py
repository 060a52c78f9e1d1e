"""S3Backend: managed drives kept in an S3-compatible store (`--storage s3://bucket/prefix/`).

Layout: the object of key `<drive>/<component>/<path>` is `prefix/<drive>/<component>/<path>`,
its plain bytes; its user metadata holds `generation` (ns, new with every
commit) and its content hashes (a big file's, in its checksum object: below). The store is the only truth: any number of
daemons serve the same prefix, listing and stat read it (S3 lists and reads
its own writes), and nothing about a file lives only in a daemon.

Commits. A file of at most `PART_SIZE` bytes is one PutObject, sent once its
bytes are verified, with its sha256, CRC32C and block table (below) in its
metadata. A bigger one streams into a multipart upload, parts of `PART_SIZE` sent while the next
ones arrive (`MAX_PARTS_IN_FLIGHT` at a time over all uploads), and becomes
visible in one step at CompleteMultipartUpload, which is only called when
the bytes match the client's checksums and size; otherwise the upload is
aborted and nothing is visible. Both steps are atomic in S3: a reader sees
the previous version or the new one, never a part. A CompleteMultipartUpload
that fails is looked at with a HEAD: its answer may have been lost after the
commit was made (boto3's retry of it is then answered NoSuchUpload by stores
that forget an upload at its commit, as MinIO does), and a put whose file is
stored is not reported failed.

Where a big file's sha256 lives. An object's metadata is fixed when its
multipart upload is created, before any byte is hashed, and S3 can change it
only by copying the object. Copying after the commit (CopyObject onto itself)
would show the object without its sha256 until the copy ends, and for ever if
the daemon died in between; completing into a staging key and copying into
place is atomic but makes the store read and write every big file twice
(UploadPartCopy above 5 GiB). Hashing before the upload would mean spooling
the whole file first. So a multipart object's metadata names a *checksum
object* instead, `prefix/~checksums/<key>/<name>`, whose metadata holds the
hashes and the commit's generation (the object's own dates from its upload's
start) and whose bytes are the block table (below); it is written after the
bytes are verified and before CompleteMultipartUpload, so the file is never visible without it (and
deleted when the upload is aborted, unless the object at the key uses it).
`~` cannot start a drive name: the checksum objects share no folder with a
drive. This costs one small PUT per big file, and a stat of a big file a second
HEAD; the checksum object of a replaced or deleted version is deleted after it
(a commit HEADs the version it replaces beside its folder check; with `--quota`,
before it holds room instead, that one HEAD giving the quota's count too:
`S3Upload.replacing`).
(MinIO keeps such metadata in its own xl.meta and JuiceFS in its metadata
engine; rclone stores an MD5 only when it can hash the source before the
upload: each keeps the hash beside the bytes, not in S3's metadata.)

Folders. S3 has none: a folder is the common prefix of the keys below it, so
it vanishes with its last file. A put is refused when a parent of its path is an
object or its key is a folder, checked (a HEAD per parent, one LIST) at the
commit: just before the PutObject, or, once the last part is stored, beside
the checksum object's write; a multipart upload is also checked before its
first part is stored (beside its CreateMultipartUpload, aborted when the check
refuses), so that a refused big file is not uploaded first. S3 cannot make the
check and the commit one step: the caller commits inside the path's claim
(`drived.coordinator`), which excludes the claims of the folders above the
path and of the paths below it, so two puts of `a` and `a/b` at the same
moment cannot both succeed: within one daemon, and across replicas that
share a coordinator.
Replicas without one can both succeed; listing then shows `a` as a folder.
A claim may lapse while the commit sends its last part, waits for the parts
in flight and checks the folders (seconds, for a big file): the caller's
`before_visible` (which confirms the claim) is awaited after all of that,
right before the PutObject or CompleteMultipartUpload; when it raises, the
upload is aborted.

Uploads left behind. A put that fails, is cancelled or abandoned aborts its
multipart upload. One whose daemon was killed is found by the sweep, at
start-up and every `upload_expiry` seconds: ListMultipartUploads under the
prefix, and an upload that no part was added to for `upload_expiry` (S3's own
clock) is aborted, with the checksum objects its key no longer uses; one with
no part yet, once two sweeps have found it so (`_partless`). A live
upload may add no part for longer (its client sends slowly or pauses, it is
held for a resume, its commit waits for a claim): each daemon lists the ids of
its live uploads in `prefix/~uploads/<daemon>`, rewritten every third of
`upload_expiry` while it has some, and a sweep passes over the uploads of the
lists rewritten within `upload_expiry` (a daemon's own are in its memory) and
deletes the older lists. A checksum object whose delete the store fails (after an
abort, or after the commit or delete of the version using it) is remembered
(LEFTOVERS_KEPT at most; past it, the first left in the store is logged, and the next sweep
logs how many more were) and deleted by the next sweep; one remembered by a daemon
that dies first stays in the store: no file uses it, nothing lists it and no usage
counts it, and finding it again would mean listing `~checksums/` and a HEAD of each
file, at a billion files far beyond a sweep every upload_expiry (docs/scaling.md).
Replicas sweep the same uploads: one aborted by another
(or by its daemon) between this sweep's listing and its ListParts or its abort
is gone, not abandoned, and fails nothing. A sweep handles the remembered checksum
objects, then the abandoned uploads, SWEEP_AT_ONCE at a time, and the store failing
on one fails it alone: the look at an aborted upload's checksum objects is
remembered as they are, and made again by the next sweep.

Reads are one GetObject of the range asked for, streamed a chunk at a time: a
single answer is one version. When the connection drops mid-way the rest is
asked for again `If-Match` its ETag (and the answer's ETag checked, for stores
that ignore If-Match), so a file replaced meanwhile fails with ABORTED rather
than mixing versions. A read of a whole object checks its
bytes against the stored CRC32C before it yields the last chunk
(`SummedChunks`): a damaged object fails with DATA_LOSS before its end, and a
client never keeps any of it.

Block tables. A ranged read cannot check its bytes against the whole object's
CRC32C without reading all of it, so each object keeps a block table, as the
local stored format does (`drived.backends.stored`): the CRC32C of its bytes
from the start to the end of each 1 MiB block, which `Checksums` computes as
the bytes arrive (no pass and no round trip more for a put). A small file
keeps it in its metadata (`blocks`: base64, 44 bytes at most, well within
S3's 2 KB of user metadata); a multipart object's metadata says `blocks:
in-checksums`, its table being its checksum object's bytes (4 per MiB: 320
KiB for the largest file). A ranged read fetches the whole blocks it touches
and, in the same round trip that a whole read spends on the checksum object's
HEAD, a ranged GET of the entries it needs; it checks each block in the
worker thread that reads it, before any of it is yielded, and yields only
the bytes asked for (`CheckedRange`). The checksum object's name is its
commit's own and it is never rewritten, so a table never belongs to another
version than the bytes; nothing is cached between reads. An object of an
earlier drived has no table: its ranges rely on S3's own integrity (the
store checksums what it keeps, TCP and TLS what it sends), as they did.

boto3 (in a thread pool) is the client: measured against aiobotocore and
obstore in bench/WHY.md. Payload signing is off (SigV4 over plain HTTP would
sha256 every byte a second time). The store still checks what it receives
against the daemon's own CRC32C: a small file's PutObject carries the file's,
and a multipart upload is created with ChecksumAlgorithm=CRC32C, each
UploadPart carrying its part's, so the store keeps a composite checksum of the
parts' (botocore would otherwise compute a CRC32 of every request once more).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import email.utils
import functools
import logging
import secrets
import string
import time
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import botocore.exceptions
from crc32c import crc32c

from drive_client.errors import (
    DriveError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from drive_client.wire import SMALL_FILE

from ..checksums import BLOCK_SIZE, Checksums, ClientChecksums, Readable, RunningCrc32c, range_crc32c, table_entries
from ..config import Named, flag
from ..s3index.lister import endpoint_of, make_client, map_error
from ..s3index.reader import first_byte
from .base import (
    ROOTS_AT_ONCE,
    Backend,
    BeforeVisible,
    ChangedWhileRead,
    Chunks,
    ClientTooSlow,
    Damaged,
    EndsBefore,
    Holder,
    Holding,
    Listing,
    Missing,
    ObjectInfo,
    Removed,
    StoredFileError,
    SummedChunks,
    TooLarge,
    Upload,
    UploadGone,
    check_received,
    each_root,
    is_a_folder,
    parent_is_file,
)
from .stored import ENTRY, check_blocks

log = logging.getLogger("drived")

PART_SIZE = 8 << 20  # bytes per UploadPart; a file smaller than this is one PutObject
MAX_PARTS_IN_FLIGHT = 8  # over all uploads (8 × 8 MiB)
PARTS_IN_MEMORY = 24  # over all uploads, being filled or sent: bounds the memory they hold (24 × 8 MiB)
MAX_PARTS = 10_000  # S3's limit of parts in one upload
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8
CHECKSUMS = "~checksums"  # the folder of checksum objects, beside the drives
LIVE = "~uploads"  # the folder of each daemon's list of its live uploads, beside the drives
TABLE_IN_CHECKSUMS = "in-checksums"  # a multipart object's `blocks`: its block table is its checksum object's bytes
THREADS = 32  # boto3 calls and body reads
PAGE = 1000  # ListObjectsV2 MaxKeys
MAX_GENERATION = (1 << 63) - 1  # a generation is an int64 on the wire
# Checksum objects whose delete the store failed, remembered for the next sweep: a key of at most 1 KiB each.
LEFTOVERS_KEPT = 10_000
# Abandoned uploads, and remembered checksum objects, a sweep deletes at once: each a few requests to the store.
SWEEP_AT_ONCE = 8
READ_RETRIES = 3  # times a read resumes after its connection dropped, or starts again on a version replaced
# How long the start-up waits for the store's answer to its bucket check: boto3 waits 60 s for each of its tries,
# and a daemon that serves nothing for minutes is killed by a liveness probe before it logs why.
START_CHECK_SECONDS = 10.0
T = TypeVar("T")


def _checksums_name(generation: int) -> str:
    """The name of a multipart upload's checksum object: its generation, and a tag of its own."""
    return f"{generation}-{secrets.token_hex(4)}"


def _metadata(sums: Checksums) -> dict[str, str]:
    """An object's checksums as S3 user metadata."""
    return {"sha256": sums.sha256, "crc32c": f"{sums.crc32c:08x}"}


def _crc32c_header(crc: int) -> str:
    """A CRC32C as S3's checksum headers and part lists spell it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _checksums_of(metadata: dict[str, str]) -> tuple[str, int | None]:
    """(sha256, CRC32C) from an object's metadata; "" and None for what it lacks (an object of an earlier drived
    has no CRC32C)."""
    crc = metadata.get("crc32c", "")
    is_hex = len(crc) == 8 and all(c in string.hexdigits for c in crc)
    return metadata.get("sha256", ""), int(crc, 16) if is_hex else None


def _is_generation(text: str) -> bool:
    """Whether `text` is a generation drived gives: a number of ns that fits an int64."""
    return text.isdigit() and int(text) <= MAX_GENERATION


def _written_by_drived(answer: dict[str, Any]) -> bool:
    """Whether the object of a HEAD or GET `answer` is one drived wrote: its metadata holds a generation and its
    sha256, or names its checksum object. Any other (put in the prefix by something else) is no file, for the reads
    and for the checks of a put alike."""
    metadata = answer.get("Metadata") or {}
    return _is_generation(metadata.get("generation", "")) and bool(metadata.get("sha256") or metadata.get("checksums"))


def _holding(answer: dict[str, Any]) -> Holding:
    """What the object of a HEAD's `answer` is: a file drived wrote, or an object it did not."""
    return "file" if _written_by_drived(answer) else "foreign"


async def _at_once(steps: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Runs `steps`, SWEEP_AT_ONCE at a time."""
    for start in range(0, len(steps), SWEEP_AT_ONCE):
        await asyncio.gather(*(step() for step in steps[start:start + SWEEP_AT_ONCE]))


def _checksums_used(answer: dict[str, Any] | None) -> str:
    """The name of the checksum object that the object of a HEAD's `answer` uses ("": none, or no object)."""
    return str(((answer or {}).get("Metadata") or {}).get("checksums", ""))


def _table_in_metadata(key: str, text: str) -> BlockTable:
    """The block table a small file keeps in its metadata (`blocks`: base64 of its entries)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise Damaged(key, "the block table in its metadata is not one drived writes") from None
    return BlockTable(0, table_entries(raw[:len(raw) - len(raw) % ENTRY]))


def _blocks_end(position: int) -> int:
    """The end of the block that holds the byte before `position`: where a read up to `position` stops fetching."""
    return -(-position // BLOCK_SIZE) * BLOCK_SIZE


def _nothing_from(key: str, offset: int, info: ObjectInfo) -> tuple[ObjectInfo, Chunks]:
    """A read from `offset`, at or past the end of the version of `info`: nothing to send at its end, EndsBefore
    (naming that version) past it."""
    if offset > info.size:
        raise EndsBefore(key, f"offset {offset} (it has {info.size} bytes)", sha256=info.sha256)
    return info, SummedChunks(None, RunningCrc32c(), key)


def _code(err: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a boto3 failure ("", 0 for one without an answer)."""
    if isinstance(err, botocore.exceptions.ClientError):
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return str(err.response.get("Error", {}).get("Code", "")), status
    return "", 0


def _missing(err: BaseException) -> bool:
    code, status = _code(err)
    return code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket")


def _counted_size(answer: dict[str, Any] | None) -> int:
    """What the object of a HEAD answer (None: none) counts in `usage`: its size as the listing gives it."""
    return int(answer["ContentLength"]) if answer else 0


def _server_time(answer: dict[str, Any]) -> datetime:
    """The store's clock at `answer` (its Date header), so expiry does not depend on this machine's clock."""
    date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return email.utils.parsedate_to_datetime(date) if date else datetime.now(timezone.utc)


def _name_bound(last: str) -> str:
    """The least name that a folder listing can still give after its key `last` (a name, or a name + "/").

    S3 lists in key order, where a sub-folder "a" sorts as "a/": after "a.txt",
    "a-b". Listed names come out in name order, so a name is held back until
    every name still to come is known to be greater.
    """
    for i in range(1, len(last)):
        if last[i] < "/":
            return last[:i]  # a folder of this name has a key ("a/") after `last` ("a.txt")
    return last.rstrip("/")


class BlockTable:
    """The entries of an object's block table (`stored.Ends`) from block `first` on: those a ranged read checks."""

    def __init__(self, first: int, ends: array[int]) -> None:
        self._first = first
        self._ends = ends

    def at(self, index: int) -> int:
        if index < 0:
            return 0
        if not 0 <= index - self._first < len(self._ends):
            raise EOFError(f"block {index} has no entry")
        return self._ends[index - self._first]


class CheckedRange:
    """The bytes [offset, end) of a ranged read, cut from the whole blocks it touches (fetched from `start`, the first
    one's start).

    `blocks(read)` reads them a chunk of whole blocks at a time through
    `read`, in a worker thread, which checks each block against `table`
    before any of it is yielded: a damaged block raises `Damaged` in place of
    its chunk. Without a table (a file of an earlier drived, which keeps none)
    the bytes are only summed, and S3's own integrity is all they have.
    `crc32c` is of the bytes yielded: from the table's entries and the
    CRC32Cs at the range's two ends (`stored.check_blocks`), with no second
    pass over them.
    """

    def __init__(self, key: str, table: BlockTable | None, start: int, offset: int, end: int,
                 blocks: Callable[[Callable[[Readable, int], bytes]], AsyncIterator[bytes]]) -> None:
        self._key = key
        self._table = table
        self._offset = offset
        self._end = end
        self._position = start  # where the next chunk read starts
        # The CRC32C of the file up to `offset`, and up to the last byte yielded (without a table: 0, and that of
        # the bytes yielded, which `range_crc32c` then answers as it is).
        self._before = self._through = 0
        self._blocks = blocks(self.read)

    @property
    def crc32c(self) -> int:
        return range_crc32c(self._before, self._through, max(min(self._position, self._end) - self._offset, 0))

    def _asked(self, data: bytes, begin: int) -> memoryview:
        """The bytes of `data`, read from byte `begin` on, that the range asks for."""
        return memoryview(data)[max(self._offset - begin, 0):min(self._end, begin + len(data)) - begin]

    def read(self, body: Readable, size: int) -> bytes:
        """Runs in a worker thread: the next `size` bytes of `body`, whole blocks, checked; b"" when the store ends
        them early (then `_chunks` says so: nothing of a block cut short is yielded)."""
        data = body.read(size)
        while len(data) < size:
            more = body.read(size - len(data))
            if not more:
                return b""
            data += more
        begin = self._position
        if self._table is None:
            self._through = crc32c(self._asked(data, begin), self._through)
        else:
            self._check(memoryview(data), begin, self._table)
        self._position += size
        return data

    def _check(self, data: memoryview, begin: int, table: BlockTable) -> None:
        """Checks `data`, whole blocks from byte `begin` on, and notes the CRC32Cs of the file at the range's ends."""
        try:
            damaged, at_cuts = check_blocks(data, begin // BLOCK_SIZE, BLOCK_SIZE, table, (self._offset, self._end))
            if damaged is not None:
                raise Damaged(self._key, f"the block at byte {damaged} does not match its CRC32C")
            if begin <= self._offset:
                self._before = at_cuts[self._offset] if self._offset % BLOCK_SIZE else table.at(
                    self._offset // BLOCK_SIZE - 1)
            stop = begin + len(data)
            through = min(stop, self._end)
            self._through = at_cuts[through] if through in at_cuts else table.at(-(-stop // BLOCK_SIZE) - 1)
        except EOFError:
            raise Damaged(self._key, "its block table is cut short") from None

    def __aiter__(self) -> CheckedRange:
        return self

    async def __anext__(self) -> memoryview:
        data = await anext(self._blocks)
        return self._asked(data, self._position - len(data))

    async def aclose(self) -> None:
        await self._blocks.aclose()  # type: ignore[attr-defined]


class PartBuffers:
    """The parts uploads hold in memory: at most `limit` over all uploads, in buffers reused from part to part.

    A part takes its room before its first byte (a file's first part, which
    grows, once it passes `SMALL_FILE`: a small file takes none) and gives
    it back once it is sent or dropped, so what uploads hold stays bounded
    whatever their clients do: a client that stalls keeps its part's room
    until its stream is ended for idleness, and other uploads wait for room
    before their next part. An upload hands its full parts on before it
    waits, so the room is held by parts being filled or sent, never by one
    waiting for room, and a waiting upload gets room as sends end. A part
    whose client has kept it waiting longer than the backend's
    `fill_seconds` in all, while others want room, ends its stream
    (`S3Upload.write` raises ClientTooSlow): a client that sends a byte now
    and then cannot keep room from others for ever. Only the waits that
    overlap others wanting room count: `wanted_seconds` is a clock that runs
    while the waiting list is not empty, read by an upload as each write
    returns and again at its next write, so a slow client that took no room
    from anyone has lost no time when others start waiting. Its upload keeps
    the parts it sent (held for a resume when resumable), so a slow client
    goes on from its last part sent rather than from its first byte.

    A fresh buffer of a part's size is mapped anew by malloc, and filling it
    costs a page fault per page; one grown a chunk at a time is also copied
    again as it grows. Reused, a part costs one copy of its bytes (a file's
    short last part two: they are copied out of its buffer, which is kept
    rather than cut to their size). At most `keep` free buffers stay (what
    the parts in flight give back), and none when no part holds room, so an
    idle daemon keeps none and a burst of uploads leaves no more.
    """

    def __init__(self, size: int, keep: int, limit: int) -> None:
        self.size = size
        self.keep = keep
        self.limit = limit
        self._free: list[bytearray] = []
        self._lent = 0  # parts holding room
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._wanted_before = 0.0  # seconds the waiting list was not empty, up to `_wanted_since`
        self._wanted_since: float | None = None  # when the waiting list last became non-empty; None: it is empty

    async def make_room(self) -> None:
        """Room for a part, once there is some, in turn."""
        if self.room_now():
            return
        room = asyncio.get_running_loop().create_future()
        self._waiting.append(room)
        self._note_wanted()
        try:
            await room  # given its room by a part that gave it back
        except asyncio.CancelledError:
            if room.done() and not room.cancelled():
                self._hand_over()  # given room while being cancelled: it goes to the next in turn
            elif room in self._waiting:
                self._waiting.remove(room)
                self._note_wanted()
            raise

    @property
    def wanted(self) -> bool:
        """Whether an upload waits for room."""
        return bool(self._waiting)

    def wanted_seconds(self) -> float:
        """Seconds, in all, that some upload has waited for room: the difference of two readings is how much of
        the time between them others wanted room."""
        if self._wanted_since is None:
            return self._wanted_before
        return self._wanted_before + time.monotonic() - self._wanted_since

    def _note_wanted(self) -> None:
        """Starts or stops the clock of `wanted_seconds` when the waiting list has become non-empty or empty."""
        if self._waiting and self._wanted_since is None:
            self._wanted_since = time.monotonic()
        elif not self._waiting and self._wanted_since is not None:
            self._wanted_before += time.monotonic() - self._wanted_since
            self._wanted_since = None

    def room_now(self) -> bool:
        """Room for a part if there is some now and no one waits for it (True: taken)."""
        if self._lent >= self.limit or self._waiting:
            return False
        self._lent += 1
        return True

    def buffer(self) -> bytearray:
        """A part-sized buffer, for a part that has room."""
        return self._free.pop() if self._free else bytearray(self.size)

    def give_back(self, part: bytearray | None) -> None:
        """A part's room back: `part` is kept for reuse when it is part-sized, and not None (None: a thread may
        still read it)."""
        if part is not None:
            self.reuse(part)
        self._hand_over()

    def reuse(self, part: bytearray) -> None:
        """Keeps `part` for the next part to take, when it is part-sized and fewer than `keep` are kept; the room
        it had stays lent."""
        if len(part) == self.size and len(self._free) < self.keep:
            self._free.append(part)

    def _hand_over(self) -> None:
        """Room given back goes to the first upload waiting, if any."""
        while self._waiting:
            room = self._waiting.popleft()
            if not room.done():
                room.set_result(None)  # the room stays lent, now to it
                self._note_wanted()
                return
        self._note_wanted()
        self._lent -= 1
        if not self._lent:
            self._free.clear()


async def _all_or_first_failure(*steps: Awaitable[Any]) -> list[Any]:
    """The answers of `steps`, run at once; or the first of them to fail raises, once the others still running are
    cancelled and have ended: a commit refused asks the store nothing more, and leaves nothing running behind it.
    Cancelled, it cancels them all and waits for them to end too."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    ended: list[asyncio.Future[Any]] = []  # in the order they ended: the failure raised is the first, as gather's
    for task in tasks:
        task.add_done_callback(ended.append)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        failures = [error for task in ended if not task.cancelled() and (error := task.exception())]  # each retrieved
    if failures:
        raise failures[0]
    return [task.result() for task in tasks]


class S3Upload(Upload):
    """An upload of one key: buffered up to a part, then a multipart upload with parts in flight.

    Each part holds room among the backend's `PartBuffers` until it is
    hashed and sent (or dropped); a file's first part grows in a buffer of
    its own, the parts after it fill the backend's part-sized ones.
    """

    def __init__(self, backend: S3Backend, key: str) -> None:
        self._backend = backend
        self._key = key
        self._checksums = Checksums()
        self._buffer: bytearray | None = None  # the part being filled; None: one is taken at the next byte
        self._filled = 0  # bytes in it
        self._roomy = False  # whether it holds room (a file's first part only once it passed SMALL_FILE)
        self._kept_waiting = 0.0  # seconds the client kept the part being filled waiting while others wanted room,
        # since it took room
        self._wanted_written = backend.part_buffers.wanted_seconds()  # its reading as the last write returned
        self._full: list[bytearray] = []  # parts filled and not yet handed on
        self._handed = 0  # bytes handed on as parts: what a suspended upload keeps
        self._handing: asyncio.Future[None] | None = None  # the handing on of the last part
        self._hashing: asyncio.Future[int] | None = None  # the hashing of the last part handed on: its CRC32C
        self._upload_id = ""
        self._generation = 0
        self._checksums_name = ""  # the name of the checksum object of a multipart upload
        self._preparing: asyncio.Future[None] | None = None  # the writing of that object
        self._parts: list[asyncio.Future[dict[str, Any]]] = []
        self._replacing: asyncio.Future[dict[str, Any] | None] | None = None  # the HEAD of the version it replaces
        self._committing: asyncio.Future[Any] | None = None
        self._ended = False

    @property
    def held(self) -> int:
        return self._handed

    async def write(self, data: bytes | memoryview) -> None:
        """Copies `data` into parts. Waits for room before a part's bytes: a cancelled write keeps what it copied,
        and loses no more than bytes after the last part handed on, which a cut stream's upload drops anyway
        (`suspend`). Raises ClientTooSlow before taking any of `data` when the part being filled has kept its
        room from others too long (`PartBuffers`): `suspend` then gives that room back."""
        view = memoryview(data)
        buffers = self._backend.part_buffers
        if self._buffer is not None and self._roomy:
            self._kept_waiting += buffers.wanted_seconds() - self._wanted_written
            if buffers.wanted and 0 < self._backend.fill_seconds < self._kept_waiting:
                raise ClientTooSlow(
                    self._key, f"its client took more than {self._backend.fill_seconds:g} s "
                    f"({self._backend.named('stream_idle_timeout')}) "
                    f"to send a part's {PART_SIZE >> 20} MiB while other uploads waited for the memory it holds"
                )
        while len(view):
            if self._buffer is None:
                while self._full:  # the room this upload holds goes on to be sent before it waits for more
                    await self._hand_on()
                if self._handed:
                    await buffers.make_room()
                    self._buffer, self._roomy, self._kept_waiting = buffers.buffer(), True, 0.0
                else:
                    self._buffer, self._roomy = bytearray(), False  # a file's first part: maybe a small file
            if not self._roomy and self._filled + len(view) > SMALL_FILE:
                await buffers.make_room()
                self._roomy, self._kept_waiting = True, 0.0
            piece = view[:PART_SIZE - self._filled]
            if len(self._buffer) == PART_SIZE:
                with memoryview(self._buffer) as buffer:  # a bytearray's own slice assignment copies a view twice
                    buffer[self._filled:self._filled + len(piece)] = piece
            else:
                self._buffer += piece
            self._filled += len(piece)
            view = view[len(piece):]
            if self._filled == PART_SIZE:
                self._full.append(self._buffer)
                # Taken now when there is room, not at the next byte: a buffer stays lent for the whole upload, so
                # the free ones are kept even when every part sent has come back.
                self._buffer, self._filled = None, 0
                if buffers.room_now():
                    self._buffer, self._roomy, self._kept_waiting = buffers.buffer(), True, 0.0
        while self._full:
            await self._hand_on()
        self._wanted_written = buffers.wanted_seconds()

    async def _hand_on(self) -> None:
        """Makes the first full part the next part, hashed and sent after the part before it.

        Shielded, and forgotten only once done: a part begun is hashed and
        sent whole even when the caller is cancelled, so the hashes always
        cover exactly the bytes handed on.
        """
        await self._handed_on()
        if not self._full:  # dropped meanwhile (suspended or aborted)
            return
        part = self._full.pop(0)
        self._handed += len(part)
        self._handing = asyncio.ensure_future(self._send_part(part))
        await self._handed_on()

    async def _handed_on(self) -> None:
        """Waits for the part being handed on, if any (raising its failure)."""
        if self._handing is not None:
            await asyncio.shield(self._handing)
            self._handing = None

    def _cut_short(self) -> None:
        """Makes the bytes being filled a (last, short) part of its own."""
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            return
        # A part-sized buffer (a file's grown first part commits as a small file): taken when the part before
        # filled, it is given back empty, or its bytes are copied out to be sent and it is kept for the next
        # upload's part, which a fresh buffer would cost a page fault per page.
        if self._filled:
            self._full.append(buffer[:self._filled])  # holds the room the buffer held
            self._backend.part_buffers.reuse(buffer)
        else:
            self._backend.part_buffers.give_back(buffer)
        self._filled = 0

    def _drop_unsent(self) -> None:
        """Drops the bytes not handed on, giving their room back."""
        parts = [*self._full, self._buffer] if self._buffer is not None and self._roomy else self._full
        self._full, self._buffer, self._filled = [], None, 0
        for part in parts:
            self._backend.part_buffers.give_back(part)

    async def suspend(self) -> None:
        """Keeps the parts sent and drops the rest (at most a part or two, sent again on resume)."""
        await self._handed_on()
        self._drop_unsent()
        await asyncio.gather(*self._parts)
        if self._hashing is not None:
            await self._hashing

    async def _hash(self, data: bytearray) -> asyncio.Future[int]:
        """Hashes `data` in a worker thread, after the data before it; answers the future of its CRC32C."""
        if self._hashing is not None:
            await self._hashing
        hashing: asyncio.Future[int] = self._backend.run(self._sum, data)
        self._hashing = hashing
        return hashing

    def _sum(self, data: bytearray) -> int:
        """Runs in a worker thread: adds `data` to the upload's checksums; the CRC32C of `data` alone, from those
        of the upload before and after it (no second pass over its bytes)."""
        before = self._checksums.crc32c
        self._checksums.update(data)
        return range_crc32c(before, self._checksums.crc32c, len(data))

    async def _send_part(self, part: bytearray) -> None:
        uses: list[asyncio.Future[Any]] = []  # what reads `part`: it is given back when they are done
        try:
            if len(self._parts) == MAX_PARTS:
                raise TooLarge(
                    self._key, f"is larger than {MAX_PARTS * PART_SIZE >> 30} GiB, the largest file "
                    f"{self._backend.named('storage')} keeps (S3 takes 10,000 parts): split it"
                )
            for sent in self._parts:  # a failed part fails the put now, not at its end
                error = sent.exception() if sent.done() else None
                if error is not None:
                    raise error
            summed = await self._hash(part)
            uses.append(summed)
            if not self._upload_id:
                await self._make_upload()
            await self._backend.part_room.acquire()
            sending = self._backend.upload_part(self._key, self._upload_id, len(self._parts) + 1, part, summed)
            sending.add_done_callback(self._part_sent)
            self._parts.append(sending)
            uses.append(sending)
        finally:
            self._give_back_after(part, uses)

    async def _make_upload(self) -> None:
        """Checks the place and creates the multipart upload at once, before storing anything the commit would
        refuse: one round trip before the first part, not two. An upload made for a place the check refuses is
        aborted with the put."""
        self._generation = time.time_ns()
        self._checksums_name = _checksums_name(self._generation)
        made, checked = await asyncio.gather(
            self._backend.create_upload(self._key, self._generation, self._checksums_name),
            self._backend.check_place(self._key),
            return_exceptions=True,
        )
        if isinstance(made, str):
            self._upload_id = made
        for outcome in (checked, made):
            if isinstance(outcome, BaseException):
                raise outcome

    def _give_back_after(self, part: bytearray, uses: list[asyncio.Future[Any]]) -> None:
        """Gives `part` back once `uses` are done; not for reuse if one was cancelled (its thread may read on)."""
        left = len(uses)

        def done(_: asyncio.Future[Any]) -> None:
            nonlocal left
            left -= 1
            if not left:
                self._backend.part_buffers.give_back(None if any(u.cancelled() for u in uses) else part)

        if not uses:
            self._backend.part_buffers.give_back(part)
        for use in uses:
            use.add_done_callback(done)

    def _part_sent(self, _: asyncio.Future[dict[str, Any]]) -> None:
        self._backend.part_room.release()

    def _replaced(self) -> asyncio.Future[dict[str, Any] | None]:
        """The HEAD of the version of the key that the commit replaces (None: none), asked once (`replacing`)."""
        if self._replacing is None:
            self._replacing = asyncio.ensure_future(self._backend.replaced(self._key))
        return self._replacing

    async def replacing(self) -> int:
        return _counted_size(await self._replaced())

    async def commit(
        self, sent: ClientChecksums, size: int | None = None, before_visible: BeforeVisible | None = None,
        checks: asyncio.Future[None] | None = None,
    ) -> ObjectInfo:
        sums = self._checksums
        # The caller's checks, beside the store's own: shielded where gathered, for the caller awaits their outcome
        # after a failure (`_all_or_first_failure` cancels the others).
        theirs = () if checks is None else (checks,)
        try:
            await self._handed_on()
            if not self._upload_id and not self._full:  # a small file, all in its first buffer
                data = self._buffer or bytearray()  # left the part being filled: abort gives its room back
                await (await self._hash(data))
                check_received(self._key, sums, sent, size)
                replaced, *_ = await _all_or_first_failure(self._replaced(), self._backend.check_place(self._key),
                                                           *map(asyncio.shield, theirs))
                if before_visible is not None:
                    await before_visible()
                self._committing = asyncio.ensure_future(self._backend.put_small(self._key, data, sums, replaced))
                return await asyncio.shield(self._committing)
            self._cut_short()
            while self._full:
                await self._hand_on()
            await self._hashing  # type: ignore[misc]  # a multipart upload has hashed a part
            check_received(self._key, sums, sent, size)
            # At once, beside the last parts in flight: the folders checked again (a conflicting put may have
            # committed since the first part), and the checksum object, written just before the commit (the sweep
            # takes it for a leftover once it is older than upload_expiry), with the commit's generation: the
            # upload's own dates from its first part, which a resumed upload's commit may follow by minutes, after
            # other versions of its path.
            self._generation = time.time_ns()
            self._preparing = asyncio.ensure_future(
                self._backend.prepare_completion(self._key, self._checksums_name, sums, self._generation))
            # The parts and the checksum object shielded: their requests run on in threads, so a put that fails lets
            # them end before abort() aborts the upload and forgets the checksum object.
            parts, replaced, *_ = await _all_or_first_failure(
                asyncio.shield(asyncio.gather(*self._parts)), self._replaced(), asyncio.shield(self._preparing),
                self._backend.check_place(self._key), *map(asyncio.shield, theirs))
            if before_visible is not None:
                await before_visible()
            self._committing = asyncio.ensure_future(self._backend.complete_upload(
                self._key, self._upload_id, self._checksums_name, parts, replaced))
            # Shielded: a cancelled put lets its commit end before abort() looks at what is left.
            await asyncio.shield(self._committing)
            self._upload_id = ""
            return ObjectInfo(self._key, sums.size, sums.sha256, self._generation, sums.crc32c)
        finally:
            await self.abort()

    async def abort(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._drop_unsent()
        # Shielded and tracked by the backend: a cancelled put still aborts its multipart upload.
        await asyncio.shield(self._backend.keep(self._discard()))

    async def _discard(self) -> None:
        if self._handing is not None:  # a part it hands on (once it gets room) is among those awaited below
            await asyncio.wait([self._handing])
        running = [f for f in (self._committing, self._preparing, self._hashing, *self._parts)
                   if f is not None]
        if running:
            await asyncio.wait(running)  # a part still being sent would outlive the abort
        if self._committing is not None and not self._committing.cancelled() and not self._committing.exception():
            self._upload_id = ""  # committed while the put was cancelled
        if self._upload_id:
            await self._backend.abort_upload(self._key, self._upload_id)
            if self._preparing is not None:
                await self._backend.forget_unused_checksums(self._key, self._checksums_name)


class S3Backend(Backend):
    """Objects in one bucket under one prefix, through boto3 in a thread pool."""

    def __init__(self, bucket: str, prefix: str, chunk_size: int = 1 << 20, upload_expiry: float = 60.0,
                 fill_seconds: float = 60.0, named: Named = flag) -> None:
        self.bucket = bucket
        self.named = named  # --storage and the others as the operator gave them, which messages name
        self.root = prefix  # "" or ending in "/"
        self.chunk_size = chunk_size
        self.fill_seconds = fill_seconds  # a client's waits a part may hold room for while others want it (0: any)
        self.upload_expiry = upload_expiry
        self._pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="s3-store")
        self.client = make_client(pool=THREADS, s3={"payload_signing_enabled": False})
        self.endpoint = endpoint_of(self.client)
        self.part_room = asyncio.Semaphore(MAX_PARTS_IN_FLIGHT)
        self.part_buffers = PartBuffers(PART_SIZE, keep=MAX_PARTS_IN_FLIGHT, limit=PARTS_IN_MEMORY)
        self._live: set[str] = set()  # this daemon's multipart uploads in progress: never swept
        # Others' uploads with no part at the last sweep: one is abandoned only when two sweeps, an upload_expiry
        # apart, find it so, for its start's date may be wrong (moto_server dates every upload 2010-11-10), and a
        # sweep between another daemon's CreateMultipartUpload and its first part would abort a live upload.
        self._partless: set[str] = set()
        # (key, name) of checksum objects the next sweep deletes; name "": those of key its object does not use
        self._leftovers: set[tuple[str, str]] = set()
        self._left_in_store = 0  # checksum objects past LEFTOVERS_KEPT since the last sweep: the first is logged
        self._background: set[asyncio.Future[Any]] = set()
        self._live_key = f"{self.root}{LIVE}/{secrets.token_hex(8)}"  # where this daemon lists `_live`
        self._sweepers: list[asyncio.Task[None]] = []

    # -- plumbing ------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Runs a blocking call in the backend's threads."""
        return asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def keep(self, work: Any) -> asyncio.Future[Any]:
        """Runs `work` to its end even when its caller is cancelled; `close` waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def failure(self, err: BaseException, key: str = "") -> DriveError:
        """The DriveError for a boto3 failure on `key` (a key of this backend)."""
        code, _ = _code(err)
        if code == "NoSuchBucket":
            return NotFound(
                f"the S3 bucket {self.bucket!r} of {self.named('storage')} does not exist at {self.endpoint}: "
                "create it"
            )
        if code == "NoSuchUpload":
            return UploadGone(key, f"no part for {self.upload_expiry:g} s, or the store dropped it")
        if code in ("PreconditionFailed", "InvalidRange") or (_missing(err) and key):
            return DriveError(f"S3 error on s3://{self.bucket}/{self.root}{key} at {self.endpoint}: {code}")
        return map_error(err, self.client, self.bucket, self.root + key if key else "")

    async def call(self, method: str, key: str = "", **params: Any) -> Any:
        """Calls the boto3 method in a thread; failures become DriveErrors."""
        try:
            return await self.run(getattr(self.client, method), Bucket=self.bucket, **params)
        except Exception as err:
            raise self.failure(err, key) from err

    async def _head(self, name: str) -> dict[str, Any] | None:
        """HeadObject of the full key `name`, or None when there is no such object."""
        try:
            return await self.run(self.client.head_object, Bucket=self.bucket, Key=name)
        except Exception as err:
            if _missing(err):
                return None
            raise self.failure(err, name[len(self.root):]) from err

    def _checksums_key(self, key: str, name: str = "") -> str:
        return f"{self.root}{CHECKSUMS}/{key}/{name}"

    async def _info(self, key: str, answer: dict[str, Any], size: int, blocks: range | None = None
                    ) -> tuple[ObjectInfo | None, BlockTable | None]:
        """The info of the object in a HEAD or GET answer (None for an object drived did not write), and with
        `blocks` (those a ranged read checks) the entries of its block table from the block before them: None for
        an object of an earlier drived, which keeps none.

        Raises ChangedWhileRead when a multipart object's checksum object is
        gone because a put or delete replaced the object after `answer`: that
        put or delete removes the checksum object of the version it replaced.
        Raises Damaged when it is gone from under the object still there, or
        holds no sha256 (its metadata, all it holds, lost: restored by a tool
        that keeps none) or a generation drived does not give: lost behind the
        daemon's back, it leaves bytes that nothing can check. So does a block
        table asked for and lost.
        """
        if not _written_by_drived(answer):
            return None, None
        metadata = answer["Metadata"]
        generation = metadata["generation"]
        sha256, crc = _checksums_of(metadata)
        table = None
        if not sha256:
            name = self._checksums_key(key, metadata["checksums"])
            in_checksums = blocks if metadata.get("blocks") == TABLE_IN_CHECKSUMS else None
            checksums, table = await self._checksums_object(key, name, in_checksums)
            if checksums is None:
                if not await self._unchanged(key, answer):
                    raise ChangedWhileRead(key, "was replaced or deleted")
                raise Damaged(key, f"its checksum object {name} is missing")
            held = checksums.get("Metadata") or {}
            sha256, crc = _checksums_of(held)
            if not sha256:
                raise Damaged(key, f"its checksum object {name} has lost its metadata (no sha256)")
            generation = held.get("generation", generation)  # its commit's (an earlier drived's names none)
            if not _is_generation(generation):
                raise Damaged(key, f"its checksum object {name} holds no generation drived gives")
        elif blocks is not None and "blocks" in metadata:
            table = _table_in_metadata(key, metadata["blocks"])
        return ObjectInfo(key, size, sha256, int(generation), crc), table

    async def _checksums_object(self, key: str, name: str, blocks: range | None
                                ) -> tuple[dict[str, Any] | None, BlockTable | None]:
        """The HEAD of `key`'s checksum object `name` (None: there is none); with `blocks`, a ranged GET of it
        instead, which answers its metadata too, and the entries of its block table from the block before them:
        a ranged read costs no round trip more than a whole one. The object's name is its commit's own, and it is
        never rewritten: its table is that of the version whose metadata names it."""
        if blocks is None:
            return await self._head(name), None
        first = max(blocks.start - 1, 0)

        def get() -> tuple[dict[str, Any], bytes]:
            answer = self.client.get_object(Bucket=self.bucket, Key=name,
                                            Range=f"bytes={first * ENTRY}-{blocks.stop * ENTRY - 1}")
            return answer, answer["Body"].read()

        try:
            answer, raw = await self.run(get)
        except Exception as err:
            if _missing(err):
                return None, None
            if _code(err)[0] == "InvalidRange":
                raise Damaged(key, f"its checksum object {name} has lost its block table") from None
            raise self.failure(err, key) from err
        # A gateway may answer the range of a small object with all of it (HTTP allows it): its entries then start
        # at the table's first, which the cut below drops.
        raw = raw[max(first * ENTRY - first_byte(answer), 0):]
        return answer, BlockTable(first, table_entries(raw[:len(raw) - len(raw) % ENTRY]))

    async def _unchanged(self, key: str, answer: dict[str, Any]) -> bool:
        """Whether the object at `key` is still the version of `answer` (a HEAD or GET of it)."""
        now = await self._head(self.root + key)
        return now is not None and now["ETag"] == answer["ETag"]

    async def _again_if_replaced(self, look: Callable[[], Awaitable[T]]) -> T:
        """`look`, asked again (READ_RETRIES times at most) while the version it looks at is replaced before it
        has read its checksum object, or before the HEAD of a read the store refused as past its end: a new version
        stands whole in the store by then, so it answers that one."""
        for _ in range(READ_RETRIES):
            with contextlib.suppress(ChangedWhileRead):
                return await look()
        return await look()

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Checks the bucket, sweeps uploads left behind, and starts sweeping every `upload_expiry` seconds.

        A missing bucket ends the start-up (SystemExit saying to create it):
        it is a mistake in the deployment, not a passing state. An unreachable
        store (or one that does not answer within START_CHECK_SECONDS) or
        refused access does not (credentials may be granted later): calls
        answer UNAVAILABLE or PERMISSION_DENIED until it is fixed.
        """
        try:
            await asyncio.wait_for(self.call("head_bucket"), START_CHECK_SECONDS)
        except asyncio.TimeoutError:
            log.warning("storage not usable at start-up", extra={"fields": {
                "error": f"the S3 endpoint {self.endpoint} did not answer within {START_CHECK_SECONDS:g} s"}})
        except NotFound:
            raise SystemExit(
                f"drived: {self.named('storage')}: the S3 bucket {self.bucket!r} does not exist at {self.endpoint}: "
                "create it, or point AWS_ENDPOINT_URL at the store that has it"
            ) from None
        except DriveError as err:
            log.warning("storage not usable at start-up", extra={"fields": {"error": str(err)}})
        self._sweepers = [asyncio.create_task(self._sweep_forever()), asyncio.create_task(self._list_live_forever())]

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except DriveError as err:
                log.warning("sweeping abandoned uploads failed", extra={"fields": {"error": str(err)}})
            await asyncio.sleep(self.upload_expiry)

    async def _list_live_forever(self) -> None:
        """Rewrites this daemon's list of its live uploads every third of upload_expiry while it has some, so that
        the sweeps of the daemons sharing the prefix pass over them (`_live_elsewhere`)."""
        while True:
            await asyncio.sleep(self.upload_expiry / 3)
            if self._live:
                try:
                    await self.call("put_object", Key=self._live_key, Body="\n".join(self._live).encode())
                except DriveError as err:
                    log.warning("listing live uploads failed", extra={"fields": {"error": str(err)}})

    async def close(self) -> None:
        for sweeper in self._sweepers:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        if self._background:
            await asyncio.wait(set(self._background))
        # In a thread: a store that does not answer holds the pool's threads, and the daemon's stop bounds its wait.
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)

    # -- uploads -------------------------------------------------------------

    async def check_place(self, key: str) -> None:
        """Raises InvalidArgument when `key` (`<drive>/<component>/<path>`) is a folder or one of its path's parents is
        an object. `<drive>` and `<drive>/<component>` are not asked about: names hold no '/', so no put makes an
        object there."""
        parents = [key[:i] for i, c in enumerate(key) if c == "/"][2:]
        objects, folder = await self._occupied(parents, key)
        if folder:
            raise is_a_folder(key)
        if any(objects):
            raise parent_is_file(key)

    async def start_upload(self, key: str) -> Upload:
        """Begins an upload; the folder checks run at its commit, and before the first part of a big one.

        Refuses a key the store cannot hold: S3 keys take at most MAX_KEY_BYTES, and a big file's checksum object
        has the longest key of a file's (moto takes any, real stores refuse it only when the bytes have been sent).
        """
        longest = len(self._checksums_key(key, _checksums_name(time.time_ns())).encode())
        if longest > MAX_KEY_BYTES:
            raise InvalidArgument(
                f"the path is too long for the daemon's {self.named('storage')}: behind its prefix, the drive and "
                f"the component, its checksum object's key would take {longest} bytes, and S3 keys hold at most "
                f"{MAX_KEY_BYTES}: use a shorter path"
            )
        return S3Upload(self, key)

    async def replaced(self, key: str) -> dict[str, Any] | None:
        """The HEAD of the version of `key` that a commit replaces (None: none)."""
        return await self._head(self.root + key)

    async def put_small(self, key: str, data: bytearray, sums: Checksums, replaced: dict[str, Any] | None
                        ) -> ObjectInfo:
        """Makes `data` the object (the commit), then forgets the checksum object of the version `replaced` (a big
        file's: a small one keeps its checksums in its own metadata)."""
        generation = time.time_ns()
        metadata = {"generation": str(generation), **_metadata(sums),
                    "blocks": base64.b64encode(sums.block_table()).decode()}  # 44 bytes at most: 8 blocks
        await self.call("put_object", key, Key=self.root + key, Body=data, Metadata=metadata,
                        ChecksumCRC32C=_crc32c_header(sums.crc32c))
        await self._forget_version(key, replaced, "a put")
        return ObjectInfo(key, sums.size, sums.sha256, generation, sums.crc32c)

    async def create_upload(self, key: str, generation: int, checksums: str) -> str:
        answer = await self.call("create_multipart_upload", key, Key=self.root + key, ChecksumAlgorithm="CRC32C",
                                 Metadata={"generation": str(generation), "checksums": checksums,
                                           "blocks": TABLE_IN_CHECKSUMS})
        upload_id = str(answer["UploadId"])
        self._live.add(upload_id)
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, data: bytearray, summed: asyncio.Future[int]
                    ) -> asyncio.Future[dict[str, Any]]:
        """Sends part `number` once `summed` (its hashing in `S3Upload`) answers its CRC32C."""

        async def send() -> dict[str, Any]:
            # Shielded: the hashing goes on for the parts after this one even if this send is cancelled.
            checksum = _crc32c_header(await asyncio.shield(summed))
            answer = await self.call("upload_part", key, Key=self.root + key, UploadId=upload_id,
                                     PartNumber=number, Body=data, ChecksumCRC32C=checksum)
            return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32C": checksum}

        return asyncio.ensure_future(send())

    async def prepare_completion(self, key: str, checksums: str, sums: Checksums, generation: int) -> None:
        """Writes the checksum object of an upload's commit (named `checksums`, holding the hashes and the commit's
        `generation`, its bytes the block table)."""
        await self.call("put_object", key, Key=self._checksums_key(key, checksums), Body=sums.block_table(),
                        Metadata={**_metadata(sums), "generation": str(generation)})

    async def complete_upload(
        self, key: str, upload_id: str, checksums: str, parts: list[dict[str, Any]], replaced: dict[str, Any] | None
    ) -> None:
        """Makes the upload (whose checksum object is named `checksums`) the object (the commit), then forgets the
        checksum object of the version `replaced`."""
        try:
            await self.call("complete_multipart_upload", key, Key=self.root + key, UploadId=upload_id,
                            MultipartUpload={"Parts": parts})
        except DriveError:
            # The commit may have been made with its answer lost: boto3 then completes again, which some stores
            # (MinIO) answer NoSuchUpload, having forgotten the upload at its commit. The object at the key says.
            try:
                made = await self._uses(key, checksums)
            except DriveError:
                made = False
            if not made:
                raise
            log.info("a commit whose answer was lost was made", extra={"fields": {"key": key}})
        self._live.discard(upload_id)
        await self._forget_version(key, replaced, "a put")

    async def _uses(self, key: str, checksums: str) -> bool:
        """Whether the object at `key` uses the checksum object named `checksums`: it is the upload that wrote it."""
        return _checksums_used(await self._head(self.root + key)) == checksums

    async def _forget_version(self, key: str, answer: dict[str, Any] | None, by: str) -> None:
        """Deletes the checksum object of the version in `answer` (a HEAD of `key` before it went, `by` a put or a
        delete). One drived did not write is logged instead: the caller's path held no file for it, and the operator
        who put it there learns where it went."""
        if answer is not None and not _written_by_drived(answer):
            log.warning("an object drived did not write was removed", extra={"fields": {
                "object": f"s3://{self.bucket}/{self.root}{key}", "size": int(answer["ContentLength"]), "by": by}})
        name = _checksums_used(answer)
        if name:
            await self._forget_checksums(key, name)

    async def forget_unused_checksums(self, key: str, name: str) -> None:
        """Deletes the checksum object `name` of an upload of `key` that was aborted, unless the object at `key` uses
        it (a commit whose answer was lost may have made it); when the store fails, the next sweep does."""
        try:
            used = await self._uses(key, name)
        except DriveError:
            self._leave(key, name)
            return
        if not used:
            await self._forget_checksums(key, name)

    async def _forget_checksums(self, key: str, name: str) -> None:
        """Deletes the checksum object `name` of `key`; when the store fails, the next sweep does."""
        try:
            await self.call("delete_object", key, Key=self._checksums_key(key, name))
        except DriveError:
            self._leave(key, name)

    def _leave(self, key: str, name: str) -> None:
        """Remembers the checksum object `name` of `key` ("": those its object does not use), whose delete failed,
        for the next sweep; past LEFTOVERS_KEPT (a store failing deletes for long), it stays in the store."""
        if len(self._leftovers) < LEFTOVERS_KEPT:
            self._leftovers.add((key, name))
            return
        # Logged once a sweep period, and the others counted (`sweep`): a store failing every delete while puts go
        # on would otherwise log a line a put, thousands a second.
        self._left_in_store += 1
        if self._left_in_store == 1:
            log.warning("a checksum object whose delete failed is left in the store", extra={"fields": {
                "object": f"s3://{self.bucket}/{self._checksums_key(key, name)}"}})

    async def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            await self.call("abort_multipart_upload", key, Key=self.root + key, UploadId=upload_id)
        except UploadGone:
            pass  # aborted already (by another replica's sweep, or the store dropped it): what this abort is for
        except DriveError as err:
            log.warning("aborting an upload failed; the sweep retries", extra={"fields": {
                "key": key, "error": str(err)}})
        self._live.discard(upload_id)

    def _abandoned(self) -> list[tuple[str, str]]:
        """(key, upload id) of the uploads under the prefix that no part was added to for upload_expiry (with no
        part, found so by the sweep before too), and no daemon lists live."""
        found: list[tuple[str, str]] = []
        partless: set[str] = set()
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.root}
        while True:
            page = self.client.list_multipart_uploads(**params)
            now = _server_time(page)
            for upload in page.get("Uploads", []):
                key, upload_id = upload["Key"], upload["UploadId"]
                if upload_id in self._live or (now - upload["Initiated"]).total_seconds() < self.upload_expiry:
                    continue
                stamps = [upload["Initiated"]]
                try:
                    for parts in self.client.get_paginator("list_parts").paginate(
                            Bucket=self.bucket, Key=key, UploadId=upload_id):
                        stamps += [p["LastModified"] for p in parts.get("Parts", [])]
                except self.client.exceptions.NoSuchUpload:
                    continue  # aborted since the listing (by another replica's sweep, or its daemon): not abandoned
                if len(stamps) == 1:
                    partless.add(upload_id)
                    if upload_id not in self._partless:
                        continue
                if (now - max(stamps)).total_seconds() >= self.upload_expiry:
                    found.append((key[len(self.root):], upload_id))
            if not page.get("IsTruncated"):
                break
            params.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
        self._partless = partless
        live = self._live_elsewhere()
        return [(key, upload_id) for key, upload_id in found if upload_id not in live]

    def _live_elsewhere(self) -> set[str]:
        """The ids of the uploads in the lists of live uploads rewritten within upload_expiry
        (`_list_live_forever`); an older list, of a daemon that died or has none live, is deleted."""
        live: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.root}{LIVE}/"):
            now = _server_time(page)
            for entry in page.get("Contents", []):
                if (now - entry["LastModified"]).total_seconds() >= self.upload_expiry:
                    self.client.delete_object(Bucket=self.bucket, Key=entry["Key"])
                    continue
                with contextlib.suppress(self.client.exceptions.NoSuchKey):  # deleted by another sweep meanwhile
                    listed = self.client.get_object(Bucket=self.bucket, Key=entry["Key"])["Body"].read()
                    live.update(listed.decode().split())
        return live

    async def sweep(self) -> int:
        """Aborts the uploads left by daemons that died, with their keys' unused checksum objects, and deletes the
        checksum objects whose delete failed since the last sweep; how many uploads it aborted."""
        try:
            abandoned = await self.run(self._abandoned)
        except Exception as err:
            raise self.failure(err) from err
        if self._left_in_store > 1:
            log.warning("more checksum objects whose delete failed were left in the store since", extra={"fields": {
                "count": self._left_in_store - 1}})
        self._left_in_store = 0
        leftovers, self._leftovers = self._leftovers, set()
        # Once the store answers; one failing again is remembered again. Each step fails alone, and SWEEP_AT_ONCE run
        # at a time: thousands left while the store failed are not deleted one round trip after another.
        await _at_once([functools.partial(self.forget_unused_checksums, key, name) if name
                        else functools.partial(self._sweep_checksums, key) for key, name in leftovers])
        await _at_once([functools.partial(self._forget_abandoned, key, upload_id) for key, upload_id in abandoned])
        return len(abandoned)

    async def _forget_abandoned(self, key: str, upload_id: str) -> None:
        log.info("aborting an abandoned upload", extra={"fields": {"key": key}})
        await self.abort_upload(key, upload_id)  # a failure is logged, and the upload found again by the next sweep
        await self._sweep_checksums(key)

    async def _sweep_checksums(self, key: str) -> None:
        """Deletes the checksum objects of `key` that its object does not use and no commit is about to; when the
        store fails, the next sweep does (logged)."""
        try:
            used = _checksums_used(await self._head(self.root + key))
            answer = await self.call("list_objects_v2", key, Prefix=self._checksums_key(key), Delimiter="/")
            now = _server_time(answer)
            for entry in answer.get("Contents", []):
                name = entry["Key"].rsplit("/", 1)[1]
                if name != used and (now - entry["LastModified"]).total_seconds() >= self.upload_expiry:
                    await self.call("delete_object", key, Key=entry["Key"])
        except DriveError as err:
            log.warning("sweeping the checksum objects of an aborted upload failed; the next sweep retries",
                        extra={"fields": {"key": key, "error": str(err)}})
            self._leave(key, "")

    # -- reads ---------------------------------------------------------------

    async def read(self, key: str, offset: int = 0, limit: int = 0) -> tuple[ObjectInfo, Chunks]:
        return await self._again_if_replaced(functools.partial(self._read, key, offset, limit))

    async def _read(self, key: str, offset: int, limit: int) -> tuple[ObjectInfo, Chunks]:
        start = offset - offset % BLOCK_SIZE  # a ranged read fetches the whole blocks it touches, to check each
        params: dict[str, Any] = {"Key": self.root + key}
        if offset or limit:
            params["Range"] = f"bytes={start}-{_blocks_end(offset + limit) - 1 if limit else ''}"
        try:
            answer = await self.run(self.client.get_object, Bucket=self.bucket, **params)
        except Exception as err:
            if _missing(err):
                raise Missing(key, "does not exist") from None
            if _code(err)[0] != "InvalidRange":
                raise self.failure(err, key) from err
            return await self._read_past_end(key, offset)
        body = self._body_from(key, answer, start)
        total = answer.get("ContentRange", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else int(answer["ContentLength"])
        # In the last block, which the store had: answered from this answer's version, not from a later look
        # that may find another.
        at_or_past_end = offset > 0 and offset >= size
        end = size if limit == 0 else min(size, offset + limit)
        whole = offset == 0 and end == size  # checked against the whole file's CRC32C, with no table to fetch
        try:
            info, table = await self._info(key, answer, size, None if whole or at_or_past_end else range(
                start // BLOCK_SIZE, _blocks_end(end) // BLOCK_SIZE))
        except BaseException:
            body.close()
            raise
        if info is None:
            body.close()
            raise Missing(key, "is not a drived object (written to the bucket by something else)")
        if at_or_past_end:
            body.close()
            return _nothing_from(key, offset, info)
        etag = str(answer["ETag"])
        if whole:
            summed = RunningCrc32c()
            return info, SummedChunks(self._chunks(key, body, etag, 0, size, self.chunk_size, summed.read),
                                      summed, key, size, info.crc32c)
        step = max(1, self.chunk_size // BLOCK_SIZE) * BLOCK_SIZE
        blocks = functools.partial(self._chunks, key, body, etag, start, min(size, _blocks_end(end)), step)
        return info, CheckedRange(key, table, start, offset, end, blocks)

    async def _read_past_end(self, key: str, offset: int) -> tuple[ObjectInfo, Chunks]:
        """A read the store refused as past the end of the version its GET found (InvalidRange, which carries no
        metadata): answered from the version a HEAD finds then. One with bytes at `offset` is not the version
        refused but one put since: read again."""
        info = await self.stat(key)
        if info is None:
            raise Missing(key, "does not exist")
        if offset < info.size:
            raise ChangedWhileRead(key, "was replaced")
        return _nothing_from(key, offset, info)

    async def _chunks(self, key: str, body: Any, etag: str, position: int, end: int, step: int,
                      read: Callable[[Readable, int], bytes]) -> AsyncGenerator[bytes, None]:
        """Bytes [position, end) of `body`, each chunk of at most `step` bytes read (and summed or checked) through
        `read` in a worker thread."""
        retries = 0
        try:
            while position < end:
                try:
                    data = await self.run(read, body, min(step, end - position))
                except (botocore.exceptions.BotoCoreError, OSError) as err:
                    if retries == READ_RETRIES:
                        raise self.failure(err, key) from err
                    retries += 1
                    body.close()
                    body = await self._resume(key, etag, position, end)
                    continue
                if not data:
                    raise Unavailable(f"the store ended {key!r} at byte {position} of {end}: read it again")
                position += len(data)
                yield data
        finally:
            body.close()

    async def _resume(self, key: str, etag: str, start: int, end: int) -> Any:
        """The body of bytes [start, end) of the version of `key` whose ETag is `etag`: ChangedWhileRead when the
        key holds another by now, refused by the store (If-Match) or, by one that ignores If-Match, answered."""
        try:
            answer = await self.run(self.client.get_object, Bucket=self.bucket, Key=self.root + key,
                                    Range=f"bytes={start}-{end - 1}", IfMatch=etag)
        except Exception as err:
            if _code(err)[0] == "PreconditionFailed" or _missing(err):
                raise ChangedWhileRead(key, "was replaced or deleted") from None
            raise self.failure(err, key) from err
        if answer["ETag"] != etag:
            answer["Body"].close()
            raise ChangedWhileRead(key, "was replaced")
        return self._body_from(key, answer, start)

    def _body_from(self, key: str, answer: dict[str, Any], start: int) -> Any:
        """The body of a GetObject of `key` from byte `start`; refused (closed) when it starts at another byte."""
        first = first_byte(answer)
        if first != start:
            answer["Body"].close()
            raise StoredFileError(
                key, f"cannot be read from byte {start}: {self.named('storage')}'s endpoint {self.endpoint} answered "
                f"with the bytes from {first} (it ignores the Range of a GET, which every read from past a file's "
                "first block needs)"
            )
        return answer["Body"]

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self._again_if_replaced(functools.partial(self._stat, key))

    async def _stat(self, key: str) -> ObjectInfo | None:
        answer = await self._head(self.root + key)
        return None if answer is None else (await self._info(key, answer, int(answer["ContentLength"])))[0]

    async def holding(self, key: str) -> Holding | None:
        answer = await self._head(self.root + key)  # one HEAD: a big file's checksum object is not looked at
        return None if answer is None else _holding(answer)

    # -- listing -------------------------------------------------------------

    def _folder(self, prefix: str) -> str:
        """The S3 prefix of the keys under folder `prefix`."""
        prefix = prefix.rstrip("/")
        return f"{self.root}{prefix}/" if prefix else self.root

    async def occupant(self, root: str, path: str) -> tuple[str, bool] | None:
        """As `Backend.occupant`, with the HEAD of every part of `path` and the LIST under it all at once:
        one round trip to the store, not one per part."""
        parts = path.split("/")
        held = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
        objects, folder = await self._occupied([f"{root}/{h}" for h in held], f"{root}/{path}")
        for name, found in zip(held, objects, strict=True):
            if found:
                return name, False
        return (path, True) if folder else None

    async def first_occupant(self, roots: Sequence[str], path: str) -> tuple[int, str, bool] | None:
        """As `Backend.first_occupant`. Of many roots, each is first asked one LIST of its keys that begin as `path`
        does: a root that holds none (most of them) costs that request, not a HEAD of each part and a LIST. A few
        (one round of ROOTS_AT_ONCE) are looked in directly: the LIST would be a round trip more for those that do."""
        look = self.occupant if len(roots) <= ROOTS_AT_ONCE else self._occupant_if_begun
        async for i, held in each_root(roots, lambda root: look(root, path)):
            if held is not None:
                return i, *held
        return None

    async def _occupant_if_begun(self, root: str, path: str) -> tuple[str, bool] | None:
        """`occupant`, once a key under `root` is found that begins as `path` does (its first part)."""
        if not await self._begun(f"{root}/{path.split('/', 1)[0]}"):
            return None
        return await self.occupant(root, path)

    async def holders(self, roots: Sequence[str], path: str) -> list[Holder]:
        """As `Backend.holders`, with one LIST of each root's first key that begins with `path`: a root that holds
        none (most of them) costs that request, not a HEAD and a LIST. A first key below `path` tells a folder, and
        any first key but the path's own tells that no object is at `path` (it would sort before them); a key beside
        `path` ("a.txt" of "a") leaves whether it is a folder to `is_folder`, and the path's own key what it is to
        `stat`."""
        keys = [f"{root}/{path}" for root in roots]
        found = each_root(keys, lambda key: self._first_key(self.root + key, key))
        return [Holder(i, first.startswith(f"{self.root}{keys[i]}/"), first == self.root + keys[i])
                async for i, first in found if first is not None]

    async def _first_key(self, prefix: str, key: str) -> str | None:
        """The first key that begins with `prefix` (a full key, of `key`'s), or None: one LIST of at most one key."""
        answer = await self.call("list_objects_v2", key, Prefix=prefix, MaxKeys=1)
        return next((entry["Key"] for entry in answer.get("Contents") or ()), None)

    async def _begun(self, key: str, folder: bool = False) -> bool:
        """Whether a key begins with `key` (with `folder`, with the folder `key`'s prefix): one LIST of at most one
        key."""
        return await self._first_key(self._folder(key) if folder else self.root + key, key) is not None

    async def _occupied(self, keys: list[str], folder: str) -> tuple[list[bool], bool]:
        """Whether each of `keys` is a file (an object drived wrote, as `stat` takes it), and whether `folder` holds
        any object: asked of the store all at once."""
        held, *objects = await asyncio.gather(self.is_folder(folder), *(self._head(self.root + k) for k in keys))
        return [answer is not None and _written_by_drived(answer) for answer in objects], bool(held)

    async def is_folder(self, key: str) -> bool:
        return await self._begun(key, folder=True)

    async def _pages(self, prefix: str, delimited: bool, start_after: str, limit: int | None
                     ) -> AsyncIterator[dict[str, Any]]:
        """The ListObjectsV2 pages under folder `prefix`, from after the relative key `start_after`."""
        params: dict[str, Any] = {"Prefix": self._folder(prefix), "MaxKeys": min(PAGE, (limit or PAGE) + 1)}
        if delimited:
            params["Delimiter"] = "/"
        if start_after:
            params["StartAfter"] = params["Prefix"] + start_after
        while True:
            page = await self.call("list_objects_v2", prefix, **params)
            yield page
            if not page.get("IsTruncated"):
                return
            params.pop("StartAfter", None)
            params["ContinuationToken"] = page["NextContinuationToken"]

    def _relative_start(self, prefix: str, start_after: str) -> str | None:
        """`start_after` relative to folder `prefix`: "" from the start, None when it is past the folder."""
        base = prefix.rstrip("/")
        base = f"{base}/" if base else ""
        if start_after.startswith(base):
            return start_after[len(base):]
        return "" if start_after < base else None

    async def subfolders(self, prefix: str) -> frozenset[str]:
        return (await self.list_folder(prefix)).folders

    async def list_folder(self, prefix: str, start_after: str = "", limit: int | None = None) -> Listing:
        after = self._relative_start(prefix, start_after)
        if after is None:
            return Listing((), frozenset(), ())
        cut = len(self._folder(prefix))
        top = not prefix.strip("/")
        pending: set[str] = set()
        folders: set[str] = set()
        names: list[str] = []
        async for page in self._pages(prefix, True, after, limit):
            keys = [c["Key"][cut:] for c in page.get("Contents", [])]
            subfolders = [p["Prefix"][cut:] for p in page.get("CommonPrefixes", [])]
            for name in subfolders:
                name = name.rstrip("/")
                if not (top and name in (CHECKSUMS, LIVE)):
                    folders.add(name)
                    pending.add(name)
            pending.update(k for k in keys if k)  # a key equal to the folder's prefix is no entry
            pending = {n for n in pending if n > after}
            last = max([*keys, *subfolders], default="")
            bound = _name_bound(last) if page.get("IsTruncated") else None
            ready = sorted(n for n in pending if bound is None or n < bound)
            names += ready
            pending.difference_update(ready)
            if limit is not None and len(names) >= limit:
                break
        names = names[:limit] if limit is not None else names
        listing = Listing(tuple(names), frozenset(folders), ())
        return Listing(listing.names, listing.folders, tuple(sorted(names, key=listing.key_of)))

    async def walk(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        after = self._relative_start(prefix, start_after)
        if after is None:
            return []
        keys: list[str] = []
        top = not prefix.strip("/")
        async for page in self._pages(prefix, False, after, limit):
            for entry in page.get("Contents", []):
                key = entry["Key"][len(self.root):]
                if not key.endswith("/") and not (top and key.startswith((CHECKSUMS + "/", LIVE + "/"))):
                    keys.append(key)
            if limit is not None and len(keys) >= limit:
                break
        return keys[:limit] if limit is not None else keys

    async def usage(self, prefix: str, passed: Callable[[str], Awaitable[None]] | None = None) -> int:
        total = 0
        async for page in self._pages(prefix, False, "", None):
            listed = page.get("Contents", [])
            total += sum(int(entry.get("Size", 0)) for entry in listed)
            if passed is not None and listed:
                await passed(listed[-1]["Key"][len(self.root):])
        return total

    async def counted_size(self, key: str) -> int:
        """The object's size from a HEAD, as `usage` counts it from the listing: an object that drived did not
        write (which `stat` does not answer) counts too. A big file's checksum object counts in neither: it
        lies outside every drive's prefix."""
        return _counted_size(await self._head(self.root + key))

    # -- deletes -------------------------------------------------------------

    async def delete(self, key: str, looked: Callable[[Holding], Awaitable[None]] | None = None) -> Removed | None:
        answer = await self._head(self.root + key)
        if answer is None:
            return None
        found = _holding(answer)
        if looked is not None:
            await looked(found)
        await self.call("delete_object", key, Key=self.root + key)
        await self._forget_version(key, answer, "a delete")
        return Removed(int(answer["ContentLength"]), found == "file")
