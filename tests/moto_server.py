"""A real S3 HTTP endpoint for tests: `moto_server` as a separate process.

Never in-process patching of boto3: the code under test talks HTTP to this
process exactly as it would to MinIO or AWS.

    with running_moto() as url:      # "http://127.0.0.1:PORT"
        ...

`moto_env` (fixture, module scope) starts one, points the test process's
AWS_* environment at it (AWS_ENDPOINT_URL, testing credentials, us-east-1),
yields the endpoint URL, and restores the environment afterwards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import MotoServer, free_port

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return free_port()


@contextlib.contextmanager
def running_moto(timeout: float = 30.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Starts `moto_server -H 127.0.0.1 -p PORT` (bench.services), yields its URL once it answers, stops it.

    `env` adds to the server's environment (e.g. INITIAL_NO_AUTH_ACTION_COUNT to enforce IAM).
    """
    with tempfile.TemporaryDirectory() as work, MotoServer(Path(work), timeout, env) as server:
        yield server.url


@contextlib.contextmanager
def aws_env(endpoint: str, **extra: str) -> Iterator[None]:
    """Points boto3 (via the environment) at `endpoint`, restoring the environment after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint, **extra)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)


@pytest.fixture(scope="module")
def moto_env() -> Iterator[str]:
    """A moto_server for the module, with the test process's AWS_* environment pointed at it."""
    with running_moto() as url, aws_env(url):
        yield url
