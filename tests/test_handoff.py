"""Same-host puts: a client hands the daemon its open file (drive_client.handoff, drived.handoff).

Real daemons on loopback ports, real abstract Unix sockets and SCM_RIGHTS; what a client could send that is
wrong is refused with nothing stored, and the daemon's descriptors stay bounded.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
from conftest import (
    MIB,
    descriptor_targets,
    file_sha256,
    free_port,
    open_fds,
    rpc_code,
    sha256_hex,
    wait_until,
    write_random_file,
)
from crc32c import crc32c

from drive_client import Drive, ResourceExhausted
from drive_client.handoff import PUT, hand_over, socket_name
from drive_client.pb import drive_pb2, drive_pb2_grpc


def handoffs(handle, outcome: str) -> float:
    """The daemon's count of handoffs with `outcome` (taken, refused)."""
    with urllib.request.urlopen(f"http://{handle.metrics}/metrics", timeout=5) as answer:
        found = re.search(rf'^drived_handoff_files_total{{outcome="{outcome}"}} (\S+)$', answer.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def handed(drive: str, path: str, token: str | None, size: int, **header) -> list[drive_pb2.PutRequest]:
    """A handed file's messages: its header, then its finish (no checksums)."""
    return [drive_pb2.PutRequest(header=drive_pb2.PutHeader(drive=drive, path=path, size=size, handoff=token or "",
                                                            **header)),
            drive_pb2.PutRequest(finish=drive_pb2.PutFinish())]


def handed_put(stub, drive: str, path: str, token: str | None, size: int, **header) -> drive_pb2.PutResponse:
    return stub.Put(iter(handed(drive, path, token, size, **header)), timeout=60)


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(daemon.endpoint) as channel:
        yield drive_pb2_grpc.DriveServiceStub(channel)


def holds(pid: int, path) -> bool:
    return str(path) in descriptor_targets(pid)


def test_a_drive_put_hands_a_big_file_over_and_stores_its_bytes(daemon, tmp_path, drive_uri):
    digest = write_random_file(tmp_path / "model.bin", 5 * MIB + 3)
    taken = handoffs(daemon, "taken")
    seen: list[int] = []
    [stat] = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint).put("model.bin",
                                                                                       progress=seen.append)
    assert stat.sha256 == digest and stat.size == 5 * MIB + 3
    assert handoffs(daemon, "taken") == taken + 1
    assert sum(seen) == 5 * MIB + 3
    Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint).get("model.bin", to="back.bin")
    assert file_sha256(tmp_path / "back.bin") == digest
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "model.bin"))


def test_drive_handoff_off_streams_the_bytes(daemon, tmp_path, drive_uri, monkeypatch):
    monkeypatch.setenv("DRIVE_HANDOFF", "0")
    digest = write_random_file(tmp_path / "a.bin", 3 * MIB)
    taken = handoffs(daemon, "taken")
    [stat] = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint).put("a.bin")
    assert stat.sha256 == digest and handoffs(daemon, "taken") == taken


def test_a_drive_that_verifies_sha256_streams_its_bytes(daemon, tmp_path, drive_uri):
    digest = write_random_file(tmp_path / "a.bin", 3 * MIB)
    taken = handoffs(daemon, "taken")
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint, verify="sha256")
    assert d.put("a.bin")[0].sha256 == digest
    assert handoffs(daemon, "taken") == taken


def test_checksums_sent_with_a_handed_file_are_checked(daemon, stub, tmp_path, drive_uri):
    data = os.urandom(2 * MIB)
    (tmp_path / "f.bin").write_bytes(data)
    for crc, stored in ((crc32c(data) ^ 1, False), (crc32c(data), True)):
        with open(tmp_path / "f.bin", "rb") as f:
            token = hand_over(daemon.port, f.fileno())
        [header, _] = handed(drive_uri, "f.bin", token, 2 * MIB)
        finish = drive_pb2.PutRequest(finish=drive_pb2.PutFinish(crc32c=crc))
        if stored:
            [info] = stub.Put(iter([header, finish]), timeout=60).files
            assert info.sha256 == sha256_hex(data)
        else:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Put(iter([header, finish]), timeout=60)
            assert refused.value.code() == grpc.StatusCode.DATA_LOSS
            assert not stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries


def test_a_raw_handoff_put_and_its_token_is_used_once(daemon, stub, tmp_path, drive_uri):
    digest = write_random_file(tmp_path / "f.bin", 2 * MIB)
    with open(tmp_path / "f.bin", "rb") as f:
        token = hand_over(daemon.port, f.fileno())
    assert token and holds(daemon.proc.pid, tmp_path / "f.bin")
    [info] = handed_put(stub, drive_uri, "f.bin", token, 2 * MIB).files
    assert info.sha256 == digest
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "f.bin"))
    with pytest.raises(grpc.RpcError) as again:
        handed_put(stub, drive_uri, "g.bin", token, 2 * MIB)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    assert again.value.details().startswith("drived: handoff: ")
    assert [e.path for e in stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries] == ["f.bin"]


@pytest.mark.parametrize("header", [
    {"size": 2 * MIB + 1}, {"size": 2 * MIB - 1}, {"size": 2 * MIB, "write_offset": MIB, "upload_id": "u1"},
])
def test_a_handed_file_whose_header_disagrees_is_refused(daemon, stub, tmp_path, drive_uri, header):
    write_random_file(tmp_path / "f.bin", 2 * MIB)
    with open(tmp_path / "f.bin", "rb") as f:
        token = hand_over(daemon.port, f.fileno())
    size = header.pop("size")
    code = rpc_code(lambda: handed_put(stub, drive_uri, "f.bin", token, size, **header))
    assert code in (grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "f.bin"))
    stat = drive_pb2.StatRequest(drive=drive_uri, path="f.bin")
    assert rpc_code(lambda: stub.Stat(stat)) == grpc.StatusCode.NOT_FOUND


def test_a_handed_file_is_stored_only_at_its_finish(daemon, stub, tmp_path, drive_uri):
    """A stream that ends after the header (its client interrupted as the call started) stores nothing, and a
    resumable one is held for a resume, as a cut stream of bytes is."""
    write_random_file(tmp_path / "f.bin", 2 * MIB)
    for upload_id in ("", "u-finish-1"):
        with open(tmp_path / "f.bin", "rb") as f:
            token = hand_over(daemon.port, f.fileno())
        [header, _] = handed(drive_uri, "f.bin", token, 2 * MIB, upload_id=upload_id)
        with pytest.raises(grpc.RpcError) as ended:
            stub.Put(iter([header]), timeout=60)
        assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "before the finish" in ended.value.details()
        assert not stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries
        assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "f.bin"))
    query = drive_pb2.QueryWriteStatusRequest(drive=drive_uri, upload_id="u-finish-1")
    assert stub.QueryWriteStatus(query).committed_size == 2 * MIB


def test_a_file_changed_after_it_was_handed_over_is_refused_and_the_old_version_kept(
        daemon, stub, tmp_path, drive_uri):
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    old = write_random_file(tmp_path / "f.bin", 2 * MIB)
    d.put("f.bin")
    with open(tmp_path / "f.bin", "rb") as f:
        token = hand_over(daemon.port, f.fileno())
        with open(tmp_path / "f.bin", "r+b") as w:
            w.write(b"x" * 10)
        with pytest.raises(grpc.RpcError) as refused:
            handed_put(stub, drive_uri, "f.bin", token, 2 * MIB)
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert "changed while it was being put" in refused.value.details()
    assert d.stat("f.bin").sha256 == old


def test_a_token_sent_with_a_whole_file_or_unknown_is_refused(daemon, stub, drive_uri):
    header = drive_pb2.PutHeader(drive=drive_uri, path="a", handoff="0" * 32)
    whole = drive_pb2.PutFileRequest(header=header, data=b"abc")
    assert rpc_code(lambda: stub.PutFile(whole, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        handed_put(stub, drive_uri, "a", "0" * 32, 3)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "no file handed over" in unknown.value.details()
    assert not stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries


def _send(port: int, message: bytes, fds: list[int]) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.settimeout(5)
        connection.connect("\0" + socket_name(port))
        connection.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
        return connection.recv(1024).decode()


def test_what_is_not_one_readable_file_is_refused_and_not_held(daemon, tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    before = open_fds(daemon.proc.pid)
    refused = handoffs(daemon, "refused")
    read_end, write_end = os.pipe()
    with contextlib.ExitStack() as opened:
        f = opened.enter_context(open(tmp_path / "f", "rb"))
        write_only = os.open(tmp_path / "f", os.O_WRONLY)
        folder = os.open(tmp_path, os.O_RDONLY)
        path_only = os.open(tmp_path / "f", os.O_PATH)
        for fd in (write_end, read_end, write_only, folder, path_only):
            opened.callback(os.close, fd)
        answers = [
            _send(daemon.port, PUT, [read_end]),  # a pipe
            _send(daemon.port, PUT, [write_only]),
            _send(daemon.port, PUT, [folder]),
            _send(daemon.port, PUT, [path_only]),
            _send(daemon.port, PUT, [f.fileno(), f.fileno()]),  # two descriptors
            _send(daemon.port, PUT, []),  # none
            _send(daemon.port, b"get", [f.fileno()]),  # another request
        ]
    assert all(answer.startswith("busy ") for answer in answers), answers
    assert handoffs(daemon, "refused") == refused + len(answers)
    assert wait_until(lambda: open_fds(daemon.proc.pid) <= before)


def test_a_daemon_with_handoff_off_or_behind_another_port_gets_the_bytes(start_daemon, tmp_path, drive_uri):
    """No socket: the client streams. An impostor's socket answering a token the daemon does not hold: the daemon
    refuses it, and the client sends the bytes in the stream instead, once."""
    handle = start_daemon(tmp_path, "--handoff", "off")
    assert "drived-handoff" not in " ".join(descriptor_targets(handle.proc.pid))
    digest = write_random_file(tmp_path / "a.bin", 3 * MIB)
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint)
    assert d.put("a.bin")[0].sha256 == digest
    taken: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as impostor:
        impostor.bind("\0" + socket_name(handle.port))
        impostor.listen(4)

        def answer() -> None:
            connection, _ = impostor.accept()
            with connection:
                _, fds, _, _ = socket.recv_fds(connection, 16, 4)
                taken.extend(fds)
                connection.send(b"ok " + b"f" * 32)

        server = threading.Thread(target=answer)
        server.start()
        digest = write_random_file(tmp_path / "b.bin", 3 * MIB)
        assert d.put("b.bin")[0].sha256 == digest
        server.join(10)
    assert len(taken) == 1
    os.close(taken[0])
    assert d.stat("b.bin").sha256 == digest


def test_held_files_are_bounded_and_expire(start_daemon, tmp_path):
    """Files handed over and never put: at most MAX_HELD held (then refused), each closed after HOLD_SECONDS."""
    handle = start_daemon(tmp_path, before="import drived.handoff as h; h.MAX_HELD = 5; h.HOLD_SECONDS = 1.0")
    (tmp_path / "f").write_bytes(b"data")
    before = open_fds(handle.proc.pid)
    with open(tmp_path / "f", "rb") as f:
        tokens = [hand_over(handle.port, f.fileno()) for _ in range(7)]
    assert all(tokens[:5]) and tokens[5:] == [None, None]
    assert descriptor_targets(handle.proc.pid).count(str(tmp_path / "f")) == 5
    assert wait_until(lambda: open_fds(handle.proc.pid) <= before, timeout=10)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        code = rpc_code(lambda: handed_put(stub, "lit://held", "f", str(tokens[0]), 4))
    assert code == grpc.StatusCode.NOT_FOUND


def test_silent_handoff_connections_are_bounded_and_dropped(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path, before="import drived.handoff as h; h.HANDOFF_SECONDS = 0.5")
    before = open_fds(handle.proc.pid)
    connections = []
    try:
        for _ in range(40):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            connection.settimeout(5)
            with contextlib.suppress(OSError):  # the backlog is full: refused, as a flood should be
                connection.connect("\0" + socket_name(handle.port))
            connections.append(connection)
        assert open_fds(handle.proc.pid) <= before + 16 + 1
        assert wait_until(lambda: open_fds(handle.proc.pid) <= before, timeout=10)
    finally:
        for connection in connections:
            connection.close()
    digest = write_random_file(tmp_path / "a.bin", 3 * MIB)
    assert Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint).put("a.bin")[0].sha256 == digest
    assert handoffs(handle, "taken") == 1


def test_handed_files_keep_the_put_limits(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path, "--max-file-size", "2M")
    write_random_file(tmp_path / "big.bin", 3 * MIB)
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint)
    with pytest.raises(ResourceExhausted):
        d.put("big.bin")
    assert not d.list()
    assert wait_until(lambda: not holds(handle.proc.pid, tmp_path / "big.bin"))


def test_a_handed_put_needs_the_token_of_the_drive(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path, env={"DRIVED_TOKEN": "s3cret-token-1234"})
    write_random_file(tmp_path / "f.bin", 2 * MIB)
    with open(tmp_path / "f.bin", "rb") as f:
        token = hand_over(handle.port, f.fileno())
    assert token
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        assert rpc_code(lambda: handed_put(stub, drive_uri, "f.bin", token, 2 * MIB)) == \
            grpc.StatusCode.UNAUTHENTICATED
    d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint, token="s3cret-token-1234")
    assert not d.list()
    assert d.put("f.bin")[0].size == 2 * MIB


def test_a_put_cancelled_while_the_daemon_reads_stores_nothing_and_lets_the_file_go(daemon, tmp_path, drive_uri):
    write_random_file(tmp_path / "big.bin", 192 * MIB)
    with grpc.insecure_channel(daemon.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        with open(tmp_path / "big.bin", "rb") as f:
            token = hand_over(daemon.port, f.fileno())
        assert token
        call = stub.Put.future(iter(handed(drive_uri, "big.bin", token, 192 * MIB)))
        daemon.wait_open("Put", 1)
        call.cancel()
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "big.bin"), timeout=20)
    d = Drive(drive_uri, endpoint=daemon.endpoint)
    assert wait_until(lambda: daemon.open_requests("Put") == 0, timeout=20)
    if d.list():  # cancelled too late: stored whole
        assert d.stat("big.bin").sha256 == file_sha256(tmp_path / "big.bin")


def test_a_daemon_killed_with_files_held_restarts_and_takes_handoffs(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path)
    write_random_file(tmp_path / "f.bin", 2 * MIB)
    with open(tmp_path / "f.bin", "rb") as f:
        assert hand_over(handle.port, f.fileno())
    handle.stop(signal.SIGKILL)
    again = start_daemon(tmp_path, port=handle.port, data_dir=handle.data_dir)
    digest = file_sha256(tmp_path / "f.bin")
    assert Drive(drive_uri, root_folder=str(tmp_path), endpoint=again.endpoint).put("f.bin")[0].sha256 == digest
    assert handoffs(again, "taken") == 1


IMPOSTOR = """
import contextlib, os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
os.setgid(65534)
os.setuid(65534)  # another user of the host, before it listens: its credentials are the socket's
listener.bind("\\0" + sys.argv[1])
listener.listen(1)
listener.settimeout(30)
print("listening", flush=True)
connection, _ = listener.accept()
_, fds, _, _ = socket.recv_fds(connection, 16, 4)
for fd in fds:
    print("read", os.pread(fd, 64, 0), flush=True)
with contextlib.suppress(OSError):  # a client that handed nothing has left
    connection.send(b"busy")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a socket's listener as another user")
def test_a_socket_of_another_user_gets_no_file(start_daemon, tmp_path, drive_uri):
    """Any user of the host may bind an abstract socket's name, before the daemon does (its start or restart): a
    client hands its files only to a listener of its own user or root, who may read them anyway."""
    port = free_port()
    impostor = subprocess.Popen([sys.executable, "-c", IMPOSTOR, socket_name(port)], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "listening\n"
        handle = start_daemon(tmp_path, port=port)
        digest = write_random_file(tmp_path / "secret.bin", 3 * MIB)
        (tmp_path / "secret.bin").chmod(0o600)
        assert Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint).put("secret.bin")[0].sha256 \
            == digest
    finally:
        impostor.kill()
        seen, _ = impostor.communicate(timeout=10)
    assert "read" not in seen, seen


def test_a_file_whose_client_left_without_its_token_is_not_held(start_daemon, tmp_path):
    """A daemon stopped (SIGSTOP) as a client hands a file over: the client gives up after its HANDOFF_SECONDS and
    sends the bytes; the daemon, once it goes on, holds nothing for the token it could not answer."""
    handle = start_daemon(tmp_path)
    (tmp_path / "f").write_bytes(b"data")
    taken, refused = handoffs(handle, "taken"), handoffs(handle, "refused")
    handle.proc.send_signal(signal.SIGSTOP)
    try:
        with open(tmp_path / "f", "rb") as f:
            assert hand_over(handle.port, f.fileno()) is None
    finally:
        handle.proc.send_signal(signal.SIGCONT)
    assert wait_until(lambda: handoffs(handle, "refused") == refused + 1)
    assert not holds(handle.proc.pid, tmp_path / "f")
    assert handoffs(handle, "taken") == taken


def test_bytes_sent_after_a_handed_header_are_refused(daemon, stub, tmp_path, drive_uri):
    """The daemon reads a handed file itself: bytes sent for it are a client's mistake, not damage in transit."""
    write_random_file(tmp_path / "f.bin", 2 * MIB)
    with open(tmp_path / "f.bin", "rb") as f:
        token = hand_over(daemon.port, f.fileno())
    [header, finish] = handed(drive_uri, "f.bin", token, 2 * MIB)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Put(iter([header, drive_pb2.PutRequest(data=b"more"), finish]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "handed" in refused.value.details()
    assert not stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries
    assert wait_until(lambda: not holds(daemon.proc.pid, tmp_path / "f.bin"))


def test_a_handed_file_that_ends_before_its_size_is_refused_as_shorter(daemon, stub, drive_uri):
    """A file of /sys says 4096 bytes and holds a few: refused as shorter than its header says (README), not as
    bytes damaged on the way (DATA_LOSS, "retry the put"), which a retry meets again."""
    path = "/sys/devices/system/cpu/online"
    if not os.path.exists(path):
        pytest.skip(f"no {path} here")
    with open(path, "rb") as f:
        token = hand_over(daemon.port, f.fileno())
        size = os.fstat(f.fileno()).st_size
        assert size > len(f.read())
    with pytest.raises(grpc.RpcError) as refused:
        handed_put(stub, drive_uri, "online", token, size)
    assert refused.value.code() == grpc.StatusCode.ABORTED, refused.value.details()
    assert not stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries


def hanging(call: str, suffix: str) -> str:
    """Python for `start_daemon(before=...)`: `os.<call>` (pread, pwritev) of a file whose name ends with `suffix`
    never returns, as on a hung mount, and a handoff's read or write counts as hung after 0.2 s."""
    return f"""
import os, threading
import drived.handoff as h; h.STUCK_SECONDS = 0.2
_{call} = os.{call}
def {call}(fd, *args):
    if os.readlink(f"/proc/self/fd/{{fd}}").endswith({suffix!r}):
        threading.Event().wait()
    return _{call}(fd, *args)
os.{call} = {call}
"""


HUNG_READS = hanging("pread", ".hung")


def test_hung_reads_stop_the_handoffs_not_the_daemon(start_daemon, tmp_path, drive_uri):
    """A read of a handed file that hangs ends its handoff after STUCK_SECONDS (the Put does not wait on it for
    good); half the reading threads hung, no handoff is taken and puts send their bytes; SIGTERM still ends the
    daemon within its grace period."""
    handle = start_daemon(tmp_path, "--grace-period", "1", before=HUNG_READS)
    digest = write_random_file(tmp_path / "f.hung", 2 * MIB)
    with grpc.insecure_channel(handle.endpoint) as channel, open(tmp_path / "f.hung", "rb") as f:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        hung = [stub.Put.future(iter(handed(drive_uri, f"{n}.bin", hand_over(handle.port, f.fileno()), 2 * MIB)))
                for n in range(4)]
        for call in hung:
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=10)
            assert ended.value.code() == grpc.StatusCode.NOT_FOUND and "took more than 0.2 s" in ended.value.details()
        assert hand_over(handle.port, f.fileno()) is None
        assert not stub.List(drive_pb2.ListRequest(drive=drive_uri)).entries
        taken = handoffs(handle, "taken")
        d = Drive(drive_uri, root_folder=str(tmp_path), endpoint=handle.endpoint)
        assert d.put("f.hung")[0].sha256 == digest  # its client reads it
        assert handoffs(handle, "taken") == taken
        assert handle.stop(signal.SIGTERM, timeout=10) == 0
