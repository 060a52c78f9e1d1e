"""An operator's bad day on a single daemon's data dir: what is changed under a running daemon, and what it is
started on."""

from __future__ import annotations

import os
import signal
import subprocess

import grpc
import pytest
from conftest import MIB, free_port, raw_get, rpc_code, sha256_hex, snapshot, spawn_daemon

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
