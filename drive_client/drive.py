"""`Drive`: put, list, get, delete and stat files of a drive served by drived.

Thin on purpose: paths are validated here, bytes are streamed by
`transfer`, and everything else is the daemon's job.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from .common import (
    CHANNEL_OPTIONS,
    DriveBase,
    FileStat,
    MountResult,
    WatchEvent,
    check_range_reply,
    reconnect_delay,
)
from .errors import from_rpc_error
from .pb import drive_pb2 as pb
from .pb import drive_pb2_grpc as pb_grpc
from .transfer import (
    PARALLEL_MIN_SIZE,
    SMALL_FILE,
    Progress,
    ReadAhead,
    fetch_in_ranges,
    local_files,
    put_file_request,
    put_requests,
    receive_files,
)
from .uri import normalize_path
from .wire import Chunk, GetMessage, fast_stub

T = TypeVar("T")

# s3:// drives mounted by (pid, endpoint, uri): each process mounts on first use.
_mounted: set[tuple[int, str, str]] = set()
_mounted_lock = threading.Lock()


def _worth_ranges(first: GetMessage, remote: str) -> bool:
    """Whether a Get's first message describes one big file, fetched faster over parallel ranged reads."""
    if not isinstance(first, pb.GetResponse):
        return False  # data before any info: receive_files refuses it
    info = first.info
    return info.path == remote and not info.folder and info.size >= PARALLEL_MIN_SIZE


# One channel per endpoint and process, shared by every Drive: a Drive made per call costs no handshake.
_stubs: dict[tuple[int, str], pb_grpc.DriveServiceStub] = {}
_stubs_lock = threading.Lock()


def _shared_stub(endpoint: str) -> pb_grpc.DriveServiceStub:
    key = (os.getpid(), endpoint)
    with _stubs_lock:
        if key not in _stubs:
            _stubs[key] = fast_stub(grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS))
        return _stubs[key]


class Drive(DriveBase):
    """A drive opened by name: `Drive("lit://drive_1", component_name="work_a")`.

    `Drive(id, allow_duplicates=False, component_name=None, root_folder=None, *, endpoint=None, token=None)`:
    `component_name` defaults to $DRIVE_COMPONENT, else "default"; `endpoint`
    to $DRIVE_ENDPOINT, else 127.0.0.1:50051. `root_folder` is where local
    paths are resolved; when not given, the current working directory at
    the time of each call. Picklable and deep-copyable; the gRPC channel is
    created lazily, once per process and endpoint, and shared by all Drives.
    """

    @property
    def _stub(self) -> pb_grpc.DriveServiceStub:
        if self._channel is None or self._channel[0] != os.getpid():
            self._channel = (os.getpid(), None, _shared_stub(self.endpoint))
        return self._channel[2]

    def _call(self, rpc: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs one call, turning gRPC errors into DriveErrors."""
        try:
            return rpc(*args, metadata=self._metadata, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None

    def _ensure_mounted(self) -> None:
        """Mounts an s3:// drive on its first use in this process."""
        key = self._mount_key
        if key is not None:
            with _mounted_lock:
                if key in _mounted:
                    return
            self.mount()

    # -- the API --------------------------------------------------------------

    def put(self, path: str | os.PathLike[str]) -> None:
        """Stores a local file, or every file of a local folder, at the same path in the drive."""
        remote = normalize_path(os.fspath(path))
        self._put_files(local_files(self._root() / remote, remote))

    def _put_files(self, files: list[tuple[Path, str]], progress: Progress | None = None) -> list[pb.FileInfo]:
        """Stores (local file, drive path) pairs in one Put stream."""
        if not files:
            return []
        if len(files) == 1 and files[0][0].stat().st_size <= SMALL_FILE:
            return [self._put_small(*files[0], progress)]
        requests = ReadAhead(put_requests(self._put_header(), files, progress=progress))
        try:
            reply: pb.PutResponse = self._stub.Put(iter(requests), metadata=self._metadata)
        except grpc.RpcError as err:
            if requests.error is not None:  # reading a local file failed, and gRPC cancelled the call
                raise requests.error from None
            raise from_rpc_error(err, self.endpoint) from None
        return list(reply.files)

    def _put_small(self, local: Path, remote: str, progress: Progress | None) -> pb.FileInfo:
        """Stores a file of at most a chunk in one unary call (much cheaper than a stream)."""
        request = put_file_request(self._put_header(), remote, local.read_bytes())
        reply: pb.PutFileResponse = self._call(self._stub.PutFile, request)
        if progress:
            progress(reply.file.size)
        return reply.file

    def list(self, path: str = ".", component_name: str | None = None) -> list[str]:
        """The immediate entries under `path` (files and folders), as sorted paths from the drive root."""
        return [entry.path for entry in self._list(path, component_name, recursive=False)]

    def _list(self, path: str, component_name: str | None, recursive: bool) -> Iterator[pb.FileInfo]:
        request = self._list_request(path, component_name, recursive)
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
        return self._get_into(remote, self._root() / remote, component_name, timeout, overwrite)

    def _get_into(
        self, remote: str, target: Path, component_name: str | None, timeout: float | None, overwrite: bool,
        progress: Progress | None = None,
    ) -> Path:
        request = self._get_request(remote, target, component_name, timeout, overwrite)
        self._ensure_mounted()
        call = self._stub.Get(request, metadata=self._metadata)
        messages = iter(ReadAhead(call))
        try:
            first = next(messages, None)
            if first is not None and _worth_ranges(first, remote):
                call.cancel()  # read again, in blocks over several streams
                messages.close()
                info = first.info  # a GetResponse: _worth_ranges checked
                pin = {"component_name": info.component or None, "if_match": info.sha256 or info.etag}
                fetch_in_ranges(
                    info, target, lambda offset, length: self._read_chunks(remote, offset, length, **pin),
                    progress=progress,
                )
            else:
                replies = itertools.chain([first] if first is not None else [], messages)
                receive_files(replies, self._target_of(remote, target), progress=progress)
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
        for chunk in self._read_chunks(path, offset, length, component_name, if_match):
            yield bytes(chunk)

    def _read_chunks(self, path: str, offset: int, length: int | None, component_name: str | None,
                     if_match: str) -> Iterator[Chunk]:
        """`read_range` without copying each chunk out of the message it came in."""
        request = self._range_request(path, offset, length, component_name, if_match)
        if length == 0:
            return
        self._ensure_mounted()
        call = self._stub.Get(request, metadata=self._metadata)
        try:
            for message in call:
                data = check_range_reply(message, request)
                if data is not None:
                    yield data
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None
        finally:
            call.cancel()

    def delete(self, path: str) -> None:
        """Removes this component's file, or all its files under a folder."""
        self._call(self._stub.Delete, self._delete_request(path))

    def stat(self, path: str, component_name: str | None = None) -> FileStat:
        """Size, sha256 (or ETag), modification time and owner of a file or folder."""
        request = self._stat_request(path, component_name)
        self._ensure_mounted()
        return FileStat.from_info(self._call(self._stub.Stat, request))

    def mount(self) -> MountResult:
        """(Re)indexes an s3:// drive now; answers with the object count and the time taken."""
        reply: pb.MountResponse = self._call(self._stub.Mount, pb.MountRequest(drive=self.id))
        if self._mount_key is not None:
            with _mounted_lock:
                _mounted.add(self._mount_key)
        return MountResult(reply.objects, reply.seconds)

    def watch(self, path: str = ".", component_name: str | None = None, after_sequence: int = 0
              ) -> Iterator[WatchEvent]:
        """Yields puts and deletes under `path` as they commit, forever.

        Reconnects by itself when the daemon becomes unreachable, resuming
        after the last event seen (giving up after about a minute). To resume
        in a new process, pass the last `event.sequence` as `after_sequence`.
        """
        after = after_sequence
        failures = 0
        while True:
            call = self._stub.Watch(self._watch_request(path, component_name, after), metadata=self._metadata)
            try:
                for message in call:
                    failures = 0
                    after = message.sequence
                    if message.kind != pb.WatchEvent.KIND_WATCHING:
                        yield WatchEvent.from_message(message)
            except grpc.RpcError as err:
                time.sleep(reconnect_delay(err, self.endpoint, failures))
                failures += 1
            finally:
                call.cancel()


__all__ = ["Drive", "FileStat", "MountResult", "WatchEvent"]
