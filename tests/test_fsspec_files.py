"""`lit://` files against local files, property-based (hypothesis): a sequence of reads (`read`, `readinto`,
`readline`, `readlines`, iteration), seeks and tells on a file of a drive, binary or text, gives at every step what
the same sequence gives on a local file opened with `open()` holding the same bytes (the same result, or an
exception of the same type), and a sequence of writes in any write mode, binary or text, stores what the local file
ends up holding. Both faces: `DriveFile` (blocking) and the asyncio face's `open_async` file.

Files are a few blocks of a small `block_size`, so that block and cache edges are reached with small reads. Where
the drive's file differs from a local one on purpose, README's fsspec section says so, and the property checks the
documented behaviour instead (each such case names the README sentence). Example counts are small (CI runs them on
every commit); `HYPOTHESIS_PROFILE=thorough` runs more.
"""

from __future__ import annotations

import inspect
import io
import os
import pathlib
import pickle
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import loop_thread
from hypothesis import example, given
from hypothesis import strategies as st
from test_fsspec import get_requests

from drive_client.fsspec import AsyncDriveFileSystem, DriveFileSystem

pytestmark = pytest.mark.timeout(120)

BLOCK = 16  # the files' block_size: a few blocks make every block and cache edge reachable
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]
LENGTHS = [-1, 0, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 4 * BLOCK + 3, 100 * BLOCK]
OFFSETS = [-100 * BLOCK, -BLOCK - 1, -1, 0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 5 * BLOCK]
CACHES = ["readahead", "none", "blockcache", "bytes", "all"]


@pytest.fixture(scope="module")
def fs(daemon) -> DriveFileSystem:
    return DriveFileSystem(endpoint=daemon.endpoint, component_name="files", skip_instance_cache=True)


@pytest.fixture(scope="module")
def afs(daemon) -> AsyncDriveFileSystem:
    return AsyncDriveFileSystem(endpoint=daemon.endpoint, component_name="files", asynchronous=True,
                                skip_instance_cache=True)


@pytest.fixture(scope="module")
def name() -> str:
    """The module's drive; each example uses paths of its own in it."""
    return f"t_fsspec_files_{uuid.uuid4().hex[:8]}"


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """What `call(*args, **kwargs)` gives: ("ok", its result) or ("raised", the exception)."""
    try:
        return "ok", call(*args, **kwargs)
    except Exception as err:
        return "raised", err


def assert_same(step: Any, local: tuple[str, Any], lit: tuple[str, Any]) -> None:
    """The drive's file gave what the local file gave: the same result, or an exception the local file's type
    catches (the client's own errors subclass the built-in ones)."""
    if local[0] == "raised":
        assert lit[0] == "raised" and isinstance(lit[1], type(local[1])), f"{step}: local {local}, lit:// {lit}"
    else:
        assert lit == local, f"{step}: local {local}, lit:// {lit}"


async def awaited(call: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """`outcome` of a call that may give a coroutine (the async file's `read`, `close`): awaited."""
    try:
        result = call(*args)
        return "ok", await result if inspect.isawaitable(result) else result
    except Exception as err:
        return "raised", err


def file_bytes(size: int) -> st.SearchStrategy[bytes]:
    """`size` bytes with line ends in them (lines of every length, empty ones too)."""
    return st.lists(st.sampled_from(b"ab\n"), min_size=size, max_size=size).map(bytes)


# --- reading --------------------------------------------------------------------------------------

read_steps = st.one_of(
    st.tuples(st.sampled_from(["read", "readinto", "readinto1", "readline", "readlines"]), st.sampled_from(LENGTHS)),
    st.tuples(st.just("seek"), st.sampled_from(OFFSETS), st.sampled_from([0, 1, 2])),
    st.tuples(st.sampled_from(["tell", "next", "close", "pickle"])),
)


def read_step(f: Any, step: tuple[Any, ...]) -> Any:
    """Runs one step on a file open for reading; what it gives is compared."""
    kind, *args = step
    if kind in ("readinto", "readinto1"):
        buffer = bytearray(max(args[0], 0))
        return getattr(f, kind)(buffer), bytes(buffer)
    if kind == "next":
        return next(f)
    if kind == "reseek":  # back to where a text file's tell() says it is
        return f.seek(f.tell())
    return getattr(f, kind)(*args)


def seeks_before_start(f: io.BufferedReader, offset: int, whence: int) -> bool:
    return [0, f.tell(), os.fstat(f.fileno()).st_size][whence] + offset < 0


@given(data=st.sampled_from(SIZES).flatmap(file_bytes), cache_type=st.sampled_from(CACHES),
       steps=st.lists(read_steps, max_size=12))
# io's `size` and `hint` (a TypeError), `[b""]` from readlines at the end, a closed file's position (found here)
@example(data=b"ab\nb\n\na", cache_type="readahead", steps=[("readline", 2), ("readline", 2), ("readlines", 2)])
@example(data=b"", cache_type="readahead", steps=[("readlines", -1)])
@example(data=b"a", cache_type="readahead", steps=[("close",), ("tell",), ("seek", 0, 0)])
def test_reads_seeks_and_tells_give_what_a_local_file_gives(fs, name, tmp_path, data, cache_type, steps):
    path = f"{name}/{uuid.uuid4().hex}.bin"
    fs.pipe_file(path, data)
    local_path = tmp_path / "local.bin"
    local_path.write_bytes(data)
    with open(local_path, "rb") as local, fs.open(path, "rb", block_size=BLOCK, cache_type=cache_type) as lit:
        for step in steps:
            if step[0] == "seek" and not local.closed and seeks_before_start(local, *step[1:]):
                # README: "A seek before the start of a file raises ValueError (fsspec's), where a local file
                # raises OSError"; the position stays where it was.
                with pytest.raises(ValueError, match="before start"):
                    lit.seek(*step[1:])
                with pytest.raises(OSError):
                    local.seek(*step[1:])
                assert lit.tell() == local.tell()
                continue
            if step[0] == "pickle":
                # README: "A read-mode file pickles (it reopens where it was)"; a local file does not pickle. A closed
                # one is left out: fsspec's pickle of it reopens it, open.
                if not lit.closed:
                    lit = pickle.loads(pickle.dumps(lit))
                continue
            assert_same(step, outcome(read_step, local, step), outcome(read_step, lit, step))
        assert_same("close twice", outcome(local.close), outcome(lit.close))
        assert_same("read after close", outcome(local.read), outcome(lit.read))


async_read_steps = st.one_of(
    st.tuples(st.just("read"), st.sampled_from(LENGTHS)),
    st.tuples(st.just("seek"), st.sampled_from(OFFSETS), st.sampled_from([0, 1, 2])),
    st.tuples(st.sampled_from(["tell", "close"])),
)


@given(data=st.sampled_from(SIZES).flatmap(file_bytes), steps=st.lists(async_read_steps, max_size=12))
@example(data=b"a", steps=[("close",), ("tell",), ("seek", 0, 0)])  # a closed file's position (found here)
def test_async_reads_seeks_and_tells_give_what_a_local_file_gives(afs, name, tmp_path, data, steps):
    """`open_async`'s file: `read` is a coroutine; fsspec's async files have no `readinto` or `readline`."""
    path = f"{name}/{uuid.uuid4().hex}.bin"
    local_path = tmp_path / "local.bin"
    local_path.write_bytes(data)

    async def run() -> None:
        await afs._pipe_file(path, data)
        lit = await afs.open_async(path, "rb", block_size=BLOCK)
        with open(local_path, "rb") as local:
            for step in steps:
                kind, *args = step
                if kind == "seek" and not local.closed and seeks_before_start(local, *args):
                    # README: "A seek before the start of a file raises ValueError" (see the blocking face's test)
                    with pytest.raises(ValueError, match="before start"):
                        lit.seek(*args)
                    continue
                assert_same(step, outcome(getattr(local, kind), *args), await awaited(getattr(lit, kind), *args))
            assert_same("read after close", outcome(local.read), await awaited(lit.read))
        await lit.close()

    loop_thread().run(run())


text_read_steps = st.one_of(
    st.tuples(st.sampled_from(["read", "readline", "readlines"]), st.sampled_from(LENGTHS)),
    st.tuples(st.just("seek"), st.just(0), st.sampled_from([0, 2])),  # a text file seeks to its ends or a tell()
    st.tuples(st.sampled_from(["tell", "reseek", "next", "close"])),
)


@given(text=st.text(st.sampled_from("ab é\n\r"), max_size=4 * BLOCK),
       encoding=st.sampled_from(["utf-8", "latin-1", "utf-16-le"]), newline=st.sampled_from([None, "", "\n", "\r\n"]),
       steps=st.lists(text_read_steps, max_size=12))
def test_text_reads_give_what_a_local_file_gives(fs, name, tmp_path, text, encoding, newline, steps):
    """Python's text layer on a drive's file: it reads in its own chunks and tells by the file's position."""
    path, data = f"{name}/{uuid.uuid4().hex}.txt", text.encode(encoding)
    fs.pipe_file(path, data)
    local_path = tmp_path / "local.txt"
    local_path.write_bytes(data)
    options = {"encoding": encoding, "newline": newline}
    with open(local_path, **options) as local, fs.open(path, "r", block_size=BLOCK, **options) as lit:
        for step in steps:
            assert_same(step, outcome(read_step, local, step), outcome(read_step, lit, step))


# --- writing --------------------------------------------------------------------------------------

BUFFERS: dict[str, Callable[[bytes], Any]] = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}
WRITE_SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]
TEXT = st.text(st.sampled_from("ab é\n\r"), max_size=2 * BLOCK)

# README: "A file open for writing is not seekable" (`seek` raises OSError where a local one moves; text mode's
# `tell` asks it): seeks of files being written are left out, and so is `tell` in text mode.
binary_write_steps = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(sorted(BUFFERS)), st.sampled_from(WRITE_SIZES)),
    st.tuples(st.sampled_from(["flush", "tell", "close"])),
)
text_write_steps = st.one_of(
    st.tuples(st.just("write"), TEXT),
    st.tuples(st.sampled_from(["flush", "close"])),
)


def write_step(f: Any, step: tuple[Any, ...], written: int) -> Any:
    """Runs one step on a file open for writing; `written` numbers the writes, so that each writes other bytes."""
    kind, *args = step
    if kind == "write" and len(args) == 2:
        buffer, size = args
        return f.write(BUFFERS[buffer](bytes((written + i) % 251 for i in range(size))))
    return getattr(f, kind)(*args)


def stored(fs: DriveFileSystem, path: str) -> bytes | None:
    return fs.cat_file(path) if fs.exists(path) else None


def run_writes(fs: DriveFileSystem, tmp_path: pathlib.Path, name: str, mode: str, before: bytes | None,
               steps: list[tuple[Any, ...]], **text: Any) -> None:
    """Opens a local file and the drive's in `mode` (a file `before` holds, or none), runs `steps` on both inside
    their `with` blocks, and compares each step's outcome and what each stores."""
    path, local_path = f"{name}/{uuid.uuid4().hex}.bin", tmp_path / f"{uuid.uuid4().hex}.bin"
    if before is not None:
        fs.pipe_file(path, before)
        local_path.write_bytes(before)
    # both closed by the `with` below
    opened = outcome(open, local_path, mode, **text), outcome(fs.open, path, mode, BLOCK, **text)
    if "raised" in (opened[0][0], opened[1][0]):  # "xb" of a file that exists: refused, the file left as it was
        assert_same("open", *opened)
    else:
        with opened[0][1] as local, opened[1][1] as lit:
            for written, step in enumerate(steps):
                assert_same(step, outcome(write_step, local, step, written), outcome(write_step, lit, step, written))
        assert_same("close twice", outcome(local.close), outcome(lit.close))
        late = b"late" if "b" in mode else "late"
        assert_same("write after close", outcome(local.write, late), outcome(lit.write, late))
    local_bytes = local_path.read_bytes() if local_path.exists() else None
    assert stored(fs, path) == local_bytes, f"{mode} {text}: stored {stored(fs, path)!r}, local {local_bytes!r}"


@given(mode=st.sampled_from(["wb", "ab", "xb"]),
       before=st.one_of(st.none(), st.sampled_from(SIZES).flatmap(file_bytes)),
       steps=st.lists(binary_write_steps, max_size=10))
def test_binary_writes_store_what_a_local_file_holds(fs, name, tmp_path, mode, before, steps):
    run_writes(fs, tmp_path, name, mode, before, steps)


@given(mode=st.sampled_from(["wb", "ab", "xb"]),
       before=st.one_of(st.none(), st.sampled_from(SIZES).flatmap(file_bytes)),
       steps=st.lists(binary_write_steps, max_size=10))
def test_async_writes_store_what_a_local_file_holds(afs, fs, name, tmp_path, mode, before, steps):
    """`open_async`'s file: `write`, `flush` and `close` are coroutines."""
    path, local_path = f"{name}/{uuid.uuid4().hex}.bin", tmp_path / f"{uuid.uuid4().hex}.bin"
    if before is not None:
        fs.pipe_file(path, before)
        local_path.write_bytes(before)

    async def run() -> None:
        opened = outcome(open, local_path, mode), await awaited(afs.open_async, path, mode, BLOCK)
        if "raised" in (opened[0][0], opened[1][0]):  # "xb" of a file that exists
            assert_same("open", *opened)
            return
        (_, local), (_, lit) = opened
        async with lit:
            with local:
                for written, step in enumerate(steps):
                    assert_same(step, outcome(write_step, local, step, written),
                                await awaited(write_step, lit, step, written))
        assert_same("write after close", outcome(local.write, b"late"), await awaited(lit.write, b"late"))

    loop_thread().run(run())
    local_bytes = local_path.read_bytes() if local_path.exists() else None
    assert stored(fs, path) == local_bytes, f"{mode}: stored {stored(fs, path)!r}, local {local_bytes!r}"


# README: "a text file written as `utf-16` or `utf-32` gets none, and an append in `utf-8-sig` adds a second one"
# (Python's text layer asks a file being written where it is): encodings with a byte-order mark are left out.
@given(mode=st.sampled_from(["w", "a", "x"]), before=st.one_of(st.none(), TEXT.map(str.encode)),
       encoding=st.sampled_from(["utf-8", "latin-1", "utf-16-le"]), newline=st.sampled_from([None, "", "\n", "\r\n"]),
       steps=st.lists(text_write_steps, max_size=10))
def test_text_writes_store_what_a_local_file_holds(fs, name, tmp_path, mode, before, encoding, newline, steps):
    run_writes(fs, tmp_path, name, mode, before, steps, encoding=encoding, newline=newline)


# --- lines read through the cache -----------------------------------------------------------------


def test_iterating_lines_fetches_the_file_a_block_at_a_time_not_one_a_line(fs, daemon, drive_uri):
    """fsspec's readline reads a block and seeks back after the line; a read of a block goes past the cache
    (README: "A read of at least a block lands straight in the bytes returned"), so each line was a Get of a
    block: 1,900 Gets of 1 KiB for this 18 KiB file (of 5 MiB each at the default block size). Through the
    read-ahead cache, a line that ends before the cache's new block, which drops the old one, costs a second Get."""
    name = drive_uri.removeprefix("lit://")
    data = b"".join(b"line %d\n" % i for i in range(2000))
    fs.pipe_file(f"{name}/lines.txt", data)
    with fs.open(f"{name}/lines.txt", "rb", block_size=1024) as f:
        assert list(f) == data.splitlines(keepends=True)
    assert len(get_requests(daemon, drive_uri)) <= 2 * (len(data) // 1024 + 1)
