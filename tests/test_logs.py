"""The daemon's JSON log lines, and what they leave out."""

from __future__ import annotations

import io
import json
import logging

import pytest

from drived import logs


@pytest.fixture
def log_lines():
    """The JSON lines the daemon's log setup writes, caught from its handler."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("info")
    out = io.StringIO()
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]  # the StreamHandler setup made
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    root.handlers[:], root.level = saved[0], saved[1]


def test_lines_are_json_with_fields(log_lines):
    logging.getLogger("drived").info("request", extra={"fields": {"method": "Get", "status": "OK"}})
    [line] = log_lines()
    assert (line["level"], line["event"], line["method"], line["status"]) == ("info", "request", "Get", "OK")
    assert line["ts"].endswith("Z")


def test_a_write_to_a_client_that_went_away_is_no_error(log_lines):
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    grpc_log.error("ExecuteBatchError raised in core by servicer method [/drive.v1.DriveService/Get]")
    grpc_log.error("something else went wrong in grpc")
    assert [line["event"] for line in log_lines()] == ["something else went wrong in grpc"]
