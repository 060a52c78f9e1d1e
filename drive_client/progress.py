"""A one-line progress bar for the `drive` command: bytes, rate and ETA on stderr."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressBar:
    """Call it with byte counts as they move; `close()` ends the line. Redraws at most 10 times a second."""

    def __init__(self, label: str, total: int, out: TextIO = sys.stderr) -> None:
        self.label = label
        self.total = total
        self.out = out
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._lock = threading.Lock()  # called from read-ahead threads too

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if now - self._drawn >= 0.1:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        line = f"{self.label}  {human(self.done)}"
        if self.total:
            line += f" / {human(self.total)} ({100 * self.done / self.total:.0f}%)"
        line += f"  {human(rate)}/s"
        if self.total and rate > 0:
            eta = max(self.total - self.done, 0) / rate
            line += f"  ETA {int(eta // 60)}:{int(eta % 60):02d}"
        self.out.write("\r" + line.ljust(70))
        self.out.flush()

    def close(self) -> None:
        with self._lock:
            self._draw(time.monotonic())
        self.out.write("\n")
        self.out.flush()
