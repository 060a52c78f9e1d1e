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
KEEP_FREE = ARENAS * TRIM_THRESHOLD  # freed memory kept for reuse once transfers end (release_free_memory)
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


def free_memory_held() -> int | None:
    """Bytes malloc holds free in all its arenas (glibc 2.33+ `mallinfo2`); None where unknown."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def release_free_memory(keep: int = KEEP_FREE) -> bool:
    """Gives what malloc holds free back to the system (`malloc_trim`) when it is more than `keep` bytes.

    The thresholds above keep freed buffers for the next chunks, but they
    bound only what sits at the top of each heap: a burst of transfers leaves
    its buffers free all through the heaps, and nothing gave them back. A
    daemon calls this when transfers have ended: up to `keep` bytes stay for
    reuse, which is what the transfers of a quiet daemon free and take again
    (so they go on without page faults); past it, everything free is
    returned. Costs about a millisecond per hundred MiB returned. True if
    memory was returned.
    """
    held = free_memory_held()
    if held is None or held <= keep:
        return False
    return bool(ctypes.CDLL(None).malloc_trim(0))
