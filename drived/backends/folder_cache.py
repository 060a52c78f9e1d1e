"""FolderCache: a folder's entries, read once and remembered while the folder is unchanged.

Every put asks for its drive's component folders, and every page of a
listing for the whole folder it lists (a page is cut from the sorted
names), so reading a folder each time made paging through a big one cost
O(entries) per page. A folder's mtime changes whenever an entry is added,
removed or renamed: the names read are remembered with the folder's inode
and mtime, and read again when either changes. An mtime less than
`SETTLED_NS` old is not trusted: a second change within one tick of the
file system's clock would leave it as it was.

What is remembered is bounded by the memory it takes (`MAX_BYTES`): each
listing's path and names, and what holding a listing costs besides, so
that listings of no names (a file's path listed as a folder) and long
paths count too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .base import Listing

SETTLED_NS = 1_000_000_000  # a folder's mtime this old changes with its next change
MAX_BYTES = 20 << 20  # what the listings remembered take at most (some 200,000 names); the least recently read
# go first
# What a remembered listing takes beside the strings of its path and names (its entry, the Listing), and each name
# beside its string (its places in the Listing's tuples and set); measured with tracemalloc.
LISTING_BYTES = 512
NAME_BYTES = 40
EMPTY = Listing((), frozenset(), ())


def scan(folder: str) -> Listing:
    """The files and sub-folders of `folder` by name, from their entries' types (no stat of each).

    Symbolic links are neither followed nor listed. A missing folder is empty.
    """
    names: list[str] = []
    folders: set[str] = set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.add(entry.name)
                    names.append(entry.name)
                elif entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return EMPTY
    names.sort()
    in_order = tuple(names)
    by_name = Listing(in_order, frozenset(folders), in_order)
    if not folders:  # then the keys beneath sort as the names do
        return by_name
    return Listing(by_name.names, by_name.folders, tuple(sorted(names, key=by_name.key_of)))


class FolderCache:
    """Listings of folders, each remembered until its folder's inode or mtime changes."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        # path -> ((inode, mtime), listing, what remembering it takes), least recently read first
        self._known: OrderedDict[str, tuple[tuple[int, int], Listing, int]] = OrderedDict()
        self._bytes = 0  # what self._known takes
        self._lock = threading.Lock()  # read from the event loop and from worker threads

    def read(self, folder: str) -> Listing:
        """The entries of `folder` (see `scan`), from memory while the folder is unchanged."""
        try:
            st = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            return EMPTY
        version = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(folder)
            if known is not None:
                self._known.move_to_end(folder)
        if known is not None and known[0] == version:
            return known[1]
        listing = scan(folder)
        if time.time_ns() - st.st_mtime_ns > SETTLED_NS:
            self._remember(folder, version, listing)
        return listing

    def _remember(self, folder: str, version: tuple[int, int], listing: Listing) -> None:
        """Remembers `listing` unless it alone takes more than the bound, forgetting the least recently read ones
        past it."""
        size = LISTING_BYTES + sys.getsizeof(folder) + sum(NAME_BYTES + sys.getsizeof(name) for name in listing.names)
        if size > self._max_bytes:
            return
        with self._lock:
            old = self._known.pop(folder, None)
            if old is not None:
                self._bytes -= old[2]
            self._known[folder] = (version, listing, size)
            self._bytes += size
            while self._bytes > self._max_bytes:  # never the one just added: it fits alone
                _, (_, _, evicted) = self._known.popitem(last=False)
                self._bytes -= evicted

    def keep_only(self, wanted: Callable[[str], bool]) -> None:
        """Forgets the listings of the folders not `wanted`."""
        with self._lock:
            for folder in [folder for folder in self._known if not wanted(folder)]:
                self._bytes -= self._known.pop(folder)[2]
