"""`AsyncDrive`: the async twin of `Drive`, on grpc.aio, with the same methods, arguments and errors.

    drive = AsyncDrive("lit://drive_1", component_name="work_a")
    await drive.put("a.txt"); await drive.list("."); await drive.get("a.txt", timeout=60)
    async for event in drive.watch("checkpoints"): ...

Each operation is the same plan of `core` that `Drive` runs; this module
only makes its calls. Work on local files (reading, hashing and writing
them) runs in worker threads, which read the streams they need through the
event loop, so the loop stays free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from . import core
from .channels import open_channel
from .common import DriveBase, FileStat, MountResult, WatchEvent
from .effects import Blocking, Call, Caller, Done, Emit, Next, Open, Plan, Send, Sleep, Unary, advance
from .errors import DriveError
from .pb import drive_pb2_grpc as pb_grpc
from .transfer import CHUNK_SIZE, Progress
from .wire import PutMessage, fast_stub

T = TypeVar("T")

# gRPC's asyncio support does not survive a fork made while one of its channels is open: in the child, the first
# call crashes the process or hangs it for good. So the channels this process opened and has not closed are known
# (a channel collected is closed by gRPC), and a child forked while one was open refuses AsyncDrive calls.
_open_channels: weakref.WeakSet[grpc.aio.Channel] = weakref.WeakSet()
_forked_with_channels_open = False


def _forked() -> None:
    global _forked_with_channels_open
    _forked_with_channels_open = _forked_with_channels_open or bool(_open_channels)  # its children's are broken too
    _open_channels.clear()


os.register_at_fork(after_in_child=_forked)


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


async def _to_own_thread(work: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread`, but in a thread of its own, not in the loop's default executor: for work that waits on
    the network as long as a transfer lasts, which would hold back every other to_thread of the program (and the
    loop's name lookups) while as many ran as that pool has threads (the CPU count + 4)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="drive-transfer")
    try:
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(contextvars.copy_context().run, work, *args))
    finally:
        pool.shutdown(wait=False)  # its thread ends with the work


async def in_thread(work: Callable[..., T], *args: Any, stop: Callable[[], object] | None = None,
                    abandoned: Callable[[T], object] | None = None, own_thread: bool = False) -> T:
    """`work(*args)` in a worker thread (`own_thread`: see `_to_own_thread`), which a cancellation cannot stop:
    cancelled, this calls `stop()` (what makes the work end soon), waits for the thread to end, hands what the
    work returned to `abandoned` (no one else gets it), then raises the cancellation. Whatever cleans up after it
    never runs beside the work."""
    running = asyncio.ensure_future((_to_own_thread if own_thread else asyncio.to_thread)(work, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if stop is not None:
            stop()
        await asyncio.wait([running])  # a second cancellation stops this wait, not the work
        if abandoned is not None and running.exception() is None:
            abandoned(running.result())
        raise


def _cancelled_by_its_task() -> bool:
    """Whether the task running now is being cancelled; always so before Python 3.11, which cannot tell."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


class _LoopStream:
    """An open grpc.aio server stream; `cancel()` works from any thread (the call itself belongs to its loop)."""

    def __init__(self, call: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self._loop = loop

    def cancel(self) -> bool:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return bool(self.call.cancel())
        with contextlib.suppress(RuntimeError):  # the loop is closed, and its calls with it
            self._loop.call_soon_threadsafe(self.call.cancel)
        return True


class _AioCalls:
    """Makes a plan's calls with grpc.aio, on the event loop that runs the plan."""

    def __init__(self, drive: AsyncDrive) -> None:
        self._drive = drive

    async def perform(self, effect: Call | Sleep | Blocking) -> Any:
        if isinstance(effect, Blocking):
            return await self._blocking(effect)
        if isinstance(effect, Sleep):
            return await asyncio.sleep(effect.seconds)
        drive = self._drive
        try:
            if isinstance(effect, Next):
                message = await effect.stream.call.read()  # type: ignore[attr-defined]
                return None if message is grpc.aio.EOF else message
            rpc = getattr(drive._stub, effect.method)
            if isinstance(effect, Unary):
                return await rpc(effect.request, metadata=drive._metadata)
            if isinstance(effect, Open):
                return _LoopStream(rpc(effect.request, metadata=drive._metadata), asyncio.get_running_loop())
            assert isinstance(effect, Send)
            return await self._send(rpc, effect)
        except grpc.RpcError as err:
            raise drive.error(err) from None
        except asyncio.CancelledError:
            if _cancelled_by_its_task():
                raise
            # gRPC cancelled the call itself: `close` cancels its channel's calls, which grpc.aio ends with a
            # CancelledError that would pass for the cancellation of a task nobody cancelled.
            raise DriveError(f"{drive.id}: the AsyncDrive was closed while this call ran", grpc.StatusCode.CANCELLED
                             ) from None

    async def _blocking(self, effect: Blocking) -> Any:
        """Runs `effect` in a worker thread. Work that makes calls (a get's, which writes local files) has a
        thread of its own, as it lasts as long as its transfer, and is stopped when cancelled and waited for: it
        would go on, and rename a file into place after the cancellation. Other work only reads local files: a
        cancellation leaves it to end by itself."""
        if not effect.calls:
            return await asyncio.to_thread(effect.work, *effect.args)
        caller = _ThreadCalls(self, asyncio.get_running_loop())
        return await in_thread(effect.work, caller, *effect.args, stop=caller.stop, own_thread=True)

    async def _send(self, rpc: Any, effect: Send) -> Any:
        messages = iter(effect.messages)
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[PutMessage]:
            try:
                while batch := await asyncio.to_thread(_next_batch, messages):
                    for message in batch:
                        yield message
            except Exception as err:  # reading a local file failed: gRPC would hide it behind CANCELLED
                failure.append(err)
                raise

        try:
            return await rpc(requests(), metadata=self._drive._metadata)
        except (grpc.RpcError, asyncio.CancelledError):
            if failure:
                raise failure[0] from None
            raise

    async def iterate(self, plan: Plan[Any]) -> AsyncGenerator[Any, None]:
        """Drives `plan` on this loop, yielding what it emits; closing the iterator closes the plan."""
        try:
            effect = advance(plan)
            while not isinstance(effect, Done):
                if isinstance(effect, Emit):
                    for value in effect.values:
                        yield value
                    effect = advance(plan)
                    continue
                try:
                    outcome = await self.perform(effect)
                except BaseException as err:  # the plan decides: it may catch it, and its `finally` runs either way
                    effect = advance(plan, error=err)
                else:
                    effect = advance(plan, outcome)
        finally:
            plan.close()

    async def run(self, plan: Plan[T]) -> T:
        """Drives `plan` to its end; answers what it returns."""
        results = self.iterate(_returning(plan))
        try:
            return await anext(results)
        finally:
            await results.aclose()


def _returning(plan: Plan[T]) -> Plan[None]:
    """`plan`, emitting its return value: how the one loop of `_AioCalls.iterate` runs a plan for its result."""
    yield Emit(((yield from plan),))


class _ThreadCalls(Caller):
    """Lends an AsyncDrive's calls to a worker thread: each call is made on the event loop, the thread waits.

    Once `stop`ped, its calls and sleeps, those under way and those to come, raise CancelledError in the thread.
    """

    def __init__(self, calls: _AioCalls, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._calls = calls
        self._loop = loop

    def call(self, effect: Call) -> Any:
        return self._start(lambda: asyncio.run_coroutine_threadsafe(self._perform(effect), self._loop)).result()

    async def _perform(self, effect: Call) -> Any:
        answer = await self._calls.perform(effect)
        if isinstance(effect, Open):
            # A stream opened as this caller stops reaches no thread (the future that carries it is cancelled), and
            # unread it would hold its place on the daemon until the channel closes: `stop` cancels it too.
            self._started(answer)
        return answer


class AsyncDrive(DriveBase):
    """A drive opened by name, for asyncio code: the twin of `Drive`, with the same arguments, methods and errors.

    The grpc.aio channel belongs to the event loop it was first used on; use
    one AsyncDrive per loop (or per process: it is picklable like Drive).
    """

    @property
    def _stub(self) -> pb_grpc.DriveServiceStub:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._channel[0] != (os.getpid(), loop):
            if _forked_with_channels_open:
                raise DriveError(
                    f"{self.id}: this process was forked while an AsyncDrive's channel was open, and gRPC's asyncio "
                    "support does not survive that: use a Drive here, close the AsyncDrive before forking (await "
                    "drive.close()), or start the process with the 'spawn' or 'forkserver' method"
                )
            channel = open_channel(self.connection, aio=True, retries=self.retry_seconds > 0)
            _open_channels.add(channel)
            self._channel = ((os.getpid(), loop), channel, fast_stub(channel))
        return self._channel[2]

    async def close(self) -> None:
        """Closes the channel: calls under way raise DriveError (CANCELLED); a later call opens a new one."""
        if self._channel is not None:
            channel, self._channel = self._channel[1], None
            await channel.close()
            _open_channels.discard(channel)

    async def __aenter__(self) -> AsyncDrive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def put(self, path: str | os.PathLike[str], *, to: str | None = None, progress: Progress | None = None
                  ) -> list[FileStat]:
        """`Drive.put`: stores a local file or folder in one call; returns the files stored."""
        return await _AioCalls(self).run(core.put(self, path, to, progress))

    def entries(self, path: str = ".", component_name: str | None = None, recursive: bool = False
                ) -> AsyncIterator[FileStat]:
        """`Drive.entries`, for `async for`: the entries under `path`, sorted by path."""
        return _AioCalls(self).iterate(core.entries(self, path, component_name, recursive))

    async def list(self, path: str = ".", component_name: str | None = None) -> list[str]:
        """`Drive.list`: the immediate entries under `path`, as sorted paths from the drive root."""
        return [entry async for entry in _AioCalls(self).iterate(core.paths(self, path, component_name))]

    async def get(
        self, path: str, component_name: str | None = None, timeout: float | None = None, overwrite: bool = False,
        *, to: str | os.PathLike[str] | None = None, progress: Progress | None = None,
    ) -> Path:
        """`Drive.get`: fetches a file (or folder) to its path under the root folder, or to `to`. `timeout` bounds
        the wait for the path to appear, not the transfer after it (`asyncio.timeout` bounds the whole call)."""
        return await _AioCalls(self).run(core.get(self, path, component_name, timeout, overwrite, to, progress))

    def read_range(self, path: str, offset: int = 0, length: int | None = None,
                   component_name: str | None = None, if_match: str = "") -> AsyncIterator[bytes]:
        """`Drive.read_range`, for `async for`: bytes [offset, offset+length) of a drive file, chunk by chunk."""
        return _AioCalls(self).iterate(core.read_range(self, path, offset, length, component_name, if_match))

    async def delete(self, path: str) -> None:
        """`Drive.delete`: removes this component's file, or all its files under a folder."""
        await _AioCalls(self).run(core.delete(self, path))

    async def stat(self, path: str, component_name: str | None = None) -> FileStat:
        """`Drive.stat`: size, sha256 (or ETag), modification time and owner of a file or folder."""
        return await _AioCalls(self).run(core.stat(self, path, component_name))

    async def mount(self) -> MountResult:
        """`Drive.mount`: (re)indexes an s3:// drive now."""
        return await _AioCalls(self).run(core.mount(self))

    def watch(self, path: str = ".", component_name: str | None = None, after_sequence: int = 0
              ) -> AsyncIterator[WatchEvent]:
        """`Drive.watch`, for `async for`: puts and deletes under `path` as they commit, reconnecting by itself."""
        return _AioCalls(self).iterate(core.watch(self, path, component_name, after_sequence))


__all__ = ["AsyncDrive"]
