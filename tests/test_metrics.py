"""Prometheus metrics on --metrics-listen, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import contextlib
import re
import urllib.request

from conftest import free_port, wait_until

from drive_client import Drive


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
