"""Parallel, paginated ListObjectsV2 of one `s3://bucket/prefix/`, parsed fast.

boto3 stays in charge of what it is good at: credentials, endpoint
configuration (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`), retries and
typed errors. What it is slow at is the rest of a call: ~50 ms of CPU to
parse a 1000-key page, ~2 ms of hooks and request plumbing. So a page is
fetched with a GET signed here over a plain keep-alive connection (`direct`)
and read into columns by `pages` (~1 ms a page). Any failure of that direct
GET falls back to the ordinary boto3 call, which retries with its configured
policy and raises its typed errors; on that client a `before-parse` hook hands
the raw XML back (`RawBody`) so botocore never parses a listing page itself.

Listing runs partitions of the key space concurrently on `concurrency`
threads (boto3 clients are thread-safe). A partition starts as a flat
listing of a prefix; when its first page comes back full with more to come
while threads are idle, the rest of it is split by a delimiter listing into
its sub-folders, each a partition of its own (recursively, up to MAX_DEPTH
levels); a folder of files only is split into key ranges guessed from the
keys seen (`_split_range`). Small folders thus cost one request, and big
trees and big flat folders fan out. Each
page becomes one compact `Run`; runs never interleave, so the index is their
concatenation (`S3Index.from_runs`).
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
import botocore.handlers
from botocore.config import Config

from drive_client.errors import DriveError, NotFound, PermissionDenied, StaleIndexError, StoreUnavailable

from . import direct
from .index import Run, S3Index
from .pages import BadPage, ListingStats, Page, page_from_parsed, parse_page

MAX_DEPTH = 6  # how many folder levels a partition may be split down
_MAX_CHAR = "\U0010ffff"  # sorts after every other character (and UTF-8 byte sequence)
_MAX_SPLIT_CHARS = 40  # range splits use at most this many distinct characters

# -- boto3 clients and error mapping ------------------------------------------------------


def _config(pool: int, **extra: Any) -> Config:
    kwargs: dict[str, Any] = {"max_pool_connections": pool, **extra}
    if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
        # botocore's default ("legacy", 5 attempts) backs off for ~15 s on a dead endpoint.
        kwargs["retries"] = {"mode": "standard"}
    return Config(**kwargs)


def make_client(pool: int = 10, **config: Any) -> Any:
    """A plain S3 client from boto3's standard configuration (env, config files).

    Its region is `AWS_REGION` when set, as the AWS CLI and the other SDKs take it (over `AWS_DEFAULT_REGION` and the
    profile's): boto3 reads only `AWS_DEFAULT_REGION`, and would sign for another region than the operator gave.
    """
    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
    return session.client("s3", config=_config(pool, **config))


def make_listing_client(pool: int = 10) -> Any:
    """An S3 client whose ListObjectsV2 answers carry their raw XML in `RawBody`.

    It signs with SigV4 (also its presigned URLs, which would otherwise be SigV2).
    """
    client = make_client(pool, signature_version="s3v4")
    events = client.meta.events
    # botocore's own check for an error inside a 200 answer re-parses every page with
    # ElementTree (~4 ms); `_take_raw_body` does the equivalent for ListObjectsV2.
    events.unregister("before-parse.s3.*", getattr(botocore.handlers, "_handle_200_error", None))
    events.register_first("before-parse.s3.ListObjectsV2", _take_raw_body)
    return client


_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult></ListBucketResult>'


def _take_raw_body(response_dict: dict[str, Any], customized_response_dict: dict[str, Any],
                   **_: Any) -> None:
    if response_dict.get("status_code") != 200:
        return  # errors are parsed (and retried) by botocore as usual
    body = response_dict.get("body") or b""
    if body.rstrip().endswith(b"</ListBucketResult>"):
        customized_response_dict["RawBody"] = body
        response_dict["body"] = _EMPTY
    else:
        # A truncated or error-bearing 200 answer: have botocore retry it, as it would.
        response_dict["status_code"] = 500


def endpoint_of(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", "") or "the S3 endpoint")


_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "AccountProblem", "InvalidToken", "ExpiredToken", "InvalidObjectState"}
_CHANGED = {"PreconditionFailed", "NoSuchKey", "InvalidRange"}


def map_error(err: BaseException, client: Any, bucket: str, key: str = "") -> DriveError:
    """The DriveError for a boto3/botocore failure on `bucket` (and object `key`)."""
    endpoint = endpoint_of(client)
    where = f"s3://{bucket}/{key}"
    if isinstance(err, DriveError):
        return err
    if isinstance(err, botocore.exceptions.ClientError):
        info = err.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = info.get("Message") or code or str(err)
        if code == "NoSuchBucket" or (status == 404 and not key):
            return NotFound(f"S3 bucket {bucket!r} does not exist at {endpoint}")
        if key and (code in _CHANGED or status in (404, 412, 416)):
            return StaleIndexError(
                f"{where} changed since it was indexed ({code or status}): re-mount the drive and retry"
            )
        if code in _DENIED or status == 403:
            return PermissionDenied(f"S3 refused access to {where} at {endpoint}: {code}: {message}")
        if status == 503 or code in ("SlowDown", "ServiceUnavailable"):  # how S3 answers past its request rate
            return StoreUnavailable(f"S3 endpoint {endpoint} throttles: it answered {code} ({message}) on {where} "
                                    "after retries; it is overloaded or past its request rate: try again later")
        if status >= 500 or code == "InternalError":
            return StoreUnavailable(f"S3 endpoint {endpoint} failed on {where} after retries: {code} {message}")
        return DriveError(f"S3 error on {where} at {endpoint}: {code or status}: {message}")
    if isinstance(err, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError, ConnectionError, TimeoutError)):
        return StoreUnavailable(f"cannot reach the S3 endpoint {endpoint} for {where}: {err}")
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return PermissionDenied(f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID or a profile")
    if isinstance(err, botocore.exceptions.BotoCoreError):
        return StoreUnavailable(f"S3 request to {endpoint} for {where} failed: {err}")
    return DriveError(f"listing {where} failed: {type(err).__name__}: {err}")


# -- the parallel listing -----------------------------------------------------------------


@dataclass
class ListingResult:
    runs: list[Run]
    requests: int
    seconds: float


def _file_runs(page: Page, start: int = 0, stop: int | None = None) -> list[Run]:
    """The page's objects start..stop-1 as runs, split wherever a listed sub-folder falls between them.

    In a delimiter listing, sub-folders (listed separately) interleave with
    the files; cutting the files at each sub-folder keeps every run disjoint
    from every other.
    """
    keys = page.keys
    stop = len(keys) if stop is None else stop
    if start < stop and keys[start] == b"":  # the mounted prefix's own folder marker: not an entry
        start += 1
    if start >= stop:
        return []
    cuts = [start]
    if page.prefixes:
        prefixes = iter(page.prefixes)
        nxt = next(prefixes, None)
        for i in range(start, stop):
            moved = False
            while nxt is not None and nxt < keys[i]:
                nxt = next(prefixes, None)
                moved = True
            if moved and i > start:
                cuts.append(i)
    cuts.append(stop)
    return [page.run(a, b) for a, b in itertools.pairwise(cuts)]


def _common(a: str, b: str) -> int:
    """The length of the longest common (character) prefix of a and b."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _within(keys: Sequence[bytes], lo: bytes, stop: bytes) -> tuple[int, int]:
    """The positions of the first key >= lo and of the first key >= stop ('' = no bound)."""
    i = bisect.bisect_left(keys, lo) if lo else 0
    return i, bisect.bisect_left(keys, stop) if stop else len(keys)


class Lister:
    """One listing of `s3://bucket/prefix/` over `concurrency` threads."""

    def __init__(self, client: Any, bucket: str, prefix: str, *, concurrency: int = 16,
                 page_size: int = 1000, stats: ListingStats | None = None, fast: bool = True,
                 take: Callable[[int], None] = lambda nbytes: None) -> None:
        """`take(nbytes)` is called before each listed run is kept, with its size; what it raises ends the run."""
        self.client = client
        self._take = take
        self.bucket = bucket
        self.prefix = prefix
        self.concurrency = max(1, concurrency)
        self.page_size = max(1, min(1000, page_size))
        self.stats = stats or ListingStats()
        self._plen = len(prefix.encode("utf-8"))
        self._cond = threading.Condition()
        self._tasks: deque[Callable[[], None]] = deque()
        self._pending = 0
        self._runs: list[Run] = []
        self._error: BaseException | None = None
        self.requests = 0
        self.partitions = 0  # listings of a prefix or key range (a measure of the fan-out)
        self._direct_usable = fast and direct.usable(client)
        self._direct: direct.Direct | None = None
        self._fast_failures = 0

    # each task runs on a worker thread; `_submit` queues more
    def _submit(self, task: Callable[[], None]) -> None:
        with self._cond:
            self._tasks.append(task)
            self._pending += 1
            self._cond.notify()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and self._pending and self._error is None:
                    self._cond.wait()
                if self._error is not None or not self._pending:
                    self._cond.notify_all()
                    return
                task = self._tasks.popleft()
            try:
                task()
            except BaseException as err:  # handed to the caller of run()
                with self._cond:
                    if self._error is None:
                        self._error = err
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _page(self, prefix: str, delimiter: bool, token: str | None, start_after: str = "") -> Page:
        params: dict[str, Any] = {
            "Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.page_size, "EncodingType": "url",
        }
        if delimiter:
            params["Delimiter"] = "/"
        if token:
            params["ContinuationToken"] = token
        elif start_after:
            params["StartAfter"] = start_after
        self.stats.add(requests=1)
        with self._cond:
            self.requests += 1
        try:
            page = self._answer(params)
            if token and page.token == token:
                raise BadPage("a page gives back the continuation token it was asked with, so the next page is it")
            if not all(map(operator.lt, page.keys, page.keys[1:])):  # the index bisects each page's keys
                raise BadPage("a page lists keys out of S3's order (UTF-8 bytes) or twice")
        except BadPage as err:
            raise DriveError(
                f"{endpoint_of(self.client)} answered a listing of s3://{self.bucket}/{self.prefix} that cannot be "
                f"right: {err}; the location is not indexed (does the endpoint implement ListObjectsV2 as S3 does?)"
            ) from err
        return page

    def _answer(self, params: dict[str, Any]) -> Page:
        """The page ListObjectsV2 with `params` answers, parsed."""
        body = self._fetch_fast(params) if self._direct_usable else None
        if body is None:
            answer = self.client.list_objects_v2(**params)
            body = answer.get("RawBody")
            if body is None:  # no hook on this client: botocore parsed it (slowly)
                return page_from_parsed(answer, self._plen)
            if self._fast_failures > 2:
                self._direct_usable = False  # the direct path keeps failing where boto3 works: stop trying
        return parse_page(body, self._plen)

    def _fetch_fast(self, params: dict[str, Any]) -> bytes | None:
        """GETs a page directly (`direct`); None (use the boto3 call) on any failure.

        Failures are not retried here: the boto3 call that follows retries
        them with its configured policy and raises its typed errors.
        """
        try:
            if self._direct is None:
                with self._cond:
                    if self._direct is None:
                        made = direct.Direct(self.client, self.bucket)
                        if not made.signer.usable:
                            self._direct_usable = False
                            return None
                        self._direct = made
            status, body = self._direct.get(params)
        except Exception:
            self._fast_failures += 1
            return None
        if status == 200 and body.rstrip().endswith(b"</ListBucketResult>"):
            return body
        self._fast_failures += 1
        return None

    def _add(self, runs: list[Run]) -> None:
        if runs:
            self._take(sum(run.nbytes() for run in runs))
            with self._cond:
                self._runs.extend(runs)

    def _full(self, rel: bytes) -> str:
        return self.prefix + rel.decode("utf-8", "surrogateescape")

    def _flat(self, prefix: str, start_after: str, depth: int, lo: str = "", stop: str = "") -> None:
        """Every key under `prefix` after `start_after` (and in [lo, stop) when given), page by page.

        A partition whose first page is full with more to come, while fewer
        partitions than threads are in hand, is split and its rest listed in
        parallel: by sub-folder (`_split`), or by key range (`_split_range`)
        for a range partition. Small partitions cost one request; splitting
        happens only where it pays.
        """
        plen = len(self.prefix)
        lo_rel = lo[plen:].encode("utf-8", "surrogateescape")
        stop_rel = stop[plen:].encode("utf-8", "surrogateescape")
        token: str | None = None
        first = True
        with self._cond:
            self.partitions += 1
        while self._error is None:
            page = self._page(prefix, False, token, start_after if first else "")
            i, j = _within(page.keys, lo_rel, stop_rel)
            self._add(_file_runs(page, i, j))
            token = page.token
            if not token or j < len(page.keys):  # done, or past `stop`
                return
            if first and j > i and depth < MAX_DEPTH and self._pending < self.concurrency:
                last = self._full(page.keys[j - 1])
                if stop:
                    self._split_range(prefix, page.keys[i:j], last, stop, depth)
                else:
                    self._submit(functools.partial(self._split, prefix, last, depth))
                return
            first = False

    def _split(self, prefix: str, start_after: str, depth: int) -> None:
        """Lists what is under `prefix` after `start_after`, one partition per sub-folder.

        The sub-folder holding `start_after` (partly listed already) resumes
        right after it; a delimiter listing from past that sub-folder gives the
        remaining files (added here) and sub-folders (each a new partition).
        Nothing is listed twice, and no server behaviour is relied upon for a
        common prefix that straddles StartAfter (S3 and moto differ there).
        A folder that turns out to hold files only (a full first page, no
        sub-folders) is split by key range instead.
        """
        rest = start_after[len(prefix):]
        cut = rest.find("/")
        straddling = ""
        if cut >= 0:
            straddling = prefix + rest[: cut + 1]
            self._submit(functools.partial(self._flat, straddling, start_after, depth + 1))
            start_after = straddling + _MAX_CHAR  # past every key in it
        token: str | None = None
        first = True
        while self._error is None:
            page = self._page(prefix, True, token, start_after if first else "")
            self._add(_file_runs(page))
            for p in page.prefixes:
                sub = self._full(p)
                if sub != straddling:
                    self._submit(functools.partial(self._flat, sub, "", depth + 1))
            token = page.token
            if not token:
                return
            if first and not page.prefixes and page.keys and depth < MAX_DEPTH:
                self._split_range(prefix, page.keys, self._full(page.keys[-1]), "", depth)
                return
            first = False

    def _split_range(self, prefix: str, sample: Sequence[bytes], after: str, stop: str, depth: int) -> None:
        """Splits the keys under `prefix` in (after, stop) into key ranges listed in parallel.

        Without sub-folders there is nothing to ask S3 for: the boundaries are
        guessed from `sample` (the sorted keys of the page just listed), one
        per character seen in it, at each position from where `after` and
        `stop` part up to where the sample's keys start to differ. A counter
        (`f000999` next) gives `f001`..`f009`, `f01`..`f09`, `f1`..`f9`; hex
        names give `1`..`f`. The ranges tile (after, stop) exactly whatever
        the keys are; a bad guess only costs a few requests for empty ranges.
        """
        plen = len(self.prefix)
        rel_after = after[plen:]
        rel_stop = stop[plen:]
        base = len(prefix) - plen  # characters of the partition's prefix, relative to the mount's
        texts = [k.decode("utf-8", "replace") for k in sample]
        vary = _common(texts[0], texts[-1])
        start = _common(rel_after, rel_stop) if stop else base
        counts = collections.Counter("".join(t[base:] for t in texts))
        charset = sorted(ch for ch, _ in counts.most_common(_MAX_SPLIT_CHARS) if not 0xD800 <= ord(ch) <= 0xE000)
        bounds = sorted({
            rel_after[:i] + ch
            for i in range(start, min(len(rel_after), max(start + 1, vary)))
            for ch in charset
            if ch > rel_after[i] and (not stop or rel_after[:i] + ch < rel_stop)
        })
        if not bounds:
            self._flat(prefix, after, MAX_DEPTH, "", stop)  # nothing to split on: list on here
            return
        full = [self.prefix + b for b in bounds]
        self._submit(functools.partial(self._flat, prefix, after, depth + 1, "", full[0]))
        for b, nxt in itertools.pairwise([*full, stop]):
            before = b[:-1] + chr(ord(b[-1]) - 1) + _MAX_CHAR  # StartAfter just below b
            self._submit(functools.partial(self._flat, prefix, before, depth + 1, b, nxt))

    def run(self) -> ListingResult:
        """Lists everything; raises the first error (a DriveError) if any request failed."""
        t0 = time.perf_counter()
        self.stats.add(runs=1)
        self._submit(functools.partial(self._flat, self.prefix, "", 0))
        threads = [threading.Thread(target=self._worker, name=f"s3-list-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._error is not None:
            raise map_error(self._error, self.client, self.bucket) from self._error
        return ListingResult(self._runs, self.requests, time.perf_counter() - t0)


def build_index(client: Any, bucket: str, prefix: str, *, concurrency: int = 16, page_size: int = 1000,
                stats: ListingStats | None = None, fast: bool = True,
                take: Callable[[int], None] = lambda nbytes: None) -> tuple[S3Index, ListingResult]:
    """Lists `s3://bucket/prefix` and builds its index (blocking; call from a thread); `take` as `Lister`'s."""
    result = Lister(client, bucket, prefix, concurrency=concurrency, page_size=page_size, stats=stats,
                    fast=fast, take=take).run()
    return S3Index.from_runs(result.runs), result
