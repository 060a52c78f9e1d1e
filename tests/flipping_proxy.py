"""A TCP proxy that damages one bit on the way: what a faulty network card or memory would do to a transfer.

    python tests/flipping_proxy.py LISTEN_PORT TARGET_HOST:PORT up|down MARKER_HEX[,MARKER_HEX...]

Forwards every connection to the target. In one direction ("up": client to
server, "down": server to client) it looks for the first of the markers
(byte strings, e.g. taken from a file's content) and flips the lowest bit of
that marker's first byte (its first byte in a read, when the marker
straddles two), once in its life, then forwards everything else
unchanged. HTTP/2 has no checksum of its own, so gRPC passes the damaged
byte on. Prints "listening" once it accepts connections and "flipped" when it
has damaged a byte.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

flipped = threading.Event()
lock = threading.Lock()


def pump(source: socket.socket, sink: socket.socket, markers: list[bytes] | None) -> None:
    """Copies `source` to `sink`; with `markers`, flips a bit of the first one seen (once per process)."""
    tail = b""  # the end of the previous read, so a marker cut across two reads is found
    keep = max((len(m) for m in markers), default=1) - 1 if markers else 0
    try:
        while data := source.recv(1 << 16):
            if markers and not flipped.is_set():
                window = tail + data
                found = [i for i in (window.find(m) for m in markers) if i >= 0]
                with lock:
                    if found and not flipped.is_set():
                        # the marker's first byte, or its first byte in this read when it began in the last
                        at = max(min(found) - len(tail), 0)
                        damaged = bytearray(data)
                        damaged[at] ^= 0x01
                        data = bytes(damaged)
                        flipped.set()
                        print("flipped", flush=True)
                tail = window[-keep:] if keep else b""
            sink.sendall(data)
    except OSError:  # either end went away: so does the other
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def main() -> None:
    listen_port, target, direction, marker_list = sys.argv[1:5]
    host, port = target.rsplit(":", 1)
    markers = [bytes.fromhex(m) for m in marker_list.split(",")]
    server = socket.create_server(("127.0.0.1", int(listen_port)))
    print("listening", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection((host, int(port)))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, upstream, markers if direction == "up" else None),
                         daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, markers if direction == "down" else None),
                         daemon=True).start()


if __name__ == "__main__":
    main()
