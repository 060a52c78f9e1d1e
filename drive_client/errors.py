"""The exceptions the client raises, and the gRPC status code of each.

Every error is a `DriveError` carrying the gRPC status code in `.code`
(`None` for errors found before any call). Where Python has a built-in type
for the condition the class inherits it too, so callers can catch either
(`except FileNotFoundError` catches `NotFound`). The daemon raises the same
classes; its server turns them into statuses, and the client turns statuses
back into them.
"""

from __future__ import annotations

import grpc


class DriveError(Exception):
    """Any error of a drive operation. `.code` is the gRPC status code or None."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # How the daemon's message starts, for a class the client tells apart from others of its status by it.
    mark = ""
    # The trailing metadata the daemon answers this error's status with, for a class the client tells apart by it.
    trailers: tuple[tuple[str, str], ...] = ()

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message

    def details(self) -> str:
        """The message the daemon answers this error's status with: marked as its class's; on the daemon the mark
        is added, an error the client built from the daemon's answer carries it already (`from_rpc_error`)."""
        return self.message if self.message.startswith(self.mark) else self.mark + self.message


class InvalidArgument(DriveError, ValueError):
    """A bad drive id, path, component or request."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DriveError, FileNotFoundError):
    """No such file in the drive, no such local file to put, or a local folder removed while a get wrote to it."""

    status = grpc.StatusCode.NOT_FOUND


class HandoffNotHeld(NotFound):
    """A Put header's handoff token that the daemon does not hold (expired, or handed to another daemon of the
    host), or whose file it cannot read: the client sends the file's bytes in the stream instead
    (`drive_client.handoff`)."""

    mark = "drived: handoff: "


class NothingDeleted(NotFound):
    """A delete's NOT_FOUND from a daemon that looked for what the earlier attempts of the delete (its request id)
    removed and found nothing: the path held nothing of the caller's. A daemon older than request ids answers a
    plain NotFound."""

    trailers = (("drived-looked-back", "1"),)


class AlreadyExists(DriveError, FileExistsError):
    """Another component holds the path, the local target exists, or a file is where fsspec's "xb" creates one."""

    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(DriveError, PermissionError):
    """A write to a read-only drive, a right the token lacks, or a local folder or file a get may not write or a put
    may not read."""

    status = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DriveError, PermissionError):
    """The daemon wants a token and got none, or a wrong one."""

    status = grpc.StatusCode.UNAUTHENTICATED


class AmbiguousPathError(DriveError):
    """Several components hold the path; name one with component_name."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class StaleIndexError(DriveError):
    """An s3:// object (or a file being read) changed since it was indexed, or a local file while it was put."""

    status = grpc.StatusCode.ABORTED


class WaitTimeout(DriveError, TimeoutError):
    """A get's wait for the path expired."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(DriveError):
    """Bytes that do not match their checksums: a put stores nothing, a get keeps nothing; or a damaged stored
    file (the message names it)."""

    status = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(DriveError):
    """Disk full, quota, or a message over the size limit."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyStreams(ResourceExhausted):
    """The daemon serves as many transfers and watches as it takes, in all or from this client's host
    (--max-streams, --max-streams-per-peer). Tried again within the drive's retry_seconds, as an UNAVAILABLE is:
    streams end, and many workers of one host starting big gets at once need not fail."""

    mark = "drived: busy: "


class Unavailable(DriveError, ConnectionError):
    """The daemon cannot be reached, or answered that it cannot serve the call now (it is draining, it ended
    the stream, or `StoreUnavailable`)."""

    status = grpc.StatusCode.UNAVAILABLE
    # How the message of every UNAVAILABLE the daemon answers starts; any other UNAVAILABLE comes from gRPC or
    # what is between (the daemon unreachable).
    mark = "drived: "


class StoreUnavailable(Unavailable):
    """The daemon answered, but what is behind it cannot be used: its S3 endpoint (named in the message) or its
    coordinator. A mount is not tried again: it would list the whole location again against that endpoint."""

    mark = "drived: store failed: "


class OutOfRange(DriveError):
    """A position the daemon cannot go on from: a resumed upload's offset is not what it holds (query
    it again), or a watch's sequence is no longer kept or was never given (`EventsExpired`)."""

    status = grpc.StatusCode.OUT_OF_RANGE


class EventsExpired(OutOfRange):
    """A watch resumed after a sequence whose following events the daemon no longer keeps, or after a
    sequence the drive never gave.

    List the drive to learn its state, then watch from now (`after_sequence=0`).
    """


class NotADirectory(DriveError, NotADirectoryError):
    """A local path that must be a folder is a file (e.g. a Drive's `root_folder`, or the folder a get writes to);
    found on the local side."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class IsADirectory(DriveError, IsADirectoryError):
    """A folder where a file is needed: a local one a get would write, or a drive's one (or its root) fsspec is
    asked to open, write or date as a file; found on the client's side."""


class LocalFileError(DriveError, OSError):
    """Any other error of the local file system a get writes to or a put reads (EIO); `.errno`, `.strerror` and
    `.filename` are the system's."""


class Unimplemented(DriveError, NotImplementedError):
    """The daemon does not serve this call."""

    status = grpc.StatusCode.UNIMPLEMENTED


_BY_STATUS: dict[grpc.StatusCode, type[DriveError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
        AmbiguousPathError, StaleIndexError, WaitTimeout, DataLoss, ResourceExhausted,
        Unavailable, Unimplemented, OutOfRange,
    )
}


def error_for_status(code: grpc.StatusCode, message: str) -> DriveError:
    """The exception for a status the server answered, carrying that code."""
    return _BY_STATUS.get(code, DriveError)(message, code)


# How the daemon's refusal of a put below a file (INVALID_ARGUMENT) ends, which the client tells apart from its
# other refusals where its caller expects NotADirectoryError (fsspec's).
PARENT_IS_FILE = "a parent folder of it is a file"
# The status grpc.aio gives a stream whose message its transport failed to send (grpc.aio's `_write`): the
# connection broke under the stream, which the transport's own status says as UNAVAILABLE when it comes first.
AIO_SEND_FAILED = "Internal error from Core"
# The details gRPC gives a call cancelled in this process (by its caller, by closing its channel, or when it was
# dropped); any other CANCELLED came from the other side, which drived never answers on purpose: a daemon stopping
# cancels the calls that reach it after its GOAWAY was sent.
LOCALLY_CANCELLED = frozenset({"Locally cancelled by application!", "Channel closed!",
                               "Cancelled upon garbage collection!"})


def from_rpc_error(
    err: grpc.RpcError, endpoint: str, advice: str = "is the daemon running? `make run` starts one"
) -> DriveError:
    """Turns a failed call into the matching DriveError. An UNAVAILABLE the daemon answered keeps its message
    (`StoreUnavailable` when it says the store failed); any other names the endpoint and what to check."""
    code = err.code()
    details = err.details() or code.name
    if code == grpc.StatusCode.INTERNAL and details == AIO_SEND_FAILED:
        code, details = grpc.StatusCode.UNAVAILABLE, "the connection broke while a message was being sent"
    if code == grpc.StatusCode.CANCELLED and details not in LOCALLY_CANCELLED:
        code, details = grpc.StatusCode.UNAVAILABLE, "the call was cancelled on the daemon's side before drived took " \
            "it up (a stopping daemon cancels the calls that reach it before the client has read its GOAWAY, and " \
            "gRPC the calls past the ~1,000 it queues for the daemon to take up: thousands sent at once)"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(TooManyStreams.mark):
        return TooManyStreams(details, code)
    if code == grpc.StatusCode.NOT_FOUND and details.startswith(HandoffNotHeld.mark):
        return HandoffNotHeld(details, code)
    if code == grpc.StatusCode.NOT_FOUND and set(NothingDeleted.trailers) <= set(err.trailing_metadata() or ()):
        return NothingDeleted(details, code)
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith(StoreUnavailable.mark):
            return StoreUnavailable(details, code)
        if not details.startswith(Unavailable.mark):
            details = f"cannot reach drived at {endpoint}: {details} ({advice})"
    return error_for_status(code, details)
