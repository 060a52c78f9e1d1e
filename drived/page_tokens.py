"""List page tokens: where the next page of a listing starts, opaque to clients and checked when they return.

A token is "1." (its format's version) and the URL-safe base64 of a check
and the last path of the page it follows. The check is the first 8 bytes of
the sha256 of the version, the listing it belongs to (drive, folder,
component, recursive) and that path, so that a token that was not issued
for this listing (garbage, a token of another folder, one altered by hand)
is refused with INVALID_ARGUMENT instead of starting a page somewhere
arbitrary. It is a check against mistakes, not a secret: anyone can make a
valid token for a listing they may read anyway, and the daemons that serve
one store need share nothing to accept each other's tokens.

A token lives for one paging loop. The plain paths that earlier daemons gave
as tokens cannot be told from garbage, so they are refused like it: a loop
that spans an upgrade starts again from its first page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from drive_client.errors import InvalidArgument

VERSION = "1"
CHECK_BYTES = 8
MAX_TOKEN_CHARS = 8192  # a 4096-byte path and its check, in base64, with room to spare


def _check(listing: tuple[str, str, str, bool], last_path: bytes) -> bytes:
    drive, path, component, recursive = listing
    identity = f"{VERSION}\0{drive}\0{path}\0{component}\0{int(recursive)}\0".encode()
    return hashlib.sha256(identity + last_path).digest()[:CHECK_BYTES]


def issue(listing: tuple[str, str, str, bool], last_path: str) -> str:
    """The token of the page after `last_path` in `listing` (drive URI, folder, component, recursive)."""
    encoded = last_path.encode()
    body = base64.urlsafe_b64encode(_check(listing, encoded) + encoded).rstrip(b"=")
    return f"{VERSION}.{body.decode()}"


def start_after(listing: tuple[str, str, str, bool], token: str) -> str:
    """The path a page of `listing` starts after: "" for no token; InvalidArgument for one not issued for it."""
    if not token:
        return ""
    version, _, body = token.partition(".")
    try:
        if version != VERSION or len(token) > MAX_TOKEN_CHARS:
            raise ValueError
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        check, last_path = raw[:CHECK_BYTES], raw[CHECK_BYTES:]
        if check != _check(listing, last_path):
            raise ValueError
        return last_path.decode()
    except (ValueError, binascii.Error):
        shown = token if len(token) <= 40 else token[:40] + "..."
        raise InvalidArgument(
            f"page_token {shown!r} is not one this listing gave: pass the previous answer's next_page_token "
            "unchanged, with the same drive, path, component and recursive, or '' for the first page"
        ) from None
