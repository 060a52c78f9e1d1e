"""What only AsyncDrive has: several operations at once on one event loop, and a channel per loop.

Everything Drive does, AsyncDrive does too: tests/test_api.py (and the watch, ranged-get and
auth tests) run against both twins.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import MIB, current_sequence, wait_until

from drive_client import AsyncDrive, DriveError, core, transfer


async def test_one_loop_serves_a_waiting_get_a_watch_and_a_put(daemon, drive_uri, tmp_path):
    (tmp_path / "late.txt").write_bytes(b"late")
    (tmp_path / "out").mkdir()
    reader = AsyncDrive(drive_uri, root_folder=tmp_path / "out", endpoint=daemon.endpoint)
    writer = AsyncDrive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon.endpoint)
    watching = reader.watch(after_sequence=current_sequence(daemon.endpoint, drive_uri))
    first = asyncio.create_task(anext(watching))
    waiting = asyncio.create_task(reader.get("late.txt", timeout=30))
    stored = await writer.put("late.txt")
    assert [f.path for f in stored] == ["late.txt"]
    assert (await asyncio.wait_for(waiting, 30)).read_bytes() == b"late"
    event = await asyncio.wait_for(first, 10)
    assert (event.kind, event.file.path, event.file.component) == ("put", "late.txt", "w")
    await watching.aclose()
    await asyncio.gather(reader.close(), writer.close())


def test_async_drive_pickles_without_its_channel_and_opens_one_per_loop(daemon, drive_uri):
    drive = AsyncDrive(drive_uri, component_name="p", endpoint=daemon.endpoint)
    asyncio.run(drive.list("."))
    copy = pickle.loads(pickle.dumps(drive))
    assert str(copy) == drive_uri and copy.component_name == "p"
    assert asyncio.run(copy.list(".")) == []
    assert asyncio.run(drive.list(".")) == []  # a second loop: a new channel, not the closed loop's


async def test_a_cancelled_get_has_stopped_when_its_cancellation_returns(daemon, drive_uri, tmp_path, monkeypatch):
    """A get's work on local files runs in worker threads: cancelling the get stopped waiting for them, not them.
    A big file's ranged reads went on after the CancelledError and replaced the local file the caller had kept
    by cancelling; the get now stops its threads' calls and returns once they have ended."""
    monkeypatch.setattr(core, "PARALLEL_MIN_SIZE", MIB)  # an 8 MiB file is fetched in 1 MiB ranged reads
    monkeypatch.setattr(transfer, "RANGE_BLOCK", MIB)
    monkeypatch.setenv("DRIVE_HANDOFF", "0")  # not written by the daemon into a file handed over (same-host gets)
    (tmp_path / "big.bin").write_bytes(os.urandom(8 * MIB))
    await AsyncDrive(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put("big.bin")
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin").write_bytes(b"old")
    loop = asyncio.get_running_loop()
    arrived, release, cancelled = asyncio.Event(), threading.Event(), threading.Event()
    late: list[int] = []

    def progress(nbytes: int) -> None:  # holds the ranged reads at their first bytes until the get is cancelled
        if cancelled.is_set():
            late.append(nbytes)
        loop.call_soon_threadsafe(arrived.set)
        release.wait(30)

    drive = AsyncDrive(drive_uri, root_folder=out, endpoint=daemon.endpoint)
    get = asyncio.create_task(drive.get("big.bin", overwrite=True, progress=progress))
    await asyncio.wait_for(arrived.wait(), 30)
    get.cancel()
    release.set()  # the reads may go on: the cancelled get must stop them
    with pytest.raises(asyncio.CancelledError):
        await get
    cancelled.set()
    assert await asyncio.to_thread(wait_until, lambda: daemon.open_requests("Get") == 0, 10)
    assert late == [], "the cancelled get went on receiving bytes"
    assert [p.name for p in out.iterdir()] == ["big.bin"] and (out / "big.bin").read_bytes() == b"old"
    fetched = await drive.get("big.bin", overwrite=True)  # the drive works on after a cancelled get
    assert fetched.read_bytes() == (tmp_path / "big.bin").read_bytes()
    await drive.close()


async def test_big_gets_cancelled_as_they_start_give_their_streams_back(daemon, drive_uri, tmp_path, monkeypatch):
    """A big get's ranged reads open their streams from worker threads, each on the event loop: one opened as
    the cancelled get stopped its threads never reached them (the future carrying it was cancelled), and, unread
    and never cancelled, held its place on the daemon until the drive was closed. 8 gets cancelled at their first
    bytes, 5 times: 6-33 streams stayed open; a service putting a timeout on its gets filled its host's
    --max-streams-per-peer so. Such a stream is cancelled too now."""
    # A 32 MiB file is fetched in 8 MiB ranged reads: more than the daemon sends ahead, so one unread stays open.
    monkeypatch.setattr(core, "PARALLEL_MIN_SIZE", MIB)
    monkeypatch.setattr(transfer, "RANGE_BLOCK", 8 * MIB)
    monkeypatch.setenv("DRIVE_HANDOFF", "0")  # not written by the daemon into a file handed over (same-host gets)
    (tmp_path / "big.bin").write_bytes(os.urandom(32 * MIB))
    (tmp_path / "out").mkdir()
    drive = AsyncDrive(drive_uri, root_folder=tmp_path / "out", endpoint=daemon.endpoint)
    await drive.put(tmp_path / "big.bin", to="big.bin")
    loop, moving = asyncio.get_running_loop(), asyncio.Event()
    for _ in range(5):
        moving.clear()
        gets = [asyncio.create_task(drive.get("big.bin", to=f"got-{i}",
                                              progress=lambda _: loop.call_soon_threadsafe(moving.set)))
                for i in range(8)]
        await moving.wait()
        for get in gets:
            get.cancel()
        await asyncio.gather(*gets, return_exceptions=True)
    assert await asyncio.to_thread(wait_until, lambda: daemon.open_requests("Get") == 0, 10), (
        f"{daemon.open_requests('Get')} Get streams of cancelled gets stay open"
    )
    assert all(path.name.startswith("got-") and path.read_bytes() == (tmp_path / "big.bin").read_bytes()
               for path in (tmp_path / "out").iterdir())  # whole files of gets done before their cancel, or none
    await drive.close()


async def test_a_drive_closed_while_its_calls_run_fails_them_with_a_drive_error(daemon, drive_uri, tmp_path):
    """Closing an AsyncDrive cancels its channel's calls, which grpc.aio ends with CancelledError: every call
    under way raised it, though nothing cancelled its task, so a TaskGroup took such a put or get as cancelled
    and ended without an error, the file missing. They raise DriveError (CANCELLED) naming the close now."""
    (tmp_path / "stored.bin").write_bytes(os.urandom(8 * MIB))
    (tmp_path / "new.bin").write_bytes(os.urandom(8 * MIB))
    writer = AsyncDrive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon.endpoint)
    await writer.put("stored.bin")
    out = tmp_path / "out"
    out.mkdir()
    moving: list[int] = []
    release = threading.Event()

    def held(nbytes: int) -> None:  # holds a transfer at its first bytes until the drive is closed
        moving.append(nbytes)
        release.wait(30)

    drive = AsyncDrive(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint)

    async def first_event() -> None:
        async for _ in drive.watch():
            return

    calls = {
        "put": drive.put("new.bin", progress=held),
        "get": drive.get("stored.bin", to=out / "stored.bin", progress=held),
        "waiting get": drive.get("never.bin", timeout=60, to=out / "never.bin"),
        "watch": first_event(),
    }
    tasks = {name: asyncio.create_task(call) for name, call in calls.items()}
    assert await asyncio.to_thread(wait_until, lambda: len(moving) == 2, 30)
    await asyncio.to_thread(daemon.wait_open, "Get", 2)
    await asyncio.to_thread(daemon.wait_open, "Watch", 1)
    await drive.close()
    release.set()
    await asyncio.wait(tasks.values(), timeout=30)
    for name, task in tasks.items():
        assert task.done() and not task.cancelled(), name
        error = task.exception()
        assert isinstance(error, DriveError) and error.code == grpc.StatusCode.CANCELLED, (name, error)
        assert "closed" in str(error), (name, error)
    assert [p.name for p in out.iterdir()] == []
    assert await writer.list(".") == ["stored.bin"]
    assert await asyncio.to_thread(wait_until, lambda: sum(map(daemon.open_requests, ("Get", "Put", "Watch"))) == 0,
                                   10)
    fetched = await drive.get("stored.bin", to=out / "stored.bin")  # a later call opens a new channel
    assert fetched.read_bytes() == (tmp_path / "stored.bin").read_bytes()
    await asyncio.gather(drive.close(), writer.close())


async def test_gets_under_way_leave_the_loops_worker_threads_to_others(daemon, drive_uri, tmp_path):
    """A get wrote its files in a thread of the loop's default executor, and waited there on the network for as
    long as it ran: as many gets as that pool has threads (the CPU count + 4) held back every other to_thread of
    the program, the loop's name lookups (getaddrinfo) and the drive's puts until one ended. 6 gets of 80 MiB
    at 50 MB/s on 2 cores: a to_thread of nothing waited 1.65 s. A get's work has a thread of its own now."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))  # filled by 2 gets
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "b.txt").write_bytes(b"b")
    drive = AsyncDrive(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint)
    await drive.put("a.txt")
    receiving: list[int] = []
    release = threading.Event()

    def held(nbytes: int) -> None:  # holds each get in its thread, as a slow network would
        receiving.append(nbytes)
        release.wait(30)

    gets = [asyncio.create_task(drive.get("a.txt", to=f"out/{i}.txt", progress=held)) for i in range(2)]
    try:
        while len(receiving) < 2:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 10)
        assert [f.path for f in await asyncio.wait_for(drive.put("b.txt"), 10)] == ["b.txt"]
    finally:
        release.set()
    assert [path.read_bytes() for path in await asyncio.gather(*gets)] == [b"a", b"a"]
    await drive.close()
