"""File descriptors: refused and abandoned reads release theirs, and a daemon at its descriptor limit refuses new
uploads (RESOURCE_EXHAUSTED) while it goes on serving reads and health."""

from __future__ import annotations

import json
import os
import socket
import time

import grpc
import pytest
from conftest import (
    MIB,
    StalledPuts,
    closed_by_peer,
    health_status,
    no_uploads,
    open_fds,
    raw_get,
    raw_put,
    silent_connections,
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


def _start_line(handle, event: str) -> dict:
    [line] = [json.loads(line) for line in handle.log().splitlines() if f'"event": "{event}"' in line]
    return line


def _connections_share(handle) -> int:
    """The connections the daemon's descriptors allow, from its start-up line."""
    return int(_start_line(handle, "file descriptors")["for_connections"])


def test_connections_past_their_share_are_closed_and_files_keep_their_descriptors(start_daemon, tmp_path):
    """700 connections that said nothing, under `ulimit -n 512`: gRPC accepted them until every descriptor was
    taken (and logged "File descriptor limit reached" every second), so that a big put of a client connected
    before could open no file for its upload."""
    handle = start_daemon(tmp_path, nofile=512)
    drive = "lit://connections"
    kept = os.urandom(2 * MIB)
    share = _connections_share(handle)
    assert 40 < share < 80, share  # an eighth of what is left of 512
    with grpc.insecure_channel(handle.endpoint) as channel:  # a client that connected before the flood
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "kept.bin", kept)
        with silent_connections(handle.endpoint, 700) as flood:
            # all but the share, less the client's own connection, are closed as they are accepted
            assert wait_until(lambda: sum(map(closed_by_peer, flood)) >= 700 - share, 20), sum(
                map(closed_by_peer, flood))
            assert open_fds(handle.proc.pid) < 512 // 4, open_fds(handle.proc.pid)
            new = os.urandom(2 * MIB)  # bigger than a chunk: its upload is a file in the daemon's tmp/
            raw_put(stub, drive, "new.bin", new)
            [(_, got)] = raw_get(stub, drive, "new.bin")
            assert got == new
        assert "File descriptor limit reached" not in handle.log()
    with grpc.insecure_channel(handle.endpoint) as fresh:  # the flood gone, new clients connect again
        stub = drive_pb2_grpc.DriveServiceStub(fresh)
        [(_, got)] = raw_get(stub, drive, "kept.bin")
        assert got == kept
        assert [e.path for e in stub.List(pb.ListRequest(drive=drive, path="."), timeout=10).entries] == [
            "kept.bin", "new.bin"
        ]


def test_max_connections_sets_the_share_and_refused_clients_are_told_unavailable(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--max-connections", "3")
    assert _connections_share(handle) > 3 and _start_line(handle, "serving")["max_connections"] == 3  # the flag
    with silent_connections(handle.endpoint, 3) as flood:
        # the connection of the start-up's health check may hold its place until the daemon sees it closed
        for _ in range(3):
            time.sleep(1)
            flood[:] = [socket.create_connection(c.getpeername()) if closed_by_peer(c) else c for c in flood]
        assert not any(map(closed_by_peer, flood))
        with grpc.insecure_channel(handle.endpoint) as channel, pytest.raises(grpc.RpcError) as refused:
            drive_pb2_grpc.DriveServiceStub(channel).Stat(pb.StatRequest(drive="lit://cap", path="x"), timeout=3)
        # UNAVAILABLE, which clients try again (DEADLINE_EXCEEDED when the 3 s pass between two attempts)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # the flood closed: a new connection is let in once the daemon has seen the flood's end (a moment, under load)
    assert wait_until(lambda: health_status(handle.endpoint, timeout=5) == health_pb2.HealthCheckResponse.SERVING, 15)


def test_connections_that_never_finish_their_handshake_or_stay_without_calls_are_closed(start_daemon, tmp_path):
    """Such connections were held for two minutes (the handshake) or for ever (without calls): ones a vanished
    client host left would fill the connections' share for good."""
    handle = start_daemon(tmp_path, before="import drived.server as s; s.CONNECTION_IDLE = s.HANDSHAKE_TIMEOUT = 1.0")
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # HTTP/2: a SETTINGS frame
    with silent_connections(handle.endpoint, 5) as silent, \
            silent_connections(handle.endpoint, 5, first=preface) as idle:
        assert wait_until(lambda: all(map(closed_by_peer, silent + idle)), 15)
    with grpc.insecure_channel(handle.endpoint) as channel:  # a client's channel reconnects at its next call
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://idle", "f.txt", b"one")
        ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
        assert wait_until(lambda: ready in states and states[-1] == idle, 15), states  # the daemon closed it
        [(_, got)] = raw_get(stub, "lit://idle", "f.txt")
        assert got == b"one"
