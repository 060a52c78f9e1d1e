"""Plain grpcio: the ceilings of the transport in Python.

A generic-handler grpc.aio server (same server flavour as drived), raw bytes
as messages (no protobuf, no disk):

- `/bench.Raw/Up`       client stream of chunks; answers the byte count.
- `/bench.Raw/UpChecked` the same, summing what arrives with CRC32C and sha256; answers "CRC32C SHA256".
- `/bench.Raw/Down`     request: "SIZE CHUNK" as ASCII; streams SIZE bytes in CHUNK pieces.
- `/bench.Raw/DownChecked` the same, each chunk summed with CRC32C before it is sent; then the
  CRC32C of all of them, as 4 bytes.
- `/bench.Raw/Store`    unary: takes a small file's bytes, keeps nothing, answers the count.
- `/bench.Raw/Fetch`    unary: request "SIZE" as ASCII; answers SIZE bytes.
- `/bench.Raw/Ping`     unary echo, for readiness.

With `checksums=True`, `upload` and `download` sum what a drive transfer does:
CRC32C on both ends of each, and the daemon's sha256 of a put (its content
identity): the ceiling of a verified transfer in Python with grpcio, still
without disk.

Run as `python -m bench.rawgrpc serve 127.0.0.1:PORT`.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time

import grpc
from crc32c import crc32c

MSG_LIMIT = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MSG_LIMIT),
    ("grpc.max_receive_message_length", MSG_LIMIT),
    ("grpc.so_reuseport", 0),
]


def _ident(b: bytes) -> bytes:
    return b


async def _up(request_iterator, context) -> bytes:
    n = 0
    async for chunk in request_iterator:
        n += len(chunk)
    return str(n).encode()


async def _up_checked(request_iterator, context) -> bytes:
    crc, digest = 0, hashlib.sha256()
    async for chunk in request_iterator:
        crc = crc32c(chunk, crc)
        digest.update(chunk)
    return f"{crc} {digest.hexdigest()}".encode()


def _blocks(request: bytes):
    size_s, chunk_s = request.decode().split()
    size, chunk = int(size_s), int(chunk_s)
    block = b"\xa5" * chunk
    while size > 0:
        piece = block if size >= chunk else block[:size]
        yield piece
        size -= len(piece)


async def _down(request: bytes, context):
    for piece in _blocks(request):
        yield piece


async def _down_checked(request: bytes, context):
    crc = 0
    for piece in _blocks(request):
        crc = crc32c(piece, crc)
        yield piece
    yield crc.to_bytes(4, "little")


async def _ping(request: bytes, context) -> bytes:
    return request


async def _store(request: bytes, context) -> bytes:
    return str(len(request)).encode()


async def _fetch(request: bytes, context) -> bytes:
    return b"\xa5" * int(request)


async def serve(addr: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Up": grpc.stream_unary_rpc_method_handler(_up, _ident, _ident),
            "UpChecked": grpc.stream_unary_rpc_method_handler(_up_checked, _ident, _ident),
            "Down": grpc.unary_stream_rpc_method_handler(_down, _ident, _ident),
            "DownChecked": grpc.unary_stream_rpc_method_handler(_down_checked, _ident, _ident),
            "Store": grpc.unary_unary_rpc_method_handler(_store, _ident, _ident),
            "Fetch": grpc.unary_unary_rpc_method_handler(_fetch, _ident, _ident),
            "Ping": grpc.unary_unary_rpc_method_handler(_ping, _ident, _ident),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    await server.start()
    await server.wait_for_termination()


def ping(addr: str) -> bool:
    with grpc.insecure_channel(addr) as ch:
        return ch.unary_unary("/bench.Raw/Ping")(b"x", timeout=1.0) == b"x"


def upload(addr: str, size: int, chunk: int, checksums: bool = False) -> float:
    """Streams `size` bytes up in `chunk` pieces (summed as a drive put is, with `checksums`); returns seconds."""
    block = b"\x5a" * chunk
    crc = 0
    with grpc.insecure_channel(addr, options=OPTIONS) as ch:
        up = ch.stream_unary("/bench.Raw/UpChecked" if checksums else "/bench.Raw/Up")
        up(iter([block[:1]]))  # connect outside the timed region

        def gen():
            nonlocal crc
            left = size
            while left > 0:
                piece = block if left >= chunk else block[:left]
                if checksums:
                    crc = crc32c(piece, crc)
                yield piece
                left -= len(piece)

        t0 = time.perf_counter()
        answer = up(gen(), timeout=3600).decode()
        dt = time.perf_counter() - t0
    got = answer.split()[0]
    if got != (str(crc) if checksums else str(size)):
        raise RuntimeError(f"raw grpc up: server answered {answer}")
    return dt


def download(addr: str, size: int, chunk: int, checksums: bool = False) -> float:
    """Streams `size` bytes down in `chunk` pieces (summed on both ends as a drive get is, with `checksums`);
    returns seconds."""
    with grpc.insecure_channel(addr, options=OPTIONS) as ch:
        down = ch.unary_stream("/bench.Raw/DownChecked" if checksums else "/bench.Raw/Down")
        for _ in down(b"1 1", timeout=10):  # connect outside the timed region
            pass
        t0 = time.perf_counter()
        n = crc = 0
        sent_crc = None
        for msg in down(f"{size} {chunk}".encode(), timeout=3600):
            if n == size and checksums:
                sent_crc = int.from_bytes(msg, "little")
                continue
            n += len(msg)
            if checksums:
                crc = crc32c(msg, crc)
        dt = time.perf_counter() - t0
    if n != size or (checksums and sent_crc != crc):
        raise RuntimeError(f"raw grpc down: got {n} bytes (CRC32C {crc}, sent {sent_crc}), expected {size}")
    return dt


class SmallCalls:
    """One channel for unary calls of small files: a put sends the bytes, a get asks for `size` of them."""

    def __init__(self, addr: str) -> None:
        self.channel = grpc.insecure_channel(addr, options=OPTIONS)
        self.store = self.channel.unary_unary("/bench.Raw/Store")
        self.fetch = self.channel.unary_unary("/bench.Raw/Fetch")
        self.store(b"x", timeout=10)  # connect outside the timed region

    def put(self, data: bytes) -> None:
        if self.store(data, timeout=60) != str(len(data)).encode():
            raise RuntimeError("raw grpc store: wrong count")

    def get(self, size: int) -> bytes:
        return self.fetch(str(size).encode(), timeout=60)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.rawgrpc serve 127.0.0.1:PORT")
