"""PutFile: one small file in one unary call, with the same rules as a Put stream."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from drive_client import Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc


@pytest.fixture(scope="module")
def daemon(own_daemon):
    """This module's own daemon: a test here asserts that its tmp folder is left empty, which the uploads that
    another module's tests leave held in the session daemon's would break when both run in one process."""
    return own_daemon


@pytest.fixture(scope="module")
def stub(daemon):
    with grpc.insecure_channel(daemon.endpoint) as channel:
        yield drive_pb2_grpc.DriveServiceStub(channel)


def put_file(stub, drive: str, path: str, data: bytes, component: str = "", sha256: str | None = None,
             size: int | None = None, allow_duplicates: bool = False) -> pb.PutFileResponse:
    header = pb.PutHeader(drive=drive, path=path, component=component, allow_duplicates=allow_duplicates)
    if size is not None:
        header.size = size
    return stub.PutFile(pb.PutFileRequest(
        header=header, data=data, sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
    ), timeout=10)


def code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.details()
    return info.value.code()


def test_put_file_stores_and_replaces(stub, drive_uri):
    first = put_file(stub, drive_uri, "d/f.txt", b"one", component="a")
    assert (first.file.path, first.file.size, first.file.component) == ("d/f.txt", 3, "a")
    assert first.file.sha256 == hashlib.sha256(b"one").hexdigest()
    put_file(stub, drive_uri, "d/f.txt", b"two!", component="a")
    reply = stub.Stat(pb.StatRequest(drive=drive_uri, path="d/f.txt"))
    assert (reply.size, reply.sha256) == (4, hashlib.sha256(b"two!").hexdigest())


def test_put_file_refusals_store_nothing(stub, drive_uri):
    put_file(stub, drive_uri, "held.txt", b"held", component="a")
    assert code(lambda: put_file(stub, drive_uri, "held.txt", b"mine", component="b")) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code(lambda: put_file(stub, drive_uri, "bad.txt", b"x", sha256="0" * 64)) == grpc.StatusCode.DATA_LOSS
    assert code(lambda: put_file(stub, drive_uri, "short.txt", b"x", size=2)) == grpc.StatusCode.DATA_LOSS
    assert code(lambda: put_file(stub, drive_uri, "nosha.txt", b"x", sha256="")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: put_file(stub, "s3://bucket/prefix/", "x.txt", b"x")) == grpc.StatusCode.PERMISSION_DENIED
    assert code(lambda: put_file(stub, drive_uri, "held.txt/under", b"x", component="a")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    listed = stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries
    assert [(e.path, e.component) for e in listed] == [("held.txt", "a")]
    both = put_file(stub, drive_uri, "held.txt", b"dup", component="b", allow_duplicates=True)
    assert both.file.component == "b"


def test_drive_put_of_a_small_file_uses_one_call(daemon, drive_uri, tmp_path):
    (tmp_path / "small.bin").write_bytes(b"s" * 1000)
    Drive(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put("small.bin")
    methods = [line for line in daemon.log().splitlines() if drive_uri in line and '"path": "small.bin"' in line]
    assert len(methods) == 1 and '"method": "PutFile"' in methods[0] and '"bytes": 1000' in methods[0]


def test_concurrent_put_files_commit_together_and_fail_alone(daemon, stub, drive_uri):
    """Small commits are batched: a bad file in a batch fails alone, the others are stored, nothing is left over."""
    datas = {f"batch/f{i:02d}.bin": bytes([i]) * (100 + i) for i in range(48)}
    bad = {path for i, path in enumerate(sorted(datas)) if i % 7 == 3}
    calls = {}
    for path, data in datas.items():
        header = pb.PutHeader(drive=drive_uri, path=path, component="a")
        sha = "0" * 64 if path in bad else hashlib.sha256(data).hexdigest()
        calls[path] = stub.PutFile.future(pb.PutFileRequest(header=header, data=data, sha256=sha), timeout=20)
    for path, call in calls.items():
        if path in bad:
            assert code(call.result) == grpc.StatusCode.DATA_LOSS
        else:
            assert call.result().file.sha256 == hashlib.sha256(datas[path]).hexdigest()
    listed = {e.path: e.size for e in stub.List(pb.ListRequest(drive=drive_uri, path="batch")).entries}
    assert listed == {p: len(d) for p, d in datas.items() if p not in bad}
    for path in set(datas) - bad:
        [reply] = [m for m in stub.Get(pb.GetRequest(drive=drive_uri, path=path)) if m.HasField("data")]
        assert reply.data == datas[path]
    assert list((daemon.data_dir / "tmp").iterdir()) == []
