"""`Entry`: what the service knows of one file or folder, whatever drive it is in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """A file or folder, with its path relative to the drive root."""

    path: str
    size: int = 0
    sha256: str = ""  # managed files (not known in listings)
    etag: str = ""  # s3 objects
    mtime_ns: int = 0
    component: str = ""  # the owner; "" for s3 objects and for folders shared by components
    generation: int = 0
    folder: bool = False
    crc32c: int | None = None  # managed files, where the store knows it
