"""The daemon's memory stays bounded by its configuration whatever clients do, and is returned when they leave.

500 uploads that each sent one ~3.9 MiB chunk and stalled took a daemon from 82 MiB to 2,061 MiB, and it
kept that after they ended (a second wave: 2,905 MiB): each stalled stream held its last chunk, and the
allocator kept every freed chunk buffer. The bound README's "Failure behaviour" states: a stream that
waits on its client holds no chunk, and the allocator keeps at most `drive_client.malloc.KEEP_FREE` of
freed memory once a look at the streams (at most a second) has passed.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import MIB, StalledPuts, no_uploads, rss_mib, upload_bytes, wait_until

from drive_client import Drive
from drive_client.malloc import KEEP_FREE
from drive_client.pb import drive_pb2 as pb

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="reads the daemon's memory from /proc (Linux only)"),
    pytest.mark.timeout(300),
]

STREAMS = 200
CHUNK = int(3.9 * MIB)
PER_STALLED_STREAM_MIB = 0.25  # gRPC's call, the upload's state: measured ~0.09 MiB
SLACK_MIB = 24  # what else moves between two readings (the executor's threads, the log, the metrics)


def test_stalled_uploads_hold_no_chunks_and_their_memory_is_returned(start_daemon, tmp_path):
    handle = start_daemon(tmp_path, "--max-streams-per-peer", str(STREAMS * 2))
    (tmp_path / "warm.bin").write_bytes(os.urandom(16 * MIB))
    warm = Drive("lit://memory", root_folder=str(tmp_path), endpoint=handle.endpoint)
    warm.put("warm.bin")
    warm.get("warm.bin", overwrite=True)  # the daemon's buffers and threads are up: its resting size
    baseline = rss_mib(handle.proc.pid)
    kept = KEEP_FREE / MIB
    chunk = os.urandom(CHUNK)

    def first_messages(i: int) -> list:
        return [pb.PutRequest(header=pb.PutHeader(drive="lit://memory", path=f"stalled/{i}.bin")), chunk]

    for wave in (1, 2):
        with StalledPuts(handle.endpoint, STREAMS, first_messages) as stalled:
            assert wait_until(lambda: upload_bytes(handle.data_dir) >= STREAMS * CHUNK, 60), (
                f"the chunks did not all reach the daemon: {upload_bytes(handle.data_dir)} bytes"
            )
            assert stalled.open() == STREAMS, stalled.refused()
            bound = baseline + kept + STREAMS * PER_STALLED_STREAM_MIB + SLACK_MIB
            held = wait_until(lambda bound=bound: rss_mib(handle.proc.pid) <= bound, 15)
            during = rss_mib(handle.proc.pid)
            print(f"wave {wave}: {STREAMS} stalled uploads of {CHUNK / MIB:.1f} MiB: daemon {during:.0f} MiB "
                  f"(baseline {baseline:.0f} MiB, bound {bound:.0f} MiB)")
            assert held, f"{STREAMS} stalled uploads keep the daemon at {during:.0f} MiB (bound {bound:.0f} MiB)"
        assert wait_until(lambda: no_uploads(handle.data_dir) and handle.open_requests("Put") == 0, 30)
        bound = baseline + kept + SLACK_MIB
        returned = wait_until(lambda bound=bound: rss_mib(handle.proc.pid) <= bound, 15)
        after = rss_mib(handle.proc.pid)
        print(f"wave {wave}: after the streams ended: daemon {after:.0f} MiB (bound {bound:.0f} MiB)")
        assert returned, f"the daemon kept {after:.0f} MiB after the streams ended (bound {bound:.0f} MiB)"
    assert Drive("lit://memory", endpoint=handle.endpoint).list("stalled") == [], "nothing of theirs is stored"
