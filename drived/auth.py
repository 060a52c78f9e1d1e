"""Who may call what: bearer tokens, each with the drives it may use and whether it may write.

`--auth-tokens FILE` names a TOML file of tokens; `--token` is one more, for
every drive, read-write. With neither, every call is let in. A call shows its
token as `authorization: Bearer TOKEN`; the service (`drived.service.rpc`)
asks `Access.authenticate` for the call's `Grant` before anything else, and
checks the grant against each drive the call names once its request is
decoded (`Grant.check`), so every refusal is logged and counted like any
other answer. Health and reflection are other services: always open.

The file (README, Security):

    [[token]]
    name = "trainer"                        # in logs and messages; the token itself never is
    sha256 = "<hex sha256 of the token>"    # or: token = "<the token>" (then keep the file private)
    drives = ["lit://team_a_*", "s3://datasets/imagenet/*"]
    mode = "read-write"                     # or "read"

A drive pattern is a shell glob (`fnmatch`: `*`, `?`, `[...]`; `*` matches
`/` too) matched against the whole drive URI, case-sensitively; a pattern
without `lit://` or `s3://` is a `lit://` drive name. Tokens are kept only as
their sha256: a presented token is hashed and looked up by that hash, so how
long a lookup takes tells nothing about any token. A refusal names the
token's name and the drive asked for, never which drives exist.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from drive_client.errors import PermissionDenied, Unauthenticated
from drive_client.uri import DriveId

if sys.version_info >= (3, 11):
    import tomllib
else:  # the `tomli` dependency of the daemon extra on Python 3.10
    import tomli as tomllib

log = logging.getLogger("drived")

# Whether each DriveService method reads or writes; `drived.service.rpc` refuses to wrap a method missing here.
READS = frozenset({"Get", "List", "Stat", "Watch", "Mount"})
WRITES = frozenset({"Put", "PutFile", "Delete", "QueryWriteStatus"})
MODES = ("read", "read-write")
TOKEN_NAME = re.compile(r"[A-Za-z0-9._@:-]{1,128}")
SCHEMES = ("lit://", "s3://")
ENTRY_KEYS = {"name", "sha256", "token", "drives", "mode"}


class TokenFileError(Exception):
    """A token file that cannot be used; the message says where and why, never a token."""


@dataclass(frozen=True)
class Grant:
    """What a call may do: the token's name, the drives it may use (None: all) and whether it may write."""

    name: str
    scope: re.Pattern[str] | None
    write: bool

    def check(self, method: str, drive: DriveId) -> None:
        """Refuses `method` on `drive` with PermissionDenied when this grant does not cover it."""
        writes = method in WRITES
        if writes and not self.write:
            raise PermissionDenied(f"token {self.name!r} may only read: {method} needs a read-write token")
        if self.scope is not None and not self.scope.fullmatch(drive.uri):
            raise PermissionDenied(
                f"token {self.name!r} may not {'write to' if writes else 'read'} {drive.uri}: use a token whose "
                "scope holds this drive"
            )


EVERYONE = Grant("", None, True)  # no tokens configured: every call is let in
NOBODY = Grant("", re.compile(r"(?!)"), False)  # what a call holds before it is authenticated


def compile_scope(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regular expression matching a drive URI when any of the glob `patterns` does."""
    full = [p if p.startswith(SCHEMES) else "lit://" + p for p in patterns]
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in full))


SENDABLE = "printable ASCII without spaces"


def sendable(token: str) -> bool:
    """Whether a client can send `token`: gRPC metadata carries printable ASCII only, and a space would end it."""
    return bool(token) and all("!" <= c <= "~" for c in token)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_pattern(pattern: object, where: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise TokenFileError(f"{where}: each of `drives` is a non-empty string, like \"lit://team_a_*\"")
    if "://" in pattern and not pattern.startswith(SCHEMES):
        raise TokenFileError(f"{where}: drive pattern {pattern!r} starts with neither lit:// nor s3://")
    if "://" not in pattern and "/" in pattern:
        raise TokenFileError(
            f"{where}: drive pattern {pattern!r} has no lit:// or s3:// and a '/': a lit:// drive name has none "
            "(write s3://bucket/prefix/* for an s3 location)"
        )
    return pattern


def _entry(number: int, entry: Any) -> tuple[bytes, Grant, bool]:
    """The digest and grant of one [[token]] table, and whether it held its token in plaintext."""
    where = f"[[token]] #{number}"
    if not isinstance(entry, dict):
        raise TokenFileError(f"{where} is not a table: write each token as a [[token]] table")
    name = entry.get("name")
    if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
        raise TokenFileError(f"{where}: `name` is required: 1-128 letters, digits, '.', '_', '@', ':' or '-'")
    where = f"[[token]] #{number} ({name!r})"
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise TokenFileError(f"{where}: unknown key(s) {', '.join(unknown)}: use {', '.join(sorted(ENTRY_KEYS))}")
    if ("sha256" in entry) == ("token" in entry):
        raise TokenFileError(f"{where}: give exactly one of `sha256` (recommended) or `token`")
    if "sha256" in entry:
        hexdigest = entry["sha256"]
        if not isinstance(hexdigest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
            raise TokenFileError(f"{where}: `sha256` is the 64 hex digits of the token's sha256")
        digest = bytes.fromhex(hexdigest)
    else:
        token = entry["token"]
        if not isinstance(token, str) or not sendable(token):
            raise TokenFileError(f"{where}: `token` is a non-empty string of {SENDABLE}")
        digest = token_digest(token)
    drives = entry.get("drives")
    if not isinstance(drives, list) or not drives:
        raise TokenFileError(f"{where}: `drives` is a non-empty list of drive patterns, like [\"lit://team_a_*\"]")
    mode = entry.get("mode")
    if mode not in MODES:
        raise TokenFileError(f"{where}: `mode` is \"read\" or \"read-write\"")
    scope = compile_scope(_check_pattern(p, where) for p in drives)
    return digest, Grant(name, scope, mode == "read-write"), "token" in entry


@dataclass(frozen=True)
class TokenTable:
    """The tokens accepted, by the sha256 of each."""

    grants: dict[bytes, Grant]
    plaintext: bool = False  # whether some token is written in the file as it is

    @classmethod
    def read(cls, path: str) -> TokenTable:
        """The tokens of a token file; TokenFileError when it cannot be used as a whole."""
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as err:
            raise TokenFileError(f"cannot read {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise TokenFileError(f"{path} is not valid TOML: {err}") from None
        unknown = sorted(set(document) - {"token"})
        if unknown:
            raise TokenFileError(f"{path}: unknown key(s) {', '.join(unknown)}: the file holds [[token]] tables")
        entries = document.get("token")
        if not isinstance(entries, list) or not entries:
            raise TokenFileError(f"{path} defines no token: add [[token]] tables (README, Security)")
        grants: dict[bytes, Grant] = {}
        names: set[str] = set()
        plaintext = False
        for number, entry in enumerate(entries, 1):
            digest, grant, clear = _entry(number, entry)
            if grant.name in names:
                raise TokenFileError(f"{path}: two tokens are named {grant.name!r}: names are unique")
            if digest in grants:
                raise TokenFileError(f"{path}: tokens {grants[digest].name!r} and {grant.name!r} are the same token")
            names.add(grant.name)
            grants[digest] = grant
            plaintext |= clear
        return cls(grants, plaintext)


def _shared(path: str) -> bool:
    """Whether users other than the file's owner may read or write it."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


class Access:
    """The tokens the daemon accepts now: `--token` and the `--auth-tokens` file, which `reload` reads again."""

    def __init__(self, tokens_file: str = "", token: str = "", token_setting: str = "--token") -> None:
        self._file = tokens_file
        self._token_setting = token_setting  # `token` as the operator gave it, which a message names
        self._token_digest = token_digest(token) if token else b""  # never the token itself (README)
        self._table = self._load()  # TokenFileError at start-up

    @property
    def required(self) -> bool:
        """Whether calls need a token."""
        return bool(self._file or self._token_digest)

    def _load(self) -> TokenTable:
        table = TokenTable.read(self._file) if self._file else TokenTable({})
        if self._token_digest:
            if self._token_digest in table.grants:
                raise TokenFileError(
                    f"{self._file}: token {table.grants[self._token_digest].name!r} is also {self._token_setting}, "
                    "which grants every drive read-write: give each token once"
                )
            grants = {self._token_digest: Grant(self._token_setting, None, True), **table.grants}
            table = TokenTable(grants, table.plaintext)
        if table.plaintext and _shared(self._file):
            log.warning("token file readable by others", extra={"fields": {
                "file": self._file,
                "advice": "it holds tokens in plaintext: chmod 600 it, or keep only each token's sha256",
            }})
        return table

    def reload(self) -> None:
        """Reads the token file again (SIGHUP); a file that cannot be used leaves the tokens as they were."""
        if not self._file:
            return
        try:
            self._table = self._load()
        except TokenFileError as err:
            log.warning("tokens not reloaded", extra={"fields": {"file": self._file, "reason": str(err)}})
            return
        log.info("tokens reloaded", extra={"fields": {"file": self._file, "tokens": len(self._table.grants)}})

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Grant:
        """The grant of a call with this metadata; Unauthenticated without a token the daemon knows."""
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise Unauthenticated(
                "drived wants a token: pass Drive(..., token=...) or set $DRIVE_TOKEN (sent as "
                "`authorization: Bearer TOKEN`)"
            )
        scheme, _, token = (header.decode(errors="replace") if isinstance(header, bytes) else header).partition(" ")
        grant = self._table.grants.get(token_digest(token.strip())) if scheme.lower() == "bearer" else None
        if grant is None:
            raise Unauthenticated(
                "drived does not accept the token sent (`authorization: Bearer TOKEN`): check Drive(..., token=...) "
                "or $DRIVE_TOKEN, and ask for a new token if yours was withdrawn"
            )
        return grant
