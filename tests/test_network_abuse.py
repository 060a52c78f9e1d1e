"""A hostile client on the network: HTTP/2 frames written by hand, as no gRPC client sends them, against a real
daemon. Whatever one connection does, other clients are served and the daemon's memory and descriptors come back."""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter

import grpc
import pytest
from conftest import Background, open_fds, raw_put, rss_mib, wait_until

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.integration  # starts daemons of its own

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS = 1, 3, 4
END_HEADERS, ACK = 0x4, 0x1
CANCEL = 8


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def header_block(method: str) -> bytes:
    """The HPACK block of a gRPC call's headers, each a literal without indexing (no table, no Huffman)."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", f"/drive.v1.DriveService/{method}"),
              (":authority", "drived"), ("content-type", "application/grpc"), ("te", "trailers")]
    return b"".join(b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
                    for name, value in fields)


def rapid_resets(address: str, seconds: float) -> int:
    """Opens List calls on one connection and resets each at once (CVE-2023-44487), as fast as the daemon reads
    them, for `seconds` or until the daemon closes the connection; how many were sent."""
    host, _, port = address.rpartition(":")
    block = header_block("List")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        # Its SETTINGS, and the ack of the daemon's (which it has not read): a client that has not acked them gets
        # only a few streams.
        connection.sendall(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0))
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            ids = range(2 * sent + 1, 2 * sent + 1000, 2)  # a client's streams are odd
            burst = b"".join(frame(HEADERS, END_HEADERS, i, block) + frame(RST_STREAM, 0, i, struct.pack(">I", CANCEL))
                             for i in ids)
            try:
                connection.sendall(burst)
            except OSError:  # the daemon closed the connection, or stopped reading it
                break
            sent += len(ids)
    return sent


def test_a_connection_resetting_calls_as_fast_as_it_can_leaves_other_clients_served(start_daemon, tmp_path):
    """gRPC queues the calls the daemon has yet to take up and cancels those past some 1,000: one connection
    opening and resetting calls filled that queue with calls already cancelled, and the calls of every other
    client were cancelled while it went on."""
    handle = start_daemon(tmp_path)
    pid, drive = handle.proc.pid, "lit://abuse"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "kept.txt", b"kept")
        resting_rss, resting_fds = rss_mib(pid), open_fds(pid)
        flood = Background(lambda: rapid_resets(handle.endpoint, 2.0))
        flood.start()
        answered: list[tuple[grpc.StatusCode, float]] = []
        while flood.is_alive():
            started = time.monotonic()
            try:
                entries = stub.List(pb.ListRequest(drive=drive, path="."), timeout=10).entries
                assert [e.path for e in entries] == ["kept.txt"]
                answered.append((grpc.StatusCode.OK, time.monotonic() - started))
            except grpc.RpcError as err:
                answered.append((err.code(), time.monotonic() - started))
            time.sleep(0.05)
        assert flood.join_checked() > 10_000  # calls opened and reset
        codes = Counter(code.name for code, _ in answered)
        assert codes.keys() == {"OK"} and codes["OK"] > 10, codes
        assert max(seconds for _, seconds in answered) < 2, answered
    assert wait_until(lambda: open_fds(pid) <= resting_fds, 10), (open_fds(pid), resting_fds)
    assert wait_until(lambda: rss_mib(pid) <= resting_rss + 64, 10), (rss_mib(pid), resting_rss)
