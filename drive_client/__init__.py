"""drive_client: put, list, get and delete files in drives served by drived.

from drive_client import Drive
drive = Drive("lit://drive_1", component_name="work_a")
drive.put("a.txt"); drive.list("."); drive.get("a.txt", timeout=60); drive.delete("a.txt")

The names below are loaded on first use, so that a process importing only a
shared module (`drive_client.files`, `drive_client.uri`) does not load grpc.
Modules shared with the daemon, and public: `pb` (the generated messages),
`uri`, `errors`, `wire`, `files`, `malloc`, `channels` (endpoints, TLS and the one place channels
are made).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "AsyncDrive": "aio",
    "Drive": "drive",
    "FileStat": "common",
    "MountResult": "common",
    "WatchEvent": "common",
    **dict.fromkeys(
        (
            "AlreadyExists", "AmbiguousPathError", "DataLoss", "DriveError", "EventsExpired", "InvalidArgument",
            "IsADirectory", "LocalFileError", "NotADirectory", "NotFound", "PermissionDenied", "ResourceExhausted",
            "StaleIndexError", "StoreUnavailable", "TooManyStreams", "Unauthenticated", "Unavailable", "WaitTimeout",
        ),
        "errors",
    ),
}

if TYPE_CHECKING:
    from .aio import AsyncDrive
    from .common import FileStat, MountResult, WatchEvent
    from .drive import Drive
    from .errors import (
        AlreadyExists,
        AmbiguousPathError,
        DataLoss,
        DriveError,
        EventsExpired,
        InvalidArgument,
        IsADirectory,
        LocalFileError,
        NotADirectory,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        StaleIndexError,
        StoreUnavailable,
        TooManyStreams,
        Unauthenticated,
        Unavailable,
        WaitTimeout,
    )


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'drive_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "AlreadyExists",
    "AmbiguousPathError",
    "AsyncDrive",
    "DataLoss",
    "Drive",
    "DriveError",
    "EventsExpired",
    "FileStat",
    "InvalidArgument",
    "IsADirectory",
    "LocalFileError",
    "MountResult",
    "NotADirectory",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StaleIndexError",
    "StoreUnavailable",
    "TooManyStreams",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "WatchEvent",
]
