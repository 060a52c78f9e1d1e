"""What every drive operation decides, written once for `Drive` and `AsyncDrive`.

Each operation is a plan (see `effects`): local checks, then the calls to
make, in order. The decisions live here and nowhere else: paging of List,
mounting an s3:// drive once per process, when a get is worth fetching in
parallel ranged streams, one unary PutFile for a small file against a Put
stream, which checksums a transfer computes and checks (CRC32C always, sha256
with `verify="sha256"`), how a put, a get, a ranged read or a watch goes on
when its stream breaks (`resume` paces the attempts and knows where a get got
to), which unary calls are sent again (List, Stat, Mount: `_retried`; Delete,
whose attempts carry one request id, so that the daemon tells a retry after a
lost answer of its own earlier work), what
an s3:// drive's calls never try again (`_backoff`), and how drive paths map
to local ones. The bytes themselves move in `transfer`'s
thread-based functions, which the plans run as `Blocking` work.
"""

from __future__ import annotations

import itertools
import os
import resource
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import grpc
from crc32c import crc32c
from google.protobuf.message import Message

from .checksums import joined_crc32c
from .common import DriveBase, FileStat, MountResult, WatchEvent
from .effects import Blocking, Caller, Emit, Next, Open, Plan, Send, Sleep, Stream, Unary
from .errors import (
    AlreadyExists,
    DataLoss,
    DriveError,
    EventsExpired,
    HandoffNotHeld,
    InvalidArgument,
    NotADirectory,
    NotFound,
    NothingDeleted,
    OutOfRange,
    StoreUnavailable,
    Unavailable,
)
from .handoff import handoff_port
from .pb import drive_pb2 as pb
from .resume import Backoff, GetPosition, PutProgress, upload_ids
from .transfer import (
    PARALLEL_MIN_SIZE,
    Progress,
    ReadAhead,
    Version,
    crc32c_mismatch,
    fetch_handed,
    fetch_in_ranges,
    local_files,
    no_crc32c,
    put_requests,
    receive_files,
    refuse_special_file,
    small_file_request,
)
from .uri import check_component, normalize_path
from .wire import Chunk, GetMessage, chunk_of

T = TypeVar("T")

# Entries asked for per List call: the daemon's cap. Fewer calls list a big folder faster.
LIST_PAGE_SIZE = 10_000
# Files per Put stream: after a cut, the daemon is asked about each file of the stream up to the
# one to resume, one call each.
PUT_STREAM_FILES = 1000


class MountRegistry:
    """The s3:// drives this process has mounted, by endpoint and URI: each is mounted on its first use, once."""

    def __init__(self) -> None:
        self._mounted: set[tuple[int, str, str]] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _key(drive: DriveBase) -> tuple[int, str, str] | None:
        # The process id is part of the key: a forked child has mounted nothing on its own.
        return (os.getpid(), drive.endpoint, drive.id) if drive._read_only else None

    def needs_mount(self, drive: DriveBase) -> bool:
        key = self._key(drive)
        with self._lock:
            return key is not None and key not in self._mounted

    def mounted(self, drive: DriveBase) -> None:
        key = self._key(drive)
        if key is not None:
            with self._lock:
                self._mounted.add(key)


MOUNTS = MountRegistry()


# -- requests and local checks ---------------------------------------------------------------------


def _filter(component_name: str | None) -> str:
    """A component filter for requests: "" means all components."""
    return check_component(component_name) if component_name else ""


def _local(drive: DriveBase, path: str | os.PathLike[str]) -> Path:
    """A local path: a relative one is resolved under the drive's root folder (the current directory by default)."""
    root = Path(drive.root_folder) if drive.root_folder is not None else Path.cwd()
    return root / path


def _sha256(drive: DriveBase) -> bool:
    """Whether transfers of `drive` compute the sha256 too (sent with a put, checked on a get), beside CRC32C."""
    return drive.verify == "sha256"


def _put_header(drive: DriveBase) -> pb.PutHeader:
    return pb.PutHeader(drive=drive.id, component=drive.component_name, allow_duplicates=drive.allow_duplicates)


def _get_request(drive: DriveBase, remote: str, target: Path, component_name: str | None, timeout: float | None,
                 overwrite: bool) -> pb.GetRequest:
    """The request for a whole-file get, after the local checks that fail before any waiting."""
    # A link counts, to nothing too; a path the system cannot look at is refused by `refuse_special_file`.
    if os.path.lexists(target) and not overwrite:
        raise AlreadyExists(
            f"local path {str(target)!r} exists: pass overwrite=True (`drive get --overwrite`) to replace it"
        )
    refuse_special_file(target)
    if timeout is not None and timeout < 0:
        raise InvalidArgument(f"timeout (`drive get --timeout`) must be >= 0, got {timeout}")
    return pb.GetRequest(
        drive=drive.id, path=remote, wait_seconds=timeout or 0, component=_filter(component_name),
        whole_small_files=True, checksums=True,
    )


def _target_of(remote: str, target: Path) -> Callable[[str], Path]:
    """Maps the drive paths a Get of `remote` answers with to local paths under `target`.

    An s3:// drive's keys are used as the bucket holds them, and whoever writes the bucket may name one
    `x/../../f` or `x//home/f`: a path that is not a plain one below `remote` (a '..', '.' or empty part)
    is refused, so that no file is written outside `target`. So is a file whose local folder below `target`
    is a symbolic link (a get with overwrite fills an existing folder), as `cp -r` refuses one: the files
    would go where it points.
    """
    prefix = remote + "/"
    checked: set[Path] = set()  # folders below `target` that are no symbolic link, with all theirs up to it

    def target_of(file_path: str) -> Path:
        if file_path == remote:
            return target
        below = file_path.removeprefix(prefix)
        if below == file_path or {"", ".", ".."} & set(below.split("/")):
            raise InvalidArgument(
                f"{file_path!r} has a '..', '.' or empty part: a get of {remote!r} writes no file outside "
                f"{str(target)!r}, so it stopped there; get the other files by their paths"
            )
        local = target / below
        folder = local.parent
        while folder != target and folder not in checked:
            if folder.is_symlink():
                raise NotADirectory(f"{str(folder)!r} is a symbolic link: a get of {remote!r} writes nothing "
                                    "through one, so it stopped there; remove it, or get into another place")
            checked.add(folder)
            folder = folder.parent
        return local

    return target_of


def _check_range_info(info: pb.FileInfo, request: pb.GetRequest) -> None:
    """Refuses a ranged read whose path turns out to be a folder."""
    if info.folder or info.path != request.path:
        raise InvalidArgument(f"{request.path!r} is a folder: a ranged read reads one file")


def _worth_ranges(first: pb.GetResponse, remote: str) -> bool:
    """Whether a Get's first message describes one big file, fetched faster over parallel ranged reads."""
    info = first.info
    return info.path == remote and not info.folder and info.size >= PARALLEL_MIN_SIZE


# -- the operations ---------------------------------------------------------------------------------


def _backoff(drive: DriveBase) -> Backoff:
    """The pacing of an operation's attempts on `drive`, within its retry_seconds.

    On an s3:// drive a `StoreUnavailable` is raised at once, whatever the
    call and however far it got: a daemon that lost its index mounts again
    for a List page, a Stat, a Get or a ranged read (each try would list the
    whole location against an endpoint that is down, after boto3's own
    retries), and no replica does better, as all of them share the endpoint.
    On a lit:// drive it is tried again: its store's calls work again once
    the store is back.
    """
    return Backoff(drive.retry_seconds, (StoreUnavailable,) if drive._read_only else ())


def _retried(drive: DriveBase, method: str, request: Message) -> Plan[Any]:
    """The reply to the unary call `method` with `request`, tried again on UNAVAILABLE as `_backoff` says;
    any other error is raised at once.

    For calls that have the same effect however often they run: a List
    page, a Stat, a Mount.
    """
    backoff = _backoff(drive)
    while True:
        try:
            return (yield Unary(method, request))
        except DriveError as err:
            delay = backoff.delay(err)
        yield Sleep(delay)


def mount(drive: DriveBase) -> Plan[MountResult]:
    """(Re)indexes an s3:// drive now.

    An UNAVAILABLE is tried again within the drive's retry_seconds (the
    daemon unreachable, or draining: the next attempt may reach another
    replica), except `StoreUnavailable`, raised at once (`_backoff`): the
    daemon's S3 endpoint failed, after boto3's own retries, and a mount
    tried again would list the whole location again against it.
    """
    reply: pb.MountResponse = yield from _retried(drive, "Mount", pb.MountRequest(drive=drive.id))
    MOUNTS.mounted(drive)
    return MountResult(reply.objects, reply.seconds)


def _ensure_mounted(drive: DriveBase) -> Plan[None]:
    """Mounts an s3:// drive on its first use in this process."""
    if MOUNTS.needs_mount(drive):
        yield from mount(drive)


def put(drive: DriveBase, path: str | os.PathLike[str], to: str | None, progress: Progress | None
        ) -> Plan[list[FileStat]]:
    """Stores a local file, or every file of a local folder, in one call; answers the stored files."""
    if to is None:
        remote = normalize_path(os.fspath(path))
        local = _local(drive, remote)
    else:
        remote = normalize_path(to)
        local = _local(drive, path)
    files: list[tuple[Path, str]] = yield Blocking(local_files, (local, remote))
    if not files:
        return []
    header, sha256 = _put_header(drive), _sha256(drive)
    if len(files) == 1:  # a file of at most a chunk goes in one unary call, much cheaper than a stream
        whole = yield Blocking(small_file_request, (header, *files[0], sha256))
        if whole is not None:
            [info] = yield from _put_stream(drive, header, files, progress, whole)
            return [FileStat.from_info(info)]
    stored: list[pb.FileInfo] = []
    try:
        for first in range(0, len(files), PUT_STREAM_FILES):
            stored += yield from _put_stream(drive, header, files[first:first + PUT_STREAM_FILES], progress)
    except DriveError as err:
        if err.code is None and len(files) > 1:  # a local file failed (it names it); its stream ended there
            err.message += " (a folder put: the files before it in path order may be stored, none after it)"
        raise
    return [FileStat.from_info(info) for info in stored]


def _put_stream(drive: DriveBase, header: pb.PutHeader, files: list[tuple[Path, str]], progress: Progress | None,
                whole: pb.PutFileRequest | None = None) -> Plan[list[pb.FileInfo]]:
    """Stores `files` over a Put stream; when it breaks, asks the daemon where it got to and goes on from there.

    Every file is a resumable upload of its own id: the files the daemon
    committed are not sent again, and the one it holds part of is sent from
    the first byte it does not hold (from its first byte when that resume is
    refused NOT_FOUND). The files sent again from their first
    byte get new ids: the daemon may still be reading what the broken stream
    carried, and a late start of an old id must not discard the new upload.
    `progress` counts each byte of the files once (`PutProgress`).

    `whole`: the one file of `files`, small, read whole into a PutFile
    request, which carries it instead of a stream: a PutFile whose answer
    was lost is asked about and sent again the same way (it is never held
    for a resume, so it is sent again whole).
    """
    ids = upload_ids(len(files))
    # None with verify="sha256" (its client sends the sha256 of the bytes it read), and from the first token the
    # daemon does not hold: bytes are sent.
    handoff = None if _sha256(drive) else handoff_port(drive.endpoint)
    stored: list[pb.FileInfo] = []  # the files before `start`, which the daemon committed
    versions: dict[Path, Version] = {}  # each file's at its first open: one changed before a resume is refused
    start = offset = 0  # the file to send first, and the byte its stream starts at
    backoff = _backoff(drive)
    counted = PutProgress(progress) if progress else None
    while True:
        # Each stream counts from the bytes the daemon holds of the files; the streams before it count no more.
        sent = counted.stream(sum(info.size for info in stored) + offset) if counted else None
        try:
            if whole is not None:
                whole.header.upload_id = ids[0]
                if sent:  # counted as it goes, as a stream's bytes are: once, whether or not its answer comes
                    sent(len(whole.data))
                one: pb.PutFileResponse = yield Unary("PutFile", whole)
                return [one.file]
            reply: pb.PutResponse = yield Send("Put", put_requests(
                header, files[start:], ids[start:], offset, progress=sent, sha256=_sha256(drive),
                versions=versions, handoff=handoff))
            return [*stored, *reply.files]
        except HandoffNotHeld as err:  # nothing of that file stored: it and the rest go as bytes, at once
            handoff = None
            failure: DriveError = err
        except DriveError as err:
            # A resume the daemon refused (OUT_OF_RANGE, NOT_FOUND) is asked about again; a local error (no code:
            # the file removed or changed since) is not the daemon's to mend.
            if not (offset and err.code is not None and isinstance(err, (OutOfRange, NotFound))):
                backoff.check(err)
            failure = err
        reached = (start, offset)
        # A resume refused NOT_FOUND reached a daemon that does not hold the upload: behind a balancer that spreads
        # calls, the query may reach the replica that holds it and every resume another one. The query after it
        # tells only whether the file was committed; otherwise the file is sent again from its first byte.
        refused = bool(offset) and isinstance(failure, NotFound) and not isinstance(failure, HandoffNotHeld)
        while True:
            try:
                done, offset = yield from _put_resume_point(drive, ids[start:], [remote for _, remote in files[start:]])
                break
            except DriveError as err:
                yield Sleep(backoff.delay(err))
        if refused and not done:
            offset = 0
        stored += done
        start += len(done)
        if start == len(files):
            return stored
        fresh = start + 1 if offset else start
        ids[fresh:] = upload_ids(len(files) - fresh)
        if (start, offset) > reached:
            backoff.progressed()
        elif not isinstance(failure, HandoffNotHeld):  # the daemon holds nothing more than before: try again later
            yield Sleep(backoff.pace(failure))


def _put_resume_point(drive: DriveBase, ids: list[str], paths: list[str]) -> Plan[tuple[list[pb.FileInfo], int]]:
    """Where a put of the uploads `ids` (in the order sent, of the files at `paths`) goes on from: the files of the
    first ones the daemon committed, and how many bytes it holds of the next one (0: that one is sent again whole).
    Each query names its file's path: a replica other than the one committing it waits for that commit to end."""
    done: list[pb.FileInfo] = []
    for upload_id, path in zip(ids, paths, strict=True):
        query = pb.QueryWriteStatusRequest(
            drive=drive.id, component=drive.component_name, upload_id=upload_id, path=path)
        try:
            status: pb.QueryWriteStatusResponse = yield Unary("QueryWriteStatus", query)
        except NotFound:  # never reached the daemon, expired, or held by another one
            return done, 0
        if not status.complete:
            return done, status.committed_size
        done.append(status.file)
    return done, 0


def entries(drive: DriveBase, path: str, component_name: str | None, recursive: bool,
            each: Callable[[pb.FileInfo], Any] = FileStat.from_info) -> Plan[None]:
    """Emits `each(entry)` for the entries under `path`, page by page; a page whose call fails with UNAVAILABLE
    is asked for again (`_retried`): its token holds where it starts, which any daemon of the store accepts."""
    request = pb.ListRequest(
        drive=drive.id, path=normalize_path(path, allow_root=True), recursive=recursive,
        component=_filter(component_name), page_size=LIST_PAGE_SIZE,
    )
    yield from _ensure_mounted(drive)
    while True:
        reply: pb.ListResponse = yield from _retried(drive, "List", request)
        yield Emit(map(each, reply.entries))
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def paths(drive: DriveBase, path: str, component_name: str | None) -> Plan[None]:
    """Emits the paths of the immediate entries under `path` (what `list` returns)."""
    return entries(drive, path, component_name, recursive=False, each=attrgetter("path"))


def get(drive: DriveBase, path: str, component_name: str | None, timeout: float | None, overwrite: bool,
        to: str | os.PathLike[str] | None, progress: Progress | None) -> Plan[Path]:
    """Fetches a file or folder to `to` (by default its own path under the root folder); answers the local path."""
    remote = drive._remote(path)
    target = _local(drive, normalize_path(path) if to is None else to)
    request = _get_request(drive, remote, target, component_name, timeout, overwrite)
    yield from _ensure_mounted(drive)
    stream, first = yield from _open_get(drive, request)
    try:
        if first is None:
            raise _holds_no_file(drive, remote)
        if isinstance(first, pb.GetResponse) and _worth_ranges(first, remote):
            stream.cancel()  # read again: written by the daemon into a file handed over, or in blocks
            yield Blocking(_fetch_big, (drive, remote, first.info, target, overwrite, progress), calls=True)
        else:
            yield Blocking(_receive_stream, (drive, request, stream, first, _target_of(remote, target), overwrite,
                                             progress), calls=True)
    finally:
        stream.cancel()  # a no-op once the stream is complete; stops it after a local failure
    return target


def _holds_no_file(drive: DriveBase, remote: str) -> NotFound:
    """The error of a Get answered with no file: the daemon found a folder, then no file under it (deleted in
    between, or an s3:// folder of markers alone)."""
    return NotFound(f"{remote!r} in {drive.id} holds no file (deleted as the get began, or an empty folder)")


def _open_get(drive: DriveBase, request: pb.GetRequest) -> Plan[tuple[Stream, GetMessage | None]]:
    """Opens a Get stream and reads its first message, trying again while the daemon cannot be reached
    (`_backoff`: not after a StoreUnavailable of an s3:// drive).

    A wait for the path (`wait_seconds`) counts from the first attempt: each
    later one waits only for what is left of it.
    """
    backoff = _backoff(drive)
    deadline = time.monotonic() + request.wait_seconds
    while True:
        stream = yield Open("Get", request)
        try:
            first: GetMessage | None = yield Next(stream)
            return stream, first
        except DriveError as err:
            stream.cancel()
            delay = backoff.delay(err)
        except BaseException:
            stream.cancel()
            raise
        yield Sleep(delay)
        if request.wait_seconds:
            request.wait_seconds = max(deadline - time.monotonic(), 0.001)  # 0 would not wait at all


def _rest_of_get(drive: DriveBase, request: pb.GetRequest, stream: Stream, first: GetMessage) -> Plan[None]:
    """Emits the messages of the Get `request` after `first` (read from `stream`); when the stream breaks,
    goes on from where it got on a new one (see `GetPosition`), but for what `_backoff` raises at once."""
    position = GetPosition(request)
    position.passed(first)
    backoff = _backoff(drive)
    moved = position.moved
    try:
        while True:
            try:
                while (message := (yield Next(stream))) is not None:
                    kept = position.kept(message)
                    if kept is not None:
                        position.passed(kept)
                        yield Emit((kept,))
                position.ended()
                return
            except DriveError as err:
                if position.moved > moved:
                    backoff.progressed()
                    moved = position.moved
                delay = backoff.delay(err)
            stream.cancel()
            yield Sleep(delay)
            stream = yield Open("Get", position.resumed())
    finally:
        stream.cancel()


def _receive_stream(calls: Caller, drive: DriveBase, request: pb.GetRequest, stream: Stream,
                    first: GetMessage, target_of: Callable[[str], Path], overwrite: bool, progress: Progress | None
                    ) -> int:
    """Writes the files of a Get stream whose first message was `first` (answers how many); the rest is read a
    little ahead."""
    rest = ReadAhead(calls.iterate(_rest_of_get(drive, request, stream, first)))
    replies: Iterable[GetMessage] = itertools.chain([first], rest)
    try:
        return receive_files(replies, target_of, overwrite, progress=progress, sha256=_sha256(drive))
    finally:
        # Now: an iteration left by an exception (Ctrl-C) stops its thread only once the garbage collector
        # finds it, and its thread keeps polling, and a resumed stream open, until then.
        rest.stop()


def _fetch_big(calls: Caller, drive: DriveBase, remote: str, info: pb.FileInfo, target: Path, overwrite: bool,
               progress: Progress | None) -> Path:
    """Fetches one big file: written by the daemon itself into the file handed over to it, where it is on this host
    (`drive_client.handoff`); else, or when the daemon does not write it (`HandoffNotHeld`, or a cut stream), over
    concurrent ranged reads, at once. Not handed over with verify="sha256", whose client sums the bytes it receives,
    nor past this process's file size limit (RLIMIT_FSIZE, `ulimit -f`), which the daemon's writes would not keep."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    within_limit = limit == resource.RLIM_INFINITY or info.size <= limit
    port = handoff_port(drive.endpoint) if within_limit and not _sha256(drive) else None
    if port is not None:
        try:
            fetched = fetch_handed(info, target, overwrite, port,
                                   lambda token: calls.run(_handed_get(drive, remote, info, token)), progress)
        except (HandoffNotHeld, Unavailable):  # nothing of it is kept: fetched as bytes
            fetched = None
        if fetched is not None:
            return fetched
    return _fetch_ranges(calls, drive, remote, info, target, overwrite, progress)


def _handed_get(drive: DriveBase, remote: str, info: pb.FileInfo, token: str) -> Plan[pb.HandedWrite]:
    """What the daemon wrote into the file handed over with `token`, by a Get that names the token and is pinned to
    the version `info` describes. Not resumed: the caller fetches the bytes of a cut one itself."""
    request = pb.GetRequest(drive=drive.id, path=remote, component=info.component, if_match=info.sha256 or info.etag,
                            handoff=token)
    stream = yield Open("Get", request)
    try:
        while (message := (yield Next(stream))) is not None:
            if isinstance(message, pb.GetResponse) and message.WhichOneof("message") == "written":
                return message.written
            if not isinstance(message, pb.GetResponse) or message.WhichOneof("message") != "info":
                break
    finally:
        stream.cancel()
    raise DataLoss(f"{remote!r}: the daemon ended a get into a file handed over without saying what it wrote; "
                   "nothing was kept, try again", grpc.StatusCode.DATA_LOSS)


def _fetch_ranges(calls: Caller, drive: DriveBase, remote: str, info: pb.FileInfo, target: Path, overwrite: bool,
                  progress: Progress | None) -> Path:
    """Fetches one big file over concurrent ranged reads, each pinned to the version `info` describes."""
    component, if_match = info.component or None, info.sha256 or info.etag

    def read(offset: int, length: int, summed: Callable[[int], None]) -> Iterable[Chunk]:
        return calls.iterate(read_range(drive, remote, offset, length, component, if_match, copy=False,
                                        summed=summed))

    return fetch_in_ranges(info, target, read, overwrite, calls.stop, progress=progress, sha256=_sha256(drive))


def read_range(drive: DriveBase, path: str, offset: int, length: int | None, component_name: str | None,
               if_match: str, copy: bool = True, summed: Callable[[int], None] | None = None) -> Plan[None]:
    """Emits the chunks of bytes [offset, offset+length) of a file; `copy=False` emits views into the messages.

    Their CRC32C is checked against the daemon's once the last has been
    emitted: a mismatch raises DataLoss at the end of the range. A stream that
    breaks is resumed from where it got (but for what `_backoff` raises at
    once); the daemon's CRC32C then covers the bytes of the resumed stream,
    and those the broken one carried had TCP's checks only. `summed`, when
    given, is called at the end with the CRC32C of all the range's bytes, for
    a caller that knows what it must be.
    """
    if offset < 0 or (length is not None and length < 0):
        raise InvalidArgument("offset and length cannot be negative")
    request = pb.GetRequest(
        drive=drive.id, path=drive._remote(path), offset=offset, limit=length or 0,
        if_match=if_match, component=_filter(component_name), checksums=True,
    )
    if length == 0:
        return
    yield from _ensure_mounted(drive)
    end = None if length is None else offset + length
    backoff = _backoff(drive)
    earlier = 0  # the CRC32C of the bytes that the streams before this one carried
    while True:
        stream = yield Open("Get", request)
        crc, checked = 0, False  # of this stream's bytes: the daemon's CRC32C covers the range it was asked for
        answered = False  # whether the stream carried anything: none is a folder without a file, as `get` finds
        start = request.offset
        try:
            while (message := (yield Next(stream))) is not None:
                answered = True
                data = chunk_of(message)
                if data is not None:
                    crc = crc32c(data, crc)
                    request.offset += len(data)
                    request.limit = 0 if end is None else end - request.offset
                    backoff.progressed()
                    yield Emit((bytes(data) if copy else data,))
                elif message.WhichOneof("message") == "crc32c":
                    if message.crc32c != crc:
                        raise crc32c_mismatch(request.path)
                    checked = True
                else:  # the file's info: a resumed read reads this version of this component's file
                    _check_range_info(message.info, request)
                    request.if_match = request.if_match or message.info.sha256 or message.info.etag
                    request.component = request.component or message.info.component
            if not answered:
                raise _holds_no_file(drive, request.path)
            if not checked:
                raise no_crc32c(request.path)
            if summed:
                summed(joined_crc32c(earlier, crc, request.offset - start))
            return
        except DriveError as err:
            delay = backoff.delay(err)
        finally:
            stream.cancel()
        earlier = joined_crc32c(earlier, crc, request.offset - start)
        if end is not None and request.offset >= end:  # all of it arrived before the stream broke
            if summed:
                summed(earlier)
            return
        yield Sleep(delay)


def delete(drive: DriveBase, path: str) -> Plan[None]:
    """Removes this component's file, or all its files under a folder; tried again on UNAVAILABLE as `_retried`
    says, so that a daemon restarting or draining is waited for.

    A failed attempt may have removed the files before its answer was
    lost (a cut connection): every attempt carries the same request id,
    and a retry that finds nothing left looks for that id's deletes and
    answers them as its own (`DeleteRequest.retry`), or a NOT_FOUND
    marked as looked for (`NothingDeleted`), which is raised. A daemon
    older than request ids answers a retry a plain NOT_FOUND: it is taken
    for the failed attempt's work, and the delete returns (as does then
    one of a path the component held nothing at: the two look alike to
    it). A folder delete cut midway removes the rest on the next attempt.
    """
    request = pb.DeleteRequest(drive=drive.id, path=normalize_path(path), component=drive.component_name,
                               request_id=secrets.token_hex(16))
    backoff = _backoff(drive)
    while True:
        try:
            yield Unary("Delete", request)
            return
        except NothingDeleted:
            raise
        except NotFound:
            if request.retry:
                return
            raise
        except DriveError as err:
            delay = backoff.delay(err)
        request.retry = True  # the failed attempt may have reached the daemon
        yield Sleep(delay)


def stat(drive: DriveBase, path: str, component_name: str | None) -> Plan[FileStat]:
    """Describes a file or folder (asked again on UNAVAILABLE, `_retried`)."""
    request = pb.StatRequest(drive=drive.id, path=normalize_path(path), component=_filter(component_name))
    yield from _ensure_mounted(drive)
    info: pb.FileInfo = yield from _retried(drive, "Stat", request)
    return FileStat.from_info(info)


def watch(drive: DriveBase, path: str, component_name: str | None, after_sequence: int) -> Plan[None]:
    """Emits puts and deletes under `path` as they commit, forever.

    When the stream breaks with UNAVAILABLE it reconnects (paced by
    `Backoff`, within the drive's retry_seconds) and resumes after the last
    event seen; any other failure ends the watch with its error
    (`EventsExpired` when the daemon no longer keeps the events after that
    sequence).
    """
    request = pb.WatchRequest(
        drive=drive.id, path=normalize_path(path, allow_root=True), component=_filter(component_name),
        after_sequence=after_sequence, progress=True,
    )
    backoff = _backoff(drive)
    while True:
        delay = 0.0
        stream = yield Open("Watch", request)
        try:
            while (message := (yield Next(stream))) is not None:
                backoff.progressed()
                request.after_sequence = message.sequence
                if message.kind != pb.WatchEvent.KIND_WATCHING:
                    yield Emit((WatchEvent.from_message(message),))
        except OutOfRange as err:  # the one OUT_OF_RANGE a watch gets
            raise EventsExpired(err.message, err.code) from None
        except DriveError as err:
            delay = backoff.delay(err)
        finally:
            stream.cancel()
        if delay:
            yield Sleep(delay)
