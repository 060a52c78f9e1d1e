"""An HTTP proxy on loopback in front of an S3 endpoint that rewrites its ListObjectsV2 answers on the way back:
what a faulty S3-compatible server or gateway would send.

    with RewritingS3Proxy(moto_url, rewrite) as proxy:   # rewrite(query, body) -> body
        ... AWS_ENDPOINT_URL=proxy.url ...

Every request is forwarded as it came (HTTP/1.1, kept alive) but for the headers named in `drop`
(`drop=("Range",)`: a server that ignores ranges answers every GET with the whole object); the body
of each answer to a `list-type=2` GET goes through `rewrite` with the request's decoded query. moto
does not check signatures, so a request signed for the proxy's address is answered as it is.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

Rewrite = Callable[[dict[str, str], bytes], bytes]


class RewritingS3Proxy:
    def __init__(self, target: str, rewrite: Rewrite = lambda query, body: body, drop: tuple[str, ...] = ()) -> None:
        parts = urllib.parse.urlsplit(target)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        dropped = {name.lower() for name in drop}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(host, port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                    upstream.request(self.command, self.path, body, headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                if self.command == "GET" and query.get("list-type") == "2" and answer.status == 200:
                    data = rewrite(query, data)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RewritingS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
