"""DriveService: the gRPC face of the drives.

Turns requests into calls on `ManagedDrives` (lit://) or `S3Drives` (s3://),
answers with protobuf messages, maps `DriveError`s to status codes, and logs
one structured line per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from drive_client.errors import DriveError, InvalidArgument, PermissionDenied
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc as pb_grpc
from drive_client.uri import DriveId, check_component, normalize_path, parse_drive
from drive_client.wire import SMALL_FILE, GetMessage, PutMessage

from . import metrics
from .entry import Entry
from .managed import FileStream, ManagedDrives, PendingPut
from .puts import PutStream
from .s3drives import S3Drives

log = logging.getLogger("drived")
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10000


def file_info(entry: Entry) -> pb.FileInfo:
    modified = Timestamp()
    if entry.mtime_ns:
        modified.FromNanoseconds(entry.mtime_ns)
    return pb.FileInfo(
        path=entry.path, size=entry.size, sha256=entry.sha256, etag=entry.etag, modified=modified,
        component=entry.component, generation=entry.generation, folder=entry.folder,
    )


@dataclass
class RequestLog:
    """What one request did, logged as one JSON line when it ends."""

    method: str
    drive: str = ""
    path: str = ""
    component: str = ""
    bytes: int = 0
    files: int = 0
    status: str = "OK"


def _read_only(drive: DriveId) -> PermissionDenied:
    return PermissionDenied(
        f"{drive.uri} is an s3:// drive and s3 drives are read-only: put and delete need a lit:// drive"
    )


class DriveService(pb_grpc.DriveServiceServicer):
    """Serves drive.v1.DriveService."""

    def __init__(self, managed: ManagedDrives, s3: S3Drives) -> None:
        self.managed = managed
        self.s3 = s3

    @contextmanager
    def _request(self, method: str, request: object = None) -> Iterator[RequestLog]:
        """Logs one request (drive, path and component taken from `request` where it has them)."""
        record = RequestLog(
            method, getattr(request, "drive", ""), getattr(request, "path", ""), getattr(request, "component", "")
        )
        started = time.perf_counter()
        metrics.OPEN_REQUESTS.labels(method).inc()
        try:
            yield record
        except (asyncio.CancelledError, GeneratorExit):
            record.status = "CANCELLED"  # the client went away (streams see GeneratorExit)
            raise
        finally:
            seconds = time.perf_counter() - started
            metrics.OPEN_REQUESTS.labels(method).dec()
            metrics.record_request(method, record.status, seconds, record.bytes)
            fields = {
                "method": record.method, "drive": record.drive, "path": record.path,
                "component": record.component, "bytes": record.bytes, "files": record.files,
                "duration_ms": round(seconds * 1000, 3), "status": record.status,
            }
            log.info("request", extra={"fields": fields})

    @staticmethod
    async def _fail(context: grpc.aio.ServicerContext, record: RequestLog, err: Exception) -> NoReturn:
        """Answers the call with the status of `err` (INTERNAL for an unexpected one)."""
        if isinstance(err, DriveError):
            record.status = err.status.name
            await context.abort(err.status, err.message)
        record.status = "INTERNAL"
        log.error("unexpected error in %s\n%s", record.method, "".join(traceback.format_exception(err)))
        await context.abort(
            grpc.StatusCode.INTERNAL, f"drived: internal error ({type(err).__name__}: {err}); see the daemon log"
        )
        raise AssertionError("unreachable")  # context.abort raises

    # -- Put ---------------------------------------------------------------

    async def Put(
        self, request_iterator: AsyncIterable[PutMessage], context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        with self._request("Put") as record:
            stream = PutStream(self.managed, lambda header: self._begin_put(header, record))
            try:
                async for message in request_iterator:
                    await stream.receive(message)
                    record.bytes = stream.bytes
                entries = await stream.results()
                record.files = len(entries)
                return pb.PutResponse(files=[file_info(e) for e in entries])
            except Exception as err:
                await stream.close()  # before the answer: the files finished before the failure are committed
                await self._fail(context, record, err)
            finally:
                await stream.close()

    async def PutFile(self, request: pb.PutFileRequest, context: grpc.aio.ServicerContext) -> pb.PutFileResponse:
        with self._request("PutFile") as record:
            try:
                put = await self._begin_put(request.header, record)
                try:
                    if not request.sha256:
                        raise InvalidArgument("PutFile needs the sha256 of the file's bytes")
                    data = request.data
                    record.bytes = len(data)
                    await put.upload.write(data)
                    size = request.header.size if request.header.HasField("size") else None
                    entry = await self.managed.commit_put(put, request.sha256.lower(), size)
                finally:
                    await put.upload.abort()  # a no-op after the commit
                record.files = 1
                return pb.PutFileResponse(file=file_info(entry))
            except Exception as err:
                await self._fail(context, record, err)

    async def _begin_put(self, header: pb.PutHeader, record: RequestLog) -> PendingPut:
        record.drive, record.path, record.component = header.drive, header.path, header.component
        drive = parse_drive(header.drive)
        if drive.read_only:
            raise _read_only(drive)
        path = normalize_path(header.path)
        component = check_component(header.component)
        size = header.size if header.HasField("size") else None
        if size is not None and size < 0:
            raise InvalidArgument(f"size {size} is negative")
        return await self.managed.begin_put(drive.name, component, path, header.allow_duplicates, size)

    # -- Get ---------------------------------------------------------------

    async def Get(  # type: ignore[override]  # chunks are yielded as bytes, see drive_client.wire
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GetMessage]:
        with self._request("Get", request) as record:
            try:
                async for entry, chunks in self._open_files(request):
                    try:
                        record.files += 1
                        if request.whole_small_files and entry.size <= SMALL_FILE:
                            data = b"".join([chunk async for chunk in chunks])
                            record.bytes += len(data)
                            yield pb.GetResponse(file=pb.GetFile(info=file_info(entry), data=data))
                            continue
                        yield pb.GetResponse(info=file_info(entry))
                        async for chunk in chunks:
                            record.bytes += len(chunk)
                            yield chunk  # encoded by drive_client.wire, without a protobuf copy
                    finally:
                        await chunks.aclose()
            except Exception as err:
                await self._fail(context, record, err)

    def _open_files(self, request: pb.GetRequest) -> AsyncIterator[FileStream]:
        drive = parse_drive(request.drive)
        path = normalize_path(request.path, allow_root=True)
        if request.offset < 0 or request.limit < 0:
            raise InvalidArgument("offset and limit cannot be negative")
        if drive.read_only:
            return self.s3.open_files(
                drive, path, offset=request.offset, limit=request.limit, if_match=request.if_match
            )
        return self.managed.open_files(
            drive.name, path, self._component(request.component), offset=request.offset, limit=request.limit,
            wait_seconds=request.wait_seconds, if_match=request.if_match,
        )

    @staticmethod
    def _component(component: str) -> str:
        """A component filter: "" (all components) or a valid name."""
        return check_component(component) if component else ""

    # -- List, Stat, Delete, Mount -----------------------------------------

    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext) -> pb.ListResponse:
        with self._request("List", request) as record:
            try:
                drive = parse_drive(request.drive)
                path = normalize_path(request.path, allow_root=True)
                if request.page_size < 0:
                    raise InvalidArgument("page_size cannot be negative")
                limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
                if drive.read_only:
                    entries, more = await self.s3.list_entries(
                        drive, path, recursive=request.recursive, start_after=request.page_token, limit=limit
                    )
                else:
                    entries, more = await self.managed.list_entries(
                        drive.name, path, self._component(request.component), recursive=request.recursive,
                        start_after=request.page_token, limit=limit,
                    )
                record.files = len(entries)
                return pb.ListResponse(
                    entries=[file_info(e) for e in entries], next_page_token=entries[-1].path if more else ""
                )
            except Exception as err:
                await self._fail(context, record, err)

    async def Stat(self, request: pb.StatRequest, context: grpc.aio.ServicerContext) -> pb.FileInfo:
        with self._request("Stat", request) as record:
            try:
                drive = parse_drive(request.drive)
                path = normalize_path(request.path)
                if drive.read_only:
                    return file_info(await self.s3.stat(drive, path))
                entry = await self.managed.stat(drive.name, path, self._component(request.component))
                return file_info(entry)
            except Exception as err:
                await self._fail(context, record, err)

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        with self._request("Delete", request) as record:
            try:
                drive = parse_drive(request.drive)
                if drive.read_only:
                    raise _read_only(drive)
                path = normalize_path(request.path)
                deleted = await self.managed.delete(drive.name, path, check_component(request.component))
                record.files = deleted
                return pb.DeleteResponse(files_deleted=deleted)
            except Exception as err:
                await self._fail(context, record, err)

    async def Mount(self, request: pb.MountRequest, context: grpc.aio.ServicerContext) -> pb.MountResponse:
        with self._request("Mount", request) as record:
            try:
                drive = parse_drive(request.drive)
                if not drive.read_only:
                    raise InvalidArgument(f"{drive.uri} is a lit:// drive: only s3:// drives are mounted")
                objects, seconds = await self.s3.mount(drive)
                metrics.record_mount(drive.uri, objects, seconds)
                record.files = objects
                return pb.MountResponse(objects=objects, seconds=seconds)
            except Exception as err:
                await self._fail(context, record, err)

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchEvent]:
        with self._request("Watch", request) as record:
            try:
                drive = parse_drive(request.drive)
                if drive.read_only:
                    raise InvalidArgument(f"{drive.uri} is an s3:// drive: only lit:// drives can be watched")
                prefix = normalize_path(request.path, allow_root=True)
                component = self._component(request.component)
                events = self.managed.events
                after = request.after_sequence or events.last(drive.name)
                yield pb.WatchEvent(sequence=after, kind=pb.WatchEvent.KIND_WATCHING)
                while True:
                    changed = events.changed(drive.name)
                    for event in events.since(drive.name, after):
                        after = event.sequence
                        if _watched(event.entry, prefix, component):
                            record.files += 1
                            yield pb.WatchEvent(
                                sequence=event.sequence, kind=WATCH_KINDS[event.kind], file=file_info(event.entry)
                            )
                    events.check_open()
                    await changed.wait()
            except Exception as err:
                await self._fail(context, record, err)


WATCH_KINDS = {"put": pb.WatchEvent.KIND_PUT, "delete": pb.WatchEvent.KIND_DELETE}


def _watched(entry: Entry, prefix: str, component: str) -> bool:
    """Whether a Watch of folder `prefix` (and `component`, "" for all) reports `entry`."""
    in_folder = not prefix or entry.path == prefix or entry.path.startswith(prefix + "/")
    return in_folder and (not component or entry.component == component)
