"""The stored format (2: header, content, block table of CRC32Cs), every read checked block by block against
it (a damaged byte is never sent), and data dirs written by an earlier release (format 1) read as they are."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tarfile
import urllib.request
from pathlib import Path

import fsspec
import grpc
import pytest
from conftest import MIB, raw_get, raw_put, rpc_code, sha256_hex
from crc32c import crc32c

from drive_client import DataLoss, Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(120)

BLOCK = MIB


def stored_path(data_dir: Path, drive_uri: str, path: str, component: str = "default") -> Path:
    return data_dir / "objects" / drive_uri.removeprefix("lit://") / component / path


def damaged_reads(handle) -> float:
    """The daemon's count of reads refused for damage (drived_damaged_reads_total)."""
    with urllib.request.urlopen(f"http://{handle.metrics}/metrics", timeout=5) as answer:
        found = re.search(r"^drived_damaged_reads_total (\S+)$", answer.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


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


def test_a_data_dir_of_format_1_is_read_as_it_is(start_daemon, tmp_path):
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    with tarfile.open(FORMAT_1_DATA) as archive:
        archive.extractall(data_dir, filter="data")
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
