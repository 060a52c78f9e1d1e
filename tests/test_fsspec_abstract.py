"""fsspec's own conformance suite (`fsspec.tests.abstract`) run against `lit://` on the session daemon, as s3fs and
gcsfs run it on their filesystems: copy, get, put, pipe and open, with globs, lists and `maxdepth`. Each test has
a drive of its own."""

from __future__ import annotations

import fsspec
import fsspec.tests.abstract as abstract
import pytest

from drive_client.fsspec import DriveFileSystem

pytestmark = pytest.mark.timeout(60)


class LitFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, daemon) -> DriveFileSystem:
        return fsspec.filesystem("lit", endpoint=daemon.endpoint, component_name="abstract")

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

