"""FolderCache on a real file system: what it remembers, for how long, and how much."""

from __future__ import annotations

import os
import pathlib
import sys
import time

from drived.backends.folder_cache import FolderCache


def settled_folder(root: pathlib.Path, name: str, files: list[str]) -> pathlib.Path:
    """A folder holding `files`, its mtime 10 s in the past (older than FolderCache trusts)."""
    folder = root / name
    folder.mkdir()
    for file in files:
        (folder / file).write_bytes(b"")
    old = time.time_ns() - 10**10
    os.utime(folder, ns=(old, old))
    return folder


def remembered(cache: FolderCache, folder: pathlib.Path) -> bool:
    """Whether `cache` answers for `folder` from memory: a file added with the mtime set back is then missing."""
    before = folder.stat()
    (folder / "zz-new").write_bytes(b"")
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    return "zz-new" not in cache.read(str(folder)).names


def test_listing_is_sorted_names_with_folders_marked(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "c.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "link").symlink_to(tmp_path)
    listing = FolderCache().read(str(folder))
    assert listing.names == ("a.txt", "b.txt", "c.txt", "sub"), "sorted, symlinks left out"
    assert listing.folders == frozenset({"sub"})
    missing = FolderCache().read(str(tmp_path / "missing"))
    assert (missing.names, missing.folders) == ((), frozenset())


def test_a_settled_folder_is_remembered_until_it_changes(tmp_path):
    cache = FolderCache()
    folder = settled_folder(tmp_path, "f", ["a", "b"])
    assert cache.read(str(folder)).names == ("a", "b")
    assert remembered(cache, folder)
    (folder / "c").write_bytes(b"")  # a real change moves the mtime
    assert cache.read(str(folder)).names == ("a", "b", "c", "zz-new")


def test_a_fresh_folder_is_read_each_time(tmp_path):
    cache = FolderCache()
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a").write_bytes(b"")
    assert cache.read(str(folder)).names == ("a",)
    assert not remembered(cache, folder), "an mtime within a second of now may hide a second change"


def test_memory_is_bounded_least_recently_read_go_first(tmp_path):
    cache = FolderCache(max_bytes=4 * (sys.getsizeof("1") + 16))  # four names of one character
    a, b, c = (settled_folder(tmp_path, name, ["1", "2"]) for name in "abc")
    for folder in (a, b, c):
        cache.read(str(folder))
    assert remembered(cache, c)
    assert remembered(cache, b)
    assert not remembered(cache, a), "the least recently read folder was forgotten"
    big = settled_folder(tmp_path, "big", ["1", "2", "3", "4", "5"])
    cache.read(str(big))
    assert not remembered(cache, big), "a folder of more names than the bound is never remembered"


def test_long_names_take_more_of_the_bound(tmp_path):
    """The bound was 200,000 names whatever their length: some 13 MB of 8-character names, 60 MB of 255."""
    cache = FolderCache(max_bytes=4 * (sys.getsizeof("1") + 16))
    short = settled_folder(tmp_path, "short", ["1", "2", "3"])
    long = settled_folder(tmp_path, "long", ["a" * 100, "b" * 100])
    cache.read(str(short))
    cache.read(str(long))
    assert remembered(cache, short)
    assert not remembered(cache, long), "two names of 100 characters weigh more than four of one"
