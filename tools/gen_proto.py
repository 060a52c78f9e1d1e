"""Generate the Python stubs for protos/ into drive_client/pb/.

`python tools/gen_proto.py` rewrites the committed stubs; `--check` only
compares freshly generated stubs with the committed ones and exits 1 when
they differ (the drift test runs it). The generated `*_pb2_grpc.py` imports
its messages as `from drive.v1 import drive_pb2`; that import is made
package-relative so the stubs live inside drive_client.
"""

import argparse
import pathlib
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO = "drive/v1/drive.proto"
OUT_DIR = ROOT / "drive_client" / "pb"
MODULES = ("drive_pb2.py", "drive_pb2.pyi", "drive_pb2_grpc.py", "drive_pb2_grpc.pyi")


def generate() -> dict[str, bytes]:
    """Run protoc (with the mypy plugins) and return the stub files by name."""
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = pathlib.Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            PROTO,
        ])
        if rc != 0:
            sys.exit(f"protoc failed with exit code {rc}")
        out = pathlib.Path(tmp) / "drive" / "v1"
        files = {name: (out / name).read_bytes() for name in MODULES}
    for name in ("drive_pb2_grpc.py", "drive_pb2_grpc.pyi"):
        files[name] = files[name].replace(b"from drive.v1 import drive_pb2", b"from . import drive_pb2")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs differ")
    args = parser.parse_args()
    files = generate()
    if args.check:
        stale = [n for n, data in files.items() if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_bytes() != data]
        if stale:
            sys.exit(f"stubs out of date with {PROTO}: {', '.join(stale)}; run `make proto`")
        return
    for name, data in files.items():
        (OUT_DIR / name).write_bytes(data)


if __name__ == "__main__":
    main()
