"""Requests as validated values: every field of a call checked once, before any drive sees it.

Each gRPC request message becomes one value here: the drive URI
parsed, the path normalised, the component checked, offsets, limits, page
sizes, sizes, waits and checksums refused when they cannot be right, defaults
filled in. A bad field raises `InvalidArgument` with words for a person. What
a kind of drive cannot do (a put into an `s3://` drive, a mount of a
`lit://` one) is not a question of form: the drive refuses it itself (see
`drived.drives`). What depends on the file found (an offset past its end, a
range asked of a folder, a changed version) is checked by the methods of
`GetRequest`, written once for both kinds of drive.

The values are read, never changed. They are not frozen dataclasses because
a put builds one per file, and a frozen one costs several times as much to
build.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from drive_client.errors import InvalidArgument, StaleIndexError
from drive_client.pb import drive_pb2 as pb
from drive_client.uri import DriveId, check_component, drive_path, parse_drive

from . import page_tokens
from .checksums import ClientChecksums

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10000
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_WAIT_SECONDS = 86400.0  # a day: a wait holds one of the peer's streams (--max-streams-per-peer)


def _component_filter(component: str) -> str:
    """A component filter: "" (all components) or a valid name."""
    return check_component(component) if component else ""


def check_id(value: str, what: str) -> str:
    """A resumable upload's or a delete's id (`what`), as the client made it: 1-128 letters, digits, '-' or '_'."""
    if not ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value[:140]!r} is not 1-128 letters, digits, '-' or '_' (e.g. 32 random hex digits)"
        )
    return value


def sent_checksums(message: pb.PutFinish | pb.PutFileRequest, optional: bool = False) -> ClientChecksums:
    """The checksums a client sent for a file's bytes: a CRC32C, a sha256 (as lowercase hex), or both; neither only
    when `optional` (the finish of a file handed over, whose client did not read it)."""
    crc = message.crc32c if message.HasField("crc32c") else None
    if crc is None and not message.sha256 and not optional:
        raise InvalidArgument(
            "a file's finish needs the CRC32C of its bytes (crc32c), or their sha256 (lowercase hex): it had neither"
        )
    return ClientChecksums(message.sha256.lower(), crc)


@dataclass(slots=True)
class PutHeader:
    """Where one file of a put goes (`pb.PutHeader`)."""

    drive: DriveId
    path: str  # below the root
    component: str  # the owner ("default" when none was sent)
    allow_duplicates: bool
    size: int | None  # None when the client did not say
    upload_id: str  # "" for an upload that is not resumable
    write_offset: int  # where this stream's bytes start in the file: > 0 resumes upload_id
    put_file: bool = False  # the file of a PutFile call, not of a Put stream (drived.uploads keeps their
    # completions apart)

    @classmethod
    def from_pb(cls, header: pb.PutHeader, put_file: bool = False) -> PutHeader:
        drive = parse_drive(header.drive)
        path = drive_path(drive, header.path)
        component = check_component(header.component)
        size = header.size if header.HasField("size") else None
        if size is not None and size < 0:
            raise InvalidArgument(f"size {size} is negative")
        if header.write_offset < 0:
            raise InvalidArgument(f"write_offset {header.write_offset} is negative")
        if header.upload_id:
            check_id(header.upload_id, "upload id")
        elif header.write_offset:
            raise InvalidArgument(
                "write_offset resumes a resumable upload: it needs the upload_id of the first stream"
            )
        return cls(
            drive, path, component, header.allow_duplicates, size, header.upload_id, header.write_offset, put_file
        )


@dataclass(slots=True)
class QueryWriteStatusRequest:
    """Which resumable upload to describe (`pb.QueryWriteStatusRequest`)."""

    drive: DriveId
    component: str  # the putting component ("default" when none was sent)
    upload_id: str
    path: str  # the upload's file, below the root; "" when the client did not say

    @classmethod
    def from_pb(cls, request: pb.QueryWriteStatusRequest) -> QueryWriteStatusRequest:
        drive = parse_drive(request.drive)
        path = drive_path(drive, request.path) if request.path else ""
        return cls(drive, check_component(request.component), check_id(request.upload_id, "upload id"), path)


@dataclass(slots=True)
class GetRequest:
    """Which file or folder to read, and which part of it (`pb.GetRequest`)."""

    drive: DriveId
    path: str  # "" is the whole drive
    component: str  # "" finds the path in whichever component holds it
    offset: int
    limit: int  # 0: to the end
    wait_seconds: float  # <= 0: answer at once
    if_match: str
    whole_small_files: bool
    checksums: bool  # send the CRC32C of each file's bytes after them

    @classmethod
    def from_pb(cls, request: pb.GetRequest) -> GetRequest:
        drive = parse_drive(request.drive)
        path = drive_path(drive, request.path, allow_root=True)
        component = _component_filter(request.component)
        if request.offset < 0 or request.limit < 0:
            raise InvalidArgument("offset and limit cannot be negative")
        if math.isnan(request.wait_seconds):
            raise InvalidArgument("wait_seconds is not a number: give the seconds to wait, or 0 not to wait")
        if request.wait_seconds > MAX_WAIT_SECONDS:
            raise InvalidArgument(
                f"wait_seconds {request.wait_seconds:g} is longer than the longest wait, {MAX_WAIT_SECONDS:g} s: "
                "wait again when it expires"
            )
        if request.handoff and (request.offset or request.limit or request.wait_seconds):
            raise InvalidArgument("a get into a file handed over writes the whole file, once it is there: it takes no "
                                  "offset, limit or wait_seconds")
        return cls(
            drive, path, component, request.offset, request.limit, request.wait_seconds, request.if_match,
            request.whole_small_files, request.checksums,
        )

    def shown(self) -> str:
        """How a message names the requested path."""
        return f"{self.path!r} in {self.drive.uri}"

    def check_range(self, size: int) -> None:
        """Refuses an offset past the end of the file found (of `size` bytes)."""
        if self.offset > size:
            raise InvalidArgument(f"offset {self.offset} is past the end of {self.shown()} ({size} bytes)")

    def check_version(self, version: str, kind: str) -> None:
        """Refuses a file whose version (`kind`: sha256 or ETag) is not the one `if_match` asks for."""
        if self.if_match and self.if_match != version:
            raise StaleIndexError(f"{self.shown()} changed ({kind} {version}, expected {self.if_match}): read it again")

    def check_folder(self) -> None:
        """Refuses a range or version asked of a folder."""
        if self.offset or self.limit or self.if_match:
            raise InvalidArgument(f"{self.shown()} is a folder: offset, limit and if_match apply to files only")


@dataclass(slots=True)
class ListRequest:
    """One page of a listing (`pb.ListRequest`)."""

    drive: DriveId
    path: str  # "" is the root
    component: str  # "" lists all components
    recursive: bool
    start_after: str  # the previous page's last path, from its page token; "" for the first page
    limit: int  # entries on the page: at least 1, at most MAX_PAGE_SIZE

    @classmethod
    def from_pb(cls, request: pb.ListRequest) -> ListRequest:
        drive = parse_drive(request.drive)
        path = drive_path(drive, request.path, allow_root=True)
        if request.page_size < 0:
            raise InvalidArgument("page_size cannot be negative")
        component = _component_filter(request.component)
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = cls(drive, path, component, request.recursive, "", limit)
        page.start_after = page_tokens.start_after(page.listing, request.page_token)  # the token is checked against it
        return page

    @property
    def listing(self) -> tuple[str, str, str, bool]:
        """What a page token is bound to: the listing it pages through (the same in the token issued and checked)."""
        return self.drive.uri, self.path, self.component, self.recursive

    def page_token(self, last_path: str) -> str:
        """The token of the page that follows one ending at `last_path`."""
        return page_tokens.issue(self.listing, last_path)


@dataclass(slots=True)
class PathRequest:
    """A call about one path below a drive's root."""

    drive: DriveId
    path: str  # below the root
    component: str


class StatRequest(PathRequest):
    """Which file or folder to describe (`pb.StatRequest`); component "" looks in all components."""

    __slots__ = ()

    @classmethod
    def from_pb(cls, request: pb.StatRequest) -> StatRequest:
        drive = parse_drive(request.drive)
        return cls(drive, drive_path(drive, request.path), _component_filter(request.component))


@dataclass(slots=True)
class DeleteRequest(PathRequest):
    """Which of the caller's files to remove (`pb.DeleteRequest`); component is the caller ("default" when
    none was sent)."""

    request_id: str  # the same for every attempt of one delete; "" when none was sent
    retry: bool  # not the first attempt: when it finds nothing, it looks for what the earlier ones removed

    @classmethod
    def from_pb(cls, request: pb.DeleteRequest) -> DeleteRequest:
        drive = parse_drive(request.drive)
        request_id = request.request_id and check_id(request.request_id, "request id")
        if request.retry and not request_id:
            raise InvalidArgument("a Delete's retry needs the request_id its first attempt was sent with")
        return cls(drive, drive_path(drive, request.path), check_component(request.component), request_id,
                   request.retry)


@dataclass(slots=True)
class MountRequest:
    """Which drive to index (`pb.MountRequest`)."""

    drive: DriveId

    @classmethod
    def from_pb(cls, request: pb.MountRequest) -> MountRequest:
        return cls(parse_drive(request.drive))


@dataclass(slots=True)
class WatchRequest:
    """Which changes to stream (`pb.WatchRequest`)."""

    drive: DriveId
    path: str  # "" is the whole drive
    component: str  # "" watches all components
    after_sequence: int  # 0: from now

    @classmethod
    def from_pb(cls, request: pb.WatchRequest) -> WatchRequest:
        drive = parse_drive(request.drive)
        path = drive_path(drive, request.path, allow_root=True)
        if request.after_sequence < 0:
            raise InvalidArgument(f"after_sequence {request.after_sequence} is negative: 0 watches from now, a "
                                  "sequence number a watch reported resumes after it")
        return cls(drive, path, _component_filter(request.component), request.after_sequence)

    def reports(self, path: str, component: str) -> bool:
        """Whether this watch reports a change of `path` owned by `component`."""
        in_folder = not self.path or path == self.path or path.startswith(self.path + "/")
        return in_folder and (not self.component or component == self.component)
