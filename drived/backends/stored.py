"""A stored file: its format, and how a finished upload becomes one.

A stored file is a 64-byte header (magic, sha256, size) followed by the
object's bytes; its mtime (in ns) is the generation. Shared by the daemon,
which commits big uploads, and the commit worker, which commits small ones.
"""

from __future__ import annotations

import errno
import os
import struct
import time

MAGIC = b"DRIVED01"
HEADER = struct.Struct("<8s32sQ16x")  # magic, raw sha256, size, padding to 64 bytes


def fsync_folder(folder: str) -> None:
    """Makes the entries of `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp_path: str, path: str) -> str:
    """Renames a finished upload to `path`, creating its folders; returns the folder.

    Raises NotADirectoryError when a parent of `path` is a file, and
    IsADirectoryError when `path` is a folder. The caller fsyncs the folder
    before it acknowledges the put.
    """
    folder = os.path.dirname(path)
    missing = 0
    while True:
        try:
            os.rename(tmp_path, path)
            return folder
        except FileNotFoundError:  # its folder does not exist yet, or a concurrent delete just removed it
            missing += 1
            if missing == 5:
                raise
        try:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError:  # a file where a folder has to be
            raise NotADirectoryError(errno.ENOTDIR, "a parent folder is a file", folder) from None


def make_durable(fd: int) -> int:
    """Stamps the written file `fd` with its generation (its mtime, in ns) and fsyncs it; returns the generation."""
    generation = time.time_ns()
    os.utime(fd, ns=(generation, generation))
    os.fsync(fd)
    return generation
