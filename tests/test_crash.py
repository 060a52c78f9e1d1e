"""SIGKILL at any moment never leaves a visible partial nor damages an earlier version, and the next start-up
recovers at once; SIGTERM under load lets every transfer in flight finish, refuses new calls with UNAVAILABLE
(never CANCELLED) and exits 0 (issue 13, item 6)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
from conftest import MIB, DaemonHandle, put_messages, raw_get, raw_put, rpc_code, sha256_hex, sitecustomized, wait_until
from test_watch import PAUSED_CHANGES

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(300)

DRIVE = "lit://crash"
SIZES = {"empty.bin": 0, "tiny.bin": 1000, "small.bin": 900 * 1024, "big.bin": 3 * MIB, "bigger.bin": 24 * MIB}


def version(name: str, n: int) -> bytes:
    """Version `n` of a file: bytes that tell which version they are, whatever the size."""
    seed = hashlib.sha256(f"{name}/{n}".encode()).digest()
    return (seed * (SIZES[name] // len(seed) + 1))[: SIZES[name]]


def put_versions(endpoint: str, n: int, acknowledged: dict[str, set[int]], stop: threading.Event) -> None:
    """Puts version `n` of every file, one stream each, until the daemon dies; records what was acknowledged."""
    with grpc.insecure_channel(endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for name in SIZES:
            if stop.is_set():
                return
            try:
                raw_put(stub, DRIVE, name, version(name, n))
            except grpc.RpcError:
                return  # the daemon was killed
            acknowledged[name].add(n)


def start_again(start_daemon, tmp_path, data_dir) -> tuple[DaemonHandle, float]:
    started = time.monotonic()
    handle = start_daemon(tmp_path, data_dir=data_dir)
    return handle, time.monotonic() - started


def test_sigkill_at_any_moment_leaves_whole_versions_only(start_daemon, tmp_path):
    handle = start_daemon(tmp_path)
    data_dir = handle.data_dir
    acknowledged: dict[str, set[int]] = {name: set() for name in SIZES}
    put_versions(handle.endpoint, 0, acknowledged, threading.Event())
    assert all(acknowledged.values()), "version 0 of every file is stored"
    rng = random.Random(13)
    for round_ in range(1, 6):
        stop = threading.Event()
        writers = [
            threading.Thread(target=put_versions, args=(handle.endpoint, round_ * 10 + w, acknowledged, stop))
            for w in range(3)
        ]
        for writer in writers:
            writer.start()
        moment = rng.uniform(0.02, 1.5)
        time.sleep(moment)  # the moment of the kill is what is random here, not a wait for something
        handle.stop(signal.SIGKILL)
        stop.set()
        for writer in writers:
            writer.join(60)
        handle, seconds = start_again(start_daemon, tmp_path, data_dir)
        print(f"round {round_}: SIGKILL {moment:.2f} s into the puts; serving again {seconds:.2f} s after the start")
        assert list((data_dir / "tmp").iterdir()) == [], "what the killed puts left in tmp/ is gone at start-up"
        with grpc.insecure_channel(handle.endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            assert sorted(e.path for e in stub.List(pb.ListRequest(drive=DRIVE, path=".")).entries) == sorted(SIZES)
            for name in SIZES:
                [(info, data)] = raw_get(stub, DRIVE, name)
                tried = {n for n in range(round_ * 10 + 3) if version(name, n) == data}
                assert tried, f"{name} holds bytes no put sent: a partial or damaged file"
                assert info.sha256 == sha256_hex(data) and info.size == SIZES[name]


def test_sigterm_under_load_finishes_transfers_refuses_new_calls_and_exits_zero(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--grace-period", "30")
    big = os.urandom(32 * MIB)
    uploads = {f"up/{i}.bin": os.urandom((i + 1) * MIB) for i in range(6)}
    results: dict[str, object] = {}
    gate = threading.Event()

    def slow_put(name: str, data: bytes) -> None:
        def messages():
            for i, message in enumerate(put_messages(DRIVE, name, data, chunk=MIB // 2)):
                yield message
                if i == 1:
                    gate.wait(30)  # every put is in flight when SIGTERM comes
                time.sleep(0.02)

        with grpc.insecure_channel(handle.endpoint) as channel:
            try:
                results[name] = drive_pb2_grpc.DriveServiceStub(channel).Put(messages(), timeout=120).files[0].sha256
            except grpc.RpcError as err:
                results[name] = err.code()

    def slow_get(i: int) -> None:
        with grpc.insecure_channel(handle.endpoint) as channel:
            received = hashlib.sha256()
            try:
                stream = drive_pb2_grpc.DriveServiceStub(channel).Get(
                    pb.GetRequest(drive=DRIVE, path="big.bin"), timeout=120)
                for n, message in enumerate(stream):
                    received.update(message.data)
                    if n == 1:
                        gate.wait(30)
                    time.sleep(0.01)
                results[f"get/{i}"] = received.hexdigest()
            except grpc.RpcError as err:
                results[f"get/{i}"] = err.code()

    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, DRIVE, "big.bin", big)
        threads = [threading.Thread(target=slow_put, args=item) for item in uploads.items()]
        threads += [threading.Thread(target=slow_get, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        handle.wait_open("Put", len(uploads))
        handle.wait_open("Get", 4)
        handle.proc.send_signal(signal.SIGTERM)
        handle.wait_logged("draining")
        late = []
        for call in (
            lambda: raw_put(stub, DRIVE, "late.bin", b"late"),
            lambda: stub.List(pb.ListRequest(drive=DRIVE, path="."), timeout=10),
            lambda: stub.Stat(pb.StatRequest(drive=DRIVE, path="big.bin"), timeout=10),
            lambda: list(stub.Get(pb.GetRequest(drive=DRIVE, path="big.bin"), timeout=10)),
        ):
            try:
                call()
                late.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                late.append(err.code())
        gate.set()
        for thread in threads:
            thread.join(90)
    assert late == [grpc.StatusCode.UNAVAILABLE] * 4, f"new calls while draining: {late}"
    assert results == {
        **{name: sha256_hex(data) for name, data in uploads.items()},
        **{f"get/{i}": sha256_hex(big) for i in range(4)},
    }, "every transfer in flight finished"
    assert handle.proc.wait(60) == 0, handle.log()[-3000:]
    again = start_daemon(tmp_path, data_dir=handle.data_dir)
    with grpc.insecure_channel(again.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for name, data in uploads.items():
            [(_, got)] = raw_get(stub, DRIVE, name)
            assert got == data
        assert wait_until(lambda: again.open_requests("Put") == 0, 5)
        assert "late.bin" not in [e.path for e in stub.List(pb.ListRequest(drive=DRIVE, path=".")).entries]


def test_empty_folders_a_killed_daemon_left_are_removed_at_the_next_start(start_daemon, tmp_path):
    """A daemon killed between a put's making of its folders and its rename, or between a delete's unlink and its
    removal of the folders it emptied, leaves them empty. They listed as folders and refused a put of their path
    (INVALID_ARGUMENT to the same component, ALREADY_EXISTS to another), and no delete reached them."""
    first = start_daemon(tmp_path)
    raw_put(drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint)), DRIVE, "keep/f.txt", b"kept",
            component="a")
    first.stop(signal.SIGKILL)
    drive = first.data_dir / "objects" / DRIVE.removeprefix("lit://")
    for left in ("a/newdir/sub", "a/keep/empty", "b/other"):  # as a SIGKILL at those moments leaves them
        (drive / left).mkdir(parents=True)
    second = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(second.endpoint))

    def listed(recursive: bool) -> list[str]:
        asked = pb.ListRequest(drive=DRIVE, path=".", recursive=recursive)
        return sorted(e.path for e in stub.List(asked, timeout=30).entries)

    assert wait_until(lambda: listed(False) == ["keep"], timeout=30), listed(False)
    raw_put(stub, DRIVE, "newdir", b"a file where a folder was left", component="a")
    raw_put(stub, DRIVE, "other", b"another component's file", component="b")
    assert raw_get(stub, DRIVE, "keep/f.txt")[0][1] == b"kept"
    assert listed(True) == ["keep/f.txt", "newdir", "other"]
    assert "removed empty folders left by a daemon stopped mid-put or mid-delete" in second.log()


def test_a_start_after_a_clean_stop_spares_the_walk_for_empty_folders(start_daemon, tmp_path):
    """Every start walked the whole data dir for empty folders (seconds on a store of millions of files), after a
    clean stop too, which leaves none: the stop marks the data dir, and the start after it takes the mark and
    walks nothing. A daemon killed after that start has no mark to leave, and the next start walks again."""
    first = start_daemon(tmp_path)
    raw_put(drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint)), DRIVE, "keep/f.txt", b"kept")
    assert first.stop() == 0, first.log()[-3000:]
    assert (first.data_dir / "clean-stop").exists()
    drive = first.data_dir / "objects" / DRIVE.removeprefix("lit://")
    planted = next(drive.iterdir()) / "planted"  # what no walk after a clean stop finds, unlike a SIGKILL's
    planted.mkdir()

    second = start_daemon(tmp_path, data_dir=first.data_dir)
    assert not (first.data_dir / "clean-stop").exists(), "the mark is taken at the start"
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(second.endpoint))
    assert raw_get(stub, DRIVE, "keep/f.txt")[0][1] == b"kept"
    second.stop(signal.SIGKILL)
    assert planted.is_dir(), "no walk ran"
    assert not (first.data_dir / "clean-stop").exists()

    third = start_daemon(tmp_path, data_dir=first.data_dir)
    assert wait_until(lambda: not planted.exists(), timeout=30), "the walk after a SIGKILL removes it"
    assert "removed empty folders left by a daemon stopped mid-put or mid-delete" in third.log()
    assert third.stop() == 0, third.log()[-3000:]
    assert (first.data_dir / "clean-stop").exists()


def test_a_clean_stop_mark_is_not_trusted_after_a_daemon_that_ignores_it(start_daemon, tmp_path):
    """A daemon of a version before the clean-stop mark neither takes nor leaves it: run and killed mid-put after a
    clean stop, it left an empty folder and the mark, and the next start trusted the mark and walked nothing (the
    folder then refused a put of its path for good). The mark names tmp/ as the stop left it, and every start
    makes tmp/ anew."""
    first = start_daemon(tmp_path)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    raw_put(stub, DRIVE, "keep/f.txt", b"kept")
    assert first.stop() == 0, first.log()[-3000:]
    mark = first.data_dir / "clean-stop"
    assert mark.exists()
    # What such a daemon does to the data dir: it empties tmp/ at its start, as every version has, and a SIGKILL
    # between a put's making of its folder and its rename leaves the folder empty.
    shutil.rmtree(first.data_dir / "tmp")
    (first.data_dir / "tmp").mkdir()
    left = next((first.data_dir / "objects" / DRIVE.removeprefix("lit://")).iterdir()) / "killed"
    left.mkdir()

    second = start_daemon(tmp_path, data_dir=first.data_dir)
    assert not mark.exists()
    assert wait_until(lambda: not left.exists(), timeout=30), "the walk for empty folders runs"
    assert "removed empty folders left by a daemon stopped mid-put or mid-delete" in second.log()
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(second.endpoint))
    assert raw_get(stub, DRIVE, "keep/f.txt")[0][1] == b"kept"
    assert second.stop() == 0, second.log()[-3000:]


@pytest.mark.parametrize("change", ["put", "resumable put", "delete"])
def test_a_change_the_grace_period_cut_keeps_the_data_dir_locked_until_it_ends(start_daemon, tmp_path, change):
    """A put's commit or a delete still under way when the grace period ends runs to its end (what it stores is
    published), but the daemon closed its store, removed its lock and marked a clean stop meanwhile: a second drived
    started then was let in, emptied tmp/ under the commit, and the first one's rename then put the second's upload in
    progress (its tmp/ name again) in place of the file: an earlier version replaced by a damaged file."""
    pause = tmp_path / "pause"
    first = start_daemon(tmp_path, "--grace-period", "1", before=PAUSED_CHANGES.format(pause=str(pause)))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    before, after = os.urandom(2 * MIB), os.urandom(2 * MIB)
    raw_put(stub, DRIVE, "big.bin", before)
    (tmp_path / "pause.reached").unlink()
    pause.touch()
    if change == "delete":
        call = stub.Delete.future(pb.DeleteRequest(drive=DRIVE, path="big.bin"), timeout=60)
    else:
        messages = list(put_messages(DRIVE, "big.bin", after))
        messages[0].header.upload_id = "u" if change == "resumable put" else ""
        call = stub.Put.future(iter(messages), timeout=60)
    assert wait_until((tmp_path / "pause.reached").exists, timeout=30), f"the {change} never began its change"
    assert not call.done()
    first.proc.send_signal(signal.SIGTERM)
    assert wait_until(call.done, timeout=30), "the grace period's end never cancelled the call"

    second = start_daemon(tmp_path, data_dir=first.data_dir, wait=False)
    assert wait_until(lambda: second.proc.poll() is not None, timeout=10), "a second daemon was let in"
    assert "in use by another drived" in second.log()
    assert not (first.data_dir / "clean-stop").exists(), "a clean stop is marked only once every change ended"
    pause.unlink()
    assert first.proc.wait(30) == 0, first.log()[-3000:]
    assert (first.data_dir / "clean-stop").exists()
    assert list((first.data_dir / "tmp").iterdir()) == []

    third = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(third.endpoint))
    if change == "delete":
        assert rpc_code(lambda: raw_get(stub, DRIVE, "big.bin")) == grpc.StatusCode.NOT_FOUND
    else:
        assert raw_get(stub, DRIVE, "big.bin")[0][1] == after, "the commit under way ran to its end"


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_cancels_the_drain_at_once_and_lets_a_commit_under_way_end(start_daemon, tmp_path, second):
    """A second SIGTERM or SIGINT during the drain did nothing: a client that sent part of a put and stalled held
    the stop for the whole grace period (a minute here), as uvicorn's, gunicorn's and nginx's stops do not. It
    cancels what is open at once; a put's commit under way still runs to its end (within CLOSE_SECONDS, a minute
    here), the data dir locked until then."""
    pause = tmp_path / "pause"
    first = start_daemon(tmp_path, "--grace-period", "60", before=PAUSED_CHANGES.format(pause=str(pause))
                         + "import drived.server as s\ns.CLOSE_SECONDS = 60.0\n")
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    before, after = os.urandom(2 * MIB), os.urandom(2 * MIB)
    raw_put(stub, DRIVE, "big.bin", before)
    (tmp_path / "pause.reached").unlink()
    pause.touch()
    committing = stub.Put.future(put_messages(DRIVE, "big.bin", after), timeout=120)
    assert wait_until((tmp_path / "pause.reached").exists, timeout=30), "the put never began its commit"
    gate = threading.Event()

    def stalled():
        yield from list(put_messages(DRIVE, "stalled.bin", os.urandom(3 * MIB)))[:2]  # the header and one chunk
        gate.wait(120)

    stalling = stub.Put.future(stalled(), timeout=120)
    try:
        first.wait_open("Put", 2)
        first.proc.send_signal(signal.SIGTERM)
        first.wait_logged("draining")
        first.proc.send_signal(second)
        assert wait_until(stalling.done, timeout=20), "the second signal left the stalled put open"
        assert stalling.exception().code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert "stopping at once" in first.log()
        again = start_daemon(tmp_path, data_dir=first.data_dir, wait=False)
        assert wait_until(lambda: again.proc.poll() is not None, timeout=10), "a second daemon was let in"
        assert "in use by another drived" in again.log()
        pause.unlink()
        assert first.proc.wait(30) == 0, first.log()[-3000:]
    finally:
        gate.set()
    assert (first.data_dir / "clean-stop").exists()
    assert list((first.data_dir / "tmp").iterdir()) == []
    third = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(third.endpoint))
    assert raw_get(stub, DRIVE, "big.bin")[0][1] == after, "the commit under way ran to its end"
    assert rpc_code(lambda: raw_get(stub, DRIVE, "stalled.bin")) == grpc.StatusCode.NOT_FOUND
    assert committing.done()


# Run first in the daemon's process and in its commit worker's (both import sitecustomize): while the file HANG
# exists, the rename of a put of hung.bin into place never returns, as a rename on a hung NFS mount does not.
HUNG_RENAMES = """
import os, threading
from drived.backends import stored

place = stored.place

def hung(tmp_path, path):
    if os.path.basename(path) == "hung.bin" and os.path.exists({hang!r}):
        open({hang!r} + ".reached", "w").close()
        threading.Event().wait()
    return place(tmp_path, path)

stored.place = hung
"""


@pytest.mark.parametrize("size", [1000, 3 * MIB], ids=["in the commit worker", "in a thread"])
def test_a_second_signal_ends_a_stop_that_a_hung_commit_holds(start_daemon, tmp_path, size):
    """A put's commit on a data dir that hangs (an NFS server gone) held the stop forever: a second SIGTERM
    cancelled the calls, but the daemon waited for the commit, which never ended. The second signal gives the changes
    under way a few seconds and then ends the process, logging what it abandoned; the data dir is as a kill there
    leaves it: the earlier version whole, the upload's temporary file removed at the next start."""
    hang = tmp_path / "hang"
    first = start_daemon(tmp_path, "--grace-period", "60", before="import drived.server as s; s.CLOSE_SECONDS = 1.0",
                         env=sitecustomized(tmp_path, HUNG_RENAMES.format(hang=str(hang))))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    before, after = os.urandom(size), os.urandom(size)
    raw_put(stub, DRIVE, "hung.bin", before)
    raw_put(stub, DRIVE, "other.bin", b"kept")
    hang.touch()
    hung = stub.Put.future(put_messages(DRIVE, "hung.bin", after), timeout=60)
    assert wait_until((tmp_path / "hang.reached").exists, timeout=30), "the put never began its rename"
    first.proc.send_signal(signal.SIGTERM)
    first.wait_logged("draining")
    first.proc.send_signal(signal.SIGTERM)
    try:
        status = first.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second signal left the daemon waiting for a hung commit:\n{first.log()[-3000:]}")
    assert status == 0, first.log()[-3000:]
    abandoned = next(json.loads(line) for line in first.log().splitlines() if "abandoned" in line)
    assert [(call["method"], call["path"]) for call in abandoned["calls"]] == [("Put", "hung.bin")], abandoned
    assert wait_until(hung.done, timeout=10)
    assert hung.exception() is not None, "a put whose commit was abandoned is never acknowledged"
    assert not (first.data_dir / "clean-stop").exists(), "the next start looks for what the stop left"

    again = start_daemon(tmp_path, data_dir=first.data_dir)
    assert list((first.data_dir / "tmp").iterdir()) == [], "the abandoned upload's temporary file is removed"
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(again.endpoint))
    assert raw_get(stub, DRIVE, "hung.bin")[0][1] == before, "the earlier version, whole"
    assert raw_get(stub, DRIVE, "other.bin")[0][1] == b"kept"
    raw_put(stub, DRIVE, "hung.bin", after)
    assert raw_get(stub, DRIVE, "hung.bin")[0][1] == after


# Run first in the daemon's process: while the file HANG exists, a read of hung.bin's bytes in a worker thread never
# returns, as a read on a hung NFS mount does not (the reads on the event loop, of the file's header, are let be).
HUNG_READS = """
import os, threading
from drived.backends import local

pread = os.pread

def hung(fd, size, offset):
    if (threading.current_thread() is not threading.main_thread() and os.path.exists({hang!r})
            and os.readlink(f"/proc/self/fd/{{fd}}").endswith("/hung.bin")):
        open({hang!r} + ".reached", "w").close()
        threading.Event().wait()
    return pread(fd, size, offset)

os.pread = hung
local._read_cached = lambda fd, size, offset: None  # every read goes to a thread
"""


def test_a_read_that_hangs_in_a_thread_does_not_hold_the_exit(start_daemon, tmp_path):
    """A get whose read of the data dir never returned (a hung NFS mount) held the exit forever, whatever signals
    followed: the stop cancelled the get, closed the store and logged "stopped", and then the process waited for
    its worker threads (asyncio.run joins them). The stop ends the process itself once it is done."""
    hang = tmp_path / "hang"
    first = start_daemon(tmp_path, "--grace-period", "1",
                         env=sitecustomized(tmp_path, HUNG_READS.format(hang=str(hang))))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(first.endpoint))
    data = os.urandom(3 * MIB)
    raw_put(stub, DRIVE, "hung.bin", data)
    hang.touch()
    reading = stub.Get(pb.GetRequest(drive=DRIVE, path="hung.bin"), timeout=60)
    getting = threading.Thread(target=lambda: rpc_code(lambda: list(reading)), daemon=True)
    getting.start()
    assert wait_until((tmp_path / "hang.reached").exists, timeout=30), "the get never began its read"
    first.proc.send_signal(signal.SIGTERM)
    try:
        status = first.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon stopped but did not exit:\n{first.log()[-3000:]}")
    assert status == 0 and "Traceback" not in first.log(), first.log()[-3000:]
    first.wait_logged("stopped")
    assert (first.data_dir / "clean-stop").exists(), "a read changes nothing: the stop is clean"
    again = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(again.endpoint))
    assert raw_get(stub, DRIVE, "hung.bin")[0][1] == data
