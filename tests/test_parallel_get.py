"""Big files are fetched over parallel ranged reads, pinned to one version, and verified whole, by both twins: as
from a daemon on another host, or one that does not write the file itself (DRIVE_HANDOFF=0 here; see
test_handoff_get.py for gets from a daemon on this host)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from drive_client import Drive
from drive_client.transfer import PARALLEL_MIN_SIZE, RANGE_BLOCK


@pytest.fixture(autouse=True)
def bytes_on_the_wire(monkeypatch):
    monkeypatch.setenv("DRIVE_HANDOFF", "0")


def test_big_get_uses_ranged_reads_and_matches(twin, start_daemon, tmp_path):
    handle = start_daemon(tmp_path)
    size = PARALLEL_MIN_SIZE + RANGE_BLOCK + 12345  # a partial last block
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(0, size, 1 << 22):
            f.write(os.urandom(min(1 << 22, size - f.tell())))
    Drive("lit://ranges", root_folder=tmp_path, endpoint=handle.endpoint).put("big.bin")
    (tmp_path / "out").mkdir()
    received: list[int] = []
    out = twin("lit://ranges", root_folder=tmp_path / "out", endpoint=handle.endpoint).get("big.bin",
                                                                                            progress=received.append)
    assert out.stat().st_size == size and sum(received) == size
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    gets = [line for line in map(json.loads, handle.log().splitlines())
            if line.get("method") == "Get" and line.get("path") == "big.bin"]
    blocks = -(-size // RANGE_BLOCK)
    ranged = [g for g in gets if g["status"] == "OK"]
    assert len(gets) == 1 + blocks  # the first answer says "big" and is cancelled; then a ranged read a block
    assert [g["status"] for g in gets if g not in ranged] == ["CANCELLED"]
    assert '"level": "error"' not in handle.log()  # the cancelled first answer is no daemon error
    assert len(ranged) == blocks and sum(g["bytes"] for g in ranged) == size
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".part")]

