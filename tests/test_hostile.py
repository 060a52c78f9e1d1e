"""Hostile paths, drive ids and components: every RPC refuses them with INVALID_ARGUMENT
(`ValueError` through Drive), and the data dir (and the folder around it) is byte-for-byte
unchanged afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import stat

import grpc
import pytest
from conftest import DaemonHandle, health_status, no_uploads, put_messages, raw_get, raw_put, snapshot, wait_until
from grpc_health.v1 import health_pb2
from test_metrics import scrape

from drive_client import Drive, DriveError
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(60)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DRIVE = "lit://hostile_target"

HOSTILE_PATHS = {
    "dotdot": "../x",
    "absolute": "/etc/passwd",
    "dotdot_deep": "a/../../b",
    "dotdot_only": "..",
    "dotdot_end": "a/..",
    "nul": "a\x00b",
    "nul_end": "evil.txt\x00.png",
    "control": "a\nb",
    "control_del": "a\x7fb",
    "long_name_5000": "x" * 5000,
    "long_part_256": "y" * 256,
    "long_path_5000": "a/" * 2500,
}
ROOT_PATHS = {"empty": "", "dot": ".", "dot_slash": "./"}  # refused where a file path is required

HOSTILE_DRIVES = {
    "slash_in_name": "lit://bad/name",
    "empty_name": "lit://",
    "dotdot_name": "lit://..",
    "dot_name": "lit://.",
    "traversal": "lit://../../etc",
    "nul_name": "lit://a\x00b",
    "long_name": "lit://" + "d" * 200,
    "long_name_20000": "lit://" + "d" * 20000,  # named in its refusal: past what a client takes of a status
    "no_scheme": "drive_1",
    "file_scheme": "file:///etc",
    "empty": "",
}

HOSTILE_COMPONENTS = {"slash": "a/b", "dotdot": "..", "nul": "c\x00", "space": "a b", "long": "c" * 200}


@pytest.fixture(scope="module")
def seeded(own_daemon: DaemonHandle):
    """The module daemon with a few files stored; yields (handle, stub, baseline snapshots)."""
    with grpc.insecure_channel(own_daemon.endpoint) as ch:
        stub = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(stub, DRIVE, "x", b"x content")
        raw_put(stub, DRIVE, "a/b", b"a/b content")
        raw_put(stub, DRIVE, "a/c/d.txt", b"d", component="other")
        raw_put(stub, "lit://etc", "passwd", b"not the real one")
        surroundings = own_daemon.data_dir.parent
        baseline = (snapshot(own_daemon.data_dir), snapshot_around(surroundings, own_daemon))
        yield own_daemon, stub, baseline


def snapshot_around(folder: pathlib.Path, handle: DaemonHandle) -> dict[str, str]:
    """The folder holding the data dir, without the data dir itself and the daemon's log."""
    return {
        k: v for k, v in snapshot(folder).items()
        if not k.startswith(handle.data_dir.name) and not k.startswith(handle.log_path.name)
    }


def assert_untouched(seeded_value) -> None:
    handle, stub, (data_before, around_before) = seeded_value
    after = snapshot(handle.data_dir)
    assert after == data_before, (
        f"data dir changed: extra={sorted(set(after) - set(data_before))} "
        f"missing={sorted(set(data_before) - set(after))}"
    )
    assert snapshot_around(handle.data_dir.parent, handle) == around_before, "something was written beside it"
    names = [e.path for e in stub.List(pb.ListRequest(drive=DRIVE, path=".")).entries]
    assert names == ["a", "x"]


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        assert err.details(), "an error needs a message for a person"
        return err.code()
    return grpc.StatusCode.OK


def rpc_calls(stub, drive: str, path: str, component: str = "", include_list: bool = True):
    calls = {
        "Put": lambda: stub.Put(put_messages(drive, path, b"evil", component=component), timeout=10),
        "PutFile": lambda: stub.PutFile(pb.PutFileRequest(
            header=pb.PutHeader(drive=drive, path=path, component=component), data=b"evil",
            sha256=hashlib.sha256(b"evil").hexdigest()), timeout=10),
        "Get": lambda: stub.Get(pb.GetRequest(drive=drive, path=path, component=component), timeout=10),
        "Get_wait": lambda: stub.Get(
            pb.GetRequest(drive=drive, path=path, component=component, wait_seconds=30), timeout=10
        ),
        "Stat": lambda: stub.Stat(pb.StatRequest(drive=drive, path=path, component=component), timeout=10),
        "Delete": lambda: stub.Delete(pb.DeleteRequest(drive=drive, path=path, component=component), timeout=10),
    }
    if include_list:
        calls["List"] = lambda: stub.List(pb.ListRequest(drive=drive, path=path, component=component), timeout=10)
    return calls


@pytest.mark.parametrize("path", HOSTILE_PATHS.values(), ids=HOSTILE_PATHS.keys())
def test_raw_hostile_path_refused(seeded, path):
    _, stub, _ = seeded
    for name, call in rpc_calls(stub, DRIVE, path).items():
        assert code_of(call) == INVALID, f"{name} with path {path[:50]!r}"
    assert_untouched(seeded)


@pytest.mark.parametrize("path", ROOT_PATHS.values(), ids=ROOT_PATHS.keys())
def test_raw_root_where_file_required_refused(seeded, path):
    _, stub, _ = seeded
    calls = rpc_calls(stub, DRIVE, path, include_list=False)
    for name in ("Put", "Stat", "Delete"):  # Get and List accept the root (whole drive)
        assert code_of(calls[name]) == INVALID, f"{name} with path {path!r}"
    assert_untouched(seeded)


@pytest.mark.parametrize("drive", HOSTILE_DRIVES.values(), ids=HOSTILE_DRIVES.keys())
def test_raw_hostile_drive_refused(seeded, drive):
    _, stub, _ = seeded
    for name, call in rpc_calls(stub, drive, "f.txt").items():
        assert code_of(call) == INVALID, f"{name} on drive {drive[:50]!r}"
    assert code_of(lambda: stub.Mount(pb.MountRequest(drive=drive), timeout=10)) == INVALID
    assert_untouched(seeded)


def test_request_log_lines_stay_short_whatever_a_request_names(seeded):
    """Drive ids, paths and components of a megabyte are refused, and logged cut to their start and length: no
    request makes a log line of megabytes."""
    handle, stub, _ = seeded
    huge = "x" * 1_000_000
    for drive, path, component in ((f"lit://{huge}", "f.txt", ""), (DRIVE, huge, ""), (DRIVE, "f.txt", huge)):
        for name, call in rpc_calls(stub, drive, path, component).items():
            assert code_of(call) == INVALID, name
    def logged() -> list[str]:  # a call's line is written once its status is sent: the last may come after it
        return [line for line in handle.log().splitlines() if "characters)" in line]

    assert wait_until(lambda: len(logged()) >= 3 * 7, 10), logged()  # every call above, Put and PutFile too
    assert all(len(line) < 10_000 for line in handle.log().splitlines())
    assert all(f"... ({len(huge) + len(s)} characters)" in handle.log() for s in ("", "lit://"))
    assert_untouched(seeded)


@pytest.mark.parametrize("component", HOSTILE_COMPONENTS.values(), ids=HOSTILE_COMPONENTS.keys())
def test_raw_hostile_component_refused(seeded, component):
    _, stub, _ = seeded
    for name, call in rpc_calls(stub, DRIVE, "f.txt", component=component).items():
        assert code_of(call) == INVALID, f"{name} with component {component[:50]!r}"
    assert_untouched(seeded)


@pytest.mark.parametrize("path", HOSTILE_PATHS.values(), ids=HOSTILE_PATHS.keys())
def test_drive_hostile_path_value_error(seeded, tmp_path, path):
    handle = seeded[0]
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    d = Drive(DRIVE, component_name="default", root_folder=str(root), endpoint=handle.endpoint)
    calls = {
        "put": lambda: d.put(path),
        "get": lambda: d.get(path),
        "get_wait": lambda: d.get(path, timeout=30),
        "stat": lambda: d.stat(path),
        "delete": lambda: d.delete(path),
        "list": lambda: d.list(path),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as exc:
            call()
        assert isinstance(exc.value, DriveError), f"{name}: {type(exc.value).__name__}: {exc.value}"
        assert exc.value.code in (None, INVALID), f"{name}: code {exc.value.code}"
    assert [p.name for p in root.iterdir()] == ["a"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
    assert_untouched(seeded)


@pytest.mark.parametrize("path", ROOT_PATHS.values(), ids=ROOT_PATHS.keys())
def test_drive_root_where_file_required_value_error(seeded, tmp_path, path):
    handle = seeded[0]
    d = Drive(DRIVE, root_folder=str(tmp_path), endpoint=handle.endpoint)
    for name, call in {"put": lambda: d.put(path), "get": lambda: d.get(path), "stat": lambda: d.stat(path),
                       "delete": lambda: d.delete(path)}.items():
        with pytest.raises(ValueError) as exc:
            call()
        assert isinstance(exc.value, DriveError), f"{name}: {type(exc.value).__name__}: {exc.value}"
    assert d.list(path) == ["a", "x"], "the root is fine for list"
    assert list(tmp_path.iterdir()) == []
    assert_untouched(seeded)


@pytest.mark.parametrize("drive", HOSTILE_DRIVES.values(), ids=HOSTILE_DRIVES.keys())
def test_drive_hostile_id_value_error(seeded, tmp_path, drive):
    handle = seeded[0]
    (tmp_path / "f.txt").write_bytes(b"f")
    with pytest.raises(ValueError) as exc:
        Drive(drive, root_folder=str(tmp_path), endpoint=handle.endpoint).put("f.txt")
    assert isinstance(exc.value, DriveError) and exc.value.code is None
    assert_untouched(seeded)


@pytest.mark.parametrize("component", HOSTILE_COMPONENTS.values(), ids=HOSTILE_COMPONENTS.keys())
def test_drive_hostile_component_value_error(seeded, tmp_path, component):
    handle = seeded[0]
    (tmp_path / "f.txt").write_bytes(b"f")
    with pytest.raises(ValueError) as exc:
        Drive(DRIVE, component_name=component, root_folder=str(tmp_path), endpoint=handle.endpoint).put("f.txt")
    assert isinstance(exc.value, DriveError) and exc.value.code in (None, INVALID)
    assert_untouched(seeded)


def test_a_refusal_naming_long_paths_keeps_its_status(daemon, drive_uri):
    """A status message reaches the client percent-encoded in its trailers, of which a gRPC client takes 8 KiB
    (16 KiB at most): a refusal naming two long non-ASCII paths came as RESOURCE_EXHAUSTED ("received metadata
    size exceeds hard limit") instead of ALREADY_EXISTS. Its message keeps its start and its end."""
    held = "/".join(["文" * 84] * 12)  # 3,035 bytes, 9,105 characters in a status message
    with grpc.insecure_channel(daemon.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive_uri, held, b"held", component="a")
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive_uri, f"{held}/below", b"below", component="b")
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS, refused.value.details()
        message = refused.value.details()
        assert message.startswith(f"'{held[:100]}") and " ... " in message, message
        assert message.endswith("a file of component 'a'; pick another path, or open the drive with "
                                "allow_duplicates=True (`drive put --allow-duplicates`)"), message
        assert [(info.path, data) for info, data in raw_get(stub, drive_uri, ".")] == [(held, b"held")]


def test_a_path_too_long_for_the_data_dir_is_refused_as_such(start_daemon, tmp_path):
    """A path within the 4,096 bytes the API takes can pass the system's limit on disk once the data dir, drive and
    component come in front of it (ENAMETOOLONG): its put and its delete failed INTERNAL."""
    handle = start_daemon(tmp_path, data_dir=tmp_path / ("d" * 250) / ("d" * 250))
    drive, path = "lit://long_on_disk", "/".join(["n" * 250] * 14)  # 3,513 bytes
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "kept.txt", b"kept")
        before = snapshot(handle.data_dir)
        for data in (b"small", os.urandom(3 << 20)):  # committed by the commit worker, or written as it arrives
            with pytest.raises(grpc.RpcError) as refused:
                raw_put(stub, drive, path, data)
            assert refused.value.code() == INVALID, refused.value.details()
            assert "path is too long for the daemon's disk" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Delete(pb.DeleteRequest(drive=drive, path=path), timeout=10)
        assert refused.value.code() == INVALID, refused.value.details()
        assert wait_until(lambda: no_uploads(handle.data_dir), 10)
        assert snapshot(handle.data_dir) == before
        assert [(info.path, data) for info, data in raw_get(stub, drive, ".")] == [("kept.txt", b"kept")]


def field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field of under 128 bytes, made by hand: a client may send any bytes."""
    return bytes([number << 3 | 2, len(value)]) + value


NOT_UTF8 = field(1, DRIVE.encode()) + field(2, b"x\xff")  # drive, and a path of bad UTF-8
CUT_SHORT = field(1, DRIVE.encode())[:-2]


@pytest.mark.parametrize("token", ["", "s3cret"], ids=["open", "token"])
def test_a_request_that_does_not_decode_is_refused_as_invalid(start_daemon, tmp_path, token):
    """Bad UTF-8 in a string field, or a corrupt message, in a unary request or in a Put stream: INVALID_ARGUMENT
    naming the message, once the token is checked, logged as one request line and counted, nothing stored. gRPC
    answered UNKNOWN itself, naming a Python class, before any token was checked, and a Put INTERNAL; each logged
    a traceback and no request."""
    handle = start_daemon(tmp_path, *(["--token", token] if token else []))
    bearer = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(handle.endpoint) as channel:
        drive_pb2_grpc.DriveServiceStub(channel).Put(put_messages(DRIVE, "x", b"x"), metadata=bearer, timeout=10)
        stored, logged, counts = snapshot(handle.data_dir), len(handle.log().splitlines()), scrape(handle.metrics)
        stat_bytes = channel.unary_unary("/drive.v1.DriveService/Stat")  # sends and answers bytes as they are
        put_bytes = channel.stream_unary("/drive.v1.DriveService/Put")
        header = pb.PutRequest(header=pb.PutHeader(drive=DRIVE, path="x")).SerializeToString()
        calls = [
            ("Stat", lambda md: stat_bytes(NOT_UTF8, metadata=md, timeout=10),
             "StatRequest: String field had bad UTF-8"),
            ("Stat", lambda md: stat_bytes(CUT_SHORT, metadata=md, timeout=10),
             "StatRequest: Wire format was corrupt"),
            ("Put", lambda md: put_bytes(iter([field(1, NOT_UTF8)]), metadata=md, timeout=10),
             "PutRequest: String field had bad UTF-8"),
            ("Put", lambda md: put_bytes(iter([header, field(2, b"evil"), CUT_SHORT]), metadata=md, timeout=10),
             "PutRequest: Wire format was corrupt"),
        ]
        for _, call, reason in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call(bearer)
            assert refused.value.code() == INVALID, refused.value.details()
            assert refused.value.details() == f"the request is not a valid drive.v1.{reason}"
            if token:  # checked first
                assert code_of(lambda call=call: call([])) == grpc.StatusCode.UNAUTHENTICATED
    assert wait_until(lambda: no_uploads(handle.data_dir), 10)
    assert snapshot(handle.data_dir) == stored
    calls_made = len(calls) * (2 if token else 1)
    assert wait_until(lambda: len(handle.log().splitlines()) >= logged + calls_made)
    lines = [json.loads(line) for line in handle.log().splitlines()[logged:]]
    assert {(line["event"], line["level"]) for line in lines} == {("request", "info")}, lines  # and no traceback
    refusals = [line["method"] for line in lines if line["status"] == "INVALID_ARGUMENT"]
    assert refusals == [method for method, _, _ in calls], lines
    after = scrape(handle.metrics)
    for method in ("Stat", "Put"):
        counted = f'drived_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}'
        assert after[counted] - counts.get(counted, 0) == 2, method


def test_raw_hostile_path_in_second_file_of_stream(seeded):
    """A bad header after a good file: INVALID_ARGUMENT; the good file may stay, nothing outside.

    Last in the module: it stores (and deletes) a file, so the data dir may differ after it.
    """
    handle, stub, _ = seeded
    msgs = [*put_messages("lit://hostile_stream", "ok.txt", b"ok"), *put_messages("lit://hostile_stream", "../x", b"x")]
    assert code_of(lambda: stub.Put(iter(msgs), timeout=10)) == INVALID
    names = [e.path for e in stub.List(pb.ListRequest(drive="lit://hostile_stream", path=".")).entries]
    assert names in ([], ["ok.txt"])
    if names:
        stub.Delete(pb.DeleteRequest(drive="lit://hostile_stream", path="ok.txt"))
    _, _, (_, around_before) = seeded
    assert snapshot_around(handle.data_dir.parent, handle) == around_before


def test_symlinks_in_data_dir_not_followed_out(start_daemon, tmp_path):
    """A symlink planted in the data dir never serves what is outside it."""
    handle = start_daemon(tmp_path)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"TOP SECRET outside the data dir")
    with grpc.insecure_channel(handle.endpoint) as ch:
        stub = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(stub, "lit://sym", "real.txt", b"a real stored file")
        holder = next(
            pathlib.Path(d) for d, _, names in os.walk(handle.data_dir) for n in names
            if b"a real stored file" in (pathlib.Path(d) / n).read_bytes()
        )
        os.symlink(secret.parent, holder / "dirlink")
        os.symlink(secret, holder / "filelink")
        leaked = []
        for path in ("dirlink/secret.txt", "filelink", "dirlink", "."):
            try:
                for msg in stub.Get(pb.GetRequest(drive="lit://sym", path=path), timeout=10):
                    if b"TOP SECRET" in msg.data:
                        leaked.append(path)
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.NOT_FOUND, INVALID), f"Get {path}: {err.code()}"
        assert leaked == [], f"Get served a file outside the data dir through {leaked}"
        for path in ("dirlink/secret.txt", "filelink"):
            try:
                info = stub.Stat(pb.StatRequest(drive="lit://sym", path=path), timeout=10)
                raise AssertionError(f"Stat {path} describes a file outside the data dir: {info}")
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.NOT_FOUND, INVALID)
        recursive = stub.List(pb.ListRequest(drive="lit://sym", path=".", recursive=True), timeout=10)
        assert [e.path for e in recursive.entries] == ["real.txt"]
        # deleting through a link must not remove the outside file
        with contextlib.suppress(grpc.RpcError):
            stub.Delete(pb.DeleteRequest(drive="lit://sym", path="dirlink/secret.txt"), timeout=10)
        with contextlib.suppress(grpc.RpcError):
            stub.Delete(pb.DeleteRequest(drive="lit://sym", path="filelink"), timeout=10)
    assert secret.read_bytes() == b"TOP SECRET outside the data dir"


def test_a_pipe_planted_in_the_data_dir_is_no_file_and_holds_up_nothing(start_daemon, tmp_path):
    """drived never makes pipes: one planted where a file could be is not there for a stat or a get. Opening it
    for reading waited for a writer, on the event loop: the daemon answered nothing more, health included."""
    handle = start_daemon(tmp_path)
    with grpc.insecure_channel(handle.endpoint) as ch:
        stub = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(stub, "lit://piped", "real.txt", b"a real stored file")
        stored = next(handle.data_dir.rglob("real.txt"))
        before = stored.read_bytes()
        os.mkfifo(stored.parent / "pipe")
        for call in (
            lambda: stub.Stat(pb.StatRequest(drive="lit://piped", path="pipe"), timeout=10),
            lambda: list(stub.Get(pb.GetRequest(drive="lit://piped", path="pipe"), timeout=10)),
        ):
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND, exc.value.details()
        assert [e.path for e in stub.List(pb.ListRequest(drive="lit://piped", path="."), timeout=10).entries] == [
            "real.txt"]
        assert [(info.path, data) for info, data in raw_get(stub, "lit://piped", ".")] == [
            ("real.txt", b"a real stored file")]
        assert stat.S_ISFIFO((stored.parent / "pipe").lstat().st_mode) and stored.read_bytes() == before


def test_symlinks_in_data_dir_refused_even_when_they_stay_inside(start_daemon, tmp_path):
    """drived never makes links: a path through one planted in the data dir is refused, wherever it leads."""
    handle = start_daemon(tmp_path)
    with grpc.insecure_channel(handle.endpoint) as ch:
        stub = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(stub, "lit://inlink", "sub/real.txt", b"a real stored file")
        holder = next(p for p in handle.data_dir.rglob("sub") if p.is_dir())
        os.symlink(holder, holder.parent / "alias")  # "alias" leads to "sub", inside the data dir
        before = snapshot(handle.data_dir)
        for call in (
            lambda: list(stub.Get(pb.GetRequest(drive="lit://inlink", path="alias/real.txt"), timeout=10)),
            lambda: stub.Stat(pb.StatRequest(drive="lit://inlink", path="alias/real.txt"), timeout=10),
            lambda: stub.Put(put_messages("lit://inlink", "alias/new.txt", b"through the link"), timeout=10),
            lambda: stub.Delete(pb.DeleteRequest(drive="lit://inlink", path="alias/real.txt"), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == INVALID, exc.value.details()
            assert "symbolic link" in exc.value.details()
        assert snapshot(handle.data_dir) == before
        [(_, data)] = raw_get(stub, "lit://inlink", "sub/real.txt")
        assert data == b"a real stored file"


@pytest.mark.parametrize(("method", "kind"), [
    ("/grpc.health.v1.Health/Check", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "unary_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
])
def test_a_health_or_reflection_request_that_does_not_decode_is_refused_as_invalid(start_daemon, tmp_path, method,
                                                                                    kind):
    """gRPC answered them UNKNOWN itself, naming a Python class (`Exception deserializing request!`), with an
    error-level traceback in the daemon's log each."""
    handle = start_daemon(tmp_path)
    logged = len(handle.log().splitlines())
    bad = field(1, b"x\xff")  # the service name, or the reflection request's host: bad UTF-8
    with grpc.insecure_channel(handle.endpoint) as channel:
        call = getattr(channel, kind)(method)  # sends and answers bytes as they are
        with pytest.raises(grpc.RpcError) as refused:
            answer = call(iter([bad]) if kind.startswith("stream") else bad, timeout=10)
            if kind.endswith("stream"):
                list(answer)
        assert refused.value.code() == INVALID, refused.value.details()
        assert refused.value.details().startswith("the request is not a valid grpc."), refused.value.details()
        assert "String field had bad UTF-8" in refused.value.details()
    assert "Traceback" not in "\n".join(handle.log().splitlines()[logged:])
    assert health_status(handle.endpoint) == health_pb2.HealthCheckResponse.SERVING
