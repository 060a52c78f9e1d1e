"""Prometheus metrics on --metrics-listen, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.request

from conftest import closed_by_peer, free_port, open_fds, silent_connections, wait_until

from drive_client import Drive
from drived.metrics import SCRAPES_AT_ONCE


def scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+(?:\{[^}]*\})?) (\S+)", line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


def test_metrics_count_requests_codes_and_bytes(start_daemon, tmp_path):
    metrics_address = f"127.0.0.1:{free_port()}"
    handle = start_daemon(tmp_path, "--metrics-listen", metrics_address)
    (tmp_path / "m.bin").write_bytes(b"x" * 5000)
    drive = Drive("lit://metrics", root_folder=tmp_path, endpoint=handle.endpoint)
    drive.put("m.bin")
    drive.get("m.bin", overwrite=True)
    with contextlib.suppress(FileNotFoundError):
        drive.stat("missing")
    # A call is counted as its request log line is written, once its status is sent: the last may come after it.
    stat_counted = 'drived_requests_total{code="NOT_FOUND",method="Stat"}'
    assert wait_until(lambda: stat_counted in scrape(metrics_address), 10)
    samples = scrape(metrics_address)
    assert samples['drived_requests_total{code="OK",method="PutFile"}'] == 1  # a small file: one unary call
    assert samples['drived_requests_total{code="OK",method="Get"}'] == 1
    assert samples['drived_requests_total{code="NOT_FOUND",method="Stat"}'] == 1
    assert samples['drived_transfer_bytes_total{direction="in"}'] == 5000
    assert samples['drived_transfer_bytes_total{direction="out"}'] == 5000
    assert samples['drived_request_duration_seconds_count{method="PutFile"}'] == 1
    assert samples['drived_open_requests{method="Get"}'] == 0


def test_a_taken_metrics_port_fails_loudly(start_daemon, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        handle = start_daemon(tmp_path, "--metrics-listen", address, wait=False)
        assert handle.proc.wait(20) != 0
        assert "cannot serve metrics" in handle.log()


def test_connections_to_the_metrics_port_hold_few_threads_and_descriptors(start_daemon, tmp_path):
    """prometheus_client's server took a thread and a descriptor for every connection and kept it while the
    client said nothing: 500 of them took a daemon under `ulimit -n 512` to its limit, and puts could open no
    file. Silent scrapers are dropped after SCRAPE_TIMEOUT (1 s here)."""
    handle = start_daemon(tmp_path, before="import drived.metrics as m; m.SCRAPE_TIMEOUT = 1.0")
    drive = Drive("lit://metrics-flood", endpoint=handle.endpoint)
    (tmp_path / "kept.txt").write_bytes(b"kept")
    drive.put(tmp_path / "kept.txt", to="kept.txt")
    pid = handle.proc.pid
    before = open_fds(pid), threads(pid)
    with silent_connections(handle.metrics, 300) as flood:
        assert wait_until(lambda: sum(map(closed_by_peer, flood)) >= 300 - SCRAPES_AT_ONCE, 10)
        assert open_fds(pid) <= before[0] + SCRAPES_AT_ONCE + 2 and threads(pid) <= before[1] + SCRAPES_AT_ONCE
        assert wait_until(lambda: all(map(closed_by_peer, flood)), 10)  # the silent ones too, after their timeout
    assert scrape(handle.metrics)['drived_requests_total{code="OK",method="PutFile"}'] == 1
    assert b"".join(drive.read_range("kept.txt")) == b"kept"


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))
