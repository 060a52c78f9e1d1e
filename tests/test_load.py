"""Load (issue 13): 64 clients at once, for a bounded time, putting, getting, listing, stating and deleting
files of 0 B to 64 MiB. No call fails, every get is verified byte for byte against what its client put,
and afterwards the daemon is back to its resting descriptors and memory. Prints the throughput.

The clients are threads in 4 processes (16 each), each with a component and folder of its own, so every
answer is known in advance: a get must return the last version its client put, a stat its size, a list
its names, and a delete must find its file. Sizes: most small (the commit worker's path), some of a few
MiB, a few up to 64 MiB (streamed, fsynced). LOAD_SECONDS sets the time (12 s by default).

Resting state: the daemon's descriptors and memory after one short round of the same mix (its threads,
its commit worker, its buffers started). Afterwards descriptors must come back to within 8 of it (the
executor's threads may hold a few transient ones) and memory to within `KEEP_FREE` (freed buffers kept for
reuse, see drive_client.malloc) plus 48 MiB of it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import threading
import time
from collections import Counter

import grpc
import pytest
from conftest import MIB, open_fds, rss_mib, wait_until

from drive_client.malloc import KEEP_FREE
from drive_client.pb import drive_pb2 as pb
from drive_client.pb import drive_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROCESSES, THREADS = 4, 16
DRIVE = "lit://load"
BLOCK = 64 * MIB


def size_of(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.70:
        return rng.randint(0, 64 * 1024)
    if roll < 0.97:
        return rng.randint(64 * 1024, 4 * MIB)
    return rng.randint(4 * MIB, 64 * MIB)


def content(block: memoryview, tag: bytes, size: int) -> list[memoryview | bytes]:
    """The pieces of a file of `size` bytes that starts with `tag` (so no two versions are alike)."""
    head = (tag * (size // len(tag) + 1))[: min(size, 64)]
    rest = block[: size - len(head)]
    return [head] + [rest[i:i + MIB] for i in range(0, len(rest), MIB)]


def put(stub, path: str, component: str, pieces: list) -> str:
    digest = hashlib.sha256()

    def messages():
        yield pb.PutRequest(header=pb.PutHeader(drive=DRIVE, path=path, component=component))
        for piece in pieces:
            digest.update(piece)
            yield pb.PutRequest(data=bytes(piece))
        yield pb.PutRequest(finish=pb.PutFinish(sha256=digest.hexdigest()))

    answer = stub.Put(messages(), timeout=300)
    assert answer.files[0].sha256 == digest.hexdigest()
    return digest.hexdigest()


def client(
    endpoint: str, seconds: float, run: str, number: int, block: memoryview, counts: Counter, errors: list
) -> None:
    rng = random.Random(number)
    component = f"{run}c{number}"  # a namespace of its own: every answer is known
    held: dict[str, tuple[str, int]] = {}  # path -> (sha256, size) as last put
    with grpc.insecure_channel(endpoint) as channel:
        stub = drive_pb2_grpc.DriveServiceStub(channel)
        deadline = time.monotonic() + seconds
        version = 0
        while time.monotonic() < deadline:
            action = rng.choices(["put", "get", "list", "stat", "delete"], [4, 4, 1, 1, 1])[0]
            if action != "put" and not held:
                action = "put"
            try:
                if action == "put":
                    path = f"{component}/f{rng.randint(0, 7)}.bin"
                    size = size_of(rng)
                    version += 1
                    held[path] = (put(stub, path, component, content(block, f"{number}:{version}:".encode(), size)),
                                  size)
                    counts["bytes_put"] += size
                elif action == "get":
                    path = rng.choice(sorted(held))
                    digest, got = hashlib.sha256(), 0
                    for message in stub.Get(pb.GetRequest(drive=DRIVE, path=path, component=component), timeout=300):
                        if message.WhichOneof("message") == "data":
                            digest.update(message.data)
                            got += len(message.data)
                    assert (digest.hexdigest(), got) == held[path], f"get {path}: not what was put"
                    counts["bytes_got"] += got
                elif action == "list":
                    answer = stub.List(pb.ListRequest(drive=DRIVE, path=component, component=component), timeout=60)
                    assert [e.path for e in answer.entries] == sorted(held), "list"
                elif action == "stat":
                    path = rng.choice(sorted(held))
                    info = stub.Stat(pb.StatRequest(drive=DRIVE, path=path, component=component), timeout=60)
                    assert (info.sha256, info.size) == held[path], f"stat {path}"
                else:
                    path = rng.choice(sorted(held))
                    request = pb.DeleteRequest(drive=DRIVE, path=path, component=component)
                    assert stub.Delete(request, timeout=60).files_deleted == 1
                    del held[path]
                counts[action] += 1
            except (grpc.RpcError, AssertionError) as err:
                detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
                errors.append(f"client {number} {action}: {detail}")
                return


def process(endpoint: str, seconds: float, run: str, first: int, out: multiprocessing.Queue) -> None:
    block = memoryview(os.urandom(BLOCK))
    counts: list[Counter] = [Counter() for _ in range(THREADS)]  # one each: Counter updates are not atomic
    errors: list[str] = []
    threads = [
        threading.Thread(target=client, args=(endpoint, seconds, run, first + i, block, counts[i], errors))
        for i in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((dict(sum(counts, Counter())), errors))


def run_clients(endpoint: str, seconds: float, run: str) -> tuple[Counter, list[str], float]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    started = time.monotonic()
    workers = [
        context.Process(target=process, args=(endpoint, seconds, run, p * THREADS, out)) for p in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    counts: Counter = Counter()
    errors: list[str] = []
    for _ in workers:
        part, failed = out.get(timeout=seconds + 400)
        counts.update(part)
        errors.extend(failed)
    for worker in workers:
        worker.join(60)
    return counts, errors, time.monotonic() - started


def test_64_clients_at_once_lose_nothing_and_leave_the_daemon_as_it_was(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--stream-idle-timeout", "60")
    pid = handle.proc.pid
    _, warm_errors, _ = run_clients(handle.endpoint, 2, "warm")
    assert not warm_errors, warm_errors[:5]
    assert wait_until(lambda: handle.open_requests("Put") == 0 and handle.open_requests("Get") == 0, 30)
    resting_fds, resting_rss = open_fds(pid), rss_mib(pid)

    seconds = float(os.environ.get("LOAD_SECONDS", "12"))
    counts, errors, elapsed = run_clients(handle.endpoint, seconds, "load")
    peak_rss = rss_mib(pid)
    moved = counts["bytes_put"] + counts["bytes_got"]
    calls = sum(counts[a] for a in ("put", "get", "list", "stat", "delete"))
    print(f"\n64 clients for {elapsed:.1f} s: {calls} calls ({calls / elapsed:.0f}/s: "
          + ", ".join(f"{counts[a]} {a}" for a in ("put", "get", "list", "stat", "delete"))
          + f"), {moved / MIB:.0f} MiB moved ({moved / elapsed / 1e6:.0f} MB/s: "
          f"{counts['bytes_put'] / MIB:.0f} MiB put, {counts['bytes_got'] / MIB:.0f} MiB got); "
          f"daemon RSS {resting_rss:.0f} MiB at rest, {peak_rss:.0f} MiB at the end of the load")
    assert not errors, f"{len(errors)} unexpected errors, the first: {errors[:5]}"
    assert counts["put"] and counts["get"] and counts["delete"]

    assert wait_until(lambda: handle.open_requests("Put") == 0 and handle.open_requests("Get") == 0, 30)
    assert wait_until(lambda: open_fds(pid) <= resting_fds + 8, 30), (
        f"descriptors: {open_fds(pid)} after the load, {resting_fds} at rest"
    )
    bound = resting_rss + KEEP_FREE / MIB + 48
    assert wait_until(lambda: rss_mib(pid) <= bound, 30), (
        f"memory: {rss_mib(pid):.0f} MiB after the load, {resting_rss:.0f} MiB at rest (bound {bound:.0f} MiB)"
    )
    assert list((handle.data_dir / "tmp").iterdir()) == [], "no upload left behind"
    print(f"after the load: {open_fds(pid)} descriptors ({resting_fds} at rest), {rss_mib(pid):.0f} MiB")
