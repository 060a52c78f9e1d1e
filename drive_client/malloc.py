"""glibc malloc settings for a process that moves files in megabyte chunks.

Every chunk crossing a process is a buffer of about 1 MiB: gRPC's message,
and the bytes read from or written to the file. With glibc's defaults,
freed buffers go back to the system (heap trimming) and the next ones are
mapped fresh, so every chunk costs a page fault per page and the zeroing of
the whole buffer (bench/WHY.md has the profiles). Keeping up to
`TRIM_THRESHOLD` of freed memory per arena lets the next chunks reuse it;
at most `ARENAS` arenas (glibc's default is 8 per core) bound what is kept.

Only the daemon and the `drive` command apply this: a library must not
change the allocator of the program that imports it.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 8 << 20  # buffers below this come from the heap, where freed ones are reused
TRIM_THRESHOLD = 32 << 20  # freed memory kept per arena before any is given back
ARENAS = 2  # heaps shared by all threads
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")


def keep_transfer_buffers() -> bool:
    """Applies the settings if the C library is glibc and the user set none of theirs; True if applied."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, or a libc without mallopt)
        return False
    settings = ((M_ARENA_MAX, ARENAS), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])
