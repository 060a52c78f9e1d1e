"""Plain grpcio streaming: the ceiling of the transport in Python.

A generic-handler grpc.aio server (same server flavour as drived), raw bytes
as messages (no protobuf, no disk, no hashing):

- `/bench.Raw/Up`   client stream of chunks; answers the byte count.
- `/bench.Raw/Down` request: "SIZE CHUNK" as ASCII; streams SIZE bytes in CHUNK pieces.
- `/bench.Raw/Ping` unary echo, for readiness.

Run as `python -m bench.rawgrpc serve 127.0.0.1:PORT`.
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc

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


async def _down(request: bytes, context):
    size_s, chunk_s = request.decode().split()
    size, chunk = int(size_s), int(chunk_s)
    block = b"\xa5" * chunk
    while size > 0:
        if size >= chunk:
            yield block
            size -= chunk
        else:
            yield block[:size]
            size = 0


async def _ping(request: bytes, context) -> bytes:
    return request


async def serve(addr: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Up": grpc.stream_unary_rpc_method_handler(_up, _ident, _ident),
            "Down": grpc.unary_stream_rpc_method_handler(_down, _ident, _ident),
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


def upload(addr: str, size: int, chunk: int) -> float:
    """Streams `size` bytes up in `chunk` pieces; returns seconds."""
    block = b"\x5a" * chunk
    with grpc.insecure_channel(addr, options=OPTIONS) as ch:
        up = ch.stream_unary("/bench.Raw/Up")
        up(iter([block[:1]]))  # connect outside the timed region

        def gen():
            left = size
            while left > 0:
                if left >= chunk:
                    yield block
                    left -= chunk
                else:
                    yield block[:left]
                    left = 0

        t0 = time.perf_counter()
        n = int(up(gen(), timeout=3600))
        dt = time.perf_counter() - t0
    if n != size:
        raise RuntimeError(f"raw grpc up: server counted {n} bytes, sent {size}")
    return dt


def download(addr: str, size: int, chunk: int) -> float:
    """Streams `size` bytes down in `chunk` pieces; returns seconds."""
    with grpc.insecure_channel(addr, options=OPTIONS) as ch:
        down = ch.unary_stream("/bench.Raw/Down")
        for _ in down(b"1 1", timeout=10):  # connect outside the timed region
            pass
        t0 = time.perf_counter()
        n = 0
        for msg in down(f"{size} {chunk}".encode(), timeout=3600):
            n += len(msg)
        dt = time.perf_counter() - t0
    if n != size:
        raise RuntimeError(f"raw grpc down: got {n} bytes, expected {size}")
    return dt


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.rawgrpc serve 127.0.0.1:PORT")
