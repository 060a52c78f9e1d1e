"""Bytes in == bytes out at the edges (empty, 1 byte, one chunk, one chunk + 1, 256 MiB),
odd names, and atomicity: readers see whole versions; cancelled or crashed uploads leave
nothing visible and no temporary data."""

from __future__ import annotations

import os
import pathlib
import resource
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest
from conftest import (
    MIB,
    ROOT,
    Background,
    file_sha256,
    holds_bytes,
    put_messages,
    raw_get,
    raw_put,
    rpc_code,
    sha256_hex,
    snapshot,
    upload_bytes,
    wait_until,
    write_random_file,
)

from drive_client import Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def make(uri, daemon, root, component=None, **kw) -> Drive:
    return Drive(uri, component_name=component, root_folder=str(root), endpoint=daemon.endpoint, **kw)


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, MIB + 1, 3 * MIB + 17])
def test_roundtrip_sizes(daemon, stub, tmp_path, drive_uri, size):
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    digest = write_random_file(src / "f.bin", size)
    make(drive_uri, daemon, src).put("f.bin")
    st = make(drive_uri, daemon, src).stat("f.bin")
    assert (st.size, st.sha256) == (size, digest)
    got = make(drive_uri, daemon, dst).get("f.bin")
    assert got.stat().st_size == size
    assert file_sha256(got) == digest
    # the wire agrees: info first, then exactly `size` bytes
    [(info, data)] = raw_get(stub, drive_uri, "f.bin")
    assert (info.size, info.sha256, len(data)) == (size, digest, size)
    assert sha256_hex(data) == digest


def test_raw_chunking_does_not_matter(stub, drive_uri):
    data = os.urandom(MIB + 5)
    for chunk in (1, 4096, 300_000, MIB):
        payload = data[:3000] if chunk == 1 else data  # one-byte chunks: keep it short
        raw_put(stub, drive_uri, f"c{chunk}.bin", payload, chunk=chunk)
        [(info, got)] = raw_get(stub, drive_uri, f"c{chunk}.bin")
        assert got == payload and info.sha256 == sha256_hex(payload)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_256_mib_random(daemon, tmp_path, drive_uri):
    size = 256 * MIB
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    digest = write_random_file(src / "big.bin", size)
    d = make(drive_uri, daemon, src, "big")
    client_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        d.put("big.bin")
        st = d.stat("big.bin")
        assert (st.size, st.sha256) == (size, digest)
        got = make(drive_uri, daemon, dst).get("big.bin")
        assert got.stat().st_size == size
        assert file_sha256(got) == digest
        client_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - client_peak_before
        print(f"client peak RSS grew by {client_growth // 1024} MiB")
        assert client_growth < 150 * 1024, f"the client's peak RSS grew {client_growth // 1024} MiB: it buffers files"
        status = pathlib.Path(f"/proc/{daemon.proc.pid}/status")
        if status.exists():
            peak_kib = next(int(line.split()[1]) for line in status.read_text().splitlines()
                            if line.startswith("VmHWM:"))
            print(f"daemon peak RSS {peak_kib // 1024} MiB")
            # bounded by a few chunks per transfer, not by the file size
            assert peak_kib < 200 * 1024, f"daemon peak RSS {peak_kib // 1024} MiB for a 256 MiB transfer"
        else:
            print("no /proc: daemon memory not checked")
    finally:
        (src / "big.bin").unlink(missing_ok=True)
        (dst / "big.bin").unlink(missing_ok=True)
        d.delete("big.bin")


NAMES = [
    "naïve résumé.txt",
    "日本語/ファイル 名.bin",
    "with space/and more spaces.txt",
    "emoji 🚀 file.txt",
    "Ünïcödé dir/sub dir/ä ö ü.dat",
    "a+b=c&d#e%f.txt",
    "trailing.dots...txt",
]


def test_unicode_and_space_names(daemon, tmp_path, drive_uri):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    d = make(drive_uri, daemon, src, "uni")
    for name in NAMES:
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(name.encode())
        d.put(name)
    tops = sorted({n.split("/")[0] for n in NAMES})
    assert d.list(".") == tops
    assert d.list("日本語") == ["日本語/ファイル 名.bin"]
    assert d.list("Ünïcödé dir/sub dir") == ["Ünïcödé dir/sub dir/ä ö ü.dat"]
    r = make(drive_uri, daemon, dst)
    for name in NAMES:
        assert r.stat(name).path == name
        got = r.get(name)
        assert got.read_bytes() == name.encode(), name


# --- atomicity -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_reader_during_replacement_sees_whole_versions(daemon, stub, tmp_path, drive_uri):
    size = 4 * MIB
    roots = [tmp_path / "va", tmp_path / "vb"]
    digests = {write_random_file(r / "v.bin", size) for r in roots}
    assert len(digests) == 2
    writers = [make(drive_uri, daemon, r, "writer") for r in roots]
    writers[0].put("v.bin")
    stop = threading.Event()
    rounds = 12

    def write_loop():
        try:
            for i in range(rounds):
                writers[i % 2].put("v.bin")
        finally:
            stop.set()

    reads: list[str] = []

    def read_loop_drive():
        reader_root = tmp_path / "reader"
        reader_root.mkdir()
        reader = make(drive_uri, daemon, reader_root)
        while not stop.is_set() or not reads:
            got = reader.get("v.bin", overwrite=True)
            reads.append(file_sha256(got))

    raw_reads: list[tuple[str, str, int]] = []

    def read_loop_raw():
        while not stop.is_set() or not raw_reads:
            [(info, data)] = raw_get(stub, drive_uri, "v.bin")
            raw_reads.append((info.sha256, sha256_hex(data), len(data)))

    threads = [Background(write_loop), Background(read_loop_drive), Background(read_loop_raw)]
    for t in threads:
        t.start()
    for t in threads:
        t.join_checked(100)
    assert reads and raw_reads
    assert set(reads) <= digests, "a reader got a file that is neither version"
    for announced, actual, n in raw_reads:
        assert n == size and actual == announced and actual in digests
    print(f"{len(reads)} Drive reads, {len(raw_reads)} raw reads during {rounds} replacements")


def test_concurrent_puts_of_one_path_one_wins(daemon, tmp_path, drive_uri):
    roots = [tmp_path / f"w{i}" for i in range(4)]
    digests = {write_random_file(r / "same.bin", 2 * MIB + i) for i, r in enumerate(roots)}
    threads = [Background(lambda r=r: make(drive_uri, daemon, r, "racer").put("same.bin")) for r in roots]
    for t in threads:
        t.start()
    for t in threads:
        t.join_checked(60)
    st = make(drive_uri, daemon, tmp_path).stat("same.bin")
    assert st.sha256 in digests
    out = tmp_path / "out"
    out.mkdir()
    got = make(drive_uri, daemon, out).get("same.bin")
    assert file_sha256(got) == st.sha256


def assert_data_dir_returns_to(handle, before: dict[str, str], what: str) -> None:
    ok = wait_until(lambda: snapshot(handle.data_dir) == before, timeout=5)
    after = snapshot(handle.data_dir)
    extra = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    missing = sorted(set(before) - set(after))
    assert ok, f"{what}: data dir changed: extra={extra} changed={changed} missing={missing}"


def test_cancelled_upload_leaves_nothing(own_daemon, drive_uri):
    handle = own_daemon
    gate = threading.Event()
    sent = threading.Event()

    def requests():
        yield pb.PutRequest(header=pb.PutHeader(drive=drive_uri, path="cancelled.bin"))
        for _ in range(3):
            yield pb.PutRequest(data=os.urandom(MIB))
        sent.set()
        gate.wait(30)

    with grpc.insecure_channel(handle.endpoint) as ch:
        s = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(s, "lit://warmup", "w.txt", b"w")  # a stable baseline that includes any lazily made dirs
        before = snapshot(handle.data_dir)
        fut = s.Put.future(requests(), timeout=60)
        assert sent.wait(10)
        assert wait_until(lambda: upload_bytes(handle.data_dir) >= MIB), "no upload data reached the daemon"
        during = snapshot(handle.data_dir)
        fut.cancel()
        gate.set()
        assert fut.cancelled() or fut.exception().code() == grpc.StatusCode.CANCELLED
        nf = rpc_code(lambda: s.Stat(pb.StatRequest(drive=drive_uri, path="cancelled.bin")))
        assert nf == grpc.StatusCode.NOT_FOUND
        assert list(s.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []
        assert_data_dir_returns_to(handle, before, "after a cancelled upload")
    print(f"during the upload the data dir had {len(set(during) - set(before))} extra entries")


def test_upload_ending_without_finish_leaves_nothing(own_daemon, drive_uri):
    with grpc.insecure_channel(own_daemon.endpoint) as ch:
        s = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(s, "lit://warmup", "w.txt", b"w")
        before = snapshot(own_daemon.data_dir)
        msgs = list(put_messages(drive_uri, "unfinished.bin", os.urandom(2 * MIB)))[:-1]  # no finish
        code = rpc_code(lambda: s.Put(iter(msgs), timeout=30))
        assert code != grpc.StatusCode.OK
        assert rpc_code(lambda: s.Stat(pb.StatRequest(drive=drive_uri, path="unfinished.bin"))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert_data_dir_returns_to(own_daemon, before, "after an upload without finish")


def test_multi_file_stream_keeps_finished_files(own_daemon, drive_uri):
    """Files finished earlier in a stream stay committed when the stream then breaks off."""
    with grpc.insecure_channel(own_daemon.endpoint) as ch:
        s = drive_pb2_grpc.DriveServiceStub(ch)
        msgs = [*put_messages(drive_uri, "one.txt", b"one"), *put_messages(drive_uri, "two.txt", b"two")]
        resp = s.Put(iter(msgs), timeout=30)
        assert [f.path for f in resp.files] == ["one.txt", "two.txt"]
        broken = [*put_messages(drive_uri, "three.txt", b"3"), *put_messages(drive_uri, "four.txt", b"4")]
        broken.pop()  # four.txt never finishes
        assert rpc_code(lambda: s.Put(iter(broken), timeout=30)) != grpc.StatusCode.OK
        names = [e.path for e in s.List(pb.ListRequest(drive=drive_uri, path=".")).entries]
        assert names == ["one.txt", "three.txt", "two.txt"]


CRASHING_CLIENT = textwrap.dedent(
    """
    import os, sys, threading, grpc
    sys.path.insert(0, {root!r})
    from drive_client.pb import drive_pb2 as pb, drive_pb2_grpc
    ch = grpc.insecure_channel({endpoint!r})
    stub = drive_pb2_grpc.DriveServiceStub(ch)
    gate = threading.Event()
    def reqs():
        yield pb.PutRequest(header=pb.PutHeader(drive={drive!r}, path="crashed.bin"))
        for _ in range(4):
            yield pb.PutRequest(data=os.urandom(1 << 20))
        print("sent", flush=True)
        gate.wait(60)
    fut = stub.Put.future(reqs(), timeout=60)
    sys.stdin.readline()
    os._exit(3)  # crash: no cancel, no goodbye
    """
)


def test_crashed_client_upload_leaves_nothing(own_daemon, drive_uri):
    with grpc.insecure_channel(own_daemon.endpoint) as ch:
        s = drive_pb2_grpc.DriveServiceStub(ch)
        raw_put(s, "lit://warmup", "w.txt", b"w")
        before = snapshot(own_daemon.data_dir)
        script = CRASHING_CLIENT.format(root=str(ROOT), endpoint=own_daemon.endpoint, drive=drive_uri)
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "sent"
            assert wait_until(lambda: upload_bytes(own_daemon.data_dir) >= MIB), "no upload data reached the daemon"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.wait(20) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
        assert rpc_code(lambda: s.Stat(pb.StatRequest(drive=drive_uri, path="crashed.bin"))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert_data_dir_returns_to(own_daemon, before, "after a crashed client's upload")


def test_stored_file_matches_sha_in_data_dir(own_daemon, drive_uri):
    """The bytes sent are kept in the data dir (some file there contains them)."""
    data = os.urandom(100_000)
    with grpc.insecure_channel(own_daemon.endpoint) as ch:
        raw_put(drive_pb2_grpc.DriveServiceStub(ch), drive_uri, "kept.bin", data)
    assert holds_bytes(own_daemon.data_dir, data)


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_reader_keeps_its_version_when_file_changes_mid_read(stub, drive_uri, change):
    old = os.urandom(12 * MIB)
    raw_put(stub, drive_uri, "moving.bin", old)
    stream = stub.Get(pb.GetRequest(drive=drive_uri, path="moving.bin"), timeout=60)
    first = next(stream)
    assert first.WhichOneof("message") == "info" and first.info.sha256 == sha256_hex(old)
    received = bytearray(next(stream).data)
    if change == "delete":
        stub.Delete(pb.DeleteRequest(drive=drive_uri, path="moving.bin"), timeout=10)
    else:
        raw_put(stub, drive_uri, "moving.bin", os.urandom(12 * MIB))
    for msg in stream:
        received.extend(msg.data)
    assert len(received) == len(old) and sha256_hex(bytes(received)) == sha256_hex(old), (
        "a reader must get the whole version it started, even when the file is deleted or replaced"
    )


def test_concurrent_puts_by_components_without_duplicates(daemon, tmp_path, drive_uri):
    """allow_duplicates=False under a race: at most one component ends up holding the path."""
    n = 6
    for i in range(n):
        write_random_file(tmp_path / f"c{i}" / "race.bin", 512 * 1024)
    start = threading.Event()

    def put(i: int):
        start.wait(10)
        try:
            make(drive_uri, daemon, tmp_path / f"c{i}", f"comp_{i}").put("race.bin")
            return "ok"
        except FileExistsError:
            return "refused"

    threads = [Background(lambda i=i: put(i)) for i in range(n)]
    for t in threads:
        t.start()
    start.set()
    outcomes = [t.join_checked(60) for t in threads]
    reader = make(drive_uri, daemon, tmp_path)
    holders = [i for i in range(n) if reader.list(".", component_name=f"comp_{i}") == ["race.bin"]]
    assert len(holders) == 1, f"components holding the path: {holders} (outcomes {outcomes})"
    assert outcomes.count("ok") == 1, outcomes
    assert reader.stat("race.bin").component == f"comp_{holders[0]}"
