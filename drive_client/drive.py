"""`Drive`: put, list, get and delete files of a drive served by drived, with grpc's blocking stubs.

Each operation is a plan of `core`, which holds every decision; this module
only makes the calls the plans ask for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from . import core
from .channels import Connection, open_channel
from .common import DriveBase, FileStat, MountResult, WatchEvent
from .effects import Call, Caller, Next, Open, Unary
from .pb import drive_pb2_grpc as pb_grpc
from .transfer import Progress, ReadAhead
from .wire import fast_stub

# One channel per connection (endpoint and TLS settings), process and retry setting (whether gRPC makes its
# transparent retries, `channels.channel_options`), shared by every Drive: a Drive made per call costs no handshake.
_stubs: dict[tuple[int, Connection, bool], pb_grpc.DriveServiceStub] = {}
_stubs_lock = threading.Lock()


def _shared_stub(connection: Connection, retries: bool) -> pb_grpc.DriveServiceStub:
    key = (os.getpid(), connection, retries)
    with _stubs_lock:
        if key not in _stubs:
            _stubs[key] = fast_stub(open_channel(connection, retries=retries))
        return _stubs[key]


class _BlockingCalls(Caller):
    """Makes a plan's calls with grpc's blocking stubs, from any thread; `stop` cancels the streams it opened."""

    def __init__(self, drive: Drive) -> None:
        super().__init__()
        self._drive = drive

    def call(self, effect: Call) -> Any:
        drive = self._drive
        try:
            if isinstance(effect, Next):
                return next(effect.stream, None)  # type: ignore[call-overload]
            rpc = getattr(drive._stub, effect.method)
            if isinstance(effect, Open):  # answers the call, which iterates its stream
                return self._start(lambda: rpc(effect.request, metadata=drive._metadata))
            if isinstance(effect, Unary):
                return rpc(effect.request, metadata=drive._metadata)
            # Reading and hashing files overlaps with sending.
            requests = ReadAhead(effect.messages, first_alone=True)
            try:
                # A future, not the blocking form: a KeyboardInterrupt in the blocking form leaves its call running
                # with nobody to drive it, its threads blocked for good and the daemon's upload open.
                sending = rpc.future(iter(requests), metadata=drive._metadata)
                requests.held()
                try:
                    return sending.result()
                except grpc.RpcError:
                    if requests.error is not None:  # reading a local file failed, and gRPC cancelled the call
                        raise requests.error from None
                    raise
                finally:
                    sending.cancel()  # a no-op once the call has ended; stops one interrupted (Ctrl-C)
            finally:
                # Also when a KeyboardInterrupt lands in `rpc.future`, which leaves no call to cancel: the call's
                # messages end at its first, before any finish, which the daemon commits nothing without.
                requests.stop()
        except grpc.RpcError as err:
            raise drive.error(err) from None


class Drive(DriveBase):
    """A drive opened by name: `Drive("lit://drive_1", component_name="work_a")`.

    `Drive(id, allow_duplicates=False, component_name=None, root_folder=None, *, endpoint=None, token=None,
    verify="crc32c", tls=None, tls_ca=None, tls_cert=None, tls_key=None, insecure=None, retry_seconds=None)`:
    `component_name` defaults to $DRIVE_COMPONENT, else "default"; `endpoint`
    to $DRIVE_ENDPOINT, else 127.0.0.1:50051. `root_folder` is where local
    paths are resolved: an existing folder (else `FileNotFoundError` or
    `NotADirectoryError` at once); when not given, the current working
    directory at the time of each call. Every transfer is checked with
    CRC32C; `verify="sha256"` also sends each put file's sha256 (the daemon
    checks it) and checks the stored sha256 of each file a get fetches.
    `token` (default $DRIVE_TOKEN) is sent as `authorization: Bearer TOKEN`;
    TLS settings default to $DRIVE_TLS, $DRIVE_TLS_CA, $DRIVE_TLS_CERT and
    $DRIVE_TLS_KEY (`drive_client.channels`). A token is never sent in
    plaintext beyond loopback: without TLS such a Drive raises `ValueError`
    at once, unless `insecure=True` ($DRIVE_INSECURE=1). `retry_seconds`
    (default $DRIVE_RETRY_SECONDS, else 60; 0: off) is how long a transfer,
    a list, a stat, a delete or a mount keeps trying through a network cut or a
    daemon restart (see `drive_client.resume`). Picklable and deep-copyable; the gRPC channel is
    created lazily, once per process, connection and retry setting, and
    shared by all Drives.
    """

    @property
    def _stub(self) -> pb_grpc.DriveServiceStub:
        if self._channel is None or self._channel[0] != os.getpid():
            self._channel = (os.getpid(), _shared_stub(self.connection, self.retry_seconds > 0))
        return self._channel[1]

    def put(self, path: str | os.PathLike[str], *, to: str | None = None, progress: Progress | None = None
            ) -> list[FileStat]:
        """Stores a local file, or every file of a local folder, in one call; returns the files stored.

        `path` is relative to the root folder and is stored at the same path
        in the drive; with `to`, it is stored at that drive path instead (and
        `path` may be any local path). `progress` is called with byte counts
        as they are sent.
        """
        return _BlockingCalls(self).run(core.put(self, path, to, progress))

    def entries(self, path: str = ".", component_name: str | None = None, recursive: bool = False
                ) -> Iterator[FileStat]:
        """The entries under `path` (files and folders), sorted by path, from one component or all.

        `recursive=True` gives every file below `path` (and no folders); a
        missing path gives none.
        """
        return _BlockingCalls(self).iterate(core.entries(self, path, component_name, recursive))

    def list(self, path: str = ".", component_name: str | None = None) -> list[str]:
        """The immediate entries under `path` (files and folders), as sorted paths from the drive root."""
        return [*_BlockingCalls(self).iterate(core.paths(self, path, component_name))]

    def get(
        self, path: str, component_name: str | None = None, timeout: float | None = None, overwrite: bool = False,
        *, to: str | os.PathLike[str] | None = None, progress: Progress | None = None,
    ) -> Path:
        """Fetches a file (or folder) to the same path under the root folder, or to `to`; returns the local path.

        With `timeout`, waits up to that many seconds for the path to appear
        (`TimeoutError` when it does not); it bounds that wait only: once the
        path is there, its bytes take as long as they take (the retries of a
        cut stream are bounded by `retry_seconds`).
        An existing local target without `overwrite=True` fails at once. A
        relative `to` is resolved under the root folder. `progress` is called
        with byte counts as they arrive.
        """
        return _BlockingCalls(self).run(core.get(self, path, component_name, timeout, overwrite, to, progress))

    def read_range(self, path: str, offset: int = 0, length: int | None = None,
                   component_name: str | None = None, if_match: str = "") -> Iterator[bytes]:
        """Streams bytes [offset, offset+length) of a drive file (length None: to the end), chunk by chunk.

        `if_match` (the file's sha256, or ETag for s3) makes the read fail with
        StaleIndexError if the file was replaced meanwhile.
        """
        return _BlockingCalls(self).iterate(core.read_range(self, path, offset, length, component_name, if_match))

    def delete(self, path: str) -> None:
        """Removes this component's file, or all its files under a folder."""
        _BlockingCalls(self).run(core.delete(self, path))

    def stat(self, path: str, component_name: str | None = None) -> FileStat:
        """Size, sha256 (or ETag), modification time and owner of a file or folder."""
        return _BlockingCalls(self).run(core.stat(self, path, component_name))

    def mount(self) -> MountResult:
        """(Re)indexes an s3:// drive now; answers with the object count and the time taken."""
        return _BlockingCalls(self).run(core.mount(self))

    def watch(self, path: str = ".", component_name: str | None = None, after_sequence: int = 0
              ) -> Iterator[WatchEvent]:
        """Yields puts and deletes under `path` as they commit, forever.

        Reconnects by itself when the daemon becomes unreachable, resuming
        after the last event seen (giving up after `retry_seconds`). To resume
        in a new process, pass the last `event.sequence` as `after_sequence`;
        `EventsExpired` says the daemon no longer keeps the events after it.
        """
        return _BlockingCalls(self).iterate(core.watch(self, path, component_name, after_sequence))


__all__ = ["Drive", "FileStat", "MountResult", "WatchEvent"]
