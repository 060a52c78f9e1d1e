"""Local files: shared by the client, the daemon and its commit worker.

Imports nothing but the standard library, so a process that only writes files
(the commit worker) does not load grpc.
"""

from __future__ import annotations

import os

# What changes when an open file is written to: its size, modification and change times (`version`).
Version = tuple[int, int, int]


def version(st: os.stat_result) -> Version:
    """The version of a file by its stat. The change time alone sees a rewrite whose writer set the modification time
    back (`cp -p`, `touch -r`), which would be stored torn; it also moves with a chmod, a chown or a new link, which
    refuse a put whose bytes did not change: such a put is tried again, a torn file would be kept."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Writes all of `data` to the file descriptor (os.write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
