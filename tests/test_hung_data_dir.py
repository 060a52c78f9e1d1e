"""A data dir that hangs (an NFS server gone) holds only the calls that touch it, never the whole daemon.

The daemon is one event loop: a file call made on it that blocks blocks every client, health checks and s3://
drives included. On a file system that can hang (a network or FUSE mount, read from mountinfo at start-up) the calls
on the data dir are made in worker threads, so one that hangs holds its own call only; on a local disk they are made
inline, where a thread hop would cost more than the call.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import grpc
import pytest
from conftest import (
    Background,
    DaemonHandle,
    descriptor_targets,
    health_status,
    raw_get,
    raw_put,
    rpc_code,
    snapshot,
    start_daemon,
    wait_until,
)
from grpc_health.v1 import health_pb2
from moto_server import AWS_ENV, moto_env  # noqa: F401  (moto_env is a fixture)

from drive_client.pb import drive_pb2, drive_pb2_grpc
from drived.backends.file_systems import can_hang, mount_type

HUNG = "lit://hung"
OTHER = "lit://other"
BUCKET = "hung-dir-datasets"
S3_DRIVE = f"s3://{BUCKET}/data/"

# The daemon takes its data dir for one on a network mount, whichever file system it lies on.
CAN_HANG = "import drived.backends.local as local; local.can_hang = lambda fs_type: True\n"

# Run first in the daemon's process: while the file HANG exists, every stat, lstat, open, scandir and unlink of a path
# in the drive `hung` or in the data dir's tmp/ (the uploads' files), and every pread and close of a descriptor of one,
# blocks, as each call on a hard NFS mount whose server is gone does, wherever the daemon makes it. HANG may name one
# of those calls and how many of them pass first ("open 1": the second open blocks).
HUNG_CALLS = """
import os, time

exists = os.path.exists
passed = [0]

def named(path):
    \"\"\"The path a call names, or the file of the descriptor it is given.\"\"\"
    if isinstance(path, int):
        try:
            return os.readlink(f"/proc/self/fd/{{path}}")
        except OSError:
            return ""
    return path if isinstance(path, str) else ""

def blocks(name):
    with open({hang!r}) as hang:
        wanted = hang.read().split()
    if not wanted:
        return True
    if wanted[0] != name:
        return False
    passed[0] += 1
    return passed[0] > int(wanted[1])

def hanging(name, call):
    def on_a_hung_mount(path, *args, **kwargs):
        if not named(path).startswith({prefixes!r}):
            return call(path, *args, **kwargs)
        if not exists({hang!r}):
            passed[0] = 0
        elif blocks(name):
            open({hang!r} + ".reached", "w").close()
            while exists({hang!r}):
                time.sleep(0.01)
            try:
                return call(path, *args, **kwargs)
            finally:
                open({hang!r} + ".returned", "w").close()
        return call(path, *args, **kwargs)
    return on_a_hung_mount

for name in ("stat", "lstat", "open", "scandir", "unlink", "pread", "close"):
    setattr(os, name, hanging(name, getattr(os, name)))
"""


@pytest.fixture(scope="module")
def hung_daemon(tmp_path_factory: pytest.TempPathFactory, moto_env: str) -> Iterator[tuple[DaemonHandle, pathlib.Path]]:  # noqa: F811
    """A daemon whose drive `hung` blocks while the file it gives exists, with an s3:// drive beside it; it makes its
    file calls as on a network mount, in worker threads."""
    s3 = boto3.client("s3", endpoint_url=moto_env, region_name=AWS_ENV["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="data/a.txt", Body=b"from s3")
    tmp = tmp_path_factory.mktemp("hung-data-dir")
    data_dir, hang = tmp / "data", tmp / "hang"
    prefixes = (f"{os.path.realpath(data_dir)}/objects/hung", f"{os.path.realpath(data_dir)}/tmp/")
    handle = start_daemon(tmp, data_dir=data_dir,
                          before=CAN_HANG + HUNG_CALLS.format(prefixes=prefixes, hang=str(hang)))
    try:
        assert _serving(handle)["file_calls"] == "threads"
        yield handle, hang
    finally:
        hang.unlink(missing_ok=True)
        handle.stop(signal.SIGTERM, timeout=20)


def _serving(handle: DaemonHandle) -> dict:
    """The fields of the daemon's start-up line."""
    [line] = [json.loads(line) for line in handle.log().splitlines() if '"event": "serving"' in line]
    return line


# Each call of drive `hung` that the test lets hang, by name.
CALLS: dict[str, Callable[[drive_pb2_grpc.DriveServiceStub], object]] = {
    "put": lambda stub: raw_put(stub, HUNG, "new.txt", b"new bytes"),
    "get": lambda stub: raw_get(stub, HUNG, "kept.txt"),
    "stat": lambda stub: stub.Stat(drive_pb2.StatRequest(drive=HUNG, path="kept.txt"), timeout=60),
    "list": lambda stub: stub.List(drive_pb2.ListRequest(drive=HUNG, path="."), timeout=60),
    "delete": lambda stub: stub.Delete(drive_pb2.DeleteRequest(drive=HUNG, path="gone.txt"), timeout=60),
}


def _put_files(stub: drive_pb2_grpc.DriveServiceStub) -> None:
    """kept.txt and gone.txt in drive `hung`, b.txt in another drive."""
    raw_put(stub, HUNG, "kept.txt", b"kept bytes")
    raw_put(stub, HUNG, "gone.txt", b"deleted")
    raw_put(stub, OTHER, "b.txt", b"other drive")


def _others_answer(stub: drive_pb2_grpc.DriveServiceStub, endpoint: str) -> None:
    """Health, a list of another drive and a read of an s3:// drive answer within a couple of seconds."""
    assert health_status(endpoint, timeout=2) == health_pb2.HealthCheckResponse.SERVING
    listed = stub.List(drive_pb2.ListRequest(drive=OTHER, path="."), timeout=2)
    assert [entry.path for entry in listed.entries] == ["b.txt"]
    read = stub.Get(drive_pb2.GetRequest(drive=S3_DRIVE, path="a.txt"), timeout=2)
    assert b"".join(message.data for message in read) == b"from s3"

def _while_hung(stub: drive_pb2_grpc.DriveServiceStub, endpoint: str, hang: pathlib.Path, call: str, says: str,
                run: Callable[[drive_pb2_grpc.DriveServiceStub], Any]) -> Any:
    """What `run(stub)` answers, run while the data dir hangs as `says` tells: it must reach the data dir and hold
    only itself (health, other drives and s3:// drives answer meanwhile); it answers once the data dir does."""
    reached = pathlib.Path(f"{hang}.reached")
    reached.unlink(missing_ok=True)
    hang.write_text(says)
    try:
        running = Background(lambda: run(stub))
        running.start()
        assert wait_until(reached.exists, timeout=10), f"the {call} never reached the data dir"
        _others_answer(stub, endpoint)
        assert running.is_alive(), f"the {call} answered while its data dir hung"
    finally:
        hang.unlink()
    return running.join_checked(timeout=30)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_call_hung_on_the_data_dir_holds_only_itself(hung_daemon, call):
    """While a call of drive `hung` blocks in its data dir, the daemon answers health, other drives and s3://
    drives; once the data dir answers again, the call completes as it would have, and the stored files are as it
    leaves them."""
    handle, hang = hung_daemon
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        _put_files(stub)
        _others_answer(stub, handle.endpoint)  # the s3:// drive is mounted before the data dir hangs
        before = snapshot(handle.data_dir / "objects")
        answer = _while_hung(stub, handle.endpoint, hang, call, "", CALLS[call])
        after = snapshot(handle.data_dir / "objects")
        if call == "put":
            assert raw_get(stub, HUNG, "new.txt")[0][1] == b"new bytes"
            assert {k: v for k, v in after.items() if not k.endswith("new.txt")} == before
            stub.Delete(drive_pb2.DeleteRequest(drive=HUNG, path="new.txt"), timeout=10)  # the list's test lists
        elif call == "delete":
            assert answer.files_deleted == 1
            assert {k: v for k, v in before.items() if not k.endswith("gone.txt")} == after
        else:
            assert after == before, "a read changes no stored file"
            if call == "get":
                assert answer[0][1] == b"kept bytes"
            elif call == "stat":
                assert answer.size == len(b"kept bytes")
            else:
                assert sorted(entry.path for entry in answer.entries) == ["gone.txt", "kept.txt"]


def test_a_get_whose_client_left_while_its_open_hung_closes_the_file_once_it_opens(hung_daemon):
    """A get whose client gives up while the open of its file hangs is ended at once; the open that answers later
    leaves no descriptor behind, and the file reads as it was."""
    handle, hang = hung_daemon
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        _put_files(stub)
        _others_answer(stub, handle.endpoint)
        kept = os.path.realpath(handle.data_dir / "objects" / "hung")
        reached = pathlib.Path(f"{hang}.reached")
        reached.unlink(missing_ok=True)
        pathlib.Path(f"{hang}.returned").unlink(missing_ok=True)
        hang.write_text("open 1")  # the get's look at the file passes; its read's open of it blocks
        try:
            late = stub.Get(drive_pb2.GetRequest(drive=HUNG, path="kept.txt"), timeout=1)
            with pytest.raises(grpc.RpcError) as left:
                list(late)
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert reached.exists(), "the get never reached the data dir"
            _others_answer(stub, handle.endpoint)
        finally:
            hang.unlink()
        assert wait_until(pathlib.Path(f"{hang}.returned").exists), "the open never returned"
        assert wait_until(lambda: not any(target.startswith(kept) for target in descriptor_targets(handle.proc.pid))), (
            "a file the get opened after its client left stays open")
        assert raw_get(stub, HUNG, "kept.txt")[0][1] == b"kept bytes"


MIB = 1 << 20
BIG = os.urandom(3 * MIB)  # three blocks: a ranged read of the middle one reads its entries of the block table


def _cut_resumable_put(stub: drive_pb2_grpc.DriveServiceStub) -> grpc.StatusCode:
    """A resumable put of BIG's first 2 MiB into `held.bin` that ends without its finish: the daemon holds it."""
    header = drive_pb2.PutHeader(drive=HUNG, path="held.bin", upload_id="held-1")
    messages = [drive_pb2.PutRequest(header=header), *(drive_pb2.PutRequest(data=BIG[i:i + MIB]) for i in (0, MIB))]
    return rpc_code(lambda: stub.Put(iter(messages), timeout=60))


# Calls of drive `hung` whose one call of the data dir the test lets hang: (what HANG says, the call).
ONE_CALL: dict[str, tuple[str, Callable[[drive_pb2_grpc.DriveServiceStub], object]]] = {
    # the get's look at the file and its open each read the header: the third pread is of the block table
    "ranged get": ("pread 2", lambda stub: raw_get(stub, HUNG, "big.bin", offset=MIB, limit=MIB)),
    # the close of the upload's file, written and flushed: suspended, it is held closed
    "suspended put": ("close 0", _cut_resumable_put),
    # the close of the upload's file, its sha256 refused: then its unlink
    "aborted put": ("close 0", lambda stub: rpc_code(lambda: raw_put(stub, HUNG, "refused.bin", BIG, sha256="0" * 64))),
}


@pytest.mark.parametrize("call", sorted(ONE_CALL))
def test_a_call_whose_read_of_a_block_table_or_close_of_an_upload_hangs_holds_only_itself(hung_daemon, call):
    """A ranged get whose read of its block table hangs, and a put whose upload's file hangs as it is closed
    (suspended, or aborted), hold only themselves: health, other drives and s3:// drives answer meanwhile. Once the
    data dir answers, each ends as it would have: the range is read, the cut upload is held for its resume, the
    refused one is DATA_LOSS with nothing stored and nothing left in tmp/."""
    handle, hang = hung_daemon
    says, run = ONE_CALL[call]
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        _put_files(stub)
        raw_put(stub, HUNG, "big.bin", BIG)
        _others_answer(stub, handle.endpoint)
        before = snapshot(handle.data_dir / "objects")
        answer = _while_hung(stub, handle.endpoint, hang, call, says, run)
        assert snapshot(handle.data_dir / "objects") == before, "no stored file changes"
        if call == "ranged get":
            assert answer[0][1] == BIG[MIB:2 * MIB]
        elif call == "suspended put":
            assert answer == grpc.StatusCode.INVALID_ARGUMENT  # no finish: held
            query = drive_pb2.QueryWriteStatusRequest(drive=HUNG, upload_id="held-1")
            assert stub.QueryWriteStatus(query, timeout=10).committed_size == 2 * MIB
            header = drive_pb2.PutHeader(drive=HUNG, path="held.bin", upload_id="held-1", write_offset=2 * MIB)
            finish = drive_pb2.PutFinish(sha256=hashlib.sha256(BIG).hexdigest())
            stub.Put(iter([drive_pb2.PutRequest(header=header), drive_pb2.PutRequest(data=BIG[2 * MIB:]),
                           drive_pb2.PutRequest(finish=finish)]), timeout=60)
            assert raw_get(stub, HUNG, "held.bin")[0][1] == BIG
            stub.Delete(drive_pb2.DeleteRequest(drive=HUNG, path="held.bin"), timeout=10)
        else:
            assert answer == grpc.StatusCode.DATA_LOSS
            assert rpc_code(lambda: raw_get(stub, HUNG, "refused.bin")) == grpc.StatusCode.NOT_FOUND
        assert wait_until(lambda: not any((handle.data_dir / "tmp").iterdir())), "an upload's file is left in tmp/"
        stub.Delete(drive_pb2.DeleteRequest(drive=HUNG, path="big.bin"), timeout=10)  # the list's test lists


def test_a_get_whose_client_left_while_a_read_of_its_file_hung_closes_the_file_once_the_read_returns(hung_daemon):
    """A ranged get whose client gives up while its read of the block table hangs is ended at once, and its file stays
    open until that read, running in a worker thread, returns: closed under it, the descriptor's number is free for
    the daemon's next open while the read still uses it. Then nothing is left open, and the file reads as it was."""
    handle, hang = hung_daemon
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        _put_files(stub)
        raw_put(stub, HUNG, "big.bin", BIG)
        _others_answer(stub, handle.endpoint)
        stored = os.path.realpath(handle.data_dir / "objects" / "hung")

        def big_open() -> bool:
            return any(t.startswith(stored) and t.endswith("/big.bin") for t in descriptor_targets(handle.proc.pid))

        reached, returned = pathlib.Path(f"{hang}.reached"), pathlib.Path(f"{hang}.returned")
        reached.unlink(missing_ok=True)
        returned.unlink(missing_ok=True)
        hang.write_text(ONE_CALL["ranged get"][0])  # the read of the block table blocks
        try:
            late = stub.Get(drive_pb2.GetRequest(drive=HUNG, path="big.bin", offset=MIB, limit=MIB), timeout=1)
            with pytest.raises(grpc.RpcError) as left:
                list(late)
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert reached.exists(), "the get never reached its block table"
            assert wait_until(lambda: handle.open_requests("Get") == 0), "the get did not end with its client"
            assert not returned.exists()
            assert big_open(), "the file was closed while a worker thread still reads it"
        finally:
            hang.unlink()
        assert wait_until(returned.exists), "the read never returned"
        assert wait_until(lambda: not big_open()), "a file the get read after its client left stays open"
        assert raw_get(stub, HUNG, "big.bin", offset=MIB, limit=MIB)[0][1] == BIG[MIB:2 * MIB]
        stub.Delete(drive_pb2.DeleteRequest(drive=HUNG, path="big.bin"), timeout=10)  # the list's test lists


def _fs_types(path: str, mountinfo: list[str]) -> set[str]:
    """The fs types of the mounts of `path`'s device in `mountinfo`'s lines (their major:minor field)."""
    device = os.stat(path).st_dev
    return {line.split(" - ")[1].split()[0] for line in mountinfo
            if line.split()[2] == f"{os.major(device)}:{os.minor(device)}"}


@pytest.mark.parametrize("mountinfo", ["/proc/self/mountinfo", "/nonexistent/mountinfo"])
def test_a_data_dir_on_a_local_disk_makes_its_file_calls_inline(start_daemon, tmp_path, mountinfo):
    """The daemon names its data dir's file system at start-up; on this machine's tmp dir, a local one, or when
    mountinfo cannot be read, it makes its file calls inline, and serves puts and gets as ever."""
    handle = start_daemon(tmp_path, data_dir=tmp_path / "data",
                          before=f"import drived.backends.file_systems as fs; fs.MOUNTINFO = {mountinfo!r}")
    serving = _serving(handle)
    if mountinfo.startswith("/proc"):
        lines = pathlib.Path(mountinfo).read_text().splitlines()
        assert {serving["data_dir_fs"]} == _fs_types(str(tmp_path), lines)
    else:
        assert serving["data_dir_fs"] is None
    assert serving["file_calls"] == "inline"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, OTHER, "a.txt", b"inline bytes")
        assert raw_get(stub, OTHER, "a.txt")[0][1] == b"inline bytes"


# Lines in mountinfo's format (proc(5)), as an NFS mount, an sshfs mount, and a mount point
# with a space, a tab, a backslash and a newline in its name give them.
WRITTEN = [
    r"900 1 0:90 / /mnt/nfs rw,relatime shared:50 - nfs4 files:/export rw,vers=4.2,hard",
    r"901 1 0:91 / /home/me/remote rw,nosuid,nodev - fuse.sshfs me@host:/data rw,user_id=0,group_id=0",
    r"902 1 0:92 / /mnt/my\040disk\011a\134b\012c rw shared:51 master:3 - cifs //srv/share rw,vers=3.1.1",
    r"903 900 0:93 / /mnt/nfs/scratch rw - tmpfs tmpfs rw",
]


def test_the_mount_of_a_path_is_the_longest_mount_point_before_it():
    """mount_type finds on this machine's mountinfo what its device numbers say, and on written lines the mount
    whose mount point (unescaped) is the longest whole-component prefix, the later of two on one point."""
    real = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    for path in ("/", os.path.realpath("/tmp"), os.path.realpath(__file__)):
        assert {mount_type(path, real)} == _fs_types(path, real), path
    lines = real + WRITTEN
    root = mount_type("/", real)
    assert mount_type("/mnt/nfs", lines) == mount_type("/mnt/nfs/data/objects/a", lines) == "nfs4"
    assert mount_type("/mnt/nfsother/data", lines) == root  # a prefix of the name, not of its components
    assert mount_type("/mnt/nfs/scratch/data", lines) == "tmpfs"
    assert mount_type("/home/me/remote/data", lines) == "fuse.sshfs"
    assert mount_type("/mnt/my disk\ta\\b\nc/data", lines) == "cifs"
    assert mount_type(r"/mnt/my\040disk\011a\134b\012c/data", lines) == root  # the escaped form names no mount
    stacked = [*lines, "904 1 0:94 / /mnt/nfs rw - ext4 /dev/vdb rw"]
    assert mount_type("/mnt/nfs/data", stacked) == "ext4"  # mounted over the nfs4 mount, which it hides
    assert mount_type("/mnt/nfs/data", ["not a mountinfo line", "1 2 3 - ext4"]) is None
    assert [can_hang(fs) for fs in ("nfs4", "fuse.sshfs", "cifs", "fuseblk", "ext4", "tmpfs", "overlay", None)] == [
        True, True, True, True, False, False, False, False]
