"""TLS and mutual TLS with certificates the tests make (`tests/certificates.py`), and the client's refusal to send
a token in plaintext beyond loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import grpc
import pytest
from certificates import Authority, Issued
from conftest import BIN, DaemonHandle, snapshot, spawn_daemon, start_daemon

from bench.services import free_port
from drive_client import AsyncDrive, Drive, InvalidArgument, Unavailable
from drive_client.channels import Connection, endpoint_hosts, is_loopback

pytestmark = pytest.mark.integration  # starts daemons of its own

UNREACHABLE = "198.51.100.7:50051"  # TEST-NET-2: not this machine, and nothing answers there


@dataclass(frozen=True)
class Pki:
    """The test's certificates: CA `ca` signs `server` and `client`; `other_ca` signs `server2`; `rogue` signs
    `stranger`, a client certificate the daemons do not trust."""

    ca: Path
    server: Issued
    client: Issued
    other_ca: Path
    server2: Issued
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other, rogue = Authority.new("drived test CA"), Authority.new("another CA"), Authority.new("rogue CA")
    return Pki(
        ca=ca.write(folder / "ca.pem"), server=ca.issue(folder, "server"), client=ca.issue(folder, "client", True),
        other_ca=other.write(folder / "other-ca.pem"), server2=other.issue(folder, "server2"),
        stranger=rogue.issue(folder, "stranger", True),
    )


def tls_flags(server: Issued, client_ca: Path | None = None) -> tuple[str, ...]:
    flags = ("--tls-cert", str(server.cert), "--tls-key", str(server.key))
    return (*flags, "--tls-client-ca", str(client_ca)) if client_ca else flags


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory, pki) -> Iterator[DaemonHandle]:
    tmp = tmp_path_factory.mktemp("tls")
    handle = start_daemon(tmp, *tls_flags(pki.server), tls=Connection("", True, str(pki.ca)))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def mtls_daemon(tmp_path_factory, pki) -> Iterator[DaemonHandle]:
    tmp = tmp_path_factory.mktemp("mtls")
    handle = start_daemon(tmp, *tls_flags(pki.server, client_ca=pki.ca),
                          tls=Connection("", True, str(pki.ca), str(pki.client.cert), str(pki.client.key)))
    yield handle
    handle.stop()


def served_certificate(endpoint: str) -> bytes:
    """The certificate (DER) a TLS handshake with `endpoint` shows now, read without checking it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_tls_carries_calls_and_a_plaintext_client_is_told_what_to_do(twin, tls_daemon, pki, drive_uri, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"over tls")
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=tls_daemon.endpoint, tls_ca=pki.ca)
    drive.put("f.txt")
    assert drive.list(".") == ["f.txt"]
    assert drive.get("f.txt", to="back.txt").read_bytes() == b"over tls"
    assert served_certificate(tls_daemon.endpoint) == pki.server.der()

    before = snapshot(tls_daemon.data_dir)
    (tmp_path / "g.txt").write_bytes(b"plaintext")
    # A refused handshake looks like a daemon that cannot be reached: retried within retry_seconds, kept short here.
    plain = twin(drive_uri, root_folder=tmp_path, endpoint=tls_daemon.endpoint, retry_seconds=1)
    with pytest.raises(ConnectionError) as refused:
        plain.put("g.txt")
    assert isinstance(refused.value, Unavailable) and refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert tls_daemon.endpoint in str(refused.value) and "tls=True" in str(refused.value)
    untrusting = twin(drive_uri, root_folder=tmp_path, endpoint=tls_daemon.endpoint, tls_ca=pki.other_ca,
                      retry_seconds=1)
    with pytest.raises(Unavailable, match="tls_ca"):
        untrusting.put("g.txt")  # the daemon's certificate is not signed by the CA given
    assert snapshot(tls_daemon.data_dir) == before


def test_mutual_tls_needs_a_client_certificate_the_daemon_trusts(twin, mtls_daemon, pki, drive_uri, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"mutual")
    before = snapshot(mtls_daemon.data_dir)
    for cert in (None, pki.stranger):
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=mtls_daemon.endpoint, tls_ca=pki.ca,
                     tls_cert=cert and cert.cert, tls_key=cert and cert.key, retry_seconds=1)  # as above
        with pytest.raises(ConnectionError, match="client certificate"):
            drive.put("f.txt")
        with pytest.raises(ConnectionError):
            drive.list(".")
    assert snapshot(mtls_daemon.data_dir) == before
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=mtls_daemon.endpoint, tls_ca=pki.ca,
                 tls_cert=pki.client.cert, tls_key=pki.client.key)
    drive.put("f.txt")
    assert drive.list(".") == ["f.txt"]


def test_the_environment_the_cli_and_fsspec_take_the_same_settings(mtls_daemon, pki, drive_uri, tmp_path):
    env = {**os.environ, "DRIVE_ENDPOINT": mtls_daemon.endpoint, "DRIVE_TLS": "1", "DRIVE_TLS_CA": str(pki.ca),
           "DRIVE_TLS_CERT": str(pki.client.cert), "DRIVE_TLS_KEY": str(pki.client.key)}
    code = f"from drive_client import Drive; d = Drive({drive_uri!r}); d.put('a.txt'); print(d.list('.'))"
    (tmp_path / "a.txt").write_bytes(b"a")
    by_env = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert by_env.stdout.strip() == "['a.txt']", by_env.stderr

    cli = [str(BIN / "python"), "-m", "drive_client.cli", "--endpoint", mtls_daemon.endpoint]
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    listed = subprocess.run([*cli, *flags, "ls", drive_uri], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.split() == ["a.txt"], listed.stderr
    # A refused handshake looks like UNAVAILABLE, which a list tries again for --retry-seconds: 0 here.
    without = subprocess.run([*cli, "--retry-seconds", "0", "--tls-ca", str(pki.ca), "ls", drive_uri],
                             capture_output=True, text=True, timeout=60)
    assert without.returncode == 1 and "client certificate" in without.stderr
    half = subprocess.run([*cli, "--tls-cert", str(pki.client.cert), "ls", drive_uri], capture_output=True,
                          text=True, timeout=60)
    assert half.returncode == 1 and "give both tls_cert and tls_key" in half.stderr

    fs = fsspec.filesystem("lit", endpoint=mtls_daemon.endpoint, tls_ca=str(pki.ca), tls_cert=str(pki.client.cert),
                           tls_key=str(pki.client.key), skip_instance_cache=True)
    name = drive_uri.removeprefix("lit://")
    fs.pipe_file(f"{name}/b.txt", b"through fsspec")
    assert fs.cat_file(f"{name}/b.txt") == b"through fsspec"
    assert sorted(fs.ls(name, detail=False)) == [f"{name}/a.txt", f"{name}/b.txt"]


def test_tls_files_given_as_arguments_win_over_drive_tls_0_in_the_environment(twin, tls_daemon, pki, drive_uri,
                                                                              tmp_path, monkeypatch):
    """$DRIVE_TLS=0 beat a tls_ca given as an argument: the client went in plaintext, token and all."""
    monkeypatch.setenv("DRIVE_TLS", "0")
    (tmp_path / "f.txt").write_bytes(b"f")
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=tls_daemon.endpoint, tls_ca=pki.ca, retry_seconds=1)
    drive.put("f.txt")
    assert drive.list(".") == ["f.txt"]
    with pytest.raises(InvalidArgument, match="given with TLS turned off"):
        twin(drive_uri, endpoint=tls_daemon.endpoint, tls=False, tls_ca=pki.ca)
    monkeypatch.setenv("DRIVE_TLS_CA", str(pki.ca))  # the environment's files follow its own $DRIVE_TLS=0
    with pytest.raises(Unavailable):
        twin(drive_uri, endpoint=tls_daemon.endpoint, retry_seconds=0).list(".")


def test_the_clis_tls_flags_win_over_drive_tls_0_in_the_environment(tls_daemon, pki, drive_uri, tmp_path):
    env = {**os.environ, "DRIVE_TLS": "0"}
    cli = [str(BIN / "python"), "-m", "drive_client.cli", "--endpoint", tls_daemon.endpoint, "--retry-seconds", "1"]
    (tmp_path / "f.txt").write_bytes(b"f")
    put = subprocess.run([*cli, "--tls-ca", str(pki.ca), "put", str(tmp_path / "f.txt"), drive_uri],
                         env=env, capture_output=True, text=True, timeout=60)
    assert put.returncode == 0, put.stderr
    refused = subprocess.run([*cli, "--no-tls", "--tls-ca", str(pki.ca), "ls", drive_uri], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "given with TLS turned off" in refused.stderr


def test_drived_health_reaches_a_tls_daemon(tls_daemon, mtls_daemon, pki):
    def health(endpoint: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "drived", "health", "--endpoint", endpoint, *flags],
                              capture_output=True, text=True, timeout=60)

    assert health(tls_daemon.endpoint, "--tls-ca", str(pki.ca)).stdout.endswith("SERVING\n")
    plain = health(tls_daemon.endpoint)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    ok = health(mtls_daemon.endpoint, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert),
                "--tls-key", str(pki.client.key))
    assert ok.returncode == 0, ok.stderr
    assert health(mtls_daemon.endpoint, "--tls-ca", str(pki.ca)).returncode == 1
    # The certificate names localhost and 127.0.0.1; dialled by another name, --tls-server-name says which to expect.
    assert health(tls_daemon.endpoint, "--tls-ca", str(pki.ca), "--tls-server-name", "drived.example").returncode == 1
    assert health(tls_daemon.endpoint, "--tls-ca", str(pki.ca), "--tls-server-name", "localhost").returncode == 0
    missing = health(tls_daemon.endpoint, "--tls-ca", "/nonexistent/ca.pem")
    assert missing.returncode == 1
    assert "tls_ca (`--tls-ca`, $DRIVE_TLS_CA) '/nonexistent/ca.pem' does not exist" in missing.stderr


def test_sighup_reloads_the_certificate_and_bad_files_keep_the_old_one(start_daemon, pki, tmp_path, drive_uri):
    served = Issued(tmp_path / "served.cert", tmp_path / "served.key")
    shutil.copy(pki.server.cert, served.cert)
    shutil.copy(pki.server.key, served.key)
    handle = start_daemon(tmp_path, *tls_flags(served), tls=Connection("", True, str(pki.ca)))
    assert served_certificate(handle.endpoint) == pki.server.der()

    shutil.copy(pki.server2.cert, served.cert)
    shutil.copy(pki.server2.key, served.key)
    handle.proc.send_signal(signal.SIGHUP)
    handle.wait_logged("tls reloaded")
    assert served_certificate(handle.endpoint) == pki.server2.der()  # a new handshake gets the new certificate
    (tmp_path / "f.txt").write_bytes(b"f")
    Drive(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint, tls_ca=pki.other_ca).put("f.txt")
    with pytest.raises(Unavailable):
        # A new process trusting only the first CA: its handshake now fails.
        Drive(drive_uri, endpoint=handle.endpoint, tls_ca=pki.ca, tls_cert=pki.client.cert,
              tls_key=pki.client.key, retry_seconds=1).list(".")

    shutil.copy(pki.server.key, served.key)  # a key that is not the certificate's
    handle.proc.send_signal(signal.SIGHUP)
    handle.wait_logged("tls not reloaded")
    line = next(json.loads(x) for x in handle.log().splitlines() if '"tls not reloaded"' in x)
    assert "not a PEM certificate and its key" in line["reason"]
    assert served_certificate(handle.endpoint) == pki.server2.der()
    assert Drive(drive_uri, endpoint=handle.endpoint, tls_ca=pki.other_ca).list(".") == ["f.txt"]


@pytest.mark.parametrize(("flags", "message"), [
    (("--tls-cert", "CERT"), "--tls-cert and --tls-key go together"),
    (("--tls-cert", "CERT", "--tls-key", "/nonexistent.key"), "cannot read the key (--tls-key) /nonexistent.key"),
    (("--tls-cert", "CERT", "--tls-key", "OTHER_KEY"), "are not a PEM certificate and its key"),
    (("--tls-cert", "CERT", "--tls-key", "KEY", "--tls-client-ca", "KEY"), "holds no PEM certificate"),
    (("--tls-cert", "CERT", "--tls-key", "KEY", "--tls-client-ca", "EMPTY"), "holds no PEM certificate"),
    (("--tls-client-ca", "CA"), "--tls-client-ca needs --tls-cert"),
])
def test_tls_files_that_cannot_be_used_stop_the_start(pki, tmp_path, flags, message):
    (tmp_path / "empty.pem").write_bytes(b"")
    files = {"CERT": pki.server.cert, "KEY": pki.server.key, "OTHER_KEY": pki.client.key, "CA": pki.ca,
             "EMPTY": tmp_path / "empty.pem"}
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["--listen", endpoint, "--data-dir", str(tmp_path / "data"), *(str(files.get(f, f)) for f in flags)]
    handle = spawn_daemon(args, tmp_path / "drived.log", tmp_path / "data", endpoint)
    assert handle.proc.wait(30) != 0
    assert message in handle.log(), handle.log()


@pytest.mark.parametrize(("given", "message"), [
    ({"--tls-cert": "CERT"}, "--tls-cert and --tls-key go together"),
    ({"--tls-key": "KEY"}, "--tls-cert and --tls-key go together"),
    # From the environment (a k8s manifest, compose), the refusal named flags the user never gave.
    ({"DRIVED_TLS_CERT": "CERT"}, "DRIVED_TLS_CERT and DRIVED_TLS_KEY go together"),
    ({"DRIVED_TLS_KEY": "KEY"}, "DRIVED_TLS_CERT and DRIVED_TLS_KEY go together"),
    ({"--tls-client-ca": "CA"}, "--tls-client-ca needs --tls-cert and --tls-key"),
    ({"DRIVED_TLS_CLIENT_CA": "CA"}, "DRIVED_TLS_CLIENT_CA needs DRIVED_TLS_CERT and DRIVED_TLS_KEY"),
])
def test_tls_settings_without_their_pair_are_refused_naming_where_they_were_given(pki, tmp_path, given, message):
    files = {"CERT": pki.server.cert, "KEY": pki.server.key, "CA": pki.ca}
    data = tmp_path / "data"
    result, before = refused_start(data, given, files)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in last, result.stderr
    assert snapshot(data) == before


def refused_start(data: Path, given: dict[str, str], files: dict[str, Path]
                  ) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Runs drived to its refusal with the settings `given` (a flag, or an env variable, each naming a key of
    `files`) on a data dir holding an upload a running daemon would remove: how it ended, and the data dir before."""
    (data / "tmp").mkdir(parents=True)
    (data / "tmp" / "held").write_bytes(b"an upload a running daemon would remove")
    before = snapshot(data)
    flags = [str(part) for name, file in given.items() if name.startswith("--") for part in (name, files[file])]
    env = {name: str(files[file]) for name, file in given.items() if not name.startswith("--")}
    result = subprocess.run([sys.executable, "-m", "drived", "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                             str(data), *flags], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    return result, before


@pytest.mark.parametrize(("given", "message"), [
    ({"--tls-cert": "CERT", "--tls-key": "MISSING"}, "cannot read the key (--tls-key) {MISSING}"),
    # From the environment (a k8s manifest, compose), the refusal named flags the operator never gave.
    ({"DRIVED_TLS_CERT": "CERT", "DRIVED_TLS_KEY": "MISSING"}, "cannot read the key (DRIVED_TLS_KEY) {MISSING}"),
    ({"--tls-cert": "CERT", "DRIVED_TLS_KEY": "OTHER_KEY"},
     "--tls-cert {CERT} and DRIVED_TLS_KEY {OTHER_KEY} are not a PEM certificate and its key"),
    ({"DRIVED_TLS_CERT": "CERT", "DRIVED_TLS_KEY": "KEY", "DRIVED_TLS_CLIENT_CA": "EMPTY"},
     "DRIVED_TLS_CLIENT_CA {EMPTY} holds no PEM certificate"),
])
def test_tls_files_that_cannot_be_used_are_named_as_they_were_given(pki, tmp_path, given, message):
    (tmp_path / "empty.pem").write_bytes(b"")
    files = {"CERT": pki.server.cert, "KEY": pki.server.key, "OTHER_KEY": pki.client.key,
             "EMPTY": tmp_path / "empty.pem", "MISSING": tmp_path / "missing.key"}
    data = tmp_path / "data"
    result, before = refused_start(data, given, files)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"drived: {message.format(**files)}" in result.stderr.strip().splitlines()[-1], result.stderr
    assert snapshot(data) == before


def test_sighup_names_tls_settings_from_the_environment_as_given(start_daemon, pki, tmp_path):
    served = Issued(tmp_path / "served.cert", tmp_path / "served.key")
    shutil.copy(pki.server.cert, served.cert)
    shutil.copy(pki.server.key, served.key)
    handle = start_daemon(tmp_path, env={"DRIVED_TLS_CERT": str(served.cert), "DRIVED_TLS_KEY": str(served.key)},
                          tls=Connection("", True, str(pki.ca)))
    shutil.copy(pki.client.key, served.key)  # a key that is not the certificate's
    handle.proc.send_signal(signal.SIGHUP)
    handle.wait_logged("tls not reloaded")
    line = next(json.loads(x) for x in handle.log().splitlines() if '"tls not reloaded"' in x)
    assert f"DRIVED_TLS_CERT {served.cert} and DRIVED_TLS_KEY {served.key} are not" in line["reason"], line
    assert served_certificate(handle.endpoint) == pki.server.der()


# --- the client never sends a token in plaintext beyond loopback ----------------------------------


@pytest.mark.parametrize("make", [Drive, AsyncDrive])
def test_a_token_is_not_sent_in_plaintext_to_another_machine(make, monkeypatch):
    # The address cannot be reached: a client that tried to connect would fail with ConnectionError, later.
    for endpoint in (UNREACHABLE, "dns:///drived.example:50051", "[2001:db8::1]:50051"):
        with pytest.raises(ValueError) as refused:
            make("lit://d", endpoint=endpoint, token="t0ken")
        assert isinstance(refused.value, InvalidArgument) and refused.value.code is None
        assert "refusing to send the token in plaintext" in str(refused.value) and "t0ken" not in str(refused.value)
    monkeypatch.setenv("DRIVE_TOKEN", "t0ken")
    with pytest.raises(InvalidArgument, match="insecure=True"):
        make("lit://d", endpoint=UNREACHABLE)
    make("lit://d", endpoint=UNREACHABLE, insecure=True)  # told the network is trusted
    make("lit://d", endpoint=UNREACHABLE, tls=True)  # encrypted
    for endpoint in ("127.0.0.1:1", "127.8.9.10:1", "localhost:1", "[::1]:1", "unix:/tmp/drived.sock"):
        make("lit://d", endpoint=endpoint)
    monkeypatch.setenv("DRIVE_INSECURE", "1")
    make("lit://d", endpoint=UNREACHABLE)
    monkeypatch.setenv("DRIVE_INSECURE", "maybe")
    with pytest.raises(InvalidArgument, match=r"\$DRIVE_INSECURE='maybe'"):
        make("lit://d", endpoint=UNREACHABLE)


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback, as `$http_proxy` names one: `carried` holds every byte a client sent it,
    what another machine on the path would read."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.carried = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed by `close`
            while True:
                threading.Thread(target=self._tunnel, args=(self._server.accept()[0],), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                piece = client.recv(4096)
                if not piece:
                    return
                self.carried += piece
                request += piece
            host, _, port = request.split()[1].decode().rpartition(":")  # CONNECT HOST:PORT HTTP/1.1
            with socket.create_connection((host, int(port))) as daemon:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=self._pipe, args=(daemon, client, None), daemon=True).start()
                self._pipe(client, daemon, self.carried)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if record is not None:
                    record += data
                sink.sendall(data)

    def close(self) -> None:
        self._server.close()


def test_a_token_to_a_loopback_daemon_never_goes_through_the_environments_proxy(twin, start_daemon, tmp_path,
                                                                               drive_uri, monkeypatch):
    """gRPC sent a call to 127.0.0.1 through $http_proxy, token and all, in plaintext: a proxy is another machine."""
    handle = start_daemon(tmp_path, "--token", "s3cret-token")
    proxy = ConnectProxy()
    try:
        monkeypatch.setenv("http_proxy", proxy.url)
        with grpc.insecure_channel(handle.endpoint) as channel:  # gRPC left to itself takes the proxy
            grpc.channel_ready_future(channel).result(timeout=10)
        assert b"CONNECT " + handle.endpoint.encode() in proxy.carried
        proxy.carried.clear()

        (tmp_path / "f.txt").write_bytes(b"f")
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint, token="s3cret-token")
        drive.put("f.txt")
        assert drive.list(".") == ["f.txt"]
        assert not proxy.carried, f"the proxy carried the calls (the token in them: {b's3cret-token' in proxy.carried})"
    finally:
        proxy.close()


def test_the_cli_and_fsspec_refuse_a_plaintext_token_to_another_machine(tmp_path):
    cli = [str(BIN / "python"), "-m", "drive_client.cli", "--endpoint", UNREACHABLE, "--token", "t0ken"]
    refused = subprocess.run([*cli, "ls", "lit://d"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refusing to send the token in plaintext" in refused.stderr
    for asynchronous in (False, True):  # refused when the filesystem is made, as a Drive is
        with pytest.raises(ValueError, match="refusing to send the token in plaintext"):
            fsspec.filesystem("lit", endpoint=UNREACHABLE, token="t0ken", asynchronous=asynchronous,
                              skip_instance_cache=True)
        fsspec.filesystem("lit", endpoint=UNREACHABLE, token="t0ken", insecure=True, asynchronous=asynchronous,
                          skip_instance_cache=True)


def test_endpoint_hosts_and_loopback():
    assert endpoint_hosts("10.0.0.5:50051") == ["10.0.0.5"]
    assert endpoint_hosts("[fd00::1]:50051") == ["fd00::1"]
    assert endpoint_hosts("dns:///drived.ns.svc:50051") == ["drived.ns.svc"]
    assert endpoint_hosts("dns://8.8.8.8/drived.example:443") == ["drived.example"]
    assert endpoint_hosts("ipv4:127.0.0.1:1,10.0.0.1:1") == ["127.0.0.1", "10.0.0.1"]
    assert endpoint_hosts("drived.example") == ["drived.example"]
    assert all(is_loopback(e) for e in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/x.sock", "ipv6:[::1]:1",
                                        "ipv4:127.0.0.1:1,127.0.0.2:1"))
    assert not any(is_loopback(e) for e in ("0.0.0.0:1", "[::]:1", "192.0.2.2:1", "localhost.example:1",
                                            "ipv4:127.0.0.1:1,10.0.0.1:1"))
