"""--token: DriveService calls need the bearer token; health and reflection stay open."""

from __future__ import annotations

import os
import subprocess

import grpc
import pytest
from conftest import BIN, health_status, start_daemon

from drive_client import Drive, Unauthenticated
from drive_client.pb import drive_pb2 as pb

pytestmark = pytest.mark.integration  # starts daemons of its own


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    handle = start_daemon(tmp, env={"DRIVED_TOKEN": "s3cret"})
    yield handle, tmp
    handle.stop()


def test_calls_without_the_token_are_refused_and_store_nothing(twin, guarded, drive_uri, tmp_path):
    handle, _ = guarded
    (tmp_path / "f.txt").write_bytes(b"f")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "g.txt").write_bytes(b"g")
    (tmp_path / "two" / "h.txt").write_bytes(b"h")
    for token in (None, "wrong"):
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint, token=token)
        with pytest.raises(PermissionError) as refused:
            drive.put("f.txt")  # a unary PutFile
        assert isinstance(refused.value, Unauthenticated)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and "token" in str(refused.value)
        with pytest.raises(Unauthenticated):
            drive.list(".")
        with pytest.raises(Unauthenticated):
            drive.put("two")  # a Put stream
        with pytest.raises(Unauthenticated):
            list(drive.read_range("f.txt"))  # a Get stream
    allowed = twin(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint, token="s3cret")
    assert allowed.list(".") == []  # nothing was stored by the refused calls
    allowed.put("f.txt")
    assert allowed.list(".") == ["f.txt"]
    assert b"".join(allowed.read_range("f.txt")) == b"f"


def test_health_and_reflection_need_no_token(guarded):
    handle, tmp = guarded
    (tmp / "s.txt").write_bytes(b"s")
    Drive("lit://guarded", root_folder=tmp, endpoint=handle.endpoint, token="s3cret").put("s.txt")
    assert health_status(handle.endpoint) == 1  # SERVING
    listed = subprocess.run([str(BIN / "grpcurl"), "-plaintext", handle.endpoint, "list"],
                            capture_output=True, text=True, timeout=30)
    assert "drive.v1.DriveService" in listed.stdout
    stat = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", '{"drive":"lit://guarded","path":"x"}', handle.endpoint,
         "drive.v1.DriveService/Stat"], capture_output=True, text=True, timeout=30)
    assert stat.returncode != 0 and "Unauthenticated" in stat.stderr
    with grpc.insecure_channel(handle.endpoint) as channel:
        reply = channel.unary_unary("/drive.v1.DriveService/Stat", request_serializer=pb.StatRequest.SerializeToString,
                                    response_deserializer=pb.FileInfo.FromString)
        found = reply(pb.StatRequest(drive="lit://guarded", path="s.txt"),
                      metadata=[("authorization", "Bearer s3cret")])
        assert found.size == 1


def test_cli_and_env_carry_the_token(guarded):
    handle, _ = guarded
    cli = [str(BIN / "python"), "-m", "drive_client.cli", "--endpoint", handle.endpoint]
    refused = subprocess.run([*cli, "ls", "lit://guarded"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "token" in refused.stderr
    by_flag = subprocess.run([*cli, "--token", "s3cret", "ls", "lit://guarded"], capture_output=True, text=True,
                             timeout=30)
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = subprocess.run([*cli, "ls", "lit://guarded"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "DRIVE_TOKEN": "s3cret"})
    assert by_env.returncode == 0 and by_env.stdout == by_flag.stdout
