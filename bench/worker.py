"""One measurement, run in its own process.

`python -m bench.worker '{"task": "...", ...}'` runs the task and prints one
line `BENCH-RESULT {json}` with what it measured plus its own peak RSS
(`client_peak_mib`). Connections are opened before the timed region; files
are read from and written to local disk by every system alike (except the
raw TCP and raw gRPC ceilings, which touch no disk).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
CHUNK = 1024 * 1024


# ---------------------------------------------------------------- helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def settle_before_transfer(size: int, folder: str) -> None:
    """Runs before every large transfer, of every system alike (bench/WHY.md).

    First it writes out what earlier transfers left dirty: nginx does not
    fsync a PUT, and its 1 GiB would otherwise be written back during the
    next system's measurement. Then it writes and removes `size` bytes in
    `folder`: on this VM, memory the guest frees goes back to the host after
    about 2 s (virtio balloon free page reporting), and its first touch
    afterwards costs about 2.3 s of system time per GiB, so whichever
    transfer happened to follow another's deletes ran fast and the others
    slow (nginx's 1 GiB GET measured 375 and 2,484 MB/s in one run). Each
    transfer now starts with as much memory freed a moment ago as it moves.
    """
    os.sync()
    scratch = Path(folder) / f".memory-at-hand-{os.getpid()}"
    block = bytes(CHUNK)
    with open(scratch, "wb") as f:
        for _ in range(0, size, CHUNK):
            f.write(block)
    scratch.unlink()


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def _boto3_client(url: str):
    import boto3

    return boto3.session.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    ).client("s3", endpoint_url=url)


def _drive(endpoint: str, root: str, uri: str = "lit://bench"):
    from drive_client import Drive

    return Drive(uri, component_name="b", root_folder=root, endpoint=endpoint)


def _drive_warm(d) -> None:
    d.list(".")  # opens the channel outside the timed region


# ---------------------------------------------------------------- large files


def task_tcp(size: int, chunk: int = CHUNK) -> dict:
    """Raw TCP over loopback between two processes: the physical limit of the path."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # receiver
        try:
            conn, _ = lsock.accept()
            buf = bytearray(chunk)
            view = memoryview(buf)
            n = 0
            while True:
                r = conn.recv_into(view)
                if not r:
                    break
                n += r
            conn.sendall(str(n).encode())
            conn.close()
        finally:
            os._exit(0)
    lsock.close()
    block = b"\x5a" * chunk
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    left = size
    while left > 0:
        if left >= chunk:
            s.sendall(block)
            left -= chunk
        else:
            s.sendall(block[:left])
            left = 0
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64) or b"0")
    dt = time.perf_counter() - t0
    s.close()
    os.waitpid(pid, 0)
    if got != size:
        raise RuntimeError(f"tcp receiver counted {got}, sent {size}")
    return {"seconds": dt, "bytes": size}


def task_cp_fsync(src: str, dst: str) -> dict:
    """`cp` then fsync of the copy: the durable-write limit of the disk."""
    import subprocess

    d = Path(dst)
    _rm(d)
    t0 = time.perf_counter()
    subprocess.run(["cp", src, dst], check=True)
    _fsync_path(d)
    _fsync_path(d.parent)
    dt = time.perf_counter() - t0
    size = d.stat().st_size
    _rm(d)
    return {"seconds": dt, "bytes": size}


def task_grpc_up(endpoint: str, size: int, chunk: int = CHUNK, checksums: bool = False) -> dict:
    from bench.rawgrpc import upload

    return {"seconds": upload(endpoint, size, chunk, checksums), "bytes": size}


def task_grpc_down(endpoint: str, size: int, chunk: int = CHUNK, checksums: bool = False) -> dict:
    from bench.rawgrpc import download

    return {"seconds": download(endpoint, size, chunk, checksums), "bytes": size}


def task_boto3_put(url: str, bucket: str, src: str, key: str) -> dict:
    c = _boto3_client(url)
    c.head_bucket(Bucket=bucket)
    size = os.path.getsize(src)
    t0 = time.perf_counter()
    c.upload_file(src, bucket, key)
    return {"seconds": time.perf_counter() - t0, "bytes": size}


def task_boto3_get(url: str, bucket: str, key: str, dst: str) -> dict:
    c = _boto3_client(url)
    c.head_bucket(Bucket=bucket)
    _rm(Path(dst))
    t0 = time.perf_counter()
    c.download_file(bucket, key, dst)
    dt = time.perf_counter() - t0
    size = os.path.getsize(dst)
    _rm(Path(dst))
    return {"seconds": dt, "bytes": size}


def task_nginx_put(url: str, src: str, name: str) -> dict:
    import requests

    with requests.Session() as s:
        s.head(url + "/")
        size = os.path.getsize(src)
        t0 = time.perf_counter()
        with open(src, "rb") as f:
            r = s.put(f"{url}/{name}", data=f)
        dt = time.perf_counter() - t0
        r.raise_for_status()
    return {"seconds": dt, "bytes": size}


def task_nginx_get(url: str, name: str, dst: str) -> dict:
    import requests

    _rm(Path(dst))
    with requests.Session() as s:
        s.head(url + "/")
        t0 = time.perf_counter()
        with s.get(f"{url}/{name}", stream=True) as r:
            r.raise_for_status()
            with open(dst, "wb") as f:
                for block in r.iter_content(CHUNK):
                    f.write(block)
        dt = time.perf_counter() - t0
    size = os.path.getsize(dst)
    _rm(Path(dst))
    return {"seconds": dt, "bytes": size}


def _timed_drive_call(twin: str, endpoint: str, root: str, method: str, *args: Any, **kwargs: Any) -> float:
    """Seconds one call of `Drive.method` (or `AsyncDrive.method`, on a new event loop) takes, channel open."""
    if twin == "Drive":
        d = _drive(endpoint, root)
        _drive_warm(d)
        t0 = time.perf_counter()
        getattr(d, method)(*args, **kwargs)
        return time.perf_counter() - t0

    async def timed() -> float:
        from drive_client import AsyncDrive

        async with AsyncDrive("lit://bench", component_name="b", root_folder=root, endpoint=endpoint) as d:
            await d.list(".")  # opens the channel outside the timed region
            t0 = time.perf_counter()
            await getattr(d, method)(*args, **kwargs)
            return time.perf_counter() - t0

    return asyncio.run(timed())


def _streamed_unless(handoff: bool) -> None:
    """`handoff=False`: the file's bytes are streamed, as to or from a daemon on another host (README, Same-host puts
    and gets)."""
    if not handoff:
        os.environ["DRIVE_HANDOFF"] = "0"


def task_drive_put(endpoint: str, root: str, relpath: str, twin: str = "Drive", handoff: bool = True) -> dict:
    _streamed_unless(handoff)
    size = _tree_size(Path(root) / relpath)
    return {"seconds": _timed_drive_call(twin, endpoint, root, "put", relpath), "bytes": size}


def task_drive_get(endpoint: str, root: str, relpath: str, twin: str = "Drive", handoff: bool = True) -> dict:
    _streamed_unless(handoff)
    target = Path(root) / relpath
    _rm(target)
    dt = _timed_drive_call(twin, endpoint, root, "get", relpath, overwrite=True)
    size = _tree_size(target)
    _rm(target)
    return {"seconds": dt, "bytes": size}


def _tree_size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


# ---------------------------------------------------------------- small files


def _run_ops(
    names: list[str], conc: int, budget: float, make: Callable[[], Callable[[str], None]], start_at: float = 0.0
) -> dict:
    """Runs op(name) over names with `conc` threads, each with its own client.

    Starts at wall-clock time `start_at` when given (so that client processes
    measured together overlap), stops early after `budget` seconds. Returns
    ops/s and latency percentiles.
    """
    ops = [make() for _ in range(conc)]  # clients built and warmed before timing
    time.sleep(max(0.0, start_at - time.time()))
    lock = threading.Lock()
    it = iter(names)
    lat: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(conc + 1)
    deadline = [0.0]

    def worker(op: Callable[[str], None]) -> None:
        mine: list[float] = []
        start.wait()
        while time.perf_counter() < deadline[0]:
            with lock:
                name = next(it, None)
            if name is None:
                break
            t = time.perf_counter()
            try:
                op(name)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                break
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(op,), daemon=True) for op in ops]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + budget
    start.wait()
    for t in threads:
        t.join(budget + 120)
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} ops failed, first: {errors[0]}")
    lat.sort()
    return {
        "ops": len(lat),
        "seconds": dt,
        "ops_s": len(lat) / dt if dt > 0 else 0.0,
        "p50_ms": _percentile(lat, 0.50) * 1e3,
        "p99_ms": _percentile(lat, 0.99) * 1e3,
        "complete": len(lat) == len(names),
    }


def task_small(
    system: str,
    op: str,
    conc: int,
    names: list[str],
    src_root: str,
    dst_root: str,
    budget: float,
    endpoint: str = "",
    url: str = "",
    bucket: str = "",
    drive: str = "lit://bench",
    start_at: float = 0.0,
) -> dict:
    src, dst = Path(src_root), Path(dst_root)
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:  # subfolders of the target exist before timing, for every system alike
        (dst / n).parent.mkdir(parents=True, exist_ok=True)

    if system == "drive":

        def make() -> Callable[[str], None]:
            if op == "put":
                d = _drive(endpoint, str(src), drive)
                _drive_warm(d)
                return d.put
            d = _drive(endpoint, str(dst), drive)
            _drive_warm(d)
            return lambda name: d.get(name, overwrite=True)

    elif system == "boto3_moto":

        def make() -> Callable[[str], None]:
            c = _boto3_client(url)
            c.head_bucket(Bucket=bucket)
            if op == "put":

                def put(name: str) -> None:
                    c.put_object(Bucket=bucket, Key=name, Body=(src / name).read_bytes())

                return put

            def get(name: str) -> None:
                (dst / name).write_bytes(c.get_object(Bucket=bucket, Key=name)["Body"].read())

            return get

    elif system == "nginx":

        def make() -> Callable[[str], None]:
            import requests

            s = requests.Session()
            s.head(url + "/")
            if op == "put":

                def put(name: str) -> None:
                    s.put(f"{url}/{name}", data=(src / name).read_bytes()).raise_for_status()

                return put

            def get(name: str) -> None:
                r = s.get(f"{url}/{name}")
                r.raise_for_status()
                (dst / name).write_bytes(r.content)

            return get

    elif system == "grpc_raw":

        def make() -> Callable[[str], None]:
            from bench.rawgrpc import SmallCalls

            calls = SmallCalls(endpoint)
            if op == "put":
                return lambda name: calls.put((src / name).read_bytes())
            size = (src / names[0]).stat().st_size

            def get(name: str) -> None:
                (dst / name).write_bytes(calls.get(size))

            return get

    else:
        raise ValueError(system)
    return _run_ops(names, conc, budget, make, start_at)


def task_folder(
    system: str,
    op: str,
    folder: str,
    src_root: str,
    dst_root: str,
    budget: float,
    endpoint: str = "",
    url: str = "",
) -> dict:
    """A folder of many small files: one Drive put/get vs a loop of requests PUT/GET on nginx."""
    src, dst = Path(src_root), Path(dst_root)
    files = sorted(p.relative_to(src).as_posix() for p in (src / folder).rglob("*") if p.is_file())
    if system == "drive":
        if op == "put":
            d = _drive(endpoint, str(src))
            _drive_warm(d)
            t0 = time.perf_counter()
            d.put(folder)
            dt = time.perf_counter() - t0
        else:
            dst.mkdir(parents=True, exist_ok=True)
            d = _drive(endpoint, str(dst))
            _drive_warm(d)
            _rm(dst / folder)
            t0 = time.perf_counter()
            d.get(folder, overwrite=True)
            dt = time.perf_counter() - t0
            got = sum(1 for p in (dst / folder).rglob("*") if p.is_file())
            if got != len(files):
                raise RuntimeError(f"drive folder get wrote {got} files, expected {len(files)}")
        return {"seconds": dt, "files": len(files), "files_s": len(files) / dt, "complete": True}
    if system == "nginx_loop":
        import requests

        done = 0
        with requests.Session() as s:
            s.head(url + "/")
            if op == "get":
                _rm(dst / folder)
                (dst / folder).mkdir(parents=True)
            t0 = time.perf_counter()
            deadline = t0 + budget
            for name in files:
                if time.perf_counter() > deadline:
                    break
                if op == "put":
                    s.put(f"{url}/{name}", data=(src / name).read_bytes()).raise_for_status()
                else:
                    r = s.get(f"{url}/{name}")
                    r.raise_for_status()
                    out = dst / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(r.content)
                done += 1
            dt = time.perf_counter() - t0
        return {"seconds": dt, "files": done, "files_s": done / dt, "complete": done == len(files)}
    raise ValueError(system)


# ---------------------------------------------------------------- DataLoader


def task_loader(system: str, workers: int, batch: int, endpoint: str = "", url: str = "", bucket: str = "",
                root: str = "") -> dict:
    """Samples per second of a torch DataLoader over one folder (bench/loader.py; needs torch)."""
    from bench.loader import samples_per_second

    return samples_per_second(system, workers, batch, endpoint, url, bucket, root)


# ---------------------------------------------------------------- index


def task_index(keys_per_level: int) -> dict:
    try:
        from bench import bench_mount
    except ImportError as e:
        return {"missing": f"bench/bench_mount.py is not there yet ({e})"}
    return {"result": bench_mount.measure(keys_per_level=keys_per_level)}


TASKS: dict[str, Callable[..., dict]] = {
    name[len("task_") :]: fn for name, fn in globals().items() if name.startswith("task_")
}


def main() -> None:
    spec: dict[str, Any] = json.loads(sys.argv[1])
    task = spec.pop("task")
    if "settle" in spec:
        settle_before_transfer(*spec.pop("settle"))
    out = TASKS[task](**spec)
    out["client_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
