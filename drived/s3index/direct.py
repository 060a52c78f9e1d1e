"""ListObjectsV2 pages fetched by a signed GET of our own, beside boto3.

A boto3 call costs ~2 ms of CPU in hooks, request building and response
handling, and `http.client` another ~0.3 ms a page in header parsing; a
listing makes a thousand calls per million keys. So a page is fetched with a
GET signed here (`Signer`, SigV4 as botocore's S3SigV4Auth signs it) over a
plain keep-alive socket (`Connections`, HTTP/1.1 with Content-Length or
chunked bodies). boto3 still decides what matters: the endpoint, the
addressing style and the region come from one URL it presigns, the
credentials are the client's own (refreshed as boto3 refreshes them), and TLS
is verified as the client verifies it. Any failure here makes the caller
repeat the request with boto3, which retries and raises typed errors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any

import botocore.httpsession

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_QUERY_NAMES = {"Prefix": "prefix", "MaxKeys": "max-keys", "EncodingType": "encoding-type",
                "Delimiter": "delimiter", "ContinuationToken": "continuation-token", "StartAfter": "start-after"}
_MAX_HEAD = 64 * 1024  # a status line and headers longer than this are not a listing answer
# A page of 1,000 keys of at most 1 KiB each is under 2 MiB of XML: a longer body is not a
# listing answer, and is left to boto3 rather than read into memory.
_MAX_BODY = 16 << 20


def usable(client: Any) -> bool:
    """Whether pages may be fetched directly: not through a proxy (boto3 then does every request)."""
    proxies = getattr(client.meta.config, "proxies", None)
    env = any(os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
    return not proxies and not env


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


class Signer:
    """Signed ListObjectsV2 requests for one bucket, as botocore's S3SigV4Auth signs them.

    Headers signed: host, x-amz-content-sha256 (the hash of the empty body),
    x-amz-date and, with temporary credentials, x-amz-security-token.
    """

    def __init__(self, client: Any, bucket: str) -> None:
        url = client.generate_presigned_url("list_objects_v2", Params={"Bucket": bucket}, ExpiresIn=900)
        base, _, query = url.partition("?")
        parts = urllib.parse.urlsplit(base)
        credential = urllib.parse.parse_qs(query).get("X-Amz-Credential", [""])[0].split("/")
        self.scheme = parts.scheme
        self.address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        self.host = host if parts.port in (None, {"http": 80, "https": 443}.get(parts.scheme)) \
            else f"{host}:{parts.port}"
        self.path = parts.path or "/"
        self.region = credential[2] if len(credential) == 5 else ""
        self._credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        self._keys: dict[tuple[str, str], bytes] = {}
        self.usable = bool(self.region and self._credentials is not None and parts.scheme in ("http", "https"))

    def _key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._keys = {(secret, day): key}
        return key

    def request(self, params: dict[str, Any], now: float | None = None) -> bytes:
        """The HTTP/1.1 request for ListObjectsV2 with `params` (boto3's names, Bucket left out)."""
        assert self._credentials is not None
        creds = self._credentials.get_frozen_credentials()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        pairs = sorted([(_QUERY_NAMES[name], _quote(str(value))) for name, value in params.items() if name != "Bucket"]
                       + [("list-type", "2")])
        query = "&".join(f"{name}={value}" for name, value in pairs)
        headers = [("host", self.host), ("x-amz-content-sha256", EMPTY_SHA256), ("x-amz-date", stamp)]
        if creds.token:
            headers.append(("x-amz-security-token", creds.token))
        signed = ";".join(name for name, _ in headers)
        canonical = "\n".join([
            "GET", self.path, query, "".join(f"{name}:{value.strip()}\n" for name, value in headers), signed,
            EMPTY_SHA256,
        ])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._key(creds.secret_key, day), to_sign.encode(), "sha256").hexdigest()
        lines = [f"GET {self.path}?{query} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"authorization: AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                     f"SignedHeaders={signed}, Signature={signature}")
        lines.append("accept-encoding: identity\r\n\r\n")
        return "\r\n".join(lines).encode()


class HTTPError(Exception):
    """An answer that is not HTTP/1.1 as a listing is answered."""


class _Connection:
    """One keep-alive HTTP/1.1 connection and the bytes read from it past the last answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        if len(self.buf) > _MAX_BODY:
            raise HTTPError("the answer is too long for a listing page")
        data = self.sock.recv(256 * 1024)
        if not data:
            raise ConnectionError("the S3 endpoint closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise HTTPError("header line too long")
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        with memoryview(self.buf) as view:
            data = bytes(view[:n])
        del self.buf[:n]
        return data

    def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Sends a request, reads its answer: (status, body, whether the connection stays open)."""
        self.sock.sendall(request)
        status_line = self._line()
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise HTTPError(f"not an HTTP/1 answer: {status_line[:80]!r}")
        status = int(rest[:3])
        length = -1
        chunked = False
        keep = version == b"HTTP/1.1"
        while line := self._line():
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower() == b"chunked"
            elif name == b"connection":
                keep = value.strip().lower() == b"keep-alive"
        if chunked:
            parts = []
            total = 0
            while size := int(self._line().partition(b";")[0], 16):
                total += size
                if total > _MAX_BODY:
                    raise HTTPError("the answer is too long for a listing page")
                parts.append(self._take(size))
                if self._take(2) != b"\r\n":
                    raise HTTPError("bad chunk")
            while self._line():  # trailers
                pass
            return status, b"".join(parts), keep
        if length >= 0:
            return status, self._take(length), keep
        while True:  # no length: the body ends when the connection does
            try:
                self._fill()
            except ConnectionError:
                return status, self._take(len(self.buf)), False


class Connections:
    """Keep-alive connections to one endpoint, one per thread.

    TLS is verified as the boto3 client verifies it (its `verify` setting /
    AWS_CA_BUNDLE).
    """

    def __init__(self, client: Any, scheme: str, address: tuple[str, int], timeout: float = 60.0) -> None:
        self._address = address
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            session = getattr(getattr(client, "_endpoint", None), "http_session", None)
            verify = getattr(session, "_verify", True)
            if verify is False:
                self._ssl = ssl._create_unverified_context()
            else:
                self._ssl = ssl.create_default_context(
                    cafile=verify if isinstance(verify, str) else botocore.httpsession.where())
        self._local = threading.local()

    def _connect(self) -> _Connection:
        sock = socket.create_connection(self._address, timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_hostname=self._address[0])
        return _Connection(sock)

    def get(self, request: bytes) -> tuple[int, bytes]:
        """Sends `request` on this thread's connection; (status, body) of the answer."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = self._connect()
            try:
                status, body, keep = conn.exchange(request)
            except (OSError, ValueError, HTTPError):
                conn.sock.close()
                conn = self._local.conn = None
                if attempt or fresh:
                    raise
                continue
            if not keep:
                conn.sock.close()
                self._local.conn = None
            return status, body
        raise AssertionError("unreachable")


class Direct:
    """Signed GETs of one bucket's ListObjectsV2 pages over keep-alive connections."""

    def __init__(self, client: Any, bucket: str, timeout: float = 60.0) -> None:
        self.signer = Signer(client, bucket)
        self.connections = Connections(client, self.signer.scheme, self.signer.address, timeout)

    def get(self, params: dict[str, Any]) -> tuple[int, bytes]:
        """(status, body) of ListObjectsV2 with `params` (boto3's names)."""
        return self.connections.get(self.signer.request(params))
