"""What `Drive` and `AsyncDrive` are made of besides their calls: the drive's settings and the result types.

Their operations are `core`'s plans; the twins differ only in how they call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from .errors import InvalidArgument, NotADirectory, NotFound
from .pb import drive_pb2 as pb
from .resume import RETRY_SECONDS
from .uri import check_component, parse_drive

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
]
# gRPC's retry policy for the unary calls (the client's own code retries streams, see `resume`):
# UNAVAILABLE means the call did not run, or may be run again to the same effect. Not Delete:
# a delete that ran but whose answer was lost would be answered NOT_FOUND when tried again.
UNARY_RETRY = json.dumps({"methodConfig": [{
    "name": [{"service": "drive.v1.DriveService", "method": method}
             for method in ("PutFile", "List", "Stat", "Mount", "QueryWriteStatus")],
    "retryPolicy": {
        "maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    },
}]})
# Targets that name several addresses: `dns:///name:port` (every address the name resolves to, e.g. a
# headless Service's pods) and gRPC's `ipv4:`/`ipv6:` address lists.
SPREAD_TARGETS = ("dns:", "ipv4:", "ipv6:")


def channel_options(endpoint: str, retries: bool) -> list[tuple[str, Any]]:
    """The options of a channel to `endpoint`, the one place both twins take them from.

    A target of several addresses spreads calls over all of them (round_robin, re-resolved when a
    replica sends GOAWAY after --max-connection-age), where gRPC's default policy would send every
    call to the first address that answers. `retries` turns gRPC's retries of unary calls on; a
    retried call's request is kept until the call is answered: room for a whole small file.
    """
    options: list[tuple[str, Any]] = [*CHANNEL_OPTIONS]
    if endpoint.startswith(SPREAD_TARGETS):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if not retries:
        return [*options, ("grpc.enable_retries", 0)]
    return [*options, ("grpc.enable_retries", 1), ("grpc.service_config", UNARY_RETRY),
            ("grpc.per_rpc_retry_buffer_size", MESSAGE_LIMIT)]


@dataclass(frozen=True)
class FileStat:
    """A file or folder of a drive: what `stat` and `entries` answer, and `put` for each file it stored."""

    path: str
    size: int
    sha256: str  # managed files; "" for s3 objects and folders
    etag: str  # s3 objects
    modified: datetime | None
    component: str  # the owning component ("" for s3 and shared folders)
    generation: int
    folder: bool

    @classmethod
    def from_info(cls, info: pb.FileInfo) -> FileStat:
        modified = None
        if info.HasField("modified") and (info.modified.seconds or info.modified.nanos):
            modified = info.modified.ToDatetime(tzinfo=timezone.utc)
        return cls(
            info.path, info.size, info.sha256, info.etag, modified, info.component, info.generation, info.folder
        )


class MountResult(NamedTuple):
    """What `mount` did: objects indexed and seconds taken."""

    objects: int
    seconds: float


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by `watch`: kind "put" or "delete", and the file."""

    sequence: int
    kind: str
    file: FileStat

    @classmethod
    def from_message(cls, message: pb.WatchEvent) -> WatchEvent:
        kind = "put" if message.kind == pb.WatchEvent.KIND_PUT else "delete"
        return cls(message.sequence, kind, FileStat.from_info(message.file))


class DriveBase:
    """A drive's settings (see `Drive` for the meaning of each argument); what both twins share but how they call."""

    def __init__(
        self,
        id: str,  # shadows the builtin: the name users know
        allow_duplicates: bool = False,
        component_name: str | None = None,
        root_folder: str | os.PathLike[str] | None = None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        self._read_only = parse_drive(id).read_only  # an s3:// drive
        self.id = id
        self.allow_duplicates = allow_duplicates
        self.component_name = check_component(component_name or os.environ.get("DRIVE_COMPONENT"))
        self.root_folder = None if root_folder is None else _existing_folder(root_folder)
        self.endpoint = endpoint or os.environ.get("DRIVE_ENDPOINT") or DEFAULT_ENDPOINT
        self.token = token or os.environ.get("DRIVE_TOKEN") or None
        self.retry_seconds = _retry_seconds(retry_seconds)
        self._channel: Any = None  # what the twin calls through, made on first use in each process

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, component_name={self.component_name!r}, endpoint={self.endpoint!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None  # channels do not cross processes; a new one is made on first use
        return state

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def _retry_seconds(retry_seconds: float | None) -> float:
    """The retry budget: as given, else $DRIVE_RETRY_SECONDS, else RETRY_SECONDS; 0 turns retries off."""
    if retry_seconds is None:
        text = os.environ.get("DRIVE_RETRY_SECONDS")
        try:
            retry_seconds = float(text) if text else RETRY_SECONDS
        except ValueError:
            raise InvalidArgument(f"DRIVE_RETRY_SECONDS={text!r} is not a number of seconds") from None
    if not retry_seconds >= 0:  # NaN too
        raise InvalidArgument(f"retry_seconds must be a number of seconds >= 0 (0: no retries), got {retry_seconds}")
    return float(retry_seconds)


def _existing_folder(root_folder: str | os.PathLike[str]) -> str:
    """`root_folder` as a string, once it is known to be a folder (as Lightning's Drive checks)."""
    path = os.fspath(root_folder)
    if not os.path.isdir(path):
        kind = NotADirectory if os.path.exists(path) else NotFound
        raise kind(f"root_folder {path!r} is not an existing folder: create it first, or pass the folder "
                   "that local paths are relative to")
    return str(path)
