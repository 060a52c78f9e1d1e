"""`drived`: run the daemon, or `drived health` to check one.

It imports light modules only: the daemon's take ~0.3 s to load, and `main` takes SIGTERM and SIGINT before it
loads them (`_stopped_before_serving`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from . import logs

log = logging.getLogger("drived")


def _check_installed() -> None:
    """Imports the daemon, or ends the start saying what to install (`pip install drived` gives the client only)."""
    try:
        importlib.import_module("drived.server")
        # boto3 and redis load only once used (--storage, an s3:// drive, --coordinator): that they are installed is
        # checked now, so a daemon without them still says so as it starts.
        for lazy in ("boto3", "redis"):
            if importlib.util.find_spec(lazy) is None:
                raise ModuleNotFoundError(name=lazy)
    except ImportError as missing:
        raise SystemExit(
            f"drived: the daemon's dependencies are not installed ({missing.name} is missing): "
            "pip install 'drived[daemon]'"
        ) from None


def _stopped_before_serving(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or SIGINT before the server takes them (`server.Signals`): the daemon imports its modules and reads
    its configuration, and has opened nothing yet, so the process ends at once, as a stop ends it (exit 0).

    An orchestrator stops a container that has just started as it stops any
    other; with the signals' defaults, the daemon died by the signal, or
    printed a KeyboardInterrupt traceback.
    """
    log.info("stopping before serving")
    log.info("stopped")
    logs.end_process()


def _serve_parser() -> argparse.ArgumentParser:
    from . import config

    parser = argparse.ArgumentParser(
        prog="drived",
        description="Shared file storage for distributed workers, served over gRPC (drive.v1.DriveService). "
        "`drived health [--endpoint ADDR]` checks a running daemon.",
    )
    config.add_arguments(parser)
    return parser


def dialled(listen: str) -> str:
    """The address that reaches a daemon on this machine listening on `listen`: 127.0.0.1 for one listening on every
    interface, as 0.0.0.0:PORT and [::]:PORT both do (gRPC listens on IPv6 and IPv4 for either, or on IPv4 alone
    where the machine has no IPv6), else `listen` itself."""
    host, _, port = listen.rpartition(":")
    try:
        every = ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_unspecified
    except ValueError:  # a name, a unix: socket
        every = False
    return f"127.0.0.1:{port}" if every else listen


def _health_stopped(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C or SIGTERM (a probe's timeout, `timeout 3 drived health`) while `drived health` checks: one line and
    the shell's status for the signal, as `drive` ends. The process ends here, as it holds nothing to clean up:
    asyncio's own Ctrl-C cancels the check's task and then waits for the task to end, which a loaded machine once
    saw take over 20 s against a daemon that accepts and never answers."""
    print(f"drived health: {'interrupted' if signum == signal.SIGINT else 'terminated'}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _health(argv: Sequence[str]) -> int:
    _check_installed()
    import asyncio

    import grpc

    from drive_client.channels import Connection, add_tls_arguments
    from drive_client.errors import DriveError

    from . import config, server

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
    endpoint = dialled(args.endpoint or os.environ.get("DRIVED_LISTEN") or config.Config.listen)
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _health_stopped)
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
    # Taken before the daemon's modules load (~0.3 s), below: a stop from now on ends the start-up at once.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _stopped_before_serving)
    # SIGHUP reads the token and TLS files again once the daemon serves (`server.serve`); until then its default
    # would end the daemon, which may take seconds to start (a store that does not answer: 10 s).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _check_installed()
    import asyncio

    from drive_client.malloc import keep_transfer_buffers

    from . import config, server

    cfg = config.parse(args, _serve_parser())
    logs.setup(cfg.log_level)
    keep_transfer_buffers()
    asyncio.run(server.serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
