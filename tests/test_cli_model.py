"""A differential test of the `drive` command against the Python API: hypothesis makes sequences of puts, gets (to
a file, a folder, stdout), lists, stats and deletes of two components over a few colliding paths, and runs each
step through the CLI on one drive and through `Drive` on another of the same daemon, each with its own local root
holding the same files. After each step the CLI's exit status is README's for what `Drive` raised (1 for any error,
0 when it returned), its --json output carries what `Drive` returned (its error: the exception's class), its stderr
is one `drive: ...` line when it failed and nothing else, and both drives hold the same files and both roots the
same bytes.

Each CLI call is a process start (~0.4 s): few examples, of a few steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonHandle, snapshot, unique_drive_uri
from hypothesis import given, settings
from hypothesis import strategies as st

from drive_client import Drive, DriveError, FileStat

pytestmark = pytest.mark.timeout(120)

NFD_E = "e\u0301"  # "é" as two code points: the drive keeps it as NFC's one
PATHS = ["a", "d", "d/a", "d/b", "x y", NFD_E]  # "d" is a local folder at first, a file once a get or edit makes it

COMPONENTS = ["c1", "c2"]
STORED_FIRST = [("a", "c1"), ("d", "c2")]  # (path, component) every example's drives hold, before what it draws
OUT = "out"  # a local folder in both roots, never removed: a get into it goes in it, as cp does
TARGETS = [None, "same", OUT, f"{OUT}/x"]  # a get's LOCAL: none (the name in the cwd), the drive path, ...
STABLE_FIELDS = ("path", "size", "sha256", "etag", "component", "folder")  # what two drives' entries share


@dataclass(frozen=True)
class Step:
    """One operation, as both faces take it."""

    op: str  # put, get, cat, ls, stat, rm, edit
    path: str
    component: str
    only: str | None = None
    target: str | None = None
    overwrite: bool = False
    as_json: bool = True
    data: bytes = b""
    duplicates: bool = False  # put --allow-duplicates
    timeout: float | None = None  # get --timeout


def steps() -> st.SearchStrategy[Step]:
    paths, components, only = st.sampled_from(PATHS), st.sampled_from(COMPONENTS), st.sampled_from([None, *COMPONENTS])
    # Most gets name no component and do not wait, as most gets find their file: those that wait take 0.2 s a face.
    get_only, timeout = st.sampled_from([None, None, *COMPONENTS]), st.sampled_from([None, None, None, 0.2])
    return st.one_of(
        st.builds(Step, st.just("put"), paths, components, target=st.sampled_from([None, "t/"]),
                  duplicates=st.booleans()),
        st.builds(Step, st.just("get"), paths, components, get_only, st.sampled_from(TARGETS), st.booleans(),
                  timeout=timeout),
        st.builds(Step, st.just("cat"), paths, components, only),
        st.builds(Step, st.just("ls"), st.sampled_from(["", *PATHS]), components, only, as_json=st.booleans()),
        st.builds(Step, st.just("stat"), st.sampled_from(["", *PATHS]), components, only, as_json=st.booleans()),
        st.builds(Step, st.just("rm"), st.sampled_from(["", *PATHS]), components),
        st.builds(Step, st.just("edit"), paths, components, data=st.binary(max_size=6)),
    )


def fields(stat: FileStat) -> dict[str, Any]:
    return {name: getattr(stat, name) for name in STABLE_FIELDS}


def stable(entry: dict[str, Any]) -> dict[str, Any]:
    return {name: entry[name] for name in STABLE_FIELDS}


def everything(drive: Drive) -> list[dict[str, Any]]:
    """Every file of every component of `drive`, as its stable fields."""
    return sorted((fields(e) for e in drive.entries(".", recursive=True)), key=lambda f: (f["path"], f["component"]))


def drive_command(cwd: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[bytes]:
    """`drive ARGS` run in `cwd`, with the DRIVE_ variables given and no other."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVE_")}
    return subprocess.run([sys.executable, "-m", "drive_client.cli", *args], capture_output=True, cwd=cwd,
                          env={**env, **variables}, timeout=60)


def cli(daemon: DaemonHandle, cwd: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[bytes]:
    return drive_command(cwd, "--endpoint", daemon.endpoint, *args, **variables)


def local_target(root: Path, step: Step) -> str:
    """Where the CLI's get writes, relative to its cwd, as README says: LOCAL, in it when it is a folder; without
    LOCAL, the drive path's name in the cwd."""
    name = step.path.rsplit("/", 1)[-1]
    if step.target is None:
        return name
    target = step.path if step.target == "same" else step.target
    return f"{target}/{name}" if (root / target).is_dir() else target


def command(step: Step, uri: str, root: Path) -> list[str]:
    """The CLI's arguments for `step` on drive `uri`."""
    location = f"{uri}/{step.path}" if step.path else uri
    json_flag = ["--json"] if step.as_json else []
    only = ["--only", step.only] if step.only else []
    if step.op == "put":
        duplicates = ["--allow-duplicates"] if step.duplicates else []
        to = f"{uri}/{step.target}" if step.target else location
        return ["--component", step.component, *json_flag, "put", step.path, to, *duplicates]
    if step.op == "get":
        local = [] if step.target is None else [step.path if step.target == "same" else step.target]
        timeout = [] if step.timeout is None else ["--timeout", str(step.timeout)]
        return [*json_flag, "get", location, *local, *only, *timeout, *(["--overwrite"] if step.overwrite else [])]
    if step.op == "cat":
        return ["get", location, "-", *only]
    if step.op == "rm":
        return ["--component", step.component, *json_flag, "rm", location]
    return [*json_flag, step.op, location, *only]  # ls, stat


def api_call(drive: Drive, step: Step, root: Path) -> Any:
    """What `Drive` answers for `step`, as the CLI's --json prints it (cat: the file's bytes)."""
    if step.op == "put":
        to = f"{step.target}{Path(step.path).name}" if step.target else None
        return [fields(f) for f in drive.put(step.path, to=to)]
    if step.op == "get":
        target = local_target(root, step)
        drive.get(step.path, step.only, step.timeout, step.overwrite, to=target)
        return {"path": target}
    if step.op == "cat":
        return b"".join(drive.read_range(step.path, component_name=step.only))
    if step.op == "ls":
        return [fields(e) for e in drive.entries(step.path or ".", step.only)]
    if step.op == "stat":
        return fields(drive.stat(step.path, step.only))
    drive.delete(step.path)
    return {"deleted": None}


def cli_answer(step: Step, stdout: bytes, root: Path) -> Any:
    """The CLI's stdout of a step that succeeded, read as `api_call` answers."""
    if step.op == "cat":
        return stdout
    if step.op == "ls" and not step.as_json:
        return stdout.decode().splitlines()
    answer = json.loads(stdout)
    if step.op in ("put", "ls"):
        return [stable(e) for e in answer]
    if step.op == "stat":
        return stable(answer)
    if step.op == "get":
        return {"path": os.path.relpath(answer["path"], root)} if step.as_json else None
    return {"deleted": None}


def expected(step: Step, answer: Any) -> Any:
    """What the CLI's stdout must carry of `Drive`'s answer."""
    if step.op == "ls" and not step.as_json:
        return [e["path"] for e in answer]
    if step.op == "get" and not step.as_json:
        return None
    return answer


def edit(root: Path, step: Step) -> None:
    """Writes `step.data` at `step.path` of a local root, where a file can be (not over a folder, not below a
    file)."""
    file = root / step.path
    if file.is_dir() or not file.parent.is_dir():
        return
    file.write_bytes(step.data)


def check_step(daemon: DaemonHandle, step: Step, faces: dict[str, tuple[Drive, Path]]) -> None:
    cli_drive, cli_root = faces["cli"]
    api_drive, api_root = faces["api"]
    if step.op == "edit":
        edit(cli_root, step)
        edit(api_root, step)
        return
    args = command(step, cli_drive.id, cli_root)
    api = Drive(api_drive.id, component_name=step.component, root_folder=str(api_root),
                endpoint=daemon.endpoint, allow_duplicates=step.duplicates, retry_seconds=0)
    try:
        answer, error = api_call(api, step, api_root), None
    except DriveError as err:
        answer, error = None, err
    res = cli(daemon, cli_root, *args)
    said = f"drive {' '.join(args)}: exit {res.returncode}\nstdout: {res.stdout!r}\nstderr: {res.stderr!r}"
    if error is None:
        assert res.returncode == 0, f"Drive answered {answer!r}; {said}"
        assert res.stderr == b"", said
        if step.op == "get" and step.as_json:
            answer = {"path": answer["path"]}
        assert cli_answer(step, res.stdout, cli_root) == expected(step, answer), said
    else:
        assert res.returncode == 1, f"Drive raised {error!r}; {said}"
        lines = res.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("drive: ") and "Traceback" not in lines[0], said
        if step.as_json and step.op != "cat":
            assert json.loads(res.stdout)["type"] == type(error).__name__, f"Drive raised {error!r}; {said}"
    assert everything(cli_drive) == everything(api_drive), said
    assert snapshot(cli_root) == snapshot(api_root), said


def local_root(folder: Path) -> Path:
    """A local root holding the files the steps put: `a`, a folder `d` of two, `x y`, a decomposed `é`, and the
    folder `out`."""
    folder.mkdir()
    (folder / "a").write_bytes(b"a")
    (folder / "d").mkdir()
    (folder / "d" / "a").write_bytes(b"da")
    (folder / "d" / "b").write_bytes(b"")
    (folder / "x y").write_bytes(b"xy")
    (folder / NFD_E).write_bytes(b"e")
    (folder / OUT).mkdir()
    return folder


def put_first(daemon: DaemonHandle, uri: str, root: Path, puts: list[tuple[str, str]]) -> None:
    """Stores what `puts` names (path, component) through `Drive`, so that the steps start on a drive holding files;
    a put refused (a path the other component holds) is passed by, on both drives alike."""
    for path, component in puts:
        with contextlib.suppress(DriveError):
            Drive(uri, component_name=component, root_folder=str(root), endpoint=daemon.endpoint).put(path)


# Each step starts a `drive` process (~0.3 s): a dozen sequences on every CI run, more with the thorough profile.
@settings(max_examples=100 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 12, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(COMPONENTS)), max_size=3),
       st.lists(steps(), min_size=4, max_size=8))
def test_the_cli_does_what_the_python_api_does(daemon, puts, sequence):
    with tempfile.TemporaryDirectory() as tmp:
        faces = {}
        for face in ("cli", "api"):
            drive, root = Drive(unique_drive_uri(f"climodel_{face}"), endpoint=daemon.endpoint), Path(tmp) / face
            put_first(daemon, drive.id, local_root(root), [*STORED_FIRST, *puts])
            faces[face] = (drive, root)
        for step in sequence:
            check_step(daemon, step, faces)


# Locations of the test's drive `{d}` given badly, and endpoints no daemon can be at: each `rm` of them is refused
BAD_LOCATIONS = ["lit:/{d}/a", "LIT://{d}/a", "http://{d}/a", "lit://{d} /a", "lit://{d}?/a", "lit://{d}//a",
                 "lit://{d}/../{d}/a", "lit://{d}/a/../../a"]
BAD_ENDPOINTS = ["127.0.0.1:99999", "http://127.0.0.1:5", ":1"]


@pytest.mark.parametrize("args", [*(["rm", location] for location in BAD_LOCATIONS),
                                  *(["--endpoint", ep, "--retry-seconds", "0", "rm", "lit://{d}/a"]
                                    for ep in BAD_ENDPOINTS)])
def test_a_bad_location_or_endpoint_fails_with_one_line_and_changes_nothing(daemon, tmp_path, drive_uri, args):
    drive = Drive(drive_uri, root_folder=str(local_root(tmp_path / "root")), endpoint=daemon.endpoint)
    drive.put("a")
    before = everything(drive)
    res = cli(daemon, tmp_path, "--json", *(arg.format(d=drive_uri.removeprefix("lit://")) for arg in args))
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("drive: "), res
    assert json.loads(res.stdout)["type"] in ("InvalidArgument", "Unavailable"), res
    assert everything(drive) == before


@pytest.mark.parametrize(("args", "name"), [
    (["--component", "", "rm", "{uri}/a"], "--component"), (["--endpoint", "", "rm", "{uri}/a"], "--endpoint"),
    (["--token", "", "rm", "{uri}/a"], "--token"), (["stat", "{uri}/a", "--only", ""], "--only"),
    (["put", "", "{uri}/"], "local"), (["get", "{uri}/a", "", "--overwrite"], "local"),
])
def test_an_empty_value_is_refused_not_taken_for_none_given(daemon, tmp_path, drive_uri, args, name):
    """`drive --component "$C" rm ...` or `drive put "$F" lit://d/` with $C or $F unset: `Drive` takes an empty
    component for the default one, and an empty local path (with a drive path to put at) for the root folder, but
    the shell user meant some component or some file, so the command line is refused (exit 2), naming the
    argument, before any call: the drive and the local folder stay as they were."""
    root = local_root(tmp_path / "root")
    drive = Drive(drive_uri, root_folder=str(root), endpoint=daemon.endpoint)
    drive.put("a")
    before, local_before = everything(drive), snapshot(root)
    res = cli(daemon, root, "--retry-seconds", "0", *(arg.format(uri=drive_uri) for arg in args))
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res
    assert f"argument {name}: is empty" in lines[0], res
    assert everything(drive) == before
    assert snapshot(root) == local_before


def test_the_environment_names_the_endpoint_and_component_as_for_drive_and_flags_win(daemon, tmp_path, drive_uri):
    root = local_root(tmp_path / "root")
    put = drive_command(root, "--json", "put", "a", f"{drive_uri}/a", DRIVE_ENDPOINT=daemon.endpoint,
                        DRIVE_COMPONENT="c9")
    assert put.returncode == 0 and json.loads(put.stdout)[0]["component"] == "c9", put
    flagged = cli(daemon, root, "--component", "c8", "--json", "put", "a", f"{drive_uri}/b")  # --endpoint given too
    assert flagged.returncode == 0 and json.loads(flagged.stdout)[0]["component"] == "c8", flagged
    assert [(e["path"], e["component"]) for e in everything(Drive(drive_uri, endpoint=daemon.endpoint))] == [
        ("a", "c9"), ("b", "c8")]


@pytest.mark.parametrize(("name", "value"), [("DRIVE_RETRY_SECONDS", "abc"), ("DRIVE_COMPONENT", "x/y"),
                                             ("DRIVE_TLS", "maybe")])
def test_a_bad_environment_variable_fails_with_one_line_and_stores_nothing(daemon, tmp_path, drive_uri, name, value):
    res = cli(daemon, local_root(tmp_path / "root"), "put", "a", f"{drive_uri}/a", **{name: value})
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("drive: ") and value in lines[0], res
    assert everything(Drive(drive_uri, endpoint=daemon.endpoint)) == []
