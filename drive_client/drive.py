"""`Drive`: put, list, get, delete and stat files of a drive served by drived.

Thin on purpose: paths are validated here, bytes are streamed by
`transfer`, and everything else is the daemon's job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc

from ._pb import drive_pb2 as pb
from ._pb import drive_pb2_grpc as pb_grpc
from .errors import AlreadyExists, DriveError, InvalidArgument, from_rpc_error
from .transfer import ReadAhead, local_files, put_requests, receive_files
from .uri import DriveId, check_component, normalize_path, parse_drive

DEFAULT_ENDPOINT = "127.0.0.1:50051"
MESSAGE_LIMIT = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
]
T = TypeVar("T")


@dataclass(frozen=True)
class FileStat:
    """What `Drive.stat` tells of a file or folder."""

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
    """What `Drive.mount` did: objects indexed and seconds taken."""

    objects: int
    seconds: float


# s3:// drives this process has mounted, by (pid, endpoint, uri): each process mounts on first use.
_mounted: set[tuple[int, str, str]] = set()
_mounted_lock = threading.Lock()


class Drive:
    """A drive opened by name: `Drive("lit://drive_1", component_name="work_a")`.

    `root_folder` is where local paths are resolved; when not given, the
    current working directory at the time of each call. Picklable and
    deep-copyable; the gRPC channel is created lazily, once per process.
    """

    def __init__(
        self,
        id: str,
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
        self.token = token
        self._channel: tuple[int, grpc.Channel, pb_grpc.DriveServiceStub] | None = None

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"Drive({self.id!r}, component_name={self.component_name!r}, endpoint={self.endpoint!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None  # channels do not cross processes; a new one is made on first use
        return state

    def __del__(self) -> None:
        channel = getattr(self, "_channel", None)
        if channel and channel[0] == os.getpid():
            channel[1].close()

    # -- plumbing -------------------------------------------------------------

    @property
    def _stub(self) -> pb_grpc.DriveServiceStub:
        if self._channel is None or self._channel[0] != os.getpid():
            channel = grpc.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
            self._channel = (os.getpid(), channel, pb_grpc.DriveServiceStub(channel))
        return self._channel[2]

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _call(self, rpc: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs one call, turning gRPC errors into DriveErrors."""
        try:
            return rpc(*args, metadata=self._metadata, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None

    def _root(self) -> Path:
        return Path(self.root_folder) if self.root_folder is not None else Path.cwd()

    def _ensure_mounted(self) -> None:
        """Mounts an s3:// drive on its first use in this process."""
        if not self._id.read_only:
            return
        key = (os.getpid(), self.endpoint, self.id)
        with _mounted_lock:
            if key in _mounted:
                return
        self.mount()

    # -- the API --------------------------------------------------------------

    def put(self, path: str | os.PathLike[str]) -> None:
        """Stores a local file, or every file of a local folder, at the same path in the drive."""
        remote = normalize_path(os.fspath(path))
        self._put_files(local_files(self._root() / remote, remote))

    def _put_files(self, files: list[tuple[Path, str]]) -> list[pb.FileInfo]:
        """Stores (local file, drive path) pairs in one Put stream."""
        header = pb.PutHeader(drive=self.id, component=self.component_name, allow_duplicates=self.allow_duplicates)
        if not files:
            return []
        requests = ReadAhead(put_requests(header, files))
        try:
            reply: pb.PutResponse = self._stub.Put(iter(requests), metadata=self._metadata)
        except grpc.RpcError as err:
            if requests.error is not None:  # reading a local file failed, and gRPC cancelled the call
                raise requests.error from None
            raise from_rpc_error(err, self.endpoint) from None
        return list(reply.files)

    def list(self, path: str = ".", component_name: str | None = None) -> list[str]:
        """The immediate entries under `path` (files and folders), as sorted paths from the drive root."""
        return [entry.path for entry in self._list(path, component_name, recursive=False)]

    def _list(self, path: str, component_name: str | None, recursive: bool) -> Iterator[pb.FileInfo]:
        request = pb.ListRequest(
            drive=self.id, path=normalize_path(path, allow_root=True), recursive=recursive,
            component=check_component(component_name) if component_name else "",
        )
        self._ensure_mounted()
        while True:
            reply: pb.ListResponse = self._call(self._stub.List, request)
            yield from reply.entries
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    def get(
        self, path: str, component_name: str | None = None, timeout: float | None = None, overwrite: bool = False
    ) -> Path:
        """Fetches a file (or folder) to the same path under the root folder; returns the local path.

        With `timeout`, waits up to that many seconds for the path to appear.
        An existing local target without `overwrite=True` fails at once.
        """
        remote = normalize_path(path)
        target = self._root() / remote
        return self._get_into(remote, target, component_name, timeout, overwrite)

    def _get_into(
        self, remote: str, target: Path, component_name: str | None, timeout: float | None, overwrite: bool
    ) -> Path:
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise AlreadyExists(f"local path {str(target)!r} exists: pass overwrite=True to replace it")
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"timeout must be >= 0, got {timeout}")
        self._ensure_mounted()
        request = pb.GetRequest(
            drive=self.id, path=remote, wait_seconds=timeout or 0,
            component=check_component(component_name) if component_name else "",
        )
        prefix = remote + "/"

        def target_of(file_path: str) -> Path:
            return target if file_path == remote else target / file_path.removeprefix(prefix)

        call = self._stub.Get(request, metadata=self._metadata)
        try:
            receive_files(ReadAhead(call), target_of)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None
        finally:
            call.cancel()  # a no-op once the stream is complete; stops it after a local failure
        return target

    def read_range(self, path: str, offset: int = 0, length: int | None = None,
                   component_name: str | None = None, if_match: str = "") -> Iterator[bytes]:
        """Streams bytes [offset, offset+length) of a drive file (length None: to the end), chunk by chunk.

        `if_match` (the file's sha256, or ETag for s3) makes the read fail with
        StaleIndexError if the file was replaced meanwhile.
        """
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length cannot be negative")
        if length == 0:
            return
        self._ensure_mounted()
        request = pb.GetRequest(
            drive=self.id, path=normalize_path(path), offset=offset, limit=length or 0, if_match=if_match,
            component=check_component(component_name) if component_name else "",
        )
        call = self._stub.Get(request, metadata=self._metadata)
        try:
            for message in call:
                if message.HasField("data"):
                    yield message.data
                elif message.info.folder or message.info.path != request.path:
                    raise InvalidArgument(f"{path!r} is a folder: read_range reads one file")
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None
        finally:
            call.cancel()

    def delete(self, path: str) -> None:
        """Removes this component's file, or all its files under a folder."""
        request = pb.DeleteRequest(drive=self.id, path=normalize_path(path), component=self.component_name)
        self._call(self._stub.Delete, request)

    def stat(self, path: str, component_name: str | None = None) -> FileStat:
        """Size, sha256 (or ETag), modification time and owner of a file or folder."""
        request = pb.StatRequest(
            drive=self.id, path=normalize_path(path),
            component=check_component(component_name) if component_name else "",
        )
        self._ensure_mounted()
        return FileStat.from_info(self._call(self._stub.Stat, request))

    def mount(self) -> MountResult:
        """(Re)indexes an s3:// drive now; answers with the object count and the time taken."""
        reply: pb.MountResponse = self._call(self._stub.Mount, pb.MountRequest(drive=self.id))
        with _mounted_lock:
            _mounted.add((os.getpid(), self.endpoint, self.id))
        return MountResult(reply.objects, reply.seconds)


__all__ = ["Drive", "DriveError", "FileStat", "MountResult"]
