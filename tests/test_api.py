"""The Python API's semantics: ownership, listing, folders, waits, overwrite, root_folder,
pickling and stat, against the session daemon; every test runs against both twins
(`Drive`, and `AsyncDrive` on a private event loop: the `twin` fixture)."""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import json
import multiprocessing
import os
import pathlib
import pickle
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from unittest import mock

import grpc
import pytest
from conftest import MIB, Background, paused_reads, sha256_hex, snapshot, wait_until

from drive_client import (
    AmbiguousPathError,
    Drive,
    DriveError,
    FileStat,
    InvalidArgument,
    LocalFileError,
    StaleIndexError,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make(twin, daemon):
    """`make(uri, root, component=None, **kw)`: a drive of the twin under test on the session daemon."""

    def make(uri: str, root: pathlib.Path | None, component: str | None = None, **kw):
        return twin(uri, component_name=component, root_folder=None if root is None else str(root),
                    endpoint=daemon.endpoint, **kw)

    return make


def write(path: pathlib.Path, data: bytes | str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def put_from_another_process(uri: str, endpoint: str, root: str, path: str) -> None:
    """Runs in another OS process (spawn): puts `path` from `root`."""
    Drive(uri, component_name="late_writer", root_folder=root, endpoint=endpoint).put(path)


# --- ownership ------------------------------------------------------------------------------


def test_duplicates_refused_across_components(make, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "from a")
    make(drive_uri, tmp_path, "work_a").put("a.txt")
    write(tmp_path / "a.txt", "from b")
    with pytest.raises(FileExistsError):
        make(drive_uri, tmp_path, "work_b").put("a.txt")
    out = tmp_path / "out"
    out.mkdir()
    got = make(drive_uri, out, "reader").get("a.txt")
    assert got.read_bytes() == b"from a"
    assert make(drive_uri, out).list(".", component_name="work_b") == []


def test_duplicates_allowed_with_allow_duplicates(make, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "from a")
    make(drive_uri, tmp_path, "work_a").put("a.txt")
    write(tmp_path / "a.txt", "from b")
    make(drive_uri, tmp_path, "work_b", allow_duplicates=True).put("a.txt")
    out = tmp_path / "out"
    out.mkdir()
    r = make(drive_uri, out, "reader")
    assert r.list(".") == ["a.txt"], "de-duplicated across components"
    assert r.list(".", component_name="work_a") == ["a.txt"]
    assert r.list(".", component_name="work_b") == ["a.txt"]
    assert r.get("a.txt", component_name="work_a").read_bytes() == b"from a"
    assert r.get("a.txt", component_name="work_b", overwrite=True).read_bytes() == b"from b"


def test_component_replaces_its_own_file(make, tmp_path, drive_uri):
    d = make(drive_uri, tmp_path, "work_a")
    write(tmp_path / "a.txt", "v1")
    d.put("a.txt")
    gen1 = d.stat("a.txt").generation
    write(tmp_path / "a.txt", "version 2")
    d.put("a.txt")  # allow_duplicates=False does not stop replacing one's own file
    st = d.stat("a.txt")
    assert (st.size, st.sha256, st.component) == (9, sha256_hex(b"version 2"), "work_a")
    assert st.generation != gen1, "generation changes with every commit"
    out = tmp_path / "out"
    out.mkdir()
    assert make(drive_uri, out).get("a.txt").read_bytes() == b"version 2"


def test_delete_only_own_files(make, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "a")
    a = make(drive_uri, tmp_path, "work_a")
    b = make(drive_uri, tmp_path, "work_b")
    a.put("a.txt")
    with pytest.raises(FileNotFoundError):
        b.delete("a.txt")
    assert a.list(".") == ["a.txt"]
    assert a.stat("a.txt").component == "work_a"
    a.delete("a.txt")
    assert a.list(".") == []
    with pytest.raises(FileNotFoundError):
        a.stat("a.txt")


def test_delete_folder(make, tmp_path, drive_uri):
    write(tmp_path / "ck" / "x.pt", "x")
    write(tmp_path / "ck" / "sub" / "y.pt", "y")
    write(tmp_path / "keep.txt", "k")
    d = make(drive_uri, tmp_path, "work_a")
    d.put("ck")
    d.put("keep.txt")
    d.delete("ck")
    assert d.list(".") == ["keep.txt"]
    assert d.list("ck") == []


def test_delete_leaves_other_components_copy(make, tmp_path, drive_uri):
    write(tmp_path / "s.txt", "shared")
    a = make(drive_uri, tmp_path, "work_a", allow_duplicates=True)
    b = make(drive_uri, tmp_path, "work_b", allow_duplicates=True)
    a.put("s.txt")
    b.put("s.txt")
    a.delete("s.txt")
    assert a.list(".") == ["s.txt"]
    assert a.list(".", component_name="work_a") == []
    assert a.stat("s.txt").component == "work_b"


def test_ambiguity_names_both_components(make, tmp_path, drive_uri):
    write(tmp_path / "m.txt", "m")
    make(drive_uri, tmp_path, "first_worker", allow_duplicates=True).put("m.txt")
    make(drive_uri, tmp_path, "second_worker", allow_duplicates=True).put("m.txt")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AmbiguousPathError, match="first_worker") as exc:
        make(drive_uri, out).get("m.txt")
    assert "second_worker" in str(exc.value)


def test_default_component_from_env(make, tmp_path, drive_uri, monkeypatch):
    write(tmp_path / "e.txt", "e")
    monkeypatch.setenv("DRIVE_COMPONENT", "env_comp")
    make(drive_uri, tmp_path).put("e.txt")
    monkeypatch.delenv("DRIVE_COMPONENT")
    assert make(drive_uri, tmp_path).stat("e.txt").component == "env_comp"
    write(tmp_path / "f.txt", "f")
    make(drive_uri, tmp_path).put("f.txt")
    assert make(drive_uri, tmp_path).stat("f.txt").component == "default"


def test_endpoint_from_env(twin, daemon, tmp_path, drive_uri, monkeypatch):
    monkeypatch.setenv("DRIVE_ENDPOINT", daemon.endpoint)
    write(tmp_path / "e.txt", "e")
    d = twin(drive_uri, root_folder=str(tmp_path))
    d.put("e.txt")
    assert d.list(".") == ["e.txt"]


# --- listing --------------------------------------------------------------------------------


def test_list_one_component_or_all(make, tmp_path, drive_uri):
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "a.txt", "a")
    write(tmp_path / "c" / "deep" / "f.txt", "f")
    make(drive_uri, tmp_path, "work_b").put("b.txt")
    make(drive_uri, tmp_path, "work_a").put("a.txt")
    make(drive_uri, tmp_path, "work_a").put("c/deep/f.txt")
    r = make(drive_uri, tmp_path, "reader")
    assert r.list(".") == ["a.txt", "b.txt", "c"]
    assert r.list("") == ["a.txt", "b.txt", "c"]
    assert r.list() == ["a.txt", "b.txt", "c"]
    assert r.list(".", component_name="work_a") == ["a.txt", "c"]
    assert r.list(".", component_name="work_b") == ["b.txt"]
    assert r.list(".", component_name="nobody") == []
    assert r.list("c") == ["c/deep"]
    assert r.list("c/deep") == ["c/deep/f.txt"]
    assert r.list("c/deep/") == ["c/deep/f.txt"]


def test_list_nested_put_and_shared_folder_deduplicated(make, tmp_path, drive_uri):
    write(tmp_path / "checkpoints" / "x.pt", "x")
    write(tmp_path / "checkpoints" / "y.pt", "y")
    make(drive_uri, tmp_path, "work_a").put("checkpoints/x.pt")
    assert make(drive_uri, tmp_path).list(".") == ["checkpoints"]
    assert make(drive_uri, tmp_path).list("checkpoints") == ["checkpoints/x.pt"]
    make(drive_uri, tmp_path, "work_b").put("checkpoints/y.pt")
    r = make(drive_uri, tmp_path)
    assert r.list(".") == ["checkpoints"], "a folder held by two components is listed once"
    assert r.list("checkpoints") == ["checkpoints/x.pt", "checkpoints/y.pt"]
    assert r.list("checkpoints", component_name="work_b") == ["checkpoints/y.pt"]


def test_list_missing_path_is_empty(make, tmp_path, drive_uri):
    d = make(drive_uri, tmp_path)
    assert d.list(".") == []
    assert d.list("no/such/folder") == []
    write(tmp_path / "a.txt", "a")
    d.put("a.txt")
    assert d.list("nothing_here") == []


def test_list_is_sorted(make, tmp_path, drive_uri):
    names = ["zeta.txt", "Alpha.txt", "beta.txt", "10.txt", "2.txt", "_u.txt"]
    d = make(drive_uri, tmp_path)
    for n in names:
        write(tmp_path / n, n)
        d.put(n)
    assert d.list(".") == sorted(names)


# --- folders in and out ----------------------------------------------------------------------


def test_put_folder_and_get_folder(make, tmp_path, drive_uri):
    src = tmp_path / "src"
    tree = {
        "checkpoints/step_1/model.pt": b"m1" * 1000,
        "checkpoints/step_2/model.pt": b"m2" * 1000,
        "checkpoints/log.txt": b"log",
        "checkpoints/empty.bin": b"",
    }
    for rel, data in tree.items():
        write(src / rel, data)
    make(drive_uri, src, "work_a").put("checkpoints")
    r = make(drive_uri, tmp_path)
    assert r.list(".") == ["checkpoints"]
    assert r.list("checkpoints") == [
        "checkpoints/empty.bin", "checkpoints/log.txt", "checkpoints/step_1", "checkpoints/step_2",
    ]
    st = r.stat("checkpoints")
    assert st.folder is True

    dst = tmp_path / "dst"
    dst.mkdir()
    got = make(drive_uri, dst, "reader").get("checkpoints")
    assert pathlib.Path(got) == dst / "checkpoints"
    for rel, data in tree.items():
        assert (dst / rel).read_bytes() == data, rel
    found = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert found == sorted(tree), "get of a folder recreates exactly its tree"


def test_a_folder_nested_1000_deep_is_got_and_put(daemon, tmp_path, drive_uri):
    """A get made each file's folders with pathlib's mkdir(parents=True), and a folder put walked its local folder
    with os.walk: both recurse once a level (os.walk before Python 3.12), so a get of a folder holding a path 1,000
    folders deep, and a put of such a local folder, failed with no DriveError (a RecursionError, or the bare
    FileNotFoundError of a mkdir the recursion cut short). Both twins share this code: one is tried, as each
    syscall on so deep a path walks all of it."""
    below = "/".join(["d"] * 999)
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    try:
        write(tmp_path / "f.bin", b"deep")
        drive.put("f.bin", to=f"d/{below}/f.bin")
        got = pathlib.Path(drive.get("d", to="got"))
        assert got == tmp_path / "got"
        assert (got / below / "f.bin").read_bytes() == b"deep"
        assert [f.path for f in drive.put("got", to="again")] == [f"again/{below}/f.bin"]
        assert [e.path for e in drive.entries("again", recursive=True)] == [f"again/{below}/f.bin"]
    finally:  # pytest's removal of old temporary folders recurses too: a tree left would fail it
        for left in ("d", "again"):
            with contextlib.suppress(DriveError):
                drive.delete(left)
        subprocess.run(["rm", "-rf", str(tmp_path / "got")], check=True)


def test_put_folder_with_trailing_slash(make, tmp_path, drive_uri):
    write(tmp_path / "data" / "a.txt", "a")
    write(tmp_path / "data" / "b" / "c.txt", "c")
    d = make(drive_uri, tmp_path, "work_a")
    d.put("data/")
    assert d.list("data") == ["data/a.txt", "data/b"]
    assert d.list("data/b") == ["data/b/c.txt"]


def test_get_subfolder(make, tmp_path, drive_uri):
    write(tmp_path / "src" / "top" / "sub" / "f.txt", "f")
    write(tmp_path / "src" / "top" / "g.txt", "g")
    make(drive_uri, tmp_path / "src").put("top")
    dst = tmp_path / "dst"
    dst.mkdir()
    make(drive_uri, dst).get("top/sub")
    assert (dst / "top" / "sub" / "f.txt").read_bytes() == b"f"
    assert not (dst / "top" / "g.txt").exists()


def test_a_folder_got_with_overwrite_onto_a_local_folder_replaces_its_files_and_keeps_the_others(
    make, tmp_path, drive_uri
):
    write(tmp_path / "src" / "top" / "f.txt", "from the drive")
    write(tmp_path / "src" / "top" / "sub" / "g.txt", "g from the drive")
    make(drive_uri, tmp_path / "src").put("top")
    dst = tmp_path / "dst"
    write(dst / "top" / "f.txt", "local, replaced")
    write(dst / "top" / "local.txt", "local only, kept")
    with pytest.raises(FileExistsError):
        make(drive_uri, dst).get("top")
    assert (dst / "top" / "f.txt").read_text() == "local, replaced"
    make(drive_uri, dst).get("top", overwrite=True)
    found = {str(p.relative_to(dst)): p.read_text() for p in dst.rglob("*") if p.is_file()}
    assert found == {"top/f.txt": "from the drive", "top/sub/g.txt": "g from the drive",
                     "top/local.txt": "local only, kept"}


def test_a_folder_got_with_overwrite_writes_nothing_through_a_symbolic_link_inside_its_target(
        make, tmp_path, drive_uri):
    """A symbolic link to a folder, inside the local folder a get fills, where the drive has a folder: the get wrote
    the drive's files into the folder the link points to, outside its target, where `cp -r` refuses ("cannot
    overwrite non-directory")."""
    write(tmp_path / "src" / "top" / "sub" / "g.txt", "g from the drive")
    d = make(drive_uri, tmp_path / "src")
    d.put("top")
    outside = write(tmp_path / "outside" / "g.txt", "outside, kept").parent
    dst = tmp_path / "dst"
    (dst / "top").mkdir(parents=True)
    (dst / "top" / "sub").symlink_to(outside)
    with pytest.raises(NotADirectoryError, match=r"dst/top/sub' is a symbolic link: a get of 'top' writes nothing "
                       "through one") as refused:
        d.get("top", overwrite=True, to=dst / "top")
    assert isinstance(refused.value, DriveError)
    assert snapshot(outside) == {"g.txt": sha256_hex(b"outside, kept")}
    assert snapshot(dst) == {"top": "dir", "top/sub": f"link:{outside}"}



def test_a_folder_get_that_fails_midway_says_how_many_files_it_wrote_and_kept(make, tmp_path, drive_uri):
    """A folder get of 100,000 files that failed at the 15,001st named that file and nothing else: that the
    15,000 before it were written, and stay beside what the folder held, was left for the user to find. It says
    how many it wrote and kept (and no longer holds a list of every file it wrote, which no one read: 39 MiB for
    100,000 files)."""
    for sub in ("a", "b", "c"):
        for name in ("1.txt", "2.txt"):
            write(tmp_path / "src" / "top" / sub / name, f"{sub}/{name} from the drive")
    d = make(drive_uri, tmp_path / "src")
    d.put("top")
    listed = [(f.path, f.sha256) for f in d.entries("top", recursive=True)]
    dst = tmp_path / "dst"
    write(dst / "top" / "b", "a local file where the drive has a folder")
    write(dst / "top" / "local.txt", "local only")
    with pytest.raises(NotADirectoryError) as failed:
        d.get("top", overwrite=True, to=dst / "top")
    assert isinstance(failed.value, DriveError)
    assert "'top/b/1.txt'" in str(failed.value)
    assert str(failed.value).endswith("(the get wrote 2 file(s) of the folder before this error; they are kept)")
    assert snapshot(dst) == {
        "top": "dir", "top/a": "dir", "top/a/1.txt": sha256_hex(b"a/1.txt from the drive"),
        "top/a/2.txt": sha256_hex(b"a/2.txt from the drive"),
        "top/b": sha256_hex(b"a local file where the drive has a folder"), "top/local.txt": sha256_hex(b"local only"),
    }
    assert [(f.path, f.sha256) for f in d.entries("top", recursive=True)] == listed


# --- get: returns, waits, overwrite ---------------------------------------------------------


def test_get_returns_local_path(make, tmp_path, drive_uri):
    write(tmp_path / "src" / "d" / "a.txt", "hello")
    make(drive_uri, tmp_path / "src").put("d/a.txt")
    dst = tmp_path / "dst"
    dst.mkdir()
    got = make(drive_uri, dst).get("d/a.txt")
    assert isinstance(got, pathlib.Path)
    assert got == dst / "d" / "a.txt"
    assert got.read_bytes() == b"hello"


@pytest.mark.timeout(90)
def test_get_waits_for_put_from_another_process(twin, start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path)  # alone on it, the get is the one Get its metrics count
    src = tmp_path / "src"
    write(src / "late.txt", "worth the wait")
    dst = tmp_path / "dst"
    dst.mkdir()
    reader = twin(drive_uri, component_name="reader", root_folder=str(dst), endpoint=handle.endpoint)
    with pytest.raises(FileNotFoundError):
        reader.stat("late.txt")
    waiting = Background(lambda: reader.get("late.txt", timeout=60))
    waiting.start()
    handle.wait_open("Get", 1, timeout=30)
    assert not (dst / "late.txt").exists()
    proc = multiprocessing.get_context("spawn").Process(
        target=put_from_another_process, args=(drive_uri, handle.endpoint, str(src), "late.txt")
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    got = waiting.join_checked(60)
    assert got.read_bytes() == b"worth the wait"
    assert reader.stat("late.txt").component == "late_writer"


@pytest.mark.timeout(90)
def test_a_local_file_made_while_a_get_waits_is_kept_without_overwrite(twin, start_daemon, tmp_path, drive_uri):
    """A get checked its local target only before it waited, then renamed the file it fetched over it: a local
    file made meanwhile was replaced, though overwrite=False."""
    handle = start_daemon(tmp_path)  # alone on it, the get is the one Get its metrics count
    write(tmp_path / "src" / "late.txt", "from the drive")
    (tmp_path / "dst").mkdir()
    reader = twin(drive_uri, root_folder=tmp_path / "dst", endpoint=handle.endpoint)
    waiting = Background(lambda: reader.get("late.txt", timeout=60))
    waiting.start()
    handle.wait_open("Get", 1, timeout=30)
    write(tmp_path / "dst" / "late.txt", "made meanwhile")
    Drive(drive_uri, component_name="writer", root_folder=tmp_path / "src", endpoint=handle.endpoint).put("late.txt")
    with pytest.raises(FileExistsError, match=r"late\.txt' was made while the get ran: it is left as it is"):
        waiting.join_checked(60)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["late.txt"], "no temporary file is left beside it"
    assert (tmp_path / "dst" / "late.txt").read_text() == "made meanwhile"


@pytest.mark.parametrize("answer", ["EPERM", "EOPNOTSUPP", "ENOSYS", "EACCES"])
def test_a_get_onto_a_file_system_without_hard_links_renames_and_still_keeps_a_local_file(
        make, tmp_path, drive_uri, answer):
    """A get without overwrite links its file into place; on a file system without hard links it renames it
    instead. Only EPERM and EOPNOTSUPP were taken to mean that: ENOSYS (FUSE) or EACCES raised a bare OSError. And
    the rename replaced a local file made while the get ran, which the link refuses. No such file system can be
    mounted here (this kernel has no vfat, and a FUSE one needs a library the project does not have), so os.link
    answers as one does; the rest is real."""
    write(tmp_path / "a.txt", "from the drive")
    d = make(drive_uri, tmp_path)
    d.put("a.txt")
    dst = tmp_path / "dst"
    dst.mkdir()
    refused = OSError(getattr(errno, answer), os.strerror(getattr(errno, answer)))
    with mock.patch("os.link", side_effect=refused):
        assert d.get("a.txt", to=dst / "a.txt").read_text() == "from the drive"

    def made_meanwhile(tmp: str, target: str) -> None:
        write(pathlib.Path(target), "made meanwhile")
        raise refused

    with mock.patch("os.link", side_effect=made_meanwhile), pytest.raises(
            FileExistsError, match=r"b\.txt' was made while the get ran: it is left as it is"):
        d.get("a.txt", to=dst / "b.txt")
    assert snapshot(dst) == {"a.txt": sha256_hex(b"from the drive"), "b.txt": sha256_hex(b"made meanwhile")}


def test_a_symbolic_link_at_a_gets_target_is_kept_without_overwrite_and_replaced_itself_with_it(
        make, tmp_path, drive_uri):
    """A symbolic link is a local path that exists, even one to nothing: without overwrite it is refused at once
    and kept (as `open(path, "x")` refuses it). With overwrite the link itself is replaced, never written through:
    the file it points to stays as it is, and a missing one is not made."""
    write(tmp_path / "a.txt", "from the drive")
    d = make(drive_uri, tmp_path)
    d.put("a.txt")
    dst = write(tmp_path / "dst" / "elsewhere.txt", "pointed to").parent
    (dst / "dangling").symlink_to(dst / "nothing")
    (dst / "live").symlink_to(dst / "elsewhere.txt")
    for name in ("dangling", "live"):
        with pytest.raises(FileExistsError, match=f"{name}' exists: pass overwrite=True"):
            d.get("a.txt", to=dst / name)
    assert snapshot(dst) == {"dangling": f"link:{dst / 'nothing'}", "live": f"link:{dst / 'elsewhere.txt'}",
                             "elsewhere.txt": sha256_hex(b"pointed to")}
    for name in ("dangling", "live"):
        d.get("a.txt", overwrite=True, to=dst / name)
    assert snapshot(dst) == {"dangling": sha256_hex(b"from the drive"), "live": sha256_hex(b"from the drive"),
                             "elsewhere.txt": sha256_hex(b"pointed to")}


def test_a_device_or_a_pipe_at_a_gets_target_is_refused_and_kept_even_with_overwrite(make, tmp_path, drive_uri):
    """A get puts a whole file in its target's place: over a device node that removed the node (over /dev/null,
    run as root, /dev/null itself). A device, a pipe or a socket is refused before anything is fetched, and kept;
    in a folder get too, where files before it are got and none after it."""
    write(tmp_path / "a.txt", "from the drive")
    write(tmp_path / "f" / "b.txt", "b")
    d = make(drive_uri, tmp_path)
    d.put("a.txt")
    d.put("f")
    dst = tmp_path / "dst"
    (dst / "f").mkdir(parents=True)
    os.mknod(dst / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full's numbers
    os.mkfifo(dst / "fifo")
    os.mkfifo(dst / "f" / "b.txt")
    for name in ("full", "fifo"):
        with pytest.raises(InvalidArgument, match=f"{name}' is a device, a pipe or a socket: a get replaces only"):
            d.get("a.txt", overwrite=True, to=dst / name, timeout=30)  # refused before any wait
    with pytest.raises(InvalidArgument, match=r"b\.txt' is a device, a pipe or a socket"):
        d.get("f", overwrite=True, to=dst / "f")
    assert stat.S_ISCHR(os.lstat(dst / "full").st_mode)
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode) and stat.S_ISFIFO(os.lstat(dst / "f" / "b.txt").st_mode)
    assert sorted(p.name for p in dst.rglob("*")) == ["b.txt", "f", "fifo", "full"], "no temporary file is left"


def test_a_get_to_a_local_path_too_long_for_the_system_is_a_drive_error_naming_it(make, tmp_path, drive_uri):
    """A get whose local path is past the system's limit (4,096 bytes on Linux: here a folder of 3,950 bytes and
    a name of 200) raised a bare OSError (ENAMETOOLONG) as it looked at its target: a file get as it checked
    whether the target exists, a folder get's file as it checked for a device, where it had been a DriveError.
    It is a `LocalFileError` naming the path, with the system's errno; nothing is written, the stored file is
    as it was."""
    name = "n" * 200
    write(tmp_path / "f" / name, "from the drive")
    d = make(drive_uri, tmp_path)
    d.put("f")
    deep = tmp_path / "deep"
    while len(str(deep)) < 3950:
        deep = deep / ("d" * min(200, 3950 - len(str(deep)) - 1))
    (deep / "f").mkdir(parents=True)
    for remote in ("f", f"f/{name}"):
        with pytest.raises(LocalFileError, match=f"{name}' could not be written: File name too long") as failed:
            d.get(remote, to=deep / remote, overwrite=True)
        assert failed.value.errno == errno.ENAMETOOLONG
    assert list((deep / "f").iterdir()) == [], "nothing is written"
    assert d.get(f"f/{name}", to=tmp_path / "again.txt").read_text() == "from the drive"


@contextlib.contextmanager
def immutable(path: pathlib.Path) -> Iterator[None]:
    """`chattr +i path` while the block runs: not even root may change it, add to it or replace it."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i failed: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("immutable_one", ["folder", "file"])
def test_a_get_the_local_file_system_refuses_is_permission_denied(make, tmp_path, drive_uri, immutable_one):
    """A folder a get may not write to (its .part file cannot be made), or a local file it may not replace, raised
    a bare PermissionError, not a DriveError. Root may write anywhere, so the refusal is an immutable folder or
    file (chattr +i), which refuses root too."""
    write(tmp_path / "a.txt", "from the drive")
    d = make(drive_uri, tmp_path)
    d.put("a.txt")
    dst = write(tmp_path / "dst" / "a.txt", "the local version").parent
    with immutable(dst if immutable_one == "folder" else dst / "a.txt"), pytest.raises(
            DriveError, match=r"dst/a\.txt' could not be written: Operation not permitted") as refused:
        d.get("a.txt", overwrite=True, to=dst / "a.txt")
    assert isinstance(refused.value, PermissionError) and refused.value.errno == errno.EPERM
    assert snapshot(dst) == {"a.txt": sha256_hex(b"the local version")}, "no .part file is left"


def test_a_get_onto_a_local_folder_is_an_is_a_directory_error(make, tmp_path, drive_uri):
    """A folder where the file goes, with overwrite=True, raised a DriveError that was no IsADirectoryError, which
    callers catch."""
    write(tmp_path / "a.txt", "from the drive")
    d = make(drive_uri, tmp_path)
    d.put("a.txt")
    write(tmp_path / "dst" / "a.txt" / "kept.txt", "a local file")
    with pytest.raises(DriveError, match=r"dst/a\.txt' could not be written: Is a directory") as refused:
        d.get("a.txt", overwrite=True, to=tmp_path / "dst" / "a.txt")
    assert isinstance(refused.value, IsADirectoryError) and refused.value.errno == errno.EISDIR
    assert snapshot(tmp_path / "dst") == {"a.txt": "dir", "a.txt/kept.txt": sha256_hex(b"a local file")}, \
        "no .part file is left"


@pytest.mark.parametrize(("instead", "builtin", "number"), [
    ("nothing", FileNotFoundError, errno.ENOENT), ("a file", NotADirectoryError, errno.ENOTDIR),
])
def test_a_get_whose_local_folder_goes_while_it_runs_keeps_the_built_in_error(
        make, tmp_path, drive_uri, instead, builtin, number):
    """The folder a get writes to is removed (or a file put in its place) after its first bytes are written: the
    file cannot be moved into place. That raised a DriveError of neither built-in type."""
    write(tmp_path / "a.bin", os.urandom(3 * MIB))
    d = make(drive_uri, tmp_path)
    d.put("a.bin")
    dst = tmp_path / "dst"

    def remove_the_folder(count: int) -> None:
        if dst.is_dir():
            shutil.rmtree(dst)
            if instead == "a file":
                write(dst, "a local file")

    with pytest.raises(DriveError, match=r"dst/a\.bin' could not be written") as failed:
        d.get("a.bin", to=dst / "a.bin", progress=remove_the_folder)
    assert isinstance(failed.value, builtin) and failed.value.errno == number


@pytest.mark.parametrize("size", [3 * MIB, 64 * MIB], ids=["one stream", "ranges"])
def test_a_local_write_error_of_a_get_is_a_drive_error_naming_the_file(make, tmp_path, drive_uri, size):
    """A get whose local write failed otherwise than for space or permission raised a bare OSError, then a DriveError
    that was no OSError: it is both (`LocalFileError`), with the system's errno. The error here
    is a real EFBIG: the file size limit (RLIMIT_FSIZE, as `ulimit -f` sets) lies within the file, as FAT's 4 GiB
    limit lies within a bigger one. A file of 64 MiB or more is sized at once (ftruncate) for its ranged reads."""
    write(tmp_path / "big.bin", os.urandom(size))
    d = make(drive_uri, tmp_path)
    d.put("big.bin")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, limits[1]))
    try:
        with pytest.raises(DriveError, match=r"dst/big\.bin' could not be written: File too large") as failed:
            d.get("big.bin", to=tmp_path / "dst" / "big.bin")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert isinstance(failed.value, OSError) and failed.value.errno == errno.EFBIG
    assert snapshot(tmp_path / "dst") == {}, "no .part file is left"


COUNTED_LOOKS = """
from drived.backends.local import LocalBackend

def counted(stat):
    async def stat_counted(self, key):
        if key.endswith("/awaited.txt"):
            with open({looks!r}, "a") as looks:
                looks.write("look\\n")
        return await stat(self, key)
    return stat_counted

LocalBackend.stat = counted(LocalBackend.stat)
"""


@pytest.mark.timeout(90)
def test_a_waiting_get_looks_again_only_after_a_put_that_may_have_made_its_path(start_daemon, tmp_path, drive_uri):
    """Every change of a drive wakes the gets waiting on it; other paths' puts and deletes must not cost each of
    them a look in the store (with --storage, S3 requests per component), only a put of the awaited path."""
    looks = tmp_path / "looks"
    handle = start_daemon(tmp_path, before=COUNTED_LOOKS.format(looks=str(looks)))
    writer = Drive(drive_uri, component_name="writer", root_folder=str(tmp_path), endpoint=handle.endpoint)
    dst = tmp_path / "dst"
    dst.mkdir()
    reader = Drive(drive_uri, component_name="reader", root_folder=str(dst), endpoint=handle.endpoint)
    write(tmp_path / "first.txt", "first")
    writer.put("first.txt")  # a component to look in from the first look on
    waiting = Background(lambda: reader.get("awaited.txt", timeout=60))
    waiting.start()
    handle.wait_open("Get", 1, timeout=30)
    for i in range(20):
        write(tmp_path / f"other{i}.txt", f"other {i}")
        writer.put(f"other{i}.txt")
        time.sleep(0.05)  # each put a wake-up of its own
    writer.delete("other0.txt")
    write(tmp_path / "awaited.txt", "at last")
    writer.put("awaited.txt")
    assert waiting.join_checked(60).read_bytes() == b"at last"
    assert looks.read_text().count("look") == 2  # the first look, and the one after its put


def test_get_times_out_quickly(make, tmp_path, drive_uri):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        make(drive_uri, tmp_path).get("never.txt", timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "never.txt").exists()


def test_get_timeout_on_existing_file_returns_at_once(make, tmp_path, drive_uri):
    write(tmp_path / "src" / "here.txt", "here")
    make(drive_uri, tmp_path / "src").put("here.txt")
    dst = tmp_path / "dst"
    dst.mkdir()
    t0 = time.monotonic()
    got = make(drive_uri, dst).get("here.txt", timeout=60)
    assert time.monotonic() - t0 < 10
    assert got.read_bytes() == b"here"


# Python for `start_daemon(before=...)`: the daemon's reads of a file's chunks after its first each come 0.8 s late, as
# from a slow disk.
SLOW_READS = """
import asyncio
from drived.backends.local import FileChunks

next_chunk = FileChunks.__anext__

async def late(self):
    if self._position > self._start:
        await asyncio.sleep(0.8)
    return await next_chunk(self)

FileChunks.__anext__ = late
"""


@pytest.mark.timeout(90)
def test_a_get_timeout_bounds_the_wait_for_the_path_not_the_transfer(twin, start_daemon, tmp_path, drive_uri):
    """`timeout` is how long a get waits for its path to appear (DESIGN.md, the .proto's wait_seconds): once the
    path is there, its bytes take as long as they take. Here the file is put while the get waits, and its bytes
    then take longer than the whole timeout to come (three chunks, the last two 0.8 s late each): the get returns
    the file, not TimeoutError."""
    handle = start_daemon(tmp_path, before=SLOW_READS)
    data = os.urandom(3 * MIB)
    write(tmp_path / "src" / "slow.bin", data)
    (tmp_path / "dst").mkdir()
    reader = twin(drive_uri, root_folder=tmp_path / "dst", endpoint=handle.endpoint)
    started = time.monotonic()
    waiting = Background(lambda: reader.get("slow.bin", timeout=2))
    waiting.start()
    handle.wait_open("Get", 1, timeout=30)
    Drive(drive_uri, component_name="writer", root_folder=tmp_path / "src", endpoint=handle.endpoint).put("slow.bin")
    assert waiting.join_checked(60).read_bytes() == data
    assert time.monotonic() - started > 2, "the get outlasted its timeout"


def test_existing_target_fails_before_waiting(make, tmp_path, drive_uri):
    write(tmp_path / "exists.txt", "local")
    d = make(drive_uri, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(FileExistsError) as exc:
        d.get("exists.txt", timeout=30)  # not in the drive: would wait 30s if checked late
    assert time.monotonic() - t0 < 5, "an existing target must fail at once, before any waiting"
    assert isinstance(exc.value, DriveError) and exc.value.code is None
    assert (tmp_path / "exists.txt").read_bytes() == b"local"


def test_overwrite_true_replaces(make, tmp_path, drive_uri):
    write(tmp_path / "src" / "f.txt", "remote version")
    make(drive_uri, tmp_path / "src").put("f.txt")
    write(tmp_path / "dst" / "f.txt", "local version that is longer than the remote one")
    got = make(drive_uri, tmp_path / "dst").get("f.txt", overwrite=True)
    assert got.read_bytes() == b"remote version"
    leftovers = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert leftovers == ["f.txt"], f"no temporary files left beside the target: {leftovers}"


def test_overwrite_false_existing_target_untouched(make, tmp_path, drive_uri):
    write(tmp_path / "src" / "f.txt", "remote")
    make(drive_uri, tmp_path / "src").put("f.txt")
    write(tmp_path / "dst" / "f.txt", "mine")
    with pytest.raises(FileExistsError):
        make(drive_uri, tmp_path / "dst").get("f.txt")
    assert (tmp_path / "dst" / "f.txt").read_bytes() == b"mine"


def test_a_file_with_the_longest_name_a_file_system_allows_is_got(make, tmp_path, drive_uri):
    """The temporary file of a get was named after its whole target: a name of 244 bytes, which a put stores,
    made one over 255 bytes, and the get failed with a bare `OSError: File name too long`."""
    name = "é" * 120 + ".bin"  # 244 bytes in UTF-8
    write(tmp_path / "src" / name, "long")
    make(drive_uri, tmp_path / "src").put(name)
    (tmp_path / "dst").mkdir()
    assert make(drive_uri, tmp_path / "dst").get(name).read_bytes() == b"long"
    assert [p.name for p in (tmp_path / "dst").iterdir()] == [name], "no temporary file is left beside it"


# --- root_folder ------------------------------------------------------------------------------


def test_root_folder_resolved_per_call(make, tmp_path, drive_uri, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    write(one / "a.txt", "from one")
    two.mkdir()
    d = make(drive_uri, None, "work_a")  # no root_folder: cwd at each call
    monkeypatch.chdir(one)
    d.put("a.txt")
    monkeypatch.chdir(two)
    got = d.get("a.txt")
    assert pathlib.Path(got).resolve() == (two / "a.txt").resolve()
    assert (two / "a.txt").read_bytes() == b"from one"
    write(two / "b.txt", "from two")
    d.put("b.txt")  # resolved in the new cwd
    assert d.list(".") == ["a.txt", "b.txt"]


def test_explicit_root_folder_ignores_cwd(make, tmp_path, drive_uri, monkeypatch):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    write(root / "a.txt", "in root")
    write(elsewhere / "a.txt", "elsewhere")
    d = make(drive_uri, root)
    monkeypatch.chdir(elsewhere)
    d.put("a.txt")
    (root / "a.txt").unlink()
    got = d.get("a.txt")
    assert pathlib.Path(got).resolve() == (root / "a.txt").resolve()
    assert got.read_bytes() == b"in root"
    assert (elsewhere / "a.txt").read_bytes() == b"elsewhere"


# --- the Drive object -------------------------------------------------------------------------


def test_str_is_uri(make, twin, tmp_path, drive_uri):
    assert str(make(drive_uri, tmp_path)) == drive_uri
    assert str(twin("lit://drive_1")) == "lit://drive_1"


def test_drive_picklable_and_deepcopyable_after_use(make, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "a")
    d = make(drive_uri, tmp_path, "work_a")
    d.put("a.txt")  # the channel now exists; it must not break pickling
    for clone in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d), copy.copy(d)):
        assert str(clone) == drive_uri
        assert clone.list(".") == ["a.txt"]
        assert clone.stat("a.txt").component == "work_a"
    d.delete("a.txt")
    assert pickle.loads(pickle.dumps(d)).list(".") == []


def test_drive_picklable_before_use(make, tmp_path, drive_uri):
    d = make(drive_uri, tmp_path, "work_x", allow_duplicates=True)
    clone = pickle.loads(pickle.dumps(d))
    write(tmp_path / "x.txt", "x")
    clone.put("x.txt")
    assert d.stat("x.txt").component == "work_x"


# --- stat -------------------------------------------------------------------------------------


def test_stat_fields(make, tmp_path, drive_uri):
    data = b"stat me please"
    write(tmp_path / "dir" / "s.txt", data)
    d = make(drive_uri, tmp_path, "stat_comp")
    before = datetime.datetime.now(datetime.timezone.utc)
    d.put("dir/s.txt")
    after = datetime.datetime.now(datetime.timezone.utc)
    st = d.stat("dir/s.txt")
    assert st.path == "dir/s.txt"
    assert st.size == len(data)
    assert st.sha256 == sha256_hex(data)
    assert st.etag == ""
    assert st.component == "stat_comp"
    assert isinstance(st.generation, int) and st.generation > 0
    assert st.folder is False
    assert isinstance(st.modified, datetime.datetime)
    modified = st.modified if st.modified.tzinfo else st.modified.replace(tzinfo=datetime.timezone.utc)
    slack = datetime.timedelta(seconds=5)
    assert before - slack <= modified <= after + slack, (before, modified, after)
    assert d.stat("dir/s.txt", component_name="stat_comp").sha256 == st.sha256
    folder = d.stat("dir")
    assert folder.folder is True and folder.size == 0 and folder.path == "dir"


def test_stat_of_empty_file(make, tmp_path, drive_uri):
    write(tmp_path / "empty", b"")
    d = make(drive_uri, tmp_path)
    d.put("empty")
    st = d.stat("empty")
    assert (st.size, st.sha256) == (0, sha256_hex(b""))


def test_stat_root_refused(make, tmp_path, drive_uri):
    d = make(drive_uri, tmp_path)
    for root in ("", "."):
        with pytest.raises(ValueError) as exc:
            d.stat(root)
        assert exc.value.code in (None, grpc.StatusCode.INVALID_ARGUMENT)


def test_put_returns_without_leaving_local_changes(make, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "a")
    before = sorted(os.listdir(tmp_path))
    make(drive_uri, tmp_path).put("a.txt")
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "a.txt").read_bytes() == b"a"


# --- entries, put(to=), get(to=), progress --------------------------------------------------------


def test_entries_are_typed_sorted_and_recursive(make, tmp_path, drive_uri):
    write(tmp_path / "b.txt", "bb")
    write(tmp_path / "dir" / "sub" / "c.txt", "ccc")
    write(tmp_path / "dir" / "a.txt", "a")
    make(drive_uri, tmp_path, "work_a").put("dir")
    make(drive_uri, tmp_path, "work_b").put("b.txt")
    reader = make(drive_uri, tmp_path, "reader")
    top = list(reader.entries())
    assert all(isinstance(e, FileStat) for e in top)
    assert [(e.path, e.folder, e.size, e.component) for e in top] == [
        ("b.txt", False, 2, "work_b"), ("dir", True, 0, "work_a"),
    ]
    assert top[0].sha256 == sha256_hex(b"bb") and top[0].modified is not None
    assert [e.path for e in reader.entries("dir")] == ["dir/a.txt", "dir/sub"]
    deep = list(reader.entries(".", recursive=True))
    assert [(e.path, e.folder) for e in deep] == [("b.txt", False), ("dir/a.txt", False), ("dir/sub/c.txt", False)]
    assert [e.path for e in reader.entries(component_name="work_b", recursive=True)] == ["b.txt"]
    assert list(reader.entries("no/such/folder")) == []
    assert [e.path for e in reader.entries(".")] == reader.list(".")
    with pytest.raises(ValueError):
        list(reader.entries("../up"))


def test_put_to_another_drive_path_returns_what_it_stored(make, tmp_path, drive_uri):
    write(tmp_path / "local" / "a.txt", "aaa")
    write(tmp_path / "local" / "tree" / "x.bin", b"x" * 2_000_000)  # bigger than a message: a Put stream
    write(tmp_path / "local" / "tree" / "y.txt", "y")
    d = make(drive_uri, tmp_path / "local", "work_a")
    stored = d.put("a.txt", to="renamed/b.txt")
    assert [(f.path, f.size, f.sha256, f.component) for f in stored] == [
        ("renamed/b.txt", 3, sha256_hex(b"aaa"), "work_a"),
    ]
    stored = d.put(tmp_path / "local" / "tree", to="copies/tree")  # an absolute local path
    assert [(f.path, f.size) for f in stored] == [("copies/tree/x.bin", 2_000_000), ("copies/tree/y.txt", 1)]
    assert all(isinstance(f, FileStat) and f.generation > 0 for f in stored)
    assert d.put("a.txt") == [d.stat("a.txt")]  # without `to`: the same path in the drive
    assert d.list(".") == ["a.txt", "copies", "renamed"]
    for bad in ("../b.txt", "/abs.txt", ""):
        with pytest.raises(ValueError):
            d.put("a.txt", to=bad)
    with pytest.raises(FileNotFoundError):
        d.put("missing.txt", to="m.txt")
    assert d.list(".") == ["a.txt", "copies", "renamed"], "refused puts store nothing"


def test_get_to_another_local_path(make, tmp_path, drive_uri):
    write(tmp_path / "src" / "d" / "f.txt", "file")
    write(tmp_path / "src" / "d" / "sub" / "g.txt", "folder file")
    make(drive_uri, tmp_path / "src").put("d")
    root = tmp_path / "root"
    root.mkdir()
    d = make(drive_uri, root)
    elsewhere = tmp_path / "elsewhere" / "named.txt"
    assert d.get("d/f.txt", to=elsewhere) == elsewhere
    assert elsewhere.read_bytes() == b"file"
    assert d.get("d/f.txt", to="relative/f2.txt") == root / "relative" / "f2.txt"  # resolved under root_folder
    assert (root / "relative" / "f2.txt").read_bytes() == b"file"
    assert d.get("d", to=tmp_path / "tree") == tmp_path / "tree"
    assert (tmp_path / "tree" / "sub" / "g.txt").read_bytes() == b"folder file"
    write(elsewhere, "mine")
    with pytest.raises(FileExistsError):
        d.get("d/f.txt", to=elsewhere)
    assert elsewhere.read_bytes() == b"mine"
    assert d.get("d/f.txt", to=elsewhere, overwrite=True).read_bytes() == b"file"
    assert not (root / "d").exists(), "nothing went to the default target"


def test_progress_counts_every_byte_moved(make, tmp_path, drive_uri):
    sizes = {"p/small.txt": 10, "p/empty.bin": 0, "p/big.bin": 3 * 1024 * 1024 + 7}
    for name, size in sizes.items():
        write(tmp_path / "src" / name, os.urandom(size))
    d = make(drive_uri, tmp_path / "src")
    sent: list[int] = []
    d.put("p", progress=sent.append)
    assert sum(sent) == sum(sizes.values()) and all(n >= 0 for n in sent)
    single: list[int] = []
    d.put("p/small.txt", to="one.txt", progress=single.append)  # one unary call
    assert sum(single) == 10
    received: list[int] = []
    (tmp_path / "dst").mkdir()
    make(drive_uri, tmp_path / "dst").get("p", progress=received.append)
    assert sum(received) == sum(sizes.values())
    assert (tmp_path / "dst" / "p" / "big.bin").read_bytes() == (tmp_path / "src" / "p" / "big.bin").read_bytes()


# --- mends ------------------------------------------------------------------------------------


def test_root_folder_must_be_an_existing_folder(twin, daemon, tmp_path, drive_uri):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as absent:
        twin(drive_uri, root_folder=missing, endpoint=daemon.endpoint)
    assert isinstance(absent.value, DriveError) and absent.value.code is None
    assert "missing" in str(absent.value) and not missing.exists()
    a_file = write(tmp_path / "file.txt", "not a folder")
    with pytest.raises(NotADirectoryError) as not_folder:
        twin(drive_uri, root_folder=a_file, endpoint=daemon.endpoint)
    assert isinstance(not_folder.value, DriveError) and "file.txt" in str(not_folder.value)
    assert a_file.read_text() == "not a folder"
    assert twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).list(".") == []


def test_errors_carry_their_status(make, tmp_path, drive_uri):
    """The error table through either twin: built-in bases, and `.code` None for what fails before any call."""
    write(tmp_path / "f.txt", "f")
    a = make(drive_uri, tmp_path, "a")
    b = make(drive_uri, tmp_path, "b")
    a.put("f.txt")
    with pytest.raises(FileExistsError) as exists:
        b.put("f.txt")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(FileNotFoundError) as missing:
        b.delete("f.txt")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(FileNotFoundError) as local_missing:
        a.put("nope.txt")
    assert local_missing.value.code is None
    with pytest.raises(FileExistsError) as target_exists:  # the local target exists: fails before any call
        a.get("f.txt", timeout=30)
    assert target_exists.value.code is None
    with pytest.raises(TimeoutError) as expired:
        a.get("later.txt", timeout=0.3)
    assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(ValueError):
        a.get("../x")
    make(drive_uri, tmp_path, "b", allow_duplicates=True).put("f.txt")
    with pytest.raises(AmbiguousPathError) as ambiguous:
        a.stat("f.txt")
    assert "'a'" in str(ambiguous.value) and "'b'" in str(ambiguous.value)
    write(tmp_path / "dir" / "x.txt", "x")
    a.put("dir")
    with pytest.raises(ValueError, match="folder"):
        list(a.read_range("dir"))
    assert (tmp_path / "f.txt").read_bytes() == b"f"  # nothing local was touched
    assert [(e.path, e.component) for e in a.entries(recursive=True)] == [
        ("dir/x.txt", "a"), ("f.txt", ""),  # a file several components hold is listed once, owned by none
    ]


def test_unreachable_daemon_names_the_endpoint(twin, drive_uri):
    with pytest.raises(ConnectionError) as down:  # after a second of tries (test_resume)
        twin(drive_uri, endpoint="127.0.0.1:1", retry_seconds=1).list(".")
    assert "127.0.0.1:1" in str(down.value) and down.value.code == grpc.StatusCode.UNAVAILABLE


def test_read_range(make, tmp_path, drive_uri):
    data = os.urandom(3 * 1024 * 1024 + 5)
    write(tmp_path / "r.bin", data)
    d = make(drive_uri, tmp_path)
    d.put("r.bin")
    assert b"".join(d.read_range("r.bin", 10, 2_000_000)) == data[10:2_000_010]
    assert b"".join(d.read_range("r.bin", len(data) - 3)) == data[-3:]
    assert b"".join(d.read_range("r.bin", 0, 0)) == b""
    pinned = d.stat("r.bin").sha256
    assert b"".join(d.read_range("r.bin", 0, 5, if_match=pinned)) == data[:5]
    with pytest.raises(StaleIndexError):
        list(d.read_range("r.bin", 0, 5, if_match="0" * 64))
    with pytest.raises(ValueError):
        list(d.read_range("r.bin", -1))


def test_a_path_given_decomposed_is_read_as_the_daemon_names_it(make, tmp_path, drive_uri):
    """A lit:// drive keeps names in Unicode NFC, and answers with them; a get or ranged read given a name
    decomposed (NFD, as macOS file names come) compared the answers with that spelling: a file went into a
    folder made at its target, a folder's files one level too deep, and a ranged read said the file was a
    folder."""
    nfd = unicodedata.normalize("NFD", "café")
    write(tmp_path / "src" / "x.txt", "x")
    write(tmp_path / "one.txt", "one")
    d = make(drive_uri, tmp_path)
    d.put("src", to=nfd)
    d.put("one.txt", to=f"{nfd}.txt")
    assert d.get(f"{nfd}.txt", to=tmp_path / "file.txt").read_bytes() == b"one"
    assert d.get(nfd, to=tmp_path / "folder") == tmp_path / "folder"
    assert snapshot(tmp_path / "folder") == {"x.txt": sha256_hex(b"x")}
    assert b"".join(d.read_range(f"{nfd}.txt", 1)) == b"ne"
    with pytest.raises(ValueError, match="a path is a string"):
        d.get(None)


def test_a_folder_deleted_while_its_get_starts_is_not_found(twin, start_daemon, tmp_path):
    """A daemon that found a folder and then none of its files (deleted in between) ends the Get with no file:
    the get answered its local target, which it had not made, as if the folder had been fetched."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=paused_reads(pause))
    write(tmp_path / "src" / "f" / "a.txt", "a")
    write(tmp_path / "src" / "f" / "b.txt", "b")
    Drive("lit://gone", root_folder=tmp_path / "src", endpoint=handle.endpoint).put("f")
    out = tmp_path / "out"
    out.mkdir()
    reader = twin("lit://gone", root_folder=out, endpoint=handle.endpoint)
    pause.touch()
    get = Background(lambda: reader.get("f"))
    get.start()
    try:
        assert wait_until(pathlib.Path(f"{pause}.reached").exists, 30), "the get never reached its first read"
        Drive("lit://gone", endpoint=handle.endpoint).delete("f")
    finally:
        pause.unlink()
    with pytest.raises(FileNotFoundError, match="'f'"):
        get.join_checked()
    assert list(out.iterdir()) == []


def test_a_folder_put_with_a_name_that_is_not_unicode_is_refused_before_anything_is_sent(make, tmp_path, drive_uri):
    """A Linux file name may be any bytes; one that is not UTF-8 cannot be a drive path. The put failed as it
    built that file's request, with Python's bare "'utf-8' codec can't encode characters in position 2-3:
    surrogates not allowed", naming no file, after the files sorted before it had gone."""
    write(tmp_path / "f" / "a.txt", "a")
    with open(os.path.join(os.fsencode(tmp_path / "f"), b"\xff.txt"), "wb") as bad:
        bad.write(b"bad")
    d = make(drive_uri, tmp_path)
    with pytest.raises(ValueError, match=r"'f/\\udcff\.txt' is not valid unicode"):
        d.put("f")
    assert d.list(".") == []


def test_a_folder_put_of_two_names_that_differ_only_by_normalisation_is_refused_naming_both(
        make, tmp_path, drive_uri):
    """A Linux folder may hold "é.txt" composed and decomposed as two files; a drive keeps one path for both (NFC).
    Both were sent to that one path: the second replaced the first, and the put answered two stored files."""
    write(tmp_path / "f" / "a.txt", "a")
    composed = write(tmp_path / "f" / unicodedata.normalize("NFC", "é.txt"), "composed")
    decomposed = write(tmp_path / "f" / unicodedata.normalize("NFD", "é.txt"), "decomposed")
    d = make(drive_uri, tmp_path)
    with pytest.raises(ValueError, match=f"'{re.escape(str(decomposed))}' and '{re.escape(str(composed))}' are one "
                       "drive path"):
        d.put("f")
    assert d.list(".") == []


@pytest.mark.parametrize("change", ["rewrite", "truncate", "rewrite, times set back"])
def test_a_local_file_written_to_while_it_is_put_is_refused_and_the_stored_version_stays(
        make, tmp_path, drive_uri, change):
    """A file rewritten in place while its put read it was stored as a mix of its two versions: the CRC32C
    covers the bytes read, so the daemon committed them. One cut shorter got "size mismatch ... retry the put".
    A writer that sets the modification time back (`cp -p`, `touch -r`) leaves only the change time moved."""
    size = 8 * 1024 * 1024
    local = write(tmp_path / "model.bin", os.urandom(size))
    d = make(drive_uri, tmp_path)
    [before] = d.put("model.bin")
    local.write_bytes(os.urandom(size))
    sent = [0]

    def write_while_sending(count: int) -> None:
        sent[0] += count
        if sent[0] - count < 2 * 1024 * 1024 <= sent[0]:
            time.sleep(0.05)  # past the clock tick of the put's open, whose times are compared
            opened = local.stat()
            with open(local, "r+b") as f:
                if change == "truncate":
                    f.truncate(size // 2)
                else:
                    f.write(bytes(size))
            if change == "rewrite, times set back":
                os.utime(local, ns=(opened.st_atime_ns, opened.st_mtime_ns))

    with pytest.raises(StaleIndexError, match=r"model\.bin' changed while it was being put .* put it again"):
        d.put("model.bin", progress=write_while_sending)
    assert d.stat("model.bin").sha256 == before.sha256
    assert sha256_hex(d.get("model.bin", to=tmp_path / "got.bin").read_bytes()) == before.sha256


def test_a_file_removed_while_its_folder_is_put_is_not_found_and_its_stored_version_stays(make, tmp_path, drive_uri):
    """A file of a folder put removed before the put opened it raised a bare FileNotFoundError, not a DriveError."""
    write(tmp_path / "f" / "c.bin", "stored before")
    d = make(drive_uri, tmp_path)
    [before] = d.put("f/c.bin")
    for name in ("a.bin", "b.bin", "c.bin"):
        write(tmp_path / "f" / name, os.urandom(3 * 1024 * 1024))  # each more than a message: one Put stream
    removed: list[int] = []

    def remove_c(count: int) -> None:
        if not removed:
            removed.append(count)
            (tmp_path / "f" / "c.bin").unlink()

    with pytest.raises(DriveError, match=r"f/c\.bin' was removed while the put ran") as failed:
        d.put("f", progress=remove_c)
    assert isinstance(failed.value, FileNotFoundError)
    assert d.stat("f/c.bin").sha256 == before.sha256


# Reading /proc/self/mem from its first byte fails with EIO, in whichever process reads it: a local file whose read
# fails as a failing disk's does, with no FUSE file system or fault injection. It is a regular file of size 0.
FAILING_READ = pathlib.Path("/proc/self/mem")


@pytest.mark.parametrize("put_of", ["the file", "its folder"])
def test_a_put_whose_local_file_cannot_be_read_is_a_drive_error_naming_it(make, tmp_path, drive_uri, put_of):
    """A read of a put's local file that failed (EIO) raised a bare OSError naming no file, which a caller catching
    DriveError missed: it is a `LocalFileError` (an OSError too) naming the file, with the system's errno, and
    saying what was stored; in a Put stream too, which gRPC would report as CANCELLED. The stored version of the
    file stays; of a folder, no file after it is stored."""
    write(tmp_path / "f" / "a.bin", os.urandom(3 * MIB))  # more than a message: the folder goes in a Put stream
    write(tmp_path / "f" / "b.bin", "stored before")
    d = make(drive_uri, tmp_path)
    [before] = d.put("f/b.bin")
    (tmp_path / "f" / "b.bin").unlink()
    (tmp_path / "f" / "b.bin").symlink_to(FAILING_READ)
    write(tmp_path / "f" / "c.bin", "after it")
    with pytest.raises(DriveError, match=r"local path '.*/f/b\.bin' could not be read: Input/output error "
                                         r"\(nothing of it was stored") as failed:
        d.put("f/b.bin" if put_of == "the file" else "f")
    assert isinstance(failed.value, LocalFileError) and failed.value.errno == errno.EIO
    assert failed.value.code is None
    if put_of == "its folder":
        assert str(failed.value).endswith("(a folder put: the files before it in path order may be stored, none "
                                          "after it)")
    assert d.stat("f/b.bin").sha256 == before.sha256
    assert d.list("f") in (["f/b.bin"], ["f/a.bin", "f/b.bin"])


def test_drive_put_of_a_file_it_cannot_read_says_which_in_one_line(daemon, tmp_path, drive_uri):
    """The CLI printed `drive: [Errno 5] Input/output error`, naming no file, for a folder put whose file failed."""
    write(tmp_path / "f" / "a.txt", "a")
    (tmp_path / "f" / "b.bin").symlink_to(FAILING_READ)
    script = "import sys; from drive_client.cli import main; sys.exit(main())"
    run = subprocess.run([sys.executable, "-c", script, "--endpoint", daemon.endpoint, "put", str(tmp_path / "f"),
                          f"{drive_uri}/f"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert re.fullmatch(r"drive: local path '.*/f/b\.bin' could not be read: Input/output error \(nothing of it "
                        r"was stored\) \(a folder put: .*\)\n", run.stderr), run.stderr
    assert Drive(drive_uri, endpoint=daemon.endpoint).list("f") in ([], ["f/a.txt"])


def test_a_put_of_a_pipe_says_what_it_is(make, tmp_path, drive_uri):
    """`drive put <(make_data) lit://d/x` gives a pipe, which a put cannot size or read again after a cut: the put
    said "local path '/dev/fd/63' does not exist" of a path that exists."""
    os.mkfifo(tmp_path / "pipe")
    d = make(drive_uri, tmp_path)
    with pytest.raises(ValueError, match="/pipe' is not a file or a folder"):
        d.put("pipe")
    assert d.list(".") == []


def test_a_folder_put_follows_a_link_to_a_folder_as_it_follows_one_to_a_file(make, tmp_path, drive_uri):
    """A folder put stored the file a link pointed to, but passed by a link to a folder, and its files, without a
    word (a dataset folder whose `train` links to a shared disk was put without it). A link to nothing, a pipe and
    a socket hold no file: they are passed by."""
    write(tmp_path / "f" / "a.txt", "a")
    shared = write(tmp_path / "shared" / "train" / "x.bin", "x").parent.parent
    write(shared / "train" / "deeper" / "y.bin", "y")
    (tmp_path / "f" / "train").symlink_to(shared / "train")
    (tmp_path / "f" / "x.bin").symlink_to(shared / "train" / "x.bin")
    (tmp_path / "f" / "nothing").symlink_to(tmp_path / "missing")
    os.mkfifo(tmp_path / "f" / "pipe")
    d = make(drive_uri, tmp_path)
    assert [s.path for s in d.put("f")] == ["f/a.txt", "f/train/deeper/y.bin", "f/train/x.bin", "f/x.bin"]
    got = d.get("f", to=tmp_path / "got")
    assert snapshot(got) == {"a.txt": sha256_hex(b"a"), "train": "dir", "train/x.bin": sha256_hex(b"x"),
                             "train/deeper": "dir", "train/deeper/y.bin": sha256_hex(b"y"), "x.bin": sha256_hex(b"x")}


@pytest.mark.parametrize("points_to", ["f", "f/sub"])
def test_a_folder_put_of_a_folder_holding_a_link_to_itself_is_refused_naming_it(
        make, tmp_path, drive_uri, points_to):
    """A link to a folder that holds it would be followed for good: it is refused before anything is sent."""
    write(tmp_path / "f" / "sub" / "a.txt", "a")
    (tmp_path / "f" / "sub" / "up").symlink_to(tmp_path / points_to)
    d = make(drive_uri, tmp_path)
    with pytest.raises(ValueError, match=r"f/sub/up' is a link to a folder that holds it"):
        d.put("f")
    assert d.list(".") == []


@pytest.mark.parametrize("unreadable", ["subfolder", "file"])
def test_a_folder_put_with_a_subfolder_or_file_it_cannot_read_fails_naming_it_and_stores_nothing(
        daemon, tmp_path, drive_uri, unreadable):
    """A folder put walked past a subfolder it could not read (the walk's errors were dropped): it answered the
    other files as the folder, so a put of a folder a teammate's files were in lost those without a word. Then it
    raised a bare PermissionError, which a caller catching DriveError missed; so did a put of a file it may not
    open: both are `PermissionDenied`, a DriveError and a PermissionError. Run in a process that file permissions
    bind: root's own pass them by."""
    write(tmp_path / "f" / "a.txt", "a")
    secret = write(tmp_path / "f" / "secret" / "s.txt", "s").parent
    if unreadable == "file":  # the first in path order: no file is sent before it
        secret = write(tmp_path / "f" / "0.txt", "0")
    bound = []
    if os.geteuid() == 0:
        bound = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if shutil.which("setpriv") is None or subprocess.run([*bound, "true"]).returncode != 0:
            pytest.skip("needs setpriv to take from root its power to read any folder")
    put = ("import sys; from drive_client import Drive; "
           "Drive(sys.argv[1], endpoint=sys.argv[2]).put(sys.argv[3], to='f')")
    secret.chmod(0)
    try:
        run = subprocess.run([*bound, sys.executable, "-c", put, drive_uri, daemon.endpoint, str(tmp_path / "f")],
                             capture_output=True, text=True, timeout=30)
    finally:
        secret.chmod(0o755)
    assert run.returncode == 1 and (f"drive_client.errors.PermissionDenied: local path '{secret}' could not be "
                                    "read: Permission denied (nothing ") in run.stderr, run.stderr
    assert Drive(drive_uri, endpoint=daemon.endpoint).list(".") == []


def test_a_file_of_a_folder_put_replaced_by_a_pipe_before_it_is_read_is_refused_without_waiting(
        make, tmp_path, drive_uri):
    """A folder put lists its files first and opens each in its turn: one replaced by a pipe meanwhile was opened as
    a file, and the open of a pipe waits for a writer, so the put hung for good; a writer that came and went had its
    bytes stored as the file's (none here)."""
    write(tmp_path / "f" / "a.bin", os.urandom(3 * MIB))  # more than a message: a Put stream, read in turn
    b = write(tmp_path / "f" / "b.bin", "stored before")
    d = make(drive_uri, tmp_path)
    [before] = d.put("f/b.bin")

    def pipe_instead_of_b(count: int) -> None:
        if b.is_file():
            b.unlink()
            os.mkfifo(b)

    put = Background(lambda: d.put("f", progress=pipe_instead_of_b))
    put.start()
    put.join(10)
    if put.is_alive():  # the put opened the pipe: end its wait, as a writer would
        os.close(os.open(b, os.O_WRONLY))
    with pytest.raises(ValueError, match=r"f/b\.bin' is not a file .*put it again once it is one"):
        put.join_checked()
    assert d.stat("f/b.bin").sha256 == before.sha256


# --- Ctrl-C in a sync transfer --------------------------------------------------------------

# The end of a child script that made a call (it imported contextlib, json, os, threading and time, and holds its
# `root` folder and a `report` dict): prints the report, as JSON, with what is left running or open once the
# threads the call started have had 5 s to end (the threads' names, the files under `root` it holds open).
LEFT_BEHIND = """
deadline = time.monotonic() + 5
while threading.active_count() > 1 and time.monotonic() < deadline:
    time.sleep(0.05)
files = []
for fd in os.listdir("/proc/self/fd"):
    with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
        files.append(os.readlink(f"/proc/self/fd/{fd}"))
report.update(threads=[t.name for t in threading.enumerate()], files=[path for path in files if path.startswith(root)])
print(json.dumps(report))
"""

# Runs a sync Drive's `put` or `get` of big.bin (sys.argv: uri, endpoint, root, call, bytes, pid to SIGSTOP or 0)
# with a progress callback that, once that many bytes have moved, freezes that process (a hung daemon) and then
# sends this process SIGINT, as Ctrl-C does. Reports (LEFT_BEHIND) how long KeyboardInterrupt took to reach the
# caller.
INTERRUPTED = """
import contextlib, json, os, signal, sys, threading, time
from drive_client import Drive
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal: a background job ignores SIGINT
os.environ["DRIVE_HANDOFF"] = "0"  # `progress` counts the bytes as they are sent, not all at the handoff
uri, endpoint, root, call = sys.argv[1:5]
at, freeze = int(sys.argv[5]), int(sys.argv[6])
drive = Drive(uri, endpoint=endpoint, root_folder=root)
moved, interrupted = 0, []
def interrupt():
    interrupted.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)
def progress(count):
    global moved
    moved += count
    if moved - count < at <= moved:
        if freeze:
            os.kill(freeze, signal.SIGSTOP)
        threading.Timer(0.5 if freeze else 0, interrupt).start()
try:
    if call == "get":
        drive.get("big.bin", overwrite=True, progress=progress)
    else:
        drive.put("big.bin", progress=progress)
    outcome = "returned"
except KeyboardInterrupt:
    outcome = "interrupted"
report = {"outcome": outcome, "seconds": time.monotonic() - interrupted[0]}
""" + LEFT_BEHIND


def interrupted(uri: str, endpoint: str, root: pathlib.Path, call: str, at: int, freeze: int = 0) -> dict:
    """What INTERRUPTED reports of a sync `call` ("put" or "get") of big.bin Ctrl-C'd after `at` bytes moved."""
    run = subprocess.run([sys.executable, "-c", INTERRUPTED, uri, endpoint, str(root), call, str(at), str(freeze)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_ctrl_c_in_a_sync_put_cancels_it_and_leaves_no_thread_or_file_open(start_daemon, tmp_path, drive_uri):
    """gRPC's blocking Put did not cancel its call when KeyboardInterrupt landed in it: a read-ahead thread and a
    gRPC thread stayed blocked for good with the file open, and the daemon kept the upload open (~90 s)."""
    daemon = start_daemon(tmp_path)  # its own: the Puts it counts open are this test's
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    write(tmp_path / "big.bin", b"the first version")
    drive.put("big.bin")
    write(tmp_path / "big.bin", os.urandom(30 * MIB))
    report = interrupted(drive_uri, daemon.endpoint, tmp_path, "put", 4 * MIB)
    assert report["outcome"] == "interrupted" and report["seconds"] < 5, report
    assert report["threads"] == ["MainThread"] and report["files"] == [], report
    assert wait_until(lambda: daemon.open_requests("Put") == 0, timeout=10), "the daemon still serves the put"
    out = drive.get("big.bin", to=str(tmp_path / "out.bin"))
    assert out.read_bytes() == b"the first version"


def test_ctrl_c_in_a_sync_get_of_a_big_file_ends_it_at_once_and_leaves_no_file(start_daemon, tmp_path, drive_uri):
    """A get of 64 MiB or more reads ranges in worker threads; Ctrl-C waited for them to end their blocks, which
    with a hung daemon is never, and a second Ctrl-C meanwhile left the temporary .part file."""
    daemon = start_daemon(tmp_path)  # its own: it is frozen, and the Gets it counts open are this test's
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    write(tmp_path / "big.bin", os.urandom(80 * MIB))
    drive.put("big.bin")
    write(tmp_path / "big.bin", b"the local file")
    try:
        report = interrupted(drive_uri, daemon.endpoint, tmp_path, "get", 20 * MIB, freeze=daemon.proc.pid)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert report["outcome"] == "interrupted" and report["seconds"] < 5, report
    assert report["threads"] == ["MainThread"] and report["files"] == [], report
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("data-", "drived-"))) == ["big.bin"]
    assert (tmp_path / "big.bin").read_bytes() == b"the local file"
    assert wait_until(lambda: daemon.open_requests("Get") == 0, timeout=10), "the daemon still serves the get"
