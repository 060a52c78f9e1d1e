"""What only AsyncDrive has: several operations at once on one event loop, and a channel per loop.

Everything Drive does, AsyncDrive does too: tests/test_api.py (and the watch, ranged-get and
auth tests) run against both twins.
"""

from __future__ import annotations

import asyncio
import pickle

from conftest import current_sequence

from drive_client import AsyncDrive


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
