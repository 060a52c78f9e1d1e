"""Several OS processes (multiprocessing, spawn) sharing drives, each in its own working
folder: the README's story, with the Drive objects pickled into the workers."""

from __future__ import annotations

import multiprocessing
import os
import pathlib

import pytest

from drive_client import Drive

pytestmark = pytest.mark.timeout(120)


def worker_put(workdir: str, drives: list[Drive], filename: str, content: str) -> list[str]:
    """A worker: works in its own folder (cwd), writes a file, puts it into each drive."""
    os.chdir(workdir)
    pathlib.Path(filename).write_text(content)
    for d in drives:
        d.put(filename)  # resolved against this process's cwd at call time
    return [d.list(".") for d in drives][-1]


def worker_collect(workdir: str, drive_1: Drive, drive_2: Drive) -> dict[str, object]:
    """The fourth worker: waits for every file, then lists and gets them all."""
    os.chdir(workdir)
    got = {}
    wanted = (("d1", drive_1, "a.txt"), ("d1", drive_1, "b.txt"), ("d2", drive_2, "b.txt"), ("d2", drive_2, "c.txt"))
    for folder, d, name in wanted:
        sub = pathlib.Path(folder)  # one folder per drive: b.txt is in both
        sub.mkdir(exist_ok=True)
        os.chdir(sub)
        path = d.get(name, timeout=60)
        got[f"{d}/{name}"] = pathlib.Path(path).read_text()
        assert pathlib.Path(path).resolve().parent == pathlib.Path(workdir, sub).resolve()
        os.chdir(workdir)
    return {
        "list_1": drive_1.list("."),
        "list_2": drive_2.list("."),
        "components_1": sorted(drive_1.stat(n).component for n in ("a.txt", "b.txt")),
        "components_2": sorted(drive_2.stat(n).component for n in ("b.txt", "c.txt")),
        "got": got,
        "pid": os.getpid(),
    }


def test_readme_story_across_processes(daemon, tmp_path, make_drive_uri):
    uri_1, uri_2 = make_drive_uri("d1"), make_drive_uri("d2")
    ep = daemon.endpoint

    def drives(component: str) -> tuple[Drive, Drive]:
        return (Drive(uri_1, component_name=component, endpoint=ep),
                Drive(uri_2, component_name=component, endpoint=ep))

    dirs = {}
    for name in ("work_a", "work_b", "work_c", "work_d"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
    a1, _ = drives("work_a")
    b1, b2 = drives("work_b")
    _, c2 = drives("work_c")
    d1, d2 = drives("work_d")
    assert d1.list(".") == [], "used here first: its channel exists before it is pickled to a worker"

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        # the reader starts first and waits (server-side) for the files to appear
        collector = pool.apply_async(worker_collect, (str(dirs["work_d"]), d1, d2))
        puts = [
            pool.apply_async(worker_put, (str(dirs["work_a"]), [a1], "a.txt", "from A")),
            pool.apply_async(worker_put, (str(dirs["work_b"]), [b1, b2], "b.txt", "from B")),
            pool.apply_async(worker_put, (str(dirs["work_c"]), [c2], "c.txt", "from C")),
        ]
        for p in puts:
            p.get(90)
        result = collector.get(90)

    assert result["pid"] != os.getpid()
    assert result["list_1"] == ["a.txt", "b.txt"]
    assert result["list_2"] == ["b.txt", "c.txt"]
    assert result["components_1"] == ["work_a", "work_b"]
    assert result["components_2"] == ["work_b", "work_c"]
    assert result["got"] == {
        f"{uri_1}/a.txt": "from A",
        f"{uri_1}/b.txt": "from B",
        f"{uri_2}/b.txt": "from B",
        f"{uri_2}/c.txt": "from C",
    }
    # each worker's files stayed in its own folder; the test process's cwd was not used
    assert sorted(p.name for p in dirs["work_a"].iterdir()) == ["a.txt"]
    assert sorted(p.name for p in dirs["work_c"].iterdir()) == ["c.txt"]
    assert sorted(str(p.relative_to(dirs["work_d"])) for p in dirs["work_d"].rglob("*.txt")) == [
        "d1/a.txt", "d1/b.txt", "d2/b.txt", "d2/c.txt",
    ]
    assert not pathlib.Path("a.txt").exists()


def worker_put_many(workdir: str, drive: Drive, prefix: str, count: int) -> int:
    os.chdir(workdir)
    for i in range(count):
        p = pathlib.Path(f"{prefix}/f{i:03d}.bin")
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(1000 + i))
        drive.put(str(p))
    return count


def test_many_processes_one_drive(daemon, tmp_path, drive_uri):
    ctx = multiprocessing.get_context("spawn")
    n, count = 4, 15
    args = []
    for i in range(n):
        wd = tmp_path / f"w{i}"
        wd.mkdir()
        args.append((str(wd), Drive(drive_uri, component_name=f"proc_{i}", endpoint=daemon.endpoint),
                     f"p{i}", count))
    with ctx.Pool(n) as pool:
        assert pool.starmap(worker_put_many, args) == [count] * n
    (tmp_path / "r").mkdir()
    reader = Drive(drive_uri, root_folder=str(tmp_path / "r"), endpoint=daemon.endpoint)
    assert reader.list(".") == [f"p{i}" for i in range(n)]
    for i in range(n):
        assert reader.list(f"p{i}", component_name=f"proc_{i}") == [f"p{i}/f{j:03d}.bin" for j in range(count)]
        assert reader.list(f"p{i}", component_name=f"proc_{(i + 1) % n}") == []
    reader.get("p2")
    for j in range(count):
        name = f"p2/f{j:03d}.bin"
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
