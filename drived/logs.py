"""Structured logs: one JSON object a line on stderr, all written when the process ends (`end_process`)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import NoReturn


class JsonFormatter(logging.Formatter):
    """Formats a record as {"ts", "level", "event", ...fields}; `extra={"fields": {...}}` adds fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _not_a_write_to_a_gone_client(record: logging.LogRecord) -> bool:
    """Leaves out grpc.aio's error (with traceback) for a stream write to a call the client ended.

    A client that stops reading a Get (the first answer of a big get, which
    then goes on in ranges; Ctrl-C) is no error of the daemon's; the request
    log records that call with status CANCELLED.
    """
    return not record.getMessage().startswith("ExecuteBatchError raised in core by servicer method")


def setup(level: str) -> None:
    """Sends the daemon's logs to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_not_a_write_to_a_gone_client)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def end_process() -> NoReturn:
    """Ends the process of a daemon that stopped, without waiting for its threads: one still waiting on an S3
    endpoint that does not answer (a request the stop gave up, the read of a get it cancelled) would hold a normal
    exit, which joins them (asyncio.run first of all), for boto3's minutes of tries, and one in a read of a data dir
    on a hung network mount for ever; nothing waits for their answers any more."""
    logging.shutdown()
    os._exit(0)
