"""The cutting proxy itself (tests/cutting_proxy.py), between two plain sockets on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import cutting_proxy
import pytest
from cutting_proxy import CuttingProxy

MARKER = b"0123456789abcdef"


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def connected(proxy: CuttingProxy, server: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(client, daemon side): a connection through `proxy` to `server`."""
    host, port = proxy.endpoint.split(":")
    client = socket.create_connection((host, int(port)), timeout=10)
    upstream, _ = server.accept()
    return client, upstream


def rest(sock: socket.socket) -> bytes:
    """What `sock` receives until its connection ends (a FIN or a reset)."""
    received = b""
    try:
        while data := sock.recv(1 << 16):
            received += data
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("split", [1, len(MARKER) // 2, len(MARKER) - 1])
def test_a_marker_split_between_two_reads_is_cut_right_before_it(server, monkeypatch, split):
    """The client has received what came before the marker before the marker's rest is even sent: the proxy read
    the two writes apart, held back the marker's start, and cut there once the rest came."""
    monkeypatch.setattr(cutting_proxy, "HOLD_SECONDS", 60)  # the held bytes wait for the rest, however slow the test
    with CuttingProxy(f"127.0.0.1:{server.getsockname()[1]}") as proxy:
        proxy.cut_before("down", MARKER)
        client, upstream = connected(proxy, server)
        with client, upstream:
            upstream.sendall(b"head " + MARKER[:split])
            assert client.recv(1 << 16) == b"head "
            upstream.sendall(MARKER[split:] + b" tail")
            assert rest(client) == b""
        assert proxy.cuts_made == 1 and proxy.forwarded["down"] == len(b"head ")


def test_bytes_that_only_look_like_a_marker_start_go_on_once_their_source_is_quiet(server):
    """A read ending in the marker's first bytes, then nothing: they reach the client after HOLD_SECONDS (a peer
    waiting for its answer is not stalled), and the marker that comes later is still cut before."""
    with CuttingProxy(f"127.0.0.1:{server.getsockname()[1]}") as proxy:
        proxy.cut_before("down", MARKER)
        client, upstream = connected(proxy, server)
        with client, upstream:
            upstream.sendall(b"head " + MARKER[:5])
            received = b""
            while len(received) < len(b"head ") + 5:
                received += client.recv(1 << 16)
            assert received == b"head " + MARKER[:5]
            upstream.sendall(b" more " + MARKER + b" tail")
            assert rest(client) == b" more "
        assert proxy.cuts_made == 1
