"""`drived`: run the daemon, or `drived health` to check one."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from drive_client.channels import Connection, add_tls_arguments
from drive_client.errors import DriveError
from drive_client.malloc import keep_transfer_buffers

from . import config, logs

try:
    from . import server

    # boto3 and redis load only once used (--storage, an s3:// drive, --coordinator): that they are installed is
    # checked now, so a daemon without them still says so as it starts.
    for lazy in ("boto3", "redis"):
        if importlib.util.find_spec(lazy) is None:
            raise ModuleNotFoundError(name=lazy)
except ImportError as missing:  # `pip install drived` gives the client only
    raise SystemExit(
        f"drived: the daemon's dependencies are not installed ({missing.name} is missing): "
        "pip install 'drived[daemon]'"
    ) from None


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drived",
        description="Shared file storage for distributed workers, served over gRPC (drive.v1.DriveService). "
        "`drived health [--endpoint ADDR]` checks a running daemon.",
    )
    config.add_arguments(parser)
    return parser


def _health(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="drived health",
        description="Exit 0 when the daemon answers SERVING. A daemon with --tls-cert needs --tls (or a CA).",
    )
    parser.add_argument("--endpoint", default=None, help="HOST:PORT (default: DRIVED_LISTEN, else 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add_tls_arguments(parser)
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the daemon's certificate carries, when it names neither 127.0.0.1 nor the "
                        "--endpoint host (e.g. drived.example.com)")
    args = parser.parse_args(argv)
    endpoint = args.endpoint or os.environ.get("DRIVED_LISTEN") or config.Config.listen
    endpoint = endpoint.replace("0.0.0.0:", "127.0.0.1:")
    try:
        connection = Connection.from_settings(
            endpoint, args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name
        )
        status = asyncio.run(server.check_health(connection, args.timeout))
    except DriveError as err:
        print(f"drived health: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"drived at {endpoint}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"drived at {endpoint}: {status}")
    return 0 if status == "SERVING" else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["health"]:
        return _health(args[1:])
    parser = _serve_parser()
    cfg = config.parse(args, parser)
    logs.setup(cfg.log_level)
    keep_transfer_buffers()
    # SIGHUP reads the token and TLS files again once the daemon serves (`server.serve`); until then its default
    # would end the daemon, which may take seconds to start (a store that does not answer: 10 s).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(server.serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
