"""S3Drives: the semantics of read-only `s3://bucket/prefix/` drives.

List and stat are answered from the mount's index; get streams ranged reads
of the indexed version of each object. Paths are relative to the mounted
prefix, so no request can reach a key outside it. Puts and deletes are
refused (PERMISSION_DENIED), and so are watches (an s3:// drive has no
change feed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from drive_client.errors import InvalidArgument, NotFound, PermissionDenied
from drive_client.uri import DriveId

from .backends.base import Chunks, SummedChunks
from .checksums import RunningCrc32c
from .coordinator import Event
from .drives import FileStream, PendingPut
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
from .s3index.index import S3Entry
from .s3index.mounts import S3Mounts


def _entry(e: S3Entry) -> Entry:
    return Entry(path=e.path, size=e.size, etag=e.etag, mtime_ns=e.mtime_ns, folder=e.folder)


def _read_only(drive: DriveId) -> PermissionDenied:
    return PermissionDenied(
        f"{drive.uri} is an s3:// drive and s3 drives are read-only: put and delete need a lit:// drive"
    )


class S3Drives:
    """All `s3://` drives, each backed by an index of its location (a `drived.drives.Drives`)."""

    bytes_on_this_host = False

    def __init__(self, mounts: S3Mounts, chunk_size: int) -> None:
        self.mounts = mounts
        self.chunk_size = chunk_size

    async def mount(self, mount: MountRequest) -> tuple[int, float]:
        return await self.mounts.mount(mount.drive.bucket, mount.drive.prefix)

    async def _find(self, drive: DriveId, path: str) -> S3Entry:
        found = (await self.mounts.index(drive.bucket, drive.prefix)).stat(path)
        if found is None:
            raise NotFound(f"{path!r} does not exist in {drive.uri} (as of its last mount; mount() re-indexes)")
        return found

    async def stat(self, stat: StatRequest) -> Entry:
        return _entry(await self._find(stat.drive, stat.path))

    async def list_entries(self, listing: ListRequest) -> tuple[list[Entry], bool]:
        drive = listing.drive
        index = await self.mounts.index(drive.bucket, drive.prefix)
        # keys no path names stay out of listings; a folder get (`open_files`) meets them, and refuses them by name
        entries, more = index.list(listing.path, listing.recursive, listing.start_after, listing.limit, named_only=True)
        return [_entry(e) for e in entries], more

    def _read(self, drive: DriveId, e: S3Entry, offset: int = 0, limit: int = 0) -> Chunks:
        """The object's bytes, with their CRC32C: from what S3 sent, as drived keeps no checksums of s3:// objects."""
        # Loaded here, not at start-up, as it loads boto3: by now the mount that indexed `e` has loaded boto3 on its
        # worker thread (`S3Mounts`), so this costs the event loop little.
        from .s3index.reader import read_object

        summed = RunningCrc32c()
        chunks = read_object(
            drive.bucket, drive.prefix + e.path, etag=e.etag, size=e.size,
            offset=offset, limit=limit, chunk_size=self.chunk_size, summed=summed,
        )
        return SummedChunks(chunks, summed, e.path)

    async def open_files(self, get: GetRequest) -> AsyncIterator[FileStream]:
        """The object at the path, or every object under the folder, each with its chunks."""
        drive, path = get.drive, get.path
        found = await self._find(drive, path) if path else S3Entry(path="", size=0, etag="", mtime_ns=0, folder=True)
        if not found.folder:
            get.check_version(found.etag, "ETag")  # first: a pinned read of an object since shortened is stale
            get.check_range(found.size)
            yield _entry(found), self._read(drive, found, get.offset, get.limit)
            return
        get.check_folder()
        index = await self.mounts.index(drive.bucket, drive.prefix)
        start_after = ""
        while True:
            page, more = index.list(path, True, start_after, 1000)
            for e in page:
                yield _entry(e), self._read(drive, e)
            if not more or not page:
                return
            start_after = page[-1].path

    async def begin_put(self, put: PutHeader) -> PendingPut:
        raise _read_only(put.drive)

    async def query_upload(self, query: QueryWriteStatusRequest) -> tuple[int, Entry | None]:
        raise NotFound(f"{query.drive.uri} is an s3:// drive: it takes no puts, so it has no uploads")

    async def delete(self, delete: DeleteRequest) -> int:
        raise _read_only(delete.drive)

    async def watch(self, watch: WatchRequest) -> tuple[int, AsyncIterator[Event | int]]:
        raise InvalidArgument(f"{watch.drive.uri} is an s3:// drive: only lit:// drives can be watched")
