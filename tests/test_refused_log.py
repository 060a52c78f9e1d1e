"""A flood of refused calls writes a bounded log: each host's refusals of one status are logged one a call up to
LOGGED_PER_SECOND a second, and one line a second counts those left out; the metrics count every call."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
from typing import Any

import grpc
from conftest import DaemonHandle, put_messages, rpc_code, snapshot, wait_until
from test_metrics import scrape

from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc as pb_grpc
from drived import refusals
from drived.refusals import COUNTED, LOGGED_PER_SECOND, OTHER_HOSTS, RefusalLog

TOKEN = "the-right-token"
FLOOD = 2000
LINE_BYTES = 400  # more than any request line or summary line of these calls takes


def logged(handle: DaemonHandle) -> list[dict[str, Any]]:
    return [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]


def counted(handle: DaemonHandle, method: str, code: str) -> float:
    return scrape(handle.metrics).get(f'drived_requests_total{{code="{code}",method="{method}"}}', 0.0)


def flood(handle: DaemonHandle, status: str, call: Any, calls: int) -> None:
    """Makes `calls` calls that are refused with `status`, and checks that the log grew by a bounded number of
    bytes, whose request lines and summary lines together count every call, as the metrics do."""
    bytes_before, lines_before = len(handle.log().encode()), len(logged(handle))
    started = time.monotonic()
    for _ in range(calls):
        assert rpc_code(call).name == status
    seconds = time.monotonic() - started

    def refusals() -> tuple[int, int]:
        lines = logged(handle)[lines_before:]
        requests = sum(line["event"] == "request" and line["status"] == status for line in lines)
        left_out = sum(line["calls"] for line in lines
                       if line["event"] == "refused calls not logged" and line["status"] == status)
        return requests, left_out

    assert wait_until(lambda: sum(refusals()) == calls, 10), refusals()
    requests, left_out = refusals()
    windows = int(seconds) + 2  # the seconds in which refusals were counted apart
    assert requests <= windows * LOGGED_PER_SECOND and left_out >= calls - windows * LOGGED_PER_SECOND
    grown = len(handle.log().encode()) - bytes_before
    assert grown <= windows * (LOGGED_PER_SECOND + 1) * LINE_BYTES, (grown, seconds)
    summaries = [line for line in logged(handle)[lines_before:] if line["event"] == "refused calls not logged"]
    assert summaries and all(line["peer"] == "ipv4:127.0.0.1" and line["seconds"] == 1 for line in summaries)


def test_a_flood_of_wrong_tokens_writes_a_bounded_log_and_other_calls_are_logged_each(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--token", TOKEN)
    right, wrong = [("authorization", f"Bearer {TOKEN}")], [("authorization", "Bearer not-the-token")]
    drive = "lit://flooded"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = pb_grpc.DriveServiceStub(channel)
        stub.Put(put_messages(drive, "a.txt", b"kept"), metadata=right, timeout=30)
        stored = snapshot(handle.data_dir / "objects")
        flood(handle, "UNAUTHENTICATED", lambda: stub.Stat(pb.StatRequest(drive=drive, path="a.txt"),
                                                           metadata=wrong, timeout=10), FLOOD)
        flood(handle, "UNAUTHENTICATED", lambda: stub.Delete(pb.DeleteRequest(drive=drive, path="a.txt"),
                                                             timeout=10), 50)  # no token at all
        assert counted(handle, "Stat", "UNAUTHENTICATED") == FLOOD
        assert counted(handle, "Delete", "UNAUTHENTICATED") == 50
        assert snapshot(handle.data_dir / "objects") == stored

        # Calls that are not refused, ordinary errors included, are still logged one a call, as before.
        lines_before = len(logged(handle))
        for _ in range(3 * LOGGED_PER_SECOND):
            stub.Stat(pb.StatRequest(drive=drive, path="a.txt"), metadata=right, timeout=10)
            assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive, path="missing.txt"), metadata=right,
                                              timeout=10)) == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: len(logged(handle)) - lines_before == 6 * LOGGED_PER_SECOND)
    lines = logged(handle)[lines_before:]
    assert [(line["method"], line["path"], line["status"], line["token"]) for line in lines] == [
        ("Stat", "a.txt", "OK", "--token"), ("Stat", "missing.txt", "NOT_FOUND", "--token")] * 3 * LOGGED_PER_SECOND
    assert all(line["event"] == "request" and line["drive"] == drive for line in lines)


def test_a_flood_of_calls_refused_for_too_many_streams_writes_a_bounded_log(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--max-streams-per-peer", "1")
    drive = "lit://crowded"
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = pb_grpc.DriveServiceStub(channel)
        watch = stub.Watch(pb.WatchRequest(drive=drive))
        try:
            assert next(watch).kind == pb.WatchEvent.KIND_WATCHING
            flood(handle, "RESOURCE_EXHAUSTED", lambda: next(stub.Get(pb.GetRequest(drive=drive, path="a.txt"),
                                                                      timeout=10)), FLOOD // 2)
        finally:
            watch.cancel()
    assert counted(handle, "Get", "RESOURCE_EXHAUSTED") == FLOOD // 2
    assert not (handle.data_dir / "objects" / "crowded").exists()


def test_the_log_of_a_flood_that_stops_counts_every_call_at_the_stop(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--token", TOKEN)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = pb_grpc.DriveServiceStub(channel)
        for _ in range(3 * LOGGED_PER_SECOND):
            assert rpc_code(lambda: stub.List(pb.ListRequest(drive="lit://x"), timeout=10)).name == "UNAUTHENTICATED"
    assert handle.stop() == 0
    lines = logged(handle)
    requests = sum(line["event"] == "request" and line["status"] == "UNAUTHENTICATED" for line in lines)
    left_out = sum(line["calls"] for line in lines if line["event"] == "refused calls not logged")
    assert requests + left_out == 3 * LOGGED_PER_SECOND


def test_refusals_are_counted_apart_for_a_bounded_number_of_hosts_and_forgotten_after_their_second(
        monkeypatch, caplog):
    """What is counted stays bounded whatever hosts call: past COUNTED (host, status) pairs a new host's refusals
    are counted as OTHER_HOSTS's, and a pair is forgotten once its second is over."""
    monkeypatch.setattr(refusals, "COUNTED", 2)
    caplog.set_level(logging.INFO, "drived")

    def summaries() -> dict[str, int]:
        return {record.fields["peer"]: record.fields["calls"]  # type: ignore[attr-defined]
                for record in caplog.records if record.getMessage() == "refused calls not logged"}

    async def refused() -> None:
        log = RefusalLog()
        written = [log.logs(host, "UNAUTHENTICATED") for host in "abcd" for _ in range(LOGGED_PER_SECOND + 3)]
        assert written.count(True) == 3 * LOGGED_PER_SECOND  # a, b, and the other hosts c and d together
        assert log.logs("a", "NOT_FOUND")  # no refusal: logged, and not counted
        while len(summaries()) < 3:
            await asyncio.sleep(0.05)
        assert summaries() == {"a": 3, "b": 3, OTHER_HOSTS: 2 * (LOGGED_PER_SECOND + 3) - LOGGED_PER_SECOND}
        assert all(log.logs("c", "UNAUTHENTICATED") for _ in range(LOGGED_PER_SECOND))  # c is counted apart now
        log.close()

    asyncio.run(refused())


def test_the_readme_gives_the_bounds():
    readme = " ".join((pathlib.Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"up to {LOGGED_PER_SECOND} a second from one host with one status" in readme
    assert f"past {COUNTED:,} pairs of host and status counted at once" in readme
    assert f'"peer": "{OTHER_HOSTS}"' in readme
