"""DESIGN's error table for lit:// drives: exception type (built-in base) and `.code`,
through `Drive`, and the same conditions through the raw stubs as gRPC status codes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import (
    MIB,
    free_port,
    health_status,
    put_messages,
    raw_get,
    raw_put,
    rpc_code,
    sha256_hex,
)

from drive_client import AmbiguousPathError, Drive, DriveError
from drive_client.pb import drive_pb2 as pb

pytestmark = pytest.mark.timeout(60)

SC = grpc.StatusCode
INVALID = SC.INVALID_ARGUMENT


def drive(uri: str, daemon, root: pathlib.Path, component: str | None = None, **kw) -> Drive:
    return Drive(uri, component_name=component, root_folder=str(root), endpoint=daemon.endpoint, **kw)


# --- Drive: client-side checks (code None) ---------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    [
        "lit://bad/name",
        "lit://",
        "lit://..",
        "lit://has space",
        "ftp://drive_1",
        "drive_1",
        "http://host/x",
        "s3://bucket/prefix",  # s3 needs the trailing '/'
        "s3://my-bucket",  # a bucket without '/' too
    ],
)
def test_bad_drive_id_is_value_error(daemon, tmp_path, bad_id):
    with pytest.raises(ValueError) as exc:
        d = drive(bad_id, daemon, tmp_path)
        d.list(".")  # whether refused at construction or at first use, it is a ValueError
    assert isinstance(exc.value, DriveError), f"{type(exc.value)} is not a DriveError"
    assert exc.value.code is None, "a bad id is found before any call: .code must be None"
    assert str(exc.value), "the message must say what is wrong"


def test_s3_without_trailing_slash_message_says_what_to_do(daemon, tmp_path):
    with pytest.raises(ValueError, match="/"):
        drive("s3://bucket/prefix", daemon, tmp_path).list(".")


def test_put_missing_local_path_is_file_not_found(daemon, tmp_path, drive_uri):
    d = drive(drive_uri, daemon, tmp_path)
    with pytest.raises(FileNotFoundError) as exc:
        d.put("no_such_file.txt")
    assert isinstance(exc.value, DriveError)
    assert exc.value.code is None, "a missing local file is found before any call"
    assert d.list(".") == []


def test_get_onto_existing_local_path_is_file_exists(daemon, tmp_path, drive_uri):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f.txt").write_bytes(b"new")
    drive(drive_uri, daemon, src).put("f.txt")
    (dst / "f.txt").write_bytes(b"old")
    with pytest.raises(FileExistsError) as exc:
        drive(drive_uri, daemon, dst).get("f.txt")
    assert isinstance(exc.value, DriveError)
    assert exc.value.code is None, "the local target is checked before any call"
    assert (dst / "f.txt").read_bytes() == b"old", "the existing local file must be untouched"


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b"])
def test_absolute_or_dotdot_path_is_value_error(daemon, tmp_path, drive_uri, path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "x").write_bytes(b"x")  # so that "../x" exists locally: only the path is wrong
    (tmp_path / "b").write_bytes(b"b")
    d = drive(drive_uri, daemon, root)
    for call in (lambda: d.put(path), lambda: d.get(path), lambda: d.delete(path), lambda: d.stat(path),
                 lambda: d.list(path)):
        with pytest.raises(ValueError) as exc:
            call()
        assert isinstance(exc.value, DriveError)
        assert exc.value.code in (None, INVALID)
    assert d.list(".") == []
    assert sorted(p.name for p in root.iterdir()) == ["a"], "nothing may be written locally"


# --- Drive: conditions the server reports (code = status) -------------------------------


def test_get_missing_drive_path_is_file_not_found(daemon, tmp_path, drive_uri):
    with pytest.raises(FileNotFoundError) as exc:
        drive(drive_uri, daemon, tmp_path).get("missing.txt")
    assert isinstance(exc.value, DriveError)
    assert exc.value.code == SC.NOT_FOUND
    assert not (tmp_path / "missing.txt").exists()


def test_stat_missing_is_file_not_found(daemon, tmp_path, drive_uri):
    with pytest.raises(FileNotFoundError) as exc:
        drive(drive_uri, daemon, tmp_path).stat("missing.txt")
    assert exc.value.code == SC.NOT_FOUND


def test_delete_not_owned_is_file_not_found(daemon, tmp_path, drive_uri):
    (tmp_path / "f.txt").write_bytes(b"owned by a")
    a = drive(drive_uri, daemon, tmp_path, "comp_a")
    b = drive(drive_uri, daemon, tmp_path, "comp_b")
    a.put("f.txt")
    with pytest.raises(FileNotFoundError) as exc:
        b.delete("f.txt")
    assert isinstance(exc.value, DriveError)
    assert exc.value.code == SC.NOT_FOUND
    assert a.stat("f.txt").component == "comp_a", "the file must still be there"
    with pytest.raises(FileNotFoundError) as exc:
        b.delete("never_put.txt")
    assert exc.value.code == SC.NOT_FOUND


def test_put_held_by_other_component_is_file_exists(daemon, tmp_path, drive_uri):
    (tmp_path / "f.txt").write_bytes(b"first")
    a = drive(drive_uri, daemon, tmp_path, "comp_a")
    b = drive(drive_uri, daemon, tmp_path, "comp_b")
    a.put("f.txt")
    (tmp_path / "f.txt").write_bytes(b"second")
    with pytest.raises(FileExistsError) as exc:
        b.put("f.txt")
    assert isinstance(exc.value, DriveError)
    assert exc.value.code == SC.ALREADY_EXISTS
    st = a.stat("f.txt")
    assert (st.component, st.size, st.sha256) == ("comp_a", 5, sha256_hex(b"first"))


def test_get_timeout_expires_is_timeout_error(daemon, tmp_path, drive_uri):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as exc:
        drive(drive_uri, daemon, tmp_path).get("never.txt", timeout=0.5)
    elapsed = time.monotonic() - t0
    assert isinstance(exc.value, DriveError)
    assert exc.value.code == SC.DEADLINE_EXCEEDED
    assert 0.4 <= elapsed < 10, f"waited {elapsed:.2f}s for a 0.5s timeout"
    assert not (tmp_path / "never.txt").exists()


def test_ambiguous_get_names_components(daemon, tmp_path, drive_uri):
    (tmp_path / "same.txt").write_bytes(b"x")
    drive(drive_uri, daemon, tmp_path, "alpha_comp", allow_duplicates=True).put("same.txt")
    drive(drive_uri, daemon, tmp_path, "beta_comp", allow_duplicates=True).put("same.txt")
    out = tmp_path / "out"
    out.mkdir()
    reader = drive(drive_uri, daemon, out, "reader")
    with pytest.raises(AmbiguousPathError) as exc:
        reader.get("same.txt")
    assert isinstance(exc.value, DriveError)
    assert exc.value.code == SC.FAILED_PRECONDITION
    assert "alpha_comp" in str(exc.value) and "beta_comp" in str(exc.value), str(exc.value)
    with pytest.raises(AmbiguousPathError) as exc:
        reader.stat("same.txt")
    assert exc.value.code == SC.FAILED_PRECONDITION
    assert not (out / "same.txt").exists()
    # naming a component resolves it
    assert reader.get("same.txt", component_name="beta_comp").read_bytes() == b"x"


def test_unreachable_daemon_is_connection_error(tmp_path):
    """With retries off, every call fails at once; with them, a transfer keeps trying for its budget and then
    fails the same way (test_resume)."""
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "a.txt").write_bytes(b"a")
    d = Drive("lit://drive_1", root_folder=str(tmp_path), endpoint=endpoint, retry_seconds=0)
    calls = {
        "list": lambda: d.list("."), "put": lambda: d.put("a.txt"), "get": lambda: d.get("b.txt"),
        "get_wait": lambda: d.get("b.txt", timeout=30), "stat": lambda: d.stat("a.txt"),
        "delete": lambda: d.delete("a.txt"),
        "mount": lambda: Drive("s3://bucket/prefix/", endpoint=endpoint, retry_seconds=0).mount(),
    }
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(ConnectionError) as exc:
            call()
        assert time.monotonic() - t0 < 20, f"{name}: an unreachable daemon should fail fast"
        assert isinstance(exc.value, DriveError), name
        assert exc.value.code == SC.UNAVAILABLE, name
        assert endpoint in str(exc.value), f"{name}: the message must name the endpoint: {exc.value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:50051", "grpc://localhost:50051", "127.0.0.1:99999",
                                      "dns:///localhost:0", "ipv4:127.0.0.1:1,127.0.0.1:70000", "localhost:",
                                      "[::1]:"])
def test_an_endpoint_no_daemon_can_be_at_is_value_error_at_once(twin, tmp_path, endpoint, monkeypatch):
    """gRPC looks a URL up in DNS as one name, takes a port modulo 65536 (99999 is 34463), and an empty one as 443:
    the client tried such an endpoint for its retry_seconds, a minute by default, then said it could not resolve it,
    or talked to whatever listens at the other port. It is refused when the Drive is made, naming what an endpoint
    is."""
    with pytest.raises(ValueError, match="HOST:PORT") as refused:
        twin("lit://drive_1", root_folder=tmp_path, endpoint=endpoint)
    assert endpoint in str(refused.value)
    monkeypatch.setenv("DRIVE_ENDPOINT", endpoint)
    with pytest.raises(ValueError, match="DRIVE_ENDPOINT"):
        twin("lit://drive_1", root_folder=tmp_path)


@pytest.mark.parametrize("token", ["s3cret\n", "sécret"])
def test_a_token_no_header_can_carry_is_value_error_at_once(twin, daemon, drive_uri, token, monkeypatch):
    """A token read from a file keeps its newline (`Path("token").read_text()`): gRPC refused every call, Drive's
    with a bare DriveError "Invalid metadata" (and gRPC's own lines on stderr), AsyncDrive's with grpc's
    ExecuteBatchError, no DriveError at all. It is refused when the Drive is made, saying why, never showing it."""
    with pytest.raises(ValueError, match="printable ASCII") as refused:
        twin(drive_uri, endpoint=daemon.endpoint, token=token).list(".")
    assert token.strip() not in str(refused.value)
    monkeypatch.setenv("DRIVE_TOKEN", token)
    with pytest.raises(ValueError, match=r"\$DRIVE_TOKEN"):
        twin(drive_uri, endpoint=daemon.endpoint).list(".")


def test_default_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("DRIVE_ENDPOINT", raising=False)
    if health_status("127.0.0.1:50051", timeout=0.5) is not None:
        pytest.skip("a daemon is serving on 127.0.0.1:50051 here (make run?): cannot check the default")
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:50051"):
        Drive("lit://drive_1", root_folder=str(tmp_path), retry_seconds=1).list(".")


def test_drive_errors_have_messages(daemon, tmp_path, drive_uri):
    with pytest.raises(DriveError) as exc:
        drive(drive_uri, daemon, tmp_path).get("missing.txt")
    assert "missing.txt" in str(exc.value), f"the message should name the path: {exc.value}"


# --- raw stubs: status codes -------------------------------------------------------------


def test_raw_invalid_argument_bad_drive_and_path(stub, drive_uri):
    for bad_drive in ("lit://bad/name", "lit://", "nope"):
        assert rpc_code(lambda d=bad_drive: stub.List(pb.ListRequest(drive=d, path="."))) == INVALID
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="../x"))) == INVALID
    assert rpc_code(lambda: stub.Put(put_messages(drive_uri, "/abs", b"x"))) == INVALID


def test_raw_invalid_argument_bad_component(stub, drive_uri):
    assert rpc_code(lambda: stub.Put(put_messages(drive_uri, "a.txt", b"x", component="bad/comp"))) == INVALID
    assert rpc_code(lambda: stub.List(pb.ListRequest(drive=drive_uri, path=".", component="a b"))) == INVALID


def test_raw_invalid_argument_stream_order(stub, drive_uri):
    data_first = iter([pb.PutRequest(data=b"abc")])
    assert rpc_code(lambda: stub.Put(data_first)) == INVALID
    header = pb.PutRequest(header=pb.PutHeader(drive=drive_uri, path="a.txt"))
    two_headers = iter([header, pb.PutRequest(data=b"abc"), header])
    assert rpc_code(lambda: stub.Put(two_headers)) == INVALID
    finish_first = iter([pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(b"")))])
    assert rpc_code(lambda: stub.Put(finish_first)) == INVALID
    empty_sha = put_messages(drive_uri, "b.txt", b"abc", sha256="")
    assert rpc_code(lambda: stub.Put(empty_sha)) == INVALID
    assert list(stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []


def test_raw_invalid_argument_get_offsets(stub, drive_uri):
    raw_put(stub, drive_uri, "f.bin", b"0123456789")
    assert rpc_code(lambda: stub.Get(pb.GetRequest(drive=drive_uri, path="f.bin", offset=11))) == INVALID
    assert rpc_code(lambda: stub.Get(pb.GetRequest(drive=drive_uri, path="f.bin", offset=-1))) == INVALID
    assert rpc_code(lambda: stub.Get(pb.GetRequest(drive=drive_uri, path="f.bin", limit=-1))) == INVALID
    # the edges that are fine
    [(info, data)] = raw_get(stub, drive_uri, "f.bin", offset=10)
    assert data == b"" and info.size == 10
    [(_, data)] = raw_get(stub, drive_uri, "f.bin", offset=3, limit=4)
    assert data == b"3456"


def test_raw_wait_that_is_not_a_number_is_invalid(stub, drive_uri):
    request = pb.GetRequest(drive=drive_uri, path="f.bin", wait_seconds=float("nan"))
    t0 = time.monotonic()
    assert rpc_code(lambda: list(stub.Get(request, timeout=20))) == INVALID
    assert time.monotonic() - t0 < 10, "refused at once, not waited for"
    assert list(stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []


@pytest.mark.parametrize("wait", [float("inf"), 86400 * 2], ids=["infinite", "two_days"])
def test_raw_wait_longer_than_a_day_is_invalid(stub, drive_uri, wait):
    request = pb.GetRequest(drive=drive_uri, path="f.bin", wait_seconds=wait)
    t0 = time.monotonic()
    assert rpc_code(lambda: list(stub.Get(request, timeout=20))) == INVALID
    assert time.monotonic() - t0 < 10, "refused at once, not held until the client's deadline"
    assert list(stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []


def test_raw_garbage_page_tokens_are_invalid(stub, drive_uri):
    for name in ("a.txt", "b.txt", "c.txt"):
        raw_put(stub, drive_uri, f"dir/{name}", name.encode())
    first = stub.List(pb.ListRequest(drive=drive_uri, path="dir", page_size=1))
    assert [e.path for e in first.entries] == ["dir/a.txt"] and first.next_page_token
    for token in ("garbage", "dir/a.txt", "1.AAAA", first.next_page_token[:-1] + "x", "é" * 50):
        request = pb.ListRequest(drive=drive_uri, path="dir", page_size=1, page_token=token)
        with pytest.raises(grpc.RpcError) as exc:
            stub.List(request, timeout=10)
        assert exc.value.code() == INVALID, token
        assert "next_page_token" in exc.value.details()
    elsewhere = pb.ListRequest(drive=drive_uri, path=".", page_token=first.next_page_token)
    assert rpc_code(lambda: stub.List(elsewhere, timeout=10)) == INVALID, "a token of another folder"
    second = stub.List(pb.ListRequest(drive=drive_uri, path="dir", page_size=1, page_token=first.next_page_token))
    assert [e.path for e in second.entries] == ["dir/b.txt"]
    assert [e.path for e in stub.List(pb.ListRequest(drive=drive_uri, path="dir")).entries] == [
        "dir/a.txt", "dir/b.txt", "dir/c.txt"
    ]


COMPOSED, DECOMPOSED = "caf\u00e9.txt", "cafe\u0301.txt"  # one name in Unicode NFC and NFD


def test_raw_names_differing_only_by_unicode_normalisation_are_one_name(stub, drive_uri):
    raw_put(stub, drive_uri, DECOMPOSED, b"sent decomposed", component="ca")
    assert rpc_code(lambda: raw_put(stub, drive_uri, COMPOSED, b"other", component="cb")) == SC.ALREADY_EXISTS
    raw_put(stub, drive_uri, COMPOSED, b"sent composed", component="ca")  # the same file again: replaced
    assert [e.path for e in stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries] == [COMPOSED]
    for spelling in (COMPOSED, DECOMPOSED):
        [(info, data)] = raw_get(stub, drive_uri, spelling)
        assert (info.path, data) == (COMPOSED, b"sent composed")
    assert stub.Delete(pb.DeleteRequest(drive=drive_uri, path=DECOMPOSED, component="ca")).files_deleted == 1
    assert list(stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []


def test_raw_a_name_stored_in_nfd_before_is_listed_and_read_with_its_folder(daemon, stub, drive_uri):
    """An earlier daemon kept names as sent: such a name lists as stored, comes with its folder (or the drive
    root) and goes with a delete of its folder, but its own path now names the NFC spelling."""
    raw_put(stub, drive_uri, "dir/plain.txt", b"plain")
    raw_put(stub, drive_uri, f"dir/{COMPOSED}", b"stored before")
    folder = daemon.data_dir / "objects" / drive_uri.removeprefix("lit://") / "default" / "dir"
    os.rename(folder / COMPOSED, folder / DECOMPOSED)  # as an earlier daemon kept a name sent in NFD
    assert [e.path for e in stub.List(pb.ListRequest(drive=drive_uri, path="dir")).entries] == [
        f"dir/{DECOMPOSED}", "dir/plain.txt"
    ]
    assert rpc_code(lambda: raw_get(stub, drive_uri, f"dir/{DECOMPOSED}")) == SC.NOT_FOUND
    assert {info.path: data for info, data in raw_get(stub, drive_uri, "dir")} == {
        f"dir/{DECOMPOSED}": b"stored before", "dir/plain.txt": b"plain"
    }
    assert stub.Delete(pb.DeleteRequest(drive=drive_uri, path="dir")).files_deleted == 2


def test_unexpected_error_is_internal_naming_no_server_path(daemon, stub, drive_uri):
    """An error the daemon does not expect answers INTERNAL: the message names its kind and the daemon
    log (which has the traceback), never a path on the server."""
    raw_put(stub, drive_uri, "kept.txt", b"kept")
    folder = daemon.data_dir / "objects" / drive_uri.removeprefix("lit://") / "default"
    # A socket where a stored file would be: opening it fails with ENXIO, which no backend code expects.
    # Bound by a relative name in a child process, as the full path may be longer than a socket name can be.
    bind = "import socket; socket.socket(socket.AF_UNIX).bind('odd')"
    subprocess.run([sys.executable, "-c", bind], cwd=folder, check=True, timeout=30)
    for call in (
        lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="odd"), timeout=10),
        lambda: list(stub.Get(pb.GetRequest(drive=drive_uri, path="odd"), timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == SC.INTERNAL
        details = exc.value.details()
        assert "see the daemon log" in details and "OSError" in details, details
        assert str(daemon.data_dir) not in details and "/" not in details, f"a server path in: {details}"
    assert "Traceback" in daemon.log() and str(folder / "odd") in daemon.log(), "the log has what went wrong"
    [(_, data)] = raw_get(stub, drive_uri, "kept.txt")
    assert data == b"kept"


def test_raw_put_over_folder_or_under_file_is_invalid(stub, drive_uri):
    raw_put(stub, drive_uri, "dir/f.txt", b"x")
    assert rpc_code(lambda: raw_put(stub, drive_uri, "dir", b"y")) == INVALID
    assert rpc_code(lambda: raw_put(stub, drive_uri, "dir/f.txt/g.txt", b"y")) == INVALID
    [(_, data)] = raw_get(stub, drive_uri, "dir/f.txt")
    assert data == b"x"


def test_raw_not_found(stub, drive_uri):
    nf = SC.NOT_FOUND
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="nope"))) == nf
    assert rpc_code(lambda: stub.Get(pb.GetRequest(drive=drive_uri, path="nope"))) == nf
    assert rpc_code(lambda: stub.Delete(pb.DeleteRequest(drive=drive_uri, path="nope"))) == nf
    raw_put(stub, drive_uri, "mine.txt", b"x", component="owner")
    other_delete = pb.DeleteRequest(drive=drive_uri, path="mine.txt", component="other")
    assert rpc_code(lambda: stub.Delete(other_delete)) == nf
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="mine.txt")).component == "owner"
    # a component-filtered read of a path only another component holds
    other_stat = pb.StatRequest(drive=drive_uri, path="mine.txt", component="other")
    assert rpc_code(lambda: stub.Stat(other_stat)) == nf


def test_raw_delete_retry_marks_its_not_found_and_a_bad_request_id_is_invalid_and_removes_nothing(stub, drive_uri):
    raw_put(stub, drive_uri, "kept.txt", b"kept")
    bad = [pb.DeleteRequest(drive=drive_uri, path="kept.txt", request_id=request_id, retry=True)
           for request_id in ("has space", "x" * 129, "dot.ted", "\u00e9", "")]
    for request in bad:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Delete(request)
        assert refused.value.code() == INVALID and "request" in refused.value.details(), request.request_id
    [(_, data)] = raw_get(stub, drive_uri, "kept.txt")
    assert data == b"kept"
    looked = ("drived-looked-back", "1")  # the daemon looked for the request's earlier deletes, and found none
    for retry, marked in ((True, True), (False, False)):
        with pytest.raises(grpc.RpcError) as missing:
            stub.Delete(pb.DeleteRequest(drive=drive_uri, path="nope", request_id="r-1", retry=retry))
        assert missing.value.code() == SC.NOT_FOUND
        assert (looked in missing.value.trailing_metadata()) == marked


def test_raw_already_exists(stub, drive_uri):
    raw_put(stub, drive_uri, "f.txt", b"a", component="ca")
    assert rpc_code(lambda: raw_put(stub, drive_uri, "f.txt", b"b", component="cb")) == SC.ALREADY_EXISTS
    info = stub.Stat(pb.StatRequest(drive=drive_uri, path="f.txt"))
    assert (info.component, info.sha256) == ("ca", sha256_hex(b"a"))


def put_one(stub, drive_uri: str, path: str, data: bytes, component: str, how: str) -> None:
    """Puts one file as a Put stream or as a PutFile call."""
    if how == "stream":
        raw_put(stub, drive_uri, path, data, component=component)
    else:
        header = pb.PutHeader(drive=drive_uri, path=path, component=component)
        stub.PutFile(pb.PutFileRequest(header=header, data=data, sha256=sha256_hex(data)), timeout=60)


@pytest.mark.parametrize(
    "how, size", [("stream", 5), ("stream", 2 * MIB), ("putfile", 5)],  # a big one is checked before its bytes
    ids=["small_stream", "big_stream", "putfile"],
)
@pytest.mark.parametrize(
    "first, second",
    [("x", "x/y"), ("x", "x/y/z"), ("x/y", "x"), ("x/y/z", "x")],
    ids=["file_then_below", "file_then_deep_below", "folder_then_file", "deep_folder_then_file"],
)
def test_raw_file_and_folder_of_one_path_in_two_components_refused(stub, drive_uri, how, size, first, second):
    """A file in one component and a folder of the same path in another are duplicates too.

    Both accepted, every later get of the path without a component would be ambiguous.
    """
    raw_put(stub, drive_uri, first, b"first", component="ca")
    data = os.urandom(size)
    assert rpc_code(lambda: put_one(stub, drive_uri, second, data, "cb", how)) == SC.ALREADY_EXISTS
    assert [e.path for e in stub.List(pb.ListRequest(drive=drive_uri, path=".", component="cb")).entries] == []
    [(info, got)] = raw_get(stub, drive_uri, first)
    assert (info.component, got) == ("ca", b"first")
    # allowed when the caller asks for duplicates; the path then names a file and a folder
    raw_put(stub, drive_uri, second, data, component="cb", allow_duplicates=True)
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path=second, component="cb")).size == size


def test_raw_what_another_component_holds_is_named(daemon, stub, drive_uri):
    """A put refused for another component's file or folder says which, and where; a symbolic link planted in
    that component's folders is refused as everywhere else."""
    raw_put(stub, drive_uri, "x/y", b"first", component="ca")
    raw_put(stub, drive_uri, "x/f", b"first", component="ca")
    holds = {
        "x": "is a folder of component 'ca'",
        "x/y": "is already held by component 'ca'",
        "x/y/z": "is below 'x/y', a file of component 'ca'",
    }
    for path, what in holds.items():
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive_uri, path, b"second", component="cb")
        assert refused.value.code() == SC.ALREADY_EXISTS and what in refused.value.details(), path
    raw_put(stub, drive_uri, "x/w/v", b"beside", component="cb")  # nothing of ca's at x/w: stored
    folder = daemon.data_dir / "objects" / drive_uri.removeprefix("lit://") / "ca" / "x"
    os.symlink(folder, folder / "alias")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive_uri, "x/alias/y", b"second", component="cb")
        assert refused.value.code() == INVALID and "symbolic link" in refused.value.details()
    finally:
        (folder / "alias").unlink()
    listed = stub.List(pb.ListRequest(drive=drive_uri, path=".", component="cb", recursive=True)).entries
    assert [e.path for e in listed] == ["x/w/v"]
    assert [data for _, data in raw_get(stub, drive_uri, "x/y")] == [b"first"]


@pytest.mark.parametrize("mtime", ["settled", "same tick"])
def test_raw_already_exists_sees_a_new_component(daemon, stub, drive_uri, mtime):
    """The daemon remembers a drive's components by its folder's mtime: a new one is never missed.

    "settled": the folder's mtime is old, so its components are remembered, and a new
    component changes the mtime. "same tick": a second change within one tick of the
    file system's clock leaves the mtime as it was (set back here), so a fresh mtime
    must not be trusted.
    """
    raw_put(stub, drive_uri, "a.txt", b"a", component="ca")
    folder = daemon.data_dir / "objects" / drive_uri.removeprefix("lit://")
    fresh = folder.stat().st_mtime_ns
    if mtime == "settled":
        os.utime(folder, ns=(fresh - 10**10, fresh - 10**10))
    raw_put(stub, drive_uri, "b.txt", b"b", component="ca")  # reads (and may remember) the components
    raw_put(stub, drive_uri, "f.txt", b"f", component="cb")
    if mtime == "same tick":
        os.utime(folder, ns=(fresh, fresh))
    assert rpc_code(lambda: raw_put(stub, drive_uri, "f.txt", b"c", component="cc")) == SC.ALREADY_EXISTS
    info = stub.Stat(pb.StatRequest(drive=drive_uri, path="f.txt"))
    assert (info.component, info.sha256) == ("cb", sha256_hex(b"f"))
    assert sorted(e.path for e in stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == [
        "a.txt", "b.txt", "f.txt"
    ]


def test_raw_failed_precondition(stub, drive_uri):
    raw_put(stub, drive_uri, "f.txt", b"a", component="ca", allow_duplicates=True)
    raw_put(stub, drive_uri, "f.txt", b"b", component="cb", allow_duplicates=True)
    fp = SC.FAILED_PRECONDITION
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="f.txt"))) == fp
    try:
        list(stub.Get(pb.GetRequest(drive=drive_uri, path="f.txt"), timeout=10))
        raise AssertionError("ambiguous Get succeeded")
    except grpc.RpcError as err:
        assert err.code() == fp
        assert "ca" in err.details() and "cb" in err.details(), err.details()
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="f.txt", component="cb")).sha256 == sha256_hex(b"b")


def test_raw_deadline_exceeded_on_wait(stub, drive_uri):
    t0 = time.monotonic()
    code = rpc_code(
        lambda: list(stub.Get(pb.GetRequest(drive=drive_uri, path="late.txt", wait_seconds=0.3), timeout=20))
    )
    assert code == SC.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("size", [0, 5, MIB + 3])
def test_raw_data_loss_on_wrong_sha256_stores_nothing(stub, drive_uri, size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    wrong = sha256_hex(data + b"!")
    assert rpc_code(lambda: raw_put(stub, drive_uri, "f.bin", data, sha256=wrong)) == SC.DATA_LOSS
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="f.bin"))) == SC.NOT_FOUND
    assert list(stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []


def test_raw_data_loss_keeps_previous_version(stub, drive_uri):
    raw_put(stub, drive_uri, "f.bin", b"version one")
    code = rpc_code(lambda: raw_put(stub, drive_uri, "f.bin", b"version two", sha256=sha256_hex(b"other")))
    assert code == SC.DATA_LOSS
    [(info, data)] = raw_get(stub, drive_uri, "f.bin")
    assert data == b"version one" and info.sha256 == sha256_hex(b"version one")


def test_raw_data_loss_on_size_mismatch(stub, drive_uri):
    code = rpc_code(lambda: raw_put(stub, drive_uri, "f.bin", b"12345", size=6))
    assert code == SC.DATA_LOSS
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="f.bin"))) == SC.NOT_FOUND


def test_raw_aborted_on_if_match(stub, drive_uri):
    raw_put(stub, drive_uri, "f.bin", b"abc")
    code = rpc_code(lambda: stub.Get(pb.GetRequest(drive=drive_uri, path="f.bin", if_match=sha256_hex(b"x"))))
    assert code == SC.ABORTED
    [(_, data)] = raw_get(stub, drive_uri, "f.bin", if_match=sha256_hex(b"abc"))
    assert data == b"abc"


def test_raw_mount_of_lit_drive_is_invalid(stub, drive_uri):
    assert rpc_code(lambda: stub.Mount(pb.MountRequest(drive=drive_uri))) == INVALID


def test_raw_wait_answered_by_put(stub, drive_uri, daemon):
    """A waiting Get is answered when a put commits (not only at its deadline)."""
    result: dict[str, object] = {}

    def reader():
        result["files"] = raw_get(stub, drive_uri, "late.txt", wait_seconds=30)
        result["t"] = time.monotonic()

    waiting = daemon.open_requests("Get")
    t = threading.Thread(target=reader)
    t.start()
    daemon.wait_open("Get", waiting + 1)
    raw_put(stub, drive_uri, "late.txt", b"arrived")
    t_put = time.monotonic()
    t.join(20)
    assert not t.is_alive()
    [(info, data)] = result["files"]
    assert data == b"arrived" and info.path == "late.txt"
    assert result["t"] - t_put < 5, "the waiting Get must be answered soon after the put commits"
