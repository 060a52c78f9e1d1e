"""An HTTP proxy on loopback in front of an S3 endpoint that rewrites its ListObjectsV2 answers on the way back, or
loses its CompleteMultipartUpload answers: what a faulty S3-compatible server, gateway or network would send.

    with RewritingS3Proxy(moto_url, rewrite) as proxy:   # rewrite(query, body) -> body
        ... AWS_ENDPOINT_URL=proxy.url ...

Every request is forwarded as it came (HTTP/1.1, kept alive) but for the headers named in `drop`
(`drop=("Range",)`: a server that ignores ranges answers every GET with the whole object), or only for keys
containing `drop_under` (a gateway that serves some objects whole); the body
of each answer to a `list-type=2` GET goes through `rewrite` with the request's decoded query. moto
does not check signatures, so a request signed for the proxy's address is answered as it is.

`lose_completes=N`: the answers of the first N CompleteMultipartUploads that succeed are lost (the
connection closes before any byte of them), and a CompleteMultipartUpload of an upload already
completed is answered NoSuchUpload, as MinIO answers a client's retry of it (minio/minio#13318;
AWS and moto answer it as the first).

`authorizations`: the Authorization header of every request, in the order they came (which region each is signed
for).

`cut_read=hook`: the answer of the first GetObject of a key ending with `cut_key` is cut half way through its
body (the connection closes), once `hook()` has run (a test replaces the object there, before its reader asks for
the rest). Other GetObjects (a daemon's sweep reads the lists of live uploads) pass.

`slow_down=hook`: a request for which `hook(method, path)` (its HTTP method and unquoted path) is true is answered
503 SlowDown, as S3 answers when it throttles, and not forwarded (counted in `slowed_down`). `delay=(low, high)`:
every request waits that many seconds (picked at random between them) before it is forwarded, as a store slow
under pressure answers.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

Rewrite = Callable[[dict[str, str], bytes], bytes]
_NO_SUCH_UPLOAD = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchUpload</Code><Message>The specified '
                   b'multipart upload does not exist. The upload ID may be invalid, or the upload may have been '
                   b'aborted or completed.</Message></Error>')
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request '
             b'rate.</Message></Error>')


def answer_length(headers: Sequence[tuple[str, str]]) -> str:
    return next((value for name, value in headers if name.lower() == "content-length"), "0")


class RewritingS3Proxy:
    def __init__(self, target: str, rewrite: Rewrite = lambda query, body: body, drop: tuple[str, ...] = (),
                 lose_completes: int = 0, cut_read: Callable[[], object] | None = None, cut_key: str = "",
                 drop_under: str = "", slow_down: Callable[[str, str], bool] | None = None,
                 delay: tuple[float, float] = (0.0, 0.0)) -> None:
        parts = urllib.parse.urlsplit(target)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        dropped = {name.lower() for name in drop}
        completed: set[str] = set()  # the upload ids of the CompleteMultipartUploads that succeeded
        self.lost_completes = 0
        self.cut_reads = 0
        self.slowed_down = 0
        self.authorizations: list[str] = []
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                proxy.authorizations.append(self.headers.get("Authorization", ""))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                if slow_down is not None and slow_down(self.command, urllib.parse.unquote(self.path)):
                    with lock:
                        proxy.slowed_down += 1
                    self._answer(503, SLOW_DOWN, [("Content-Type", "application/xml")])
                    return
                time.sleep(random.uniform(*delay))
                if self.command == "POST" and query.get("uploadId") in completed:
                    self._answer(404, _NO_SUCH_UPLOAD, [("Content-Type", "application/xml")])
                    return
                upstream = http.client.HTTPConnection(host, port, timeout=30)
                try:
                    under = drop_under in urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                    headers = {k: v for k, v in self.headers.items() if not (under and k.lower() in dropped)}
                    upstream.request(self.command, self.path, body, headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                if self.command == "POST" and "uploadId" in query and self._completed(query["uploadId"], answer.status):
                    return
                if self.command == "GET" and query.get("list-type") == "2" and answer.status == 200:
                    data = rewrite(query, data)
                if (self.command == "GET" and not query.keys() - {"x-id"} and len(data) > 1
                        and urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).endswith(cut_key)
                        and self._cut_first()):
                    assert cut_read is not None  # _cut_first says so
                    cut_read()
                    self._answer(answer.status, data, answer.getheaders(), sent=len(data) // 2)
                    return
                self._answer(answer.status, data, answer.getheaders())

            def _cut_first(self) -> bool:
                """Whether this answer to a GetObject is the one cut (with `cut_read`, the first)."""
                with lock:
                    if cut_read is None or proxy.cut_reads:
                        return False
                    proxy.cut_reads = 1
                    return True

            def _completed(self, upload: str, status: int) -> bool:
                """Whether the answer of this CompleteMultipartUpload (of `upload`, answered `status`) is lost."""
                if status != 200:
                    return False
                with lock:
                    completed.add(upload)
                    if proxy.lost_completes == lose_completes:
                        return False
                    proxy.lost_completes += 1
                self.close_connection = True
                return True

            def _answer(self, status: int, data: bytes, headers: Sequence[tuple[str, str]] = (),
                        sent: int | None = None) -> None:
                """Answers `data`; only its first `sent` bytes, then the connection closes, when `sent` is given."""
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(name, value)
                # A HEAD's answer has no body, and the length of the object's.
                head = self.command == "HEAD"
                self.send_header("Content-Length", answer_length(headers) if head else str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data[:sent])
                if sent is not None:
                    self.close_connection = True

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
