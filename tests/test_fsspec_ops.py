"""`lit://`'s own queries and changes against fsspec's `memory://`, property-based (hypothesis): a small tree of files
(nested folders, names with spaces, names that are prefixes of others: `a`, `ab`, `a.b`) and a sequence of calls
(`ls`, `info`, `exists`, `find`, `glob`, `walk`, `du`, `size`, `sizes`, `cat_file`, `cat`, `cat_ranges`, `head`,
`tail`, `modified`, `checksum`, `ukey`, `expand_path`, `rm`, `rm_file`, `mv`, `copy`, `mkdir`, `makedirs`, `rmdir`,
`touch`, `pipe_file`), with paths spelled `DRIVE/path`, `lit://DRIVE/path` or `lit://DRIVE//path`, run on a fresh
drive and on `memory://` holding the same files: each call gives the same answer (or an exception of the same
class), and a change leaves the same files.

What README documents as different is normalised: `lit://` has no empty folders (before every call the references
hold only the folders that hold files, and the drive root), info dicts are compared on name, size and type, the
order of listings is not compared, and `documented` accepts the answers README's fsspec section gives where both
references differ. Where `memory://` is odd (a folder read as a missing file, a file and a folder of one name, a
folder moved into its parent lost), the local filesystem (`file://`) holding the same files decides. The tests below
the property pin, on both faces, each defect it found.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given
from hypothesis import strategies as st

from drive_client.fsspec import AsyncDriveFileSystem, DriveFileSystem

pytestmark = pytest.mark.timeout(120)

NAMES = ["a", "ab", "a.b", "e f", "c"]
FILE_PATHS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
CONTENTS = st.binary(max_size=12)
GLOBS = ["*", "**", "a*", "a?", "a[b.]*", "[!c]*", "*/", "**/", "c/**", "**/a", "*/*", "a*/", "e f/*"]
BOUNDS = [None, 0, 1, 3, -1, -4, 20]


@pytest.fixture(scope="module")
def lit(daemon) -> DriveFileSystem:
    return DriveFileSystem(endpoint=daemon.endpoint, component_name="ops", skip_instance_cache=True)


@pytest.fixture(scope="module")
def local_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fsspec-ops")


def consistent(paths: list[str]) -> list[str]:
    """`paths` without those that name a file where another path needs a folder (or the reverse)."""
    kept: list[str] = []
    for path in paths:
        if all(not (p == path or p.startswith(path + "/") or path.startswith(p + "/")) for p in kept):
            kept.append(path)
    return kept


TREES = st.lists(st.tuples(FILE_PATHS, CONTENTS), max_size=7).map(
    lambda pairs: {p: dict(pairs)[p] for p in consistent([p for p, _ in pairs])}
)


class Fs:
    """One filesystem holding the example's tree under `root`: how its paths are spelled, and its files."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root

    def path(self, sub: str) -> str:
        return f"{self.root}/{sub}" if sub else self.root

    def files(self) -> dict[str, bytes]:
        found = self.fs.find(self.root)
        return {name.removeprefix(self.root + "/"): self.fs.cat_file(name) for name in found}


class Memory(Fs):
    """`memory://`, as `lit://` is: no empty folders, the root always there (rebuilt from the files at each step)."""

    def hold(self, files: dict[str, bytes]) -> None:
        store, dirs = self.fs.store, self.fs.pseudo_dirs
        for key in [k for k in store if k == self.root or k.startswith(self.root + "/")]:
            del store[key]
        dirs[:] = [d for d in dirs if not (d == self.root or d.startswith(self.root + "/"))]
        self.fs.makedirs(self.root, exist_ok=True)
        for sub, data in files.items():
            self.fs.makedirs(self.fs._parent(f"{self.root}/{sub}"), exist_ok=True)
            self.fs.pipe_file(f"{self.root}/{sub}", data)


class Local(Fs):
    """`file://` in a folder of its own, rebuilt from the files at each step."""

    def hold(self, files: dict[str, bytes]) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)
        for sub, data in files.items():
            target = pathlib.Path(self.root, sub)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def normal(value: Any, roots: tuple[str, ...]) -> Any:
    """`value` with the filesystem's spelling taken out: names relative to the example's root, info dicts as
    (name, size, type), listings (of names, of infos, of walk's levels) sorted, exceptions as `Raised`."""
    if isinstance(value, str):
        for root in roots:
            if value == root or value.startswith(root + "/"):
                return "ROOT" + value[len(root):]
        return value
    if isinstance(value, dict):
        if "name" in value and "type" in value:
            return (normal(value["name"], roots), value["size"], value["type"])
        return sorted((normal(k, roots), normal(v, roots)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = [normal(v, roots) for v in value]
        if isinstance(value, tuple):
            return tuple(items)
        return sorted(items, key=repr) if all(isinstance(v, (str, tuple)) for v in items) else items
    return Raised(value) if isinstance(value, Exception) else value


class Raised:
    """An exception, equal to another when either's class is the other's (the client's errors subclass the
    built-in ones: `NotFound` is a `FileNotFoundError`)."""

    def __init__(self, err: Exception) -> None:
        self.err = err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Raised) and (isinstance(self.err, type(other.err)) or isinstance(other.err,
                                                                                                  type(self.err)))

    def __repr__(self) -> str:
        return f"{type(self.err).__name__}({self.err})"


SUBS = st.sampled_from(["", "a", "ab", "a.b", "c", "e f", "a/a", "c/ab", "e f/a.b", "c/c/a", "zz"])
PATH = st.tuples(SUBS, st.booleans()).map(lambda s: s[0] + "/" if s[1] and s[0] else s[0])
DEPTH = st.sampled_from([None, 1, 2])


@dataclass(frozen=True)
class Step:
    """A call of a filesystem method, with its arguments in paths below the example's root; `run(fs, at)` makes it
    on `fs`, `at` spelling each such path as that filesystem names it."""

    name: str
    args: tuple[Any, ...]
    run: Callable[[Any, Callable[[str], str]], Any]
    changes: bool = False  # whether it may change the files (they are compared after it)

    def __repr__(self) -> str:
        return f"{self.name}{self.args}"


def step(name: str, run: Callable[..., Any], *args: Any, changes: bool = False) -> Step:
    return Step(name, args, lambda fs, at: run(fs, at, *args), changes)


def method(name: str, *args: Any, changes: bool = False) -> Step:
    """`fs.NAME(path, *args)`."""
    return step(name, lambda fs, at, p, *rest: getattr(fs, name)(at(p), *rest), *args, changes=changes)


def steps() -> st.SearchStrategy[Step]:
    paths = st.lists(SUBS, min_size=1, max_size=2)
    return st.one_of(
        st.builds(lambda p, d: step("ls", lambda fs, at, p, d: fs.ls(at(p), detail=d), p, d), PATH, st.booleans()),
        st.builds(lambda m, p: method(m, p), st.sampled_from(["info", "exists", "isdir", "isfile", "size"]), PATH),
        # a time or a checksum is each filesystem's own: only whether there is one is compared
        st.builds(lambda m, p: step(m, lambda fs, at, p: type(getattr(fs, m)(at(p))).__name__, p),
                  st.sampled_from(["modified", "checksum", "ukey"]), PATH),
        st.builds(lambda *a: step("find", lambda fs, at, p, d, w, de: fs.find(at(p), maxdepth=d, withdirs=w, detail=de),
                                  *a), PATH, DEPTH, st.booleans(), st.booleans()),
        st.builds(lambda *a: step("glob", lambda fs, at, g, d, de: fs.glob(at(g), maxdepth=d, detail=de), *a),
                  st.sampled_from(GLOBS), DEPTH, st.booleans()),
        st.builds(lambda *a: step("walk", lambda fs, at, p, d, t, de: list(fs.walk(at(p), maxdepth=d, topdown=t,
                                                                                  detail=de)), *a),
                  PATH, DEPTH, st.booleans(), st.booleans()),
        st.builds(lambda *a: step("du", lambda fs, at, p, t, d, w: fs.du(at(p), total=t, maxdepth=d, withdirs=w), *a),
                  PATH, st.booleans(), DEPTH, st.booleans()),
        st.builds(lambda *a: step("expand_path", lambda fs, at, p, r, d: fs.expand_path(at(p), recursive=r,
                                                                                       maxdepth=d), *a),
                  st.one_of(PATH, st.sampled_from(GLOBS)), st.booleans(), DEPTH),
        st.builds(lambda *a: method("cat_file", *a), PATH, st.sampled_from(BOUNDS), st.sampled_from(BOUNDS)),
        st.builds(lambda *a: step("cat", lambda fs, at, ps, r: fs.cat([at(p) for p in ps], recursive=r), *a),
                  paths, st.booleans()),
        st.builds(lambda *a: step("cat_ranges", lambda fs, at, ps, s, e: fs.cat_ranges(
            [at(p) for p in ps], [s] * len(ps), [e] * len(ps), on_error="return"), *a),
            paths, st.sampled_from(BOUNDS), st.sampled_from(BOUNDS)),
        st.builds(lambda ps: step("sizes", lambda fs, at, ps: fs.sizes([at(p) for p in ps]), ps), paths),
        st.builds(lambda m, *a: method(m, *a), st.sampled_from(["head", "tail"]), PATH, st.sampled_from([0, 2, 100])),
        # rm's maxdepth is test_fsspec.py's: neither reference removes to a depth (memory:// refuses the folders it
        # would leave holding files, and a local filesystem ignores maxdepth)
        st.builds(lambda *a: step("rm", lambda fs, at, ps, r: fs.rm([at(p) for p in ps] if len(ps) > 1 else at(ps[0]),
                                                                    recursive=r), *a, changes=True),
                  st.lists(st.one_of(SUBS, st.sampled_from(GLOBS)), min_size=1, max_size=2), st.booleans()),
        # a drive root has no parent, as a bucket: copied onto itself it copies nothing, where memory:// and file://
        # copy it into itself
        st.builds(lambda m, *a: step(m, lambda fs, at, p, q, r: getattr(fs, m)(at(p), at(q), recursive=r), *a,
                                     changes=True),
                  st.sampled_from(["mv", "copy"]), SUBS.filter(bool), PATH, st.booleans()),
        st.builds(lambda *a: step("mv", lambda fs, at, p, q, r: fs.mv(at(p), at(q), recursive=r), "", *a,
                                  changes=True), PATH, st.booleans()),
        st.builds(lambda m, p: method(m, p, changes=True), st.sampled_from(["rm_file", "mkdir", "makedirs", "rmdir",
                                                                           "touch"]), PATH),
        st.builds(lambda *a: method("pipe_file", *a, changes=True), PATH, CONTENTS),
    )


def outcome(fs: Fs, run: Callable[..., Any], spelling: Callable[[str], str]) -> tuple[str, Any]:
    try:
        return "ok", normal(run(fs.fs, spelling), (fs.root, fs.root.lstrip("/")))
    except Exception as err:
        return "raised", Raised(err)


def holds(files: dict[str, bytes], sub: str) -> bool:
    """Whether `sub` is the root, a file or a folder holding files."""
    return not sub or sub in files or any(path.startswith(f"{sub}/") for path in files)


def documented(step: Step, got: tuple[str, Any], files: dict[str, bytes], before: dict[str, bytes],
               local: tuple[str, Any]) -> bool:
    """Whether `got` (lit's answer, leaving `files`) is what README's fsspec section says it is where memory:// and
    file:// differ from it (`local` is file://'s answer)."""
    raised = got[1].err if got[0] == "raised" else None
    refused_alike = raised is not None and files == before
    if isinstance(raised, FileNotFoundError) and refused_alike and local[0] == "raised" and isinstance(
            local[1].err, NotADirectoryError):  # "a path below a file is a missing path"
        return True
    if isinstance(raised, NotADirectoryError) and refused_alike and local[0] == "raised":
        return True  # "a file put there (below a file) raises NotADirectoryError", where file:// refuses it otherwise
    if step.name == "modified":  # "folders have no modification time"
        return isinstance(raised, IsADirectoryError) and local == ("ok", "datetime")
    if step.name in ("rmdir", "mkdir"):  # "a path holding no file is an empty folder"; "mkdir of an existing folder"
        return got[0] == "ok" and files == before and local[0] == "raised"
    if step.name == "rm":  # "a missing one, a folder without recursive=True (IsADirectoryError) ... nothing is removed"
        paths, recursive = step.args
        missing = any(p not in GLOBS and not holds(before, p.rstrip("/")) for p in paths)
        return refused_alike and ((isinstance(raised, FileNotFoundError) and missing)
                                  or (isinstance(raised, IsADirectoryError) and not recursive))
    if step.name == "mv":
        source, target = step.args[0], step.args[1].rstrip("/")
        if isinstance(raised, ValueError):  # "a folder moved into itself raises ValueError"
            return refused_alike and target.startswith(f"{source}/" if source else "")
        # "a path moved onto itself, however spelled, is left as it is": a folder into its own parent too
        return got[0] == "ok" and files == before and target in (source, source.rpartition("/")[0])
    return False


@given(tree=TREES, calls=st.lists(steps(), min_size=1, max_size=6),
       spellings=st.lists(st.sampled_from(["", "lit://", "lit://{root}//"]), min_size=6, max_size=6))
def test_lit_answers_as_memory(lit: DriveFileSystem, local_root: pathlib.Path, tree: dict[str, bytes],
                               calls: list[Step], spellings: list[str]) -> None:
    name = f"ops{uuid.uuid4().hex[:10]}"
    drive = Fs(lit, name)
    memory = Memory(MemoryFileSystem(skip_instance_cache=True), f"/{name}")
    local = Local(LocalFileSystem(), str(local_root / name))
    for sub, data in tree.items():
        lit.pipe_file(f"{name}/{sub}", data)
    files = dict(tree)
    for call, spelling in zip(calls, spellings, strict=False):
        memory.hold(files)
        local.hold(files)

        def lit_path(sub: str, spelling: str = spelling) -> str:
            if spelling == "lit://{root}//":  # README: repeated slashes after the drive name are one
                return f"lit://{name}//{sub}"
            return f"{spelling}{drive.path(sub)}"

        got = outcome(drive, call.run, lit_path)
        after = drive.files() if call.changes else files
        answers = {ref: outcome(ref, call.run, ref.path) for ref in (memory, local)}
        agreeing = [ref for ref, answer in answers.items()
                    if got == answer and (not call.changes or ref.files() == after)]
        if call.name == "cat_ranges" and got[0] == "ok":  # one answer a path: each path's is memory's or file://'s
            agreeing = [memory] if all(any(answer[0] == "ok" and mine == answer[1][i] for answer in answers.values())
                                       for i, mine in enumerate(got[1])) else []
        assert agreeing or documented(call, got, after, files, answers[local]), (
            f"{call} on {sorted(files)}: lit:// {got} leaving {sorted(after)}; "
            + "; ".join(f"{type(ref.fs).__name__} {answer}" for ref, answer in answers.items()))
        files = after


# --- the defects the comparison found, each pinned on both faces ----------------------------------------------

TREE = {"a": b"0123456789", "ab": b"x", "a.b": b"", "c/d": b"hello", "c/e f/g": b"gg", "c/e f/h": b"hhh"}


@pytest.fixture(params=[DriveFileSystem, AsyncDriveFileSystem])
def fs(request, daemon) -> DriveFileSystem:
    return request.param(endpoint=daemon.endpoint, component_name="ops", skip_instance_cache=True)


@pytest.fixture
def name(fs: DriveFileSystem) -> str:
    """A fresh drive holding `TREE`."""
    drive = f"ops{uuid.uuid4().hex[:10]}"
    for path, data in TREE.items():
        fs.pipe_file(f"{drive}/{path}", data)
    return drive


def files(fs: DriveFileSystem, name: str) -> dict[str, bytes]:
    return {path.removeprefix(f"{name}/"): fs.cat_file(path) for path in fs.find(name)}


def test_rm_of_paths_one_of_which_is_refused_removes_nothing(fs, name):
    """`rm` removed the paths of a list (or glob) before the one it refused: a missing path, a folder without
    `recursive`; fsspec's memory and local filesystems refuse the call before they remove anything."""
    refused = [
        ([f"{name}/a", f"{name}/nope"], {}, FileNotFoundError),
        (f"{name}/a*", {}, IsADirectoryError),  # a, a.b, ab, and the folder ab2
        (f"{name}/nope", {"recursive": True, "maxdepth": 1}, FileNotFoundError),
        ([f"{name}/ab", f"{name}/c/nope"], {"recursive": True}, FileNotFoundError),
    ]
    fs.pipe_file(f"{name}/ab2/x", b"y")
    before = files(fs, name)
    for path, options, error in refused:
        with pytest.raises(error):
            fs.rm(path, **options)
        assert files(fs, name) == before, (path, options)


def test_rm_of_paths_that_overlap_removes_each_once(fs, name):
    """A folder and a file in it (two globs, a list) are removed whole, without failing on the file gone with its
    folder."""
    fs.rm([f"{name}/c", f"{name}/c/d", f"{name}/c/e f/*"], recursive=True)
    assert files(fs, name) == {"a": b"0123456789", "ab": b"x", "a.b": b""}
    fs.rm([f"{name}/**", f"{name}/*"], recursive=True)
    assert files(fs, name) == {}


def test_rmdir_refuses_a_file_and_a_folder_holding_files(fs, name):
    """`rmdir` did nothing, and said nothing, for a file or a folder holding files, where a local filesystem refuses
    them (`NotADirectoryError`, `OSError` ENOTEMPTY); a path holding nothing is an empty folder, already gone."""
    before = files(fs, name)
    with pytest.raises(NotADirectoryError):
        fs.rmdir(f"{name}/a")
    for folder in (f"{name}/c", f"lit://{name}/c/e f/", name):
        with pytest.raises(OSError) as refused:
            fs.rmdir(folder)
        assert refused.value.errno == errno.ENOTEMPTY, folder
    fs.mkdir(f"{name}/new")
    fs.rmdir(f"{name}/new")
    assert files(fs, name) == before


def test_mkdir_refuses_a_path_that_is_or_is_below_a_file(fs, name):
    """`mkdir` and `makedirs` did nothing for a path that is a file or below one, where a local filesystem refuses
    them; `makedirs` of an existing folder without `exist_ok` raises `FileExistsError`, as fsspec documents."""
    before = files(fs, name)
    for make in (fs.mkdir, fs.makedirs, lambda path: fs.makedirs(path, exist_ok=True)):
        with pytest.raises(FileExistsError):
            make(f"{name}/a")
        with pytest.raises(NotADirectoryError):
            make(f"{name}/a/new")
        with pytest.raises(NotADirectoryError):
            make(f"{name}/c/d/new/deeper")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{name}/c/e f")
    fs.makedirs(f"{name}/c/e f", exist_ok=True)
    fs.mkdir(f"{name}/c")  # an object store's folder: made again, as s3fs does
    fs.makedirs(f"{name}/c/new/deeper")
    assert files(fs, name) == before


def test_repeated_slashes_name_the_same_paths_in_every_answer(fs, name):
    """README: repeated slashes are one, after the drive name too; `glob` of `lit://D//a*` matched nothing and
    `expand_path`, `walk` and `du` answered names with `//` in them (fsspec builds those from the path as given)."""
    for spelled in (f"lit://{name}//", f"{name}///"):
        assert fs.glob(f"{spelled}a*") == fs.glob(f"{name}/a*") == [f"{name}/a", f"{name}/a.b", f"{name}/ab"]
        assert fs.expand_path(f"{spelled}c", recursive=True) == fs.expand_path(f"{name}/c", recursive=True)
        assert list(fs.walk(f"{spelled}c")) == list(fs.walk(f"{name}/c"))
        assert fs.du(f"{spelled}c", total=False) == fs.du(f"{name}/c", total=False)


def test_mv_of_a_folder_without_recursive_is_refused(fs, name):
    """`mv` of a folder without `recursive` moved nothing and said nothing on the blocking face (its copy copies no
    folder), where the asyncio face, fsspec's memory filesystem and `rm` refuse a folder without `recursive`."""
    before = files(fs, name)
    for target in (f"{name}/z", f"{name}/ab2/", f"{name}/a"):
        with pytest.raises(IsADirectoryError):
            fs.mv(f"{name}/c", target)
    assert files(fs, name) == before
    fs.mv(f"{name}/c", f"{name}/z", recursive=True)
    assert files(fs, name) == {**{k: v for k, v in before.items() if not k.startswith("c/")},
                               "z/d": b"hello", "z/e f/g": b"gg", "z/e f/h": b"hhh"}


def test_find_with_folders_of_an_empty_drive_answers_its_root(fs):
    """`find(path, withdirs=True)` answers the folder `path` itself, as fsspec's does, also for a drive that holds no
    file (a drive root always exists): it answered nothing there."""
    empty = f"ops{uuid.uuid4().hex[:10]}"
    assert fs.find(empty, withdirs=True) == fs.find(empty, withdirs=True, maxdepth=1) == [empty]
    assert fs.find(f"lit://{empty}/", withdirs=True, detail=True) == {empty: fs.info(empty)}
    assert fs.find(empty) == []
