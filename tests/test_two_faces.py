"""A differential test of the two faces of the client: `AsyncDrive` answers as `Drive` does.

README: "`AsyncDrive` has the same arguments, methods, features and errors". Hypothesis draws sequences of
public calls, with arguments at the edges (missing paths, folders where files are expected and the reverse,
gets onto existing local files, `to=`, other components, ranges past the end, short waits for paths that never
come, watches), and runs each sequence through a `Drive` on one drive and an `AsyncDrive` on another (same
daemon, fresh drives, local root folders holding the same files). After every step both faces gave the same
answer, or raised the same class with the same message (but for the drive's name and root folder), both
drives hold the same files, and both root folders the same bytes; a refused call changed neither.

`HYPOTHESIS_PROFILE=thorough` runs more sequences.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from conftest import MIB, TWINS, DaemonHandle, current_sequence, snapshot
from hypothesis import given
from hypothesis import strategies as st

from drive_client import AsyncDrive, Drive, FileStat, MountResult, WatchEvent, core, transfer

pytestmark = pytest.mark.timeout(300)

BIG = 3 * MIB // 2  # fetched over parallel ranged reads once PARALLEL_MIN_SIZE is lowered to it
LOCAL_FILES = {
    "f": b"hello",
    "e": b"",
    "dir/x": b"x",
    "dir/sub/y": b"yy",
    "big": random.Random(0).randbytes(BIG),
}
COMPONENTS = ["ca", "cb"]
WATCHER = "watcher"  # the component of the watch markers when a watch names none

# Drive paths: files, folders, missing ones; and, drawn less often, paths no drive holds (absolute, '..').
DRIVE_PATHS = ["f", "e", "dir", "dir/x", "dir/sub", "dir/sub/y", "big", "a", "a/b", "missing", "f/below"]
drive_paths = st.sampled_from([*DRIVE_PATHS, *DRIVE_PATHS, "../up", "/abs"])
listed = st.sampled_from([".", "", *DRIVE_PATHS])
LOCAL_PATHS = ["f", "e", "dir", "dir/sub", "big", "missing", "out"]  # "out": where gets go, missing at first
GET_TO = [None, "out", "f", "dir", "dir/x/below", "out/deeper"]
OFFSETS = [0, 0, 1, 5, 6, MIB, BIG - 1, BIG, BIG + 1, -1]
LENGTHS = [None, None, 0, 1, 4, MIB, 2 * BIG, -1]

components = st.sampled_from(COMPONENTS)
named = st.one_of(st.none(), components)


@dataclasses.dataclass(frozen=True)
class Op:
    """One public call: `method(*args, **kwargs)` on a drive of `component` with these settings.

    `progress=True` in kwargs stands for a callback that records the counts it is called with.
    """

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    component: str = "ca"
    allow_duplicates: bool = False
    verify: str = "crc32c"


settings_of = st.fixed_dictionaries({
    "component": components, "allow_duplicates": st.booleans(), "verify": st.sampled_from(["crc32c", "sha256"]),
})


def op(method: str, args: st.SearchStrategy[tuple[Any, ...]], kwargs: st.SearchStrategy[dict[str, Any]]
       ) -> st.SearchStrategy[Op]:
    return st.builds(lambda a, k, s: Op(method, a, k, **s), args, kwargs, settings_of)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


ops = st.one_of(
    op("put", st.tuples(st.sampled_from(LOCAL_PATHS)),
       optional(to=st.sampled_from(["a", "a/b", "dir", "f", "f/below", "../up"]), progress=st.just(True))),
    op("get", st.tuples(drive_paths),
       st.fixed_dictionaries({"overwrite": st.booleans(), "to": st.sampled_from(GET_TO)},
                             optional={"component_name": named, "progress": st.just(True), "timeout": st.just(0.05)})),
    op("list", st.tuples(listed), optional(component_name=named)),
    op("entries", st.tuples(listed), optional(component_name=named, recursive=st.booleans())),
    op("read_range", st.tuples(drive_paths, st.sampled_from(OFFSETS), st.sampled_from(LENGTHS)),
       optional(component_name=named)),
    op("stat", st.tuples(drive_paths), optional(component_name=named)),
    op("delete", st.tuples(drive_paths), st.just({})),
    op("mount", st.just(()), st.just({})),
    op("watch", st.tuples(st.sampled_from([".", "dir", "a"])), optional(component_name=named)),
)


def plain(value: Any) -> Any:
    """What a face answered, made comparable across the two drives: files without their modification time and
    generation, events without their sequence, a mount without its seconds, bytes joined."""
    if isinstance(value, FileStat):
        return dataclasses.replace(value, modified=None, generation=0)
    if isinstance(value, WatchEvent):
        return (value.kind, plain(value.file))
    if isinstance(value, MountResult):
        return value.objects
    if isinstance(value, list) and value and all(isinstance(v, bytes) for v in value):
        return b"".join(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class Face:
    """One face of the client on a drive of its own, its local files in a root folder of its own."""

    def __init__(self, make: Callable[..., Any], endpoint: str) -> None:
        self.make = make
        self.endpoint = endpoint
        self.uri = f"lit://t_two_faces_{uuid.uuid4().hex[:12]}"
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="two-faces-"))
        for name, data in LOCAL_FILES.items():
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            (self.root / name).write_bytes(data)
        self.drives: dict[tuple[str, bool, str], Any] = {}
        self.markers = 0
        # Watches replay the drive's events from here on: after a first put, so that the sequence is one it gave.
        Drive(self.uri, component_name=WATCHER, endpoint=endpoint, root_folder=self.root).put("e", to="zz-start")
        self.after_sequence = current_sequence(endpoint, self.uri)

    def drive(self, component: str, allow_duplicates: bool = False, verify: str = "crc32c") -> Any:
        key = (component, allow_duplicates, verify)
        if key not in self.drives:
            self.drives[key] = self.make(self.uri, allow_duplicates, component, str(self.root),
                                         endpoint=self.endpoint, verify=verify)
        return self.drives[key]

    def close(self) -> None:
        for drive in self.drives.values():
            if hasattr(drive, "close"):
                drive.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, step: Op) -> tuple[Any, list[int] | None]:
        """What `step` answers, made plain, or the class, code and message of what it raised; and the progress counts
        of a call that succeeded."""
        counts: list[int] | None = [] if step.kwargs.get("progress") else None
        kwargs = {**step.kwargs, "progress": counts.append} if counts is not None else step.kwargs
        try:
            if step.method == "watch":
                answer: Any = self.watched(*step.args, **kwargs)
            else:
                drive = self.drive(step.component, step.allow_duplicates, step.verify)
                answer = getattr(drive, step.method)(*step.args, **kwargs)
                if isinstance(answer, Iterable) and not isinstance(answer, (list, str, bytes, pathlib.Path)):
                    answer = list(answer)
        except Exception as err:  # whatever a face raises is compared with what the other raised
            # The counts of a refused transfer are not compared: how many bytes were read and sent before the refusal
            # arrived depends on timing, in either face.
            return (type(err), getattr(err, "code", None), self.scrubbed(str(err))), None
        if isinstance(answer, pathlib.Path):
            answer = answer.relative_to(self.root).as_posix()
        # Sorted: a get's ranged reads count their chunks from parallel threads, in no set order.
        return plain(answer), None if counts is None else sorted(counts)

    def watched(self, path: str, component_name: str | None = None) -> list[Any]:
        """The events of a watch of `path` since the start, up to a marker put by the face under `path` now."""
        self.markers += 1
        marker = f"zz-w{self.markers}" if path == "." else f"{path}/zz-w{self.markers}"
        self.drive(component_name or WATCHER, allow_duplicates=True).put("f", to=marker)
        events = []
        for event in self.drive(COMPONENTS[0]).watch(path, component_name, after_sequence=self.after_sequence):
            events.append(event)
            if event.file.path == marker:
                return plain(events)
        raise AssertionError("the watch ended")

    def scrubbed(self, message: str) -> str:
        return message.replace(str(self.root), "ROOT").replace(self.uri, "DRIVE")

    def stored(self) -> list[Any]:
        """Every file of every component of the drive, as a Drive lists it."""
        return plain([*Drive(self.uri, endpoint=self.endpoint).entries(".", recursive=True)])


@pytest.fixture
def ranged_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes `big` a file that gets fetch over parallel ranged reads, in blocks of half a MiB."""
    monkeypatch.setattr(core, "PARALLEL_MIN_SIZE", BIG)
    monkeypatch.setattr(transfer, "RANGE_BLOCK", MIB // 2)


def test_both_faces_have_the_same_public_names() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    # README: "Its `close()` (the end of `async with`) ends the calls still under way": only AsyncDrive has one.
    assert public(Drive) == public(AsyncDrive) - {"close"}
    for name in public(Drive):
        sync, aio = getattr(Drive, name), getattr(AsyncDrive, name)
        if sync is aio:  # shared by both through DriveBase (`error`, `endpoint`)
            continue
        assert inspect.signature(sync) == inspect.signature(aio).replace(
            return_annotation=inspect.signature(sync).return_annotation), name


# Puts that each sequence starts with, so that its gets, reads and deletes find files and folders.
STORED_FIRST = [Op("put", ("dir",)), Op("put", ("f",), {"to": "a/b"}), Op("put", ("big",), component="cb")]


@given(steps=st.lists(ops, min_size=3, max_size=20))
def test_async_drive_answers_as_drive_does(daemon: DaemonHandle, ranged_gets: None, steps: list[Op]) -> None:
    sync, aio = Face(TWINS["Drive"], daemon.endpoint), Face(TWINS["AsyncDrive"], daemon.endpoint)
    try:
        for step in [*STORED_FIRST, *steps]:
            stored, local = sync.stored(), snapshot(sync.root)
            answers = sync.run(step), aio.run(step)
            assert answers[0] == answers[1], step
            assert sync.stored() == aio.stored(), step
            assert snapshot(sync.root) == snapshot(aio.root), step
            refused = isinstance(answers[0][0], tuple) and isinstance(answers[0][0][0], type)
            if refused:
                assert snapshot(sync.root) == local, step
                if not (step.method == "put" and step.args[0] == "dir"):  # README: a refused folder put may store some
                    assert sync.stored() == stored, step
    finally:
        sync.close()
        aio.close()
