"""The completions a daemon remembers for a cut put: small puts (PutFile calls) never push out a Put stream's, and
each kind stays within its bounds, in files and in the bytes of their paths.

The daemon runs with `drived.uploads.COMPLETED_KEPT` (or `COMPLETED_KEPT_BYTES`) lowered in its own process, so
that a few puts reach the bound that 20,000 (or a few thousand of long paths) would in production. Replicas sharing a
real valkey-server keep theirs there too, within `drived.redis_coordinator.COMPLETIONS_KEPT_BYTES`, lowered alike.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from conftest import MIB, Background, rpc_code, sha256_hex, wait_until, write_random_file
from cutting_proxy import CuttingProxy
from test_resume import IN_FLIGHT, metric, query, requests, stub_of

from bench.services import ValkeyServer
from drive_client import Drive
from drive_client.pb import drive_pb2 as pb
from drive_client.transfer import put_file_request
from drive_client.uri import DEFAULT_COMPONENT
from drived.config import answer_entry_bytes

pytestmark = pytest.mark.timeout(60)

KEPT = 5  # completions the daemon remembers of each kind once their streams ended
LONG_FOLDER = "/".join(["n" * 200] * 15)  # some 3,000 bytes: a completion of a path below it takes ~4 KiB of memory


def test_small_puts_past_their_bound_leave_a_cut_folder_puts_completions(start_daemon, tmp_path):
    """A folder put is cut in its fourth file, and stays cut while twice the bound of small puts complete: its
    resume still learns of the three files stored, and sends only the rest; the small puts' completions stay
    within their bound (the oldest is forgotten)."""
    handle = start_daemon(tmp_path, before=f"import drived.uploads\ndrived.uploads.COMPLETED_KEPT = {KEPT}")
    drive = "lit://kept_apart"
    src = tmp_path / "src"
    digests = {f"set/f{i}.bin": write_random_file(src / "set" / f"f{i}.bin", 3 * MIB + i) for i in range(4)}
    total = sum((src / path).stat().st_size for path in digests)
    with CuttingProxy(handle.endpoint) as proxy:
        proxy.cut_after("up", 11 * MIB)  # in the fourth file
        proxy.down_after_cuts()  # the client can reach the daemon again only once the small puts are done
        folder = Background(lambda: Drive(drive, root_folder=src, endpoint=proxy.endpoint).put("set"))
        folder.start()
        assert wait_until(lambda: len(requests(handle, "Put")) == 1, timeout=20), "the folder put was never cut"
        stub = stub_of(handle.endpoint)
        small_ids = [f"small-{i}" for i in range(2 * KEPT)]
        for i, upload_id in enumerate(small_ids):
            header = pb.PutHeader(drive=drive, upload_id=upload_id)
            stub.PutFile(put_file_request(header, f"small/{i}.txt", b"small %d" % i), timeout=10)
        proxy.down_after_cuts(False)
        stored = folder.join_checked(timeout=30)
    assert {s.path: s.sha256 for s in stored} == digests
    cut, resumed = requests(handle, "Put")
    assert cut["status"] != "OK" and resumed["status"] == "OK" and resumed["files"] < len(digests), (cut, resumed)
    small_bytes = sum(len(b"small %d" % i) for i in range(len(small_ids)))
    received = metric(handle, 'drived_transfer_bytes_total{direction="in"}') - small_bytes
    assert total <= received <= total + IN_FLIGHT, f"{received - total} bytes received twice"
    assert query(stub, drive, small_ids[-1]).file.sha256 == sha256_hex(b"small %d" % (len(small_ids) - 1))
    assert rpc_code(lambda: query(stub, drive, small_ids[0])) == grpc.StatusCode.NOT_FOUND  # past the bound


@pytest.mark.parametrize("kind", ["PutFile", "Put"])
def test_completions_of_long_paths_stay_within_their_bound_in_bytes(start_daemon, tmp_path, kind):
    """Completions are bounded in the bytes of their paths as well as in number: five files of long paths, one by
    one or in one stream, with the bound lowered to three of them, leave the first two forgotten and the last three
    remembered (all five stay stored). Bounded by number alone, 20,000 completions of 4 KB paths held some 100 MiB
    of each kind where README says about 15."""
    paths = [f"{LONG_FOLDER}/f{i}.txt" for i in range(5)]
    bound = 3 * answer_entry_bytes(paths[0], DEFAULT_COMPONENT)
    handle = start_daemon(tmp_path, before=f"import drived.uploads\ndrived.uploads.COMPLETED_KEPT_BYTES = {bound}")
    drive, stub = "lit://kept_long", stub_of(handle.endpoint)
    ids = [f"long-{i}" for i in range(len(paths))]
    files = [put_file_request(pb.PutHeader(drive=drive, upload_id=upload_id), path, path.encode()[-40:])
             for upload_id, path in zip(ids, paths, strict=True)]
    if kind == "PutFile":
        for request in files:
            stub.PutFile(request, timeout=10)
    else:
        stub.Put(iter([pb.PutRequest(file=request) for request in files]), timeout=10)
    for upload_id, path in zip(ids[2:], paths[2:], strict=True):
        assert query(stub, drive, upload_id).file.path == path
    for upload_id in ids[:2]:
        assert rpc_code(lambda upload_id=upload_id: query(stub, drive, upload_id)) == grpc.StatusCode.NOT_FOUND
    for path in paths:
        assert stub.Stat(pb.StatRequest(drive=drive, path=path), timeout=10).size == 40


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    with ValkeyServer(tmp_path) as server:
        yield server


def test_completions_in_the_coordinator_stay_within_their_bytes_and_the_latest_are_told_by_another_replica(
        start_daemon, tmp_path, valkey):
    """A hundred resumable puts of long paths through replica a, whose completions may take 64 KiB in the coordinator
    (some 14 of them): the records left there take no more than that, the latest is told by replica b, the first is
    forgotten (its client would send it again), and every file stays stored. Bounded only by --upload-expiry, they
    took some 320 KiB here, and 240 MB at 1,000 puts a second with paths of 4 KB."""
    budget = 64 << 10
    coordinator = {"DRIVED_COORDINATOR": valkey.url}
    a = start_daemon(tmp_path, env=coordinator,
                     before=f"import drived.redis_coordinator as m\nm.COMPLETIONS_KEPT_BYTES = {budget}")
    b = start_daemon(tmp_path, env=coordinator)
    drive, stub = "lit://kept_shared", stub_of(a.endpoint)
    paths = [f"{LONG_FOLDER}/f{i}.txt" for i in range(100)]
    ids = [f"shared-{i}" for i in range(len(paths))]
    for upload_id, path in zip(ids, paths, strict=True):
        stub.PutFile(put_file_request(pb.PutHeader(drive=drive, upload_id=upload_id), path, b"stored"), timeout=10)
    admin = redis.Redis.from_url(valkey.url)
    records = list(admin.scan_iter("drived:*:completed:*"))
    log = ["drived:completions", "drived:completions:written"]
    assert sum(admin.memory_usage(key) or 0 for key in records + log) <= budget
    assert 10 <= len(records) == admin.zcard(log[0]), records
    assert query(stub_of(b.endpoint), drive, ids[-1]).file.path == paths[-1]
    assert rpc_code(lambda: query(stub_of(b.endpoint), drive, ids[0])) == grpc.StatusCode.NOT_FOUND
    for path in paths:
        assert stub.Stat(pb.StatRequest(drive=drive, path=path), timeout=10).size == len(b"stored")


def test_a_completion_kept_for_its_running_stream_is_forgotten_after_the_older_ones(start_daemon, tmp_path, valkey):
    """A Put stream's first file is committed and the stream runs on, its replica keeping that completion (every
    third of --upload-expiry); then puts write more than the coordinator keeps. Kept, the completion is written again
    after the older ones: replica b still tells it while the oldest other is forgotten, and the newest told."""
    budget = 10 * 3500  # some 10 completions of these paths
    coordinator = {"DRIVED_COORDINATOR": valkey.url}
    a = start_daemon(tmp_path, "--upload-expiry", "3", env=coordinator,
                     before=f"import drived.redis_coordinator as m\nm.COMPLETIONS_KEPT_BYTES = {budget}")
    b = start_daemon(tmp_path, env=coordinator)
    drive, stub = "lit://kept_running", stub_of(a.endpoint)
    admin = redis.Redis.from_url(valkey.url)

    def put(upload_id: str, path: str) -> pb.PutFileRequest:
        return put_file_request(pb.PutHeader(drive=drive, upload_id=upload_id), f"{LONG_FOLDER}/{path}", b"stored")

    more = threading.Event()

    def stream() -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(file=put("running-0", "s0.txt"))
        more.wait(30)
        yield pb.PutRequest(file=put("running-1", "s1.txt"))

    running = stub.Put.future(stream(), timeout=60)
    try:
        assert wait_until(lambda: admin.zscore("drived:completions", completion_key(drive, "running-0")), 10)
        for i in range(5):
            stub.PutFile(put(f"older-{i}", f"older-{i}.txt"), timeout=10)
        newest_older = admin.zscore("drived:completions", completion_key(drive, "older-4"))
        assert wait_until(lambda: (admin.zscore("drived:completions", completion_key(drive, "running-0")) or 0) > (
            newest_older), 10), "the running stream's completion was never written again"
        for i in range(8):
            stub.PutFile(put(f"newer-{i}", f"newer-{i}.txt"), timeout=10)
        assert query(stub_of(b.endpoint), drive, "running-0").file.path == f"{LONG_FOLDER}/s0.txt"
        assert query(stub_of(b.endpoint), drive, "newer-0").file.path == f"{LONG_FOLDER}/newer-0.txt"
        assert rpc_code(lambda: query(stub_of(b.endpoint), drive, "older-0")) == grpc.StatusCode.NOT_FOUND
    finally:
        more.set()
    assert len(running.result(30).files) == 2


def completion_key(drive: str, upload_id: str) -> str:
    return f"drived:{{{drive.removeprefix('lit://')}}}:completed:{DEFAULT_COMPONENT}:{upload_id}"
