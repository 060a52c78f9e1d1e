"""fsspec's own conformance suite (`fsspec.tests.abstract`) run against `lit://` on the session daemon, as s3fs and
gcsfs run it on their filesystems: copy, get, put, pipe and open, with globs, lists and `maxdepth`. Each test has
a drive of its own. Both faces run it: `DriveFileSystem`, and `AsyncDriveFileSystem` through the blocking methods
fsspec gives every async filesystem (as s3fs is run)."""

from __future__ import annotations

import asyncio
import pathlib

import fsspec
import fsspec.tests.abstract as abstract
import pytest

from drive_client import Drive
from drive_client.fsspec import AsyncDriveFileSystem, DriveFileSystem

pytestmark = pytest.mark.timeout(60)


class LitFixtures(abstract.AbstractFixtures):
    @pytest.fixture(params=[DriveFileSystem, AsyncDriveFileSystem])
    def fs(self, request, daemon) -> DriveFileSystem | AsyncDriveFileSystem:
        return request.param(endpoint=daemon.endpoint, component_name="abstract")

    @pytest.fixture
    def fs_join(self):
        return lambda *parts: "/".join(parts)

    @pytest.fixture
    def fs_path(self, drive_uri: str) -> str:
        return drive_uri.removeprefix("lit://")

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False  # a folder is the files below it: the suite puts a file where it needs a folder to exist


class TestLitCopy(abstract.AbstractCopyTests, LitFixtures):
    pass


class TestLitGet(abstract.AbstractGetTests, LitFixtures):
    pass


class TestLitPut(abstract.AbstractPutTests, LitFixtures):
    pass


class TestLitPipe(abstract.AbstractPipeTests, LitFixtures):
    pass


class TestLitOpen(abstract.AbstractOpenTests, LitFixtures):
    pass


def test_blocking_open_in_asyncio_code_is_refused(daemon, drive_uri):
    """`fs.open(path, "wb")` on the asyncio face (`asynchronous=True`) gave fsspec's base file, which took the writes
    and stored nothing at close (`touch` too); blocking calls there are refused, as fsspec refuses its others."""
    name = drive_uri.removeprefix("lit://")
    Drive(drive_uri, component_name="abstract", endpoint=daemon.endpoint).put(__file__, to="kept.py")
    fs = fsspec.filesystem("lit", asynchronous=True, endpoint=daemon.endpoint, component_name="abstract")

    async def blocking_calls() -> None:
        for mode in ("wb", "rb"):
            with pytest.raises(NotImplementedError, match="open_async"):
                fs.open(f"{name}/kept.py", mode)
        with pytest.raises(NotImplementedError, match="open_async"):
            fs.touch(f"{name}/new.txt")
        assert await fs._find(name) == [f"{name}/kept.py"]
        assert await fs._cat_file(f"{name}/kept.py") == pathlib.Path(__file__).read_bytes()

    asyncio.run(blocking_calls())
