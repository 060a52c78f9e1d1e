"""The object-store interface that managed drives are kept in.

A backend stores objects under string keys ("drive/component/a/b.txt": '/'
separated, already validated by `drived.paths`). It knows nothing of drives,
components or gRPC; the service layer gives keys their meaning. Every method
may be called concurrently from many tasks. Failures are raised as
`drive_client.errors` types (NotFound, DataLoss, ResourceExhausted, ...).
"""

from __future__ import annotations

import abc
import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, Self, TypeVar

from drive_client.errors import (
    PARENT_IS_FILE,
    DataLoss,
    DriveError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StaleIndexError,
    Unavailable,
)

from ..checksums import Checksums, ClientChecksums, RunningCrc32c

T = TypeVar("T")
R = TypeVar("R")


ROOTS_AT_ONCE = 8  # folders (a drive's components) one call looks in at a time: each look may take a store's thread


async def each_root(roots: Sequence[T], look: Callable[[T], Awaitable[R]]) -> AsyncIterator[tuple[int, R]]:
    """(index, `look(root)`) of each of `roots` in order, ROOTS_AT_ONCE looked at a time: a call that looks in
    thousands neither waits for each in turn nor takes every thread the daemon's other calls need."""
    for start in range(0, len(roots), ROOTS_AT_ONCE):
        found = await asyncio.gather(*(look(root) for root in roots[start:start + ROOTS_AT_ONCE]))
        for i, answer in enumerate(found, start):
            yield i, answer


class Chunks(Protocol):
    """The bytes of one object, chunk by chunk; `aclose` releases them early.

    Each chunk has been checked against the object's stored checksums where
    the store keeps them (a damaged one raises `Damaged` instead of being
    yielded). `crc32c` is the CRC32C of the bytes yielded so far.
    """

    def __aiter__(self) -> AsyncIterator[bytes | memoryview]: ...

    async def aclose(self) -> None: ...

    @property
    def crc32c(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object."""

    key: str
    size: int
    sha256: str  # lowercase hex of the content
    generation: int  # commit time in ns: changes with every commit of the key
    crc32c: int | None = None  # of the content; None where the store does not know it (yet)


@dataclass(frozen=True, slots=True)
class Holder:
    """One of the folders `Backend.holders` was asked of that may hold a path (`index`, among those asked), and what
    its look there saw: a folder (objects below the path), and whether an object may be at the path itself (False:
    the look saw none there); what it did not see, `stat` and `is_folder` tell."""

    index: int
    folder: bool = False
    file: bool = True


Holding = Literal["file", "foreign"]  # what lies at a key (`Backend.holding`, `Backend.delete`'s look)


@dataclass(frozen=True, slots=True)
class Removed:
    """What `Backend.delete` removed: what it counted in `usage`, and whether it was a file (False: an object drived
    did not write, which no read shows)."""

    size: int
    file: bool = True


class NotDurable(Exception):
    """A commit whose file became visible, but an fsync of whose folders failed after (EIO): the file is there
    (`info`) and may not survive a power cut. Not a DriveError: its caller reports the file as committed (its
    event, the quota's count), then answers `error`."""

    def __init__(self, info: ObjectInfo, error: Exception) -> None:
        super().__init__(str(error))
        self.info = info
        self.error = error


def position_after(
    names: Sequence[str], prefix: str, start_after: str, key: Callable[[str], str] | None = None
) -> int:
    """Where `names`, sorted by `key` and each read with `prefix` in front, continue after `start_after`."""
    if start_after.startswith(prefix):
        return bisect.bisect_right(names, start_after[len(prefix):], key=key)
    return 0 if start_after < prefix else len(names)


def names_from(names: Sequence[str], start: int) -> Iterator[str]:
    """`names[start:]` one at a time, without copying (nor, unlike islice, stepping over) the first `start`."""
    return map(names.__getitem__, range(start, len(names)))


@dataclass(frozen=True, slots=True)
class Listing:
    """What is directly under a key prefix, by name only (`stat` tells an object's size and sha256)."""

    names: tuple[str, ...]  # names of the objects and sub-folders directly under the prefix, sorted
    folders: frozenset[str]  # which of them are sub-folders (holding at least one object)
    # The names in the order of the keys beneath them, where a sub-folder sorts as its name
    # followed by "/": "a.txt" before folder "a" (whose keys start "a/") before "a0".
    key_order: tuple[str, ...]

    def key_of(self, name: str) -> str:
        """How `name` sorts in `key_order`."""
        return f"{name}/" if name in self.folders else name


class StoredFileError(DriveError):
    """What is wrong with a stored file, said of it by its key (`key`); `what` says what it is.

    The key names it in the data dir or the bucket, not as its client knows
    it: the caller that knows the request names the file for the client
    (`named`) before it answers (the service for a get's bytes, `drived.managed`
    for the rest). The message is "<file> <what>" unless a subclass says it
    otherwise.
    """

    def __init__(self, key: str, what: str, message: str | None = None) -> None:
        self.key = key
        self.what = what
        super().__init__(message or self._message(repr(key)))

    def _message(self, shown: str) -> str:
        """The message, with the file named `shown`."""
        return f"{shown} {self.what}"

    def named(self, drive_uri: str, component: str, path: str) -> Self:
        """The same error, with the file named as the client knows it: "'a.bin' of component 'c' in lit://d", or
        "'a.bin' in s3://b/p/" (an s3:// object has no component)."""
        owner = f" of component {component!r}" if component else ""
        return self._saying(self._message(f"{path!r}{owner} in {drive_uri}"))

    def _saying(self, message: str) -> Self:
        """The same error, with `message`: a subclass that carries more than the key and `what` carries it over."""
        return type(self)(self.key, self.what, message)


class Missing(StoredFileError, NotFound):
    """No file to read at the key (`what`: "does not exist", "is a folder, not a file", ...)."""


class EndsBefore(StoredFileError, InvalidArgument):
    """A read that starts past the end of the file (`what`: the offset and the file's size), of its version whose
    sha256 is `sha256`: a read pinned to another version is of a file since replaced, not past its end."""

    def __init__(self, key: str, what: str, message: str | None = None, *, sha256: str) -> None:
        super().__init__(key, what, message)
        self.sha256 = sha256

    def _message(self, shown: str) -> str:
        return f"{shown} ends before {self.what}"

    def _saying(self, message: str) -> Self:
        return type(self)(self.key, self.what, message, sha256=self.sha256)


class TooLarge(StoredFileError, ResourceExhausted):
    """A put of more bytes than the store keeps in one file (`what`: "is larger than ...")."""


class Misplaced(StoredFileError, InvalidArgument):
    """A put refused for where its file would be (`what`): a folder is there, or a parent of it is a file."""

    def _message(self, shown: str) -> str:
        return f"cannot put {shown}: {self.what}"


class NotAsSent(StoredFileError, DataLoss):
    """A put whose bytes are not what its client sent (`what` says how): nothing is stored."""

    def _message(self, shown: str) -> str:
        return f"nothing was stored for {shown}: {self.what}; retry the put"


def parent_is_file(key: str) -> Misplaced:
    return Misplaced(key, PARENT_IS_FILE)


def is_a_folder(key: str) -> Misplaced:
    return Misplaced(key, "it is a folder; put files below it instead")


def checksum_mismatch(key: str, mismatch: str) -> NotAsSent:
    """The error of a put whose bytes do not match what the client sent (`ClientChecksums.mismatch`)."""
    return NotAsSent(key, f"checksum mismatch ({mismatch})")


def check_size(key: str, received: int, size: int | None) -> None:
    """Raises NotAsSent when the header's `size` (if any) differs from the bytes `received`."""
    if size is not None and size != received:
        raise NotAsSent(key, f"size mismatch (received {received} bytes, header said {size})")


def check_received(key: str, sums: Checksums, sent: ClientChecksums, size: int | None) -> None:
    """Raises NotAsSent unless the bytes `sums` summed number `size` (when given) and match what the client sent."""
    check_size(key, sums.size, size)
    mismatch = sent.mismatch(sums.sha256, sums.crc32c)
    if mismatch:
        raise checksum_mismatch(key, mismatch)


class Damaged(StoredFileError, DataLoss):
    """Stored bytes that do not match the checksums stored with them; never sent to a client.

    `what` says which part of the object (`key`) is damaged. The service
    names the file for the client (`named`) and counts it.
    """

    def _message(self, shown: str) -> str:
        return (
            f"the stored copy of {shown} is damaged ({self.what}); no damaged bytes were sent. Put the file "
            "again, or restore the daemon's storage from a backup"
        )


class ChangedWhileRead(StoredFileError, StaleIndexError):
    """A stored file that changed while it was read (`what` says how): the read is told to read it again."""

    def _message(self, shown: str) -> str:
        return f"{shown} {self.what} while it was read: read it again"


class UploadGone(StoredFileError, Unavailable):
    """An upload the store no longer has (`what` says why): the put is tried again."""

    def _message(self, shown: str) -> str:
        return f"the upload of {shown} was given up ({self.what}): retry the put"


class ClientTooSlow(StoredFileError, Unavailable):
    """`Upload.write` refused its data, whole, because the client keeps the memory its upload holds from others
    for too long (`what` says how long): the stream ends, and the upload is as it was before the write, so it can
    be held for a resume as a cut stream's is (`drived.uploads`)."""

    def _message(self, shown: str) -> str:
        return f"this put of {shown} was ended: {self.what}; retry it"


class SummedChunks:
    """Chunks of a read that no block checksums check (a whole S3 object), with the CRC32C of those yielded so far.

    `chunks` are read through `summed` (`RunningCrc32c.read`), which sums
    them in the worker threads that read them. With `expected`, the CRC32C
    of the whole object (the chunks must be all of it, `size` bytes), the
    last chunk is only yielded once the CRC32C of every byte matches it;
    otherwise `Damaged` is raised in its place (at the end, when the object
    holds no bytes where its CRC32C says it has some). `chunks` None: no bytes.
    """

    def __init__(self, chunks: AsyncIterator[bytes] | None, summed: RunningCrc32c, key: str, size: int = 0,
                 expected: int | None = None) -> None:
        self._chunks = chunks
        self._summed = summed
        self._key = key
        self._left = size
        self._expected = expected

    @property
    def crc32c(self) -> int:
        return self._summed.crc32c

    def __aiter__(self) -> SummedChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            raise StopAsyncIteration
        try:
            data = await anext(self._chunks)
        except StopAsyncIteration:  # an object with no bytes has no last chunk: checked at its end instead
            self._check()
            raise
        self._left -= len(data)
        if self._left <= 0:
            self._check()
        return data

    def _check(self) -> None:
        if self._expected is not None and self.crc32c != self._expected:
            raise Damaged(self._key, f"its bytes do not match their CRC32C {self._expected:08x}")

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()  # type: ignore[attr-defined]


BeforeVisible = Callable[[], Awaitable[None]]  # awaited by `Upload.commit` right before the object becomes visible


class Upload(abc.ABC):
    """An object being written: bytes go to temporary storage, summed on the way by one `Checksums`.

    The caller calls `write` for each chunk in order, one at a time, then
    exactly one of `commit` or `abort` (also when `write` failed or the task
    is cancelled). A resumable upload may be paused between two streams with
    `suspend`, then written again from `held` on (see `drived.uploads`).
    """

    @abc.abstractmethod
    async def write(self, data: bytes | memoryview) -> None:
        """Appends `data`. Raises ResourceExhausted when the store is full, ClientTooSlow (taking none of
        `data`) when the stream that writes it must end for keeping memory from others.

        Cancel-safe: once called, `data` belongs to the upload even when the
        caller is cancelled while the write waits; `suspend`, `commit` and
        `abort` wait for what is still in flight.
        """

    @property
    @abc.abstractmethod
    def held(self) -> int:
        """How many bytes the upload keeps when suspended: where a resumed stream's bytes continue."""

    async def intact(self) -> bool:
        """Whether the bytes `held` are all still in temporary storage, asked before a held upload is resumed or
        described: False when they went with it (an operator removed the local data dir's `tmp/`), and the upload
        is then answered as one the daemon no longer holds. A store that cannot tell without a round trip answers
        True, and a resume's first write finds out (S3: `UploadGone`)."""
        return True

    @abc.abstractmethod
    async def suspend(self) -> None:
        """Pauses the upload until its next `write` or `commit`, keeping its first `held` bytes.

        Waits for the writes in flight, releases descriptors and buffers (a
        paused upload holds neither), and keeps the bytes and the state of
        their checksums, so that a later `write` continues the same object
        and `commit` checks every byte. Raises (the caller then aborts) when
        a write in flight failed.
        """

    @abc.abstractmethod
    async def replacing(self) -> int:
        """What the version of the key that the commit replaces counts in `usage` (`Backend.counted_size`; 0 when
        there is none), read now.

        Asked inside the path's claim, which keeps every other put and delete
        of the key out until the commit (a commit whose claim lapsed stores
        nothing): the commit replaces that version, and a store that must know
        it (S3: its checksum object, deleted after the commit) reads it no
        second time.
        """

    @abc.abstractmethod
    async def commit(
        self, sent: ClientChecksums, size: int | None = None, before_visible: BeforeVisible | None = None,
        checks: asyncio.Future[None] | None = None,
    ) -> ObjectInfo:
        """Makes the object visible in one step if the bytes match.

        When a checksum in `sent` (the CRC32C, the sha256, either or both)
        differs from that of the bytes written, or `size` is given and differs
        from their count, raises DataLoss and stores nothing. Raises
        InvalidArgument and stores nothing when, at the commit, a parent of
        the key is an object or the key is a folder (a store that cannot check
        and commit in one step, like S3, relies on its caller committing
        inside the path's claim). The object is stored with the sha256 and
        CRC32C of its bytes, computed here (the info answered carries both).
        Two concurrent commits of one key: one wins entirely. The temporary
        data is gone afterwards either way.

        `before_visible` is awaited on the event loop after the checks and the
        work the commit does on the store, right before the step that makes the
        object visible (a caller confirms its claim there: that work may take
        seconds); what it raises is raised, and nothing is stored.

        `checks`, the caller's own checks of the path (begun before the
        commit), are awaited before `before_visible`: beside the commit's
        checks where those take round trips to the store, else first (not in
        a batch that waits for its slowest). What they raise is raised, and
        nothing is stored.
        """

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discards the temporary data; the previous object (if any) stays. Idempotent."""


class Backend(abc.ABC):
    """An object store with atomic writes and ranged reads."""

    # Whether its bytes are on this host's disk: only those does a same-host get have the daemon write into the file
    # its client handed over (`drived.handoff`); a store is read faster over a client's parallel ranged reads than over
    # the one stream of such a Get.
    on_this_host = False

    @abc.abstractmethod
    async def start_upload(self, key: str) -> Upload:
        """Begins an atomic write of `key`; nothing is visible until `Upload.commit`.

        May raise InvalidArgument already when a parent of `key` is an object
        or `key` is a folder (the commit checks again).
        """

    @abc.abstractmethod
    async def read(self, key: str, offset: int = 0, limit: int = 0) -> tuple[ObjectInfo, Chunks]:
        """Opens `key` for reading bytes [offset, offset+limit) (limit 0: to the end).

        Returns the object's info and its chunks, all of that one version even
        if the key is replaced or deleted while it is read. The caller closes
        the chunks (`aclose`) when it stops before their end. Raises NotFound,
        or EndsBefore (InvalidArgument, naming the version read) when offset
        is past the end; the chunks raise
        `Damaged` where the stored bytes do not match their checksums.
        """

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo | None:
        """The object at `key`, or None when there is none (folders are not objects)."""

    async def holding(self, key: str) -> Holding | None:
        """What lies at `key`: a file of drived's (damaged or not), an object drived did not write (no read shows it:
        `stat` answers None), or nothing; told without reading a file's checksums where the store can. By `stat`
        here: a store whose every object is a file (the local disk) holds no other."""
        try:
            return "file" if await self.stat(key) is not None else None
        except StoredFileError:
            return "file"

    @abc.abstractmethod
    async def is_folder(self, key: str) -> bool:
        """True when objects exist below `key` + "/"."""

    @abc.abstractmethod
    async def subfolders(self, prefix: str) -> frozenset[str]:
        """Names of the sub-folders directly under folder `prefix` (cheaper than list_folder: no objects)."""

    @abc.abstractmethod
    async def list_folder(self, prefix: str, start_after: str = "", limit: int | None = None) -> Listing:
        """The names of the objects and sub-folders directly under folder `prefix` ("" is the top):
        those whose key comes after key `start_after` in name order, at most `limit` of them.

        Names only, so that a page of a big folder's listing costs a `stat`
        per entry of the page, not per entry of the folder; a store that
        lists in pages costs the page, not the folder.
        """

    @abc.abstractmethod
    async def walk(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        """The keys of the objects under folder `prefix` at any depth, sorted: those after key
        `start_after`, at most `limit` of them. Costs the keys returned, not all under `prefix`.
        """

    @abc.abstractmethod
    async def usage(self, prefix: str, passed: Callable[[str], Awaitable[None]] | None = None) -> int:
        """The bytes of all objects under folder `prefix` (their content, not what the store adds).

        Reads every object's size once: the cost of a `walk` of the folder,
        a page of keys at a time in key order (a `walk`'s), awaiting
        `passed`, when given, with the last key of each page once its sizes
        are counted: the objects at keys up to it were counted as they
        were then, those after it will be as they are when read.
        """

    @abc.abstractmethod
    async def counted_size(self, key: str) -> int:
        """What the object at `key` counts in `usage` (0 when there is none), by the same measure: what a put
        replacing it takes off its drive's count (a delete answers it itself)."""

    async def occupant(self, root: str, path: str) -> tuple[str, bool] | None:
        """What under folder `root` takes the place of `path`: an object at `path` or at one of its parent
        folders, or a folder at `path`; as (its path below `root`, whether it is a folder), or None.

        Another component's put of `path` would hold a file and a folder of one path in the drive. This
        default asks `stat` for each part and `is_folder` for the whole; a backend may answer in one walk.
        """
        parts = path.split("/")
        for end in range(1, len(parts) + 1):
            held = "/".join(parts[:end])
            if await self.stat(f"{root}/{held}"):
                return held, False
        return (path, True) if await self.is_folder(f"{root}/{path}") else None

    @abc.abstractmethod
    async def first_occupant(self, roots: Sequence[str], path: str) -> tuple[int, str, bool] | None:
        """The `occupant` of `path` under the first of folders `roots` that has one, as (that root's index, its
        path below the root, whether it is a folder); None when none has.

        A put into a drive of many components asks this of all the others: it must not cost each of them what
        an `occupant` costs, nor hold the event loop for all of them.
        """

    @abc.abstractmethod
    async def holders(self, roots: Sequence[str], path: str) -> list[Holder]:
        """Those of folders `roots` that may hold `path` (an object, or a folder), in order: every one that does, and
        few that do not; each with what the look saw there, where it tells (each of the others is then asked `stat`
        and `is_folder`, which tell).

        A stat or get that names no component asks this of all of its drive's components, and so does a List in a
        drive of many: it must not cost each of them what a `stat` and an `is_folder` (or a folder read) cost, nor
        hold the event loop for all of them.
        """

    @abc.abstractmethod
    async def delete(self, key: str, looked: Callable[[Holding], Awaitable[None]] | None = None) -> Removed | None:
        """Removes the object at `key`: what it counted in `usage` (`counted_size`, read as it goes) and whether it was
        a file, told by the look that read its size; None when there was none. `looked`, when given, is awaited with
        what that look found (a file, or an object drived did not write) between the look and the removal, and only
        when it found one: what it raises ends the delete, nothing removed."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepares the backend before the daemon serves (SystemExit with the reason when it cannot)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources; the backend is not used afterwards."""
