"""A TCP proxy on loopback that forwards bytes between clients and a daemon, and cuts connections on cue.

    with CuttingProxy(daemon.endpoint) as proxy:
        proxy.cut_after("up", 50 * MIB)       # the next connection breaks once 50 MiB went client -> daemon
        proxy.cut_before("down", marker)      # ... or just before `marker` (bytes of an answer) would reach the client
        Drive(..., endpoint=proxy.endpoint).put("big.bin")
        proxy.forwarded["up"]                 # bytes it carried towards the daemon, over all connections

Each cut applies to one connection, the next one accepted (a gRPC channel makes one at a time);
connections after the cuts run out are forwarded whole. A cut resets both sides (SO_LINGER 0: an RST, as when a network
path breaks), and the proxy goes on accepting. `refuse()` makes every later connection break at
once, as a daemon that stays down looks to a client (`down_after_cuts` does so once the cuts are made).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import deque
from typing import Literal

Direction = Literal["up", "down"]  # up: client -> daemon; down: daemon -> client
Cut = tuple[Direction, int | bytes]  # where a connection breaks: after that many bytes, or before those bytes
PIECE = 1 << 20


def _reset(sock: socket.socket) -> None:
    """Closes `sock` with an RST instead of a FIN.

    Shutting its reading side first wakes a thread blocked reading it: until that read returns,
    the socket stays open (and no RST goes out), however many times it is closed.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One client connection and its upstream one; two threads pump bytes, one each way."""

    def __init__(self, proxy: CuttingProxy, client: socket.socket, upstream: socket.socket,
                 cut: Cut | None) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.cut = cut
        self._seen = b""  # the last bytes forwarded towards a marker cut, for a marker split between two reads
        self.moved = {"up": 0, "down": 0}
        self.closed = threading.Event()
        self._lock = threading.Lock()
        for direction, source, sink in (("up", client, upstream), ("down", upstream, client)):
            threading.Thread(target=self._pump, args=(direction, source, sink), daemon=True,
                             name=f"proxy-{direction}").start()

    def _allowed(self, direction: Direction, data: memoryview) -> int:
        """How many bytes of `data` may go on before this connection's cut (all when it has none)."""
        if self.cut is None or self.cut[0] != direction:
            return len(data)
        where = self.cut[1]
        if isinstance(where, int):
            return max(0, min(len(data), where - self.moved[direction]))
        seen = self._seen + bytes(data)
        at = seen.find(where)
        if at < 0:
            self._seen = seen[len(seen) - len(where) + 1:]
            return len(data)
        return max(0, at - len(self._seen))

    def _pump(self, direction: Direction, source: socket.socket, sink: socket.socket) -> None:
        buffer = bytearray(PIECE)
        view = memoryview(buffer)
        try:
            while not self.closed.is_set():
                received = source.recv_into(buffer)
                if self.closed.is_set():
                    return
                if not received:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                allowed = self._allowed(direction, view[:received])
                if allowed:
                    sink.sendall(view[:allowed])
                    with self._lock:
                        self.moved[direction] += allowed
                    self.proxy.count(direction, allowed)
                if allowed < received:
                    self.proxy.cuts_made += 1
                    break
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        _reset(self.client)
        _reset(self.upstream)


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to `target` (HOST:PORT), cutting the connections it is told to."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.forwarded = {"up": 0, "down": 0}
        self.connections = 0  # accepted so far
        self.cuts_made = 0
        self._cuts: deque[Cut] = deque()
        self._refusing = False
        self._refuse_next = 0
        self._down_after_cuts = False
        self._lock = threading.Lock()
        self._open: list[_Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def cut_after(self, direction: Direction, nbytes: int) -> None:
        """The next connection accepted is cut once it moved `nbytes` in `direction` (cuts queue up: one a
        connection, in the order given)."""
        with self._lock:
            self._cuts.append((direction, nbytes))

    def cut_before(self, direction: Direction, marker: bytes) -> None:
        """The next connection accepted is cut just before `marker` would pass in `direction` (queued as
        `cut_after`): e.g. in the middle of an answer that carries it, which then never arrives whole."""
        with self._lock:
            self._cuts.append((direction, marker))

    def down_after_cuts(self, down: bool = True) -> None:
        """Once the cuts given so far are made, breaks every later connection at once (a daemon that stays down);
        `down=False`: takes connections again."""
        with self._lock:
            self._down_after_cuts = down

    def refuse_next(self, count: int) -> None:
        """Breaks the next `count` connections at once, as a daemon that is not up yet."""
        with self._lock:
            self._refuse_next += count

    def refuse(self, refusing: bool = True) -> None:
        """Breaks every connection from now on at once (and those open now), or stops doing so."""
        with self._lock:
            self._refusing = refusing
            connections = list(self._open) if refusing else []
        for connection in connections:
            connection.close()

    def count(self, direction: Direction, nbytes: int) -> None:
        with self._lock:
            self.forwarded[direction] += nbytes

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                refusing = self._refusing or self._refuse_next > 0 or (self._down_after_cuts and not self._cuts)
                self._refuse_next = max(0, self._refuse_next - 1)
            if refusing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                cut = self._cuts.popleft() if self._cuts else None
                self._open = [c for c in self._open if not c.closed.is_set()]
                self._open.append(_Connection(self, client, upstream, cut))

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            connection.close()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
