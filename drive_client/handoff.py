"""Same-host puts and gets: a client hands the daemon on its own host an open file instead of moving its bytes.

The daemon listens on a Unix socket in Linux's abstract namespace named for
its gRPC port (`socket_name`); a client whose endpoint is that port on a
loopback address sends it an open file (SCM_RIGHTS) and gets a token. A put
hands the file to store (`PUT`), and its Put header carries the token
(`PutHeader.handoff`): the daemon reads the file itself. A get hands its
destination, open for writing (`GET`), and its Get request carries the token
(`GetRequest.handoff`): the daemon writes the file's bytes into it itself
(`drived.handoff`). No such socket here (the daemon is in another network
namespace, a container, or on another host), a refusal, or a token the call
does not find: the bytes go in a stream as always. Any user
of the host may bind an abstract socket's name (before the daemon starts,
or while it restarts): a file goes only to a listener of the client's own
user or root, who may read and write it anyway; with one of another user,
the bytes go in a stream.
$DRIVE_HANDOFF=0 turns handoffs off.
"""

from __future__ import annotations

import os
import socket
import struct

from .channels import endpoint_hosts, env_flag, is_loopback

# What a handoff's message says, beside the one descriptor it carries: a file to read for a put, or one to write a
# get's bytes into.
PUT = b"put"
GET = b"get"
HANDOFF_SECONDS = 2.0  # the daemon answers at once; a daemon that does not is one the file is streamed to


def socket_name(port: int) -> str:
    """The abstract socket name of the daemon serving gRPC on `port`."""
    return f"drived-handoff:{port}"


def handoff_port(endpoint: str) -> int | None:
    """The port of a daemon on this host that `endpoint` names (one loopback HOST:PORT) and files may be handed to;
    None when there is none, or $DRIVE_HANDOFF is off."""
    if not env_flag("DRIVE_HANDOFF", {"DRIVE_HANDOFF": os.environ.get("DRIVE_HANDOFF", "1")}):
        return None
    hosts = endpoint_hosts(endpoint)
    if len(hosts) != 1 or not is_loopback(endpoint) or endpoint.startswith("unix"):
        return None
    port = endpoint.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def hand_over(port: int, fd: int, request: bytes = PUT) -> str | None:
    """The token under which the daemon of `port` on this host holds the open file `fd` for a put (`request` PUT) or
    a get (GET); None when there is no such daemon here or it does not take the file (the caller moves the bytes)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as connection:
            connection.settimeout(HANDOFF_SECONDS)
            connection.connect("\0" + socket_name(port))
            if not _trusted(connection):
                return None
            socket.send_fds(connection, [request], [fd])
            answer = connection.recv(1024).decode(errors="replace")
    except OSError:
        return None
    word, _, token = answer.partition(" ")
    return token if word == "ok" and token else None


def _trusted(connection: socket.socket) -> bool:
    """Whether the listener at the other end runs as root or as this process's user (its credentials as it
    listened): a file handed to another user would give that user a right to read it (a put's) or write it (a
    get's)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    return uid in (0, os.geteuid())
