"""A fast, local, ListObjectsV2-only S3 endpoint over a synthetic key space.

moto answers one ListObjectsV2 page in ~370 ms once a bucket holds 100k keys,
so it cannot serve a 1M-key listing benchmark. This server answers only
`GET /BUCKET?list-type=2...` (path-style, any credentials accepted) over the
sorted keys `dIII/dJJJ/fKKK.bin` (keys_per_level ** 3 of them), with
`prefix`, `delimiter`, `max-keys` (capped at 1000, as S3 does),
`continuation-token`, `start-after` and `encoding-type=url`, answering the
same XML S3 does, in chunks (`Transfer-Encoding: chunked`) as S3 often sends
it. Every lookup is a bisect into the precomputed sorted key
list, so a page costs O(page + log n): listing is never this server's
bottleneck.

    python bench/s3_listing_server.py --port 9000 --keys-per-level 100
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 aws s3 ls s3://bench/d000/d000/

Other buckets answer NoSuchBucket (404); other requests answer 501.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import re
import threading
import time
import urllib.parse
import urllib.request
from array import array
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

BUCKET = "bench"
MAX_KEYS = 1000
_CHUNK = 64 * 1024  # bytes per chunk of a chunked answer
_MTIME_BASE = 1_700_000_000  # 2023-11-14T22:13:20Z
_MASK128 = (1 << 128) - 1
_PLAIN = re.compile(r"[A-Za-z0-9/._-]*")


def synthetic_keys(keys_per_level: int) -> list[str]:
    """The sorted key space: keys_per_level ** 3 keys like `d000/d000/f000.bin`."""
    n = keys_per_level
    return [f"d{i:03d}/d{j:03d}/f{k:03d}.bin" for i in range(n) for j in range(n) for k in range(n)]


def _upper(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class KeySpace:
    """The sorted keys, and ListObjectsV2 answered over them by bisection."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        # Object i was written at second i // 1000, millisecond i % 1000: realistic, distinct
        # stamps without a strftime per key.
        self._seconds = [
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(_MTIME_BASE + s)) for s in range(len(keys) // 1000 + 1)
        ]
        # Each object's <Contents> element is rendered once, as S3 keeps its listing rows
        # stored: a page of a flat listing is then one slice of `_rows`, and serving it costs
        # this process (which shares the machine with the lister under test) no per-key work.
        # Keys need no escaping, so a row reads the same with and without encoding-type=url.
        if _PLAIN.fullmatch("".join(keys)) is None:
            raise ValueError("KeySpace serves keys of [A-Za-z0-9/._-] only")
        self._rows, self._row_off = self._render(keys)

    def _render(self, keys: list[str]) -> tuple[bytearray, array]:
        rows = bytearray()  # grown in place: ~200 bytes a key, never held twice
        offsets = array("q", [0])
        for i, key in enumerate(keys):
            stamp = f"{self._seconds[i // 1000]}.{i % 1000:03d}Z"
            etag = f"{(i * 0x9E3779B97F4A7C15F39CC0605CEDC835 + 0x5DEECE66D) & _MASK128:032x}"
            rows += (
                f"<Contents><Key>{key}</Key><LastModified>{stamp}</LastModified>"
                f"<ETag>&quot;{etag}&quot;</ETag><Size>{1000 + i % 4096}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>".encode()
            )
            offsets.append(len(rows))
        return rows, offsets

    def _contents(self, start: int, stop: int) -> bytearray:
        """The <Contents> elements of keys[start:stop]."""
        return self._rows[self._row_off[start] : self._row_off[stop]]

    def list_v2(self, params: dict[str, str]) -> bytes:
        keys = self.keys
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        try:
            max_keys = min(MAX_KEYS, max(0, int(params.get("max-keys", MAX_KEYS))))
        except ValueError:
            max_keys = MAX_KEYS
        start_after = params.get("start-after", "")
        token = params.get("continuation-token", "")
        url = params.get("encoding-type", "") == "url"

        def enc(s: str) -> str:
            return escape(urllib.parse.quote(s, safe="/") if url else s)

        pos = bisect.bisect_left(keys, prefix)
        if start_after:
            pos = max(pos, bisect.bisect_right(keys, start_after))
        if token:
            kind, _, after = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
            pos = max(
                pos,
                bisect.bisect_left(keys, _upper(after)) if kind == "P" else bisect.bisect_right(keys, after),
            )
        end = bisect.bisect_left(keys, _upper(prefix)) if prefix else len(keys)

        contents: list[bytearray] = []
        prefixes: list[str] = []
        last = ""
        count = 0
        plen = len(prefix)
        if not delimiter:  # a run of consecutive keys
            stop = max(pos, min(end, pos + max_keys))
            if stop > pos:
                contents.append(self._contents(pos, stop))
                last = "K:" + keys[stop - 1]
            count, pos = stop - pos, stop
        while pos < end and count < max_keys:
            key = keys[pos]
            cut = key.find(delimiter, plen)
            if cut >= 0:
                cp = key[: cut + len(delimiter)]
                prefixes.append(f"<CommonPrefixes><Prefix>{enc(cp)}</Prefix></CommonPrefixes>")
                last = "P:" + cp
                pos = bisect.bisect_left(keys, _upper(cp), pos, end)
            else:
                contents.append(self._contents(pos, pos + 1))
                last = "K:" + key
                pos += 1
            count += 1
        truncated = pos < end
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{BUCKET}</Name><Prefix>{enc(prefix)}</Prefix>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if start_after:
            parts.append(f"<StartAfter>{enc(start_after)}</StartAfter>")
        if token:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if url:
            parts.append("<EncodingType>url</EncodingType>")
        parts.append(f"<MaxKeys>{max_keys}</MaxKeys><KeyCount>{count}</KeyCount>")
        parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if truncated:
            nxt = base64.urlsafe_b64encode(last.encode()).decode()
            parts.append(f"<NextContinuationToken>{nxt}</NextContinuationToken>")
        return "".join(parts).encode() + b"".join(contents) + "".join(prefixes).encode() + b"</ListBucketResult>"


def _error(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>0</RequestId></Error>"
    ).encode()


def make_server(host: str, port: int, space: KeySpace) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, chunked: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            if chunked:
                # As S3 often answers a listing: in chunks, without a Content-Length.
                self.send_header("Transfer-Encoding", "chunked")
                body = b"".join(
                    b"%x\r\n%s\r\n" % (len(piece), piece)
                    for piece in (body[i : i + _CHUNK] for i in range(0, len(body), _CHUNK))
                ) + b"0\r\n\r\n"
            else:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amz-request-id", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            bucket = urllib.parse.unquote(path.strip("/"))
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            if bucket != BUCKET:
                self._send(404, _error("NoSuchBucket", "The specified bucket does not exist", bucket))
            elif params.get("list-type") == "2":
                self._send(200, space.list_v2(params), chunked=True)
            else:
                self._send(501, _error("NotImplemented", "only ListObjectsV2 is served", self.path))

        def do_HEAD(self) -> None:
            path = self.path.partition("?")[0].strip("/")
            self._send(200 if path == BUCKET else 404, b"")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    return Server((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--keys-per-level", type=int, default=100)
    args = ap.parse_args(argv)
    space = KeySpace(synthetic_keys(args.keys_per_level))
    server = make_server(args.host, args.port, space)
    threading.current_thread().name = "s3-listing-server"
    print(f"serving {len(space.keys)} keys in s3://{BUCKET}/ at http://{args.host}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
