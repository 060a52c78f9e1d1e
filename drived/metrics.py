"""Prometheus metrics of the daemon, served on `--metrics-listen` when it is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
DIRECTION = {"Put": "in", "PutFile": "in", "Get": "out"}


def record_request(method: str, code: str, seconds: float, nbytes: int) -> None:
    """Counts one finished request."""
    REQUESTS.labels(method, code).inc()
    DURATION.labels(method).observe(seconds)
    if nbytes and method in DIRECTION:
        BYTES.labels(DIRECTION[method]).inc(nbytes)


def serve(listen: str) -> None:
    """Serves /metrics on HOST:PORT in a background thread."""
    host, _, port = listen.rpartition(":")
    try:
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
    except (OSError, ValueError) as err:
        raise SystemExit(f"drived: cannot serve metrics on {listen}: {err}") from None
