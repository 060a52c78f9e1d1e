"""The Coordinator contract (drived/coordinator.py), checked on every implementation.

`coordinators` is parametrised by implementation: in-process, and Redis over
a real valkey-server process (started by `bench.services.ValkeyServer`,
with a password, so that the URL's credentials are exercised too). It makes
the coordinator of one daemon, and of another daemon sharing it (the same
object in-process; a second RedisCoordinator on the same server).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.services import ValkeyServer
from drive_client.errors import EventsExpired, Unavailable
from drived.coordinator import PAGE, Change, Coordinator, Count, Passed, Unpublished, Usage
from drived.entry import Entry
from drived.events import InProcessCoordinator
from drived.redis_coordinator import RENEW, RENEW_CHUNK, UNPUBLISHED_FOUND, USAGE_KEPT, RedisCoordinator

pytestmark = pytest.mark.timeout(30)

PASSWORD = "pw-not-to-show"
KEPT = 5  # events a feed keeps in these tests

Make = Callable[..., Coordinator]


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    with ValkeyServer(tmp_path_factory.mktemp("valkey"), password=PASSWORD) as server:
        yield server


@pytest_asyncio.fixture(params=["in-process", pytest.param("redis", marks=pytest.mark.integration)],
                        loop_scope="function")  # the test's loop: the coordinators' connections belong to it
async def coordinators(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """`make()` is a daemon's coordinator; each call after the first, another daemon's sharing it."""
    made: list[Coordinator] = []

    def make(**options: float) -> Coordinator:
        if request.param == "in-process":
            if not made:
                made.append(InProcessCoordinator(events_kept=KEPT))
            return made[0]
        valkey: ValkeyServer = request.getfixturevalue("valkey")
        made.append(RedisCoordinator(valkey.url, events_kept=KEPT, **options))
        return made[-1]

    if request.param == "redis":
        redis.Redis.from_url(request.getfixturevalue("valkey").url).flushall()
    yield make
    for coordinator in made:
        await coordinator.close()
        await coordinator.disconnect()


@pytest.fixture
def coordinator(coordinators: Make) -> Coordinator:
    return coordinators()


async def wait_once(coordinator: Coordinator, drive: str, after: int, timeout: float | None) -> None:
    """One wait of the drive's feed, as a get that looks once does it."""
    async with coordinator.changes(drive) as changes:
        await changes.wait(after, timeout)


def entry(path: str) -> Entry:
    return Entry(path=path, component="c", size=3, sha256="ab" * 32, mtime_ns=7, generation=7)


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


async def test_a_claim_excludes_the_folders_above_and_the_paths_below_it(coordinator: Coordinator) -> None:
    for held, other in (("a", "a/b/c"), ("a/b/c", "a"), ("a/b", "a/b")):
        entered = asyncio.Event()
        async with coordinator.claim("d", held):
            async def take(path: str = other, entered: asyncio.Event = entered) -> None:
                async with coordinator.claim("d", path):
                    entered.set()

            taking = asyncio.ensure_future(take())
            await asyncio.sleep(0.1)  # time for the other claim to be taken, if it wrongly could be
            assert not entered.is_set(), (held, other)
        await asyncio.wait_for(taking, 5)  # taken once the first is released
        assert entered.is_set()
    async with coordinator.claim("d", "a/b"), contextlib.AsyncExitStack() as others:
        # Siblings, and the same path in another drive, do not wait.
        for drive, path in (("d", "a/c"), ("d", "ab"), ("d", "a/bc"), ("other", "a/b")):
            await asyncio.wait_for(others.enter_async_context(coordinator.claim(drive, path)), 5)


async def test_claims_are_shared_by_daemons(coordinators: Make) -> None:
    one, two = coordinators(), coordinators()
    order: list[str] = []

    async def hold(coordinator: Coordinator, name: str) -> None:
        async with coordinator.claim("d", "p"):
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    await asyncio.gather(*(hold(c, f"{n}{i}") for i in range(3) for n, c in (("one", one), ("two", two))))
    assert all(order[i].endswith(" in") and order[i + 1] == order[i].replace(" in", " out")
               for i in range(0, len(order), 2)), order


async def test_sequences_increase_and_since_answers_what_came_after(coordinator: Coordinator) -> None:
    start = await coordinator.last("d")
    first = await coordinator.publish("d", "put", entry("a"))
    second = await coordinator.publish("d", "delete", Entry(path="a", component="c"))
    assert start < first < second
    assert await coordinator.last("d") == second
    events = await coordinator.since("d", start)
    assert [(e.sequence, e.kind, e.entry.path) for e in events] == [(first, "put", "a"), (second, "delete", "a")]
    assert events[0].entry == entry("a") and events[1].entry == Entry(path="a", component="c")
    assert [e.sequence for e in await coordinator.since("d", first)] == [second]
    assert await coordinator.since("d", second) == []
    assert await coordinator.since("other", await coordinator.last("other")) == []  # feeds are per drive


async def test_a_resume_from_before_the_feed_is_refused(coordinator: Coordinator) -> None:
    await coordinator.publish("d", "put", entry("a"))
    with pytest.raises(EventsExpired) as gone:
        await coordinator.since("d", 5)  # a sequence this feed never had
    assert "list the drive" in str(gone.value)


async def test_a_feed_keeps_its_newest_events_and_refuses_a_resume_past_dropped_ones(
    coordinator: Coordinator,
) -> None:
    start = await coordinator.last("d")
    sequences = [await coordinator.publish("d", "put", entry(f"f{i}")) for i in range(KEPT + 120)]
    with pytest.raises(EventsExpired):
        await coordinator.since("d", start)  # the first events are dropped: refused, never answered short
    kept = await coordinator.since("d", sequences[-3])
    assert [e.entry.path for e in kept] == [f"f{KEPT + 118}", f"f{KEPT + 119}"]


async def test_deleted_by_counts_a_requests_deletes_of_its_component_also_once_the_feed_dropped_them(
    coordinator: Coordinator,
) -> None:
    """What the earlier attempts of a Delete removed: the delete events published with its request id, of the caller's
    files; not another component's, nor another drive's. Counted in the request's record, not found in the feed: a
    shared coordinator's still answers once the feed dropped them; the in-process one's goes with the last of them."""
    published = [("set/a", "c", "r1"), ("set/b/c", "c", "r1"), ("set/o", "other", "r1"), ("set/e", "c", "")]
    start = await coordinator.last("d")
    for path, component, request in published:
        await coordinator.publish("d", "delete", Entry(path=path, component=component), request=request)
    assert [e.request for e in await coordinator.since("d", start)] == [request for *_, request in published]
    assert await coordinator.deleted_by("d", "r1", "c", "set") == 2
    assert await coordinator.deleted_by("d", "r1", "other", "set") == 1
    assert await coordinator.deleted_by("d", "r2", "c", "set") == 0
    assert await coordinator.deleted_by("e", "r1", "c", "set") == 0  # records are per drive
    for i in range(KEPT + 120):  # past what the feed keeps: the request's events are dropped
        await coordinator.publish("d", "put", entry(f"f{i}"))
    kept = 2 if isinstance(coordinator, RedisCoordinator) else 0
    assert await coordinator.deleted_by("d", "r1", "c", "set") == kept


async def test_wait_returns_at_once_for_an_event_already_there(coordinator: Coordinator) -> None:
    seen = await coordinator.last("d")
    await coordinator.publish("d", "put", entry("a"))  # between taking the position and waiting
    await asyncio.wait_for(wait_once(coordinator, "d", seen, 10), 5)


async def test_wait_returns_when_an_event_of_its_drive_comes(coordinator: Coordinator) -> None:
    seen = await coordinator.last("d")
    waiting = asyncio.ensure_future(wait_once(coordinator, "d", seen, None))
    await asyncio.sleep(0)  # the wait starts
    await coordinator.publish("d", "put", entry("a"))
    await asyncio.wait_for(waiting, 5)


async def test_a_wait_wakes_on_another_daemons_publish(coordinators: Make) -> None:
    waiter, publisher = coordinators(), coordinators()
    seen = await waiter.last("d")
    waits = [asyncio.ensure_future(wait_once(waiter, "d", seen, None)) for _ in range(50)]
    await asyncio.sleep(0.2)  # the waits are under way (each returns at once if it started after the publish)
    await publisher.publish("d", "put", entry("a"))
    await asyncio.wait_for(asyncio.gather(*waits), 5)
    events = waiter.follow("d", seen)
    assert [e.entry.path for e in await asyncio.wait_for(anext(events), 5)] == ["a"]
    later = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.1)
    await publisher.publish("d", "delete", Entry(path="a", component="c"))
    assert [e.kind for e in await asyncio.wait_for(later, 5)] == ["delete"]
    await events.aclose()


async def test_waits_cancelled_at_any_moment_leave_later_waits_working(coordinators: Make) -> None:
    waiter, publisher = coordinators(), coordinators()
    for round_ in range(10):  # each round cancels waits at other points of subscribing and unsubscribing
        seen = await waiter.last("d")
        waits = [asyncio.ensure_future(wait_once(waiter, "d", seen, None)) for _ in range(10)]
        for _ in range(round_):
            await asyncio.sleep(0)
        for wait in waits[::2]:
            wait.cancel()
        await asyncio.sleep(0.05)
        survivor = asyncio.ensure_future(wait_once(waiter, "d", seen, None))
        await asyncio.sleep(0.05)
        await publisher.publish("d", "put", entry(f"r{round_}"))
        await asyncio.wait_for(asyncio.gather(survivor, *waits[1::2]), 5)
        await asyncio.gather(*waits[::2], return_exceptions=True)


async def test_wait_lasts_its_timeout_when_its_drive_does_not_change(coordinator: Coordinator) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    waiting = asyncio.ensure_future(wait_once(coordinator, "d", await coordinator.last("d"), 0.2))
    await asyncio.sleep(0)
    await coordinator.publish("other", "put", entry("x"))  # another drive's event does not end it
    await waiting
    assert loop.time() - t0 >= 0.19


async def test_close_ends_waits_in_progress_and_refuses_new_ones(coordinator: Coordinator) -> None:
    waiting = asyncio.ensure_future(wait_once(coordinator, "d", await coordinator.last("d"), None))
    watching = coordinator.follow("d", await coordinator.last("d"))
    following = asyncio.ensure_future(anext(watching))
    await asyncio.sleep(0.1)  # the wait and the watch start
    coordinator.check_open()
    await coordinator.close()
    with pytest.raises(Unavailable):
        coordinator.check_open()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(following, 5)
    with pytest.raises(Unavailable):
        await wait_once(coordinator, "fresh", 0, None)
    # Puts finishing in the grace period still claim and publish.
    async with coordinator.claim("d", "late"):
        assert await coordinator.publish("d", "put", entry("late")) > 0


async def test_follow_reports_every_event_in_order_as_it_comes(coordinator: Coordinator) -> None:
    start = await coordinator.last("d")
    await coordinator.publish("d", "put", entry("before"))
    events = coordinator.follow("d", start)
    assert [e.entry.path for e in await anext(events)] == ["before"]
    later = asyncio.ensure_future(anext(events))  # waits for the next event
    await asyncio.sleep(0)
    await coordinator.publish("d", "put", entry("b"))
    await coordinator.publish("d", "delete", entry("b"))
    followed = await asyncio.wait_for(later, 5)  # the put, and the delete too when it came before the read
    if len(followed) == 1:
        followed += await anext(events)
    assert [(e.kind, e.entry.path) for e in followed] == [("put", "b"), ("delete", "b")]


async def test_changes_learn_each_event_while_they_are_held(coordinators: Make) -> None:
    follower, publisher = coordinators(), coordinators()
    async with follower.changes("d") as changes:
        seen = await changes.latest()
        assert seen == await publisher.last("d")
        for i in range(3):
            waiting = asyncio.ensure_future(changes.wait(seen, None))
            await asyncio.sleep(0.05)  # the wait is under way (it returns at once if it starts after the publish)
            published = await publisher.publish("d", "put", entry(f"f{i}"))
            await asyncio.wait_for(waiting, 5)
            seen = await changes.latest()
            assert seen == published, i
        await asyncio.wait_for(changes.wait(seen - 1, None), 5)  # an event after `after` is there already


async def test_a_claim_is_confirmed_while_it_is_held(coordinator: Coordinator) -> None:
    async with coordinator.claim("d", "a/b") as claim:
        await claim.confirm()
        await claim.confirm()


def count_of(used: int, asked: list[int] | None = None) -> Count:
    """A store's count of a drive that finds `used` bytes (and appends them to `asked`), taking a moment."""
    async def count(passed: Passed | None) -> int:
        if asked is not None:
            asked.append(used)
        await asyncio.sleep(0.02)  # counts asked at once overlap
        return used
    return count


async def test_reserves_through_two_daemons_at_once_never_pass_the_quota(coordinators: Make) -> None:
    one, two = coordinators(), coordinators()
    # Each count finds another number: only one of them is kept.
    answers = await asyncio.gather(*(daemon.reserve("d", "d/w/f", 100, 1000, count_of(300 + i))
                                     for i, daemon in enumerate((one, two) * 10)))
    [used] = {usage.used for usage, _ in answers}
    held = [reservation for _, reservation in answers if reservation]
    assert len(held) == (1000 - used) // 100
    assert await one.usage("d", count_of(0)) == Usage(used, 100 * len(held)) == await two.usage("d", count_of(0))
    for i, reservation in enumerate(held):
        await (one, two)[i % 2].unreserve(reservation, committed=i < 2)
    assert await two.usage("d", count_of(0)) == Usage(used + 200)
    # What a commit frees is room once it committed, not while it runs.
    _, freeing = await one.reserve("d", "d/w/f", -200, 1000, count_of(0))
    assert freeing is not None
    room = 1000 - used
    assert (await two.reserve("d", "d/w/f", room - 199, 1000, count_of(0)))[1] is None
    await one.unreserve(freeing, committed=True)
    _, fits = await two.reserve("d", "d/w/f", room - 199, 1000, count_of(0))
    assert fits is not None
    await two.unreserve(fits, committed=False)
    await one.deleted("d", "d/w/f", 50)
    assert await two.usage("d", count_of(0)) == Usage(used - 50)


async def test_a_drive_is_counted_at_its_first_use_and_a_delete_before_it_changes_nothing(
    coordinator: Coordinator,
) -> None:
    await coordinator.deleted("d", "d/w/f", 50)  # the count, when it comes, finds the drive without the file
    asked: list[int] = []
    assert await coordinator.usage("d", count_of(500, asked)) == Usage(500)
    await coordinator.deleted("d", "d/w/f", 50)
    assert await coordinator.usage("d", count_of(0, asked)) == Usage(450)
    assert asked == [500]


# -- Redis only: what a shared coordinator adds ------------------------------------------------------------------


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[Callable[..., ValkeyServer]]:
    """Starts valkey-servers for one test (`port=` to come back where one was); stops them at the end."""
    started: list[ValkeyServer] = []

    def start(**options: object) -> ValkeyServer:
        started.append(ValkeyServer(tmp_path, password=PASSWORD, **options))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for server in started:
        server.stop()


@contextlib.asynccontextmanager
async def redis_coordinator(url: str, **options: float) -> AsyncIterator[RedisCoordinator]:
    made = RedisCoordinator(url, **options)
    try:
        yield made
    finally:
        await made.close()
        await made.disconnect()


@pytest.mark.integration
async def test_a_claim_whose_holder_stopped_renewing_expires_and_a_held_one_does_not(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url, claim_ttl=0.6) as one, redis_coordinator(server.url) as two:
        async with one.claim("d", "held"):
            taking = asyncio.ensure_future(two.claim("d", "held").__aenter__())
            await asyncio.sleep(1.5)  # more than twice the TTL: renewals keep it
            assert not taking.done()
        await asyncio.wait_for(taking, 5)
    async with redis_coordinator(server.url, claim_ttl=0.6) as dying:
        held = dying.claim("d", "orphan")
        await held.__aenter__()
        assert dying._renewer is not None
        dying._renewer.cancel()  # what a killed replica does: nothing; its claim lapses after the TTL
        async with redis_coordinator(server.url) as other:
            await asyncio.wait_for(other.claim("d", "orphan").__aenter__(), 5)


@pytest.mark.integration
async def test_an_unreachable_coordinator_is_unavailable_naming_it_and_recovers(
    own_valkey: Callable[..., ValkeyServer], caplog: pytest.LogCaptureFixture,
) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator:
        before = await coordinator.publish("d", "put", entry("a"))
        server.kill()
        calls = (
            lambda: coordinator.publish("d", "put", entry("b")), lambda: coordinator.last("d"),
            lambda: coordinator.since("d", before), lambda: wait_once(coordinator, "d", before, 5),
            lambda: coordinator.claim("d", "p").__aenter__(), lambda: coordinator.usage("d", count_of(0)),
            lambda: coordinator.reserve("d", "d/w/f", 1, 10, count_of(0)),
        )
        for call in calls:
            with pytest.raises(Unavailable) as down:
                await asyncio.wait_for(call(), 15)
            message = str(down.value)
            assert f"redis://127.0.0.1:{server.port}/0" in message and PASSWORD not in message
        await asyncio.wait_for(coordinator.deleted("d", "d/w/f", 1), 15)  # the store changed already: only logged
        own_valkey(port=server.port, appendonly=False)  # back, empty
        after = await coordinator.publish("d", "put", entry("c"))
        assert after > before
        assert PASSWORD not in caplog.text


@pytest.mark.integration
async def test_after_the_data_is_lost_sequences_go_on_and_old_resumes_are_refused(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator:
        watch_from = await coordinator.last("d")
        seen = await coordinator.publish("d", "put", entry("a"))
        assert [e.sequence for e in await coordinator.since("d", watch_from)] == [seen]
        server.kill()
        own_valkey(port=server.port)  # its data wiped
        with pytest.raises(EventsExpired):
            await coordinator.since("d", seen)  # before any new event: refused, not answered with nothing
        assert await coordinator.last("d") > seen
        again = await coordinator.publish("d", "put", entry("b"))
        assert again > seen
        with pytest.raises(EventsExpired):
            await coordinator.since("d", seen)  # and after one: refused, not answered with the new events
        assert [e.entry.path for e in await coordinator.since("d", again - 1)] == ["b"]


@pytest.mark.integration
async def test_a_coordinator_back_with_older_data_refuses_resumes_from_before_its_restart(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A server that restarts may come back with less than it answered (an RDB snapshot, an AOF not yet fsynced, a
    replica promoted behind its primary): the events after what it kept are gone, and a resume from before them, or
    from one of them, was answered with the events after the restart, as if nothing had been missed."""
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator:
        kept = await coordinator.publish("d", "put", entry("kept"))
        redis.Redis.from_url(server.url).save()
        lost = await coordinator.publish("d", "put", entry("lost"))
        server.kill()
        own_valkey(port=server.port, data_dir=server.data_dir)  # back from its snapshot, without "lost"
        start = await coordinator.last("d")  # a watch from now, after the restart
        assert start >= lost
        after = await coordinator.publish("d", "put", entry("after"))
        for seen in (kept, lost):
            with pytest.raises(EventsExpired):
                await coordinator.since("d", seen)
        assert [e.sequence for e in await coordinator.since("d", start)] == [after]


@pytest.mark.integration
async def test_a_count_of_a_coordinator_back_with_older_data_is_counted_again(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A server back from a snapshot brings the drive's count as it was then: the commits since were not in it, and
    the drive could pass its quota by them until the count expired (an hour)."""
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator:
        asked: list[int] = []
        _, held = await coordinator.reserve("d", "d/w/f", 100, 1000, count_of(500, asked))
        assert held is not None
        redis.Redis.from_url(server.url).save()
        await coordinator.unreserve(held, committed=True)
        assert await coordinator.usage("d", count_of(0, asked)) == Usage(600)
        server.kill()
        own_valkey(port=server.port, data_dir=server.data_dir)  # back from its snapshot: 500 used, 100 reserved
        assert await coordinator.usage("d", count_of(600, asked)) == Usage(600)
        assert await coordinator.usage("d", count_of(0, asked)) == Usage(600), "counted once after the restart"
        assert asked == [500, 600]


@pytest.mark.integration
async def test_the_epoch_is_a_number_as_daemons_of_the_earlier_version_read_it_and_theirs_is_kept(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A rolling update runs replicas of the earlier version beside new ones on one coordinator: their scripts read
    `drived:epoch` with Lua's tonumber, and an epoch holding more than its number failed each of their publishes
    after its commit, and their last and since. The epoch they made (no run) is kept, as they keep it."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    as_the_earlier_version_reads_it = admin.register_script("return tonumber(redis.call('GET', KEYS[1]))")
    seconds, micros = admin.time()
    earlier = (seconds - 1) * 1_000_000 + micros
    admin.set("drived:epoch", earlier)  # as a daemon of the earlier version makes it
    async with redis_coordinator(server.url) as coordinator:
        assert await coordinator.last("d") == earlier
        seen = await coordinator.publish("d", "put", entry("a"))
        assert [e.sequence for e in await coordinator.since("d", earlier)] == [seen]
        assert as_the_earlier_version_reads_it(keys=["drived:epoch"]) == earlier
        admin.flushall()  # the data lost: the epoch is made again
        remade = await coordinator.last("d")
        assert remade > seen
        assert as_the_earlier_version_reads_it(keys=["drived:epoch"]) == remade


@pytest.mark.integration
async def test_a_count_lost_with_the_data_or_forgotten_is_counted_again_and_earlier_reservations_leave_it_be(
    valkey: ValkeyServer,
) -> None:
    admin = redis.Redis.from_url(valkey.url)
    admin.flushall()
    async with redis_coordinator(valkey.url) as coordinator:
        asked: list[int] = []
        _, before = await coordinator.reserve("d", "d/w/f", 100, 1000, count_of(500, asked))
        assert before is not None
        [key] = admin.keys("drived:*:usage")
        assert 0 < admin.pttl(key) <= 2 * USAGE_KEPT * 1000  # forgotten once unused that long
        for lose in (admin.flushall, lambda: admin.pexpire(key, 1)):
            lose()
            time.sleep(0.01)
            assert await coordinator.usage("d", count_of(600, asked)) == Usage(600), lose  # not 0
            await coordinator.unreserve(before, committed=True)  # held in the count before: this one is left be
            assert await coordinator.usage("d", count_of(0, asked)) == Usage(600), lose
            await coordinator.deleted("d", "d/w/f", 600)
        assert asked == [500, 600, 600]


@pytest.mark.integration
async def test_a_count_past_its_time_is_counted_again_by_one_caller_while_the_others_use_it(
    valkey: ValkeyServer,
) -> None:
    """Every call waited for the store's count once the drive's count was USAGE_KEPT old: now the first caller to
    find it so counts it again in the background, and the count it then replaces answers meanwhile."""
    admin = redis.Redis.from_url(valkey.url)
    admin.flushall()
    async with redis_coordinator(valkey.url) as one, redis_coordinator(valkey.url) as two:
        asked: list[int] = []
        _, before = await one.reserve("d", "d/w/f", 100, 1000, count_of(500, asked))
        assert before is not None
        [key] = admin.keys("drived:*:usage")
        seconds, micros = admin.time()
        now_ms = seconds * 1000 + micros // 1000
        assert now_ms < int(admin.hget(key, "due")) <= now_ms + USAGE_KEPT * 1000
        admin.hset(key, "due", 0)  # its time came
        counted = asyncio.Event()

        async def held_count(passed: Passed | None) -> int:
            asked.append(700)
            await counted.wait()
            return 700
        assert await one.usage("d", held_count) == Usage(500, 100) == await two.usage("d", held_count)
        assert (await two.reserve("d", "d/w/f", 401, 1000, held_count))[1] is None  # checked against the count it has
        counted.set()
        for _ in range(100):
            if await two.usage("d", count_of(0, asked)) == Usage(700):
                break
            await asyncio.sleep(0.05)
        await one.unreserve(before, committed=True)  # held in the count replaced: this one is left be
        assert await two.usage("d", count_of(0, asked)) == Usage(700)
        assert asked == [500, 700], "counted again once, by one of the callers"


@pytest.mark.integration
async def test_a_wait_survives_the_subscriber_connection_dropping(own_valkey: Callable[..., ValkeyServer]) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url) as waiter, redis_coordinator(server.url) as publisher:
        seen = await waiter.last("d")
        waiting = asyncio.ensure_future(wait_once(waiter, "d", seen, None))
        await asyncio.sleep(0.2)
        admin = redis.Redis.from_url(server.url)
        assert admin.client_kill_filter(_type="pubsub") == 1  # the one subscriber connection of the waiter
        await asyncio.wait_for(waiting, 5)  # woken: it may have missed an event, so it looks again
        waits = [asyncio.ensure_future(wait_once(waiter, drive, seen, None)) for drive in ("d", "e") for _ in range(20)]
        await asyncio.sleep(0.2)
        assert len(admin.client_list(_type="pubsub")) == 1  # reconnected once, for every wait of every drive
        await publisher.publish("d", "put", entry("a"))
        await publisher.publish("e", "put", entry("a"))
        await asyncio.wait_for(asyncio.gather(*waits), 5)


@contextlib.contextmanager
def stopped(server: ValkeyServer) -> Iterator[None]:
    """The server SIGSTOPped for the body: it accepts connections (the kernel does) but answers nothing."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


@pytest.mark.integration
async def test_the_waits_sharing_a_failed_subscriber_connection_each_raise_their_own_unavailable(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator:
        with stopped(server):  # both waits wait for the one connection being made, which is never answered
            failed = await asyncio.wait_for(asyncio.gather(
                wait_once(coordinator, "d", 0, 5), wait_once(coordinator, "e", 0, 5), return_exceptions=True), 15)
        one, other = failed
        assert isinstance(one, Unavailable) and isinstance(other, Unavailable), failed
        assert one is not other  # one object raised by every wait would gather all their tracebacks
        for err in failed:
            message = str(err)
            assert f"redis://127.0.0.1:{server.port}/0" in message and PASSWORD not in message
            assert "the subscriber connection was not made within 5 s" in message, message
        await wait_once(coordinator, "d", -1, 5)  # the server answers again: a wait makes the connection anew


@pytest.mark.integration
async def test_the_waits_sharing_an_unconfirmed_subscribe_each_raise_their_own_unavailable_saying_so(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator:
        await wait_once(coordinator, "d", -1, 5)  # makes the subscriber connection, which outlives the wait
        with stopped(server):
            first = asyncio.ensure_future(wait_once(coordinator, "e", 0, 5))  # sends the SUBSCRIBE
            await asyncio.sleep(1)
            later = [asyncio.ensure_future(wait_once(coordinator, "e", 0, 5)) for _ in range(2)]  # wait for its answer
            failed = await asyncio.wait_for(asyncio.gather(first, *later, return_exceptions=True), 15)
        assert all(isinstance(err, Unavailable) for err in failed), failed
        assert len({id(err) for err in failed}) == 3
        for err in failed:
            message = str(err)
            assert "the SUBSCRIBE of drived:{e} was not confirmed within 5 s" in message, message
            assert f"redis://127.0.0.1:{server.port}/0" in message and PASSWORD not in message


@pytest.mark.integration
async def test_the_confirms_sharing_a_failed_renewal_each_raise_their_own_unavailable(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    async with redis_coordinator(server.url) as coordinator, contextlib.AsyncExitStack() as held:
        claims = [await held.enter_async_context(coordinator.claim("d", f"p{i}")) for i in range(2)]
        server.kill()
        failed = await asyncio.gather(*(claim.confirm() for claim in claims), return_exceptions=True)
        one, other = failed
        assert isinstance(one, Unavailable) and isinstance(other, Unavailable), failed
        assert one is not other
        for err in failed:
            message = str(err)
            assert f"redis://127.0.0.1:{server.port}/0" in message and PASSWORD not in message


def calls(admin: redis.Redis, command: str) -> int:
    """How many times the server ran `command` (INFO commandstats)."""
    return int(admin.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.integration
async def test_changes_subscribe_once_and_ask_the_feed_once_however_many_events_come(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    async with redis_coordinator(server.url) as follower, redis_coordinator(server.url) as publisher:
        await publisher.publish("d", "put", entry("warm"))
        await follower.last("d")  # the scripts are loaded: each later call of them is one EVALSHA
        subscribes, scripts = calls(admin, "subscribe"), calls(admin, "evalsha")
        async with follower.changes("d") as changes:
            seen = await changes.latest()
            for i in range(5):
                waiting = asyncio.ensure_future(changes.wait(seen, None))
                await asyncio.sleep(0.05)
                await publisher.publish("d", "put", entry(f"f{i}"))
                await asyncio.wait_for(waiting, 5)
                seen = await changes.latest()
        assert calls(admin, "subscribe") - subscribes == 1
        assert calls(admin, "evalsha") - scripts == 1 + 5  # the follower's one LAST, and the publishes
        assert [e.entry.path for e in await follower.since("d", seen - 1)] == ["f4"]


@pytest.mark.integration
async def test_a_claim_lost_while_held_is_not_confirmed(own_valkey: Callable[..., ValkeyServer]) -> None:
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    async with redis_coordinator(server.url) as coordinator:
        for lose in ("deleted", "taken"):  # expired (or the coordinator lost its data), or held by another since
            async with coordinator.claim("d", "p") as claim:
                [key] = admin.keys("drived:{d}:claim:p")
                if lose == "deleted":
                    admin.delete(key)
                else:
                    admin.set(key, "another replica's token", px=10_000)
                with pytest.raises(Unavailable) as lost:
                    await claim.confirm()
                message = str(lost.value)
                assert "'p' in lit://d" in message and "--claim-ttl" in message
                assert "nothing more was changed" in message
                assert f"redis://127.0.0.1:{server.port}/0" in message and PASSWORD not in message
            assert admin.get(key) == (None if lose == "deleted" else b"another replica's token"), lose
            admin.delete(key)


class SlowLink:
    """A TCP proxy on loopback to a server, which holds each piece a client sends for `delay` seconds: a
    coordinator far away (or slow), where every call costs at least `delay`, and calls on one connection queue."""

    def __init__(self, target: int, delay: float) -> None:
        self._target = target
        self._delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self._delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                time.sleep(delay)  # the latency this link adds
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@pytest.mark.integration
async def test_many_claims_over_a_slow_link_are_all_kept(own_valkey: Callable[..., ValkeyServer]) -> None:
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    link = SlowLink(server.port, delay=0.05)
    count = 40  # one call after another, renewing them would take 2 s: longer than their TTL
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{link.port}/0"
        async with redis_coordinator(url, claim_ttl=1.5) as holder, contextlib.AsyncExitStack() as held:
            claims = await asyncio.gather(*(held.enter_async_context(holder.claim("d", f"f{i}")) for i in range(count)))
            await asyncio.sleep(3.0)  # twice the TTL: kept only by renewals
            assert len(admin.keys("drived:{d}:claim:*")) == count
            await asyncio.gather(*(claim.confirm() for claim in claims))
    finally:
        link.close()


def renewals_logged(admin: redis.Redis) -> list[tuple[int, int]]:
    """(claims, microseconds on the server) of each RENEW call in the SLOWLOG, oldest first; claims here are at depth
    2 (four keys each)."""
    renew = hashlib.sha1(RENEW.encode()).hexdigest().encode()
    logged = []
    for call in reversed(admin.slowlog_get(-1)):
        words = call["command"].split()  # EVALSHA <sha> <number of keys> ...
        if words[:2] == [b"EVALSHA", renew]:
            logged.append((int(words[2]) // 4, call["duration"]))
    return logged


@pytest.mark.integration
async def test_many_claims_are_renewed_in_bounded_calls_and_every_one_is_extended(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    count = 1200  # as many concurrent deletes of one replica, each holding its claim
    async with redis_coordinator(server.url, claim_ttl=3.0) as holder, contextlib.AsyncExitStack() as held:
        async with holder.claim("d", "warm") as warm:
            await warm.confirm()  # the scripts are loaded: each later call of one is one EVALSHA
        await asyncio.gather(*(held.enter_async_context(holder.claim("d", f"many/{i}")) for i in range(count)))
        keys = admin.keys("drived:{d}:claim:many/*")
        assert len(keys) == count

        def expiries() -> list[int]:
            """When each claim expires, in ms of the server's clock: only a renewal moves it."""
            with admin.pipeline(transaction=False) as ask:
                for key in keys:
                    ask.pexpiretime(key)
                return ask.execute()

        admin.config_set("slowlog-max-len", 100_000)
        admin.config_set("slowlog-log-slower-than", 0)  # every command the server runs from now on
        admin.slowlog_reset()
        taken = expiries()
        deadline = time.monotonic() + 10
        while not all(now > then for now, then in zip(expiries(), taken, strict=True)):
            assert time.monotonic() < deadline, "some claims were never renewed"
            await asyncio.sleep(0.5)
        renewals = renewals_logged(admin)
    assert sum(claims for claims, _ in renewals) >= count
    assert len(renewals) >= -(-count // RENEW_CHUNK)
    assert max(claims for claims, _ in renewals) <= RENEW_CHUNK, renewals  # never one call for all of them


@pytest.mark.integration
async def test_the_confirms_asked_together_are_one_call_and_each_learns_its_own_claim(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    async with redis_coordinator(server.url) as coordinator, contextlib.AsyncExitStack() as held:
        claims = [await held.enter_async_context(coordinator.claim("d", f"p{i}")) for i in range(20)]
        await claims[0].confirm()  # the script is loaded: each later call of it is one EVALSHA
        admin.delete("drived:{d}:claim:p7")  # lapsed, or lost with the coordinator's data
        scripts = calls(admin, "evalsha")
        confirmed = await asyncio.gather(*(claim.confirm() for claim in claims), return_exceptions=True)
        assert calls(admin, "evalsha") == scripts + 1
        assert isinstance(confirmed[7], Unavailable) and "lapsed before its next step" in str(confirmed[7])
        assert confirmed[:7] + confirmed[8:] == [None] * 19
        assert admin.pttl("drived:{d}:claim:p8") > 9_000  # renewed for a whole TTL
        assert not admin.exists("drived:{d}:claim:p7")


@pytest.mark.integration
async def test_the_renewer_leaves_a_claim_confirmed_moments_ago_to_its_next_round(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    loop = asyncio.get_running_loop()
    async with redis_coordinator(server.url, claim_ttl=1.5) as coordinator:  # a round every 0.5 s
        async with coordinator.claim("d", "idle") as idle, coordinator.claim("d", "busy") as busy:
            admin.config_set("slowlog-log-slower-than", 0)  # every command the server runs from now on
            admin.slowlog_reset()
            deadline = loop.time() + 1.6  # three rounds at least
            while loop.time() < deadline:
                await busy.confirm()  # as a folder delete's batches do
                await asyncio.sleep(0.05)
            renewals = [call["command"] for call in admin.slowlog_get(-1) if call["command"].startswith(b"EVALSHA")]
        # The renewer's calls name the idle claim; none of them names the busy one too.
        rounds = [command for command in renewals if b"claim:idle" in command]
        assert len(rounds) >= 2, renewals
        assert not any(b"claim:busy" in command for command in rounds), rounds
        assert idle.renewed > loop.time() - 1.0


async def test_the_in_process_coordinator_has_no_unpublished_changes() -> None:
    """Its claims end only with their daemon, whose feed goes with it."""
    coordinator = InProcessCoordinator()
    with contextlib.suppress(RuntimeError):
        async with coordinator.claim("d", "f") as claim:
            await claim.confirm([Change("put", "f", "c")])
            raise RuntimeError("the body fails after its confirm")
    assert await coordinator.unpublished() == []
    async with coordinator.claim("d", "f"):  # and the claim was released
        pass


@pytest.mark.integration
async def test_the_changes_a_claim_recorded_are_handed_out_once_it_ended_unpublished_and_settled_once(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    ttl = 0.3  # `one`'s: its records are looked at this long after the first; the others' TTLs leave time to spare
    async with redis_coordinator(server.url, claim_ttl=ttl) as one, redis_coordinator(server.url) as holder, \
            redis_coordinator(server.url, claim_ttl=60) as other:
        async with one.claim("d", "published") as claim:  # each change published: nothing left
            await claim.confirm([Change("put", "published", "c")])
            await one.publish("d", "put", entry("published"))
        async with one.claim("d", "folder") as claim:  # a body that ends without raising drops what it recorded
            await claim.confirm([Change("delete", "folder", "c")])
            await claim.confirm([Change("delete", "folder/a", "c"), Change("delete", "folder/b", "c")])
            await claim.confirm()
        for path, kind in (("lost", "put"), ("never", "put"), ("gone", "delete"), ("kept", "delete")):
            with pytest.raises(RuntimeError):  # a body that raises after its confirm leaves its changes
                async with one.claim("d", path) as claim:
                    await claim.confirm([Change(kind, path, "c", "1234abcd" if kind == "put" else "")])
                    raise RuntimeError("the body fails after its confirm")
        async with holder.claim("d", "held") as claim:  # a claim still held keeps its changes to itself
            await claim.confirm([Change("put", "held", "c")])
            await asyncio.sleep(ttl * 1.5)  # past the drive's first look
            found = {unpublished.change.path: unpublished for unpublished in await other.unpublished()}
            assert await one.unpublished() == []  # handed out once a TTL (of the replica that looked)
        assert {path: (u.drive, u.change.kind, u.change.component) for path, u in found.items()} == {
            "lost": ("d", "put", "c"), "never": ("d", "put", "c"), "gone": ("d", "delete", "c"),
            "kept": ("d", "delete", "c")}
        assert (found["lost"].change.version, found["gone"].change.version) == ("1234abcd", "")  # a put's version
        start = await other.last("d")
        await other.settle(found["lost"], entry("lost"))  # a put whose file is stored: published
        await one.settle(found["lost"], entry("lost"))  # settled already: nothing more
        await other.settle(found["never"], None)  # a put whose file is not stored: not made
        await other.settle(found["gone"], None)  # a delete whose file is gone: published
        await other.settle(found["kept"], entry("kept"))  # a delete whose file is stored: not made
        events = await other.since("d", start)
        assert [(event.kind, event.entry.path) for event in events] == [("put", "lost"), ("delete", "gone")]
        assert events[0].entry == entry("lost")
        assert not redis.Redis.from_url(server.url).exists("drived:{d}:unpublished")  # no record left


@pytest.mark.integration
async def test_a_look_for_unpublished_changes_hands_out_a_bounded_number_and_the_rest_later(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    server = own_valkey()
    ttl = 0.3
    paths = [f"folder/f{i:05}" for i in range(UNPUBLISHED_FOUND + 200)]
    async with redis_coordinator(server.url, claim_ttl=ttl) as one:
        with pytest.raises(RuntimeError):
            async with one.claim("d", "folder") as claim:
                await claim.confirm([Change("delete", path, "c") for path in paths])
                raise RuntimeError("the body fails after its confirm")
        await asyncio.sleep(ttl * 1.5)
        first = await one.unpublished()
        assert len(first) == UNPUBLISHED_FOUND
        await asyncio.gather(*(one.settle(unpublished, entry(unpublished.change.path)) for unpublished in first))
        await asyncio.sleep(ttl * 1.5)
        rest = await one.unpublished()
        assert sorted(u.change.path for u in first + rest) == paths
        await asyncio.gather(*(one.settle(unpublished, entry(unpublished.change.path)) for unpublished in rest))
        await asyncio.sleep(ttl * 1.5)
        assert await one.unpublished() == []  # the drive's next look finds nothing, and drops it from the index
        assert not list(redis.Redis.from_url(server.url).scan_iter("drived:*unpublished*"))



@pytest.mark.integration
async def test_the_index_of_unpublished_changes_holds_only_the_drives_with_changes_left(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A drive whose changes were all published (or whose claim's body ended without raising) stayed in the index
    until a look found its hash empty, and a look takes UNPUBLISHED_DRIVES: a replica looks every half claim TTL
    on average, so puts into more than some 20 new drives a second (at the default TTL) grew the index for as long
    as they went on (25 a second on one replica: 533 drives after 40 s), and a change left by a dead replica was
    looked at only once the drives before it were."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    async with redis_coordinator(server.url, claim_ttl=60) as one:  # no look for unpublished changes meanwhile
        for i in range(150):
            async with one.claim(f"published{i}", "f") as claim:
                await claim.confirm([Change("put", "f", "c")])
                await one.publish(f"published{i}", "put", entry("f"))
            async with one.claim(f"ended{i}", "folder") as claim:
                await claim.confirm([Change("delete", "folder/a", "c")])
            async with one.claim(f"dropped{i}", "folder") as claim:  # a later confirm drops what the first recorded
                await claim.confirm([Change("delete", "folder/a", "c")])
                await claim.confirm([])
                assert admin.zcard("drived:unpublished") == 0, "the claim holds no change to publish"
                await claim.confirm([Change("delete", "folder/b", "c")])
    ttl = 0.3
    async with redis_coordinator(server.url, claim_ttl=ttl) as one:
        with pytest.raises(RuntimeError):  # a change left unpublished stays in the index until it is settled
            async with one.claim("left", "f") as claim:
                await claim.confirm([Change("put", "f", "c")])
                raise RuntimeError("the body fails after its confirm")
        assert admin.zrange("drived:unpublished", 0, -1) == [b"drived:{left}:unpublished"]
        await asyncio.sleep(ttl * 1.5)
        [left] = await one.unpublished()
        await one.settle(left, None)  # a put whose file is not stored: not made
    assert not admin.exists("drived:unpublished")


async def leave(coordinator: RedisCoordinator, drive: str, path: str, changes: list[Change]) -> None:
    """Records `changes` in a claim of `path` whose body then fails: they are left unpublished, as by a replica that
    died before its publish."""
    with pytest.raises(RuntimeError):
        async with coordinator.claim(drive, path) as claim:
            await claim.confirm(changes)
            raise RuntimeError("the body fails after its confirm")


async def unsettled(coordinator: RedisCoordinator, drive: str, path: str) -> Sequence[Unpublished]:
    """The changes left unpublished at, above or below `path` that a take of its claim finds (`Claim.unsettled`)."""
    async with coordinator.claim(drive, path) as claim:
        return claim.unsettled


@pytest.mark.integration
async def test_a_claims_take_beside_many_changes_being_made_in_its_drive_does_not_read_them(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """Each take read the drive's whole hash of changes being made (HVALS) for one left at, above or below its path:
    ~2.4 µs a record, during which the server serves nothing else, once per put and delete (24 ms beside 10,000).
    Now it reads the records at, above and below its path alone (docs/scaling.md has the times)."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    async with redis_coordinator(server.url, claim_ttl=60) as one:
        await leave(one, "d", "folder", [Change("delete", f"folder/f{i:05}", "c") for i in range(10_000)])
        read = calls(admin, "hvals") + calls(admin, "hgetall") + calls(admin, "hscan")
        for i in range(21):
            async with one.claim("d", f"after/{i}") as claim:
                assert not claim.unsettled
        assert calls(admin, "hvals") + calls(admin, "hgetall") + calls(admin, "hscan") == read
        async with one.claim("d", "folder/f00042") as claim:  # changes left above it: still found
            assert claim.unsettled


@pytest.mark.integration
async def test_a_take_that_finds_changes_left_at_its_path_answers_them_in_its_one_script_call(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A take that found changes a dead holder left at, above or below its path answered -1, and the changes were
    then read in a second script call (UNSETTLED) over the same ranges of the index: now the take answers them, and
    `Claim.unsettled` holds them."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    async with redis_coordinator(server.url, claim_ttl=60) as one:
        for drive in ("first", "d"):  # the first loads the scripts (NOSCRIPT, then SCRIPT LOAD): counted, the second
            await leave(one, drive, "a", [Change("put", "a/b", "c", "1234abcd"), Change("delete", "a/c", "c")])
            scripts = calls(admin, "evalsha")
            async with one.claim(drive, "a/b") as claim:
                asked = calls(admin, "evalsha") - scripts
                found = claim.unsettled
        assert asked == 1  # the take; was 2
        assert sorted((u.change.kind, u.change.path, u.change.version) for u in found) == [
            ("delete", "a/c", ""), ("put", "a/b", "1234abcd")]


@pytest.mark.integration
async def test_a_take_finds_the_changes_left_at_above_or_below_its_path_and_only_those(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """Each as the claim that recorded it last claimed it: a change recorded again by a claim of another path (the
    delete of a folder's file, then a put of that file) is found by the takes touching the new claim's path only."""
    server = own_valkey()
    async with redis_coordinator(server.url, claim_ttl=60) as one:
        await leave(one, "d", "a/b", [Change("put", "a/b", "c", "1234abcd")])
        await leave(one, "d", "x", [Change("delete", "x/1", "c"), Change("delete", "x/2", "c")])
        await leave(one, "d", "m", [Change("delete", "m/n", "c")])
        await leave(one, "d", "m/n", [Change("put", "m/n", "c", "5678abcd")])  # the same change's record, again
        await leave(one, "e", "y", [Change("delete", "y", "c")])  # another drive's
        expected = {"a": ["a/b"], "a/b": ["a/b"], "a/b/c": ["a/b"], "x": ["x/1", "x/2"], "x/1": ["x/1", "x/2"],
                    "m/n": ["m/n"], "m": ["m/n"], "a/bc": [], "a/b0": [], "a.b": [], "ab": [], "x0": [],
                    "m/o": [], "y": [], "b": []}
        for path, paths in expected.items():
            async with one.claim("d", path) as claim:
                assert sorted(u.change.path for u in claim.unsettled) == paths, path
        [put] = await unsettled(one, "d", "m")
        assert (put.change.kind, put.change.version) == ("put", "5678abcd")
        for unpublished in [*await unsettled(one, "d", "a"), *await unsettled(one, "d", "x"), put]:
            await one.settle(unpublished, None)
        [left] = await unsettled(one, "e", "y")
        await one.settle(left, entry("y"))  # a delete whose file is stored: not made
        assert not list(redis.Redis.from_url(server.url).scan_iter("drived:*unpublished*"))  # nor their index


@pytest.mark.integration
async def test_a_change_recorded_by_a_daemon_of_the_previous_release_is_still_handed_out_and_settled(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A rolling update: that release records a change in the drive's hash alone, as RENEW did then (no index by
    path), and drops one from the hash alone. The takes of its path do not see the one it records; the replicas' look
    for unpublished changes does, which reads the hash itself. What is left in the index of the one it drops goes at
    the next take of its path."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    admin.hset("drived:{d}:unpublished", "c\x00old", "0123456789abcdefpold\x001234abcd")  # a claim long gone
    admin.zadd("drived:unpublished", {"drived:{d}:unpublished": 0})  # looked at from now on
    async with redis_coordinator(server.url) as one:
        await leave(one, "d", "new", [Change("put", "new", "c")])  # beside it in the hash, recorded by this release
        found = {u.change.path: u for u in await one.unpublished()}
        assert {path: (u.change.kind, u.change.version) for path, u in found.items()} == {
            "old": ("put", "1234abcd"), "new": ("put", "")}
        await one.settle(found["old"], entry("old"))
        await one.settle(found["new"], None)
        await leave(one, "d", "again", [Change("put", "again", "c")])
        admin.hdel("drived:{d}:unpublished", "c\x00again")  # settled by a daemon of that release, as its FORGET does
        admin.zrem("drived:unpublished", "drived:{d}:unpublished")
        async with one.claim("d", "again") as claim:  # which drops the member of the change dropped
            assert not claim.unsettled
        await leave(one, "d", "late", [Change("put", "late", "c")])
        admin.hdel("drived:{d}:unpublished", "c\x00late")  # the hash's last field, settled by a daemon of that release
        admin.zrem("drived:unpublished", "drived:{d}:unpublished")
        assert admin.exists("drived:{d}:unpublished:claimed")  # which no look for unpublished changes visits again
        async with one.claim("d", "elsewhere") as claim:  # the drive's next take drops it
            assert not claim.unsettled
    assert not list(admin.scan_iter("drived:*unpublished*"))


# Paths whose characters sort below '/' ('.', '-', ' ', '!', '0' beside 'a/...'), unicode, and folders of each other.
INDEXED_PATHS = ["a", "a/b", "a/b/c", "a.b", "a-b", "a b", "a!", "é", "é/ü", "a/b.c", "ab", "a0", "a/b c", "x/y/z"]
CHANGES = st.lists(st.tuples(st.sampled_from(["put", "delete"]), st.sampled_from(INDEXED_PATHS),
                             st.sampled_from(["c", "d"])), max_size=6)
STEPS = st.one_of(  # (what, the path claimed, its changes or which change to settle, a second confirm or a settle's)
    st.tuples(st.sampled_from(["left", "released"]), st.sampled_from(INDEXED_PATHS), CHANGES, st.booleans()),
    st.tuples(st.just("settled"), st.sampled_from(INDEXED_PATHS), st.integers(0, 5), st.booleans()),
)


@pytest.mark.integration
def test_the_index_by_path_and_the_changes_being_made_agree_after_every_script(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """Random claims that record changes and end (left by a holder that died, or released), records made again by a
    second confirm, and settles: after each, the index holds a member for each record and no other, and `unsettled`
    of every path finds what a scan of the whole hash finds with the rule the take had before the index (claimed at
    the path, or one a folder of the other)."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    drives = iter(range(1 << 20))

    async def steps(drive: str, taken: list[tuple[str, str, object, bool]]) -> None:
        async with redis_coordinator(server.url, claim_ttl=30) as one:
            for what, path, arg, flag in taken:
                if what == "settled":
                    if found := await unsettled(one, drive, path):
                        left = found[int(arg) % len(found)]  # type: ignore[call-overload]
                        await one.settle(left, Entry(path=left.change.path, component=left.change.component)
                                         if flag else None)
                else:
                    changes = [Change(kind, p, c, "v1") if kind == "put" else Change(kind, p, c, request="r")
                               for kind, p, c in arg if p == path or p.startswith(path + "/")]  # type: ignore[attr-defined]
                    with contextlib.suppress(RuntimeError):
                        async with one.claim(drive, path) as claim:
                            await claim.confirm(changes)
                            if flag:
                                await claim.confirm(changes[1:])  # one dropped, the others recorded again
                            if what == "left":
                                raise RuntimeError("its holder dies")
                records = admin.hgetall(f"drived:{{{drive}}}:unpublished")
                claimed = {field: value[17:].split(b"\0")[0].decode() for field, value in records.items()}
                assert set(admin.zrange(f"drived:{{{drive}}}:unpublished:claimed", 0, -1)) == {
                    path.encode() + b"\0" + field for field, path in claimed.items()}
                for looked in INDEXED_PATHS:
                    scanned = sorted(field.decode().split("\0")[::-1] for field, path in claimed.items()
                                     if path == looked or path.startswith(looked + "/")
                                     or looked.startswith(path + "/"))
                    found = await unsettled(one, drive, looked)
                    assert sorted([u.change.path, u.change.component] for u in found) == scanned, looked

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(STEPS, min_size=4, max_size=12))
    def agree(taken: list[tuple[str, str, object, bool]]) -> None:
        asyncio.run(steps(f"p{next(drives)}", taken))

    agree()


@pytest.mark.integration
async def test_a_publish_late_past_its_claims_ttl_leaves_the_record_of_the_claim_that_took_the_path_since(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    """A holder whose claim lapsed before its publish (the coordinator too slow) dropped the record of the change
    by whichever claim held the path then: when that holder died before its own publish, its change was lost."""
    server = own_valkey()
    admin = redis.Redis.from_url(server.url)
    ttl = 0.3
    async with redis_coordinator(server.url, claim_ttl=ttl) as late, \
            redis_coordinator(server.url, claim_ttl=ttl) as taker:
        async with late.claim("d", "x") as lapsed:
            await lapsed.confirm([Change("put", "x", "c")])
            admin.delete(*admin.keys("drived:*:claim:x"))  # lapsed: the path is free for another claim
            with pytest.raises(RuntimeError):
                async with taker.claim("d", "x") as taken:
                    await taken.confirm([Change("put", "x", "c")])
                    await late.publish("d", "put", entry("x"), lapsed)  # the late publish of the first change
                    raise RuntimeError("the taker dies after its change, before its publish")
        await asyncio.sleep(ttl * 1.5)
        [left] = await taker.unpublished()
        assert (left.change.kind, left.change.path) == ("put", "x")
        assert left.mark.startswith(taken.token)  # the taker's record


@pytest.mark.integration
async def test_a_coordinator_in_another_database_of_the_server_wakes_no_waiter(
    own_valkey: Callable[..., ValkeyServer],
) -> None:
    # Two deployments sharing one server through its databases: pub/sub is the server's, not a database's, and a
    # sequence learnt from the other's message was one this feed never had (a watch asked for it without end).
    server = own_valkey()
    other_url = server.url.replace("/0", "/1")
    async with (redis_coordinator(server.url) as other, redis_coordinator(other_url) as follower,
                redis_coordinator(other_url) as publisher, follower.changes("d") as changes,
                follower.changes("marker") as marker):
        seen, marked = await changes.latest(), await marker.latest()
        waiting = asyncio.ensure_future(changes.wait(seen, None))
        await other.publish("d", "put", entry("theirs"))
        await publisher.publish("marker", "put", entry("mine"))  # its message comes after any of the other's
        await asyncio.wait_for(marker.wait(marked, None), 5)
        assert not waiting.done() and await changes.latest() == seen
        await publisher.publish("d", "put", entry("mine"))
        await asyncio.wait_for(waiting, 5)
        assert [e.entry.path for e in await follower.since("d", seen)] == ["mine"]


@pytest.mark.integration
async def test_deleted_by_looks_over_a_whole_feed_of_many_pages_and_entries_of_the_earlier_version(
    valkey: ValkeyServer,
) -> None:
    """The look goes a page at a time from the newest: a request's events deep in a long feed are all found. An entry
    written by a daemon of the earlier version (no field r, during a rolling update) is read as one of no request."""
    admin = redis.Redis.from_url(valkey.url)
    admin.flushall()
    async with redis_coordinator(valkey.url, events_kept=3 * PAGE) as coordinator:
        first = await coordinator.publish("d", "put", entry("first"))
        [feed] = admin.keys("drived:*:feed")
        earlier = {"k": "delete", "p": "set/old", "c": "c", "s": 0, "h": b"", "g": 0, "m": 0}
        admin.xadd(feed, earlier, id=f"{first + 1}-0")
        for path in ("set/a", "set/b"):
            await coordinator.publish("d", "delete", Entry(path=path, component="c"), request="r1")
        for start in range(0, 2 * PAGE + 10, 100):
            await asyncio.gather(*(coordinator.publish("d", "put", entry(f"f{i}")) for i in range(start, start + 100)))
        assert await coordinator.deleted_by("d", "r1", "c", "set") == 2
        old = (await coordinator.since("d", first))[0]
        assert (old.kind, old.entry.path, old.request) == ("delete", "set/old", "")
