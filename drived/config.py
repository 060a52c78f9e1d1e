"""The daemon's configuration: flags and environment variables into one typed Config.

Every option has a flag and an environment variable (`DRIVED_<NAME>`); a
flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from drive_client.errors import InvalidArgument
from drive_client.uri import parse_drive

from .auth import SENDABLE, sendable
from .coordinator import CLAIM_TTL

MAX_CHUNK_SIZE = 3 << 20  # stays under gRPC's 4 MiB default message limit with room to spare
MESSAGE_LIMIT = MAX_CHUNK_SIZE + (1 << 20)  # the daemon's, both ways: a chunk and room for the message around it
# The entries one answer lists at most (a List page, the files of a Put): its message keeps room for the rest.
ANSWER_ENTRIES_BYTES = MESSAGE_LIMIT - (64 << 10)
ENTRY_BEYOND_NAMES = 128  # what a managed file's entry (a FileInfo, framed) takes beside its path and component


def answer_entry_bytes(path: str, component: str) -> int:
    """The most a managed file's entry takes in an answer, known from its names before the file is read."""
    return len(path.encode()) + len(component.encode()) + ENTRY_BEYOND_NAMES


# A setting ("max_streams") as the operator gave it, for messages: the daemon's Config.named; `flag` for the objects
# that tests make without a Config.
Named = Callable[[str], str]


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    data_dir: str = "./drive-data"
    storage: str = ""
    upload_expiry: float = 60.0
    max_held_uploads: int = 1000
    max_held_bytes: int = 64 << 30
    coordinator: str = ""
    claim_ttl: float = CLAIM_TTL
    chunk_size: int = 1 << 20
    grace_period: float = 30.0
    s3_list_concurrency: int = 16
    s3_page_size: int = 1000
    s3_index_memory: int = 2 << 30
    metrics_listen: str = ""
    token: str = ""
    auth_tokens: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    reflection: bool = True
    handoff: bool = True
    max_connection_age: float = 0.0
    max_file_size: int = 0
    quota: int = 0
    max_streams: int = 1024
    max_streams_per_peer: int = 256
    max_connections: int = 0
    stream_idle_timeout: float = 60.0
    log_level: str = "info"
    # The settings read from their env variable rather than a flag: messages name each as the operator gave it.
    from_env: frozenset[str] = field(default=frozenset(), repr=False)

    def named(self, setting: str, given_as: str = "") -> str:
        """`setting` as the operator gave it: its env variable when it came from the environment, else its flag (a
        setting not given too: the README's table pairs each flag with its variable). `given_as` names it as that
        other setting was given: the missing half of a pair."""
        return _env(setting) if (given_as or setting) in self.from_env else flag(setting)


HELP = {
    "listen": "address to serve gRPC on, HOST:PORT (0.0.0.0:50051 for all interfaces)",
    "data_dir": "folder where lit:// drives are kept (created if missing)",
    "storage": "where managed drives live: empty for --data-dir, or s3://bucket/prefix/ for an S3-compatible "
    "store (boto3's configuration: AWS_ENDPOINT_URL, credentials, AWS_REGION); several daemons may share one",
    "upload_expiry": "seconds a resumable upload whose stream ended before its finish is held for a resume "
    "(then removed), and a completed one remembered after the end of its stream; also the age after which an "
    "upload into --storage that no part was added to is aborted (uploads of a daemon that died), checked at "
    "start-up and every this many seconds, unless the daemon writing it listed it live within that time (every "
    "third of it, under prefix/~uploads/): replicas sharing --storage take the same value",
    "max_held_uploads": "resumable uploads held at most at once, waiting for a resume; past it the oldest is "
    "removed (its client starts that file again)",
    "max_held_bytes": "bytes held at most by the resumable uploads waiting for a resume (on the data dir's "
    "disk, or in --storage's parts; K, M, G, T: powers of 1024); past it the oldest is removed",
    "coordinator": "redis://[:PASSWORD@]HOST:PORT/DB of a Redis or Valkey (7 or newer; rediss:// for TLS) that "
    "daemons sharing --storage coordinate through: ownership claims, the Watch feed, waiting gets. Several "
    "replicas need it; empty: this daemon coordinates alone. Prefer the env variable when the URL holds a "
    "password: flags show in `ps`",
    "claim_ttl": "seconds after which the claim of a path being committed or deleted is given up when its daemon "
    "died (with --coordinator; renewed every third of it while held; a put whose claim lapsed fails UNAVAILABLE)",
    "chunk_size": "bytes per message of a Get stream (at most 3 MiB; local storage, and --storage's ranged reads, send "
    "whole 1 MiB blocks)",
    "grace_period": "seconds that SIGTERM/SIGINT lets in-flight transfers finish before they are cancelled (a "
                    "second signal cancels them at once, and ends the daemon within 5 s however the store answers)",
    "s3_list_concurrency": "parallel ListObjectsV2 calls when mounting an s3:// drive",
    "s3_page_size": "MaxKeys of each ListObjectsV2 call",
    "s3_index_memory": "bytes the indexes of mounted s3:// drives hold at most (about 80 per object and 1.5 K "
    "per location; K, M, G, T: powers of 1024): past it the least recently used are dropped, and indexed again "
    "at their next use; the listings of mounts in progress take at most as much again between them (and each its "
    "index beside it, for the moment it is built), and one that would pass it is refused with RESOURCE_EXHAUSTED",
    "metrics_listen": "HOST:PORT to serve Prometheus metrics on (/metrics); empty: no metrics endpoint",
    "token": "when set, every DriveService call must carry `authorization: Bearer TOKEN` (UNAUTHENTICATED "
    "otherwise): one token for every drive, read-write, beside those of --auth-tokens; health and reflection "
    f"stay open. A token is {SENDABLE}. Prefer the env variable: flags show in `ps`",
    "auth_tokens": "TOML file of tokens, each with the drives it may use and its mode, read or read-write "
    "(README, Security); calls then need one of them. SIGHUP reads it again",
    "tls_cert": "PEM certificate (chain) to serve gRPC over TLS with; needs --tls-key. SIGHUP reads it again",
    "tls_key": "PEM private key of --tls-cert (unencrypted)",
    "tls_client_ca": "PEM bundle of the CAs whose client certificates are accepted: with it, every client must "
    "show one (mutual TLS); needs --tls-cert",
    "reflection": "on or off: serve gRPC server reflection (what grpcurl uses to learn the API)",
    "handoff": "on or off: take the open files that clients on this host hand over to be put, reading them here "
    "instead of receiving their bytes, or to get into, writing the bytes there instead of sending them (README, "
    "Same-host puts and gets; an abstract Unix socket named for the --listen port)",
    "max_connection_age": "seconds after which a client connection is asked to reconnect (so clients behind "
    "DNS round-robin find new replicas; calls in progress finish); 0: never",
    "max_file_size": "the largest file a put may store, in bytes (K, M, G, T: powers of 1024); a bigger one is "
    "refused with RESOURCE_EXHAUSTED as soon as its header or its bytes say so, and nothing is stored. 0: no limit",
    "quota": "bytes each lit:// drive may hold (K, M, G, T: powers of 1024); a put that would go over is refused "
    "with RESOURCE_EXHAUSTED naming used, asked and quota, and nothing is stored. 0: no quota",
    "max_streams": "transfers (Put, PutFile, Get) and watches served at once, and as many other calls whose "
    "request is still arriving, and as many health Watch calls; more are refused with RESOURCE_EXHAUSTED. With "
    "the message limit, bounds the daemon's memory (README, Failure behaviour)",
    "max_streams_per_peer": "the same for one client host (its address without the port; behind a proxy, the "
    "proxy); more are refused with RESOURCE_EXHAUSTED",
    "max_connections": "client connections held at once; past it a new one is closed as it is accepted (its client "
    "tries again, as for a restart). Each holds a file descriptor: 0 takes an eighth of the open-file limit left "
    "at start (README, Failure behaviour)",
    "stream_idle_timeout": "seconds a Put or Get may wait on its client, which sends or reads nothing meanwhile, "
    "or a call's request may stop arriving, "
    "before it is ended (UNAVAILABLE) and its upload data removed (a resumable upload is not held for a resume); "
    "with --storage, also the most a client may keep a part it sends waiting, in all, while other uploads wait "
    "for memory (its stream is then ended too, but its upload is held for a resume from its last part sent, as a "
    "cut stream's is); at least 1, or 0: never",
    "log_level": "debug, info, warning or error",
}


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"cannot be negative, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _at_most(high: int, kind: Callable[[str], Any], unit: str = "") -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"at most {high}{unit}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# The most seconds a setting takes (about 24 days): gRPC keeps --max-connection-age in milliseconds in a C int,
# and none of the others needs more. nan and inf are refused too: a daemon would start and misbehave with them.
MAX_SECONDS = (2**31 - 1) // 1000


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"give seconds, at most {MAX_SECONDS} (about 24 days), not {text}")
    return value


MIN_IDLE_TIMEOUT = 1.0  # shorter, a client's ordinary pause (a busy disk, a collection) would end its transfers


def _idle_timeout(text: str) -> float:
    value = _non_negative(_seconds)(text)
    if 0 < value < MIN_IDLE_TIMEOUT:
        raise argparse.ArgumentTypeError(f"give 0 (never) or at least {MIN_IDLE_TIMEOUT:g} s, not {text}")
    return value


def _address(text: str) -> str:
    """HOST:PORT, or a unix: socket: gRPC would take a port past 65535 (or -1) modulo 65536, and serve another."""
    if not text or text.startswith(("unix:", "unix-abstract:")):
        return text
    _, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"give HOST:PORT with a port of 0-65535, not {text!r}")
    return text


def _listen(text: str) -> str:
    """The gRPC address: gRPC cannot listen on an empty host, and would say only that it failed to bind."""
    address = _address(text)
    if not address or address.startswith(":"):
        raise argparse.ArgumentTypeError(
            f"give HOST:PORT with its host (127.0.0.1:PORT for this machine only, 0.0.0.0:PORT for every "
            f"interface), not {text!r}"
        )
    return address


def _metrics_listen(text: str) -> str:
    """The metrics address, which serves HTTP on TCP only and, like --listen, names its host."""
    if text.startswith(("unix:", "unix-abstract:")):
        raise argparse.ArgumentTypeError(f"metrics are served over TCP: give HOST:PORT, not {text!r}")
    return _listen(text) if text else text


def _storage(text: str) -> str:
    if not text:
        return text
    try:
        where = parse_drive(text)
    except InvalidArgument as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not where.read_only:
        raise argparse.ArgumentTypeError(f"use s3://bucket/prefix/ (or empty for --data-dir), not {text!r}")
    return text


SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """Bytes, as a number with an optional K, M, G or T (powers of 1024): "512M", "10G", "1TiB"."""
    found = SIZE_RE.fullmatch(text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"give bytes, e.g. 1048576, 512M or 10G, not {text!r}")
    return int(found.group(1)) * SIZE_UNITS[found.group(2).upper()]


def _coordinator(text: str) -> str:
    """A redis:// or rediss:// URL; a refusal never repeats the URL, which may hold a password."""
    if not text:
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError("not a URL: use redis://[:PASSWORD@]HOST:PORT/DB") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"use redis://[:PASSWORD@]HOST:PORT/DB or rediss://... (got a {parts.scheme or 'schemeless'} URL"
            f"{'' if parts.hostname else ' without a host'})"
        )
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise argparse.ArgumentTypeError(f"the database after the port is a number, like /0 (port {port})")
    from .redis_coordinator import check_url_options  # redis loads only with --coordinator

    try:
        check_url_options(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _token(text: str) -> str:
    """A token a client can send (empty: none); a refusal never repeats it."""
    if text and not sendable(text):
        raise argparse.ArgumentTypeError(f"a token is {SENDABLE}, as clients send it: every client would be refused")
    return text


def _switch(text: str) -> bool:
    word = text.strip().lower()
    if word in ("on", "true", "yes", "1"):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"use on or off, not {text!r}")


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"use debug, info, warning or error, not {text!r}")
    return text


MAX_LIST_THREADS = 256  # a mount's listing runs a thread per unit of --s3-list-concurrency
MAX_C_INT = 2**31 - 1  # gRPC keeps --max-connections in a C int

SECRET = {"token", "coordinator"}  # values that may hold a password: never repeated in a message

PARSERS: dict[str, Callable[[str], Any]] = {
    "listen": _listen, "data_dir": str, "storage": _storage, "upload_expiry": _positive(_seconds),
    "max_held_uploads": _non_negative(int), "max_held_bytes": _size,
    "coordinator": _coordinator, "claim_ttl": _positive(_seconds),
    "chunk_size": _at_most(MAX_CHUNK_SIZE, _positive(int), " bytes"), "grace_period": _positive(_seconds),
    "s3_list_concurrency": _at_most(MAX_LIST_THREADS, _positive(int)), "s3_page_size": _positive(int),
    "s3_index_memory": _positive(_size),
    "metrics_listen": _metrics_listen, "token": _token, "auth_tokens": str, "tls_cert": str, "tls_key": str,
    "tls_client_ca": str, "reflection": _switch, "handoff": _switch, "max_connection_age": _non_negative(_seconds),
    "max_file_size": _size, "quota": _size, "max_streams": _positive(int), "max_streams_per_peer": _positive(int),
    "max_connections": _at_most(MAX_C_INT, _non_negative(int)), "stream_idle_timeout": _idle_timeout,
    "log_level": _log_level,
}


def _shown(default: object) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return repr(default)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return f"DRIVED_{name.upper()}"


SETTINGS = tuple(f for f in fields(Config) if f.name != "from_env")  # each with its flag and env variable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting, documented with its env variable and default."""
    for f in SETTINGS:
        parser.add_argument(
            flag(f.name), dest=f.name, type=PARSERS[f.name], default=None,
            metavar=f.name.upper(), help=f"{HELP[f.name]} (env {_env(f.name)}; default {_shown(f.default)})",
        )


def from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The Config for parsed flags, falling back to the environment, then the defaults."""
    values: dict[str, Any] = {}
    from_env: set[str] = set()
    for f in SETTINGS:
        flag = getattr(args, f.name)
        env = os.environ.get(_env(f.name))
        if flag is not None:
            values[f.name] = flag
        elif env:
            try:
                values[f.name] = PARSERS[f.name](env)
            except (argparse.ArgumentTypeError, ValueError) as err:
                shown = "" if f.name in SECRET else f"={env!r}"
                parser.error(f"{_env(f.name)}{shown}: {err}")
            from_env.add(f.name)
    config = Config(**values, from_env=frozenset(from_env))
    if bool(config.tls_cert) != bool(config.tls_key):
        given = "tls_cert" if config.tls_cert else "tls_key"
        parser.error(f"{config.named('tls_cert', given)} and {config.named('tls_key', given)} go together: give the "
                     "certificate and its key, or neither")
    if config.tls_client_ca and not config.tls_cert:
        client_ca, cert, key = (config.named(name, "tls_client_ca")
                                for name in ("tls_client_ca", "tls_cert", "tls_key"))
        parser.error(f"{client_ca} needs {cert} and {key}: mutual TLS is TLS first")
    return config


def parse(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> Config:
    return from_args(parser, parser.parse_args(argv))
