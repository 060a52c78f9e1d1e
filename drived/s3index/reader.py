"""Streaming an indexed S3 object with ranged GetObject reads.

Bytes come in windows: one ranged GET per window (`If-Match` the indexed
ETag), read `chunk_size` at a time, so memory stays at about one chunk
whatever the object's size. An object whose ETag or size differs from the
index fails with StaleIndexError before any byte of the other version is
yielded: S3 answers 412 to the If-Match, and the answer's ETag and total size
(Content-Range) are checked too, for servers that ignore If-Match. An answer
that starts at another byte than asked (a server that ignores ranges sends the
whole object) fails before any of its bytes is yielded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
from collections.abc import AsyncGenerator
from typing import Any

from drive_client.errors import DriveError, InvalidArgument, StaleIndexError

from ..checksums import RunningCrc32c
from .lister import endpoint_of, make_client, map_error

WINDOW = 64 * 1024 * 1024  # bytes per ranged GET (at least one chunk)
# Blocking boto3 calls and body reads run here, not in the loop's small default executor
# (min(32, cpus + 4) threads), so many concurrent reads do not queue behind each other.
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="s3-read")

_clients: dict[tuple[tuple[str, str], ...], Any] = {}
_clients_lock = threading.Lock()
_TOTAL = re.compile(r"/(\d+)\s*$")
_FIRST = re.compile(r"\s*bytes\s+(\d+)-")


def _get_client() -> Any:
    """A shared S3 client for the current AWS_* environment (a changed endpoint gets a new one)."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if len(_clients) > 8:
                _clients.clear()
            client = _clients[key] = make_client(pool=32)
        return client


def _stale(bucket: str, key: str, why: str) -> StaleIndexError:
    return StaleIndexError(f"s3://{bucket}/{key} changed since it was indexed ({why}): re-mount the drive and retry")


def _check(bucket: str, key: str, etag: str, size: int, answer: dict[str, Any]) -> None:
    got = str(answer.get("ETag", "")).strip('"')
    if etag and got and got != etag:
        raise _stale(bucket, key, f"ETag {got} instead of {etag}")
    match = _TOTAL.search(str(answer.get("ContentRange", "")))
    total = int(match.group(1)) if match else answer.get("ContentLength")
    if total is not None and int(total) != size:
        raise _stale(bucket, key, f"{total} bytes instead of {size}")


def _open(client: Any, bucket: str, key: str, etag: str, size: int, start: int, end: int) -> Any:
    """GETs bytes [start, end) (If-Match etag) and returns the streaming body, after the checks."""
    params: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
    if etag:
        params["IfMatch"] = f'"{etag}"'
    try:
        answer = client.get_object(**params)
    except Exception as err:
        raise map_error(err, client, bucket, key) from err
    body = answer["Body"]
    try:
        _check(bucket, key, etag, size, answer)
        first = first_byte(answer)
        if first != start:
            raise DriveError(
                f"{endpoint_of(client)} answered a read of s3://{bucket}/{key} from byte {start} with the bytes "
                f"from {first}: it ignores the Range of a GET, which reads past an object's start need"
            )
    except BaseException:
        body.close()
        raise
    return body


def first_byte(answer: dict[str, Any]) -> int:
    """Which byte of the object a GetObject answer starts at: where its Content-Range starts, 0 without one.

    HTTP lets a server answer a ranged GET with the whole object (some
    gateways and caches do): its first bytes are then not those asked for.
    """
    match = _FIRST.match(str(answer.get("ContentRange", "")))
    return int(match.group(1)) if match else 0


def _head(client: Any, bucket: str, key: str, etag: str, size: int) -> None:
    params: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if etag:
        params["IfMatch"] = f'"{etag}"'
    try:
        answer = client.head_object(**params)
    except Exception as err:
        raise map_error(err, client, bucket, key) from err
    _check(bucket, key, etag, size, answer)


async def read_object(bucket: str, key: str, *, etag: str, size: int, offset: int, limit: int,
                      chunk_size: int, summed: RunningCrc32c) -> AsyncGenerator[bytes, None]:
    """Streams bytes [offset, offset+limit) of the object (limit 0: to the end), each chunk read through
    `summed` (which sums it in the thread that reads it).

    Raises InvalidArgument (offset outside [0, size], negative limit),
    StaleIndexError (the object changed or vanished: re-mount and retry),
    NotFound / PermissionDenied / Unavailable as the listing does.
    """
    if offset < 0 or limit < 0 or offset > size:
        raise InvalidArgument(f"offset {offset} / limit {limit} outside the object's {size} bytes")
    if chunk_size <= 0:
        raise InvalidArgument("chunk_size must be positive")
    end = size if limit == 0 else min(size, offset + limit)
    loop = asyncio.get_running_loop()
    client = await loop.run_in_executor(_EXECUTOR, _get_client)
    if end <= offset:  # nothing to send; still refuse a changed object
        await loop.run_in_executor(_EXECUTOR, _head, client, bucket, key, etag, size)
        return
    window = max(WINDOW // chunk_size, 1) * chunk_size
    pos = offset
    while pos < end:
        stop = min(end, pos + window)
        body = await loop.run_in_executor(_EXECUTOR, _open, client, bucket, key, etag, size, pos, stop)
        try:
            while pos < stop:
                want = min(chunk_size, stop - pos)
                try:
                    data = await loop.run_in_executor(_EXECUTOR, summed.read, body, want)
                except Exception as err:
                    raise map_error(err, client, bucket, key) from err
                if not data:
                    raise _stale(bucket, key, f"the object ended at byte {pos}, before {stop}")
                pos += len(data)
                yield data
        finally:
            body.close()
