"""Resumable transfers and retries, through a TCP proxy that cuts streams (`cutting_proxy`), against real daemons.

A put cut mid-file resumes from the last byte the daemon holds (QueryWriteStatus, then a Put with
write_offset); a get resumes from the last byte written, pinned to the version it started; bytes
already sent are not sent again. Held uploads expire after --upload-expiry, stay within their
bounds, and live in one daemon's memory only. Errors that retrying cannot mend are raised at once.
Tests of the client API run against both twins (`twin`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import (
    MIB,
    Background,
    DaemonHandle,
    descriptor_targets,
    file_sha256,
    free_port,
    held_open,
    raw_get,
    raw_put,
    rpc_code,
    sha256_hex,
    snapshot,
    start_daemon,
    upload_bytes,
    wait_until,
    write_random_file,
)
from crc32c import crc32c
from cutting_proxy import CuttingProxy
from test_limits import PAUSED_COMMITS

from drive_client import Drive
from drive_client.channels import CHANNEL_OPTIONS
from drive_client.errors import DataLoss, NotFound, StaleIndexError, StoreUnavailable, Unavailable
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drive_client.resume import FIRST_DELAY, MAX_DELAY, Backoff, GetPosition
from drive_client.transfer import RANGE_STREAMS
from drived.backends.stored import HEADER_SIZE
from drived.server import CLIENT_PING_INTERVAL

pytestmark = pytest.mark.timeout(120)

# What a cut costs at most in bytes sent twice, per stream it breaks: what was in flight (the
# sender's and the receiver's socket buffers and HTTP/2 windows), lost with the connection or
# read by the daemon after the client asked it where the stream got to.
IN_FLIGHT = 8 * MIB


def metric(handle: DaemonHandle, name: str) -> float:
    """One sample of the daemon's /metrics, by its full name with labels (0 when absent)."""
    with urllib.request.urlopen(f"http://{handle.metrics}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def requests(handle: DaemonHandle, method: str) -> list[dict]:
    """The daemon's request log lines of `method`, in order."""
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request" and line.get("method") == method]


def stub_of(endpoint: str) -> drive_pb2_grpc.DriveServiceStub:
    return drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(endpoint))


def query(stub: drive_pb2_grpc.DriveServiceStub, drive: str, upload_id: str, component: str = ""
          ) -> pb.QueryWriteStatusResponse:
    return stub.QueryWriteStatus(
        pb.QueryWriteStatusRequest(drive=drive, component=component, upload_id=upload_id), timeout=10
    )


def held_size(stub: drive_pb2_grpc.DriveServiceStub, drive: str, upload_id: str) -> int | None:
    """The bytes the daemon holds of `upload_id`; None while it holds none (its stream has not reached it yet)."""
    try:
        return query(stub, drive, upload_id).committed_size
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def open_upload(stub: drive_pb2_grpc.DriveServiceStub, drive: str, path: str, data: bytes, upload_id: str,
                size: int | None = None) -> None:
    """A resumable Put of `data` as the first bytes of `path` that ends without a finish (the daemon holds them)."""
    header = pb.PutHeader(drive=drive, path=path, upload_id=upload_id)
    if size is not None:
        header.size = size
    messages = [pb.PutRequest(header=header), *(pb.PutRequest(data=data[i:i + MIB]) for i in range(0, len(data), MIB))]
    assert rpc_code(lambda: stub.Put(iter(messages), timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT  # no finish


def resume_put(stub: drive_pb2_grpc.DriveServiceStub, drive: str, path: str, data: bytes, upload_id: str,
               offset: int) -> pb.PutResponse:
    """A Put that resumes `upload_id` at `offset` and sends the rest of `data`, then its finish."""
    header = pb.PutHeader(drive=drive, path=path, upload_id=upload_id, write_offset=offset)
    rest = [pb.PutRequest(data=data[i:i + MIB]) for i in range(offset, len(data), MIB)]
    finish = pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))
    return stub.Put(iter([pb.PutRequest(header=header), *rest, finish]), timeout=30)


# --- through the cutting proxy ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_256_mib_put_and_get_complete_through_cuts_without_sending_bytes_twice(twin, start_daemon, tmp_path, request):
    """256 MiB with `Drive`; the asyncio twin, whose transfers are the same plans of the core, moves a quarter of
    that through cuts at the same fractions of it (the suite's time)."""
    handle = start_daemon(tmp_path)
    size = 256 * MIB if request.node.callspec.params["twin"] == "Drive" else 64 * MIB
    digest = write_random_file(tmp_path / "src" / "big.bin", size)
    (tmp_path / "out").mkdir()
    cuts = tuple(size * n // 256 for n in (40, 70, 100))  # bytes each connection carries before it breaks
    try:
        with CuttingProxy(handle.endpoint) as proxy:
            for nbytes in cuts:
                proxy.cut_after("up", nbytes)
            [stored] = twin("lit://resume", root_folder=tmp_path / "src", endpoint=proxy.endpoint).put("big.bin")
            assert proxy.cuts_made == len(cuts)
            sent_up = proxy.forwarded["up"]
        assert (stored.size, stored.sha256) == (size, digest)
        puts = requests(handle, "Put")
        # A resume can be refused, before any byte is taken, when the broken stream was still writing as the
        # client asked where it got to (it holds more by then): the client asks again (drive_client.core).
        refused = [p for p in puts if not p["bytes"]]
        assert {p["status"] for p in refused} <= {"OUT_OF_RANGE", "NOT_FOUND"}, puts
        assert puts[-1]["status"] == "OK" and len(puts) - len(refused) == len(cuts) + 1, puts
        # What the daemon read of a broken stream after the client asked where it got to is received twice.
        received = metric(handle, 'drived_transfer_bytes_total{direction="in"}')
        assert size <= received <= size + len(cuts) * IN_FLIGHT, f"{received - size} bytes received twice"
        streams_broken = len(cuts) + len(refused)  # a refused stream's bytes in flight went up too
        assert sent_up <= size + streams_broken * IN_FLIGHT, f"{sent_up - size} bytes more than the file went up"
        print(f"put: {len(cuts)} cuts, {sent_up - size} bytes over the file's size through the proxy, "
              f"{received - size:.0f} received twice by the daemon")

        with CuttingProxy(handle.endpoint) as proxy:  # a new channel: these cuts break the get's connections
            for nbytes in cuts:
                proxy.cut_after("down", nbytes)
            got = twin("lit://resume", root_folder=tmp_path / "out", endpoint=proxy.endpoint).get("big.bin")
            assert proxy.cuts_made == len(cuts)
            sent_down = proxy.forwarded["down"]
        assert file_sha256(got) == digest
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.bin"]  # no partial left beside it
        sent_out = metric(handle, 'drived_transfer_bytes_total{direction="out"}')
        # The get's first answer is cancelled once it says "big" (its first window was sent); each cut
        # breaks the parallel ranged reads at once.
        bound = size + (1 + len(cuts) * RANGE_STREAMS) * IN_FLIGHT
        assert sent_down <= bound and sent_out <= bound, (sent_down, sent_out)
        print(f"get: {len(cuts)} cuts, {sent_down - size} bytes over the file's size through the proxy")
    finally:
        for folder in ("src", "out"):
            (tmp_path / folder / "big.bin").unlink(missing_ok=True)


# The daemon's writes of the chunks at 10 and 11 MiB take 0.3 s each.
SLOW_CHUNKS = """
import asyncio
import drived.backends.local as local
_write = local.LocalUpload.write
async def write(self, data):
    if 10 * 2**20 <= self.held < 12 * 2**20:
        await asyncio.sleep(0.3)
    await _write(self, data)
local.LocalUpload.write = write
"""


def test_a_resume_refused_because_the_broken_stream_wrote_on_is_asked_again(twin, start_daemon, tmp_path):
    """A put's connection breaks on the client's side while the daemon still reads (and slowly writes) what reached
    it: the client's resume at the offset it was told is refused (OUT_OF_RANGE) as long as that stream writes on,
    and the client asks again until one is taken. Each byte is received once."""
    handle = start_daemon(tmp_path, before=SLOW_CHUNKS)
    size = 24 * MIB
    digest = write_random_file(tmp_path / "src" / "big.bin", size)
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", 12 * MIB + MIB // 2, daemon_side=5)
        [stored] = twin("lit://resume", root_folder=tmp_path / "src", endpoint=proxy.endpoint).put("big.bin")
    assert (stored.size, stored.sha256) == (size, digest)
    # The refused and the taken Puts ended before the client's put returned; the broken stream ends later.
    assert wait_until(lambda: any(p["bytes"] and p["status"] != "OK" for p in requests(handle, "Put")), timeout=10)
    puts = requests(handle, "Put")
    refused = [p for p in puts if p["status"] == "OUT_OF_RANGE"]
    assert refused and all(not p["bytes"] for p in refused), puts
    assert [p["status"] for p in puts].count("OK") == 1 and len(puts) == len(refused) + 2, puts
    assert sum(p["bytes"] for p in puts) == size, puts  # the resume began where the broken stream ended
    assert [d for _, d in raw_get(stub_of(handle.endpoint), "lit://resume", "big.bin")] == [
        (tmp_path / "src" / "big.bin").read_bytes()]


@pytest.mark.parametrize("change, error, said", [
    ("removed", NotFound, "was removed while the put ran"),
    ("rewritten", StaleIndexError, "changed while it was being put"),
])
def test_a_file_removed_or_rewritten_before_its_put_resumes_is_refused_as_such(
    twin, start_daemon, tmp_path, change, error, said
):
    """A put's stream broke, and its local file changed before the resume opened it again. Removed: the local
    NotFound was taken for the daemon refusing the resume, and the put asked again until retry_seconds ran out.
    Rewritten: each stream compared the file with its own open only, and the resume sent the new bytes behind the
    old ones the daemon held, refused as damaged on the way (DataLoss: "retry the put"). Nothing is stored."""
    handle = start_daemon(tmp_path)
    local = tmp_path / "src" / "big.bin"
    write_random_file(local, 24 * MIB)
    sent = [0]

    def change_after_4_mib(count: int) -> None:  # the first stream has the file open, and sends it on
        sent[0] += count
        if sent[0] >= 4 * MIB and sent[0] - count < 4 * MIB:
            if change == "removed":
                local.unlink()
            else:
                time.sleep(0.05)  # past the clock tick of the open (see transfer._check_unchanged)
                with open(local, "r+b") as f:
                    f.write(b"a new first byte")

    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", 12 * MIB)
        drive = twin("lit://changed", root_folder=tmp_path / "src", endpoint=proxy.endpoint, retry_seconds=30)
        started = time.monotonic()
        with pytest.raises(error, match=said):
            drive.put("big.bin", progress=change_after_4_mib)
        assert proxy.cuts_made == 1
    assert time.monotonic() - started < 15, "the put asked again for retry_seconds before it said what changed"
    with pytest.raises(NotFound):
        twin("lit://changed", endpoint=handle.endpoint).stat("big.bin")


def test_a_folder_put_cut_midway_completes_without_sending_finished_files_again(twin, start_daemon, tmp_path):
    handle = start_daemon(tmp_path)
    src = tmp_path / "src"
    digests = {f"set/f{i}.bin": write_random_file(src / "set" / f"f{i}.bin", 3 * MIB + i) for i in range(6)}
    for i in range(5):
        (src / "set" / f"small{i}.txt").write_bytes(os.urandom(1000 + i))
        digests[f"set/small{i}.txt"] = sha256_hex((src / "set" / f"small{i}.txt").read_bytes())
    total = sum((src / path).stat().st_size for path in digests)
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", 11 * MIB)  # in the fourth file
        stored = twin("lit://folder", root_folder=src, endpoint=proxy.endpoint).put("set")
        assert proxy.cuts_made == 1
    assert {s.path: s.sha256 for s in stored} == digests
    received = metric(handle, 'drived_transfer_bytes_total{direction="in"}')
    assert total <= received <= total + IN_FLIGHT, f"{received - total} bytes received twice"
    second = requests(handle, "Put")[-1]
    assert second["status"] == "OK" and second["files"] < len(digests)  # the second stream sent the rest only
    queries = requests(handle, "QueryWriteStatus")
    assert queries and all(q["status"] == "OK" for q in queries[:-1])
    out = tmp_path / "out"
    out.mkdir()
    twin("lit://folder", root_folder=out, endpoint=handle.endpoint).get("set")
    assert {str(p.relative_to(out)): file_sha256(p) for p in (out / "set").iterdir()} == digests


def test_a_folder_get_cut_midway_completes(twin, start_daemon, tmp_path):
    handle = start_daemon(tmp_path)
    src = tmp_path / "src"
    digests = {f"set/f{i}.bin": write_random_file(src / "set" / f"f{i}.bin", 3 * MIB + i) for i in range(5)}
    (src / "set" / "z.txt").write_bytes(b"last")
    digests["set/z.txt"] = sha256_hex(b"last")
    twin("lit://folderget", root_folder=src, endpoint=handle.endpoint).put("set")
    out = tmp_path / "out"
    out.mkdir()
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("down", 8 * MIB)  # in the third file
        twin("lit://folderget", root_folder=out, endpoint=proxy.endpoint).get("set")
        assert proxy.cuts_made == 1
    assert {f"set/{p.name}": file_sha256(p) for p in (out / "set").iterdir()} == digests


# Python for `start_daemon(before=...)`: a read of a file whose key ends with NAME, once the file is open, creates
# PAUSE.reached and waits while PAUSE exists (the test changes the drive then).
HELD_OPEN_READ = """
import asyncio, os
from drived.backends.local import LocalBackend

def held(read):
    async def read_held_open(self, key, offset=0, limit=0):
        opened = await read(self, key, offset, limit)
        if key.endswith({name!r}):
            open({pause!r} + ".reached", "w").close()
            while os.path.exists({pause!r}):
                await asyncio.sleep(0.01)
        return opened
    return read_held_open

LocalBackend.read = held(LocalBackend.read)
"""


def test_a_folder_get_whose_file_in_progress_is_deleted_before_the_resume_is_stale(twin, start_daemon, tmp_path):
    """A folder get cut in the middle of its last file asks for the folder again and skips what it had; that file
    deleted meanwhile, the folder came again without it, and the get raised DataLoss saying the daemon was too old
    to send CRC32Cs ("upgrade the daemon"). It raises StaleIndexError naming the file, as when a later file comes
    in its place."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=HELD_OPEN_READ.format(name="b.bin", pause=str(pause)))
    src = tmp_path / "src"
    write_random_file(src / "set" / "a.bin", 3 * MIB)
    write_random_file(src / "set" / "b.bin", 8 * MIB)
    Drive("lit://gone", root_folder=src, endpoint=handle.endpoint).put("set")
    out = tmp_path / "out"
    out.mkdir()
    pause.touch()
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("down", 6 * MIB)  # in b.bin
        get = Background(lambda: twin("lit://gone", root_folder=out, endpoint=proxy.endpoint).get("set"))
        get.start()
        try:
            assert wait_until(lambda: os.path.exists(f"{pause}.reached"), 30), "the get never opened b.bin"
            Drive("lit://gone", endpoint=handle.endpoint).delete("set/b.bin")  # the open file is read on
        finally:
            pause.unlink()
        with pytest.raises(StaleIndexError, match=r"'set/b\.bin' was deleted"):
            get.join_checked()
        assert proxy.cuts_made == 1
    assert snapshot(out) == {"set": "dir", "set/a.bin": file_sha256(src / "set" / "a.bin")}


def test_a_put_resumes_after_the_daemon_restarted_from_the_first_byte(twin, tmp_path):
    """A restarted daemon holds nothing: the client learns it (NOT_FOUND) and sends the file again whole. The first
    daemon holds the put at its commit (a put of 24 MiB can end before a look at its upload's bytes on a quiet
    machine), and is killed there."""
    port = free_port()
    pause = tmp_path / "pause"
    pause.touch()
    held = PAUSED_COMMITS.format(backend="local", upload="LocalUpload", name="r.bin", pause=str(pause))
    first = start_daemon(tmp_path, port=port, data_dir=tmp_path / "data", before=held)
    size = 24 * MIB
    digest = write_random_file(tmp_path / "src" / "r.bin", size)
    drive = twin("lit://restarted", root_folder=tmp_path / "src", endpoint=first.endpoint)
    put = Background(lambda: drive.put("r.bin"))
    second = None
    try:
        put.start()
        assert wait_until((tmp_path / "pause.reached").exists, 30), "the put never reached its commit"
        assert upload_bytes(first.data_dir) >= size  # every byte in its upload, none committed
        first.stop(signal.SIGKILL)
        second = start_daemon(tmp_path, port=port, data_dir=tmp_path / "data")
        [stored] = put.join_checked(90)
        assert (stored.size, stored.sha256) == (size, digest)
        assert [q["status"] for q in requests(second, "QueryWriteStatus")][:1] == ["NOT_FOUND"]
        [resent] = [p for p in requests(second, "Put") if p["status"] == "OK"]
        assert resent["bytes"] == size  # from the first byte
    finally:
        if second is not None:
            second.stop()


def test_a_small_put_waits_for_a_daemon_started_after_it_and_stores_the_file_once(twin, tmp_path, caplog):
    """A PutFile is tried again within retry_seconds, as a stream is: a daemon not up yet is waited for."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    port = free_port()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "s.txt").write_bytes(b"small and late")
    drive = twin("lit://late", root_folder=tmp_path / "src", endpoint=f"127.0.0.1:{port}")
    put = Background(lambda: drive.put("s.txt"))
    handle = None
    try:
        put.start()
        # Five failed attempts: the put has been trying for a second or two (0.05-0.1 s first, doubling), and
        # the daemon takes as long again to start: gRPC's own retries (5 attempts, 2 s) would be over by then.
        assert wait_until(lambda: len(retries(caplog)) >= 5 or not put.is_alive(), 30), caplog.text
        assert put.is_alive(), f"the put gave up: {put.error!r}"
        handle = start_daemon(tmp_path, port=port, data_dir=tmp_path / "data")
        [stored] = put.join_checked(60)
        assert (stored.path, stored.size, stored.sha256) == ("s.txt", 14, sha256_hex(b"small and late"))
        assert wait_until(lambda: [r["status"] for r in requests(handle, "PutFile")] == ["OK"])  # stored once
        [(_, got)] = raw_get(stub_of(handle.endpoint), "lit://late", "s.txt")
        assert got == b"small and late"
    finally:
        if handle is not None:
            handle.stop()


def test_a_list_and_a_stat_wait_through_a_daemon_restart(twin, tmp_path, caplog):
    """A list and a stat started while the daemon drains (it answers UNAVAILABLE "drived: shutting down") keep
    trying while it exits and stays down for 3 s, and succeed on the daemon started again on its port: gRPC's
    own retries (5 attempts, about 2 s) would be over by then."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    old = start_daemon(tmp_path, "--grace-period", "60", data_dir=tmp_path / "data")
    (tmp_path / "a.txt").write_bytes(b"listed")
    drive = twin("lit://relisted", root_folder=tmp_path, endpoint=old.endpoint)
    [stored] = drive.put("a.txt", to="kept/a.txt")
    listing = Background(lambda: drive.list("kept"))
    stat = Background(lambda: drive.stat("kept/a.txt"))
    new = None
    try:
        with held_open(old):
            old.proc.send_signal(signal.SIGTERM)
            old.wait_logged("draining")
            listing.start()
            stat.start()

            def refused() -> dict[str, list[str]]:
                return {method: [r["status"] for r in requests(old, method)] for method in ("List", "Stat")}

            assert wait_until(lambda: all(refused().values()), 30), refused()
            assert {status for statuses in refused().values() for status in statuses} == {"UNAVAILABLE"}
        assert old.proc.wait(30) == 0, old.log()
        time.sleep(3)  # the daemon is down
        assert listing.is_alive(), f"the list gave up: {listing.error!r}"
        assert stat.is_alive(), f"the stat gave up: {stat.error!r}"
        assert "drived: shutting down" in caplog.text and "cannot reach drived" in caplog.text, caplog.text
        (tmp_path / "back").mkdir()  # a log of its own
        new = start_daemon(tmp_path / "back", port=old.port, data_dir=tmp_path / "data")
        assert listing.join_checked(60) == ["kept/a.txt"]
        assert (stat.join_checked(60).size, stat.result.sha256) == (6, stored.sha256)
        assert wait_until(lambda: [r["status"] for r in requests(new, "List") + requests(new, "Stat")] == ["OK"] * 2)
    finally:
        if new is not None:
            new.stop()


# The answer of a Delete that removed one file (files_deleted=1), as a gRPC message: no other answer on its connection
# carries these bytes.
ONE_DELETED = b"\x00\x00\x00\x00\x02\x08\x01"


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_delete_whose_answer_was_lost_is_done_not_not_found(twin, daemon, tmp_path, drive_uri, what):
    """The Delete reached the daemon and removed the file, but the connection broke before its answer. The retry
    carries the first attempt's request id, finds nothing left, and finds that id's delete in the drive's feed: it
    answers OK with the count the first attempt removed (it answered NOT_FOUND, which the client had to take on
    trust). Nothing else is removed, and a delete of nothing, not cut, is still refused."""
    (tmp_path / "a.txt").write_bytes(b"deleted")
    (tmp_path / "b.txt").write_bytes(b"kept")
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint)
    drive.put("a.txt", to="set/a.txt")
    drive.put("b.txt")
    with CuttingProxy(daemon.endpoint) as proxy:
        proxy.cut_before("down", ONE_DELETED)
        twin(drive_uri, endpoint=proxy.endpoint).delete("set/a.txt" if what == "file" else "set")
        assert proxy.cuts_made == 1 and proxy.connections == 2

    def deletes() -> list[tuple[str, int]]:
        return [(r["status"], r["files"]) for r in requests(daemon, "Delete") if r["drive"] == drive_uri]

    assert wait_until(lambda: deletes() == [("OK", 1), ("OK", 1)]), deletes()  # removed once, then found done
    assert drive.list(".") == ["b.txt"]
    with pytest.raises(FileNotFoundError):
        drive.delete("set")
    assert drive.list(".") == ["b.txt"]


# Python run first in a daemon that plays one of the version before request ids: it never reads the field.
AS_AN_EARLIER_DAEMON = """
from drived.requests import DeleteRequest
read = DeleteRequest.from_pb.__func__
def from_pb(cls, request):
    request.ClearField("request_id")
    request.ClearField("retry")
    return read(cls, request)
DeleteRequest.from_pb = classmethod(from_pb)
"""


@pytest.mark.parametrize("version", ["now", "earlier"])
def test_a_delete_of_nothing_whose_first_attempt_found_no_daemon_is_not_found(twin, tmp_path, drive_uri, caplog,
                                                                               version):
    """A delete of a path the component never held, whose first attempt failed UNAVAILABLE (the daemon not up yet:
    connection refused), returned as if done: after a failed attempt the client took any NOT_FOUND for that
    attempt's work. The daemon now looks for the request's earlier work and marks its NOT_FOUND when it found none:
    the delete raises FileNotFoundError, and the drive's files are left as they were. A daemon of the earlier
    version (a rolling update) answers an unmarked NOT_FOUND, which the client still takes for its earlier work."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    port = free_port()
    drive = twin(drive_uri, root_folder=tmp_path, endpoint=f"127.0.0.1:{port}")
    delete = Background(lambda: drive.delete("never.txt"))
    delete.start()
    handle = None
    try:
        assert wait_until(lambda: "cannot reach drived" in caplog.text, 30), caplog.text
        handle = start_daemon(tmp_path, port=port, before=AS_AN_EARLIER_DAEMON if version == "earlier" else "")
        (tmp_path / "kept.txt").write_bytes(b"kept")
        drive.put("kept.txt")
        if version == "now":
            with pytest.raises(FileNotFoundError, match="owns nothing at"):
                delete.join_checked(60)
        else:
            assert delete.join_checked(60) is None
        # A call's log line is written once its status is sent: it may come after the client has its answer.
        assert wait_until(lambda: requests(handle, "Delete"), timeout=10)
        assert [r["status"] for r in requests(handle, "Delete")] == ["NOT_FOUND"]
        assert drive.list(".") == ["kept.txt"]
    finally:
        if handle is not None:
            handle.stop()


def test_a_delete_started_while_the_daemon_drains_waits_for_it_back(twin, tmp_path, caplog):
    """A delete started while the daemon drains is refused UNAVAILABLE ("drived: shutting down: retry"): it raised
    ConnectionError at once, where a list or a stat keeps trying. It tries again while the daemon exits and stays down,
    and removes the file on the daemon started again on its port."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    old = start_daemon(tmp_path, "--grace-period", "60", data_dir=tmp_path / "data")
    (tmp_path / "a.txt").write_bytes(b"deleted")
    drive = twin("lit://redeleted", root_folder=tmp_path, endpoint=old.endpoint)
    drive.put("a.txt", to="gone/a.txt")
    drive.put("a.txt", to="kept.txt")
    delete = Background(lambda: drive.delete("gone/a.txt"))
    new = None
    try:
        with held_open(old):
            old.proc.send_signal(signal.SIGTERM)
            old.wait_logged("draining")
            delete.start()
            assert wait_until(lambda: [r["status"] for r in requests(old, "Delete")][:1] == ["UNAVAILABLE"], 30)
        assert old.proc.wait(30) == 0, old.log()
        time.sleep(1)  # the daemon is down
        assert delete.is_alive(), f"the delete gave up: {delete.error!r}"
        (tmp_path / "back").mkdir()  # a log of its own
        new = start_daemon(tmp_path / "back", port=old.port, data_dir=tmp_path / "data")
        assert delete.join_checked(60) is None
        assert wait_until(lambda: [r["status"] for r in requests(new, "Delete")] == ["OK"])
        assert drive.list(".") == ["kept.txt"]
    finally:
        if new is not None:
            new.stop()


def test_a_get_still_open_when_the_grace_period_ends_goes_on_on_the_daemon_started_again(tmp_path, caplog):
    """The daemon ends the streams still open once its grace period is over: a get stalled by its reader goes on
    from where it was on the daemon started again on its port, and its file is whole."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    old = start_daemon(tmp_path, "--grace-period", "1", data_dir=tmp_path / "data")
    digest = write_random_file(tmp_path / "big.bin", 32 * MIB)
    drive = Drive("lit://cancelled", root_folder=tmp_path, endpoint=old.endpoint)
    drive.put("big.bin", to="kept/big.bin")
    reading, release = threading.Event(), threading.Event()

    def stalled(_: int) -> None:  # the first chunk stops the reading: the stream stays open
        reading.set()
        release.wait(60)

    get = Background(lambda: drive.get("kept/big.bin", to=tmp_path / "got.bin", progress=stalled))
    new = None
    try:
        get.start()
        assert reading.wait(30), "the get never started"
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(30) == 0, old.log()
        assert "grace period over" in old.log()
        (tmp_path / "back").mkdir()  # a log of its own
        new = start_daemon(tmp_path / "back", port=old.port, data_dir=tmp_path / "data")
        release.set()
        assert get.join_checked(60) == tmp_path / "got.bin"
        assert file_sha256(tmp_path / "got.bin") == digest
        assert "trying again" in caplog.text, caplog.text
    finally:
        release.set()
        if new is not None:
            new.stop()


CANCELLED_TWICE = """
import grpc
import drived.managed
from drive_client.errors import DriveError


class Cancelled(DriveError):
    status = grpc.StatusCode.CANCELLED  # as a stopping daemon's gRPC answers a call that reaches it too late


answered = []


def cancelled_twice(stat):
    async def stat_after_two_cancels(self, request):
        answered.append(request.path)
        if len(answered) <= 2:
            raise Cancelled("Cancelled")
        return await stat(self, request)
    return stat_after_two_cancels


drived.managed.ManagedDrives.stat = cancelled_twice(drived.managed.ManagedDrives.stat)
"""


def test_a_stat_answered_cancelled_by_the_daemon_is_tried_again(twin, tmp_path, caplog):
    """A CANCELLED the client did not ask for (a stopping daemon's gRPC answers it to a call that reaches it just
    before the client has read its GOAWAY) is tried again as UNAVAILABLE is: the stat raised it at once."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    handle = start_daemon(tmp_path, before=CANCELLED_TWICE)
    try:
        (tmp_path / "a.txt").write_bytes(b"stated")
        drive = twin("lit://cancelled", root_folder=tmp_path, endpoint=handle.endpoint)
        [stored] = drive.put("a.txt")
        assert drive.stat("a.txt").sha256 == stored.sha256
        assert len(retries(caplog)) == 2 and "cancelled on the daemon's side" in caplog.text, caplog.text
        assert [r["status"] for r in requests(handle, "Stat")] == ["CANCELLED", "CANCELLED", "OK"]
    finally:
        handle.stop()


def test_a_list_and_a_stat_give_up_on_a_daemon_down_after_retry_seconds(twin, tmp_path, caplog):
    """Nothing listens: each tries again (a warning each time) for about retry_seconds, then raises
    ConnectionError naming the endpoint."""
    caplog.set_level(logging.WARNING, logger="drive_client")
    endpoint = f"127.0.0.1:{free_port()}"
    drive = twin("lit://nobody", endpoint=endpoint, retry_seconds=1)
    for name, call in {"list": lambda: drive.list("."), "stat": lambda: drive.stat("a.txt")}.items():
        caplog.clear()
        started = time.monotonic()
        with pytest.raises(ConnectionError) as down:
            call()
        took = time.monotonic() - started
        assert down.value.code == grpc.StatusCode.UNAVAILABLE and endpoint in str(down.value), name
        assert took < 5, f"{name} took {took:.1f} s"
        # 0.05-0.1 s, then 0.1-0.2 and 0.2-0.4 s: three waits at least fit in the budget of 1 s
        assert len(retries(caplog)) >= 3, caplog.text


def test_a_list_or_a_stat_the_daemon_refuses_is_raised_at_once(twin, start_daemon, tmp_path):
    """Only UNAVAILABLE is tried again: a List page the daemon answers with another error (here UNAUTHENTICATED,
    a wrong token) fails the list after one call, and so does a Stat."""
    handle = start_daemon(tmp_path, "--token", "right")
    (tmp_path / "a.txt").write_bytes(b"a")
    twin("lit://refused", root_folder=tmp_path, endpoint=handle.endpoint, token="right").put("a.txt")
    before = snapshot(handle.data_dir)
    wrong = twin("lit://refused", endpoint=handle.endpoint, token="wrong")
    started = time.monotonic()
    with pytest.raises(PermissionError, match="token"):
        wrong.list(".")
    with pytest.raises(PermissionError, match="token"):
        wrong.stat("a.txt")
    assert time.monotonic() - started < 5

    def statuses() -> dict[str, list[str]]:
        return {method: [r["status"] for r in requests(handle, method)] for method in ("List", "Stat")}

    assert wait_until(lambda: statuses() == {"List": ["UNAUTHENTICATED"], "Stat": ["UNAUTHENTICATED"]}), statuses()
    assert snapshot(handle.data_dir) == before


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings the client logged for the attempts it made again."""
    return [r.getMessage() for r in caplog.records if r.name == "drive_client" and "trying again in" in r.getMessage()]


def test_a_small_put_whose_answer_was_lost_is_not_sent_again(twin, daemon, tmp_path, drive_uri):
    """The PutFile reached the daemon and was stored, but the connection broke before its answer: the client
    learns from QueryWriteStatus that the file is stored (as a stream does), and sends nothing again."""
    (tmp_path / "a.txt").write_bytes(b"answered")
    with CuttingProxy(daemon.endpoint) as proxy:
        proxy.cut_before("down", sha256_hex(b"answered").encode())  # in the answer: the stored file's sha256
        [stored] = twin(drive_uri, root_folder=tmp_path, endpoint=proxy.endpoint).put("a.txt")
        assert proxy.cuts_made == 1 and proxy.connections == 2
    assert (stored.path, stored.sha256) == ("a.txt", sha256_hex(b"answered"))

    def puts() -> list[str]:
        return [r["status"] for r in requests(daemon, "PutFile") if (r["drive"], r["path"]) == (drive_uri, "a.txt")]

    assert wait_until(lambda: puts() == ["OK"]), puts()  # stored once (a log line may follow its answer)
    assert [(r["status"], r["path"]) for r in requests(daemon, "QueryWriteStatus") if r["drive"] == drive_uri] == [
        ("OK", "a.txt")]  # asked once, and it answered with the stored file
    [(_, got)] = raw_get(stub_of(daemon.endpoint), drive_uri, "a.txt")
    assert got == b"answered"


@pytest.mark.parametrize("transfer", ["put", "get", "small put"])
def test_the_retry_budget_ends_with_unavailable_naming_the_endpoint(twin, daemon, tmp_path, drive_uri, transfer):
    write_random_file(tmp_path / "f.bin", 8 * MIB)
    write_random_file(tmp_path / "s.bin", 1000)
    twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put("f.bin")
    (tmp_path / "out").mkdir()
    with CuttingProxy(daemon.endpoint) as proxy:
        if transfer == "small put":
            proxy.refuse()  # the daemon is down from the start
        else:
            proxy.cut_after("up" if transfer == "put" else "down", 4 * MIB)
            proxy.down_after_cuts()  # from the cut on, the daemon "stays down": every later connection breaks at once
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=proxy.endpoint, retry_seconds=1)
        with pytest.raises(ConnectionError) as down:
            if transfer == "get":
                drive.get("f.bin", to="out/f.bin")
            else:
                drive.put("s.bin" if transfer == "small put" else "f.bin", to="again.bin")
        assert down.value.code == grpc.StatusCode.UNAVAILABLE and proxy.endpoint in str(down.value)
        assert proxy.connections > 2, "the transfer was not tried again"
    assert os.listdir(tmp_path / "out") == []  # no partial file left
    reader = twin(drive_uri, endpoint=daemon.endpoint)
    assert reader.list(".") == ["f.bin"]  # nothing stored



def test_a_daemon_that_stops_answering_fails_a_get_and_a_put_within_seconds(start_daemon, tmp_path, drive_uri):
    """A frozen daemon (SIGSTOP: its kernel still acknowledges, as a hung process's or a frozen VM's does) held
    a transfer for good, whatever retry_seconds said: nothing on the channel noticed that it no longer answered.
    Keepalive pings find it: each transfer fails UNAVAILABLE (retry_seconds=0: at once) within ~20 s."""
    daemon = start_daemon(tmp_path)  # its own: it is frozen
    stored = write_random_file(tmp_path / "f.bin", 40 * MIB)
    write_random_file(tmp_path / "g.bin", 40 * MIB)
    Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint).put("f.bin")
    (tmp_path / "out").mkdir()
    frozen: list[float] = []

    def freeze() -> None:
        daemon.proc.send_signal(signal.SIGSTOP)
        frozen.append(time.monotonic())

    both_moving = threading.Barrier(2, action=freeze)

    def transfer(call: str) -> Background:
        moved = [0]

        def progress(count: int) -> None:  # freezes the daemon once both transfers have moved 4 MiB
            moved[0] += count
            if moved[0] - count < 4 * MIB <= moved[0]:
                both_moving.wait(20)

        drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint, retry_seconds=0)
        if call == "get":
            return Background(lambda: drive.get("f.bin", to="out/f.bin", progress=progress))
        return Background(lambda: drive.put("g.bin", progress=progress))

    get, put = transfer("get"), transfer("put")
    try:
        get.start()
        put.start()
        for running in (get, put):
            with pytest.raises(Unavailable):
                running.join_checked(timeout=35)
        assert time.monotonic() - frozen[0] < 30
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert os.listdir(tmp_path / "out") == []
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    assert drive.list(".") == ["f.bin"]
    assert file_sha256(drive.get("f.bin", to="out/f.bin")) == stored


# --- what is not retried -----------------------------------------------------------------------


def test_errors_that_retrying_cannot_mend_are_raised_at_once(twin, start_daemon, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="drive_client")
    handle = start_daemon(tmp_path)
    write_random_file(tmp_path / "big.bin", 3 * MIB)
    owner = twin("lit://refusals", component_name="owner", root_folder=tmp_path, endpoint=handle.endpoint)
    other = twin("lit://refusals", component_name="other", root_folder=tmp_path, endpoint=handle.endpoint)
    owner.put("big.bin")
    owner.put("big.bin", to="folder/inside.bin")
    with pytest.raises(FileExistsError):  # ALREADY_EXISTS
        other.put("big.bin")
    with pytest.raises(ValueError):  # INVALID_ARGUMENT: a folder is there
        owner.put("big.bin", to="folder")
    with pytest.raises(FileNotFoundError):  # NOT_FOUND
        other.get("missing.bin", to=tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError):
        other.stat("missing.bin")
    with pytest.raises(PermissionError):  # PERMISSION_DENIED: s3:// drives are read-only
        twin("s3://some-bucket/data/", root_folder=tmp_path, endpoint=handle.endpoint).put("big.bin")
    expected = {"Put": ["OK", "OK", "ALREADY_EXISTS", "INVALID_ARGUMENT", "PERMISSION_DENIED"],
                "Get": ["NOT_FOUND"], "Stat": ["NOT_FOUND"]}

    # grpc.aio may report a refusal that ended a Put while its client was still sending as a failed send
    # (INTERNAL "Internal error from Core": `errors.AIO_SEND_FAILED`), which the client takes for a cut
    # stream: it logs it, asks about the upload (QueryWriteStatus: NOT_FOUND) and sends once more, and then
    # the refusal reaches it.
    resends = sum("the connection broke while a message was being sent" in r.getMessage() for r in caplog.records)

    def statuses() -> dict[str, list[str]]:
        got = {method: [r["status"] for r in requests(handle, method)] for method in expected}
        puts = got["Put"]  # a refusal sent again answers the same, right after the first
        got["Put"] = [status for i, status in enumerate(puts) if status == "OK" or status != puts[i - 1]]
        return got if len(puts) == len(expected["Put"]) + resends else {"Put": puts}

    assert wait_until(lambda: statuses() == expected), statuses()  # a refusal's log line may follow its answer
    queries = [r["status"] for r in requests(handle, "QueryWriteStatus")]
    assert queries == ["NOT_FOUND"] * resends  # no refusal was taken for a cut, but for a failed send
    assert not (tmp_path / "missing.bin").exists()


def test_a_list_is_tried_again_and_retry_seconds_0_turns_retries_off(twin, daemon, tmp_path, drive_uri):
    (tmp_path / "u.txt").write_text("u")
    twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put("u.txt")
    with CuttingProxy(daemon.endpoint) as proxy:
        proxy.refuse_next(1)  # the daemon is not up yet for the first connection
        assert twin(drive_uri, endpoint=proxy.endpoint).list(".") == ["u.txt"]
        assert proxy.connections == 2
    with CuttingProxy(daemon.endpoint) as proxy:
        proxy.refuse_next(1)
        with pytest.raises(ConnectionError):
            twin(drive_uri, endpoint=proxy.endpoint, retry_seconds=0).list(".")
        assert proxy.connections == 1


# --- the daemon: QueryWriteStatus, resumes, expiry, bounds --------------------------------------


def test_query_and_resume_refusals_get_their_status_and_change_nothing(own_daemon, drive_uri):
    stub = stub_of(own_daemon.endpoint)
    data = os.urandom(5 * MIB)
    open_upload(stub, drive_uri, "held.bin", data[:3 * MIB], "u-1", size=len(data))
    assert query(stub, drive_uri, "u-1").committed_size == 3 * MIB
    before = snapshot(own_daemon.data_dir)

    def resume(offset: int, upload_id: str = "u-1", path: str = "held.bin", size: int = len(data)) -> None:
        header = pb.PutHeader(drive=drive_uri, path=path, upload_id=upload_id, write_offset=offset, size=size)
        rest = [pb.PutRequest(data=data[offset:offset + MIB])] if 0 < offset < len(data) else []
        stub.Put(iter([pb.PutRequest(header=header), *rest]), timeout=10)

    refusals = {
        "an unknown id": (lambda: query(stub, drive_uri, "u-unknown"), grpc.StatusCode.NOT_FOUND),
        "the id of another component": (lambda: query(stub, drive_uri, "u-1", "other"), grpc.StatusCode.NOT_FOUND),
        "an id that is not one": (lambda: query(stub, drive_uri, "u 1/.."), grpc.StatusCode.INVALID_ARGUMENT),
        "an s3:// drive": (lambda: query(stub, "s3://bucket/p/", "u-1"), grpc.StatusCode.NOT_FOUND),
        "an offset behind": (lambda: resume(MIB), grpc.StatusCode.OUT_OF_RANGE),
        "an offset ahead": (lambda: resume(4 * MIB), grpc.StatusCode.OUT_OF_RANGE),
        "an offset without id": (lambda: resume(3 * MIB, upload_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        "a negative offset": (lambda: resume(-1), grpc.StatusCode.INVALID_ARGUMENT),
        "another path": (lambda: resume(3 * MIB, path="other.bin"), grpc.StatusCode.INVALID_ARGUMENT),
        "another size": (lambda: resume(3 * MIB, size=len(data) + 1), grpc.StatusCode.INVALID_ARGUMENT),
        "an unknown upload": (lambda: resume(3 * MIB, upload_id="u-2"), grpc.StatusCode.NOT_FOUND),
    }
    for what, (call, code) in refusals.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == code, what
        assert refused.value.details() and str(own_daemon.data_dir) not in refused.value.details(), what
        assert query(stub, drive_uri, "u-1").committed_size == 3 * MIB, what
        assert snapshot(own_daemon.data_dir) == before, what
    # and then the upload resumes and completes
    [stored] = resume_put(stub, drive_uri, "held.bin", data, "u-1", 3 * MIB).files
    assert (stored.size, stored.sha256) == (len(data), sha256_hex(data))
    status = query(stub, drive_uri, "u-1")
    assert status.complete and status.file.sha256 == sha256_hex(data) and status.committed_size == 0
    assert upload_bytes(own_daemon.data_dir) == 0


def test_a_resumed_upload_is_one_file_for_the_largest_size_and_the_quota(start_daemon, tmp_path):
    """The bytes held count: a resume whose bytes take the file past a limit is refused and the upload
    removed; one whose held bytes already pass it is refused at once and changes nothing."""
    handle = start_daemon(tmp_path, "--max-file-size", "3M", "--quota", "4M")
    stub = stub_of(handle.endpoint)
    drive = "lit://resumed_limits"
    over = os.urandom(3 * MIB + 1)
    open_upload(stub, drive, "over.bin", over[:2 * MIB], "u-over")
    with pytest.raises(grpc.RpcError) as refused:
        resume_put(stub, drive, "over.bin", over, "u-over", 2 * MIB)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-file-size" in refused.value.details()
    assert rpc_code(lambda: query(stub, drive, "u-over")) == grpc.StatusCode.NOT_FOUND  # removed, not held
    assert wait_until(lambda: upload_bytes(handle.data_dir) == 0)

    three = os.urandom(3 * MIB)
    open_upload(stub, drive, "three.bin", three[:2 * MIB], "u-three")
    filler = os.urandom(3 * MIB)
    stub.PutFile(pb.PutFileRequest(header=pb.PutHeader(drive=drive, path="filler.bin"), data=filler,
                                   sha256=sha256_hex(filler)), timeout=30)
    before = snapshot(handle.data_dir)
    with pytest.raises(grpc.RpcError) as refused:  # 1 MiB of room left, 2 MiB held
        resume_put(stub, drive, "three.bin", three, "u-three", 2 * MIB)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--quota" in refused.value.details()
    assert query(stub, drive, "u-three").committed_size == 2 * MIB and snapshot(handle.data_dir) == before
    stub.Delete(pb.DeleteRequest(drive=drive, path="filler.bin"), timeout=10)
    [stored] = resume_put(stub, drive, "three.bin", three, "u-three", 2 * MIB).files
    assert (stored.size, stored.sha256) == (len(three), sha256_hex(three))
    assert upload_bytes(handle.data_dir) == 0


def test_a_held_upload_expires_and_its_data_is_removed(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path, "--upload-expiry", "1")
    stub = stub_of(handle.endpoint)
    open_upload(stub, drive_uri, "e.bin", os.urandom(2 * MIB), "u-expiring")
    assert query(stub, drive_uri, "u-expiring").committed_size == 2 * MIB
    assert upload_bytes(handle.data_dir) >= 2 * MIB
    assert metric(handle, "drived_held_uploads") == 1
    handle.wait_logged("a resumable upload is discarded")
    assert rpc_code(lambda: query(stub, drive_uri, "u-expiring")) == grpc.StatusCode.NOT_FOUND
    assert upload_bytes(handle.data_dir) == 0 and metric(handle, "drived_held_uploads") == 0
    assert "expired (--upload-expiry 1 s)" in handle.log()


@pytest.mark.parametrize("finish", ["crc32c", "sha256"])
def test_a_held_upload_keeps_its_checksums_across_the_resume(own_daemon, drive_uri, finish):
    """The daemon sums a held upload's bytes once: the resumed file's CRC32C (or sha256) is checked over all of
    them, and the stored file's CRC32C and block table cover the bytes of both streams."""
    stub = stub_of(own_daemon.endpoint)
    data = os.urandom(3 * MIB + 5)
    open_upload(stub, drive_uri, "held.bin", data[:2 * MIB], "u-held")
    header = pb.PutHeader(drive=drive_uri, path="held.bin", upload_id="u-held", write_offset=2 * MIB)
    sums = {"crc32c": crc32c(data)} if finish == "crc32c" else {"sha256": sha256_hex(data)}
    wrong = {"crc32c": crc32c(data) ^ 1} if finish == "crc32c" else {"sha256": sha256_hex(b"other")}
    rest = [pb.PutRequest(data=data[2 * MIB:])]
    with pytest.raises(grpc.RpcError) as refused:  # a wrong checksum of the whole file: nothing stored
        stub.Put(iter([pb.PutRequest(header=header), *rest, pb.PutRequest(finish=pb.PutFinish(**wrong))]),
                 timeout=30)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="held.bin"))) == grpc.StatusCode.NOT_FOUND
    open_upload(stub, drive_uri, "held.bin", data[:2 * MIB], "u-held")
    [stored] = stub.Put(iter([pb.PutRequest(header=header), *rest, pb.PutRequest(finish=pb.PutFinish(**sums))]),
                        timeout=30).files
    assert (stored.crc32c, stored.sha256) == (crc32c(data), sha256_hex(data))
    path = own_daemon.data_dir / "objects" / drive_uri.removeprefix("lit://") / "default" / "held.bin"
    ends = [crc32c(data[:min(end, len(data))]) for end in range(MIB, len(data) + MIB, MIB)]
    assert path.read_bytes()[HEADER_SIZE + len(data):] == struct.pack(f"<{len(ends)}I", *ends)
    assert [d for _, d in raw_get(stub, drive_uri, "held.bin")] == [data]


@pytest.mark.parametrize("bound", [("--max-held-uploads", "2"), ("--max-held-bytes", str(3 * MIB))])
def test_held_uploads_stay_within_their_bound_oldest_first(start_daemon, tmp_path, drive_uri, bound):
    handle = start_daemon(tmp_path, *bound)
    stub = stub_of(handle.endpoint)
    for name in ("a", "b", "c"):
        open_upload(stub, drive_uri, f"{name}.bin", os.urandom(MIB + 1), f"u-{name}")
    assert rpc_code(lambda: query(stub, drive_uri, "u-a")) == grpc.StatusCode.NOT_FOUND
    assert [query(stub, drive_uri, f"u-{n}").committed_size for n in "bc"] == [MIB + 1, MIB + 1]
    assert metric(handle, "drived_held_uploads") == 2
    assert upload_bytes(handle.data_dir) == 2 * (HEADER_SIZE + MIB + 1)  # the oldest one's file is gone


def test_a_resume_takes_the_upload_over_from_a_stream_still_open_on_the_daemon(daemon, drive_uri):
    """The client's old stream broke on its side, but the daemon still has it open: the resume wins."""
    stub = stub_of(daemon.endpoint)
    data = os.urandom(6 * MIB)
    header = pb.PutHeader(drive=drive_uri, path="t.bin", upload_id="u-taken", size=len(data))
    release = threading.Event()

    def stale_stream():
        yield pb.PutRequest(header=header)
        for i in range(0, 3 * MIB, MIB):
            yield pb.PutRequest(data=data[i:i + MIB])
        release.wait(30)
        yield pb.PutRequest(data=data[3 * MIB:4 * MIB])  # arrives after the takeover: refused

    stale = stub.Put.future(stale_stream(), timeout=60)
    assert wait_until(lambda: held_size(stub, drive_uri, "u-taken") == 3 * MIB, 10)
    resumed = pb.PutHeader()
    resumed.CopyFrom(header)
    resumed.write_offset = 3 * MIB
    rest = [pb.PutRequest(header=resumed), pb.PutRequest(data=data[3 * MIB:]),
            pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
    [stored] = stub.Put(iter(rest), timeout=30).files
    release.set()
    assert stale.exception(30).code() == grpc.StatusCode.ABORTED
    assert stored.sha256 == sha256_hex(data)
    [(info, got)] = raw_get(stub, drive_uri, "t.bin")
    assert got == data and info.sha256 == sha256_hex(data)


def test_a_held_upload_keeps_no_descriptor_open(start_daemon, tmp_path, drive_uri):
    handle = start_daemon(tmp_path)
    stub = stub_of(handle.endpoint)
    tmp_dir = os.path.realpath(handle.data_dir / "tmp")

    def open_uploads() -> int:
        return sum(target.startswith(tmp_dir) for target in descriptor_targets(handle.proc.pid))

    for i in range(5):
        open_upload(stub, drive_uri, f"d{i}.bin", os.urandom(2 * MIB), f"u-{i}")
    assert metric(handle, "drived_held_uploads") == 5
    assert open_uploads() == 0


# --- the decisions, without a daemon -------------------------------------------------------------


def info(path: str, size: int, sha256: str = "s") -> pb.GetResponse:
    return pb.GetResponse(info=pb.FileInfo(path=path, size=size, sha256=sha256, component="c"))


def replayed(position: GetPosition, messages: list) -> list:
    """What a resumed stream of `messages` hands on to the receiver."""
    return [m for m in (position.kept(message) for message in messages) if m is not None]


def test_a_get_of_one_file_goes_on_with_a_ranged_read_of_its_version():
    position = GetPosition(pb.GetRequest(drive="lit://d", path="a.bin", whole_small_files=True, checksums=True))
    for message in (info("a.bin", 10, "v1"), b"0123"):
        position.passed(message)
    request = position.resumed()
    assert (request.path, request.offset, request.if_match, request.component) == ("a.bin", 4, "v1", "c")
    assert request.checksums  # the ranged read's CRC32C covers the bytes from the cut on
    again = info("a.bin", 10, "v1")
    kept = replayed(position, [again, b"456789"])
    assert kept == [again, b"456789"]  # the file's info again tells the receiver where that CRC32C starts
    for message in kept:
        position.passed(message)
    assert position.sent == 10  # and is no new file


def test_a_get_of_a_folder_goes_on_after_what_was_handed_on():
    request = pb.GetRequest(drive="lit://d", path="d")
    position = GetPosition(request)
    for message in (info("d/a", 3), b"aaa", info("d/b", 5), b"bb"):
        position.passed(message)
    assert position.resumed() == request  # the folder again
    kept = replayed(position, [info("d/a", 3), b"aaa", info("d/b", 5), b"bbb", b"bb", info("d/c", 1), b"c"])
    assert [bytes(m) if isinstance(m, (bytes, memoryview)) else m.info.path for m in kept] == [
        b"b", b"bb", "d/c", b"c"]


def test_a_folder_cut_between_two_files_skips_the_whole_first_one():
    position = GetPosition(pb.GetRequest(drive="lit://d", path="d", whole_small_files=True))
    small = pb.GetResponse(file=pb.GetFile(info=pb.FileInfo(path="d/0"), data=b"0"))
    for message in (small, info("d/a", 3), b"aaa"):
        position.passed(message)
    position.resumed()
    kept = replayed(position, [small, info("d/a", 3), b"aaa", info("d/b", 1), b"b"])
    assert [m.info.path if not isinstance(m, (bytes, memoryview)) else bytes(m) for m in kept] == ["d/b", b"b"]


def test_a_folder_cut_after_a_files_crc32c_skips_that_file_and_its_crc32c():
    position = GetPosition(pb.GetRequest(drive="lit://d", path="d", checksums=True))
    crc = pb.GetResponse(crc32c=7)
    for message in (info("d/a", 3), b"aaa", crc):
        position.passed(message)
    position.resumed()
    kept = replayed(position, [info("d/a", 3), b"aaa", crc, info("d/b", 1), b"b", crc])
    assert [m.info.path if not isinstance(m, (bytes, memoryview)) and m.HasField("info") else m for m in kept] == [
        "d/b", b"b", crc]


@pytest.mark.parametrize("change", ["changed", "deleted"])
def test_a_folder_whose_file_in_progress_changed_is_refused(change):
    position = GetPosition(pb.GetRequest(drive="lit://d", path="d"))
    for message in (info("d/a", 3), b"a"):
        position.passed(message)
    position.resumed()
    again = [info("d/a", 3, "v2")] if change == "changed" else [info("d/b", 3)]
    with pytest.raises(StaleIndexError, match=change):
        replayed(position, again)


def test_backoff_retries_unavailable_only_with_growing_delays_within_its_budget():
    unavailable = Unavailable("cannot reach drived", grpc.StatusCode.UNAVAILABLE)
    for error in (NotFound("gone", grpc.StatusCode.NOT_FOUND), DataLoss("bad", grpc.StatusCode.DATA_LOSS)):
        with pytest.raises(type(error)):
            Backoff(60).delay(error)
    with pytest.raises(Unavailable):
        Backoff(0).delay(unavailable)  # retries off
    store_down = StoreUnavailable("drived: store failed: S3 endpoint down", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(StoreUnavailable):
        Backoff(60, (StoreUnavailable,)).delay(store_down)  # what its caller raises at once
    assert Backoff(60, (StoreUnavailable,)).delay(unavailable) <= FIRST_DELAY
    assert Backoff(60).delay(store_down) <= FIRST_DELAY
    backoff = Backoff(60)
    delays = [backoff.delay(unavailable) for _ in range(8)]
    assert all(FIRST_DELAY / 2 <= d <= MAX_DELAY for d in delays) and delays[-1] >= MAX_DELAY / 2
    assert delays[3] > delays[0]
    short = Backoff(0.5)
    with pytest.raises(Unavailable):
        for _ in range(10):  # no time passes: the growing delays alone go past the budget
            short.delay(unavailable)
    short.progressed()
    assert short.delay(unavailable) <= FIRST_DELAY  # a new budget, from the first delay


def test_a_call_waiting_long_is_not_ended_for_its_clients_keepalive_pings(start_daemon, tmp_path):
    """The daemon's option that takes a client's pings every 5 s was misspelled, so gRPC kept its default (one in 5
    minutes on a connection carrying nothing): a get waiting for its path, or a quiet watch, of a client pinging
    every 10 s while it waits was ended GOAWAY `too_many_pings` after 40-50 s. Here the daemon takes them every 1 s
    (its CLIENT_PING_INTERVAL patched short) and a channel pinging every 1.5 s waits 8 s for a put (without the
    option: ended after ~5 s)."""
    assert dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"] >= CLIENT_PING_INTERVAL * 1000  # clients ping no faster
    handle = start_daemon(tmp_path, before="import drived.server as s; s.CLIENT_PING_INTERVAL = 1.0")
    pinging = grpc.insecure_channel(handle.endpoint, options=[
        ("grpc.keepalive_time_ms", 1_500), ("grpc.keepalive_timeout_ms", 1_000),
        ("grpc.http2.max_pings_without_data", 0)])
    waiting = Background(lambda: raw_get(drive_pb2_grpc.DriveServiceStub(pinging), "lit://pinged", "late.txt",
                                         wait_seconds=60))
    waiting.start()
    time.sleep(8)
    raw_put(stub_of(handle.endpoint), "lit://pinged", "late.txt", b"put after 8 s")
    [(_, got)] = waiting.join_checked()
    assert got == b"put after 8 s"
