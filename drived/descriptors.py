"""File descriptors: how many uploads and reads may hold one, so that connections and health keep theirs.

An upload bigger than a chunk is a file in the data dir's tmp/ until its
commit, a Get of a stored file holds the file open while it streams, and each
client connection is a socket. When the process reached its limit
(RLIMIT_NOFILE, `ulimit -n`), every open and every accept failed (EMFILE):
stalled uploads that each held a file made every call fail and health time
out. So the descriptors are shared out. At start-up the soft limit is raised
to the hard one (as Go's runtime and many servers do), and of the descriptors
left then, uploads may hold at most half, and uploads and reads together
three quarters; client connections an eighth (unless --max-connections says
otherwise: gRPC closes one more as it accepts it), and the last eighth stays
for health, metrics, the commit worker's pipes, the short opens of stats and
listings, and the checks of format 1 files (`stored.BUILDERS` at once). An
upload or a read past its share is refused with RESOURCE_EXHAUSTED; the counts
are taken where the files are opened and given back where they are closed.
"""

from __future__ import annotations

import logging
import os
import resource
import threading

from drive_client.errors import ResourceExhausted

log = logging.getLogger("drived")


class Descriptors:
    """The shares of the process's descriptors that uploads and reads may hold. Thread-safe."""

    def __init__(self, available: int) -> None:
        self.for_uploads = max(1, available // 2)
        self.for_files = max(2, available * 3 // 4)  # uploads and reads together
        self.for_connections = max(1, available // 8)
        self._uploads = self._reads = 0
        self._lock = threading.Lock()  # a big upload closes its file, and gives it back, in a worker thread

    @classmethod
    def of_this_process(cls) -> Descriptors:
        """Raises the soft limit to the hard one and shares out what is not open yet."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError) as err:  # a hard limit of "unlimited" that the kernel caps lower
                log.warning("cannot raise the open-file limit to %s: %s", hard, err)
        available = soft - len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else soft // 2
        descriptors = cls(available)
        log.info("file descriptors", extra={"fields": {
            "limit": soft, "for_uploads": descriptors.for_uploads, "for_uploads_and_reads": descriptors.for_files,
            "for_connections": descriptors.for_connections,
        }})
        return descriptors

    def take_upload(self) -> None:
        """Counts an upload's file before it is opened; ResourceExhausted when uploads hold their share."""
        with self._lock:
            if self._uploads >= self.for_uploads or self._uploads + self._reads >= self.for_files:
                raise ResourceExhausted(
                    f"drived has too many uploads in progress ({self._uploads}, the most its open-file limit "
                    "leaves them): retry when some have ended, or raise the daemon's limit (ulimit -n)"
                )
            self._uploads += 1

    def take_read(self) -> None:
        """Counts a read's file before it is opened; ResourceExhausted when uploads and reads hold their share."""
        with self._lock:
            if self._uploads + self._reads >= self.for_files:
                raise ResourceExhausted(
                    f"drived has too many files open for transfers ({self._uploads + self._reads}, the most its "
                    "open-file limit leaves them): retry when some have ended, or raise the daemon's limit (ulimit -n)"
                )
            self._reads += 1

    def give_upload(self) -> None:
        with self._lock:
            self._uploads -= 1

    def give_read(self) -> None:
        with self._lock:
            self._reads -= 1
