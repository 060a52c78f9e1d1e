"""Limits (issue 13): streams per peer and in all, the idle timeout of a Put or Get, the largest file and the
quota of a drive. Each refusal has its documented status and message, stores nothing, and leaves the daemon
serving everyone else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
from conftest import (
    MIB,
    Background,
    StalledPuts,
    health_status,
    no_uploads,
    open_fds,
    put_messages,
    raw_get,
    raw_put,
    rpc_code,
    sha256_hex,
    snapshot,
    wait_until,
)
from grpc_health.v1 import health_pb2

from drive_client import Drive
from drive_client.errors import ResourceExhausted, TooManyStreams
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drived.limits import MAX_TICK_SECONDS, MIN_TICK_SECONDS, Streams, peer_host
from drived.puts import MAX_FILES_PER_STREAM

pytestmark = pytest.mark.timeout(180)

SC = grpc.StatusCode


def header(drive: str, path: str, **fields) -> pb.PutRequest:
    return pb.PutRequest(header=pb.PutHeader(drive=drive, path=path, **fields))


def listed(stub, drive: str, path: str = ".") -> list[str]:
    return [e.path for e in stub.List(pb.ListRequest(drive=drive, path=path), timeout=10).entries]


def given(setting: str, value: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """The arguments and environment of a daemon given `setting` as an operator gives it: a flag (`--quota`), or
    its variable (`DRIVED_QUOTA`, as a container's settings are)."""
    return ((setting, value), {}) if setting.startswith("--") else ((), {setting: value})


# --- admission, without a daemon -------------------------------------------------------------


def test_a_peer_is_its_address_without_the_port() -> None:
    assert peer_host("ipv4:10.0.0.7:53122") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:53122") == "ipv6:[::1]"
    assert peer_host("unix:/run/drived.sock") == "unix:/run/drived.sock"


async def test_streams_are_admitted_per_peer_and_in_all() -> None:
    streams = Streams(max_streams=3, max_per_peer=2, idle_timeout=0)
    a1, a2, a3, b, c = (f"ipv4:10.0.0.{host}:{port}" for host, port in ((1, 1), (1, 2), (1, 3), (2, 1), (3, 1)))
    with streams.opened("Put", a1, True), streams.opened("Get", a2, True):
        with pytest.raises(ResourceExhausted, match="max-streams-per-peer"), streams.opened("Get", a3, True):
            pass
        with streams.opened("Watch", b, False):
            with pytest.raises(ResourceExhausted, match="--max-streams\\)"), streams.opened("Put", c, True):
                pass
            assert streams.count == 3
        assert streams.count == 2
    assert streams.count == 0
    assert await streams.wait_closed(0.1)


def test_the_idle_check_looks_at_streams_at_most_ten_times_a_second() -> None:
    """Every quarter of the idle timeout, at most every second and at least every 0.1 s: a tick of a quarter of
    1e-9 s spun the daemon's CPU (the config refuses such a timeout, and the floor holds whatever the caller)."""
    ticks = {timeout: Streams(1, 1, idle_timeout=timeout).tick_seconds() for timeout in (0, 1e-9, 0.2, 2, 60)}
    assert ticks == {0: MAX_TICK_SECONDS, 1e-9: MIN_TICK_SECONDS, 0.2: MIN_TICK_SECONDS, 2: 0.5, 60: MAX_TICK_SECONDS}


# --- streams against a daemon ------------------------------------------------------------------


def test_streams_over_the_per_peer_cap_are_refused_and_others_are_served(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--max-streams-per-peer", "4")
    drive = "lit://per_peer"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "kept.txt", b"kept")
        before = listed(stub, drive)
        first = lambda i: [header(drive, f"stalled/{i}"), pb.PutRequest(data=b"x")]  # noqa: E731
        # Two channels: two connections from two ports of one host, one peer.
        with StalledPuts(handle.endpoint, 4, first, channels=2) as stalled:
            handle.wait_open("Put", 4)
            assert stalled.open() == 4
            with pytest.raises(grpc.RpcError) as refused:
                raw_put(stub, drive, "fifth.txt", b"fifth")
            assert refused.value.code() == SC.RESOURCE_EXHAUSTED
            assert "--max-streams-per-peer" in refused.value.details()
            assert rpc_code(lambda: raw_get(stub, drive, "kept.txt")) == SC.RESOURCE_EXHAUSTED
            # calls that only ask are never refused
            assert listed(stub, drive) == before
            assert stub.Stat(pb.StatRequest(drive=drive, path="kept.txt"), timeout=10).size == 4
        assert wait_until(lambda: handle.open_requests("Put") == 0, 10)
        raw_put(stub, drive, "fifth.txt", b"fifth")
        assert listed(stub, drive) == ["fifth.txt", "kept.txt"]
    assert wait_until(lambda: no_uploads(handle.data_dir), 10)


def test_a_client_refused_for_too_many_streams_tries_again_until_one_ends(start_daemon, tmp_path):
    """Many workers of one host starting big gets at once (4 ranged streams each) pass --max-streams-per-peer
    together: a refusal for streams is worth trying again once others end, as the message says, and the client
    does, within retry_seconds; with retries off it raises TooManyStreams, a ResourceExhausted."""
    handle = start_daemon(tmp_path, "--max-streams-per-peer", "4")
    drive = "lit://busy_peer"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "wanted.txt").write_bytes(b"worth retrying")
    Drive(drive, root_folder=str(tmp_path / "src"), endpoint=handle.endpoint).put("wanted.txt")
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        watches = [stub.Watch(pb.WatchRequest(drive=drive)) for _ in range(4)]
        try:
            assert all(next(watch).kind == pb.WatchEvent.KIND_WATCHING for watch in watches)
            impatient = Drive(drive, root_folder=str(tmp_path), endpoint=handle.endpoint, retry_seconds=0)
            with pytest.raises(TooManyStreams, match="--max-streams-per-peer") as refused:
                impatient.get("wanted.txt", to="impatient.txt")
            assert isinstance(refused.value, ResourceExhausted) and refused.value.code == SC.RESOURCE_EXHAUSTED
            patient = Drive(drive, root_folder=str(tmp_path), endpoint=handle.endpoint, retry_seconds=60)
            getting = Background(lambda: patient.get("wanted.txt", to="patient.txt"))
            getting.start()
            assert wait_until(lambda: handle.log().count('"status": "RESOURCE_EXHAUSTED"') >= 3, 30), handle.log()
            assert not (tmp_path / "patient.txt").exists()
            watches.pop().cancel()
            assert getting.join_checked(60).read_bytes() == b"worth retrying"
        finally:
            for watch in watches:
                watch.cancel()
    assert not (tmp_path / "impatient.txt").exists()
    quota = start_daemon(tmp_path, "--quota", "4")  # a refusal that no retry mends is raised at once
    with pytest.raises(ResourceExhausted, match="quota") as over:
        Drive(drive, root_folder=str(tmp_path / "src"), endpoint=quota.endpoint, retry_seconds=60).put("wanted.txt")
    assert not isinstance(over.value, TooManyStreams)


@pytest.mark.parametrize("setting", ["--max-streams", "DRIVED_MAX_STREAMS"])
def test_streams_over_the_total_cap_are_refused(start_daemon, tmp_path, setting):
    """The refusal names the setting as it was given: from the environment, it named a --max-streams flag that
    nobody passed."""
    args, env = given(setting, "3")
    handle = start_daemon(tmp_path, *args, env=env)
    drive = "lit://total"
    first = lambda i: [header(drive, f"stalled/{i}")]  # noqa: E731
    with StalledPuts(handle.endpoint, 3, first), grpc.insecure_channel(handle.endpoint) as channel:
        handle.wait_open("Put", 3)
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive, "fourth.txt", b"fourth")
        assert refused.value.code() == SC.RESOURCE_EXHAUSTED, refused.value.details()
        assert f"the most it takes at once ({setting}): retry later" in refused.value.details()
        assert listed(stub, drive) == []


@pytest.mark.parametrize("setting", ["--stream-idle-timeout", "DRIVED_STREAM_IDLE_TIMEOUT"])
def test_a_put_whose_client_sends_nothing_is_ended_and_its_upload_removed(start_daemon, tmp_path, setting):
    """A resumable upload too: the daemon ended its stream, so nothing is held for a resume. The message names the
    setting as it was given."""
    args, env = given(setting, "1")
    handle = start_daemon(tmp_path, *args, env=env)
    drive = "lit://idle_put"
    first = lambda i: [header(drive, f"stalled{i}.bin", upload_id=f"u-{i}" if i else ""), os.urandom(2 * MIB)]  # noqa: E731
    with StalledPuts(handle.endpoint, 2, first) as stalled:
        assert wait_until(lambda: stalled.open() == 0, 30), "the stalled puts were never ended"
        assert stalled.outcomes == [SC.UNAVAILABLE] * 2, stalled.details
        assert all(f"sent nothing for 1 s ({setting}); retry it" in d for d in stalled.details), stalled.details
    assert wait_until(lambda: no_uploads(handle.data_dir), 10), "their upload data is removed"
    handle.wait_logged("idle stream cancelled")
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        assert listed(stub, drive) == []
        query = pb.QueryWriteStatusRequest(drive=drive, upload_id="u-1")
        assert rpc_code(lambda: stub.QueryWriteStatus(query, timeout=10)) == SC.NOT_FOUND  # not held

        # A slow put that keeps sending is not idle, however long it takes.
        data = os.urandom(6 * MIB)

        def slowly():
            for message in put_messages(drive, "slow.bin", data, chunk=MIB):
                yield message
                time.sleep(0.4)

        assert [f.sha256 for f in stub.Put(slowly(), timeout=60).files] == [sha256_hex(data)]
        # A get waiting for its path waits on the daemon, not its client: not idle either.
        waiting = pb.GetRequest(drive=drive, path="never.bin", wait_seconds=3)
        assert rpc_code(lambda: list(stub.Get(waiting, timeout=30))) == SC.DEADLINE_EXCEEDED


def test_a_get_whose_client_reads_nothing_is_ended_and_its_file_closed(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--stream-idle-timeout", "1")
    drive = "lit://idle_get"
    data = os.urandom(64 * MIB)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "big.bin", data)
        before = open_fds(handle.proc.pid)
        stream = stub.Get(pb.GetRequest(drive=drive, path="big.bin"), timeout=60)
        assert next(stream).HasField("info")  # then the client stops reading: the windows fill up
        handle.wait_logged("idle stream cancelled")
        assert wait_until(lambda: open_fds(handle.proc.pid) <= before, 10), "the file stays open"
        received = 0
        with pytest.raises(grpc.RpcError) as ended:
            for message in stream:  # what was on its way, then the status
                received += len(message.data)
        assert ended.value.code() == SC.UNAVAILABLE and "read nothing for 1 s" in ended.value.details()
        assert ended.value.details().startswith("drived: "), ended.value.details()  # marked as the daemon's own
        assert 0 < received < len(data)
        [(_, again)] = raw_get(stub, drive, "big.bin")
        assert again == data
    assert wait_until(lambda: handle.open_requests("Get") == 0, 10)


def test_a_get_ended_for_idleness_whose_client_then_goes_away_is_no_error_of_the_daemons(start_daemon, tmp_path):
    """Its UNAVAILABLE waits behind the chunk its client did not take. A client that went away then (a stalled
    process killed, every stalled client at a drain) failed that status's send, and the daemon took the failure for
    its own: 'unexpected error in Get' with a traceback at ERROR level, another from gRPC, and the call logged and
    counted INTERNAL."""
    handle = start_daemon(tmp_path, "--stream-idle-timeout", "1")
    drive = "lit://idle_gone"
    with grpc.insecure_channel(handle.endpoint) as channel:
        raw_put(drive_pb2_grpc.DriveServiceStub(channel), drive, "big.bin", os.urandom(32 * MIB))
    with grpc.insecure_channel(handle.endpoint) as channel:
        stream = drive_pb2_grpc.DriveServiceStub(channel).Get(pb.GetRequest(drive=drive, path="big.bin"), timeout=60)
        assert next(stream).HasField("info")  # then the client stops reading, and goes away once it was ended
        handle.wait_logged("idle stream cancelled")
    assert wait_until(lambda: handle.open_requests("Get") == 0, 10)
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines if line["level"] == "error"] == []
    assert [line["status"] for line in lines if line["event"] == "request" and line["method"] == "Get"] == ["CANCELLED"]


def test_300_stalled_streams_leave_listing_prompt_and_are_gone_after_the_idle_timeout(start_daemon, tmp_path):
    # Long enough for all 300 to be open at once on a loaded machine before the first is ended.
    handle = start_daemon(tmp_path, "--stream-idle-timeout", "15", "--max-streams-per-peer", "400")
    drive = "lit://three_hundred"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for i in range(20):
            raw_put(stub, drive, f"kept/{i:02d}.txt", b"kept")
        before = listed(stub, drive, "kept")
        first = lambda i: [header(drive, f"stalled/{i}.bin"), os.urandom(MIB)]  # noqa: E731
        with StalledPuts(handle.endpoint, 300, first, channels=3) as stalled:
            assert stalled.open() == 300, stalled.refused()
            handle.wait_open("Put", 300)
            latencies = []
            for _ in range(10):
                started = time.perf_counter()
                assert listed(stub, drive, "kept") == before  # a deadline of 10 s: answered, not held
                latencies.append(time.perf_counter() - started)
            print(f"List beside 300 stalled puts: slowest of 10 took {max(latencies) * 1000:.0f} ms")
            assert wait_until(lambda: stalled.open() == 0, 60), f"{stalled.open()} stalled puts still open"
            assert stalled.refused() == {SC.UNAVAILABLE: 300}
        assert wait_until(lambda: no_uploads(handle.data_dir), 10), "their upload data is removed"
        # the gauge falls as each handler ends, which may be just after its status reached the client
        assert wait_until(lambda: handle.open_requests("Put") == 0, 30), f"{handle.open_requests('Put')} still open"
        assert listed(stub, drive) == ["kept"]


# --- the largest file and the quota ------------------------------------------------------------


def endless(drive: str, path: str, sent: list[int]):
    """A Put of a file of unknown size that sends up to 100 MiB, counting what the daemon took."""
    yield header(drive, path)
    for _ in range(100):
        sent.append(MIB)
        yield pb.PutRequest(data=b"\0" * MIB)
    yield pb.PutRequest(finish=pb.PutFinish(sha256="0" * 64))


def refused_put(call) -> str:
    """Runs a put that must be refused with RESOURCE_EXHAUSTED; returns its message."""
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == SC.RESOURCE_EXHAUSTED, refused.value.details()
    return refused.value.details()


def test_files_over_the_largest_size_are_refused_and_nothing_is_stored(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--max-file-size", "1M")
    drive = "lit://largest"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "exactly.bin", os.urandom(MIB))  # the limit itself is fine
        before = snapshot(handle.data_dir)
        big = os.urandom(MIB + 1)
        # the header says so: refused before any byte is taken
        message = refused_put(lambda: raw_put(stub, drive, "said.bin", big, size=len(big)))
        assert "--max-file-size" in message and "1,048,576" in message and "said.bin" in message
        # the bytes say so: refused as soon as they pass the limit, not at the end of the stream
        sent: list[int] = []
        refused_put(lambda: stub.Put(endless(drive, "endless.bin", sent), timeout=60))
        assert len(sent) < 10, f"the daemon took {len(sent)} MiB of a file over 1 MiB before refusing it"
        header_only = pb.PutHeader(drive=drive, path="whole.bin")
        refused_put(lambda: stub.PutFile(
            pb.PutFileRequest(header=header_only, data=big, sha256=sha256_hex(big)), timeout=60))
        folder = [m for name in ("a.bin", "b.bin") for m in put_messages(drive, f"folder/{name}", big)]
        refused_put(lambda: stub.Put(iter(folder), timeout=60))
        assert wait_until(lambda: no_uploads(handle.data_dir), 10)
        assert snapshot(handle.data_dir) == before, "nothing stored"
        assert listed(stub, drive) == ["exactly.bin"]
    (tmp_path / "big.bin").write_bytes(big)
    with pytest.raises(ResourceExhausted):
        Drive(drive, root_folder=str(tmp_path), endpoint=handle.endpoint).put("big.bin")


@pytest.mark.parametrize("setting", ["--quota", "DRIVED_QUOTA"])
def test_a_drive_over_its_quota_refuses_puts_with_the_numbers(start_daemon, tmp_path, setting):
    """The refusal names the setting as it was given, and says what the client can do."""
    args, env = given(setting, "4M")
    handle = start_daemon(tmp_path, *args, env=env)
    drive, other_drive = "lit://quota", "lit://quota_other"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "three.bin", os.urandom(3 * MIB), component="ca")
        before = snapshot(handle.data_dir)
        two = os.urandom(2 * MIB)
        for how in ({"size": len(two)}, {}):  # known from the header, or only from the bytes
            message = refused_put(lambda how=how: raw_put(stub, drive, "two.bin", two, component="cb", **how))
            assert all(n in message for n in ("3,145,728", "2,097,152", "4,194,304")), message
            assert f"({setting}): nothing was stored. Delete files from the drive, or ask for a larger" in message
        sent: list[int] = []
        refused_put(lambda: stub.Put(endless(drive, "endless.bin", sent), timeout=60))
        assert len(sent) < 10, f"the daemon took {len(sent)} MiB past the quota before refusing"
        assert wait_until(lambda: no_uploads(handle.data_dir), 10)
        assert snapshot(handle.data_dir) == before, "nothing stored"
        # the quota is each drive's own
        raw_put(stub, other_drive, "two.bin", two)
        # replacing one's own file needs room only for what it adds
        raw_put(stub, drive, "three.bin", os.urandom(3 * MIB + MIB // 2), component="ca")
        refused_put(lambda: raw_put(stub, drive, "one.bin", os.urandom(MIB), component="ca"))
        # a delete gives its room back
        stub.Delete(pb.DeleteRequest(drive=drive, path="three.bin", component="ca"), timeout=10)
        raw_put(stub, drive, "two.bin", two, component="cb")
        raw_put(stub, drive, "small/one.bin", os.urandom(MIB), component="cb")
        stub.Delete(pb.DeleteRequest(drive=drive, path="small", component="cb"), timeout=10)
        raw_put(stub, drive, "two_more.bin", two, component="cb")
        assert listed(stub, drive) == ["two.bin", "two_more.bin"]
    # a restarted daemon counts the drive again from what is stored
    assert handle.stop() == 0
    again = start_daemon(tmp_path, *args, env=env, data_dir=handle.data_dir)
    with grpc.insecure_channel(again.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        message = refused_put(lambda: raw_put(stub, drive, "one.bin", b"x"))
        assert "holds 4,194,304 bytes" in message, message


def test_a_drives_first_count_takes_each_files_size_without_reading_it(start_daemon, tmp_path):
    """The count read the header of every file of the drive: a disk read a file when the page cache does not
    hold them (some 15 s for 100,000 small files here, against under a second from their sizes)."""
    handle = start_daemon(tmp_path)
    drive = "lit://counted"
    sizes = [0, 1, MIB - 1, MIB, MIB + 1, 2 * MIB + 3]  # around the 1 MiB blocks of the stored block tables
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for i, size in enumerate(sizes):
            raw_put(stub, drive, f"f/{i}.bin", os.urandom(size), component=("ca", "cb")[i % 2])
    assert handle.stop() == 0
    *stored, control = sorted(p for p in (handle.data_dir / "objects" / "counted").rglob("*") if p.is_file())
    assert len(stored) == len(sizes) - 1
    read_at = control.stat().st_atime_ns
    with open(control, "rb") as f:
        f.read(64)  # as the count read each header
    if control.stat().st_atime_ns == read_at:
        pytest.skip("this file system does not record reads in a file's atime (noatime): nothing would show a read")
    accessed = {p: p.stat().st_atime_ns for p in stored}

    quota = sum(sizes) + 10
    again = start_daemon(tmp_path, "--quota", str(quota), data_dir=handle.data_dir)
    with grpc.insecure_channel(again.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        message = refused_put(lambda: raw_put(stub, drive, "over.bin", b"x" * 11))
        assert f"holds {sum(sizes):,} bytes" in message, message
        assert {p: p.stat().st_atime_ns for p in stored} == accessed, "the count read the drive's files"
        assert "over.bin" not in listed(stub, drive)
        raw_put(stub, drive, "fits.bin", b"x" * 10)
        assert "fits.bin" in listed(stub, drive)


def test_a_lone_daemon_keeps_the_counts_of_a_bounded_number_of_drives(start_daemon, tmp_path):
    """With --quota, a lone daemon kept the count of every drive a put ever named, refused or stopped before anything
    was stored too (some 950 bytes each): a client naming ever new drives grew it for as long as it went on. Past
    the bound (lowered to 10 here), the least recently used count is forgotten, and counted again at its drive's
    next put: a file planted meanwhile then counts."""
    handle = start_daemon(tmp_path, "--quota", "1000", before="import drived.events as e; e.MAX_COUNTED_DRIVES = 10")
    drive = "lit://counted_first"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "a.bin", b"a" * 100)
        folder = handle.data_dir / "objects" / "counted_first" / "default"
        shutil.copyfile(folder / "a.bin", folder / "planted.bin")  # not counted by this daemon's count
        message = refused_put(lambda: raw_put(stub, drive, "b.bin", b"b" * 950))
        assert "holds 100 bytes" in message, message
        for i in range(20):
            other = f"lit://named_once_{i}"
            message = refused_put(lambda other=other: raw_put(stub, other, "huge.bin", b"", size=2000))
            assert "holds 0 bytes" in message, message
        message = refused_put(lambda: raw_put(stub, drive, "b.bin", b"b" * 850))
        assert "holds 200 bytes" in message, f"the first drive's count was kept: {message}"
        assert listed(stub, drive) == ["a.bin", "planted.bin"], "nothing stored"


def test_links_and_pipes_planted_in_a_drive_count_nothing(start_daemon, tmp_path):
    """A symbolic link made the count fail (ELOOP, and so every put of the drive), and a named pipe held it (and
    the put) forever: it opened each entry to read a header."""
    handle = start_daemon(tmp_path, "--quota", "1M")
    drive = "lit://planted"
    folder = handle.data_dir / "objects" / "planted" / "default"
    folder.mkdir(parents=True)
    (folder / "link").symlink_to("/etc/hostname")
    os.mkfifo(folder / "pipe")
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "a.bin", b"a" * 1000)  # the drive's first put: counted
        message = refused_put(lambda: raw_put(stub, drive, "b.bin", b"b" * (MIB - 999)))
        assert "holds 1,000 bytes" in message, message
        assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "link", "pipe"], "nothing stored"
        assert listed(stub, drive) == ["a.bin"]


def test_concurrent_puts_never_pass_the_quota_together(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--quota", "4M")
    drive = "lit://quota_race"
    outcomes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def put(i: int) -> None:
        with grpc.insecure_channel(handle.endpoint) as channel:
            try:
                raw_put(drive_pb2_grpc.DriveServiceStub(channel), drive, f"f{i}.bin", os.urandom(MIB))
                code = SC.OK
            except grpc.RpcError as err:
                code = err.code()
        with lock:
            outcomes.append(code)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes, key=str) == sorted([SC.OK] * 4 + [SC.RESOURCE_EXHAUSTED] * 6, key=str), outcomes
    with grpc.insecure_channel(handle.endpoint) as channel:
        assert len(listed(drive_pb2_grpc.DriveServiceStub(channel), drive)) == 4


PAUSED_COMMITS = """
import asyncio, os
from drived.backends.{backend} import {upload} as Upload

def paused(commit):
    async def commit_once_resumed(self, *args, **kwargs):
        if self._key.endswith("/{name}") and os.path.exists({pause!r}):
            open({pause!r} + ".reached", "w").close()
            while os.path.exists({pause!r}):
                await asyncio.sleep(0.01)
        return await commit(self, *args, **kwargs)
    return commit_once_resumed

Upload.commit = paused(Upload.commit)
"""


def test_room_a_failing_commit_would_free_lets_no_other_put_pass_the_quota(start_daemon, tmp_path):
    """A commit replacing the caller's file with a smaller one held its difference as negative room while it ran:
    another put committing meanwhile was let in on room that came back when that commit failed (here, a checksum
    the bytes do not match), and the drive then held more than its quota."""
    pause = tmp_path / "pause"
    paused = PAUSED_COMMITS.format(backend="local", upload="LocalUpload", name="big.bin", pause=str(pause))
    handle = start_daemon(tmp_path, "--quota", "4M", before=paused)
    drive = "lit://quota_shrink"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        big = os.urandom(3 * MIB)
        raw_put(stub, drive, "big.bin", big)
        pause.touch()
        outcome: list[grpc.StatusCode] = []
        shrink = threading.Thread(target=lambda: outcome.append(rpc_code(
            lambda: raw_put(stub, drive, "big.bin", os.urandom(MIB), sha256="0" * 64))))
        shrink.start()
        try:
            assert wait_until((tmp_path / "pause.reached").exists, 30), "the shrinking put never reached its commit"
            message = refused_put(lambda: raw_put(stub, drive, "other.bin", os.urandom(3 * MIB)))
            assert "holds 3,145,728 bytes" in message, message
        finally:
            pause.unlink()
            shrink.join(60)
        assert outcome == [SC.DATA_LOSS]
        assert listed(stub, drive) == ["big.bin"]
        assert raw_get(stub, drive, "big.bin")[0][1] == big
        assert wait_until(lambda: no_uploads(handle.data_dir), 10)


PAUSED_DUPLICATE_CHECKS = """
import asyncio, os
from drived.managed import ManagedDrives

def paused(check):
    async def check_once_resumed(self, drive, component, path):
        if path == {name!r} and os.path.exists({pause!r}):
            open({pause!r} + ".reached", "w").close()
            while os.path.exists({pause!r}):
                await asyncio.sleep(0.01)
        return await check(self, drive, component, path)
    return check_once_resumed

ManagedDrives._check_duplicates = paused(ManagedDrives._check_duplicates)
"""


def test_a_put_the_duplicate_check_refuses_holds_no_room_while_it_checks(start_daemon, tmp_path):
    """A put's commit held its room in the quota while its duplicate check ran beside it (3036dfc), so a put of a
    path another component holds, while its check ran (0.3-0.8 s on the local disk in a drive of 10,000
    components), had another put of the drive refused RESOURCE_EXHAUSTED on room it was never going to fill. The
    check ends before the room is held."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, "--quota", str(MIB + MIB // 2),
                          before=PAUSED_DUPLICATE_CHECKS.format(name="taken.bin", pause=str(pause)))
    drive = "lit://quota_duplicate"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, drive, "taken.bin", b"held", component="holder")
        pause.touch()
        outcome: list[grpc.StatusCode] = []
        duplicate = threading.Thread(target=lambda: outcome.append(rpc_code(lambda: raw_put(  # checked at its commit
            stub, drive, "taken.bin", os.urandom(MIB), component="late", size=MIB))))
        duplicate.start()
        try:
            assert wait_until((tmp_path / "pause.reached").exists, 30), "the duplicate never reached its check"
            other = os.urandom(MIB)
            raw_put(stub, drive, "other.bin", other, component="late")  # fits beside what the drive holds
        finally:
            pause.unlink()
            duplicate.join(60)
        assert outcome == [SC.ALREADY_EXISTS]
        assert [(i.component, d) for i, d in raw_get(stub, drive, "taken.bin")] == [("holder", b"held")]
        assert [(i.component, d) for i, d in raw_get(stub, drive, "other.bin")] == [("late", other)]
        assert wait_until(lambda: no_uploads(handle.data_dir), 10)
    assert "never retrieved" not in handle.log() and "never awaited" not in handle.log()


# --- folders nested deep -----------------------------------------------------------------------

DEEP = "/".join(["d"] * 1200)  # 2,399 bytes: a path may be some 2,000 folders deep, past Python's recursion limit


def test_a_folder_nested_1200_deep_is_listed_counted_swept_and_deleted(start_daemon, tmp_path):
    """A path of 1,200 folders was stored, and then everything that walked the tree below it recursed once a
    folder and failed INTERNAL (RecursionError): a recursive listing, a get or a delete of any folder above it, and
    with --quota the drive's first count after a start, so every put of the drive; the walk for empty folders after
    a crash failed before removing any, so a folder a killed put left refused a put of its path for good."""
    drive = "lit://deep"
    first = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(first.endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            raw_put(stub, drive, f"{DEEP}/f.bin", b"deep")
            raw_put(stub, drive, "d/top.bin", b"top")
        first.stop(signal.SIGKILL)
        left = first.data_dir / "objects" / "deep" / "default" / "killed"  # as a SIGKILL mid-put leaves it
        left.mkdir()
        again = start_daemon(tmp_path, "--quota", "10", data_dir=first.data_dir)
        with grpc.insecure_channel(again.endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            assert wait_until(lambda: not left.exists(), timeout=30), "the walk for empty folders removes it"
            message = refused_put(lambda: raw_put(stub, drive, "over.bin", b"x" * 4))
            assert "holds 7 bytes" in message, message
            recursive = stub.List(pb.ListRequest(drive=drive, path="d", recursive=True), timeout=30)
            assert [e.path for e in recursive.entries] == [f"{DEEP}/f.bin", "d/top.bin"]
            assert [(i.path, data) for i, data in raw_get(stub, drive, "d")] == [(f"{DEEP}/f.bin", b"deep"),
                                                                                 ("d/top.bin", b"top")]
            assert stub.Delete(pb.DeleteRequest(drive=drive, path="d"), timeout=30).files_deleted == 2
            assert listed(stub, drive) == []
            assert not (first.data_dir / "objects" / "deep" / "default" / "d").exists()
            raw_put(stub, drive, "killed", b"fits")
            assert listed(stub, drive) == ["killed"]
        assert again.stop() == 0, again.log()[-3000:]
    finally:  # pytest's removal of old temporary folders recurses once a folder too: a tree left here would fail it
        subprocess.run(["rm", "-rf", str(first.data_dir)], check=True)


# --- answers within the message limit ----------------------------------------------------------

LONG_FOLDER = "/".join(["p" * 250] * 15)  # 3,764 bytes: with a file's name, near the longest path


def small_files(drive: str, names: list[str]):
    """Put messages carrying one small file at each of `names`."""
    for name in names:
        data = name.encode()
        header = pb.PutHeader(drive=drive, path=name, size=len(data))
        yield pb.PutRequest(file=pb.PutFileRequest(header=header, data=data, sha256=sha256_hex(data)))


def test_a_page_of_long_paths_is_cut_to_fit_its_message(daemon, drive_uri):
    """A page of 10,000 entries (the client's page size) passed the 4 MiB message limit once its paths averaged
    some 300 bytes: the daemon failed to send it, and a folder of long paths could not be listed at all."""
    names = [f"{LONG_FOLDER}/{i:04d}.bin" for i in range(1100)]  # 4.3 MB of entries in one page
    with grpc.insecure_channel(daemon.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for first in range(0, len(names), 550):
            stub.Put(small_files(drive_uri, names[first:first + 550]), timeout=60)
        request = pb.ListRequest(drive=drive_uri, path=LONG_FOLDER, page_size=10_000)
        first_page = stub.List(request, timeout=30)
        assert first_page.next_page_token and 0 < len(first_page.entries) < len(names)
        assert first_page.ByteSize() <= 4 << 20
    assert Drive(drive_uri, endpoint=daemon.endpoint).list(LONG_FOLDER) == names


def test_a_put_stream_whose_answer_would_pass_its_message_is_refused_at_the_file_that_would(daemon, drive_uri):
    """The answer to a Put lists every file it stored: 1,100 files of long paths (within the 10,000 files a stream
    carries) were all stored, and then the answer could not be sent (RESOURCE_EXHAUSTED 'Sent message larger than
    max'), so the client learnt of none of them. The file that would take the answer past the message limit is
    refused, as the 10,001st file is, and those before stay."""
    names = [f"{LONG_FOLDER}/{i:04d}.bin" for i in range(1100)]
    with grpc.insecure_channel(daemon.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Put(small_files(drive_uri, names), timeout=60)
        assert refused.value.code() == SC.INVALID_ARGUMENT, refused.value.details()
        assert "another stream" in refused.value.details()
        stored = Drive(drive_uri, endpoint=daemon.endpoint).list(LONG_FOLDER)
        assert 0 < len(stored) < len(names) and stored == names[:len(stored)]
        assert f"{len(stored):04d}.bin" in refused.value.details()
        # the files a stream did not store go in another one
        answer = stub.Put(small_files(drive_uri, names[len(stored):]), timeout=60)
        assert [f.path for f in answer.files] == names[len(stored):]


# --- files in one Put stream -------------------------------------------------------------------


def test_a_put_stream_over_its_file_cap_is_refused_and_keeps_the_files_before(daemon, drive_uri):
    cap = MAX_FILES_PER_STREAM

    def files():
        for i in range(cap + 1):
            data = f"{i}".encode()
            header = pb.PutHeader(drive=drive_uri, path=f"f/{i:05d}", size=len(data))
            yield pb.PutRequest(file=pb.PutFileRequest(header=header, data=data, sha256=sha256_hex(data)))

    with grpc.insecure_channel(daemon.endpoint) as channel, pytest.raises(grpc.RpcError) as refused:
        drive_pb2_grpc.DriveServiceStub(channel).Put(files(), timeout=120)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {cap} files" in refused.value.details()
    stored = Drive(drive_uri, endpoint=daemon.endpoint).list("f")
    assert len(stored) == cap and f"{cap:05d}" not in stored


PAUSED_STAT = """
import asyncio, os
from drived.backends.local import LocalBackend

def paused(stat):
    async def stat_once_resumed(self, key):  # the first stat of each file: the listing's (a page's, at once)
        reached = {pause!r} + "." + os.path.basename(key) + ".reached"
        if "/gone/" in key and os.path.exists({pause!r}) and not os.path.exists(reached):
            open(reached, "w").close()
            while os.path.exists({pause!r}):
                await asyncio.sleep(0.01)
        return await stat(self, key)
    return stat_once_resumed

LocalBackend.stat = paused(LocalBackend.stat)
"""


def test_a_page_whose_files_all_went_away_while_it_was_read_goes_on_to_the_next(start_daemon, tmp_path):
    """A List page whose every file was deleted between the reading of its folder and the stat of its files had
    no entry to make its next_page_token from, and failed INTERNAL; it now goes on from there."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=PAUSED_STAT.format(pause=str(pause)))
    drive = "lit://vanishing"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for name in ("a", "b", "c"):
            raw_put(stub, drive, f"gone/{name}", name.encode())
        pause.touch()
        answers: list = []

        def list_gone() -> None:
            try:
                answers.append(stub.List(pb.ListRequest(drive=drive, path="gone", page_size=2), timeout=30))
            except grpc.RpcError as err:
                answers.append((err.code(), err.details()))

        listing = threading.Thread(target=list_gone)
        listing.start()
        try:
            assert wait_until((tmp_path / "pause.a.reached").exists, 30), "the listing never reached its first stat"
            for name in ("a", "b"):
                stub.Delete(pb.DeleteRequest(drive=drive, path=f"gone/{name}"), timeout=10)
        finally:
            pause.unlink()
            listing.join(30)
        [answer] = answers
        assert isinstance(answer, pb.ListResponse), answer
        assert [e.path for e in answer.entries] == ["gone/c"] and answer.next_page_token == ""
        assert listed(stub, drive, "gone") == ["gone/c"]
        assert raw_get(stub, drive, "gone/c")[0][1] == b"c"


def test_health_watches_are_bounded_as_streams_are(start_daemon, tmp_path):
    """Any client, with no token, could open Health/Watch calls without end: they took no place, and the idle check
    never ends one (it answers for as long as its client stays). 3,374 of them took a daemon with --token and
    --max-streams 64 from 64 to 138 MiB."""
    handle = start_daemon(tmp_path, "--token", "s3cret", "--max-streams", "4", "--max-streams-per-peer", "4")
    with grpc.insecure_channel(handle.endpoint) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        watches = [watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(4)]
        assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 4
        refused = watch(health_pb2.HealthCheckRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            next(refused)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert err.value.details().startswith("drived: busy: ") and "Watch calls open" in err.value.details()
        assert health_status(handle.endpoint) == health_pb2.HealthCheckResponse.SERVING  # Check takes no place
        watches[0].cancel()
        again: list = []  # refused until the daemon has seen the cancel

        def watched_again() -> bool:
            again.append(watch(health_pb2.HealthCheckRequest(), timeout=30))
            try:
                return next(again[-1]).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as refusal:
                assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details()
                return False

        assert wait_until(watched_again, 10)
        for w in [*watches[1:], *again]:
            w.cancel()
