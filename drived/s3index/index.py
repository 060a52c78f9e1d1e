"""The compact, read-only index of one mounted `s3://bucket/prefix/` location.

Layout: every key (relative to the mounted prefix, UTF-8) in S3 order (UTF-8
byte order, which is also Python's str order) in one `bytes` blob with an
`array('q')` of offsets, and parallel arrays of sizes, modification times and
ETags. No Python object per key: 1M keys take ~80 MB, and building the index
from listed runs is a handful of C-level joins.

Lookups bisect the sorted keys (O(log n)); a folder listing walks forward from
its start, jumping over each sub-folder's keys with one more bisect, so it
costs O(entries returned x log n), never O(bucket). Folder markers (keys
ending in '/') are kept in the key order (so they create folders) but are
never listed or counted as files. A listing `named_only` leaves out the
keys no drive path names (an empty, '.' or '..' part, a control character, a
name over 255 bytes, a leading backslash: no request can name them), though the folders before
their first such part stay; they are counted all the same.

Listing order is plain path order (str comparison of the entry paths), the
order `start_after` is compared in. That differs from S3 key order in one
place: a folder `x` sorts before a sibling `x.txt` although its keys (`x/...`)
come after it; `list` emits such a folder early (see `_folders_before`).
"""

from __future__ import annotations

import bisect
import calendar
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import accumulate, chain, pairwise, repeat
from typing import overload

from drive_client.uri import MAX_PART_BYTES

_SLASH = 0x2F
STAMP_WIDTH = 24  # len("2024-05-01T12:00:00.000Z")
EPOCH_STAMP = b"1970-01-01T00:00:00.000Z"
_SECONDS: dict[bytes, int] = {}  # stamp[:19] -> seconds since the epoch
_Entries = list  # `S3Index.list` shadows the builtin in the class body
# Bytes that sort before '/': a name `x` + one of these sorts after folder `x` in path order
# but before the folder's keys (`x/...`) in key order.
_BEFORE_SLASH = re.compile(rb"[\x00-\x2e]")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _is_name(part: bytes) -> bool:
    """Whether `part` is a name a drive path may have (`drive_client.uri.normalize_path` keeps it as it is)."""
    return part not in (b"", b".", b"..") and len(part) <= MAX_PART_BYTES and not _CONTROL.search(part)


def _is_path(key: bytes) -> bool:
    """Whether `key` is a drive path as it is (a leading backslash reads as an absolute path, so none has one)."""
    return not key.startswith(b"\\") and all(map(_is_name, key.split(b"/")))


@dataclass(frozen=True, slots=True)
class S3Entry:
    """One list or stat answer."""

    path: str  # relative to the mounted prefix, no trailing '/'
    size: int  # 0 for folders
    etag: str  # '' for folders; without surrounding quotes
    mtime_ns: int  # 0 for folders
    folder: bool


@dataclass(slots=True)
class Run:
    """A sorted run of listed objects, keys relative to the mounted prefix.

    The lister produces one per listing page (or part of a page); runs of one
    listing never interleave, so the index is their concatenation in order of
    `first`.
    """

    first: bytes
    last: bytes
    keys: bytes  # the keys, joined
    key_lens: array  # array('I'): length of each key in `keys`
    sizes: array  # array('q')
    stamps: bytes  # LastModified of each key, STAMP_WIDTH bytes each ('2024-05-01T12:00:00.000Z')
    etags: bytes  # the ETags without quotes, joined
    etag_lens: array  # array('I')
    etag_width: int = 0  # the common length of every ETag in the run, 0 if they differ
    markers: int = 0  # how many keys end in '/'

    def __len__(self) -> int:
        return len(self.key_lens)

    def nbytes(self) -> int:
        """Approximate memory held by the run's arrays, in bytes."""
        return (
            len(self.keys) + len(self.stamps) + len(self.etags)
            + sum(a.itemsize * len(a) for a in (self.key_lens, self.sizes, self.etag_lens))
        )


def make_run(keys: list[bytes], sizes: Iterable[int], stamps: list[bytes], etags: list[bytes]) -> Run:
    """A run from parallel lists (keys sorted, relative to the prefix; stamps canonical)."""
    etag_lens = array("I", map(len, etags))
    return Run(
        first=keys[0],
        last=keys[-1],
        keys=b"".join(keys),
        key_lens=array("I", map(len, keys)),
        sizes=array("q", sizes),
        stamps=b"".join(stamps),
        etags=b"".join(etags),
        etag_lens=etag_lens,
        etag_width=etag_lens[0] if etag_lens.count(etag_lens[0]) == len(etag_lens) else 0,
        markers=sum(map(bytes.endswith, keys, repeat(b"/"))),
    )


class _Keys(Sequence[bytes]):
    """The sorted keys as a sequence, for `bisect`."""

    __slots__ = ("_blob", "_off")

    def __init__(self, blob: bytes, offsets: array) -> None:
        self._blob = blob
        self._off = offsets

    def __len__(self) -> int:
        return len(self._off) - 1

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...
    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        off = self._off
        return self._blob[off[i] : off[i + 1]]


def stamp_ns(stamp: bytes) -> int:
    """ns since the epoch of a canonical stamp (`2024-05-01T12:00:00.123Z`); 0 if unreadable."""
    seconds = _SECONDS.get(stamp[:19])
    if seconds is None:
        try:
            dt = datetime.strptime(stamp[:19].decode("ascii"), "%Y-%m-%dT%H:%M:%S")
            seconds = calendar.timegm(dt.timetuple())
        except ValueError:
            return 0
        if len(_SECONDS) > 100_000:
            _SECONDS.clear()
        _SECONDS[stamp[:19]] = seconds
    millis = stamp[20:23]
    return seconds * 1_000_000_000 + (int(millis) * 1_000_000 if millis.isdigit() else 0)


def canonical_stamp(text: str) -> bytes:
    """Any ISO-8601 LastModified as a canonical STAMP_WIDTH-byte UTC stamp (the slow path)."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return EPOCH_STAMP
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S").encode() + f".{dt.microsecond // 1000:03d}Z".encode()


def _upper(prefix: bytes) -> bytes:
    """The smallest byte string above every string that starts with `prefix` ('a/' -> 'a0')."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass(slots=True)
class _Scan:
    """State of one folder listing."""

    named_only: bool  # leaves out the names no drive path has
    out: list[S3Entry] = field(default_factory=list)
    emitted: set[bytes] = field(default_factory=set)


class S3Index:
    """The sorted objects of one mounted location; immutable once built, safe to share."""

    __slots__ = (
        "_eoff", "_etags", "_ewidth", "_keys", "_n", "_sizes", "_stamps", "_view", "markers", "objects",
    )

    def __init__(
        self,
        keys: bytes = b"",
        key_offsets: array | None = None,
        sizes: array | None = None,
        stamps: bytes = b"",
        etags: bytes = b"",
        etag_offsets: array | None = None,
        etag_width: int = 0,
        markers: int = 0,
    ) -> None:
        self._keys = keys
        koff = key_offsets if key_offsets is not None else array("q", [0])
        self._view = _Keys(keys, koff)
        self._n = len(koff) - 1
        self._sizes = sizes if sizes is not None else array("q")
        self._stamps = stamps
        self._etags = etags
        # ETags are etag_width bytes each (single-part uploads: 32 hex digits), or else
        # delimited by etag_offsets.
        self._ewidth = etag_width
        self._eoff = etag_offsets if etag_offsets is not None else array("q", [0])
        self.markers = markers
        self.objects = self._n - markers  # number of objects (folder markers excluded)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_runs(cls, runs: list[Run]) -> S3Index:
        """Concatenates the runs of one listing in key order.

        Runs from one listing cover disjoint key ranges; should a server ever
        answer overlapping ranges, the keys are merged and de-duplicated
        instead (slower, still correct).
        """
        runs = sorted((r for r in runs if len(r)), key=lambda r: r.first)
        for a, b in pairwise(runs):
            if not a.last < b.first:
                return cls._from_overlapping(runs)
        sizes = array("q")
        for r in runs:
            sizes.extend(r.sizes)
        key_offsets = array("q", accumulate(chain.from_iterable(r.key_lens for r in runs), initial=0))
        widths = {r.etag_width for r in runs}
        etag_width = widths.pop() if len(widths) == 1 else 0
        etag_offsets = (
            None if etag_width
            else array("q", accumulate(chain.from_iterable(r.etag_lens for r in runs), initial=0))
        )
        return cls(
            b"".join(r.keys for r in runs),
            key_offsets,
            sizes,
            b"".join(r.stamps for r in runs),
            b"".join(r.etags for r in runs),
            etag_offsets,
            etag_width,
            sum(r.markers for r in runs),
        )

    @classmethod
    def _from_overlapping(cls, runs: list[Run]) -> S3Index:
        rows: dict[bytes, tuple[int, bytes, bytes]] = {}
        for r in runs:
            ko = list(accumulate(r.key_lens, initial=0))
            eo = list(accumulate(r.etag_lens, initial=0))
            for i in range(len(r)):
                rows[r.keys[ko[i] : ko[i + 1]]] = (
                    r.sizes[i], r.stamps[i * STAMP_WIDTH : (i + 1) * STAMP_WIDTH], r.etags[eo[i] : eo[i + 1]]
                )
        keys = sorted(rows)
        if not keys:
            return cls()
        return cls.from_runs(
            [
                make_run(
                    keys,
                    (rows[k][0] for k in keys),
                    [rows[k][1] for k in keys],
                    [rows[k][2] for k in keys],
                )
            ]
        )

    # -- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def nbytes(self) -> int:
        """Approximate memory held by the index's arrays, in bytes."""
        return (
            len(self._keys) + len(self._etags) + len(self._stamps)
            + sum(a.itemsize * len(a) for a in (self._view._off, self._sizes, self._eoff))
        )

    def _key(self, i: int) -> bytes:
        return self._view[i]

    def _file(self, i: int, path: str) -> S3Entry:
        w = self._ewidth
        if w:
            etag = self._etags[i * w : (i + 1) * w].decode("ascii", "replace")
        else:
            eoff = self._eoff
            etag = self._etags[eoff[i] : eoff[i + 1]].decode("ascii", "replace")
        stamp = self._stamps[i * STAMP_WIDTH : (i + 1) * STAMP_WIDTH]
        return S3Entry(path, self._sizes[i], etag, stamp_ns(stamp), False)

    def _lower(self, key: bytes, lo: int = 0) -> int:
        return bisect.bisect_left(self._view, key, lo, self._n)

    def _has_prefix(self, prefix: bytes, lo: int = 0) -> bool:
        i = self._lower(prefix, lo)
        return i < self._n and self._view[i].startswith(prefix)

    def stat(self, path: str) -> S3Entry | None:
        """The file at `path`, else the folder `path` (keys beneath it), else None. O(log n)."""
        if not path:
            return S3Entry("", 0, "", 0, True)
        p = path.encode("utf-8")
        i = self._lower(p)
        if i < self._n and self._view[i] == p:
            return self._file(i, path)
        if self._has_prefix(p + b"/", i):
            return S3Entry(path, 0, "", 0, True)
        return None

    def list(self, path: str, recursive: bool, start_after: str, limit: int, named_only: bool = False
             ) -> tuple[_Entries[S3Entry], bool]:
        """Entries under folder `path` ('' = root) with path > start_after, in path order.

        Immediate entries (files and folders, de-duplicated: a file and a
        folder of one name list once, as the file), or every file beneath
        `path` when `recursive`; with `named_only`, only the entries a drive
        path names. At most `limit` (<= 0: no limit); the bool says whether
        more remain.
        """
        base = path.encode("utf-8") + b"/" if path else b""
        n = self._n
        lo = self._lower(base) if base else 0
        hi = self._lower(_upper(base), lo) if base else n
        sa = start_after.encode("utf-8")
        pos = max(lo, bisect.bisect_right(self._view, sa, lo, hi)) if sa else lo
        want = limit + 1 if limit > 0 else n + 1  # one more, to know whether more remain
        entries = (self._list_recursive(pos, hi, want, named_only) if recursive
                   else self._list_children(base, sa, pos, hi, want, named_only))
        more = len(entries) >= want
        return entries[: want - 1], more

    def _list_recursive(self, pos: int, hi: int, want: int, named_only: bool) -> _Entries[S3Entry]:
        out: _Entries[S3Entry] = []
        blob, off, file = self._keys, self._view._off, self._file
        while pos < hi and len(out) < want:
            key = blob[off[pos] : off[pos + 1]]
            if key[-1] != _SLASH and (not named_only or _is_path(key)):  # folder markers are not files
                out.append(file(pos, key.decode("utf-8", "replace")))
            pos += 1
        return out

    def _list_children(self, base: bytes, sa: bytes, pos: int, hi: int, want: int, named_only: bool
                       ) -> _Entries[S3Entry]:
        blob, off, file = self._keys, self._view._off, self._file
        blen = len(base)
        scan = _Scan(named_only)
        out, emitted = scan.out, scan.emitted
        while pos < hi and len(out) < want:
            start = off[pos]
            end = off[pos + 1]
            cut = blob.find(b"/", start + blen, end)
            name = blob[start : cut if cut >= 0 else end]
            if len(name) > blen:  # skip the marker of the listed folder itself
                if _BEFORE_SLASH.search(name, blen + 1):
                    self._folders_before(name, blen, sa, pos, hi, scan)
                if name not in emitted and name > sa and (not named_only or _is_path(name)):
                    emitted.add(name)
                    path = name.decode("utf-8", "replace")
                    out.append(S3Entry(path, 0, "", 0, True) if cut >= 0 else file(pos, path))
            if cut >= 0:  # jump over the sub-folder's keys
                pos = min(self._lower(_upper(name + b"/"), pos + 1), hi)
            else:
                pos += 1
        return out

    def _folders_before(self, name: bytes, blen: int, sa: bytes, pos: int, hi: int, scan: _Scan) -> None:
        """Emits folders that sort before `name` in path order but after it in key order.

        A folder `x` (keys `x/...`) comes before `x.txt` in path order, but its
        keys come after `x.txt`'s: emit it when the scan meets `x.txt`.
        """
        if pos + 1 >= hi:
            return
        # Keys starting with a candidate `folder` are contiguous and include `name` (at pos):
        # when the next key does not start with even the shortest candidate, no `folder/...`
        # key exists (the common case, e.g. `f001.bin` after `f000.bin`).
        following = self._view[pos + 1]
        for m in _BEFORE_SLASH.finditer(name, blen + 1):
            folder = name[: m.start()]
            if not following.startswith(folder):
                return
            if folder in scan.emitted or not folder > sa or (scan.named_only and not _is_path(folder)):
                continue
            sub = folder + b"/"
            i = bisect.bisect_left(self._view, sub, pos, hi)
            if i < hi and self._view[i].startswith(sub):
                scan.emitted.add(folder)
                scan.out.append(S3Entry(folder.decode("utf-8", "replace"), 0, "", 0, True))
