"""`lit://`'s own queries and changes (`rm`, `rmdir`, `mkdir`, `mv`, paths spelled with repeated slashes): each
defect the comparison with fsspec's `memory://` and the local filesystem found, pinned by a plain test on both faces
(`DriveFileSystem`, and `AsyncDriveFileSystem` through the blocking methods fsspec gives it). A refused call raises
a clear error and leaves every file as it was."""

from __future__ import annotations

import errno
import uuid

import pytest

from drive_client.fsspec import AsyncDriveFileSystem, DriveFileSystem

pytestmark = pytest.mark.timeout(120)

TREE = {"a": b"0123456789", "ab": b"x", "a.b": b"", "c/d": b"hello", "c/e f/g": b"gg", "c/e f/h": b"hhh"}


@pytest.fixture(params=[DriveFileSystem, AsyncDriveFileSystem])
def fs(request, daemon) -> DriveFileSystem:
    return request.param(endpoint=daemon.endpoint, component_name="ops", skip_instance_cache=True)


@pytest.fixture
def name(fs: DriveFileSystem) -> str:
    """A fresh drive holding `TREE`."""
    drive = f"ops{uuid.uuid4().hex[:10]}"
    for path, data in TREE.items():
        fs.pipe_file(f"{drive}/{path}", data)
    return drive


def files(fs: DriveFileSystem, name: str) -> dict[str, bytes]:
    return {path.removeprefix(f"{name}/"): fs.cat_file(path) for path in fs.find(name)}


def test_rm_of_paths_one_of_which_is_refused_removes_nothing(fs, name):
    """`rm` removed the paths of a list (or glob) before the one it refused: a missing path, a folder without
    `recursive`; fsspec's memory and local filesystems refuse the call before they remove anything."""
    refused = [
        ([f"{name}/a", f"{name}/nope"], {}, FileNotFoundError),
        (f"{name}/a*", {}, IsADirectoryError),  # a, a.b, ab, and the folder ab2
        (f"{name}/nope", {"recursive": True, "maxdepth": 1}, FileNotFoundError),
        ([f"{name}/ab", f"{name}/c/nope"], {"recursive": True}, FileNotFoundError),
    ]
    fs.pipe_file(f"{name}/ab2/x", b"y")
    before = files(fs, name)
    for path, options, error in refused:
        with pytest.raises(error):
            fs.rm(path, **options)
        assert files(fs, name) == before, (path, options)


def test_rm_of_paths_that_overlap_removes_each_once(fs, name):
    """A folder and a file in it (two globs, a list) are removed whole, without failing on the file gone with its
    folder."""
    fs.rm([f"{name}/c", f"{name}/c/d", f"{name}/c/e f/*"], recursive=True)
    assert files(fs, name) == {"a": b"0123456789", "ab": b"x", "a.b": b""}
    fs.rm([f"{name}/**", f"{name}/*"], recursive=True)
    assert files(fs, name) == {}


def test_rmdir_refuses_a_file_and_a_folder_holding_files(fs, name):
    """`rmdir` did nothing, and said nothing, for a file or a folder holding files, where a local filesystem refuses
    them (`NotADirectoryError`, `OSError` ENOTEMPTY); a path holding nothing is an empty folder, already gone."""
    before = files(fs, name)
    with pytest.raises(NotADirectoryError):
        fs.rmdir(f"{name}/a")
    for folder in (f"{name}/c", f"lit://{name}/c/e f/", name):
        with pytest.raises(OSError) as refused:
            fs.rmdir(folder)
        assert refused.value.errno == errno.ENOTEMPTY, folder
    fs.mkdir(f"{name}/new")
    fs.rmdir(f"{name}/new")
    assert files(fs, name) == before


def test_mkdir_refuses_a_path_that_is_or_is_below_a_file(fs, name):
    """`mkdir` and `makedirs` did nothing for a path that is a file or below one, where a local filesystem refuses
    them; `makedirs` of an existing folder without `exist_ok` raises `FileExistsError`, as fsspec documents."""
    before = files(fs, name)
    for make in (fs.mkdir, fs.makedirs, lambda path: fs.makedirs(path, exist_ok=True)):
        with pytest.raises(FileExistsError):
            make(f"{name}/a")
        with pytest.raises(NotADirectoryError):
            make(f"{name}/a/new")
        with pytest.raises(NotADirectoryError):
            make(f"{name}/c/d/new/deeper")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{name}/c/e f")
    fs.makedirs(f"{name}/c/e f", exist_ok=True)
    fs.mkdir(f"{name}/c")  # an object store's folder: made again, as s3fs does
    fs.makedirs(f"{name}/c/new/deeper")
    assert files(fs, name) == before


def test_repeated_slashes_name_the_same_paths_in_every_answer(fs, name):
    """README: repeated slashes are one, after the drive name too; `glob` of `lit://D//a*` matched nothing and
    `expand_path`, `walk` and `du` answered names with `//` in them (fsspec builds those from the path as given)."""
    for spelled in (f"lit://{name}//", f"{name}///"):
        assert fs.glob(f"{spelled}a*") == fs.glob(f"{name}/a*") == [f"{name}/a", f"{name}/a.b", f"{name}/ab"]
        assert fs.expand_path(f"{spelled}c", recursive=True) == fs.expand_path(f"{name}/c", recursive=True)
        assert list(fs.walk(f"{spelled}c")) == list(fs.walk(f"{name}/c"))
        assert fs.du(f"{spelled}c", total=False) == fs.du(f"{name}/c", total=False)


def test_mv_of_a_folder_without_recursive_is_refused(fs, name):
    """`mv` of a folder without `recursive` moved nothing and said nothing on the blocking face (its copy copies no
    folder), where the asyncio face, fsspec's memory filesystem and `rm` refuse a folder without `recursive`."""
    before = files(fs, name)
    for target in (f"{name}/z", f"{name}/ab2/", f"{name}/a"):
        with pytest.raises(IsADirectoryError):
            fs.mv(f"{name}/c", target)
    assert files(fs, name) == before
    fs.mv(f"{name}/c", f"{name}/z", recursive=True)
    assert files(fs, name) == {**{k: v for k, v in before.items() if not k.startswith("c/")},
                               "z/d": b"hello", "z/e f/g": b"gg", "z/e f/h": b"hhh"}
