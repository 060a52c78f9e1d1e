"""The `Drives` protocol: what each kind of drive offers the gRPC face, and the router that picks one.

`ManagedDrives` (`lit://`) and `S3Drives` (`s3://`) implement it; the
`DriveRouter` picks the one of a drive's scheme, so the service never asks
which kind it has. Every method takes a request `drived.requests` has
validated: an implementation never validates a URI, path, component or
number again, and the checks that need the file found are methods of the
request. What a kind of drive cannot do it refuses itself, with the status
the API documents for it. Every method may be called concurrently from many
tasks; failures are `drive_client.errors` types (their status is the
answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from drive_client.errors import DriveError
from drive_client.uri import DriveId

from .backends.base import Chunks
from .checksums import ClientChecksums
from .coordinator import Event
from .entry import Entry
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

FileStream = tuple[Entry, Chunks]  # a file found by a get, and its bytes


class PendingPut(Protocol):
    """One file of a put, between its header and its finish.

    The caller passes the file's chunks in order to `write`, then calls
    `commit` (which leaves no temporary data behind, whatever its outcome),
    `suspend` (the client ended or broke the stream before the finish) or
    `abort` (a write failed, the daemon refused the stream, or the idle check
    ended it). `abort` after a commit does nothing, so a caller may always
    call it at the end.
    """

    @property
    def path(self) -> str:
        """The file's path in its drive."""
        ...

    @property
    def write(self) -> Callable[[bytes | memoryview], Awaitable[None]]:
        """The store's write of the next chunk (a resumable upload's is serialised with a resume taking it over)."""
        ...

    @property
    def offset(self) -> int:
        """How many of the file's bytes were written before this stream: those a resumed upload holds, else 0."""
        ...

    @property
    def max_bytes(self) -> int:
        """The most bytes the file may have (--max-file-size, the room left in the drive's quota): the
        caller stops a stream that sends more, with `over_limit`, rather than write them."""
        ...

    def over_limit(self, received: int) -> DriveError:
        """The error (ResourceExhausted, with the numbers) for a file that reached `received` bytes, more
        than `max_bytes`."""
        ...

    async def commit(self, sent: ClientChecksums, received: int) -> Entry:
        """Makes the file visible in one step if its bytes match the checksums the client sent, and its size
        is the header's when it gave one (DataLoss and nothing stored otherwise). `received` is how many
        bytes the file has, those written before this stream included. AlreadyExists when another
        component holds the path and the header did not allow duplicates; ResourceExhausted when the
        drive's quota has no room left for them. The entry carries the sha256 and CRC32C the daemon
        computed."""
        ...

    async def abort(self) -> None:
        """Discards what was written, unless committed. Idempotent."""
        ...

    async def suspend(self) -> None:
        """The client ended or broke the stream before the file's finish: a resumable upload is held for a
        resume, any other discarded (as `abort`)."""
        ...


class Drives(Protocol):
    """The operations of the wire API on one kind of drive."""

    @property
    def bytes_on_this_host(self) -> bool:
        """Whether its files' bytes are on this host's disk (`Backend.on_this_host`)."""
        ...

    async def begin_put(self, put: PutHeader) -> PendingPut:
        """Starts storing one file. PermissionDenied on a read-only kind of drive; AlreadyExists when
        another component holds the path (may be left to the commit); InvalidArgument when the path is a
        folder or a parent of it a file."""
        ...

    def open_files(self, get: GetRequest) -> AsyncIterator[FileStream]:
        """The file at `get.path`, or every file under that folder in path order, each with its chunks.

        With `get.wait_seconds`, waits that long for a missing path to be put (WaitTimeout when it does
        not come, Unavailable when the daemon shuts down meanwhile). The caller closes each file's chunks.
        NotFound, AmbiguousPathError, StaleIndexError, InvalidArgument (the range of `get` does not fit
        the file).
        """
        ...

    async def query_upload(self, query: QueryWriteStatusRequest) -> tuple[int, Entry | None]:
        """How much of the resumable upload `query.upload_id` of `query.component` in `query.drive` is held:
        (bytes, None), or (0, the stored file) once it was committed. NotFound when no daemon sharing this one's
        coordinator knows of such an upload."""
        ...

    async def list_entries(self, listing: ListRequest) -> tuple[list[Entry], bool]:
        """At most `listing.limit` entries under `listing.path` after `listing.start_after`, in path order,
        and whether more remain. A missing path lists as empty."""
        ...

    async def stat(self, stat: StatRequest) -> Entry:
        """The file or folder at `stat.path`. NotFound, AmbiguousPathError."""
        ...

    async def delete(self, delete: DeleteRequest) -> int:
        """Removes the caller's file, or its files under a folder; how many. NotFound when it owns
        nothing there; PermissionDenied on a read-only kind of drive."""
        ...

    async def mount(self, mount: MountRequest) -> tuple[int, float]:
        """(Re)indexes the drive: (objects, seconds). InvalidArgument for a kind that needs no mount."""
        ...

    async def watch(self, watch: WatchRequest) -> tuple[int, AsyncIterator[Event | int]]:
        """Where a watch starts (the sequence after which it reports), and its events from there on,
        filtered by the watch's folder and component, with the sequence it read to (an int) after events it
        does not report; the events never end. InvalidArgument for a kind
        without a change feed; EventsExpired when the start is after the drive's latest event (a sequence
        it never gave); the events raise EventsExpired when the start is no longer kept, and Unavailable
        when the daemon shuts down."""
        ...


class DriveRouter:
    """Picks the drives of a drive's kind: `lit://` managed, `s3://` read-only."""

    def __init__(self, managed: Drives, s3: Drives) -> None:
        self._by_scheme = {"lit": managed, "s3": s3}

    def __call__(self, drive: DriveId) -> Drives:
        return self._by_scheme[drive.scheme]
