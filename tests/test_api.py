"""The Python API's semantics: ownership, listing, folders, waits, overwrite, root_folder,
pickling and stat, against the session daemon."""

from __future__ import annotations

import copy
import datetime
import multiprocessing
import os
import pathlib
import pickle
import time

import grpc
import pytest
from conftest import sha256_hex

from drive_client import Drive, DriveError

pytestmark = pytest.mark.timeout(60)


def make(uri: str, daemon, root: pathlib.Path | None, component: str | None = None, **kw) -> Drive:
    return Drive(uri, component_name=component, root_folder=None if root is None else str(root),
                 endpoint=daemon.endpoint, **kw)


def write(path: pathlib.Path, data: bytes | str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def put_later(uri: str, endpoint: str, root: str, path: str, delay: float) -> None:
    """Runs in another OS process (spawn): waits, then puts `path` from `root`."""
    time.sleep(delay)
    Drive(uri, component_name="late_writer", root_folder=root, endpoint=endpoint).put(path)


# --- ownership ------------------------------------------------------------------------------


def test_duplicates_refused_across_components(daemon, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "from a")
    make(drive_uri, daemon, tmp_path, "work_a").put("a.txt")
    write(tmp_path / "a.txt", "from b")
    with pytest.raises(FileExistsError):
        make(drive_uri, daemon, tmp_path, "work_b").put("a.txt")
    out = tmp_path / "out"
    out.mkdir()
    got = make(drive_uri, daemon, out, "reader").get("a.txt")
    assert got.read_bytes() == b"from a"
    assert make(drive_uri, daemon, out).list(".", component_name="work_b") == []


def test_duplicates_allowed_with_allow_duplicates(daemon, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "from a")
    make(drive_uri, daemon, tmp_path, "work_a").put("a.txt")
    write(tmp_path / "a.txt", "from b")
    make(drive_uri, daemon, tmp_path, "work_b", allow_duplicates=True).put("a.txt")
    out = tmp_path / "out"
    out.mkdir()
    r = make(drive_uri, daemon, out, "reader")
    assert r.list(".") == ["a.txt"], "de-duplicated across components"
    assert r.list(".", component_name="work_a") == ["a.txt"]
    assert r.list(".", component_name="work_b") == ["a.txt"]
    assert r.get("a.txt", component_name="work_a").read_bytes() == b"from a"
    assert r.get("a.txt", component_name="work_b", overwrite=True).read_bytes() == b"from b"


def test_component_replaces_its_own_file(daemon, tmp_path, drive_uri):
    d = make(drive_uri, daemon, tmp_path, "work_a")
    write(tmp_path / "a.txt", "v1")
    d.put("a.txt")
    gen1 = d.stat("a.txt").generation
    write(tmp_path / "a.txt", "version 2")
    d.put("a.txt")  # allow_duplicates=False does not stop replacing one's own file
    st = d.stat("a.txt")
    assert (st.size, st.sha256, st.component) == (9, sha256_hex(b"version 2"), "work_a")
    assert st.generation != gen1, "generation changes with every commit"
    out = tmp_path / "out"
    out.mkdir()
    assert make(drive_uri, daemon, out).get("a.txt").read_bytes() == b"version 2"


def test_delete_only_own_files(daemon, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "a")
    a = make(drive_uri, daemon, tmp_path, "work_a")
    b = make(drive_uri, daemon, tmp_path, "work_b")
    a.put("a.txt")
    with pytest.raises(FileNotFoundError):
        b.delete("a.txt")
    assert a.list(".") == ["a.txt"]
    assert a.stat("a.txt").component == "work_a"
    a.delete("a.txt")
    assert a.list(".") == []
    with pytest.raises(FileNotFoundError):
        a.stat("a.txt")


def test_delete_folder(daemon, tmp_path, drive_uri):
    write(tmp_path / "ck" / "x.pt", "x")
    write(tmp_path / "ck" / "sub" / "y.pt", "y")
    write(tmp_path / "keep.txt", "k")
    d = make(drive_uri, daemon, tmp_path, "work_a")
    d.put("ck")
    d.put("keep.txt")
    d.delete("ck")
    assert d.list(".") == ["keep.txt"]
    assert d.list("ck") == []


def test_delete_leaves_other_components_copy(daemon, tmp_path, drive_uri):
    write(tmp_path / "s.txt", "shared")
    a = make(drive_uri, daemon, tmp_path, "work_a", allow_duplicates=True)
    b = make(drive_uri, daemon, tmp_path, "work_b", allow_duplicates=True)
    a.put("s.txt")
    b.put("s.txt")
    a.delete("s.txt")
    assert a.list(".") == ["s.txt"]
    assert a.list(".", component_name="work_a") == []
    assert a.stat("s.txt").component == "work_b"


def test_ambiguity_names_both_components(daemon, tmp_path, drive_uri):
    from drive_client import AmbiguousPathError

    write(tmp_path / "m.txt", "m")
    make(drive_uri, daemon, tmp_path, "first_worker", allow_duplicates=True).put("m.txt")
    make(drive_uri, daemon, tmp_path, "second_worker", allow_duplicates=True).put("m.txt")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AmbiguousPathError, match="first_worker") as exc:
        make(drive_uri, daemon, out).get("m.txt")
    assert "second_worker" in str(exc.value)


def test_default_component_from_env(daemon, tmp_path, drive_uri, monkeypatch):
    write(tmp_path / "e.txt", "e")
    monkeypatch.setenv("DRIVE_COMPONENT", "env_comp")
    make(drive_uri, daemon, tmp_path).put("e.txt")
    monkeypatch.delenv("DRIVE_COMPONENT")
    assert make(drive_uri, daemon, tmp_path).stat("e.txt").component == "env_comp"
    write(tmp_path / "f.txt", "f")
    make(drive_uri, daemon, tmp_path).put("f.txt")
    assert make(drive_uri, daemon, tmp_path).stat("f.txt").component == "default"


def test_endpoint_from_env(daemon, tmp_path, drive_uri, monkeypatch):
    monkeypatch.setenv("DRIVE_ENDPOINT", daemon.endpoint)
    write(tmp_path / "e.txt", "e")
    d = Drive(drive_uri, root_folder=str(tmp_path))
    d.put("e.txt")
    assert d.list(".") == ["e.txt"]


# --- listing --------------------------------------------------------------------------------


def test_list_one_component_or_all(daemon, tmp_path, drive_uri):
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "a.txt", "a")
    write(tmp_path / "c" / "deep" / "f.txt", "f")
    make(drive_uri, daemon, tmp_path, "work_b").put("b.txt")
    make(drive_uri, daemon, tmp_path, "work_a").put("a.txt")
    make(drive_uri, daemon, tmp_path, "work_a").put("c/deep/f.txt")
    r = make(drive_uri, daemon, tmp_path, "reader")
    assert r.list(".") == ["a.txt", "b.txt", "c"]
    assert r.list("") == ["a.txt", "b.txt", "c"]
    assert r.list() == ["a.txt", "b.txt", "c"]
    assert r.list(".", component_name="work_a") == ["a.txt", "c"]
    assert r.list(".", component_name="work_b") == ["b.txt"]
    assert r.list(".", component_name="nobody") == []
    assert r.list("c") == ["c/deep"]
    assert r.list("c/deep") == ["c/deep/f.txt"]
    assert r.list("c/deep/") == ["c/deep/f.txt"]


def test_list_nested_put_and_shared_folder_deduplicated(daemon, tmp_path, drive_uri):
    write(tmp_path / "checkpoints" / "x.pt", "x")
    write(tmp_path / "checkpoints" / "y.pt", "y")
    make(drive_uri, daemon, tmp_path, "work_a").put("checkpoints/x.pt")
    assert make(drive_uri, daemon, tmp_path).list(".") == ["checkpoints"]
    assert make(drive_uri, daemon, tmp_path).list("checkpoints") == ["checkpoints/x.pt"]
    make(drive_uri, daemon, tmp_path, "work_b").put("checkpoints/y.pt")
    r = make(drive_uri, daemon, tmp_path)
    assert r.list(".") == ["checkpoints"], "a folder held by two components is listed once"
    assert r.list("checkpoints") == ["checkpoints/x.pt", "checkpoints/y.pt"]
    assert r.list("checkpoints", component_name="work_b") == ["checkpoints/y.pt"]


def test_list_missing_path_is_empty(daemon, tmp_path, drive_uri):
    d = make(drive_uri, daemon, tmp_path)
    assert d.list(".") == []
    assert d.list("no/such/folder") == []
    write(tmp_path / "a.txt", "a")
    d.put("a.txt")
    assert d.list("nothing_here") == []


def test_list_is_sorted(daemon, tmp_path, drive_uri):
    names = ["zeta.txt", "Alpha.txt", "beta.txt", "10.txt", "2.txt", "_u.txt"]
    d = make(drive_uri, daemon, tmp_path)
    for n in names:
        write(tmp_path / n, n)
        d.put(n)
    assert d.list(".") == sorted(names)


# --- folders in and out ----------------------------------------------------------------------


def test_put_folder_and_get_folder(daemon, tmp_path, drive_uri):
    src = tmp_path / "src"
    tree = {
        "checkpoints/step_1/model.pt": b"m1" * 1000,
        "checkpoints/step_2/model.pt": b"m2" * 1000,
        "checkpoints/log.txt": b"log",
        "checkpoints/empty.bin": b"",
    }
    for rel, data in tree.items():
        write(src / rel, data)
    make(drive_uri, daemon, src, "work_a").put("checkpoints")
    r = make(drive_uri, daemon, tmp_path)
    assert r.list(".") == ["checkpoints"]
    assert r.list("checkpoints") == [
        "checkpoints/empty.bin", "checkpoints/log.txt", "checkpoints/step_1", "checkpoints/step_2",
    ]
    st = r.stat("checkpoints")
    assert st.folder is True

    dst = tmp_path / "dst"
    dst.mkdir()
    got = make(drive_uri, daemon, dst, "reader").get("checkpoints")
    assert pathlib.Path(got) == dst / "checkpoints"
    for rel, data in tree.items():
        assert (dst / rel).read_bytes() == data, rel
    found = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert found == sorted(tree), "get of a folder recreates exactly its tree"


def test_put_folder_with_trailing_slash(daemon, tmp_path, drive_uri):
    write(tmp_path / "data" / "a.txt", "a")
    write(tmp_path / "data" / "b" / "c.txt", "c")
    d = make(drive_uri, daemon, tmp_path, "work_a")
    d.put("data/")
    assert d.list("data") == ["data/a.txt", "data/b"]
    assert d.list("data/b") == ["data/b/c.txt"]


def test_get_subfolder(daemon, tmp_path, drive_uri):
    write(tmp_path / "src" / "top" / "sub" / "f.txt", "f")
    write(tmp_path / "src" / "top" / "g.txt", "g")
    make(drive_uri, daemon, tmp_path / "src").put("top")
    dst = tmp_path / "dst"
    dst.mkdir()
    make(drive_uri, daemon, dst).get("top/sub")
    assert (dst / "top" / "sub" / "f.txt").read_bytes() == b"f"
    assert not (dst / "top" / "g.txt").exists()


# --- get: returns, waits, overwrite ---------------------------------------------------------


def test_get_returns_local_path(daemon, tmp_path, drive_uri):
    write(tmp_path / "src" / "d" / "a.txt", "hello")
    make(drive_uri, daemon, tmp_path / "src").put("d/a.txt")
    dst = tmp_path / "dst"
    dst.mkdir()
    got = make(drive_uri, daemon, dst).get("d/a.txt")
    assert isinstance(got, pathlib.Path)
    assert got == dst / "d" / "a.txt"
    assert got.read_bytes() == b"hello"


@pytest.mark.timeout(90)
def test_get_waits_for_put_from_another_process(daemon, tmp_path, drive_uri):
    src = tmp_path / "src"
    write(src / "late.txt", "worth the wait")
    dst = tmp_path / "dst"
    dst.mkdir()
    reader = make(drive_uri, daemon, dst, "reader")
    with pytest.raises(FileNotFoundError):
        reader.stat("late.txt")
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=put_later, args=(drive_uri, daemon.endpoint, str(src), "late.txt", 1.5))
    proc.start()
    try:
        t0 = time.monotonic()
        got = reader.get("late.txt", timeout=60)
        waited = time.monotonic() - t0
    finally:
        proc.join(60)
    assert proc.exitcode == 0
    assert got.read_bytes() == b"worth the wait"
    assert waited < 45, "the get should return soon after the other process's put"
    assert reader.stat("late.txt").component == "late_writer"


def test_get_times_out_quickly(daemon, tmp_path, drive_uri):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        make(drive_uri, daemon, tmp_path).get("never.txt", timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "never.txt").exists()


def test_get_timeout_on_existing_file_returns_at_once(daemon, tmp_path, drive_uri):
    write(tmp_path / "src" / "here.txt", "here")
    make(drive_uri, daemon, tmp_path / "src").put("here.txt")
    dst = tmp_path / "dst"
    dst.mkdir()
    t0 = time.monotonic()
    got = make(drive_uri, daemon, dst).get("here.txt", timeout=60)
    assert time.monotonic() - t0 < 10
    assert got.read_bytes() == b"here"


def test_existing_target_fails_before_waiting(daemon, tmp_path, drive_uri):
    write(tmp_path / "exists.txt", "local")
    d = make(drive_uri, daemon, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(FileExistsError) as exc:
        d.get("exists.txt", timeout=30)  # not in the drive: would wait 30s if checked late
    assert time.monotonic() - t0 < 5, "an existing target must fail at once, before any waiting"
    assert isinstance(exc.value, DriveError) and exc.value.code is None
    assert (tmp_path / "exists.txt").read_bytes() == b"local"


def test_overwrite_true_replaces(daemon, tmp_path, drive_uri):
    write(tmp_path / "src" / "f.txt", "remote version")
    make(drive_uri, daemon, tmp_path / "src").put("f.txt")
    write(tmp_path / "dst" / "f.txt", "local version that is longer than the remote one")
    got = make(drive_uri, daemon, tmp_path / "dst").get("f.txt", overwrite=True)
    assert got.read_bytes() == b"remote version"
    leftovers = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert leftovers == ["f.txt"], f"no temporary files left beside the target: {leftovers}"


def test_overwrite_false_existing_target_untouched(daemon, tmp_path, drive_uri):
    write(tmp_path / "src" / "f.txt", "remote")
    make(drive_uri, daemon, tmp_path / "src").put("f.txt")
    write(tmp_path / "dst" / "f.txt", "mine")
    with pytest.raises(FileExistsError):
        make(drive_uri, daemon, tmp_path / "dst").get("f.txt")
    assert (tmp_path / "dst" / "f.txt").read_bytes() == b"mine"


# --- root_folder ------------------------------------------------------------------------------


def test_root_folder_resolved_per_call(daemon, tmp_path, drive_uri, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    write(one / "a.txt", "from one")
    two.mkdir()
    d = make(drive_uri, daemon, None, "work_a")  # no root_folder: cwd at each call
    monkeypatch.chdir(one)
    d.put("a.txt")
    monkeypatch.chdir(two)
    got = d.get("a.txt")
    assert pathlib.Path(got).resolve() == (two / "a.txt").resolve()
    assert (two / "a.txt").read_bytes() == b"from one"
    write(two / "b.txt", "from two")
    d.put("b.txt")  # resolved in the new cwd
    assert d.list(".") == ["a.txt", "b.txt"]


def test_explicit_root_folder_ignores_cwd(daemon, tmp_path, drive_uri, monkeypatch):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    write(root / "a.txt", "in root")
    write(elsewhere / "a.txt", "elsewhere")
    d = make(drive_uri, daemon, root)
    monkeypatch.chdir(elsewhere)
    d.put("a.txt")
    (root / "a.txt").unlink()
    got = d.get("a.txt")
    assert pathlib.Path(got).resolve() == (root / "a.txt").resolve()
    assert got.read_bytes() == b"in root"
    assert (elsewhere / "a.txt").read_bytes() == b"elsewhere"


# --- the Drive object -------------------------------------------------------------------------


def test_str_is_uri(daemon, tmp_path, drive_uri):
    assert str(make(drive_uri, daemon, tmp_path)) == drive_uri
    assert str(Drive("lit://drive_1")) == "lit://drive_1"


def test_drive_picklable_and_deepcopyable_after_use(daemon, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "a")
    d = make(drive_uri, daemon, tmp_path, "work_a")
    d.put("a.txt")  # the channel now exists; it must not break pickling
    for clone in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d), copy.copy(d)):
        assert str(clone) == drive_uri
        assert clone.list(".") == ["a.txt"]
        assert clone.stat("a.txt").component == "work_a"
    d.delete("a.txt")
    assert pickle.loads(pickle.dumps(d)).list(".") == []


def test_drive_picklable_before_use(daemon, tmp_path, drive_uri):
    d = make(drive_uri, daemon, tmp_path, "work_x", allow_duplicates=True)
    clone = pickle.loads(pickle.dumps(d))
    write(tmp_path / "x.txt", "x")
    clone.put("x.txt")
    assert d.stat("x.txt").component == "work_x"


# --- stat -------------------------------------------------------------------------------------


def test_stat_fields(daemon, tmp_path, drive_uri):
    data = b"stat me please"
    write(tmp_path / "dir" / "s.txt", data)
    d = make(drive_uri, daemon, tmp_path, "stat_comp")
    before = datetime.datetime.now(datetime.timezone.utc)
    d.put("dir/s.txt")
    after = datetime.datetime.now(datetime.timezone.utc)
    st = d.stat("dir/s.txt")
    assert st.path == "dir/s.txt"
    assert st.size == len(data)
    assert st.sha256 == sha256_hex(data)
    assert st.etag == ""
    assert st.component == "stat_comp"
    assert isinstance(st.generation, int) and st.generation > 0
    assert st.folder is False
    assert isinstance(st.modified, datetime.datetime)
    modified = st.modified if st.modified.tzinfo else st.modified.replace(tzinfo=datetime.timezone.utc)
    slack = datetime.timedelta(seconds=5)
    assert before - slack <= modified <= after + slack, (before, modified, after)
    assert d.stat("dir/s.txt", component_name="stat_comp").sha256 == st.sha256
    folder = d.stat("dir")
    assert folder.folder is True and folder.size == 0 and folder.path == "dir"


def test_stat_of_empty_file(daemon, tmp_path, drive_uri):
    write(tmp_path / "empty", b"")
    d = make(drive_uri, daemon, tmp_path)
    d.put("empty")
    st = d.stat("empty")
    assert (st.size, st.sha256) == (0, sha256_hex(b""))


def test_stat_root_refused(daemon, tmp_path, drive_uri):
    d = make(drive_uri, daemon, tmp_path)
    for root in ("", "."):
        with pytest.raises(ValueError) as exc:
            d.stat(root)
        assert exc.value.code in (None, grpc.StatusCode.INVALID_ARGUMENT)


def test_put_returns_without_leaving_local_changes(daemon, tmp_path, drive_uri):
    write(tmp_path / "a.txt", "a")
    before = sorted(os.listdir(tmp_path))
    make(drive_uri, daemon, tmp_path).put("a.txt")
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "a.txt").read_bytes() == b"a"
