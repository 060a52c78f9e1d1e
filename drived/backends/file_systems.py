"""Which file system a path lies on, and whether a call on it can hang.

A call on a network or FUSE file system waits on a server or a process in user space: one gone leaves stat, open
and scandir blocked for minutes. A local file system answers from memory or its own disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

MOUNTINFO = "/proc/self/mountinfo"

# Network file systems (each call waits on a server), and FUSE ones: `fuse.NAME`, plain `fuse`, `fuseblk`, and
# virtiofs, FUSE to a VM's host (each call waits on a process in user space). gpfs and beegfs are listed by the type
# their kernel modules give; glusterfs and most others mount as `fuse.NAME`.
CAN_HANG = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "beegfs", "gpfs",
    "fuse", "fuseblk", "virtiofs",
})

_ESCAPED = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline and backslash as \ooo


def can_hang(fs_type: str | None) -> bool:
    """Whether calls on a file system of `fs_type` can block for as long as a server is gone; None (not known):
    False."""
    return fs_type is not None and (fs_type in CAN_HANG or fs_type.startswith("fuse."))


def file_system(path: str) -> str | None:
    """The type of the file system that `path` (resolved) lies on, from this process's mountinfo; None when that
    cannot be read."""
    try:
        with open(MOUNTINFO, "rb") as mountinfo:
            lines = os.fsdecode(mountinfo.read()).splitlines()
    except OSError:
        return None
    return mount_type(os.path.realpath(path), lines)


def mount_type(path: str, mountinfo: Iterable[str]) -> str | None:
    """The fs type of the mount in `mountinfo`'s lines whose mount point is the longest prefix of `path` (an
    absolute, resolved path); of two on one mount point, the later, which covers the earlier."""
    found, longest = None, -1
    for line in mountinfo:
        # "36 35 98:0 /root /mnt/point rw,noatime [optional fields] - ext4 /dev/sda1 rw": mount point is the 5th
        mount, separator, after = line.partition(" - ")
        fields = mount.split(" ")
        if not separator or len(fields) < 5 or not after:
            continue
        point = _ESCAPED.sub(lambda octal: chr(int(octal.group(1), 8)), fields[4])
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= longest:
            found, longest = after.split(" ", 1)[0], len(point)
    return found
