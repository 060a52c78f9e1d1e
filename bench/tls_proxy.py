"""A TLS front for a plain TCP server: `python -m bench.tls_proxy CERT KEY PORT TARGET_PORT`.

Accepts TLS on 127.0.0.1:PORT with the certificate CERT (and its key KEY)
and relays each connection's bytes to 127.0.0.1:TARGET_PORT, as stunnel
would: tests reach a valkey-server built without TLS through `rediss://`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(cert: str, key: str, port: int, target: int) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_relay(reader, upstream_writer), _relay(upstream_reader, writer))

    server = await asyncio.start_server(connected, "127.0.0.1", port, ssl=context)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    cert, key, port, target = sys.argv[1:5]
    asyncio.run(serve(cert, key, int(port), int(target)))
