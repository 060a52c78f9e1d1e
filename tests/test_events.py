"""EventLog stays bounded: per drive, in total (in events and in their bytes), and in the number of drives it keeps
state for."""

from __future__ import annotations

import asyncio

import pytest

from drive_client.errors import EventsExpired
from drived.config import answer_entry_bytes
from drived.coordinator import PAGE
from drived.entry import Entry
from drived.events import EventLog


def put(log: EventLog, drive: str, n: int) -> None:
    for i in range(n):
        log.publish(drive, "put", Entry(path=f"f{i}", component="c"))


async def test_each_drive_keeps_its_last_events() -> None:
    log = EventLog(retain=5, retain_total=100)
    start = log.last("a")
    put(log, "a", 8)
    kept = log.since("a", log.last("a") - 5)
    assert [e.entry.path for e in kept] == ["f3", "f4", "f5", "f6", "f7"]
    with pytest.raises(EventsExpired):
        log.since("a", start)  # the first three events are gone: the resume is refused, not answered short


async def test_total_bound_trims_the_least_recently_used_drive_first() -> None:
    log = EventLog(retain=100, retain_total=10)
    start = log.last("old")
    put(log, "old", 6)
    put(log, "new", 6)  # 12 in total: two of "old" go
    assert [e.entry.path for e in log.since("new", start)] == [f"f{i}" for i in range(6)]
    with pytest.raises(EventsExpired):
        log.since("old", start)
    assert [e.entry.path for e in log.since("old", log.last("old") - 4)] == ["f2", "f3", "f4", "f5"]


async def test_byte_bound_trims_the_least_recently_used_drive_first_and_a_forgotten_drive_frees_its_bytes() -> None:
    log = EventLog(retain=100, retain_bytes=4 * answer_entry_bytes("f0", "c"), max_drives=2)
    start = log.last("old")
    put(log, "old", 3)
    put(log, "new", 2)  # five events' bytes: the first of "old" goes
    assert [e.entry.path for e in log.since("new", start)] == ["f0", "f1"]
    with pytest.raises(EventsExpired):
        log.since("old", start)
    assert [e.entry.path for e in log.since("old", log.last("old") - 2)] == ["f1", "f2"]
    put(log, "third", 4)  # "new" is forgotten with its bytes; "old", used least recently, loses its two
    assert [e.entry.path for e in log.since("third", start)] == ["f0", "f1", "f2", "f3"]


async def test_drive_states_are_bounded_and_forgetting_wakes_and_refuses_old_resumes() -> None:
    log = EventLog(max_drives=3)
    put(log, "busy", 2)
    seen = log.last("busy")
    waiting = log.changed("busy")
    for name in ("x", "y", "z"):  # touching three other drives pushes "busy" out
        log.changed(name)
    await asyncio.wait_for(waiting.wait(), 1)  # its waiters are woken, to look again
    with pytest.raises(EventsExpired):
        log.since("busy", seen - 1)  # what it had is forgotten: refused, never answered with a gap
    assert log.since("busy", log.last("busy")) == []  # a watch from now works
    assert len(log._drives) == 3


async def test_a_followed_drive_keeps_its_state_while_the_others_stay_bounded() -> None:
    log = EventLog(max_drives=2)
    put(log, "quiet", 1)
    put(log, "other", 1)  # newer: once it is forgotten, a state made again is no older than its event
    seen = log.last("quiet")
    with log.followed("quiet"):
        for name in ("x", "y", "z"):
            log.changed(name)
        assert list(log._drives) == ["quiet", "z"]
        assert log.since("quiet", seen) == []  # not refused: it missed nothing
    for name in ("v", "w"):
        log.changed(name)
    assert list(log._drives) == ["v", "w"]  # no longer followed, it is forgotten in its turn


async def test_an_answer_holds_a_page_of_events_at_most() -> None:
    """A watch whose client stopped reading holds its last answer: all of a drive's events after its sequence
    (10,000 of 4 KB paths, some 47 MB, also after the log dropped them), where its memory is bounded to a page."""
    log = EventLog(retain=3 * PAGE, retain_total=3 * PAGE)
    start = log.last("a")
    put(log, "a", 2 * PAGE + 5)
    pages = [log.since("a", start)]
    while pages[-1]:
        pages.append(log.since("a", pages[-1][-1].sequence))
    assert [len(page) for page in pages] == [PAGE, PAGE, 5, 0]
    assert [e.entry.path for page in pages for e in page] == [f"f{i}" for i in range(2 * PAGE + 5)]
