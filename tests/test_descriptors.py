"""File descriptors: refused and abandoned reads release theirs, and a daemon at its descriptor limit refuses new
uploads (RESOURCE_EXHAUSTED) while it goes on serving reads and health."""

from __future__ import annotations

import os

import grpc
import pytest
from conftest import (
    MIB,
    StalledPuts,
    health_status,
    no_uploads,
    open_fds,
    raw_get,
    raw_put,
    wait_until,
)
from grpc_health.v1 import health_pb2

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc


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


def test_at_the_descriptor_limit_uploads_are_refused_and_reads_and_health_served(start_daemon, tmp_path):
    """150 stalled uploads under `ulimit -n 128`: every call answered INTERNAL (`OSError: [Errno 24]`, naming a
    server path) and health timed out."""
    handle = start_daemon(tmp_path, "--max-streams-per-peer", "1000", nofile=128)
    drive = "lit://descriptors"
    kept = os.urandom(2 * MIB)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "kept.bin", kept)
        raw_put(stub, drive, "small.txt", b"small")
        before = open_fds(handle.proc.pid)

        def first(i: int) -> list:  # a megabyte: the upload is a file in the daemon's tmp/ from then on
            return [pb.PutRequest(header=pb.PutHeader(drive=drive, path=f"stalled/{i}.bin")), os.urandom(MIB)]

        with StalledPuts(handle.endpoint, 150, first) as stalled:
            assert wait_until(lambda: handle.open_requests("Put") == stalled.open(), 30)
            refused = stalled.refused()
            print(f"150 stalled uploads under ulimit -n 128: {stalled.open()} held, refused: {refused}")
            assert stalled.open() > 0 and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
            for details in filter(None, stalled.details):
                assert "too many" in details and str(handle.data_dir) not in details and "Errno" not in details
            # reads and health are served, from this connection and from new ones
            assert health_status(handle.endpoint, timeout=5) == health_pb2.HealthCheckResponse.SERVING
            [(_, got)] = raw_get(stub, drive, "kept.bin")
            assert got == kept
            assert [e.path for e in stub.List(pb.ListRequest(drive=drive, path="."), timeout=10).entries] == [
                "kept.bin", "small.txt"
            ]
            with grpc.insecure_channel(handle.endpoint) as fresh:
                [(_, got)] = raw_get(drive_pb2_grpc.DriveServiceStub(fresh), drive, "small.txt")
                assert got == b"small"
            # a new big upload is refused, with words for a person and no server path
            with pytest.raises(grpc.RpcError) as refused_put:
                raw_put(stub, drive, "new.bin", os.urandom(2 * MIB))
            assert refused_put.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert str(handle.data_dir) not in refused_put.value.details()
        assert wait_until(lambda: no_uploads(handle.data_dir) and open_fds(handle.proc.pid) <= before + 5, 30)
        raw_put(stub, drive, "new.bin", os.urandom(2 * MIB))
        assert [e.path for e in stub.List(pb.ListRequest(drive=drive, path=".")).entries] == [
            "kept.bin", "new.bin", "small.txt"
        ]
