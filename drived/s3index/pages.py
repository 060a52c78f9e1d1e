"""ListObjectsV2 answers read into the index's columns.

A page of 1000 keys is ~200 KB of XML. One regular expression (`_ROW`) reads
every <Contents> element's Key, LastModified, ETag and Size in a single
C-level scan; everything after that works on whole columns: the keys need
decoding only when the page holds a '%', '+' or '&', the stamps are used as
they are when their joined bytes have the canonical shape, the ETags lose
their quotes in one `translate`, and the sizes are read by one JSON parse.
There is no per-key Python work beyond the field objects the scan creates.
A page of any other shape (elements missing, in another order, or apart) is
read with ElementTree instead: slower, and exact.
"""

from __future__ import annotations

import html
import json
import operator
import re
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .index import STAMP_WIDTH, Run, canonical_stamp

# One match per <Contents>, as S3, MinIO and moto write it: Key, LastModified, ETag, the
# checksum elements S3 adds for newer objects (ChecksumAlgorithm, ChecksumType), Size, then
# what the index does not keep (Owner, StorageClass, RestoreStatus). Spelled out, with no
# whitespace between elements: a generic "any element" or `\s*` between them makes the scan
# up to 40 % slower, and a page written another way is read by ElementTree.
_ROW = re.compile(
    rb"<Contents><Key>([^<]*)</Key><LastModified>([^<]*)</LastModified><ETag>([^<]*)</ETag>"
    rb"(?:<Checksum[A-Za-z]*>[^<]*</Checksum[A-Za-z]*>)*<Size>([0-9]+)</Size>"
)
_LAST = operator.itemgetter(-1)
_PREFIX = re.compile(rb"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>")
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")
_TRUNCATED = re.compile(rb"<IsTruncated>\s*true\s*</IsTruncated>")
_URL = re.compile(rb"<EncodingType>\s*url\s*</EncodingType>")


@dataclass
class ListingStats:
    """Counters shared by every listing of one owner (thread-safe increments). Here, beside the pages, not in
    `lister`: `S3Mounts` holds them from the daemon's start, and `lister` loads boto3, which only a mount needs."""

    requests: int = 0  # ListObjectsV2 calls made
    runs: int = 0  # listings started
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, runs: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.runs += runs


class BadPage(ValueError):
    """A ListObjectsV2 answer that cannot be right: a listing cannot go on from it."""


def _token(truncated: bool, token: str | None) -> str | None:
    """The token to list the next page with; None when the page is the last."""
    if truncated and not token:
        raise BadPage("a page says more keys follow (IsTruncated) but gives no NextContinuationToken to list them with")
    return token if truncated else None


@dataclass(slots=True)
class Page:
    """One parsed ListObjectsV2 answer; keys and prefixes relative to the mounted prefix.

    Object i is keys[i]; it and its size, stamp and ETag are also the i-th of
    the columns beside them, which `run` cuts into index runs.
    """

    keys: Sequence[bytes]
    key_blob: bytes  # the keys, joined
    key_lens: array  # array('I')
    lasts: bytes  # each key's last byte (0 for an empty key): b'/' marks a folder marker
    sizes: array  # array('q')
    stamps: bytes  # canonical LastModified stamps, STAMP_WIDTH bytes each
    etags: bytes  # without quotes, joined
    etag_lens: array  # array('I')
    etag_width: int  # the common length of every ETag, 0 if they differ
    prefixes: list[bytes]
    token: str | None  # the continuation token when truncated

    def run(self, start: int, stop: int) -> Run:
        """Objects start..stop-1 (at least one) as an index run."""
        klens, elens, width = self.key_lens, self.etag_lens, self.etag_width
        k0 = sum(klens[:start])
        k1 = k0 + sum(klens[start:stop])
        e0 = start * width if width else sum(elens[:start])
        e1 = stop * width if width else e0 + sum(elens[start:stop])
        return Run(
            first=self.keys[start],
            last=self.keys[stop - 1],
            keys=self.key_blob[k0:k1],
            key_lens=klens[start:stop],
            sizes=self.sizes[start:stop],
            stamps=self.stamps[start * STAMP_WIDTH : stop * STAMP_WIDTH],
            etags=self.etags[e0:e1],
            etag_lens=elens[start:stop],
            etag_width=width,
            markers=self.lasts[start:stop].count(b"/"),
        )


def _lasts(keys: Sequence[bytes]) -> bytes:
    """Each key's last byte; keys are sorted and distinct, so only the first can be empty."""
    if keys and not keys[0]:
        return b"\0" + bytes(map(_LAST, keys[1:]))
    return bytes(map(_LAST, keys))


def parse_page(body: bytes, plen: int) -> Page:
    """Parses a ListObjectsV2 XML answer; `plen` is the UTF-8 length of the mounted prefix."""
    # split, not findall: a flat list (text between rows, then each row's four fields) holds
    # no tuple per row, so a page allocates nothing the garbage collector tracks.
    parts = _ROW.split(body)
    rest = b"".join(parts[::5])  # everything outside the rows: the head, the tails of rows
    if b"<Contents>" in rest:  # a row of another shape
        return _parse_page_etree(body, plen, _URL.search(body) is not None)
    url = _URL.search(rest) is not None
    match = _TOKEN.search(rest)
    token = _token(_TRUNCATED.search(rest) is not None, html.unescape(match.group(1).decode()) if match else None)
    etags, etag_lens, etag_width = _etag_column(parts[3::5])
    keys = _decode_all(parts[1::5], url, plen)
    return Page(
        keys=keys,
        key_blob=b"".join(keys),
        key_lens=array("I", map(len, keys)),
        lasts=_lasts(keys),
        sizes=_sizes(parts[4::5]),
        stamps=_stamp_column(parts[2::5]),
        etags=etags,
        etag_lens=etag_lens,
        etag_width=etag_width,
        prefixes=list(_decode_all(_PREFIX.findall(rest), url, plen)) if b"<CommonPrefixes>" in rest else [],
        token=token,
    )


def page_from_lists(keys: Sequence[bytes], sizes: Iterable[int], stamps: list[bytes], etags: list[bytes],
                    prefixes: list[bytes], token: str | None) -> Page:
    """A page from per-object lists (stamps canonical, ETags without quotes)."""
    lens = array("I", map(len, etags))
    return Page(keys, b"".join(keys), array("I", map(len, keys)), _lasts(keys), array("q", sizes), b"".join(stamps),
                b"".join(etags), lens, _width(lens), prefixes, token)


def page_from_parsed(answer: dict[str, Any], plen: int) -> Page:
    """A page from an answer botocore parsed itself (a client without the raw-body hook)."""
    contents = answer.get("Contents", [])
    return page_from_lists(
        [c["Key"].encode("utf-8")[plen:] for c in contents],
        [int(c.get("Size", 0)) for c in contents],
        [canonical_stamp(c["LastModified"].isoformat()) for c in contents],
        [str(c.get("ETag", "")).strip('"').encode() for c in contents],
        [p["Prefix"].encode("utf-8")[plen:] for p in answer.get("CommonPrefixes", [])],
        _token(bool(answer.get("IsTruncated")), answer.get("NextContinuationToken")),
    )


def _special(text: bytes) -> bool:
    """Whether text holds URL or XML escapes (three `in` scans beat one regex 50x)."""
    return b"%" in text or b"+" in text or b"&" in text


def _decode(raw: bytes, url: bool) -> bytes:
    if b"&" in raw:
        raw = html.unescape(raw.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    if url:
        raw = urllib.parse.unquote_to_bytes(raw.replace(b"+", b" "))
    return raw


def _decode_all(raw: Sequence[bytes], url: bool, plen: int) -> Sequence[bytes]:
    """Decoded keys, relative to the prefix (`plen` bytes long)."""
    if not _special(b"".join(raw)):
        return [k[plen:] for k in raw] if plen else raw
    return [_decode(k, url)[plen:] for k in raw]


def _sizes(raw: Sequence[bytes]) -> array:
    """Size texts as array('q'): one JSON parse of them all reads 1000 in a fraction of 1000 int() calls."""
    try:
        return array("q", json.loads(b"[" + b",".join(raw) + b"]"))
    except ValueError:  # a leading zero is not JSON
        return array("q", map(int, raw))


def _etag_column(raw: Sequence[bytes]) -> tuple[bytes, array, int]:
    """ETag texts without their quotes (`&quot;abc&quot;` or `"abc"` -> `abc`), joined; their
    lengths; and their common length (0 if they differ)."""
    n = len(raw)
    joined = b"".join(raw)
    quote = b"&quot;" if b"&" in joined else b'"'
    trim = 2 * len(quote)
    # Deleting the quotes' characters is 4x faster than replacing the quotes, and exact when
    # no other character went (hex digits and '-' are none of them); else each ETag is read.
    stripped = joined.translate(None, quote)
    if joined.count(quote) != 2 * n or len(stripped) != len(joined) - trim * n:
        etags = [html.unescape(e.decode("utf-8", "replace")).strip('"').encode() for e in raw]
        lens = array("I", map(len, etags))
        return b"".join(etags), lens, _width(lens)
    lens = array("I", map(len, raw))
    width = _width(lens)
    if width:
        return stripped, array("I", [width - trim]) * n, width - trim
    return stripped, array("I", [length - trim for length in lens]), 0


def _width(lens: array) -> int:
    """The common value of `lens`, 0 if they differ."""
    return lens[0] if lens and lens.count(lens[0]) == len(lens) else 0


def _stamp_column(raw: Sequence[bytes]) -> bytes:
    """LastModified texts as canonical stamps, joined (S3 already writes them so)."""
    joined = b"".join(raw)
    n = len(raw)
    # Each in its place: stamps of other lengths (`.12Z`, `.1234Z`) may add up to n canonical ones.
    if len(joined) == STAMP_WIDTH * n and joined[10::STAMP_WIDTH] == b"T" * n \
            and joined[19::STAMP_WIDTH] == b"." * n and joined[23::STAMP_WIDTH] == b"Z" * n:
        return joined
    return b"".join(canonical_stamp(s.decode("ascii", "replace")) for s in raw)


def _parse_page_etree(body: bytes, plen: int, url: bool) -> Page:
    root = ET.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""

    def text(el: ET.Element | None, name: str) -> str:
        found = el.find(ns + name) if el is not None else None
        return (found.text or "") if found is not None else ""

    def dec(s: str) -> bytes:
        b = s.encode("utf-8")
        return (urllib.parse.unquote_to_bytes(b.replace(b"+", b" ")) if url else b)[plen:]

    contents = list(root.iter(ns + "Contents"))
    return page_from_lists(
        [dec(text(c, "Key")) for c in contents],
        [int(text(c, "Size") or 0) for c in contents],
        [canonical_stamp(text(c, "LastModified")) for c in contents],
        [text(c, "ETag").strip('"').encode() for c in contents],
        [dec(text(p, "Prefix")) for p in root.iter(ns + "CommonPrefixes")],
        _token(text(root, "IsTruncated").strip().lower() == "true", text(root, "NextContinuationToken") or None),
    )

