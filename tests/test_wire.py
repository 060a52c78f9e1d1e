"""The wire API's documented behaviour beyond errors: paging, recursive listing, folder and
root reads, multi-file puts, delete counts, many waiters, and a corrupted stored file."""

from __future__ import annotations

import os
import threading

import grpc
import pytest
from conftest import Background, put_messages, raw_get, raw_put, rpc_code, sha256_hex

from drive_client import DataLoss, Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def list_all(stub, drive: str, path: str = ".", **kw) -> tuple[list[pb.FileInfo], int]:
    entries, pages, token = [], 0, ""
    while True:
        resp = stub.List(pb.ListRequest(drive=drive, path=path, page_token=token, **kw), timeout=10)
        entries.extend(resp.entries)
        pages += 1
        token = resp.next_page_token
        if not token:
            return entries, pages
        assert pages < 100, "paging does not end"


def test_list_paging(stub, drive_uri):
    names = [f"f{i:02d}.txt" for i in range(25)]
    msgs = [m for n in names for m in put_messages(drive_uri, n, n.encode())]
    assert len(stub.Put(iter(msgs), timeout=30).files) == 25
    entries, pages = list_all(stub, drive_uri, page_size=10)
    assert [e.path for e in entries] == names
    assert pages == 3
    one = stub.List(pb.ListRequest(drive=drive_uri, path=".", page_size=10))
    assert len(one.entries) == 10 and one.next_page_token
    everything = stub.List(pb.ListRequest(drive=drive_uri, path="."))
    assert len(everything.entries) == 25 and not everything.next_page_token


@pytest.mark.parametrize("recursive", [False, True])
def test_list_paging_across_components(stub, drive_uri, recursive):
    """Pages of 3 are cut from each component's sorted names and merged: every entry once, in order."""
    held = {
        "ca": ["a.txt", "c.txt", "dir/x.txt", "e.txt", "shared.txt", "z.txt"],
        "cb": ["b.txt", "dir/y.txt", "d.txt", "shared.txt", "sub/deep/f.txt", "y.txt"],
    }
    for component, paths in held.items():
        for path in paths:
            raw_put(stub, drive_uri, f"{path}", f"{component}:{path}".encode(), component=component,
                    allow_duplicates=True)
    all_paths = sorted({p for paths in held.values() for p in paths})
    expected = all_paths if recursive else sorted({p.split("/")[0] for p in all_paths})
    for page_size in (1, 3, 10000):
        entries, pages = list_all(stub, drive_uri, page_size=page_size, recursive=recursive)
        assert [e.path for e in entries] == expected, f"page_size {page_size}"
        assert pages == max(1, -(-len(expected) // page_size))
    by_path = {e.path: e for e in list_all(stub, drive_uri, page_size=3, recursive=recursive)[0]}
    assert by_path["shared.txt"].component == "", "held by both components"
    assert by_path["z.txt"].component == "ca" and by_path["y.txt"].component == "cb"
    if not recursive:
        assert by_path["dir"].folder and by_path["dir"].component == ""
        assert by_path["sub"].folder and by_path["sub"].component == "cb"
    one, _ = list_all(stub, drive_uri, path="dir", page_size=1, recursive=recursive, component="cb")
    assert [e.path for e in one] == ["dir/y.txt"]


def test_recursive_list_pages_follow_path_order_through_folders(stub, drive_uri):
    """Pages of a recursive list are cut by walking folders from the page token on, in path order.

    A folder sorts by its paths ("a/x"), not by its name: "a-b/x" < "a.txt" < "a/x" < "a0".
    """
    paths = ["a/x", "a/y/z", "a/y0", "a.txt", "a-b/x", "a0", "b/c/d/e.txt", "b/c.txt", "b/c0/f", "b.d/g", "c"]
    for path in paths:
        raw_put(stub, drive_uri, path, path.encode(), component="ca")
    raw_put(stub, drive_uri, "a/y/w", b"other", component="cb", allow_duplicates=True)
    expected = sorted([*paths, "a/y/w"])
    for page_size in (1, 2, 5, 10000):
        entries, pages = list_all(stub, drive_uri, page_size=page_size, recursive=True)
        assert [e.path for e in entries] == expected, f"page_size {page_size}"
        assert pages == -(-len(expected) // page_size)
    under_b, _ = list_all(stub, drive_uri, path="b", page_size=2, recursive=True)
    assert [e.path for e in under_b] == ["b/c.txt", "b/c/d/e.txt", "b/c0/f"]


@pytest.mark.parametrize("mtime", ["settled", "same tick"])
def test_list_pages_see_files_put_between_them(daemon, stub, drive_uri, mtime):
    """The daemon remembers a folder's sorted names by its mtime: a page after a put sees the new file.

    "settled": the folder's mtime is old, so its names are remembered, and the put changes
    the mtime. "same tick": a put within one tick of the file system's clock leaves the
    mtime as it was (set back here), so a fresh mtime must not be trusted.
    """
    for i in range(0, 10, 2):
        raw_put(stub, drive_uri, f"big/f{i}.txt", b"x")
    folder = next(daemon.data_dir.glob(f"objects/{drive_uri.removeprefix('lit://')}/*/big"))
    fresh = folder.stat().st_mtime_ns
    if mtime == "settled":
        os.utime(folder, ns=(fresh - 10**10, fresh - 10**10))
    first = stub.List(pb.ListRequest(drive=drive_uri, path="big", page_size=2))
    assert [e.path for e in first.entries] == ["big/f0.txt", "big/f2.txt"]
    raw_put(stub, drive_uri, "big/f1.txt", b"before the token")
    raw_put(stub, drive_uri, "big/f3.txt", b"after the token")
    if mtime == "same tick":
        os.utime(folder, ns=(fresh, fresh))
    rest, token = [], first.next_page_token
    while token:
        page = stub.List(pb.ListRequest(drive=drive_uri, path="big", page_token=token, page_size=2))
        rest.extend(e.path for e in page.entries)
        token = page.next_page_token
    assert rest == ["big/f3.txt", "big/f4.txt", "big/f6.txt", "big/f8.txt"]
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="big/f3.txt")).size == len(b"after the token")


def test_list_recursive_and_entry_fields(stub, drive_uri):
    raw_put(stub, drive_uri, "top.txt", b"12345", component="ca")
    raw_put(stub, drive_uri, "d/x.txt", b"x", component="ca")
    raw_put(stub, drive_uri, "d/e/y.txt", b"y", component="cb")
    raw_put(stub, drive_uri, "solo/z.txt", b"z", component="cb")
    entries, _ = list_all(stub, drive_uri)
    by_path = {e.path: e for e in entries}
    assert list(by_path) == ["d", "solo", "top.txt"]
    assert by_path["d"].folder and by_path["d"].component == "", "a folder of several components"
    assert by_path["solo"].folder and by_path["solo"].component == "cb"
    top = by_path["top.txt"]
    assert (top.folder, top.size, top.component) == (False, 5, "ca")
    assert top.generation > 0 and top.modified.seconds > 0
    rec, _ = list_all(stub, drive_uri, recursive=True)
    assert [e.path for e in rec] == ["d/e/y.txt", "d/x.txt", "solo/z.txt", "top.txt"]
    assert not any(e.folder for e in rec)
    rec_d, _ = list_all(stub, drive_uri, path="d", recursive=True, component="ca")
    assert [e.path for e in rec_d] == ["d/x.txt"]


def test_list_file_entries_carry_sha256(stub, drive_uri):
    """FileInfo.sha256 is empty only for s3:// objects and folders; a listing returns FileInfos."""
    raw_put(stub, drive_uri, "top.txt", b"12345")
    raw_put(stub, drive_uri, "d/x.txt", b"x")
    entries, _ = list_all(stub, drive_uri)
    assert [(e.path, e.sha256) for e in entries] == [("d", ""), ("top.txt", sha256_hex(b"12345"))]
    rec, _ = list_all(stub, drive_uri, recursive=True)
    assert [(e.path, e.sha256) for e in rec] == [("d/x.txt", sha256_hex(b"x")), ("top.txt", sha256_hex(b"12345"))]


def test_list_of_a_file_path_lists_that_file(stub, drive_uri):
    raw_put(stub, drive_uri, "d/f.txt", b"f")
    entries, _ = list_all(stub, drive_uri, path="d/f.txt")
    assert [e.path for e in entries] == ["d/f.txt"]


def test_get_folder_and_root_in_path_order(stub, drive_uri):
    files = {"b/2.txt": b"two", "a.txt": b"a", "b/1.txt": b"one", "b/c/3.txt": b""}
    for p, data in files.items():
        raw_put(stub, drive_uri, p, data)
    got = raw_get(stub, drive_uri, "b")
    assert [(i.path, d) for i, d in got] == [("b/1.txt", b"one"), ("b/2.txt", b"two"), ("b/c/3.txt", b"")]
    for info, data in got:
        assert info.size == len(data) and info.sha256 == sha256_hex(data)
    whole = raw_get(stub, drive_uri, "")
    assert [i.path for i, _ in whole] == sorted(files)
    assert [i.path for i, _ in raw_get(stub, drive_uri, ".")] == sorted(files)


def test_put_response_and_delete_counts(stub, drive_uri):
    msgs = [*put_messages(drive_uri, "f/a", b"a"), *put_messages(drive_uri, "f/b", b"bb"),
            *put_messages(drive_uri, "g", b"")]
    resp = stub.Put(iter(msgs), timeout=30)
    assert [(f.path, f.size, f.sha256) for f in resp.files] == [
        ("f/a", 1, sha256_hex(b"a")), ("f/b", 2, sha256_hex(b"bb")), ("g", 0, sha256_hex(b"")),
    ]
    assert all(f.component == "default" and f.generation > 0 for f in resp.files)
    assert stub.Delete(pb.DeleteRequest(drive=drive_uri, path="f")).files_deleted == 2
    assert stub.Delete(pb.DeleteRequest(drive=drive_uri, path="g")).files_deleted == 1
    assert [e.path for e in list_all(stub, drive_uri)[0]] == []


def test_stat_folder_and_component_filter(stub, drive_uri):
    raw_put(stub, drive_uri, "d/x", b"x", component="ca")
    raw_put(stub, drive_uri, "d/y", b"y", component="cb")
    info = stub.Stat(pb.StatRequest(drive=drive_uri, path="d"))
    assert info.folder and info.size == 0 and info.path == "d" and info.sha256 == ""
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="d", component="ca")).folder
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="d/y", component="cb")).component == "cb"


def test_normalised_paths(stub, drive_uri):
    raw_put(stub, drive_uri, "a//b/./c.txt", b"c")
    assert stub.Stat(pb.StatRequest(drive=drive_uri, path="a/b/c.txt")).path == "a/b/c.txt"
    [(info, data)] = raw_get(stub, drive_uri, "./a/b//c.txt")
    assert info.path == "a/b/c.txt" and data == b"c"


def test_many_waiters_answered_by_one_put(stub, drive_uri, daemon):
    waiting = daemon.open_requests("Get")
    waiters = [Background(lambda: raw_get(stub, drive_uri, "event.txt", wait_seconds=30)) for _ in range(6)]
    for w in waiters:
        w.start()
    daemon.wait_open("Get", waiting + 6)
    assert all(w.is_alive() for w in waiters), "the waiters should still be waiting"
    raw_put(stub, drive_uri, "event.txt", b"go", component="signaller")
    for w in waiters:
        [(info, data)] = w.join_checked(20)
        assert data == b"go" and info.component == "signaller"


def test_wait_for_one_component_ignores_others(stub, drive_uri, daemon):
    """A put by another component wakes the waiting Get, which looks again and goes on waiting:
    had it answered, it would have answered with the other component's file."""
    result: dict[str, object] = {}

    def wait():
        result["got"] = raw_get(stub, drive_uri, "f.txt", component="wanted", wait_seconds=20)

    waiting = daemon.open_requests("Get")
    t = threading.Thread(target=wait)
    t.start()
    daemon.wait_open("Get", waiting + 1)
    raw_put(stub, drive_uri, "f.txt", b"other", component="other", allow_duplicates=True)
    raw_put(stub, drive_uri, "f.txt", b"wanted", component="wanted", allow_duplicates=True)
    t.join(20)
    [(info, data)] = result["got"]
    assert (info.component, data) == ("wanted", b"wanted")


def test_large_chunks_over_message_limit_refused(stub, drive_uri):
    """A single message over the server's limit: RESOURCE_EXHAUSTED, nothing stored."""
    big = os.urandom(8 * 1024 * 1024)
    code = rpc_code(lambda: raw_put(stub, drive_uri, "big.bin", big, chunk=len(big)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rpc_code(lambda: stub.Stat(pb.StatRequest(drive=drive_uri, path="big.bin"))) == grpc.StatusCode.NOT_FOUND


def test_corrupted_stored_file_is_not_delivered(own_daemon, tmp_path, drive_uri):
    """Bit rot in the data dir: the get fails (DATA_LOSS) and leaves no local file."""
    data = os.urandom(300_000)
    with grpc.insecure_channel(own_daemon.endpoint) as ch:
        raw_put(drive_pb2_grpc.DriveServiceStub(ch), drive_uri, "rot.bin", data)
    stored = [
        os.path.join(d, n) for d, _, names in os.walk(own_daemon.data_dir) for n in names
        if data in open(os.path.join(d, n), "rb").read()  # noqa: SIM115
    ]
    assert len(stored) == 1, stored
    with open(stored[0], "r+b") as f:
        blob = f.read()
        pos = blob.index(data) + len(data) // 2
        f.seek(pos)
        f.write(bytes([blob[pos] ^ 0xFF]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataLoss) as exc:  # found by the daemon or by the client's own sha256 check
        Drive(drive_uri, root_folder=str(out), endpoint=own_daemon.endpoint).get("rot.bin")
    assert exc.value.code in (None, grpc.StatusCode.DATA_LOSS)
    assert list(out.iterdir()) == [], "a corrupt file must not be left at (or beside) the target"


def test_folder_read_across_components_comes_in_path_order(stub, drive_uri):
    raw_put(stub, drive_uri, "d/b.txt", b"b", component="a")
    raw_put(stub, drive_uri, "d/a.txt", b"a", component="z")
    raw_put(stub, drive_uri, "d/c.txt", b"c", component="a")
    files = raw_get(stub, drive_uri, "d")
    assert [(info.path, info.component, data) for info, data in files] == [
        ("d/a.txt", "z", b"a"), ("d/b.txt", "a", b"b"), ("d/c.txt", "a", b"c"),
    ]


def whole_file(drive: str, path: str, data: bytes, sha256: str | None = None) -> pb.PutRequest:
    header = pb.PutHeader(drive=drive, path=path, size=len(data))
    return pb.PutRequest(
        file=pb.PutFileRequest(header=header, data=data, sha256=sha256_hex(data) if sha256 is None else sha256)
    )


def test_put_stream_mixes_whole_files_and_chunked_ones(stub, drive_uri):
    msgs = [
        whole_file(drive_uri, "mix/a.txt", b"alpha"),
        *put_messages(drive_uri, "mix/b.bin", b"b" * 3000, chunk=1000),
        whole_file(drive_uri, "mix/c.txt", b""),
    ]
    reply = stub.Put(iter(msgs), timeout=30)
    assert [(f.path, f.size) for f in reply.files] == [("mix/a.txt", 5), ("mix/b.bin", 3000), ("mix/c.txt", 0)]
    got = {info.path: data for info, data in raw_get(stub, drive_uri, "mix")}
    assert got == {"mix/a.txt": b"alpha", "mix/b.bin": b"b" * 3000, "mix/c.txt": b""}


def test_whole_file_message_refusals_store_nothing(stub, drive_uri):
    header = pb.PutRequest(header=pb.PutHeader(drive=drive_uri, path="open.txt"))
    inside_a_file = iter([header, pb.PutRequest(data=b"abc"), whole_file(drive_uri, "w.txt", b"w")])
    assert rpc_code(lambda: stub.Put(inside_a_file)) == grpc.StatusCode.INVALID_ARGUMENT
    wrong_sha = iter([whole_file(drive_uri, "w.txt", b"w", sha256=sha256_hex(b"other"))])
    assert rpc_code(lambda: stub.Put(wrong_sha)) == grpc.StatusCode.DATA_LOSS
    no_sha = iter([whole_file(drive_uri, "w.txt", b"w", sha256="")])
    assert rpc_code(lambda: stub.Put(no_sha)) == grpc.StatusCode.INVALID_ARGUMENT
    short = whole_file(drive_uri, "w.txt", b"w")
    short.file.header.size = 2
    assert rpc_code(lambda: stub.Put(iter([short]))) == grpc.StatusCode.DATA_LOSS
    hostile = iter([whole_file(drive_uri, "../w.txt", b"w")])
    assert rpc_code(lambda: stub.Put(hostile)) == grpc.StatusCode.INVALID_ARGUMENT
    assert list(stub.List(pb.ListRequest(drive=drive_uri, path=".")).entries) == []


def test_get_sends_whole_small_files_only_when_asked(stub, drive_uri):
    small, big = b"s" * 100, os.urandom((1 << 20) + 1)
    raw_put(stub, drive_uri, "w/a.txt", small)
    raw_put(stub, drive_uri, "w/b.bin", big)
    asked = list(stub.Get(pb.GetRequest(drive=drive_uri, path="w", whole_small_files=True), timeout=30))
    assert [m.WhichOneof("message") for m in asked[:2]] == ["file", "info"]
    assert (asked[0].file.info.path, asked[0].file.info.size, asked[0].file.data) == ("w/a.txt", 100, small)
    assert asked[0].file.info.sha256 == sha256_hex(small)
    assert b"".join(m.data for m in asked[2:]) == big
    plain = list(stub.Get(pb.GetRequest(drive=drive_uri, path="w"), timeout=30))
    assert [m.WhichOneof("message") for m in plain[:3]] == ["info", "data", "info"]
    assert "file" not in {m.WhichOneof("message") for m in plain}
