"""Drive URIs, component names and paths: parsing and validation.

Shared by the client and the daemon, so both refuse the same inputs with the
same words. Every failure raises `InvalidArgument` (a `ValueError`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from .errors import InvalidArgument

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_PATH_BYTES = 4096
MAX_PART_BYTES = 255
DEFAULT_COMPONENT = "default"


@dataclass(frozen=True)
class DriveId:
    """A parsed drive URI: `lit://name` (managed) or `s3://bucket/prefix/` (read-only)."""

    uri: str
    scheme: str  # "lit" or "s3"
    name: str = ""  # lit:// drives
    bucket: str = ""  # s3:// drives
    prefix: str = ""  # s3:// drives: "" or ending in "/"

    @property
    def read_only(self) -> bool:
        return self.scheme == "s3"


def _check_name(kind: str, name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid {kind} {name!r}: use 1-128 letters, digits, '.', '_' or '-' (not '.' or '..')"
        )
    return name


def parse_drive(uri: str) -> DriveId:
    """Parses and validates a drive URI."""
    if not isinstance(uri, str):
        raise InvalidArgument(f"a drive id is a string like 'lit://drive_1', not {type(uri).__name__}")
    if uri.startswith("lit://"):
        return DriveId(uri=uri, scheme="lit", name=_check_name("drive name", uri[len("lit://"):]))
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not BUCKET_RE.fullmatch(bucket):
            raise InvalidArgument(f"invalid S3 bucket name {bucket!r} in {uri!r}")
        if not uri.endswith("/"):
            raise InvalidArgument(
                f"an s3 drive is a folder: add the trailing '/' ({uri + '/'!r}); single objects are not mountable"
            )
        if prefix:
            normalize_path(prefix.rstrip("/"))
        return DriveId(uri=uri, scheme="s3", bucket=bucket, prefix=prefix)
    scheme = uri.partition("://")[0] if "://" in uri else ""
    raise InvalidArgument(
        f"unsupported drive id {uri!r}" + (f" (protocol {scheme!r})" if scheme else "")
        + ": use 'lit://NAME' or 's3://bucket/prefix/'"
    )


def check_component(component: str | None) -> str:
    """Validates a component name; None and "" mean the default component."""
    if not component:
        return DEFAULT_COMPONENT
    return _check_name("component name", component)


def normalize_path(path: str, allow_root: bool = False) -> str:
    """Returns the canonical form of a drive path ("" for the root).

    Collapses repeated and trailing '/' and '.' parts; refuses absolute paths,
    '..', NUL and control characters, and over-long names. The root ("", ".")
    is accepted only when `allow_root`.
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"a path is a string, not {type(path).__name__}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"path is longer than {MAX_PATH_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidArgument(f"path {path!r} contains a NUL or control character")
    if path.startswith("/") or path.startswith("\\"):
        raise InvalidArgument(f"path {path!r} is absolute: give it relative to the drive root")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidArgument(f"path {path!r} contains '..': paths cannot leave the drive")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
            raise InvalidArgument(f"a name in path {path[:40]!r}... is longer than {MAX_PART_BYTES} bytes")
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"path {path!r} is not valid unicode") from None
    normal = "/".join(parts)
    if not normal and not allow_root:
        raise InvalidArgument("this needs a path below the drive root, not the root itself")
    return normal


def drive_path(drive: DriveId, path: str, allow_root: bool = False) -> str:
    """A path in `drive`, normalised; in a `lit://` drive also in Unicode NFC, the form the daemon keeps and
    answers with.

    Names that differ only by normalisation (an "é" as one code point or as "e" and a
    combining accent) look the same, so a managed drive keeps one of them: the composed
    form, whichever form a client sends. An `s3://` drive's keys are the store's, kept as they are.
    """
    if drive.scheme == "lit" and isinstance(path, str) and not path.isascii():  # normalize_path refuses the rest
        path = unicodedata.normalize("NFC", path)
    return normalize_path(path, allow_root)
