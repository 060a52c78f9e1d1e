"""Which refused calls the request log writes.

A client can repeat a refused call at will, at no cost to itself: one with
no token or a wrong one (anyone can send it), one past the rights of its
token, one past the daemon's limits (whose clients retry, and which come
when the daemon is busiest). So that no client makes the log grow as fast
as it can call, the refusals of one host with one status (REFUSED) are
logged one a call up to LOGGED_PER_SECOND in a second, counted from the
first; past it they are only counted, and at the end of that second one line
says how many were left out. Every other call, an INVALID_ARGUMENT included
(only a caller the daemon lets in gets one, and its line names what was
wrong), is logged one a call.

What is counted lasts that second only, and at most COUNTED (host, status)
pairs are counted apart at once: past them, a new host's refusals are
counted together, as OTHER_HOSTS's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger("drived")

REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
LOGGED_PER_SECOND = 10
COUNTED = 1024
OTHER_HOSTS = "other hosts"


@dataclass
class _Second:
    """The refusals of one host with one status in the second from the first of them."""

    end: asyncio.TimerHandle  # when it is over
    logged: int = 0
    left_out: int = 0


class RefusalLog:
    """Says which calls the request log writes, and logs how many refusals it left out."""

    def __init__(self) -> None:
        self._seconds: dict[tuple[str, str], _Second] = {}

    def logs(self, host: str, status: str) -> bool:
        """Whether the request log writes the line of a call from `host` that ended with `status`."""
        if status not in REFUSED:
            return True
        key = (host, status)
        if key not in self._seconds and len(self._seconds) >= COUNTED:
            key = (OTHER_HOSTS, status)
        second = self._seconds.get(key)
        if second is None:
            second = self._seconds[key] = _Second(asyncio.get_running_loop().call_later(1, self._ended, key))
        if second.logged < LOGGED_PER_SECOND:
            second.logged += 1
            return True
        second.left_out += 1
        return False

    def close(self) -> None:
        """Logs what the seconds still counting left out (the daemon stops)."""
        for key, second in list(self._seconds.items()):
            second.end.cancel()
            self._ended(key)

    def _ended(self, key: tuple[str, str]) -> None:
        second = self._seconds.pop(key)
        if second.left_out:
            host, status = key
            log.warning("refused calls not logged",
                        extra={"fields": {"peer": host, "status": status, "calls": second.left_out, "seconds": 1}})
