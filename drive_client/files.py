"""Writing local files: shared by the client, the daemon and its commit worker.

Imports nothing but the standard library, so a process that only writes files
(the commit worker) does not load grpc.
"""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Writes all of `data` to the file descriptor (os.write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
