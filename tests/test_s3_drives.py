"""s3:// drives end to end: a real daemon reading a real S3 endpoint (moto_server as a process).

The index internals are tested in test_s3index.py; here the daemon, the wire
API and the Python client are exercised together, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import boto3
import grpc
import pytest
from conftest import (
    BIN,
    Background,
    DaemonHandle,
    free_port,
    held_open,
    refused_imports,
    rpc_code,
    start_daemon,
    wait_until,
)
from cutting_proxy import CuttingProxy
from moto_server import AWS_ENV, closed_port, running_moto

from bench.services import MotoServer
from drive_client import (
    Drive,
    DriveError,
    InvalidArgument,
    NotADirectory,
    ResourceExhausted,
    StaleIndexError,
    StoreUnavailable,
)
from drive_client.pb import drive_pb2, drive_pb2_grpc

pytestmark = pytest.mark.integration  # starts moto_server endpoints of its own

BUCKET = "datasets"
BIG = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto_server with a populated bucket, and a daemon whose boto3 points at it."""
    with running_moto() as url:
        client = boto3.client(
            "s3", endpoint_url=url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=BUCKET)
        keys = [f"imagenet/train/{i:04d}.jpg" for i in range(1200)]
        keys += ["imagenet/val/a b+c%.jpg", "imagenet/val/unicodé.jpg", "imagenet/empty/", "imagenet/readme.txt",
                 "outside/secret.txt"]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=k.encode()), keys))
        big = os.urandom(BIG)
        client.put_object(Bucket=BUCKET, Key="imagenet/big.bin", Body=big)
        tmp = tmp_path_factory.mktemp("s3-daemon")
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": url}
        handle = start_daemon(tmp, "--s3-page-size", "100", env=env, data_dir=tmp / "data")
        try:
            yield {"client": client, "url": url, "daemon": handle, "big": big}
        finally:
            handle.stop(signal.SIGTERM, timeout=20)


def drive(s3, uri: str = f"s3://{BUCKET}/imagenet/", **kwargs) -> Drive:
    return Drive(uri, endpoint=s3["daemon"].endpoint, **kwargs)


def test_the_readme_commands_and_a_folder_named_with_its_slash_through_the_drive_command(s3, tmp_path):
    """README's `drive ls/mount/get s3://...`; a folder fetched as `s3://bucket/prefix/folder/`, as s3 writes one."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "drive"), "--endpoint", s3["daemon"].endpoint, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    assert run("ls", f"s3://{BUCKET}/").stdout.split() == ["imagenet", "outside"]
    assert run("mount", f"s3://{BUCKET}/imagenet/").returncode == 0
    assert run("get", f"s3://{BUCKET}/imagenet/train/0001.jpg").returncode == 0
    assert (tmp_path / "0001.jpg").read_bytes() == b"imagenet/train/0001.jpg"
    folder = run("get", f"s3://{BUCKET}/imagenet/val/")
    assert folder.returncode == 0, folder.stderr
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["a b+c%.jpg", "unicodé.jpg"]
    bucket = run("get", f"s3://{BUCKET}/")
    assert bucket.returncode == 1 and "a whole bucket" in bucket.stderr, bucket.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0001.jpg", "val"]


def test_list_stat_and_get_through_the_daemon(s3, tmp_path):
    d = drive(s3, root_folder=tmp_path)
    assert d.list(".") == ["big.bin", "empty", "readme.txt", "train", "val"]
    assert len(d.list("train")) == 1200 and d.list("train")[:2] == ["train/0000.jpg", "train/0001.jpg"]
    assert d.list("val") == ["val/a b+c%.jpg", "val/unicodé.jpg"]
    assert d.list("empty") == [] and d.list("nope") == []
    stat = d.stat("readme.txt")
    assert stat.size == len(b"imagenet/readme.txt") and stat.etag and not stat.sha256 and not stat.folder
    assert d.stat("train").folder
    got = d.get("val/unicodé.jpg")
    assert got == tmp_path / "val" / "unicodé.jpg" and got.read_bytes() == "imagenet/val/unicodé.jpg".encode()
    big = d.get("big.bin")
    assert hashlib.sha256(big.read_bytes()).digest() == hashlib.sha256(s3["big"]).digest()
    resumed = b"".join(d.read_range("big.bin", BIG - 1000))
    assert resumed == s3["big"][-1000:]


def test_the_first_s3_requests_load_boto3_off_the_event_loop(s3, start_daemon, tmp_path):
    """A daemon loads boto3 at its first s3:// request, not as it starts, and on a worker thread: here any import
    of boto3, botocore or redis on the daemon's main thread, which runs the event loop, fails. First requests of
    every kind, at once, on two locations, are all answered, and a lit:// drive's beside them."""
    daemon = start_daemon(tmp_path, env={**AWS_ENV, "AWS_ENDPOINT_URL": s3["url"]},
                          before=refused_imports(on_main_thread_only=True))
    (tmp_path / "a.txt").write_bytes(b"alpha")

    def on(uri: str) -> Drive:
        return Drive(uri, endpoint=daemon.endpoint, root_folder=tmp_path)

    imagenet, val = on(f"s3://{BUCKET}/imagenet/"), on(f"s3://{BUCKET}/imagenet/val/")
    firsts = [
        lambda: imagenet.list("."),
        lambda: imagenet.stat("readme.txt").size,
        lambda: b"".join(imagenet.read_range("train/0001.jpg")),
        lambda: val.get("unicodé.jpg", to=tmp_path / "got.jpg").read_bytes(),
        lambda: val.mount().objects,
        lambda: [f.path for f in on("lit://beside-s3").put("a.txt")],
    ]
    with ThreadPoolExecutor(len(firsts)) as pool:
        answers = list(pool.map(lambda call: call(), firsts))
    assert answers == [["big.bin", "empty", "readme.txt", "train", "val"], len(b"imagenet/readme.txt"),
                       b"imagenet/train/0001.jpg", "imagenet/val/unicodé.jpg".encode(), 2, ["a.txt"]]
    assert "Traceback" not in daemon.log()


def test_keys_outside_the_prefix_stay_invisible(s3, tmp_path):
    d = drive(s3, root_folder=tmp_path)
    with pytest.raises(ValueError):
        d.get("../outside/secret.txt")
    with pytest.raises(FileNotFoundError):
        d.stat("outside/secret.txt")
    assert "outside" in drive(s3, f"s3://{BUCKET}/").list(".")  # the whole bucket does show it


def test_a_folder_get_writes_nothing_outside_its_target(s3, tmp_path):
    """An s3:// drive's keys are whoever wrote the bucket's, used as they are: a folder get of "x" wrote the key
    "x/../../../up.txt" three folders above its target, and "x//ABSOLUTE/PATH" at that absolute path: any file
    the user may write, from a bucket they only read. A file whose path is no plain path under the folder (a
    '..', '.' or empty part) is refused before anything of it is written."""
    client = s3["client"]
    client.create_bucket(Bucket="hostile")
    escaped = tmp_path / "escaped.txt"
    for key in ("up/x/../../../up.txt", f"abs/x/{escaped}", "abs/x/ok.txt"):
        client.put_object(Bucket="hostile", Key=key, Body=b"from the bucket")
    target = tmp_path / "out" / "deep" / "x"
    for prefix, key in (("up", "x/../../../up.txt"), ("abs", f"x/{escaped}")):
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            drive(s3, f"s3://hostile/{prefix}/").get("x", to=target, overwrite=True)
    assert not (tmp_path / "up.txt").exists() and not escaped.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_folder_get_of_an_object_that_is_also_a_folder_stops_with_a_drive_error(s3, twin, tmp_path):
    """A bucket may hold an object `x/a` and objects below `x/a/`; one local folder cannot hold both. A folder
    get of `x` raised the OSError of the mkdir (`[Errno 17] File exists`), not a DriveError; it now stops with
    NotADirectory (a DriveError and a NotADirectoryError) naming the file in the way, keeping the files before
    it and leaving no partial file."""
    client = s3["client"]
    objects = {"clash/x/a": b"object a", "clash/x/a/b": b"below a", "clash/x/c": b"after"}
    for key, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    d = twin(f"s3://{BUCKET}/clash/", endpoint=s3["daemon"].endpoint, root_folder=tmp_path)
    with pytest.raises(NotADirectory) as refused:
        d.get("x")
    assert isinstance(refused.value, DriveError) and refused.value.code is None
    assert "'x/a/b'" in str(refused.value) and str(tmp_path / "x" / "a") in str(refused.value)
    assert (tmp_path / "x" / "a").read_bytes() == b"object a"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["x", "x/a"]
    assert {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in objects} == objects


def test_read_only_refusals(s3, tmp_path):
    (tmp_path / "x.txt").write_bytes(b"x")
    d = drive(s3, root_folder=tmp_path)
    with pytest.raises(PermissionError) as put:
        d.put("x.txt")
    assert put.value.code == grpc.StatusCode.PERMISSION_DENIED and "read-only" in str(put.value)
    with pytest.raises(PermissionError) as delete:
        d.delete("readme.txt")
    assert delete.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert d.stat("readme.txt").size == len(b"imagenet/readme.txt")  # untouched
    with pytest.raises(ValueError, match="trailing '/'"):
        Drive(f"s3://{BUCKET}/imagenet")


def test_remount_sees_new_objects_and_stale_objects_are_refused(s3, tmp_path):
    d = drive(s3, f"s3://{BUCKET}/imagenet/val/", root_folder=tmp_path)
    assert d.list(".") == ["a b+c%.jpg", "unicodé.jpg"]
    s3["client"].put_object(Bucket=BUCKET, Key="imagenet/val/new.jpg", Body=b"new")
    assert d.list(".") == ["a b+c%.jpg", "unicodé.jpg"]  # the index is as of the last mount
    result = d.mount()
    assert result.objects == 3 and result.seconds >= 0
    assert d.list(".") == ["a b+c%.jpg", "new.jpg", "unicodé.jpg"]
    s3["client"].put_object(Bucket=BUCKET, Key="imagenet/val/new.jpg", Body=b"changed!")
    with pytest.raises(StaleIndexError) as stale:
        d.get("new.jpg")
    assert stale.value.code == grpc.StatusCode.ABORTED and "mount" in str(stale.value)
    assert not (tmp_path / "new.jpg").exists()  # no mixed or partial file
    d.mount()
    assert d.get("new.jpg").read_bytes() == b"changed!"


def test_a_pinned_read_past_the_end_of_a_shorter_object_indexed_since_is_stale(s3, tmp_path):
    """Pinned to the ETag a read began with, past the end of the shorter object a re-mount found since: stale
    (ABORTED), as at any offset, not past the end of what was pinned (INVALID_ARGUMENT)."""
    d = drive(s3, f"s3://{BUCKET}/pinned/", root_folder=tmp_path)
    s3["client"].put_object(Bucket=BUCKET, Key="pinned/p.bin", Body=b"p" * 100)
    d.mount()
    pinned = d.stat("p.bin").etag
    assert b"".join(d.read_range("p.bin", 50, 10, if_match=pinned)) == b"p" * 10
    s3["client"].put_object(Bucket=BUCKET, Key="pinned/p.bin", Body=b"short")
    d.mount()
    with pytest.raises(StaleIndexError) as stale:
        b"".join(d.read_range("p.bin", 50, 10, if_match=pinned))
    assert stale.value.code == grpc.StatusCode.ABORTED and "'p.bin'" in str(stale.value)
    with pytest.raises(InvalidArgument):  # past the end of the version pinned: the offset is wrong
        b"".join(d.read_range("p.bin", 50, 10, if_match=d.stat("p.bin").etag))
    assert b"".join(d.read_range("p.bin")) == b"short"  # untouched


def _index_metrics(daemon: DaemonHandle) -> dict[str, float]:
    """The daemon's `drived_s3_index_*` samples, by name and labels."""
    with urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {name: float(value) for name, value in re.findall(r"^(drived_s3_index_\S+) (\S+)$", text, re.M)}


def test_mounted_indexes_stay_within_s3_index_memory(s3, start_daemon, tmp_path):
    """Indexes held past --s3-index-memory are dropped, least recently used first, and indexed again at their
    next use; a mount whose index alone passes it is refused, and the daemon keeps serving the others."""
    bucket = "index-memory"
    s3["client"].create_bucket(Bucket=bucket)
    keys = [f"{folder}/k{i:04d}" for folder in "ab" for i in range(400)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3["client"].put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    memory = 50_000  # one folder's index (~34 KB: ~85 bytes a key) fits, two do not, nor the bucket's
    daemon = start_daemon(tmp_path, "--s3-index-memory", str(memory), "--s3-page-size", "100",
                          env={**AWS_ENV, "AWS_ENDPOINT_URL": s3["url"]})

    def folder(name: str) -> Drive:
        return Drive(f"s3://{bucket}/{name}", endpoint=daemon.endpoint, root_folder=tmp_path)

    a, b = folder("a/"), folder("b/")
    assert a.list(".")[:2] == ["k0000", "k0001"]  # the first use indexes a/
    s3["client"].put_object(Bucket=bucket, Key="a/new", Body=b"new")
    assert "new" not in a.list(".")  # a/'s index is held: as of its first use
    assert b.mount().objects == 400  # b/'s index does not fit beside a/'s: a/'s is dropped
    held = _index_metrics(daemon)
    assert 0 < held["drived_s3_index_bytes"] <= memory, held
    assert f'drived_s3_index_objects{{drive="s3://{bucket}/b/"}}' in held, held
    assert f'drived_s3_index_objects{{drive="s3://{bucket}/a/"}}' not in held, held
    assert f"dropped the index of s3://{bucket}/a/ (400 objects" in daemon.log()
    assert "new" in a.list(".")  # indexed again at its next use (and now b/'s is dropped)
    assert a.get("k0007").read_bytes() == b"a/k0007" and b.get("k0009").read_bytes() == b"b/k0009"

    whole = Drive(f"s3://{bucket}/", endpoint=daemon.endpoint)
    for call in (whole.mount, lambda: whole.list(".")):
        with pytest.raises(ResourceExhausted) as refused:
            call()
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"s3://{bucket}/" in str(refused.value) and "--s3-index-memory" in str(refused.value)
    held = _index_metrics(daemon)
    assert 0 < held["drived_s3_index_bytes"] <= memory, held
    assert f'drived_s3_index_objects{{drive="s3://{bucket}/"}}' not in held, held
    assert "new" in a.list(".") and b.stat("k0399").size == len(b"b/k0399")  # the others still served
    assert s3["client"].get_object(Bucket=bucket, Key="a/k0001")["Body"].read() == b"a/k0001"  # store untouched


def test_many_small_mounts_stay_within_s3_index_memory(s3, start_daemon, tmp_path):
    """A held index counts what it costs beside its arrays (its objects, its place in the daemon, its metric's
    series: over 1 KB for an empty location), so a client mounting many small locations (a drive per shard or
    per run) cannot make the daemon hold past --s3-index-memory; the dropped ones are indexed again at their
    next use."""
    memory = 64 * 1024
    daemon = start_daemon(tmp_path, "--s3-index-memory", str(memory), env={**AWS_ENV, "AWS_ENDPOINT_URL": s3["url"]})

    def shard(i: int) -> Drive:
        return Drive(f"s3://{BUCKET}/shard{i:03d}/", endpoint=daemon.endpoint, root_folder=tmp_path)

    for i in range(100):
        assert shard(i).mount().objects == 0
    held = _index_metrics(daemon)
    series = [name for name in held if name.startswith("drived_s3_index_objects{")]
    assert 0 < len(series) <= memory // 1024, len(series)
    assert 0 < held["drived_s3_index_bytes"] <= memory, held
    assert 'drived_s3_index_objects{drive="s3://datasets/shard099/"}' in held, held  # the last used is kept
    assert shard(0).list(".") == []  # dropped, indexed again
    val = Drive(f"s3://{BUCKET}/imagenet/val/", endpoint=daemon.endpoint, root_folder=tmp_path)
    assert val.get("unicodé.jpg").read_bytes() == "imagenet/val/unicodé.jpg".encode()  # the others still served


def test_missing_bucket_is_not_found_and_the_daemon_keeps_serving(s3):
    with pytest.raises(FileNotFoundError) as missing:
        drive(s3, "s3://no-such-bucket/").list(".")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "no-such-bucket" in str(missing.value)
    assert "readme.txt" in drive(s3).list(".")


def test_mount_of_a_lit_drive_is_refused(s3):
    stub = drive(s3)._stub
    with pytest.raises(grpc.RpcError) as info:
        stub.Mount(drive_pb2.MountRequest(drive="lit://x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unreachable_endpoint_is_unavailable_naming_it(twin, tmp_path):
    """The daemon answers UNAVAILABLE for its S3 endpoint, marked as its store's failure: a mount is not tried
    again (boto3 has retried already), however long the drive's retry_seconds, and the message names the S3
    endpoint, not the daemon as unreachable."""
    port = closed_port()
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}
    handle = start_daemon(tmp_path, env=env)
    try:
        d = twin(f"s3://{BUCKET}/x/", endpoint=handle.endpoint, retry_seconds=600)
        for call in (lambda: d.list("."), d.mount):  # list mounts first
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as down:
                call()
            assert time.monotonic() - started < 30, "the mount was tried again"
            message = str(down.value)
            assert down.value.code == grpc.StatusCode.UNAVAILABLE and isinstance(down.value, ConnectionError)
            assert message.startswith("drived: store failed: ") and f"http://127.0.0.1:{port}" in message, message
            assert "cannot reach drived" not in message, message
        assert wait_until(lambda: mounts_logged(handle) == ["UNAVAILABLE", "UNAVAILABLE"]), mounts_logged(handle)
        (tmp_path / "l.txt").write_bytes(b"l")
        lit = Drive("lit://still_up", endpoint=handle.endpoint, root_folder=tmp_path)
        lit.put("l.txt")
        assert lit.list(".") == ["l.txt"]
    finally:
        handle.stop()


def test_reads_of_a_mounted_drive_are_not_tried_again_when_the_store_fails(twin, tmp_path):
    """A daemon restarted since this process mounted the drive indexes it again for a List, a Stat, a Get or a
    ranged read; with its S3 endpoint down that fails as the store's, raised at once (each try would list the
    location again), and a get leaves no local file."""
    with running_moto() as url:
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                              region_name=AWS_ENV["AWS_DEFAULT_REGION"])
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="x/a.txt", Body=b"a")
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": url, "AWS_MAX_ATTEMPTS": "2"}
        first = start_daemon(tmp_path, env=env)
        local = tmp_path / "local"
        local.mkdir()
        d = twin(f"s3://{BUCKET}/x/", endpoint=first.endpoint, retry_seconds=600, root_folder=local)
        assert d.list(".") == ["a.txt"]  # mounted, once for this process
        first.stop()
    (tmp_path / "again").mkdir()  # a log of its own
    again = start_daemon(tmp_path / "again", port=first.port, env=env)  # no index, and moto is gone
    try:
        for call in (lambda: d.list("."), lambda: d.stat("a.txt"), lambda: d.get("a.txt"),
                     lambda: list(d.read_range("a.txt", 0, 1))):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as down:
                call()
            assert time.monotonic() - started < 30, "tried again"
            message = str(down.value)
            assert message.startswith("drived: store failed: ") and url in message, message
            assert down.value.details() == message, "the daemon's answer, marked once"
            assert list(local.iterdir()) == [], "a failed get leaves no local file"
    finally:
        again.stop()


def test_a_read_whose_store_fails_midway_ends_at_once(twin, s3, tmp_path):
    """An s3:// get or ranged read whose S3 endpoint goes away after some bytes ends with StoreUnavailable at
    once rather than resuming: every replica reads the same endpoint, so a resume fails the same way. The get
    leaves no local file; the daemon serves the read again once the endpoint is back."""
    with CuttingProxy(s3["url"].removeprefix("http://")) as to_store:
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://{to_store.endpoint}", "AWS_MAX_ATTEMPTS": "2"}
        handle = start_daemon(tmp_path, env=env)
        try:
            local = tmp_path / "local"
            local.mkdir()
            d = twin(f"s3://{BUCKET}/imagenet/", endpoint=handle.endpoint, retry_seconds=600, root_folder=local)
            d.mount()

            def read_range() -> None:
                for _ in d.read_range("big.bin"):
                    to_store.refuse()

            for read in (lambda: d.get("big.bin", progress=lambda _: to_store.refuse()), read_range):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as down:
                    read()
                assert time.monotonic() - started < 30, "tried again"
                message = str(down.value)
                assert message.startswith("drived: store failed: ") and to_store.endpoint in message, message
                assert list(local.iterdir()) == [], "a failed get leaves no local file"
                to_store.refuse(False)
            assert b"".join(d.read_range("big.bin")) == s3["big"]
        finally:
            handle.stop()


def mounts_logged(handle: DaemonHandle) -> list[str]:
    """The statuses of the Mount calls the daemon answered, in order."""
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    return [line["status"] for line in lines if line.get("event") == "request" and line.get("method") == "Mount"]


def test_a_mount_waits_for_a_daemon_started_after_it(twin, s3, tmp_path, caplog):
    """A daemon that cannot be reached is waited for within retry_seconds, as for a transfer."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    port = free_port()
    mount = Background(twin(f"s3://{BUCKET}/imagenet/val/", endpoint=f"127.0.0.1:{port}").mount)
    handle = None
    try:
        mount.start()
        assert wait_until(lambda: "trying again in" in caplog.text or not mount.is_alive(), 30)
        assert mount.is_alive(), f"the mount gave up: {mount.error!r}"
        handle = start_daemon(tmp_path, port=port, env={**AWS_ENV, "AWS_ENDPOINT_URL": s3["url"]})
        assert mount.join_checked(60).objects >= 2
        assert wait_until(lambda: mounts_logged(handle) == ["OK"]), mounts_logged(handle)
    finally:
        if handle is not None:
            handle.stop()


def test_a_mount_goes_on_to_another_replica_when_one_is_draining(twin, s3, tmp_path):
    """Two replicas behind one target, gRPC balancing calls over both: once one drains, it answers UNAVAILABLE
    over a connection that stays live, and a mount it answers is tried again, on the other."""
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3["url"]}
    draining = start_daemon(tmp_path, "--grace-period", "60", env=env)
    serving = start_daemon(tmp_path, env=env)
    d = twin(f"s3://{BUCKET}/imagenet/val/", endpoint=f"ipv4:127.0.0.1:{draining.port},127.0.0.1:{serving.port}",
             retry_seconds=30)

    def mount_until(reached: Callable[[], bool]) -> int:
        """Mounts until `reached()` (at most 20 times); how many mounts it took, each checked."""
        count = 0
        while not reached() and count < 20:
            assert d.mount().objects >= 2
            count += 1
        assert reached(), f"gRPC sent no Mount there in {count}"
        return count

    try:
        with held_open(draining):
            before = mount_until(lambda: bool(mounts_logged(draining) and mounts_logged(serving)))  # both connected
            draining.proc.send_signal(signal.SIGTERM)
            draining.wait_logged("draining")
            after = mount_until(lambda: "UNAVAILABLE" in mounts_logged(draining))
            oks = before + after  # each mount answered OK once, by one replica or the other
            assert wait_until(lambda: (mounts_logged(draining) + mounts_logged(serving)).count("OK") == oks)
            assert draining.proc.poll() is None, "the draining replica exited while a put was open"
        assert draining.proc.wait(30) == 0, draining.log()
    finally:
        draining.stop()
        serving.stop()


def test_a_mount_during_a_restart_waits_for_the_daemon_back(twin, s3, tmp_path, caplog):
    """A draining daemon's UNAVAILABLE is its own (marked, never "cannot reach drived"), and a mount tries
    again through the drain and the restart, within retry_seconds."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3["url"]}
    old = start_daemon(tmp_path, "--grace-period", "60", env=env)
    new = None
    try:
        with held_open(old):
            old.proc.send_signal(signal.SIGTERM)
            old.wait_logged("draining")
            mount = Background(twin(f"s3://{BUCKET}/imagenet/val/", endpoint=old.endpoint, retry_seconds=60).mount)
            mount.start()
            assert wait_until(lambda: len(mounts_logged(old)) >= 2 or not mount.is_alive(), 30), mounts_logged(old)
            assert mount.is_alive(), f"the mount gave up: {mount.error!r}"
            assert set(mounts_logged(old)) == {"UNAVAILABLE"}, mounts_logged(old)
            assert "drived: shutting down" in caplog.text and "cannot reach drived" not in caplog.text, caplog.text
        assert old.proc.wait(30) == 0, old.log()
        (tmp_path / "back").mkdir()  # a log of its own
        new = start_daemon(tmp_path / "back", port=old.port, env=env)
        assert mount.join_checked(60).objects >= 2
        assert wait_until(lambda: mounts_logged(new) == ["OK"]), mounts_logged(new)
    finally:
        old.stop()
        if new is not None:
            new.stop()


@pytest.mark.slow
def test_get_of_a_folder_fetches_every_object_under_it(s3, tmp_path):
    got = drive(s3, root_folder=tmp_path).get("train")
    files = sorted(p.name for p in got.iterdir())
    assert len(files) == 1200 and files[0] == "0000.jpg"
    assert (got / "0042.jpg").read_bytes() == b"imagenet/train/0042.jpg"


@pytest.mark.parametrize("stuck", ["Mount", "Get"])
def test_a_stop_while_an_s3_endpoint_does_not_answer_ends_soon_after_the_grace_period(tmp_path, stuck):
    """An s3:// drive's endpoint that takes requests and never answers (a hung gateway; moto SIGSTOPped here) held
    a daemon's stop, with its data on a local disk too, for boto3's tries: a mount's listing, waited for by the
    stop (240 s), or the read of a get the grace period cancelled, whose thread the process's exit joined after
    'stopped' (180 s). The stop waits for them CLOSE_SECONDS at most, and the process ends once it stopped."""
    with MotoServer(tmp_path / "moto") as moto:
        client = boto3.client(
            "s3", endpoint_url=moto.url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="d/a.bin", Body=os.urandom(3 * 1024 * 1024))
        handle = start_daemon(tmp_path, "--grace-period", "1", env={**AWS_ENV, "AWS_ENDPOINT_URL": moto.url},
                              before="import drived.server as s; s.CLOSE_SECONDS = 1.0")
        try:
            stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
            if stuck == "Get":
                stub.Mount(drive_pb2.MountRequest(drive=f"s3://{BUCKET}/d/"), timeout=30)
            moto.proc.send_signal(signal.SIGSTOP)
            try:
                if stuck == "Get":
                    call = stub.Get(drive_pb2.GetRequest(drive=f"s3://{BUCKET}/d/", path="a.bin"), timeout=120)
                    ended = lambda: list(call)  # noqa: E731 - its status comes once its messages are read
                else:
                    call = stub.Mount.future(drive_pb2.MountRequest(drive=f"s3://{BUCKET}/d/"), timeout=120)
                    ended = call.result
                handle.wait_open(stuck, 1)
                handle.proc.send_signal(signal.SIGTERM)
                assert handle.proc.wait(30) == 0, handle.log()
            finally:
                moto.proc.send_signal(signal.SIGCONT)
            assert rpc_code(ended) in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert '"event": "stopped"' in handle.log() and "Traceback" not in handle.log(), handle.log()
        finally:
            handle.stop(signal.SIGKILL)
