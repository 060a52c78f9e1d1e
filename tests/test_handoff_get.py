"""Same-host gets: a client hands the daemon its open destination file, and the daemon writes the file's bytes into
it (drive_client.handoff, drived.handoff).

Real daemons on loopback ports, real abstract Unix sockets and SCM_RIGHTS. Every get ends with the right bytes at
its target, or with the error a streamed get gives and nothing at the target; whatever is sent wrong is refused
with the stored data as it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import pathlib
import signal

import grpc
import pytest
from conftest import MIB, descriptor_targets, file_sha256, open_fds, rpc_code, wait_until, write_random_file
from test_handoff import _send, handoffs, hanging, holds
from test_storage_s3 import Store
from test_stored_files import flip, stored_path

import drive_client.core as core
from drive_client import AsyncDrive, DataLoss, Drive
from drive_client.handoff import GET, PUT, hand_over
from drive_client.pb import drive_pb2, drive_pb2_grpc

SIZE = 3 * MIB + 5


@pytest.fixture(autouse=True)
def on_disk(tmp_path):
    """The daemon writes no get into a file in memory (tmpfs answers F_GET_SEALS): these tests need tmp_path on a
    disk, as pytest's default basetemp is on this project's machines."""
    fd = os.open(tmp_path / ".on-disk-probe", os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return
    finally:
        os.close(fd)
        os.unlink(tmp_path / ".on-disk-probe")
    pytest.skip(f"{tmp_path} is on tmpfs, where the daemon writes no get by design (README, Same-host puts and "
                "gets): run pytest with --basetemp on a disk")


@pytest.fixture(autouse=True)
def big_enough(monkeypatch):
    """Gets of SIZE are handed over, as those of PARALLEL_MIN_SIZE and more are: the tests move a few MiB each."""
    monkeypatch.setattr(core, "PARALLEL_MIN_SIZE", 2 * MIB)


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(daemon.endpoint) as channel:
        yield drive_pb2_grpc.DriveServiceStub(channel)


def stored(handle, tmp_path, drive_uri: str, name: str = "f.bin", size: int = SIZE) -> tuple[Drive, str]:
    """A drive on `handle` holding a file `name` of `size` random bytes; the drive and the file's sha256."""
    digest = write_random_file(tmp_path / "src" / name, size)
    Drive(drive_uri, root_folder=str(tmp_path / "src"), endpoint=handle.endpoint).put(name)
    return Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint), digest


def leftovers(folder) -> list[str]:
    """Temporary files of gets left in `folder`."""
    return [name for name in os.listdir(folder) if name.endswith(".part")]


def handed_get(stub, drive: str, path: str, token: str | None, **request) -> list[drive_pb2.GetResponse]:
    return list(stub.Get(drive_pb2.GetRequest(drive=drive, path=path, handoff=token or "", **request), timeout=30))


def refused_handed_get(handle, tmp_path, drive_uri: str) -> str:
    """The details of the HandoffNotHeld a raw Get of f.bin into a file handed over to `handle` gets."""
    with open(tmp_path / "raw.part", "wb") as f, grpc.insecure_channel(handle.endpoint) as channel:
        token = hand_over(handle.port, f.fileno(), GET)
        with pytest.raises(grpc.RpcError) as refused:
            handed_get(drive_pb2_grpc.DriveServiceStub(channel), drive_uri, "f.bin", token)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details().startswith("drived: handoff: ")
    return refused.value.details()


def test_a_big_get_is_handed_over_and_gets_its_bytes(daemon, tmp_path, drive_uri, monkeypatch):
    monkeypatch.undo()  # the threshold as shipped
    size = core.PARALLEL_MIN_SIZE + 3
    d, digest = stored(daemon, tmp_path, drive_uri, size=size)
    written = handoffs(daemon, "written")
    seen: list[int] = []
    d.get("f.bin", to="back.bin", progress=seen.append)
    assert file_sha256(tmp_path / "back.bin") == digest
    assert handoffs(daemon, "written") == written + 1
    assert sum(seen) == size
    assert not leftovers(tmp_path) and wait_until(lambda: not holds(daemon.proc.pid, tmp_path))


def test_both_twins_get_a_handed_file_and_overwrite_a_longer_one(daemon, tmp_path, drive_uri, twin):
    _, digest = stored(daemon, tmp_path, drive_uri)
    write_random_file(tmp_path / "back.bin", 2 * SIZE)  # longer than the get: no tail of it is kept
    written = handoffs(daemon, "written")
    twin(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint).get("f.bin", to="back.bin", overwrite=True)
    assert file_sha256(tmp_path / "back.bin") == digest
    assert handoffs(daemon, "written") == written + 1


def test_a_get_through_storage_in_s3_is_fetched_over_ranged_reads_not_handed_over(tmp_path, drive_uri):
    """The store serves a file faster over the client's parallel ranged reads than over the one stream of a Get that
    writes into a handed file: the daemon refuses that Get (NOT_FOUND, "drived: handoff: "), and the client fetches the
    bytes so."""
    store = Store(tmp_path)
    try:
        handle = store.daemon()
        d, digest = stored(handle, tmp_path, drive_uri)
        d.get("f.bin", to="back.bin")
        assert file_sha256(tmp_path / "back.bin") == digest
        assert handoffs(handle, "written") == 0 and not leftovers(tmp_path)
        assert "keeps its files' bytes in S3" in refused_handed_get(handle, tmp_path, drive_uri)
        assert os.path.getsize(tmp_path / "raw.part") == 0 and d.stat("f.bin").sha256 == digest
    finally:
        store.close()


def test_drive_handoff_off_or_a_daemon_without_handoffs_gets_the_bytes(start_daemon, daemon, tmp_path, drive_uri,
                                                                        monkeypatch):
    d, digest = stored(daemon, tmp_path, drive_uri)
    written = handoffs(daemon, "written")
    monkeypatch.setenv("DRIVE_HANDOFF", "0")
    d.get("f.bin", to="a.bin")
    assert file_sha256(tmp_path / "a.bin") == digest and handoffs(daemon, "written") == written
    monkeypatch.delenv("DRIVE_HANDOFF")
    off = start_daemon(tmp_path, "--handoff", "off")
    d, digest = stored(off, tmp_path, drive_uri, name="g.bin")
    d.get("g.bin", to="b.bin")
    assert file_sha256(tmp_path / "b.bin") == digest and handoffs(off, "written") == 0
    assert not leftovers(tmp_path)


def test_a_damaged_stored_file_is_data_loss_and_leaves_the_target_as_it_was(daemon, tmp_path, drive_uri):
    d, _ = stored(daemon, tmp_path, drive_uri)
    flip(stored_path(daemon.data_dir, drive_uri, "f.bin"), 64 + SIZE - 100)  # in the last block
    damaged = stored_path(daemon.data_dir, drive_uri, "f.bin").read_bytes()
    (tmp_path / "old.bin").write_bytes(b"the old target")
    written = handoffs(daemon, "written")
    with pytest.raises(DataLoss, match="is damaged"):
        d.get("f.bin", to="old.bin", overwrite=True)
    with pytest.raises(DataLoss, match="is damaged"):
        d.get("f.bin", to="new.bin")
    assert (tmp_path / "old.bin").read_bytes() == b"the old target"
    assert not (tmp_path / "new.bin").exists() and not leftovers(tmp_path)
    assert handoffs(daemon, "written") == written
    assert stored_path(daemon.data_dir, drive_uri, "f.bin").read_bytes() == damaged


def test_a_changed_file_is_aborted_as_a_pinned_get_is(daemon, stub, tmp_path, drive_uri):
    d, digest = stored(daemon, tmp_path, drive_uri)
    with open(tmp_path / "t.part", "wb") as f:
        token = hand_over(daemon.port, f.fileno(), GET)
        code = rpc_code(lambda: handed_get(stub, drive_uri, "f.bin", token, if_match="0" * 64))
    assert code == grpc.StatusCode.ABORTED
    assert os.path.getsize(tmp_path / "t.part") == 0 and d.stat("f.bin").sha256 == digest


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_PATH])
def test_a_destination_not_open_for_writing_at_offsets_is_refused(daemon, tmp_path, flags):
    (tmp_path / "f").write_bytes(b"data")
    before = open_fds(daemon.proc.pid)
    refused = handoffs(daemon, "refused")
    fd = os.open(tmp_path / "f", flags)
    try:
        answer = _send(daemon.port, GET, [fd])
    finally:
        os.close(fd)
    assert answer.startswith("busy ") and ("open for writing" in answer or "O_PATH" in answer), answer
    assert wait_until(lambda: handoffs(daemon, "refused") == refused + 1)
    assert wait_until(lambda: open_fds(daemon.proc.pid) <= before)
    assert (tmp_path / "f").read_bytes() == b"data"


def test_a_fifo_or_a_folder_is_refused(daemon, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    before = open_fds(daemon.proc.pid)
    with contextlib.ExitStack() as opened:
        fifo = os.open(tmp_path / "fifo", os.O_RDWR)  # open for writing, without waiting for a reader
        folder = os.open(tmp_path, os.O_RDONLY)
        for fd in (fifo, folder):
            opened.callback(os.close, fd)
        answers = [_send(daemon.port, GET, [fifo]), _send(daemon.port, GET, [folder])]
    assert all(answer.startswith("busy only an open regular file") for answer in answers), answers
    assert wait_until(lambda: open_fds(daemon.proc.pid) <= before)


@pytest.mark.parametrize("mode", [0o4777, 0o2775])
def test_a_setuid_or_setgid_destination_is_refused(daemon, tmp_path, drive_uri, mode):
    """A daemon run as root keeps a file's setuid and setgid bits as it writes (CAP_FSETID), where the client's own
    write drops them: a world-writable setuid program of root's would become root's program with the client's bytes
    (seen: a client run as nobody got a root-owned 04777 file holding a drive file's bytes)."""
    d, digest = stored(daemon, tmp_path, drive_uri)
    program = tmp_path / "program"
    program.write_bytes(b"#!/bin/sh\n")
    os.chmod(program, mode)
    before = open_fds(daemon.proc.pid)
    fd = os.open(program, os.O_WRONLY)
    try:
        answer = _send(daemon.port, GET, [fd])
    finally:
        os.close(fd)
    assert answer.startswith("busy ") and "setuid" in answer, answer
    assert wait_until(lambda: open_fds(daemon.proc.pid) <= before)
    assert program.read_bytes() == b"#!/bin/sh\n" and os.stat(program).st_mode & 0o7777 == mode
    assert d.stat("f.bin").sha256 == digest


def test_a_destination_in_memory_is_refused_and_fetched_by_the_client(daemon, tmp_path, drive_uri):
    """The pages of a file in tmpfs (/dev/shm, a memfd) are charged to the memory of the process that writes them and
    stay there: written by the daemon, a get into one would hold the file's whole size against the daemon's memory
    (its container's or service's limit), not the 17 MiB a written get holds. The client writes them itself."""
    d, digest = stored(daemon, tmp_path, drive_uri)
    memfd = os.memfd_create("destination")
    try:
        answer = _send(daemon.port, GET, [memfd])
    finally:
        os.close(memfd)
    assert answer.startswith("busy ") and "memory" in answer, answer
    target = pathlib.Path("/dev/shm") / f"drived-test-{os.getpid()}-{drive_uri.removeprefix('lit://')}.bin"
    written = handoffs(daemon, "written")
    try:
        d.get("f.bin", to=str(target))
        assert file_sha256(target) == digest
    finally:
        target.unlink(missing_ok=True)
    assert handoffs(daemon, "written") == written and d.stat("f.bin").sha256 == digest


def test_a_token_is_used_once_and_only_for_its_direction(daemon, stub, tmp_path, drive_uri):
    d, digest = stored(daemon, tmp_path, drive_uri)
    with open(tmp_path / "t.part", "wb") as f:
        token = hand_over(daemon.port, f.fileno(), GET)
        assert token and holds(daemon.proc.pid, tmp_path / "t.part")
        [info, last] = handed_get(stub, drive_uri, "f.bin", token)
    assert info.info.size == SIZE and last.written.size == SIZE and last.written.crc32c == info.info.crc32c
    assert file_sha256(tmp_path / "t.part") == digest
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "t.part"))
    with pytest.raises(grpc.RpcError) as again:
        handed_get(stub, drive_uri, "f.bin", token)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND and again.value.details().startswith("drived: handoff: ")
    with open(tmp_path / "src" / "f.bin", "rb") as f:  # a file handed over to be put is no get's destination
        put_token = hand_over(daemon.port, f.fileno(), PUT)
        assert rpc_code(lambda: handed_get(stub, drive_uri, "f.bin", put_token)) == grpc.StatusCode.NOT_FOUND
    assert file_sha256(tmp_path / "src" / "f.bin") == digest and d.stat("f.bin").sha256 == digest


@pytest.mark.parametrize("request_fields", [{"offset": 1}, {"limit": 5}, {"wait_seconds": 1.0}, {"path": ""}])
def test_a_get_into_a_handed_file_is_one_whole_file(daemon, stub, tmp_path, drive_uri, request_fields):
    d, digest = stored(daemon, tmp_path, drive_uri)
    path = request_fields.pop("path", "f.bin")
    with open(tmp_path / "t.part", "wb") as f:
        token = hand_over(daemon.port, f.fileno(), GET)
        with pytest.raises(grpc.RpcError) as refused:
            handed_get(stub, drive_uri, path, token, **request_fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert os.path.getsize(tmp_path / "t.part") == 0
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "t.part"))
    assert d.list() == ["f.bin"] and d.stat("f.bin").sha256 == digest


def test_a_handed_get_needs_the_token_of_the_drive(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path, env={"DRIVED_TOKEN": "s3cret-token-1234"})
    digest = write_random_file(tmp_path / "f.bin", SIZE)
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint, token="s3cret-token-1234")
    d.put("f.bin")
    with open(tmp_path / "t.part", "wb") as f:
        token = hand_over(handle.port, f.fileno(), GET)
        assert token
        with grpc.insecure_channel(handle.endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            assert rpc_code(lambda: handed_get(stub, drive_uri, "f.bin", token)) == grpc.StatusCode.UNAUTHENTICATED
    assert os.path.getsize(tmp_path / "t.part") == 0 and d.stat("f.bin").sha256 == digest


def test_an_expired_token_falls_back_to_ranged_reads(start_daemon, tmp_path, drive_uri):
    """Every file handed over expires before its Get comes: the client fetches the bytes itself, at once."""
    handle = start_daemon(tmp_path, before="import drived.handoff as h; h.HOLD_SECONDS = 0.0")
    d, digest = stored(handle, tmp_path, drive_uri)
    d.get("f.bin", to="back.bin")
    assert file_sha256(tmp_path / "back.bin") == digest
    assert handoffs(handle, "taken") == 2 and handoffs(handle, "written") == 0  # the put's file, then the get's
    assert not leftovers(tmp_path)


def test_gets_past_the_most_written_at_once_fall_back(start_daemon, tmp_path, drive_uri):
    """A Get that names a token while WRITING gets are being written is refused as a token not held (each written
    one holds two batches of WRITE_SIZE): its client fetches the bytes in streams, and the file handed over is let
    go untouched."""
    handle = start_daemon(tmp_path, before="import drived.handoff as h; h.WRITING = 0")
    d, digest = stored(handle, tmp_path, drive_uri)
    d.get("f.bin", to="back.bin")
    assert file_sha256(tmp_path / "back.bin") == digest and handoffs(handle, "written") == 0
    assert "gets are being written into files handed over" in refused_handed_get(handle, tmp_path, drive_uri)
    assert os.path.getsize(tmp_path / "raw.part") == 0 and d.stat("f.bin").sha256 == digest
    assert wait_until(lambda: not holds(handle.proc.pid, tmp_path))


def test_a_block_damaged_while_a_batch_is_written_is_data_loss_and_nothing_is_kept(start_daemon, tmp_path,
                                                                                    drive_uri):
    """Batches are written while the next are read and checked: a damaged block in the second one fails the get
    with the first batch written, and its temporary file goes with it."""
    handle = start_daemon(tmp_path, before="import drived.handoff as h; h.WRITE_SIZE = 1 << 20")
    d, _ = stored(handle, tmp_path, drive_uri)
    flip(stored_path(handle.data_dir, drive_uri, "f.bin"), 64 + 2 * MIB + 100)  # the third batch's block
    damaged = stored_path(handle.data_dir, drive_uri, "f.bin").read_bytes()
    with pytest.raises(DataLoss, match="is damaged"):
        d.get("f.bin", to="new.bin")
    assert not (tmp_path / "new.bin").exists() and not leftovers(tmp_path)
    assert handoffs(handle, "written") == 0 and handoffs(handle, "taken") == 2  # the put's file, then the get's
    assert stored_path(handle.data_dir, drive_uri, "f.bin").read_bytes() == damaged


def test_writes_past_the_daemons_file_size_limit_fall_back(start_daemon, tmp_path, drive_uri):
    """The daemon's writes fail (EFBIG past its RLIMIT_FSIZE, as on a full disk): the client fetches the bytes."""
    first = start_daemon(tmp_path)
    d, digest = stored(first, tmp_path, drive_uri)
    first.stop(signal.SIGTERM, timeout=15)
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({MIB}, {MIB}))"
    handle = start_daemon(tmp_path, data_dir=first.data_dir, before=limit)
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint)
    d.get("f.bin", to="back.bin")
    assert file_sha256(tmp_path / "back.bin") == digest
    assert handoffs(handle, "taken") == 1 and handoffs(handle, "written") == 0
    assert not leftovers(tmp_path) and d.stat("f.bin").sha256 == digest
    assert "File too large" in refused_handed_get(handle, tmp_path, drive_uri)


def test_a_hung_write_falls_back(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path, "--grace-period", "1", before=hanging("pwritev", ".part"))
    d, digest = stored(handle, tmp_path, drive_uri)
    d.get("f.bin", to="back.bin")
    assert file_sha256(tmp_path / "back.bin") == digest
    assert handoffs(handle, "taken") == 2 and handoffs(handle, "written") == 0  # the put's file, then the get's
    assert not leftovers(tmp_path)
    assert "took more than 0.2 s" in refused_handed_get(handle, tmp_path, drive_uri)
    assert str(tmp_path) not in " ".join(descriptor_targets(os.getpid()))
    assert handle.stop(signal.SIGTERM, timeout=10) == 0


PAUSED_WRITES = """
import os, threading
_pwritev = os.pwritev
def pwritev(fd, buffers, offset):  # the writes into a get's file wait while the file {pause} exists
    while os.readlink(f"/proc/self/fd/{{fd}}").endswith(".part") and os.path.exists({pause!r}):
        threading.Event().wait(0.02)
    return _pwritev(fd, buffers, offset)
os.pwritev = pwritev
"""


async def test_a_cancelled_handed_get_leaves_no_file(start_daemon, tmp_path, drive_uri):
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=PAUSED_WRITES.format(pause=str(pause)))
    _, digest = stored(handle, tmp_path, drive_uri)
    (tmp_path / "old.bin").write_bytes(b"old")
    pause.touch()
    drive = AsyncDrive(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint)
    get = asyncio.create_task(drive.get("f.bin", to="old.bin", overwrite=True))
    assert await asyncio.to_thread(wait_until, lambda: handoffs(handle, "taken") == 2)  # the put's, then the get's
    get.cancel()
    with pytest.raises(asyncio.CancelledError):
        await get
    # The daemon ends the Get while its write is paused: let go first, the write would end it and count as written.
    assert await asyncio.to_thread(wait_until, lambda: handle.open_requests("Get") == 0)
    pause.unlink()
    assert (tmp_path / "old.bin").read_bytes() == b"old" and not leftovers(tmp_path)
    assert handoffs(handle, "written") == 0
    assert (await drive.get("f.bin", to="old.bin", overwrite=True)).stat().st_size == SIZE  # it works on
    assert file_sha256(tmp_path / "old.bin") == digest
    await drive.close()


def test_a_handed_get_cut_by_a_restart_is_fetched_over_ranged_reads(start_daemon, tmp_path, drive_uri):
    """The daemon stops while it writes the file (its grace period ends the Get): the client fetches the bytes over
    ranged reads, which wait for the daemon back."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, "--grace-period", "0.5", before=PAUSED_WRITES.format(pause=str(pause)))
    d, digest = stored(handle, tmp_path, drive_uri)
    pause.touch()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        get = pool.submit(d.get, "f.bin", to="back.bin")
        assert wait_until(lambda: handoffs(handle, "taken") == 2 and handle.open_requests("Get") == 1)
        handle.stop(signal.SIGTERM, timeout=15)
        pause.unlink()
        again = start_daemon(tmp_path, port=handle.port, data_dir=handle.data_dir)
        assert get.result(timeout=30) == tmp_path / "back.bin"
    assert file_sha256(tmp_path / "back.bin") == digest
    assert handoffs(again, "taken") == 0 and not leftovers(tmp_path)
