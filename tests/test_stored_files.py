"""The stored format (2: header, content, block table of CRC32Cs), every read checked block by block against
it (a damaged byte is never sent), and data dirs written by an earlier release (format 1) read as they are."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import struct
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import grpc
import pytest
from conftest import (
    MIB,
    damaged_reads,
    open_fds,
    paused_reads,
    raw_get,
    raw_put,
    read_changed,
    rpc_code,
    sha256_hex,
    snapshot,
    wait_until,
)
from crc32c import crc32c

from drive_client import DataLoss, Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drived.backends.stored import BUILDERS

pytestmark = pytest.mark.timeout(120)

BLOCK = MIB


def stored_path(data_dir: Path, drive_uri: str, path: str, component: str = "default") -> Path:
    return data_dir / "objects" / drive_uri.removeprefix("lit://") / component / path


def flip(path: Path, offset: int) -> None:
    """Flips the lowest bit of the byte at `offset` of a file, as bit rot on a disk would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture(scope="module")
def handle(own_daemon):
    """A daemon of this module's own, whose data dir the tests damage (and whose metrics count it)."""
    return own_daemon


@pytest.fixture(scope="module")
def own_stub(handle):
    with grpc.insecure_channel(handle.endpoint) as channel:
        yield drive_pb2_grpc.DriveServiceStub(channel)


@pytest.mark.parametrize("size", [0, 100, BLOCK, 2 * BLOCK + 3, 5 * BLOCK - 1])
def test_the_stored_format(handle, own_stub, drive_uri, size):
    """Header (magic, sha256, size, CRC32C, block size, its own CRC32C), content, then the CRC32C of the
    content up to the end of each block. Small files are written by the commit worker, big ones by the daemon."""
    data = os.urandom(size)
    raw_put(own_stub, drive_uri, "f.bin", data)
    raw = stored_path(handle.data_dir, drive_uri, "f.bin").read_bytes()
    magic, sha256, stored_size, content_crc, block_size, header_crc = struct.unpack_from("<8s32sQIII", raw)
    assert (magic, sha256, stored_size, content_crc, block_size) == (
        b"DRIVED02", hashlib.sha256(data).digest(), size, crc32c(data), BLOCK)
    assert header_crc == crc32c(raw[:56]) and raw[60:64] == b"\0" * 4
    assert raw[64:64 + size] == data
    ends = [crc32c(data[:min(end, size)]) for end in range(BLOCK, size + BLOCK, BLOCK)]
    assert raw[64 + size:] == struct.pack(f"<{len(ends)}I", *ends)


@pytest.mark.parametrize("size", [300_000, 3 * BLOCK + BLOCK // 2], ids=["small", "big"])
def test_a_flipped_byte_in_a_stored_file_is_never_sent(handle, own_stub, drive_uri, tmp_path, size):
    data = os.urandom(size)
    raw_put(own_stub, drive_uri, "rot.bin", data)
    damaged_at = size - 1000  # in the last block
    flip(stored_path(handle.data_dir, drive_uri, "rot.bin"), 64 + damaged_at)
    counted = damaged_reads(handle)
    refusals = 0

    # Any Get (an old client's too, without `checksums`): the bytes before the damaged block, then DATA_LOSS.
    received = bytearray()
    with pytest.raises(grpc.RpcError) as refused:
        for message in own_stub.Get(pb.GetRequest(drive=drive_uri, path="rot.bin"), timeout=30):
            received += message.data
    refusals += 1
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    message = refused.value.details()
    assert f"'rot.bin' of component 'default' in {drive_uri} is damaged" in message, message
    assert str(handle.data_dir) not in message and "objects" not in message
    assert bytes(received) == data[:len(received)] and len(received) <= damaged_at - damaged_at % BLOCK

    # Drive.get: DataLoss, and the local file that was there is left as it was.
    (tmp_path / "rot.bin").write_bytes(b"local")
    drive = Drive(drive_uri, root_folder=tmp_path, endpoint=handle.endpoint)
    with pytest.raises(DataLoss, match="is damaged"):
        drive.get("rot.bin", overwrite=True)
    refusals += 1
    assert (tmp_path / "rot.bin").read_bytes() == b"local"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rot.bin"]

    # Ranged reads: refused where they touch the damaged block, served elsewhere.
    with pytest.raises(DataLoss, match="is damaged"):
        b"".join(drive.read_range("rot.bin", damaged_at - 10, 100))
    refusals += 1
    before = damaged_at - damaged_at % BLOCK
    assert b"".join(drive.read_range("rot.bin", 0, before)) == data[:before]

    fs = fsspec.filesystem("lit", endpoint=handle.endpoint, skip_instance_cache=True)
    name = f"{drive_uri.removeprefix('lit://')}/rot.bin"
    with pytest.raises(DataLoss, match="is damaged"):
        fs.cat_file(name)
    refusals += 1
    if before:
        assert fs.cat_file(name, 10, before) == data[10:before]
    assert damaged_reads(handle) == counted + refusals


def test_a_damaged_header_or_table_is_data_loss(handle, own_stub, drive_uri):
    data = os.urandom(2 * BLOCK + 5)
    raw_put(own_stub, drive_uri, "h.bin", data)
    raw_put(own_stub, drive_uri, "t.bin", data)
    flip(stored_path(handle.data_dir, drive_uri, "h.bin"), 50)  # the size field
    flip(stored_path(handle.data_dir, drive_uri, "t.bin"), 64 + len(data) + 4)  # the second block's entry
    raw_put(own_stub, drive_uri, "m.bin", b"magic")
    flip(stored_path(handle.data_dir, drive_uri, "m.bin"), 0)  # the format's magic
    for path in ("h.bin", "m.bin"):
        with pytest.raises(grpc.RpcError) as header:
            own_stub.Stat(pb.StatRequest(drive=drive_uri, path=path))
        assert header.value.code() == grpc.StatusCode.DATA_LOSS and "header" in header.value.details()
        assert f"'{path}' of component 'default' in {drive_uri} is damaged" in header.value.details()
    drive = Drive(drive_uri, endpoint=handle.endpoint)
    with pytest.raises(DataLoss, match=r"'h.bin' of component 'default'.* is damaged"):
        drive.get("h.bin", to=str(handle.data_dir.parent / "h.bin"))
    # The folder still lists (the damaged file with what is known of it), and the remedies work.
    listed = {e.path: e for e in own_stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries}
    assert set(listed) == {"h.bin", "m.bin", "t.bin"} and listed["t.bin"].size == len(data)
    assert not listed["h.bin"].sha256 and not listed["h.bin"].HasField("crc32c")
    raw_put(own_stub, drive_uri, "h.bin", b"put again")
    assert drive.stat("h.bin").size == len(b"put again")
    flip(stored_path(handle.data_dir, drive_uri, "h.bin"), 50)
    drive.delete("h.bin")
    drive.delete("m.bin")
    assert drive.list(".") == ["t.bin"]
    assert b"".join(drive.read_range("t.bin", 0, BLOCK)) == data[:BLOCK]
    with pytest.raises(DataLoss, match="is damaged"):
        b"".join(drive.read_range("t.bin", BLOCK, 10))


@pytest.mark.parametrize("cut", [2, 4 * 3 + 5], ids=["in the table", "in the content"])
def test_a_file_cut_short_is_data_loss(handle, own_stub, drive_uri, cut):
    data = os.urandom(3 * BLOCK)
    raw_put(own_stub, drive_uri, "cut.bin", data)
    path = stored_path(handle.data_dir, drive_uri, "cut.bin")
    os.truncate(path, path.stat().st_size - cut)
    assert rpc_code(lambda: raw_get(own_stub, drive_uri, "cut.bin")) == grpc.StatusCode.DATA_LOSS
    with pytest.raises(DataLoss, match="is damaged"):
        b"".join(Drive(drive_uri, endpoint=handle.endpoint).read_range("cut.bin", 0, 10))


def test_refused_puts_name_the_path_asked_for_not_its_key(handle, own_stub, drive_uri):
    """They named the file by its key in the data dir ('<drive>/c/f'), as no client knows it."""
    raw_put(own_stub, drive_uri, "f/a.txt", b"kept", component="c")
    drive_dir = handle.data_dir / "objects" / drive_uri.removeprefix("lit://")
    stored = snapshot(drive_dir)
    big = os.urandom(3 * MIB)  # written as it arrives (a small file is written by the commit worker)
    where = f"of component 'c' in {drive_uri}"
    refusals = [
        ("f", b"x", {}, grpc.StatusCode.INVALID_ARGUMENT, f"cannot put 'f' {where}: it is a folder"),
        ("f/a.txt/b", b"x", {}, grpc.StatusCode.INVALID_ARGUMENT,
         f"cannot put 'f/a.txt/b' {where}: a parent folder of it is a file"),
        ("g.txt", b"x", {"sha256": "0" * 64}, grpc.StatusCode.DATA_LOSS,
         f"nothing was stored for 'g.txt' {where}: checksum mismatch"),
        ("big.bin", big, {"sha256": "0" * 64}, grpc.StatusCode.DATA_LOSS,
         f"nothing was stored for 'big.bin' {where}: checksum mismatch"),
        ("h.txt", b"x", {"size": 2}, grpc.StatusCode.DATA_LOSS,
         f"nothing was stored for 'h.txt' {where}: size mismatch (received 1 bytes, header said 2)"),
    ]
    for path, data, header, code, message in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(own_stub, drive_uri, path, data, component="c", **header)
        assert refused.value.code() == code, refused.value
        assert refused.value.details().startswith(message), refused.value.details()
        assert drive_uri.removeprefix("lit://") + "/c/" not in refused.value.details()
    assert snapshot(drive_dir) == stored


def test_a_folder_get_names_a_file_with_a_damaged_header_by_its_path(handle, own_stub, drive_uri):
    """Each file of a folder is opened without a stat first: its damaged header was named by its key (and by a
    listing of its path)."""
    raw_put(own_stub, drive_uri, "dir/a.bin", b"fine")
    raw_put(own_stub, drive_uri, "dir/b.bin", b"header damaged")
    damaged = stored_path(handle.data_dir, drive_uri, "dir/b.bin")
    flip(damaged, 50)
    stored = damaged.read_bytes()
    with pytest.raises(grpc.RpcError) as refused:
        raw_get(own_stub, drive_uri, "dir")
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert refused.value.details().startswith(
        f"the stored copy of 'dir/b.bin' of component 'default' in {drive_uri} is damaged (its header"
    ), refused.value.details()
    with pytest.raises(grpc.RpcError) as listed:  # a listing of the file's own path reads its header too
        own_stub.List(pb.ListRequest(drive=drive_uri, path="dir/b.bin"))
    assert listed.value.details() == refused.value.details()
    assert damaged.read_bytes() == stored
    assert raw_get(own_stub, drive_uri, "dir/a.bin")[0][1] == b"fine"


def test_a_file_changed_between_a_gets_lookup_and_its_read_is_named_as_asked_for(start_daemon, tmp_path, drive_uri):
    """Deleted, made a folder or cut short after the get found it: the get's error named the file by its key."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=paused_reads(pause))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    shown = f"'f.bin' of component 'default' in {drive_uri}"
    get = pb.GetRequest(drive=drive_uri, path="f.bin")
    raw_put(stub, drive_uri, "f.bin", b"version 1")
    gone = read_changed(stub, pause, lambda: stub.Delete(pb.DeleteRequest(drive=drive_uri, path="f.bin")), get)
    assert (gone.code(), gone.details()) == (grpc.StatusCode.NOT_FOUND, f"{shown} does not exist")
    raw_put(stub, drive_uri, "f.bin", b"version 2")

    def to_folder() -> None:
        stub.Delete(pb.DeleteRequest(drive=drive_uri, path="f.bin"))
        raw_put(stub, drive_uri, "f.bin/in.txt", b"in the folder")

    folder = read_changed(stub, pause, to_folder, get)
    assert (folder.code(), folder.details()) == (grpc.StatusCode.NOT_FOUND, f"{shown} is a folder, not a file")
    stub.Delete(pb.DeleteRequest(drive=drive_uri, path="f.bin"))
    raw_put(stub, drive_uri, "f.bin", b"version 3, long")
    short = read_changed(stub, pause, lambda: raw_put(stub, drive_uri, "f.bin", b"v4"),
                         pb.GetRequest(drive=drive_uri, path="f.bin", offset=5))
    assert (short.code(), short.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"{shown} ends before offset 5 (it has 2 bytes)")
    assert raw_get(stub, drive_uri, "f.bin")[0][1] == b"v4"


def test_a_pinned_read_of_a_file_shortened_between_its_lookup_and_its_read_is_stale(start_daemon, tmp_path, drive_uri):
    """The get found the version it pins, and its read a shorter one, which ends before the offset: a read of a file
    that changed (ABORTED), not one past the end of the version it pins (INVALID_ARGUMENT)."""
    pause = tmp_path / "pause"
    handle = start_daemon(tmp_path, before=paused_reads(pause))
    stub = drive_pb2_grpc.DriveServiceStub(grpc.insecure_channel(handle.endpoint))
    pinned = raw_put(stub, drive_uri, "f.bin", b"version 1, long").files[0].sha256
    stale = read_changed(stub, pause, lambda: raw_put(stub, drive_uri, "f.bin", b"v2"),
                         pb.GetRequest(drive=drive_uri, path="f.bin", offset=5, if_match=pinned))
    assert (stale.code(), stale.details()) == (grpc.StatusCode.ABORTED, (
        f"'f.bin' in {drive_uri} changed (sha256 {hashlib.sha256(b'v2').hexdigest()}, expected {pinned}): "
        "read it again"))
    [(info, data)] = raw_get(stub, drive_uri, "f.bin")
    assert (data, info.sha256) == (b"v2", hashlib.sha256(b"v2").hexdigest())


# -- data dirs of an earlier release -----------------------------------------------------------------


FORMAT_1_DATA = Path(__file__).parent / "fixtures" / "format1-data.tar.gz"


def pattern(size: int, seed: int) -> bytes:
    """Content that compresses well, so that the fixture stays small."""
    unit = bytes((seed * 31 + i * 7) % 251 for i in range(4093))
    return (unit * (size // len(unit) + 1))[:size]


# What FORMAT_1_DATA holds: drive "old", {component: {path: content}}. It was made by the drived of main at
# 0d5a601 (format 1), the last release before format 2: that daemon started on an empty data dir, and its
# Drive put these files, one component at a time (the archive holds the data dir as the daemon left it).
FORMAT_1_FILES = {
    "default": {"f/big.bin": pattern(3 * BLOCK + 77, 1), "f/d/small.txt": b"small and old", "f/empty": b"",
                "rotten.bin": pattern(2 * BLOCK, 2)},
    "other": {"g/mid.bin": pattern(300_000, 3)},
}


CHECKED_WHOLE = "checking a file of the old format whole"


def format_1(data: bytes) -> bytes:
    """A stored file as the release before format 2 wrote it: magic, raw sha256, size, 16 zero bytes, content."""
    return struct.pack("<8s32sQ16x", b"DRIVED01", hashlib.sha256(data).digest(), len(data)) + data


def old_data_dir(tmp_path: Path) -> Path:
    """A copy of FORMAT_1_DATA (drive "old"), for a test to add to or damage before its daemon starts."""
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    with tarfile.open(FORMAT_1_DATA) as archive:
        archive.extractall(data_dir, filter="data")
    big = data_dir / "objects" / "old" / "default" / "f" / "big.bin"
    assert big.read_bytes() == format_1(FORMAT_1_FILES["default"]["f/big.bin"]), "format_1 writes what it wrote"
    return data_dir


def whole_checks(handle, path: str) -> int:
    """How many times the daemon read the format 1 file `path` of drive old's default component whole."""
    lines = [json.loads(line) for line in handle.log().splitlines() if line.startswith("{")]
    return sum(line["event"] == CHECKED_WHOLE and line["key"] == f"old/default/{path}" for line in lines)


def get_intervals(handle, path: str) -> list[tuple[float, float]]:
    """(start, end) in seconds of each Get of `path` the daemon answered, from its request log lines."""
    intervals = []
    for line in handle.log().splitlines():
        fields = json.loads(line) if line.startswith("{") else {}
        if fields.get("event") == "request" and fields["method"] == "Get" and fields["path"] == path:
            end = datetime.datetime.fromisoformat(fields["ts"]).timestamp()
            intervals.append((end - fields["duration_ms"] / 1000, end))
    return intervals


def ranged_get(stub, path: str, offset: int, limit: int) -> bytes:
    request = pb.GetRequest(drive="lit://old", path=path, offset=offset, limit=limit, checksums=True)
    return b"".join(message.data for message in stub.Get(request, timeout=60))


def test_a_data_dir_of_format_1_is_read_as_it_is(start_daemon, tmp_path):
    data_dir = old_data_dir(tmp_path)
    objects = data_dir / "objects" / "old"
    assert {p.read_bytes()[:8] for p in objects.rglob("*") if p.is_file()} == {b"DRIVED01"}
    flip(objects / "default" / "rotten.bin", 64 + 100)
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    handle = start_daemon(tmp_path, data_dir=data_dir)
    files = FORMAT_1_FILES["default"]
    drive = Drive("lit://old", root_folder=tmp_path, endpoint=handle.endpoint)

    data = files["f/big.bin"]
    stat = drive.stat("f/big.bin")
    assert (stat.size, stat.sha256) == (len(data), sha256_hex(data))
    assert drive.list("f") == ["f/big.bin", "f/d", "f/empty"]
    assert drive.list(".") == ["f", "g", "rotten.bin"]
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        assert not stub.Stat(pb.StatRequest(drive="lit://old", path="f/big.bin")).HasField("crc32c")  # not read yet
        offset, limit = BLOCK + 5, BLOCK + 100  # a ranged read first: checks the whole file once
        messages = list(stub.Get(pb.GetRequest(drive="lit://old", path="f/big.bin", offset=offset, limit=limit,
                                               checksums=True)))
        assert b"".join(m.data for m in messages) == data[offset:offset + limit]
        assert messages[-1].crc32c == crc32c(data[offset:offset + limit])
        assert stub.Stat(pb.StatRequest(drive="lit://old", path="f/big.bin")).crc32c == crc32c(data)

    out = tmp_path / "out"
    assert drive.get("f", to=out / "f") == out / "f"
    for path in ("f/big.bin", "f/d/small.txt", "f/empty"):
        assert (out / path).read_bytes() == files[path], path  # a folder get: small, empty and big files
    mid = FORMAT_1_FILES["other"]["g/mid.bin"]
    assert drive.get("g/mid.bin", to=out / "mid.bin", component_name="other").read_bytes() == mid
    with pytest.raises(DataLoss, match="sha256"):
        drive.get("rotten.bin", to=tmp_path / "rotten.bin")
    assert not (tmp_path / "rotten.bin").exists()
    with pytest.raises(DataLoss, match=r"'rotten.bin' of component 'default' in lit://old is damaged"):
        b"".join(drive.read_range("rotten.bin", BLOCK + 1, 10))  # far from the damage: the file is checked whole
    fs = fsspec.filesystem("lit", endpoint=handle.endpoint, skip_instance_cache=True)
    assert fs.cat_file("old/f/d/small.txt", 6, 9) == b"and"
    with pytest.raises(DataLoss, match="is damaged"):
        fs.cat_file("old/rotten.bin", 0, 10)
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and "objects" in p.parts} == {
        p: raw for p, raw in before.items()}, "reading never rewrites a file"

    (tmp_path / "new.txt").write_bytes(b"replaced")
    drive.put("new.txt", to="f/d/small.txt")  # a put writes format 2
    assert (objects / "default" / "f" / "d" / "small.txt").read_bytes()[:8] == b"DRIVED02"
    assert drive.stat("f/d/small.txt").sha256 == sha256_hex(b"replaced")


def test_concurrent_first_reads_of_a_format_1_file_check_it_once(start_daemon, tmp_path):
    data_dir = old_data_dir(tmp_path)
    data = os.urandom(64 * MIB)  # its whole check takes a good part of a second here: the reads overlap it
    (data_dir / "objects" / "old" / "default" / "huge.bin").write_bytes(format_1(data))
    handle = start_daemon(tmp_path, data_dir=data_dir)
    readers = 8
    start = threading.Barrier(readers)

    def read(i: int) -> bytes:
        start.wait()
        return ranged_get(own_stub, "huge.bin", i * 5 * MIB + 3, 100)

    with grpc.insecure_channel(handle.endpoint) as channel:
        own_stub = drive_pb2_grpc.DriveServiceStub(channel)
        with ThreadPoolExecutor(readers) as pool:
            read_back = list(pool.map(read, range(readers)))
        assert read_back == [data[i * 5 * MIB + 3:i * 5 * MIB + 103] for i in range(readers)]
        intervals = get_intervals(handle, "huge.bin")
        assert len(intervals) == readers
        assert max(s for s, _ in intervals) + 0.002 < min(e for _, e in intervals), (
            f"the reads did not overlap, so they tested nothing: {intervals}")
        assert whole_checks(handle, "huge.bin") == 1


def test_a_first_reader_that_goes_away_leaves_its_check_to_the_next_reads(start_daemon, tmp_path):
    data_dir = old_data_dir(tmp_path)
    data = os.urandom(64 * MIB)
    (data_dir / "objects" / "old" / "default" / "huge.bin").write_bytes(format_1(data))
    handle = start_daemon(tmp_path, data_dir=data_dir)
    with grpc.insecure_channel(handle.endpoint) as channel:
        own_stub = drive_pb2_grpc.DriveServiceStub(channel)
        call = own_stub.Get(pb.GetRequest(drive="lit://old", path="huge.bin", offset=7, limit=10), timeout=60)
        assert wait_until(lambda: whole_checks(handle, "huge.bin") == 1, timeout=30), handle.log()
        call.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            next(call)
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
        assert ranged_get(own_stub, "huge.bin", 7, 10) == data[7:17]
        assert whole_checks(handle, "huge.bin") == 1


@functools.cache
def sparse_sha256(size: int, pieces: tuple[tuple[int, bytes], ...]) -> bytes:
    """The sha256 of `size` bytes of zeros but for `pieces` ((offset, bytes), sorted): summing GiBs takes seconds,
    and tests make several files alike."""
    summed, position, zeros = hashlib.sha256(), 0, memoryview(bytes(MIB))
    for offset, piece in [*pieces, (size, b"")]:
        while position < offset:
            step = min(MIB, offset - position)
            summed.update(zeros[:step])
            position += step
        summed.update(piece)
        position += len(piece)
    return summed.digest()


def sparse_format_1(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """A format 1 file of `size` bytes of zeros but for `pieces` ({offset: bytes}), its zeros a hole: a check of it
    whole reads (and sums) every byte, while the disk holds only the pieces."""
    with open(path, "wb") as f:
        f.write(struct.pack("<8s32sQ16x", b"DRIVED01", sparse_sha256(size, tuple(sorted(pieces.items()))), size))
        for offset, piece in pieces.items():
            f.seek(64 + offset)
            f.write(piece)
        f.truncate(64 + size)


def checked(stub, path: str) -> bool:
    """Whether the daemon knows the whole-file check of the format 1 file `path` (its Stat gives its CRC32C)."""
    return stub.Stat(pb.StatRequest(drive="lit://old", path=path)).HasField("crc32c")


def test_reads_of_a_format_1_file_cancelled_while_it_is_checked_close_their_files_at_once(start_daemon, tmp_path):
    """The cancelled reads kept their files open until the check ended, the one that started it as well (the
    check read with its descriptor)."""
    data_dir = old_data_dir(tmp_path)
    piece_at, piece = 700 * MIB + 3, os.urandom(MIB)
    sparse_format_1(data_dir / "objects" / "old" / "default" / "huge.bin", 1024 * MIB, {piece_at: piece})
    handle = start_daemon(tmp_path, data_dir=data_dir)
    pid = handle.proc.pid
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        assert not checked(stub, "huge.bin")  # and the channel is connected before the count
        resting = open_fds(pid)

        def get(offset: int, limit: int):
            return stub.Get(pb.GetRequest(drive="lit://old", path="huge.bin", offset=offset, limit=limit,
                                          checksums=True), timeout=60)

        first = get(7, 10)  # starts the check
        assert wait_until(lambda: whole_checks(handle, "huge.bin") == 1, timeout=30), handle.log()
        kept = get(piece_at, MIB)
        cancelled = [first, *(get(i * MIB, 10) for i in range(8))]
        assert wait_until(lambda: open_fds(pid) >= resting + 10, timeout=30), (resting, open_fds(pid))
        for call in cancelled:
            call.cancel()
        # What stays open: the kept read's file, and the check's own.
        assert wait_until(lambda: open_fds(pid) <= resting + 2, timeout=30), (resting, open_fds(pid))
        assert not checked(stub, "huge.bin"), "the cancelled reads closed their files only once the check ended"
        for call in cancelled:
            with pytest.raises(grpc.RpcError) as gone:
                list(call)
            assert gone.value.code() == grpc.StatusCode.CANCELLED

        messages = list(kept)
        assert b"".join(m.data for m in messages) == piece
        assert messages[-1].crc32c == crc32c(piece)
        assert checked(stub, "huge.bin") and whole_checks(handle, "huge.bin") == 1
        assert wait_until(lambda: open_fds(pid) <= resting, timeout=30), (resting, open_fds(pid))


def test_reads_of_format_1_files_given_up_before_their_checks_start_queue_no_checks(start_daemon, tmp_path):
    """A client that asks for a byte of many old files and goes away at once queued a whole-file read of each,
    run one after another whoever still wanted them; now a check that all its reads left before it started does
    not run. Checks run in order on BUILDERS threads: once a check asked after the given-up ones has ended, those
    would have run before it."""
    data_dir = old_data_dir(tmp_path)
    folder = data_dir / "objects" / "old" / "default"
    names = [f"huge-{i}.bin" for i in range(BUILDERS + 4)]
    for name in [*names, "last.bin"]:
        sparse_format_1(folder / name, 2048 * MIB, {5: b"piece"})
    handle = start_daemon(tmp_path, data_dir=data_dir)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        calls = [stub.Get(pb.GetRequest(drive="lit://old", path=name, offset=5, limit=5), timeout=60) for name in names]
        assert wait_until(lambda: sum(whole_checks(handle, name) for name in names) == BUILDERS, timeout=30)
        running = [name for name in names if whole_checks(handle, name)]
        for call in calls:
            call.cancel()
        assert ranged_get(stub, "last.bin", 5, 5) == b"piece"
        assert sum(whole_checks(handle, name) for name in names) == BUILDERS, "a check no read waited for ran"
        assert all(checked(stub, name) for name in running), "a check that was running ends and is kept"
        assert not any(checked(stub, name) for name in names if name not in running)


def test_a_daemon_stopped_while_it_checks_a_format_1_file_whole_exits_without_reading_the_rest(start_daemon, tmp_path):
    """The check went on after the daemon had stopped, its own descriptor open, and the exit waited for it: about
    minutes here for this file (nothing of it on disk: its zeros are a hole, read at memory speed)."""
    data_dir = old_data_dir(tmp_path)
    size = 64 * 1024 * MIB
    with open(data_dir / "objects" / "old" / "default" / "huge.bin", "wb") as f:  # its sha256 is only known at
        f.write(struct.pack("<8s32sQ16x", b"DRIVED01", bytes(32), size))  # the end of the check: none is needed
        f.truncate(64 + size)
    handle = start_daemon(tmp_path, data_dir=data_dir)
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        call = stub.Get(pb.GetRequest(drive="lit://old", path="huge.bin", offset=3, limit=10), timeout=60)
        assert wait_until(lambda: whole_checks(handle, "huge.bin") == 1, timeout=30), handle.log()
        call.cancel()  # the check goes on for the reads to come
        assert not checked(stub, "huge.bin")
    asked = time.monotonic()
    assert handle.stop(timeout=30) == 0
    assert time.monotonic() - asked < 10, "the exit waited for the check"


def test_reads_of_a_format_1_file_replaced_before_its_check_starts_get_the_version_they_opened(
        start_daemon, tmp_path):
    """The check opened the path again and, finding another version there, failed the reads that waited for it
    ABORTED. It now reads through a dup of a waiting read's descriptor (one still there when a thread is free):
    each read gets the bytes it opened, checked, and a read after the put the new ones."""
    data_dir = old_data_dir(tmp_path)
    folder = data_dir / "objects" / "old" / "default"
    for name in ("huge-1.bin", "huge-2.bin"):  # their checks take both threads that check files whole
        sparse_format_1(folder / name, 1024 * MIB, {})
    old = FORMAT_1_FILES["default"]["f/big.bin"]
    new = os.urandom(2 * MIB + 1)
    handle = start_daemon(tmp_path, data_dir=data_dir)
    pid = handle.proc.pid
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        raw_put(stub, "lit://old", "first.txt", b"a put starts the commit worker, whose pipes are descriptors too")
        resting = open_fds(pid)
        busy = []
        for name in ("huge-1.bin", "huge-2.bin"):
            busy.append(stub.Get(pb.GetRequest(drive="lit://old", path=name, offset=3, limit=10), timeout=60))
            assert wait_until(lambda name=name: whole_checks(handle, name) == 1, timeout=30), handle.log()
        busy_fds = open_fds(pid)
        # The first read goes away before the check starts: the check reads through the second's descriptor.
        given_up, waiting = (stub.Get(pb.GetRequest(drive="lit://old", path="f/big.bin", checksums=True), timeout=60)
                             for _ in range(2))
        assert wait_until(lambda: open_fds(pid) >= busy_fds + 2, timeout=30), (busy_fds, open_fds(pid))
        raw_put(stub, "lit://old", "f/big.bin", new)
        given_up.cancel()
        assert wait_until(lambda: open_fds(pid) <= busy_fds + 1, timeout=30), (busy_fds, open_fds(pid))
        assert whole_checks(handle, "f/big.bin") == 0, "the check started before the put: this tested nothing"
        for call in busy:
            call.cancel()

        messages = list(waiting)
        assert messages[0].info.size == len(old)
        assert b"".join(m.data for m in messages) == old
        assert messages[-1].crc32c == crc32c(old)
        assert whole_checks(handle, "f/big.bin") == 1
        [(info, again)] = raw_get(stub, "lit://old", "f/big.bin")
        assert (again, info.sha256) == (new, sha256_hex(new))
        assert whole_checks(handle, "f/big.bin") == 1, "the new version is of format 2: no check"
        assert wait_until(lambda: checked(stub, "huge-1.bin") and checked(stub, "huge-2.bin"), timeout=60)
        assert wait_until(lambda: open_fds(pid) <= resting, timeout=30), (resting, open_fds(pid))


def test_a_read_of_a_format_1_file_changed_in_place_before_its_check_starts_names_the_path_asked_for(
        start_daemon, tmp_path):
    """The read was told ABORTED with a message that named the file by its key in the data dir
    ('old/default/f/big.bin'), not as the client asked for it."""
    data_dir = old_data_dir(tmp_path)
    folder = data_dir / "objects" / "old" / "default"
    for name in ("huge-1.bin", "huge-2.bin"):  # their checks take both threads that check files whole
        sparse_format_1(folder / name, 512 * MIB, {})
    big = folder / "f" / "big.bin"
    stored = big.read_bytes()
    handle = start_daemon(tmp_path, data_dir=data_dir)
    pid = handle.proc.pid
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        assert not checked(stub, "f/big.bin")  # and the channel is connected before the count
        busy = []
        for name in ("huge-1.bin", "huge-2.bin"):
            busy.append(stub.Get(pb.GetRequest(drive="lit://old", path=name, offset=3, limit=10), timeout=60))
            assert wait_until(lambda name=name: whole_checks(handle, name) == 1, timeout=30), handle.log()
        busy_fds = open_fds(pid)
        waiting = stub.Get(pb.GetRequest(drive="lit://old", path="f/big.bin"), timeout=60)
        assert wait_until(lambda: open_fds(pid) > busy_fds, timeout=30), (busy_fds, open_fds(pid))
        with open(big, "r+b") as f:  # the same bytes written again: the file changes in place (its ctime)
            f.write(stored)
        assert whole_checks(handle, "f/big.bin") == 0, "the check started before the change: this tested nothing"
        with pytest.raises(grpc.RpcError) as changed:
            list(waiting)
        assert changed.value.code() == grpc.StatusCode.ABORTED
        assert changed.value.details() == (
            "'f/big.bin' of component 'default' in lit://old changed on disk while it was read: read it again")
        assert big.read_bytes() == stored
        assert ranged_get(stub, "f/big.bin", 0, 0) == FORMAT_1_FILES["default"]["f/big.bin"]


def test_a_damaged_format_1_file_is_checked_once_and_refused_at_every_read(start_daemon, tmp_path):
    data_dir = old_data_dir(tmp_path)
    rotten = data_dir / "objects" / "old" / "default" / "rotten.bin"
    flip(rotten, 64 + 100)
    damaged = rotten.read_bytes()
    handle = start_daemon(tmp_path, data_dir=data_dir)
    drive = Drive("lit://old", root_folder=tmp_path, endpoint=handle.endpoint)
    fs = fsspec.filesystem("lit", endpoint=handle.endpoint, skip_instance_cache=True)
    named = r"'rotten.bin' of component 'default' in lit://old is damaged \(its bytes do not match its sha256\)"
    counted = damaged_reads(handle)
    reads = [
        lambda: drive.get("rotten.bin", to=tmp_path / "rotten.bin"),
        lambda: b"".join(drive.read_range("rotten.bin", BLOCK + 1, 10)),  # far from the damage: format 1 has
        lambda: fs.cat_file("old/rotten.bin", 0, 10),  # no block checksums, the whole file is refused
        lambda: drive.get("rotten.bin", to=tmp_path / "rotten.bin"),
    ]
    for read in reads:
        with pytest.raises(DataLoss, match=named):
            read()
    assert whole_checks(handle, "rotten.bin") == 1, "the verdict is kept: a damaged file is not read whole again"
    assert damaged_reads(handle) == counted + len(reads)
    assert not (tmp_path / "rotten.bin").exists()
    assert rotten.read_bytes() == damaged, "reading never rewrites a file"
    assert drive.stat("rotten.bin").size == 2 * BLOCK  # its header is sound: stat and list still describe it

    # Restored in place as `cp -p` from a backup does (the same inode and mtime): read again, and served.
    mtime = rotten.stat().st_mtime_ns
    flip(rotten, 64 + 100)
    os.utime(rotten, ns=(mtime, mtime))
    good = FORMAT_1_FILES["default"]["rotten.bin"]
    assert b"".join(drive.read_range("rotten.bin", BLOCK + 1, 10)) == good[BLOCK + 1:BLOCK + 11]
    assert drive.get("rotten.bin", to=tmp_path / "rotten.bin").read_bytes() == good
    assert whole_checks(handle, "rotten.bin") == 2


def test_format_1_files_and_damaged_headers_count_in_the_quota_what_their_removal_takes_off(start_daemon, tmp_path):
    """The count took each file's size from its stored size, while a put replacing it or a delete took off what its
    header said: a format 1 file's removal 4 bytes per started MiB more than it counted, and a damaged header's
    nothing (a put replacing it needed room for all of it), so the count drifted until a restart."""
    handle = start_daemon(tmp_path)
    drive = "lit://measured"
    damaged = {"damaged-1.bin": MIB + 7, "damaged-2.bin": 3000}
    with grpc.insecure_channel(handle.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        for name, size in damaged.items():
            raw_put(stub, drive, name, os.urandom(size))
    assert handle.stop() == 0
    folder = stored_path(handle.data_dir, drive, "damaged-1.bin").parent
    for name in damaged:
        flip(folder / name, 20)  # in the sha256 of its header, which no longer matches its CRC32C
    old = {"old-1.bin": 3 * MIB + 5, "old-2.bin": MIB + 1}
    for name, size in old.items():
        (folder / name).write_bytes(format_1(os.urandom(size)))
    # A format 1 file counts 4 bytes per started MiB less than it holds, one with a damaged header as if sound.
    counted = {**damaged, "old-1.bin": old["old-1.bin"] - 12, "old-2.bin": old["old-2.bin"] - 4}
    quota = sum(counted.values())

    def full(stub) -> None:
        """The drive holds exactly its quota: a put of one byte is refused with the count, and stores nothing."""
        with pytest.raises(grpc.RpcError) as refused:
            raw_put(stub, drive, "probe.bin", b"x")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"holds {quota:,} bytes" in refused.value.details(), refused.value.details()
        assert not (folder / "probe.bin").exists()

    again = start_daemon(tmp_path, "--quota", str(quota), data_dir=handle.data_dir)
    with grpc.insecure_channel(again.endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        full(stub)  # the first count
        for name in ("damaged-1.bin", "old-1.bin"):
            stub.Delete(pb.DeleteRequest(drive=drive, path=name), timeout=10)
        raw_put(stub, drive, "fill.bin", os.urandom(counted["damaged-1.bin"] + counted["old-1.bin"]))
        full(stub)
        for name in ("damaged-2.bin", "old-2.bin"):  # replaced by as many bytes as they count: no room needed
            raw_put(stub, drive, name, os.urandom(counted[name]))
        full(stub)
        assert sorted(p.name for p in folder.iterdir()) == ["damaged-2.bin", "fill.bin", "old-2.bin"]
    assert again.stop() == 0
    recounted = start_daemon(tmp_path, "--quota", str(quota), data_dir=handle.data_dir)
    with grpc.insecure_channel(recounted.endpoint) as channel:
        full(drive_pb2_grpc.DriveServiceStub(channel))  # a count from scratch finds what the daemon followed
