"""Resumes of long streams, of cuts during a commit and of takeovers, against real daemons.

A daemon remembers the files a stream committed while the stream runs and for --upload-expiry after it
ended; a commit that its stream's cut interrupts is remembered all the same, and a file whose commit waits
for room when its stream is cut is held like any file in progress (taken over by another stream meanwhile,
it is committed by that one alone); taking an upload over from a stream still open on the daemon pushes no
other held upload out, and a refused takeover leaves that stream writing; a put's progress counts each byte
of its files once, however often a cut makes it send them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import redis
from conftest import (
    MIB,
    Background,
    current_sequence,
    raw_get,
    rpc_code,
    sha256_hex,
    wait_until,
    write_random_file,
)
from cutting_proxy import CuttingProxy
from test_resume import IN_FLIGHT, held_size, metric, open_upload, query, requests, stub_of

from bench.services import ValkeyServer
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drived.puts import MAX_COMMITS_IN_FLIGHT

pytestmark = pytest.mark.timeout(120)


def put_events(endpoint: str, drive: str, after: int, until: int) -> list[str]:
    """The paths of the drive's PUT events after sequence `after`, up to `until`, in order."""
    paths = []
    with grpc.insecure_channel(endpoint) as channel:
        stream = drive_pb2_grpc.DriveServiceStub(channel).Watch(
            pb.WatchRequest(drive=drive, after_sequence=after), timeout=30)
        for event in stream:
            if event.kind == pb.WatchEvent.KIND_PUT:
                paths.append(event.file.path)
            if event.sequence >= until:
                break
        stream.cancel()
    return paths


def listed(stub: drive_pb2_grpc.DriveServiceStub, drive: str) -> list[pb.FileInfo]:
    return list(stub.List(pb.ListRequest(drive=drive, recursive=True), timeout=5).entries)


def test_a_folder_put_cut_later_than_the_upload_expiry_after_its_first_file_sends_no_stored_file_again(
    twin, start_daemon, tmp_path
):
    """The stream runs longer than --upload-expiry after its first commit before it is cut: the daemon still
    knows every file it committed, so the put goes on from the file in progress."""
    handle = start_daemon(tmp_path, "--upload-expiry", "1")
    stub = stub_of(handle.endpoint)
    drive = "lit://late_cut"
    src = tmp_path / "src"
    sizes = [4 * MIB + i for i in range(6)]
    digests = {f"set/f{i}.bin": write_random_file(src / "set" / f"f{i}.bin", size) for i, size in enumerate(sizes)}
    total = sum(sizes)
    first_sequence = current_sequence(handle.endpoint, drive)
    counted: list[int] = []
    waited = threading.Event()

    def progress(nbytes: int) -> None:
        """Holds the stream, once into its third file, until the first file's commit is older than the expiry."""
        counted.append(nbytes)
        if sum(counted) > sizes[0] + sizes[1] and not waited.is_set():
            waited.set()
            assert wait_until(lambda: "f0.bin" in [e.path.rpartition("/")[2] for e in listed(stub, drive)], 30)
            # Held from now on, this upload expires later than the first file's completion would on its own.
            open_upload(stub, "lit://late_cut_marker", "marker.bin", os.urandom(MIB), "u-marker")
            handle.wait_logged("a resumable upload is discarded", timeout=30)

    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", sum(sizes[:5]) + MIB)  # in the last file, long after the wait
        stored = twin(drive, root_folder=src, endpoint=proxy.endpoint).put("set", progress=progress)
        assert proxy.cuts_made == 1 and waited.is_set()
    assert "expired (--upload-expiry 1 s)" in handle.log()  # the marker: the wait outlasted the expiry
    assert {s.path: s.sha256 for s in stored} == digests
    resumed = requests(handle, "Put")[-1]
    # The daemon read the cut stream up to a few MiB before the cut: the stream that goes on carries the file it
    # was reading and those after it, none of those it stored.
    assert resumed["status"] == "OK" and resumed["files"] <= 3, resumed
    received = metric(handle, 'drived_transfer_bytes_total{direction="in"}') - MIB  # the marker's MiB
    assert total <= received <= total + IN_FLIGHT, f"{received - total} bytes received twice"
    assert sum(counted) == total  # progress counts the files' bytes, not what was sent twice
    last_sequence = current_sequence(handle.endpoint, drive)
    assert sorted(put_events(handle.endpoint, drive, first_sequence, last_sequence)) == sorted(digests)  # once each
    for info in stored:  # the result describes the stored versions
        assert stub.Stat(pb.StatRequest(drive=drive, path=info.path), timeout=5).generation == info.generation


class HeldClaim:
    """A claim of `path` in `drive` held in the coordinator, as another daemon's commit of it would hold it: the
    commits of the path (and below it) wait until `release`."""

    def __init__(self, coordinator: redis.Redis, drive: str, path: str) -> None:
        self.coordinator = coordinator
        self.channel = f"drived:{{{drive}}}"
        self.key = f"{self.channel}:claim:{path}"
        coordinator.set(self.key, "another-daemon", px=60_000)

    def waited_for(self) -> bool:
        """Whether a daemon waits for a claim of the drive (it listens to the drive's wake-ups)."""
        [(_, listeners)] = self.coordinator.pubsub_numsub(self.channel)
        return listeners > 0

    def release(self) -> None:
        self.coordinator.delete(self.key)
        self.coordinator.publish(self.channel, "r")  # as a daemon does when it releases a claim


@pytest.fixture
def valkey(tmp_path) -> Iterator[ValkeyServer]:
    with ValkeyServer(tmp_path / "valkey") as server:
        yield server


def test_a_file_whose_stream_is_cut_during_its_commit_is_remembered_as_stored(start_daemon, tmp_path, valkey):
    """The commit waits for its path's claim while its stream is cut: it still ends, and QueryWriteStatus tells
    the stored file."""
    handle = start_daemon(tmp_path, "--coordinator", valkey.url)
    stub = stub_of(handle.endpoint)
    drive = "lit://cut_commit"
    claim = HeldClaim(redis.Redis.from_url(valkey.url), "cut_commit", "c.bin")
    data = os.urandom(3 * MIB)
    header = pb.PutHeader(drive=drive, path="c.bin", upload_id="u-c", size=len(data))
    chunks = [pb.PutRequest(data=data[i:i + MIB]) for i in range(0, len(data), MIB)]
    messages = [pb.PutRequest(header=header), *chunks, pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]
    call = stub.Put.future(iter(messages), timeout=60)
    assert wait_until(claim.waited_for, 20), "the commit never waited for the claim"
    call.cancel()
    assert wait_until(lambda: [p["status"] for p in requests(handle, "Put")] == ["CANCELLED"], 20)
    claim.release()
    status = query(stub, drive, "u-c")
    assert status.complete and (status.file.size, status.file.sha256) == (len(data), sha256_hex(data))
    [(info, got)] = raw_get(stub, drive, "c.bin")
    assert got == data and info.generation == status.file.generation


def test_a_file_cut_while_its_commit_waits_for_room_is_held_for_a_resume(start_daemon, tmp_path, valkey):
    """MAX_COMMITS_IN_FLIGHT commits wait for their folder's claim; the next file's commit waits for room when
    the stream is cut: that file is held like any file in progress (and expires), the others are stored."""
    handle = start_daemon(tmp_path, "--coordinator", valkey.url, "--upload-expiry", "3")
    stub = stub_of(handle.endpoint)
    drive = "lit://no_room"
    claim = HeldClaim(redis.Redis.from_url(valkey.url), "no_room", "d")
    files = {f"u-{i}": os.urandom(64 * 1024 + i) for i in range(MAX_COMMITS_IN_FLIGHT + 1)}
    messages = [
        pb.PutRequest(file=pb.PutFileRequest(
            header=pb.PutHeader(drive=drive, path=f"d/{upload_id}", upload_id=upload_id, size=len(data)),
            data=data, sha256=sha256_hex(data)))
        for upload_id, data in files.items()
    ]
    last = f"u-{MAX_COMMITS_IN_FLIGHT}"
    call = stub.Put.future(iter(messages), timeout=60)
    try:
        assert wait_until(claim.waited_for, 20), "the commits never waited for the claim"
        assert wait_until(lambda: held_size(stub, drive, last) == len(files[last]), 20)  # all of it arrived
        call.cancel()
        assert wait_until(lambda: metric(handle, "drived_held_uploads") == 1, 20)  # before the commits end
    finally:
        claim.release()
    assert wait_until(lambda: [p["status"] for p in requests(handle, "Put")] == ["CANCELLED"], 20)
    for upload_id, data in files.items():  # asked before the completions expire, as the held file does
        if upload_id != last:
            assert query(stub, drive, upload_id).file.sha256 == sha256_hex(data)
    handle.wait_logged("a resumable upload is discarded")  # the last file, held, then expired
    assert rpc_code(lambda: query(stub, drive, last)) == grpc.StatusCode.NOT_FOUND
    assert sorted(e.path for e in listed(stub, drive)) == sorted(f"d/{u}" for u in files if u != last)
    assert metric(handle, "drived_held_uploads") == 0


def committing(stub: drive_pb2_grpc.DriveServiceStub, drive: str, upload_id: str) -> bool:
    """Whether the upload's commit runs: QueryWriteStatus waits for it to end."""
    try:
        stub.QueryWriteStatus(pb.QueryWriteStatusRequest(drive=drive, upload_id=upload_id), timeout=0.5)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return True
        raise
    return False


def test_a_file_whose_commit_waits_for_room_when_another_stream_takes_it_over_is_stored_once(
    start_daemon, tmp_path, valkey
):
    """As above, but the last file is resumed by a second stream while its finish waits for room: the second
    stream stores it, and the first, no longer its writer, fails ABORTED instead of committing it again."""
    handle = start_daemon(tmp_path, "--coordinator", valkey.url)
    stub = stub_of(handle.endpoint)
    drive = "lit://taken_over"
    claim = HeldClaim(redis.Redis.from_url(valkey.url), "taken_over", "d")
    files = {f"u-{i}": os.urandom(64 * 1024 + i) for i in range(MAX_COMMITS_IN_FLIGHT + 1)}
    headers = {u: pb.PutHeader(drive=drive, path=f"d/{u}", upload_id=u, size=len(data)) for u, data in files.items()}
    messages = [pb.PutRequest(file=pb.PutFileRequest(header=headers[u], data=data, sha256=sha256_hex(data)))
                for u, data in files.items()]
    last = f"u-{MAX_COMMITS_IN_FLIGHT}"
    stub.PutFile(pb.PutFileRequest(header=pb.PutHeader(drive=drive, path="marker"), data=b"m", sha256=sha256_hex(b"m")),
                 timeout=10)
    before = current_sequence(handle.endpoint, drive)
    first = stub.Put.future(iter(messages), timeout=60)
    try:
        assert wait_until(claim.waited_for, 20), "the commits never waited for the claim"
        assert wait_until(lambda: held_size(stub, drive, last) == len(files[last]), 20)  # its finish waits
        second = stub.Put.future(iter(resuming_put(headers[last], files[last], len(files[last]))), timeout=60)
        assert wait_until(lambda: committing(stub, drive, last), 20), "the second stream's commit never began"
    finally:
        claim.release()
    [stored] = second.result().files
    assert stored.sha256 == sha256_hex(files[last])
    with pytest.raises(grpc.RpcError) as refused:
        first.result()
    assert refused.value.code() == grpc.StatusCode.ABORTED and "resumed by another stream" in refused.value.details()
    assert query(stub, drive, last).file.generation == stored.generation
    assert sorted(e.path for e in listed(stub, drive)) == sorted(["marker", *(f"d/{u}" for u in files)])
    [(_, got)] = raw_get(stub, drive, f"d/{last}")
    assert got == files[last]
    assert put_events(handle.endpoint, drive, before, current_sequence(handle.endpoint, drive)).count(f"d/{last}") == 1


def stale_put(header: pb.PutHeader, data: bytes, release: threading.Event) -> Iterator[pb.PutRequest]:
    """A Put of `data` that sends its first 3 MiB, then waits for `release` before the rest and its finish."""
    yield pb.PutRequest(header=header)
    for i in range(0, 3 * MIB, MIB):
        yield pb.PutRequest(data=data[i:i + MIB])
    release.wait(30)
    yield pb.PutRequest(data=data[3 * MIB:])
    yield pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))


def resuming_put(header: pb.PutHeader, data: bytes, offset: int) -> list[pb.PutRequest]:
    """A Put that resumes the upload of `header` at `offset` and sends the rest of `data`, then its finish."""
    resumed = pb.PutHeader()
    resumed.CopyFrom(header)
    resumed.write_offset = offset
    return [pb.PutRequest(header=resumed), pb.PutRequest(data=data[offset:]),
            pb.PutRequest(finish=pb.PutFinish(sha256=sha256_hex(data)))]


@pytest.mark.parametrize("offsets", ["the one held", "others"])
def test_a_takeover_pushes_no_held_upload_out_and_a_refused_one_leaves_the_open_stream_writing(
    start_daemon, tmp_path, drive_uri, offsets
):
    """With room for one held upload, taken, an upload whose stream is still open here is resumed: at the offset
    held, it is handed on without being held; at others, refused, and the open stream writes on."""
    handle = start_daemon(tmp_path, "--max-held-uploads", "1")
    stub = stub_of(handle.endpoint)
    open_upload(stub, drive_uri, "held.bin", os.urandom(2 * MIB), "u-held")
    data = os.urandom(6 * MIB)
    header = pb.PutHeader(drive=drive_uri, path="t.bin", upload_id="u-open", size=len(data))
    release = threading.Event()
    stale = stub.Put.future(stale_put(header, data, release), timeout=60)
    try:
        assert wait_until(lambda: held_size(stub, drive_uri, "u-open") == 3 * MIB, 10)
        if offsets == "the one held":
            [stored] = stub.Put(iter(resuming_put(header, data, 3 * MIB)), timeout=30).files
        for offset in (2 * MIB, 4 * MIB) if offsets == "others" else ():
            with pytest.raises(grpc.RpcError) as refused:
                stub.Put(iter(resuming_put(header, data, offset)), timeout=30)
            assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE and "holds 3145728 bytes" in (
                refused.value.details())
            assert held_size(stub, drive_uri, "u-open") == 3 * MIB
            assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="t.bin"))) == (
                grpc.StatusCode.NOT_FOUND)
    finally:
        release.set()
    if offsets == "the one held":
        assert stale.exception(30).code() == grpc.StatusCode.ABORTED
    else:
        [stored] = stale.result(30).files  # the stream still open went on, and stored its file
    assert stored.sha256 == sha256_hex(data)
    assert [d for _, d in raw_get(stub, drive_uri, "t.bin")] == [data]
    assert query(stub, drive_uri, "u-held").committed_size == 2 * MIB  # still held
    assert metric(handle, "drived_held_uploads") == 1


def test_the_progress_of_a_put_sent_again_from_its_first_byte_counts_each_byte_once(twin, start_daemon, tmp_path):
    """Nothing is held for a resume (--max-held-uploads 0): the file cut midway is sent again whole."""
    handle = start_daemon(tmp_path, "--max-held-uploads", "0")
    size = 16 * MIB
    digest = write_random_file(tmp_path / "big.bin", size)
    counted: list[int] = []
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", 8 * MIB)
        # The client reaches the daemon again only once the daemon has ended the cut stream (and so discarded its
        # upload): asked earlier, it would be told what the stream still open here holds, and resume from there.
        proxy.down_after_cuts()

        def up_once_the_cut_stream_ended() -> None:
            wait_until(lambda: proxy.cuts_made == 1 and handle.open_requests("Put") == 0, 60)
            proxy.down_after_cuts(False)
        reopening = Background(up_once_the_cut_stream_ended)
        reopening.start()
        [stored] = twin("lit://progress", root_folder=tmp_path, endpoint=proxy.endpoint).put(
            "big.bin", progress=counted.append)
        reopening.join_checked(60)
        assert proxy.cuts_made == 1
    assert stored.sha256 == digest
    [resent] = [p for p in requests(handle, "Put") if p["status"] == "OK"]
    assert resent["bytes"] == size  # from the first byte
    assert sum(counted) == size


def test_the_progress_of_a_put_counts_nothing_its_cut_stream_reads_after_the_resume(twin, start_daemon, tmp_path):
    """The thread reading a cut stream's files may go on counting after the put resumed on a new stream
    (AsyncDrive's reads a batch of up to a MiB of messages at a time): its counts came on top of the new stream's,
    and the put's progress passed the files' size by up to a MiB. Here the files are read slowly (the disk is what
    the stream waits for), so that the cut comes while a batch is being read; the first count after the cut is held
    until the new stream has counted, and the counts of what is left of that batch come after."""
    handle = start_daemon(tmp_path)
    src = tmp_path / "src"
    sizes = [64 * 1024] * 160
    digests = {f"set/f{i:03}.bin": write_random_file(src / "set" / f"f{i:03}.bin", size)
               for i, size in enumerate(sizes)}
    counted: list[int] = []
    cut_stream: set[threading.Thread] = set()  # the threads that counted before the cut (not their idents: reused)
    resumed = threading.Event()  # a thread of the new stream counted
    held = threading.Event()

    with CuttingProxy(handle.endpoint) as proxy:

        def progress(nbytes: int) -> None:
            counted.append(nbytes)
            thread = threading.current_thread()
            if not proxy.cuts_made:
                cut_stream.add(thread)
                time.sleep(0.005)  # a slow disk
            elif thread not in cut_stream:
                resumed.set()
            elif not held.is_set():
                held.set()
                assert resumed.wait(30), "the put never resumed"

        proxy.cut_after("up", 4 * MIB)
        stored = twin("lit://progress_cut", root_folder=src, endpoint=proxy.endpoint).put("set", progress=progress)
        assert proxy.cuts_made == 1
    assert {s.path: s.sha256 for s in stored} == digests
    assert all(n > 0 for n in counted)
    assert sum(counted) == sum(sizes), f"{sum(counted) - sum(sizes)} bytes counted twice"
