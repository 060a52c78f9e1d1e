"""How a client reaches drived: the endpoint, its transport security, and the one function that makes channels.

Shared by the client (`Drive`, `AsyncDrive`) and the daemon's `drived health`,
so both read the same settings the same way. Every channel to a daemon is
made by `open_channel`: the place for channel options.

TLS: `Connection.tls` on, the daemon's certificate is checked against
`tls_ca` (a PEM bundle; the system's roots when not given), and with
`tls_cert`/`tls_key` the client shows its own certificate (mutual TLS). A
token travels in the call's metadata: over a plaintext channel anyone on the
path reads it, so `check_token_transport` refuses that to any address but
loopback unless the caller says the network is trusted.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import InvalidArgument, NotFound

DEFAULT_ENDPOINT = "127.0.0.1:50051"
MESSAGE_LIMIT = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    # A fixed 2 MiB receive window per stream: with gRPC's default window sizing (BDP
    # probing) the window of a long get keeps growing, and the client's memory with it
    # (bench/WHY.md).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 2 << 20),
    # A daemon that could not be reached is tried again after 0.1 s, then less and less often,
    # but at least every 5 s (gRPC's own are 1 s and 2 min): the retries of a call or a transfer
    # (see `resume`) find a restarted daemon soon after it is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
    # While calls are open, a ping after 10 s without a frame from the daemon, which it must answer within
    # 10 s (gRPC waits for a ping's answer for `ping_timeout_ms`, 1 min by default, whatever the keepalive
    # timeout): a daemon that stops answering (a frozen process or VM, a network black hole) fails its calls
    # UNAVAILABLE within ~20 s, for `resume` to try again within retry_seconds, where they would wait for
    # good. The pings go on however long a call carries nothing (a get waiting for its path, a quiet
    # watch); with no call open there are none. The daemon accepts pings this often
    # (drived.server.server_options).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
# Targets that name several addresses: `dns:///name:port` (every address the name resolves to, e.g. a
# headless Service's pods) and gRPC's `ipv4:`/`ipv6:` address lists.
SPREAD_TARGETS = ("dns:", "ipv4:", "ipv6:")
# The schemes of gRPC's targets (its name resolvers); any other `SCHEME://` in an endpoint is a URL.
TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
YES_NO_VARIABLES = ("DRIVE_TLS", "DRIVE_INSECURE", "DRIVE_HANDOFF")  # the client's yes/no environment variables


def env_flag(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """A yes/no environment variable (1/true/yes/on or 0/false/no/off, any case; unset is no)."""
    text = environ.get(name, "").strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise InvalidArgument(f"${name}={environ[name]!r}: use 1 or 0 (true/false, yes/no, on/off)")


def check_yes_no_variables() -> None:
    """Refuses a yes/no variable set to neither, when a Drive is made: each is read where it is used (a put, for
    $DRIVE_HANDOFF) or not at all (an argument wins, the endpoint is loopback), which would leave a typo unseen."""
    for name in YES_NO_VARIABLES:
        env_flag(name)


def endpoint_hosts(endpoint: str) -> list[str]:
    """The hosts an endpoint names: `HOST:PORT`, `[V6]:PORT`, or a gRPC target (`dns:///HOST:PORT`, `ipv4:` and
    `ipv6:` lists of addresses); none for a `unix:` socket."""
    return [_host(address) for address in _addresses(endpoint)]


def _addresses(endpoint: str) -> list[str]:
    """The addresses (`HOST:PORT`, `HOST`, `[V6]:PORT`) an endpoint names; none for a `unix:` socket."""
    if endpoint.startswith(("unix:", "unix-abstract:")):
        return []
    target = endpoint
    for scheme in SPREAD_TARGETS:
        if target.startswith(scheme):
            target = target[len(scheme):]
            if target.startswith("//"):  # dns://AUTHORITY/HOST:PORT
                target = target[2:].partition("/")[2]
            break
    return target.split(",")


def check_endpoint(endpoint: str, setting: str) -> str:
    """`endpoint` once a daemon can be there; `setting` names where it came from, for the error.

    Refused: a URL (gRPC would look `http://host:port` up in DNS as one name), a port outside 1-65535
    (gRPC would take it modulo 65536, and reach another port) and an empty one (gRPC would dial 443): each
    would be tried for the whole retry_seconds before failing, or worse.
    """
    scheme, url, _ = endpoint.partition("://")
    if url and scheme not in TARGET_SCHEMES:
        raise InvalidArgument(f"{setting} {endpoint!r} is a URL: give HOST:PORT (e.g. 127.0.0.1:50051), or "
                              "dns:///NAME:PORT for every address of NAME")
    for address in _addresses(endpoint):
        port = address.rpartition("]")[2] if address.startswith("[") else address
        _, colon, port = port.rpartition(":")
        if colon and not port:
            raise InvalidArgument(f"{setting} {endpoint!r}: the port is missing after the colon; give HOST:PORT")
        if colon and port.isdigit() and not 0 < int(port) < 65536:
            raise InvalidArgument(f"{setting} {endpoint!r}: port {port} is not one of 1-65535; give HOST:PORT")
    return endpoint


def _host(address: str) -> str:
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, colon, port = address.rpartition(":")
    return host if colon and port.isdigit() else address


def is_loopback(endpoint: str) -> bool:
    """Whether `endpoint` stays on this machine: localhost, 127.0.0.0/8, ::1, or a unix socket.

    Names are not resolved: any name but `localhost` counts as another machine.
    """
    return all(host == "localhost" or _loopback_address(host) for host in endpoint_hosts(endpoint))


def _loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | None, setting: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(f"{setting} {path!r} does not exist: give the path of a PEM file") from None
    except OSError as err:
        raise InvalidArgument(f"cannot read {setting} {path!r}: {err.strerror}") from None


@dataclass(frozen=True)
class Connection:
    """Where a daemon is and how to reach it: the endpoint, and TLS files when it uses TLS."""

    endpoint: str
    tls: bool = False
    tls_ca: str | None = None  # PEM bundle of the CAs that signed the daemon's certificate; None: system roots
    tls_cert: str | None = None  # the client's certificate chain (PEM), for a daemon that asks for one
    tls_key: str | None = None  # its private key (PEM)
    server_name: str | None = None  # the name the daemon's certificate must carry, when not the endpoint's host

    @classmethod
    def from_settings(
        cls,
        endpoint: str | None = None,
        tls: bool | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        server_name: str | None = None,
    ) -> Connection:
        """The connection for these arguments, each falling back to its environment variable.

        $DRIVE_ENDPOINT (else 127.0.0.1:50051; `check_endpoint` refuses one no
        daemon can be at), $DRIVE_TLS, $DRIVE_TLS_CA, $DRIVE_TLS_CERT,
        $DRIVE_TLS_KEY. Whether TLS is on: `tls`, else on when a TLS file is
        given as an argument, else $DRIVE_TLS, else on when the environment
        names a CA or a client certificate. An argument wins over the
        environment, so files given as arguments with `tls=False` are refused,
        where the environment's are ignored.
        """
        setting = "endpoint" if endpoint else "$DRIVE_ENDPOINT"
        endpoint = check_endpoint(endpoint or os.environ.get("DRIVE_ENDPOINT") or DEFAULT_ENDPOINT, setting)
        files_given = any(f is not None for f in (tls_ca, tls_cert, tls_key))
        if tls is False and files_given:
            raise InvalidArgument("TLS files (tls_ca, tls_cert or tls_key: `--tls-ca`, `--tls-cert` or `--tls-key`) "
                                  "given with TLS turned off (tls=False, `--no-tls`): drop them, or turn TLS on")
        ca = _path(tls_ca, "DRIVE_TLS_CA")
        cert = _path(tls_cert, "DRIVE_TLS_CERT")
        key = _path(tls_key, "DRIVE_TLS_KEY")
        if tls is None:
            tls = files_given or (env_flag("DRIVE_TLS") if os.environ.get("DRIVE_TLS") else bool(ca or cert))
        if not tls:
            return cls(endpoint)
        if (cert is None) != (key is None):
            raise InvalidArgument(
                "a client certificate needs its key and a key its certificate: give both tls_cert and tls_key "
                "(`--tls-cert` and `--tls-key`, $DRIVE_TLS_CERT and $DRIVE_TLS_KEY), or neither"
            )
        return cls(endpoint, True, ca, cert, key, server_name)

    def check_token_transport(self, insecure: bool | None) -> None:
        """Refuses to send a token in plaintext beyond loopback, unless `insecure` (else $DRIVE_INSECURE) says
        the network is trusted. Called before any channel is made, so nothing has been sent."""
        if self.tls or is_loopback(self.endpoint):
            return
        if env_flag("DRIVE_INSECURE") if insecure is None else insecure:
            return
        raise InvalidArgument(
            f"refusing to send the token in plaintext to {self.endpoint} (not a loopback address), where anyone "
            "on the network could read it: use TLS (tls=True or $DRIVE_TLS=1, `drive --tls`, with a daemon "
            "started with --tls-cert), or pass insecure=True ($DRIVE_INSECURE=1, `drive --insecure`) on a "
            "network you trust"
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials of this connection, read from its files now."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "tls_ca (`--tls-ca`, $DRIVE_TLS_CA)"),
            private_key=_read(self.tls_key, "tls_key (`--tls-key`, $DRIVE_TLS_KEY)"),
            certificate_chain=_read(self.tls_cert, "tls_cert (`--tls-cert`, $DRIVE_TLS_CERT)"),
        )

    def unreachable_advice(self) -> str:
        """What to check when the daemon cannot be reached (a failed TLS handshake looks the same)."""
        if self.tls:
            return ("is the daemon running, with --tls-cert? Check that tls_ca (`--tls-ca`) holds the CA of its "
                    "certificate, and give a client certificate (tls_cert and tls_key: `--tls-cert`, `--tls-key`) "
                    "if it asks for one")
        return "is the daemon running? `make run` starts one; a daemon started with --tls-cert needs tls=True (`--tls`)"


def _path(value: str | os.PathLike[str] | None, env: str) -> str | None:
    if value is not None:
        return os.fspath(value)
    return os.environ.get(env) or None


def channel_options(connection: Connection, retries: bool = False) -> list[tuple[str, Any]]:
    """The options of a channel to `connection`'s daemon.

    A loopback target is reached directly, never through an HTTP proxy of the environment.

    A target of several addresses spreads calls over all of them (round_robin, re-resolved when a
    replica sends GOAWAY after --max-connection-age), where gRPC's default policy would send every
    call to the first address that answers.

    `retries` leaves gRPC's transparent retries on: a call that gRPC knows the daemon's code never saw
    (it never left the client, or the daemon's gRPC library refused its stream) is sent again. gRPC
    has no retry policy for any method: the client's own code (`core`, paced by `resume.Backoff`)
    tries calls again within `retry_seconds`, one layer a call.
    """
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if connection.endpoint.startswith(SPREAD_TARGETS):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if connection.server_name:
        options.append(("grpc.ssl_target_name_override", connection.server_name))
    if is_loopback(connection.endpoint):
        # gRPC sends even a loopback target through $grpc_proxy, $https_proxy or $http_proxy: a proxy is another
        # machine, which would read a plaintext call's token (loopback is exempt from `check_token_transport`).
        options.append(("grpc.enable_http_proxy", 0))
    return [*options, ("grpc.enable_retries", int(retries))]


def open_channel(connection: Connection, *, aio: bool = False, retries: bool = False) -> Any:
    """A new channel to `connection`'s daemon: a `grpc.Channel`, or a `grpc.aio.Channel` with `aio=True`;
    `retries` as `channel_options` says."""
    options = channel_options(connection, retries)
    kind = grpc.aio if aio else grpc
    if connection.tls:
        return kind.secure_channel(connection.endpoint, connection.credentials(), options=options)
    return kind.insecure_channel(connection.endpoint, options=options)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS flags of a command that reaches a daemon (`drive`, `drived health`), each defaulting to its
    environment variable; `Connection.from_settings(endpoint, args.tls, args.tls_ca, args.tls_cert,
    args.tls_key)` takes them."""
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                        help="reach the daemon over TLS (default: $DRIVE_TLS; on when --tls-ca or --tls-cert is given)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA bundle that signed the daemon's certificate (default: "
                        "$DRIVE_TLS_CA, else the system's)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a daemon with --tls-client-ca "
                        "(default: $DRIVE_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", help="the client certificate's key (default: $DRIVE_TLS_KEY)")
