"""AsyncDrive: the same methods and errors as Drive, on grpc.aio."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle

import grpc
import pytest

from drive_client import AmbiguousPathError, AsyncDrive, Drive


async def test_async_round_trip_of_files_and_folders(daemon, drive_uri, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "ck" / "sub").mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024 + 5)
    (src / "big.bin").write_bytes(data)
    (src / "ck" / "sub" / "m.pt").write_bytes(b"model")
    async with AsyncDrive(drive_uri, component_name="a", root_folder=src, endpoint=daemon.endpoint) as drive:
        await drive.put("big.bin")
        await drive.put("ck")
        assert await drive.list(".") == ["big.bin", "ck"]
        assert await drive.list("ck") == ["ck/sub"]
        stat = await drive.stat("big.bin")
        assert (stat.size, stat.sha256, stat.component) == (len(data), hashlib.sha256(data).hexdigest(), "a")
        reader = AsyncDrive(drive_uri, component_name="b", root_folder=dst, endpoint=daemon.endpoint)
        assert await reader.get("big.bin") == dst / "big.bin"
        assert (dst / "big.bin").read_bytes() == data
        await reader.get("ck")
        assert (dst / "ck" / "sub" / "m.pt").read_bytes() == b"model"
        part = b"".join([chunk async for chunk in reader.read_range("big.bin", 10, 2_000_000)])
        assert part == data[10:2_000_010]
        await drive.delete("ck")
        assert await drive.list(".") == ["big.bin"]
        await reader.close()


async def test_async_errors_match_the_sync_client(daemon, drive_uri, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"f")
    a = AsyncDrive(drive_uri, component_name="a", root_folder=tmp_path, endpoint=daemon.endpoint)
    b = AsyncDrive(drive_uri, component_name="b", root_folder=tmp_path, endpoint=daemon.endpoint)
    await a.put("f.txt")
    with pytest.raises(FileExistsError) as exists:
        await b.put("f.txt")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(FileNotFoundError) as missing:
        await b.delete("f.txt")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(FileNotFoundError) as local_missing:
        await a.put("nope.txt")
    assert local_missing.value.code is None
    with pytest.raises(FileExistsError) as target_exists:  # local target exists: fails before any call
        await a.get("f.txt", timeout=30)
    assert target_exists.value.code is None
    with pytest.raises(TimeoutError) as expired:
        await a.get("later.txt", timeout=0.3)
    assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(ValueError):
        await a.get("../x")
    dup = AsyncDrive(drive_uri, component_name="b", root_folder=tmp_path, endpoint=daemon.endpoint,
                     allow_duplicates=True)
    await dup.put("f.txt")
    with pytest.raises(AmbiguousPathError) as ambiguous:
        await a.stat("f.txt")
    assert "'a'" in str(ambiguous.value) and "'b'" in str(ambiguous.value)
    with pytest.raises(ConnectionError) as down:
        await AsyncDrive(drive_uri, endpoint="127.0.0.1:1").list(".")
    assert "127.0.0.1:1" in str(down.value)
    assert (tmp_path / "f.txt").read_bytes() == b"f"  # nothing local was touched


async def test_async_get_waits_for_a_put_and_watch_sees_it(daemon, drive_uri, tmp_path):
    (tmp_path / "late.txt").write_bytes(b"late")
    reader = AsyncDrive(drive_uri, root_folder=tmp_path / "out", endpoint=daemon.endpoint)
    waiting = asyncio.create_task(reader.get("late.txt", timeout=30))
    watching = reader.watch()
    first = asyncio.create_task(anext(watching))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await asyncio.to_thread(Drive(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put, "late.txt")
    assert (await waiting).read_bytes() == b"late"
    event = await asyncio.wait_for(first, 10)
    assert (event.kind, event.file.path) == ("put", "late.txt")
    await watching.aclose()


def test_async_drive_pickles_without_its_channel(daemon, drive_uri):
    drive = AsyncDrive(drive_uri, component_name="p", endpoint=daemon.endpoint)
    asyncio.run(drive.list("."))
    copy = pickle.loads(pickle.dumps(drive))
    assert str(copy) == drive_uri and copy.component_name == "p"
    assert asyncio.run(copy.list(".")) == []
