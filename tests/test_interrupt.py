"""A user's process interrupted (Ctrl-C), killed or forked while a Drive transfers files: no half file, no thread
or stream left behind."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import MIB, wait_until
from test_api import LEFT_BEHIND, interrupted, write

from drive_client import Drive

pytestmark = pytest.mark.timeout(60)


def leftovers(folder: pathlib.Path) -> list[str]:
    """The names in `folder` but the daemon's own (its data dir and log)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(("data-", "drived-")))


def test_ctrl_c_in_a_get_of_one_stream_ends_its_read_ahead_thread(start_daemon, tmp_path, drive_uri):
    """A get under 64 MiB (or of a folder) reads its stream a little ahead in a thread of its own; Ctrl-C left
    that thread polling its queue until the garbage collector found the interrupted get, which an idle process
    may never run."""
    daemon = start_daemon(tmp_path)  # its own: the Gets it counts open are this test's
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    data = os.urandom(30 * MIB)
    write(tmp_path / "big.bin", data)
    drive.put("big.bin")
    write(tmp_path / "big.bin", b"the local file")
    report = interrupted(drive_uri, daemon.endpoint, tmp_path, "get", 4 * MIB)
    assert report["outcome"] == "interrupted" and report["seconds"] < 5, report
    assert report["threads"] == ["MainThread"] and report["files"] == [], report
    assert leftovers(tmp_path) == ["big.bin"]
    assert (tmp_path / "big.bin").read_bytes() == b"the local file"
    assert wait_until(lambda: daemon.open_requests("Get") == 0, timeout=10), "the daemon still serves the get"
    assert drive.get("big.bin", overwrite=True).read_bytes() == data


# Where a Ctrl-C lands in the main thread as a put starts, before the put holds what was started: a KeyboardInterrupt
# raised once gRPC has started the call and the thread that sends its messages, or once the read-ahead thread that
# reads the file for that thread has started.
CTRL_C_AS_GRPC_STARTS_THE_PUT = """
import grpc._channel
consume = grpc._channel._consume_request_iterator
def consume_then_interrupt(*args):
    consume(*args)
    grpc._channel._consume_request_iterator = consume
    raise KeyboardInterrupt
grpc._channel._consume_request_iterator = consume_then_interrupt
"""
CTRL_C_AS_THE_READ_AHEAD_STARTS = """
import threading
start = threading.Thread.start
def start_then_interrupt(thread):
    start(thread)
    if thread.name == "drive-read-ahead":
        threading.Thread.start = start
        raise KeyboardInterrupt
threading.Thread.start = start_then_interrupt
"""
# Puts big.bin (sys.argv: uri, endpoint, root) with one of the above. Reports (LEFT_BEHIND) whether KeyboardInterrupt
# reached the caller.
PUT = """
import contextlib, json, os, sys, threading, time
from drive_client import Drive
uri, endpoint, root = sys.argv[1:4]
try:
    Drive(uri, endpoint=endpoint, root_folder=root).put("big.bin")
    outcome = "returned"
except KeyboardInterrupt:
    outcome = "interrupted"
report = {"outcome": outcome}
""" + LEFT_BEHIND


@pytest.mark.parametrize("ctrl_c", [CTRL_C_AS_GRPC_STARTS_THE_PUT, CTRL_C_AS_THE_READ_AHEAD_STARTS],
                         ids=["in-grpc-future", "in-read-ahead-start"])
def test_ctrl_c_as_a_put_starts_stores_nothing_and_leaves_no_thread(start_daemon, tmp_path, drive_uri, ctrl_c):
    """Ctrl-C landing in gRPC's start of the Put let gRPC's thread go on sending the file, finish included: the
    put the user interrupted was stored. Landing in the start of the read-ahead thread, it left that thread
    blocked for good with the file open, and the daemon serving the stream until its idle timeout."""
    daemon = start_daemon(tmp_path)  # its own: the Puts it counts open are this test's
    drive = Drive(drive_uri, root_folder=str(tmp_path), endpoint=daemon.endpoint)
    write(tmp_path / "big.bin", b"the first version")
    drive.put("big.bin")
    write(tmp_path / "big.bin", os.urandom(30 * MIB))
    run = subprocess.run([sys.executable, "-c", ctrl_c + PUT, drive_uri, daemon.endpoint, str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report == {"outcome": "interrupted", "threads": ["MainThread"], "files": []}, report
    assert wait_until(lambda: daemon.open_requests("Put") == 0, timeout=10), "the daemon still serves the put"
    assert drive.get("big.bin", to="out.bin").read_bytes() == b"the first version"


# A process (sys.argv: endpoint, "open" or "closed") lists a drive through an AsyncDrive, closes it or not, then forks
# a child (multiprocessing's "fork" start method, as a DataLoader on Linux) that lists it through an AsyncDrive of
# its own and a Drive. Prints, as JSON, what the child's AsyncDrive raised (or "listed"), the child's exit code
# (None: still running after 20 s), and whether the parent's AsyncDrive still lists.
FORKED_ASYNC = """
import asyncio, json, multiprocessing, sys
from drive_client import AsyncDrive, Drive, DriveError
endpoint, state = sys.argv[1:3]

def child(answers):
    try:
        asyncio.run(AsyncDrive("lit://forked", endpoint=endpoint).list("."))
        answers.put("listed")
    except DriveError as err:
        answers.put(str(err))
    Drive("lit://forked", endpoint=endpoint).list(".")

async def parent():
    drive = AsyncDrive("lit://forked", endpoint=endpoint)
    await drive.list(".")
    if state == "closed":
        await drive.close()
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    worker = context.Process(target=child, args=(answers,))
    worker.start()
    worker.join(20)
    worker.kill()
    await drive.list(".")
    return {"child": answers.get(timeout=1) if not answers.empty() else None, "exit": worker.exitcode}

print(json.dumps(asyncio.run(parent())))
"""


def test_an_asyncdrive_in_a_child_forked_with_an_asyncdrive_open_is_refused_not_a_crash(daemon):
    """gRPC's asyncio support does not survive a fork made while one of its channels is open: the child's first
    AsyncDrive call crashed it (SIGSEGV, SIGABRT: `Check failed: next_worker->state == KICKED`) or hung it for
    good. It is refused with a DriveError saying what to do; a child forked once the AsyncDrive is closed uses
    one, and the parent's goes on working either way."""
    def forked(state: str) -> dict:
        run = subprocess.run([sys.executable, "-c", FORKED_ASYNC, daemon.endpoint, state], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    refused = forked("open")
    assert refused["exit"] == 0, refused
    assert "forked while an AsyncDrive" in refused["child"] and "await drive.close()" in refused["child"], refused
    assert forked("closed") == {"child": "listed", "exit": 0}
