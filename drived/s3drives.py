"""S3Drives: the semantics of read-only `s3://bucket/prefix/` drives.

List and stat are answered from the mount's index; get streams ranged reads
of the indexed version of each object. Paths are relative to the mounted
prefix, so no request can reach a key outside it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from drive_client.errors import InvalidArgument, NotFound, StaleIndexError
from drive_client.uri import DriveId

from .backends.base import Chunks
from .entry import Entry
from .s3index.index import S3Entry
from .s3index.mounts import S3Mounts
from .s3index.reader import read_object

FileStream = tuple[Entry, Chunks]


def _entry(e: S3Entry) -> Entry:
    return Entry(path=e.path, size=e.size, etag=e.etag, mtime_ns=e.mtime_ns, folder=e.folder)


class S3Drives:
    """All `s3://` drives, each backed by an index of its location."""

    def __init__(self, mounts: S3Mounts, chunk_size: int) -> None:
        self.mounts = mounts
        self.chunk_size = chunk_size

    async def mount(self, drive: DriveId) -> tuple[int, float]:
        return await self.mounts.mount(drive.bucket, drive.prefix)

    async def _find(self, drive: DriveId, path: str) -> S3Entry:
        found = (await self.mounts.index(drive.bucket, drive.prefix)).stat(path)
        if found is None:
            raise NotFound(f"{path!r} does not exist in {drive.uri} (as of its last mount; mount() re-indexes)")
        return found

    async def stat(self, drive: DriveId, path: str) -> Entry:
        return _entry(await self._find(drive, path))

    async def list_entries(
        self, drive: DriveId, path: str, *, recursive: bool, start_after: str, limit: int
    ) -> tuple[list[Entry], bool]:
        index = await self.mounts.index(drive.bucket, drive.prefix)
        entries, more = index.list(path, recursive, start_after, limit)
        return [_entry(e) for e in entries], more

    def _read(self, drive: DriveId, e: S3Entry, offset: int = 0, limit: int = 0) -> Chunks:
        return read_object(
            drive.bucket, drive.prefix + e.path, etag=e.etag, size=e.size,
            offset=offset, limit=limit, chunk_size=self.chunk_size,
        )

    async def open_files(
        self, drive: DriveId, path: str, *, offset: int, limit: int, if_match: str
    ) -> AsyncIterator[FileStream]:
        """The object at `path`, or every object under the folder `path`, each with its chunks."""
        found = await self._find(drive, path) if path else S3Entry(path="", size=0, etag="", mtime_ns=0, folder=True)
        if not found.folder:
            if offset > found.size:
                raise InvalidArgument(f"offset {offset} is past the end of {path!r} ({found.size} bytes)")
            if if_match and if_match != found.etag:
                raise StaleIndexError(f"{path!r} in {drive.uri} has ETag {found.etag}, expected {if_match}")
            yield _entry(found), self._read(drive, found, offset, limit)
            return
        if offset or limit or if_match:
            raise InvalidArgument(f"{path!r} is a folder: offset, limit and if_match apply to files only")
        index = await self.mounts.index(drive.bucket, drive.prefix)
        start_after = ""
        while True:
            page, more = index.list(path, True, start_after, 1000)
            for e in page:
                yield _entry(e), self._read(drive, e)
            if not more or not page:
                return
            start_after = page[-1].path
