"""A model-based (stateful) test of a `lit://` drive's semantics: hypothesis drives puts, gets, stats, lists,
deletes and ranged reads of several components through the public `Drive` API, over a small alphabet of paths
(so that files, folders and other components' paths collide), and checks each answer against a plain-Python
model of the drive: a dict of (component, path) -> bytes.

What each call must answer is worked out here from the model and the README alone, never asked of the
daemon. After every step the drive lists what the model holds (every component's files, sizes and sha256), a
refused call has changed nothing, and at the end of each run the drive's Watch has reported every change, in
the order made. It runs against one daemon on a data dir, and against two replicas sharing a moto_server
(`--storage`) and a valkey-server (`--coordinator`), each step on a replica hypothesis picks.

Example counts are small (CI runs them on every commit); `HYPOTHESIS_PROFILE=thorough` runs more.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Background, DaemonHandle, current_sequence, unique_drive_uri
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from test_cluster import two_replicas_in

from drive_client import AlreadyExists, AmbiguousPathError, Drive, DriveError, FileStat, InvalidArgument, NotFound

pytestmark = pytest.mark.timeout(600)

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
RUNS = settings(
    max_examples=200 if THOROUGH else 10, stateful_step_count=40 if THOROUGH else 20, deadline=None,
    derandomize=not THOROUGH, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NFD_E = "e\u0301"  # "é" as two code points: the drive keeps it as NFC's one
PATHS = ["a", "a/b", "a/b/c", "b", "b/a", "a b", "a/x y", "é", NFD_E, f"{NFD_E}/a", "é/a b"]
LISTED = ["", *PATHS]  # list and entries also take the root
FOLDER_FILES = ["a", "c/d", "é", "x y"]  # names inside a local folder put: none is another's folder
COMPONENTS = ["ca", "cb", "cc"]
WATCHER = "watcher"  # the component of the markers that bound a run's events (at a path no rule uses)
MARKER = "zz-marker"

contents = st.binary(max_size=8)
components = st.sampled_from(COMPONENTS)
named = st.one_of(st.none(), components)  # a component named to get, stat, list, or none: all of them
paths = st.sampled_from(PATHS)
replicas = st.integers(0, 1)  # taken modulo the endpoints: 0 alone on one daemon

Model = dict[tuple[str, str], bytes]  # (component, NFC path) -> bytes
Event = tuple[str, str, str]  # (kind, path, component)
Refusal = type[DriveError]


def nfc(path: str) -> str:
    return unicodedata.normalize("NFC", path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def below(path: str, folder: str) -> bool:
    """Whether `path` lies below `folder` ("" is the root, below which every path lies)."""
    return not folder or path.startswith(f"{folder}/")


def parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class DriveModel:
    """What the README says a drive holds and answers, for files in `files`."""

    def __init__(self) -> None:
        self.files: Model = {}

    def of(self, component: str) -> dict[str, bytes]:
        return {path: data for (c, path), data in self.files.items() if c == component}

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.files})

    def is_folder(self, component: str, path: str) -> bool:
        return any(below(p, path) for p in self.of(component))

    def holds(self, component: str, path: str) -> bool:
        return path in self.of(component) or self.is_folder(component, path)

    def put_refusal(self, component: str, allow_duplicates: bool, path: str) -> Refusal | None:
        """Why a put of a file at `path` is refused, or None. Another component's path, folder, or file above it is
        a duplicate (README: refused unless allow_duplicates); one's own file above it, or one's own folder at it,
        cannot hold a file there. A put refused for both is refused as a duplicate, whatever the file's size
        (README)."""
        others = [c for c in self.components() if c != component]
        if not allow_duplicates and any(
            self.holds(o, path) or any(p in self.of(o) for p in parents(path)) for o in others
        ):
            return AlreadyExists
        own = self.of(component)
        if self.is_folder(component, path) or any(p in own for p in parents(path)):
            return InvalidArgument
        return None

    def holders(self, path: str, component: str | None) -> list[tuple[str, bool]]:
        """(component, whether it holds a file there) of each component that holds `path`."""
        return [(c, path in self.of(c)) for c in ([component] if component else self.components())
                if self.holds(c, path)]

    def get(self, path: str, component: str | None) -> bytes | dict[str, bytes] | Refusal:
        """A file's bytes, a folder's files (relative path -> bytes), or the refusal."""
        holders = self.holders(path, component)
        if not holders:
            return NotFound
        if len(holders) == 1 and holders[0][1]:
            return self.of(holders[0][0])[path]
        if any(file for _, file in holders):
            return AmbiguousPathError
        found: dict[str, bytes] = {}
        for c, _ in holders:
            for p, data in self.of(c).items():
                if below(p, path):
                    rel = p[len(path) + 1:]
                    # The same file in two components, or one's file where another has a folder: which one a
                    # get without component_name means cannot be told (as a get of that path itself).
                    if rel in found or any(q in found for q in parents(rel)) or any(below(q, rel) for q in found):
                        return AmbiguousPathError
                    found[rel] = data
        return found

    def stat(self, path: str, component: str | None) -> tuple[str, int, str, bool] | Refusal:
        """(owner, size, sha256, folder) of a stat, or the refusal."""
        holders = self.holders(path, component)
        if not holders:
            return NotFound
        files = [c for c, file in holders if file]
        if not files:
            return (holders[0][0] if len(holders) == 1 else "", 0, "", True)
        if len(holders) > 1:
            return AmbiguousPathError
        data = self.of(files[0])[path]
        return (files[0], len(data), sha256(data), False)

    def listed(self, path: str, component: str | None, recursive: bool) -> list[str]:
        """What list (immediate entries) or entries(recursive=True) (every file) answers, in order."""
        names: set[str] = set()
        for c in [component] if component else self.components():
            own = self.of(c)
            under = [p for p in own if below(p, path)]
            if not under and path in own:  # a file lists itself
                names.add(path)
            for p in under:
                rest = p[len(path) + 1:] if path else p
                names.add(p if recursive else f"{path}/{rest.split('/')[0]}" if path else rest.split("/")[0])
        return sorted(names)


class DriveMachine(RuleBasedStateMachine):
    """One drive, fresh for each run, and its model; `endpoints` (set by the test) are the daemons serving it."""

    endpoints: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.uri = unique_drive_uri("model")
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="drive-model-"))
        self.made = 0  # local files and folders made so far: each gets a new name
        self.model = DriveModel()
        self.drives: dict[tuple[int, str, bool], Drive] = {}
        self.events: list[list[Event]] = []  # each change's events, in the order the changes were made
        # A marker put and deleted bounds the run's events: the watch at its end starts after the put.
        watcher = self.drive(0, WATCHER)
        watcher.put(self.local(b"marker"), to=MARKER)
        self.after_sequence = current_sequence(self.endpoints[0], self.uri)
        watcher.delete(MARKER)
        self.events.append([("delete", MARKER, WATCHER)])
        self.seen = self.state()

    def teardown(self) -> None:
        try:
            self.check_watched()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- the drive and local files ------------------------------------------------------------------

    def drive(self, replica: int, component: str, allow_duplicates: bool = False) -> Drive:
        key = (replica % len(self.endpoints), component, allow_duplicates)
        if key not in self.drives:
            self.drives[key] = Drive(self.uri, allow_duplicates=allow_duplicates, component_name=component,
                                     endpoint=self.endpoints[key[0]], root_folder=str(self.work))
        return self.drives[key]

    def new_path(self) -> pathlib.Path:
        self.made += 1
        return self.work / f"local-{self.made}"

    def local(self, data: bytes) -> pathlib.Path:
        path = self.new_path()
        path.write_bytes(data)
        return path

    def state(self) -> tuple[list[str], dict[str, dict[str, tuple[int, str]]]]:
        """What the drive lists: every file (recursive, no component named), and each component's files with their
        size and sha256."""
        drive = self.drive(0, COMPONENTS[0])
        every = [e.path for e in drive.entries(".", recursive=True)]
        each = {c: {e.path: (e.size, e.sha256) for e in drive.entries(".", c, recursive=True)} for c in COMPONENTS}
        return every, each

    def expected_state(self) -> tuple[list[str], dict[str, dict[str, tuple[int, str]]]]:
        each = {c: {p: (len(data), sha256(data)) for p, data in self.model.of(c).items()} for c in COMPONENTS}
        return self.model.listed("", None, recursive=True), each

    def refused(self, expected: Refusal, call: Callable[[], object]) -> None:
        """`call` raises `expected` and changes nothing the drive lists."""
        with pytest.raises(DriveError) as raised:
            call()
        assert isinstance(raised.value, expected), f"{raised.value!r}, expected {expected.__name__}"
        assert str(raised.value), "a refusal says why"
        assert self.state() == self.seen, "a refused call changed the drive"

    # -- rules ----------------------------------------------------------------------------------------

    @rule(replica=replicas, component=components, allow_duplicates=st.booleans(), path=paths, data=contents)
    def put_file(self, replica: int, component: str, allow_duplicates: bool, path: str, data: bytes) -> None:
        drive, local, key = self.drive(replica, component, allow_duplicates), self.local(data), nfc(path)
        refusal = self.model.put_refusal(component, allow_duplicates, key)
        if refusal:
            self.refused(refusal, lambda: drive.put(local, to=path))
            return
        [stored] = drive.put(local, to=path)
        assert (stored.path, stored.size, stored.sha256, stored.component) == (key, len(data), sha256(data), component)
        self.model.files[component, key] = data
        self.events.append([("put", key, component)])

    @rule(replica=replicas, component=components, allow_duplicates=st.booleans(), path=paths,
          files=st.dictionaries(st.sampled_from(FOLDER_FILES), contents, min_size=1, max_size=3))
    def put_folder(self, replica: int, component: str, allow_duplicates: bool, path: str,
                   files: dict[str, bytes]) -> None:
        drive, folder, key = self.drive(replica, component, allow_duplicates), self.new_path(), nfc(path)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        wanted = {f"{key}/{nfc(name)}": data for name, data in files.items()}
        refusals = {p: r for p in wanted if (r := self.model.put_refusal(component, allow_duplicates, p))}
        if not refusals:
            stored = drive.put(folder, to=path)
            assert sorted((s.path, s.sha256) for s in stored) == sorted((p, sha256(d)) for p, d in wanted.items())
            self.model.files.update({(component, p): data for p, data in wanted.items()})
            self.events.append([("put", p, component) for p in sorted(wanted)])
            return
        with pytest.raises(DriveError) as raised:
            drive.put(folder, to=path)
        assert isinstance(raised.value, tuple(refusals.values())), f"{raised.value!r}, expected one of {refusals}"
        # The folder's other files are committed while the next ones arrive (README): each may be stored, whole.
        listed = {e.path: e.sha256 for e in drive.entries(path, component, recursive=True)}
        stored = sorted(p for p in wanted if p not in refusals and listed.get(p) == sha256(wanted[p]))
        self.model.files.update({(component, p): wanted[p] for p in stored})
        self.events.append([("put", p, component) for p in stored])

    @rule(replica=replicas, component=components)
    def put_names_differing_only_by_normalisation(self, replica: int, component: str) -> None:
        folder = self.new_path()
        folder.mkdir()
        (folder / "é").write_bytes(b"nfc")
        (folder / NFD_E).write_bytes(b"nfd")
        self.refused(InvalidArgument, lambda: self.drive(replica, component, True).put(folder, to="b"))

    @rule(replica=replicas, component=named, path=paths)
    def get(self, replica: int, component: str | None, path: str) -> None:
        drive, target = self.drive(replica, COMPONENTS[0]), self.new_path()
        expected = self.model.get(nfc(path), component)
        if isinstance(expected, type):
            self.refused(expected, lambda: drive.get(path, component, to=target))
            assert not target.exists(), "a refused get wrote its local target"
        elif isinstance(expected, bytes):
            assert drive.get(path, component, to=target).read_bytes() == expected
        else:
            assert drive.get(path, component, to=target) == target
            got = {f.relative_to(target).as_posix(): f.read_bytes() for f in target.rglob("*") if f.is_file()}
            assert got == expected

    @rule(replica=replicas, component=named, path=paths)
    def stat(self, replica: int, component: str | None, path: str) -> None:
        drive = self.drive(replica, COMPONENTS[0])
        expected = self.model.stat(nfc(path), component)
        if isinstance(expected, type):
            self.refused(expected, lambda: drive.stat(path, component))
            return
        stat: FileStat = drive.stat(path, component)
        assert (stat.path, stat.component, stat.size, stat.sha256, stat.folder) == (nfc(path), *expected)

    @rule(replica=replicas, component=named, path=st.sampled_from(LISTED), recursive=st.booleans())
    def list(self, replica: int, component: str | None, path: str, recursive: bool) -> None:
        drive = self.drive(replica, COMPONENTS[0])
        expected = self.model.listed(nfc(path), component, recursive)
        if recursive:
            assert [e.path for e in drive.entries(path or ".", component, recursive=True)] == expected
        else:
            assert drive.list(path or ".", component) == expected

    @rule(replica=replicas, component=components, path=paths)
    def delete(self, replica: int, component: str, path: str) -> None:
        drive, key = self.drive(replica, component), nfc(path)
        own = self.model.of(component)
        gone = sorted(p for p in own if p == key or below(p, key))
        if not gone:
            self.refused(NotFound, lambda: drive.delete(path))
            return
        drive.delete(path)
        for p in gone:
            del self.model.files[component, p]
        self.events.append([("delete", p, component) for p in gone])

    @rule(replica=replicas, component=named, path=paths, offset=st.integers(0, 10),
          length=st.one_of(st.none(), st.integers(1, 5)))
    def read_range(self, replica: int, component: str | None, path: str, offset: int, length: int | None) -> None:
        drive = self.drive(replica, COMPONENTS[0])
        expected = self.model.get(nfc(path), component)
        # A range is of a file, and starts at most at its end. A folder's whole "range" is asked as a get of the
        # folder, whose clash of components the daemon refuses before the client sees a folder.
        holders = self.model.holders(nfc(path), component)
        folder = bool(holders) and not any(file for _, file in holders)
        if folder and not (expected is AmbiguousPathError and offset == 0 and length is None):
            expected = InvalidArgument
        if isinstance(expected, bytes) and offset > len(expected):
            expected = InvalidArgument
        if isinstance(expected, type):
            self.refused(expected, lambda: b"".join(drive.read_range(path, offset, length, component)))
            return
        end = None if length is None else offset + length
        assert b"".join(drive.read_range(path, offset, length, component)) == expected[offset:end]

    # -- what holds after every step, and at the end ------------------------------------------------

    @invariant()
    def lists_the_model(self) -> None:
        self.seen = self.state()
        assert self.seen == self.expected_state()

    def check_watched(self) -> None:
        """The drive's watch reports every change of the run, in the order made, up to the marker put last."""
        watcher = self.drive(0, WATCHER)
        watcher.put(self.local(b"marker"), to=MARKER)
        self.events.append([("put", MARKER, WATCHER)])

        def watched() -> list[Event]:
            seen: list[Event] = []
            for event in watcher.watch(after_sequence=self.after_sequence):
                seen.append((event.kind, event.file.path, event.file.component))
                if seen[-1] == ("put", MARKER, WATCHER):
                    return seen
            raise AssertionError("the watch ended")

        reading = Background(watched)
        reading.start()
        seen: Any = reading.join_checked(30)
        # A folder's files commit concurrently: within one change, in any order.
        expected = [sorted(group) for group in self.events]
        got, at = [], 0
        for group in expected:
            got.append(sorted(seen[at:at + len(group)]))
            at += len(group)
        assert (got, len(seen)) == (expected, at), f"watched {seen}"


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonHandle]]:
    with two_replicas_in(tmp_path_factory.mktemp("model-cluster")) as replicas:
        yield replicas


def run(endpoints: list[str]) -> None:
    machine = type("Drive", (DriveMachine,), {"endpoints": endpoints})
    run_state_machine_as_test(machine, settings=RUNS)


def test_a_drive_on_a_data_dir_answers_as_its_model(daemon: DaemonHandle) -> None:
    run([daemon.endpoint])


def test_a_drive_on_two_replicas_with_storage_and_coordinator_answers_as_its_model(
        two_replicas: list[DaemonHandle]) -> None:
    run([r.endpoint for r in two_replicas])


@pytest.mark.parametrize("size", [0, 2 << 20], ids=["small", "big"])
def test_a_put_at_its_own_folder_of_a_path_another_component_holds_is_refused_as_a_duplicate(
        daemon: DaemonHandle, two_replicas: list[DaemonHandle], tmp_path: pathlib.Path, size: int) -> None:
    """Refused for two reasons (its own folder is there, and another component's file), a put is refused as a
    duplicate (FileExistsError) on both backends, whatever its size: a small file's put once hit its folder first
    on a data dir (ValueError), while a big one's duplicate check ran first."""
    (tmp_path / "f").write_bytes(b"x" * size)
    for endpoint in (daemon.endpoint, two_replicas[0].endpoint):
        uri = unique_drive_uri("own_folder_and_duplicate")
        ca = Drive(uri, component_name="ca", endpoint=endpoint, root_folder=str(tmp_path))
        ca.put("f", to="a/b")
        Drive(uri, True, "cb", endpoint=endpoint, root_folder=str(tmp_path)).put("f", to="a")
        with pytest.raises(AlreadyExists, match="already held by component 'cb'"):
            ca.put("f", to="a")
        assert [(e.path, e.component) for e in ca.entries(recursive=True)] == [("a", "cb"), ("a/b", "ca")]


def test_a_get_of_a_folder_where_one_components_file_is_anothers_folder_is_refused_before_any_file(
        daemon: DaemonHandle, two_replicas: list[DaemonHandle], tmp_path: pathlib.Path) -> None:
    """As a get of 'a/x' itself is ambiguous, so is a get of 'a' when cb's 'a/x' is a file and ca's a folder
    ('a/x/y', 'a/x y' between them in path order): refused before any file is written, as a clash of one path. It
    once wrote 'x' and then failed NotADirectoryError at 'x/y', leaving 'x' behind."""
    (tmp_path / "f").write_bytes(b"f")
    for endpoint in (daemon.endpoint, two_replicas[1].endpoint):
        uri = unique_drive_uri("file_and_folder_clash")
        Drive(uri, True, "cb", endpoint=endpoint, root_folder=str(tmp_path)).put("f", to="a/x")
        for path in ("a/x y", "a/x/y"):
            Drive(uri, True, "ca", endpoint=endpoint, root_folder=str(tmp_path)).put("f", to=path)
        reader = Drive(uri, endpoint=endpoint, root_folder=str(tmp_path))
        with pytest.raises(AmbiguousPathError, match=r"'a/x' .* several components \('ca', 'cb'\)"):
            reader.get("a", to="out")
        assert not (tmp_path / "out").exists()
        with pytest.raises(AmbiguousPathError):
            b"".join(reader.read_range("a"))
        assert reader.get("a", "ca", to="out").joinpath("x/y").read_bytes() == b"f"
        shutil.rmtree(tmp_path / "out")
