"""A TCP proxy on loopback that forwards bytes between clients and a daemon, and cuts connections on cue.

    with CuttingProxy(daemon.endpoint) as proxy:
        proxy.cut_after("up", 50 * MIB)       # the next connection breaks once 50 MiB went client -> daemon
        proxy.cut_before("down", marker)      # ... or just before `marker` (bytes of an answer) would reach the client
        Drive(..., endpoint=proxy.endpoint).put("big.bin")
        proxy.forwarded["up"]                 # bytes it carried towards the daemon, over all connections

Each cut applies to one connection, the next one accepted (a gRPC channel makes one at a time);
connections after the cuts run out are forwarded whole. A cut resets both sides (SO_LINGER 0: an RST, as when a network
path breaks), or the client's first and the daemon's later (`cut_after(..., daemon_side=SECONDS)`), and the proxy goes
on accepting. `refuse()` makes every later connection break at once, as a daemon that stays down looks to a client
(`down_after_cuts` does so once the cuts are made).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections import deque
from typing import Literal

Direction = Literal["up", "down"]  # up: client -> daemon; down: daemon -> client
Cut = tuple[Direction, int | bytes]  # where a connection breaks: after that many bytes, or before those bytes
PIECE = 1 << 20
HOLD_SECONDS = 0.5  # how long bytes that may begin a marker wait for the next read while their source is quiet


def _marker_start(data: bytes, marker: bytes) -> int:
    """How many bytes at the end of `data` could be the start of `marker` (fewer than all of it)."""
    return next((n for n in range(min(len(marker) - 1, len(data)), 0, -1) if data.endswith(marker[:n])), 0)


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


class _Count:
    """Watches the bytes going one way, to cut once `nbytes` went on."""

    holding = False  # holds nothing back

    def __init__(self, nbytes: int) -> None:
        self._left = nbytes

    def passing(self, data: memoryview) -> tuple[memoryview, bool]:
        """What goes on now of the read `data`, and whether the connection is cut after it."""
        allowed = min(len(data), self._left)
        self._left -= allowed
        return data[:allowed], allowed < len(data)

    def release(self) -> bytes:
        return b""


class _Marker:
    """Watches the bytes going one way for a marker, to cut just before it, however the reads split it.

    Bytes at the end of a read that could begin the marker are held back
    until the next read shows whether they do; when their source goes quiet
    (`HOLD_SECONDS`) instead, they go on and are still watched, so that a
    marker whose rest comes later is found, cut inside (no other way then).
    """

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self._tail = b""  # the last bytes read that could begin the marker
        self._unsent = 0  # how many of them are held back

    @property
    def holding(self) -> bool:
        return self._unsent > 0

    def passing(self, data: memoryview) -> tuple[bytes, bool]:
        """What goes on now of the bytes held back and the read `data`, and whether the marker follows it (the
        connection is cut after it)."""
        seen = self._tail + bytes(data)
        sent = len(self._tail) - self._unsent  # seen[:sent] went on already
        at = seen.find(self.marker)
        if at >= 0:
            return seen[sent:max(sent, at)], True
        keep = _marker_start(seen, self.marker)
        end = max(sent, len(seen) - keep)
        self._tail, self._unsent = seen[len(seen) - keep:], len(seen) - end
        return seen[sent:end], False

    def release(self) -> bytes:
        """The bytes held back, which go on now (their source went quiet or ended)."""
        held = self._tail[len(self._tail) - self._unsent:]
        self._unsent = 0
        return held


class _Connection:
    """One client connection and its upstream one; two threads pump bytes, one each way."""

    def __init__(self, proxy: CuttingProxy, client: socket.socket, upstream: socket.socket,
                 cut: Cut | None, daemon_side: float = 0.0) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.cut = cut
        self.daemon_side = daemon_side  # seconds the daemon's side stays open after the cut
        self.half_open = False  # cut on the client's side only, for now
        self.closed = threading.Event()
        self._lock = threading.Lock()
        for direction, source, sink in (("up", client, upstream), ("down", upstream, client)):
            threading.Thread(target=self._pump, args=(direction, source, sink), daemon=True,
                             name=f"proxy-{direction}").start()

    def _pump(self, direction: Direction, source: socket.socket, sink: socket.socket) -> None:
        watch: _Count | _Marker | None = None  # this direction's cut
        if self.cut is not None and self.cut[0] == direction:
            where = self.cut[1]
            watch = _Count(where) if isinstance(where, int) else _Marker(where)
        buffer = bytearray(PIECE)
        view = memoryview(buffer)
        try:
            while not self.closed.is_set():
                if watch and watch.holding and not select.select([source], [], [], HOLD_SECONDS)[0]:
                    self._send(direction, sink, watch.release())
                    continue
                received = source.recv_into(buffer)
                if self.closed.is_set():
                    return
                if not received:
                    self._send(direction, sink, watch.release() if watch else b"")
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                passing, cut = watch.passing(view[:received]) if watch else (view[:received], False)
                self._send(direction, sink, passing)
                if cut:
                    self.proxy.cuts_made += 1
                    self._cut()
                    return
        except (OSError, ValueError):  # ValueError: select on a socket the other direction closed
            pass
        if not self.half_open:
            self.close()

    def _cut(self) -> None:
        """Resets both sides, or the client's alone when the daemon's side stays open a while: the daemon goes on
        reading what was forwarded to it, as when the path breaks between the client and the daemon."""
        if not self.daemon_side:
            self.close()
            return
        self.half_open = True
        _reset(self.client)
        timer = threading.Timer(self.daemon_side, self.close)
        timer.daemon = True
        timer.start()

    def _send(self, direction: Direction, sink: socket.socket, data: bytes | memoryview) -> None:
        if data:
            sink.sendall(data)
            self.proxy.count(direction, len(data))

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
        self._cuts: deque[tuple[Cut, float]] = deque()  # each with the seconds its daemon's side stays open
        self._refusing = False
        self._refuse_next = 0
        self._down_after_cuts = False
        self._lock = threading.Lock()
        self._open: list[_Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def cut_after(self, direction: Direction, nbytes: int, daemon_side: float = 0.0) -> None:
        """The next connection accepted is cut once it moved `nbytes` in `direction` (cuts queue up: one a
        connection, in the order given). `daemon_side`: the daemon's side is reset that many seconds after the
        client's (0: at once)."""
        with self._lock:
            self._cuts.append(((direction, nbytes), daemon_side))

    def cut_before(self, direction: Direction, marker: bytes) -> None:
        """The next connection accepted is cut just before `marker` would pass in `direction` (queued as
        `cut_after`): e.g. in the middle of an answer that carries it, which then never arrives whole. Also when
        reads split it: bytes that may begin it wait for the next read (`_Marker`)."""
        with self._lock:
            self._cuts.append(((direction, marker), 0.0))

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
                cut, daemon_side = self._cuts.popleft() if self._cuts else (None, 0.0)
                self._open = [c for c in self._open if not c.closed.is_set()]
                self._open.append(_Connection(self, client, upstream, cut, daemon_side))

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
