"""Managed drives kept in S3 (`drived --storage s3://bucket/prefix/`): real daemons against a real moto_server.

Every daemon here keeps its lit:// drives in the same bucket and prefix, so
what one stores another lists and reads: bytes and listing need no
coordinator. Objects are checked through boto3 as a user of the bucket would.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import functools
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import botocore.model
import fsspec
import grpc
import pytest
from conftest import (
    BIN,
    MIB,
    Background,
    DaemonHandle,
    StalledPuts,
    damaged_reads,
    file_sha256,
    loop_thread,
    paused_reads,
    put_messages,
    raw_get,
    raw_put,
    read_changed,
    rpc_code,
    rss_mib,
    sitecustomized,
    start_daemon,
    wait_serving,
    wait_until,
    write_random_file,
)
from crc32c import crc32c
from cutting_proxy import CuttingProxy
from moto_server import AWS_ENV, aws_env
from rewriting_s3_proxy import RewritingS3Proxy

import drived.backends.s3 as s3_backend
from bench.services import MotoServer, peak_rss_mib, reset_peak_rss
from drive_client import DataLoss, Drive, DriveError, StaleIndexError
from drive_client.pb import drive_pb2, drive_pb2_grpc
from drive_client.transfer import PARALLEL_MIN_SIZE
from drive_client.wire import fast_stub
from drived.backends.base import ROOTS_AT_ONCE
from drived.backends.s3 import LIVE, MAX_PARTS_IN_FLIGHT, PART_SIZE, PARTS_IN_MEMORY, SWEEP_AT_ONCE, S3Backend
from drived.checksums import ClientChecksums

BUCKET = "drived-store"
PREFIX = "drives/"
STORAGE = f"s3://{BUCKET}/{PREFIX}"


def s3_client(url: str):
    return boto3.client(
        "s3", endpoint_url=url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], region_name=AWS_ENV["AWS_DEFAULT_REGION"],
    )


class Store:
    """One moto_server with the storage bucket, and daemons started on it.

    `moto`: a moto_server already running (kept running by `close`), emptied first (moto's reset) for a store as
    new as one started here, without a process's start.
    """

    def __init__(self, work: Path, moto: MotoServer | None = None) -> None:
        self.work = work
        self.moto = moto or MotoServer(work)
        self.own_moto = moto is None
        self.url = self.moto.url
        if not self.own_moto:
            urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10)
        self.client = s3_client(self.url)
        self.client.create_bucket(Bucket=BUCKET)
        self.daemons: list[DaemonHandle] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.url, **extra}

    def daemon(self, *args: str, env: dict[str, str] | None = None, before: str = "") -> DaemonHandle:
        handle = start_daemon(self.work, "--storage", STORAGE, *args, env=env or self.env(), before=before)
        self.daemons.append(handle)
        return handle

    def uploads(self) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])

    def parts(self) -> int:
        """How many parts the store holds of its one multipart upload (0 without one)."""
        uploads = self.uploads()
        if not uploads:
            return 0
        [upload] = uploads
        answer = self.client.list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
        return len(answer.get("Parts", []))

    def object_keys(self, under: str = PREFIX) -> list[str]:
        """The keys under `under`, but the daemons' lists of their live uploads, which each rewrites on its own clock
        while it has uploads in progress."""
        listed = self.client.list_objects_v2(Bucket=BUCKET, Prefix=under).get("Contents", [])
        return [o["Key"] for o in listed if not o["Key"].startswith(f"{PREFIX}{LIVE}/")]

    def close(self) -> None:
        for handle in self.daemons:
            handle.stop(signal.SIGTERM, timeout=20)
        if self.own_moto:
            self.moto.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("s3-storage"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def daemon_a(store: Store) -> DaemonHandle:
    return store.daemon()


@pytest.fixture(scope="module")
def daemon_b(store: Store) -> DaemonHandle:
    return store.daemon()


def stub_of(handle: DaemonHandle) -> drive_pb2_grpc.DriveServiceStub:
    return drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_list_stat_get_delete_through_one_daemon(store, daemon_a, drive_uri, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    (src / "a.txt").write_bytes(b"hello")
    (src / "sub" / "b.txt").write_bytes(b"world")
    drive = Drive(drive_uri, component_name="w", root_folder=src, endpoint=daemon_a.endpoint)
    drive.put("a.txt")
    drive.put("sub")
    assert drive.list(".") == ["a.txt", "sub"] and drive.list("sub") == ["sub/b.txt"]
    stat = drive.stat("a.txt")
    assert (stat.size, stat.sha256, stat.component) == (5, sha256_of(b"hello"), "w") and stat.generation
    assert drive.stat("sub").folder
    name = drive_uri.removeprefix("lit://")
    assert f"{PREFIX}{name}/w/a.txt" in store.object_keys()  # plain bytes at prefix/<drive>/<component>/<path>
    body = store.client.get_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/a.txt")
    assert body["Body"].read() == b"hello" and body["Metadata"]["sha256"] == sha256_of(b"hello")
    reader = Drive(drive_uri, root_folder=dst, endpoint=daemon_a.endpoint)
    assert reader.get("sub").joinpath("b.txt").read_bytes() == b"world"
    drive.delete("a.txt")
    drive.delete("sub")
    assert drive.list(".") == [] and not store.object_keys(f"{PREFIX}{name}/")
    with pytest.raises(FileNotFoundError):
        reader.stat("a.txt")


def test_put_through_a_is_read_and_deleted_through_b(daemon_a, daemon_b, drive_uri, tmp_path):
    (tmp_path / "dir").mkdir()
    data = os.urandom(3 * MIB)
    (tmp_path / "dir" / "f.bin").write_bytes(data)
    a = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon_a.endpoint)
    (tmp_path / "b").mkdir()
    b = Drive(drive_uri, component_name="w", root_folder=tmp_path / "b", endpoint=daemon_b.endpoint)
    a.put("dir")
    assert b.list(".") == ["dir"] and b.list("dir") == ["dir/f.bin"]
    assert b.stat("dir/f.bin").sha256 == sha256_of(data)
    assert b.get("dir/f.bin").read_bytes() == data
    assert b"".join(b.read_range("dir/f.bin", MIB, 10)) == data[MIB:MIB + 10]
    assert b.delete("dir") is None
    assert a.list(".") == [] and a.list("dir") == []
    with pytest.raises(FileNotFoundError):
        a.stat("dir/f.bin")


@pytest.mark.parametrize("handoff", ["1", "0"], ids=["handed-over", "streamed"])
def test_a_file_bigger_than_several_parts_is_one_multipart_object(
        store, daemon_a, daemon_b, drive_uri, tmp_path, handoff, monkeypatch):
    """Handed over (README, Same-host puts and gets: the daemon reads the file into the parts) or streamed."""
    monkeypatch.setenv("DRIVE_HANDOFF", handoff)
    data = os.urandom(35 * MIB)  # five 8 MiB parts
    (tmp_path / "big.bin").write_bytes(data)
    a = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon_a.endpoint)
    a.put("big.bin")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/big.bin"
    head = store.client.head_object(Bucket=BUCKET, Key=key)
    assert head["ETag"].strip('"').endswith("-5") and head["ContentLength"] == len(data)
    (tmp_path / "out").mkdir()
    b = Drive(drive_uri, root_folder=tmp_path / "out", endpoint=daemon_b.endpoint)
    assert b.stat("big.bin").sha256 == sha256_of(data)
    assert hashlib.sha256(b.get("big.bin").read_bytes()).hexdigest() == sha256_of(data)
    assert b"".join(b.read_range("big.bin", 20 * MIB + 3, 5 * MIB)) == data[20 * MIB + 3:25 * MIB + 3]
    checksums = f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/big.bin/"
    assert len(store.object_keys(checksums)) == 1
    replacement = os.urandom(17 * MIB)
    (tmp_path / "big.bin").write_bytes(replacement)
    a.put("big.bin")
    assert b.stat("big.bin").sha256 == sha256_of(replacement)
    assert len(store.object_keys(checksums)) == 1  # the replaced version's checksum object went with it
    assert "~checksums" not in b.list(".") and b.list(".") == ["big.bin"]
    a.delete("big.bin")
    assert store.object_keys(checksums) == [] and not store.uploads()


def test_a_big_file_replaced_by_a_small_one_leaves_no_checksum_object(store, daemon_a, drive_uri):
    """A small file is one PutObject with its checksums in its own metadata: the checksum object of the big
    version it replaced was left in the bucket for ever (no sweep looks at a key without an abandoned upload)."""
    stub = stub_of(daemon_a)
    checksums = f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/f.bin/"
    raw_put(stub, drive_uri, "f.bin", os.urandom(PART_SIZE + 1), component="w")
    assert len(store.object_keys(checksums)) == 1
    raw_put(stub, drive_uri, "f.bin", b"small now", component="w")
    assert store.object_keys(checksums) == []
    [(info, got)] = raw_get(stub, drive_uri, "f.bin")
    assert (info.sha256, got) == (sha256_of(b"small now"), b"small now")


def test_chunks_across_part_boundaries_make_whole_parts_each_with_its_crc32c(store, daemon_a, drive_uri):
    """Chunks that do not divide the part size are split between parts: every part but the last is PART_SIZE,
    and the store keeps each part's CRC32C (a composite checksum of the parts')."""
    stub = stub_of(daemon_a)
    data = os.urandom(5 * PART_SIZE + 3 * MIB)
    step = 3 * MIB + 1
    header = drive_pb2.PutHeader(drive=drive_uri, path="odd.bin", component="w", size=len(data))
    [stored] = stub.Put(iter([drive_pb2.PutRequest(header=header),
                              *(drive_pb2.PutRequest(data=data[i:i + step]) for i in range(0, len(data), step)),
                              drive_pb2.PutRequest(finish=drive_pb2.PutFinish(sha256=sha256_of(data)))]),
                        timeout=120).files
    assert (stored.size, stored.sha256) == (len(data), sha256_of(data))
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/odd.bin"
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    head = store.client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    parts = [data[i:i + PART_SIZE] for i in range(0, len(data), PART_SIZE)]
    composite = base64.b64encode(crc32c(b"".join(crc32c(p).to_bytes(4, "big") for p in parts)).to_bytes(4, "big"))
    assert head["ETag"].strip('"').endswith(f"-{len(parts)}")
    assert head["ChecksumCRC32C"] == composite.decode(), head
    assert not [u for u in store.uploads() if u["Key"] == key]


@pytest.mark.parametrize("size", [100, 20 * MIB], ids=["one-put", "multipart"])
def test_sha256_mismatch_is_data_loss_and_stores_nothing(store, daemon_a, drive_uri, size):
    stub = stub_of(daemon_a)
    raw_put(stub, drive_uri, "f.bin", b"first", component="w")
    data = os.urandom(size)
    code = rpc_code(lambda: raw_put(stub, drive_uri, "f.bin", data, component="w", sha256="0" * 64))
    assert code == grpc.StatusCode.DATA_LOSS
    code = rpc_code(lambda: raw_put(stub, drive_uri, "g.bin", data, component="w", size=size + 1))
    assert code == grpc.StatusCode.DATA_LOSS
    [(info, got)] = raw_get(stub, drive_uri, "f.bin")
    assert got == b"first" and info.sha256 == sha256_of(b"first")
    assert rpc_code(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="g.bin"))) == \
        grpc.StatusCode.NOT_FOUND
    assert not store.uploads()


@pytest.mark.parametrize("size", [100_000, 20 * MIB], ids=["one-put", "multipart"])
def test_the_crc32c_is_stored_and_a_whole_read_of_a_damaged_object_is_data_loss(store, daemon_a, drive_uri,
                                                                                 tmp_path, size):
    """The CRC32C lies beside the sha256 (object metadata, or the checksum object of a multipart one); a read
    of the whole object checks it before its last chunk (a ranged read checks the blocks it reads: below)."""
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    drive = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon_a.endpoint)
    drive.put("f.bin")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"
    head = store.client.head_object(Bucket=BUCKET, Key=key)
    metadata = head["Metadata"]
    if "checksums" in metadata:
        checksums = f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/f.bin/{metadata['checksums']}"
        metadata = store.client.head_object(Bucket=BUCKET, Key=checksums)["Metadata"]
    assert metadata["crc32c"] == f"{crc32c(data):08x}" and metadata["sha256"] == sha256_of(data)
    stub = stub_of(daemon_a)
    assert stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="f.bin")).crc32c == crc32c(data)

    damaged = bytearray(data)
    damaged[size // 2] ^= 0x01  # the store's copy rots (written back with the same metadata)
    store.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(damaged), Metadata=head["Metadata"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataLoss, match=r"'f.bin' of component 'w' in lit://\S+ is damaged"):
        Drive(drive_uri, root_folder=out, endpoint=daemon_a.endpoint).get("f.bin")
    assert list(out.iterdir()) == []
    with pytest.raises(DataLoss, match=r"'f.bin' of component 'w' in lit://\S+ is damaged"):
        b"".join(drive.read_range("f.bin", size // 2, 10))


@pytest.mark.parametrize("size", [100_000, PART_SIZE + 1], ids=["one-put", "multipart"])
def test_an_object_emptied_behind_the_daemons_back_is_data_loss(store, daemon_a, drive_uri, tmp_path, size):
    """An object written back empty with its metadata (a copy or sync tool that lost its bytes): a whole read
    has no last chunk to check before, so it served an empty file, and a Drive.get called that damage on the
    way. Every read of it is DATA_LOSS naming the file, and the empty bytes are never kept."""
    stub = stub_of(daemon_a)
    raw_put(stub, drive_uri, "f.bin", os.urandom(size), component="w")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"
    metadata = store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"]
    store.client.put_object(Bucket=BUCKET, Key=key, Body=b"", Metadata=metadata)
    for request in (drive_pb2.GetRequest(drive=drive_uri, path="f.bin"),
                    drive_pb2.GetRequest(drive=drive_uri, path="f.bin", whole_small_files=True, checksums=True)):
        with pytest.raises(grpc.RpcError) as damaged:
            list(stub.Get(request, timeout=60))
        assert damaged.value.code() == grpc.StatusCode.DATA_LOSS, damaged.value.details()
        assert f"'f.bin' of component 'w' in {drive_uri} is damaged" in damaged.value.details()
    (tmp_path / "f.bin").write_bytes(b"the local file")
    with pytest.raises(DataLoss, match=r"'f.bin' of component 'w' in lit://\S+ is damaged"):
        Drive(drive_uri, root_folder=tmp_path, endpoint=daemon_a.endpoint).get("f.bin", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"the local file"
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"", "reading never rewrites an object"


def test_a_parallel_get_of_a_damaged_object_says_its_stored_copy_is_damaged(store, daemon_a, drive_uri, tmp_path):
    """A get of a file of PARALLEL_MIN_SIZE or more reads it in ranges, which the daemon sent as the store had
    them: only the client's check of the whole against the stored CRC32C saw the damage (it said 'damaged on the
    way; try again', which every try said again). The daemon checks each range's blocks: the range that holds the
    damaged one is DATA_LOSS saying the stored copy is damaged, and nothing is kept."""
    stub = stub_of(daemon_a)
    data = os.urandom(PARALLEL_MIN_SIZE)
    raw_put(stub, drive_uri, "f.bin", data, component="w")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x01  # the store's copy rots (written back with the same metadata)
    store.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(damaged),
                            Metadata=store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"])
    (tmp_path / "f.bin").write_bytes(b"the local file")
    with pytest.raises(DataLoss, match=r"the stored copy of 'f.bin' of component 'w' in lit://\S+ is damaged "
                                       r"\(the block at byte 33554432 does not match its CRC32C\)"):
        Drive(drive_uri, root_folder=tmp_path, endpoint=daemon_a.endpoint).get("f.bin", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"the local file"


@pytest.mark.parametrize("size", [5 * MIB + 1000, PART_SIZE + 3 * MIB + 1000], ids=["one-put", "multipart"])
def test_a_ranged_read_of_a_damaged_block_is_data_loss_and_sends_none_of_it(store, daemon_a, drive_uri, size):
    """A ranged read relied on S3's own integrity: a block damaged in the store (bit rot, a faulty copy or restore)
    was sent as stored to read_range, fsspec and each range of a parallel get, with the CRC32C of the damaged
    bytes, so the client kept them. A --storage file keeps a CRC32C per 1 MiB block (in its metadata, or in its
    checksum object), and a ranged read checks each block it touches before sending any of it: a read of the
    damaged block is DATA_LOSS naming the file, counted, with none of its bytes sent; reads elsewhere work."""
    stub = stub_of(daemon_a)
    data = os.urandom(size)
    raw_put(stub, drive_uri, "f.bin", data, component="w")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"
    damaged_at = 2 * MIB + 100
    damaged = bytearray(data)
    damaged[damaged_at] ^= 0x01  # the store's copy rots (written back with the same metadata)
    store.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(damaged),
                            Metadata=store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"])
    counted = damaged_reads(daemon_a)

    sent = []
    with pytest.raises(grpc.RpcError) as refused:
        for message in stub.Get(drive_pb2.GetRequest(drive=drive_uri, path="f.bin", offset=damaged_at - 10, limit=100,
                                                     checksums=True), timeout=60):
            sent.append(message.WhichOneof("message"))
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS, refused.value.details()
    assert refused.value.details().startswith(
        f"the stored copy of 'f.bin' of component 'w' in {drive_uri} is damaged"), refused.value.details()
    assert sent == ["info"], "no byte of the damaged block is sent"
    drive = Drive(drive_uri, endpoint=daemon_a.endpoint)
    with pytest.raises(DataLoss, match=r"'f.bin' of component 'w' in lit://\S+ is damaged"):
        b"".join(drive.read_range("f.bin", 2 * MIB, MIB))
    fs = fsspec.filesystem("lit", endpoint=daemon_a.endpoint, skip_instance_cache=True)
    name = f"{drive_uri.removeprefix('lit://')}/f.bin"
    with pytest.raises(DataLoss, match="is damaged"):
        fs.cat_file(name, damaged_at, damaged_at + 1)
    assert damaged_reads(daemon_a) == counted + 3

    across_parts = [(PART_SIZE - 10, 20)] if size > PART_SIZE else []
    for offset, length in ((0, 2 * MIB), (MIB + 5, MIB - 5), (3 * MIB, 10), (3 * MIB + 7, MIB), *across_parts,
                           (size - MIB - 3, MIB + 3), (size - 1, 1)):
        assert b"".join(drive.read_range("f.bin", offset, length)) == data[offset:offset + length], (offset, length)
    assert fs.cat_file(name, 3 * MIB + 1, size) == data[3 * MIB + 1:]
    with fs.open(name, "rb") as f:
        f.seek(3 * MIB + 5)
        assert f.read() == data[3 * MIB + 5:]
    assert damaged_reads(daemon_a) == counted + 3
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == damaged, "reading never rewrites it"


@pytest.mark.parametrize("size", [5 * MIB + 1000, PART_SIZE + 3 * MIB + 1000], ids=["one-put", "multipart"])
def test_a_file_stored_before_block_checksums_reads_in_ranges(store, daemon_a, drive_uri, tmp_path, size):
    """A file that an earlier drived put through --storage has no block table (neither in its metadata nor in its
    checksum object, which is empty): its ranges read as before, from any byte, with no migration."""
    stub = stub_of(daemon_a)
    data = os.urandom(size)
    raw_put(stub, drive_uri, "old.bin", data, component="w")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/old.bin"
    metadata = store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"]
    metadata.pop("blocks")
    store.client.put_object(Bucket=BUCKET, Key=key, Body=data, Metadata=metadata)  # as the earlier drived left it
    if "checksums" in metadata:
        [checksums] = store.object_keys(f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/old.bin/")
        held = store.client.head_object(Bucket=BUCKET, Key=checksums)["Metadata"]
        store.client.put_object(Bucket=BUCKET, Key=checksums, Body=b"", Metadata=held)
    drive = Drive(drive_uri, root_folder=tmp_path, endpoint=daemon_a.endpoint)
    for offset, length in ((0, 10), (MIB + 5, MIB - 5), (2 * MIB + 3, 3 * MIB), (size - 7, 7), (size, 1)):
        assert b"".join(drive.read_range("old.bin", offset, length)) == data[offset:offset + length], (offset, length)
    assert b"".join(drive.read_range("old.bin", 3, None)) == data[3:]
    assert drive.get("old.bin").read_bytes() == data
    assert store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"] == metadata, "reading never rewrites it"


@pytest.mark.parametrize("how", ["gone", "emptied"])
def test_a_big_file_whose_checksum_object_is_lost_is_data_loss_and_stays_listed(store, daemon_a, drive_uri, how):
    """A multipart object's checksums live in its checksum object (under ~checksums/, beside the drives): one
    lost behind the daemon's back (a drive's folder copied or restored alone, a cleanup of what looks like
    leftovers) hid the file from stat, get and listing (NOT_FOUND) while another component's put was refused as
    held by it. So did one whose metadata, all it holds, was lost (restored by a tool that keeps no S3 metadata),
    as 'not a drived object'. It is listed, and its stat and get are DATA_LOSS saying what is wrong; its bytes
    are kept."""
    stub = stub_of(daemon_a)
    data = os.urandom(PART_SIZE + 1)
    raw_put(stub, drive_uri, "big.bin", data, component="w")
    [lost] = store.object_keys(f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/big.bin/")
    if how == "gone":
        store.client.delete_object(Bucket=BUCKET, Key=lost)
    else:
        store.client.put_object(Bucket=BUCKET, Key=lost, Body=b"")
    listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=60).entries
    assert [(e.path, e.component) for e in listed] == [("big.bin", "w")]
    for call in (lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="big.bin"), timeout=60),
                 lambda: raw_get(stub, drive_uri, "big.bin")):
        with pytest.raises(grpc.RpcError) as damaged:
            call()
        assert damaged.value.code() == grpc.StatusCode.DATA_LOSS, damaged.value.details()
        assert damaged.value.details().startswith(
            f"the stored copy of 'big.bin' of component 'w' in {drive_uri} is damaged (its checksum object "
        ), damaged.value.details()
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/big.bin"
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    raw_put(stub, drive_uri, "big.bin", b"put again", component="w")
    assert raw_get(stub, drive_uri, "big.bin")[0][1] == b"put again"


def test_an_object_of_an_earlier_drived_without_a_crc32c_is_read(store, daemon_a, drive_uri, tmp_path):
    """An earlier drived kept only the sha256 and generation in an object's metadata: the object lists, stats
    (no crc32c) and reads as it is, each transfer still checked by the CRC32C the daemon computes as it sends."""
    data = os.urandom(300_000)
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/old.bin"
    store.client.put_object(Bucket=BUCKET, Key=key, Body=data,
                            Metadata={"generation": "1764547200000000000", "sha256": sha256_of(data)})
    stub = stub_of(daemon_a)
    info = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="old.bin"))
    assert (info.size, info.sha256, info.HasField("crc32c")) == (len(data), sha256_of(data), False)
    drive = Drive(drive_uri, root_folder=tmp_path, endpoint=daemon_a.endpoint)
    assert drive.get("old.bin").read_bytes() == data
    assert b"".join(drive.read_range("old.bin", 10, 100)) == data[10:110]
    assert store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"] == {
        "generation": "1764547200000000000", "sha256": sha256_of(data)}, "reading never rewrites an object"


def test_an_object_whose_generation_is_past_int64_is_not_taken_for_a_drived_file(store, daemon_a, drive_uri):
    """A generation is a commit time in ns, an int64 on the wire: an object whose metadata held a bigger number
    (damaged, or written by something else) failed its stat and get, and the listing of its whole folder,
    INTERNAL. It is taken for an object drived did not write, as one whose generation is no number is."""
    stub = stub_of(daemon_a)
    raw_put(stub, drive_uri, "good.txt", b"good", component="w")
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/odd.txt"
    store.client.put_object(Bucket=BUCKET, Key=key, Body=b"odd",
                            Metadata={"generation": str(1 << 63), "sha256": sha256_of(b"odd")})
    listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=60).entries
    assert [e.path for e in listed] == ["good.txt"]
    for call in (lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="odd.txt"), timeout=60),
                 lambda: raw_get(stub, drive_uri, "odd.txt")):
        with pytest.raises(grpc.RpcError) as foreign:
            call()
        assert (foreign.value.code(), foreign.value.details()) == (
            grpc.StatusCode.NOT_FOUND, f"'odd.txt' in {drive_uri} does not exist")
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"odd"
    assert raw_get(stub, drive_uri, "good.txt")[0][1] == b"good"


def test_a_put_passes_over_objects_drived_did_not_write_as_reads_do(store, daemon_a, drive_uri):
    """An object something else put in the drive's prefix is no file for a stat, a get or a list: a put whose
    duplicate check or folder check found one (at its own path in another component, at a parent's key in another
    component or in its own) was refused as though a file were there ("already held by component 'c07'", "a parent
    folder of it is a file"). Such a put is stored now, and every object drived did not write stays as it was; one at
    the put's own key is replaced, as before, and the daemon logs it."""
    stub = stub_of(daemon_a)
    name = drive_uri.removeprefix("lit://")
    foreign = {f"{PREFIX}{name}/{key}": key.encode() for key in ("c07/a/b", "c07/p", "w/m", "w/f")}
    for key, body in foreign.items():
        store.client.put_object(Bucket=BUCKET, Key=key, Body=body)
    raw_put(stub, drive_uri, "held", b"c08's", component="c08")
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as refused:  # a file of drived's in another component is still one
        raw_put(stub, drive_uri, "held", b"w's", component="w", size=3)
    assert (refused.value.code(), "is already held by component 'c08'" in refused.value.details()) == (
        grpc.StatusCode.ALREADY_EXISTS, True)
    assert store.object_keys() == before
    for path in ("a/b", "p/q", "m/n"):  # another's at the path, another's at a parent, its own at a parent
        raw_put(stub, drive_uri, path, path.encode(), component="w", size=len(path))
        assert [(i.component, d) for i, d in raw_get(stub, drive_uri, path)] == [("w", path.encode())], path
        found = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path=path), timeout=60)
        assert (found.component, found.size) == ("w", len(path)), path
    for key, body in foreign.items():
        assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body, key
    # its own path, where one lies: replaced, as a delete of the path removes it, and logged, not lost unseen
    raw_put(stub, drive_uri, "f", b"w's f", component="w")
    assert raw_get(stub, drive_uri, "f")[0][1] == b"w's f"
    daemon_a.wait_logged("an object drived did not write was removed")
    assert f'"object": "s3://{BUCKET}/{PREFIX}{name}/w/f", "size": 3, "by": "a put"' in daemon_a.log()


def test_a_delete_of_a_folder_under_an_object_drived_did_not_write_removes_the_folders_files(store, drive_uri):
    """An object something else put at `m` in a component's prefix, and the component's files below `m`: a stat and
    a list show `m` as a folder of those files (reads pass over the object), but its delete removed only the object
    and answered 1, leaving the files for a second delete. The delete now removes the object (logged, as a delete
    of the caller's own path does) and the files, and answers the count of the files."""
    handle = store.daemon()
    stub = stub_of(handle)
    name = drive_uri.removeprefix("lit://")
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/m", Body=b"foreign")
    for path in ("m/n", "m/o/p"):
        raw_put(stub, drive_uri, path, path.encode(), component="w")
    kept = {("w", "m.txt"), ("w", "mx/y"), ("x", "m/n")}  # beside `m`, and another component's `m/n`
    for component, path in kept:
        raw_put(stub, drive_uri, path, f"{component}'s {path}".encode(), component=component, allow_duplicates=True)
    assert stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="m", component="w"), timeout=60).folder
    start = next(iter(stub.Watch(drive_pb2.WatchRequest(drive=drive_uri), timeout=60))).sequence
    delete = drive_pb2.DeleteRequest(drive=drive_uri, path="m", component="w")
    assert stub.Delete(delete, timeout=60).files_deleted == 2
    watch = stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=start), timeout=60)
    events = [(e.kind, e.file.path) for _, e in zip(range(3), watch, strict=False)]
    watch.cancel()
    assert events == [(drive_pb2.WatchEvent.KIND_WATCHING, ""), (drive_pb2.WatchEvent.KIND_DELETE, "m/n"),
                      (drive_pb2.WatchEvent.KIND_DELETE, "m/o/p")]  # none of the object drived did not write
    listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".", component="w"), timeout=60).entries
    assert [(e.path, e.folder) for e in listed] == [("m.txt", False), ("mx", True)]
    assert store.object_keys(f"{PREFIX}{name}/w/m") == [f"{PREFIX}{name}/w/m.txt", f"{PREFIX}{name}/w/mx/y"]
    for component, path in kept:
        assert raw_get(stub, drive_uri, path, component=component)[0][1] == f"{component}'s {path}".encode()
    handle.wait_logged("an object drived did not write was removed")
    assert f'"object": "s3://{BUCKET}/{PREFIX}{name}/w/m", "size": 7, "by": "a delete"' in handle.log()
    before = store.object_keys()
    assert rpc_code(lambda: stub.Delete(delete, timeout=60)) == grpc.StatusCode.NOT_FOUND
    assert store.object_keys() == before


def test_a_folder_delete_counts_only_the_files_and_removes_the_objects_drived_did_not_write_below(store, drive_uri):
    """Objects something else put below a folder a component deletes: the delete removes them (logged, drived owns
    the prefix) and answers the count of the files alone, as a retry of it whose answer was lost does (it counts
    the request's deletes, of files only); a folder of such objects alone, an empty folder to every read, is
    removed and answered 1, as such an object alone at the path is."""
    handle = store.daemon()
    stub = stub_of(handle)
    name = drive_uri.removeprefix("lit://")
    for key in ("f/b", "f/c/d", "g/x"):
        store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/{key}", Body=b"foreign")
    raw_put(stub, drive_uri, "f/a", b"a", component="w")
    raw_put(stub, drive_uri, "kept.txt", b"kept", component="w")
    start = next(iter(stub.Watch(drive_pb2.WatchRequest(drive=drive_uri), timeout=60))).sequence
    delete = drive_pb2.DeleteRequest(drive=drive_uri, path="f", component="w", request_id="r1")
    assert stub.Delete(delete, timeout=60).files_deleted == 1
    delete.retry = True  # as the client's retry after an answer lost
    assert stub.Delete(delete, timeout=60).files_deleted == 1
    only_foreign = drive_pb2.DeleteRequest(drive=drive_uri, path="g", component="w", request_id="r2")
    assert stub.Delete(only_foreign, timeout=60).files_deleted == 1
    only_foreign.retry = True  # its answer lost: it published no delete, so its retry finds none of its own
    left = store.object_keys()
    assert rpc_code(lambda: stub.Delete(only_foreign, timeout=60)) == grpc.StatusCode.NOT_FOUND
    assert store.object_keys() == left
    for key, size in (("f/b", 7), ("f/c/d", 7), ("g/x", 7)):
        assert f'"object": "s3://{BUCKET}/{PREFIX}{name}/w/{key}", "size": {size}, "by": "a delete"' in handle.log()
    assert store.object_keys(f"{PREFIX}{name}/") == [f"{PREFIX}{name}/w/kept.txt"]
    raw_put(stub, drive_uri, "g", b"g", component="w")  # the path is no folder any more
    watch = stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=start), timeout=60)
    events = [(e.kind, e.file.path) for _, e in zip(range(3), watch, strict=False)]
    watch.cancel()
    assert events == [(drive_pb2.WatchEvent.KIND_WATCHING, ""), (drive_pb2.WatchEvent.KIND_DELETE, "f/a"),
                      (drive_pb2.WatchEvent.KIND_PUT, "g")]


def test_a_folder_holding_only_objects_drived_did_not_write_is_an_empty_folder(store, tmp_path, drive_uri):
    """A folder whose keys are all objects drived did not write is an empty folder, as the local backend's leftover
    ones are: its stat and its parent's listing say folder, its listing is empty, a get of it finds no file, and a
    put of its path is refused as a folder's. Telling it from no folder would cost a HEAD more on every stat of a
    folder (the LIST that finds it gives no metadata) and a LIST and a HEAD more for each folder a listing shows."""
    sent = tmp_path / "sent"
    handle = store.daemon(before=SENT_REQUESTS.format(sent=str(sent)))
    stub = stub_of(handle)
    name = drive_uri.removeprefix("lit://")
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/h/i", Body=b"foreign")
    raw_put(stub, drive_uri, "top.txt", b"top", component="w")
    stat = functools.partial(stub.Stat, drive_pb2.StatRequest(drive=drive_uri, path="h", component="w"), timeout=60)
    assert sent_by(sent, stat) == {"HeadObject": 1, "ListObjectsV2": 1}  # as for any folder
    assert (stat().folder, stat().component) == (True, "w")
    top = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=60).entries
    assert [(e.path, e.folder) for e in top] == [("h", True), ("top.txt", False)]
    assert not stub.List(drive_pb2.ListRequest(drive=drive_uri, path="h"), timeout=60).entries
    assert raw_get(stub, drive_uri, "h") == []
    drive = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=handle.endpoint)
    with pytest.raises(FileNotFoundError, match=r"holds no file \(deleted as the get began, or an empty folder\)"):
        drive.get("h")
    before = store.object_keys()
    for component, code, said in (("w", grpc.StatusCode.INVALID_ARGUMENT, "it is a folder"),
                                  ("other", grpc.StatusCode.ALREADY_EXISTS, "is a folder of component 'w'")):
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive_uri, "h", b"a file", component=component)
        assert refused.value.code() == code and said in refused.value.details(), component
    assert store.object_keys() == before and not (tmp_path / "h").exists()


def _path_of(nbytes: int) -> str:
    """A drive path of exactly `nbytes` ASCII bytes, in names of at most 200."""
    names = []
    while nbytes > 201:
        names.append("n" * 200)
        nbytes -= 201
    return "/".join([*names, "f" * nbytes])


def test_a_path_whose_key_s3_cannot_hold_is_refused_before_any_byte(store, daemon_a, tmp_path):
    """S3 keys hold at most 1,024 bytes: a path whose key (its checksum object's, the longest) would pass that is
    refused INVALID_ARGUMENT at its header, small file or big, and the longest that fits is stored."""
    drive = Drive("lit://longkeys", endpoint=daemon_a.endpoint, component_name="c", root_folder=tmp_path)
    # PREFIX, "~checksums/", "longkeys/c/", the path, "/" and the checksum object's name (generation-8 hex)
    room = 1024 - len(f"{PREFIX}~checksums/longkeys/c//") - len(f"{time.time_ns()}-00000000")
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"fits")
    write_random_file(big, 9 << 20)
    for local in (small, big):
        with pytest.raises(ValueError) as refused:
            drive.put(str(local), to=_path_of(room + 1))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "S3 keys hold at most 1024" in str(refused.value)
    assert store.uploads() == [] and store.object_keys(f"{PREFIX}longkeys/") == []
    drive.put(str(small), to=_path_of(room))
    assert drive.get(_path_of(room), to=tmp_path / "back").read_bytes() == b"fits"
    assert store.object_keys(f"{PREFIX}longkeys/") == [f"{PREFIX}longkeys/c/{_path_of(room)}"]


def test_folder_rules_hold_over_s3(store, daemon_a, drive_uri):
    stub = stub_of(daemon_a)
    raw_put(stub, drive_uri, "x", b"a file", component="w")
    raw_put(stub, drive_uri, "f/g", b"in a folder", component="w")
    before = store.object_keys()
    for path in ("x/y", "x/y/z", "f"):  # under a file; onto a folder
        code = rpc_code(lambda path=path: raw_put(stub, drive_uri, path, os.urandom(9 * MIB), component="w"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, path
    assert store.object_keys() == before and not store.uploads()
    listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."))
    assert [(e.path, e.folder) for e in listed.entries] == [("f", True), ("x", False)]
    stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="f/g", component="w"))
    assert [e.path for e in stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".")).entries] == ["x"]


def test_a_file_and_a_folder_of_one_path_in_two_components_are_duplicates_over_s3(store, daemon_a, drive_uri):
    stub = stub_of(daemon_a)
    raw_put(stub, drive_uri, "x", b"a file", component="ca")
    raw_put(stub, drive_uri, "f/g", b"in a folder", component="ca")
    before = store.object_keys()
    for path, size in (("x/y", 5), ("x/y/z", 9 * MIB), ("f", 5), ("f", 9 * MIB)):
        code = rpc_code(lambda p=path, n=size: raw_put(stub, drive_uri, p, os.urandom(n), component="cb"))
        assert code == grpc.StatusCode.ALREADY_EXISTS, path
    assert store.object_keys() == before and not store.uploads()


def test_the_occupant_of_a_path_in_another_component_is_named_over_s3(store, daemon_a, drive_uri):
    """The shortest part of the path another component holds is the one named, whatever the depth."""
    stub = stub_of(daemon_a)
    raw_put(stub, drive_uri, "p/q", b"a file", component="ca")
    raw_put(stub, drive_uri, "m/n/o", b"in a folder", component="ca")
    before = store.object_keys()
    for path, named in (("p/q/r/s/t", "is below 'p/q', a file of component 'ca'"),
                        ("p/q", "is already held by component 'ca'"),
                        ("m/n", "is a folder of component 'ca'"), ("m", "is a folder of component 'ca'")):
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive_uri, path, b"x", component="cb")
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS and named in refused.value.details(), path
    assert store.object_keys() == before
    raw_put(stub, drive_uri, "m/n2", b"beside", component="cb")  # no part of it is held
    assert len(store.object_keys()) == len(before) + 1


COUNTED_REQUESTS = """
from drived.backends.s3 import S3Backend

def counted(ask):
    async def ask_counted(self, *args, **params):
        key = params.get('Prefix') or params.get('Key') or args[-1]
        with open({asked!r}, "a") as asked:
            asked.write(f"{{key}}\\n")
        try:
            return await ask(self, *args, **params)
        finally:
            with open({asked!r}, "a") as asked:
                asked.write(f"answered:{{key}}\\n")
    return ask_counted

S3Backend.call = counted(S3Backend.call)
S3Backend._head = counted(S3Backend._head)
"""


OTHERS = [f"c{i:02}" for i in range(20)]


def twenty_other_components(store: Store, tmp_path: Path, drive_uri: str, before: str = ""
                            ) -> tuple[drive_pb2_grpc.DriveServiceStub, Path]:
    """A daemon that writes the keys it asks the store about to `asked` (its stub, `asked`), each once asked and once
    answered ("answered:<key>"), running `before` first, and a drive where components c00-c19 (OTHERS) each hold a
    file at the top and component 'holder' holds a/b."""
    asked = tmp_path / "asked"
    stub = stub_of(store.daemon(before=before + COUNTED_REQUESTS.format(asked=str(asked))))
    for other in OTHERS:
        raw_put(stub, drive_uri, f"{other}.txt", b"elsewhere", component=other, allow_duplicates=True)
    raw_put(stub, drive_uri, "a/b", b"held", component="holder", allow_duplicates=True)
    return stub, asked


def assert_requests_of_each_other(asked: Path, drive_uri: str, each: int = 1) -> None:
    """The daemon asked the store `each` requests about each of OTHERS since `asked` was last removed."""
    prefix = f"{PREFIX}{drive_uri.removeprefix('lit://')}/"
    requests = asked.read_text().split()
    for other in OTHERS:
        assert sum(r.startswith(f"{prefix}{other}/") for r in requests) == each, (other, requests)


def most_at_once(asked: Path, drive_uri: str) -> int:
    """The most requests about the drive's files the daemon had asked the store and not yet had answered at one
    time, since `asked` was last removed (and every request asked before was answered)."""
    prefix = f"{PREFIX}{drive_uri.removeprefix('lit://')}/"
    waiting = most = 0
    for request in asked.read_text().split():
        if request.startswith(prefix):
            waiting += 1
            most = max(most, waiting)
        elif request.startswith(f"answered:{prefix}"):
            waiting -= 1
    return most


def test_a_put_looks_in_each_other_component_with_one_request(store, tmp_path, drive_uri):
    """A put with allow_duplicates=False asked the store, for each other component of its drive, a HEAD of each
    part of its path and a LIST below it, one component after the other: in a drive of 10,000 components, some
    10,000 round trips for every put. A component that holds no key beginning as the path does (most) costs one
    LIST, asked for several components at once; the one that does is looked at as before."""
    stub, asked = twenty_other_components(store, tmp_path, drive_uri)
    asked.unlink()
    raw_put(stub, drive_uri, "x/y/z", b"new", component="writer", size=3)  # small and sized: checked at its commit
    assert_requests_of_each_other(asked, drive_uri)
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as refused:
        raw_put(stub, drive_uri, "a/b/c", b"below a file", component="writer")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "is below 'a/b', a file of component 'holder'" in refused.value.details()
    assert store.object_keys() == before


def test_a_stat_that_names_no_component_asks_one_request_of_each_that_holds_nothing(store, tmp_path, drive_uri):
    """A stat or get that names no component asked the store, for each component of its drive, a HEAD of the path
    and a LIST below it, one component after the other: in a drive of 10,000 components, some 20,000 round trips
    for every such stat. A component that holds no key beginning with the path (most) costs one LIST, asked for
    several components at once; the one that does is looked at as before."""
    stub, asked = twenty_other_components(store, tmp_path, drive_uri)
    asked.unlink()
    found = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="a/b"), timeout=60)
    assert (found.component, found.size) == ("holder", 4)
    assert_requests_of_each_other(asked, drive_uri)
    assert [(info.component, data) for info, data in raw_get(stub, drive_uri, "a/b")] == [("holder", b"held")]
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as missing:
        stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="a/b/c"), timeout=60)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'a/b/c' in " in missing.value.details() and "does not exist" in missing.value.details()
    assert store.object_keys() == before


def test_a_list_that_names_no_component_asks_one_request_of_each_that_holds_nothing(store, tmp_path, drive_uri):
    """A List that names no component asked the store, for each component of its drive, a LIST of the path's folder
    and (finding nothing there) a HEAD of the path, one component after the other: in a drive of 10,000 components,
    some 20,000 round trips for a List of one file. A component that holds no key beginning with the path (most)
    costs one LIST, asked for several components at once; those that do are read as before."""
    stub, asked = twenty_other_components(store, tmp_path, drive_uri)
    raw_put(stub, drive_uri, "a/c", b"also held", component="holder")
    before = store.object_keys()
    for path, page in [("a/b", [("a/b", "holder", 4)]), ("a", [("a/b", "holder", 4), ("a/c", "holder", 9)]),
                       ("a/b/c", [])]:
        asked.unlink()
        answer = stub.List(drive_pb2.ListRequest(drive=drive_uri, path=path), timeout=60)
        assert [(e.path, e.component, e.size) for e in answer.entries] == page and not answer.next_page_token
        assert_requests_of_each_other(asked, drive_uri)
    assert store.object_keys() == before


SMALL_GET_PAGE = """
import drived.managed
drived.managed.GET_PAGE = 10  # 21 components looked in as 10,000 are: more of them than files in a page
"""


def test_a_get_naming_no_component_walks_each_component_once_a_pass_several_at_once(store, tmp_path, drive_uri):
    """A Get of the whole drive or of a folder naming no component asked the store, one component after the other,
    whether each held the path (a LIST: of the top, though the listing of the drive's components had just said so),
    then walked each twice in each of its two passes (one to refuse a clash before any file is sent, one to send), as
    a drive of more components than a page of files read a share of one name of each first: in a drive of 10,000
    components, 50,000 round trips one after another for the whole drive. Now each component costs a walk a pass
    (and a folder's LIST of whether it holds it, which `holders` tells), ROOTS_AT_ONCE at a time; files, their order
    and the refusal of a clash are as before."""
    stub, asked = twenty_other_components(store, tmp_path, drive_uri, before=SMALL_GET_PAGE)
    asked.unlink()
    whole = [(info.path, info.component, data) for info, data in raw_get(stub, drive_uri, "")]
    assert whole == [("a/b", "holder", b"held")] + [(f"{o}.txt", o, b"elsewhere") for o in OTHERS]
    assert_requests_of_each_other(asked, drive_uri, each=2)
    assert 2 <= most_at_once(asked, drive_uri) <= ROOTS_AT_ONCE
    for other in OTHERS:
        raw_put(stub, drive_uri, f"shared/{other}.txt", other.encode(), component=other, allow_duplicates=True)
    asked.unlink()
    folder = [(info.path, info.component, data) for info, data in raw_get(stub, drive_uri, "shared")]
    assert folder == [(f"shared/{o}.txt", o, o.encode()) for o in OTHERS]
    assert_requests_of_each_other(asked, drive_uri, each=3)  # whether it may hold the folder (it does), 2 walks
    assert 2 <= most_at_once(asked, drive_uri) <= ROOTS_AT_ONCE
    raw_put(stub, drive_uri, "shared/c07.txt", b"clash", component="holder", allow_duplicates=True)
    before = store.object_keys()
    for path in ("", "shared"):
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stub.Get(drive_pb2.GetRequest(drive=drive_uri, path=path), timeout=60)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, path
        assert "'shared/c07.txt'" in refused.value.details() and "'c07', 'holder'" in refused.value.details()
    assert rpc_code(lambda: raw_get(stub, drive_uri, "missing")) == grpc.StatusCode.NOT_FOUND
    assert store.object_keys() == before


SENT_REQUESTS = """
import drived.backends.s3

def counting(make):
    def made(self, *args, **kwargs):
        make(self, *args, **kwargs)
        def note(event_name, **_):
            with open({sent!r}, "a") as sent:
                sent.write(event_name.rsplit(".", 1)[1] + "\\n")
        self.client.meta.events.register("before-send.s3", note)
    return made

drived.backends.s3.S3Backend.__init__ = counting(drived.backends.s3.S3Backend.__init__)
"""


def sent_by(sent: Path, call: Callable[[], object]) -> dict[str, int]:
    """How many requests of each operation the daemon sent the store while `call` ran."""
    sent.unlink(missing_ok=True)
    call()
    operations = sent.read_text().split() if sent.exists() else []
    return {operation: operations.count(operation) for operation in sorted(set(operations))}


def test_a_stat_or_get_naming_no_component_looks_at_what_holds_the_path_once(store, tmp_path, drive_uri):
    """A stat or get naming no component, in a drive of many components, asked each a LIST of its first key that
    begins with the path (which tells a folder), then asked each that held something there a HEAD and, for a folder,
    a LIST again: a folder held by two components cost 4 requests more than it needed. Now a folder the LIST told is
    not asked again; a file is (its sha256 and generation, and whether drived wrote it, are in the object's metadata,
    which a LIST does not give: an object something else put in the bucket is no file of the drive's); a path the
    LIST cannot tell (a key beside it, "c0" of "c00.txt") is looked at as before."""
    sent = tmp_path / "sent"
    stub, _ = twenty_other_components(store, tmp_path, drive_uri, before=SENT_REQUESTS.format(sent=str(sent)))
    raw_put(stub, drive_uri, "f/x", b"x of c03", component="c03", allow_duplicates=True)
    raw_put(stub, drive_uri, "f/y", b"y of c04", component="c04", allow_duplicates=True)
    lists = 1 + len(OTHERS) + 1  # the drive's components, then one LIST of each (OTHERS and 'holder')

    def stat_of(path: str) -> drive_pb2.FileInfo:
        return stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path=path), timeout=60)

    assert sent_by(sent, lambda: stat_of("a/b")) == {"HeadObject": 1, "ListObjectsV2": lists}  # was the same
    assert sent_by(sent, lambda: stat_of("f")) == {"ListObjectsV2": lists}  # was 2 HEADs and 2 LISTs more
    assert sent_by(sent, lambda: raw_get(stub, drive_uri, "a/b")) == {
        "GetObject": 1, "HeadObject": 1, "ListObjectsV2": lists}  # was the same
    # and a walk of each holder for each of the get's two passes (see above); was 2 HEADs and 2 LISTs more
    assert sent_by(sent, lambda: raw_get(stub, drive_uri, "f")) == {"GetObject": 2, "ListObjectsV2": lists + 4}
    found = stat_of("a/b")
    assert (found.component, found.size, found.sha256) == ("holder", 4, hashlib.sha256(b"held").hexdigest())
    assert (stat_of("f").folder, stat_of("f").component) == (True, "")
    assert [(i.path, i.component, i.sha256, d) for i, d in raw_get(stub, drive_uri, "a/b")] == [
        ("a/b", "holder", hashlib.sha256(b"held").hexdigest(), b"held")]
    assert [(i.path, i.component, d) for i, d in raw_get(stub, drive_uri, "f")] == [
        ("f/x", "c03", b"x of c03"), ("f/y", "c04", b"y of c04")]
    assert raw_get(stub, drive_uri, "a/b", offset=4) == [(raw_get(stub, drive_uri, "a/b")[0][0], b"")]
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as past:
        raw_get(stub, drive_uri, "a/b", offset=5)
    assert past.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "offset 5 is past the end of 'a/b' in " in past.value.details() and "(4 bytes)" in past.value.details()
    # 'c0' begins every key of c00-c09: neither a file nor a folder, told by a LIST of each; was a HEAD of each too
    # (the holders' LIST found no object at it, which would be each one's first key)
    assert sent_by(sent, lambda: rpc_code(lambda: stat_of("c0"))) == {"ListObjectsV2": lists + 10}
    with pytest.raises(grpc.RpcError) as missing:
        stat_of("c0")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "'c0' in " in missing.value.details()
    with pytest.raises(grpc.RpcError) as waited:
        raw_get(stub, drive_uri, "c0", wait_seconds=0.2)
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert store.object_keys() == before
    # an object drived did not write, beside the drive's a/b: not a file of the drive's, for a stat or a get
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{drive_uri.removeprefix('lit://')}/c07/a/b", Body=b"foreign")
    assert stat_of("a/b").component == "holder"
    assert [(i.component, d) for i, d in raw_get(stub, drive_uri, "a/b")] == [("holder", b"held")]
    raw_put(stub, drive_uri, "a/b", b"a clash", component="c05", allow_duplicates=True)
    raw_put(stub, drive_uri, "f", b"a file where c03 and c04 hold a folder", component="c06", allow_duplicates=True)
    before = store.object_keys()
    for path, holders in (("a/b", "'c05', 'holder'"), ("f", "'c03', 'c04', 'c06'")):
        for ask in (stat_of, functools.partial(raw_get, stub, drive_uri)):
            with pytest.raises(grpc.RpcError) as clash:
                ask(path)
            assert clash.value.code() == grpc.StatusCode.FAILED_PRECONDITION and holders in clash.value.details()
    assert store.object_keys() == before


def test_a_list_naming_no_component_asks_no_look_it_has_the_answer_of(store, tmp_path, drive_uri, make_drive_uri):
    """A List of a path that is a file HEADed it twice: once to tell that it is a file (its folder's LIST found
    nothing), once more for its entry's size and sha256. In a drive of many components, each component whose first
    key beginning with the path is not the path's own ("a.txt" of "a", or below it), which `Backend.holders` had just
    told holds no object there, was HEADed too when its folder's LIST found nothing. Now the entry is made of the
    first look, and a component seen holding no object at the path is not asked if it holds one. Answers are as
    before, and the same in a drive of 8 components or fewer (each looked in) as in one of many: entries, order,
    pages, a file of one component where others hold a folder, objects drived did not write (ignored). A page's
    entries were HEADed one after another (a page of 1,000 files: 1,000 round trips in a row); now ROOTS_AT_ONCE at a
    time."""
    sent = tmp_path / "sent"
    stub, asked = twenty_other_components(store, tmp_path, drive_uri, before=SENT_REQUESTS.format(sent=str(sent)))
    many, few = drive_uri, make_drive_uri("few")
    raw_put(stub, few, "a/b", b"held", component="holder")
    for drive in (many, few):  # 21 components and 8: the same files where the lists below look
        raw_put(stub, drive, "a/c", b"also held", component="holder", allow_duplicates=True)
        raw_put(stub, drive, "a.txt", b"beside a", component="c05", allow_duplicates=True)
        raw_put(stub, drive, "f/x", b"x of c03", component="c03", allow_duplicates=True)
        raw_put(stub, drive, "f/y", b"y of c04", component="c04", allow_duplicates=True)
        raw_put(stub, drive, "f", b"a file where c03 and c04 hold a folder", component="c06", allow_duplicates=True)
        name = drive.removeprefix("lit://")
        for foreign in ("c07/a/b", "c08/g", "c09/h/i"):  # objects drived did not write
            store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/{foreign}", Body=b"foreign")
    components = store.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}{few.removeprefix('lit://')}/",
                                              Delimiter="/")["CommonPrefixes"]
    assert len(components) == 8  # each looked in, as many as a drive can have for that

    def listed(drive: str, path: str, page_size: int = 0) -> list[tuple[str, str, int, str, bool]]:
        entries, token = [], ""
        while True:
            answer = stub.List(drive_pb2.ListRequest(drive=drive, path=path, page_size=page_size, page_token=token),
                               timeout=60)
            entries += [(e.path, e.component, e.size, e.sha256, e.folder) for e in answer.entries]
            token = answer.next_page_token
            if not token:
                return entries

    lists = 1 + len(OTHERS) + 1  # the drive's components, then one LIST of each (OTHERS and 'holder')
    for drive, path, requests in (
        # the folder of holder and of c07 (which holds an object at the path), HEADs of both; was 3 HEADs
        (many, "a/b", {"HeadObject": 2, "ListObjectsV2": lists + 2}),
        (few, "a/b", {"HeadObject": 8, "ListObjectsV2": 1 + 8}),  # each component's folder and HEAD; was 9 HEADs
        # the folders of holder, c05 (a.txt: no object at a) and c07, the HEAD of each file listed, of a/b in both
        # holder and c07 (a path two hold, of which only holder's is a file of the drive's)
        (many, "a", {"HeadObject": 3, "ListObjectsV2": lists + 3}),
        # the folders of c03, c04, c06 (which holds f), the HEAD of f (its entry too) and of f/x, f/y; was 4 HEADs
        (many, "f", {"HeadObject": 3, "ListObjectsV2": lists + 3}),
        (many, "c0", {"ListObjectsV2": lists + 10}),  # c00-c09 each hold a key beside it, none at it; was 10 HEADs
    ):
        assert sent_by(sent, functools.partial(listed, drive, path)) == requests, (drive, path)
    file_f = ("f", "c06", 38, sha256_of(b"a file where c03 and c04 hold a folder"), False)
    for path, entries in (
        ("a/b", [("a/b", "holder", 4, sha256_of(b"held"), False)]),
        # a/b: c07's, not drived's, comes first, and is no holder of it
        ("a", [("a/b", "holder", 4, sha256_of(b"held"), False), ("a/c", "holder", 9, sha256_of(b"also held"), False)]),
        ("f", [file_f, ("f/x", "c03", 8, sha256_of(b"x of c03"), False), ("f/y", "c04", 8, sha256_of(b"y of c04"),
                                                                          False)]),
        ("f/x", [("f/x", "c03", 8, sha256_of(b"x of c03"), False)]),
        ("c0", []), ("g", []), ("h", []), ("a.txt", [("a.txt", "c05", 8, sha256_of(b"beside a"), False)]),
    ):
        for drive in (many, few):
            assert listed(drive, path) == listed(drive, path, page_size=1) == entries, (drive, path)
    before = store.object_keys()
    for drive in (many, few):
        for path, code in (("../a", grpc.StatusCode.INVALID_ARGUMENT), ("/a", grpc.StatusCode.INVALID_ARGUMENT)):
            assert rpc_code(functools.partial(listed, drive, path)) == code, (drive, path)
    assert store.object_keys() == before
    names = [f"page/{i:02}" for i in range(12)]
    for name in names:
        raw_put(stub, many, name, b"p", component="holder", allow_duplicates=True)
    asked.unlink()
    page = stub.List(drive_pb2.ListRequest(drive=many, path="page", component="holder"), timeout=60)
    assert [e.path for e in page.entries] == names
    assert most_at_once(asked, many) == ROOTS_AT_ONCE  # the entries' HEADs, after the folder's LIST; was 1


def round_trips(asked: Path) -> int:
    """How many times the daemon asked the store while none of its requests waited for an answer, since `asked` was
    last removed: the round trips a call waited for one after another, those asked at once counting as one."""
    waiting = rounds = 0
    for request in asked.read_text().split():
        if request.startswith("answered:"):
            waiting -= 1
        else:
            rounds += waiting == 0
            waiting += 1
    return rounds


def test_a_put_checks_its_place_and_the_other_components_at_once(store, tmp_path, drive_uri, make_drive_uri):
    """A small put of a/b/c/file.txt asked the store a LIST of the drive's components (the duplicate check), then its
    place check (a HEAD of each parent and a LIST below the path, beside the HEAD of the version it replaces), then
    its PutObject: 3 round trips one after another. Now the duplicate check runs beside the place check: 2. The place
    check asks about the path's own parents only (it HEADed the drive's and the component's too, where no put ever
    makes an object: names hold no '/'): 7 requests where there were 9, and 2 fewer in each of a big put's two place
    checks. Refusals are as before, the duplicate check's first where both refuse."""
    sent = tmp_path / "sent"
    stub, asked = twenty_other_components(store, tmp_path, drive_uri, before=SENT_REQUESTS.format(sent=str(sent)))
    alone = make_drive_uri("alone")

    def put(drive: str, path: str, data: bytes = b"new", **kwargs) -> Callable[[], object]:  # small, sized: checked
        return lambda: raw_put(stub, drive, path, data, component="writer", size=len(data), **kwargs)  # at its commit

    small = {"HeadObject": 4, "ListObjectsV2": 2, "PutObject": 1}  # 3 parents and the version replaced; was 6 HEADs
    for path in ("a/b/c/file.txt", "a/b/c/file.txt", "a/b/c/beside.txt"):  # new, replacing, into a folder
        asked.unlink(missing_ok=True)
        assert sent_by(sent, put(alone, path)) == small, path
        assert round_trips(asked) == 2, path  # the components and the place at once, then the PutObject; was 3
    asked.unlink()
    lists = 2 + len(OTHERS) + 1  # the components, the place's, then one LIST of each other component (and 'holder')
    assert sent_by(sent, put(drive_uri, "x/y/z/file.txt")) == {**small, "ListObjectsV2": lists}  # was 6 HEADs
    # the components' LIST (the place check beside it), a round per ROOTS_AT_ONCE other components, the PutObject
    assert round_trips(asked) <= 1 + -(-(len(OTHERS) + 1) // ROOTS_AT_ONCE) + 1  # was one more
    big = os.urandom(PART_SIZE + 1)  # a multipart upload: its place is checked before its first part and at its commit
    assert sent_by(sent, put(alone, "a/b/c/big.bin", big)) == {
        "CompleteMultipartUpload": 1, "CreateMultipartUpload": 1, "HeadObject": 7, "ListObjectsV2": 4, "PutObject": 1,
        "UploadPart": 2}  # was 11 HEADs
    assert [(i.path, d) for i, d in raw_get(stub, alone, "a/b/c/big.bin")] == [("a/b/c/big.bin", big)]
    raw_put(stub, drive_uri, "a/b", b"mine too", component="writer", allow_duplicates=True)
    before = store.object_keys()
    for drive, path, refusal, said in (
        (alone, "a/b/c/file.txt/x", grpc.StatusCode.INVALID_ARGUMENT, "a parent folder of it is a file"),
        (alone, "a/b", grpc.StatusCode.INVALID_ARGUMENT, "it is a folder"),
        (drive_uri, "a/b", grpc.StatusCode.ALREADY_EXISTS, "is already held by component 'holder'"),
        # below a file of its own and of another's: the duplicate check's refusal, as when it ran first
        (drive_uri, "a/b/c", grpc.StatusCode.ALREADY_EXISTS, "is below 'a/b', a file of component 'holder'"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            put(drive, path)()
        assert refused.value.code() == refusal and said in refused.value.details(), path
    with pytest.raises(grpc.RpcError) as refused:  # a duplicate whose bytes are not as sent: still the duplicate
        put(drive_uri, "a/b", sha256="0" * 64)()
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert store.object_keys() == before and not store.uploads()
    assert [(i.component, d) for i, d in raw_get(stub, drive_uri, "a/b", component="writer")] == [
        ("writer", b"mine too")]


# sitecustomize.py of a daemon whose HEAD of the version a put of a path ending in SLOW replaces never answers: it
# writes CANCELLED when it is cancelled.
SLOW_REPLACED = """
import asyncio
import drived.backends.s3 as s3

head = s3.S3Backend.replaced

async def replaced(self, key):
    if key.endswith({slow!r}):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            open({cancelled!r}, "w").close()
            raise
    return await head(self, key)

s3.S3Backend.replaced = replaced
"""


def test_a_commit_refused_by_its_place_check_cancels_its_other_checks(store, tmp_path, drive_uri):
    """A big put's commit checks its place beside the HEAD of the version it replaces (and the duplicate check, and
    the checksum object's write). The place check refused a put whose path had become a file's child since its first
    part while the HEAD went on running, asking the store after the put was answered. Now the first failure cancels
    the store's own checks still running, and the put answers once they have ended, refused as before."""
    cancelled = tmp_path / "cancelled"
    handle = store.daemon(env=store.env(**sitecustomized(tmp_path, SLOW_REPLACED.format(
        slow="/a/big.bin", cancelled=str(cancelled)))))
    stub = stub_of(handle)
    big = os.urandom(PART_SIZE + MIB)

    def messages() -> Iterator[drive_pb2.PutRequest]:
        stream = put_messages(drive_uri, "a/big.bin", big, component="w")
        for _ in range(PART_SIZE // MIB + 2):  # the header and a part's bytes and one more: the first part is sent
            yield next(stream)
        assert wait_until(lambda: store.parts() == 1, 20)  # its place checked before the first part: then no file
        raw_put(stub, drive_uri, "a", b"now a file", component="w")
        yield from stream

    with pytest.raises(grpc.RpcError) as refused:
        stub.Put(messages(), timeout=20)  # the HEAD never answers: a put that waited for it would pass its deadline
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a parent folder of it is a file" in refused.value.details()
    assert cancelled.exists()  # the HEAD ended with the put: it asks the store nothing after the answer
    name = drive_uri.removeprefix("lit://")
    assert store.object_keys(f"{PREFIX}{name}/") == [f"{PREFIX}{name}/w/a"]
    assert store.object_keys(f"{PREFIX}~checksums/{name}/") == [] and not store.uploads()
    assert raw_get(stub, drive_uri, "a", component="w")[0][1] == b"now a file"
    assert "never retrieved" not in handle.log() and "never awaited" not in handle.log()


def test_the_quota_is_counted_from_the_store(store, drive_uri):
    first = store.daemon("--quota", "3M")
    stub = stub_of(first)
    raw_put(stub, drive_uri, "two.bin", os.urandom(2 * MIB))
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as refused:
        raw_put(stub, drive_uri, "more.bin", os.urandom(2 * MIB), component="other")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "holds 2,097,152 bytes" in refused.value.details() and "3,145,728" in refused.value.details()
    assert store.object_keys() == before and not store.uploads()
    # another daemon of the same store counts the drive from it when it first needs to
    second = store.daemon("--quota", "3M")
    assert rpc_code(lambda: raw_put(stub_of(second), drive_uri, "more.bin", os.urandom(2 * MIB))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    raw_put(stub_of(second), drive_uri, "one.bin", os.urandom(MIB))
    assert sorted(e.path for e in stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".")).entries) == [
        "one.bin", "two.bin"
    ]


@pytest.mark.parametrize("removal", ["delete", "replace"])
def test_an_object_drived_did_not_write_leaves_the_quota_count_with_its_size(store, drive_uri, removal):
    """The count takes every object in the drive's prefix at its listed size, one written to the bucket by
    something else too: a delete of it, or a put replacing it, takes that size off again."""
    stub = stub_of(store.daemon("--quota", "2M"))
    name = drive_uri.removeprefix("lit://")
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{name}/w/foreign.bin", Body=os.urandom(2 * MIB))
    # the drive is exactly full (and the daemon has counted it)
    assert rpc_code(lambda: raw_put(stub, drive_uri, "fill.bin", b"x", component="w")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    if removal == "delete":
        stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="foreign.bin", component="w"))
        freed, kept = 2 * MIB, []
    else:
        raw_put(stub, drive_uri, "foreign.bin", os.urandom(MIB), component="w")
        freed, kept = MIB, ["foreign.bin"]
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as refused:
        raw_put(stub, drive_uri, "fill.bin", os.urandom(freed + 1), component="w")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (f"holds {2 * MIB - freed:,} bytes; this put asks for {freed + 1:,} bytes more, over its quota of "
            "2,097,152 bytes") in refused.value.details()
    assert store.object_keys() == before and not store.uploads()
    raw_put(stub, drive_uri, "fill.bin", os.urandom(freed), component="w")
    listed = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."))
    assert sorted(e.path for e in listed.entries) == ["fill.bin", *kept]


def test_a_put_with_a_quota_heads_the_file_it_replaces_once_at_its_commit(store, tmp_path, make_drive_uri):
    """With --quota, a put's commit HEADed the file it replaces twice inside its claim: once for the quota's count of
    what it replaces, once more for the version whose checksum object it deletes. The claim keeps every other put and
    delete of the path out from the first HEAD to the commit (and the commit is refused when it lapsed), so the one
    answer serves both: a small put of a/b/c/file.txt sends 8 requests where it sent 9, a big one 1 HEAD fewer too.
    The count stays exact (the refusal's numbers), and a replaced big file's checksum object is still deleted."""
    sent = tmp_path / "sent"
    asked = tmp_path / "asked"
    handle = store.daemon("--quota", "20M", before=SENT_REQUESTS.format(sent=str(sent))
                          + COUNTED_REQUESTS.format(asked=str(asked)))
    stub = stub_of(handle)
    drive = make_drive_uri("quotahead")
    checksums = f"{PREFIX}~checksums/{drive.removeprefix('lit://')}/"
    raw_put(stub, drive, "first.txt", b"counted", component="writer")  # the drive's first count (a LIST) is over

    def put(path: str, data: bytes) -> Callable[[], object]:  # sized: checked at its commit only
        return lambda: raw_put(stub, drive, path, data, component="writer", size=len(data))

    # its own file as it begins, 3 parents, its own file at the commit (the version replaced too); was 6 HEADs
    small = {"HeadObject": 5, "ListObjectsV2": 2, "PutObject": 1}
    for data in (b"new", b"replacing"):
        asked.unlink(missing_ok=True)
        assert sent_by(sent, put("a/b/c/file.txt", data)) == small, data
        assert round_trips(asked) == 4, data  # the own file, the components beside it, the place, the PutObject
    big = os.urandom(PART_SIZE + 1)
    # its own file as it begins, 3 parents before the first part and 3 at the commit, its own file at the commit
    # (the version replaced too); was 9 HEADs. Replacing a big file, the old checksum object goes (1 DELETE).
    multipart = {"CompleteMultipartUpload": 1, "CreateMultipartUpload": 1, "HeadObject": 8, "ListObjectsV2": 4,
                 "PutObject": 1, "UploadPart": 2}
    assert sent_by(sent, put("a/b/c/big.bin", big)) == multipart
    assert sent_by(sent, put("a/b/c/big.bin", big[::-1])) == {**multipart, "DeleteObject": 1}
    assert len(store.object_keys(checksums)) == 1  # the replaced version's checksum object is gone
    assert sent_by(sent, put("a/b/c/big.bin", b"small now")) == {**small, "DeleteObject": 1}
    assert store.object_keys(checksums) == []
    held = len(b"counted") + len(b"replacing") + len(b"small now")
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as refused:
        raw_put(stub, drive, "more.bin", os.urandom(20 * MIB - held + 1), component="writer")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (f"holds {held:,} bytes; this put asks for {20 * MIB - held + 1:,} bytes more, over its quota of "
            f"{20 * MIB:,} bytes") in refused.value.details()
    assert store.object_keys() == before and not store.uploads()
    assert [(i.path, d) for i, d in raw_get(stub, drive, "a/b/c", component="writer")] == [
        ("a/b/c/big.bin", b"small now"), ("a/b/c/file.txt", b"replacing")]
    raw_put(stub, drive, "more.bin", os.urandom(20 * MIB - held), component="writer")  # exactly full


def test_listing_pages_keep_path_order_where_s3_key_order_differs(daemon_a, daemon, drive_uri):
    """S3 lists folder "a" as "a/", after "a.txt"; pages must still come in path order, each entry once."""
    paths = ["a!", "a-b", "a.txt", "a/x", "a0", "b", "b.c/d", "c/e"]
    pages: dict[str, list[list[str]]] = {}
    for name, handle in (("s3", daemon_a), ("local", daemon)):
        stub = stub_of(handle)
        for path in paths:
            raw_put(stub, drive_uri, path, path.encode(), component="w")
        pages[name] = []
        for size in (1, 2, 3, 100):
            listed, token = [], ""
            while True:
                page = stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".", page_size=size, page_token=token))
                listed += [e.path for e in page.entries]
                token = page.next_page_token
                if not token:
                    break
            pages[name].append(listed)
    expected = ["a", "a!", "a-b", "a.txt", "a0", "b", "b.c", "c"]
    assert pages["s3"] == pages["local"] == [expected] * 4


def test_ranged_reads_fsspec_and_grpcurl(daemon_a, drive_uri, tmp_path):
    data = os.urandom(2 * MIB + 5)
    (tmp_path / "r.bin").write_bytes(data)
    drive = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon_a.endpoint)
    drive.put("r.bin")
    assert b"".join(drive.read_range("r.bin", len(data) - 7)) == data[-7:]
    assert b"".join(drive.read_range("r.bin", len(data))) == b""
    with pytest.raises(ValueError):
        b"".join(drive.read_range("r.bin", len(data) + 1))
    stub = stub_of(daemon_a)
    [(_, got)] = raw_get(stub, drive_uri, "r.bin", offset=MIB, limit=3)
    assert got == data[MIB:MIB + 3]
    fs = fsspec.filesystem("lit", endpoint=daemon_a.endpoint, component_name="w", skip_instance_cache=True)
    name = drive_uri.removeprefix("lit://")
    assert fs.cat_file(f"{name}/r.bin", 10, 20) == data[10:20]
    with fs.open(f"{name}/written.txt", "wb") as f:
        f.write(b"through fsspec")
    assert fs.cat_file(f"{name}/written.txt") == b"through fsspec"
    assert sorted(fs.ls(name, detail=False)) == [f"{name}/r.bin", f"{name}/written.txt"]
    result = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-max-time", "20", "-d",
         f'{{"drive":"{drive_uri}","path":"r.bin"}}', daemon_a.endpoint, "drive.v1.DriveService/Stat"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f'"size": "{len(data)}"' in result.stdout and hashlib.sha256(data).hexdigest() in result.stdout


class StalledPut:
    """A Put that sends `size` bytes of a file, then waits (a client stuck mid-upload) until released; then it
    ends its stream, with the file's finish when `finish`."""

    def __init__(self, stub: drive_pb2_grpc.DriveServiceStub, drive: str, path: str, size: int,
                 finish: bool = False) -> None:
        self.release = threading.Event()
        self.data = os.urandom(size)
        self.call = stub.Put.future(self._messages(drive, path, finish), timeout=120)

    def _messages(self, drive: str, path: str, finish: bool) -> Iterator[drive_pb2.PutRequest]:
        messages = put_messages(drive, path, self.data, component="w")
        for message in messages:
            if message.WhichOneof("message") == "finish":
                self.release.wait(60)
                if finish:
                    yield message
                return
            yield message


@pytest.fixture(scope="module")
def changing(store: Store) -> Iterator[tuple[DaemonHandle, CuttingProxy, Path]]:
    """A daemon that reaches the store through a CuttingProxy, whose reads wait while the file it gives exists
    (`paused_reads`), and whose uploads take at most 2 parts: (the daemon, the proxy, that file)."""
    pause = store.work / "pause"
    with CuttingProxy(store.url.removeprefix("http://")) as to_store:
        two_parts = "import drived.backends.s3\ndrived.backends.s3.MAX_PARTS = 2"
        env = store.env(AWS_ENDPOINT_URL=f"http://{to_store.endpoint}")
        yield store.daemon(env=env, before=f"{paused_reads(pause)}\n{two_parts}"), to_store, pause


def test_an_object_changed_between_a_gets_lookup_and_its_read_is_named_as_asked_for(store, changing, drive_uri):
    """Deleted, replaced by an object drived did not write, or cut short after the get found it: the get's
    error named the file by its key in the bucket."""
    handle, _, pause = changing
    stub = stub_of(handle)
    shown = f"'f.bin' of component 'w' in {drive_uri}"
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"
    get = drive_pb2.GetRequest(drive=drive_uri, path="f.bin")
    raw_put(stub, drive_uri, "f.bin", b"version 1", component="w")
    gone = read_changed(stub, pause, lambda: store.client.delete_object(Bucket=BUCKET, Key=key), get)
    assert (gone.code(), gone.details()) == (grpc.StatusCode.NOT_FOUND, f"{shown} does not exist")
    raw_put(stub, drive_uri, "f.bin", b"version 2", component="w")
    foreign = read_changed(stub, pause, lambda: store.client.put_object(Bucket=BUCKET, Key=key, Body=b"theirs"), get)
    assert (foreign.code(), foreign.details()) == (
        grpc.StatusCode.NOT_FOUND, f"{shown} is not a drived object (written to the bucket by something else)")
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"theirs"
    raw_put(stub, drive_uri, "f.bin", b"version 3, long", component="w")
    short = read_changed(stub, pause, lambda: raw_put(stub, drive_uri, "f.bin", b"v4", component="w"),
                         drive_pb2.GetRequest(drive=drive_uri, path="f.bin", offset=5))
    assert (short.code(), short.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"{shown} ends before offset 5 (it has 2 bytes)")
    assert raw_get(stub, drive_uri, "f.bin")[0][1] == b"v4"


def test_a_pinned_read_of_an_object_shortened_between_its_lookup_and_its_read_is_stale(changing, drive_uri):
    """The get found the version it pins, and its read a shorter one, which ends before the offset: in the block the
    store answers, or before it (the store answers InvalidRange, without the object's metadata). A read of a file
    that changed (ABORTED), not one past the end of the version it pins (INVALID_ARGUMENT)."""
    handle, _, pause = changing
    stub = stub_of(handle)
    for offset in (5, MIB):
        pinned = raw_put(stub, drive_uri, "f.bin", os.urandom(2 * MIB), component="w").files[0].sha256
        stale = read_changed(stub, pause, lambda: raw_put(stub, drive_uri, "f.bin", b"v2", component="w"),
                             drive_pb2.GetRequest(drive=drive_uri, path="f.bin", offset=offset, if_match=pinned))
        assert (stale.code(), stale.details()) == (grpc.StatusCode.ABORTED, (
            f"'f.bin' in {drive_uri} changed (sha256 {sha256_of(b'v2')}, expected {pinned}): read it again"))
        [(info, data)] = raw_get(stub, drive_uri, "f.bin")
        assert (data, info.sha256) == (b"v2", sha256_of(b"v2"))


PAUSED_AFTER_GET = """
import os, time
import drived.backends.s3

def pausing(make):
    def made(self, *args, **kwargs):
        make(self, *args, **kwargs)
        get_object = self.client.get_object
        def get_object_then_pause(**params):
            try:
                return get_object(**params)
            finally:
                if params["Key"].endswith("/w/f.bin"):
                    open({reached!r}, "w").close()
                    while os.path.exists({pause!r}):
                        time.sleep(0.01)
        self.client.get_object = get_object_then_pause
    return made

drived.backends.s3.S3Backend.__init__ = pausing(drived.backends.s3.S3Backend.__init__)
"""


def test_a_read_at_the_end_of_a_version_replaced_after_its_get_answers_bytes_of_one_version(
        store, daemon_a, tmp_path, drive_uri):
    """A read at the end of the version its GetObject found (in the block the store answers, or at a block's end,
    which the store refuses as InvalidRange) looked at the file again with a HEAD, and answered the info of a version
    put in between with no bytes, though that version has bytes there. Now the block answered is answered from the
    GET's own metadata (no HEAD: one request fewer), and a HEAD after an InvalidRange that finds bytes at the offset
    reads again, from the new version."""
    pause, sent = tmp_path / "pause", tmp_path / "sent"
    reached = Path(f"{pause}.reached")
    stub = stub_of(store.daemon(before=PAUSED_AFTER_GET.format(pause=str(pause), reached=str(reached))
                                + SENT_REQUESTS.format(sent=str(sent))))
    writer = stub_of(daemon_a)
    third = os.urandom(MIB + 10)
    # (the version the GET finds, the one the read answers): a version ending inside a block, the store answering
    # that block; one ending at a block's end, the store answering InvalidRange
    for first, answered in ((b"version 1", b"version 1"), (os.urandom(MIB), third)):
        raw_put(writer, drive_uri, "f.bin", first, component="w")
        reached.unlink(missing_ok=True)
        pause.touch()
        get = Background(functools.partial(raw_get, stub, drive_uri, "f.bin", component="w", offset=len(first)))
        get.start()
        try:
            assert wait_until(reached.exists, timeout=30), "the get never sent its GetObject"
            raw_put(writer, drive_uri, "f.bin", third, component="w")
        finally:
            pause.unlink()
        [(info, data)] = get.join_checked()
        assert (info.size, info.sha256, data) == (len(answered), sha256_of(answered), answered[len(first):])
        [(info, data)] = raw_get(writer, drive_uri, "f.bin")
        assert (info.sha256, data) == (sha256_of(third), third)
    at_end = functools.partial(raw_get, stub, drive_uri, "f.bin", component="w", offset=len(third))
    assert sent_by(sent, at_end) == {"GetObject": 1, "HeadObject": 1}  # the lookup's HEAD; was a HEAD more
    assert [(info.sha256, data) for info, data in at_end()] == [(sha256_of(third), b"")]


def test_an_object_replaced_between_the_parts_of_its_read_is_named_as_asked_for(store, daemon_a, changing, drive_uri):
    """The read resumes after its connection to the store broke, and finds another object: the get's error
    named the file by its key in the bucket."""
    handle, to_store, _ = changing
    stub = stub_of(handle)
    data = os.urandom(32 * MIB)  # more than the sockets and the get's flow control window hold
    raw_put(stub_of(daemon_a), drive_uri, "big.bin", data, component="w")
    read = stub.Get(drive_pb2.GetRequest(drive=drive_uri, path="big.bin"), timeout=60)
    assert next(read).WhichOneof("message") == "info"  # the read is open, waiting for its client
    raw_put(stub_of(daemon_a), drive_uri, "big.bin", b"version 2", component="w")
    assert to_store.forwarded["down"] < len(data), "the store sent all of the object before the cut"
    to_store.refuse()
    to_store.refuse(False)
    with pytest.raises(grpc.RpcError) as changed:
        list(read)
    assert (changed.value.code(), changed.value.details()) == (
        grpc.StatusCode.ABORTED,
        f"'big.bin' of component 'w' in {drive_uri} was replaced or deleted while it was read: read it again")
    assert raw_get(stub, drive_uri, "big.bin")[0][1] == b"version 2"


PAUSED_CHECKSUM_READS = """
import asyncio, os
from drived.backends import s3

def paused(read):
    async def read_once_resumed(self, key, name, blocks):
        if os.path.exists({pause!r}):
            with open({pause!r}, "r+") as let_through:  # how many checksum objects to read before pausing
                count = int(let_through.read() or 0)
                let_through.seek(0)
                let_through.write(str(count - 1))
            if count > 0:
                return await read(self, key, name, blocks)
            open({reached!r}, "w").close()
            while os.path.exists({pause!r}):
                await asyncio.sleep(0.01)
        return await read(self, key, name, blocks)
    return read_once_resumed

s3.S3Backend._checksums_object = paused(s3.S3Backend._checksums_object)
"""


def test_a_big_file_replaced_while_its_checksum_object_is_read_is_found(store, daemon_a, drive_uri, tmp_path):
    """A stat, get or listing reads a multipart object's HEAD (or GET), then its checksum object's; a put that
    replaces the file in between deletes that checksum object. The file, there all along, was not found (stat,
    get: "not a drived object") or left out of the listing; each now answers one whole version. A get reads the
    checksum object twice: as it finds the file, and as it opens the GET of its bytes (a ranged one, its block
    table's entries with it)."""
    pause = tmp_path / "pause"
    reached = Path(f"{pause}.reached")
    handle = store.daemon(before=PAUSED_CHECKSUM_READS.format(pause=str(pause), reached=str(reached)))
    reader = stub_of(handle)
    writer = stub_of(daemon_a)
    versions = [os.urandom(PART_SIZE + 1) for _ in range(5)]
    raw_put(writer, drive_uri, "big.bin", versions[0], component="w")

    def got() -> tuple[str, bytes]:
        [(info, data)] = raw_get(reader, drive_uri, "big.bin")
        return info.sha256, data

    asks: dict[str, Callable[[], object]] = {
        "stat": lambda: reader.Stat(drive_pb2.StatRequest(drive=drive_uri, path="big.bin"), timeout=60).sha256,
        "get": got,
        "range": lambda: b"".join(Drive(drive_uri, endpoint=handle.endpoint).read_range("big.bin", MIB + 3, 100)),
        "list": lambda: [(e.path, e.sha256) for e in reader.List(
            drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=60).entries],
    }
    for (name, ask), replacement in zip(asks.items(), versions[1:], strict=True):
        reached.unlink(missing_ok=True)
        pause.write_text("1" if name in ("get", "range") else "0")
        asking = Background(ask)
        asking.start()
        try:
            assert wait_until(reached.exists, timeout=30), f"the {name} never read a checksum object"
            raw_put(writer, drive_uri, "big.bin", replacement, component="w")
        finally:
            pause.unlink()
        expected: object = {"stat": sha256_of(replacement), "get": (sha256_of(replacement), replacement),
                            "range": replacement[MIB + 3:MIB + 103],
                            "list": [("big.bin", sha256_of(replacement))]}[name]
        assert asking.join_checked() == expected, name
    assert got() == (sha256_of(versions[-1]), versions[-1])


def test_a_put_of_more_parts_than_s3_takes_is_named_as_asked_for(store, changing, drive_uri):
    """It was named by its key in the bucket (the daemon here takes 2 parts, where S3 takes 10,000)."""
    handle, _, _ = changing
    stub = stub_of(handle)
    raw_put(stub, drive_uri, "big.bin", b"version 1", component="w")
    with pytest.raises(grpc.RpcError) as refused:
        raw_put(stub, drive_uri, "big.bin", os.urandom(2 * PART_SIZE + 1), component="w")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details().startswith(
        f"'big.bin' of component 'w' in {drive_uri} is larger than 0 GiB, the largest file --storage keeps"
    ), refused.value.details()
    assert raw_get(stub, drive_uri, "big.bin")[0][1] == b"version 1"
    assert wait_until(lambda: not [u for u in store.uploads() if u["Key"].endswith("/w/big.bin")], 30)


def test_a_cancelled_put_leaves_no_multipart_upload(store, daemon_a, drive_uri):
    stub = stub_of(daemon_a)
    put = StalledPut(stub, drive_uri, "c.bin", 20 * MIB)
    try:
        assert wait_until(lambda: len(store.uploads()) == 1, timeout=30), "the upload never started"
        put.call.cancel()
        assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
    finally:
        put.release.set()
    assert rpc_code(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="c.bin"))) == \
        grpc.StatusCode.NOT_FOUND


ONE_SLOT_AND_LOGGED_CALLS = """
import asyncio, json, os
import drived.backends.s3 as s3

s3.MAX_PARTS_IN_FLIGHT = 1

def log(*event):
    with open({log!r}, "a") as f:
        f.write(json.dumps(event) + "\\n")

def logged(call):
    async def call_logged(self, method, key="", **params):
        log(method, key, "start")
        while method == "upload_part" and key.endswith("first.bin") and os.path.exists({pause!r}):
            await asyncio.sleep(0.01)
        try:
            return await call(self, method, key, **params)
        finally:
            log(method, key, "end")
    return call_logged

def announced(discard):
    async def discard_announced(self):
        log("discard", self._key, "start")
        return await discard(self)
    return discard_announced

s3.S3Backend.call = logged(s3.S3Backend.call)
s3.S3Upload._discard = announced(s3.S3Upload._discard)
"""


def test_an_upload_ended_while_its_part_waits_for_room_is_aborted_after_that_part(store, drive_uri, tmp_path):
    """A put's stream ends while its part waits for room among the parts in flight: the part goes out once it
    gets room, and the abort waited for the hand-on but not for the send it started, so the upload was aborted
    while its part was being sent (a store may keep such a part; the send's failure went unread)."""
    log, pause = tmp_path / "calls.jsonl", tmp_path / "pause"
    pause.touch()
    stub = stub_of(store.daemon(before=ONE_SLOT_AND_LOGGED_CALLS.format(log=str(log), pause=str(pause))))

    def events() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def seen(method: str, name: str, stage: str) -> bool:
        return any(e[0] == method and e[1].endswith(name) and e[2] == stage for e in events())

    first = StalledPut(stub, drive_uri, "first.bin", PART_SIZE + MIB, finish=True)  # its part holds the one slot
    second = StalledPut(stub, drive_uri, "second.bin", PART_SIZE + MIB)
    try:
        assert wait_until(lambda: seen("upload_part", "first.bin", "start"), timeout=30), events()
        assert wait_until(lambda: seen("create_multipart_upload", "second.bin", "end"), timeout=30), events()
        second.call.cancel()  # its part waits for the slot
        assert wait_until(lambda: seen("discard", "second.bin", "start"), timeout=30), events()
    finally:
        pause.unlink()
        first.release.set()
    assert first.call.result(timeout=60).files[0].sha256 == sha256_of(first.data)
    assert wait_until(lambda: seen("abort_multipart_upload", "second.bin", "end"), timeout=30), events()
    order = [(e[0], e[2]) for e in events() if e[1].endswith("second.bin")]
    assert order.index(("abort_multipart_upload", "start")) > order.index(("upload_part", "end")), order
    assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
    assert rpc_code(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="second.bin"))) == \
        grpc.StatusCode.NOT_FOUND
    [(_, stored)] = raw_get(stub, drive_uri, "first.bin")
    assert stored == first.data


def test_a_big_put_refused_at_its_commit_leaves_no_checksum_object(store, daemon_a, drive_uri):
    """The folder check at the commit runs beside the checksum object's write: a put refused there (its path
    became a folder while it was sent) leaves neither that object nor its upload."""
    stub = stub_of(daemon_a)
    put = StalledPut(stub, drive_uri, "p", 17 * MIB, finish=True)  # three parts
    try:
        # A part stored: past the first folder check (beside the upload's making), so the commit's refuses.
        assert wait_until(lambda: store.parts() >= 1, timeout=30), "the upload never started"
        raw_put(stub, drive_uri, "p/x", b"now p is a folder", component="w")
        before = store.object_keys()
    finally:
        put.release.set()
    with pytest.raises(grpc.RpcError) as refused:
        put.call.result(timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "folder" in refused.value.details()
    assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
    assert store.object_keys() == before
    assert not store.object_keys(f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/")
    assert raw_get(stub, drive_uri, "p/x") and [info.path for info, _ in raw_get(stub, drive_uri, "p")] == ["p/x"]


LAST_PART_GONE_AFTER_THE_CHECKSUM_OBJECT = """
import asyncio, json
import drived.backends.s3 as s3

def log(*event):
    with open({log!r}, "a") as f:
        f.write(json.dumps(event) + "\\n")

def damaging(call):
    written = asyncio.Event()

    async def call_damaging(self, method, key="", **params):
        last = method == "upload_part" and key.endswith("late.bin") and len(params["Body"]) < s3.PART_SIZE
        if last:
            try:  # the last part: sent once its commit's checks have written the checksum object, to an upload the
                # store no longer has (moto checks no part's CRC32C)
                await asyncio.wait_for(written.wait(), 20)
            except asyncio.TimeoutError:
                log("no checksum object while the last part was in flight")
            params["UploadId"] = "gone"
        try:
            return await call(self, method, key, **params)
        finally:
            checksums = method == "put_object" and s3.CHECKSUMS in params["Key"] and "late.bin" in params["Key"]
            log("the checksum object" if checksums else "the last part" if last else method)
            if checksums:
                written.set()
    return call_damaging

s3.S3Backend.call = damaging(s3.S3Backend.call)
"""


def test_a_part_that_fails_after_the_commits_checks_began_leaves_no_checksum_object(store, drive_uri, tmp_path):
    """A multipart put's commit writes its checksum object beside its last parts in flight: when one of those parts
    fails after the object was written (here the store lost the upload), the put fails naming the store's failure,
    and leaves neither that object nor its upload; the version it would have replaced is the file, unchanged."""
    log = tmp_path / "calls.jsonl"
    stub = stub_of(store.daemon(before=LAST_PART_GONE_AFTER_THE_CHECKSUM_OBJECT.format(log=str(log))))
    raw_put(stub, drive_uri, "late.bin", b"version 1", component="w")
    before = store.object_keys()
    with pytest.raises(grpc.RpcError) as failed:
        raw_put(stub, drive_uri, "late.bin", os.urandom(PART_SIZE + MIB), component="w")
    # moto answers a part of an upload it does not have with a 500, which boto3 tries again
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "late.bin after retries: 500" in \
        failed.value.details(), failed.value.details()
    calls = [json.loads(line)[0] for line in log.read_text().splitlines()]
    assert calls.index("the checksum object") < calls.index("the last part"), calls
    assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
    assert wait_until(lambda: store.object_keys() == before, timeout=30), store.object_keys()
    assert not store.object_keys(f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/")
    assert [(info.component, data) for info, data in raw_get(stub, drive_uri, "late.bin")] == [("w", b"version 1")]


def test_a_big_put_whose_commit_answer_was_lost_is_stored_and_reported_stored(store, drive_uri):
    """The answer of CompleteMultipartUpload lost, boto3 completes again, and a store that forgets an upload at its
    commit (MinIO, the store of deploy/) answers NoSuchUpload: the put was reported failed ("retry the put") with
    its file stored. The commit now looks whether the object at its key is its own before it says so."""
    with RewritingS3Proxy(store.url, lose_completes=1) as proxy:
        handle = store.daemon(env=store.env(AWS_ENDPOINT_URL=proxy.url))
        stub = stub_of(handle)
        raw_put(stub, drive_uri, "lost.bin", b"version 1", component="w")
        data = os.urandom(PART_SIZE + 1)
        stored = raw_put(stub, drive_uri, "lost.bin", data, component="w")
        assert proxy.lost_completes == 1, "no answer was lost"
        assert "a commit whose answer was lost was made" in handle.log()
    [entry] = stored.files
    assert entry.sha256 == sha256_of(data) and entry.size == len(data)
    [(info, got)] = raw_get(stub_of(store.daemons[0]), drive_uri, "lost.bin")
    assert got == data and info.sha256 == sha256_of(data) and info.generation == entry.generation
    assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
    key = f"{drive_uri.removeprefix('lit://')}/w/lost.bin"
    [checksums] = store.object_keys(f"{PREFIX}~checksums/{key}/")  # the one the object uses, and no other
    assert store.client.head_object(Bucket=BUCKET, Key=PREFIX + key)["Metadata"]["checksums"] == checksums.rsplit(
        "/", 1)[1]


def test_a_store_that_throttles_is_named_as_throttling(store, drive_uri):
    """A store under load answers 503 SlowDown (to a HEAD, a bare 503: its answer has no body), which boto3 tries
    again. Throttled every time, a put, list, stat, get or delete fails UNAVAILABLE naming the endpoint and saying
    it throttles (a HEAD's failure said "503 Service Unavailable", a SlowDown's quoted S3's code and words), storing
    nothing and leaving the version before."""
    throttling = threading.Event()
    small, big = b"small v1", os.urandom(PART_SIZE + MIB)
    with RewritingS3Proxy(store.url, slow_down=lambda method, path: throttling.is_set()) as proxy:
        handle = store.daemon(env=store.env(AWS_ENDPOINT_URL=proxy.url))
        stub = stub_of(handle)
        raw_put(stub, drive_uri, "small.bin", small, component="w")
        raw_put(stub, drive_uri, "big.bin", big, component="w")
        before = store.object_keys()
        throttling.set()
        for name, call in (("put", lambda: raw_put(stub, drive_uri, "small.bin", b"small v2", component="w")),
                           ("put", lambda: raw_put(stub, drive_uri, "big.bin", os.urandom(PART_SIZE + MIB),
                                                   component="w")),
                           ("list", lambda: stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=30)),
                           ("stat", lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="big.bin"),
                                                      timeout=30)),
                           ("get", lambda: raw_get(stub, drive_uri, "small.bin")),
                           ("delete", lambda: stub.Delete(drive_pb2.DeleteRequest(drive=drive_uri, path="small.bin",
                                                                                  component="w"), timeout=30))):
            with pytest.raises(grpc.RpcError) as failed:
                call()
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (name, failed.value)
            assert f"S3 endpoint {proxy.url} throttles" in failed.value.details(), (name, failed.value.details())
        throttling.clear()
        assert [(info.size, data) for info, data in raw_get(stub, drive_uri, "small.bin")] == [(len(small), small)]
        assert raw_get(stub, drive_uri, "big.bin")[0][1] == big
        assert wait_until(lambda: not store.uploads() and store.object_keys() == before, timeout=10), \
            (store.uploads(), store.object_keys())
        handle.stop()


def test_a_store_that_ignores_ranges_is_refused_not_read_from_its_start(store, drive_uri, tmp_path):
    """An endpoint that answers a ranged GET with the whole object (as HTTP allows, and as some gateways and
    caches do): a read from an offset sent the object's first bytes as those at the offset, with the CRC32C of
    what it sent, so read_range and fsspec took them. It fails saying so, naming the file and the block's first
    byte it asked the store for (a ranged read fetches the whole blocks it touches); a whole read works, and so
    does a read within the first block."""
    data = os.urandom(3 * MIB)
    with RewritingS3Proxy(store.url, drop=("Range",)) as proxy:
        handle = store.daemon(env=store.env(AWS_ENDPOINT_URL=proxy.url))
        stub = stub_of(handle)
        raw_put(stub, drive_uri, "f.bin", data, component="w")
        assert raw_get(stub, drive_uri, "f.bin")[0][1] == data
        drive = Drive(drive_uri, endpoint=handle.endpoint)
        for offset, length in ((MIB + 7, 100), (2 * MIB + 1, None)):
            with pytest.raises(DriveError, match=r"'f.bin' of component 'w' in lit://\S+ cannot be read from byte "
                                                 rf"{offset - offset % MIB}: .* ignores the Range"):
                b"".join(drive.read_range("f.bin", offset, length))
        assert b"".join(drive.read_range("f.bin", 0, MIB)) == data[:MIB]  # the whole object's first bytes
        assert b"".join(drive.read_range("f.bin", 1, MIB)) == data[1:MIB + 1]
        fs = fsspec.filesystem("lit", endpoint=handle.endpoint, skip_instance_cache=True)
        with pytest.raises(DriveError, match="ignores the Range"):
            fs.cat_file(f"{drive_uri.removeprefix('lit://')}/f.bin", MIB, 2 * MIB)
        assert b"".join(drive.read_range("f.bin", 0, None)) == data
        assert Drive(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint).get("f.bin").read_bytes() == data
        handle.stop()
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data


def test_a_store_that_serves_checksum_objects_whole_still_checks_ranges_against_the_right_entries(store, drive_uri):
    """A gateway that ignores the Range of a GET for some objects only (small ones, from its cache) answered the
    ranged GET of a big file's block table with the whole table: its first entries were taken for those of the
    blocks read, and a sound file failed DATA_LOSS."""
    data = os.urandom(PART_SIZE + 3 * MIB + 5)
    with RewritingS3Proxy(store.url, drop=("Range",), drop_under=f"/{PREFIX}~checksums/") as proxy:
        handle = store.daemon(env=store.env(AWS_ENDPOINT_URL=proxy.url))
        raw_put(stub_of(handle), drive_uri, "big.bin", data, component="w")
        drive = Drive(drive_uri, endpoint=handle.endpoint, retry_seconds=0)
        for offset, length in ((5 * MIB + 3, 2 * MIB), (PART_SIZE - 1, MIB + 2), (len(data) - 7, None)):
            assert b"".join(drive.read_range("big.bin", offset, length)) == data[offset:offset + (length or len(data))]
        handle.stop()
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/big.bin"
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data


def test_the_daemon_signs_for_the_region_aws_region_names(store, drive_uri):
    """The README sets the store's region with AWS_REGION, which the AWS CLI and SDKs take over AWS_DEFAULT_REGION.
    boto3 reads only AWS_DEFAULT_REGION: a store in another region (MinIO with its region set, an AWS bucket behind
    an endpoint URL) refuses requests signed for the wrong one. The store of --storage and s3:// drives alike."""
    with RewritingS3Proxy(store.url) as proxy:
        handle = store.daemon(env=store.env(AWS_ENDPOINT_URL=proxy.url, AWS_REGION="eu-west-3"))
        raw_put(stub_of(handle), drive_uri, "f.bin", b"signed", component="w")
        assert b"".join(Drive(drive_uri, endpoint=handle.endpoint).read_range("f.bin")) == b"signed"
        assert Drive(f"s3://{BUCKET}/", endpoint=handle.endpoint).list() == [PREFIX.rstrip("/")]  # an s3:// drive's
        handle.stop()
    regions = {re.search(r"Credential=\S+?/\d{8}/([^/]+)/s3/", signed).group(1) for signed in proxy.authorizations}
    assert regions == {"eu-west-3"}, "AWS_DEFAULT_REGION is us-east-1 there: AWS_REGION wins, as in the AWS CLI"


def test_a_read_cut_by_the_store_resumes_only_into_the_version_it_began(store, drive_uri):
    """The connection to the store drops mid-read and the file is replaced meanwhile: the daemon asks for the rest
    If-Match the version it began, and a store that ignores If-Match (as some gateways do) sent the new version's
    bytes after the old one's, with the CRC32C of that mix: read_range took them. It fails ABORTED, saying to read
    the file again."""
    old, new = os.urandom(3 * MIB), os.urandom(3 * MIB)
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/f.bin"

    def replace() -> None:  # as another daemon's put would, with the new version's own metadata
        store.client.put_object(Bucket=BUCKET, Key=key, Body=new, Metadata=dict(metadata, sha256=sha256_of(new)))

    with RewritingS3Proxy(store.url, drop=("If-Match",), cut_read=replace, cut_key="/w/f.bin") as proxy:
        handle = store.daemon(env=store.env(AWS_ENDPOINT_URL=proxy.url))
        stub = stub_of(handle)
        raw_put(stub, drive_uri, "f.bin", old, component="w")
        metadata = store.client.head_object(Bucket=BUCKET, Key=key)["Metadata"]
        with pytest.raises(StaleIndexError, match=r"'f.bin' of component 'w' in lit://\S+ was replaced"):
            b"".join(Drive(drive_uri, endpoint=handle.endpoint, retry_seconds=0).read_range("f.bin", 1, None))
        assert proxy.cut_reads == 1
        handle.stop()
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == new


def test_a_held_upload_keeps_its_multipart_upload_and_resumes_into_it(store, daemon_a, drive_uri):
    """The parts sent before a stream ended stay in the store; the unsent tail (less than a part) is sent again."""
    stub = stub_of(daemon_a)
    data = os.urandom(2 * PART_SIZE + 5 * MIB)
    header = drive_pb2.PutHeader(drive=drive_uri, path="held.bin", component="w", upload_id="s3-held", size=len(data))
    first = [drive_pb2.PutRequest(header=header), *(drive_pb2.PutRequest(data=data[i:i + MIB])
                                                     for i in range(0, 2 * PART_SIZE + 3 * MIB, MIB))]
    assert rpc_code(lambda: stub.Put(iter(first), timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT  # no finish
    status = stub.QueryWriteStatus(drive_pb2.QueryWriteStatusRequest(
        drive=drive_uri, component="w", upload_id="s3-held"), timeout=10)
    assert status.committed_size == 2 * PART_SIZE and not status.complete
    [upload] = [u for u in store.uploads() if u["Key"].endswith("/w/held.bin")]
    parts = store.client.list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])["Parts"]
    assert [p["Size"] for p in parts] == [PART_SIZE, PART_SIZE]
    header.write_offset = status.committed_size
    rest = [drive_pb2.PutRequest(header=header),
            *(drive_pb2.PutRequest(data=data[i:i + MIB]) for i in range(2 * PART_SIZE, len(data), MIB)),
            drive_pb2.PutRequest(finish=drive_pb2.PutFinish(sha256=sha256_of(data)))]
    [stored] = stub.Put(iter(rest), timeout=60).files
    assert (stored.size, stored.sha256) == (len(data), sha256_of(data))
    key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/held.bin"
    assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    assert store.client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"').endswith("-3")  # one upload
    assert not [u for u in store.uploads() if u["Key"].endswith("/w/held.bin")]


def test_a_resume_cut_while_it_takes_the_upload_over_leaves_it_held_until_it_expires(tmp_path: Path, drive_uri):
    """A resume takes its upload over from a stream still open on the daemon, whose last part is still on its way
    to the store: it waits for that part. A resume whose stream was cut meanwhile (its client's deadline, a store
    slow to answer) left the upload neither written nor held: never expired, its multipart upload listed live (so
    no sweep aborted it) and its id known to queries for as long as the daemon ran. Now the takeover runs to its
    end, and the upload is held as a cut stream's is, until it expires."""
    store = Store(tmp_path)
    try:
        handle = store.daemon("--upload-expiry", "2")
        stub = stub_of(handle)
        data = os.urandom(2 * PART_SIZE + MIB)
        # Duplicates allowed: the resume asks the store nothing before it takes the upload over.
        header = drive_pb2.PutHeader(drive=drive_uri, path="held.bin", component="w", upload_id="u", size=len(data),
                                     allow_duplicates=True)
        query = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, component="w", upload_id="u")
        second_part, end = threading.Event(), threading.Event()

        def open_stream() -> Iterator[drive_pb2.PutRequest]:  # broken on its client's side, still open here
            yield drive_pb2.PutRequest(header=header)
            for i in range(0, 2 * PART_SIZE, MIB):
                if i == PART_SIZE + MIB:
                    second_part.wait(30)
                yield drive_pb2.PutRequest(data=data[i:i + MIB])
            end.wait(30)

        first = stub.Put.future(open_stream(), timeout=60)
        try:
            assert wait_until(lambda: store.parts() == 1, timeout=20), "the first part never reached the store"
            store.moto.proc.send_signal(signal.SIGSTOP)  # the second part waits on the store
            try:
                second_part.set()
                assert wait_until(lambda: stub.QueryWriteStatus(query, timeout=10).committed_size == 2 * PART_SIZE,
                                  timeout=20)
                header.write_offset = 2 * PART_SIZE
                rest = [drive_pb2.PutRequest(header=header), drive_pb2.PutRequest(data=data[2 * PART_SIZE:]),
                        drive_pb2.PutRequest(finish=drive_pb2.PutFinish(sha256=sha256_of(data)))]
                assert rpc_code(lambda: stub.Put(iter(rest), timeout=2)) == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                store.moto.proc.send_signal(signal.SIGCONT)
        finally:
            end.set()
        assert first.exception(30).code() == grpc.StatusCode.INVALID_ARGUMENT  # it ended before its finish
        assert wait_until(lambda: not store.uploads(), timeout=20), store.uploads()
        assert rpc_code(lambda: stub.QueryWriteStatus(query, timeout=10)) == grpc.StatusCode.NOT_FOUND
        assert rpc_code(lambda: stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="held.bin"), timeout=10)) == \
            grpc.StatusCode.NOT_FOUND
        assert raw_put(stub, drive_uri, "held.bin", data, component="w").files[0].sha256 == sha256_of(data)
        assert raw_get(stub, drive_uri, "held.bin")[0][1] == data
    finally:
        store.close()


def test_a_resumed_upload_is_stored_with_the_generation_of_its_commit(store, daemon_a, drive_uri):
    """A big file's generation (and so its modified time) is its commit's, as on a local disk: one held for a resume
    while another version of its path was put is newer than that version, not dated from its upload's start."""
    stub = stub_of(daemon_a)
    data = os.urandom(PART_SIZE + MIB)
    header = drive_pb2.PutHeader(drive=drive_uri, path="gen.bin", component="w", upload_id="s3-gen", size=len(data))
    first = [drive_pb2.PutRequest(header=header), *(drive_pb2.PutRequest(data=data[i:i + MIB])
                                                     for i in range(0, PART_SIZE, MIB))]
    assert rpc_code(lambda: stub.Put(iter(first), timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT  # no finish: held
    [between] = stub.Put(put_messages(drive_uri, "gen.bin", b"put meanwhile", component="w"), timeout=30).files
    header.write_offset = PART_SIZE
    rest = [drive_pb2.PutRequest(header=header), drive_pb2.PutRequest(data=data[PART_SIZE:]),
            drive_pb2.PutRequest(finish=drive_pb2.PutFinish(sha256=sha256_of(data)))]
    [stored] = stub.Put(iter(rest), timeout=60).files
    assert stored.generation > between.generation
    stat = stub.Stat(drive_pb2.StatRequest(drive=drive_uri, path="gen.bin"), timeout=10)
    [listed] = stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=10).entries
    assert stat.generation == listed.generation == stored.generation and stat.modified == stored.modified
    assert (stat.size, stat.sha256) == (len(data), sha256_of(data))


def test_a_put_cut_midway_completes_through_resume(store, daemon_a, drive_uri, tmp_path):
    size = 3 * PART_SIZE + 5 * MIB
    digest = write_random_file(tmp_path / "r.bin", size)
    with CuttingProxy(daemon_a.endpoint) as proxy:
        proxy.cut_after("up", 20 * MIB)
        [stored] = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=proxy.endpoint).put("r.bin")
        assert proxy.cuts_made == 1
    assert stored.sha256 == digest
    received = [line["bytes"] for line in map(json.loads, daemon_a.log().splitlines()[1:])
                if line.get("method") == "Put" and line.get("drive") == drive_uri]
    assert len(received) == 2 and size <= sum(received) <= size + PART_SIZE  # the unsent tail, sent again
    assert not [u for u in store.uploads() if drive_uri.removeprefix("lit://") in u["Key"]]


def test_sigkill_mid_put_keeps_the_previous_version_and_the_next_start_aborts_the_upload(
    tmp_path: Path, drive_uri: str
):
    store = Store(tmp_path)
    try:
        victim = store.daemon()
        stub = stub_of(victim)
        raw_put(stub, drive_uri, "v.bin", b"version 1", component="w")
        put = StalledPut(stub, drive_uri, "v.bin", 20 * MIB)
        try:
            assert wait_until(lambda: len(store.uploads()) == 1, timeout=30), "the upload never started"
            victim.stop(signal.SIGKILL)
        finally:
            put.release.set()
        key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/v.bin"
        assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"version 1"
        assert len(store.uploads()) == 1  # orphaned: nobody aborted it
        successor = store.daemon("--upload-expiry", "1")
        assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
        [(info, got)] = raw_get(stub_of(successor), drive_uri, "v.bin")
        assert got == b"version 1" and info.sha256 == sha256_of(b"version 1")
        assert "aborting an abandoned upload" in successor.log()
    finally:
        store.close()


def test_an_upload_with_no_part_yet_is_swept_only_once_two_sweeps_found_it_so(tmp_path: Path, drive_uri: str):
    """moto_server dates every multipart upload 2010-11-10, so a sweep that came between another daemon's
    CreateMultipartUpload and its first part found an upload with no part, older than --upload-expiry, and aborted it
    under its daemon (the put's part then failed 500 in moto, "read of closed file", and the put started over: seen in
    a CI run). An upload with no part is aborted once two sweeps, an --upload-expiry apart, find it so."""
    store = Store(tmp_path)
    try:
        key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/fresh.bin"
        store.client.create_multipart_upload(Bucket=BUCKET, Key=key)  # as another daemon's put, before its first part
        sweeper = store.daemon("--upload-expiry", "3")
        time.sleep(1.5)  # the sweep at start-up has looked (it logs nothing that finds no abandoned upload)
        assert [u["Key"] for u in store.uploads()] == [key], "swept at the first sweep that saw it"
        assert wait_until(lambda: not store.uploads(), timeout=20), store.uploads()
        assert "aborting an abandoned upload" in sweeper.log()
    finally:
        store.close()


def test_a_live_upload_whose_client_is_slow_is_not_swept_by_another_daemon(tmp_path: Path, drive_uri: str):
    """Every daemon sweeps the uploads that no part was added to for --upload-expiry, as a daemon killed mid-put
    leaves them; another daemon's upload, live but whose client sends a part slower than that, was aborted under
    it (the put failed UNAVAILABLE, where one daemon alone stores it). Each daemon now keeps a list of its live
    uploads in the store, rewritten while it has some, and the sweeps pass over those listed recently; those of a
    daemon killed mid-put are still swept."""
    store = Store(tmp_path)
    try:
        # 3 s: S3's times are in whole seconds, so a list rewritten every second looks up to 2 s old, and one
        # rewrite late by a second (a busy machine) leaves it fresh
        writer, sweeper = store.daemon("--upload-expiry", "3"), store.daemon("--upload-expiry", "3")
        put = StalledPut(stub_of(writer), drive_uri, "slow.bin", PART_SIZE + MIB, finish=True)
        try:
            assert wait_until(lambda: store.parts() == 1, timeout=30), "the first part was never stored"
            time.sleep(8)  # the client sends nothing: the sweeps, every 3 s, find no part for longer than that
        finally:
            put.release.set()
        [stored] = put.call.result(timeout=60).files
        assert stored.sha256 == sha256_of(put.data)
        [(_, got)] = raw_get(stub_of(sweeper), drive_uri, "slow.bin")
        assert got == put.data and not store.uploads()
        assert "aborting an abandoned upload" not in sweeper.log() + writer.log()
        # A daemon killed mid-put lists its upload no more: the sweep aborts it once the list is older.
        killed = StalledPut(stub_of(writer), drive_uri, "killed.bin", PART_SIZE + MIB)
        try:
            assert wait_until(lambda: store.parts() == 1, timeout=30), "the first part was never stored"
            time.sleep(1)  # listed live
            writer.stop(signal.SIGKILL)
        finally:
            killed.release.set()
        assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
        assert "aborting an abandoned upload" in sweeper.log()
        assert raw_get(stub_of(sweeper), drive_uri, "slow.bin")[0][1] == put.data
    finally:
        store.close()


def test_a_sweep_skips_an_upload_another_sweep_aborted_meanwhile(store, caplog):
    """Replicas sweep the same uploads: one that another sweep aborted between this sweep's ListMultipartUploads
    and its ListParts was answered NoSuchUpload, which failed the whole round (logged as an upload "given up" by
    nobody) and left the round's other abandoned uploads for the next; one aborted between the listing and this
    sweep's own abort was logged as a failed abort. An upload gone meanwhile is no longer abandoned: the round goes
    on, warning of nothing."""
    prefix = "sweeprace/"
    keys = {name: f"{prefix}d/w/{name}.bin" for name in ("gone", "raced", "left")}
    for key in keys.values():  # as a killed daemon's puts leave them, before their first part
        store.client.create_multipart_upload(Bucket=BUCKET, Key=key)

    def abort_first(name: str, params: dict, **_: object) -> None:
        """Another replica's sweep aborts the upload of `name` just before this sweep's call on it."""
        if params["Key"] == keys[name]:
            store.client.abort_multipart_upload(Bucket=BUCKET, Key=params["Key"], UploadId=params["UploadId"])

    async def sweep_twice() -> tuple[int, int]:
        backend = S3Backend(BUCKET, prefix, upload_expiry=1)
        try:
            first = await backend.sweep()  # finds them with no part: abandoned once the next sweep does too
            events = backend.client.meta.events
            events.register("provide-client-params.s3.ListParts", functools.partial(abort_first, "gone"))
            events.register("provide-client-params.s3.AbortMultipartUpload", functools.partial(abort_first, "raced"))
            return first, await backend.sweep()
        finally:
            await backend.close()

    with aws_env(store.url), caplog.at_level("INFO", logger="drived"):
        swept = asyncio.run(sweep_twice())
    assert swept == (0, 2), swept  # "raced" and "left": "gone" was no longer abandoned at the second
    assert not [u for u in store.uploads() if u["Key"].startswith(prefix)], store.uploads()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    aborted = sorted(r.fields["key"] for r in caplog.records if r.getMessage() == "aborting an abandoned upload")
    assert aborted == ["d/w/left.bin", "d/w/raced.bin"], aborted


def test_a_sweeps_failure_on_one_abandoned_upload_holds_up_none_of_the_others(store, caplog):
    """A sweep aborted the abandoned uploads one after another, and a failure of the store on one of them (the look
    at its key's checksum objects after the abort) failed the whole round: the round's uploads after it waited one
    more --upload-expiry. Now each fails alone (logged, its checksum objects swept again by the next round), and a
    few are handled at once (SWEEP_AT_ONCE at most)."""
    prefix = "sweepfail/"
    names = [f"{i:02}" for i in range(12)]
    for name in names:  # their checksum objects, older than the expiry (by the store's clock) once swept
        store.client.put_object(Bucket=BUCKET, Key=f"{prefix}~checksums/d/w/{name}.bin/c", Body=b"crc")

    def checksum_objects_expired() -> bool:
        head = store.client.head_object(Bucket=BUCKET, Key=f"{prefix}~checksums/d/w/{names[-1]}.bin/c")
        now = email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (now - head["LastModified"]).total_seconds() >= 1

    assert wait_until(checksum_objects_expired, timeout=10)
    for name in names:  # as a killed daemon's puts leave them, before their first part
        store.client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}d/w/{name}.bin")
    in_flight = {"now": 0, "most": 0}
    lock = threading.Lock()

    def begun(params: dict, model: botocore.model.OperationModel, **_: object) -> None:
        with lock:
            in_flight["now"] += 1
            in_flight["most"] = max(in_flight["most"], in_flight["now"])
        if model.name == "HeadObject" and params["Key"].endswith("/00.bin"):  # the store fails the look at its key
            in_flight["now"] -= 1
            raise botocore.exceptions.ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}}, "HeadObject")

    def ended(**_: object) -> None:
        with lock:
            in_flight["now"] -= 1

    async def sweep_until_aborted() -> tuple[int, int]:
        backend = S3Backend(BUCKET, prefix, upload_expiry=1)
        try:
            events = backend.client.meta.events
            events.register("before-parameter-build.s3.AbortMultipartUpload", begun)
            events.register("after-call.s3.AbortMultipartUpload", ended)
            events.register("before-parameter-build.s3.HeadObject", begun)
            events.register("after-call.s3.HeadObject", ended)
            while not (aborted := await backend.sweep()):  # once seen partless by a sweep and again a second later
                await asyncio.sleep(0.2)
            events.unregister("before-parameter-build.s3.HeadObject", begun)
            events.unregister("after-call.s3.HeadObject", ended)
            return aborted, await backend.sweep()
        finally:
            await backend.close()

    with aws_env(store.url), caplog.at_level("INFO", logger="drived"):
        swept = asyncio.run(sweep_until_aborted())
    assert swept == (12, 0), swept
    assert not [u for u in store.uploads() if u["Key"].startswith(prefix)], store.uploads()
    assert store.object_keys(prefix) == []  # the first upload's checksum object too, by the second round
    warnings = [(r.getMessage(), r.fields["key"]) for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [("sweeping the checksum objects of an aborted upload failed; the next sweep retries",
                         "d/w/00.bin")], warnings
    assert 1 < in_flight["most"] <= SWEEP_AT_ONCE, in_flight


def test_checksum_objects_left_past_the_bound_are_logged_once_a_sweep_and_counted(store, caplog, monkeypatch):
    """Past LEFTOVERS_KEPT (a store failing every delete for long while puts go on), each checksum object left in
    the store logged a warning of its own: at thousands of puts a second, thousands of lines a second. The first one
    a sweep period is logged, the sweep logs how many more were left, and what is remembered stays bounded."""
    monkeypatch.setattr(s3_backend, "LEFTOVERS_KEPT", 2)
    prefix = "leftbound/"
    names = [f"{i}-c" for i in range(6)]
    for name in names:  # checksum objects no object at their key uses
        store.client.put_object(Bucket=BUCKET, Key=f"{prefix}~checksums/d/w/f.bin/{name}", Body=b"crc")
    failing = threading.Event()

    def fails(params: dict, **_: object) -> None:
        if failing.is_set() and "/~checksums/" in params["Key"]:
            raise botocore.exceptions.ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}}, "DeleteObject")

    async def forget_then_sweep() -> None:
        backend = S3Backend(BUCKET, prefix, upload_expiry=60)
        try:
            backend.client.meta.events.register("before-parameter-build.s3.DeleteObject", fails)
            failing.set()
            for name in names:
                await backend.forget_unused_checksums("d/w/f.bin", name)
            await backend.sweep()  # the two remembered fail again, and are remembered again
            failing.clear()
            await backend.sweep()
        finally:
            await backend.close()

    with aws_env(store.url), caplog.at_level("INFO", logger="drived"):
        asyncio.run(forget_then_sweep())
    warnings = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        ("a checksum object whose delete failed is left in the store",
         {"object": f"s3://{BUCKET}/{prefix}~checksums/d/w/f.bin/{names[2]}"}),
        ("more checksum objects whose delete failed were left in the store since", {"count": 3}),
    ], warnings
    left = store.object_keys(f"{prefix}~checksums/")  # the remembered ones deleted once the store answered
    assert left == [f"{prefix}~checksums/d/w/f.bin/{name}" for name in names[2:]], left


def test_a_checksum_object_whose_delete_failed_is_deleted_by_the_next_sweep(tmp_path: Path, drive_uri: str):
    """A checksum object whose delete the store failed, after its upload was aborted or after the commit that
    replaced its version, was left in the store for good: the sweep looks at the checksum objects of the keys whose
    uploads it aborts, and no upload of this key was left. The daemon remembers it, and its next sweep deletes it."""
    store = Store(tmp_path)
    failing = threading.Event()

    def fails(method: str, path: str) -> bool:  # the store fails big files' commits and checksum objects' deletes
        return failing.is_set() and ((method == "POST" and "uploadId=" in path)
                                     or (method == "DELETE" and f"/{PREFIX}~checksums/" in path))

    try:
        with RewritingS3Proxy(store.url, slow_down=fails) as proxy:
            handle = store.daemon("--upload-expiry", "2",
                                  env=store.env(AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="1"))
            stub = stub_of(handle)
            checksums = f"{PREFIX}~checksums/{drive_uri.removeprefix('lit://')}/w/f.bin/"
            raw_put(stub, drive_uri, "f.bin", os.urandom(PART_SIZE + 1), component="w")
            [first] = store.object_keys(checksums)
            failing.set()
            with pytest.raises(grpc.RpcError) as failed:  # its upload is aborted; its checksum object's delete fails
                raw_put(stub, drive_uri, "f.bin", os.urandom(PART_SIZE + 1), component="w")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
            assert f"S3 endpoint {proxy.url} throttles" in failed.value.details(), failed.value.details()
            raw_put(stub, drive_uri, "f.bin", b"small now", component="w")  # the first's checksum object stays
            left = store.object_keys(checksums)
            assert first in left and len(left) == 2, left
            failing.clear()
            assert wait_until(lambda: not store.object_keys(checksums), timeout=10), store.object_keys(checksums)
            assert [(info.sha256, got) for info, got in raw_get(stub, drive_uri, "f.bin")] == [
                (sha256_of(b"small now"), b"small now")]
            assert not store.uploads()
    finally:
        store.close()


def test_the_store_going_away_is_unavailable_naming_it_and_the_daemon_recovers(tmp_path: Path, drive_uri: str):
    store = Store(tmp_path)
    try:
        handle = store.daemon(env=store.env(AWS_MAX_ATTEMPTS="2"))
        stub = stub_of(handle)
        raw_put(stub, drive_uri, "before.txt", b"before", component="w")
        store.moto.stop()
        where = store.url.removeprefix("http://")
        for call in (
            lambda: raw_put(stub, drive_uri, "during.txt", b"during", component="w"),
            lambda: raw_get(stub, drive_uri, "before.txt"),
            lambda: stub.List(drive_pb2.ListRequest(drive=drive_uri, path=".")),
        ):
            with pytest.raises(grpc.RpcError) as down:
                call()
                raise AssertionError("the call succeeded with the store down")
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE and where in down.value.details()
            assert down.value.details().startswith("drived: store failed: "), down.value.details()
        # The same endpoint comes back (moto keeps nothing: the bucket is made again, as an operator would).
        store.moto = MotoServer(tmp_path, port=store.moto.port)
        s3_client(store.url).create_bucket(Bucket=BUCKET)
        raw_put(stub, drive_uri, "after.txt", b"after", component="w")
        [(_, got)] = raw_get(stub, drive_uri, "after.txt")
        assert got == b"after"
    finally:
        store.close()


@pytest.mark.parametrize("setting", ["--storage", "DRIVED_STORAGE"])
def test_a_missing_bucket_stops_the_start_up_naming_it(tmp_path: Path, setting):
    """Named as the setting was given: DRIVED_STORAGE from the environment (a container's), not a flag never given."""
    store = Store(tmp_path)
    try:
        storage = "s3://no-such-bucket/x/"
        flags, env = (("--storage", storage), {}) if setting.startswith("--") else ((), {setting: storage})
        handle = start_daemon(tmp_path, *flags, env={**store.env(), **env}, wait=False)
        assert handle.proc.wait(30) == 1
        assert f"drived: {setting}: the S3 bucket 'no-such-bucket' does not exist" in handle.log(), handle.log()
        assert "create it" in handle.log() and "Traceback" not in handle.log(), handle.log()
    finally:
        store.close()


# Python for `start_daemon(before=...)`: how long the start-up waits for the store's answer to its bucket check (10 s)
# lowered, for tests whose store does not answer.
SHORT_START_CHECK = "import drived.backends.s3 as m; m.START_CHECK_SECONDS = 3.0"


def test_a_store_that_does_not_answer_at_start_up_is_served_saying_so_and_used_once_back(tmp_path: Path, drive_uri):
    """A store that takes connections and never answers (a hung gateway, a stopped MinIO) held the start-up in its
    bucket check for boto3's three tries of 60 s each, serving nothing and logging nothing: a liveness probe killed
    such a daemon first, again and again, with no word of why."""
    store = Store(tmp_path)
    try:
        store.moto.proc.send_signal(signal.SIGSTOP)
        try:
            handle = store.daemon(before=SHORT_START_CHECK)  # waits 20 s at most for SERVING
            warned = [line for line in handle.log().splitlines() if "storage not usable at start-up" in line]
            assert warned and store.url in warned[0], handle.log()
        finally:
            store.moto.proc.send_signal(signal.SIGCONT)
        stub = stub_of(handle)
        raw_put(stub, drive_uri, "p.txt", b"p", component="w")
        assert raw_get(stub, drive_uri, "p.txt")[0][1] == b"p"
    finally:
        store.close()


def test_a_sighup_while_the_daemon_starts_does_not_end_it(tmp_path: Path):
    """SIGHUP (read the token and TLS files again) ended a daemon that did not serve yet: its handler comes with
    serving, and a start may take seconds (here a store that does not answer: 3 s)."""
    store = Store(tmp_path)
    try:
        store.moto.proc.send_signal(signal.SIGSTOP)
        try:
            handle = start_daemon(tmp_path, "--storage", STORAGE, env=store.env(), wait=False,
                                  before=SHORT_START_CHECK)
            store.daemons.append(handle)
            assert wait_until(lambda: '"file descriptors"' in handle.log(), 20), handle.log()  # started, not serving
            handle.proc.send_signal(signal.SIGHUP)
            assert '"event": "serving"' not in handle.log(), "the SIGHUP came once the daemon served"
            wait_serving(handle)
            assert handle.proc.poll() is None
        finally:
            store.moto.proc.send_signal(signal.SIGCONT)
    finally:
        store.close()


# Python for `start_daemon(before=...)`: what the stop waits for the store, once no call is left to serve, lowered.
SHORT_CLOSE = "import drived.server as s; s.CLOSE_SECONDS = 1.0"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_start_up_waits_on_a_store_that_does_not_answer_ends_it_soon(tmp_path: Path, sig):
    """A Ctrl-C while the start-up's bucket check waited on a store that takes connections and never answers
    waited for that check's thread at the process's exit: boto3's three tries of 60 s (178 s here)."""
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, answers nothing
    with silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        handle = start_daemon(tmp_path, "--storage", STORAGE, env={**AWS_ENV, "AWS_ENDPOINT_URL": url}, wait=False,
                              before=SHORT_CLOSE)
        try:
            silent.settimeout(20)
            checking, _ = silent.accept()  # the bucket check's connection
            with checking:
                handle.proc.send_signal(sig)
                assert handle.proc.wait(30) == 0, handle.log()
        finally:
            handle.stop(signal.SIGKILL)
    log = handle.log()
    assert "Traceback" not in log and "stopping before serving" in log, log
    assert "S3 did not answer: the stop gives up waiting for it" in log and '"event": "stopped"' in log, log


# Python for `start_daemon(before=...)`: a small file's commit waits, before it sends its PutObject, while the file
# PAUSE exists (having made PAUSE.reached); and what the stop waits for the store is lowered.
PAUSED_SMALL_COMMITS = SHORT_CLOSE + """
import asyncio, os
from drived.backends import s3

put_small = s3.S3Backend.put_small
async def put_small_once_resumed(self, *args):
    open({pause!r} + ".reached", "w").close()
    while os.path.exists({pause!r}):
        await asyncio.sleep(0.01)
    return await put_small(self, *args)
s3.S3Backend.put_small = put_small_once_resumed
"""


def test_a_stop_with_a_store_that_does_not_answer_gives_it_up_after_the_grace_period(tmp_path: Path, drive_uri: str):
    """A stop whose store took requests and never answered waited on it for boto3's tries (3 of 60 s each): a
    commit under way at the grace period's end, then the abort of each held upload (one: 240 s here), where a
    kill comes 10 s after the grace period (deploy/k8s). It gives the store up CLOSE_SECONDS after the calls
    ended, saying so; the store keeps nothing half made, and a sweep aborts the upload left behind."""
    store = Store(tmp_path)
    pause = tmp_path / "pause"
    try:
        handle = store.daemon("--grace-period", "1", before=PAUSED_SMALL_COMMITS.format(pause=str(pause)))
        stub = stub_of(handle)
        held = os.urandom(PART_SIZE + MIB)  # a part in the store, and a multipart upload to abort
        header = drive_pb2.PutHeader(drive=drive_uri, path="held.bin", component="w", upload_id="u", size=len(held))
        cut = [drive_pb2.PutRequest(header=header), *(drive_pb2.PutRequest(data=held[i:i + MIB])
                                                       for i in range(0, len(held), MIB))]
        assert rpc_code(lambda: stub.Put(iter(cut), timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT  # no finish
        assert len(store.uploads()) == 1
        small = b"committed whole or not at all"
        pause.touch()
        committing = stub.Put.future(put_messages(drive_uri, "small.bin", small, component="w"), timeout=120)
        assert wait_until((tmp_path / "pause.reached").exists, timeout=30), handle.log()
        store.moto.proc.send_signal(signal.SIGSTOP)
        try:
            pause.unlink()  # its PutObject waits on the store
            handle.proc.send_signal(signal.SIGTERM)
            assert handle.proc.wait(30) == 0, handle.log()
        finally:
            store.moto.proc.send_signal(signal.SIGCONT)
        assert committing.exception().code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        gave_up = [line for line in handle.log().splitlines() if "the stop gives up waiting for it" in line]
        assert gave_up and '"calls": 1' in gave_up[0], handle.log()
        key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/w/small.bin"
        if key in store.object_keys():
            assert store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == small
        store.daemon("--upload-expiry", "1")
        assert wait_until(lambda: not store.uploads(), timeout=30), store.uploads()
    finally:
        store.close()


def test_refused_access_is_permission_denied(tmp_path: Path, drive_uri: str):
    denying = {"INITIAL_NO_AUTH_ACTION_COUNT": "1"}  # moto checks credentials after the first request
    with tempfile.TemporaryDirectory() as work, MotoServer(Path(work), env=denying) as moto:
        s3_client(moto.url).create_bucket(Bucket=BUCKET)  # the one request moto lets through
        handle = start_daemon(tmp_path, "--storage", STORAGE, env={**AWS_ENV, "AWS_ENDPOINT_URL": moto.url})
        try:
            stub = stub_of(handle)
            with pytest.raises(grpc.RpcError) as denied:
                raw_put(stub, drive_uri, "p.txt", b"p", component="w")
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and BUCKET in denied.value.details()
            assert rpc_code(lambda: stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."))) == \
                grpc.StatusCode.PERMISSION_DENIED
        finally:
            handle.stop()


def test_s3_drives_and_mount_keep_working_beside_storage(store, daemon_a, tmp_path):
    store.client.create_bucket(Bucket="datasets")
    for i in range(3):
        store.client.put_object(Bucket="datasets", Key=f"set/{i}.txt", Body=f"object {i}".encode())
    data = Drive("s3://datasets/set/", root_folder=tmp_path, endpoint=daemon_a.endpoint)
    assert data.list(".") == ["0.txt", "1.txt", "2.txt"]
    assert data.get("1.txt").read_bytes() == b"object 1"
    store.client.put_object(Bucket="datasets", Key="set/3.txt", Body=b"object 3")
    assert data.mount().objects == 4 and data.list(".")[-1] == "3.txt"


def test_stalled_uploads_hold_at_most_the_parts_room_and_the_others_wait_for_it(store, drive_uri, tmp_path):
    """What uploads to the store keep in memory is bounded over all of them (PARTS_IN_MEMORY parts), whatever their
    clients do: uploads whose clients stall keep their part's room, every other upload waits for room before its
    next part without reading more of its stream, and a put that waited completes once the stalled ones end."""
    handle = store.daemon("--max-streams-per-peer", "400")
    pid = handle.proc.pid
    (tmp_path / "warm.bin").write_bytes(os.urandom(16 * MIB))
    drive = Drive(drive_uri, endpoint=handle.endpoint, root_folder=str(tmp_path))
    drive.put("warm.bin")
    drive.get("warm.bin", overwrite=True)  # the daemon's buffers and threads are up: its resting size
    baseline = rss_mib(pid)
    reset_peak_rss(pid)
    chunk = os.urandom(MIB)
    held = PART_SIZE - MIB // 2  # each stalled upload sends a part's worth but half a chunk, so sends no part

    def first_messages(i: int) -> list:
        header = drive_pb2.PutHeader(drive=drive_uri, path=f"stalled/{i}.bin")
        return [drive_pb2.PutRequest(header=header), *[chunk] * (held // MIB), chunk[:held % MIB]]

    waiting = 80
    count = PARTS_IN_MEMORY + waiting
    expected = write_random_file(tmp_path / "big.bin", 3 * PART_SIZE)
    with StalledPuts(handle.endpoint, count, first_messages, all_sent=False) as stalled:
        assert wait_until(lambda: handle.open_requests("Put") == count, 60), stalled.refused()
        readings = [rss_mib(pid)]

        def settled() -> bool:  # the stalled streams sent what the daemon takes from them
            readings.append(rss_mib(pid))
            return readings[-1] - readings[-2] < 2
        assert wait_until(settled, 60, interval=1.0), readings
        put = Background(lambda: drive.put("big.bin"))
        put.start()
        assert wait_until(lambda: handle.open_requests("Put") == count + 1, 30)
        peak = peak_rss_mib(pid)
        # Room for the parts, the free buffers kept for reuse, and for each waiting stream a message in its write
        # and gRPC's window of what its client sent (~4 MiB); about 8 MiB more each when stalled uploads take no room.
        bound = baseline + (PARTS_IN_MEMORY + MAX_PARTS_IN_FLIGHT) * PART_SIZE / MIB + waiting * 5 + count * 0.25 + 24
        print(f"{count} stalled uploads of {held / MIB:.1f} MiB: peak {peak:.0f} MiB "
              f"(baseline {baseline:.0f} MiB, bound {bound:.0f} MiB)")
        assert peak <= bound, f"{count} stalled uploads took the daemon to {peak:.0f} MiB (bound {bound:.0f} MiB)"
        assert put.is_alive(), "a put completed while stalled uploads held all the room"
    put.join_checked(120)  # the stalled streams ended (their clients went away): their room went to the put
    assert drive.stat("big.bin").sha256 == expected
    drive.get("big.bin", to=tmp_path / "back.bin")
    assert file_sha256(tmp_path / "back.bin") == expected
    assert drive.list("stalled") == [], "nothing of the stalled uploads is stored"
    assert wait_until(lambda: not store.uploads(), 30), store.uploads()


async def _trickle(endpoint: str, drive_uri: str, count: int, first: bytes, trickled: asyncio.Event,
                   again: bool = False) -> list[grpc.aio.AioRpcError]:
    """`count` puts that each send `first`, then a byte every 0.2 s until `trickled` is set; the errors of those
    the daemon ended before that. `again`: each put the daemon ends is followed by another, so that uploads keep
    wanting room until `trickled` is set."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = fast_stub(channel)

        async def requests(name: str):
            yield drive_pb2.PutRequest(header=drive_pb2.PutHeader(drive=drive_uri, path=f"trickle/{name}.bin"))
            yield first
            while not trickled.is_set():
                await asyncio.sleep(0.2)  # the client's pace: a byte now and then
                yield b"x"

        async def one(i: int) -> list[grpc.aio.AioRpcError]:
            ended: list[grpc.aio.AioRpcError] = []
            while True:
                try:
                    await stub.Put(requests(f"{i}-{len(ended)}"))
                except grpc.aio.AioRpcError as err:
                    if trickled.is_set():
                        return ended
                    ended.append(err)
                if not again:
                    return ended

        return [err for errors in await asyncio.gather(*(one(i) for i in range(count))) for err in errors]


def test_clients_that_trickle_bytes_cannot_keep_the_parts_room_from_others(store, drive_uri, tmp_path):
    """A part whose client kept it waiting, in all, longer than --stream-idle-timeout while other uploads wanted
    room ends its put UNAVAILABLE: clients that send a byte now and then (never idle for the idle check) cannot
    hold all the room for ever, and a put that waited for it completes."""
    handle = store.daemon("--stream-idle-timeout", "2")
    drive = Drive(drive_uri, endpoint=handle.endpoint, root_folder=str(tmp_path))
    loop = loop_thread().loop
    trickled = asyncio.Event()
    trickling = asyncio.run_coroutine_threadsafe(
        _trickle(handle.endpoint, drive_uri, PARTS_IN_MEMORY, os.urandom(2 * MIB), trickled), loop)
    try:
        assert wait_until(lambda: handle.open_requests("Put") == PARTS_IN_MEMORY, 30)
        expected = write_random_file(tmp_path / "big.bin", 3 * PART_SIZE)
        put = Background(lambda: drive.put("big.bin"))  # waits for room, which the trickling puts hold
        put.start()
        [stored] = put.join_checked(60)  # type: ignore[misc]
    finally:
        loop.call_soon_threadsafe(trickled.set)
    ended = trickling.result(60)
    assert ended, "no trickling put was ended, yet the put got room"
    for err in ended:
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "--stream-idle-timeout" in err.details(), err
    assert stored.sha256 == expected
    drive.get("big.bin", to=tmp_path / "back.bin")
    assert file_sha256(tmp_path / "back.bin") == expected
    assert drive.list("trickle") == [], "nothing of the trickling puts is stored"
    assert wait_until(lambda: not store.uploads(), 30), store.uploads()


def _put_streams(handle: DaemonHandle, path: str) -> list[dict]:
    """The request log lines of the daemon's Put streams of `path` (of the files under it when it ends in "/"),
    in the order they ended."""
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    puts = [line for line in lines if line.get("method") == "Put"]
    if path.endswith("/"):
        return [line for line in puts if line.get("path", "").startswith(path)]
    return [line for line in puts if line.get("path") == path]


@pytest.fixture(scope="module")
def quick_fill(store: Store) -> DaemonHandle:
    """A daemon that lets a client keep its part waiting 2 s while other uploads want room."""
    return store.daemon("--stream-idle-timeout", "2")


def _set_when(predicate: Callable[[], bool]) -> threading.Event:
    """An event set once `predicate` holds (polled in a thread of its own for up to 30 s)."""
    event = threading.Event()
    threading.Thread(target=lambda: wait_until(predicate, 30) and event.set(), daemon=True).start()
    return event


def _byte_by_byte(sent: bytearray, most: int, until: threading.Event | None = None
                  ) -> Iterator[drive_pb2.PutRequest]:
    """Up to `most` data messages of a byte each, one every 0.2 s (never idle), until `until` is set; each byte
    sent is added to `sent`."""
    for _ in range(most):
        if until is not None and until.is_set():
            return
        time.sleep(0.2)
        sent.append(ord("x"))
        yield drive_pb2.PutRequest(data=b"x")


def test_a_slow_client_is_charged_only_its_waits_while_others_want_room(store, quick_fill, drive_uri):
    """Only the time a client keeps its part waiting while other uploads want room counts against it: a client
    that trickled bytes for longer than --stream-idle-timeout while no upload waited is not ended when others
    start waiting, and completes its put when it sends the rest within the timeout."""
    handle = quick_fill
    assert wait_until(lambda: handle.open_requests("Put") == 0, 30), "puts of another test are still open"
    loop = loop_thread().loop
    trickled = asyncio.Event()
    trickling: list[concurrent.futures.Future[list[grpc.aio.AioRpcError]]] = []
    data = bytearray(os.urandom(2 * MIB))  # past the first MiB: its part takes room

    def others_open() -> bool:  # all the room taken, and uploads waiting: two while this one holds its part
        return handle.open_requests("Put") >= PARTS_IN_MEMORY + 2

    def requests() -> Iterator[drive_pb2.PutRequest]:
        yield drive_pb2.PutRequest(header=drive_pb2.PutHeader(drive=drive_uri, path="slow.bin"))
        yield drive_pb2.PutRequest(data=bytes(data))
        yield from _byte_by_byte(data, 15)  # 3 s while no upload waits: longer than the timeout
        trickling.append(asyncio.run_coroutine_threadsafe(
            _trickle(handle.endpoint, drive_uri, PARTS_IN_MEMORY + 1, os.urandom(2 * MIB), trickled), loop))
        yield from _byte_by_byte(data, 150, until=_set_when(others_open))
        yield from _byte_by_byte(data, 5)  # 1 s while others want room: less than the timeout
        yield drive_pb2.PutRequest(finish=drive_pb2.PutFinish(sha256=sha256_of(data)))

    def others_ended() -> bool:  # for keeping their parts waiting while others wanted room
        lines = _put_streams(handle, "trickle/")
        return any(line["drive"] == drive_uri and line["status"] == "UNAVAILABLE" for line in lines)

    try:
        answer = stub_of(handle).Put(requests(), timeout=60)
        assert wait_until(others_ended, 30), "no other upload waited for room, so the slow put was never at risk"
    finally:
        loop.call_soon_threadsafe(trickled.set)
    [stored] = answer.files
    assert stored.sha256 == sha256_of(data) and stored.size == len(data)
    for err in trickling[0].result(60):
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "--stream-idle-timeout" in err.details(), err
    assert [line["status"] for line in _put_streams(handle, "slow.bin")] == ["OK"]
    assert not [key for key in store.object_keys() if "/trickle/" in key], "nothing of the other puts is stored"
    assert wait_until(lambda: not store.uploads(), 30), store.uploads()


def test_a_stream_ended_for_its_parts_room_logs_the_bytes_the_daemon_took(store, quick_fill, drive_uri):
    """The chunk that the fill-time rule refuses is not taken: the ended stream's request log counts the bytes
    before it, and nothing of the put is stored."""
    handle = quick_fill
    assert wait_until(lambda: handle.open_requests("Put") == 0, 30), "puts of another test are still open"
    loop = loop_thread().loop
    trickled, ended = asyncio.Event(), threading.Event()
    wanting: list[concurrent.futures.Future[list[grpc.aio.AioRpcError]]] = []
    sent = bytearray(os.urandom(2 * MIB))  # past the first MiB: its part takes room

    def others_open() -> bool:  # all the room taken, and more uploads waiting than the others' parts ended at once
        return handle.open_requests("Put") >= 2 * PARTS_IN_MEMORY + 1

    def requests() -> Iterator[drive_pb2.PutRequest]:
        yield drive_pb2.PutRequest(header=drive_pb2.PutHeader(drive=drive_uri, path="refused.bin"))
        yield drive_pb2.PutRequest(data=bytes(sent))
        yield from _byte_by_byte(sent, 3)  # its part has room before the others come
        wanting.append(asyncio.run_coroutine_threadsafe(  # uploads wait for room all along
            _trickle(handle.endpoint, drive_uri, 2 * PARTS_IN_MEMORY, os.urandom(2 * MIB), trickled), loop))
        yield from _byte_by_byte(sent, 150, until=_set_when(others_open))
        yield from _byte_by_byte(sent, 5)  # 1 s while others want room: taken
        time.sleep(1.5)  # not idle, but 2.5 s in all while others want room: the next chunk is refused
        yield drive_pb2.PutRequest(data=os.urandom(100_000))
        ended.wait(30)

    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(handle).Put(requests(), timeout=60)
    finally:
        ended.set()
        loop.call_soon_threadsafe(trickled.set)
    wanting[0].result(60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert refused.value.details().startswith(
        f"drived: this put of 'refused.bin' of component 'default' in {drive_uri} was ended: its client took more than"
    ), refused.value
    assert "while other uploads waited for the memory it holds" in refused.value.details(), refused.value
    [line] = _put_streams(handle, "refused.bin")
    assert (line["status"], line["bytes"]) == ("UNAVAILABLE", len(sent)), line
    assert not [key for key in store.object_keys() if key.endswith("/refused.bin")], "the refused put is stored"
    assert wait_until(lambda: not store.uploads(), 30), store.uploads()


def test_a_short_last_part_keeps_its_part_sized_buffer_for_the_next_part(store):
    """A multipart file's last part, shorter than a part, is sent from a copy of its bytes: the part-sized buffer
    it filled is kept for reuse (beside the first part's), so the next upload's part is not mapped fresh."""
    data = os.urandom(PART_SIZE + MIB)

    async def put() -> int:
        backend = S3Backend(BUCKET, "unit/")
        buffers = backend.part_buffers
        try:
            assert buffers.room_now()  # another upload's part holds room throughout: free buffers are kept
            upload = await backend.start_upload("short-last.bin")
            await upload.write(data)
            await upload.commit(ClientChecksums(sha256_of(data), None), len(data))
            kept = len(buffers._free)
            buffers.give_back(None)
            return kept
        finally:
            await backend.close()

    with aws_env(store.url):
        kept = asyncio.run(put())
    assert kept == 2, f"{kept} part-sized buffers kept after a put of two parts"
    stored = store.client.get_object(Bucket=BUCKET, Key="unit/short-last.bin")
    assert stored["ETag"].endswith('-2"'), stored  # a multipart object of two parts
    assert stored["Body"].read() == data
    assert not store.uploads()


@pytest.mark.parametrize("max_held_uploads", [1000, 0])
def test_a_slow_client_ended_for_its_parts_room_resumes_after_the_parts_it_sent(
    store, drive_uri, tmp_path, max_held_uploads, monkeypatch
):
    """A client too slow to fill a part within --stream-idle-timeout, while other uploads keep wanting room, has its
    stream ended UNAVAILABLE naming the flag; its upload is held with the parts it sent, as a cut stream's is. The
    client resumes from the end of its last part sent, and the file completes with those parts sent once. Held
    uploads' bounds apply as usual: past --max-held-uploads it is removed, and the file is sent again whole."""
    monkeypatch.setenv("DRIVE_HANDOFF", "0")  # the client's pace is that of the bytes it streams
    handle = store.daemon("--stream-idle-timeout", "2", "--max-held-uploads", str(max_held_uploads))
    size = 3 * PART_SIZE
    expected = write_random_file(tmp_path / "slow.bin", size)
    drive = Drive(drive_uri, endpoint=handle.endpoint, root_folder=str(tmp_path))
    trickling, released = threading.Event(), threading.Event()
    sent = 0

    def paced(nbytes: int) -> None:  # the client's pace: its first part at once, then a MiB every 0.5 s
        nonlocal sent
        sent += nbytes
        if sent > PART_SIZE and not released.is_set():
            trickling.set()
            time.sleep(0.5)

    put = Background(lambda: drive.put("slow.bin", progress=paced))
    put.start()
    assert trickling.wait(30), "the put never sent its first part"
    loop = loop_thread().loop
    trickled = asyncio.Event()
    wanting = asyncio.run_coroutine_threadsafe(
        _trickle(handle.endpoint, drive_uri, PARTS_IN_MEMORY, os.urandom(2 * MIB), trickled, again=True), loop)
    try:
        assert wait_until(lambda: _put_streams(handle, "slow.bin"), 60), "the slow put was never ended"
    finally:
        released.set()  # from now on at full speed, and no other upload wants room
        loop.call_soon_threadsafe(trickled.set)
    [stored] = put.join_checked(60)  # type: ignore[misc]
    trickling_ended = wanting.result(60)
    assert trickling_ended, "no trickling put was ended"
    for err in trickling_ended:  # as the slow put's stream was (its client resumes without showing it)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "--stream-idle-timeout" in err.details(), err
    assert stored.sha256 == expected
    drive.get("slow.bin", to=tmp_path / "back.bin")
    assert file_sha256(tmp_path / "back.bin") == expected
    *ended, resumed = _put_streams(handle, "slow.bin")
    print(f"the slow put: {len(ended)} stream(s) ended, then {resumed['bytes'] / MIB:g} MiB sent to complete it")
    assert ended and all(line["status"] == "UNAVAILABLE" for line in ended), ended
    assert resumed["status"] == "OK", resumed
    if max_held_uploads:
        # The daemon answered QueryWriteStatus with the end of a part it sent: the last stream sent the rest only.
        assert resumed["bytes"] in (PART_SIZE, 2 * PART_SIZE), resumed
        drive_key = f"/{PREFIX}{drive_uri.removeprefix('lit://')}/"
        uploaded = [line for line in store.moto.log.read_text().splitlines()
                    if drive_key in line and "/slow.bin?uploadId=" in line and "partNumber=" in line]
        assert len(uploaded) == size // PART_SIZE, uploaded  # no part was sent twice
    else:
        assert resumed["bytes"] == size, resumed
        # Nothing of it stays held (dropped past the bound, or, on a loaded machine, taken over by the resume that
        # then found nothing to go on from): no multipart upload of it is left in the store.
        drive_key = f"{PREFIX}{drive_uri.removeprefix('lit://')}/"
        assert wait_until(lambda: not [u for u in store.uploads() if u["Key"].startswith(drive_key)], 30), \
            store.uploads()
    assert drive.list("trickle") == [], "nothing of the trickling puts is stored"
    assert wait_until(lambda: not store.uploads(), 30), store.uploads()
