"""Hostile input, property-based (hypothesis): random paths, drive ids and components on every RPC, Put
streams of random message sequences (data before a header, two headers, finishes without a file, oversized
chunks, empty messages), Get ranges and waits, and garbage page tokens. Each gets its documented status, the
daemon stays up, and its data dir is byte for byte what it was.

The status each input should get is worked out here from the rules the proto states, not asked of the
daemon: a drive, path or component that `drive_client.uri` refuses is INVALID_ARGUMENT on every call, and so
on. Example counts are small (CI runs them on every commit); `HYPOTHESIS_PROFILE=thorough` runs more.
"""

from __future__ import annotations

import math
import os
import unicodedata

import grpc
import pytest
from conftest import MIB, DaemonHandle, health_status, raw_put, sha256_hex, snapshot, wait_until
from grpc_health.v1 import health_pb2
from hypothesis import assume, given
from hypothesis import strategies as st

from drive_client.errors import InvalidArgument
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drive_client.uri import check_component, normalize_path, parse_drive
from drived.requests import MAX_WAIT_SECONDS

pytestmark = pytest.mark.timeout(600)

SC = grpc.StatusCode
SEEDED = "lit://hostile_seeded"
FILE = "seeded/f.bin"
FILE_BYTES = b"0123456789" * 100
MESSAGE_LIMIT = 4 << 20  # the daemon's receive limit (drived.server.MESSAGE_LIMIT)

@pytest.fixture(scope="module")
def seeded(own_daemon: DaemonHandle):
    """The module's daemon holding one drive of a few files; yields (handle, stub, snapshot of its data dir)."""
    options = [("grpc.max_send_message_length", 16 << 20)]
    with grpc.insecure_channel(own_daemon.endpoint, options=options) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, SEEDED, FILE, FILE_BYTES, component="ca")
        raw_put(stub, SEEDED, "seeded/big.bin", os.urandom(2 * MIB), component="cb")
        yield own_daemon, stub, snapshot(own_daemon.data_dir)


def assert_unchanged(seeded) -> None:
    handle, _, before = seeded
    # A refused upload's temporary file goes as its stream ends, which can be just after the status.
    assert wait_until(lambda: snapshot(handle.data_dir) == before, 5), (
        f"the data dir changed: {sorted(set(snapshot(handle.data_dir)) ^ set(before))}"
    )


def status_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        assert err.details(), "a refusal says why"
        return err.code()
    return SC.OK


# --- drive ids, paths and components ------------------------------------------------------------

NAME_CHARS = st.characters(codec="utf-8", exclude_characters="\ud800")
hostile_text = st.one_of(
    st.text(NAME_CHARS, max_size=40),
    st.lists(st.sampled_from([*"./\\\x00\n\x7f ~é", "e\u0301"]), max_size=12).map("".join),  # NFD too
    st.sampled_from(["", ".", "..", "../x", "/etc/passwd", "a//b/./c", "a/../b", "x" * 300, "a/" * 2100, "\x00"]),
)
drives = st.one_of(
    hostile_text,
    hostile_text.map(lambda name: "lit://" + name),
    st.from_regex(r"lit://hyp_[a-z0-9]{1,8}", fullmatch=True),
)


def valid(check, *args) -> bool:
    try:
        check(*args)
    except InvalidArgument:
        return False
    return True


def lit_path(path: str, allow_root: bool) -> bool:
    return valid(normalize_path, unicodedata.normalize("NFC", path), allow_root)


@given(drive=drives, path=hostile_text, component=st.one_of(hostile_text, st.just("")))
def test_any_drive_path_and_component_gets_its_documented_status(seeded, drive, path, component):
    _, stub, _ = seeded
    drive_ok = valid(parse_drive, drive)
    assume(not (drive_ok and parse_drive(drive).scheme == "s3"))  # an s3:// location would be mounted
    assume(drive != SEEDED)
    component_ok = valid(check_component, component)
    fields = {"drive": drive, "path": path, "component": component}
    data = b"hostile"
    expected_put = SC.DATA_LOSS if drive_ok and component_ok and lit_path(path, False) else SC.INVALID_ARGUMENT
    calls = {
        "Put": (lambda: raw_put(stub, drive, path, data, component=component, sha256="0" * 64), expected_put),
        "PutFile": (lambda: stub.PutFile(pb.PutFileRequest(header=pb.PutHeader(**fields), data=data,
                                                           sha256="0" * 64), timeout=10), expected_put),
    }
    for name, request, allow_root, found in (
        ("Get", lambda: stub.Get(pb.GetRequest(**fields), timeout=10), True, SC.NOT_FOUND),
        ("Stat", lambda: stub.Stat(pb.StatRequest(**fields), timeout=10), False, SC.NOT_FOUND),
        ("Delete", lambda: stub.Delete(pb.DeleteRequest(**fields), timeout=10), False, SC.NOT_FOUND),
        ("List", lambda: stub.List(pb.ListRequest(**fields), timeout=10), True, SC.OK),
        ("Watch", lambda: stub.Watch(pb.WatchRequest(**fields), timeout=0.2), True, SC.DEADLINE_EXCEEDED),
    ):
        ok = drive_ok and component_ok and lit_path(path, allow_root)
        calls[name] = (request, found if ok else SC.INVALID_ARGUMENT)
    for name, (call, expected) in calls.items():
        assert status_of(call) == expected, f"{name} {fields!r}"
    assert_unchanged(seeded)


# --- Put streams of any message order -----------------------------------------------------------

KINDS = ["header", "bad_header", "data", "big_data", "oversized", "finish", "no_sha", "file", "empty"]


def message(kind: str, i: int) -> pb.PutRequest:
    header = pb.PutHeader(drive="lit://hyp_stream", path=f"f{i}.bin")
    if kind == "header":
        return pb.PutRequest(header=header)
    if kind == "bad_header":
        return pb.PutRequest(header=pb.PutHeader(drive="lit://hyp_stream", path="../escape"))
    if kind == "data":
        return pb.PutRequest(data=b"d" * 100)
    if kind == "big_data":
        return pb.PutRequest(data=os.urandom(MIB + 1))  # the upload is then a file in tmp/
    if kind == "oversized":
        return pb.PutRequest(data=b"o" * (MESSAGE_LIMIT + 1))
    if kind == "finish":
        return pb.PutRequest(finish=pb.PutFinish(sha256="0" * 64))  # never the bytes' sha256: nothing stored
    if kind == "no_sha":
        return pb.PutRequest(finish=pb.PutFinish())
    if kind == "file":
        return pb.PutRequest(file=pb.PutFileRequest(header=header, data=b"x", sha256="0" * 64))
    return pb.PutRequest()


def expected_statuses(kinds: list[str]) -> set[grpc.StatusCode]:
    """What the proto's stream rules give a Put of these messages: the first refusal, or a commit's DATA_LOSS,
    which may be reported before a later message's refusal or after it (commits run beside the stream)."""
    pending, committed = False, False
    for kind in kinds:
        refusal = None
        if kind == "oversized":
            refusal = SC.RESOURCE_EXHAUSTED  # grpc's own message limit, whatever the state
        elif kind in ("header", "file"):
            refusal = SC.INVALID_ARGUMENT if pending else None
            committed |= kind == "file" and not pending
            pending = kind == "header" and not pending
        elif kind in ("bad_header", "empty", "no_sha"):
            refusal = SC.INVALID_ARGUMENT
        elif kind in ("data", "big_data"):
            refusal = None if pending else SC.INVALID_ARGUMENT
        elif kind == "finish":
            refusal = None if pending else SC.INVALID_ARGUMENT
            committed |= pending
            pending = False
        if refusal is not None:
            return {refusal, SC.DATA_LOSS} if committed else {refusal}
    if pending:
        return {SC.INVALID_ARGUMENT, SC.DATA_LOSS} if committed else {SC.INVALID_ARGUMENT}
    return {SC.DATA_LOSS} if committed else {SC.OK}


@given(kinds=st.lists(st.sampled_from(KINDS), max_size=6))
def test_any_put_message_sequence_gets_its_documented_status(seeded, kinds):
    _, stub, _ = seeded
    messages = [message(kind, i) for i, kind in enumerate(kinds)]
    got = status_of(lambda: stub.Put(iter(messages), timeout=30))
    assert got in expected_statuses(kinds), f"{kinds}: {got}"
    assert_unchanged(seeded)


# --- Get ranges and waits, List pages -------------------------------------------------------------

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
waits = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, MAX_WAIT_SECONDS + 1]))


@given(offset=st.one_of(int64, st.integers(0, len(FILE_BYTES) + 2)), limit=st.one_of(int64, st.integers(0, 50)),
       wait=waits)
def test_any_get_range_and_wait_gets_its_documented_status(seeded, offset, limit, wait):
    _, stub, _ = seeded
    request = pb.GetRequest(drive=SEEDED, path=FILE, offset=offset, limit=limit, wait_seconds=wait)
    if offset < 0 or limit < 0 or math.isnan(wait) or wait > MAX_WAIT_SECONDS or offset > len(FILE_BYTES):
        assert status_of(lambda: stub.Get(request, timeout=10)) == SC.INVALID_ARGUMENT
    else:
        expected = FILE_BYTES[offset:offset + limit] if limit else FILE_BYTES[offset:]
        assert b"".join(answer.data for answer in stub.Get(request, timeout=10)) == expected
    assert_unchanged(seeded)


@given(token=st.text(max_size=60), page_size=st.integers(-(2**31), 2**31 - 1))
def test_any_page_token_and_size_gets_its_documented_status(seeded, token, page_size):
    _, stub, _ = seeded
    request = pb.ListRequest(drive=SEEDED, path="seeded", page_size=page_size, page_token=token)
    if page_size < 0 or token:
        assert status_of(lambda: stub.List(request, timeout=10)) == SC.INVALID_ARGUMENT
    else:
        assert [e.path for e in stub.List(request, timeout=10).entries] == ["seeded/big.bin", "seeded/f.bin"]
    assert_unchanged(seeded)


def test_the_daemon_is_still_serving(seeded):
    """Last in the module: after every example above, the daemon answers and holds what it held."""
    handle, stub, _ = seeded
    assert health_status(handle.endpoint, timeout=5) == health_pb2.HealthCheckResponse.SERVING
    [answer_info, answer_data] = list(stub.Get(pb.GetRequest(drive=SEEDED, path=FILE), timeout=10))
    assert answer_info.info.sha256 == sha256_hex(FILE_BYTES) and answer_data.data == FILE_BYTES
    assert_unchanged(seeded)
