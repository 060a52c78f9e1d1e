"""`free_port`: the ports tests and benchmarks start servers on.

Two test processes (pytest-xdist) share the machine's ports: a port handed out twice, or one the
kernel also gives to outgoing connections, lets a daemon that restarts on its port find it taken.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.services import free_port

ROOT = Path(__file__).resolve().parent.parent


def ephemeral_range() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_ports_are_free_never_twice_and_outside_the_ephemeral_range() -> None:
    ephemeral = ephemeral_range()
    if max(ephemeral.start - 10000, 65536 - ephemeral.stop) < 2000:  # as bench.services._port_block, in two workers
        pytest.skip(f"the kernel's ephemeral ports ({ephemeral}) leave too few outside them: free_port takes its own")
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not set(ports) & set(ephemeral_range())
    for port in ports[-5:]:
        with socket.create_server(("127.0.0.1", port)):
            pass


def test_a_port_something_listens_on_is_skipped() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port + 1)):
        later = [free_port() for _ in range(3)]
    assert port + 1 not in later


def ports_of_worker(worker: int, workers: int) -> list[int]:
    env = {**os.environ, "PYTEST_XDIST_WORKER": f"gw{worker}", "PYTEST_XDIST_WORKER_COUNT": str(workers)}
    code = "import json; from bench.services import free_port; print(json.dumps([free_port() for _ in range(200)]))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return list(json.loads(out.stdout))


def test_each_test_process_has_ports_of_its_own() -> None:
    first, second = ports_of_worker(0, 2), ports_of_worker(1, 2)
    assert not set(first) & set(second)
    assert max(first) < min(second)  # each worker's block is a range of its own
