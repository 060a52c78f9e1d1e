"""The committed stubs in drive_client/pb match what the pinned generator makes from protos/."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.timeout(120)


def test_generated_stubs_have_not_drifted():
    res = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=100)
    assert res.returncode == 0, (
        f"the stubs differ from protos/ (run `make proto`):\nstdout: {res.stdout}\nstderr: {res.stderr}"
    )


def test_stubs_import_package_relative():
    """The generated *_pb2_grpc imports its messages from inside drive_client, not `drive.v1`."""
    text = (ROOT / "drive_client" / "pb" / "drive_pb2_grpc.py").read_text()
    assert "from . import drive_pb2" in text
    assert "from drive.v1 import" not in text


def test_stub_messages_match_proto():
    from drive_client.pb import drive_pb2

    service = drive_pb2.DESCRIPTOR.services_by_name["DriveService"]
    methods = {m.name for m in service.methods}
    assert methods >= {"Delete", "Get", "List", "Mount", "Put", "Stat"}, methods
    assert drive_pb2.DESCRIPTOR.package == "drive.v1"
