"""The package boundary: what a worker installs and imports, and what the daemon may take from the client."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT, current_sequence, health_status, refused_imports
from grpc_health.v1 import health_pb2

from drive_client import Drive

# The client's modules that the daemon shares (DESIGN: "the daemon uses only the client's
# public, shared modules"); everything else in drive_client is the client's own.
SHARED = {"drive_client.pb", "drive_client.uri", "drive_client.errors", "drive_client.wire", "drive_client.files",
          "drive_client.handoff", "drive_client.malloc", "drive_client.channels", "drive_client.checksums"}


def _client_imports(path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drive_client"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("drive_client"))
    return names


def test_the_daemon_imports_only_shared_client_modules():
    used = {
        (str(path.relative_to(ROOT)), module)
        for path in (ROOT / "drived").rglob("*.py")
        for module in _client_imports(path)
    }
    private = sorted((path, module) for path, module in used if not any(
        module == shared or module.startswith(shared + ".") for shared in SHARED
    ))
    assert not private, f"the daemon imports private client modules: {private}"


def test_the_client_needs_neither_boto3_nor_the_daemon():
    """`pip install drived` requires grpcio and protobuf only; the daemon's packages come with [daemon]."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {dep.split(">")[0].split("=")[0].split("[")[0] for dep in project["dependencies"]}
    assert required == {"grpcio", "protobuf"} | ({"crc32c"} & required), required
    assert {"boto3", "prometheus-client"} <= {
        dep.split(">")[0] for dep in project["optional-dependencies"]["daemon"]
    }


@pytest.mark.parametrize("modules", ["drive_client", "drive_client.cli", "drive_client.fsspec"])
def test_client_imports_without_daemon_packages(modules):
    """Importing and using the client loads no boto3, prometheus_client or drived (blocked in the child)."""
    code = (
        "import sys\n"
        "for name in ('boto3', 'botocore', 'prometheus_client', 'drived', 'grpc_health', 'grpc_reflection'):\n"
        "    sys.modules[name] = None  # any import of it fails\n"
        f"import {modules}\n"
        "from drive_client import Drive, AsyncDrive, NotFound\n"
        "Drive('lit://d'); AsyncDrive('s3://bucket/p/')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_shared_file_helpers_do_not_load_grpc():
    """The commit worker imports drive_client.files; that must not bring grpc (~14 MiB) into it."""
    code = "import sys, drived.backends.commit_worker; print('grpc' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_drived_without_its_extra_says_what_to_install():
    code = "import sys; sys.modules['grpc_health'] = None; from drived.cli import main; main(['--help'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "pip install 'drived[daemon]'" in result.stderr


def test_a_data_dir_daemon_serves_without_loading_boto3_or_redis(start_daemon, tmp_path, drive_uri):
    """boto3 and redis are for --storage, s3:// drives and --coordinator: every daemon start loaded them (~0.25 s of
    its ~0.5 s of imports). Here each import of them fails in the daemon's process, and a daemon with a data dir
    serves puts, gets, lists, watches and health checks."""
    handle = start_daemon(tmp_path, before=refused_imports())
    assert health_status(handle.endpoint) == health_pb2.HealthCheckResponse.SERVING
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.txt").write_bytes(b"alpha")
    drive = Drive(drive_uri, root_folder=tmp_path / "up", endpoint=handle.endpoint)
    start = current_sequence(handle.endpoint, drive_uri)
    drive.put("a.txt")
    assert drive.get("a.txt", to=tmp_path / "a.txt").read_bytes() == b"alpha"
    assert drive.list() == ["a.txt"]
    put = next(iter(drive.watch(after_sequence=start)))
    assert (put.kind, put.file.path) == ("put", "a.txt")
    assert "Traceback" not in handle.log()


def test_every_public_name_loads():
    import drive_client

    assert sorted(drive_client.__all__) == sorted(drive_client._HOMES)
    for name in drive_client.__all__:
        assert getattr(drive_client, name).__name__ == name
