"""Drives of many components, and folders of many files: what one call costs the daemon's other calls (the event
loop) and its memory, whatever their number."""

from __future__ import annotations

import pathlib

import grpc
import pytest
from conftest import Background, raw_put, snapshot, wait_until

from drive_client.pb import drive_pb2, drive_pb2_grpc

SLOW_LOOKS = """
import os, time
_lstat = os.lstat

def lstat(path, *args, **kwargs):
    if "/slow_component/" in os.fspath(path):
        open({reached!r}, "w").close()
        while os.path.exists({pause!r}):
            time.sleep(0.01)
    return _lstat(path, *args, **kwargs)

os.lstat = lstat
"""


def test_the_check_of_other_components_leaves_the_daemon_serving(start_daemon, tmp_path: pathlib.Path, drive_uri):
    """A put with allow_duplicates=False looks for its path in every other component (one look each on disk): in a
    drive of 10,000 components that took 0.27 s, on the event loop, so every other call of the daemon waited. Here
    one component's look hangs (a slow disk): a stat of another file is answered meanwhile, and the put, once the
    look ends, is refused as before, storing nothing."""
    pause, reached = tmp_path / "pause", tmp_path / "reached"
    handle = start_daemon(tmp_path, before=SLOW_LOOKS.format(pause=str(pause), reached=str(reached)))
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive_uri, "taken.txt", b"first", component="slow_component")
        raw_put(stub, drive_uri, "mine.txt", b"mine", component="writer")
        before = snapshot(handle.data_dir / "objects")
        reached.unlink(missing_ok=True)  # the puts above looked at the component too
        pause.touch()
        put = Background(lambda: raw_put(stub, drive_uri, "taken.txt", b"second", component="writer"))
        put.start()
        try:
            assert wait_until(reached.exists, timeout=30), "the put never looked in the other component"
            answer = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="mine.txt", component="writer"), timeout=10)
            assert answer.size == 4 and put.is_alive()  # answered while the put's look hangs
        finally:
            pause.unlink()
        with pytest.raises(grpc.RpcError) as refused:
            put.join_checked()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "is already held by component 'slow_component'" in refused.value.details()
        assert snapshot(handle.data_dir / "objects") == before
