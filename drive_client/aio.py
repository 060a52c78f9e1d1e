"""`AsyncDrive`: the async twin of `Drive`, on grpc.aio, with the same methods and errors.

    drive = AsyncDrive("lit://drive_1", component_name="work_a")
    await drive.put("a.txt"); await drive.list("."); await drive.get("a.txt", timeout=60)
    async for event in drive.watch("checkpoints"): ...

Local file reads, writes and hashing run in worker threads, a batch of
messages (about a chunk) per hop, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
from .drive import _mounted, _mounted_lock
from .errors import from_rpc_error
from .pb import drive_pb2 as pb
from .pb import drive_pb2_grpc as pb_grpc
from .transfer import CHUNK_SIZE, SMALL_FILE, local_files, put_file_request, put_requests, receive_files
from .uri import normalize_path
from .wire import GetMessage, PutMessage, fast_stub


def _next_batch(messages: Iterator[PutMessage]) -> list[PutMessage]:
    """Up to about a chunk's worth of messages (runs in a worker thread)."""
    batch: list[PutMessage] = []
    size = 0
    for message in messages:
        batch.append(message)
        size += len(message) if isinstance(message, (bytes, memoryview)) else message.ByteSize()
        if size >= CHUNK_SIZE:
            break
    return batch


class AsyncDrive(DriveBase):
    """A drive opened by name, for asyncio code. Same arguments, methods and errors as `Drive`.

    The grpc.aio channel belongs to the event loop it was first used on; use
    one AsyncDrive per loop (or per process: it is picklable like Drive).
    """

    @property
    def _stub(self) -> pb_grpc.DriveServiceStub:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._channel[0] != (os.getpid(), loop):
            channel = grpc.aio.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
            self._channel = ((os.getpid(), loop), channel, fast_stub(channel))
        return self._channel[2]

    async def close(self) -> None:
        """Closes the channel (a later call opens a new one)."""
        if self._channel is not None:
            channel, self._channel = self._channel[1], None
            await channel.close()

    async def __aenter__(self) -> AsyncDrive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, rpc: Any, request: Any) -> Any:
        try:
            return await rpc(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None

    async def _ensure_mounted(self) -> None:
        key = self._mount_key
        if key is not None:
            with _mounted_lock:
                if key in _mounted:
                    return
            await self.mount()

    # -- the API --------------------------------------------------------------

    async def put(self, path: str | os.PathLike[str]) -> None:
        """Stores a local file, or every file of a local folder, at the same path in the drive."""
        remote = normalize_path(os.fspath(path))
        files = await asyncio.to_thread(local_files, self._root() / remote, remote)
        if not files:
            return
        if len(files) == 1 and files[0][0].stat().st_size <= SMALL_FILE:  # one unary call
            local, remote = files[0]
            request = put_file_request(self._put_header(), remote, await asyncio.to_thread(local.read_bytes))
            await self._call(self._stub.PutFile, request)
            return
        messages = put_requests(self._put_header(), files)
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[PutMessage]:
            try:
                while batch := await asyncio.to_thread(_next_batch, messages):
                    for message in batch:
                        yield message
            except BaseException as err:  # gRPC would hide it behind CANCELLED
                failure.append(err)
                raise

        try:
            await self._stub.Put(requests(), metadata=self._metadata)
        except (grpc.RpcError, asyncio.CancelledError) as err:
            if failure:
                raise failure[0] from None
            if isinstance(err, grpc.RpcError):
                raise from_rpc_error(err, self.endpoint) from None
            raise

    async def list(self, path: str = ".", component_name: str | None = None) -> list[str]:
        """The immediate entries under `path` (files and folders), as sorted paths from the drive root."""
        request = self._list_request(path, component_name, recursive=False)
        await self._ensure_mounted()
        paths: list[str] = []
        while True:
            reply: pb.ListResponse = await self._call(self._stub.List, request)
            paths += (entry.path for entry in reply.entries)
            if not reply.next_page_token:
                return paths
            request.page_token = reply.next_page_token

    async def get(
        self, path: str, component_name: str | None = None, timeout: float | None = None, overwrite: bool = False
    ) -> Path:
        """Fetches a file (or folder) to the same path under the root folder; returns the local path."""
        remote = normalize_path(path)
        target = self._root() / remote
        request = self._get_request(remote, target, component_name, timeout, overwrite)
        await self._ensure_mounted()
        call = self._stub.Get(request, metadata=self._metadata)
        loop = asyncio.get_running_loop()

        def messages() -> Iterator[GetMessage]:
            """The stream's messages, read on the event loop for the writing thread."""
            while (message := asyncio.run_coroutine_threadsafe(call.read(), loop).result()) is not grpc.aio.EOF:
                yield message

        try:
            await asyncio.to_thread(receive_files, messages(), self._target_of(remote, target))
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None
        finally:
            call.cancel()
        return target

    async def read_range(self, path: str, offset: int = 0, length: int | None = None,
                         component_name: str | None = None, if_match: str = "") -> AsyncIterator[bytes]:
        """Streams bytes [offset, offset+length) of a drive file (length None: to the end)."""
        request = self._range_request(path, offset, length, component_name, if_match)
        if length == 0:
            return
        await self._ensure_mounted()
        call = self._stub.Get(request, metadata=self._metadata)
        try:
            async for message in call:
                data = check_range_reply(message, request)
                if data is not None:
                    yield bytes(data)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.endpoint) from None
        finally:
            call.cancel()

    async def delete(self, path: str) -> None:
        """Removes this component's file, or all its files under a folder."""
        await self._call(self._stub.Delete, self._delete_request(path))

    async def stat(self, path: str, component_name: str | None = None) -> FileStat:
        """Size, sha256 (or ETag), modification time and owner of a file or folder."""
        request = self._stat_request(path, component_name)
        await self._ensure_mounted()
        return FileStat.from_info(await self._call(self._stub.Stat, request))

    async def mount(self) -> MountResult:
        """(Re)indexes an s3:// drive now; answers with the object count and the time taken."""
        reply: pb.MountResponse = await self._call(self._stub.Mount, pb.MountRequest(drive=self.id))
        if self._mount_key is not None:
            with _mounted_lock:
                _mounted.add(self._mount_key)
        return MountResult(reply.objects, reply.seconds)

    async def watch(self, path: str = ".", component_name: str | None = None, after_sequence: int = 0
                    ) -> AsyncIterator[WatchEvent]:
        """Yields puts and deletes under `path` as they commit, reconnecting like `Drive.watch`."""
        after = after_sequence
        failures = 0
        while True:
            call = self._stub.Watch(self._watch_request(path, component_name, after), metadata=self._metadata)
            try:
                async for message in call:
                    failures = 0
                    after = message.sequence
                    if message.kind != pb.WatchEvent.KIND_WATCHING:
                        yield WatchEvent.from_message(message)
            except grpc.RpcError as err:
                await asyncio.sleep(reconnect_delay(err, self.endpoint, failures))
                failures += 1
            finally:
                call.cancel()


__all__ = ["AsyncDrive"]
