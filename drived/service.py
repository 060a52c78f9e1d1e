"""DriveService: the gRPC face of the drives.

Each handler decodes its request into a validated value (`drived.requests`),
calls the drives of the request's drive (`drived.drives`) and answers with
protobuf messages. The one wrapper around every handler, `rpc`, logs one
structured line per request, counts it in the metrics, and turns what the
handler raised into the call's status.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any, NoReturn, TypeVar, overload

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from drive_client.errors import DriveError
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc as pb_grpc
from drive_client.wire import SMALL_FILE, GetMessage, PutMessage

from . import metrics
from .drives import DriveRouter, PendingPut
from .entry import Entry
from .puts import PutStream
from .requests import (
    DeleteRequest,
    GetRequest,
    ListRequest,
    MountRequest,
    PutHeader,
    QueryWriteStatusRequest,
    StatRequest,
    WatchRequest,
    file_sha256,
)

log = logging.getLogger("drived")

WATCH_KINDS = {"put": pb.WatchEvent.KIND_PUT, "delete": pb.WatchEvent.KIND_DELETE}


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


@contextmanager
def _logged(method: str, request: object) -> Iterator[RequestLog]:
    """Logs and counts one request (drive, path and component taken from `request` where it has them)."""
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


async def _fail(context: grpc.aio.ServicerContext, record: RequestLog, err: Exception) -> NoReturn:
    """Answers the call with the status of `err`: its own for a DriveError, else INTERNAL.

    The message of an unexpected error names only its type: its text may name
    a server path. The daemon log has the whole traceback.
    """
    if isinstance(err, DriveError):
        record.status = err.status.name
        await context.abort(err.status, err.message)
    record.status = "INTERNAL"
    log.error("unexpected error in %s\n%s", record.method, "".join(traceback.format_exception(err)))
    message = f"drived: internal error ({type(err).__name__}) in {record.method}; see the daemon log"
    await context.abort(grpc.StatusCode.INTERNAL, message)
    raise AssertionError("unreachable")  # context.abort raises


S = TypeVar("S")
R = TypeVar("R")
A = TypeVar("A")


@overload
def rpc(
    handler: Callable[[S, R, RequestLog], AsyncIterator[A]],
) -> Callable[[S, R, grpc.aio.ServicerContext], AsyncIterator[A]]: ...


@overload
def rpc(
    handler: Callable[[S, R, RequestLog], Awaitable[A]],
) -> Callable[[S, R, grpc.aio.ServicerContext], Awaitable[A]]: ...


def rpc(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Makes `handler(self, request, record)` a gRPC method `(self, request, context)` that is logged,
    counted and answers a failure with its status.

    One wrapper for every shape: a handler that returns its answer (unary, or
    a client stream as `request`) or one that yields its answers (a server
    stream, passed on one by one, and closed when the call ends early).
    """
    method = handler.__name__
    if inspect.isasyncgenfunction(handler):

        @wraps(handler)
        async def streams(self: object, request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            with _logged(method, request) as record:
                try:
                    async with aclosing(handler(self, request, record)) as answers:
                        async for answer in answers:
                            yield answer
                except Exception as err:
                    await _fail(context, record, err)

        return streams

    @wraps(handler)
    async def answers(self: object, request: object, context: grpc.aio.ServicerContext) -> object:
        with _logged(method, request) as record:
            try:
                return await handler(self, request, record)
            except Exception as err:
                await _fail(context, record, err)

    return answers


class DriveService(pb_grpc.DriveServiceServicer):
    """Serves drive.v1.DriveService."""

    def __init__(self, drives: DriveRouter) -> None:
        self.drives = drives

    async def _begin_put(self, record: RequestLog, header: pb.PutHeader) -> PendingPut:
        record.drive, record.path, record.component = header.drive, header.path, header.component
        put = PutHeader.from_pb(header)
        return await self.drives(put.drive).begin_put(put)

    @rpc
    async def Put(self, messages: AsyncIterable[PutMessage], record: RequestLog) -> pb.PutResponse:
        stream = PutStream(partial(self._begin_put, record))
        try:
            async for message in messages:
                await stream.receive(message)
            entries = await stream.results()
        finally:
            record.bytes = stream.bytes
            await stream.close()
        record.files = len(entries)
        return pb.PutResponse(files=[file_info(e) for e in entries])

    @rpc
    async def PutFile(self, request: pb.PutFileRequest, record: RequestLog) -> pb.PutFileResponse:
        put = await self._begin_put(record, request.header)
        try:
            sha256 = file_sha256(request.sha256)
            record.bytes = len(request.data)
            await put.write(request.data)
            entry = await put.commit(sha256)
        finally:
            await put.abort()  # a no-op after the commit
        record.files = 1
        return pb.PutFileResponse(file=file_info(entry))

    @rpc
    async def Get(  # type: ignore[override]  # chunks are yielded as bytes, see drive_client.wire
        self, request: pb.GetRequest, record: RequestLog
    ) -> AsyncIterator[GetMessage]:
        get = GetRequest.from_pb(request)
        async for entry, chunks in self.drives(get.drive).open_files(get):
            try:
                record.files += 1
                if get.whole_small_files and entry.size <= SMALL_FILE:
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

    @rpc
    async def List(self, request: pb.ListRequest, record: RequestLog) -> pb.ListResponse:
        listing = ListRequest.from_pb(request)
        entries, more = await self.drives(listing.drive).list_entries(listing)
        record.files = len(entries)
        token = entries[-1].path if more else ""
        return pb.ListResponse(entries=[file_info(e) for e in entries], next_page_token=token)

    @rpc
    async def Stat(self, request: pb.StatRequest, record: RequestLog) -> pb.FileInfo:
        stat = StatRequest.from_pb(request)
        return file_info(await self.drives(stat.drive).stat(stat))

    @rpc
    async def Delete(self, request: pb.DeleteRequest, record: RequestLog) -> pb.DeleteResponse:
        delete = DeleteRequest.from_pb(request)
        record.files = await self.drives(delete.drive).delete(delete)
        return pb.DeleteResponse(files_deleted=record.files)

    @rpc
    async def Mount(self, request: pb.MountRequest, record: RequestLog) -> pb.MountResponse:
        mount = MountRequest.from_pb(request)
        record.files, seconds = await self.drives(mount.drive).mount(mount)
        return pb.MountResponse(objects=record.files, seconds=seconds)

    @rpc
    async def Watch(self, request: pb.WatchRequest, record: RequestLog) -> AsyncIterator[pb.WatchEvent]:
        watch = WatchRequest.from_pb(request)
        start, events = await self.drives(watch.drive).watch(watch)
        yield pb.WatchEvent(sequence=start, kind=pb.WatchEvent.KIND_WATCHING)
        async for event in events:
            record.files += 1
            yield pb.WatchEvent(sequence=event.sequence, kind=WATCH_KINDS[event.kind], file=file_info(event.entry))

    @rpc
    async def QueryWriteStatus(
        self, request: pb.QueryWriteStatusRequest, record: RequestLog
    ) -> pb.QueryWriteStatusResponse:
        query = QueryWriteStatusRequest.from_pb(request)
        held, entry = await self.drives(query.drive).query_upload(query)
        if entry is None:
            return pb.QueryWriteStatusResponse(committed_size=held)
        record.path = entry.path
        return pb.QueryWriteStatusResponse(complete=True, file=file_info(entry))
