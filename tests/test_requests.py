"""drived.requests: each request message becomes a validated value, or InvalidArgument with a message."""

from __future__ import annotations

import pytest

from drive_client.errors import InvalidArgument, StaleIndexError
from drive_client.pb import drive_pb2 as pb
from drived.checksums import ClientChecksums
from drived.requests import (
    MAX_PAGE_SIZE,
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
