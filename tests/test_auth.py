"""Tokens: `--token`, and `--auth-tokens` files of scoped tokens (drives by glob, read or read-write).

Every refusal is checked three ways: its status and message, nothing stored
or changed in the data dir, and the refusal logged (one JSON line, the token's
name, never the token) and counted in drived_requests_total.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import grpc
import pytest
from conftest import (
    BIN,
    MIB,
    DaemonHandle,
    health_status,
    put_messages,
    sha256_hex,
    snapshot,
    spawn_daemon,
    start_daemon,
    wait_until,
)
from moto_server import AWS_ENV, running_moto
from test_metrics import scrape

from bench.services import free_port
from drive_client import Drive, PermissionDenied, Unauthenticated
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc as pb_grpc
from drive_client.uri import parse_drive
from drived.auth import Grant, compile_scope

pytestmark = pytest.mark.integration  # starts daemons of its own

METHODS = set(pb.DESCRIPTOR.services_by_name["DriveService"].methods_by_name)
SECRETS = {  # name -> token
    "admin": "admin-" + uuid.uuid4().hex,
    "reader": "reader-" + uuid.uuid4().hex,
    "team-a": "team-a-" + uuid.uuid4().hex,
    "datasets": "datasets-" + uuid.uuid4().hex,
}


def token_entry(name: str, secret: str, drives: str = '["lit://*"]', mode: str = "read-write",
                plaintext: bool = False) -> str:
    """One [[token]] table; the token kept as its sha256 unless `plaintext`."""
    kept = f'token = "{secret}"' if plaintext else f'sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"'
    return f'[[token]]\nname = "{name}"\n{kept}\ndrives = {drives}\nmode = "{mode}"\n'


TOKEN_FILE = "\n".join([
    token_entry("admin", SECRETS["admin"], '["lit://*", "s3://*"]'),
    token_entry("reader", SECRETS["reader"], '["lit://shared_*"]', "read", plaintext=True),
    token_entry("team-a", SECRETS["team-a"], '["team_a_*"]'),
    token_entry("datasets", SECRETS["datasets"], '["s3://datasets/public/*"]', "read"),
])


def bearer(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {SECRETS[name]}")]


# One valid call of each DriveService method on `drive`, with `metadata`; each reads or changes a.txt.
Call = Callable[[pb_grpc.DriveServiceStub, str, list[tuple[str, str]]], Any]
CALLS: dict[str, Call] = {
    "Put": lambda stub, drive, md: stub.Put(put_messages(drive, "a.txt", b"replaced"), metadata=md, timeout=30),
    "PutFile": lambda stub, drive, md: stub.PutFile(pb.PutFileRequest(
        header=pb.PutHeader(drive=drive, path="b.txt"), data=b"b", sha256=sha256_hex(b"b")), metadata=md, timeout=30),
    "Get": lambda stub, drive, md: list(stub.Get(pb.GetRequest(drive=drive, path="a.txt"), metadata=md, timeout=30)),
    "List": lambda stub, drive, md: stub.List(pb.ListRequest(drive=drive, path="."), metadata=md, timeout=30),
    "Stat": lambda stub, drive, md: stub.Stat(pb.StatRequest(drive=drive, path="a.txt"), metadata=md, timeout=30),
    "Delete": lambda stub, drive, md: stub.Delete(pb.DeleteRequest(drive=drive, path="a.txt"), metadata=md, timeout=30),
    "Mount": lambda stub, drive, md: stub.Mount(pb.MountRequest(drive=drive), metadata=md, timeout=30),
    "Watch": lambda stub, drive, md: next(stub.Watch(pb.WatchRequest(drive=drive), metadata=md, timeout=30)),
    "QueryWriteStatus": lambda stub, drive, md: stub.QueryWriteStatus(
        pb.QueryWriteStatusRequest(drive=drive, upload_id="u1"), metadata=md, timeout=30),
}
WRITES = {"Put", "PutFile", "Delete", "QueryWriteStatus"}


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a call that must fail."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    raise AssertionError("the call succeeded; it should have been refused")


def logged_requests(handle: DaemonHandle) -> list[dict[str, Any]]:
    """The daemon's request log lines, parsed."""
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == "request"]


def counted(handle: DaemonHandle, method: str, code: str) -> float:
    return scrape(handle.metrics).get(f'drived_requests_total{{code="{code}",method="{method}"}}', 0.0)


class Refusals:
    """Checks that calls are refused, and that each refusal is counted exactly once, and logged exactly once: on a
    line of its own, or, past the refusals logged a second (drived.refusals), in a line counting those left out."""

    def __init__(self, handle: DaemonHandle, code: str, token_name: str) -> None:
        self.handle, self.code, self.token_name = handle, code, token_name
        self.counts = {method: counted(handle, method, code) for method in METHODS}
        self.logged, self.left_out = len(self._lines()), self._left_out()
        self.expected: dict[str, int] = {}

    def _lines(self) -> list[dict[str, Any]]:
        return [line for line in logged_requests(self.handle) if line["status"] == self.code]

    def _left_out(self) -> int:
        lines = [json.loads(line) for line in self.handle.log().splitlines() if line.startswith("{")]
        return sum(line["calls"] for line in lines
                   if line["event"] == "refused calls not logged" and line["status"] == self.code)

    def check(self, method: str, call: Callable[[], object]) -> str:
        code, message = refusal(call)
        assert code.name == self.code, (method, code, message)
        self.expected[method] = self.expected.get(method, 0) + 1
        return message

    def assert_logged_and_counted(self) -> None:
        def all_logged() -> bool:
            logged = len(self._lines()) - self.logged + self._left_out() - self.left_out
            return logged == sum(self.expected.values())

        assert wait_until(all_logged), self._lines()[self.logged:]
        for line in self._lines()[self.logged:]:
            assert line["token"] == self.token_name, line
        for method, times in self.expected.items():
            assert counted(self.handle, method, self.code) - self.counts[method] == times, method
        log = self.handle.log()
        assert not any(secret in log for secret in SECRETS.values()), "a token was written to the daemon's log"


@pytest.fixture(scope="module")
def s3_datasets() -> Iterator[dict[str, str]]:
    """A moto_server holding bucket `datasets` (public/a.txt, private/b.txt); the daemon's AWS environment."""
    with running_moto() as url:
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="datasets")
        s3.put_object(Bucket="datasets", Key="public/a.txt", Body=b"open data")
        s3.put_object(Bucket="datasets", Key="public/sub/c.txt", Body=b"more")
        s3.put_object(Bucket="datasets", Key="private/b.txt", Body=b"secret data")
        yield {**AWS_ENV, "AWS_ENDPOINT_URL": url}


@pytest.fixture(scope="module")
def scoped(tmp_path_factory, s3_datasets) -> Iterator[tuple[DaemonHandle, pb_grpc.DriveServiceStub]]:
    """A daemon with the module's token file, and a raw stub to it."""
    tmp = tmp_path_factory.mktemp("scoped")
    tokens = tmp / "tokens.toml"
    tokens.write_text(TOKEN_FILE)
    tokens.chmod(0o644)  # holds a plaintext token: the daemon warns
    handle = start_daemon(tmp, "--auth-tokens", str(tokens), env=s3_datasets)
    with grpc.insecure_channel(handle.endpoint) as channel:
        yield handle, pb_grpc.DriveServiceStub(channel)
    handle.stop()


def seeded(handle: DaemonHandle, stub: pb_grpc.DriveServiceStub, prefix: str) -> str:
    """A new drive `lit://PREFIX_<random>` holding a.txt, put with the admin token."""
    drive = f"lit://{prefix}_{uuid.uuid4().hex[:8]}"
    stub.Put(put_messages(drive, "a.txt", b"original"), metadata=bearer("admin"), timeout=30)
    return drive


def test_every_rpc_is_refused_without_a_token_the_daemon_knows(scoped):
    handle, stub = scoped
    assert set(CALLS) == METHODS, "every DriveService method must be in this test's table"
    drive = seeded(handle, stub, "shared")
    before = snapshot(handle.data_dir)
    refusals = Refusals(handle, "UNAUTHENTICATED", "")
    for method, call in CALLS.items():
        for metadata in ([], [("authorization", "Bearer wrong-token")],
                         [("authorization", f"Basic {SECRETS['admin']}")], [("authorization", SECRETS["admin"])]):
            message = refusals.check(method, lambda call=call, md=metadata: call(stub, drive, md))
            assert "token" in message and SECRETS["admin"] not in message
    assert snapshot(handle.data_dir) == before  # nothing stored, replaced or deleted
    refusals.assert_logged_and_counted()
    assert CALLS["Stat"](stub, drive, bearer("admin")).size == len(b"original")


def test_a_read_token_reads_and_cannot_write(scoped):
    handle, stub = scoped
    drive = seeded(handle, stub, "shared")
    before = snapshot(handle.data_dir)
    refusals = Refusals(handle, "PERMISSION_DENIED", "reader")
    for method in sorted(WRITES):
        message = refusals.check(method, lambda method=method: CALLS[method](stub, drive, bearer("reader")))
        assert message == f"token 'reader' may only read: {method} needs a read-write token"
    assert snapshot(handle.data_dir) == before
    refusals.assert_logged_and_counted()

    assert [e.path for e in CALLS["List"](stub, drive, bearer("reader")).entries] == ["a.txt"]
    assert CALLS["Stat"](stub, drive, bearer("reader")).size == len(b"original")
    assert b"".join(m.data for m in CALLS["Get"](stub, drive, bearer("reader")) if m.data) == b"original"
    assert CALLS["Watch"](stub, drive, bearer("reader")).kind == pb.WatchEvent.KIND_WATCHING
    # Mount reads: the token passes, and the lit:// drive itself says it needs no mount.
    assert refusal(lambda: CALLS["Mount"](stub, drive, bearer("reader")))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_a_token_for_other_drives_learns_nothing_of_a_drive_outside_its_scope(scoped):
    handle, stub = scoped
    existing = seeded(handle, stub, "team_b")
    missing = f"lit://team_b_{uuid.uuid4().hex[:8]}"
    before = snapshot(handle.data_dir)
    refusals = Refusals(handle, "PERMISSION_DENIED", "team-a")
    for method, call in CALLS.items():
        answers = [refusals.check(method, lambda call=call, drive=drive: call(stub, drive, bearer("team-a")))
                   for drive in (existing, missing)]
        # Whether the drive exists or not, the refusal reads the same.
        assert answers[0].replace(existing, "DRIVE") == answers[1].replace(missing, "DRIVE")
        assert answers[0].startswith("token 'team-a' may not ")
    assert snapshot(handle.data_dir) == before
    refusals.assert_logged_and_counted()


def test_a_put_stream_is_checked_at_each_files_header(scoped, tmp_path):
    handle, stub = scoped
    own = f"lit://team_a_{uuid.uuid4().hex[:8]}"
    other = seeded(handle, stub, "team_b")

    def two_drives() -> Iterator[pb.PutRequest]:
        yield from put_messages(own, "first.txt", b"first")
        yield from put_messages(other, "second.txt", b"second")

    code, message = refusal(lambda: stub.Put(two_drives(), metadata=bearer("team-a"), timeout=30))
    assert code == grpc.StatusCode.PERMISSION_DENIED and other in message
    assert [e.path for e in CALLS["List"](stub, other, bearer("admin")).entries] == ["a.txt"]


def test_a_held_upload_is_neither_described_nor_resumed_for_a_token_that_may_not_write_its_drive(scoped):
    """QueryWriteStatus and a resuming Put need what a Put needs: a token of another drive, or a read token, is
    refused the same whether the upload is held or not, and the upload stays as it was."""
    handle, stub = scoped
    drive = f"lit://shared_{uuid.uuid4().hex[:8]}"
    data = os.urandom(3 * MIB)
    first = [pb.PutRequest(header=pb.PutHeader(drive=drive, path="held.bin", upload_id="u-held", size=len(data))),
             pb.PutRequest(data=data[:MIB]), pb.PutRequest(data=data[MIB:2 * MIB])]
    code, _ = refusal(lambda: stub.Put(iter(first), metadata=bearer("admin"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # ended before its finish: held

    def status(upload_id: str, token: str) -> pb.QueryWriteStatusResponse:
        request = pb.QueryWriteStatusRequest(drive=drive, upload_id=upload_id)
        return stub.QueryWriteStatus(request, metadata=bearer(token), timeout=30)

    def resume(upload_id: str, token: str) -> pb.PutResponse:
        header = pb.PutHeader(drive=drive, path="held.bin", upload_id=upload_id, size=len(data), write_offset=2 * MIB)
        rest = [pb.PutRequest(header=header), pb.PutRequest(data=data[2 * MIB:]),
                pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
        return stub.Put(iter(rest), metadata=bearer(token), timeout=30)

    assert status("u-held", "admin").committed_size == 2 * MIB
    before = snapshot(handle.data_dir)
    for token in ("team-a", "reader"):  # another drive's; a read token of this drive
        refusals = Refusals(handle, "PERMISSION_DENIED", token)
        for method, call in (("QueryWriteStatus", status), ("Put", resume)):
            held, unknown = (refusals.check(method, lambda call=call, upload_id=upload_id, token=token:
                                            call(upload_id, token)) for upload_id in ("u-held", "u-unknown"))
            assert held == unknown and "u-held" not in held, (token, method)
        refusals.assert_logged_and_counted()
    assert snapshot(handle.data_dir) == before
    assert status("u-held", "admin").committed_size == 2 * MIB
    [stored] = resume("u-held", "admin").files
    assert (stored.size, stored.sha256) == (len(data), sha256_hex(data))


def test_a_scoped_token_works_on_its_own_drives_through_the_client(twin, scoped, tmp_path):
    handle, _ = scoped
    (tmp_path / "f.txt").write_bytes(b"team a's file")
    own = twin(f"lit://team_a_{uuid.uuid4().hex[:8]}", root_folder=tmp_path, endpoint=handle.endpoint,
               token=SECRETS["team-a"])
    own.put("f.txt")
    assert own.list(".") == ["f.txt"]
    assert own.get("f.txt", to="back.txt").read_bytes() == b"team a's file"
    own.delete("f.txt")
    other = twin(f"lit://team_b_{uuid.uuid4().hex[:8]}", root_folder=tmp_path, endpoint=handle.endpoint,
                 token=SECRETS["team-a"])
    with pytest.raises(PermissionError) as refused:
        other.list(".")
    assert isinstance(refused.value, PermissionDenied) and refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PermissionDenied):
        other.put("f.txt")


def test_glob_scopes_match_the_whole_drive_uri():
    def allowed(patterns: list[str], uri: str, method: str = "List") -> bool:
        try:
            Grant("t", compile_scope(patterns), True).check(method, parse_drive(uri))
        except PermissionDenied:
            return False
        return True

    assert allowed(["team_a_*"], "lit://team_a_1")  # a name without a scheme is a lit:// drive name
    assert not allowed(["team_a_*"], "lit://team_b_1")
    assert not allowed(["team_a_*"], "s3://team-a-bucket/")
    assert allowed(["lit://run_?"], "lit://run_7") and not allowed(["lit://run_?"], "lit://run_10")
    assert allowed(["lit://[ab]*"], "lit://b2") and not allowed(["lit://[ab]*"], "lit://c2")
    assert not allowed(["lit://Team"], "lit://team")  # case-sensitive, as drive names are
    public = ["s3://datasets/public/*"]
    assert allowed(public, "s3://datasets/public/")
    assert allowed(public, "s3://datasets/public/images/train/")  # `*` matches '/' too
    assert not allowed(public, "s3://datasets/")  # the whole bucket is more than its public/ prefix
    assert not allowed(public, "s3://datasets/private/")
    assert not allowed(public, "s3://datasets/publicity/")
    assert not allowed(public, "s3://datasets-copy/public/")
    assert allowed(["s3://datasets*"], "s3://datasets-copy/")  # what a pattern without '/' after the bucket does
    assert allowed(["lit://a", "s3://b*"], "s3://bbb/") and allowed(["lit://a", "s3://b*"], "lit://a")


def test_s3_scopes_through_the_daemon(scoped, tmp_path):
    handle, _ = scoped
    token = SECRETS["datasets"]
    public = Drive("s3://datasets/public/", root_folder=tmp_path, endpoint=handle.endpoint, token=token)
    assert public.list(".") == ["a.txt", "sub"]  # the first use mounts: Mount is a read
    assert public.get("a.txt").read_bytes() == b"open data"
    assert Drive("s3://datasets/public/sub/", endpoint=handle.endpoint, token=token).list(".") == ["c.txt"]
    for outside in ("s3://datasets/private/", "s3://datasets/"):
        with pytest.raises(PermissionDenied) as refused:
            Drive(outside, endpoint=handle.endpoint, token=token).list(".")
        assert outside in str(refused.value)
    with pytest.raises(PermissionDenied, match="may not read lit://"):
        Drive("lit://shared_x", endpoint=handle.endpoint, token=token).list(".")


def test_health_needs_no_token_and_the_plaintext_token_file_is_warned_about(scoped):
    handle, _ = scoped
    assert health_status(handle.endpoint) == 1  # SERVING
    handle.wait_logged("token file readable by others")
    warning = next(json.loads(line) for line in handle.log().splitlines() if "readable by others" in line)
    assert "chmod 600" in warning["advice"] and SECRETS["reader"] not in handle.log()


# --- --token, the one-token shorthand ------------------------------------------------------------


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


# --- reloading, broken files, reflection -----------------------------------------------------------


def test_sighup_reloads_the_token_file_and_a_broken_file_keeps_the_old_tokens(start_daemon, tmp_path, drive_uri):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(token_entry("old", "old-secret"))
    handle = start_daemon(tmp_path, "--auth-tokens", str(tokens))
    (tmp_path / "f.txt").write_bytes(b"f")

    def drive(secret: str) -> Drive:
        return Drive(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint, token=secret)

    drive("old-secret").put("f.txt")
    tokens.write_text(token_entry("new", "new-secret"))
    handle.proc.send_signal(signal.SIGHUP)
    handle.wait_logged("tokens reloaded")
    assert drive("new-secret").list(".") == ["f.txt"]
    with pytest.raises(Unauthenticated):
        drive("old-secret").list(".")

    for broken, reason in [
        ("[[token]\nname = ", "is not valid TOML"),
        (token_entry("new", "new-secret").replace('mode = "read-write"', 'mode = "write"'), "`mode` is"),
        (token_entry("new", "new-secret").replace("drives", "drive"), "unknown key(s) drive"),
        (token_entry("new", "new-secret") + token_entry("new", "other-secret"), "two tokens are named 'new'"),
    ]:
        tokens.write_text(broken)
        logged = handle.log().count('"tokens not reloaded"')
        handle.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda logged=logged: handle.log().count('"tokens not reloaded"') > logged)
        line = [json.loads(x) for x in handle.log().splitlines() if '"tokens not reloaded"' in x][-1]
        assert reason in line["reason"], line
        assert drive("new-secret").list(".") == ["f.txt"]  # the tokens before the broken file still hold
    assert "new-secret" not in handle.log() and "old-secret" not in handle.log()


@pytest.mark.parametrize(("content", "reason"), [
    ("", "defines no token"),
    ('[[token]]\nname = "a"\ntoken = "plain-secret"\ndrives = ["*"]\nmode = "read"\n', "'a' is also --token"),
    ('[[token]]\nname = "a"\ntoken = "plain-secret"\ndrives = ["lit://*"]\n', "`mode` is"),
    ('[[token]]\nname = "a"\ntoken = "plain-secret"\nsha256 = "' + "0" * 64 + '"\ndrives = ["*"]\nmode = "read"\n',
     "exactly one of `sha256`"),
    ('[[token]]\nname = "a"\ntoken = "plain-secret"\ndrives = ["gs://x/*"]\nmode = "read"\n', "neither lit:// nor s3://"),
    ('[[token]]\nname = "a"\ntoken = "plain-secret"\ndrives = ["bucket/prefix/*"]\nmode = "read"\n', "has no lit://"),
    ('[[token]]\nname = "a"\ntoken = "plain secret"\ndrives = ["*"]\nmode = "read"\n', "without spaces"),
    ('[[token]]\nname = "a"\nsha256 = "abc"\ndrives = ["*"]\nmode = "read"\n', "64 hex digits"),
    ('[[tokens]]\nname = "a"\n', "unknown key(s) tokens"),
])
def test_a_token_file_that_cannot_be_used_stops_the_start(tmp_path, content, reason):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(content)
    endpoint = f"127.0.0.1:{free_port()}"
    handle = spawn_daemon(["--listen", endpoint, "--data-dir", str(tmp_path / "data"), "--auth-tokens", str(tokens),
                           "--token", "plain-secret"], tmp_path / "drived.log", tmp_path / "data", endpoint)
    assert handle.proc.wait(30) == 1
    assert "drived: --auth-tokens:" in handle.log() and reason in handle.log(), handle.log()
    assert "plain-secret" not in handle.log()
    assert not (tmp_path / "data").exists()  # refused before the data dir was made


def test_a_token_file_from_the_environment_is_named_as_given(tmp_path):
    """DRIVED_AUTH_TOKENS and DRIVED_TOKEN (a container's settings): the refusal named --auth-tokens and --token,
    flags the operator never gave."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "a"\ntoken = "plain-secret"\ndrives = ["*"]\nmode = "read"\n')
    endpoint = f"127.0.0.1:{free_port()}"
    handle = spawn_daemon(["--listen", endpoint, "--data-dir", str(tmp_path / "data")], tmp_path / "drived.log",
                          tmp_path / "data", endpoint,
                          env={"DRIVED_AUTH_TOKENS": str(tokens), "DRIVED_TOKEN": "plain-secret"})
    assert handle.proc.wait(30) == 1
    last = handle.log().strip().splitlines()[-1]
    assert last.startswith(f"drived: DRIVED_AUTH_TOKENS: {tokens}: token 'a' is also DRIVED_TOKEN,"), handle.log()
    assert "plain-secret" not in handle.log()
    assert not (tmp_path / "data").exists()  # refused before the data dir was made


@pytest.mark.parametrize("token", ["Zq7-sécret", "Zq7 two", "Zq7\nline", "Zq7\ttab"])
def test_a_token_no_client_can_send_stops_the_start_unshown(tmp_path, token):
    """A --token (or DRIVED_TOKEN) held to what a token file's is: the daemon started, and every client was locked
    out (the client refused the token, gRPC answered INTERNAL "Invalid metadata")."""
    endpoint = f"127.0.0.1:{free_port()}"
    for args, env, named in ((["--token", token], {}, "--token"), ([], {"DRIVED_TOKEN": token}, "DRIVED_TOKEN")):
        log = tmp_path / f"drived-{named}.log"
        handle = spawn_daemon(["--listen", endpoint, "--data-dir", str(tmp_path / "data"), *args], log,
                              tmp_path / "data", endpoint, env=env)
        try:
            assert handle.proc.wait(30) == 2, handle.log()
        finally:
            handle.stop(signal.SIGKILL)  # a daemon that started (without the check)
        last = handle.log().strip().splitlines()[-1]
        assert named in last and "printable ASCII without spaces" in last, handle.log()
        assert "Zq7" not in handle.log()  # no part of the token
    assert not (tmp_path / "data").exists()


def test_reflection_can_be_turned_off(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--reflection", "off")
    listed = subprocess.run([str(BIN / "grpcurl"), "-plaintext", handle.endpoint, "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode != 0 and "reflection" in listed.stderr.lower(), listed
    assert health_status(handle.endpoint) == 1  # SERVING: health is another service
    on = start_daemon(tmp_path, env={"DRIVED_REFLECTION": "on"})
    listed = subprocess.run([str(BIN / "grpcurl"), "-plaintext", on.endpoint, "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "drive.v1.DriveService" in listed.stdout


def exposure_warning(log: str) -> dict[str, Any] | None:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return next((line for line in lines if line["event"] == "listening beyond loopback"), None)


def test_the_daemon_warns_when_it_listens_beyond_loopback_unprotected(tmp_path, scoped):
    # 198.51.100.7 (TEST-NET-2) is not this machine's: the daemon warns at start, then cannot bind and exits,
    # so nothing is ever served beyond loopback.
    endpoint = f"198.51.100.7:{free_port()}"
    handle = spawn_daemon(["--listen", endpoint, "--data-dir", str(tmp_path / "data")], tmp_path / "open.log",
                          tmp_path / "data", endpoint)
    assert handle.proc.wait(30) == 1
    warning = exposure_warning(handle.log())
    assert warning is not None and warning["level"] == "warning" and warning["listen"] == endpoint, handle.log()
    problems = " ".join(warning["problems"])
    assert "--auth-tokens" in problems and "--tls-cert" in problems
    with_token = spawn_daemon(["--listen", endpoint, "--data-dir", str(tmp_path / "data")], tmp_path / "token.log",
                              tmp_path / "data", endpoint, env={"DRIVED_TOKEN": "t0ken"})
    assert with_token.proc.wait(30) == 1
    warning = exposure_warning(with_token.log())
    assert warning is not None and warning["problems"] == [
        "no TLS: files and tokens cross the network unencrypted, readable by anyone on the path; set --tls-cert "
        "and --tls-key"]
    handle, _ = scoped
    assert exposure_warning(handle.log()) is None  # on 127.0.0.1: no warning
