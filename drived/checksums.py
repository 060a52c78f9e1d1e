"""The checksums of a file's bytes: computed as they arrive, compared with what a client sent, and combined.

`Checksums` is the whole hashing state of one upload (sha256, CRC32C, and the
CRC32C at each block's end that a stored file keeps as its block table); an
upload feeds it every byte in order and asks it at the commit.
`ClientChecksums` is what the client sent with the file. `range_crc32c`
gives the CRC32C of a range of a file from the CRC32Cs of the file up to the
range's two ends, so a ranged read's CRC32C (or an S3 part's) costs no second
pass over its bytes. `RunningCrc32c` sums a read's bytes in the worker thread
that reads them.

No grpc here: the commit worker, a process of its own that stays small,
imports this module.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import dataclass
from typing import Protocol

from crc32c import crc32c

from drive_client.checksums import joined_crc32c

BLOCK_SIZE = 1 << 20  # bytes per block of a stored file's block table (its size follows: stored.content_size)


class Checksums:
    """The checksums of one file's bytes, fed in order with `update`.

    `crc32c` and `size` are of all the bytes so far; `block_ends()` gives
    the CRC32C of the bytes from the file's start to the end of each block
    (of `block_size` bytes; the last one may be short), which a stored file
    keeps so that a read of any block can verify it (`drived.backends.stored`).
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.size = 0
        self.crc32c = 0
        self._sha256 = hashlib.sha256()
        self._ends = array("I")  # the CRC32C at the end of each full block so far

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._sha256.update(data)
        view = memoryview(data)
        position, length = 0, len(view)
        while position < length:
            room = self.block_size - self.size % self.block_size
            piece = view[position:position + room]
            self.crc32c = crc32c(piece, self.crc32c)
            position += len(piece)
            self.size += len(piece)
            if len(piece) == room:
                self._ends.append(self.crc32c)

    @property
    def sha256(self) -> str:
        """The lowercase hex sha256 of the bytes so far."""
        return self._sha256.hexdigest()

    def sha256_digest(self) -> bytes:
        return self._sha256.digest()

    def block_ends(self) -> array[int]:
        """The CRC32C of the bytes up to the end of each block, the last (short) one included."""
        ends = array("I", self._ends)
        if self.size % self.block_size:
            ends.append(self.crc32c)
        return ends

    def block_table(self) -> bytes:
        """`block_ends()` as stored: 4 bytes each, little-endian (`table_entries` reads them back)."""
        ends = self.block_ends()
        if sys.byteorder == "big":
            ends.byteswap()
        return ends.tobytes()


def table_entries(raw: bytes | memoryview) -> array[int]:
    """The entries of a stored block table, or of a run of it (`Checksums.block_table`)."""
    ends = array("I")
    ends.frombytes(raw)
    if sys.byteorder == "big":
        ends.byteswap()
    return ends


class Readable(Protocol):
    """A stream of bytes read a chunk at a time (a GetObject body)."""

    def read(self, size: int) -> bytes: ...


class RunningCrc32c:
    """The CRC32C of the bytes read so far through `read`, in order.

    A worker thread calls `read` for each chunk, so the bytes are summed in
    the thread hop their read takes anyway: not on the event loop, and
    without a hop of their own (which costs more than the CRC32C of a chunk).
    """

    def __init__(self) -> None:
        self.crc32c = 0

    def read(self, body: Readable, size: int) -> bytes:
        """Runs in a worker thread: up to `size` bytes of `body`, added to `crc32c`."""
        data = body.read(size)
        self.crc32c = crc32c(data, self.crc32c)
        return data


@dataclass(frozen=True, slots=True)
class ClientChecksums:
    """The checksums a client sent with a file (PutFinish, PutFileRequest): at least one of the two."""

    sha256: str  # lowercase hex; "" when not sent
    crc32c: int | None  # None when not sent

    def mismatch(self, sha256: str, crc32c: int) -> str | None:
        """How the checksums of the bytes received (`sha256`, `crc32c`) differ from these; None when they match."""
        if self.crc32c is not None and self.crc32c != crc32c:
            return f"received bytes have CRC32C {crc32c:08x}, client sent {self.crc32c:08x}"
        if self.sha256 and self.sha256 != sha256:
            return f"received bytes hash to sha256 {sha256}, client sent {self.sha256}"
        return None


def range_crc32c(before: int, through: int, length: int) -> int:
    """The CRC32C of the `length` bytes between two points of a file, from the CRC32C of the file up to each.

    `before` is the CRC32C of the bytes before the range, `through` of those
    up to its end. Joining `before` to a run's CRC32C adds `before`'s share
    to it (XOR); joined to `through`, it takes that share out again, which
    leaves the range's (zlib's crc32_combine, solved for the second part).
    """
    return joined_crc32c(before, through, length)
