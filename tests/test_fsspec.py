"""The `lit` fsspec filesystem, through fsspec's own API (and pandas when installed), against the
session daemon: URLs, ls/info/find, cat and ranges, get/put, rm, write spooling, errors,
no stale listings, and block-sized streaming reads measured in the daemon's request log."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import hashlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import unicodedata

import fsspec
import pytest
from conftest import MIB, file_sha256, sha256_hex, wait_until, write_random_file

import drive_client.fsspec
from drive_client import AmbiguousPathError, Drive, StaleIndexError
from drive_client.files import write_all
from drive_client.fsspec import AsyncDriveFileSystem, DriveFileSystem

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fs(daemon) -> DriveFileSystem:
    return fsspec.filesystem("lit", endpoint=daemon.endpoint, component_name="work_a")


@pytest.fixture
def name(drive_uri: str) -> str:
    """The drive's name: fsspec paths are NAME/path/in/drive."""
    return drive_uri.removeprefix("lit://")


def drive(daemon, uri: str, component: str, **kw) -> Drive:
    return Drive(uri, component_name=component, endpoint=daemon.endpoint, **kw)


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def get_requests(daemon, drive_uri: str) -> list[dict]:
    """The daemon's request-log lines for Get calls on `drive_uri`."""
    lines = []
    for line in daemon.log().splitlines():
        if '"request"' not in line or drive_uri not in line:
            continue
        record = json.loads(line)
        if record.get("method") == "Get" and record.get("drive") == drive_uri:
            lines.append(record)
    return lines


# --- registration, URLs --------------------------------------------------------------------


def test_entry_point_and_open_by_url(daemon, monkeypatch, drive_uri, name):
    assert fsspec.get_filesystem_class("lit") is DriveFileSystem
    assert type(fsspec.filesystem("lit", endpoint=daemon.endpoint, asynchronous=True)) is AsyncDriveFileSystem
    monkeypatch.setenv("DRIVE_ENDPOINT", daemon.endpoint)
    monkeypatch.setenv("DRIVE_COMPONENT", "url_writer")
    with fsspec.open(f"{drive_uri}/dir/a.txt", "wb") as f:
        f.write(b"hello ")
        f.write(b"fsspec")
    with fsspec.open(f"{drive_uri}/dir/a.txt", "rb") as f:
        assert f.read() == b"hello fsspec"
    with fsspec.open(f"{drive_uri}/dir/b.txt", "w") as f:  # text mode
        f.write("line 1\nline 2\n")
    with fsspec.open(f"{drive_uri}/dir/b.txt", "r") as f:
        assert f.readlines() == ["line 1\n", "line 2\n"]
    stat = drive(daemon, drive_uri, "reader").stat("dir/a.txt")
    assert (stat.size, stat.component, stat.sha256) == (12, "url_writer", sha256_hex(b"hello fsspec"))
    fs, path = fsspec.core.url_to_fs(f"{drive_uri}/dir/a.txt")
    assert isinstance(fs, DriveFileSystem) and path == f"{name}/dir/a.txt"
    assert fs.unstrip_protocol(path) == f"{drive_uri}/dir/a.txt"


def test_only_lit_paths(fs):
    with pytest.raises(ValueError, match="lit:// drives only"):
        fs.ls("s3://bucket/prefix/")
    with pytest.raises(ValueError, match="drive name"):
        fs.ls("lit://bad name")
    with pytest.raises(ValueError, match=r"\.\."):
        fs.cat("lit://d1/../x")


def test_slashes_after_the_drive_name_are_one(fs, drive_uri, name):
    """`lit://d//x.txt` raised "path '/x.txt' is absolute", though `//` deeper in a path is taken as one `/`."""
    fs.pipe_file(f"{drive_uri}//dir//x.txt", b"x")
    assert fs.cat(f"{drive_uri}//dir/x.txt") == b"x" and fs.cat(f"{name}///dir/x.txt") == b"x"
    assert fs.ls(f"{drive_uri}//", detail=False) == [f"{name}/dir"]
    assert fs.info(f"{drive_uri}//dir//x.txt")["name"] == f"{name}/dir/x.txt"


# --- listing, info, find -------------------------------------------------------------------


def test_ls_info_find(fs, daemon, tmp_path, drive_uri, name):
    write(tmp_path / "src" / "a.txt", b"aaa")
    write(tmp_path / "src" / "sub" / "b.bin", b"b" * 1000)
    write(tmp_path / "src" / "sub" / "deep" / "c.txt", b"c")
    fs.put(str(tmp_path / "src") + "/", name, recursive=True)
    write(tmp_path / "other.txt", b"other component")
    drive(daemon, drive_uri, "work_b", root_folder=tmp_path).put("other.txt")

    root = fs.ls(f"lit://{name}")
    assert [(e["name"], e["type"]) for e in root] == [
        (f"{name}/a.txt", "file"), (f"{name}/other.txt", "file"), (f"{name}/sub", "directory"),
    ]
    by_name = {e["name"]: e for e in root}
    assert by_name[f"{name}/a.txt"]["size"] == 3
    assert by_name[f"{name}/a.txt"].get("sha256", sha256_hex(b"aaa")) == sha256_hex(b"aaa")  # when listed
    assert by_name[f"{name}/a.txt"]["component"] == "work_a"
    assert by_name[f"{name}/other.txt"]["component"] == "work_b"
    assert fs.ls(name, detail=False) == [f"{name}/a.txt", f"{name}/other.txt", f"{name}/sub"]
    assert fs.ls(f"{name}/sub/", detail=False) == [f"{name}/sub/b.bin", f"{name}/sub/deep"]
    assert fs.ls(f"{name}/a.txt", detail=False) == [f"{name}/a.txt"]  # a file lists itself

    info = fs.info(f"lit://{name}/sub/b.bin")
    assert info["name"] == f"{name}/sub/b.bin" and info["type"] == "file" and info["size"] == 1000
    assert info["sha256"] == sha256_hex(b"b" * 1000) and info["component"] == "work_a"
    assert isinstance(info["modified"], datetime.datetime) and fs.modified(f"{name}/sub/b.bin") == info["modified"]
    assert fs.ukey(f"{name}/sub/b.bin") == info["sha256"]
    assert fs.info(f"{name}/sub")["type"] == "directory"
    assert fs.info(name)["type"] == "directory"
    assert fs.size(f"{name}/a.txt") == 3
    assert fs.isdir(f"{name}/sub") and not fs.isdir(f"{name}/a.txt")
    assert fs.isfile(f"{name}/a.txt") and not fs.isfile(f"{name}/sub")
    assert fs.exists(f"{name}/sub/deep/c.txt") and not fs.exists(f"{name}/nope.txt")

    assert fs.find(name) == [
        f"{name}/a.txt", f"{name}/other.txt", f"{name}/sub/b.bin", f"{name}/sub/deep/c.txt",
    ]
    assert fs.find(f"{name}/sub", withdirs=True) == [
        f"{name}/sub", f"{name}/sub/b.bin", f"{name}/sub/deep", f"{name}/sub/deep/c.txt",
    ]
    assert fs.find(f"{name}/sub", maxdepth=1) == [f"{name}/sub/b.bin"]
    assert fs.find(f"{name}/a.txt") == [f"{name}/a.txt"]
    assert fs.find(f"{name}/missing") == []
    assert fs.find(name, detail=True)[f"{name}/sub/b.bin"]["size"] == 1000
    assert sorted(fs.glob(f"{name}/sub/**/*.txt")) == [f"{name}/sub/deep/c.txt"]
    assert fs.du(f"{name}/sub") == 1001


def test_listings_are_never_stale(fs, daemon, tmp_path, drive_uri, name):
    again = fsspec.filesystem("lit", endpoint=fs.endpoint, component_name="work_a")
    assert again is fs  # the instance cache: same options, same instance (it caches no listings)
    assert fs.ls(name) == []
    other = drive(daemon, drive_uri, "work_b", root_folder=tmp_path)
    write(tmp_path / "new.txt", b"from another worker")
    other.put("new.txt")
    assert fs.ls(name, detail=False) == [f"{name}/new.txt"]
    assert fs.exists(f"{name}/new.txt") and fs.cat(f"{name}/new.txt") == b"from another worker"
    other.delete("new.txt")
    assert fs.ls(name) == [] and not fs.exists(f"{name}/new.txt") and fs.find(name) == []


# --- reading ---------------------------------------------------------------------------------


def test_cat_and_ranges(fs, name):
    data = bytes(range(256)) * 40  # 10240 bytes
    fs.pipe(f"{name}/r.bin", data)
    assert fs.cat(f"lit://{name}/r.bin") == data
    assert fs.cat_file(f"{name}/r.bin", 100, 300) == data[100:300]
    assert fs.cat_file(f"{name}/r.bin", start=10000) == data[10000:]
    assert fs.cat_file(f"{name}/r.bin", end=5) == data[:5]
    assert fs.cat_file(f"{name}/r.bin", -10) == data[-10:]
    assert fs.cat_file(f"{name}/r.bin", 5, -5) == data[5:-5]
    assert fs.cat_file(f"{name}/r.bin", 20000, 30000) == b""  # past the end: empty, like a slice
    assert fs.cat_file(f"{name}/r.bin", 300, 100) == b""
    assert fs.cat_ranges([f"{name}/r.bin"] * 2, [0, 512], [4, 516]) == [data[0:4], data[512:516]]
    assert fs.head(f"{name}/r.bin", 7) == data[:7] and fs.tail(f"{name}/r.bin", 7) == data[-7:]
    assert fs.read_block(f"{name}/r.bin", 1000, 24) == data[1000:1024]
    fs.pipe(f"{name}/empty", b"")
    assert fs.cat(f"{name}/empty") == b"" and fs.info(f"{name}/empty")["size"] == 0
    with fs.open(f"{name}/r.bin", "rb", block_size=1000) as f:
        f.seek(5000)
        assert f.read(10) == data[5000:5010]
        assert f.tell() == 5010
        f.seek(-4, 2)
        assert f.read() == data[-4:]
    assert fs.cat([f"{name}/r.bin", f"{name}/empty"]) == {f"{name}/r.bin": data, f"{name}/empty": b""}


def test_reading_streams_block_by_block(fs, daemon, tmp_path, drive_uri, name):
    """Reading 1 MiB of a 64 MiB file fetches about one block, not the file (the daemon's log counts)."""
    size = 64 * MIB
    local = tmp_path / "big.bin"
    write_random_file(local, size)
    fs.put_file(str(local), f"{name}/big.bin")
    assert get_requests(daemon, drive_uri) == []
    with open(local, "rb") as src, fs.open(f"{name}/big.bin", "rb") as f:
        assert f.size == size and f.blocksize == 5 * MIB
        assert f.read(MIB) == src.read(MIB)
        f.seek(40 * MIB)
        src.seek(40 * MIB)
        assert f.read(MIB) == src.read(MIB)
    assert wait_until(lambda: len(get_requests(daemon, drive_uri)) >= 2), daemon.log()[-2000:]
    gets = get_requests(daemon, drive_uri)
    served = sum(g["bytes"] for g in gets)
    assert len(gets) == 2, gets
    assert all(g["bytes"] <= 6 * MIB for g in gets), gets  # the read plus one block of read-ahead
    assert served <= 12 * MIB, f"{served} bytes served for 2 MiB read from a {size}-byte file"


def test_block_size_and_cache_type_storage_options(daemon, drive_uri, name):
    """`block_size` and `cache_type` given to the filesystem (fsspec.open's and pandas' storage_options) are what
    its files read with; `open`'s own arguments override them."""
    data = os.urandom(4 * MIB)
    fs = DriveFileSystem(endpoint=daemon.endpoint, block_size=MIB, cache_type="none", skip_instance_cache=True)
    fs.pipe(f"{name}/o.bin", data)
    with fsspec.open(f"{drive_uri}/o.bin", "rb", endpoint=daemon.endpoint, block_size=MIB, cache_type="none") as f:
        assert (f.blocksize, f.cache.name) == (MIB, "none")
        assert f.read(10) == data[:10]  # no read-ahead: 10 bytes asked, 10 fetched
        f.seek(2 * MIB)
        assert f.read(10) == data[2 * MIB:2 * MIB + 10]
    with fsspec.open(f"{drive_uri}/o.bin", "rb", endpoint=daemon.endpoint, block_size=MIB) as f:
        assert (f.blocksize, f.cache.name) == (MIB, "readahead")
        assert f.read(10) == data[:10]  # 10 bytes and a block of read-ahead
    with fs.open(f"{name}/o.bin", "rb", block_size=2 * MIB, cache_type="readahead") as f:
        assert (f.blocksize, f.cache.name) == (2 * MIB, "readahead")
    assert wait_until(lambda: len(get_requests(daemon, drive_uri)) >= 3), daemon.log()[-2000:]
    assert [g["bytes"] for g in get_requests(daemon, drive_uri)] == [10, 10, 10 + MIB]

    for bad, message in (({"block_size": 0}, "block_size"), ({"block_size": "5MB"}, "block_size"),
                         ({"cache_type": "lru"}, "readahead")):
        with pytest.raises(ValueError, match=message):
            DriveFileSystem(endpoint=daemon.endpoint, skip_instance_cache=True, **bad)
    assert fs.cat(f"{name}/o.bin") == data


def test_read_of_replaced_file_fails_stale(fs, daemon, tmp_path, drive_uri, name):
    """Blocks of one open file come from one version: a replacement midway raises StaleIndexError."""
    write(tmp_path / "v.bin", b"1" * (3 * MIB))
    owner = drive(daemon, drive_uri, "work_a", root_folder=tmp_path)
    owner.put("v.bin")
    with fs.open(f"{name}/v.bin", "rb", block_size=MIB) as f:
        assert f.read(10) == b"1" * 10
        write(tmp_path / "v.bin", b"2" * (3 * MIB))
        owner.put("v.bin")
        f.seek(2 * MIB)
        with pytest.raises(StaleIndexError):
            f.read(10)
    assert fs.cat_file(f"{name}/v.bin", 0, 3) == b"222"
    with fs.open(f"{name}/v.bin", "rb", block_size=MIB) as f:
        assert f.read(3) == b"222"
        write(tmp_path / "v.bin", b"3" * (3 * MIB))
        owner.put("v.bin")
        out = bytearray(2 * MIB)
        with pytest.raises(StaleIndexError):  # a read past the cache is pinned alike
            f.readinto(out)


def test_large_reads_are_fetched_once_into_their_destination(fs, daemon, drive_uri, name):
    """A read of a block or more skips the read-ahead: one Get of exactly its bytes, into the caller's buffer
    (readinto) or the bytes returned; smaller reads still go through the cache, from the right place."""
    data = os.urandom(12 * MIB + 5)
    fs.pipe(f"{name}/big.bin", data)
    with fs.open(f"{name}/big.bin", "rb", block_size=MIB) as f:
        assert f.read(10) == data[:10]  # through the cache: 10 bytes and a block ahead
        out = bytearray(3 * MIB)
        assert f.readinto(out) == 3 * MIB and out == data[10:10 + 3 * MIB]
        assert f.tell() == 10 + 3 * MIB
        assert f.read(4 * MIB) == data[10 + 3 * MIB:10 + 7 * MIB]
        assert f.read(3) == data[10 + 7 * MIB:13 + 7 * MIB]
        f.seek(-(2 * MIB), 2)
        rest = bytearray(3 * MIB)  # more than is left: fills what there is, like a local file
        assert f.readinto(rest) == 2 * MIB and rest[:2 * MIB] == data[-2 * MIB:]
        f.seek(5 * MIB)
        assert f.read() == data[5 * MIB:]
        assert f.read() == b"" and f.readinto(out) == 0
    with fs.open(f"{name}/big.bin", "rb", block_size=MIB, cache_type="all") as f:  # a cache that serves all reads
        f.seek(MIB)
        assert f.read(4 * MIB) == data[MIB:5 * MIB]
    assert wait_until(lambda: len(get_requests(daemon, drive_uri)) >= 7), daemon.log()[-2000:]
    served = sorted(g["bytes"] for g in get_requests(daemon, drive_uri))
    assert served == sorted([10 + MIB, 3 * MIB, 4 * MIB, 3 + MIB, 2 * MIB, len(data) - 5 * MIB, len(data)])


# --- get, put, write ---------------------------------------------------------------------------


def test_put_get_files_and_folders(fs, tmp_path, name):
    src = tmp_path / "src"
    write(src / "x.txt", b"x")
    write(src / "nested" / "y.bin", os.urandom(3000))
    fs.put(str(src / "x.txt"), f"lit://{name}/single.txt")
    fs.put(str(src), f"{name}/tree", recursive=True)
    assert fs.find(f"{name}/tree") == [f"{name}/tree/nested/y.bin", f"{name}/tree/x.txt"]

    fs.get(f"{name}/single.txt", str(tmp_path / "out" / "single.txt"))
    assert (tmp_path / "out" / "single.txt").read_bytes() == b"x"
    write(tmp_path / "out" / "single.txt", b"old local contents")
    fs.get(f"lit://{name}/single.txt", str(tmp_path / "out" / "single.txt"))  # fsspec overwrites
    assert (tmp_path / "out" / "single.txt").read_bytes() == b"x"
    fs.get(f"{name}/tree", str(tmp_path / "copy"), recursive=True)
    assert (tmp_path / "copy" / "nested" / "y.bin").read_bytes() == (src / "nested" / "y.bin").read_bytes()
    assert (tmp_path / "copy" / "x.txt").read_bytes() == b"x"
    assert not list((tmp_path / "copy").rglob("*.part"))  # downloads land whole

    fs.copy(f"{name}/tree/x.txt", f"{name}/copied.txt")
    assert fs.cat(f"{name}/copied.txt") == b"x"
    fs.mv(f"{name}/copied.txt", f"{name}/moved.txt")
    assert fs.cat(f"{name}/moved.txt") == b"x" and not fs.exists(f"{name}/copied.txt")


def stored(fs: DriveFileSystem, name: str) -> dict[str, bytes]:
    """Every file of drive `name` and its bytes."""
    return {path: fs.cat_file(path) for path in fs.find(name)}


NFC, NFD = unicodedata.normalize("NFC", "é.txt"), unicodedata.normalize("NFD", "é.txt")


@pytest.mark.parametrize(("source", "target", "recursive"), [
    ("lit://{n}/ck/a.txt", "{n}//ck/./a.txt", False),  # a file onto itself, spelled otherwise
    (f"{{n}}/ck/{NFC}", f"{{n}}/ck/{NFD}", False),  # ... or decomposed
    ("{n}/ck/a.txt", "{n}/ck", False),  # a file into the folder it is in
    ("{n}/ck/*.txt", "{n}/ck/", False),  # a glob into the folder its files are in
    ("{n}/ck", "{n}/ck/", True),  # a folder onto itself
    ("lit://{n}/ck", "{n}/ck", True),
    ("{n}/ck/sub", "{n}/ck", True),  # a folder into the folder it is in
    (["{n}/ck"], ["{n}/elsewhere"], True),  # a folder in lists, which fsspec's copy does not expand
])
def test_a_move_removes_only_what_it_copied_elsewhere(fs, name, source, target, recursive):
    """fsspec's mv copies, then removes the source whole (`rm(path1, recursive)`): every move above copied each
    file onto itself (or nothing) and then removed it, so the files were lost. Each leaves the drive as it was."""
    fs.pipe({f"{name}/ck/a.txt": b"a", f"{name}/ck/{NFC}": b"e", f"{name}/ck/sub/b.txt": b"b"})
    before = stored(fs, name)

    def spelled(path):
        return [p.format(n=name) for p in path] if isinstance(path, list) else path.format(n=name)

    fs.mv(spelled(source), spelled(target), recursive=recursive)
    assert stored(fs, name) == before


def test_an_async_move_of_a_file_onto_itself_leaves_it(fs, afs, name):
    """`_mv_file` (fsspec's: copy, then remove) removed a file moved onto itself, spelled otherwise."""
    fs.pipe({f"{name}/a.txt": b"a", f"{name}/{NFC}": b"e"})
    asyncio.run(afs._mv_file(f"lit://{name}/a.txt", f"{name}//a.txt"))
    asyncio.run(afs._mv_file(f"{name}/{NFC}", f"{name}/{NFD}"))
    assert stored(fs, name) == {f"{name}/a.txt": b"a", f"{name}/{NFC}": b"e"}
    asyncio.run(afs._mv_file(f"{name}/a.txt", f"{name}/b.txt"))
    assert stored(fs, name) == {f"{name}/b.txt": b"a", f"{name}/{NFC}": b"e"}
    with pytest.raises(FileNotFoundError):
        asyncio.run(afs._mv_file(f"{name}/nope.txt", f"{name}//nope.txt"))


@pytest.mark.parametrize("target", ["{n}/ck/old", "lit://{n}/ck//old/", "{n}/ck/sub/x"])
def test_a_folder_moved_into_itself_is_refused(fs, name, target):
    """As `shutil.move` refuses it: fsspec's copy then removal of the folder removed the copies too."""
    fs.pipe({f"{name}/ck/a.txt": b"a", f"{name}/ck/sub/b.txt": b"b"})
    before = stored(fs, name)
    with pytest.raises(ValueError, match="into itself"):
        fs.mv(f"{name}/ck", target.format(n=name), recursive=True)
    with pytest.raises(ValueError, match="into itself"):
        fs.mv(f"lit://{name}", target.format(n=name), recursive=True)
    assert stored(fs, name) == before


def test_a_folders_files_copy_and_move_into_a_folder_that_exists(fs, name):
    """fsspec's `copy("src/", "dst/", recursive=True)` copies the files of src into dst; with dst there, the first
    pair (src onto dst, folders) was refused as a write onto a folder, and nothing was copied or moved."""
    fs.pipe({f"{name}/src/a.txt": b"a", f"{name}/src/sub/b.txt": b"b", f"{name}/dst/old.txt": b"o"})
    fs.copy(f"{name}/src/", f"{name}/dst/", recursive=True)
    assert stored(fs, name) == {f"{name}/dst/a.txt": b"a", f"{name}/dst/old.txt": b"o", f"{name}/dst/sub/b.txt": b"b",
                                f"{name}/src/a.txt": b"a", f"{name}/src/sub/b.txt": b"b"}
    fs.pipe_file(f"{name}/src/a.txt", b"a2")
    fs.mv(f"{name}/src/", f"{name}/dst/", recursive=True)
    assert stored(fs, name) == {f"{name}/dst/a.txt": b"a2", f"{name}/dst/old.txt": b"o", f"{name}/dst/sub/b.txt": b"b"}


def test_a_folder_move_moves_this_components_files_and_copies_the_others(fs, daemon, name):
    """`rm` of a folder removes only this component's files; a move of a folder removed each file after its copy,
    and at the first file of another component (which it may not remove) stopped with NotFound: the folder was
    half moved, the files after it not moved at all. Another's file is copied and left; moved by its own path, it is
    refused before anything is copied, as `rm` of it is."""
    theirs = fsspec.filesystem("lit", endpoint=daemon.endpoint, component_name="work_b", skip_instance_cache=True)
    fs.pipe({f"{name}/src/a.txt": b"a", f"{name}/src/z.txt": b"z"})
    theirs.pipe_file(f"{name}/src/m.txt", b"m")
    fs.mv(f"{name}/src", f"{name}/dst", recursive=True)
    assert stored(fs, name) == {f"{name}/dst/a.txt": b"a", f"{name}/dst/m.txt": b"m", f"{name}/dst/z.txt": b"z",
                                f"{name}/src/m.txt": b"m"}
    assert fs.info(f"{name}/src/m.txt")["component"] == "work_b"
    before = stored(fs, name)
    with pytest.raises(FileNotFoundError, match="work_b"):
        fs.mv(f"lit://{name}/src//m.txt", f"{name}/m2.txt")
    with pytest.raises(FileNotFoundError, match="work_b"):
        asyncio.run(fsspec.filesystem("lit", asynchronous=True, endpoint=daemon.endpoint, component_name="work_a",
                                      skip_instance_cache=True)._mv_file(f"{name}/src/m.txt", f"{name}/m2.txt"))
    assert stored(fs, name) == before


def test_write_round_trip_multi_mib_spools_to_disk(daemon, tmp_path, name):
    spool = tmp_path / "spool"
    spool.mkdir()
    fs = DriveFileSystem(endpoint=daemon.endpoint, component_name="work_a", spool_dir=str(spool),
                         skip_instance_cache=True)
    digest = hashlib.sha256()
    written = 0
    # Odd sizes, so that blocks do not line up with writes; small writes gather, big ones go straight to disk.
    sizes = [MIB - 7 + i for i in range(12)] + [10, 100, 3 * MIB + 1, 5, MIB, 7, 2 * MIB, 1]
    with fs.open(f"{name}/big/w.bin", "wb", block_size=MIB) as f:
        [spooled] = spool.iterdir()
        for size in sizes:
            piece = os.urandom(size)
            digest.update(piece)
            assert f.write(memoryview(piece)) == size
            written += size
            assert f.tell() == written
            assert spooled.stat().st_size >= written - MIB  # bounded memory: at most a block is not on disk
        assert not fs.exists(f"{name}/big/w.bin")  # nothing visible before close
    assert list(spool.iterdir()) == []  # the spool is removed once put
    info = fs.info(f"{name}/big/w.bin")
    assert info["sha256"] == digest.hexdigest() and info["size"] == written
    got = hashlib.sha256()
    with fs.open(f"{name}/big/w.bin", "rb", block_size=2 * MIB) as f:
        while piece := f.read(MIB + 3):
            got.update(piece)
    assert got.hexdigest() == digest.hexdigest()
    fs.get(f"{name}/big/w.bin", str(tmp_path / "w.bin"))
    assert file_sha256(tmp_path / "w.bin") == digest.hexdigest()


def test_exception_inside_with_stores_nothing(daemon, tmp_path, name):
    spool = tmp_path / "spool"
    spool.mkdir()
    fs = DriveFileSystem(endpoint=daemon.endpoint, spool_dir=str(spool), skip_instance_cache=True)
    with pytest.raises(RuntimeError, match="boom"), fs.open(f"{name}/half.bin", "wb", block_size=MIB) as f:
        f.write(os.urandom(3 * MIB))
        raise RuntimeError("boom")
    assert not fs.exists(f"{name}/half.bin")
    assert list(spool.iterdir()) == []


def test_a_write_that_fails_midway_keeps_the_previous_file(daemon, tmp_path, drive_uri, name):
    """fsspec's `OpenFile` (`fsspec.open`) and text wrappers close their file at the end of a `with` block without
    the exception that ends it, as a `finally:` does, and the close put what was written: a `torch.save` that failed
    midway replaced the last good checkpoint with half of one. A file closed while an exception unwinds now puts
    nothing; one closed normally in an `except:` block that ran when it was opened, or after an exception caught
    inside its block, is put."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch.save case is skipped")
    spool = tmp_path / "spool"
    spool.mkdir()
    options = {"endpoint": daemon.endpoint, "spool_dir": str(spool)}
    good = {"w": torch.arange(4.0)}
    with fsspec.open(f"{drive_uri}/model.pt", "wb", **options) as f:
        torch.save(good, f)
    with pytest.raises((AttributeError, pickle.PicklingError)), fsspec.open(f"{drive_uri}/model.pt", "wb",
                                                                           **options) as f:
        torch.save({"w": torch.ones(1 << 18), "callback": lambda: 0}, f)  # a lambda does not pickle
    with fsspec.open(f"{drive_uri}/model.pt", "rb", **options) as f:
        assert torch.equal(torch.load(f)["w"], good["w"])

    fs = DriveFileSystem(skip_instance_cache=True, **options)
    path = f"{name}/notes.txt"
    fs.pipe_file(path, b"v1")
    with pytest.raises(RuntimeError, match="boom"), fsspec.open(f"{drive_uri}/notes.txt", "w", **options) as text:
        text.write("half")
        raise RuntimeError("boom")
    assert fs.cat(path) == b"v1"
    f = fs.open(path, "wb")
    with pytest.raises(RuntimeError, match="boom"):
        try:
            f.write(b"half")
            raise RuntimeError("boom")
        finally:
            f.close()
    assert f.closed and fs.cat(path) == b"v1"
    try:
        raise KeyError("handled")
    except KeyError:
        with pytest.raises(RuntimeError, match="boom"), fs.open(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("boom") from None  # another exception inside the handler: nothing is put
        assert fs.cat(path) == b"v1"
        with fs.open(path, "wb") as f:  # the handler's own exception was there at open: put
            f.write(b"v2")
    assert fs.cat(path) == b"v2"
    with fs.open(path, "wb") as f:
        try:
            raise KeyError("caught")
        except KeyError:
            f.write(b"v3")
    assert fs.cat(path) == b"v3"
    assert list(spool.iterdir()) == []


def test_a_files_own_with_decides_by_the_exception_that_ends_it(spooling, name):
    """A file's own `with` says whether an exception ends it, where the exception being handled can mislead: an
    `ExitStack` runs the file's exit while the exception a later context suppressed is still being handled, and a
    block inside an `except:` can raise the handled exception again. What a close without it sees (fsspec's
    `OpenFile`, a text wrapper) tells a raise of the same exception again by its new traceback."""
    path = f"{name}/f.txt"
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(spooling.open(path, "wb"))
        stack.enter_context(contextlib.suppress(TimeoutError))
        f.write(b"whole")
        raise TimeoutError("an optional step timed out")  # suppressed: the file's block ends normally
    assert spooling.cat(path) == b"whole"
    options = {"endpoint": spooling.endpoint, "component_name": "work_a", "spool_dir": spooling.spool_dir}
    with pytest.raises(ValueError, match="handled"):
        try:
            raise ValueError("handled")
        except ValueError:
            with spooling.open(path, "wb") as f:
                f.write(b"half")
                raise  # the exception being handled at open: only the file's exit tells that it ends the block
    assert spooling.cat(path) == b"whole"
    with pytest.raises(ValueError, match="handled"):
        try:
            raise ValueError("handled")
        except ValueError as error:
            with fsspec.open(f"lit://{path}", "w", **options) as text:
                text.write("half")
                raise error  # the same exception, with a new traceback
    assert spooling.cat(path) == b"whole"

    def sink():
        with spooling.open(path, "wb") as f:
            while True:
                f.write((yield))

    writer = sink()
    next(writer)
    writer.send(b"half")
    writer.close()  # GeneratorExit ends the file's block: nothing is put
    assert spooling.cat(path) == b"whole"
    assert list(pathlib.Path(spooling.spool_dir).iterdir()) == []


@pytest.mark.parametrize("how", ["binary", "text", "fsspec.open text"])
def test_a_writer_collected_unclosed_stores_nothing(spooling, name, how):
    """fsspec's files close themselves when collected unclosed, as text wrappers close their file, and a close
    puts: a writer dropped after an error, without `with` or `close()`, replaced the last good file with its
    partial bytes. It now stores nothing and removes its spool, warning as Python's own files do."""
    path = f"{name}/ckpt.bin"
    spooling.pipe_file(path, b"good")

    def save() -> None:
        if how == "fsspec.open text":
            opened = fsspec.open(f"lit://{path}", "w", endpoint=spooling.endpoint, component_name="work_a",
                                 spool_dir=spooling.spool_dir, skip_instance_cache=True)
            f = opened.open()
        else:
            f = spooling.open(path, "wb" if how == "binary" else "w")
        f.write(b"half" if how == "binary" else "half")
        raise RuntimeError("crash before close")

    with pytest.warns(ResourceWarning, match=rf"unclosed file 'lit://{path}' \(mode 'wb'\): nothing stored"):
        with pytest.raises(RuntimeError, match="crash before close"):
            save()
        gc.collect()
    assert spooling.cat(path) == b"good"
    assert list(pathlib.Path(spooling.spool_dir).iterdir()) == []


LEFT_OPEN = """
import asyncio, os, sys
import fsspec

endpoint, spool, path, size, how = sys.argv[1:]
options = {"endpoint": endpoint, "component_name": "work_a", "spool_dir": spool, "skip_instance_cache": True}
if how == "async":
    afs = fsspec.filesystem("lit", asynchronous=True, **options)

    async def main():
        global f
        f = await afs.open_async(path, "wb")
        await f.write(os.urandom(int(size)))

    asyncio.run(main())
else:
    f = fsspec.filesystem("lit", **options).open(path, "wb")
    f.write(os.urandom(int(size)))
if how == "raise":
    raise SystemExit("an uncaught error while the file is written")
"""


@pytest.mark.parametrize(("size", "how"), [(10, "raise"), (3 * MIB, "raise"), (3 * MIB, "exit"), (10, "async")])
def test_a_writer_open_at_exit_stores_nothing_and_exit_does_not_hang(spooling, name, size, how):
    """A script that ends (or dies of an uncaught error) with a file open for writing: fsspec closes it as the
    interpreter finalizes, and the put started its threads then and hung for good; a small file was put
    half-written first. Its spool is now discarded at exit: the script exits, nothing is stored, no spool left."""
    path = f"{name}/left_open.bin"
    spooling.pipe_file(path, b"previous")
    run = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", LEFT_OPEN, spooling.endpoint, spooling.spool_dir,
         path, str(size), how], capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == (1 if how == "raise" else 0), run.stderr
    assert spooling.cat(path) == b"previous"
    assert list(pathlib.Path(spooling.spool_dir).iterdir()) == []
    assert "nothing stored" in run.stderr


CLOSED_BY_LOGGING = """
import logging, sys
import fsspec

endpoint, spool, path = sys.argv[1:]


class DriveLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.file = fsspec.open(f"lit://{path}", "w", endpoint=endpoint, component_name="work_a",
                                spool_dir=spool).open()

    def emit(self, record):
        self.file.write(self.format(record) + "\\n")

    def close(self):  # logging.shutdown, an exit hook, calls it
        self.file.close()
        super().close()


logging.getLogger("run").addHandler(DriveLog())
logging.getLogger("run").warning("epoch 1 done")
"""


def test_a_file_closed_by_an_exit_hook_is_put(spooling, name):
    """A file closed as the interpreter exits, by an exit hook (`logging.shutdown` closing a handler that writes to
    the drive), is put: an exit hook of this module, registered after logging's and so run before it, abandoned
    the file first."""
    _script_puts(spooling, CLOSED_BY_LOGGING, f"{name}/run.log", b"epoch 1 done\n")


def _script_puts(spooling, script: str, path: str, stored: bytes) -> None:
    """Runs `script` with the endpoint, the spool folder and `path`: it exits 0 having put `stored` there, and
    leaves no spool."""
    run = subprocess.run([sys.executable, "-c", script, spooling.endpoint, spooling.spool_dir, path],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert spooling.cat(path) == stored
    assert list(pathlib.Path(spooling.spool_dir).iterdir()) == []


FORKED = """
import gc, os, sys
import fsspec

endpoint, spool, path = sys.argv[1:]
fs = fsspec.filesystem("lit", endpoint=endpoint, component_name="work_a", spool_dir=spool, skip_instance_cache=True)
f = fs.open(path, "wb")
f.write(b"the parent's")
child = os.fork()
if child == 0:  # a worker forked mid-write, which drops its copy and exits normally (its exit hooks run)
    del f
    gc.collect()
    sys.exit(0)
assert os.waitpid(child, 0)[1] == 0
f.close()
"""


def test_a_forked_child_leaves_its_parents_writer_alone(spooling, name):
    """The copy of an open writer a forked child holds is the parent's file: its collection, or the child's exit,
    would remove the spool the parent is still writing, and the parent's close would then fail."""
    _script_puts(spooling, FORKED, f"{name}/forked.bin", b"the parent's")


def test_transaction_puts_at_the_end(fs, name):
    with fs.transaction:
        with fs.open(f"{name}/t1.txt", "wb") as f:
            f.write(b"one")
        fs.pipe_file(f"{name}/t2.txt", b"two")
        assert not fs.exists(f"{name}/t1.txt")
    assert fs.cat(f"{name}/t1.txt") == b"one" and fs.cat(f"{name}/t2.txt") == b"two"
    with pytest.raises(KeyError), fs.transaction:
        fs.pipe_file(f"{name}/t3.txt", b"three")
        raise KeyError("abandon")
    assert not fs.exists(f"{name}/t3.txt")


def test_a_file_still_open_when_its_transaction_ends_is_put_whole(spooling, name):
    """`with fs.transaction: torch.save(state, fs.open(path, "wb"))` leaves the file open (torch.save closes no file
    it is given): the transaction's commit put the spool as it was, without the writes still gathered in memory,
    so such a checkpoint was stored empty, or cut, as if complete. The commit closes the file first."""
    fs, small, tail = spooling, os.urandom(100_000), os.urandom(6 * MIB)
    with fs.transaction:
        f = fs.open(f"{name}/small.bin", "wb")
        f.write(small)
        g = fs.open(f"{name}/tail.bin", "wb")
        g.write(tail)
        g.write(b"gathered")
    assert fs.cat(f"{name}/small.bin") == small and fs.cat(f"{name}/tail.bin") == tail + b"gathered"
    with pytest.raises(ValueError, match="closed"):
        f.write(b"late")
    f.close()
    assert fs.cat(f"{name}/small.bin") == small and list(pathlib.Path(fs.spool_dir).iterdir()) == []


def test_a_file_still_open_when_its_transaction_is_abandoned_stores_nothing(spooling, name):
    """The transaction discards it; closing it after raised AssertionError (its spool was gone), and so did a write."""
    fs = spooling
    fs.pipe_file(f"{name}/ckpt.bin", b"previous")
    with pytest.raises(KeyError), fs.transaction:
        f = fs.open(f"{name}/ckpt.bin", "wb")
        f.write(b"partial")
        raise KeyError("abandon")
    with pytest.raises(ValueError, match="closed"):
        f.write(b"late")
    f.close()
    assert fs.cat(f"{name}/ckpt.bin") == b"previous" and list(pathlib.Path(fs.spool_dir).iterdir()) == []


# --- rm and ownership ------------------------------------------------------------------------


def test_rm_removes_only_own_files(fs, daemon, tmp_path, drive_uri, name):
    fs.pipe({f"{name}/a.txt": b"a", f"{name}/dir/b.txt": b"b", f"{name}/dir/sub/c.txt": b"c"})
    write(tmp_path / "dir" / "theirs.txt", b"theirs")
    drive(daemon, drive_uri, "work_b", root_folder=tmp_path).put("dir/theirs.txt")

    fs.rm(f"lit://{name}/a.txt")
    assert not fs.exists(f"{name}/a.txt")
    with pytest.raises(FileNotFoundError):
        fs.rm(f"{name}/a.txt")
    with pytest.raises(FileNotFoundError, match="own"):  # another component's file stays
        fs.rm(f"{name}/dir/theirs.txt")
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{name}/dir")
    fs.rm(f"{name}/dir", recursive=True)
    assert fs.find(name) == [f"{name}/dir/theirs.txt"]

    fs.pipe({f"{name}/g1.log": b"1", f"{name}/g2.log": b"2", f"{name}/keep.txt": b"k"})
    fs.rm(f"{name}/*.log")
    assert fs.find(name) == [f"{name}/dir/theirs.txt", f"{name}/keep.txt"]
    fs.rm(name, recursive=True)  # a whole drive: this component's files only
    assert fs.find(name) == [f"{name}/dir/theirs.txt"]


# --- errors ----------------------------------------------------------------------------------


def test_missing_paths_raise_file_not_found(fs, tmp_path, name):
    missing = f"lit://{name}/no/such.txt"
    for call in (
        lambda: fs.open(missing, "rb"),
        lambda: fs.cat(missing),
        lambda: fs.cat_file(missing, 0, 10),
        lambda: fs.info(missing),
        lambda: fs.ls(missing),
        lambda: fs.get(missing, str(tmp_path / "x")),
        lambda: fs.rm(missing),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    with pytest.raises(FileNotFoundError):
        fsspec.open(missing, "rb", endpoint=fs.endpoint).open()
    with pytest.raises(FileNotFoundError):
        fs.put(str(tmp_path / "no-such-local-file"), f"{name}/x")
    assert fs.ls(name) == []  # an unused drive is empty, not missing
    fs.pipe(f"{name}/d/f", b"1")
    with pytest.raises(IsADirectoryError):
        fs.open(f"{name}/d", "rb")
    with pytest.raises(IsADirectoryError):
        fs.open(f"{name}/d", "ab")
    with pytest.raises(NotImplementedError, match=r"'r\+b' is not supported"):
        fs.open(f"{name}/d/f", "r+b")
    assert fs.find(name) == [f"{name}/d/f"] and fs.cat(f"{name}/d/f") == b"1"


@pytest.mark.parametrize(("where", "error"), [("folder", IsADirectoryError), ("file.txt/x", NotADirectoryError)])
def test_a_write_onto_a_folder_or_below_a_file_raises_what_fsspec_expects(spooling, afs, tmp_path, name, where,
                                                                           error):
    """`put_file` and `cp_file` onto a folder, and any write below a file, raised the daemon's refusal as a
    ValueError (`InvalidArgument`) where fsspec's callers expect IsADirectoryError and NotADirectoryError (as
    `pipe_file` onto a folder raised). Nothing is stored, no spool is left."""
    fs, path = spooling, f"{name}/{where}"
    fs.pipe({f"{name}/folder/a.txt": b"a", f"{name}/file.txt": b"f"})
    local = str(write(tmp_path / "local.txt", b"local"))

    def open_and_write() -> None:
        with fs.open(path, "wb") as f:
            f.write(b"x")

    for call in (lambda: fs.pipe_file(path, b"x"), lambda: fs.put_file(local, path),
                 lambda: fs.cp_file(f"{name}/file.txt", path), open_and_write,
                 lambda: asyncio.run(afs._pipe_file(path, b"x")), lambda: asyncio.run(afs._put_file(local, path)),
                 lambda: asyncio.run(afs._cp_file(f"{name}/file.txt", path))):
        with pytest.raises(error):
            call()
    assert fs.find(name) == [f"{name}/file.txt", f"{name}/folder/a.txt"] and fs.cat(f"{name}/file.txt") == b"f"
    assert list(pathlib.Path(fs.spool_dir).iterdir()) == []


def test_path_held_by_another_component(fs, daemon, tmp_path, drive_uri, name):
    write(tmp_path / "shared.txt", b"from work_b")
    drive(daemon, drive_uri, "work_b", root_folder=tmp_path).put("shared.txt")
    with pytest.raises(FileExistsError, match="work_b"), fs.open(f"{name}/shared.txt", "wb") as f:
        f.write(b"mine")  # the daemon decides who may write a path, when the file is put on close
    with pytest.raises(FileExistsError):
        fs.pipe(f"{name}/shared.txt", b"mine")
    write(tmp_path / "mine.txt", b"mine")
    with pytest.raises(FileExistsError):
        fs.put(str(tmp_path / "mine.txt"), f"{name}/shared.txt")  # refused by the daemon
    assert fs.cat(f"{name}/shared.txt") == b"from work_b"
    with pytest.raises(FileExistsError):
        fs.open(f"{name}/shared.txt", "xb")
    with pytest.raises(FileExistsError):
        fs.put_file(str(tmp_path / "mine.txt"), f"{name}/shared.txt", mode="create")

    dup = DriveFileSystem(endpoint=daemon.endpoint, component_name="work_a", allow_duplicates=True,
                          skip_instance_cache=True)
    dup.pipe(f"{name}/shared.txt", b"my own copy")
    assert dup.cat(f"{name}/shared.txt") == b"my own copy"  # several hold it: this component's copy is read
    assert dup.info(f"{name}/shared.txt")["component"] == "work_a"
    reader = DriveFileSystem(endpoint=daemon.endpoint, component_name="reader", skip_instance_cache=True)
    with pytest.raises(AmbiguousPathError, match="work_a"):
        reader.cat(f"{name}/shared.txt")
    assert [e["component"] for e in reader.ls(name)] == [""]  # listed once, held by several


def test_path_taken_while_writing_fails_on_close(daemon, tmp_path, drive_uri, name):
    """The daemon decides ownership when the file is put on close, and the spool is removed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    fs = DriveFileSystem(endpoint=daemon.endpoint, component_name="work_a", spool_dir=str(spool),
                         skip_instance_cache=True)
    f = fs.open(f"{name}/race.txt", "wb")
    f.write(b"mine")
    write(tmp_path / "race.txt", b"theirs")
    drive(daemon, drive_uri, "work_b", root_folder=tmp_path).put("race.txt")
    with pytest.raises(FileExistsError):
        f.close()
    assert f.closed and list(spool.iterdir()) == []
    assert fs.cat(f"{name}/race.txt") == b"theirs"


def test_exclusive_create_is_checked_again_at_close(spooling, afs, name):
    """Two writers that both opened a path "xb" before either closed: the second's close replaced the first's
    file (the check was at open only). The path is checked again before the put: the second stores nothing."""
    fs, path = spooling, f"{name}/ckpt"
    first, second = fs.open(path, "xb"), fs.open(path, "xb")
    first.write(b"first writer")
    second.write(b"second writer")
    first.close()
    with pytest.raises(FileExistsError):
        second.close()
    assert second.closed and fs.cat(path) == b"first writer"

    async def racing_async_writer() -> None:
        f = await afs.open_async(f"{name}/async", "xb")
        await f.write(b"second writer")
        fs.pipe_file(f"{name}/async", b"first writer")
        with pytest.raises(FileExistsError):
            await f.close()

    asyncio.run(racing_async_writer())
    assert fs.cat(f"{name}/async") == b"first writer"
    assert list(pathlib.Path(fs.spool_dir).iterdir()) == []


# --- appending -------------------------------------------------------------------------------


@pytest.fixture
def spooling(daemon, tmp_path) -> DriveFileSystem:
    """A filesystem of component work_a that spools into tmp_path/spool, so tests can see the spools."""
    (tmp_path / "spool").mkdir()
    return DriveFileSystem(endpoint=daemon.endpoint, component_name="work_a", spool_dir=str(tmp_path / "spool"),
                           skip_instance_cache=True)


def test_append_continues_the_file_and_puts_it_whole(spooling, daemon, tmp_path, drive_uri, name):
    fs, path = spooling, f"{name}/logs/metrics.csv"
    with fs.open(path, "ab") as f:  # no file yet: an append starts one
        assert f.tell() == 0
        f.write(b"step,loss\n")
    with fs.open(path, "ab", block_size=MIB) as f:
        assert f.tell() == 10  # at the end, like a local file opened to append
        f.write(b"0,1.0\n")
        big = os.urandom(3 * MIB)  # more than a block
        f.write(big)
        assert fs.cat(path) == b"step,loss\n"  # readers see the file as it was until close
    with fs.open(path, "a", newline="") as text:  # as Lightning's CSVLogger opens it
        text.write("1,0.5\n")
    want = b"step,loss\n0,1.0\n" + big + b"1,0.5\n"
    assert fs.cat(path) == want
    stat = drive(daemon, drive_uri, "reader").stat("logs/metrics.csv")
    assert (stat.component, stat.size, stat.sha256) == ("work_a", len(want), sha256_hex(want))
    assert list((tmp_path / "spool").iterdir()) == []

    with pytest.raises(RuntimeError, match="boom"), fs.open(path, "ab") as f:
        f.write(b"half a line")
        raise RuntimeError("boom")  # inside `with`: nothing is stored
    assert fs.cat(path) == want and drive(daemon, drive_uri, "reader").stat(path.partition("/")[2]) == stat
    assert list((tmp_path / "spool").iterdir()) == []


def test_append_puts_as_this_component(spooling, daemon, tmp_path, drive_uri, name):
    """The appended file is put as this component's: refused where another holds the path, unless duplicates
    are allowed; then this component's copy is the one appended to."""
    write(tmp_path / "shared.log", b"theirs\n")
    theirs = drive(daemon, drive_uri, "work_b", root_folder=tmp_path)
    theirs.put("shared.log")
    with pytest.raises(FileExistsError, match="work_b"), spooling.open(f"{name}/shared.log", "ab") as f:
        f.write(b"mine\n")
    assert spooling.cat(f"{name}/shared.log") == b"theirs\n"
    assert list((tmp_path / "spool").iterdir()) == []

    dup = DriveFileSystem(endpoint=daemon.endpoint, component_name="work_a", allow_duplicates=True,
                          skip_instance_cache=True)
    for line in (b"mine\n", b"more\n"):  # the first continues work_b's file, the second this component's copy
        with dup.open(f"{name}/shared.log", "ab") as f:
            f.write(line)
    copies = {"work_a": b"theirs\nmine\nmore\n", "work_b": b"theirs\n"}
    assert {c: b"".join(theirs.read_range("shared.log", component_name=c)) for c in copies} == copies
    reader = DriveFileSystem(endpoint=daemon.endpoint, component_name="reader", allow_duplicates=True,
                             skip_instance_cache=True)
    with pytest.raises(AmbiguousPathError):  # two copies, none of them the reader's: which one to continue?
        reader.open(f"{name}/shared.log", "ab")
    assert {c: b"".join(theirs.read_range("shared.log", component_name=c)) for c in copies} == copies
    with pytest.raises(IsADirectoryError):
        dup.open(name, "ab")


def test_append_refuses_a_file_changed_since_it_was_fetched(spooling, tmp_path, name):
    fs, path = spooling, f"{name}/log.txt"
    fs.pipe(path, b"v1\n")
    first, second = fs.open(path, "ab"), fs.open(path, "ab")
    first.write(b"from first\n")
    second.write(b"from second\n")
    first.close()
    with pytest.raises(StaleIndexError, match="changed since it was opened for appending"):
        second.close()
    assert fs.cat(path) == b"v1\nfrom first\n"

    removed = fs.open(path, "ab")
    removed.write(b"after a delete")
    fs.rm(path)
    with pytest.raises(StaleIndexError):
        removed.close()
    assert not fs.exists(path)

    created = fs.open(path, "ab")  # no file: it must still be none at close
    created.write(b"late")
    fs.pipe(path, b"first to put")
    with pytest.raises(StaleIndexError):
        created.close()
    assert fs.cat(path) == b"first to put"
    assert list((tmp_path / "spool").iterdir()) == []


def test_unreachable_daemon_raises_connection_error(name):
    fs = DriveFileSystem(endpoint="127.0.0.1:1", retry_seconds=1, skip_instance_cache=True)
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1"):
        fs.ls(name)


def test_exists_isdir_isfile_raise_what_is_not_a_missing_path(start_daemon, tmp_path, name):
    """fsspec's `exists`, `isdir` and `isfile` answer False for any error: a file or folder there read as missing
    to a wrong token, or while the daemon could not be reached, and a caller that checks for a checkpoint before
    writing a fresh one starts over. Only a missing path is False now, on both faces; the other errors are raised."""
    handle = start_daemon(tmp_path, "--token", "right")
    right = fsspec.filesystem("lit", endpoint=handle.endpoint, token="right", skip_instance_cache=True)
    right.pipe_file(f"{name}/run/ckpt.pt", b"weights")
    wrong = {"endpoint": handle.endpoint, "token": "wrong"}
    unreachable = {"endpoint": "127.0.0.1:1", "retry_seconds": 0}
    for options, error in ((wrong, PermissionError), (unreachable, ConnectionError)):
        sync = DriveFileSystem(skip_instance_cache=True, **options)
        for check in (sync.exists, sync.isdir, sync.isfile):
            for path in (f"{name}/run", f"{name}/run/ckpt.pt"):
                with pytest.raises(error):
                    check(path)
        afs = AsyncDriveFileSystem(asynchronous=True, skip_instance_cache=True, **options)
        for acheck in (afs._exists, afs._isdir, afs._isfile):
            with pytest.raises(error):
                asyncio.run(acheck(f"{name}/run"))
    assert right.exists(f"{name}/run/ckpt.pt") and not right.exists(f"{name}/none.pt")
    assert right.isdir(f"{name}/run") and not right.isdir(f"{name}/run/ckpt.pt") and not right.isdir(f"{name}/no")
    assert right.isfile(f"{name}/run/ckpt.pt") and not right.isfile(f"{name}/run") and not right.isfile(f"{name}/no")
    assert not right.isfile(f"{name}/run/ckpt.pt/below") and not right.isdir(f"{name}/run/ckpt.pt/below")
    assert right.cat(f"{name}/run/ckpt.pt") == b"weights"


def test_a_path_given_decomposed_removes_to_the_depth_asked(fs, name):
    """The daemon answers a lit:// drive's names in Unicode NFC; `rm(..., maxdepth=)` measured each entry's depth
    past the path as the caller spelled it, so a decomposed (NFD) name of two accents shifted the count by two
    characters: `maxdepth=1` removed the files one level further down too."""
    folder = f"{name}/{unicodedata.normalize('NFD', 'éé')}"
    for path in ("a/b", "a/keep.txt", "top.txt"):
        fs.pipe_file(f"{folder}/{path}", b"x")
    fs.rm(folder, recursive=True, maxdepth=1)
    assert fs.find(name) == [f"{name}/éé/a/b", f"{name}/éé/a/keep.txt"]


def test_pickles_for_worker_processes(fs, name):
    fs.pipe(f"{name}/p.txt", b"pickled")
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat(f"{name}/p.txt") == b"pickled"
    with fs.open(f"{name}/p.txt", "rb") as f:
        f.read(2)
        g = pickle.loads(pickle.dumps(f))
        assert g.read() == b"ckled"


# --- pandas ----------------------------------------------------------------------------------


def test_pandas_read_and_write_csv(daemon, tmp_path, drive_uri, name):
    pd = pytest.importorskip("pandas", reason="pandas is not installed: the pandas round trip is skipped")
    options = {"endpoint": daemon.endpoint, "component_name": "pandas_writer"}
    frame = pd.DataFrame({"step": [1, 2, 3], "loss": [0.5, 0.25, 0.125], "tag": ["a", "b", "c"]})
    frame.to_csv(f"{drive_uri}/metrics/t.csv", index=False, storage_options=options)
    assert Drive(drive_uri, endpoint=daemon.endpoint).stat("metrics/t.csv").component == "pandas_writer"
    back = pd.read_csv(f"{drive_uri}/metrics/t.csv", storage_options={"endpoint": daemon.endpoint})
    pd.testing.assert_frame_equal(back, frame)

    write(tmp_path / "put.csv", b"a,b\n1,x\n2,y\n")
    Drive(drive_uri, endpoint=daemon.endpoint, root_folder=tmp_path).put("put.csv")
    got = pd.read_csv(f"{drive_uri}/put.csv", storage_options={"endpoint": daemon.endpoint})
    assert got.to_dict("list") == {"a": [1, 2], "b": ["x", "y"]}
    with pytest.raises(FileNotFoundError):
        pd.read_csv(f"{drive_uri}/none.csv", storage_options={"endpoint": daemon.endpoint})


# --- fork ----------------------------------------------------------------------------------


FORKING_PARENT = """
import multiprocessing, sys
import fsspec

def cat_in_child(fs, path, results):
    results.put(fs.cat(path))

fs = fsspec.filesystem("lit", endpoint=sys.argv[1], component_name="work_a")
path = sys.argv[2]
fs.pipe(path, b"for the child")
assert fs.cat(path) == b"for the child"  # the parent's channel exists before the fork
context = multiprocessing.get_context("fork")
results = context.Queue()
child = context.Process(target=cat_in_child, args=(fs, path, results))
child.start()
print(results.get(timeout=60).decode())
child.join(60)
sys.exit(child.exitcode)
"""


def test_a_forked_worker_reads_through_its_parents_filesystem(daemon, name):
    """What a fork-started data loader worker does: use the filesystem the parent made and used.

    The parent is a process of its own, as a training script is: a fork inside pytest would
    inherit whatever channels and event loops earlier tests left running.
    """
    run = subprocess.run([sys.executable, "-c", FORKING_PARENT, daemon.endpoint, f"{name}/f.txt"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "for the child"


# --- the async filesystem --------------------------------------------------------------------


@pytest.fixture
def afs(daemon) -> AsyncDriveFileSystem:
    fs = fsspec.filesystem("lit", asynchronous=True, endpoint=daemon.endpoint, component_name="work_a",
                           skip_instance_cache=True)
    assert isinstance(fs, AsyncDriveFileSystem) and fs.async_impl and fs.asynchronous
    return fs


async def test_async_filesystem_reads_writes_and_lists(afs, tmp_path, name):
    data = bytes(range(256)) * 40
    await afs._pipe_file(f"lit://{name}/r.bin", data)
    await afs._pipe_file(f"{name}/dir/a.txt", b"a")
    assert await afs._cat_file(f"{name}/r.bin") == data
    assert await afs._cat_file(f"{name}/r.bin", 100, -100) == data[100:-100]
    sizes = await asyncio.gather(*(afs._cat_file(f"{name}/r.bin", i, i + 10) for i in range(0, 100, 10)))
    assert b"".join(sizes) == data[:100]  # concurrent reads on one loop
    info = await afs._info(f"{name}/r.bin")
    assert (info["size"], info["sha256"], info["component"]) == (len(data), sha256_hex(data), "work_a")
    assert await afs._ls(name, detail=False) == [f"{name}/dir", f"{name}/r.bin"]
    assert await afs._find(name) == [f"{name}/dir/a.txt", f"{name}/r.bin"]
    assert await afs._find(name, withdirs=True) == [name, f"{name}/dir", f"{name}/dir/a.txt", f"{name}/r.bin"]
    assert await afs._exists(f"{name}/dir/a.txt") and not await afs._exists(f"{name}/nope")
    assert await afs._isdir(f"{name}/dir")

    write(tmp_path / "up.bin", os.urandom(3 * MIB))
    await afs._put_file(str(tmp_path / "up.bin"), f"{name}/up.bin")
    await afs._get_file(f"{name}/up.bin", str(tmp_path / "down" / "up.bin"))
    assert file_sha256(tmp_path / "down" / "up.bin") == file_sha256(tmp_path / "up.bin")
    await afs._cp_file(f"{name}/dir/a.txt", f"{name}/copy.txt")
    assert await afs._cat_file(f"{name}/copy.txt") == b"a"
    await afs._rm(f"{name}/dir", recursive=True)
    await afs._rm_file(f"{name}/copy.txt")
    assert await afs._ls(name, detail=False) == [f"{name}/r.bin", f"{name}/up.bin"]


async def test_async_files_stream_reads_and_put_on_close(afs, daemon, tmp_path, drive_uri, name):
    spool = tmp_path / "spool"
    spool.mkdir()
    afs.spool_dir = str(spool)
    async with await afs.open_async(f"{name}/w.bin", "wb") as f:
        await f.write(b"x" * (6 * MIB))
        await f.write(b"tail")
        assert not await afs._exists(f"{name}/w.bin")  # nothing visible before close
    assert list(spool.iterdir()) == []
    info = await afs._info(f"{name}/w.bin")
    f = await afs.open_async(f"{name}/w.bin", "rb")
    assert f.size == 6 * MIB + 4
    f.seek(6 * MIB)
    assert await f.read() == b"tail"
    await f.close()
    with pytest.raises(FileExistsError):
        await afs.open_async(f"{name}/w.bin", "xb")
    with pytest.raises(RuntimeError, match="boom"):  # an exception inside `async with` stores nothing
        async with await afs.open_async(f"{name}/half.bin", "wb") as f:
            await f.write(b"half")
            raise RuntimeError("boom")
    assert not await afs._exists(f"{name}/half.bin") and list(spool.iterdir()) == []
    f = await afs.open_async(f"{name}/w.bin", "wb")
    with pytest.raises(RuntimeError, match="boom"):  # closed in a `finally:` as the exception unwinds: nothing put
        try:
            await f.write(b"half")
            raise RuntimeError("boom")
        finally:
            await f.close()
    assert await afs._info(f"{name}/w.bin") == info and list(spool.iterdir()) == []


async def test_an_async_files_own_with_decides_by_the_exception_that_ends_it(afs, tmp_path, name):
    """`test_a_files_own_with_decides_by_the_exception_that_ends_it`, with `async with`."""
    spool = tmp_path / "spool"
    spool.mkdir()
    afs.spool_dir = str(spool)
    path = f"{name}/f.txt"
    async with contextlib.AsyncExitStack() as stack:
        f = await stack.enter_async_context(await afs.open_async(path, "wb"))
        stack.enter_context(contextlib.suppress(TimeoutError))
        await f.write(b"whole")
        raise TimeoutError("an optional step timed out")
    assert await afs._cat_file(path) == b"whole"
    with pytest.raises(ValueError, match="handled"):
        try:
            raise ValueError("handled")
        except ValueError:
            async with await afs.open_async(path, "wb") as f:
                await f.write(b"half")
                raise
    assert await afs._cat_file(path) == b"whole" and list(spool.iterdir()) == []


async def test_an_async_writer_dropped_unclosed_stores_nothing(afs, tmp_path, name):
    """An async file inherited fsspec's blocking `__del__`, which calls the async `close()` and never awaits it:
    a writer dropped unclosed (its task cancelled) warned 'coroutine was never awaited' and left its spool, as big
    as what it wrote. It is discarded now, as a blocking writer's is."""
    spool = tmp_path / "spool"
    spool.mkdir()
    afs.spool_dir = str(spool)
    wrote = asyncio.Event()

    async def writer() -> None:
        f = await afs.open_async(f"{name}/dropped.bin", "wb")
        await f.write(os.urandom(2 * MIB))
        wrote.set()
        await asyncio.sleep(60)

    with pytest.warns(ResourceWarning, match="nothing stored") as caught:
        task = asyncio.create_task(writer())
        await wrote.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        await asyncio.sleep(0)  # the loop lets go of the task once its done callbacks have run
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert list(spool.iterdir()) == []
    assert not await afs._exists(f"{name}/dropped.bin")


async def test_async_append(afs, tmp_path, name):
    spool = tmp_path / "spool"
    spool.mkdir()
    afs.spool_dir = str(spool)
    path = f"{name}/log.txt"
    await afs._pipe_file(path, b"head\n")
    big = os.urandom(6 * MIB)  # more than a block: written in a worker thread, straight from `big`
    async with await afs.open_async(path, "ab") as f:
        assert f.tell() == 5
        await f.write(b"tail\n")
        await f.write(big)
        await f.write(b"end")
        assert f.tell() == 5 + 5 + len(big) + 3
        assert await afs._cat_file(path) == b"head\n"
    assert await afs._cat_file(path) == b"head\ntail\n" + big + b"end"
    f = await afs.open_async(path, "ab")
    await f.write(b"late")
    await afs._pipe_file(path, b"replaced")
    with pytest.raises(StaleIndexError, match="changed since it was opened for appending"):
        await f.close()
    assert await afs._cat_file(path) == b"replaced" and list(spool.iterdir()) == []


async def test_a_pipe_cancelled_while_it_spools_leaves_no_spool(afs, tmp_path, name, monkeypatch):
    """`_pipe_file` spools its bytes in a worker thread, which a cancellation does not stop: the spool it made
    was handed to no one, and stayed in the spool folder for good (as big as the bytes). A cancelled step now
    ends once its thread has, and the spool it made is removed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    afs.spool_dir = str(spool)
    spooling, go_on = threading.Event(), threading.Event()

    def held(fd: int, data: memoryview) -> None:  # the spool's write, held until the pipe is cancelled
        spooling.set()
        go_on.wait(30)
        write_all(fd, data)

    monkeypatch.setattr(drive_client.fsspec, "write_all", held)
    pipe = asyncio.create_task(afs._pipe_file(f"{name}/p.bin", b"p" * MIB))
    assert await asyncio.to_thread(spooling.wait, 30)
    pipe.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await pipe
    assert list(spool.iterdir()) == []
    assert not await afs._exists(f"{name}/p.bin")


async def test_async_filesystem_errors_and_pinned_reads(afs, daemon, tmp_path, drive_uri, name):
    with pytest.raises(FileNotFoundError):
        await afs._cat_file(f"{name}/missing.txt")
    with pytest.raises(FileNotFoundError):
        await afs._ls(f"{name}/missing")
    with pytest.raises(ValueError, match="lit:// drives only"):
        await afs._ls("s3://bucket/prefix/")
    await afs._pipe_file(f"{name}/d/f", b"1")
    with pytest.raises(IsADirectoryError):
        await afs.open_async(f"{name}/d", "rb")
    with pytest.raises(IsADirectoryError):
        await afs._pipe_file(f"{name}/d", b"over a folder")
    write(tmp_path / "theirs.txt", b"theirs")
    drive(daemon, drive_uri, "work_b", root_folder=tmp_path).put("theirs.txt")
    with pytest.raises(FileExistsError, match="work_b"):  # the daemon's refusal
        await afs._pipe_file(f"{name}/theirs.txt", b"mine")
    with pytest.raises(FileExistsError):
        await afs._pipe_file(f"{name}/theirs.txt", b"mine", mode="create")
    assert await afs._cat_file(f"{name}/theirs.txt") == b"theirs"
    write(tmp_path / "v.bin", b"1" * (2 * MIB))
    owner = drive(daemon, drive_uri, "work_a", root_folder=tmp_path)
    owner.put("v.bin")
    f = await afs.open_async(f"{name}/v.bin", "rb")
    assert await f.read(3) == b"111"
    write(tmp_path / "v.bin", b"2" * (2 * MIB))
    owner.put("v.bin")
    with pytest.raises(StaleIndexError):
        await f.read(3)
    await f.close()
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1"):
        await AsyncDriveFileSystem(endpoint="127.0.0.1:1", retry_seconds=1, asynchronous=True,
                                   skip_instance_cache=True)._ls(name)
