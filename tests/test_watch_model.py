"""A model-based test of the Watch feed under concurrency, checked from the events alone.

Client threads, each its own component on a replica of its own, apply seeded random puts (files and folders),
deletes (files, folders, missing paths) and refused calls (a put under one's own file or at one's own folder, a
put or delete of another component's file) to one drive, race each other for the paths of a shared folder
with `allow_duplicates=False`, and put and delete the files and folder of one more component that they share
(each from its own replica), which may find a file, a folder or nothing there. Meanwhile three watchers follow
the drive: one from its first event, one of the shared folder only, and one that stops midway and resumes
with `after_sequence` (on the other replica in a cluster).

Afterwards, from the events alone (README, "Watching for new files"): sequences strictly increase; the
watchers saw the same events with the same sequences (the folder's watcher those of its folder); replaying
them from the empty drive gives what the drive lists; each client's successful calls have their events, in
the order made (a folder's each file), its refused calls none; of the component they share, each put is
reported in the order its client made them, a refused one never, and a delete at least once.

Runs on one daemon on a data dir, and on two replicas sharing a moto_server (`--storage`) and a valkey-server
(`--coordinator`).
"""

from __future__ import annotations

import hashlib
import pathlib
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from conftest import Background, DaemonHandle, current_sequence, unique_drive_uri
from test_cluster import two_replicas_in

from drive_client import AlreadyExists, Drive, DriveError, FileStat, InvalidArgument, NotFound

pytestmark = pytest.mark.timeout(120)

SEEDS = [1, 2, 3]
CLIENTS = 3
STEPS = 40  # calls each client makes
OWN = ["a", "a/b", "b", "b/c/d", "c"]  # a client's paths, below its own folder: files and folders collide
FOLDER_FILES = ["x", "y/z"]
RACED = ["s/r1", "s/r2"]  # the shared folder's paths, put by every client with allow_duplicates=False
CONTENDED = ["f", "f/x", "f/y"]  # paths that every client puts and deletes as one shared component
SHARER = "sharer"
SHARED = "s"
OWNER = "owner"  # the component of the file no client may put or delete, and of the end marker
TAKEN = "s.taken"  # beside the shared folder: its watch does not report it
END = f"{SHARED}/end"  # put last: every watcher (the shared folder's too) stops at its event
RESUMED_AFTER = 10  # events the resumed watcher reads before it stops

Event = tuple[str, str, str, int, str]  # (kind, path, component, size, sha256); a delete's size and sha256: 0, ""
Sequenced = tuple[int, Event]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def below(path: str, folder: str) -> bool:
    return path == folder or path.startswith(f"{folder}/")


def as_event(sequence: int, kind: str, file: FileStat) -> Sequenced:
    if kind == "delete":
        return sequence, (kind, file.path, file.component, 0, "")
    return sequence, (kind, file.path, file.component, file.size, file.sha256)


@dataclass
class Client:
    """One client thread: its component, its drive, and what its calls did, as its model says they must."""

    number: int
    drive: Drive
    sharing: Drive  # the shared component, on this client's replica
    work: pathlib.Path
    rng: random.Random
    files: dict[str, bytes] = field(default_factory=dict)  # its files (own folder and shared), path -> bytes
    calls: list[list[Event]] = field(default_factory=list)  # each successful call's events, in call order
    shared_puts: list[Event] = field(default_factory=list)  # its successful puts as the shared component, in order
    shared_deletes: int = 0
    shared_refused: list[Event] = field(default_factory=list)  # the puts refused, which no event may report
    refused: int = 0
    made: int = 0

    @property
    def component(self) -> str:
        return f"c{self.number}"

    def path(self, name: str) -> str:
        return f"t{self.number}/{name}"

    def data(self) -> bytes:
        self.made += 1
        return f"{self.component} {self.made}".encode() * self.rng.randint(0, 3)  # unique, or empty

    def local_file(self, data: bytes) -> pathlib.Path:
        local = self.work / f"f{self.made}"
        local.write_bytes(data)
        return local

    def put_event(self, path: str, data: bytes) -> Event:
        return ("put", path, self.component, len(data), sha256(data))

    def own_state(self) -> list[tuple[str, int, str]]:
        return [(e.path, e.size, e.sha256) for e in self.drive.entries(f"t{self.number}", self.component, True)]

    def refuses(self, expected: type[DriveError], call: Callable[[], object]) -> None:
        """`call` raises `expected`, saying why, and leaves this client's files and the taken file as they were."""
        before = self.own_state(), self.drive.stat(TAKEN)
        with pytest.raises(DriveError) as raised:
            call()
        assert isinstance(raised.value, expected), f"{raised.value!r}, expected {expected.__name__}"
        assert str(raised.value), "a refusal says why"
        assert (self.own_state(), self.drive.stat(TAKEN)) == before, "a refused call changed the drive"
        self.refused += 1

    # -- calls ----------------------------------------------------------------------------------------

    def put_file(self) -> None:
        path, data = self.path(self.rng.choice(OWN)), self.data()
        local = self.local_file(data)
        if any(p != path and (below(p, path) or below(path, p)) for p in self.files):
            self.refuses(InvalidArgument, lambda: self.drive.put(local, to=path))  # its own folder, or file above
            return
        self.drive.put(local, to=path)
        self.files[path] = data
        self.calls.append([self.put_event(path, data)])

    def put_folder(self) -> None:
        path = self.path(self.rng.choice(OWN))
        wanted = {f"{path}/{name}": self.data() for name in FOLDER_FILES}
        if any(p != q and (below(p, q) or below(q, p)) for p in wanted for q in self.files):
            return self.put_file()  # a refused folder put may store some of its files: not one to make here
        folder = self.work / f"d{self.made}"
        for name, data in zip(FOLDER_FILES, wanted.values(), strict=True):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        self.drive.put(folder, to=path)
        self.files.update(wanted)
        self.calls.append([self.put_event(p, d) for p, d in wanted.items()])

    def delete(self) -> None:
        path = self.path(self.rng.choice([*OWN, "missing"]))
        gone = sorted(p for p in self.files if below(p, path))
        if not gone:
            self.refuses(NotFound, lambda: self.drive.delete(path))
            return
        self.drive.delete(path)
        for p in gone:
            del self.files[p]
        self.calls.append([("delete", p, self.component, 0, "") for p in gone])

    def touch_taken(self) -> None:
        local = self.local_file(self.data())
        call = self.rng.choice([
            lambda: self.drive.put(local, to=TAKEN),
            lambda: self.drive.put(local, to=f"{TAKEN}/under"),
        ])
        self.refuses(AlreadyExists, call)
        self.refuses(NotFound, lambda: self.drive.delete(TAKEN))

    def race(self) -> None:
        """A put of a shared path that another client may hold: it stores the file or is refused as a duplicate."""
        path, data = self.rng.choice(RACED), self.data()
        if path in self.files and self.rng.random() < 0.5:
            self.drive.delete(path)
            del self.files[path]
            self.calls.append([("delete", path, self.component, 0, "")])
            return
        try:
            self.drive.put(self.local_file(data), to=path)
        except AlreadyExists:
            assert path not in self.files, "a put of a path the client holds was refused"
            self.refused += 1
            return
        self.files[path] = data
        self.calls.append([self.put_event(path, data)])

    def contend(self) -> None:
        """A put or delete of a path that other clients change as the same component: it may find a file or a
        folder there, or nothing."""
        path, data = self.rng.choice(CONTENDED), self.data() or f"{self.component} {self.made}".encode()
        if self.rng.random() < 0.4:
            try:
                self.sharing.delete(path)
            except NotFound:
                return
            self.shared_deletes += 1
            return
        event = ("put", path, SHARER, len(data), sha256(data))
        try:
            self.sharing.put(self.local_file(data), to=path)
        except InvalidArgument:  # a file of the path's folder, or a folder at it
            self.shared_refused.append(event)
            return
        self.shared_puts.append(event)

    def run(self) -> None:
        moves = [self.put_file, self.put_file, self.put_folder, self.delete, self.delete, self.touch_taken,
                 self.race, self.race, self.contend, self.contend]
        for _ in range(STEPS):
            self.rng.choice(moves)()


def watched(drive: Drive, after: int, path: str = ".", stop_after: int | None = None) -> list[Sequenced]:
    """The events after `after` up to the end marker's put (or the first `stop_after` of them)."""
    seen: list[Sequenced] = []
    for event in drive.watch(path, after_sequence=after):
        seen.append(as_event(event.sequence, event.kind, event.file))
        if len(seen) == stop_after or (event.kind == "put" and event.file.path == END):
            return seen
    raise AssertionError("the watch ended")


def replayed(events: list[Sequenced]) -> list[tuple[str, str, int, str]]:
    """The files that the events leave in an empty drive: (path, component, size, sha256), sorted."""
    files: dict[tuple[str, str], tuple[int, str]] = {}
    for sequence, (kind, path, component, size, digest) in events:
        if kind == "put":
            files[path, component] = size, digest
        else:
            assert files.pop((path, component), None) is not None, f"{sequence}: a delete of no file"
    return sorted((path, component, *rest) for (path, component), rest in files.items())


def grouped_as(calls: list[list[Event]], events: list[Event]) -> list[list[Event]]:
    """`events` cut into the sizes of `calls`, each part sorted: a folder's files commit in any order."""
    parts, at = [], 0
    for call in calls:
        parts.append(sorted(events[at:at + len(call)]))
        at += len(call)
    return [*parts, events[at:]] if events[at:] else parts


def check_watch_model(endpoints: list[str], seed: int) -> None:
    uri = unique_drive_uri(f"watch_model_{seed}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="watch-model-"))
    replica = [endpoints[i % len(endpoints)] for i in range(CLIENTS + 1)]
    try:
        owner = Drive(uri, component_name=OWNER, endpoint=replica[0], root_folder=str(work))
        start = current_sequence(replica[0], uri)
        (work / "owned").write_bytes(b"owned")
        owner.put("owned", to=TAKEN)

        def resumed() -> list[Sequenced]:
            first = watched(Drive(uri, endpoint=replica[0]), start, stop_after=RESUMED_AFTER)
            assert first[-1][1][1] != END, "the watch ended before its resume"
            return first + watched(Drive(uri, endpoint=replica[1]), first[-1][0])

        watchers = [Background(lambda: watched(Drive(uri, endpoint=replica[0]), start)),
                    Background(lambda: watched(Drive(uri, endpoint=replica[1]), start, SHARED)),
                    Background(resumed)]
        clients = []
        for number in range(CLIENTS):
            (work / f"c{number}").mkdir()
            endpoint = replica[number + 1]
            clients.append(Client(number, Drive(uri, component_name=f"c{number}", endpoint=endpoint),
                                  Drive(uri, allow_duplicates=True, component_name=SHARER, endpoint=endpoint),
                                  work / f"c{number}", random.Random(seed * 100 + number)))
        running = [Background(client.run) for client in clients]
        for thread in watchers + running:
            thread.start()
        for thread in running:
            thread.join_checked(60)
        owner.put("owned", to=END)
        whole, shared, resumed_events = (thread.join_checked(30) for thread in watchers)

        sequences = [sequence for sequence, _ in whole]
        assert sequences == sorted(set(sequences)), "sequences do not strictly increase"
        assert resumed_events == whole, "the resumed watch saw other events"
        assert shared == [e for e in whole if below(e[1][1], SHARED)], "the folder's watch saw other events"
        listed = [(e.path, e.component, e.size, e.sha256) for e in owner.entries(".", recursive=True)]
        assert replayed(whole) == listed
        for client in clients:
            own = [event for _, event in whole if event[2] == client.component]
            assert grouped_as(client.calls, own) == [sorted(call) for call in client.calls], client.component
        shared_events = [event for _, event in whole if event[2] == SHARER]
        for client in clients:
            puts = set(client.shared_puts)
            assert [e for e in shared_events if e in puts] == client.shared_puts, "a shared put unreported"
            assert not set(client.shared_refused) & set(shared_events), "a refused put reported"
        deletes = sum(1 for event in shared_events if event[0] == "delete")
        assert deletes >= sum(c.shared_deletes for c in clients), "a delete unreported"
        raced = [(e.path, e.component) for e in owner.entries(SHARED, recursive=True) if e.path in RACED]
        assert len({path for path, _ in raced}) == len(raced), f"two components hold one raced path: {raced}"
        assert sum(c.refused for c in clients) > 0 and sum(len(c.calls) for c in clients) > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonHandle]]:
    with two_replicas_in(tmp_path_factory.mktemp("watch-model-cluster")) as replicas:
        yield replicas


@pytest.mark.parametrize("seed", SEEDS)
def test_the_watch_of_a_drive_on_a_data_dir_tells_its_changes(daemon: DaemonHandle, seed: int) -> None:
    check_watch_model([daemon.endpoint], seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_watch_of_a_drive_on_two_replicas_tells_its_changes(two_replicas: list[DaemonHandle], seed: int) -> None:
    check_watch_model([r.endpoint for r in two_replicas], seed)
