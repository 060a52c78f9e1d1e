"""A full disk (issue 13): a put that runs out of space is RESOURCE_EXHAUSTED, its partial data is removed,
earlier files stay readable, and puts work again once space is freed.

The data dir lies on a 16 MiB tmpfs where the machine lets the test mount one (root, or a container with
CAP_SYS_ADMIN); elsewhere the same steps run against `--quota`, the other way a drive fills up. The test
prints which ran.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from conftest import MIB, DaemonHandle, no_uploads, raw_get, raw_put, sha256_hex, sitecustomized, snapshot, wait_until

from drive_client import ResourceExhausted
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(180)

SPACE = 16 * MIB
DRIVE = "lit://full"


@contextlib.contextmanager
def small_filesystem(folder: pathlib.Path, options: str = "") -> Iterator[str]:
    """Mounts a SPACE-sized tmpfs on `folder`, with more mount `options` (e.g. "nr_inodes=2": room for its root
    folder and one file); yields "tmpfs", or the reason it could not be mounted."""
    folder.mkdir()
    if shutil.which("mount") is None:
        yield "no mount command"
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SPACE},mode=0700{options and ',' + options}", "tmpfs", str(folder)],
        capture_output=True, text=True, timeout=30,
    )
    if mounted.returncode != 0:
        yield f"mount -t tmpfs failed: {mounted.stderr.strip() or mounted.returncode}"
        return
    try:
        yield "tmpfs"
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def refused_for_space(call) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    return refused.value.details()


def test_a_full_disk_refuses_the_put_removes_its_data_and_recovers(start_daemon, tmp_path):
    with small_filesystem(tmp_path / "small") as how:
        if how == "tmpfs":
            print(f"ran on a {SPACE // MIB} MiB tmpfs")
            handle: DaemonHandle = start_daemon(tmp_path, data_dir=tmp_path / "small" / "data")
        else:
            print(f"ran the quota path ({how})")
            handle = start_daemon(tmp_path, "--quota", str(SPACE - MIB))
        earlier = {"earlier/big.bin": os.urandom(6 * MIB), "earlier/small.txt": b"small and earlier"}
        with grpc.insecure_channel(handle.endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            for path, data in earlier.items():
                raw_put(stub, DRIVE, path, data)
            before = snapshot(handle.data_dir)

            # a big put: the disk fills while its bytes arrive
            message = refused_for_space(lambda: raw_put(stub, DRIVE, "too_big.bin", os.urandom(3 * SPACE // 2)))
            assert str(handle.data_dir) not in message and "/" not in message.split("lit://")[0], message
            assert wait_until(lambda: no_uploads(handle.data_dir), 10), "the partial upload stays"
            assert snapshot(handle.data_dir) == before

            # small puts (committed by the commit worker) until the disk is full
            small = os.urandom(512 * 1024)
            stored, last = [], grpc.StatusCode.OK
            for i in range(2 * SPACE // len(small)):
                try:
                    raw_put(stub, DRIVE, f"fill/{i}.bin", small)
                except grpc.RpcError as err:
                    last = err.code()
                    break
                stored.append(f"fill/{i}.bin")
            assert last == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(stored)} small puts, then {last}"
            assert wait_until(lambda: no_uploads(handle.data_dir), 10)

            # earlier files and what fitted are whole
            for path, data in earlier.items():
                [(_, got)] = raw_get(stub, DRIVE, path)
                assert got == data
            for path in stored:
                [(_, got)] = raw_get(stub, DRIVE, path)
                assert got == small
            listed = {e.path for e in stub.List(pb.ListRequest(drive=DRIVE, path="fill")).entries}
            assert listed == set(stored), "no partial file is listed"

            # space freed: puts work again
            stub.Delete(pb.DeleteRequest(drive=DRIVE, path="earlier/big.bin"), timeout=10)
            stub.Delete(pb.DeleteRequest(drive=DRIVE, path="fill"), timeout=10)
            again = os.urandom(6 * MIB)
            raw_put(stub, DRIVE, "again.bin", again)
            [(_, got)] = raw_get(stub, DRIVE, "again.bin")
            assert got == again
        assert handle.stop() == 0, handle.log()[-3000:]


def test_a_get_onto_a_full_local_disk_is_resource_exhausted_and_keeps_the_local_file(
        twin, daemon, tmp_path, drive_uri):
    """A local disk that filled while a get wrote to it raised a bare OSError (ENOSPC), though every error of the
    client is a DriveError and a full disk is RESOURCE_EXHAUSTED's condition. Both ways of fetching a file are
    tried: one stream, and parallel ranged reads (64 MiB and more)."""
    sizes = {"one_stream.bin": SPACE + MIB, "ranges.bin": 64 * MIB}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint)
    for name in sizes:
        drive.put(name)
    with small_filesystem(tmp_path / "small") as how:
        if how != "tmpfs":
            pytest.skip(f"needs a small file system to fill: {how}")
        for name in sizes:
            (tmp_path / "small" / name).write_bytes(b"the local version")
            with pytest.raises(ResourceExhausted, match=f"the local disk is full: '.*/small/{name}' could not be"):
                drive.get(name, overwrite=True, to=tmp_path / "small" / name)
        assert snapshot(tmp_path / "small") == {name: sha256_hex(b"the local version") for name in sizes}


def test_a_put_refused_for_space_while_its_folders_are_made_leaves_none(start_daemon, tmp_path):
    """A put into new folders whose disk ran out of inodes between two of them left the ones made: empty
    folders that listed, and refused a put of their path, until the daemon's next unclean start."""
    with small_filesystem(tmp_path / "small", "nr_inodes=64") as how:
        if how != "tmpfs":
            pytest.skip(f"needs a small file system to fill: {how}")
        handle = start_daemon(tmp_path, data_dir=tmp_path / "small" / "data")
        with grpc.insecure_channel(handle.endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            filled = []
            with pytest.raises(grpc.RpcError) as full:
                for i in range(64):
                    raw_put(stub, DRIVE, f"fill/{i}", b"x")
                    filled.append(f"fill/{i}")
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full.value.details()
            for path in filled[:2]:  # room for the upload's file and one folder, not two
                stub.Delete(pb.DeleteRequest(drive=DRIVE, path=path), timeout=10)
            before = snapshot(handle.data_dir)
            message = refused_for_space(lambda: raw_put(stub, DRIVE, "new/deeper/file", b"needs two folders"))
            assert "new" not in [e.path for e in stub.List(pb.ListRequest(drive=DRIVE, path=".")).entries], message
            assert wait_until(lambda: no_uploads(handle.data_dir), 10)
            assert snapshot(handle.data_dir) == before
            raw_put(stub, DRIVE, "new", b"a file where the folder was made")
            assert raw_get(stub, DRIVE, "new")[0][1] == b"a file where the folder was made"
        assert handle.stop() == 0, handle.log()[-3000:]


@pytest.mark.parametrize("step", ["folder", "temporary file", "link"])
def test_a_local_disk_full_before_a_get_writes_is_resource_exhausted_and_leaves_nothing(
        twin, daemon, tmp_path, drive_uri, step):
    """A get ran out of room before its first byte, which raised a bare OSError (ENOSPC) where one that filled the
    disk with its bytes raised ResourceExhausted. The tmpfs has inodes for its root folder and one file, so each
    step that takes one more fails: the folder a get makes for its target, its temporary `.part` file (beside a
    local file it would replace), and the link that moves that file into place without overwrite (a tmpfs counts
    a hard link as an inode; a rename takes none, so a full folder failing a rename is not reproduced here)."""
    (tmp_path / "a.txt").write_bytes(b"from the drive")
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint)
    drive.put("a.txt")
    small = tmp_path / "small"
    with small_filesystem(small, "nr_inodes=2") as how:
        if how != "tmpfs":
            pytest.skip(f"needs a small file system to fill: {how}")
        if step != "link":
            (small / "a.txt").write_bytes(b"the local version")  # the one file there is room for
        target = small / "sub" / "a.txt" if step == "folder" else small / "a.txt"
        before = snapshot(small)
        with pytest.raises(ResourceExhausted, match=f"the local disk is full: '{target}' could not be written"):
            drive.get("a.txt", overwrite=step == "temporary file", to=target)
        assert snapshot(small) == before, "no .part file is left, and a local file is as it was"


# Run first in the daemon's process and in its commit worker's (both import sitecustomize): the fsync of a drive's
# folder fails with EIO while the file FAILING exists, as a failing disk's does.
FAILING_FOLDER_FSYNC = """
import errno, os
from drived.backends import stored

fsync_folder = stored.fsync_folder

def failing(folder):
    if os.path.exists({failing!r}) and "/objects/" in folder:
        raise OSError(errno.EIO, "Input/output error")
    fsync_folder(folder)

stored.fsync_folder = failing
"""


@pytest.mark.parametrize("size", [4096, 3 * MIB], ids=["small", "big"])
def test_a_put_whose_folder_fsync_fails_after_its_rename_is_reported_and_counted(start_daemon, tmp_path, size):
    """A disk that fails the fsync of a folder after a put's rename (EIO): the file is visible to every reader,
    but the put failed before it was reported and counted: no watch saw it, and the quota did not count it, so
    the drive could pass its quota by it. It is reported and counted as it is seen, and the put still fails,
    UNAVAILABLE, saying why (tests/test_operator.py: what the client sees then)."""
    from test_watch import collect

    failing = tmp_path / "failing"
    handle = start_daemon(tmp_path, "--quota", str(size + size // 2),
                          env=sitecustomized(tmp_path, FAILING_FOLDER_FSYNC.format(failing=str(failing))))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    events, watcher, _ = collect(stub, DRIVE, 1)
    data = os.urandom(size)

    failing.touch()
    with pytest.raises(grpc.RpcError) as failed:
        raw_put(stub, DRIVE, "f.bin", data)
    failing.unlink()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert raw_get(stub, DRIVE, "f.bin")[0][1] == data, "visible, as the rename made it"
    watcher.join(10)
    assert [event[:2] for event in events[1:]] == [("KIND_PUT", "f.bin")]
    refused_for_space(lambda: raw_put(stub, DRIVE, "g.bin", data))  # the quota counts the first
    assert [entry.path for entry in stub.List(pb.ListRequest(drive=DRIVE, path=".")).entries] == ["f.bin"]
    assert "may not survive a power cut" in handle.log()
