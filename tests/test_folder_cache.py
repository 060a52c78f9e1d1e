"""FolderCache on a real file system: what it remembers, for how long, and how much."""

from __future__ import annotations

import os
import pathlib
import time

from drive_client import Drive
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
    a, b, c = (settled_folder(tmp_path, name, ["1", "2"]) for name in "abc")
    one = FolderCache()
    one.read(str(a))
    cache = FolderCache(max_bytes=2 * one._bytes)  # two such folders
    for folder in (a, b, c):
        cache.read(str(folder))
    assert remembered(cache, c)
    assert remembered(cache, b)
    assert not remembered(cache, a), "the least recently read folder was forgotten"
    big = settled_folder(tmp_path, "big", [str(i) for i in range(40)])
    cache.read(str(big))
    assert not remembered(cache, big), "a folder larger than the bound is never remembered"


def test_listings_of_no_names_and_long_paths_count_toward_the_bound(tmp_path):
    """A listing of no names (a file read as a folder, an empty folder) counted nothing, and a long path as much
    as a short one: remembering any number of them pushed nothing out."""
    kept = settled_folder(tmp_path, "kept", ["1"])
    cache = FolderCache(max_bytes=64 << 10)
    cache.read(str(kept))
    assert remembered(cache, kept)
    files = settled_folder(tmp_path, "x" * 200, [f"{i:03d}" + "y" * 200 for i in range(100)])
    for file in files.iterdir():
        os.utime(file, ns=(0, 0))  # settled too
        cache.read(str(file))
    assert not remembered(cache, kept), "100 listings of files took more than 64 KiB: older ones were forgotten"


def test_a_daemon_listing_files_one_by_one_keeps_its_folder_cache_within_its_bound(start_daemon, tmp_path):
    """A List of a file's path reads that path as a folder: before, each was remembered for nothing, so a client
    listing a drive's files one by one grew the daemon for as long as it had files to list (with 3.5 KB paths,
    about 4 KiB each: 25 MiB for 6,000). With the bound lowered to 64 KiB, 200 such listings push out a folder
    listed before them."""
    bound = "import drived.backends.folder_cache as cache\ncache.FolderCache.__init__.__defaults__ = (64 << 10,)"
    handle = start_daemon(tmp_path, before=bound)
    drive = Drive("lit://listed", endpoint=handle.endpoint, retry_seconds=0)
    files = tmp_path / "files"
    for i in range(200):
        (files / "many").mkdir(parents=True, exist_ok=True)
        (files / "many" / f"{i:03d}.txt").write_bytes(b"x")
    (files / "kept").mkdir()
    (files / "kept" / "a.txt").write_bytes(b"a")
    drive.put(files / "many", to="many")
    drive.put(files / "kept", to="kept")
    time.sleep(1.1)  # their folders' mtimes are settled: the listings are remembered
    assert drive.list("kept") == ["kept/a.txt"]
    stored = handle.data_dir / "objects" / "listed" / "default" / "kept"
    assert remembered_by_daemon(drive, stored), "the daemon answers the folder from its cache"
    for i in range(200):
        assert drive.list(f"many/{i:03d}.txt") == [f"many/{i:03d}.txt"]
    assert not remembered_by_daemon(drive, stored), "200 listings of files pushed the older listing out"


def remembered_by_daemon(drive: Drive, folder: pathlib.Path) -> bool:
    """Whether the daemon lists `folder` (a stored folder of the drive) from memory: a file planted in it with its
    mtime set back is then missing; the file is removed again, its mtime set back too."""
    before = folder.stat()
    planted = folder / "zz-planted"
    planted.write_bytes(b"")
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    try:
        return "kept/zz-planted" not in drive.list("kept")
    finally:
        planted.unlink()
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
