"""The commit worker: the daemon's child process that commits small files.

It is started with the first small put, started again when it dies, and
stops with the daemon, also on a Ctrl-C, a SIGTERM or a SIGHUP that reaches both processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pathlib
import signal
import struct
import termios
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import put_messages, raw_get, raw_put, rpc_code, sitecustomized, snapshot, wait_until
from crc32c import crc32c

from drive_client import Drive
from drive_client.errors import Unavailable
from drive_client.pb import drive_pb2_grpc
from drived.backends.commit_worker import CONFIRMS_IN_FLIGHT, BeforeVisible, CommitWorker, Job, commit_batch
from drived.checksums import ClientChecksums


def commit_workers(daemon_pid: int) -> list[int]:
    """The daemon's child processes: its commit worker, once a small file was put."""
    children: list[int] = []
    for task in pathlib.Path(f"/proc/{daemon_pid}/task").iterdir():
        # A thread may have ended since the listing (asyncio runs one per child process it waits for).
        with contextlib.suppress(FileNotFoundError):
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def wait_gone(pid: int, timeout: float = 10) -> bool:
    return wait_until(lambda: not pathlib.Path(f"/proc/{pid}").exists(), timeout, interval=0.02)


def put_small_files(drive: Drive, root: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    written = {}
    for name in names:
        written[name] = os.urandom(3000)
        (root / name).write_bytes(written[name])
        drive.put(name)
    return written


def test_a_killed_commit_worker_is_started_again_and_nothing_is_lost(start_daemon, drive_uri, tmp_path):
    daemon = start_daemon(tmp_path)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    drive = Drive(drive_uri, root_folder=src, endpoint=daemon.endpoint)
    stored = put_small_files(drive, src, ["before.bin"])
    [worker] = commit_workers(daemon.proc.pid)

    os.kill(worker, signal.SIGKILL)
    assert wait_gone(worker)
    stored |= put_small_files(drive, src, ["after.bin", "later.bin"])

    [again] = commit_workers(daemon.proc.pid)
    assert again != worker
    reader = Drive(drive_uri, root_folder=out, endpoint=daemon.endpoint)
    for name, data in stored.items():
        reader.get(name)
        assert (out / name).read_bytes() == data
    assert sorted(reader.list(".")) == sorted(stored)
    assert list((daemon.data_dir / "tmp").iterdir()) == []


def queued_bytes(pid: int) -> int:
    """The bytes waiting in the pipe that is process `pid`'s stdin (a batch the commit worker has not read yet)."""
    with open(f"/proc/{pid}/fd/0", "rb", buffering=0) as pipe:
        return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0]


def test_a_commit_worker_dies_with_its_daemon_and_commits_nothing_over_the_next_ones_puts(
    start_daemon, drive_uri, tmp_path
):
    """The commit worker of a daemon killed with SIGKILL (the OOM killer, a crash) lived on to the end of the
    batch it had, however long its disk took: by then a daemon started again had stored a newer version of a path
    of that batch, acknowledged, and the worker renamed its older version, never acknowledged, over it."""
    daemon = start_daemon(tmp_path)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(daemon.endpoint))
    raw_put(stub, drive_uri, "f.txt", b"version 0")  # starts the commit worker
    [worker] = commit_workers(daemon.proc.pid)
    os.kill(worker, signal.SIGSTOP)  # a worker slow to take its next batch (its disk busy)
    try:
        lost = stub.Put.future(put_messages(drive_uri, "f.txt", b"version 1"), timeout=30)
        assert wait_until(lambda: queued_bytes(worker) > 0, 10), "the daemon never sent the batch"
        daemon.stop(signal.SIGKILL)
        assert rpc_code(lambda: lost.result(30)) == grpc.StatusCode.UNAVAILABLE
        again = start_daemon(tmp_path, data_dir=daemon.data_dir)
        stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(again.endpoint))
        raw_put(stub, drive_uri, "f.txt", b"version 2")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert wait_gone(worker)
    assert [data for _, data in raw_get(stub, drive_uri, "f.txt")] == [b"version 2"]


# Run first in the daemon's process and in its commit worker's: while the file HOLD exists, the worker holds its rename
# of f.txt into place and outlives its daemon, as a worker does whose rename the kernel is still doing when its
# SIGKILL comes (a disk busy with a journal commit, a hung mount), or on a system with no parent-death signal
# (macOS). A batch of one file is committed on the worker's main thread, whose parent-death signal this clears.
HELD_RENAMES = """
import ctypes, os, time
from drived.backends import stored

place = stored.place

def held(tmp_path, path):
    if os.path.basename(path) == "f.txt" and os.path.exists({hold!r}):
        ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG: none
        open({hold!r} + ".reached", "w").close()
        while os.path.exists({hold!r}):
            time.sleep(0.01)
    return place(tmp_path, path)

stored.place = held
"""


def held_commit(start_daemon, tmp_path: pathlib.Path, drive_uri: str):
    """A daemon whose commit worker is held in its rename of f.txt "version 1" over "version 0" while the file
    `hold` exists: (daemon, stub, the worker's pid, the put's future, hold). The caller removes `hold`."""
    hold = tmp_path / "hold"
    daemon = start_daemon(tmp_path, env=sitecustomized(tmp_path, HELD_RENAMES.format(hold=str(hold))))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(daemon.endpoint))
    raw_put(stub, drive_uri, "f.txt", b"version 0")
    raw_put(stub, drive_uri, "other.txt", b"kept")
    [worker] = commit_workers(daemon.proc.pid)
    hold.touch()
    committing = stub.Put.future(put_messages(drive_uri, "f.txt", b"version 1"), timeout=30)
    assert wait_until((tmp_path / "hold.reached").exists, 10), "the worker never began its rename"
    return daemon, stub, worker, committing, hold


def test_a_killed_daemons_commit_worker_keeps_the_data_dir_locked_until_it_has_ended(
    start_daemon, drive_uri, tmp_path
):
    """The kernel drops a killed daemon's lock at once, while its commit worker may still be renaming a file into
    place: a daemon started meanwhile was let in, emptied tmp/ and began its uploads there under the same names, and
    the old worker's rename then put the new daemon's upload in progress in place of the file: a version the new
    daemon had acknowledged replaced by a damaged one (DATA_LOSS). The worker holds the data dir's lock too: a new
    daemon is refused, saying so and changing nothing, until the worker has ended; then it starts at once."""
    first, stub, worker, lost, hold = held_commit(start_daemon, tmp_path, drive_uri)
    try:
        first.stop(signal.SIGKILL)
        assert rpc_code(lambda: lost.result(30)) == grpc.StatusCode.UNAVAILABLE
        before = snapshot(first.data_dir)  # the upload the worker renames, in tmp/, included
        refused = start_daemon(tmp_path, data_dir=first.data_dir, wait=False)
        assert wait_until(lambda: refused.proc.poll() is not None, 10), "a daemon was let in beside the worker"
        assert refused.proc.returncode != 0 and "Traceback" not in refused.log(), refused.log()
        assert f"{first.data_dir}: in use by another drived" in refused.log(), refused.log()
        assert "its commit worker may still hold the lock" in refused.log(), refused.log()
        assert snapshot(first.data_dir) == before
    finally:
        hold.unlink(missing_ok=True)
    assert wait_gone(worker)

    again = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(again.endpoint))
    assert [data for _, data in raw_get(stub, drive_uri, "f.txt")] == [b"version 1"]  # renamed whole before it ended
    raw_put(stub, drive_uri, "f.txt", b"version 2")
    assert again.stop() == 0, again.log()[-2000:]  # its own worker ends with it: the next start is let in at once
    third = start_daemon(tmp_path, data_dir=first.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(third.endpoint))
    assert [data for _, data in raw_get(stub, drive_uri, "f.txt")] == [b"version 2"]
    assert [data for _, data in raw_get(stub, drive_uri, "other.txt")] == [b"kept"]
    assert list((first.data_dir / "tmp").iterdir()) == []


def test_ctrl_c_stops_the_daemon_and_its_commit_worker_with_every_put_kept(start_daemon, drive_uri, tmp_path):
    daemon = start_daemon(tmp_path)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    stored = put_small_files(Drive(drive_uri, root_folder=src, endpoint=daemon.endpoint), src, ["a.bin", "b.bin"])
    [worker] = commit_workers(daemon.proc.pid)

    for pid in (daemon.proc.pid, worker):  # what a terminal's Ctrl-C does: SIGINT to both
        os.kill(pid, signal.SIGINT)
    assert daemon.proc.wait(30) == 0, daemon.log()[-2000:]
    assert wait_gone(worker), "the commit worker outlived the daemon"
    assert "Traceback" not in daemon.log(), daemon.log()[-2000:]  # the worker left stopping to the daemon

    again = start_daemon(tmp_path, data_dir=daemon.data_dir)
    reader = Drive(drive_uri, root_folder=out, endpoint=again.endpoint)
    for name, data in stored.items():
        reader.get(name)
        assert (out / name).read_bytes() == data


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_sent_to_the_daemons_process_group_leaves_its_commit_worker_to_finish_the_batch(
    start_daemon, drive_uri, tmp_path, sig
):
    """`systemctl kill -s HUP` (a reload) and `systemctl stop` (KillMode=control-group, the default) signal every
    process of the service, the commit worker too: it died mid-batch, and the put it was committing failed ("the
    commit worker failed ...: the put may not be stored") where a reload changes nothing and a stop lets in-flight
    puts finish. The worker leaves these signals to its daemon, as it does Ctrl-C's."""
    daemon, stub, worker, committing, hold = held_commit(start_daemon, tmp_path, drive_uri)
    try:
        for pid in (daemon.proc.pid, worker):
            os.kill(pid, sig)
        # the daemon took the signal (a reload logs nothing without token or TLS files: its drain, or a call, tells)
        assert wait_until(lambda: sig == signal.SIGHUP or "draining" in daemon.log(), 10), daemon.log()[-2000:]
    finally:
        hold.unlink()
    assert [file.size for file in committing.result(30).files] == [len(b"version 1")]  # was UNAVAILABLE
    if sig == signal.SIGHUP:
        assert commit_workers(daemon.proc.pid) == [worker]
        assert [data for _, data in raw_get(stub, drive_uri, "f.txt")] == [b"version 1"]
    assert daemon.stop() == 0, daemon.log()[-2000:]
    assert wait_gone(worker) and "Traceback" not in daemon.log(), daemon.log()[-2000:]
    again = start_daemon(tmp_path, data_dir=daemon.data_dir)
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(again.endpoint))
    assert [data for _, data in raw_get(stub, drive_uri, "f.txt")] == [b"version 1"]
    assert list((daemon.data_dir / "tmp").iterdir()) == []


def peak_rss_mib(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


@pytest.mark.slow
def test_a_folder_of_megabyte_files_is_committed_in_bounded_memory(start_daemon, drive_uri, tmp_path):
    """Commits in flight hold at most MAX_BYTES_IN_FLIGHT between them, whatever the size of the small files."""
    daemon = start_daemon(tmp_path)
    src = tmp_path / "src"
    (src / "shards").mkdir(parents=True)
    sizes = {f"shards/{i:03d}.bin": (1 << 20) - 100 * i for i in range(96)}  # each sent whole, in one message
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))
    drive = Drive(drive_uri, root_folder=src, endpoint=daemon.endpoint)
    put_small_files(drive, src, ["warm.bin"])  # starts the commit worker
    [worker] = commit_workers(daemon.proc.pid)
    daemon_before, worker_before = peak_rss_mib(daemon.proc.pid), peak_rss_mib(worker)

    drive.put("shards")

    daemon_growth = peak_rss_mib(daemon.proc.pid) - daemon_before
    worker_growth = peak_rss_mib(worker) - worker_before
    print(f"peak RSS grew by {daemon_growth:.0f} MiB in the daemon, {worker_growth:.0f} MiB in the commit worker")
    assert daemon_growth < 64 and worker_growth < 48, "the commits in flight hold more than MAX_BYTES_IN_FLIGHT"
    stored = {name: drive.stat(name) for name in sizes}
    assert {name: info.size for name, info in stored.items()} == sizes


def job_of(folder: pathlib.Path, name: str, data: bytes) -> Job:
    return str(folder / f"{name}.tmp"), str(folder / name), data, ClientChecksums("", None)


async def test_a_slow_before_visible_holds_up_no_commit_submitted_after_it(tmp_path):
    """A claim's confirm that takes long (its call to the coordinator stuck) delays its own commit only."""
    worker = CommitWorker()
    confirmed = asyncio.Event()

    async def slow_confirm() -> None:
        await confirmed.wait()

    try:
        slow = worker.submit(job_of(tmp_path, "slow", b"confirmed late"), slow_confirm)
        await asyncio.sleep(0.1)  # its confirm has begun
        later = [worker.submit(job_of(tmp_path, f"later{i}", b"x")) for i in range(3)]
        outcomes = await asyncio.wait_for(asyncio.gather(*later), 5)
        assert [outcome[0] for outcome in outcomes] == ["ok"] * 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["later0", "later1", "later2"]
        assert not slow.done()
        confirmed.set()
        assert (await asyncio.wait_for(slow, 5))[0] == "ok"
        assert (tmp_path / "slow").exists() and not (tmp_path / "slow.tmp").exists()
    finally:
        await worker.close()



async def test_commits_submitted_while_confirms_run_wait_for_room_and_go_together(tmp_path):
    """At most CONFIRMS_IN_FLIGHT batches are confirmed at a time: the commits submitted one by one while they run
    wait, and are confirmed together once one ends, not each in a call of its own."""
    worker = CommitWorker()
    release = asyncio.Event()
    began_before_release: list[str] = []

    def confirm_of(name: str) -> BeforeVisible:
        async def confirm() -> None:
            if not release.is_set():
                began_before_release.append(name)
            await release.wait()
        return confirm

    names = [f"f{i}" for i in range(2 + CONFIRMS_IN_FLIGHT + 3)]
    try:
        outcomes = [worker.submit(job_of(tmp_path, name, b"x"), confirm_of(name)) for name in names[:2]]  # one batch
        await asyncio.sleep(0.05)
        for name in names[2:]:  # one at a time, while the confirms in flight hang
            outcomes.append(worker.submit(job_of(tmp_path, name, b"x"), confirm_of(name)))
            await asyncio.sleep(0.02)
        assert began_before_release == names[:2 + CONFIRMS_IN_FLIGHT - 1]  # a batch of its own for the room left
        release.set()
        assert [outcome[0] for outcome in await asyncio.wait_for(asyncio.gather(*outcomes), 10)] == ["ok"] * len(names)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    finally:
        await worker.close()


async def test_a_commit_confirmed_after_close_fails_shutting_down_and_starts_no_worker(tmp_path):
    """A batch whose `before_visible` was in flight when the worker was closed (the daemon shutting down) fails
    when it ends, as does a commit submitted later: neither starts a worker again, nor stores anything."""
    worker = CommitWorker()
    release = asyncio.Event()

    async def held_confirm() -> None:
        await release.wait()

    others = set(commit_workers(os.getpid()))  # this process's children that are not its worker (other fixtures')
    try:
        assert (await asyncio.wait_for(worker.submit(job_of(tmp_path, "first", b"x")), 10))[0] == "ok"
        [process] = set(commit_workers(os.getpid())) - others  # the worker the first commit started
        held = worker.submit(job_of(tmp_path, "held", b"confirmed after close"), held_confirm)
        await asyncio.sleep(0.1)  # its confirm has begun
        await worker.close()
        assert wait_gone(process)
        release.set()
        with pytest.raises(Unavailable, match=r"^shutting down: reconnect and retry$"):
            await asyncio.wait_for(held, 10)
        with pytest.raises(Unavailable, match=r"^shutting down: reconnect and retry$"):
            await asyncio.wait_for(worker.submit(job_of(tmp_path, "later", b"x")), 10)
        assert set(commit_workers(os.getpid())) == others
        assert [p.name for p in tmp_path.iterdir()] == ["first"]
    finally:
        await worker.close()


async def test_commits_queued_behind_the_confirms_fail_at_close_without_a_confirm(tmp_path):
    """At close, commits still waiting for room among the confirms in flight fail shutting down at once: their
    `before_visible` (a call to the coordinator) is never made for a commit that cannot be sent. Those whose
    `before_visible` runs fail once it ends; nothing is stored."""
    worker = CommitWorker()
    release = asyncio.Event()
    confirms_begun: list[str] = []

    def confirm_of(name: str) -> BeforeVisible:
        async def confirm() -> None:
            confirms_begun.append(name)
            await release.wait()
        return confirm

    running = [f"running{i}" for i in range(CONFIRMS_IN_FLIGHT)]
    try:
        outcomes = {}
        for name in running:  # a batch each: every confirm in flight hangs
            outcomes[name] = worker.submit(job_of(tmp_path, name, b"x"), confirm_of(name))
            await asyncio.sleep(0.05)
        outcomes["queued"] = worker.submit(job_of(tmp_path, "queued", b"x"), confirm_of("queued"))
        await asyncio.sleep(0.05)
        assert confirms_begun == running
        await asyncio.wait_for(worker.close(), 10)
        with pytest.raises(Unavailable, match=r"^shutting down: reconnect and retry$"):
            await asyncio.wait_for(outcomes["queued"], 1)
        release.set()
        for name in running:
            with pytest.raises(Unavailable, match=r"^shutting down: reconnect and retry$"):
                await asyncio.wait_for(outcomes[name], 10)
        assert confirms_begun == running
        assert not list(tmp_path.iterdir())
    finally:
        release.set()
        await worker.close()


async def test_a_worker_closed_while_it_starts_is_stopped_and_its_commit_fails_shutting_down(tmp_path):
    """The worker was being started for a commit when it was closed (the daemon shutting down): the process left
    afterwards committed the batch and lived until the daemon's exit."""
    worker = CommitWorker()
    others = set(commit_workers(os.getpid()))
    try:
        starting = worker.submit(job_of(tmp_path, "first", b"x"))
        while not set(commit_workers(os.getpid())) - others:  # its process runs, not yet handed to the worker
            await asyncio.sleep(0)
        await worker.close()
        with pytest.raises(Unavailable, match=r"^shutting down: reconnect and retry$"):
            await asyncio.wait_for(starting, 10)
        assert wait_until(lambda: set(commit_workers(os.getpid())) == others, timeout=10)
        assert not list(tmp_path.iterdir())
    finally:
        await worker.close()


def test_a_commit_into_new_folders_fsyncs_every_folder_whose_entries_it_changed(tmp_path, monkeypatch):
    """Only the file's own folder was fsynced: the folders a commit made, and their entries in the folders above,
    were not, so a power cut could lose a new folder, and the acknowledged file in it, on a file system that does
    not order its metadata (ext4 without a journal). `place` names every folder whose entries it changed, and a
    batch fsyncs each of them (a file put into an existing folder fsyncs that folder alone, as before)."""
    root = tmp_path / "objects"
    (root / "old").mkdir(parents=True)
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:  # the real fsync, and what it made durable
        fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", recording)
    sent = ClientChecksums(sha256="", crc32c=crc32c(b"x"))
    jobs: list[Job] = [(str(tmp_path / "t1"), str(root / "new/sub/f"), b"x", sent),
                       (str(tmp_path / "t2"), str(root / "old/g"), b"x", sent)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = commit_batch(jobs, pool)
    assert [outcome[0] for outcome in outcomes] == ["ok", "ok"], outcomes
    folders = sorted(path for path in synced if os.path.isdir(path))
    assert folders == [str(root), str(root / "new"), str(root / "new/sub"), str(root / "old")]
    assert (root / "new/sub/f").exists() and (root / "old/g").exists()
