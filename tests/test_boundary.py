"""The package boundary: what a worker installs and imports, and what the daemon may take from the client."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT

# The client's modules that the daemon shares (DESIGN: "the daemon uses only the client's
# public, shared modules"); everything else in drive_client is the client's own.
SHARED = {"drive_client.pb", "drive_client.uri", "drive_client.errors", "drive_client.wire", "drive_client.files",
          "drive_client.malloc", "drive_client.channels", "drive_client.checksums"}


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


def test_every_public_name_loads():
    import drive_client

    assert sorted(drive_client.__all__) == sorted(drive_client._HOMES)
    for name in drive_client.__all__:
        assert getattr(drive_client, name).__name__ == name
