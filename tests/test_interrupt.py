"""A user's process interrupted (Ctrl-C), killed or forked while a Drive transfers files: no half file, no thread
or stream left behind."""

from __future__ import annotations

import os
import pathlib

import pytest
from conftest import MIB, wait_until
from test_api import interrupted, write

from drive_client import Drive

pytestmark = pytest.mark.timeout(60)


def leftovers(folder: pathlib.Path) -> list[str]:
    """The names in `folder` but the daemon's own (its data dir and log)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(("data-", "drived-")))


def test_ctrl_c_in_a_get_of_one_stream_ends_its_read_ahead_thread(start_daemon, tmp_path, drive_uri):
    """A get under 64 MiB (or of a folder) reads its stream a little ahead in a thread of its own; Ctrl-C left
    that thread polling its queue until the garbage collector found the interrupted get, which an idle process
    may never run."""
    daemon = start_daemon(tmp_path)  # its own: the Gets it counts open are this test's
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    data = os.urandom(30 * MIB)
    write(tmp_path / "big.bin", data)
    drive.put("big.bin")
    write(tmp_path / "big.bin", b"the local file")
    report = interrupted(drive_uri, daemon.endpoint, tmp_path, "get", 4 * MIB)
    assert report["outcome"] == "interrupted" and report["seconds"] < 5, report
    assert report["threads"] == ["MainThread"] and report["files"] == [], report
    assert leftovers(tmp_path) == ["big.bin"]
    assert (tmp_path / "big.bin").read_bytes() == b"the local file"
    assert wait_until(lambda: daemon.open_requests("Get") == 0, timeout=10), "the daemon still serves the get"
    assert drive.get("big.bin", overwrite=True).read_bytes() == data
