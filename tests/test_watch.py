"""Watch: put/delete events as they commit, filtered, resumable, and refused where it must be."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import MIB, current_sequence, free_port, put_messages, raw_get, raw_put, start_daemon, wait_until
from cutting_proxy import CuttingProxy

from drive_client import Drive, DriveError, EventsExpired
from drive_client.pb import drive_pb2, drive_pb2_grpc
from drive_client.uri import DEFAULT_COMPONENT
from drived.config import answer_entry_bytes

pytestmark = pytest.mark.integration  # starts daemons of its own


def collect(stub, drive_uri: str, count: int, **request) -> tuple[list, threading.Thread, threading.Event]:
    """Starts a thread gathering `count` events of a raw Watch(**request); `ready` is set once it is watching."""
    events: list = []
    ready = threading.Event()

    def run() -> None:
        stream = stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, **request))
        for message in stream:
            if message.kind == drive_pb2.WatchEvent.KIND_WATCHING:
                if not ready.is_set():  # a later one says how far the watch read, past events it does not report
                    events.append(("watching", message.sequence))
                    ready.set()
                continue
            events.append((drive_pb2.WatchEvent.Kind.Name(message.kind), message.file.path, message.file.component,
                           message.sequence))
            if len(events) == count + 1:
                stream.cancel()
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "the watch did not start"
    return events, thread, ready


@pytest.mark.timeout(60)
def test_watch_reports_puts_and_deletes_in_order(daemon, stub, drive_uri, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "a.pt").write_bytes(b"a")
    (tmp_path / "ck" / "b.pt").write_bytes(b"b")
    (tmp_path / "other.txt").write_bytes(b"o")
    writer = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=daemon.endpoint)
    events, thread, _ = collect(stub, drive_uri, 4, path="ck")
    writer.put("other.txt")  # outside the watched folder: not reported
    writer.put("ck")
    writer.delete("ck")
    thread.join(20)
    # A folder's files commit concurrently: the puts come in commit order, whichever file finished first.
    assert sorted(e[:3] for e in events[1:3]) == [("KIND_PUT", "ck/a.pt", "w"), ("KIND_PUT", "ck/b.pt", "w")]
    assert [e[:3] for e in events[3:]] == [("KIND_DELETE", "ck/a.pt", "w"), ("KIND_DELETE", "ck/b.pt", "w")]
    sequences = [events[0][1]] + [e[3] for e in events[1:]]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


@pytest.mark.timeout(60)
def test_watch_resumes_after_a_sequence_and_filters_by_component(twin, daemon, stub, drive_uri, tmp_path):
    (tmp_path / "x.txt").write_bytes(b"x")
    a = twin(drive_uri, component_name="a", root_folder=tmp_path, endpoint=daemon.endpoint)
    b = twin(drive_uri, component_name="b", root_folder=tmp_path, endpoint=daemon.endpoint, allow_duplicates=True)
    reader = twin(drive_uri, endpoint=daemon.endpoint)
    start = current_sequence(daemon.endpoint, drive_uri)
    a.put("x.txt")
    b.put("x.txt")
    a.delete("x.txt")
    # Resuming after the sequence the first watch started at replays what happened since.
    watching = reader.watch(after_sequence=start)
    replayed = [next(watching) for _ in range(3)]
    watching.close()
    assert [(e.kind, e.file.path, e.file.component) for e in replayed] == [
        ("put", "x.txt", "a"), ("put", "x.txt", "b"), ("delete", "x.txt", "a"),
    ]
    assert start < replayed[0].sequence < replayed[1].sequence < replayed[2].sequence
    only_a = reader.watch(component_name="a", after_sequence=start)
    assert [(e.kind, e.file.component) for e in (next(only_a), next(only_a))] == [("put", "a"), ("delete", "a")]
    only_a.close()
    events, thread, _ = collect(stub, drive_uri, 2, component="a", after_sequence=start)
    thread.join(20)
    assert [e[:3] for e in events[1:]] == [("KIND_PUT", "x.txt", "a"), ("KIND_DELETE", "x.txt", "a")]


def test_watch_from_a_forgotten_sequence_is_out_of_range(twin, daemon, stub, drive_uri):
    stream = stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=5))
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "list the drive" in info.value.details()
    with pytest.raises(EventsExpired) as expired:
        next(twin(drive_uri, endpoint=daemon.endpoint).watch(after_sequence=5))
    assert expired.value.code == grpc.StatusCode.OUT_OF_RANGE and "list the drive" in str(expired.value)


@pytest.mark.timeout(60)
def test_watch_after_a_sequence_not_given_yet_is_out_of_range(daemon, drive_uri, tmp_path):
    """A resume point past the drive's last event was accepted and then delivered nothing, for ever."""
    reader = Drive(drive_uri, endpoint=daemon.endpoint)
    opening = reader._stub.Watch(drive_pb2.WatchRequest(drive=drive_uri))
    last = next(opening).sequence
    opening.cancel()
    for after in (last + 1, last + 10**12, 2**63 - 1):
        stream = reader._stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=after), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, info.value.details()
        assert str(after) in info.value.details() and str(last) in info.value.details()
    (tmp_path / "f.txt").write_bytes(b"f")
    Drive(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put("f.txt")
    put = next(iter(reader.watch(after_sequence=last)))
    assert (put.kind, put.file.path) == ("put", "f.txt") and put.sequence > last
    resumed = reader._stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=put.sequence), timeout=10)
    assert next(resumed).sequence == put.sequence, "the drive's last event is a valid resume point"
    resumed.cancel()


def test_watch_after_a_negative_sequence_is_invalid(daemon, drive_uri):
    """A negative resume point is no sequence at all: INVALID_ARGUMENT, not the OUT_OF_RANGE that tells a client
    its events were lost."""
    reader = Drive(drive_uri, endpoint=daemon.endpoint)
    for after in (-1, -(2**63)):
        stream = reader._stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, after_sequence=after), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "negative" in info.value.details()
    with pytest.raises(ValueError, match="negative"):
        next(iter(reader.watch(after_sequence=-1)))


@pytest.mark.parametrize("drive", ["s3://bucket/prefix/", "lit://bad/name"])
def test_watch_refuses_s3_and_bad_drives(stub, drive):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Watch(drive_pb2.WatchRequest(drive=drive)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(90)
def test_watch_reconnects_to_a_restarted_daemon_and_reports_lost_events(twin, tmp_path):
    """A watch survives a daemon restart on the same port: it reconnects, then says events were lost."""
    port = free_port()
    first = start_daemon(tmp_path, port=port, data_dir=tmp_path / "data")
    drive = twin("lit://restart", endpoint=first.endpoint, root_folder=tmp_path)
    (tmp_path / "f.txt").write_bytes(b"f")
    outcome: list = []
    started = threading.Event()
    after = current_sequence(first.endpoint, "lit://restart")  # the watch replays from here, however late it opens

    def watch() -> None:
        try:
            for event in drive.watch(after_sequence=after):
                outcome.append(event)
                started.set()
        except DriveError as err:
            outcome.append(err)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    drive.put("f.txt")
    assert started.wait(10)
    assert first.stop() == 0
    second = start_daemon(tmp_path, port=port, data_dir=tmp_path / "data")
    try:
        thread.join(30)
        assert outcome[0].kind == "put" and outcome[0].file.path == "f.txt"
        assert isinstance(outcome[-1], EventsExpired) and outcome[-1].code == grpc.StatusCode.OUT_OF_RANGE
    finally:
        second.stop()


@pytest.mark.timeout(60)
def test_a_watch_of_a_quiet_drive_outlives_new_drives_pushing_out_the_states_kept(tmp_path):
    """A lone daemon keeps the state of 10,000 drives (three here): each drive named beyond them forgot the one used
    least recently, even while a watch followed it, and the watch, woken to look again, was refused OUT_OF_RANGE
    once a drive with a newer event had been forgotten before it, although it had missed nothing: any client naming
    new drives (a watch of each) ended the watches of quiet drives."""
    few = "import drived.events as e\ne.EventLog.__init__.__defaults__ = (*e.EventLog.__init__.__defaults__[:-1], 3)"
    handle = start_daemon(tmp_path, before=few)
    try:
        stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
        raw_put(stub, "lit://quiet", "a.txt", b"a")
        raw_put(stub, "lit://other", "b.txt", b"b")  # a newer event, in a drive nobody follows
        watching = stub.Watch(drive_pb2.WatchRequest(drive="lit://quiet"), timeout=30)
        assert next(watching).kind == drive_pb2.WatchEvent.KIND_WATCHING
        seen: list = []

        def watch() -> None:
            try:
                event = next(watching)
                seen.append((drive_pb2.WatchEvent.Kind.Name(event.kind), event.file.path))
            except grpc.RpcError as err:
                seen.append(err.code())

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        for i in range(4):  # new drives push "other", then "quiet", out of the three kept
            probe = stub.Watch(drive_pb2.WatchRequest(drive=f"lit://probe{i}"), timeout=10)
            assert next(probe).kind == drive_pb2.WatchEvent.KIND_WATCHING
            probe.cancel()
        raw_put(stub, "lit://quiet", "c.txt", b"c")
        thread.join(10)
        watching.cancel()
        assert seen == [("KIND_PUT", "c.txt")]
        assert [raw_get(stub, "lit://quiet", p)[0][1] for p in ("a.txt", "c.txt")] == [b"a", b"c"]
    finally:
        handle.stop()


@pytest.mark.timeout(60)
def test_events_of_long_paths_stay_within_their_bound_in_bytes(tmp_path):
    """A lone daemon's events are bounded in the bytes of their paths as well as in number: five puts of long paths,
    with the bound lowered to three of them in the daemon's process, leave the first two dropped (a resume before
    them is refused, never answered short) and the last three delivered; all five files stay stored. Bounded by
    number alone, 100,000 events of 4 KB paths held some 450 MiB."""
    folder = "/".join(["n" * 200] * 15)  # some 3,000 bytes: an event of a path below it takes ~3.5 KiB of memory
    paths = [f"{folder}/f{i}.txt" for i in range(5)]
    bound = 3 * answer_entry_bytes(paths[0], DEFAULT_COMPONENT)
    handle = start_daemon(tmp_path, before=f"import drived.events\ndrived.events.EVENTS_KEPT_BYTES = {bound}")
    try:
        drive = "lit://events_long"
        stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
        start = current_sequence(handle.endpoint, drive)
        sequences = []
        for path in paths:
            raw_put(stub, drive, path, path.encode()[-40:])
            sequences.append(current_sequence(handle.endpoint, drive))
        reader = Drive(drive, endpoint=handle.endpoint)
        for after in (start, sequences[0]):
            with pytest.raises(EventsExpired) as expired:
                next(reader.watch(after_sequence=after))
            assert expired.value.code == grpc.StatusCode.OUT_OF_RANGE and "list the drive" in str(expired.value)
        watching = reader.watch(after_sequence=sequences[1])
        assert [(e.kind, e.file.path, e.sequence) for e in (next(watching) for _ in range(3))] == [
            ("put", path, sequence) for path, sequence in zip(paths[2:], sequences[2:], strict=True)]
        watching.close()
        for path in paths:
            assert raw_get(stub, drive, path)[0][1] == path.encode()[-40:]
    finally:
        handle.stop()


# Python for `start_daemon(before=...)`: while the file PAUSE exists, the local backend's rename of a big put into
# place and its delete of a file wait in their worker threads (a slow disk), once they touch PAUSE.reached.
PAUSED_CHANGES = """
import os, time
from drived.backends.local import LocalBackend, LocalUpload

def paused(change):
    def once_resumed(self, *args):
        open({pause!r} + ".reached", "w").close()
        while os.path.exists({pause!r}):
            time.sleep(0.01)
        return change(self, *args)
    return once_resumed

LocalUpload._place_big = paused(LocalUpload._place_big)
LocalBackend._delete = paused(LocalBackend._delete)
"""


def cancelled_in_its_change(handle, pause: Path, call, then=lambda: None) -> None:
    """Starts `call` (a grpc future) with the daemon's changes paused, cancels it once its change began (the
    change's thread runs on), runs `then`, and lets the change end; returns once the daemon ended the call."""
    reached = Path(f"{pause}.reached")
    reached.unlink(missing_ok=True)
    pause.touch()
    cancels = handle.log().count('"status": "CANCELLED"')

    def ended() -> bool:
        return handle.log().count('"status": "CANCELLED"') > cancels

    try:
        future = call()
        assert wait_until(reached.exists, timeout=30), "the change never began"
        future.cancel()
        wait_until(ended, timeout=2)  # a daemon that gives the call up at once logs it now, else once it ended
        then()
    finally:
        pause.unlink()
    assert wait_until(ended, timeout=30), "the daemon never ended the cancelled call"


@pytest.mark.timeout(60)
def test_a_put_or_delete_whose_client_goes_away_midway_is_reported_and_keeps_its_claim_to_the_end(
    tmp_path, drive_uri
):
    """Cancelled while the store made its change, a put (without upload_id) or a delete left the change made and
    never reported it to any watch; the delete gave up its claim first, so a put of the path meanwhile committed and
    was then deleted by it, although that put had succeeded."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=PAUSED_CHANGES.format(pause=str(pause)))
    try:
        stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
        raw_put(stub, drive_uri, "f.txt", b"version 1", component="a")
        events, thread, _ = collect(stub, drive_uri, 3)
        data = os.urandom(2 * MIB)
        cancelled_in_its_change(
            handle, pause, lambda: stub.Put.future(put_messages(drive_uri, "big.bin", data, component="a"), timeout=60))
        again: list[grpc.Future] = []

        def put_again() -> None:
            again.append(stub.Put.future(put_messages(drive_uri, "f.txt", b"version 2", component="a"), timeout=60))
            wait_until(again[0].done, timeout=2)  # at once when the delete gave its claim up

        delete = drive_pb2.DeleteRequest(drive=drive_uri, path="f.txt", component="a")
        cancelled_in_its_change(handle, pause, lambda: stub.Delete.future(delete, timeout=60), then=put_again)
        again[0].result(30)
        thread.join(20)
        assert [e[:3] for e in events[1:]] == [
            ("KIND_PUT", "big.bin", "a"), ("KIND_DELETE", "f.txt", "a"), ("KIND_PUT", "f.txt", "a"),
        ]
        assert raw_get(stub, drive_uri, "big.bin")[0][1] == data
        assert raw_get(stub, drive_uri, "f.txt")[0][1] == b"version 2"
    finally:
        handle.stop()


@pytest.mark.timeout(60)
def test_a_filtered_watch_cut_after_more_events_than_kept_that_it_did_not_report_goes_on(tmp_path):
    """A watch of one folder on a drive busy elsewhere only learnt sequences from the events it reported: cut after
    more other events than the daemon keeps (its bound lowered to 10 in the daemon's process), it resumed after its
    last report, long dropped, and ended with EventsExpired, which tells a caller that events were lost, though it
    had missed none. The daemon now tells a watch the sequence it has read to, past events it does not report, and
    the resumed watch reports the folder's next put."""
    others = [f"other/f{i:02}.txt" for i in range(30)]
    bound = 10 * answer_entry_bytes(others[0], DEFAULT_COMPONENT)
    handle = start_daemon(tmp_path, before=f"import drived.events\ndrived.events.EVENTS_KEPT_BYTES = {bound}")
    try:
        drive = "lit://filtered_busy"
        stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
        start = current_sequence(handle.endpoint, drive)
        raw_put(stub, drive, "ckpt/a.txt", b"a")
        with CuttingProxy(handle.endpoint) as proxy:
            reported: queue.Queue[object] = queue.Queue()  # what the watch reports, read as it comes

            def watch() -> None:
                try:
                    for event in Drive(drive, endpoint=proxy.endpoint).watch("ckpt", after_sequence=start):
                        reported.put((event.kind, event.file.path))
                except DriveError as err:
                    reported.put(err)

            threading.Thread(target=watch, daemon=True).start()
            assert reported.get(timeout=10) == ("put", "ckpt/a.txt")
            for path in others:
                raw_put(stub, drive, path, b"other")
            time.sleep(1)  # the watch reads the other events meanwhile (it reports none of them)
            proxy.refuse()  # the watch's connection breaks: it connects again, and resumes
            proxy.refuse(False)
            raw_put(stub, drive, "ckpt/b.txt", b"b")
            assert reported.get(timeout=20) == ("put", "ckpt/b.txt")
            assert proxy.connections == 2
        assert sorted(Drive(drive, endpoint=handle.endpoint).list("other")) == others  # all stored
    finally:
        handle.stop()


def test_a_raw_watch_is_told_how_far_it_read_only_when_it_asks(daemon, drive_uri):
    """KIND_WATCHING in the middle of a stream is news to a client written against the first message only, which
    may take every later message for an event: it comes only to a watch that asks for it (`progress`)."""
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(daemon.endpoint))
    start = current_sequence(daemon.endpoint, drive_uri)
    for path in ("other/a.txt", "ckpt/a.txt", "other/b.txt"):
        raw_put(stub, drive_uri, path, b"x")

    told = stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, path="ckpt", after_sequence=start, progress=True),
                      timeout=10)
    assert [(m.kind, m.file.path) for m in itertools.islice(told, 3)] == [
        (drive_pb2.WatchEvent.KIND_WATCHING, ""), (drive_pb2.WatchEvent.KIND_PUT, "ckpt/a.txt"),
        (drive_pb2.WatchEvent.KIND_WATCHING, "")]  # read past other/b.txt
    told.cancel()
    untold = stub.Watch(drive_pb2.WatchRequest(drive=drive_uri, path="ckpt", after_sequence=start), timeout=10)
    first = list(itertools.islice(untold, 2))
    raw_put(stub, drive_uri, "ckpt/b.txt", b"x")
    assert [(m.kind, m.file.path) for m in [*first, next(untold)]] == [
        (drive_pb2.WatchEvent.KIND_WATCHING, ""), (drive_pb2.WatchEvent.KIND_PUT, "ckpt/a.txt"),
        (drive_pb2.WatchEvent.KIND_PUT, "ckpt/b.txt")]
    untold.cancel()
