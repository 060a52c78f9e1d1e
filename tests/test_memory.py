"""The daemon's memory stays bounded by its configuration whatever clients do, and is returned when they leave.

500 uploads that each sent one ~3.9 MiB chunk and stalled took a daemon from 82 MiB to 2,061 MiB, and it
kept that after they ended (a second wave: 2,905 MiB): each stalled stream held its last chunk, and the
allocator kept every freed chunk buffer. The bound README's "Failure behaviour" states: a stream that
waits on its client holds no chunk, and the allocator keeps at most `drive_client.malloc.KEEP_FREE` of
freed memory once a look at the streams (at most a second) has passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import MIB, StalledPuts, no_uploads, raw_put, rss_mib, snapshot, upload_bytes, wait_until
from crc32c import crc32c
from partial_requests import PartialRequests

from bench.services import peak_rss_mib, reset_peak_rss
from drive_client import Drive
from drive_client.malloc import KEEP_FREE
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drived.answers import PER_PEER
from drived.service import ARRIVAL_GRACE

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="reads the daemon's memory from /proc (Linux only)"),
    pytest.mark.timeout(300),
]

STREAMS = 200
CHUNK = int(3.9 * MIB)
PER_STALLED_STREAM_MIB = 0.25  # gRPC's call, the upload's state: measured ~0.09 MiB
SLACK_MIB = 24  # what else moves between two readings (the executor's threads, the log, the metrics)


def test_stalled_uploads_hold_no_chunks_and_their_memory_is_returned(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--max-streams-per-peer", str(STREAMS * 2))
    (tmp_path / "warm.bin").write_bytes(os.urandom(16 * MIB))
    warm = Drive("lit://memory", root_folder=str(tmp_path), endpoint=handle.endpoint)
    warm.put("warm.bin")
    warm.get("warm.bin", overwrite=True)  # the daemon's buffers and threads are up: its resting size
    baseline = rss_mib(handle.proc.pid)
    kept = KEEP_FREE / MIB
    chunk = os.urandom(CHUNK)

    def first_messages(i: int) -> list:
        return [pb.PutRequest(header=pb.PutHeader(drive="lit://memory", path=f"stalled/{i}.bin")), chunk]

    for wave in (1, 2):
        with StalledPuts(handle.endpoint, STREAMS, first_messages) as stalled:
            assert wait_until(lambda: upload_bytes(handle.data_dir) >= STREAMS * CHUNK, 60), (
                f"the chunks did not all reach the daemon: {upload_bytes(handle.data_dir)} bytes"
            )
            assert stalled.open() == STREAMS, stalled.refused()
            bound = baseline + kept + STREAMS * PER_STALLED_STREAM_MIB + SLACK_MIB
            held = wait_until(lambda bound=bound: rss_mib(handle.proc.pid) <= bound, 15)
            during = rss_mib(handle.proc.pid)
            print(f"wave {wave}: {STREAMS} stalled uploads of {CHUNK / MIB:.1f} MiB: daemon {during:.0f} MiB "
                  f"(baseline {baseline:.0f} MiB, bound {bound:.0f} MiB)")
            assert held, f"{STREAMS} stalled uploads keep the daemon at {during:.0f} MiB (bound {bound:.0f} MiB)"
        assert wait_until(lambda: no_uploads(handle.data_dir) and handle.open_requests("Put") == 0, 30)
        bound = baseline + kept + SLACK_MIB
        returned = wait_until(lambda bound=bound: rss_mib(handle.proc.pid) <= bound, 15)
        after = rss_mib(handle.proc.pid)
        print(f"wave {wave}: after the streams ended: daemon {after:.0f} MiB (bound {bound:.0f} MiB)")
        assert returned, f"the daemon kept {after:.0f} MiB after the streams ended (bound {bound:.0f} MiB)"
    assert Drive("lit://memory", endpoint=handle.endpoint).list("stalled") == [], "nothing of theirs is stored"


DEEP = "/".join(["x" * 250] * 15)  # 3,764 bytes of folders: a page of 1,000 files' entries takes ~3.8 MB


def test_list_answers_a_client_does_not_take_hold_at_most_the_answer_room(start_daemon, tmp_path):
    """200 List calls of ~3.8 MB pages from a client that stopped reading took a daemon from 88 MiB to 2,087 MiB:
    gRPC holds an answer until its client takes it, and a List was admitted whatever the answers held. Each List
    now takes room before it builds its answer (`drived.answers`): a host's calls wait behind its own answers not
    yet taken, and are answered once its stalled client's connection is closed (it answers no keepalive ping)."""
    # The daemon pings every 2 s, not 20 s, and waits 10 s for an answer as in production: the stopped client's
    # connection is closed 10-12 s after it stopped (not 10-30 s), the checks below that it still holds up a List
    # having as long as they had.
    handle = start_daemon(tmp_path, before="import drived.server as s; s.KEEPALIVE_TIME = 2.0")
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    for start in (0, 500):
        stub.Put((pb.PutRequest(file=pb.PutFileRequest(header=pb.PutHeader(drive="lit://lists", path=f"{DEEP}/f{i}"),
                                                        data=b"", crc32c=0)) for i in range(start, start + 500)),
                 timeout=120)
    stub.Put(iter([pb.PutRequest(file=pb.PutFileRequest(header=pb.PutHeader(drive="lit://lists", path="small"),
                                                         data=b"s", crc32c=crc32c(b"s")))]), timeout=60)
    page = pb.ListRequest(drive="lit://lists", path=".", recursive=True, page_size=10000)
    assert len(stub.List(page, timeout=60).entries) == 1001
    baseline = rss_mib(handle.proc.pid)
    stalled = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, time, grpc
from drive_client.pb import drive_pb2 as pb, drive_pb2_grpc
channel = grpc.insecure_channel("{handle.endpoint}", options=[("grpc.max_receive_message_length", 8 << 20)])
stub = drive_pb2_grpc.DriveServiceStub(channel)
page = pb.ListRequest(drive="lit://lists", path=".", recursive=True, page_size=10000)
calls = [stub.List.future(page, timeout=600) for _ in range(200)]
time.sleep(1)  # the calls reach the daemon
os.kill(os.getpid(), signal.SIGSTOP)  # a client that stops reading: stalled, swapped out, or hostile
"""])
    try:
        assert wait_until(lambda: _state(stalled.pid) == "T", 30), "the client never stopped"
        assert wait_until(lambda: handle.open_requests("List") >= 100, 30), (
            f"{handle.open_requests('List')} Lists wait for room: the daemon built the others' answers, which it holds "
            f"while their client does not take them ({rss_mib(handle.proc.pid):.0f} MiB, baseline {baseline:.0f})")
        waiting = stub.List.future(pb.ListRequest(drive="lit://lists", path="small"), timeout=60)  # the same host
        bound = baseline + PER_PEER / MIB + KEEP_FREE / MIB + SLACK_MIB
        held = wait_until(lambda: rss_mib(handle.proc.pid) <= bound, 15)
        during = rss_mib(handle.proc.pid)
        print(f"200 List answers not taken: daemon {during:.0f} MiB (baseline {baseline:.0f}, bound {bound:.0f})")
        assert held, f"200 List answers not taken keep the daemon at {during:.0f} MiB (bound {bound:.0f} MiB)"
        assert not waiting.done(), "a List passed the room its host's answers hold"
        # The stopped client answers none of the daemon's keepalive pings: its connection is closed (within ~30 s
        # unpatched), and its calls' room comes back (a process stopped in a debugger no longer holds up its host's
        # Lists).
        assert [e.path for e in waiting.result(timeout=60).entries] == ["small"]
        assert _state(stalled.pid) == "T", "the client was not stopped all along"
        assert wait_until(lambda: handle.open_requests("List") == 0, 30), handle.open_requests("List")
    finally:
        stalled.kill()
        stalled.wait()


ARRIVING = 4  # --max-streams-per-peer in the test below
IN_PART = 2 * MIB  # what comes of each call's 4 MB request


HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.mark.parametrize("method, token", [
    ("PutFile", ""), ("Stat", ""), ("Stat", "a-token"), (HEALTH, "a-token"), (REFLECTION, ""),
])
def test_requests_that_arrive_in_part_hold_memory_only_while_admitted(start_daemon, tmp_path, method, token):
    """300 calls whose client sent 2 of each request's 4 MB and stalled, answering the daemon's pings, took a
    daemon from 66 to 658 MiB, without a token too: gRPC holds what came of a request until all of it has, and
    ran the daemon's code (the token, the stream caps, the idle check) only then. A call now waits for its
    request in a place among the streams, or (List, Stat, ...) among the requests arriving once it has taken
    ARRIVAL_GRACE: beyond --max-streams-per-peer it is refused, one without a token before anything, and an
    admitted one that stops arriving is ended by the idle check. A request that comes whole takes no place
    among those arriving, so a client filling them refuses no one else (a List of the same host, meanwhile).
    Health and reflection, open without a token, read theirs alike (they held 356 MiB of 150 such calls)."""
    extra = ("--token", token) if token else ()
    handle = start_daemon(tmp_path, "--max-streams", "8", "--max-streams-per-peer", str(ARRIVING),
                          "--stream-idle-timeout", "6", *extra)
    before = {e.path for e in _listed(handle.endpoint, token)}
    baseline = rss_mib(handle.proc.pid)
    attacker = PartialRequests(int(handle.endpoint.rpartition(":")[2]))
    try:
        path = method if method.startswith("/") else f"/drive.v1.DriveService/{method}"
        calls = [attacker.call(path, 4_000_000, IN_PART) for _ in range(100)]
        # What came of the requests not yet refused (a call that is no stream is refused only once its request
        # has taken ARRIVAL_GRACE) goes within that and a look at the streams; the admitted ones stall on.
        bound = baseline + ARRIVING * IN_PART / MIB + KEEP_FREE / MIB + SLACK_MIB
        held = wait_until(lambda: rss_mib(handle.proc.pid) <= bound, ARRIVAL_GRACE + 2)
        during = rss_mib(handle.proc.pid)
        print(f"100 requests arriving in part: daemon {during:.0f} MiB (baseline {baseline:.0f}, bound {bound:.0f})")
        assert held, f"100 requests arriving in part keep the daemon at {during:.0f} MiB"
        assert {e.path for e in _listed(handle.endpoint, token)} == before  # while they hold their places
        assert wait_until(lambda: set(calls) <= attacker.ended, 30), "calls the daemon neither refused nor ended"
    finally:
        attacker.close()
    assert handle.log().count('"event": "idle stream cancelled"') == (0 if token and method == "Stat" else ARRIVING)
    if method.startswith("/"):  # not logged as requests
        return

    def logged() -> list[str]:  # a call's line is written once its status is sent: the last may come after it
        # Refusals past the log's rate are counted in summary lines, which name no method (`drived.refusals`):
        # this test's calls are the only ones refused.
        lines = list(map(json.loads, handle.log().splitlines()))
        statuses = [line["status"] for line in lines if line.get("event") == "request" and line.get("method") == method]
        for line in lines:
            if line.get("event") == "refused calls not logged":
                statuses += [line["status"]] * line["calls"]
        return statuses

    assert wait_until(lambda: len(logged()) == 100, 10), logged()
    statuses = logged()
    if token:
        assert statuses == ["UNAUTHENTICATED"] * 100, statuses
    else:
        assert sorted(statuses) == ["RESOURCE_EXHAUSTED"] * (100 - ARRIVING) + ["UNAVAILABLE"] * ARRIVING, statuses
    assert {e.path for e in _listed(handle.endpoint, token)} == before


def test_a_call_cancelled_while_its_request_arrives_gives_its_place_back(start_daemon, tmp_path):
    """A client that gives up on calls whose request has not all come, in ARRIVAL_GRACE or in a place, gets its
    places back, and each is logged CANCELLED (gRPC ends its read as if the request had ended without its message,
    and cancels the call only a moment later: they were logged INVALID_ARGUMENT)."""
    handle = start_daemon(tmp_path, "--max-streams", "8", "--max-streams-per-peer", str(ARRIVING))
    attacker = PartialRequests(int(handle.endpoint.rpartition(":")[2]))
    try:
        early = attacker.call("/drive.v1.DriveService/Stat", 4_000_000, IN_PART)
        attacker.reset(early)  # within the grace
        placed = [attacker.call("/drive.v1.DriveService/Stat", 4_000_000, IN_PART) for _ in range(ARRIVING)]
        time.sleep(ARRIVAL_GRACE + 0.5)  # each has its place now
        for stream in placed:
            attacker.reset(stream)

        def logged() -> list[str]:
            return [line["status"] for line in map(json.loads, handle.log().splitlines())
                    if line.get("event") == "request" and line.get("method") == "Stat"]

        assert wait_until(lambda: len(logged()) == 1 + ARRIVING, 10), logged()
        assert set(logged()) == {"CANCELLED"}
        again = [attacker.call("/drive.v1.DriveService/Stat", 4_000_000, IN_PART) for _ in range(ARRIVING)]
        time.sleep(ARRIVAL_GRACE + 0.5)
        assert not attacker.ended & set(again), "the places of the cancelled calls were kept"
    finally:
        attacker.close()


def test_a_call_whose_request_ends_without_its_message_is_refused(start_daemon, tmp_path):
    """The counterpart of the cancelled calls above: a request that ends before its message is refused
    INVALID_ARGUMENT, and so logged."""
    handle = start_daemon(tmp_path)
    attacker = PartialRequests(int(handle.endpoint.rpartition(":")[2]))
    try:
        for method in ("/drive.v1.DriveService/Stat", "/grpc.health.v1.Health/Check"):
            stream = attacker.call(method, 0, 0)
            attacker.end(stream)
            assert wait_until(lambda: stream in attacker.ended, 10), method  # noqa: B023 (used at once)
        statuses = [line["status"] for line in map(json.loads, handle.log().splitlines())
                    if line.get("event") == "request" and line.get("method") == "Stat"]
        assert statuses == ["INVALID_ARGUMENT"]
    finally:
        attacker.close()


def test_a_put_cancelled_before_its_first_message_is_logged_cancelled(start_daemon, tmp_path):
    """A client that opens a Put and cancels it before sending anything: gRPC ends the call's read as if its
    stream had ended, and the Put, a stream of no files, was answered and logged OK. It is logged CANCELLED, as
    other cancelled calls are, and stores nothing."""
    handle = start_daemon(tmp_path)
    before = snapshot(handle.data_dir)
    cancelled = threading.Event()

    def nothing_sent() -> Iterator[pb.PutRequest]:
        cancelled.wait(30)
        yield from ()

    with grpc.insecure_channel(handle.endpoint) as channel:
        call = drive_pb2_grpc.DriveServiceStub(channel).Put.future(nothing_sent(), timeout=30)
        handle.wait_open("Put", 1)
        call.cancel()
        cancelled.set()

    def logged() -> list[str]:
        return [line["status"] for line in map(json.loads, handle.log().splitlines())
                if line.get("event") == "request" and line.get("method") == "Put"]

    assert wait_until(lambda: logged() != [], 10), handle.log()
    assert logged() == ["CANCELLED"]
    assert snapshot(handle.data_dir) == before


def _listed(endpoint: str, token: str) -> list[pb.FileInfo]:
    """The root of the drive the partial requests would have touched."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(endpoint) as channel:
        asked = pb.ListRequest(drive="lit://partial", path=".")
        return list(drive_pb2_grpc.DriveServiceStub(channel).List(asked, metadata=metadata, timeout=10).entries)


def _state(pid: int) -> str:
    """The state of process `pid` (R, S, T for stopped, ...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


FOLDER_FILES = 40_000
HELD_GETS = 24


def test_gets_of_a_big_folder_hold_a_page_of_its_names_each(start_daemon, tmp_path):
    """A Get of a folder walked all of it before its first file and held every file's name and owner for as long as
    its stream ran: 8 Gets of a folder of 200,000 files, each reading its first file and waiting, took a daemon from
    66 to 345 MiB (~29 MiB each), and one host may hold 256 streams. It now walks a page of names at a time (1,000:
    `drived.managed.GET_PAGE`), and a clash between components is still refused before any file is sent."""
    first = start_daemon(tmp_path)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    raw_put(stub, "lit://big", "seed.bin", b"s", component="a")
    assert first.stop() == 0
    component = first.data_dir / "objects" / "big" / "a"
    names = [f"f/{i // 1000:02d}/{i:05d}.bin" for i in range(FOLDER_FILES)]
    for name in names:  # copies of a stored file, as the storage layout (README) has them
        (component / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(component / "seed.bin", component / name)
    handle = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    whole = stub.Get(pb.GetRequest(drive="lit://big", path="f", whole_small_files=True), timeout=120)
    assert [(m.file.info.path, m.file.data) for m in whole] == [(name, b"s") for name in names]
    baseline = rss_mib(handle.proc.pid)
    held = [stub.Get(pb.GetRequest(drive="lit://big", path="f"), timeout=120) for _ in range(HELD_GETS)]
    try:
        assert all(next(get).info.path == names[0] for get in held)
        during = rss_mib(handle.proc.pid)
        bound = baseline + HELD_GETS + SLACK_MIB
        print(f"{HELD_GETS} Gets of a folder of {FOLDER_FILES:,} files: {during:.0f} MiB (baseline {baseline:.0f})")
        assert during <= bound, f"{HELD_GETS} Gets held {during - baseline:.0f} MiB (bound {bound:.0f} MiB)"
    finally:
        for get in held:
            get.cancel()
    raw_put(stub, "lit://big", names[-1], b"b", component="b", allow_duplicates=True)  # in the folder's last page
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.Get(pb.GetRequest(drive="lit://big", path="f"), timeout=120))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert names[-1] in refused.value.details() and "'a', 'b'" in refused.value.details()


COMPONENTS = 60
FILES_EACH = 2_001
PAGE = 2_000
CONCURRENT_LISTS = 8  # as many as one host's answer room lets build at once (drived.answers.PER_PEER)


def test_a_list_page_of_a_folder_many_components_hold_reads_about_the_page(start_daemon, tmp_path):
    """A page of a folder read page_size + 1 names of every component holding it before merging them: a recursive
    page of 10,000 entries of a folder 20 components held read 200,000 names, and 8 such Lists at once took a daemon
    from 107 to 231 MiB (with 100 components, some 75 MiB a List). Each component's names are now read a chunk at a
    time as the merge needs them (`ManagedDrives._merged`): same 8 Lists, 80 -> 99 MiB."""
    first = start_daemon(tmp_path)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    raw_put(stub, "lit://held", "seed.bin", b"s", component="seed")
    assert first.stop() == 0
    drive = first.data_dir / "objects" / "held"
    names = []
    for c in range(COMPONENTS):
        seed = first.data_dir / "tmp" / f"seed{c}"  # emptied at the start: a file has at most 65,000 links
        shutil.copyfile(drive / "seed" / "seed.bin", seed)
        for i in range(FILES_EACH):  # copies of a stored file, as the storage layout (README) has them
            name = f"data/{i // 1000:02d}/c{c}-{i:05d}.bin"
            (drive / f"c{c}" / name).parent.mkdir(parents=True, exist_ok=True)
            os.link(seed, drive / f"c{c}" / name)
            names.append(name)
    handle = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    page = pb.ListRequest(drive="lit://held", path="data", recursive=True, page_size=PAGE)
    answer = stub.List(page, timeout=120)
    assert [e.path for e in answer.entries] == sorted(names)[:PAGE] and answer.next_page_token
    reset_peak_rss(handle.proc.pid)
    baseline = rss_mib(handle.proc.pid)
    lists = [stub.List.future(page, timeout=300) for _ in range(CONCURRENT_LISTS)]
    assert all(len(done.result().entries) == PAGE for done in lists)
    peak = peak_rss_mib(handle.proc.pid)
    bound = baseline + CONCURRENT_LISTS + SLACK_MIB  # an answer of 2,000 short paths takes ~0.2 MiB
    print(f"{CONCURRENT_LISTS} Lists of a folder {COMPONENTS} components hold: peak {peak:.0f} MiB (baseline "
          f"{baseline:.0f})")
    assert peak <= bound, f"{CONCURRENT_LISTS} Lists peaked {peak - baseline:.0f} MiB above (bound {bound:.0f} MiB)"
