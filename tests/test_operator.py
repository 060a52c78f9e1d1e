"""An operator's bad day on a single daemon's data dir: what is changed under a running daemon, and what it is
started on."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import grpc
import pytest
from conftest import (
    MIB,
    ROOT,
    Background,
    free_port,
    raw_get,
    raw_put,
    rpc_code,
    sha256_hex,
    sitecustomized,
    snapshot,
    spawn_daemon,
    wait_until,
    write_random_file,
)
from cutting_proxy import CuttingProxy
from test_resume import metric

from drive_client import Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def test_a_daemon_whose_lock_file_was_removed_still_refuses_a_second_one_on_its_data_dir(tmp_path, start_daemon):
    """`lock` looks like a stale lock file to remove: with it gone, a second drived started on the data dir took a
    new `lock`, served beside the first one and removed its held upload from tmp/ (the resume failed INTERNAL)."""
    first = start_daemon(tmp_path)
    data = os.urandom(3 * MIB)
    header = pb.PutHeader(drive="lit://shared", path="held.bin", upload_id="u-held")
    with grpc.insecure_channel(first.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        cut = [pb.PutRequest(header=header), pb.PutRequest(data=data[:2 * MIB])]
        assert rpc_code(lambda: stub.Put(iter(cut), timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT  # held
        before = snapshot(first.data_dir)  # the refused daemon makes `lock` again, as empty
        os.unlink(first.data_dir / "lock")
        listen = f"127.0.0.1:{free_port()}"
        second = spawn_daemon(["--listen", listen, "--data-dir", str(first.data_dir)], tmp_path / "second.log",
                              first.data_dir, listen)
        try:
            rc = second.proc.wait(20)
        except subprocess.TimeoutExpired:
            second.stop(signal.SIGKILL)
            pytest.fail(f"a second daemon served the data dir in use once its lock file was removed:\n{second.log()}")
        assert rc == 1 and "Traceback" not in second.log(), second.log()
        assert f"{first.data_dir}: in use by another drived" in second.log(), second.log()
        assert snapshot(first.data_dir) == before
        header.write_offset = 2 * MIB
        rest = [pb.PutRequest(data=data[2 * MIB:]), pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
        stub.Put(iter([pb.PutRequest(header=header), *rest]), timeout=30)
        assert [d for _, d in raw_get(stub, "lit://shared", "held.bin")] == [data]


def chattr(flag: str, path: pathlib.Path) -> None:
    """Sets or clears the immutable attribute of `path`: a folder or file even root cannot change."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", flag, str(path)]).returncode:
        pytest.skip("chattr +i does not work here")


@pytest.mark.parametrize("stuck", ["tmp", "tmp/0"])
def test_a_tmp_folder_that_cannot_be_emptied_at_start_is_refused_naming_it(tmp_path, start_daemon, stuck):
    """tmp/ immutable, or a leftover upload in it that cannot be removed: the start went on as if tmp/ were empty,
    served, and failed the puts INTERNAL (every one, or the one whose upload got the leftover's name)."""
    handle = start_daemon(tmp_path)
    with grpc.insecure_channel(handle.endpoint) as channel:
        raw_put(drive_pb2_grpc.DriveServiceStub(channel), "lit://kept", "a.txt", b"stored before")
    assert handle.stop() == 0
    (handle.data_dir / "tmp" / "0").write_bytes(b"a leftover upload")
    chattr("+i", handle.data_dir / stuck)
    try:
        before = [snapshot(handle.data_dir / folder) for folder in ("objects", "tmp")]
        res = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}",
                              "--data-dir", str(handle.data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=10)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"drived: --data-dir {handle.data_dir}: cannot empty {handle.data_dir / 'tmp'}"), last
        assert [snapshot(handle.data_dir / folder) for folder in ("objects", "tmp")] == before
    finally:
        chattr("-i", handle.data_dir / stuck)
    again = start_daemon(tmp_path, data_dir=handle.data_dir)  # put back: served, the leftover removed
    assert os.listdir(handle.data_dir / "tmp") == []
    with grpc.insecure_channel(again.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "b.txt", b"stored after")
        assert [d for _, d in raw_get(stub, "lit://kept", "a.txt")] == [b"stored before"]


def test_a_tmp_folder_that_is_a_link_is_refused_naming_it(tmp_path, start_daemon):
    """tmp/ planted as a link to an empty folder elsewhere: start-up could not empty it (rmtree refuses a link),
    served, and wrote every upload through it, where what it left was never cleaned."""
    handle = start_daemon(tmp_path)
    assert handle.stop() == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(handle.data_dir / "tmp")
    (handle.data_dir / "tmp").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    res = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}",
                          "--data-dir", str(handle.data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=10)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"cannot empty {handle.data_dir / 'tmp'}, where uploads are written" in res.stderr, res.stderr
    assert snapshot(elsewhere) == before == {} and (handle.data_dir / "tmp").is_symlink()


def _details(call) -> tuple[grpc.StatusCode, str]:
    """The status code and message of `call`, a unary call or one that reads its whole stream, which must fail."""
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code(), failed.value.details()


def _stored(stub: drive_pb2_grpc.DriveServiceStub, path: str) -> bytes:
    return b"".join(data for _, data in raw_get(stub, "lit://kept", path))


@pytest.mark.parametrize("fault", ["immutable", "a file in its place", "a read-only data dir"])
def test_a_tmp_folder_broken_while_serving_fails_puts_unavailable_naming_it_until_mended(tmp_path, start_daemon, fault):
    """A tmp/ made unwritable (chattr +i: root ignores modes), or removed where drived cannot make it again (a file
    named tmp in its place, the data dir read-only) while the daemon served: every put answered INTERNAL "see the
    daemon log". Small puts (committed by the commit worker) and big ones (written by worker threads) answer
    UNAVAILABLE naming the data dir, tmp/ and why, which clients retry; nothing stored changes, and once mended
    puts work again without a restart."""
    handle = start_daemon(tmp_path)
    tmp = handle.data_dir / "tmp"
    big = os.urandom(3 * MIB)  # past FLUSH_BYTES: written to tmp/ while it arrives
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "a.txt", b"version 1")
        before = snapshot(handle.data_dir / "objects")
        if fault == "immutable":
            chattr("+i", tmp)
        else:
            shutil.rmtree(tmp)
            if fault == "a file in its place":
                tmp.write_bytes(b"an operator's file")
            else:
                chattr("+i", handle.data_dir)
        try:
            for path, data in (("a.txt", b"version 2"), ("big.bin", big)):
                code, details = _details(lambda p=path, d=data: raw_put(stub, "lit://kept", p, d))
                assert code == grpc.StatusCode.UNAVAILABLE, details
                named = f"drived: --data-dir {handle.data_dir}: "
                assert details.startswith(f"{named}cannot write its tmp/ folder"), details
                assert "[Errno " in details and "nothing was stored" in details, details
            assert snapshot(handle.data_dir / "objects") == before
            assert _stored(stub, "a.txt") == b"version 1"
            if fault == "a file in its place":
                assert tmp.read_bytes() == b"an operator's file"
        finally:
            if fault == "immutable":
                chattr("-i", tmp)
            elif fault == "a file in its place":
                tmp.unlink()
            else:
                chattr("-i", handle.data_dir)
        raw_put(stub, "lit://kept", "a.txt", b"version 2")
        raw_put(stub, "lit://kept", "big.bin", big)
        assert _stored(stub, "a.txt") == b"version 2" and _stored(stub, "big.bin") == big
    assert "Traceback" not in handle.log(), handle.log()


def _made_again(handle) -> list[dict]:
    """The daemon's log lines saying it made tmp/ again."""
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event", "").startswith("tmp/ was removed while drived ran")]


def test_a_tmp_folder_removed_while_serving_is_made_again_and_its_held_upload_is_not_found(tmp_path, start_daemon):
    """`rm -rf DATA_DIR/tmp` while the daemon served: every put answered UNAVAILABLE until the operator made tmp/
    again, and the upload held there was still described as held (QueryWriteStatus) though its bytes were gone.
    The next put makes tmp/ again as the start made it (mode, owner), logged once; the held upload answers NOT_FOUND
    to a query and to a resume alike (the client then puts the file again from 0); nothing stored changes."""
    handle = start_daemon(tmp_path)
    tmp = handle.data_dir / "tmp"
    made = tmp.stat()
    data = os.urandom(3 * MIB)
    header = pb.PutHeader(drive="lit://kept", path="held.bin", upload_id="u-held")
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "a.txt", b"version 1")
        cut = [pb.PutRequest(header=header), pb.PutRequest(data=data[:2 * MIB])]
        assert rpc_code(lambda: stub.Put(iter(cut), timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT  # held
        query = pb.QueryWriteStatusRequest(drive="lit://kept", upload_id="u-held")
        assert stub.QueryWriteStatus(query, timeout=10).committed_size == 2 * MIB
        before = snapshot(handle.data_dir / "objects")
        shutil.rmtree(tmp)
        code, details = _details(lambda: stub.QueryWriteStatus(query, timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND and "put the file again from offset 0" in details, details
        header.write_offset = 2 * MIB
        resume = [pb.PutRequest(header=header), pb.PutRequest(data=data[2 * MIB:]),
                  pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
        code, details = _details(lambda: stub.Put(iter(resume), timeout=30))
        assert code == grpc.StatusCode.NOT_FOUND and "put the file again from offset 0" in details, details
        assert snapshot(handle.data_dir / "objects") == before
        raw_put(stub, "lit://kept", "a.txt", b"version 2")  # small: committed by the commit worker
        again = tmp.stat()
        assert (again.st_mode, again.st_uid, again.st_gid) == (made.st_mode, made.st_uid, made.st_gid)
        shutil.rmtree(tmp)
        raw_put(stub, "lit://kept", "held.bin", data)  # big: written by worker threads
        assert _stored(stub, "a.txt") == b"version 2" and _stored(stub, "held.bin") == data
    assert len(_made_again(handle)) == 2, handle.log()
    assert "Traceback" not in handle.log(), handle.log()


def test_puts_that_find_tmp_removed_at_once_all_store_their_files(tmp_path, start_daemon):
    """Several big puts found tmp/ missing at the same moment: the first made it again, and the others, finding it
    there once they had the lock, answered UNAVAILABLE instead of opening their files in it. (Making tmp/ takes
    half a second here, so that the others come while it is made.)"""
    slow_mkdir = ("import os, time\n_mkdir = os.mkdir\n"
                  "def mkdir(path, *args, **kwargs):\n"
                  "    if str(path).endswith('/tmp'):\n        time.sleep(0.5)\n"
                  "    return _mkdir(path, *args, **kwargs)\n"
                  "os.mkdir = mkdir\n")
    handle = start_daemon(tmp_path, before=slow_mkdir)
    files = {f"f{i}.bin": os.urandom(3 * MIB) for i in range(8)}  # past FLUSH_BYTES: opened in tmp/ as they arrive
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "a.txt", b"kept")
        shutil.rmtree(handle.data_dir / "tmp")
        with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
            list(pool.map(lambda item: raw_put(stub, "lit://kept", *item), files.items()))
        assert all(_stored(stub, path) == data for path, data in files.items())
        assert _stored(stub, "a.txt") == b"kept"
    assert len(_made_again(handle)) == 1, handle.log()


def test_a_clients_put_cut_while_tmp_is_removed_is_put_again_whole(tmp_path, start_daemon):
    """A client's put broke, and tmp/ (with the bytes held for its resume) was removed before it came back: the
    client asked where it got to, was told the daemon holds nothing (NOT_FOUND), and put the file again whole."""
    handle = start_daemon(tmp_path)
    size = 12 * MIB
    digest = write_random_file(tmp_path / "src" / "big.bin", size)
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", 6 * MIB)
        proxy.down_after_cuts()  # the client retries until the test lets it back
        drive = Drive("lit://cut", root_folder=tmp_path / "src", endpoint=proxy.endpoint, retry_seconds=30)
        putting = Background(lambda: drive.put("big.bin"))
        putting.start()
        assert wait_until(lambda: metric(handle, "drived_held_uploads") == 1, 20), handle.log()
        shutil.rmtree(handle.data_dir / "tmp")
        proxy.down_after_cuts(False)
        [stored] = putting.join_checked(30)
    assert (stored.size, stored.sha256) == (size, digest)
    assert [d for _, d in raw_get(drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint)),
                                  "lit://cut", "big.bin")] == [(tmp_path / "src" / "big.bin").read_bytes()]
    assert len(_made_again(handle)) == 1, handle.log()


@pytest.mark.parametrize("in_its_place", ["nothing", "an empty folder"])
def test_a_data_dir_moved_away_while_serving_answers_unavailable_not_an_empty_drive(tmp_path, start_daemon,
                                                                                     in_its_place):
    """`mv DATA_DIR elsewhere` while the daemon served: its drives listed as empty, as if their files were lost, and
    puts answered INTERNAL. List, Stat, Get, Delete and Put answer UNAVAILABLE saying the data dir was moved away,
    nothing is made at its path or changed where it went, and once it is back every call works without a restart."""
    handle = start_daemon(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "a.txt", b"stored before")
        handle.data_dir.rename(elsewhere)
        if in_its_place == "an empty folder":
            handle.data_dir.mkdir()
        moved = snapshot(elsewhere)
        calls = {
            "List": lambda: stub.List(pb.ListRequest(drive="lit://kept", path="."), timeout=30),
            "Stat": lambda: stub.Stat(pb.StatRequest(drive="lit://kept", path="a.txt"), timeout=30),
            "Get": lambda: raw_get(stub, "lit://kept", "a.txt"),
            "Delete": lambda: stub.Delete(pb.DeleteRequest(drive="lit://kept", path="a.txt"), timeout=30),
            "Put": lambda: raw_put(stub, "lit://kept", "b.txt", b"stored after"),
        }
        for method, call in calls.items():
            code, details = _details(call)
            assert code == grpc.StatusCode.UNAVAILABLE, (method, details)
            assert details.startswith(f"drived: --data-dir {handle.data_dir}: the data dir was removed or moved away "
                                      "while drived ran"), (method, details)
        assert snapshot(elsewhere) == moved
        assert not handle.data_dir.exists() or snapshot(handle.data_dir) == {}
        if in_its_place == "an empty folder":
            handle.data_dir.rmdir()
        elsewhere.rename(handle.data_dir)
        listed = stub.List(pb.ListRequest(drive="lit://kept", path="."), timeout=30)
        assert [entry.path for entry in listed.entries] == ["a.txt"]
        raw_put(stub, "lit://kept", "b.txt", b"stored after")
        assert _stored(stub, "a.txt") == b"stored before" and _stored(stub, "b.txt") == b"stored after"
    assert "Traceback" not in handle.log(), handle.log()


def test_a_drive_folder_removed_while_serving_lists_what_is_left_and_takes_puts(tmp_path, start_daemon):
    """`rm -rf DATA_DIR/objects/DRIVE` removes that drive's files, as the operator asked: the drive lists as empty
    (that is what it holds), the other drives are untouched, and a put makes the drive again."""
    handle = start_daemon(tmp_path)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "a.txt", b"kept")
        raw_put(stub, "lit://gone", "b.txt", b"removed by the operator")
        shutil.rmtree(handle.data_dir / "objects" / "gone")
        assert list(stub.List(pb.ListRequest(drive="lit://gone", path="."), timeout=30).entries) == []
        assert rpc_code(lambda: raw_get(stub, "lit://gone", "b.txt")) == grpc.StatusCode.NOT_FOUND
        assert _stored(stub, "a.txt") == b"kept"
        raw_put(stub, "lit://gone", "b.txt", b"put again")
        assert [d for _, d in raw_get(stub, "lit://gone", "b.txt")] == [b"put again"]


# Run first in the daemon's process and in its commit worker's (both import sitecustomize): the first fsync of a
# folder once the file ARMED exists fails with EIO, in whichever process makes it, as a failing disk's does.
FOLDER_FSYNC_FAILS_ONCE = """
import errno, os, stat

fsync = os.fsync

def failing_once(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        try:
            os.unlink({armed!r})
        except FileNotFoundError:
            pass
        else:
            raise OSError(errno.EIO, "Input/output error")
    fsync(fd)

os.fsync = failing_once
"""


@pytest.mark.parametrize("size", [4096, 3 * MIB], ids=["small", "big"])
def test_a_put_whose_folder_fsync_fails_answers_unavailable_and_its_retry_is_durable(tmp_path, start_daemon, size):
    """The fsync of a folder after a put's rename failed (EIO): the put answered INTERNAL "see the daemon log",
    though the file is in place and only its durability is unknown. It answers UNAVAILABLE naming the folder and
    saying to retry the put; list, stat and get show the new version, as every reader sees it; drive_client's put
    retries by itself (its query finds the upload not complete) and stores the file again, durably."""
    armed = tmp_path / "armed"
    handle = start_daemon(tmp_path, env=sitecustomized(tmp_path, FOLDER_FSYNC_FAILS_ONCE.format(armed=str(armed))))
    data = os.urandom(size)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://kept", "sub/a.bin", b"version 1")
        armed.touch()
        code, details = _details(lambda: raw_put(stub, "lit://kept", "sub/a.bin", data))
        assert not armed.exists(), "the folder's fsync did not fail"
        assert code == grpc.StatusCode.UNAVAILABLE, details
        folder = handle.data_dir.resolve() / "objects" / "kept" / "default" / "sub"
        assert details.startswith(f"drived: --data-dir {handle.data_dir}: the put's file is in place, but the fsync "
                                  f"of its folder {folder} failed ([Errno 5] Input/output error)"), details
        assert "retry the put (a put of the same bytes is idempotent)" in details, details
        info = stub.Stat(pb.StatRequest(drive="lit://kept", path="sub/a.bin"), timeout=10)
        assert (info.size, info.sha256) == (size, sha256_hex(data))
        listed = stub.List(pb.ListRequest(drive="lit://kept", path="sub"), timeout=10)
        assert [entry.path for entry in listed.entries] == ["sub/a.bin"]
        assert _stored(stub, "sub/a.bin") == data
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "b.bin").write_bytes(data)
        armed.touch()
        [stored] = Drive("lit://kept", root_folder=tmp_path / "src", endpoint=handle.endpoint).put("b.bin")
        assert not armed.exists() and (stored.size, stored.sha256) == (size, sha256_hex(data))
        assert _stored(stub, "b.bin") == data
    puts = [line["status"] for line in map(json.loads, filter(lambda line: line.startswith("{"),
                                                                handle.log().splitlines()))
            if line.get("event") == "request" and line.get("method") in ("Put", "PutFile")]
    assert puts == ["OK", "UNAVAILABLE", "UNAVAILABLE", "OK"], puts
    assert handle.log().count("may not survive a power cut") == 2, handle.log()
