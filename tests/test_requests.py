"""drived.requests: each request message becomes a validated value, or InvalidArgument with a message."""

from __future__ import annotations

import pytest

from drive_client.errors import InvalidArgument, StaleIndexError
from drive_client.pb import drive_pb2 as pb
from drived.checksums import ClientChecksums
from drived.requests import (
    MAX_PAGE_SIZE,
    MAX_WAIT_SECONDS,
    DeleteRequest,
    GetRequest,
    ListRequest,
    PutHeader,
    StatRequest,
    WatchRequest,
    sent_checksums,
)


def test_defaults_are_filled_in() -> None:
    header = PutHeader.from_pb(pb.PutHeader(drive="lit://d", path="a//b/./c.txt"))
    assert (header.drive.name, header.path, header.component, header.size) == ("d", "a/b/c.txt", "default", None)
    assert PutHeader.from_pb(pb.PutHeader(drive="lit://d", path="a", size=0)).size == 0
    assert DeleteRequest.from_pb(pb.DeleteRequest(drive="lit://d", path="a")).component == "default"  # the caller
    assert StatRequest.from_pb(pb.StatRequest(drive="lit://d", path="a")).component == ""  # every component
    listing = ListRequest.from_pb(pb.ListRequest(drive="s3://bucket/p/", path="."))
    assert (listing.drive.bucket, listing.path, listing.limit) == ("bucket", "", 1000)
    assert ListRequest.from_pb(pb.ListRequest(drive="lit://d", page_size=10**6)).limit == MAX_PAGE_SIZE
    assert sent_checksums(pb.PutFinish(sha256="ABCdef")) == ClientChecksums("abcdef", None)
    assert sent_checksums(pb.PutFileRequest(crc32c=0)) == ClientChecksums("", 0)
    assert sent_checksums(pb.PutFinish(sha256="ab", crc32c=7)) == ClientChecksums("ab", 7)


@pytest.mark.parametrize(
    "decode",
    [
        lambda: PutHeader.from_pb(pb.PutHeader(drive="lit://d", path="a", size=-1)),
        lambda: PutHeader.from_pb(pb.PutHeader(drive="lit://d", path=".")),
        lambda: PutHeader.from_pb(pb.PutHeader(drive="lit://d", path="a", component="a b")),
        lambda: GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", offset=-1)),
        lambda: GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", limit=-1)),
        lambda: GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", wait_seconds=float("nan"))),
        lambda: GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", wait_seconds=float("inf"))),
        lambda: GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", wait_seconds=MAX_WAIT_SECONDS + 1)),
        lambda: GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", component="../x")),
        lambda: ListRequest.from_pb(pb.ListRequest(drive="lit://d", page_size=-1)),
        lambda: StatRequest.from_pb(pb.StatRequest(drive="lit://d", path="/etc/passwd")),
        lambda: DeleteRequest.from_pb(pb.DeleteRequest(drive="s3://bucket/no-slash", path="a")),
        lambda: WatchRequest.from_pb(pb.WatchRequest(drive="ftp://d")),
        lambda: sent_checksums(pb.PutFinish()),
        lambda: sent_checksums(pb.PutFileRequest(data=b"x")),
    ],
)
def test_bad_fields_are_refused_with_a_message(decode) -> None:
    with pytest.raises(InvalidArgument) as refused:
        decode()
    assert str(refused.value)


def test_checks_against_the_file_found() -> None:
    get = GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="f", offset=10, if_match="abc"))
    get.check_range(10)  # the end itself is fine: no bytes
    with pytest.raises(InvalidArgument, match="past the end of 'f' in lit://d"):
        get.check_range(9)
    get.check_version("abc", "sha256")
    with pytest.raises(StaleIndexError, match="read it again"):
        get.check_version("abd", "sha256")
    with pytest.raises(InvalidArgument, match="folder"):
        get.check_folder()
    GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="f")).check_folder()


def test_a_watch_reports_its_folder_and_component_only() -> None:
    watch = WatchRequest.from_pb(pb.WatchRequest(drive="lit://d", path="ck", component="w"))
    assert watch.reports("ck", "w") and watch.reports("ck/a.pt", "w")
    assert not watch.reports("ck2/a.pt", "w") and not watch.reports("ck/a.pt", "other")
    assert WatchRequest.from_pb(pb.WatchRequest(drive="lit://d")).reports("any/where", "any")


def test_a_wait_of_up_to_a_day_is_taken() -> None:
    assert GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", wait_seconds=MAX_WAIT_SECONDS)).wait_seconds
    assert GetRequest.from_pb(pb.GetRequest(drive="lit://d", path="a", wait_seconds=float("-inf"))).wait_seconds < 0


def test_page_tokens_come_back_as_the_path_they_follow() -> None:
    first = ListRequest.from_pb(pb.ListRequest(drive="lit://d", path="dir", component="c", recursive=True))
    token = first.page_token("dir/é/x y.txt")
    assert "dir" not in token, "opaque"
    again = pb.ListRequest(drive="lit://d", path="dir/", component="c", recursive=True, page_token=token)
    assert ListRequest.from_pb(again).start_after == "dir/é/x y.txt"
    assert ListRequest.from_pb(pb.ListRequest(drive="lit://d", path="dir")).start_after == ""


GARBAGE_TOKENS = {
    "a plain path (as earlier daemons issued)": "dir/a.txt",
    "words": "garbage",
    "the version alone": "1.",
    "another version": "2.AAAAAAAAAAAA",
    "not base64": "1.@@@@",
    "a flipped character": None,  # made from a real token below
    "too long": "1." + "A" * 10000,
    "control characters": "1.\x00\n",
}


@pytest.mark.parametrize("token", GARBAGE_TOKENS.values(), ids=GARBAGE_TOKENS.keys())
def test_garbage_page_tokens_are_refused(token: str | None) -> None:
    listing = pb.ListRequest(drive="lit://d", path="dir")
    if token is None:
        real = ListRequest.from_pb(listing).page_token("dir/a.txt")
        token = real[:-2] + ("B" if real[-2] != "B" else "C") + real[-1]
    listing.page_token = token
    with pytest.raises(InvalidArgument, match="next_page_token unchanged"):
        ListRequest.from_pb(listing)


@pytest.mark.parametrize(
    "other",
    [
        {"drive": "lit://e"}, {"path": "dir2"}, {"component": "c"}, {"recursive": True},
    ],
)
def test_a_token_of_another_listing_is_refused(other: dict) -> None:
    token = ListRequest.from_pb(pb.ListRequest(drive="lit://d", path="dir")).page_token("dir/a.txt")
    fields = {"drive": "lit://d", "path": "dir", **other}
    with pytest.raises(InvalidArgument, match="same drive, path, component and recursive"):
        ListRequest.from_pb(pb.ListRequest(page_token=token, **fields))


def test_managed_paths_are_kept_in_nfc_and_s3_keys_as_sent() -> None:
    decomposed, composed = "cafe\u0301/n\u0303.txt", "caf\u00e9/\u00f1.txt"
    assert PutHeader.from_pb(pb.PutHeader(drive="lit://d", path=decomposed)).path == composed
    assert GetRequest.from_pb(pb.GetRequest(drive="lit://d", path=decomposed)).path == composed
    assert StatRequest.from_pb(pb.StatRequest(drive="lit://d", path=decomposed)).path == composed
    assert DeleteRequest.from_pb(pb.DeleteRequest(drive="lit://d", path=decomposed)).path == composed
    assert ListRequest.from_pb(pb.ListRequest(drive="lit://d", path=decomposed)).path == composed
    assert WatchRequest.from_pb(pb.WatchRequest(drive="lit://d", path=decomposed)).path == composed
    assert GetRequest.from_pb(pb.GetRequest(drive="s3://bucket/p/", path=decomposed)).path == decomposed
