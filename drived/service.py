"""DriveService: the gRPC face of the drives.

Each handler decodes its request into a validated value (`drived.requests`),
calls the drives of the request's drive (`drived.drives`) and answers with
protobuf messages. The one wrapper around every handler, `rpc`,
authenticates the call (`drived.auth`), logs one structured line per
request (refused ones past a rate only counted: `drived.refusals`), counts
it in the metrics, and turns what the handler raised into the call's status:
a call refused for its token is counted like any other. Handlers reach the
drives only through `DriveService._drives`, which checks the call's grant
against each drive it names.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import inspect
import itertools
import logging
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any, NoReturn, TypeVar, overload

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from drive_client.errors import (
    DriveError,
    HandoffNotHeld,
    InvalidArgument,
    ResourceExhausted,
    TooManyStreams,
    Unavailable,
)
from drive_client.handoff import GET
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc as pb_grpc
from drive_client.uri import DriveId
from drive_client.wire import (
    SMALL_FILE,
    GetMessage,
    PutMessage,
    Undecodable,
    handing_on_undecodable,
    reading_its_request,
)

from . import metrics
from .answers import AnswerRoom, Held
from .auth import EVERYONE, NOBODY, READS, WRITES, Access, Grant
from .backends.base import Chunks, ClientTooSlow, Damaged, StoredFileError
from .config import ANSWER_ENTRIES_BYTES
from .drives import DriveRouter, Drives, PendingPut
from .entry import Entry
from .handoff import Handoffs, taking
from .limits import Stream, Streams, peer_host
from .puts import PutStream
from .refusals import RefusalLog
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

log = logging.getLogger("drived")

WATCH_KINDS = {"put": pb.WatchEvent.KIND_PUT, "delete": pb.WatchEvent.KIND_DELETE}
ENTRY_FRAMING = 4  # the tag and length of an entry in its message (a FileInfo is under 2 MiB)


def file_info(entry: Entry) -> pb.FileInfo:
    modified = Timestamp()
    if entry.mtime_ns:
        modified.FromNanoseconds(entry.mtime_ns)
    return pb.FileInfo(
        path=entry.path, size=entry.size, sha256=entry.sha256, etag=entry.etag, modified=modified,
        component=entry.component, generation=entry.generation, folder=entry.folder, crc32c=entry.crc32c,
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
    grant: Grant = NOBODY  # the caller's, once authenticated; its name is logged, never the token
    stream: Stream | None = None  # the call's place among the open streams (drived.limits), once admitted
    answer: Held | None = None  # the room a List's answer holds until its client takes it (drived.answers)


LOGGED_CHARS = 4200  # a valid path (at most 4,096 bytes) is logged whole


def _loggable(text: str) -> str:
    """`text` for the request log: a field a client sent longer than any valid one is cut, its length said, so
    that no request makes a log line of megabytes."""
    return text if len(text) <= LOGGED_CHARS else f"{text[:LOGGED_CHARS]}... ({len(text)} characters)"


@contextmanager
def _logged(method: str, peer: str, refusals: RefusalLog) -> Iterator[RequestLog]:
    """Logs and counts one request from `peer` (its drive, path and component once known: `_describe`); a refused
    one is logged as `refusals` says."""
    record = RequestLog(method)
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
        if refusals.logs(peer_host(peer), record.status):
            fields = {
                "method": record.method, "drive": record.drive, "path": record.path,
                "component": record.component, "bytes": record.bytes, "files": record.files,
                "duration_ms": round(seconds * 1000, 3), "status": record.status, "token": record.grant.name,
            }
            log.info("request", extra={"fields": fields})


# The most a status message takes as sent, percent-encoded (three characters for each byte outside printable
# ASCII): gRPC clients take 8 KiB of trailers, and past it (16 KiB for certain) answer RESOURCE_EXHAUSTED
# "received metadata size exceeds ..." instead of the status.
MAX_SENT_DETAILS = 6 << 10


def _sent_size(char: str) -> int:
    return 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode())


def fitting(details: str) -> str:
    """A status message that a client takes whole: one naming long paths or drive ids keeps its start and its end,
    each within half of MAX_SENT_DETAILS as sent."""
    if len(details) <= MAX_SENT_DETAILS and sum(map(_sent_size, details)) <= MAX_SENT_DETAILS:
        return details
    half = MAX_SENT_DETAILS // 2 - 4  # room for the " ... " between
    head = bisect.bisect_right(list(itertools.accumulate(map(_sent_size, details[:half]))), half)
    tail = bisect.bisect_right(list(itertools.accumulate(map(_sent_size, reversed(details[-half:])))), half)
    return f"{details[:head]} ... {details[len(details) - tail:]}"


async def _fail(context: grpc.aio.ServicerContext, record: RequestLog, err: Exception) -> NoReturn:
    """Answers the call with the status of `err`: its own for a DriveError (an UNAVAILABLE marked as the
    daemon's, `Unavailable.mark`), else INTERNAL.

    Running out of file descriptors anywhere is RESOURCE_EXHAUSTED, as the
    client can retry it; a path too long for the disk is INVALID_ARGUMENT.
    The message of an unexpected error names only its type: its text may
    name a server path. The daemon log has the whole traceback.
    """
    if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
        log.warning("out of file descriptors in %s: %s", record.method, err)
        err = ResourceExhausted(
            "drived has too many files open (its descriptor limit, ulimit -n): retry when transfers have ended"
        )
    elif isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        # A path the API takes (4,096 bytes) can pass the system's limit behind the data dir, drive and component.
        err = InvalidArgument(
            "a path is too long for the daemon's disk: behind its data dir, the drive and the component it passes "
            "the system's limit on a file's path (ENAMETOOLONG): use a shorter path"
        )
    if isinstance(err, DriveError):
        record.status = err.status.name
        if isinstance(err, Damaged):
            metrics.DAMAGED_READS.inc()
            log.error("damaged stored file", extra={"fields": {"key": err.key, "damage": err.what}})
        await context.abort(err.status, fitting(err.details()), err.trailers)
    record.status = "INTERNAL"
    log.error("unexpected error in %s\n%s", record.method, "".join(traceback.format_exception(err)))
    message = f"drived: internal error ({type(err).__name__}) in {record.method}; see the daemon log"
    await context.abort(grpc.StatusCode.INTERNAL, message)
    raise AssertionError("unreachable")  # context.abort raises


async def _end_idle(
    context: grpc.aio.ServicerContext, record: RequestLog, stream: Stream, streams: Streams
) -> NoReturn:
    """Answers a stream that the idle check cancelled: UNAVAILABLE, so a client that is still there retries.

    For a Get the status waits behind the chunk its client did not take, so this
    returns only once the client reads again or goes away: until then the stream
    keeps its place among the open ones, which bounds what such streams hold. A
    client that went away is answered nothing, and the call is CANCELLED, as
    one whose client goes away mid-write.
    """
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    record.status = "UNAVAILABLE"
    ended = _ended_idle(stream, streams)
    try:
        await context.abort(ended.status, ended.details())
    except grpc.aio.InternalError:  # the status's send to a call its client ended
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable")  # context.abort raises


def _ended_idle(stream: Stream, streams: Streams) -> Unavailable:
    """What the idle check's end of `stream` answers: UNAVAILABLE (the daemon's own), saying why."""
    idle_timeout, setting = streams.idle_timeout, streams.named("stream_idle_timeout")
    if stream.arriving:  # what came of a request is not seen until all of it has
        why = f"its request had not all come {idle_timeout:g} s after its call waited for it"
    else:
        why = f"its client {'sent' if stream.method == 'Put' else 'read'} nothing for {idle_timeout:g} s"
    return Unavailable(f"this {stream.method} was ended: {why} ({setting}); retry it")


def _check_decoded(message: object) -> None:
    """Refuses a request message that did not decode (see drive_client.wire.Undecodable)."""
    if isinstance(message, Undecodable):
        raise message.error


def _describe(record: RequestLog, request: object) -> None:
    """Logs the drive, path and component of `request` where it has them."""
    record.drive, record.path, record.component = (
        _loggable(getattr(request, name, "")) for name in ("drive", "path", "component"))


# A whole request arrives with its call: one not read this long after its call started is still arriving, and the
# call then takes a place among the requests arriving (`Streams.arriving`), or is refused, to wait for the rest.
ARRIVAL_GRACE = 0.25


class _StoppedArriving(Exception):
    """The idle check ended `stream`, whose request stopped arriving."""

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream.method)
        self.stream = stream


def _arriving(stream: Stream) -> Stream:
    """`stream`, marked as waiting for its request, which the idle check then times."""
    stream.arriving = stream.waiting = True
    return stream


async def _request(context: grpc.aio.ServicerContext, record: RequestLog, stream: Stream | None,
                   place: Callable[[], AbstractContextManager[Stream]]) -> object:
    """The call's one request message (`_arrived`), refused when it does not decode."""
    message = await _arrived(context, stream, place)
    if message is grpc.aio.EOF:
        raise await _without_request()
    _check_decoded(message)
    _describe(record, message)
    return message


# gRPC ends the read of a call its client cancelled as if the request had ended, and cancels the call only a moment
# later (~1 ms here): a call whose request ended before its message (a client stream: before its first) waits this
# long for that.
CANCELLATION_LAG = 0.05


async def _without_request() -> InvalidArgument:
    """The refusal of a call whose request ended before its message; the call is cancelled meanwhile instead
    (and logged CANCELLED) when its client cancelled it."""
    await asyncio.sleep(CANCELLATION_LAG)
    return InvalidArgument("the call ended before its request message")


async def _arrived(context: grpc.aio.ServicerContext, stream: Stream | None,
                   place: Callable[[], AbstractContextManager[Stream]]) -> object:
    """The call's next request message, or EOF.

    gRPC would hold what came of a request until all of it has, before the
    daemon knows of the call: a client that sends part of many requests and
    stalls would hold up to a message (4 MiB) each. The call waits for the
    rest of its request in its own place among the streams (a `stream`), or
    in one among the requests arriving (`place`) once ARRIVAL_GRACE has
    passed, so a request that arrives whole never needs one; while it waits,
    the idle check ends it (`_StoppedArriving`) when its client stops sending.
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    refused: list[TooManyStreams] = []
    waiting = stream and _arriving(stream)
    timer: asyncio.Handle | None = None
    with contextlib.ExitStack() as placed:

        def still_arriving() -> None:  # ARRIVAL_GRACE has passed: the call takes a place, or is refused
            nonlocal waiting
            try:
                waiting = _arriving(placed.enter_context(place()))
            except TooManyStreams as err:
                refused.append(err)
                if task is not None:
                    task.cancel()

        def grace_over() -> None:
            # After the wake-up of a read that ended in the same turn of the loop (one that stalled that long).
            nonlocal timer
            timer = loop.call_soon(still_arriving)

        if stream is None:
            timer = loop.call_later(ARRIVAL_GRACE, grace_over)
        try:
            message = await context.read()
        except asyncio.CancelledError:
            if refused and task is not None:
                task.uncancel()
                raise refused[0] from None
            if waiting is not None and waiting.timed_out:
                raise _StoppedArriving(waiting) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if waiting is not None:
            waiting.arriving = waiting.waiting = False
    return message


def reading_as_drive_service(service: ServiceDescriptor, handlers: dict[str, grpc.RpcMethodHandler],
                             streams: Streams) -> dict[str, grpc.RpcMethodHandler]:
    """The method handlers of another service the daemon serves (health, reflection), whose requests are read as
    DriveService's are (`_arrived`): otherwise a client sending requests in part to them holds what it sent, as
    it held with DriveService's; and one that does not decode is refused INVALID_ARGUMENT, as theirs is."""
    return {method: handing_on_undecodable(_reading_arrived(handler, streams, method), service.methods_by_name[method])
            for method, handler in handlers.items()}


def _reading_arrived(handler: grpc.RpcMethodHandler, streams: Streams, method: str) -> grpc.RpcMethodHandler:
    """`handler` of `method`, run as one whose client streams, reading each request with `_arrived`; a refusal, a
    request that does not decode or an end by the idle check is answered as DriveService's are."""

    async def arrived(context: grpc.aio.ServicerContext) -> object:
        place = partial(streams.arriving, method, context.peer(), asyncio.current_task())
        record = RequestLog(method)  # such calls are not logged: what _fail and _end_idle answer with
        try:
            message = await _arrived(context, None, place)
            _check_decoded(message)
            return message
        except (TooManyStreams, InvalidArgument) as err:
            await _fail(context, record, err)
        except _StoppedArriving as stopped:
            await _end_idle(context, record, stopped.stream, streams)
        raise AssertionError("unreachable")  # both abort

    if handler.request_streaming:  # reflection's: a client stream answered by a stream
        answers = handler.stream_stream

        async def requests(context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            while (message := await arrived(context)) is not grpc.aio.EOF:
                yield message

        async def streamed(_: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            async for answer in answers(requests(context), context):
                yield answer

        return handler._replace(stream_stream=streamed)

    answer = handler.unary_unary or handler.unary_stream

    async def unary(_: object, context: grpc.aio.ServicerContext) -> object:
        request = await arrived(context)
        if request is grpc.aio.EOF:
            await _fail(context, RequestLog(method), await _without_request())
        if not handler.response_streaming:
            return await answer(request, context)
        try:  # a stream of answers (health's Watch) lasts as long as its client stays
            with streams.answering(method, context.peer()):
                return await answer(request, context)
        except TooManyStreams as err:
            await _fail(context, RequestLog(method), err)

    return reading_its_request(handler, unary)


async def _received(context: grpc.aio.ServicerContext, stream: Stream) -> AsyncIterator[object]:
    """The messages of a client stream, read one at a time, counted for the idle check, and refused when one
    does not decode.

    Read with `context.read()` rather than grpc's request iterator, whose
    generator keeps the last message while it waits for the next: a stalled
    upload then held a whole chunk (up to the message limit) for as long as
    it stalled. Nothing here keeps a message once it is handed on. A stream
    that ends before its first message waits CANCELLATION_LAG first, so that
    one its client cancelled is cancelled (and logged so), not answered.
    """
    received = False
    while True:
        stream.waiting = True
        message = await context.read()
        stream.waiting = False
        stream.progress += 1
        if message is grpc.aio.EOF:
            if not received:
                await asyncio.sleep(CANCELLATION_LAG)
            return
        _check_decoded(message)
        received = True
        yield message
        del message


S = TypeVar("S")
R = TypeVar("R")
A = TypeVar("A")


async def _alone(message: A) -> AsyncIterator[A]:
    """A stream of one message."""
    yield message


# Calls that hold a stream's place (see drived.limits), and those of them whose peer may not go quiet.
STREAMS = frozenset({"Put", "PutFile", "Get", "Watch"})
IDLE_LIMITED = frozenset({"Put", "Get"})
HELD_ANSWERS = frozenset({"List"})  # answers of up to a message, held in room of their own (drived.answers)


@overload
def rpc(
    handler: Callable[[S, R, RequestLog], AsyncIterator[A]],
) -> Callable[[S, R, grpc.aio.ServicerContext], Awaitable[None]]: ...


@overload
def rpc(
    handler: Callable[[S, R, RequestLog], Awaitable[A]],
) -> Callable[[S, R, grpc.aio.ServicerContext], Awaitable[A]]: ...


def rpc(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Makes `handler(self, request, record)` a gRPC method `(self, requests, context)` that is logged,
    counted, refused while the daemon drains, admitted among the open streams (`DriveService.streams`)
    and answers a failure with its status.

    Every method is registered as one whose client streams
    (`drive_client.wire.add_fast_servicer`): gRPC's request iterator,
    `requests`, goes unused, and the call's one request is read here once
    the call is authenticated and admitted (`_request`), or, a client
    stream, handed to the handler as `request`, read as `_received` says.
    One wrapper for every shape: a handler that returns its answer or one
    that yields its answers (a server stream, written one by one, and closed
    when the call ends early).
    """
    method = handler.__name__
    if method not in READS | WRITES:
        raise TypeError(f"{method}: say in drived.auth whether it reads or writes (READS or WRITES)")
    idle_limited = method in IDLE_LIMITED
    one_request = not pb.DESCRIPTOR.services_by_name["DriveService"].methods_by_name[method].client_streaming

    @asynccontextmanager
    async def answering(
        service: DriveService, context: grpc.aio.ServicerContext, record: RequestLog
    ) -> AsyncIterator[tuple[Stream | None, object]]:
        """The body of a call: authenticated, refused while draining, admitted among the streams (the Stream;
        None for a call that is none), its request read (None for a client stream, read by the handler), and its
        failure answered with its status, an idle stream's with UNAVAILABLE."""
        call = asyncio.current_task()
        assert call is not None  # gRPC runs each call in a task of its own
        service.calls[call] = record
        try:
            record.grant = service.caller(context)
            if service.draining:
                raise Unavailable("shutting down: retry (on another replica, or here once it is back)")
            with contextlib.ExitStack() as admitted:
                stream = None
                if method in STREAMS:
                    stream = admitted.enter_context(service.streams.opened(method, context.peer(), idle_limited))
                    record.stream = stream
                try:
                    request = None
                    if one_request:
                        place = partial(service.streams.arriving, method, context.peer(), call)
                        request = await _request(context, record, stream, place)
                    if method in HELD_ANSWERS:
                        held = record.answer = await service.answers.take(context.peer())
                        context.add_done_callback(lambda _: held.release())
                    yield stream, request
                except _StoppedArriving as stopped:
                    await _end_idle(context, record, stopped.stream, service.streams)
                except asyncio.CancelledError:
                    if stream is None or not stream.timed_out:
                        raise
                    # Answered while still admitted: see _end_idle.
                    await _end_idle(context, record, stream, service.streams)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _fail(context, record, err)
        finally:
            del service.calls[call]

    if inspect.isasyncgenfunction(handler):

        @wraps(handler)
        async def streams(self: DriveService, requests: object, context: grpc.aio.ServicerContext) -> None:
            with _logged(method, context.peer(), self.refusals) as record:
                async with answering(self, context, record) as (stream, request):
                    assert stream is not None
                    async with aclosing(handler(self, request, record)) as answers:
                        async for answer in answers:
                            stream.waiting = True
                            try:
                                await context.write(answer)
                            except grpc.aio.InternalError:  # a write to a call its client ended
                                raise asyncio.CancelledError from None
                            stream.waiting = False
                            stream.progress += 1

        return streams

    @wraps(handler)
    async def answers(self: DriveService, requests: object, context: grpc.aio.ServicerContext) -> object:
        with _logged(method, context.peer(), self.refusals) as record:
            async with answering(self, context, record) as (stream, request):
                if not one_request:
                    assert stream is not None
                    request = _received(context, stream)
                return await handler(self, request, record)
        raise AssertionError("unreachable")  # a failure is answered by aborting, which raises

    return answers


async def _get_files(drives: Drives, get: GetRequest, record: RequestLog,
                     write: Callable[[Chunks], Awaitable[int]] | None = None) -> AsyncGenerator[GetMessage, None]:
    """The messages of a Get: each file's info and bytes; with `write`, which writes a file's bytes into the file a
    client handed over (`drived.handoff`) and answers their size, the one file's info, then what was written."""
    async for entry, chunks in drives.open_files(get):
        try:
            record.files += 1
            if write is not None:
                if entry.path != get.path:  # the first file of a folder: nothing is written yet
                    raise InvalidArgument(f"{get.shown()} is a folder: a get into a file handed over writes one "
                                          "file; get a folder's files in a stream")
                yield pb.GetResponse(info=file_info(entry))
                record.bytes = await write(chunks)
                yield pb.GetResponse(written=pb.HandedWrite(size=record.bytes, crc32c=chunks.crc32c))
            elif get.whole_small_files and entry.size <= SMALL_FILE:
                data = b"".join([chunk async for chunk in chunks])
                record.bytes += len(data)
                whole = pb.GetFile(info=file_info(entry), data=data)
                if get.checksums:
                    whole.crc32c = chunks.crc32c
                yield pb.GetResponse(file=whole)
            else:
                yield pb.GetResponse(info=file_info(entry))
                async for chunk in chunks:
                    record.bytes += len(chunk)
                    yield chunk  # encoded by drive_client.wire, without a protobuf copy
                if get.checksums:
                    yield pb.GetResponse(crc32c=chunks.crc32c)
        except StoredFileError as err:  # named by its key in the store: named here as the client asked for it
            raise err.named(get.drive.uri, entry.component, entry.path) from None
        finally:
            await chunks.aclose()


class DriveService(pb_grpc.DriveServiceServicer):
    """Serves drive.v1.DriveService."""

    def __init__(self, drives: DriveRouter, streams: Streams, access: Access | None = None) -> None:
        self._router = drives
        self.handoffs: Handoffs | None = None  # the files clients of this host hand over, once its socket listens
        self.streams = streams
        self.refusals = RefusalLog()
        self.answers = AnswerRoom()
        self.access = access or Access()
        self.draining = False  # set on SIGTERM: new calls answer UNAVAILABLE while the open ones finish
        # The calls running, each with its request's record. One that the server's stop cancelled runs on to the
        # end of the store's change it makes (a put's commit, a file's delete: `drived.managed._to_its_end`), and
        # the drain waits for it.
        self.calls: dict[asyncio.Task[Any], RequestLog] = {}

    async def ended(self) -> None:
        """Waits for every call running to end."""
        while self.calls:
            await asyncio.wait(set(self.calls))

    def running(self) -> list[dict[str, str]]:
        """The calls running, named as the request log names them."""
        return [{"method": record.method, "drive": record.drive, "path": record.path, "component": record.component}
                for record in self.calls.values()]

    def caller(self, context: grpc.aio.ServicerContext) -> Grant:
        """What the call may do, by its token; Unauthenticated when tokens are needed and it has no good one."""
        return self.access.authenticate(context.invocation_metadata()) if self.access.required else EVERYONE

    def _drives(self, record: RequestLog, drive: DriveId) -> Drives:
        """The drives of `drive`, once the caller's grant covers the call on it (PermissionDenied otherwise)."""
        record.grant.check(record.method, drive)
        return self._router(drive)

    async def _begin_put(self, record: RequestLog, header: pb.PutHeader, put_file: bool) -> PendingPut:
        _describe(record, header)
        put = PutHeader.from_pb(header, put_file)
        return await self._drives(record, put.drive).begin_put(put)

    async def _put(self, record: RequestLog, messages: AsyncIterable[PutMessage | pb.PutFileRequest], hold: bool
                   ) -> list[Entry]:
        """Stores the files of a Put stream, or of a PutFile call as a stream of one whole file; the committed ones.

        `hold`: whether a resumable file left unfinished is held for a resume when the client ended or broke the
        call (a Put), or was too slow for the memory its upload holds (`ClientTooSlow`), not when the daemon
        refused it or the idle check ended it (README, Failure behaviour).
        """
        assert record.stream is not None  # Put and PutFile are STREAMS: admitted before the handler runs
        stream = PutStream(partial(self._begin_put, record, put_file=not hold), self.handoffs)  # only Put holds
        keep = False
        try:
            async for message in messages:
                await stream.receive(message)
                del message  # not kept while the next one is awaited (see _received)
            keep = hold
            entries = await stream.results()
        except ClientTooSlow:
            keep = hold
            raise
        except asyncio.CancelledError:
            keep = hold and not record.stream.timed_out
            raise
        finally:
            record.bytes = stream.bytes
            await stream.close(keep)
        record.files = len(entries)
        return entries

    @rpc
    async def Put(self, messages: AsyncIterable[PutMessage], record: RequestLog) -> pb.PutResponse:
        entries = await self._put(record, messages, hold=True)
        return pb.PutResponse(files=[file_info(e) for e in entries])

    @rpc
    async def PutFile(self, request: pb.PutFileRequest, record: RequestLog) -> pb.PutFileResponse:
        entries = await self._put(record, _alone(request), hold=False)
        return pb.PutFileResponse(file=file_info(entries[0]))

    @rpc
    async def Get(  # type: ignore[override]  # chunks are yielded as bytes, see drive_client.wire
        self, request: pb.GetRequest, record: RequestLog
    ) -> AsyncIterator[GetMessage]:
        if not request.handoff:
            get = GetRequest.from_pb(request)
            async with aclosing(_get_files(self._drives(record, get.drive), get, record)) as messages:
                async for message in messages:
                    yield message
            return
        handoffs = taking(self.handoffs)
        handed = handoffs.claim(request.handoff, GET)  # first: a Get refused for what it asks lets the file go too
        try:
            get = GetRequest.from_pb(request)
            drives = self._drives(record, get.drive)
            if not drives.bytes_on_this_host:
                raise HandoffNotHeld(f"{HandoffNotHeld.mark}{get.drive.uri} keeps its files' bytes in S3, which serves "
                                     "them faster over parallel ranged reads than over one stream: fetch them so")
            async with aclosing(_get_files(drives, get, record, partial(handoffs.write, handed))) as messages:
                async for message in messages:
                    yield message
        finally:
            handoffs.release(handed)

    @rpc
    async def List(self, request: pb.ListRequest, record: RequestLog) -> pb.ListResponse:
        listing = ListRequest.from_pb(request)
        entries, more = await self._drives(record, listing.drive).list_entries(listing)
        # A page of long paths is cut where its message would pass the limit, the rest coming on the next page
        # (a managed drive's page ends there already, before it reads files the answer could not carry).
        infos: list[pb.FileInfo] = []
        size = 0
        for entry in entries:
            info = file_info(entry)
            size += info.ByteSize() + ENTRY_FRAMING
            if infos and size > ANSWER_ENTRIES_BYTES:
                more = True
                break
            infos.append(info)
        record.files = len(infos)
        assert record.answer is not None  # a List is among HELD_ANSWERS
        record.answer.keep(size)
        token = listing.page_token(infos[-1].path) if more else ""
        return pb.ListResponse(entries=infos, next_page_token=token)

    @rpc
    async def Stat(self, request: pb.StatRequest, record: RequestLog) -> pb.FileInfo:
        stat = StatRequest.from_pb(request)
        return file_info(await self._drives(record, stat.drive).stat(stat))

    @rpc
    async def Delete(self, request: pb.DeleteRequest, record: RequestLog) -> pb.DeleteResponse:
        delete = DeleteRequest.from_pb(request)
        record.files = await self._drives(record, delete.drive).delete(delete)
        return pb.DeleteResponse(files_deleted=record.files)

    @rpc
    async def Mount(self, request: pb.MountRequest, record: RequestLog) -> pb.MountResponse:
        mount = MountRequest.from_pb(request)
        record.files, seconds = await self._drives(record, mount.drive).mount(mount)
        return pb.MountResponse(objects=record.files, seconds=seconds)

    @rpc
    async def Watch(  # type: ignore[override]  # the rpc wrapper writes what it yields (context.write)
        self, request: pb.WatchRequest, record: RequestLog
    ) -> AsyncIterator[pb.WatchEvent]:
        watch = WatchRequest.from_pb(request)
        start, events = await self._drives(record, watch.drive).watch(watch)
        yield pb.WatchEvent(sequence=start, kind=pb.WatchEvent.KIND_WATCHING)
        async for event in events:
            if isinstance(event, int):  # how far it read, past events it does not report: where a resume starts
                if request.progress:  # a client written before it may take any later message for an event
                    yield pb.WatchEvent(sequence=event, kind=pb.WatchEvent.KIND_WATCHING)
                continue
            record.files += 1
            yield pb.WatchEvent(sequence=event.sequence, kind=WATCH_KINDS[event.kind], file=file_info(event.entry))

    @rpc
    async def QueryWriteStatus(
        self, request: pb.QueryWriteStatusRequest, record: RequestLog
    ) -> pb.QueryWriteStatusResponse:
        query = QueryWriteStatusRequest.from_pb(request)
        drives = self._drives(record, query.drive)
        held, entry = await drives.query_upload(query)
        if entry is None:
            return pb.QueryWriteStatusResponse(committed_size=held)
        record.path = entry.path
        return pb.QueryWriteStatusResponse(complete=True, file=file_info(entry))
