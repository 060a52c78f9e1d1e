"""The daemon process: flags and env, SIGTERM draining, a taken port, and temporary upload
data cleaned up at start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import (
    BIN,
    MIB,
    ROOT,
    Background,
    free_port,
    health_status,
    holds_bytes,
    put_messages,
    raw_get,
    raw_put,
    rpc_code,
    sha256_hex,
    sitecustomized,
    snapshot,
    spawn_daemon,
    upload_bytes,
    wait_serving,
    wait_until,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drived import cli

pytestmark = pytest.mark.timeout(90)

SERVING = health_pb2.HealthCheckResponse.SERVING


def stub_for(endpoint: str):
    ch = grpc.insecure_channel(endpoint)
    return ch, drive_pb2_grpc.DriveServiceStub(ch)


def test_help_documents_flags():
    res = subprocess.run([sys.executable, "-m", "drived", "--help"], capture_output=True, text=True, timeout=30,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for flag in ("--listen", "--data-dir", "--grace-period"):
        assert flag in res.stdout
    for env in ("DRIVED_LISTEN", "DRIVED_DATA_DIR"):
        assert env in res.stdout, f"--help should name the env variable {env}"


def test_console_script_help():
    script = BIN / "drived"
    if not script.exists():
        pytest.skip(f"{script} not installed: the project is not pip-installed in this venv (`make install`)")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "--listen" in res.stdout


@pytest.mark.integration  # starts a daemon of its own
def test_env_configures_listen_and_data_dir(tmp_path):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    data = tmp_path / "env-data"
    handle = spawn_daemon([], tmp_path / "log", data, endpoint,
                          env={"DRIVED_LISTEN": endpoint, "DRIVED_DATA_DIR": str(data)})
    try:
        wait_serving(handle)
        ch, stub = stub_for(endpoint)
        with ch:
            raw_put(stub, "lit://envtest", "f.bin", b"stored via env config")
        assert holds_bytes(data, b"stored via env config"), f"not kept in DRIVED_DATA_DIR: {sorted(snapshot(data))}"
    finally:
        assert handle.stop() == 0, handle.log()


def test_flags_win_over_env(tmp_path, start_daemon):
    env_port, flag_port = free_port(), free_port()
    env_data, flag_data = tmp_path / "env-data", tmp_path / "flag-data"
    env = {"DRIVED_LISTEN": f"127.0.0.1:{env_port}", "DRIVED_DATA_DIR": str(env_data)}
    handle = start_daemon(tmp_path, env=env, port=flag_port, data_dir=flag_data)
    try:
        ch, stub = stub_for(handle.endpoint)
        with ch:
            raw_put(stub, "lit://flagtest", "f.bin", b"stored via flags")
        assert holds_bytes(flag_data, b"stored via flags"), "not kept in the --data-dir"
        assert not holds_bytes(env_data, b"stored via flags"), "kept in DRIVED_DATA_DIR although --data-dir was given"
        assert health_status(f"127.0.0.1:{env_port}", timeout=0.5) is None, "nothing should serve the env port"
    finally:
        assert handle.stop() == 0, handle.log()


@pytest.mark.timeout(120)
def test_sigterm_lets_inflight_put_finish(tmp_path, start_daemon):
    handle = start_daemon(tmp_path, "--grace-period", "20")
    data = os.urandom(8 * MIB)
    started, gate = threading.Event(), threading.Event()

    def slow_requests():
        msgs = list(put_messages("lit://drain", "inflight.bin", data))
        yield msgs[0]
        yield msgs[1]
        started.set()
        gate.wait(30)  # SIGTERM arrives here
        for m in msgs[2:]:
            time.sleep(0.05)
            yield m

    ch, stub = stub_for(handle.endpoint)
    with ch:
        fut = stub.Put.future(slow_requests(), timeout=60)
        assert started.wait(10)
        handle.wait_open("Put", 1)
        handle.proc.send_signal(signal.SIGTERM)
        handle.wait_logged("draining")
        assert handle.proc.poll() is None, "the daemon must not exit while a put is in flight"
        # new calls are refused while draining (UNAVAILABLE: shutting down), the old one goes on
        late = rpc_code(lambda: stub.Stat(pb.StatRequest(drive="lit://drain", path="x"), timeout=5))
        assert late == grpc.StatusCode.UNAVAILABLE
        gate.set()
        resp = fut.result(timeout=40)
    assert [f.sha256 for f in resp.files] == [sha256_hex(data)]
    assert handle.proc.wait(30) == 0, handle.log()

    again = start_daemon(tmp_path, data_dir=handle.data_dir)
    try:
        ch, stub = stub_for(again.endpoint)
        with ch:
            [(info, got)] = raw_get(stub, "lit://drain", "inflight.bin")
        assert got == data and info.sha256 == sha256_hex(data)
    finally:
        again.stop()


@pytest.mark.timeout(120)
def test_sigterm_lets_inflight_get_finish(tmp_path, start_daemon):
    handle = start_daemon(tmp_path, "--grace-period", "20")
    data = os.urandom(32 * MIB)
    ch, stub = stub_for(handle.endpoint)
    with ch:
        raw_put(stub, "lit://drain", "big.bin", data)
        stream = stub.Get(pb.GetRequest(drive="lit://drain", path="big.bin"), timeout=60)
        first = next(stream)
        assert first.WhichOneof("message") == "info"
        received = bytearray(next(stream).data)
        handle.proc.send_signal(signal.SIGTERM)
        handle.wait_logged("draining")
        assert handle.proc.poll() is None, "the daemon must not exit while a get is in flight"
        for msg in stream:
            received.extend(msg.data)
            time.sleep(0.01)  # a slow reader
    assert len(received) == len(data) and sha256_hex(bytes(received)) == sha256_hex(data)
    assert handle.proc.wait(30) == 0, handle.log()


def test_sigterm_idle_exits_zero(tmp_path, start_daemon):
    handle = start_daemon(tmp_path)
    t0 = time.monotonic()
    assert handle.stop(signal.SIGTERM, timeout=20) == 0, handle.log()
    assert time.monotonic() - t0 < 10, "an idle daemon should stop promptly"


def test_a_health_watch_ends_unavailable_at_a_drain_and_holds_no_stop(tmp_path, start_daemon):
    """gRPC's client-side health checking keeps a Health/Watch stream open to each server: at a drain it was told
    NOT_SERVING and stayed open, and the server's stop waited for it for the whole grace period."""
    handle = start_daemon(tmp_path, "--grace-period", "60")
    with grpc.insecure_channel(handle.endpoint) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        handle.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
        assert handle.proc.wait(30) == 0, handle.log()  # well within the grace period: nothing else was open


# Python for `start_daemon(before=...)`: while the file PAUSE exists, the start-up waits before its backend starts
# (as one waits on a store that does not answer), having made PAUSE.reached.
PAUSED_START = """
import asyncio, os
from drived.backends.local import LocalBackend

start = LocalBackend.start
async def paused_start(self):
    open({pause!r} + ".reached", "w").close()
    while os.path.exists({pause!r}):
        await asyncio.sleep(0.01)
    await start(self)
LocalBackend.start = paused_start
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_daemon_starts_ends_it_quietly(tmp_path, start_daemon, sig):
    """A Ctrl-C while the daemon started (a store checked, a coordinator reached) printed a Python traceback and
    exited -2 (-15 for SIGTERM, with no word logged): it stops as a serving daemon does, exiting 0, its data dir
    as it was, marked stopped cleanly."""
    first = start_daemon(tmp_path)
    ch, stub = stub_for(first.endpoint)
    with ch:
        raw_put(stub, "lit://kept", "f.txt", b"stored before")
    assert first.stop() == 0, first.log()
    pause = tmp_path / "pause"
    pause.touch()
    handle = start_daemon(tmp_path, data_dir=first.data_dir, wait=False, before=PAUSED_START.format(pause=str(pause)))
    assert wait_until((tmp_path / "pause.reached").exists, timeout=20), handle.log()
    handle.proc.send_signal(sig)
    assert handle.proc.wait(20) == 0, handle.log()
    assert "Traceback" not in handle.log() and "stopping before serving" in handle.log(), handle.log()
    handle.wait_logged("stopped")
    assert (first.data_dir / "clean-stop").exists() and list((first.data_dir / "tmp").iterdir()) == []
    again = start_daemon(tmp_path, data_dir=first.data_dir)
    ch, stub = stub_for(again.endpoint)
    with ch:
        assert raw_get(stub, "lit://kept", "f.txt")[0][1] == b"stored before"


# sitecustomize.py of a daemon whose start-up stops for good, as a slow one stops for a while: at its import of grpc
# (the imports take ~0.3 s), or once its logging is set up; it makes the file REACHED then.
PAUSED_IMPORT = """
import importlib.abc, sys, time

class Paused(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc":
            open({reached!r}, "w").close()
            while True:
                time.sleep(1)

sys.meta_path.insert(0, Paused())
"""
PAUSED_ONCE_LOGGING = """
import time
import drived.logs as logs

setup = logs.setup

def paused(level):
    setup(level)
    open({reached!r}, "w").close()
    while True:
        time.sleep(1)

logs.setup = paused
"""


@pytest.mark.integration  # starts a daemon of its own
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("paused", [PAUSED_IMPORT, PAUSED_ONCE_LOGGING], ids=["in its imports", "once logging"])
def test_a_stop_before_the_daemon_serves_its_signals_ends_it_quietly(tmp_path, sig, paused):
    """A SIGTERM or SIGINT in the daemon's first ~0.3 s (an orchestrator stopping a container that just started),
    before the start-up took them, ended it by the signal (exit -15, not a word logged) or with a KeyboardInterrupt
    traceback. `drived` takes them first of all: it ends at once, exiting 0 as a stop does, logging the stop once
    its logging is set up, nothing made in its data dir."""
    reached = tmp_path / "reached"
    data = tmp_path / "data"
    endpoint = f"127.0.0.1:{free_port()}"
    handle = spawn_daemon(["--listen", endpoint, "--data-dir", str(data)], tmp_path / "drived.log", data, endpoint,
                          env=sitecustomized(tmp_path, paused.format(reached=str(reached))), use_console_script=True)
    try:
        assert wait_until(reached.exists, timeout=20), handle.log()
        handle.proc.send_signal(sig)
        status = handle.proc.wait(10)
    finally:
        handle.stop(signal.SIGKILL)
    assert status == 0, handle.log()
    events = [json.loads(line)["event"] for line in handle.log().splitlines()]
    assert events == ([] if paused is PAUSED_IMPORT else ["stopping before serving", "stopped"]), handle.log()
    assert not data.exists()


@pytest.mark.parametrize("given", ["--endpoint", "DRIVED_LISTEN"])
def test_drived_health_reaches_a_daemon_listening_on_every_interface(tmp_path, start_daemon, given):
    """`drived health` runs beside the daemon, with its listen address (the image's HEALTHCHECK, from DRIVED_LISTEN):
    it dialled 127.0.0.1 for 0.0.0.0:PORT, but [::] itself for [::]:PORT, every interface too, and failed against
    a daemon that serves IPv4 only. gRPC takes both alike, IPv6 and IPv4 (IPv4 alone without IPv6): 127.0.0.1
    reaches the daemon either way. This one listens on 127.0.0.1 only, as every test's daemon does."""
    handle = start_daemon(tmp_path)
    for listen in (f"0.0.0.0:{handle.port}", f"[::]:{handle.port}"):
        args, env = (["--endpoint", listen], {}) if given == "--endpoint" else ([], {"DRIVED_LISTEN": listen})
        result = subprocess.run([sys.executable, "-m", "drived", "health", *args], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert (result.returncode, result.stdout) == (0, f"drived at {handle.endpoint}: SERVING\n"), result.stderr


@pytest.mark.parametrize(("listen", "dialled"), [
    ("0.0.0.0:50051", "127.0.0.1:50051"),
    ("[::]:50051", "127.0.0.1:50051"),
    ("[0:0::0]:50051", "127.0.0.1:50051"),
    ("10.0.0.0:50051", "10.0.0.0:50051"),  # a text replace of "0.0.0.0:" made it 1127.0.0.1:50051
    ("[::1]:50051", "[::1]:50051"),
    ("drived.example:50051", "drived.example:50051"),
    ("unix:/run/drived.sock", "unix:/run/drived.sock"),
])
def test_drived_health_dials_loopback_for_a_daemon_on_every_interface_only(listen, dialled):
    assert cli.dialled(listen) == dialled


@pytest.mark.parametrize(("stop", "status", "said"), [
    (signal.SIGINT, 130, "interrupted"),
    # A probe's timeout (`timeout 3 drived health`) ended the tool by the signal (-15), saying nothing.
    (signal.SIGTERM, 143, "terminated"),
])
def test_a_stop_of_drived_health_ends_it_as_the_drive_command_does(stop, status, said):
    """A Ctrl-C while `drived health` waited for a daemon that does not answer (here an address that takes the
    connection and never speaks, as a hung daemon's) printed a KeyboardInterrupt traceback and ended the tool by
    the signal (-2). It ends as `drive` does: one line, `drived health: interrupted`, exit 130; on SIGTERM,
    `drived health: terminated`, exit 143."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        hung.settimeout(20)
        health = subprocess.Popen(
            [sys.executable, "-m", "drived", "health", "--endpoint", f"127.0.0.1:{hung.getsockname()[1]}",
             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            connection, _ = hung.accept()  # the check is under way
            with connection:
                health.send_signal(stop)
                out, err = health.communicate(timeout=20)
        finally:
            health.kill()
    assert (health.returncode, out, err) == (status, "", f"drived health: {said}\n"), err


@pytest.mark.parametrize("setting", ["--data-dir", "DRIVED_DATA_DIR"])
def test_a_data_dir_that_cannot_be_made_is_named_as_it_was_given(tmp_path, setting):
    """From the environment (a container's DRIVED_DATA_DIR), the refusal named a --data-dir flag never given."""
    (tmp_path / "a-file").write_bytes(b"not a folder")
    data = tmp_path / "a-file" / "data"
    before = snapshot(tmp_path)
    flags, env = ([setting, str(data)], {}) if setting.startswith("--") else ([], {setting: str(data)})
    result = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}", *flags],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=30, cwd=ROOT)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"drived: {setting} {data}: cannot make its folders: Not a directory"), result.stderr
    assert snapshot(tmp_path) == before


def test_taken_port_by_another_daemon_fails_loudly(tmp_path, start_daemon):
    first = start_daemon(tmp_path)
    second = spawn_daemon(["--listen", first.endpoint, "--data-dir", str(tmp_path / "second")],
                          tmp_path / "second.log", tmp_path / "second", first.endpoint)
    try:
        rc = second.proc.wait(20)
    except subprocess.TimeoutExpired:
        second.stop(signal.SIGKILL)
        pytest.fail("a second daemon on a taken port kept running (SO_REUSEPORT?)")
    assert rc != 0
    assert str(first.port) in second.log(), f"the error should name the address:\n{second.log()}"
    assert "Traceback" not in second.log(), f"a loud, readable error, not a traceback:\n{second.log()}"
    assert health_status(first.endpoint) == SERVING


@pytest.mark.integration  # starts a daemon of its own
def test_taken_port_by_other_program_fails_loudly(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
        handle = spawn_daemon(["--listen", endpoint, "--data-dir", str(tmp_path / "d")], tmp_path / "log",
                              tmp_path / "d", endpoint)
        try:
            rc = handle.proc.wait(20)
        except subprocess.TimeoutExpired:
            handle.stop(signal.SIGKILL)
            pytest.fail("drived kept running on a port another program listens on")
        assert rc != 0
        assert endpoint.split(":")[1] in handle.log()



def test_a_second_daemon_on_a_data_dir_in_use_is_refused_and_leaves_the_first_ones_uploads(tmp_path, start_daemon):
    """drived run twice on one data dir (by mistake: the defaults twice, or another --listen): the second one
    removed the first one's uploads from tmp/ at its start-up, before it failed on the taken port, and on a port
    of its own wrote its uploads under the first one's names: the first one's resumed put failed INTERNAL, or was
    acknowledged holding the second one's bytes (DATA_LOSS on every get)."""
    first = start_daemon(tmp_path)
    data = os.urandom(3 * MIB)
    ch, stub = stub_for(first.endpoint)
    with ch:
        raw_put(stub, "lit://shared", "kept.bin", b"stored before")
        header = pb.PutHeader(drive="lit://shared", path="held.bin", upload_id="u-held")
        assert rpc_code(lambda: stub.Put(iter([pb.PutRequest(header=header), pb.PutRequest(data=data[:2 * MIB])]),
                                         timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT  # no finish: held
        before = snapshot(first.data_dir)
        for i, listen in enumerate((first.endpoint, f"127.0.0.1:{free_port()}")):
            second = spawn_daemon(["--listen", listen, "--data-dir", str(first.data_dir)],
                                  tmp_path / f"second-{i}.log", first.data_dir, listen)
            try:
                rc = second.proc.wait(20)
            except subprocess.TimeoutExpired:
                second.stop(signal.SIGKILL)
                pytest.fail(f"a second daemon on a data dir in use kept running on {listen}")
            assert rc != 0
            assert snapshot(first.data_dir) == before
            assert f"{first.data_dir}: in use by another drived" in second.log(), second.log()
            assert "Traceback" not in second.log(), second.log()
        header.write_offset = 2 * MIB
        rest = [pb.PutRequest(data=data[2 * MIB:]), pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
        stub.Put(iter([pb.PutRequest(header=header), *rest]), timeout=30)
        assert [d for _, d in raw_get(stub, "lit://shared", "held.bin")] == [data]
        assert [d for _, d in raw_get(stub, "lit://shared", "kept.bin")] == [b"stored before"]
    assert first.stop() == 0
    again = start_daemon(tmp_path, data_dir=first.data_dir)  # the lock goes with the daemon that held it
    ch, stub = stub_for(again.endpoint)
    with ch:
        assert [d for _, d in raw_get(stub, "lit://shared", "held.bin")] == [data]



NO_LOCKS = """
import errno, fcntl
def flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = flock
"""


def test_a_data_dir_that_cannot_be_locked_is_served_with_a_warning(tmp_path, start_daemon):
    """A file system without locks (an NFS mount without its lock service: ENOLCK) is no reason to refuse to
    serve: the daemon says that it cannot guard the data dir, and serves."""
    handle = start_daemon(tmp_path, before=NO_LOCKS)
    assert "the data dir cannot be locked" in handle.log()
    ch, stub = stub_for(handle.endpoint)
    with ch:
        raw_put(stub, "lit://unlocked", "f.txt", b"stored")
        assert [d for _, d in raw_get(stub, "lit://unlocked", "f.txt")] == [b"stored"]


def find_tmp_dir(data_dir):
    """Where the daemon keeps temporary upload data (it creates it at start-up)."""
    for name in (".tmp", "tmp"):
        if (data_dir / name).is_dir():
            return data_dir / name
    raise AssertionError(f"no temporary-data folder (.tmp/ or tmp/) in {data_dir}: {sorted(snapshot(data_dir))}")


def test_stale_temp_leftovers_removed_at_startup(tmp_path, start_daemon):
    handle = start_daemon(tmp_path)
    handle.stop()
    tmp_dir = find_tmp_dir(handle.data_dir)
    (tmp_dir / "stale-upload-1").write_bytes(os.urandom(1000))
    (tmp_dir / "stale-upload-2.part").write_bytes(b"partial")
    (tmp_dir / "nested").mkdir()
    (tmp_dir / "nested" / "x").write_bytes(b"x")
    again = start_daemon(tmp_path, data_dir=handle.data_dir)
    try:
        left = sorted(os.listdir(tmp_dir)) if tmp_dir.exists() else []
        assert left == [], f"stale temporary data kept at start-up: {left}"
        ch, stub = stub_for(again.endpoint)
        with ch:
            assert list(stub.List(pb.ListRequest(drive="lit://any", path=".")).entries) == []
            raw_put(stub, "lit://any", "ok.txt", b"the daemon works after cleaning up")
    finally:
        assert again.stop() == 0


@pytest.mark.timeout(120)
def test_interrupted_upload_leftovers_removed_at_restart(tmp_path, start_daemon):
    handle = start_daemon(tmp_path)
    ch, stub = stub_for(handle.endpoint)
    started, gate = threading.Event(), threading.Event()

    def requests():
        yield pb.PutRequest(header=pb.PutHeader(drive="lit://crash", path="half.bin"))
        for _ in range(4):
            yield pb.PutRequest(data=os.urandom(MIB))
        started.set()
        gate.wait(30)

    with ch:
        raw_put(stub, "lit://crash", "kept.bin", b"committed before the crash")
        before = snapshot(handle.data_dir)
        fut = stub.Put.future(requests(), timeout=60)
        assert started.wait(10)
        assert wait_until(lambda: upload_bytes(handle.data_dir) >= MIB), "no upload data reached the daemon"
        during = snapshot(handle.data_dir)
        handle.stop(signal.SIGKILL)  # the daemon crashes mid-upload
        gate.set()
        assert rpc_code(lambda: fut.result(timeout=20)) != grpc.StatusCode.OK
    leftovers = sorted(set(during) - set(before))
    print(f"leftovers of the interrupted upload: {leftovers}")
    again = start_daemon(tmp_path, data_dir=handle.data_dir)
    try:
        assert snapshot(handle.data_dir) == before, (
            f"leftovers after restart: {sorted(set(snapshot(handle.data_dir)) - set(before))}"
        )
        ch, stub = stub_for(again.endpoint)
        with ch:
            assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive="lit://crash", path="half.bin"))) == (
                grpc.StatusCode.NOT_FOUND
            )
            [(_, kept)] = raw_get(stub, "lit://crash", "kept.bin")
            assert kept == b"committed before the crash"
    finally:
        again.stop()


def test_data_survives_restart(tmp_path, start_daemon):
    handle = start_daemon(tmp_path)
    data = os.urandom(MIB + 7)
    ch, stub = stub_for(handle.endpoint)
    with ch:
        raw_put(stub, "lit://persist", "dir/f.bin", data, component="c1")
    assert handle.stop() == 0
    again = start_daemon(tmp_path, data_dir=handle.data_dir)
    try:
        ch, stub = stub_for(again.endpoint)
        with ch:
            info = stub.Stat(pb.StatRequest(drive="lit://persist", path="dir/f.bin"))
            assert (info.size, info.sha256, info.component) == (len(data), sha256_hex(data), "c1")
    finally:
        again.stop()


def test_health_reports_serving_for_service(daemon):
    assert health_status(daemon.endpoint) == SERVING
    assert health_status(daemon.endpoint, service="drive.v1.DriveService") == SERVING


def test_data_dir_is_created(tmp_path, start_daemon):
    target = tmp_path / "not" / "yet" / "there"
    handle = start_daemon(tmp_path, data_dir=target)
    try:
        assert target.is_dir()
    finally:
        handle.stop()


def test_sigterm_answers_waiting_gets_unavailable(tmp_path, start_daemon):
    """A Get waiting for a path is not a transfer: on SIGTERM it is answered UNAVAILABLE (shutting
    down), and it does not hold the daemon for the whole grace period."""
    handle = start_daemon(tmp_path, "--grace-period", "30")
    ch, stub = stub_for(handle.endpoint)
    with ch:
        waiter = Background(lambda: raw_get(stub, "lit://waiting", "never.txt", wait_seconds=60))
        waiter.start()
        handle.wait_open("Get", 1)
        assert waiter.is_alive()
        t0 = time.monotonic()
        handle.proc.send_signal(signal.SIGTERM)
        waiter.join(25)
        assert not waiter.is_alive(), "the waiting Get was not answered"
        assert isinstance(waiter.error, grpc.RpcError)
        assert waiter.error.code() == grpc.StatusCode.UNAVAILABLE
    assert handle.proc.wait(25) == 0, handle.log()
    assert time.monotonic() - t0 < 20, "a waiting Get should not hold the shutdown for the grace period"


SECONDS = "at most 2147483 (about 24 days)"


@pytest.mark.parametrize(("flag", "value", "why"), [
    ("--listen", "127.0.0.1:99999", "a port of 0-65535"),  # gRPC would serve port 34463 (99999 modulo 65536)
    ("--listen", "127.0.0.1:-1", "a port of 0-65535"),  # ... and port 65535
    ("--listen", ":0", "with its host"),  # gRPC failed to bind, and the daemon asked whether another one was there
    ("--metrics-listen", "127.0.0.1:70000", "a port of 0-65535"),
    # It served 127.0.0.1 where --listen refuses the same value, and failed later on a unix: socket.
    ("--metrics-listen", ":9090", "with its host"),
    ("--metrics-listen", "unix:/tmp/drived-metrics", "over TCP"),
    ("--max-connections", "-1", "cannot be negative"),
    ("--max-connections", "3000000000", "at most 2147483647"),  # past gRPC's C int: a traceback at start
    # A mount's listing started a thread per unit of it: 1e6 ran the daemon out of threads at its first s3:// mount.
    ("--s3-list-concurrency", "1000000", "at most 256"),
    ("--max-connection-age", "3000000", SECONDS),  # 35 days: past what gRPC holds in milliseconds
    ("--max-connection-age", "nan", SECONDS),
    ("--grace-period", "inf", SECONDS),
    ("--upload-expiry", "nan", SECONDS),
    ("--claim-ttl", "1e30", SECONDS),
    ("--stream-idle-timeout", "nan", SECONDS),
    # The idle check ticked every quarter of it: the daemon spun its CPU, and ended every Put at once.
    ("--stream-idle-timeout", "0.01", "0 (never) or at least 1 s"),
    ("--stream-idle-timeout", "1e-9", "0 (never) or at least 1 s"),
    # DRIVED_LOG_LEVEL's refusal named --log-level, a flag the user never gave.
    ("--log-level", "verbose", "debug, info, warning or error"),
])
def test_a_bad_address_or_seconds_value_is_refused_naming_its_flag(tmp_path, flag, value, why):
    data = tmp_path / "data"
    (data / "tmp").mkdir(parents=True)
    (data / "tmp" / "held").write_bytes(b"an upload a running daemon would remove")
    before = snapshot(data)
    env_name = "DRIVED_" + flag[2:].upper().replace("-", "_")
    for args, env, named in (([flag, value], {}, flag), ([], {env_name: value}, env_name)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "drived", "--data-dir", str(data), *args], cwd=ROOT,
            env={**os.environ, "DRIVED_LISTEN": f"127.0.0.1:{free_port()}", **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 2, f"{named}={value} was not refused: exit {proc.returncode}\n{out}{err}"
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and named in last and why in last, err
    assert snapshot(data) == before


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_data_dir_that_is_a_file_is_refused_naming_the_flag(tmp_path, below):
    taken = tmp_path / "taken"
    taken.write_bytes(b"not a folder")
    data = taken / below if below else taken
    res = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}",
                          "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"--data-dir {data}" in res.stderr.strip().splitlines()[-1], res.stderr
    assert taken.read_bytes() == b"not a folder"
