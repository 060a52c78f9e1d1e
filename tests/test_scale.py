"""Drives of many components, and folders of many files: what one call costs the daemon's other calls (the event
loop) and its memory, whatever their number."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import boto3
import grpc
import pytest
from conftest import Background, raw_get, raw_put, rpc_code, snapshot, wait_until
from moto_server import AWS_ENV, running_moto

from drive_client.pb import drive_pb2, drive_pb2_grpc

SLOW_LOOKS = """
import os, time
import drived.backends.local, drived.managed
# two components looked in as 10,000 are: asked which may hold the path, in a worker thread
drived.managed.FEW_COMPONENTS = drived.backends.local.INLINE_ROOTS = 0
_lstat = os.lstat

def lstat(path, *args, **kwargs):
    if "/slow_component/" in os.fspath(path):
        open({reached!r}, "w").close()
        while os.path.exists({pause!r}):
            time.sleep(0.01)
    return _lstat(path, *args, **kwargs)

os.lstat = lstat
"""


@pytest.fixture
def slow_component_drive(start_daemon, tmp_path: pathlib.Path, drive_uri: str
                         ) -> Iterator[tuple[drive_pb2_grpc.DriveServiceStub, pathlib.Path, pathlib.Path]]:
    """A daemon whose looks on disk in component 'slow_component' (which holds taken.txt; 'writer' holds mine.txt)
    hang from now until `pause` is removed: yields a stub, `pause` and `reached` (made once a look hangs); then
    checks that the data dir is as it was."""
    pause, reached = tmp_path / "pause", tmp_path / "reached"
    handle = start_daemon(tmp_path, before=SLOW_LOOKS.format(pause=str(pause), reached=str(reached)))
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive_uri, "taken.txt", b"first", component="slow_component")
        raw_put(stub, drive_uri, "mine.txt", b"mine", component="writer")
        before = snapshot(handle.data_dir / "objects")
        reached.unlink(missing_ok=True)  # the puts above looked at the component too
        pause.touch()
        try:
            yield stub, pause, reached
        finally:
            pause.unlink(missing_ok=True)
        assert snapshot(handle.data_dir / "objects") == before


def test_the_check_of_other_components_leaves_the_daemon_serving(slow_component_drive, drive_uri):
    """A put with allow_duplicates=False looks for its path in every other component (one look each on disk): in a
    drive of 10,000 components that took 0.27 s, on the event loop, so every other call of the daemon waited. Here
    one component's look hangs (a slow disk): a stat of another file is answered meanwhile, and the put, once the
    look ends, is refused as before, storing nothing."""
    stub, pause, reached = slow_component_drive
    put = Background(lambda: raw_put(stub, drive_uri, "taken.txt", b"second", component="writer"))
    put.start()
    try:
        assert wait_until(reached.exists, timeout=30), "the put never looked in the other component"
        answer = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="mine.txt", component="writer"), timeout=10)
        assert answer.size == 4 and put.is_alive()  # answered while the put's look hangs
    finally:
        pause.unlink()
    with pytest.raises(grpc.RpcError) as refused:
        put.join_checked()
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "is already held by component 'slow_component'" in refused.value.details()


def test_a_stat_that_names_no_component_leaves_the_daemon_serving(slow_component_drive, drive_uri):
    """A stat or get that names no component looks for its path in every component of the drive: in a drive of
    10,000 components that took 0.3-0.8 s on the event loop, so any reader repeating such stats held every other call
    of the daemon. Here one component's look hangs (a slow disk): a stat that names a component is answered
    meanwhile, and the stat that names none, once the look ends, finds the file as before."""
    stub, pause, reached = slow_component_drive
    stat = Background(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="taken.txt"), timeout=60))
    stat.start()
    try:
        assert wait_until(reached.exists, timeout=30), "the stat never looked in the component"
        answer = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="mine.txt", component="writer"), timeout=10)
        assert answer.size == 4 and stat.is_alive()  # answered while the other stat's look hangs
    finally:
        pause.unlink()
    found = stat.join_checked()
    assert (found.component, found.size) == ("slow_component", 5)
    below_a_file = drive_pb2.StatRequest(drive=drive_uri, path="taken.txt/x")
    with pytest.raises(grpc.RpcError) as missing:
        stub.Stat(below_a_file, timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'taken.txt/x' in " in missing.value.details() and "does not exist" in missing.value.details()


COUNTED_WALKS = """
import drived.managed
from drived.backends.local import LocalBackend
from drived.backends.s3 import S3Backend

drived.managed.DELETE_PAGE = {page}

def counted(walk):
    async def walk_counted(self, prefix, start_after="", limit=None):
        keys = await walk(self, prefix, start_after, limit)
        with open({walks!r}, "a") as walks:
            walks.write(f"{{len(keys)}}\\n")
        return keys
    return walk_counted

LocalBackend.walk = counted(LocalBackend.walk)
S3Backend.walk = counted(S3Backend.walk)
"""


@pytest.fixture(params=["local", "storage"])
def storage(request, tmp_path: pathlib.Path) -> Iterator[tuple[str, ...]]:
    """The daemon's arguments and environment for the backend: its data dir, or a bucket of a moto_server."""
    if request.param == "local":
        yield (), {}
        return
    with running_moto() as url:
        boto3.client("s3", endpoint_url=url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                     region_name=AWS_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket="drived-store")
        yield ("--storage", "s3://drived-store/drives/"), {**AWS_ENV, "AWS_ENDPOINT_URL": url}


def test_a_folder_delete_holds_a_page_of_its_names_not_the_folders(start_daemon, tmp_path, drive_uri, storage):
    """A folder delete walked the whole folder first: some 100 bytes a file held in the daemon until its end, ~1 GB
    for 10 million files. It walks a page at a time (7 files here), deleting each before the next, and answers and
    leaves the same: every file of the folder, at any depth, across pages and folders, and nothing else."""
    args, env = storage
    page, walks = 7, tmp_path / "walks"
    handle = start_daemon(tmp_path, *args, env=env, before=COUNTED_WALKS.format(page=page, walks=str(walks)))
    folder = [f"f/a/{i}" for i in range(10)] + [f"f/b/c/{i}" for i in range(10)] + [f"f/z{i}" for i in range(10)]
    kept = ["e/x", "f.txt", "f0/x", "g/x"]
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for path in folder + kept:
            raw_put(stub, drive_uri, path, path.encode(), component="w")
        raw_put(stub, drive_uri, "f/a/0", b"another's", component="other", allow_duplicates=True)
        deleted = stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="f", component="w"), timeout=60)
        assert deleted.files_deleted == len(folder)
        held = [int(n) for n in walks.read_text().split()]
        assert sum(held) == len(folder) and max(held) <= page, held
        def left() -> list[tuple[str, str]]:
            listing = stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".", recursive=True, page_size=100))
            return sorted((entry.path, entry.component) for entry in listing.entries)

        assert left() == sorted([(path, "w") for path in kept] + [("f/a/0", "other")])
        again = drive_pb2.DeleteRequest(drive=drive_uri, path="f", component="w")
        assert rpc_code(lambda: stub.Delete(again, timeout=60)) == grpc.StatusCode.NOT_FOUND  # nothing of its own
        assert left() == sorted([(path, "w") for path in kept] + [("f/a/0", "other")])


COUNTED_READS = """
import drived.backends.local
from drived.backends.local import LocalBackend
drived.backends.local.INLINE_ROOTS = 0  # 22 components looked in as 10,000 are: in a worker thread

def counted(read):
    async def read_counted(self, prefix, *args, **kwargs):
        with open({reads!r}, "a") as reads:
            reads.write(prefix + "\\n")
        return await read(self, prefix, *args, **kwargs)
    return read_counted

LocalBackend.list_folder = counted(LocalBackend.list_folder)
LocalBackend.walk = counted(LocalBackend.walk)
"""


def test_a_list_that_names_no_component_reads_only_the_components_that_hold_its_path(start_daemon, tmp_path,
                                                                                       drive_uri):
    """A List that names no component read every component's folder of its path (or stat'ed the file in each), one
    after the other with a thread hop each: in a drive of 10,000 components a List of one file took 1.6-4.1 s. Only
    the components that hold something at the path are read (here 2 of 22); pages, order, the entries several
    components hold, and a symbolic link planted on the way are answered as before."""
    reads = tmp_path / "reads"
    handle = start_daemon(tmp_path, before=COUNTED_READS.format(reads=str(reads)))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    others = [f"c{i:02}" for i in range(20)]
    for other in others:
        raw_put(stub, drive_uri, f"{other}.txt", b"elsewhere", component=other)
    raw_put(stub, drive_uri, "a0/x", b"begins as a does", component="c07")
    for path, data, component in [("a/b", b"held", "holder"), ("a/c/d", b"deep", "holder"),
                                  ("a/b", b"also held", "other"), ("a/e", b"other's", "other")]:
        raw_put(stub, drive_uri, path, data, component=component, allow_duplicates=True)
    before = snapshot(handle.data_dir / "objects")

    def listed(path: str, recursive: bool = False) -> list[list[tuple[str, str, int, bool]]]:
        pages, token = [], ""
        while True:
            answer = stub.List(drive_pb2.ListRequest(drive=drive_uri, path=path, recursive=recursive, page_size=2,
                                                     page_token=token), timeout=60)
            pages.append([(e.path, e.component, e.size, e.folder) for e in answer.entries])
            if not (token := answer.next_page_token):
                return pages

    assert listed("a") == [[("a/b", "", 4, False), ("a/c", "holder", 0, True)], [("a/e", "other", 7, False)]]
    assert listed("a", recursive=True) == [[("a/b", "", 4, False), ("a/c/d", "holder", 4, False)],
                                           [("a/e", "other", 7, False)]]
    assert listed("a/c/d") == [[("a/c/d", "holder", 4, False)]]
    assert listed("a/missing") == [[]]
    read = reads.read_text().split()
    name = drive_uri.removeprefix("lit://")
    assert read and all(r.startswith((f"{name}/holder/", f"{name}/other/")) for r in read), read
    (handle.data_dir / "objects" / name / "c03" / "a").symlink_to(tmp_path)  # planted: drived makes no links
    with pytest.raises(grpc.RpcError) as refused:
        stub.List(drive_pb2.ListRequest(drive=drive_uri, path="a"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "symbolic link" in refused.value.details()
    (handle.data_dir / "objects" / name / "c03" / "a").unlink()
    assert snapshot(handle.data_dir / "objects") == before


def test_a_get_naming_no_component_walks_each_component_once_a_pass(start_daemon, tmp_path, drive_uri):
    """A Get of the whole drive or of a folder naming no component, in a drive of more components than a page of
    files (here 20 components and pages of 10, as 10,000 components and pages of 1,000), read a share of one name of
    each first, so a component of one file took two walks a pass, the second finding nothing: 40,000 walks, one after
    the other, for the whole drive of 10,000 components (9.8 s). One walk a pass each now; files, their order and the
    refusal of a clash are as before, and nothing stored changes."""
    reads = tmp_path / "reads"
    handle = start_daemon(tmp_path, before="import drived.managed\ndrived.managed.GET_PAGE = 10\n"
                          + COUNTED_READS.format(reads=str(reads)))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    others = [f"c{i:02}" for i in range(20)]
    for other in others:
        raw_put(stub, drive_uri, f"shared/{other}.txt", other.encode(), component=other, allow_duplicates=True)

    def walks_of_each() -> set[int]:
        walked = [read.split("/")[1] for read in reads.read_text().split()]  # each a "<drive>/<component>[/<path>]"
        return {walked.count(other) for other in others}

    expected = [(f"shared/{o}.txt", o, o.encode()) for o in others]
    for path in ("", "shared"):
        reads.unlink(missing_ok=True)
        assert [(info.path, info.component, data) for info, data in raw_get(stub, drive_uri, path)] == expected
        assert walks_of_each() == {2}, path  # one to refuse a clash before any file is sent, one to send
    raw_put(stub, drive_uri, "shared/c07.txt", b"clash", component="holder", allow_duplicates=True)
    before = snapshot(handle.data_dir / "objects")
    for path in ("", "shared"):
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stub.Get(drive_pb2.GetRequest(drive=drive_uri, path=path), timeout=60)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, path
        assert "'shared/c07.txt'" in refused.value.details() and "'c07', 'holder'" in refused.value.details()
    assert snapshot(handle.data_dir / "objects") == before
