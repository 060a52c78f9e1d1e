"""LocalUpload.commit's `before_visible`: awaited once the file is ready and before it is at its key.

A shared coordinator's claim is confirmed there (`ManagedDrives.commit_put`):
what it raises fails the commit, which stores nothing and leaves the previous
version. A small file goes through the commit worker process (its hook
awaited with those of its batch, right before the batch is sent), a big one
through worker threads (durable in tmp/ before the hook, renamed after it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import MIB

from drive_client.errors import Unavailable
from drived.backends.local import LocalBackend
from drived.checksums import ClientChecksums
from drived.descriptors import Descriptors

pytestmark = pytest.mark.timeout(30)

SIZES = [3000, 3 * MIB]  # through the commit worker; through worker threads
KEY = "d/w/f.bin"


@pytest_asyncio.fixture(loop_scope="function")  # the test's loop: the commit worker's pipes belong to it
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    made = LocalBackend(str(tmp_path), Descriptors(64))
    try:
        yield made
    finally:
        await made.close()


async def stored(backend: LocalBackend, key: str) -> bytes | None:
    """The bytes at `key`, None when nothing is there."""
    if await backend.stat(key) is None:
        return None
    _, chunks = await backend.read(key)
    return b"".join([bytes(chunk) async for chunk in chunks])


async def put(backend: LocalBackend, data: bytes, before_visible=None, key: str = KEY) -> None:
    upload = await backend.start_upload(key)
    for at in range(0, len(data), MIB):
        await upload.write(data[at:at + MIB])
    await upload.commit(ClientChecksums("", None), len(data), before_visible)


@pytest.mark.parametrize("size", SIZES)
async def test_the_hook_runs_before_the_file_is_visible(backend, size):
    data = os.urandom(size)
    seen: list[bytes | None] = []

    async def before_visible() -> None:
        seen.append(await stored(backend, KEY))

    await put(backend, data, before_visible)
    assert seen == [None]  # awaited once, with nothing at the key yet
    assert await stored(backend, KEY) == data
    assert os.listdir(backend.tmp_dir) == []


@pytest.mark.parametrize("size", SIZES)
async def test_a_hook_that_raises_stores_nothing_and_keeps_the_previous_version(backend, size):
    await put(backend, b"version 1")

    async def claim_lost() -> None:
        raise Unavailable("the claim lapsed")

    with pytest.raises(Unavailable, match="the claim lapsed"):
        await put(backend, os.urandom(size), claim_lost)
    assert await stored(backend, KEY) == b"version 1"
    assert os.listdir(backend.tmp_dir) == []  # the upload's temporary file is gone


async def test_the_hooks_of_one_batch_run_at_once_and_one_that_raises_fails_only_its_own_put(backend):
    """Small files committed together: their hooks are awaited together, right before their batch goes to the commit
    worker; a hook that raises keeps its own file out of the batch, and the others are stored."""
    arrived = [asyncio.Event(), asyncio.Event()]

    def meeting(mine: int) -> Callable[[], Awaitable[None]]:
        async def before_visible() -> None:
            arrived[mine].set()
            await asyncio.wait_for(arrived[1 - mine].wait(), 5)  # returns only if the other hook runs meanwhile
        return before_visible

    async def claim_lost() -> None:
        raise Unavailable("the claim lapsed")

    keys = ["d/w/a.bin", "d/w/lost.bin", "d/w/b.bin"]
    data = [os.urandom(3000) for _ in keys]
    hooks = [meeting(0), claim_lost, meeting(1)]
    puts = (put(backend, content, hook, key) for content, hook, key in zip(data, hooks, keys, strict=True))
    results = await asyncio.gather(*puts, return_exceptions=True)
    assert results[0] is None and results[2] is None, results
    assert isinstance(results[1], Unavailable) and "the claim lapsed" in str(results[1])
    assert [await stored(backend, key) for key in keys] == [data[0], None, data[2]]
    assert os.listdir(backend.tmp_dir) == []


async def test_a_count_of_a_drive_reads_each_folder_once_however_many_pages_it_tells(backend, monkeypatch):
    """A count tells where it is after each USAGE_PAGE files (`usage`'s `passed`), and walks on from there to see
    files added ahead meanwhile. Entered again so, its walk read a folder again for each page where the daemon's
    listings could not keep it: a folder of 300,000 files took 225 s to count, not 6. Here the daemon keeps no
    listing; each unchanged folder is read once, and a file added ahead of the count is counted."""
    import drived.backends.folder_cache as folder_cache
    import drived.backends.local as local

    monkeypatch.setattr(local, "USAGE_PAGE", 10)
    monkeypatch.setattr(folder_cache, "MAX_BYTES", 0)
    for i in range(35):
        await put(backend, b"x" * i, key=f"d/w/many/f{i:02d}")
    await put(backend, b"y" * 7, key="d/w/z")
    for folder in ("d", "d/w", "d/w/many"):  # changed over a second ago: a folder's mtime is trusted then
        os.utime(f"{backend.root}/{folder}", ns=(0, 0))
    read: list[str] = []
    scan = folder_cache.scan
    monkeypatch.setattr(folder_cache, "scan", lambda folder: read.append(folder) or scan(folder))
    passed: list[str] = []

    async def tell(key: str) -> None:
        passed.append(key)
        if key == "d/w/many/f19":
            await put(backend, b"a" * 100, key="d/w/y")
            os.utime(f"{backend.root}/d/w", ns=(10**9, 10**9))  # changed, and settled

    assert await backend.usage("d", tell) == sum(range(35)) + 7 + 100
    assert passed == ["d/w/many/f09", "d/w/many/f19", "d/w/many/f29", "d/w/z"]
    assert read == [f"{backend.root}/{folder}" for folder in ("d", "d/w", "d/w/many", "d/w")], (
        f"each folder read once, and d/w again after its change: {read}")
