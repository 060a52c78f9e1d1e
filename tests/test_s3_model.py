"""s3:// drives against the bucket itself: what a mounted drive shows, checked against a model of README's rules.

Hypothesis writes keys over a small alphabet that makes collisions likely (a file and a folder of one name, folder
markers, empty, '.' and '..' parts, a leading '/', control characters, over-long names, NFC/NFD twins, keys just
outside the prefix) into moto_server with boto3; a real daemon mounts the prefix; the model is computed from the
keys alone, never by asking the daemon.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3
import grpc
import pytest
from conftest import start_daemon
from hypothesis import given
from hypothesis import strategies as st
from moto_server import AWS_ENV, running_moto

from drive_client import Drive, StaleIndexError
from drive_client.pb import drive_pb2, drive_pb2_grpc

pytestmark = pytest.mark.integration  # starts moto_server and a daemon of its own

BUCKET = "model"
MAX_KEY_BYTES = 1024  # S3's limit
PARTS = ["a", "b", "a b", "", ".", "..", unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é"),
         "c\x01", "n" * 256, "\\"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[tuple[object, str]]:
    """A moto_server with an empty bucket, and a daemon that lists it a few keys a page (so mounts span pages)."""
    with running_moto() as url:
        client = boto3.client(
            "s3", endpoint_url=url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=BUCKET)
        tmp = tmp_path_factory.mktemp("s3-model")
        daemon = start_daemon(tmp, "--s3-page-size", "3", env={**AWS_ENV, "AWS_ENDPOINT_URL": url})
        try:
            yield client, daemon.endpoint
        finally:
            daemon.stop(signal.SIGTERM, timeout=20)


def is_drive_path(path: str) -> bool:
    """README: a key is shown when it is a drive path as written (no empty, '.' or '..' part, no control character,
    no name over 255 bytes, no leading backslash)."""
    return not path.startswith("\\") and all(
        part not in ("", ".", "..") and len(part.encode()) <= 255 and all(ord(c) >= 32 and ord(c) != 127 for c in part)
        for part in path.split("/")
    )


def parent(path: str) -> str:
    return path.rpartition("/")[0]


@dataclass
class Model:
    """What README says the drive at `prefix` shows of `objects` (every key of the bucket: its bytes)."""

    objects: dict[str, bytes]
    prefix: str
    files: dict[str, bytes] = field(init=False)  # shown: drive path -> bytes
    hidden: list[str] = field(init=False)  # objects under the prefix that are no drive path
    folders: set[str] = field(init=False)  # shown folders ("" the root)

    def __post_init__(self) -> None:
        below = {k[len(self.prefix):]: v for k, v in self.objects.items() if k.startswith(self.prefix)}
        objects = {k: v for k, v in below.items() if not k.endswith("/") and k}  # 'x/' is a folder marker
        self.files = {k: v for k, v in objects.items() if is_drive_path(k)}
        self.hidden = sorted(set(objects) - set(self.files))
        # every key makes the folders its '/'s delimit, a hidden one too, as long as they are drive paths
        self.folders = {""} | {
            folder for key in below for folder in itertools.accumulate(key.split("/")[:-1], "{}/{}".format)
            if is_drive_path(folder)
        }

    def holds_objects(self, folder: str) -> bool:
        """Whether objects lie below `folder` (hidden ones too), or only folder markers."""
        return any(k.startswith(folder + "/") for k in self.files.keys() | set(self.hidden))

    def list(self, folder: str) -> list[str]:
        return sorted({p for p in self.files.keys() | self.folders if p and parent(p) == folder})

    def objects_count(self) -> int:
        return sum(1 for k in self.objects if k.startswith(self.prefix) and not k.endswith("/"))


def normalized(path: str) -> str | None:
    """The path a request for `path` names (README: repeated '/' and '.' parts collapse), None if refused."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts) if parts and not path.startswith(("/", "\\")) and is_drive_path("/".join(parts)) else None


keys = st.one_of(
    st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map("/".join),
    st.lists(st.sampled_from(PARTS), min_size=1, max_size=2).map(lambda parts: "/".join(parts) + "/"),
)


@st.composite
def buckets(draw, prefix: str) -> dict[str, bytes]:
    """Keys under `prefix` (and some just outside it) with their bytes, 0 to a few KiB."""
    names = draw(st.lists(keys, min_size=1, max_size=10, unique=True))
    full = [prefix + name for name in names]
    if draw(st.booleans()):  # a long key of S3's greatest size, its parts names of at most 255 bytes
        full.append(prefix + "/".join(itertools.repeat("l" * 200, 6))[: MAX_KEY_BYTES - len(prefix)])
    full += draw(st.lists(st.sampled_from([prefix[:-1], prefix[:-1] + "a", prefix[:-1] + "a/a", prefix + "/"]),
                          unique=True, max_size=2))
    sizes = draw(st.lists(st.sampled_from([0, 1, 100, 4096]), min_size=len(full), max_size=len(full)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    return {key: rng.randbytes(size) for key, size in zip(full, sizes, strict=True)}


def paged(stub: drive_pb2_grpc.DriveServiceStub, drive: Drive, folder: str, recursive: bool, size: int) -> list[str]:
    """The paths a List of `folder` answers in pages of `size` entries, page after page."""
    request = drive_pb2.ListRequest(drive=str(drive), path=folder, recursive=recursive, page_size=size)
    paths: list[str] = []
    while True:
        reply = stub.List(request, timeout=10)
        assert len(reply.entries) <= size
        paths += [e.path for e in reply.entries]
        if not reply.next_page_token:
            return paths
        request.page_token = reply.next_page_token


def check_lists(drive: Drive, model: Model, stub: drive_pb2_grpc.DriveServiceStub) -> None:
    """Every folder's list, whole and in pages of one and two entries (stat and a read of it too), and every file."""
    for folder in sorted(model.folders):
        assert drive.list(folder or ".") == model.list(folder), folder
        assert paged(stub, drive, folder, False, 1) == paged(stub, drive, folder, False, 2) == model.list(folder)
        if folder and folder not in model.files:  # a file and a folder of one name stat as the file
            assert drive.stat(folder).folder
            with pytest.raises(ValueError if model.holds_objects(folder) else FileNotFoundError):
                b"".join(drive.read_range(folder))
    entries = list(drive.entries(".", recursive=True))
    assert [(e.path, e.size) for e in entries] == sorted((p, len(b)) for p, b in model.files.items())
    assert paged(stub, drive, "", True, 2) == sorted(model.files)


def check(drive: Drive, model: Model) -> None:
    """Everything the drive shows is what the model says: lists, entries, stats and bytes; hidden keys are not."""
    with grpc.insecure_channel(drive.connection.endpoint) as channel:
        check_lists(drive, model, drive_pb2_grpc.DriveServiceStub(channel))
    for path, data in model.files.items():
        stat = drive.stat(path)
        assert (stat.path, stat.size, stat.etag) == (path, len(data), hashlib.md5(data).hexdigest())
        assert not stat.folder
        assert b"".join(drive.read_range(path)) == data
        assert b"".join(drive.read_range(path, len(data) // 2, 7)) == data[len(data) // 2:][:7]
    for key in model.hidden:
        names = normalized(key)
        if names is None:
            with pytest.raises(ValueError):
                drive.stat(key)
        elif names in model.files:
            assert drive.stat(key).path == names
        elif names in model.folders:
            assert drive.stat(key).folder
        else:
            with pytest.raises(FileNotFoundError):
                drive.stat(key)


def bucket_now(client, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix[:-1])
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


counter = itertools.count()


@given(data=st.data())
def test_a_mounted_drive_shows_the_bucket_as_readme_says(s3, tmp_path, data):
    client, endpoint = s3
    prefix = f"m{next(counter)}/"
    objects = data.draw(buckets(prefix))
    for key, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    drive = Drive(f"s3://{BUCKET}/{prefix}", endpoint=endpoint, root_folder=tmp_path)
    model = Model(objects, prefix)
    assert drive.mount().objects == model.objects_count()
    check(drive, model)

    before = bucket_now(client, prefix)
    (tmp_path / "x").write_bytes(b"x")
    with pytest.raises(PermissionError):
        drive.put("x")
    for path in [*sorted(model.files)[:1], "x"]:
        with pytest.raises(PermissionError):
            drive.delete(path)
    assert bucket_now(client, prefix) == before  # refused, and nothing changed

    # The bucket changes after the mount: the index answers as of the mount, and reads of changed objects are stale.
    shown = sorted(model.files)
    replaced, removed = shown[:1], shown[1:2]
    for path in replaced:
        client.put_object(Bucket=BUCKET, Key=prefix + path, Body=model.files[path] + b"+")
    for path in removed:
        client.delete_object(Bucket=BUCKET, Key=prefix + path)
    added = "added/new"
    client.put_object(Bucket=BUCKET, Key=prefix + added, Body=b"new")
    for path in replaced + removed:
        assert drive.stat(path).size == len(model.files[path])
        with pytest.raises(StaleIndexError):
            b"".join(drive.read_range(path))
        with pytest.raises(StaleIndexError):
            drive.get(path, to=tmp_path / "got")
        assert not (tmp_path / "got").exists()
    with pytest.raises(FileNotFoundError):
        drive.stat(added)
    with pytest.raises(FileNotFoundError):  # at once: a get of an s3:// drive does not wait for new objects
        drive.get(added, timeout=60)
    assert "added" not in drive.list(".") or "added" in model.folders

    changed = {k: v for k, v in objects.items() if k[len(prefix):] not in removed}
    changed |= {prefix + path: model.files[path] + b"+" for path in replaced} | {prefix + added: b"new"}
    model = Model(changed, prefix)
    assert drive.mount().objects == model.objects_count()
    check(drive, model)


def test_keys_no_request_can_name_are_hidden_from_lists_and_a_folder_get_stops_at_them(s3, tmp_path):
    """Keys with an empty, '.' or '..' part, a control character or a name over 255 bytes were listed (a folder
    '.' at the root, 'h/.' in 'h', 'e//f' among the entries) though no stat or get could name them. They are hidden
    now; the folders before them stay, and a folder get still stops at them by name rather than leave them out."""
    client, endpoint = s3
    hidden = ["./g", "/top", "e//f", "h/./i", "j/../k", "ctl\x01x", "n" * 256, "\\win"]
    for key in [*hidden, "ok"]:
        client.put_object(Bucket=BUCKET, Key="hidden/" + key, Body=key.encode())
    drive = Drive(f"s3://{BUCKET}/hidden/", endpoint=endpoint, root_folder=tmp_path)
    assert drive.mount().objects == len(hidden) + 1  # every object is counted
    assert drive.list(".") == ["e", "h", "j", "ok"]
    assert drive.list("e") == drive.list("h") == drive.list("j") == []
    assert [e.path for e in drive.entries(".", recursive=True)] == ["ok"]
    with pytest.raises(ValueError, match=r"'h/\./i'"):
        drive.get("h")
    assert not list(tmp_path.iterdir())
    assert b"".join(drive.read_range("ok")) == b"ok"



def test_a_read_of_a_folder_that_holds_no_file_is_not_found(s3, tmp_path):
    """A folder made by markers alone (`q/`, `z/sub/`) holds no file: a ranged read of it raised DataLoss saying the
    daemon was too old to send a CRC32C, as the daemon answered with an empty stream; both reads now say it is an
    empty folder (NotFound), and a folder with files is still refused as one (InvalidArgument)."""
    client, endpoint = s3
    for key in ("empty/q/", "empty/z/sub/", "empty/c/d"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"")
    drive = Drive(f"s3://{BUCKET}/empty/", endpoint=endpoint, root_folder=tmp_path)
    assert drive.stat("q").folder and drive.stat("z").folder
    for folder in ("q", "z"):
        with pytest.raises(FileNotFoundError, match="empty folder"):
            b"".join(drive.read_range(folder))
        with pytest.raises(FileNotFoundError, match="empty folder"):
            drive.get(folder)
    with pytest.raises(ValueError, match="is a folder"):
        b"".join(drive.read_range("c"))
    assert not list(tmp_path.iterdir())
