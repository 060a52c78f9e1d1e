"""What `Drive` and `AsyncDrive` are made of besides their calls: the drive's settings and the result types.

Their operations are `core`'s plans; the twins differ only in how they call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

import grpc

from .channels import Connection, check_yes_no_variables
from .errors import DriveError, InvalidArgument, NotADirectory, NotFound, from_rpc_error
from .pb import drive_pb2 as pb
from .resume import RETRY_SECONDS
from .uri import check_component, drive_path, parse_drive

VERIFY = ("crc32c", "sha256")  # what a Drive's `verify` may be


def check_verify(verify: str) -> str:
    """`verify` once it is one of VERIFY: what transfers check besides their size."""
    if verify not in VERIFY:
        raise InvalidArgument(f"verify={verify!r}: use 'crc32c' (the default) or 'sha256'")
    return verify


@dataclass(frozen=True)
class FileStat:
    """A file or folder of a drive: what `stat` and `entries` answer, and `put` for each file it stored."""

    path: str
    size: int
    sha256: str  # managed files; "" for s3 objects and folders
    etag: str  # s3 objects
    modified: datetime | None
    component: str  # the owning component ("" for s3 and shared folders)
    generation: int
    folder: bool

    @classmethod
    def from_info(cls, info: pb.FileInfo) -> FileStat:
        modified = None
        if info.HasField("modified") and (info.modified.seconds or info.modified.nanos):
            modified = info.modified.ToDatetime(tzinfo=timezone.utc)
        return cls(
            info.path, info.size, info.sha256, info.etag, modified, info.component, info.generation, info.folder
        )


class MountResult(NamedTuple):
    """What `mount` did: objects indexed and seconds taken."""

    objects: int
    seconds: float


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by `watch`: kind "put" or "delete", and the file."""

    sequence: int
    kind: str
    file: FileStat

    @classmethod
    def from_message(cls, message: pb.WatchEvent) -> WatchEvent:
        kind = "put" if message.kind == pb.WatchEvent.KIND_PUT else "delete"
        return cls(message.sequence, kind, FileStat.from_info(message.file))


class DriveBase:
    """A drive's settings (see `Drive` for the meaning of each argument); what both twins share but how they call."""

    def __init__(
        self,
        id: str,  # shadows the builtin: the name users know
        allow_duplicates: bool = False,
        component_name: str | None = None,
        root_folder: str | os.PathLike[str] | None = None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        verify: str = "crc32c",
        tls: bool | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        insecure: bool | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        self._where = parse_drive(id)
        check_yes_no_variables()
        self.id = id
        self.allow_duplicates = allow_duplicates
        self.component_name = check_component(component_name or os.environ.get("DRIVE_COMPONENT"))
        self.root_folder = None if root_folder is None else _existing_folder(root_folder)
        self.connection = Connection.from_settings(endpoint, tls, tls_ca, tls_cert, tls_key)
        self.token = _token(token)
        self.verify = check_verify(verify)
        self.retry_seconds = _retry_seconds(retry_seconds)
        if self.token:
            self.connection.check_token_transport(insecure)
        self._channel: Any = None  # what the twin calls through, made on first use in each process

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, component_name={self.component_name!r}, endpoint={self.endpoint!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None  # channels do not cross processes; a new one is made on first use
        return state

    @property
    def endpoint(self) -> str:
        return self.connection.endpoint

    @property
    def _read_only(self) -> bool:
        """Whether this is an s3:// drive."""
        return self._where.read_only

    def _remote(self, path: str) -> str:
        """`path` in this drive as the daemon names it, and the files it answers with (`drive_path`)."""
        return drive_path(self._where, path)

    def error(self, err: grpc.RpcError) -> DriveError:
        """The DriveError a failed call raises, its message saying how to reach this drive's daemon."""
        return from_rpc_error(err, self.endpoint, self.connection.unreachable_advice())

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def _token(token: str | None) -> str | None:
    """The bearer token: as given, else $DRIVE_TOKEN, else none. One that a gRPC header cannot carry (a newline
    read with it from a file, a letter beyond ASCII) is refused here: gRPC would fail every call with it, without
    a DriveError from grpc.aio. The message never shows the token."""
    setting = "token" if token else "$DRIVE_TOKEN"
    token = token or os.environ.get("DRIVE_TOKEN") or None
    if token is not None and not all(" " <= c <= "~" for c in token):
        raise InvalidArgument(f"{setting} holds a character other than printable ASCII, which a gRPC header cannot "
                              "carry: a newline read with it from a file? Strip it")
    return token


def _retry_seconds(retry_seconds: float | None) -> float:
    """The retry budget: as given, else $DRIVE_RETRY_SECONDS, else RETRY_SECONDS; 0 turns retries off."""
    if retry_seconds is None:
        text = os.environ.get("DRIVE_RETRY_SECONDS")
        try:
            retry_seconds = float(text) if text else RETRY_SECONDS
        except ValueError:
            raise InvalidArgument(f"DRIVE_RETRY_SECONDS={text!r} is not a number of seconds") from None
    if not retry_seconds >= 0:  # NaN too
        raise InvalidArgument(f"retry_seconds (`drive --retry-seconds`) must be a number of seconds >= 0 (0: no "
                              f"retries), got {retry_seconds}")
    return float(retry_seconds)


def _existing_folder(root_folder: str | os.PathLike[str]) -> str:
    """`root_folder` as a string, once it is known to be a folder (as Lightning's Drive checks)."""
    path = os.fspath(root_folder)
    if not os.path.isdir(path):
        kind = NotADirectory if os.path.exists(path) else NotFound
        raise kind(f"root_folder {path!r} is not an existing folder: create it first, or pass the folder "
                   "that local paths are relative to")
    return str(path)
