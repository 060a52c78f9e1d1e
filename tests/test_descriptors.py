"""Refused and abandoned reads leave no open file descriptors in the daemon."""

from __future__ import annotations

import os

import grpc
from conftest import raw_put, wait_until

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_refused_and_abandoned_gets_release_their_files(start_daemon, tmp_path):
    handle = start_daemon(tmp_path)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://fds", "f.bin", os.urandom(3 << 20))
        before = open_fds(handle.proc.pid)
        for _ in range(200):
            stale = stub.Get(pb.GetRequest(drive="lit://fds", path="f.bin", if_match="0" * 64))
            try:
                list(stale)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED
            abandoned = stub.Get(pb.GetRequest(drive="lit://fds", path="f.bin"))
            assert next(abandoned).HasField("info")
            abandoned.cancel()
        assert wait_until(lambda: open_fds(handle.proc.pid) <= before + 5, 10), open_fds(handle.proc.pid)
