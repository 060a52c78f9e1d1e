"""Shared fixtures: a real drived on a loopback port, real channels, per-test drives.

- `daemon` (session): one drived subprocess for the whole run, with a tmp data dir.
- `start_daemon` (fixture) / `start_daemon()` (function): start another daemon, e.g.
  for SIGTERM tests or with an S3 environment; the fixture stops its daemons at teardown.
- `drive_uri`: a `lit://t_<test name>_<random>` URI unique to the test.
- `stub`: a DriveService stub on a real channel to the session daemon.
- `twin`: makes a `Drive`, or an `AsyncDrive` run on a private event loop: tests that take it run
  against both twins of the client.
- helpers: `raw_put`, `raw_get`, `snapshot` (a byte-for-byte picture of a folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import os
import pathlib
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
MIB = 1024 * 1024

# The project may not be pip-installed (no `make install` yet): make it importable from the
# checkout, here and in every subprocess (daemons, CLI runs, multiprocessing children).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)

from bench.services import free_port  # noqa: E402  (a TCP port on 127.0.0.1 nothing listens on)
from drive_client import AsyncDrive, Drive  # noqa: E402
from drive_client.channels import Connection, open_channel  # noqa: E402
from drive_client.pb import drive_pb2, drive_pb2_grpc  # noqa: E402

# The property tests' example counts: small and repeatable on every CI run; HYPOTHESIS_PROFILE=thorough runs more.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True, database=None,
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Markers: `make test-fast` runs the unit tests only
# ---------------------------------------------------------------------------

# Fixtures that start a process serving on a port (a daemon, moto_server, ...): a test using one,
# or in a module marked `integration` (one that starts such processes itself), is an integration
# test; every other test is a unit test.
SERVICE_FIXTURES = {"daemon", "own_daemon", "start_daemon", "moto_env"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        integration = item.get_closest_marker("integration") or not SERVICE_FIXTURES.isdisjoint(item.fixturenames)
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)


# The `ml` tests run when their packages are installed, and are skipped with one plain reason when not.
ML_MISSING = [name for name in ("torch", "lightning", "pyarrow") if importlib.util.find_spec(name) is None]


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Skipped here, at one place, the summary gives all of them one line.
    if ML_MISSING and item.get_closest_marker("ml"):
        pytest.skip(f"ml packages not installed ({', '.join(ML_MISSING)}): run `make test-ml`, "
                    "or pip install torch==2.13.0 and then '.[ml]'")


# ---------------------------------------------------------------------------
# Starting daemons
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class DaemonHandle:
    """A running drived subprocess."""

    endpoint: str
    data_dir: pathlib.Path
    proc: subprocess.Popen
    log_path: pathlib.Path
    metrics: str = ""  # HOST:PORT of its Prometheus endpoint, when it serves one

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def log(self) -> str:
        """Everything the daemon wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def open_requests(self, method: str) -> int:
        """How many `method` calls the daemon is serving now (its drived_open_requests gauge)."""
        assert self.metrics, "start the daemon with --metrics-listen (start_daemon does by default)"
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        found = re.search(rf'^drived_open_requests{{method="{method}"}} (\S+)$', text, re.M)
        return int(float(found.group(1))) if found else 0

    def wait_open(self, method: str, count: int, timeout: float = 10) -> None:
        """Waits until the daemon is serving at least `count` `method` calls (e.g. Gets held waiting)."""
        assert wait_until(lambda: self.open_requests(method) >= count, timeout), (
            f"the daemon never served {count} {method} call(s) at once: {self.open_requests(method)}"
        )

    def wait_logged(self, event: str, timeout: float = 10) -> None:
        """Waits until the daemon has logged `event` (a JSON line with that "event")."""
        assert wait_until(lambda: f'"event": "{event}"' in self.log(), timeout), (
            f"the daemon did not log {event!r}:\n{self.log()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Sends `sig` and waits for the exit; kills after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def health_status(endpoint: str, timeout: float = 1.0, service: str = "", tls: Connection | None = None
                  ) -> int | None:
    """The grpc health status of `endpoint` (e.g. SERVING), or None when it does not answer.

    `tls`: how to reach a daemon that serves TLS (its endpoint is `endpoint`'s).
    """
    connection = dataclasses.replace(tls, endpoint=endpoint) if tls else Connection(endpoint)
    with open_channel(connection) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return resp.status


def wait_serving(handle: DaemonHandle, timeout: float = 20, tls: Connection | None = None) -> None:
    """Waits until the daemon answers its health check with SERVING (over `tls` when given); fails with its log
    otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(
                f"drived exited with code {handle.proc.returncode} before serving on {handle.endpoint}.\n"
                f"--- its output ---\n{handle.log()}"
            )
        if health_status(handle.endpoint, timeout=0.5, tls=tls) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.05)
    handle.stop(signal.SIGKILL)
    raise RuntimeError(
        f"drived did not report SERVING on {handle.endpoint} within {timeout}s.\n"
        f"--- its output ---\n{handle.log()}"
    )


def spawn_daemon(
    args: list[str],
    log_path: pathlib.Path,
    data_dir: pathlib.Path,
    endpoint: str,
    env: dict[str, str] | None = None,
    use_console_script: bool = False,
    nofile: int | None = None,
    before: str = "",
) -> DaemonHandle:
    """Starts `drived ARGS` without waiting; stdout+stderr go to `log_path`.

    `nofile` sets the daemon's limit of open files (soft and hard, as `ulimit -n` does). `before` is Python that
    the daemon's process runs before the daemon starts (e.g. to lower one of its module constants).
    """
    full_env = dict(os.environ)
    for var in ("DRIVED_LISTEN", "DRIVED_DATA_DIR", "DRIVED_STORAGE"):
        full_env.pop(var, None)  # only what the test asks for
    full_env.update(env or {})
    cmd = [str(BIN / "drived")] if use_console_script else [sys.executable, "-m", "drived"]
    if before:
        cmd = [sys.executable, "-c", f"{before}\nimport runpy\nrunpy.run_module('drived', run_name='__main__')"]
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
    finally:
        log.close()
    metrics = args[args.index("--metrics-listen") + 1] if "--metrics-listen" in args else ""
    return DaemonHandle(endpoint=endpoint, data_dir=data_dir, proc=proc, log_path=log_path, metrics=metrics)


def start_daemon(
    tmp_path: pathlib.Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    data_dir: pathlib.Path | None = None,
    port: int | None = None,
    wait: bool = True,
    nofile: int | None = None,
    tls: Connection | None = None,
    before: str = "",
) -> DaemonHandle:
    """Starts drived on a free 127.0.0.1 port with a data dir under `tmp_path`, and waits for SERVING
    (asking over `tls` when the daemon serves TLS).

    `extra_args` are appended to `--listen ... --data-dir ...` (e.g. "--grace-period", "5").
    It serves metrics on a free port too (unless `extra_args` say where), so that tests can
    wait on what it is doing (`open_requests`). `before`: Python run first in its process (`spawn_daemon`). The
    caller stops it (`handle.stop()`); the `start_daemon` fixture does that itself.
    """
    port = port or free_port()
    endpoint = f"127.0.0.1:{port}"
    data_dir = data_dir or (tmp_path / f"data-{port}")
    if "--metrics-listen" not in extra_args:
        # a port other than `port`: a restart on `port` leaves it free until the daemon binds it
        metrics_port = next(p for p in iter(free_port, None) if p != port)
        extra_args = (*extra_args, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    args = ["--listen", endpoint, "--data-dir", str(data_dir), *extra_args]
    handle = spawn_daemon(args, tmp_path / f"drived-{port}.log", data_dir, endpoint, env=env, nofile=nofile,
                          before=before)
    if wait:
        wait_serving(handle, tls=tls)
    return handle


@pytest.fixture(name="start_daemon")
def start_daemon_fixture() -> Iterator[Callable[..., DaemonHandle]]:
    """`start_daemon(tmp_path, *extra_args, env=None, ...)`; every daemon is stopped at teardown."""
    started: list[DaemonHandle] = []

    def _start(tmp_path: pathlib.Path, *extra_args: str, **kwargs) -> DaemonHandle:
        handle = start_daemon(tmp_path, *extra_args, **kwargs)
        started.append(handle)
        return handle

    yield _start
    for handle in started:
        handle.stop(signal.SIGTERM, timeout=15)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """One real drived for the whole session (tests use distinct drives, see `drive_uri`)."""
    tmp = tmp_path_factory.mktemp("session-daemon")
    handle = start_daemon(tmp, data_dir=tmp / "data")
    yield handle
    handle.stop(signal.SIGTERM, timeout=30)


@pytest.fixture(scope="module")
def own_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """A daemon for one test module alone (for tests that compare its data dir before/after)."""
    tmp = tmp_path_factory.mktemp("module-daemon")
    handle = start_daemon(tmp, data_dir=tmp / "data")
    yield handle
    handle.stop(signal.SIGTERM, timeout=30)


# ---------------------------------------------------------------------------
# Drives, channels, stubs
# ---------------------------------------------------------------------------


def unique_drive_uri(hint: str) -> str:
    """`lit://t_<hint>_<random>`: a valid drive name (letters, digits, '.', '_', '-'; <= 128)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", hint).strip("._-")[:80] or "test"
    return f"lit://t_{clean}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def drive_uri(request: pytest.FixtureRequest) -> str:
    """A drive URI no other test uses."""
    return unique_drive_uri(request.node.name)


@pytest.fixture
def make_drive_uri(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Makes more unique drive URIs for one test: `make_drive_uri("d1")`."""
    return lambda suffix: unique_drive_uri(f"{request.node.name}_{suffix}")


@pytest.fixture(scope="session")
def channel(daemon: DaemonHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.endpoint) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> drive_pb2_grpc.DriveServiceStub:
    """A raw DriveService stub on a real channel to the session daemon."""
    return drive_pb2_grpc.DriveServiceStub(channel)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: pathlib.Path | str) -> str:
    """sha256 of a file, read in pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(4 * MIB):
            h.update(piece)
    return h.hexdigest()


def put_messages(
    drive: str,
    path: str,
    data: bytes,
    component: str = "",
    allow_duplicates: bool = False,
    sha256: str | None = None,
    size: int | None = None,
    chunk: int = MIB,
) -> Iterator[drive_pb2.PutRequest]:
    """The request stream of a one-file Put."""
    header = drive_pb2.PutHeader(
        drive=drive, path=path, component=component, allow_duplicates=allow_duplicates
    )
    if size is not None:
        header.size = size
    yield drive_pb2.PutRequest(header=header)
    for i in range(0, len(data), chunk):
        yield drive_pb2.PutRequest(data=data[i : i + chunk])
    digest = sha256 if sha256 is not None else sha256_hex(data)
    yield drive_pb2.PutRequest(finish=drive_pb2.PutFinish(sha256=digest))


def raw_put(
    stub: drive_pb2_grpc.DriveServiceStub, drive: str, path: str, data: bytes, **kwargs
) -> drive_pb2.PutResponse:
    """Puts one file over the raw stub; raises grpc.RpcError on failure."""
    return stub.Put(put_messages(drive, path, data, **kwargs), timeout=60)


def raw_get(
    stub: drive_pb2_grpc.DriveServiceStub, drive: str, path: str, **kwargs
) -> list[tuple[drive_pb2.FileInfo, bytes]]:
    """Reads a file or folder over the raw stub: [(info, bytes)] per file."""
    timeout = 60 + kwargs.get("wait_seconds", 0)
    files: list[tuple[drive_pb2.FileInfo, bytearray]] = []
    for msg in stub.Get(drive_pb2.GetRequest(drive=drive, path=path, **kwargs), timeout=timeout):
        if msg.WhichOneof("message") == "info":
            files.append((msg.info, bytearray()))
        else:
            assert files, "a data chunk came before any info message"
            files[-1][1].extend(msg.data)
    return [(info, bytes(data)) for info, data in files]


def damaged_reads(handle) -> float:
    """The daemon's count of reads refused for damage (drived_damaged_reads_total)."""
    with urllib.request.urlopen(f"http://{handle.metrics}/metrics", timeout=5) as answer:
        found = re.search(r"^drived_damaged_reads_total (\S+)$", answer.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    """Runs `call`, which must fail with an RpcError; returns its status code."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)  # type: ignore[arg-type]  # a server stream fails when read
    except grpc.RpcError as err:
        return err.code()  # type: ignore[attr-defined]
    raise AssertionError(f"the call succeeded; it should have failed (result: {result!r})")


# ---------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """A byte-for-byte picture of a folder: relative path -> content sha256 / 'dir' / 'link:target'."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = pathlib.Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "link:" + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                try:
                    out[rel] = file_sha256(full)
                except FileNotFoundError:  # vanished while walking
                    continue
    return out


def holds_bytes(root: pathlib.Path, data: bytes) -> bool:
    """True when some file under `root` contains `data` (however the daemon frames stored files)."""
    if not root.exists():
        return False
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                if data in f.read():
                    return True
    return False


def upload_bytes(data_dir: pathlib.Path) -> int:
    """Bytes held by the uploads in progress in a local daemon's data dir (its tmp/ folder)."""
    return sum(f.stat().st_size for f in (data_dir / "tmp").glob("*") if f.is_file())


def no_uploads(data_dir: pathlib.Path) -> bool:
    """True when a local daemon's data dir holds no upload in progress (its tmp/ folder is empty)."""
    return not any((data_dir / "tmp").iterdir())


def sitecustomized(folder: pathlib.Path, code: str) -> dict[str, str]:
    """The environment in which every Python process runs `code` first (a `sitecustomize` module in `folder`/inject,
    put on PYTHONPATH): a daemon's commit worker too, which `start_daemon`'s `before` does not reach."""
    inject = folder / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH", "")]))}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Polls `predicate` until true or `timeout`; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def write_random_file(path: pathlib.Path, size: int, piece: int = 4 * MIB) -> str:
    """Writes `size` random bytes in pieces (low memory); returns their sha256."""
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(piece, left))
            h.update(data)
            f.write(data)
            left -= len(data)
    return h.hexdigest()


class Background(threading.Thread):
    """A thread that records the exception of its target, for tests to re-raise."""

    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None
        self.result: object = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as e:  # re-raised by the test
            self.error = e

    def join_checked(self, timeout: float = 60) -> object:
        self.join(timeout)
        assert not self.is_alive(), "background thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------------
# A file changed between a get's lookup and its read
# ---------------------------------------------------------------------------

PAUSED_READS = """
import asyncio, os
from drived.backends.local import LocalBackend
from drived.backends.s3 import S3Backend

def paused(read):
    async def read_once_resumed(self, key, offset=0, limit=0):
        open({reached!r}, "w").close()
        while os.path.exists({pause!r}):
            await asyncio.sleep(0.01)
        return await read(self, key, offset, limit)
    return read_once_resumed

LocalBackend.read = paused(LocalBackend.read)
S3Backend.read = paused(S3Backend.read)
"""


def paused_reads(pause: pathlib.Path) -> str:
    """Python for `start_daemon(before=...)`: while the file `pause` exists, each read of the backend waits
    before it opens its file, once its get found the file (`read_changed` changes it then)."""
    return PAUSED_READS.format(pause=str(pause), reached=f"{pause}.reached")


REFUSED_IMPORTS = """
import importlib.abc, importlib.util, sys, threading

class Refused(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"the test refuses to load {{spec.name}} here", name=spec.name)

    def exec_module(self, module):
        pass

class Refusing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("boto3", "botocore", "redis") and {where}:
            return importlib.util.spec_from_loader(name, Refused())
        return None

sys.meta_path.insert(0, Refusing())
"""


def refused_imports(on_main_thread_only: bool = False) -> str:
    """Python for `start_daemon(before=...)`: each import of boto3, botocore or redis raises ImportError in the
    daemon's process (`on_main_thread_only`: on its main thread, which runs the event loop). They stay findable,
    as installed packages are (`importlib.util.find_spec`): only loading them fails."""
    return REFUSED_IMPORTS.format(
        where="threading.current_thread() is threading.main_thread()" if on_main_thread_only else "True")


def read_changed(stub: drive_pb2_grpc.DriveServiceStub, pause: pathlib.Path, change: Callable[[], object],
                 request: drive_pb2.GetRequest) -> grpc.RpcError:
    """The error of a get that found its file and reads it only after `change` (on a daemon whose reads wait
    while `pause` exists, `paused_reads`)."""
    reached = pathlib.Path(f"{pause}.reached")
    reached.unlink(missing_ok=True)
    pause.touch()
    get = Background(lambda: list(stub.Get(request, timeout=60)))
    get.start()
    try:
        assert wait_until(reached.exists, timeout=30), "the get never reached its read"
        change()
    finally:
        pause.unlink()
    try:
        get.join_checked()
    except grpc.RpcError as err:
        return err
    raise AssertionError("the get of a changed file succeeded")


# ---------------------------------------------------------------------------
# Stalled clients
# ---------------------------------------------------------------------------


class StalledPuts:
    """`count` Put streams that each send `first_messages(i)` and then send nothing more, as a client that
    stalls does; on one grpc.aio channel (or `channels` of them), run by an event loop in a thread of its own.

    `with StalledPuts(...) as stalled:` opens them; leaving the block cancels those still open.
    `outcomes` holds each stream's status once it has one (None while open); `refused()` counts by code.
    """

    def __init__(
        self, endpoint: str, count: int, first_messages: Callable[[int], list], channels: int = 1,
        all_sent: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.all_sent = all_sent  # whether entering waits until each stream has sent its messages (or ended)
        self.count = count
        self.first_messages = first_messages
        self.channels = channels
        self.outcomes: list[grpc.StatusCode | None] = [None] * count
        self.details: list[str] = [""] * count
        self._sent = threading.Semaphore(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, stub: drive_pb2_grpc.DriveServiceStub, i: int) -> None:
        assert self._stop is not None
        messages = self.first_messages(i)

        async def requests():
            for message in messages:
                yield message
            self._sent.release()
            await self._stop.wait()

        call = stub.Put(requests())
        try:
            await call
            self.outcomes[i] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.outcomes[i] = err.code()
            self.details[i] = err.details() or ""
        except asyncio.CancelledError:
            self.outcomes[i] = grpc.StatusCode.CANCELLED
        finally:
            self._sent.release()  # a refused stream may end before it sent all

    async def _run(self) -> None:
        from drive_client.wire import fast_stub

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        options = [("grpc.max_send_message_length", 64 << 20)]
        channels = [grpc.aio.insecure_channel(self.endpoint, options=options) for _ in range(self.channels)]
        stubs = [fast_stub(c) for c in channels]
        tasks = [asyncio.create_task(self._one(stubs[i % len(stubs)], i)) for i in range(self.count)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()

    def __enter__(self) -> StalledPuts:
        self._thread.start()
        for _ in range(self.count if self.all_sent else 0):  # each has sent its messages, or ended
            assert self._sent.acquire(timeout=120), "the stalled puts did not get their messages out"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def open(self) -> int:
        return self.outcomes.count(None)

    def refused(self) -> dict[grpc.StatusCode, int]:
        counts: dict[grpc.StatusCode, int] = {}
        for code in self.outcomes:
            if code is not None:
                counts[code] = counts.get(code, 0) + 1
        return counts


@contextlib.contextmanager
def held_open(handle: DaemonHandle) -> Iterator[None]:
    """A Put stream left open on `handle` for the body of a `with`: after SIGTERM, it keeps the daemon draining."""
    messages = put_messages("lit://held", "held.bin", b"held")
    with StalledPuts(handle.endpoint, 1, lambda _: [next(messages), next(messages)]):
        handle.wait_open("Put", 1)
        yield


def rss_mib(pid: int) -> float:
    """The resident memory of process `pid`, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors process `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def silent_connections(address: str, n: int, first: bytes = b"") -> Iterator[list[socket.socket]]:
    """`n` TCP connections to HOST:PORT that send `first` and then nothing, as a client that floods a port does;
    all closed on exit."""
    host, _, port = address.rpartition(":")
    connections: list[socket.socket] = []
    try:
        for _ in range(n):
            connection = socket.create_connection((host, int(port)), timeout=5)
            connection.sendall(first)
            connections.append(connection)
        yield connections
    finally:
        for connection in connections:
            connection.close()


def closed_by_peer(connection: socket.socket) -> bool:
    """Whether the other end closed `connection` (what it sent before is read and dropped)."""
    connection.setblocking(False)
    try:
        while connection.recv(1 << 16):
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def descriptor_targets(pid: int) -> list[str]:
    """What the open file descriptors of process `pid` point to ("socket:[123]", a file's path, ...)."""
    targets = []
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed since the listing
            targets.append(os.readlink(fd))
    return targets


# ---------------------------------------------------------------------------
# Both twins of the client
# ---------------------------------------------------------------------------


class LoopThread:
    """An event loop running in a thread of its own, for driving AsyncDrive from blocking test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="test-async-twin").start()

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wait() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        end = object()

        async def step() -> object:
            try:
                return await anext(items)
            except StopAsyncIteration:
                return end

        try:
            while (item := self.run(step())) is not end:
                yield item  # type: ignore[misc]
        finally:
            self.run(items.aclose())  # type: ignore[attr-defined]


_loop_thread: LoopThread | None = None


def loop_thread() -> LoopThread:
    """The one loop every AsyncDrive of the tests runs on (started on first use)."""
    global _loop_thread
    if _loop_thread is None:
        _loop_thread = LoopThread()
    return _loop_thread


class BlockingAsyncDrive:
    """An AsyncDrive with Drive's blocking face: each coroutine is run to its end on `loop_thread()`,
    and each async iterator is read from there, so one test body checks both twins."""

    def __init__(self, drive: AsyncDrive) -> None:
        self.drive = drive

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.drive, name)
        if not callable(value):
            return value

        def blocking(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if inspect.iscoroutine(result):
                return loop_thread().run(result)
            if hasattr(result, "__anext__"):
                return loop_thread().iterate(result)
            return result

        return blocking

    def __str__(self) -> str:
        return str(self.drive)

    def __reduce__(self) -> tuple[Any, ...]:  # pickling and copying go to the AsyncDrive inside
        return BlockingAsyncDrive, (self.drive,)


TWINS: dict[str, Callable[..., Any]] = {
    "Drive": Drive,
    "AsyncDrive": lambda *args, **kwargs: BlockingAsyncDrive(AsyncDrive(*args, **kwargs)),
}


@pytest.fixture(params=sorted(TWINS))
def twin(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Makes a drive of the twin under test, with Drive's arguments: a Drive, or an AsyncDrive run to completion
    on a private event loop (`BlockingAsyncDrive`). A test that takes it runs once with each."""
    return TWINS[request.param]



def current_sequence(endpoint: str, drive_uri: str) -> int:
    """The drive's latest event sequence: what a Watch's first message (KIND_WATCHING) says.

    A watch resumed after it replays every later event, however late it opens.
    """
    with grpc.insecure_channel(endpoint) as channel:
        stream = drive_pb2_grpc.DriveServiceStub(channel).Watch(drive_pb2.WatchRequest(drive=drive_uri))
        first = next(stream)
        stream.cancel()
    assert first.kind == drive_pb2.WatchEvent.KIND_WATCHING
    return first.sequence
