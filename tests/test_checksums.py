"""CRC32C end to end: on the wire (FileInfo, the `crc32c` message after each file's bytes, puts that send
either checksum or both), bytes damaged on the way (a proxy that flips one bit between client and daemon),
and what the client computes and checks (`verify`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator

import fsspec
import grpc
import pytest
from conftest import BIN, MIB, ROOT, free_port, raw_get, raw_put, sha256_hex
from crc32c import crc32c
from cutting_proxy import CuttingProxy

from drive_client import DataLoss, Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc
from drive_client.transfer import SMALL_FILE, put_requests

pytestmark = pytest.mark.timeout(120)


def get_messages(stub, drive: str, path: str, **request) -> list[tuple[str, object]]:
    """(kind, value) of every message of a Get: ("info", FileInfo), ("data", bytes), ("file", GetFile),
    ("crc32c", int)."""
    stream = stub.Get(pb.GetRequest(drive=drive, path=path, **request), timeout=60)
    return [(m.WhichOneof("message"), getattr(m, m.WhichOneof("message"))) for m in stream]


def put_file(stub, drive: str, path: str, data: bytes, sha256: str = "", crc: int | None = None):
    header = pb.PutHeader(drive=drive, path=path, size=len(data))
    return stub.PutFile(pb.PutFileRequest(header=header, data=data, sha256=sha256, crc32c=crc), timeout=30)


def put_stream(stub, drive: str, path: str, chunks: list[bytes], finish: pb.PutFinish, whole: bool = False):
    """A Put of one file as header, `chunks` and `finish` (or, `whole`, as one `file` message)."""
    header = pb.PutHeader(drive=drive, path=path)
    if whole:
        request = pb.PutFileRequest(header=header, data=b"".join(chunks), sha256=finish.sha256)
        if finish.HasField("crc32c"):
            request.crc32c = finish.crc32c
        return stub.Put(iter([pb.PutRequest(file=request)]), timeout=60)
    messages = [pb.PutRequest(header=header), *(pb.PutRequest(data=c) for c in chunks), pb.PutRequest(finish=finish)]
    return stub.Put(iter(messages), timeout=60)


def stored(stub, drive: str, path: str) -> bytes | None:
    """The bytes stored at `path`, or None when there is no such file."""
    try:
        [(_, data)] = raw_get(stub, drive, path)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        return None
    return data


# -- the wire ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, MIB, 3 * MIB + 17])
def test_file_info_carries_the_crc32c(stub, drive_uri, size):
    data = os.urandom(size)
    [put] = raw_put(stub, drive_uri, "d/f.bin", data).files  # a client that sends the sha256 only
    assert put.HasField("crc32c") and put.crc32c == crc32c(data) and put.sha256 == sha256_hex(data)
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="d/f.bin")).crc32c == crc32c(data)
    [listed] = stub.List(pb.ListRequest(drive=drive_uri, path="d")).entries
    assert listed.crc32c == crc32c(data)
    folder = stub.Stat(pb.StatRequest(drive=drive_uri, path="d"))
    assert folder.folder and not folder.HasField("crc32c")


def test_get_sends_the_crc32c_of_each_files_bytes_when_asked(stub, drive_uri):
    files = {"g/a.bin": os.urandom(3 * MIB + 17), "g/b.txt": b"small", "g/c.bin": b""}
    for path, data in files.items():
        raw_put(stub, drive_uri, path, data)
    messages = get_messages(stub, drive_uri, "g", checksums=True)
    kinds = [kind for kind, _ in messages]
    assert kinds == ["info", *["data"] * 4, "crc32c", "info", "data", "crc32c", "info", "crc32c"]
    for path in files:  # each file's CRC32C comes after its last chunk
        start = next(i for i, (k, v) in enumerate(messages) if k == "info" and v.path == path)
        end = next(i for i in range(start, len(messages)) if messages[i][0] == "crc32c")
        assert messages[end][1] == crc32c(b"".join(v for _, v in messages[start + 1:end])) == crc32c(files[path])
    whole = get_messages(stub, drive_uri, "g", checksums=True, whole_small_files=True)
    small = [v for k, v in whole if k == "file"]
    assert [(f.info.path, f.data, f.crc32c) for f in small] == [
        ("g/b.txt", b"small", crc32c(b"small")), ("g/c.bin", b"", 0),
    ]
    plain = get_messages(stub, drive_uri, "g", whole_small_files=True)  # not asked: as before
    assert "crc32c" not in {k for k, _ in plain}
    assert not any(v.HasField("crc32c") for k, v in plain if k == "file")


def test_ranged_gets_send_the_crc32c_of_the_range(stub, drive_uri):
    data = os.urandom(3 * MIB + 500)
    raw_put(stub, drive_uri, "r.bin", data)
    size = len(data)
    for offset, limit in [(0, 1), (1, MIB), (MIB - 1, 2), (MIB, MIB), (123, 2 * MIB + 5), (MIB + 7, 0),
                          (size - 1, 0), (size, 0), (0, size + 10), (3 * MIB, 500)]:
        messages = get_messages(stub, drive_uri, "r.bin", offset=offset, limit=limit, checksums=True)
        expected = data[offset:offset + limit] if limit else data[offset:]
        got = b"".join(v for k, v in messages if k == "data")
        assert got == expected, (offset, limit)
        assert messages[-1] == ("crc32c", crc32c(expected)), (offset, limit)


@pytest.mark.parametrize("how", ["PutFile", "file message", "chunks"])
def test_a_put_carries_a_crc32c_a_sha256_or_both_and_never_neither(stub, drive_uri, how):
    data = os.urandom(2 * MIB + 3 if how == "chunks" else 5000)
    chunks = [data[i:i + MIB] for i in range(0, len(data), MIB)]

    def put(path: str, sha256: str = "", crc: int | None = None):
        if how == "PutFile":
            return put_file(stub, drive_uri, path, data, sha256, crc).file
        [info] = put_stream(stub, drive_uri, path, chunks, pb.PutFinish(sha256=sha256, crc32c=crc),
                            whole=how == "file message").files
        return info

    for path, sha256, crc in [("crc.bin", "", crc32c(data)), ("sha.bin", sha256_hex(data), None),
                              ("both.bin", sha256_hex(data), crc32c(data))]:
        info = put(path, sha256, crc)
        assert (info.sha256, info.crc32c, info.size) == (sha256_hex(data), crc32c(data), len(data)), path
        assert stored(stub, drive_uri, path) == data
    raw_put(stub, drive_uri, "kept.bin", b"previous")
    with pytest.raises(grpc.RpcError) as neither:
        put("kept.bin")
    assert neither.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CRC32C" in neither.value.details()
    assert stored(stub, drive_uri, "kept.bin") == b"previous"


@pytest.mark.parametrize("how", ["PutFile", "file message", "chunks"])
def test_a_checksum_that_does_not_match_is_data_loss_and_stores_nothing(stub, drive_uri, how):
    """A wrong CRC32C in the final message, a right CRC32C with a wrong sha256, and a flipped bit in a chunk."""
    data = os.urandom(3 * MIB + 1 if how == "chunks" else 5000)
    raw_put(stub, drive_uri, "f.bin", b"previous version")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    chunks = [data[i:i + MIB] for i in range(0, len(data), MIB)]
    damaged = [bytes(flipped[i:i + MIB]) for i in range(0, len(data), MIB)]
    cases = {
        "wrong crc32c in the finish": (chunks, pb.PutFinish(crc32c=crc32c(data) ^ 1)),
        "right crc32c, wrong sha256": (chunks, pb.PutFinish(crc32c=crc32c(data), sha256=sha256_hex(b"other"))),
        "a flipped bit in a chunk": (damaged, pb.PutFinish(crc32c=crc32c(data))),
        "a flipped bit, sha256 only": (damaged, pb.PutFinish(sha256=sha256_hex(data))),
    }
    for case, (sent, finish) in cases.items():
        with pytest.raises(grpc.RpcError) as refused:
            if how == "PutFile":
                put_file(stub, drive_uri, "f.bin", b"".join(sent), finish.sha256,
                         finish.crc32c if finish.HasField("crc32c") else None)
            else:
                put_stream(stub, drive_uri, "f.bin", sent, finish, whole=how == "file message")
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS, case
        assert "nothing was stored" in refused.value.details(), case
        assert stored(stub, drive_uri, "f.bin") == b"previous version", case


# -- bytes damaged on the way -----------------------------------------------------------------------


def inside(data: bytes) -> list[bytes]:
    """Markers for `flipping_proxy` that damage `data` where it is sent: three pieces from its middle."""
    return [data[at:at + 12] for at in (len(data) // 3, len(data) // 2, 2 * len(data) // 3)]


def crc32c_field(data: bytes, *elsewhere: bytes) -> tuple[bytes, list[bytes]]:
    """`data`, or other random bytes of its size, whose CRC32C as a message carries it (4 bytes, little-endian)
    appears nowhere in them nor in `elsewhere`; and that marker, for `flipping_proxy` to damage the message
    that carries the CRC32C."""
    while True:
        marker = crc32c(data).to_bytes(4, "little")
        if not any(marker in part for part in (data, hashlib.sha256(data).digest(), *elsewhere)):
            return data, [marker]
        data = os.urandom(len(data))


@contextlib.contextmanager
def flipping_proxy(target: str, direction: str, markers: list[bytes]) -> Iterator[tuple[str, subprocess.Popen]]:
    """A proxy to `target` that flips one bit of the first of `markers` going `direction` ("up" or "down"):
    its endpoint."""
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "flipping_proxy.py"), str(port), target, direction,
         ",".join(m.hex() for m in markers)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "listening"
        yield f"127.0.0.1:{port}", proxy
    finally:
        proxy.kill()
        proxy.wait(10)


def assert_flipped(proxy: subprocess.Popen) -> None:
    assert proxy.stdout is not None and proxy.stdout.readline().strip() == "flipped", "the proxy damaged nothing"


@pytest.mark.parametrize("where", ["a chunk", "the finish"])
@pytest.mark.parametrize("size", [300_000, 3 * MIB + 5], ids=["small", "chunked"])
def test_a_put_damaged_on_the_way_is_refused_and_the_previous_version_stays(twin, daemon, stub, drive_uri,
                                                                              tmp_path, size, where):
    """One bit flipped in the file's bytes, or in the CRC32C the client sends after them."""
    data = os.urandom(size)
    if where == "the finish":
        data, markers = crc32c_field(data, drive_uri.encode())
    else:
        markers = inside(data)
    (tmp_path / "f.bin").write_bytes(data)
    raw_put(stub, drive_uri, "f.bin", b"previous version")
    with flipping_proxy(daemon.endpoint, "up", markers) as (endpoint, proxy):
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=endpoint)
        with pytest.raises(DataLoss, match=r"nothing was stored for .f.bin.*CRC32C"):
            drive.put("f.bin")
        assert_flipped(proxy)
        assert stored(stub, drive_uri, "f.bin") == b"previous version"
        drive.put("f.bin")  # the proxy flips one bit in its life: the next put goes through
    assert stored(stub, drive_uri, "f.bin") == data


@pytest.mark.parametrize("size", [300_000, 3 * MIB + 5, 80 * MIB], ids=["small", "chunked", "parallel"])
def test_a_get_damaged_on_the_way_is_data_loss_and_the_local_target_stays(twin, daemon, stub, drive_uri, tmp_path,
                                                                            size):
    data = os.urandom(size)
    raw_put(stub, drive_uri, "f.bin", data)
    (tmp_path / "f.bin").write_bytes(b"the local file")
    with flipping_proxy(daemon.endpoint, "down", inside(data)) as (endpoint, proxy):
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=endpoint)
        with pytest.raises(DataLoss, match="do not match the CRC32C the daemon sent"):
            drive.get("f.bin", overwrite=True)
        assert_flipped(proxy)
    assert (tmp_path / "f.bin").read_bytes() == b"the local file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("size", [8 * MIB, 64 * MIB], ids=["one stream", "parallel"])
def test_bytes_damaged_on_a_stream_cut_before_its_crc32c_are_data_loss(twin, daemon, stub, drive_uri, tmp_path,
                                                                        size):
    """One bit flipped in a stream that is cut before the daemon's CRC32C of it arrives: the stream that resumes
    the file (or the block of a parallel get) is checked whole, so only the file's stored CRC32C, against the
    CRC32C of every byte received, sees the damage."""
    data = os.urandom(size)
    raw_put(stub, drive_uri, "f.bin", data)
    # Early in the file, or in each 16 MiB block of a parallel get but the first (the get that learns the file's
    # size may be sent the first block's first bytes, and drop them): well before the cut.
    starts = range(16 * MIB, size, 16 * MIB) if size >= 16 * MIB else [0]
    markers = [data[at + MIB // 2:at + MIB // 2 + 12] for at in starts]
    (tmp_path / "f.bin").write_bytes(b"the local file")
    with flipping_proxy(daemon.endpoint, "down", markers) as (flipping, proxy), CuttingProxy(flipping) as cutting:
        cutting.cut_after("down", 6 * MIB if size < 16 * MIB else 12 * MIB)  # before any stream's end
        drive = twin(drive_uri, root_folder=tmp_path, endpoint=cutting.endpoint)
        with pytest.raises(DataLoss, match=r"'f\.bin'.*CRC32C"):
            drive.get("f.bin", overwrite=True)
        assert_flipped(proxy)
        assert cutting.cuts_made == 1
    assert (tmp_path / "f.bin").read_bytes() == b"the local file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize(("read", "where"), [
    ("read_range", "a chunk"), ("cat_file", "a chunk"), ("open", "a chunk"),
    ("read_range", "the final message"), ("cat_file", "the final message"),
])
def test_a_range_damaged_on_the_way_is_data_loss(daemon, stub, drive_uri, read, where):
    """One bit flipped in the range's bytes, or in the CRC32C of the range the daemon sends after them."""
    start, end = MIB // 2, 5 * MIB // 2
    data = os.urandom(3 * MIB)
    if where == "the final message":
        middle, markers = crc32c_field(data[start:end], crc32c(data).to_bytes(4, "little"), drive_uri.encode())
        data = data[:start] + middle + data[end:]
    else:
        markers = inside(data[start:end])
    raw_put(stub, drive_uri, "f.bin", data)
    with flipping_proxy(daemon.endpoint, "down", markers) as (endpoint, proxy):
        with pytest.raises(DataLoss, match="CRC32C"):
            if read == "read_range":
                b"".join(Drive(drive_uri, endpoint=endpoint).read_range("f.bin", start, end - start))
            else:
                fs = fsspec.filesystem("lit", endpoint=endpoint, skip_instance_cache=True)
                name = f"{drive_uri.removeprefix('lit://')}/f.bin"
                if read == "cat_file":
                    fs.cat_file(name, start, end)
                else:
                    with fs.open(name, "rb", block_size=MIB) as f:
                        f.seek(start)
                        f.read(end - start)
        assert_flipped(proxy)


# -- what the client computes and checks -------------------------------------------------------------


def test_the_client_sends_a_crc32c_and_a_sha256_only_when_asked(tmp_path):
    big, small = os.urandom(SMALL_FILE + 1), b"small"
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "small.txt").write_bytes(small)
    files = [(tmp_path / "big.bin", "big.bin"), (tmp_path / "small.txt", "small.txt")]
    header = pb.PutHeader(drive="lit://d")
    for sha256 in (False, True):
        messages = list(put_requests(header, files, sha256=sha256))
        finish = next(m.finish for m in messages if isinstance(m, pb.PutRequest) and m.HasField("finish"))
        whole = next(m.file for m in messages if isinstance(m, pb.PutRequest) and m.HasField("file"))
        assert (finish.crc32c, whole.crc32c) == (crc32c(big), crc32c(small))
        assert (finish.sha256, whole.sha256) == ((sha256_hex(big), sha256_hex(small)) if sha256 else ("", ""))


def test_verify_must_be_crc32c_or_sha256(tmp_path):
    for make in (lambda: Drive("lit://d", verify="md5"),
                 lambda: fsspec.filesystem("lit", verify="md5", skip_instance_cache=True)):
        with pytest.raises(ValueError, match="verify="):
            make()
    assert Drive("lit://d", verify="sha256").verify == "sha256" and Drive("lit://d").verify == "crc32c"


def test_verify_sha256_checks_the_stored_sha256(twin, start_daemon, tmp_path):
    """A stored file whose sha256 is wrong but whose bytes match their CRC32Cs (as if a buggy release had
    stored it so): served by default, refused by a client that checks the sha256."""
    handle = start_daemon(tmp_path)
    data = os.urandom(2 * MIB + 9)
    with grpc.insecure_channel(handle.endpoint) as channel:
        raw_put(drive_pb2_grpc.DriveServiceStub(channel), "lit://sha", "f.bin", data)
    path = handle.data_dir / "objects" / "sha" / "default" / "f.bin"
    raw = bytearray(path.read_bytes())
    raw[8:40] = hashlib.sha256(b"another file").digest()
    raw[56:60] = crc32c(bytes(raw[:56])).to_bytes(4, "little")  # the header stays whole
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    assert twin("lit://sha", root_folder=out, endpoint=handle.endpoint).get("f.bin").read_bytes() == data
    with pytest.raises(DataLoss, match="sha256"):
        twin("lit://sha", root_folder=out, endpoint=handle.endpoint, verify="sha256").get("f.bin", overwrite=True)
    assert (out / "f.bin").read_bytes() == data  # the file got before stays as it was
    cli = [str(BIN / "drive"), "--endpoint", handle.endpoint, "get", "lit://sha/f.bin", str(out / "cli.bin")]
    assert subprocess.run(cli, capture_output=True, text=True, timeout=60).returncode == 0
    refused = subprocess.run([*cli, "--overwrite", "--verify", "sha256"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "sha256" in refused.stderr
    assert (out / "cli.bin").read_bytes() == data
