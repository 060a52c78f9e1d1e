"""A client that sends part of a request and stalls: a raw HTTP/2 connection, as an attacker would write one.

No gRPC client sends part of a message: `PartialRequests` opens calls of a
method on one connection, announces a message of `announced` bytes on each,
sends `sent` of them (within the flow-control windows the daemon grants) and
nothing more. It answers the daemon's pings and settings, so the connection
stays up as a live client's does; `close` drops it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 1, 4, 1
INITIAL_WINDOW_SIZE = 4  # the SETTINGS parameter
MAX_FRAME = 16384


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _length(n: int) -> bytes:
    """An HPACK string length (7-bit prefix, no Huffman coding)."""
    if n < 127:
        return bytes([n])
    out = [127]
    n -= 127
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    return bytes([*out, n])


def _header(name: str, value: str) -> bytes:
    """A literal header field without indexing."""
    return b"\x00" + _length(len(name)) + name.encode() + _length(len(value)) + value.encode()


class PartialRequests:
    """One HTTP/2 connection to a gRPC server on 127.0.0.1:`port`, whose calls send part of their request."""

    def __init__(self, port: int, token: str = "") -> None:
        self._socket = socket.create_connection(("127.0.0.1", port))
        self._lock = threading.Lock()  # one writer of the socket at a time
        self._windows = threading.Condition()
        self._connection_window = 65535
        self._initial_window = 65535
        self._stream_windows: dict[int, int] = {}
        self._next_stream = 1
        self.ended: set[int] = set()  # streams the server reset or answered
        self._token = token
        self._send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0, b""))
        threading.Thread(target=self._read, daemon=True).start()

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._socket.sendall(data)

    def _read(self) -> None:
        buffer = b""
        with contextlib.suppress(OSError):  # closed
            while data := self._socket.recv(1 << 16):
                buffer += data
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    size = int.from_bytes(buffer[:3], "big")
                    kind, flags = buffer[3], buffer[4]
                    stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    payload, buffer = buffer[9:9 + size], buffer[9 + size:]
                    self._handle(kind, flags, stream, payload)

    def _handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for at in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[at:at + 6])
                if key == INITIAL_WINDOW_SIZE:
                    with self._windows:
                        self._initial_window = value
            self._send(_frame(SETTINGS, ACK, 0, b""))
        elif kind == PING and not flags & ACK:
            self._send(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            grown = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            with self._windows:
                if stream:
                    self._stream_windows[stream] = self._stream_windows.get(stream, self._initial_window) + grown
                else:
                    self._connection_window += grown
                self._windows.notify_all()
        elif kind in (RST_STREAM, HEADERS) and stream:
            with self._windows:
                self.ended.add(stream)
                self._windows.notify_all()

    def call(self, method: str, announced: int, sent: int, window_wait: float = 2.0) -> int:
        """Opens a call of `method` ("/drive.v1.DriveService/Stat"), announcing a message of `announced` bytes,
        and sends up to `sent` of them: fewer if the server grants no window for `window_wait` seconds or ends
        the call. Returns the call's stream number."""
        stream = self._next_stream
        self._next_stream += 2
        headers = (_header(":method", "POST") + _header(":scheme", "http") + _header(":path", method)
                   + _header(":authority", "127.0.0.1") + _header("content-type", "application/grpc")
                   + _header("te", "trailers"))
        if self._token:
            headers += _header("authorization", f"Bearer {self._token}")
        self._send(_frame(HEADERS, END_HEADERS, stream, headers))
        pending = (b"\x00" + struct.pack(">I", announced) + b"x" * (sent - 5))[:sent]
        while pending:
            with self._windows:
                granted = self._windows.wait_for(
                    lambda: stream in self.ended
                    or min(self._connection_window, self._stream_windows.get(stream, self._initial_window)) > 0,
                    window_wait,
                )
                if not granted or stream in self.ended:
                    break
                size = min(len(pending), MAX_FRAME, self._connection_window,
                           self._stream_windows.get(stream, self._initial_window))
                self._connection_window -= size
                self._stream_windows[stream] = self._stream_windows.get(stream, self._initial_window) - size
            self._send(_frame(DATA, 0, stream, pending[:size]))
            pending = pending[size:]
        return stream

    def end(self, stream: int) -> None:
        """Ends the request of the call on `stream` (END_STREAM), whatever of its message it sent."""
        self._send(_frame(DATA, END_STREAM, stream, b""))

    def reset(self, stream: int) -> None:
        """Cancels the call on `stream` (RST_STREAM CANCEL), as a client that gives up does."""
        self._send(_frame(RST_STREAM, 0, stream, struct.pack(">I", 8)))

    def close(self) -> None:
        self._socket.close()
