"""deploy/ as written: nginx.conf in front of two drived replicas sharing one --storage (moto_server) and one
--coordinator (valkey-server), and the coordinator that compose.yaml and the k8s manifest configure.

Only the `listen` port and the `server` lines of the upstream are replaced (and
`worker_processes` where a test needs the calls taken in one strict turn), so
the file the cluster runs is the file tested: calls are balanced per call,
puts and gets go through it, a get waiting through it is woken by a put
through it, whichever replica takes each, and a put cut through it completes
whichever replicas its query and its resume reach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import MIB, ROOT, Background, DaemonHandle, free_port, health_status, wait_until, write_random_file
from cutting_proxy import CuttingProxy
from grpc_health.v1 import health_pb2
from test_cluster import Cluster

from bench.services import ServiceUnavailable, ensure_nginx
from drive_client import Drive
from drive_client.pb import drive_pb2, drive_pb2_grpc
from drived import config
from drived.backends.s3 import PART_SIZE

UPSTREAM_SERVER = re.compile(r"^(\s*)server drived-\d+:50051( [^;]*)?;$", re.MULTILINE)
LISTEN = re.compile(r"^(\s*)listen 50051 http2;$", re.MULTILINE)
WORKERS = re.compile(r"^(worker_processes )\S+;$", re.MULTILINE)


def compose_stream_caps() -> list[str]:
    """The flags of the stream caps that deploy/compose.yaml gives its replicas (none: the defaults)."""
    environment = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["x-drived"]["environment"]
    caps = [name for name in environment if name.startswith("DRIVED_MAX_STREAMS")]
    return [flag for name in caps for flag in ("--" + name[len("DRIVED_"):].lower().replace("_", "-"),
                                               str(environment[name]))]


def templated(replicas: list[str], port: int) -> str:
    """deploy/nginx.conf with its replicas and port replaced, nothing else."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    servers: list[str] = []

    def ours(match: re.Match[str]) -> str:  # the first `server` line becomes ours, the others go
        servers.append(match.group(0))
        indent, options = match.group(1), match.group(2) or ""
        return "\n".join(f"{indent}server {r}{options};" for r in replicas) if len(servers) == 1 else ""

    text = UPSTREAM_SERVER.sub(ours, text)
    assert servers, "deploy/nginx.conf has no `server drived-N:50051 ...;` lines to replace"
    text, listens = LISTEN.subn(rf"\1listen 127.0.0.1:{port} http2;", text)
    assert listens == 1, "deploy/nginx.conf should listen on 50051 once"
    return text


@contextlib.contextmanager
def balanced(tmp_path: Path, workers: str = "") -> Iterator[tuple[str, list[DaemonHandle]]]:
    """deploy/nginx.conf in front of two replicas of one cluster: its endpoint and the replicas. `workers`
    replaces its worker_processes: one worker balances calls in one strict round, whatever connection brings them."""
    try:
        nginx = ensure_nginx()
    except ServiceUnavailable as err:
        pytest.skip(f"nginx is needed to test deploy/nginx.conf: {err}")
    made = Cluster(tmp_path)
    proc = None
    try:
        replicas = [made.replica(*compose_stream_caps()), made.replica(*compose_stream_caps())]
        port = free_port()
        text = templated([r.endpoint for r in replicas], port)
        if workers:
            text, count = WORKERS.subn(rf"\g<1>{workers};", text)
            assert count == 1, "deploy/nginx.conf should set worker_processes once"
        conf = tmp_path / "nginx.conf"
        conf.write_text(text)
        log = open(tmp_path / "nginx.log", "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(conf),
             "-g", f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log warn;"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        endpoint = f"127.0.0.1:{port}"
        serving = health_pb2.HealthCheckResponse.SERVING
        if not wait_until(lambda: proc.poll() is None and health_status(endpoint) == serving, timeout=20):
            errors = (tmp_path / "error.log").read_text() if (tmp_path / "error.log").exists() else ""
            raise AssertionError(f"nginx did not serve: exit {proc.poll()}: {(tmp_path / 'nginx.log').read_text()}"
                                 f" {errors}")
        yield endpoint, replicas
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        made.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[DaemonHandle]]]:
    with balanced(tmp_path) as made:
        yield made


def test_nginx_from_deploy_balances_calls_and_carries_puts_and_gets(cluster, drive_uri, tmp_path):
    endpoint, replicas = cluster
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    names = [f"f{i}.txt" for i in range(8)]
    for name in names:
        (src / name).write_bytes(name.encode() * 100)
    big = os.urandom(12 << 20)  # a multipart upload, streamed through nginx
    (src / "big.bin").write_bytes(big)
    writer = Drive(drive_uri, component_name="w", root_folder=src, endpoint=endpoint)
    for name in [*names, "big.bin"]:
        writer.put(name)
    reader = Drive(drive_uri, root_folder=dst, endpoint=endpoint)
    assert reader.list(".") == sorted(["big.bin", *names])
    for name in names:
        assert reader.get(name).read_bytes() == name.encode() * 100
    assert reader.get("big.bin").read_bytes() == big
    served = [sum(line.count('"method": "PutFile"') for line in r.log().splitlines()) for r in replicas]
    assert all(served) and sum(served) == len(names), f"puts per replica: {served}"


def test_a_get_waiting_through_nginx_is_woken_by_a_put_through_nginx(cluster, drive_uri, tmp_path):
    endpoint, replicas = cluster
    (tmp_path / "late.txt").write_bytes(b"late")
    (tmp_path / "out").mkdir()
    reader = Drive(drive_uri, root_folder=tmp_path / "out", endpoint=endpoint)
    waiting = Background(lambda: reader.get("late.txt", timeout=60))
    waiting.start()
    assert wait_until(lambda: sum(r.open_requests("Get") for r in replicas) == 1, timeout=20)
    Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=endpoint).put("late.txt")
    assert Path(str(waiting.join_checked(30))).read_bytes() == b"late"


def calls_of(replica: DaemonHandle, drive: str) -> list[tuple[str, str]]:
    """The (method, status) of each call to `drive` that `replica` logged, in order."""
    lines = map(json.loads, replica.log().splitlines()[1:])
    return [(line["method"], line["status"]) for line in lines if line.get("drive") == drive]


def test_a_put_cut_behind_nginx_completes_when_its_resumes_reach_a_replica_without_its_upload(tmp_path, drive_uri):
    # Calls taken in turn: the put goes to one replica, another client's call to the other, and after the cut the
    # query to the first (it holds the upload) and the resume to the second (NOT_FOUND), round after round: the put
    # failed once its retry_seconds ran out. One nginx worker makes the turn strict; with several, a worker's next
    # connection meets any of their turns, and the same happened without the other client.
    with balanced(tmp_path, workers="1") as (endpoint, replicas), grpc.insecure_channel(endpoint) as channel:
        digest = write_random_file(tmp_path / "r.bin", 3 * PART_SIZE + 5 * MIB)
        other_client = drive_pb2_grpc.DriveServiceStub(channel)
        sent = [0]

        def meanwhile(nbytes: int) -> None:  # the put's stream waits while this runs
            sent[0] += nbytes
            if sent[0] - nbytes < PART_SIZE <= sent[0]:
                assert wait_until(lambda: sum(r.open_requests("Put") for r in replicas) == 1, timeout=10)
                other_client.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=10)

        with CuttingProxy(endpoint) as proxy:
            proxy.cut_after("up", 2 * PART_SIZE + 4 * MIB)
            writer = Drive(drive_uri, component_name="w", root_folder=tmp_path, endpoint=proxy.endpoint,
                           retry_seconds=5)
            [stored] = writer.put("r.bin", progress=meanwhile)
            assert proxy.cuts_made == 1
        # Each call is logged once its status is sent: the cut put's after the query, at times.
        holder, other = sorted(replicas, key=lambda r: ("List", "OK") in calls_of(r, drive_uri))
        expected = [("Put", "CANCELLED"), ("QueryWriteStatus", "OK"), ("QueryWriteStatus", "OK")]
        assert wait_until(lambda: sorted(calls_of(holder, drive_uri)) == expected), calls_of(holder, drive_uri)
        assert calls_of(other, drive_uri) == [("List", "OK"), ("Put", "NOT_FOUND"), ("Put", "OK")]
        assert stored.sha256 == digest and writer.stat("r.bin").sha256 == digest


def test_the_deployments_configure_the_coordinator():
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    k8s = (ROOT / "deploy" / "k8s" / "drived.yaml").read_text()
    urls = [*re.findall(r"DRIVED_COORDINATOR: (\S+)", compose),
            *re.findall(r'name: DRIVED_COORDINATOR, value: "([^"]+)"', k8s)]
    assert len(urls) == 2, urls
    for url in urls:
        assert config.PARSERS["coordinator"](url) == url


def test_the_image_user_is_a_number_the_k8s_manifest_can_check_is_not_root():
    # With runAsNonRoot the kubelet checks the image's USER before starting the container, and it can check
    # only a number: a name fails every pod with CreateContainerConfigError ("image has non-numeric user").
    assert "runAsNonRoot: true" in (ROOT / "deploy" / "k8s" / "drived.yaml").read_text()
    users = re.findall(r"^USER (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), f"USER {users[-1]}"


def test_the_replicas_behind_nginx_serve_more_waiting_gets_than_one_host_may_open(cluster, drive_uri):
    # Behind nginx every client is nginx's address: the replicas' cap per client host is the cap of all clients
    # together. More waiting gets than two replicas take from one host by default, from many "workers"
    # (channels: nginx takes 128 streams a connection), must all wait.
    endpoint, replicas = cluster
    count = 2 * config.Config.max_streams_per_peer + 1

    async def wait_them() -> list[grpc.StatusCode]:
        channels = [grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(count // 100 + 1)]
        calls = [drive_pb2_grpc.DriveServiceStub(channels[i % len(channels)]).Get(
            drive_pb2.GetRequest(drive=drive_uri, path="late.txt", wait_seconds=120)) for i in range(count)]
        reads = [asyncio.ensure_future(call.read()) for call in calls]
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while sum(r.open_requests("Get") for r in replicas) + sum(r.done() for r in reads) < count:
                assert asyncio.get_running_loop().time() < deadline, "the gets neither waited nor were refused"
                await asyncio.sleep(0.2)
            return [read.exception().code() for read in reads if read.done()]  # type: ignore[union-attr]
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()

    refused = asyncio.run(wait_them())
    assert not refused, f"{len(refused)} of {count} gets refused: {set(refused)}"


def test_one_worker_waiting_on_many_gets_through_nginx_still_lists(cluster, drive_uri):
    # One process shares one connection to nginx: its streams past nginx's per-connection cap (128 by default)
    # would queue behind the waiting gets, and so would its list, as they do not when it talks to drived itself.
    endpoint, replicas = cluster
    count = 200

    async def list_while_waiting() -> list[str]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = drive_pb2_grpc.DriveServiceStub(channel)
            calls = [stub.Get(drive_pb2.GetRequest(drive=drive_uri, path="late.txt", wait_seconds=120))
                     for _ in range(count)]
            try:
                deadline = asyncio.get_running_loop().time() + 60
                while sum(r.open_requests("Get") for r in replicas) < min(count, 128):
                    assert asyncio.get_running_loop().time() < deadline, "the gets did not wait"
                    await asyncio.sleep(0.2)
                listed = await stub.List(drive_pb2.ListRequest(drive=drive_uri, path="."), timeout=10)
                return [e.path for e in listed.entries]
            finally:
                for call in calls:
                    call.cancel()

    assert asyncio.run(list_while_waiting()) == []


def test_the_k8s_memory_limit_holds_what_the_daemon_may_take_with_the_settings_it_gives(monkeypatch):
    # README (Failure behaviour, Memory): at most about 90 + 64 + 35 MiB, 10 MiB a stream (--max-streams),
    # 256 MiB more with --storage, and the s3:// indexes, three times --s3-index-memory while mounts run. Under a
    # lower limit, clients that stall uploads or mount a big bucket get the pod OOM-killed, cutting every
    # transfer on it (measured: 104 stalled uploads into --storage, 661 MiB).
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "drived.yaml").read_text())
    [container] = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    for variable in container["env"]:
        if variable["name"].startswith("DRIVED_"):
            monkeypatch.setenv(variable["name"], variable["value"])
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.parse([], parser)
    mib = 1 << 20
    bound = (90 + 64 + 35 + 10 * settings.max_streams + (256 if settings.storage else 0)) * mib
    bound += 3 * settings.s3_index_memory
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", container["resources"]["limits"]["memory"]).groups()
    limit = int(number) * {"Mi": mib, "Gi": 1024 * mib}[unit]
    assert bound <= limit, f"the daemon may take {bound // mib} MiB, the pod's limit is {limit // mib} MiB"
