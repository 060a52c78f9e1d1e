"""The daemon reuses its chunk buffers instead of mapping fresh memory for each (drive_client.malloc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MIB, ROOT

from drive_client import Drive
from drive_client.malloc import USER_SETTINGS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads page faults from /proc (Linux only)")


def minor_faults(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])


def test_daemon_moves_chunks_without_page_faults(start_daemon, tmp_path):
    handle = start_daemon(tmp_path)
    size = 64 * MIB
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "big.bin").write_bytes(os.urandom(size))
    Drive("lit://faults", root_folder=str(src), endpoint=handle.endpoint).put("big.bin")
    reader = Drive("lit://faults", root_folder=str(dst), endpoint=handle.endpoint)
    reader.get("big.bin")  # the first get warms the daemon's buffers
    (dst / "big.bin").unlink()
    before = minor_faults(handle.proc.pid)
    reader.get("big.bin")
    per_mib = (minor_faults(handle.proc.pid) - before) / (size // MIB)
    print(f"daemon minor page faults per MiB sent: {per_mib:.1f}")
    # glibc's defaults map and zero each 1 MiB buffer afresh: about 150 faults per MiB here. Reused buffers fault
    # none alone, and up to 16 a MiB beside other tests on a loaded machine (the full suite on 2 cores).
    assert per_mib < 40, f"the daemon faulted {per_mib:.0f} pages per MiB sent: it maps fresh buffers per chunk"
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


@pytest.mark.parametrize(("env", "applied"), [({}, "True"), ({"MALLOC_TRIM_THRESHOLD_": "0"}, "False")])
def test_settings_of_the_user_win(env, applied):
    code = "from drive_client.malloc import keep_transfer_buffers; print(keep_transfer_buffers())"
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == applied
