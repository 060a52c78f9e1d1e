"""drive_client: put, list, get and delete files in drives served by drived.

from drive_client import Drive
drive = Drive("lit://drive_1", component_name="work_a")
drive.put("a.txt"); drive.list("."); drive.get("a.txt", timeout=60); drive.delete("a.txt")
"""

from .aio import AsyncDrive
from .common import FileStat, MountResult, WatchEvent
from .drive import Drive
from .errors import (
    AlreadyExists,
    AmbiguousPathError,
    DataLoss,
    DriveError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StaleIndexError,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)

__all__ = [
    "AlreadyExists",
    "AmbiguousPathError",
    "AsyncDrive",
    "DataLoss",
    "Drive",
    "DriveError",
    "FileStat",
    "InvalidArgument",
    "MountResult",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StaleIndexError",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "WatchEvent",
]
