"""Prometheus metrics of the daemon, served on `--metrics-listen` when it is set."""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

REQUESTS = Counter("drived_requests", "Requests answered, by method and status code", ["method", "code"])
BYTES = Counter("drived_transfer_bytes", "File bytes received (in: Put) and sent (out: Get)", ["direction"])
DURATION = Histogram(
    "drived_request_duration_seconds", "Time from request to answer, by method", ["method"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300, float("inf")),
)
OPEN_REQUESTS = Gauge("drived_open_requests", "Requests in progress (open streams), by method", ["method"])
DAMAGED_READS = Counter(
    "drived_damaged_reads", "Reads refused because stored bytes did not match their stored checksums (DATA_LOSS)"
)
HELD_UPLOADS = Gauge("drived_held_uploads", "Resumable uploads held between streams, waiting for a resume")
HELD_UPLOAD_BYTES = Gauge("drived_held_upload_bytes", "Bytes held by the resumable uploads waiting for a resume")
INDEX_OBJECTS = Gauge("drived_s3_index_objects", "Objects in the index of each mounted s3:// drive", ["drive"])
INDEX_BYTES = Gauge("drived_s3_index_bytes", "Memory the indexes of the mounted s3:// drives hold (--s3-index-memory)")
MOUNT_DURATION = Histogram(
    "drived_s3_mount_duration_seconds", "Time to index an s3:// drive",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 120, 600, float("inf")),
)
HANDOFFS = Counter(
    "drived_handoff_files", "Files that clients of this host handed over (taken: held for their Put or Get; refused: "
    "the client moves the bytes in a stream instead; written: a Get's file written whole)", ["outcome"]
)
DIRECTION = {"Put": "in", "PutFile": "in", "Get": "out"}


def record_request(method: str, code: str, seconds: float, nbytes: int) -> None:
    """Counts one finished request."""
    REQUESTS.labels(method, code).inc()
    DURATION.labels(method).observe(seconds)
    if nbytes and method in DIRECTION:
        BYTES.labels(DIRECTION[method]).inc(nbytes)


SCRAPES_AT_ONCE = 8  # Prometheus scrapes a target over one connection at a time
SCRAPE_TIMEOUT = 10.0  # seconds a scraper may stay silent within its request or leave its answer unread


class _Handler(WSGIRequestHandler):
    """One request a connection (wsgiref's), dropped once it stays silent SCRAPE_TIMEOUT s; logs nothing."""

    timeout = SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """A thread a connection, at most SCRAPES_AT_ONCE of them: one more is closed as it is accepted.

    prometheus_client's own server starts a thread for every connection and never times one out, so
    that anyone reaching the port could take the daemon's descriptors (each thread's socket) until puts
    could open no file.
    """

    daemon_threads = True
    # socketserver listens with a backlog of 5: past it the kernel leaves a burst's connections half made, and
    # they come to be accepted (and closed, past SCRAPES_AT_ONCE) only at its SYN-ACK retries, seconds apart.
    request_queue_size = 128

    def __init__(self, family: socket.AddressFamily, address: Any) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(SCRAPES_AT_ONCE)
        super().__init__(address, _Handler)
        self.set_app(make_wsgi_app())

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started to give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(listen: str) -> None:
    """Serves /metrics on HOST:PORT in a background thread."""
    host, _, port = listen.rpartition(":")
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server = _Server(family, address)
    except (OSError, ValueError) as err:
        raise SystemExit(f"drived: cannot serve metrics on {listen}: {err}") from None
    threading.Thread(target=server.serve_forever, name="drived-metrics", daemon=True).start()
