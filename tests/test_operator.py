"""An operator's bad day on a single daemon's data dir: what is changed under a running daemon, and what it is
started on."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import grpc
import pytest
from conftest import MIB, ROOT, free_port, raw_get, raw_put, rpc_code, sha256_hex, snapshot, spawn_daemon

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def test_a_daemon_whose_lock_file_was_removed_still_refuses_a_second_one_on_its_data_dir(tmp_path, start_daemon):
    """`lock` looks like a stale lock file to remove: with it gone, a second drived started on the data dir took a
    new `lock`, served beside the first one and removed its held upload from tmp/ (the resume failed INTERNAL)."""
    first = start_daemon(tmp_path)
    data = os.urandom(3 * MIB)
    header = pb.PutHeader(drive="lit://shared", path="held.bin", upload_id="u-held")
    with grpc.insecure_channel(first.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        cut = [pb.PutRequest(header=header), pb.PutRequest(data=data[:2 * MIB])]
        assert rpc_code(lambda: stub.Put(iter(cut), timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT  # held
        before = snapshot(first.data_dir)  # the refused daemon makes `lock` again, as empty
        os.unlink(first.data_dir / "lock")
        listen = f"127.0.0.1:{free_port()}"
        second = spawn_daemon(["--listen", listen, "--data-dir", str(first.data_dir)], tmp_path / "second.log",
                              first.data_dir, listen)
        try:
            rc = second.proc.wait(20)
        except subprocess.TimeoutExpired:
            second.stop(signal.SIGKILL)
            pytest.fail(f"a second daemon served the data dir in use once its lock file was removed:\n{second.log()}")
        assert rc == 1 and "Traceback" not in second.log(), second.log()
        assert f"{first.data_dir}: in use by another drived" in second.log(), second.log()
        assert snapshot(first.data_dir) == before
        header.write_offset = 2 * MIB
        rest = [pb.PutRequest(data=data[2 * MIB:]), pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
        stub.Put(iter([pb.PutRequest(header=header), *rest]), timeout=30)
        assert [d for _, d in raw_get(stub, "lit://shared", "held.bin")] == [data]


def chattr(flag: str, path: pathlib.Path) -> None:
    """Sets or clears the immutable attribute of `path`: a folder or file even root cannot change."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", flag, str(path)]).returncode:
        pytest.skip("chattr +i does not work here")


@pytest.mark.parametrize("stuck", ["tmp", "tmp/0"])
def test_a_tmp_folder_that_cannot_be_emptied_at_start_is_refused_naming_it(tmp_path, start_daemon, stuck):
    """tmp/ immutable, or a leftover upload in it that cannot be removed: the start went on as if tmp/ were empty,
    served, and failed the puts INTERNAL (every one, or the one whose upload got the leftover's name)."""
    handle = start_daemon(tmp_path)
    with grpc.insecure_channel(handle.endpoint) as channel:
        raw_put(drive_pb2_grpc.DriveServiceStub(channel), "lit://kept", "a.txt", b"stored before")
    assert handle.stop() == 0
    (handle.data_dir / "tmp" / "0").write_bytes(b"a leftover upload")
    chattr("+i", handle.data_dir / stuck)
    try:
        before = [snapshot(handle.data_dir / folder) for folder in ("objects", "tmp")]
        res = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}",
                              "--data-dir", str(handle.data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=10)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"drived: --data-dir {handle.data_dir}: cannot empty {handle.data_dir / 'tmp'}"), last
        assert [snapshot(handle.data_dir / folder) for folder in ("objects", "tmp")] == before
    finally:
        chattr("-i", handle.data_dir / stuck)
    again = start_daemon(tmp_path, data_dir=handle.data_dir)  # put back: served, the leftover removed
    assert os.listdir(handle.data_dir / "tmp") == []
    with grpc.insecure_channel(again.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "b.txt", b"stored after")
        assert [d for _, d in raw_get(stub, "lit://kept", "a.txt")] == [b"stored before"]


def test_a_tmp_folder_that_is_a_link_is_refused_naming_it(tmp_path, start_daemon):
    """tmp/ planted as a link to an empty folder elsewhere: start-up could not empty it (rmtree refuses a link),
    served, and wrote every upload through it, where what it left was never cleaned."""
    handle = start_daemon(tmp_path)
    assert handle.stop() == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(handle.data_dir / "tmp")
    (handle.data_dir / "tmp").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    res = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}",
                          "--data-dir", str(handle.data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=10)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"cannot empty {handle.data_dir / 'tmp'}, where uploads are written" in res.stderr, res.stderr
    assert snapshot(elsewhere) == before == {} and (handle.data_dir / "tmp").is_symlink()
