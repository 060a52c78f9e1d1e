"""What `Drive` and `AsyncDrive` share: the drive's settings, result types, and request building.

No I/O here: the sync and async classes differ only in how they call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from .errors import AlreadyExists, InvalidArgument, from_rpc_error
from .pb import drive_pb2 as pb
from .uri import DriveId, check_component, normalize_path, parse_drive
from .wire import Chunk, GetMessage, chunk_of

DEFAULT_ENDPOINT = "127.0.0.1:50051"
MESSAGE_LIMIT = 8 << 20
# Entries asked for per List call: the daemon's cap. Fewer calls list a big folder faster.
LIST_PAGE_SIZE = 10_000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    # A fixed 2 MiB receive window per stream: with gRPC's default window sizing (BDP
    # probing) the window of a long get keeps growing, and the client's memory with it
    # (measured: +60 MiB over a 2 GiB get on 4 streams; under +12 MiB with this).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 2 << 20),
]


@dataclass(frozen=True)
class FileStat:
    """What `stat` tells of a file or folder."""

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


def _filter(component_name: str | None) -> str:
    """A component filter for requests: "" means all components."""
    return check_component(component_name) if component_name else ""


class DriveBase:
    """A drive's settings and the requests for it (see `Drive` for the meaning of each argument)."""

    def __init__(
        self,
        id: str,  # shadows the builtin: the name users know
        allow_duplicates: bool = False,
        component_name: str | None = None,
        root_folder: str | os.PathLike[str] | None = None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
    ) -> None:
        self._id: DriveId = parse_drive(id)
        self.id = id
        self.allow_duplicates = allow_duplicates
        self.component_name = check_component(component_name or os.environ.get("DRIVE_COMPONENT"))
        self.root_folder = None if root_folder is None else str(root_folder)
        self.endpoint = endpoint or os.environ.get("DRIVE_ENDPOINT") or DEFAULT_ENDPOINT
        self.token = token or os.environ.get("DRIVE_TOKEN") or None
        self._channel: Any = None  # (pid, channel, stub), made on first use in each process

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, component_name={self.component_name!r}, endpoint={self.endpoint!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None  # channels do not cross processes; a new one is made on first use
        return state

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _root(self) -> Path:
        return Path(self.root_folder) if self.root_folder is not None else Path.cwd()

    @property
    def _mount_key(self) -> tuple[int, str, str] | None:
        """For an s3:// drive, what marks it mounted in this process; None for lit://."""
        return (os.getpid(), self.endpoint, self.id) if self._id.read_only else None

    def _put_header(self) -> pb.PutHeader:
        return pb.PutHeader(drive=self.id, component=self.component_name, allow_duplicates=self.allow_duplicates)

    def _list_request(self, path: str, component_name: str | None, recursive: bool) -> pb.ListRequest:
        return pb.ListRequest(
            drive=self.id, path=normalize_path(path, allow_root=True), recursive=recursive,
            component=_filter(component_name), page_size=LIST_PAGE_SIZE,
        )

    def _get_request(self, remote: str, target: Path, component_name: str | None, timeout: float | None,
                     overwrite: bool) -> pb.GetRequest:
        """The request for a whole-file get, after the local checks that fail before any waiting."""
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise AlreadyExists(
                f"local path {str(target)!r} exists: pass overwrite=True (`drive get --overwrite`) to replace it"
            )
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"timeout must be >= 0, got {timeout}")
        return pb.GetRequest(
            drive=self.id, path=remote, wait_seconds=timeout or 0, component=_filter(component_name),
            whole_small_files=True,
        )

    @staticmethod
    def _target_of(remote: str, target: Path) -> Callable[[str], Path]:
        """Maps the drive paths a Get of `remote` answers with to local paths under `target`."""
        prefix = remote + "/"

        def target_of(file_path: str) -> Path:
            return target if file_path == remote else target / file_path.removeprefix(prefix)

        return target_of

    def _range_request(self, path: str, offset: int, length: int | None, component_name: str | None,
                       if_match: str) -> pb.GetRequest:
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length cannot be negative")
        return pb.GetRequest(
            drive=self.id, path=normalize_path(path), offset=offset, limit=length or 0, if_match=if_match,
            component=_filter(component_name),
        )

    def _delete_request(self, path: str) -> pb.DeleteRequest:
        return pb.DeleteRequest(drive=self.id, path=normalize_path(path), component=self.component_name)

    def _stat_request(self, path: str, component_name: str | None) -> pb.StatRequest:
        return pb.StatRequest(drive=self.id, path=normalize_path(path), component=_filter(component_name))

    def _watch_request(self, path: str, component_name: str | None, after_sequence: int) -> pb.WatchRequest:
        return pb.WatchRequest(
            drive=self.id, path=normalize_path(path, allow_root=True), component=_filter(component_name),
            after_sequence=after_sequence,
        )


def check_range_reply(message: GetMessage, request: pb.GetRequest) -> Chunk | None:
    """The bytes of a ranged-read reply (None for its info); refuses a folder."""
    data = chunk_of(message)
    if data is not None:
        return data
    if message.info.folder or message.info.path != request.path:  # type: ignore[union-attr]
        raise InvalidArgument(f"{request.path!r} is a folder: a ranged read reads one file")
    return None


# How watch() reconnects after UNAVAILABLE: delays between attempts, then it gives up.
RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1, 2, 5, 5, 5, 5, 5, 10, 10)


def reconnect_delay(err: grpc.RpcError, endpoint: str, failures: int) -> float:
    """Seconds to wait before reconnecting a watch after `err`; raises it when it is not worth retrying."""
    error = from_rpc_error(err, endpoint)
    if error.code != grpc.StatusCode.UNAVAILABLE or failures >= len(RECONNECT_DELAYS):
        raise error from None
    return RECONNECT_DELAYS[failures]
