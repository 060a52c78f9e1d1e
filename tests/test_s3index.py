"""The S3 index subsystem (drived.s3index) against a real moto_server process.

Covers: paginated parallel listing (2,500+ keys, small pages), nested folders,
folder markers, unicode / space / '+' / '%' / '&' keys, keys outside the
prefix, 32 MiB ranged streaming with sha256, resume from an offset, stale
objects, missing bucket, a stopped endpoint, re-mounts, single-flight mounts
and reads served from the old index during a re-index. The index's ordering
and paging rules are also checked against a brute-force model.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from crc32c import crc32c
from moto_server import aws_env, closed_port, moto_env, running_moto  # noqa: F401  (moto_env is a fixture)
from rewriting_s3_proxy import RewritingS3Proxy

from bench.s3_listing_server import BUCKET as LISTING_BUCKET
from bench.s3_listing_server import synthetic_keys
from bench.services import S3ListingServer
from drive_client.errors import DriveError, InvalidArgument, NotFound, PermissionDenied, StaleIndexError, Unavailable
from drive_client.uri import normalize_path
from drived.checksums import RunningCrc32c
from drived.s3index import S3Entry, S3Index, S3Mounts, direct, pages, reader
from drived.s3index.index import _is_path, canonical_stamp, make_run
from drived.s3index.lister import Lister, build_index, make_client, make_listing_client, map_error
from drived.s3index.pages import parse_page
from drived.s3index.reader import read_object

pytestmark = pytest.mark.integration  # starts moto_server endpoints of its own

BUCKET = "drv-index-test"
PREFIX = "data/"
MANY = 1100  # at 100 keys a page: 11 pages for that folder alone
MIB = 1024 * 1024
BIG = b"".join(hashlib.sha256(str(i).encode()).digest() * 1024 for i in range(32 * MIB // (32 * 1024)))
assert len(BIG) == 32 * MIB

SPECIAL = {
    "unicodé/naïve 文件.txt": b"unicode",
    "with space/a b.txt": b"space",
    "odd/a+b%20c&d=e.txt": b"odd",
    "odd/100% sure?.txt": b"percent",
}
FILES = {
    "a/top.txt": b"top",
    "a/b/c/deep.txt": b"deep" * 10,
    "x.txt": b"x dot txt",
    "x/inner.txt": b"inner",
    "x-y/z.txt": b"xy",
    "big.bin": BIG,
    **SPECIAL,
    **{f"many/k{i:05d}.bin": f"{i}".encode() for i in range(MANY)},
}
MARKERS = ["empty/", "a/marker/", "a/b/"]  # folder markers (a/b/ also has keys beneath)
OUTSIDE = ["datax/outside.txt", "other/outside.txt", "data"]  # keys that must stay invisible


def _s3() -> Any:
    return boto3.client("s3")


def _put_all(bucket: str, objects: dict[str, bytes]) -> None:
    s3 = _s3()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


@pytest.fixture(scope="module")
def bucket(moto_env: str) -> str:  # noqa: F811
    s3 = _s3()
    s3.create_bucket(Bucket=BUCKET)
    objects = {PREFIX + k: v for k, v in FILES.items()}
    objects.update({PREFIX + m: b"" for m in MARKERS})
    objects.update({k: b"outside" for k in OUTSIDE})
    _put_all(BUCKET, objects)
    return BUCKET


@pytest.fixture
async def mounts() -> Any:
    m = S3Mounts(concurrency=4, page_size=100)
    yield m
    await m.close()


async def _read(bucket: str, key: str, entry: S3Entry, offset: int = 0, limit: int = 0,
                chunk_size: int = MIB) -> tuple[bytes, int]:
    out = bytearray()
    biggest = 0
    summed, expected = RunningCrc32c(), 0
    async for chunk in read_object(bucket, key, etag=entry.etag, size=entry.size, offset=offset,
                                   limit=limit, chunk_size=chunk_size, summed=summed):
        biggest = max(biggest, len(chunk))
        out += chunk
        expected = crc32c(chunk, expected)
        assert summed.crc32c == expected  # summed as read, up to the chunk just yielded
    return bytes(out), biggest


def _all(index: S3Index, path: str, recursive: bool, page: int) -> list[S3Entry]:
    """Every entry, fetched `page` at a time through start_after."""
    out: list[S3Entry] = []
    after = ""
    while True:
        entries, more = index.list(path, recursive, after, page)
        out += entries
        if not more:
            return out
        assert entries, "more=True with an empty page"
        after = entries[-1].path


# -- listing ------------------------------------------------------------------------------


async def test_mount_paginates_and_indexes_every_key(bucket: str, mounts: S3Mounts) -> None:
    objects, seconds = await mounts.mount(bucket, PREFIX)
    assert objects == len(FILES)  # markers are not objects; outside keys are not counted
    assert seconds > 0
    # MANY keys under one folder at 100 keys a page: a request for each page of that folder.
    assert mounts.stats.requests >= MANY // 100
    index = await mounts.index(bucket, PREFIX)
    many = _all(index, "many", False, 0)
    assert [e.path for e in many] == [f"many/k{i:05d}.bin" for i in range(MANY)]
    assert all(not e.folder and e.size == len(str(i)) for i, e in enumerate(many))
    # Paging with start_after gives the same answer.
    assert _all(index, "many", False, 77) == many
    files = _all(index, "", True, 0)
    assert [e.path for e in files] == sorted(FILES)
    assert _all(index, "", True, 333) == files


async def test_nested_folders_and_markers(bucket: str, mounts: S3Mounts) -> None:
    index = await mounts.index(bucket, PREFIX)
    root, more = index.list("", False, "", 1000)
    assert not more
    assert [(e.path, e.folder) for e in root] == [
        ("a", True), ("big.bin", False), ("empty", True), ("many", True), ("odd", True),
        ("unicodé", True), ("with space", True), ("x", True), ("x-y", True), ("x.txt", False),
    ]
    assert [e.path for e in root] == sorted(e.path for e in root)  # path order: 'x' < 'x-y' < 'x.txt'
    a, _ = index.list("a", False, "", 10)
    assert [(e.path, e.folder) for e in a] == [("a/b", True), ("a/marker", True), ("a/top.txt", False)]
    assert index.list("empty", False, "", 10) == ([], False)
    assert index.list("a/marker", False, "", 10) == ([], False)
    assert [e.path for e in index.list("a/b", False, "", 10)[0]] == ["a/b/c"]
    assert index.stat("empty") == S3Entry("empty", 0, "", 0, True)
    assert index.stat("a/b/c") is not None and index.stat("a/b/c").folder  # type: ignore[union-attr]
    deep = index.stat("a/b/c/deep.txt")
    assert deep is not None and not deep.folder and deep.size == 40
    assert deep.etag == hashlib.md5(b"deep" * 10).hexdigest()
    assert deep.mtime_ns > 1_600_000_000 * 10**9
    assert index.stat("a/b/c/nope") is None
    assert index.stat("a/top") is None
    # limit and more
    first, more = index.list("", False, "", 3)
    assert [e.path for e in first] == ["a", "big.bin", "empty"] and more
    rest, more = index.list("", False, "empty", 100)
    assert [e.path for e in rest] == [e.path for e in root[3:]] and not more


async def test_special_keys(bucket: str, mounts: S3Mounts) -> None:
    index = await mounts.index(bucket, PREFIX)
    for path, body in SPECIAL.items():
        entry = index.stat(path)
        assert entry is not None, path
        assert entry.size == len(body) and entry.etag == hashlib.md5(body).hexdigest()
        data, _ = await _read(bucket, PREFIX + path, entry)
        assert data == body
    odd, _ = index.list("odd", False, "", 10)
    assert [e.path for e in odd] == sorted(["odd/a+b%20c&d=e.txt", "odd/100% sure?.txt"])
    assert [e.path for e in index.list("unicodé", False, "", 10)[0]] == ["unicodé/naïve 文件.txt"]


async def test_keys_outside_the_prefix_are_invisible(bucket: str, mounts: S3Mounts) -> None:
    index = await mounts.index(bucket, PREFIX)
    everything = _all(index, "", True, 0)
    assert not [e for e in everything if "outside" in e.path]
    assert index.stat("datax") is None and index.stat("other") is None
    # They exist: the whole bucket sees them.
    whole = await mounts.index(bucket, "")
    assert whole.objects == len(FILES) + len(OUTSIDE)
    assert whole.stat("datax/outside.txt") is not None
    assert whole.stat("data") is not None and not whole.stat("data").folder  # type: ignore[union-attr]


@pytest.mark.slow
async def test_prefix_needing_encoding_and_the_boto3_path(bucket: str) -> None:
    for prefix, files in ((PREFIX + "unicodé/", ["naïve 文件.txt"]), (PREFIX + "with space/", ["a b.txt"]),
                          (PREFIX + "odd/", ["100% sure?.txt", "a+b%20c&d=e.txt"])):
        index, _ = await asyncio.to_thread(build_index, make_listing_client(), bucket, prefix, page_size=1)
        assert [e.path for e in _all(index, "", True, 0)] == files
    # Without the direct GETs every page goes through boto3 (the hook hands back the raw XML).
    slow, result = await asyncio.to_thread(build_index, make_listing_client(), bucket, PREFIX,
                                           page_size=100, fast=False)
    fast, _ = await asyncio.to_thread(build_index, make_listing_client(), bucket, PREFIX, page_size=100)
    assert result.requests >= MANY // 100
    assert _all(slow, "", True, 0) == _all(fast, "", True, 0)
    assert len(_all(slow, "", True, 0)) == len(FILES)


# -- reading ------------------------------------------------------------------------------


async def test_big_object_streams_in_bounded_chunks(bucket: str, mounts: S3Mounts) -> None:
    index = await mounts.index(bucket, PREFIX)
    entry = index.stat("big.bin")
    assert entry is not None and entry.size == len(BIG)
    data, biggest = await _read(bucket, PREFIX + "big.bin", entry, chunk_size=MIB)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(BIG).hexdigest()
    assert biggest <= MIB


async def test_ranged_resume(bucket: str, mounts: S3Mounts) -> None:
    index = await mounts.index(bucket, PREFIX)
    entry = index.stat("big.bin")
    assert entry is not None
    offset = 10 * MIB + 12345
    tail, _ = await _read(bucket, PREFIX + "big.bin", entry, offset=offset, chunk_size=3 * MIB)
    assert tail == BIG[offset:]
    part, _ = await _read(bucket, PREFIX + "big.bin", entry, offset=offset, limit=777_777, chunk_size=65536)
    assert part == BIG[offset : offset + 777_777]
    end, _ = await _read(bucket, PREFIX + "big.bin", entry, offset=len(BIG))
    assert end == b""
    with pytest.raises(InvalidArgument):
        await _read(bucket, PREFIX + "big.bin", entry, offset=len(BIG) + 1)


async def test_reads_span_several_ranged_gets(bucket: str, mounts: S3Mounts,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "WINDOW", 5 * MIB)  # 32 MiB in 7 ranged GETs, each If-Match
    entry = (await mounts.index(bucket, PREFIX)).stat("big.bin")
    assert entry is not None
    data, biggest = await _read(bucket, PREFIX + "big.bin", entry, offset=3, chunk_size=MIB + 1)
    assert data == BIG[3:] and biggest <= MIB + 1


async def test_changed_object_is_stale(moto_env: str) -> None:  # noqa: F811
    s3 = _s3()
    s3.create_bucket(Bucket="drv-stale")
    s3.put_object(Bucket="drv-stale", Key="f.bin", Body=b"version one")
    s3.put_object(Bucket="drv-stale", Key="g.bin", Body=b"A" * 100)
    m = S3Mounts(page_size=10)
    try:
        index = await m.index("drv-stale", "")
        f, g = index.stat("f.bin"), index.stat("g.bin")
        assert f is not None and g is not None
        s3.put_object(Bucket="drv-stale", Key="f.bin", Body=b"version two, longer")
        s3.put_object(Bucket="drv-stale", Key="g.bin", Body=b"B" * 100)  # same size, other ETag
        for key, entry in (("f.bin", f), ("g.bin", g)):
            got: list[bytes] = []
            with pytest.raises(StaleIndexError, match="re-mount"):
                async for chunk in read_object("drv-stale", key, etag=entry.etag, size=entry.size,
                                               offset=0, limit=0, chunk_size=4, summed=RunningCrc32c()):
                    got.append(chunk)
            assert got == []  # not one byte of the other version
        s3.delete_object(Bucket="drv-stale", Key="f.bin")
        with pytest.raises(StaleIndexError):
            await _read("drv-stale", "f.bin", f)
        # After a re-mount the new version reads fine.
        await m.mount("drv-stale", "")
        g2 = (await m.index("drv-stale", "")).stat("g.bin")
        assert g2 is not None and (await _read("drv-stale", "g.bin", g2))[0] == b"B" * 100
        assert (await m.index("drv-stale", "")).stat("f.bin") is None
    finally:
        await m.close()


async def test_stamps_of_several_lengths_are_read_each_as_written(moto_env: str) -> None:  # noqa: F811
    """LastModified stamps written with as many fraction digits as they need (Go's RFC 3339 with nanoseconds
    writes `.12Z` for 120 ms and `.1234Z` for 123.4 ms), whose lengths add up to those of canonical ones: each
    object's modification time is its own (they were read as one column cut every 24 bytes: 0 and 12 ms off)."""
    s3 = _s3()
    s3.create_bucket(Bucket="drv-stamps")
    _put_all("drv-stamps", {f"k{i}": b"x" for i in range(4)})
    fractions = [b".12Z", b".1234Z"]

    def nano(query: dict[str, str], body: bytes) -> bytes:
        rows = iter(range(1 << 20))
        return re.sub(rb"(<LastModified>[^<.]*)\.\d+Z<", lambda m: m.group(1) + fractions[next(rows) % 2] + b"<", body)

    with RewritingS3Proxy(moto_env, nano) as proxy, aws_env(proxy.url):
        index, _ = await asyncio.to_thread(build_index, make_listing_client(), "drv-stamps", "")
    for i in range(4):
        listed = s3.head_object(Bucket="drv-stamps", Key=f"k{i}")["LastModified"]
        entry = index.stat(f"k{i}")
        assert entry is not None
        assert entry.mtime_ns == int(listed.timestamp()) * 1_000_000_000 + (120 if i % 2 == 0 else 123) * 1_000_000


async def test_an_endpoint_that_ignores_ranges_is_refused_not_read_from_its_start(
        moto_env: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """An endpoint that answers a ranged GET with the whole object (as HTTP allows, and as some gateways and
    caches do) fails a read from an offset with an error saying so: never the object's first bytes served as
    those at the offset (a resumed get, a window past the first, a block of a big file's parallel ranges)."""
    monkeypatch.setattr(reader, "WINDOW", 256)  # 1 KiB in four ranged GETs
    s3 = _s3()
    s3.create_bucket(Bucket="drv-ranges")
    body = bytes(range(256)) * 4
    s3.put_object(Bucket="drv-ranges", Key="f.bin", Body=body)
    entry = S3Entry("f.bin", len(body), hashlib.md5(body).hexdigest(), 0, False)
    with RewritingS3Proxy(moto_env, drop=("Range",)) as proxy, aws_env(proxy.url):
        assert (await _read("drv-ranges", "f.bin", entry, limit=200, chunk_size=64))[0] == body[:200]
        for offset, served in ((100, 0), (0, 256)):  # refused at once; after the first window
            got = bytearray()
            with pytest.raises(DriveError, match="ignores the Range") as refused:
                async for chunk in read_object("drv-ranges", "f.bin", etag=entry.etag, size=entry.size,
                                               offset=offset, limit=0, chunk_size=64, summed=RunningCrc32c()):
                    got += chunk
            assert proxy.url in str(refused.value) and "s3://drv-ranges/f.bin" in str(refused.value)
            assert bytes(got) == body[offset : offset + served]
    assert s3.get_object(Bucket="drv-ranges", Key="f.bin")["Body"].read() == body


# -- errors -------------------------------------------------------------------------------


def _without_tokens(query: dict[str, str], body: bytes) -> bytes:
    """A page that says more keys follow and gives no token to list them with (an endpoint that ignores
    list-type=2 answers so: ListObjects v1 has no NextContinuationToken)."""
    return re.sub(rb"<NextContinuationToken>[^<]*</NextContinuationToken>", b"", body)


def _out_of_order(query: dict[str, str], body: bytes) -> bytes:
    """A page whose keys come in another order than S3's (UTF-8 bytes), as an endpoint sorting otherwise sends."""
    rows = re.findall(rb"<Contents>.*?</Contents>", body, re.S)
    if not rows:
        return body
    start, end = body.index(rows[0]), body.index(rows[-1]) + len(rows[-1])
    return body[:start] + b"".join(reversed(rows)) + body[end:]


def _stuck(query: dict[str, str], body: bytes) -> bytes:
    """A page that gives back the token it was asked with: the next page is this one again, forever."""
    sent = query.get("continuation-token")
    if not sent:
        return body
    return re.sub(rb"<NextContinuationToken>[^<]*</", b"<NextContinuationToken>%s</" % sent.encode(), body)


@pytest.mark.parametrize(("rewrite", "why"), [
    (_without_tokens, "no NextContinuationToken"), (_out_of_order, "out of S3's order"),
    (_stuck, "the continuation token it was asked with"),
])
async def test_a_listing_that_cannot_be_right_is_refused(moto_env: str, rewrite: Any, why: str) -> None:  # noqa: F811
    """A listing answer that cannot be right fails the mount with an error naming the location and the
    endpoint: never an index of part of the location, or one out of order, served as if complete."""
    s3 = _s3()
    s3.create_bucket(Bucket="drv-lies")
    objects = {f"d/k{i:02d}": f"k{i}".encode() for i in range(40)}
    _put_all("drv-lies", objects)
    with RewritingS3Proxy(moto_env, rewrite) as proxy, aws_env(proxy.url):
        m = S3Mounts(concurrency=1, page_size=10, memory=64 * 1024)  # one thread: no partition ends the stuck one
        try:
            for _ in range(2):  # the mount, then the index a list would use
                with pytest.raises(DriveError, match=why) as refused:
                    await m.index("drv-lies", "d/")
                assert "s3://drv-lies/d/" in str(refused.value) and proxy.url in str(refused.value)
                assert not m.mounted("drv-lies", "d/")
        finally:
            await m.close()
    listed = s3.list_objects_v2(Bucket="drv-lies")["Contents"]  # the bucket as it was
    assert [c["Key"] for c in listed] == list(objects)
    assert s3.get_object(Bucket="drv-lies", Key="d/k07")["Body"].read() == b"k7"


async def test_missing_bucket_is_not_found(moto_env: str, mounts: S3Mounts) -> None:  # noqa: F811
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        await mounts.mount("no-such-bucket-here", "")
    with pytest.raises(NotFound):
        await mounts.index("no-such-bucket-here", "x/")


async def test_stopped_endpoint_is_unavailable(moto_env: str) -> None:  # noqa: F811
    dead = f"http://127.0.0.1:{closed_port()}"
    with aws_env(dead, AWS_MAX_ATTEMPTS="2"):
        m = S3Mounts(concurrency=2)
        try:
            with pytest.raises(Unavailable, match=dead.replace(".", r"\.")):
                await m.mount(BUCKET, PREFIX)
        finally:
            await m.close()
        with pytest.raises(Unavailable, match=r"127\.0\.0\.1"):
            async for _ in read_object(BUCKET, "data/x.txt", etag="0" * 32, size=9, offset=0, limit=0,
                                       chunk_size=4, summed=RunningCrc32c()):
                pass


async def test_access_denied_is_permission_denied() -> None:
    # A moto_server that enforces IAM after its first request: the bucket is created, then
    # the listing with credentials it does not know is refused (403 InvalidAccessKeyId).
    with running_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"}) as url, aws_env(url):
        _s3().create_bucket(Bucket="drv-locked")
        m = S3Mounts(concurrency=2)
        try:
            with pytest.raises(PermissionDenied, match="drv-locked"):
                await m.mount("drv-locked", "")
        finally:
            await m.close()


def test_error_mapping(moto_env: str) -> None:  # noqa: F811
    # Answers moto cannot be made to give: AccessDenied as AWS words it, and throttling.
    client = make_client()
    err = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
         "ResponseMetadata": {"HTTPStatusCode": 403}}, "ListObjectsV2")
    mapped = map_error(err, client, "secret-bucket")
    assert isinstance(mapped, PermissionDenied) and "secret-bucket" in str(mapped)
    slow = botocore.exceptions.ClientError(
        {"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
         "ResponseMetadata": {"HTTPStatusCode": 503}}, "ListObjectsV2")
    assert isinstance(map_error(slow, client, "b"), Unavailable)


# -- mounts -------------------------------------------------------------------------------


async def test_remount_sees_new_objects(moto_env: str) -> None:  # noqa: F811
    s3 = _s3()
    s3.create_bucket(Bucket="drv-remount")
    s3.put_object(Bucket="drv-remount", Key="p/one.txt", Body=b"1")
    m = S3Mounts(page_size=10)
    try:
        assert (await m.mount("drv-remount", "p/"))[0] == 1
        s3.put_object(Bucket="drv-remount", Key="p/two.txt", Body=b"22")
        s3.put_object(Bucket="drv-remount", Key="p/sub/three.txt", Body=b"333")
        assert (await m.index("drv-remount", "p/")).objects == 1  # no re-index without a mount
        assert (await m.mount("drv-remount", "p/"))[0] == 3
        index = await m.index("drv-remount", "p/")
        assert [e.path for e in index.list("", False, "", 10)[0]] == ["one.txt", "sub", "two.txt"]
        # A failed re-mount keeps the previous complete index.
        for key in ("p/one.txt", "p/two.txt", "p/sub/three.txt"):
            s3.delete_object(Bucket="drv-remount", Key=key)
        s3.delete_bucket(Bucket="drv-remount")
        with pytest.raises(NotFound, match="drv-remount"):
            await m.mount("drv-remount", "p/")
        assert await m.index("drv-remount", "p/") is index
    finally:
        await m.close()


@pytest.fixture(scope="module")
def slow_bucket(moto_env: str) -> str:  # noqa: F811
    """400 keys: with 5-key pages an indexing run takes 80+ requests (a visible while)."""
    _s3().create_bucket(Bucket="drv-flight")
    _put_all("drv-flight", {f"f{i // 100}/k{i:04d}": b"." for i in range(400)})
    return "drv-flight"


async def test_concurrent_mounts_share_one_run(slow_bucket: str) -> None:
    m = S3Mounts(concurrency=2, page_size=5)
    try:
        results = await asyncio.gather(*(m.mount(slow_bucket, "") for _ in range(3)))
        assert [r[0] for r in results] == [400, 400, 400]
        assert m.stats.runs == 1  # one indexing run for three mounts
        one_run = m.stats.requests
        assert one_run >= 400 // 5
        await m.mount(slow_bucket, "")  # a later mount is a new run
        assert m.stats.runs == 2 and m.stats.requests == 2 * one_run
    finally:
        await m.close()


async def test_reads_during_reindex_use_the_previous_index(slow_bucket: str) -> None:
    m = S3Mounts(concurrency=1, page_size=5)
    try:
        await m.mount(slow_bucket, "")
        old = await m.index(slow_bucket, "")
        _s3().put_object(Bucket=slow_bucket, Key="f9/new", Body=b"new")
        task = asyncio.ensure_future(m.mount(slow_bucket, ""))
        served_old = 0
        while not task.done():
            busy = m.indexing(slow_bucket, "")
            current = await m.index(slow_bucket, "")  # mounted: answers without suspending
            if busy:
                assert current is old and current.stat("f9/new") is None
                assert len(current.list("f0", False, "", 1000)[0]) == 100
                served_old += 1
            await asyncio.sleep(0.01)
        assert (await task)[0] == 401
        assert served_old > 0, "the re-index finished before any read could overlap it"
        assert (await m.index(slow_bucket, "")).stat("f9/new") is not None
    finally:
        await m.close()


@pytest.mark.slow
async def test_flat_folders_are_split_by_key_range(moto_env: str) -> None:  # noqa: F811
    """A folder of files only has no sub-folders to fan out on: it is split by guessed key ranges."""
    rng = random.Random(3)
    _s3().create_bucket(Bucket="drv-flat")
    keys = [f"hex/{rng.getrandbits(64):016x}" for _ in range(400)]
    keys += [f"cnt/f{i:06d}.bin" for i in range(400)] + ["cnt/zz é", "cnt/f000100.bin/", "hex/~tail"]
    _put_all("drv-flat", dict.fromkeys(keys, b"."))
    for prefix in ("hex/", "cnt/", ""):
        lister = Lister(make_listing_client(), "drv-flat", prefix, concurrency=4, page_size=10)
        result = await asyncio.to_thread(lister.run)
        index = S3Index.from_runs(result.runs)
        want = sorted(k[len(prefix):] for k in keys if k.startswith(prefix) and not k.endswith("/"))
        assert [e.path for e in _all(index, "", True, 0)] == want
        assert index.objects == len(want)
        assert lister.partitions > 4  # listed as several ranges, not one sequential walk


# -- page parsing and direct GETs ---------------------------------------------------------

ODD_KEYS = [
    "odd/a b.txt", "odd/a+b%20c&d=e.txt", "odd/unicodé 文件.txt", "odd/<tag>\"q'.txt", "odd/amp&amp;.txt",
    "odd/tab\t.txt", "odd/x/", "odd/x/y.txt", "odd/~tilde;semi:colon.txt",
]


def _raw_page(client: Any, bucket: str, **params: Any) -> bytes:
    status, body = direct.Direct(client, bucket).get({"Bucket": bucket, **params})
    assert status == 200, body[:300]
    return body


def test_pages_read_as_botocore_reads_them(moto_env: str) -> None:  # noqa: F811
    """Raw moto_server answers (URL-encoded and not, one and several pages, with sub-folders)
    parsed by `parse_page`, by its ElementTree fallback, and by botocore: the same objects."""
    s3 = _s3()
    s3.create_bucket(Bucket="drv-pages")
    _put_all("drv-pages", {k: k.encode() * (i + 1) for i, k in enumerate(ODD_KEYS)})
    client = make_listing_client()
    for params in ({"EncodingType": "url"}, {}, {"EncodingType": "url", "Delimiter": "/", "Prefix": "odd/"},
                   {"EncodingType": "url", "MaxKeys": 4}, {"MaxKeys": 3, "StartAfter": "odd/a b.txt"}):
        body = _raw_page(client, "drv-pages", **params)
        assert b"<ChecksumAlgorithm>" in body or not body.count(b"<Contents>")  # moto writes S3's newer rows
        # botocore asks for URL-encoded keys itself, and decodes them (not when asked to encode)
        want = s3.list_objects_v2(Bucket="drv-pages", **{k: v for k, v in params.items() if k != "EncodingType"})
        plen = len(params.get("Prefix", "").encode())
        for page in (parse_page(body, plen), pages._parse_page_etree(body, plen, "EncodingType" in params)):
            contents = want.get("Contents", [])
            assert list(page.keys) == [c["Key"].encode()[plen:] for c in contents], params
            run = page.run(0, len(page.keys))
            assert list(run.sizes) == [c["Size"] for c in contents]
            assert run.etags == "".join(c["ETag"].strip('"') for c in contents).encode()
            stamps = [canonical_stamp(c["LastModified"].isoformat()) for c in contents]
            assert run.stamps == b"".join(stamps)
            assert page.prefixes == [p["Prefix"].encode()[plen:] for p in want.get("CommonPrefixes", [])]
            assert page.token == want.get("NextContinuationToken")
    # A page written another way (elements on lines of their own) goes to ElementTree, same answer.
    body = _raw_page(client, "drv-pages", EncodingType="url")
    spaced = body.replace(b"><", b">\n  <")
    assert parse_page(spaced, 0).keys == parse_page(body, 0).keys
    assert parse_page(spaced, 0).run(0, len(ODD_KEYS)).etags == parse_page(body, 0).run(0, len(ODD_KEYS)).etags


def test_etag_columns() -> None:
    """ETags of one width and of several, quoted as S3 and as moto quote them, and odd ones."""
    single = [b"&quot;%032x&quot;" % i for i in range(5)]
    assert pages._etag_column(single) == (b"".join(b"%032x" % i for i in range(5)), array("I", [32] * 5), 32)
    mixed = [b'"%032x"' % 1, b'"%032x-12"' % 2]
    assert pages._etag_column(mixed) == (b"%032x%032x-12" % (1, 2), array("I", [32, 35]), 0)
    odd = [b"&quot;out;&quot;", b"&quot;a&amp;b&quot;", b"plain"]  # quote letters inside, an entity, no quotes
    assert pages._etag_column(odd) == (b"out;a&bplain", array("I", [4, 3, 5]), 0)


def test_signed_requests_match_botocore(moto_env: str) -> None:  # noqa: F811
    """The direct GET's SigV4 signature is the one botocore's S3SigV4Auth computes for it."""
    with aws_env(moto_env, AWS_SESSION_TOKEN="tok/en+=", AWS_DEFAULT_REGION="eu-west-3"):
        client = make_listing_client()
        signer = direct.Signer(client, BUCKET)
        for params in ({"Prefix": "a b/unicodé+%/", "MaxKeys": 1000, "EncodingType": "url"},
                       {"Prefix": "", "Delimiter": "/", "ContinuationToken": "abc/+==", "EncodingType": "url"},
                       {"StartAfter": "x~y;z", "MaxKeys": 7}):
            request = signer.request(params).decode()
            line, *lines = request.split("\r\n")
            headers = dict(h.split(": ", 1) for h in lines if h)
            creds = client._request_signer._credentials.get_frozen_credentials()
            auth = S3SigV4Auth(creds, "s3", "eu-west-3")
            reference = AWSRequest(method="GET", url=f"{moto_env}{line.split(' ')[1]}", headers={
                k: v for k, v in headers.items() if k.startswith("x-amz-")})
            reference.context["timestamp"] = headers["x-amz-date"]
            canonical = auth.canonical_request(reference)
            signature = auth.signature(auth.string_to_sign(reference, canonical), reference)
            assert headers["authorization"].endswith(f"Signature={signature}"), canonical


async def test_chunked_answers(tmp_path: Path) -> None:
    """The bench's listing endpoint answers in chunks, as S3 often does: every key is read."""
    with S3ListingServer(tmp_path, keys_per_level=6) as server, aws_env(server.url):
        lister = Lister(make_listing_client(), LISTING_BUCKET, "", concurrency=3, page_size=10)
        result = await asyncio.to_thread(lister.run)
        index = S3Index.from_runs(result.runs)
        assert [e.path for e in _all(index, "", True, 0)] == synthetic_keys(6)
        assert lister._fast_failures == 0 and lister._direct is not None


# -- the index against a brute-force model ------------------------------------------------


def _model_list(keys: list[str], path: str, recursive: bool, after: str) -> list[tuple[str, bool]]:
    base = path + "/" if path else ""
    found: dict[str, bool] = {}
    for k in keys:
        if not k.startswith(base) or k == base:
            continue
        rest = k[len(base):]
        if recursive:
            if not k.endswith("/"):
                found[k] = False
        elif "/" in rest:
            found.setdefault(base + rest.split("/", 1)[0], True)
        else:
            found[k] = False  # a file wins over a folder of the same name
    return sorted((p, f) for p, f in found.items() if p > after)


def test_index_ordering_matches_a_model() -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", "x", ".", "-", " ", "é", "/", "0"]
    keys = sorted({
        re.sub("/+", "/", "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))).strip("/")
        + rng.choice(["", "", "/"])
        for _ in range(3000)
    } - {"", "/"}, key=lambda k: k.encode())
    encoded = [k.encode() for k in keys]
    etags = [b"%032x" % i if i < 1500 else b"%032x-%d" % (i, i % 11) for i in range(len(keys))]
    index = S3Index.from_runs([  # ETags of one width, then of several (both storage layouts)
        make_run(encoded[i : i + 97], range(i, i + len(encoded[i : i + 97])),
                 [b"2024-05-01T12:00:00.123Z"] * len(encoded[i : i + 97]), etags[i : i + 97])
        for i in range(0, len(encoded), 97)
    ])
    assert index.objects == sum(1 for k in keys if not k.endswith("/"))
    folders = {k.rsplit("/", 1)[0] for k in keys if "/" in k}
    for path in ["", "a", "x", "a/b", "x.", "x-", *rng.sample(sorted(folders), 25)]:
        for recursive in (False, True):
            want = _model_list(keys, path, recursive, "")
            got = [(e.path, e.folder) for e in _all(index, path, recursive, 0)]
            assert got == want, (path, recursive)
            for page in (1, 3):
                assert [(e.path, e.folder) for e in _all(index, path, recursive, page)] == want
            if want:
                after = want[len(want) // 2][0]
                got_after = [(e.path, e.folder) for e in index.list(path, recursive, after, 0)[0]]
                assert got_after == _model_list(keys, path, recursive, after)
    for k in rng.sample(keys, 200):
        p = k.rstrip("/")
        entry = index.stat(p)
        assert entry is not None
        if not k.endswith("/"):
            i = keys.index(k)
            assert not entry.folder and entry.mtime_ns == 1714564800_123_000_000
            assert entry.size == i and entry.etag == etags[i].decode()
    fixed = S3Index.from_runs([make_run(encoded[:50], range(50), [b"2024-05-01T12:00:00.123Z"] * 50, etags[:50])])
    assert all(fixed.stat(k.rstrip("/")) is not None for k in keys[:50])
    assert [e.etag for e in fixed.list("", True, "", 0)[0]] == [
        etags[i].decode() for i in range(50) if not keys[i].endswith("/")]


def test_the_index_names_a_key_as_the_client_names_a_path() -> None:
    """The index's check of a key (bytes, per key listed) spells out `normalize_path`'s rules again, for speed: a key
    is shown exactly when the client takes it as a path as it is."""
    rng = random.Random(5)
    alphabet = ["a", "é", ".", "..", "/", "\\", "\x01", "\x7f", " ", "b" * 200]
    for _ in range(20_000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        try:
            named = normalize_path(key) == key
        except InvalidArgument:
            named = False
        assert _is_path(key.encode()) == named, key
