"""The Coordinator contract (drived/coordinator.py), checked on every implementation.

`coordinator` is parametrised by implementation: a shared one (Redis/Valkey)
joins the list with a fixture that starts its server, and must pass the same
tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from drive_client.errors import EventsExpired, Unavailable
from drived.coordinator import Coordinator
from drived.entry import Entry
from drived.events import InProcessCoordinator

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["in-process"])
async def coordinator(request: pytest.FixtureRequest) -> AsyncIterator[Coordinator]:
    made = InProcessCoordinator()
    yield made
    await made.close()


def entry(path: str) -> Entry:
    return Entry(path=path, component="c")


async def test_a_claim_has_one_holder_at_a_time_per_path(coordinator: Coordinator) -> None:
    inside: list[str] = []
    most = 0

    async def hold(path: str) -> None:
        nonlocal most
        async with coordinator.claim("d", path):
            inside.append(path)
            most = max(most, inside.count(path))
            await asyncio.sleep(0)  # others run while the claim is held
            inside.remove(path)

    await asyncio.gather(*(hold("same") for _ in range(20)))
    assert most == 1
    # Claims of other paths do not wait for a held one.
    async with coordinator.claim("d", "a"):
        await asyncio.wait_for(hold("b"), 5)


async def test_sequences_increase_and_since_answers_what_came_after(coordinator: Coordinator) -> None:
    start = await coordinator.last("d")
    first = await coordinator.publish("d", "put", entry("a"))
    second = await coordinator.publish("d", "delete", entry("a"))
    assert start < first < second
    assert await coordinator.last("d") == second
    assert [(e.sequence, e.kind, e.entry.path) for e in await coordinator.since("d", start)] == [
        (first, "put", "a"), (second, "delete", "a")
    ]
    assert [e.sequence for e in await coordinator.since("d", first)] == [second]
    assert await coordinator.since("d", second) == []
    assert await coordinator.since("other", await coordinator.last("other")) == []  # feeds are per drive


async def test_a_resume_from_before_the_feed_is_refused(coordinator: Coordinator) -> None:
    await coordinator.publish("d", "put", entry("a"))
    with pytest.raises(EventsExpired) as gone:
        await coordinator.since("d", 5)  # a sequence this feed never had
    assert "list the drive" in str(gone.value)


async def test_wait_returns_at_once_for_an_event_already_there(coordinator: Coordinator) -> None:
    seen = await coordinator.last("d")
    await coordinator.publish("d", "put", entry("a"))  # between taking the position and waiting
    await asyncio.wait_for(coordinator.wait("d", seen, 10), 5)


async def test_wait_returns_when_an_event_of_its_drive_comes(coordinator: Coordinator) -> None:
    seen = await coordinator.last("d")
    waiting = asyncio.ensure_future(coordinator.wait("d", seen, None))
    await asyncio.sleep(0)  # the wait starts
    await coordinator.publish("d", "put", entry("a"))
    await asyncio.wait_for(waiting, 5)


async def test_wait_lasts_its_timeout_when_its_drive_does_not_change(coordinator: Coordinator) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    waiting = asyncio.ensure_future(coordinator.wait("d", await coordinator.last("d"), 0.2))
    await asyncio.sleep(0)
    await coordinator.publish("other", "put", entry("x"))  # another drive's event does not end it
    await waiting
    assert loop.time() - t0 >= 0.19


async def test_close_ends_waits_in_progress_and_refuses_new_ones(coordinator: Coordinator) -> None:
    waiting = asyncio.ensure_future(coordinator.wait("d", await coordinator.last("d"), None))
    await asyncio.sleep(0)  # the wait starts
    coordinator.check_open()
    await coordinator.close()
    with pytest.raises(Unavailable):
        coordinator.check_open()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(Unavailable):
        await coordinator.wait("fresh", 0, None)


async def test_follow_reports_every_event_in_order_as_it_comes(coordinator: Coordinator) -> None:
    start = await coordinator.last("d")
    await coordinator.publish("d", "put", entry("before"))
    events = coordinator.follow("d", start)
    assert (await anext(events)).entry.path == "before"
    later = asyncio.ensure_future(anext(events))  # waits for the next event
    await asyncio.sleep(0)
    await coordinator.publish("d", "put", entry("b"))
    await coordinator.publish("d", "delete", entry("b"))
    assert (await asyncio.wait_for(later, 5)).entry.path == "b"
    assert (await anext(events)).kind == "delete"
