"""The daemon's configuration: flags and environment variables into one typed Config.

Every option has a flag and an environment variable (`DRIVED_<NAME>`); a
flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from drive_client.errors import InvalidArgument
from drive_client.uri import parse_drive

from .coordinator import CLAIM_TTL

MAX_CHUNK_SIZE = 3 << 20  # stays under gRPC's 4 MiB default message limit with room to spare


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
    metrics_listen: str = ""
    token: str = ""
    max_connection_age: float = 0.0
    log_level: str = "info"


HELP = {
    "listen": "address to serve gRPC on, HOST:PORT (0.0.0.0:50051 for all interfaces)",
    "data_dir": "folder where lit:// drives are kept (created if missing)",
    "storage": "where managed drives live: empty for --data-dir, or s3://bucket/prefix/ for an S3-compatible "
    "store (boto3's configuration: AWS_ENDPOINT_URL, credentials, AWS_REGION); several daemons may share one",
    "upload_expiry": "seconds a resumable upload whose stream ended before its finish is held for a resume "
    "(then removed), and a completed one remembered; also the age after which an upload into --storage "
    "that no part was added to is aborted (uploads of a daemon that died), checked at start-up and every "
    "this many seconds",
    "max_held_uploads": "resumable uploads held at most at once, waiting for a resume; past it the oldest is "
    "removed (its client starts that file again)",
    "max_held_bytes": "bytes held at most by the resumable uploads waiting for a resume (on the data dir's "
    "disk, or in --storage's parts); past it the oldest is removed",
    "coordinator": "redis://[:PASSWORD@]HOST:PORT/DB of a Redis or Valkey (7 or newer; rediss:// for TLS) that "
    "daemons sharing --storage coordinate through: ownership claims, the Watch feed, waiting gets. Several "
    "replicas need it; empty: this daemon coordinates alone. Prefer the env variable when the URL holds a "
    "password: flags show in `ps`",
    "claim_ttl": "seconds after which the claim of a path being committed is given up when its daemon died "
    "(with --coordinator; renewed every third of it while held)",
    "chunk_size": "bytes per message of a Get stream (at most 3 MiB)",
    "grace_period": "seconds that SIGTERM/SIGINT lets in-flight transfers finish before they are cancelled",
    "s3_list_concurrency": "parallel ListObjectsV2 calls when mounting an s3:// drive",
    "s3_page_size": "MaxKeys of each ListObjectsV2 call",
    "metrics_listen": "HOST:PORT to serve Prometheus metrics on (/metrics); empty: no metrics endpoint",
    "token": "when set, every DriveService call must carry `authorization: Bearer TOKEN` (UNAUTHENTICATED "
    "otherwise); health and reflection stay open. Prefer the env variable: flags show in `ps`",
    "max_connection_age": "seconds after which a client connection is asked to reconnect (so clients behind "
    "DNS round-robin find new replicas; calls in progress finish); 0: never",
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
    return text


def _chunk_size(text: str) -> int:
    value = _positive(int)(text)
    if value > MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"at most {MAX_CHUNK_SIZE} bytes, got {text}")
    return int(value)


SECRET = {"token", "coordinator"}  # values that may hold a password: never repeated in a message

PARSERS: dict[str, Callable[[str], Any]] = {
    "listen": str, "data_dir": str, "storage": _storage, "upload_expiry": _positive(float),
    "max_held_uploads": _non_negative(int), "max_held_bytes": _non_negative(int),
    "coordinator": _coordinator, "claim_ttl": _positive(float), "chunk_size": _chunk_size,
    "grace_period": _positive(float), "s3_list_concurrency": _positive(int), "s3_page_size": _positive(int),
    "metrics_listen": str, "token": str, "max_connection_age": _non_negative(float), "log_level": str,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per Config field, documented with its env variable and default."""
    for f in fields(Config):
        env = f"DRIVED_{f.name.upper()}"
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=PARSERS[f.name], default=None,
            metavar=f.name.upper(), help=f"{HELP[f.name]} (env {env}; default {f.default!r})",
        )


def from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The Config for parsed flags, falling back to the environment, then the defaults."""
    values: dict[str, Any] = {}
    for f in fields(Config):
        flag = getattr(args, f.name)
        env = os.environ.get(f"DRIVED_{f.name.upper()}")
        if flag is not None:
            values[f.name] = flag
        elif env:
            try:
                values[f.name] = PARSERS[f.name](env)
            except (argparse.ArgumentTypeError, ValueError) as err:
                shown = "" if f.name in SECRET else f"={env!r}"
                parser.error(f"DRIVED_{f.name.upper()}{shown}: {err}")
    config = Config(**values)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        parser.error(f"--log-level {config.log_level!r}: use debug, info, warning or error")
    return config


def parse(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> Config:
    return from_args(parser, parser.parse_args(argv))
