"""The client's environment variables, read as a Drive is made: a yes/no one set to neither is refused then, by
`Drive`, `AsyncDrive` and the `drive` command alike, whatever the endpoint and before any call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drive_client import Drive, InvalidArgument

pytestmark = pytest.mark.timeout(60)

YES_NO = ("DRIVE_HANDOFF", "DRIVE_INSECURE", "DRIVE_TLS")  # README, Configuration: the client's yes/no variables
UNREACHABLE = "198.51.100.7:50051"  # TEST-NET-2: not this machine, and nothing answers there


def refusal(name: str) -> str:
    return f"${name}='junk': use 1 or 0 (true/false, yes/no, on/off)"


def stored_file(drive_uri: str, daemon, folder: Path) -> Drive:
    """A drive holding one file, `a.bin`, put with a clean environment."""
    (folder / "a.bin").write_bytes(b"kept")
    drive = Drive(drive_uri, root_folder=folder, endpoint=daemon.endpoint)
    drive.put("a.bin")
    return drive


@pytest.mark.parametrize("name", YES_NO)
def test_a_yes_no_variable_set_to_neither_is_refused_when_a_drive_is_made(twin, daemon, drive_uri, tmp_path,
                                                                          monkeypatch, name):
    drive = stored_file(drive_uri, daemon, tmp_path)
    before = drive.stat("a.bin")
    monkeypatch.setenv(name, "junk")
    for endpoint in (daemon.endpoint, UNREACHABLE):  # the daemon's, where files are handed over, and another host's
        with pytest.raises(InvalidArgument) as refused:
            twin(drive_uri, root_folder=tmp_path, endpoint=endpoint)
        assert str(refused.value) == refusal(name) and refused.value.code is None
    monkeypatch.delenv(name)
    assert drive.stat("a.bin") == before and drive.list(".") == ["a.bin"]


@pytest.mark.parametrize("value", ["1", "YES", "off", " on ", ""])
def test_a_yes_or_no_is_taken_as_before(twin, daemon, drive_uri, tmp_path, monkeypatch, value):
    for name in YES_NO:
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DRIVE_TLS")  # on, it would reach the plaintext daemon over TLS
    (tmp_path / "a.bin").write_bytes(b"x" * (2 << 20))  # above the size a put hands over
    [stat] = twin(drive_uri, root_folder=tmp_path, endpoint=daemon.endpoint).put("a.bin")
    assert stat.size == 2 << 20


@pytest.mark.parametrize("name", YES_NO)
def test_the_cli_refuses_it_in_one_line_and_lists_nothing(daemon, drive_uri, tmp_path, name):
    drive = stored_file(drive_uri, daemon, tmp_path)
    before = drive.stat("a.bin")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DRIVE_")}, name: "junk"}
    res = subprocess.run([sys.executable, "-m", "drive_client.cli", "--endpoint", daemon.endpoint, "--json", "ls",
                          drive_uri], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 1 and res.stderr.splitlines() == [f"drive: {refusal(name)}"], res
    assert json.loads(res.stdout) == {"error": refusal(name), "code": None, "type": "InvalidArgument"}
    assert drive.stat("a.bin") == before and drive.list(".") == ["a.bin"]
