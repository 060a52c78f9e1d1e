"""fsspec filesystem for `lit://` drives: `fsspec.open("lit://drive_1/a.txt")`, blocking or asyncio.

Registered through the `fsspec.specs` entry point as protocol `lit`, so
fsspec, pandas, dask, pyarrow and anything else that takes a URL plus
`storage_options` reach the daemon without importing this module:

    import fsspec, pandas as pd
    fs = fsspec.filesystem("lit", endpoint="127.0.0.1:50051", component_name="work_a")
    fs.put("t.csv", "drive_1/t.csv"); fs.ls("drive_1"); fs.cat_file("drive_1/t.csv", 0, 100)
    with fsspec.open("lit://drive_1/a.txt", "rb") as f: head = f.read(1 << 20)
    df = pd.read_csv("lit://drive_1/t.csv", storage_options={"endpoint": "127.0.0.1:50051"})

asyncio code passes `asynchronous=True` and gets `AsyncDriveFileSystem`, an
fsspec `AsyncFileSystem` on `AsyncDrive`, whose coroutine methods it awaits:

    fs = fsspec.filesystem("lit", asynchronous=True, endpoint="127.0.0.1:50051")
    await fs._pipe_file("drive_1/a.txt", b"hello"); await fs._ls("drive_1"); await fs._cat_file("drive_1/a.txt")
    f = await fs.open_async("drive_1/a.txt", "rb"); head = await f.read(100); await f.close()

Its blocking methods are fsspec's mirror of the coroutines, run on fsspec's IO thread, for one made with
`asynchronous=False`; `open` (and `touch`, which opens) gives the blocking face's `DriveFile` there, and is
refused with `asynchronous=True`, as fsspec refuses the others.

`DriveFileSystem` (blocking, on `Drive`) and `AsyncDriveFileSystem` are two
thin faces of one implementation: each operation is written once, as a
generator of `Drive` calls (bench/WHY.md says why the blocking one is not
fsspec's mirror of the async one: it must keep working in forked workers).

URLs are `lit://DRIVE/path/in/drive`: the netloc is the drive name, and
fsspec paths (what `ls`, `find` and `info` answer in `name`) are
`DRIVE/path/in/drive` (repeated slashes are one, after DRIVE too: a URL
joined as `lit://DRIVE/` + `/x` names DRIVE's `x`). Options (all optional):

- `endpoint`: `HOST:PORT` of drived; default `$DRIVE_ENDPOINT`, else
  `127.0.0.1:50051` (read on each call, so a changed environment is honoured).
- `component_name`: the component files are written, replaced and deleted
  as; default `$DRIVE_COMPONENT`, else `"default"`. Reads and listings span
  all components, like `Drive.get` and `Drive.list`.
- `allow_duplicates`: let writes store a path another component holds.
- `token`: bearer token sent with every call; default `$DRIVE_TOKEN`.
- `tls`, `tls_ca`, `tls_cert`, `tls_key`: TLS to the daemon, as `Drive`
  takes them (defaults `$DRIVE_TLS`, `$DRIVE_TLS_CA`, `$DRIVE_TLS_CERT`,
  `$DRIVE_TLS_KEY`); `insecure=True` lets a token go in plaintext to another
  machine (see README, Security).
- `verify`: `"crc32c"` (the default: every read and write is checked with
  CRC32C, each ranged read on its own) or `"sha256"` (whole-file reads also
  check the stored sha256, and writes send theirs), as `Drive(verify=...)`.
- `retry_seconds`: how long a read, a write, a listing or a removal keeps trying through a
  network cut or a daemon restart (`Drive`'s argument: default
  `$DRIVE_RETRY_SECONDS`, else 60; 0: off).
- `asynchronous`: `True` for `AsyncDriveFileSystem` (see above).
- `block_size`, `cache_type`, `cache_options`: the defaults of `open`'s
  arguments of those names, as fsspec's HTTP filesystem takes them (so they
  reach the files that `fsspec.open(url, block_size=...)`, pandas' and
  pyarrow's `storage_options` open). `block_size` (bytes, default 5 MiB) is
  what a read fetches ahead and what small writes gather in memory;
  `cache_type` (default `"readahead"`) names one of fsspec's read caches, e.g.
  `"none"` to fetch exactly what each read asks for (Parquet readers that
  jump between column chunks), `"all"` or `"blockcache"`. `AsyncDriveFile`
  has no read cache (fsspec's async files read what they are asked).
- `spool_dir`: where files being written are spooled; default the system's
  temporary folder.

Only `lit://` (managed) drives live here. `s3://` is fsspec's S3 protocol
(s3fs), a different filesystem that talks to the bucket itself; the
daemon's read-only `s3://` drives are reached with `drive_client.Drive`.

Semantics:

- Reading streams: `open(mode="rb")` gives a buffered file whose blocks
  (`block_size`, default 5 MiB) are fetched with ranged `Get` calls, never
  the whole file. Every range carries the sha256 and owner from `info`, so a
  file replaced while it is being read fails with `StaleIndexError` instead
  of mixing two versions, and its bytes are checked against the daemon's
  CRC32C of them (`DataLoss` otherwise). A read of a block or more, with the
  read-ahead cache or none, goes past the cache: its bytes are fetched once,
  straight into the bytes it returns, or into the caller's buffer for
  `readinto` (how `torch.load` reads), so loading a 200 MiB tensor holds no
  second copy of it. Lines (`readline`, iteration) are read through the
  cache, which fetches a block at a time. `cat_file` reads with the same pinning and
  checks (and, with `verify="sha256"`, the sha256 of whole-file reads);
  `get_file` uses the client's verified, atomic whole-file download.
- Writing spools: `open(mode="wb")` gathers small writes in memory, at most
  one block, and sends the rest to a local temporary file; a write that does
  not fit in the block goes to the file straight from the caller's buffer
  (`torch.save` of a 200 MiB tensor holds no copy of it). `close()` puts the
  whole file (a single atomic put on the server; readers never see a partial
  file). A file closed while an exception unwinds puts nothing, and the
  file's previous version stays; fsspec's files put what was written when
  closed, whatever happened. The file's own `with` (`async with`) goes by
  the exception that ends its block, `GeneratorExit` too: a generator
  closed inside the block puts nothing. Other closes are not told why they
  run (the end of `fsspec.open(...)`'s `OpenFile` or of a text wrapper, a
  `finally:` that closes the file: pandas, a `torch.save` caller's), so
  they go by the exception being handled: a file closed, other than by its
  own `with`, while an exception is being handled that was not being
  handled when it was opened, stores nothing. The same exception raised
  again counts as another (it gets a new traceback), except when a bare
  `raise` re-raises it in the function whose `except:` handles it: its
  traceback stays as it was, so a file opened in that block and closed as
  the `raise` unwinds is put. A file opened inside an `except:` block and
  closed there normally is put, and one opened before it and closed inside it
  (`f.close()` in the handler, or an `ExitStack` closing an `OpenFile`
  after a later context suppressed the exception) stores nothing.
  A file never closed stores nothing: one collected unclosed, or still open
  as the interpreter finalizes, removes its spool (warning with a
  `ResourceWarning`, as Python's files do), where fsspec's would put it.
  One closed by an exit hook before that (`atexit`, `logging.shutdown`
  closing a handler's file) is put. A writer never finalized (held by a
  daemon thread still running at exit, or in a process killed or ended by
  `os._exit`) stores nothing and leaves its spool in `spool_dir`.
  Inside `fs.transaction` files are put when the transaction ends; one still
  open then is closed and put whole (`torch.save(sd, fs.open(p, "wb"))`), and
  one still open when it is abandoned stores nothing and takes no more writes.
  Opening (and `pipe_file`, `put_file`, `cp_file`) refuses up front a path
  that is a folder (`IsADirectoryError`), and for `"xb"` a path that exists
  (`FileExistsError`); a path below a file fails when put, with
  `NotADirectoryError`. `"xb"` checks again at close, before the put, and
  stores nothing if a file was put meanwhile; the daemon has no put that
  refuses an existing file, so that check and the put are two calls, and a
  file put between them is replaced. Ownership is the daemon's to decide when the file is
  put: a path another component holds fails then with `FileExistsError`
  (unless `allow_duplicates`), and the spool is removed.
- Appending reads, modifies and writes the whole file: `open(mode="ab")`
  fetches the file as it is (this component's copy, or the one `info`
  resolves to) into the spool, writes go after it, and `close()` puts the
  whole file as this component's, like `"wb"` (so a path another component
  holds fails with `FileExistsError`, unless `allow_duplicates`). Each append
  costs a download and an upload of the whole file: right for a log of a few
  MiB (Lightning's `CSVLogger` appends at every flush), not for growing a big
  file. Before the put, `close()` checks that the file is still the version
  fetched (its generation), else it fails with `StaleIndexError` and stores
  nothing: open it and append again. The daemon has no conditional put, so
  that check and the put are two calls: a put by another writer *of the same
  component* landing between them is replaced, and its data lost. Appending
  to one file from several writers at once is not safe; give each its own.
- Copies go through this client (the daemon has no server-side copy): a file
  is fetched and put again. `mv` moves file by file, as fsspec's `copy` maps
  them: each file is removed once its copy is put, so nothing is removed that
  was not copied. As `rm`, it removes only this component's files: another
  component's in a folder, glob or list moved is copied and left, and one
  moved by its own path raises `FileNotFoundError`, nothing copied. A path moved onto itself,
  however spelled, is left as it is; a folder moved into itself is refused
  (`ValueError`). A file replaced between its copy and its removal is removed.
- Folders are implicit (a path with files beneath it): `mkdir`/`makedirs`
  make nothing (they refuse a file at or above the path) and a folder
  disappears with its last file; `rmdir` removes nothing (it refuses a file
  and a folder holding files). A drive root always
  exists (an unused drive is empty); `ls` of a missing path below it raises
  `FileNotFoundError`.
- `rm` removes only this component's files (`Drive.delete`); removing a path
  that only other components hold raises `FileNotFoundError`. Folders need
  `recursive=True` and lose only this component's files. Every path given
  (a list, a glob's matches) is checked first: one refused removes nothing.
- When several components hold one file path (`allow_duplicates`), `info`
  and reads pick this component's copy if it has one; otherwise they raise
  `AmbiguousPathError`.
- Errors are the client's: `FileNotFoundError`, `FileExistsError`,
  `PermissionError`, `ValueError`, `ConnectionError`, ... (see README).
  `exists`, `isdir` and `isfile` are False only for a missing path, and
  raise the others (a refused token, the daemon unreachable), where fsspec's
  answer False.

Caching: nothing read from the daemon is cached across calls. A drive is
shared by workers that put and delete concurrently, so `ls`, `info`, `find`
and `exists` always ask the daemon (fsspec's `dircache` is never filled, and
`use_listings_cache` has nothing to turn off). fsspec's *instance* cache is
kept (it is per process and thread): it holds only options and gRPC channels,
so reusing an instance saves reconnecting and never serves stale data; pass
`skip_instance_cache=True` for a private instance. Within one open file the
read cache (read-ahead: at most about two blocks) holds only that one version of the file.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import io
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import AsyncIterable, Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fsspec.asyn import AbstractAsyncStreamedFile, AsyncFileSystem, sync, sync_wrapper
from fsspec.caching import caches
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.utils import isfilelike

from .aio import AsyncDrive, in_thread
from .channels import DEFAULT_ENDPOINT
from .common import DriveBase, FileStat, check_verify
from .drive import Drive
from .effects import Done, advance
from .errors import (
    PARENT_IS_FILE,
    AlreadyExists,
    AmbiguousPathError,
    DataLoss,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    StaleIndexError,
)
from .files import write_all
from .pyarrow_exit import wait_for_pyarrow_threads
from .uri import check_component, drive_path, parse_drive

__all__ = ["AsyncDriveFile", "AsyncDriveFileSystem", "DriveFile", "DriveFileSystem"]

T = TypeVar("T")

# pyarrow reads this filesystem in its own threads, which must let go of its files before the interpreter begins to
# finalize (see pyarrow_exit); atexit hooks run before that.
atexit.register(wait_for_pyarrow_threads)

# An operation of the filesystem, written once for both faces. It yields what it asks for and is
# sent the answer: a call of a Drive method (its result, or the coroutine AsyncDrive gives for
# it: awaited), `Each` (every item of an iteration, handed to a function) or `Local` (blocking
# work on local files). Errors come back as they are raised, at the `yield`.
Steps = Generator[Any, Any, T]


@dataclass(frozen=True)
class Each:
    """Hands every item of `items` (an iterator of a Drive, or async iterator of an AsyncDrive) to `each`."""

    items: Iterable[Any] | AsyncIterable[Any]
    each: Callable[[Any], Any]


@dataclass(frozen=True)
class Local:
    """Runs `work(*args)`, which may block on local files: inline, or in a worker thread for asyncio."""

    work: Callable[..., Any]
    args: tuple[Any, ...] = ()


def _slice(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """Python-slice bounds (None, negative = from the end) clamped to [0, size]."""

    def bound(value: int | None, default: int) -> int:
        if value is None:
            return default
        if value < 0:
            value += size
        return min(max(value, 0), size)

    return bound(start, 0), bound(end, size)


def _folder(name: str) -> dict[str, Any]:
    """The description of a folder (or drive root) that no entry describes."""
    return {"name": name, "size": 0, "type": "directory", "component": ""}


def _is_glob(path: str) -> bool:
    """Whether fsspec expands `path` as a glob pattern."""
    return any(c in path for c in "*?[")


def _join(name: str, sub: str) -> str:
    return f"{name}/{sub}" if sub else name


def _describe(name: str, stat: FileStat) -> dict[str, Any]:
    """fsspec's description of an entry of drive `name`."""
    out: dict[str, Any] = {
        "name": _join(name, stat.path),
        "size": 0 if stat.folder else stat.size,
        "type": "directory" if stat.folder else "file",
        "component": stat.component,
    }
    if not stat.folder:
        out.update(modified=stat.modified, generation=stat.generation)
        out.update((key, value) for key, value in (("sha256", stat.sha256), ("etag", stat.etag)) if value)
    return out


def _short_read(info: dict[str, Any], start: int, end: int, got: int) -> DataLoss:
    return DataLoss(
        f"lit://{info['name']}: got {got} bytes of range [{start}, {end}); try again", grpc.StatusCode.DATA_LOSS
    )


def _version(info: dict[str, Any]) -> tuple[str, int]:
    """What tells one commit of a file from any other: its owner and generation (an append is put only onto the
    version it fetched)."""
    return info["component"], info["generation"]


_NO_FILE = ("", 0)  # the version of a path with no file: every stored file has an owner and a generation


# The read caches a read of a block or more passes by: they keep nothing of it that a later read could use,
# beyond a block. Other caches (chosen with `cache_type`) serve every read.
_CACHES_PASSED = frozenset({"readahead", "none"})


class _LitFileSystem:
    """What both faces share: options, paths, and every operation as steps (see `Steps`)."""

    protocol = "lit"
    root_marker = ""
    _twin: type[Drive] | type[AsyncDrive]

    def __init__(
        self,
        endpoint: str | None = None,
        component_name: str | None = None,
        allow_duplicates: bool = False,
        token: str | None = None,
        spool_dir: str | None = None,
        verify: str = "crc32c",
        tls: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        insecure: bool | None = None,
        retry_seconds: float | None = None,
        block_size: int | None = None,
        cache_type: str = "readahead",
        cache_options: dict[str, Any] | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(**storage_options)
        self.verify = check_verify(verify)
        self._endpoint = endpoint
        self._component = check_component(component_name) if component_name else None
        self.allow_duplicates = allow_duplicates
        self._token = token
        self.retry_seconds = retry_seconds
        self._security: dict[str, Any] = {
            "tls": tls, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key, "insecure": insecure,
        }
        # Each call's Drive checks these settings when it is made; checked now too, so that the filesystem is
        # refused when it is made, as a Drive is (a token in plaintext to another machine, half a client
        # certificate), not at its first call.
        DriveBase("lit://_", endpoint=self.endpoint, token=token, verify=verify, retry_seconds=retry_seconds,
                  **self._security)
        self.spool_dir = spool_dir  # where writes spool; None: the system temp dir
        if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
            raise InvalidArgument(f"block_size must be a positive number of bytes, got {block_size!r}")
        if cache_type not in caches:
            raise InvalidArgument(
                f"cache_type {cache_type!r} is not one of fsspec's read caches: {', '.join(sorted(map(str, caches)))}"
            )
        self.block_size = block_size or AbstractBufferedFile.DEFAULT_BLOCK_SIZE
        self.cache_type = cache_type
        self.cache_options = cache_options
        self._drives: dict[tuple[str, str, str], Drive | AsyncDrive] = {}
        self._drives_lock = threading.Lock()

    # -- paths and drives -----------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint or os.environ.get("DRIVE_ENDPOINT") or DEFAULT_ENDPOINT

    @property
    def component_name(self) -> str:
        return self._component or check_component(os.environ.get("DRIVE_COMPONENT"))

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        if path.startswith("lit://"):
            path = path[len("lit://"):]
        elif path.startswith("lit::"):
            path = path[len("lit::"):]
        elif "/" not in path.partition("://")[0] and "://" in path:
            scheme = path.partition("://")[0]
            raise InvalidArgument(
                f"{path!r}: this filesystem serves lit:// drives only; {scheme}:// is another fsspec protocol"
                + (" (s3fs; read the daemon's s3:// drives with drive_client.Drive)" if scheme == "s3" else "")
            )
        # Repeated slashes are one (`lit://d//x` is d's x), also in the names fsspec builds from the path as given
        # (`glob`, `expand_path`, `walk`).
        return re.sub("/{2,}", "/", path).strip("/")

    def _split(self, path: str) -> tuple[str, str]:
        """(drive name, normalized path in the drive); the path is "" for the drive root."""
        name, _, rest = self._strip_protocol(path).partition("/")
        if not name:
            raise InvalidArgument("a lit:// path names a drive first: 'lit://drive_1/path/in/drive'")
        # The path as the daemon names it (NFC), which the steps compare its answers with.
        return name, drive_path(parse_drive(f"lit://{name}"), rest, allow_root=True)

    def _drive(self, name: str) -> Any:
        """The Drive (or AsyncDrive) for drive `name`, made once per endpoint and component."""
        endpoint, component = self.endpoint, self.component_name
        key = (name, endpoint, component)
        with self._drives_lock:
            drive = self._drives.get(key)
            if drive is None:
                drive = self._twin(
                    f"lit://{name}", allow_duplicates=self.allow_duplicates, component_name=component,
                    endpoint=endpoint, token=self._token, verify=self.verify, retry_seconds=self.retry_seconds,
                    **self._security,
                )
                self._drives[key] = drive
        return drive

    def _expand(self, path: str) -> Any:
        """The paths a glob matches (fsspec's expansion, as this face runs it)."""
        raise NotImplementedError

    def _blocking(self, steps: Steps[T]) -> T:
        """Runs `steps` to their end for blocking code: opening a `DriveFile`, and its reads and put."""
        raise NotImplementedError

    # -- descriptions ---------------------------------------------------------

    def _steps_stat(self, name: str, sub: str) -> Steps[FileStat]:
        """`stat`; a path several components hold resolves to this component's copy, if any."""
        drive = self._drive(name)
        try:
            return (yield drive.stat(sub))
        except AmbiguousPathError as err:
            try:
                return (yield drive.stat(sub, component_name=self.component_name))
            except NotFound:
                raise err from None

    def _steps_info(self, path: str) -> Steps[dict[str, Any]]:
        name, sub = self._split(path)
        if not sub:
            return _folder(name)
        return _describe(name, (yield from self._steps_stat(name, sub)))

    def _steps_type(self, path: str) -> Steps[str | None]:
        """What is at `path`: "file", "directory", or None for nothing. Only a missing path is None, and the other
        errors are raised: fsspec's `exists`, `isdir` and `isfile` answer False for any error, so a file there read
        as missing to a refused token or while the daemon could not be reached."""
        try:
            info = yield from self._steps_info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info["type"]

    def _steps_ls(self, path: str, detail: bool) -> Steps[list[Any]]:
        name, sub = self._split(path)
        entries: list[dict[str, Any]] = []
        yield Each(self._drive(name).entries(sub), lambda entry: entries.append(_describe(name, entry)))
        if not entries and sub:
            raise NotFound(f"lit://{name}/{sub} does not exist")
        return entries if detail else [e["name"] for e in entries]

    def _steps_find(self, path: str, withdirs: bool, detail: bool) -> Steps[Any]:
        """Every file under `path` from one recursive listing (and the folders above them, `withdirs`)."""
        name, sub = self._split(path)
        top = _join(name, sub)
        # A drive root is a folder even when it holds no file, and fsspec's find answers the folder searched
        out: dict[str, dict[str, Any]] = {} if sub or not withdirs else {top: _folder(top)}

        def add(entry: FileStat) -> None:
            info = _describe(name, entry)
            out[info["name"]] = info
            if withdirs and entry.path != sub:
                parent = info["name"].rpartition("/")[0]
                while len(parent) >= len(top) and parent not in out:
                    out[parent] = _folder(parent)
                    parent = parent.rpartition("/")[0]

        yield Each(self._drive(name).entries(sub, recursive=True), add)
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    # -- reading --------------------------------------------------------------

    def _steps_file_info(self, path: str) -> Steps[dict[str, Any]]:
        info = yield from self._steps_info(path)
        if info["type"] != "file":
            raise IsADirectory(f"lit://{info['name']} is a folder, not a file")
        return info

    def _chunks(self, info: dict[str, Any], start: int, length: int | None) -> Any:
        """Bytes [start, start+length) of the file `info` describes, pinned to its owner and sha256."""
        name, sub = self._split(info["name"])
        return self._drive(name).read_range(
            sub, start, length, component_name=info.get("component") or None, if_match=info.get("sha256", ""),
        )

    def _steps_read_into(self, info: dict[str, Any], start: int, out: memoryview) -> Steps[None]:
        """Fills `out` with the bytes of the file `info` describes from `start` on, pinned to that version."""
        end = start + len(out)
        filled = 0

        def place(chunk: bytes) -> None:
            nonlocal filled
            if filled + len(chunk) > len(out):
                raise _short_read(info, start, end, filled + len(chunk))
            out[filled:filled + len(chunk)] = chunk
            filled += len(chunk)

        yield Each(self._chunks(info, start, len(out)), place)
        if filled != len(out):
            raise _short_read(info, start, end, filled)

    def _steps_read(self, info: dict[str, Any], start: int, end: int) -> Steps[bytes]:
        """Bytes [start, end) of the file `info` describes, assembled once; with `verify="sha256"`, a whole
        file's are checked by sha256 too."""
        if start >= end:
            return b""
        # A BytesIO made on a bytes object nothing else holds is filled in place through its buffer, and
        # hands that same object out once full: the bytes returned are the only copy made.
        assembly = io.BytesIO(bytes(end - start))
        with assembly.getbuffer() as view:
            yield from self._steps_read_into(info, start, view)
        data = assembly.getvalue()
        whole = start == 0 and end == info["size"]
        if self.verify == "sha256" and whole and info.get("sha256") and (
            hashlib.sha256(data).hexdigest() != info["sha256"]
        ):
            raise DataLoss(
                f"lit://{info['name']}: bytes do not match the stored sha256; try again", grpc.StatusCode.DATA_LOSS
            )
        return data

    def _steps_cat(self, path: str, start: int | None, end: int | None) -> Steps[bytes]:
        info = yield from self._steps_file_info(path)
        return (yield from self._steps_read(info, *_slice(start, end, info["size"])))

    def _steps_get_file(self, rpath: str, lpath: Any, callback: Any, outfile: Any) -> Steps[None]:
        """Downloads one file: verified and renamed into place (or streamed into a file object)."""
        if outfile is None and isfilelike(lpath):
            outfile = lpath
        info = yield from self._steps_info(rpath)
        if info["type"] == "directory":
            if outfile is None:
                os.makedirs(lpath, exist_ok=True)
            return
        callback.set_size(info["size"])
        if outfile is not None:

            def write(chunk: bytes) -> None:
                outfile.write(chunk)
                callback.relative_update(len(chunk))

            yield Each(self._chunks(info, 0, None), write)
            return
        yield from self._steps_download(info, lpath, callback.relative_update)

    def _steps_download(self, info: dict[str, Any], lpath: Any, progress: Any = None) -> Steps[None]:
        """Fetches the file `info` describes to `lpath`: verified, and renamed into place (replacing what is there)."""
        name, sub = self._split(info["name"])
        yield self._drive(name).get(sub, info.get("component") or None, overwrite=True, to=lpath, progress=progress)

    # -- writing --------------------------------------------------------------

    def _steps_put_local(self, local: str | os.PathLike[str], rpath: str, callback: Any = DEFAULT_CALLBACK
                         ) -> Steps[None]:
        name, sub = self._split(rpath)
        if not sub:
            raise IsADirectory(f"lit://{name} is a drive root: name a file in it")
        try:
            yield self._drive(name).put(local, to=sub, progress=callback.relative_update)
        except InvalidArgument as err:  # no check before the put finds it but a stat of each of the path's parents
            if not err.message.endswith(f": {PARENT_IS_FILE}"):
                raise
            raise NotADirectory(err.message, err.code) from None

    def _steps_check_writable(self, path: str, exclusive: bool) -> Steps[None]:
        """Fails early where the put would be wrong: a folder (the daemon's refusal is a ValueError, where fsspec's
        callers expect IsADirectoryError), or any file for "xb" (the daemon has no put that refuses one).

        Who may write the path is the daemon's to decide when the file is put.
        """
        name, sub = self._split(path)
        if not sub:
            raise IsADirectory(f"lit://{name} is a drive root: name a file in it")
        try:
            stat = yield self._drive(name).stat(sub)
        except NotFound:
            return
        except AmbiguousPathError:  # a file that several components hold
            if exclusive:
                raise AlreadyExists(f"lit://{name}/{sub} exists") from None
            return
        if stat.folder:
            raise IsADirectory(f"lit://{name}/{sub} is a folder")
        if exclusive:
            raise AlreadyExists(f"lit://{name}/{sub} exists")

    def _steps_opened(self, path: str, mode: str, block: int) -> Steps[tuple[dict[str, Any] | None, _Spool | None]]:
        """What opening `path` in `mode` needs: the file's info to read it; a spool to write it, once it may be.

        For an append the spool starts as the file is now (none: empty), and remembers which version that is.
        """
        if mode == "rb":
            return (yield from self._steps_file_info(path)), None
        if mode not in ("wb", "xb", "ab"):
            raise NotImplementedError(f"mode {mode!r} is not supported: use 'rb', 'wb', 'xb' or 'ab'")
        base = None
        if mode == "ab":
            with contextlib.suppress(NotFound):
                base = yield from self._steps_file_info(path)
        else:
            yield from self._steps_check_writable(path, exclusive=mode == "xb")
        spool: _Spool = yield Local(_Spool, (self.spool_dir, block))
        if mode == "ab":
            spool.appends_to = _NO_FILE if base is None else _version(base)
        spool.exclusive = mode == "xb"
        if base is not None:
            try:
                yield from self._steps_download(base, spool.path)
                spool.start = yield Local(os.path.getsize, (spool.path,))
            except BaseException:
                spool.discard()
                raise
        return None, spool

    def _steps_put_spool(self, spool: _Spool, path: str) -> Steps[None]:
        """Puts what `spool` holds as the file `path`; an append only while the file is the version it started from,
        "xb" only while there is still no file (two writers may have opened it so)."""
        if spool.exclusive:
            yield from self._steps_check_writable(path, exclusive=True)
        if spool.appends_to is not None:
            try:
                now: tuple[str, int] | None = _version((yield from self._steps_file_info(path)))
            except NotFound:
                now = _NO_FILE
            except AmbiguousPathError:  # another component has put the path since: not the version fetched
                now = None
            if now != spool.appends_to:
                name, sub = self._split(path)
                raise StaleIndexError(
                    f"lit://{name}/{sub} changed since it was opened for appending (another writer put or removed "
                    "it): nothing was stored; open it and append again", grpc.StatusCode.ABORTED,
                )
        yield from self._steps_put_local(spool.path, path)

    def _steps_put_file(self, lpath: Any, rpath: str, callback: Any, mode: str) -> Steps[None]:
        """Uploads one local file in one call; folders need no creating."""
        if os.path.isdir(lpath):
            return
        yield from self._steps_check_writable(rpath, exclusive=mode == "create")
        callback.set_size(os.path.getsize(lpath))
        yield from self._steps_put_local(lpath, rpath, callback)

    def _steps_pipe_file(self, path: str, value: bytes, mode: str) -> Steps[None]:
        """Stores `value` as the whole file `path` (spooled to a local file, then put in one call)."""
        yield from self._steps_check_writable(path, exclusive=mode == "create")
        spool = yield Local(_Spool.holding, (self.spool_dir, value))
        try:
            yield from self._steps_put_spool(spool, path)
        finally:
            spool.discard()

    def _steps_cp_file(self, path1: str, path2: str, move: bool = False, named: str = "") -> Steps[None]:
        """Copies a file through a local temporary file (the daemon has no server-side copy), then removes it for a
        `move`. A file copied onto itself, however spelled, is left as it is (a move would remove it), and a
        folder copies nothing: folders come with their files, which fsspec's `copy` hands on one by one.

        A move removes only this component's file, as `rm` does. Another
        component's is copied and left when the move names a folder, a glob
        or a list (as `rm` of a folder leaves it); the move of one by its own
        path (`named`, as `mv` was given it) is refused before it is copied.
        """
        info = yield from self._steps_info(path1)
        if info["type"] == "directory" or self._split(path1) == self._split(path2):
            return
        owner = info["component"]
        if move and owner != self.component_name and info["name"] == named:
            raise NotFound(f"lit://{named} is component {owner!r}'s, not {self.component_name!r}'s: only its "
                           "component can remove it, so it is not moved (nothing was copied); copy it instead")
        yield from self._steps_check_writable(path2, exclusive=False)
        with tempfile.TemporaryDirectory(prefix="lit-cp-", dir=self.spool_dir) as tmp:
            local = Path(tmp, "file")
            yield from self._steps_download(info, local)
            yield from self._steps_put_local(local, path2)
        if move and owner == self.component_name:
            name, sub = self._split(info["name"])
            yield self._drive(name).delete(sub)

    def _steps_rm_file(self, path: str) -> Steps[None]:
        info = yield from self._steps_file_info(path)
        name, sub = self._split(info["name"])
        yield self._drive(name).delete(sub)

    def _steps_rm(self, path: Any, recursive: bool, maxdepth: int | None) -> Steps[None]:
        """Removes this component's files at `path` (a list, glob, file, or folder with `recursive`).

        Every path is checked before anything is removed, so a call refused for one of them (missing, a folder
        without `recursive`, another component's file) removes nothing, as fsspec's memory and local filesystems
        refuse it; a path that an earlier one removed (its folder, the same file spelled otherwise) is skipped.
        """
        targets: dict[str, None] = {}  # the daemon's names, each once, in the order given
        for p in path if isinstance(path, list) else [path]:
            stripped = self._strip_protocol(p)
            for target in (yield self._expand(stripped)) if _is_glob(stripped) else [stripped]:
                info = yield from self._steps_info(target)
                if info["type"] == "directory" and not recursive:
                    raise IsADirectory(f"lit://{info['name']} is a folder: rm(..., recursive=True) removes its "
                                       "files; nothing was removed")
                if info["type"] == "file" and info["component"] != self.component_name:
                    raise NotFound(f"lit://{info['name']} is owned by component {info['component']!r}, not "
                                   f"{self.component_name!r}: only its component can remove it; nothing was removed")
                targets[info["name"]] = None
        removed: set[str] = set()  # paths removed whole: a later target at or below one is gone already
        for target in targets:
            parts = target.split("/")
            if any("/".join(parts[:depth]) in removed for depth in range(1, len(parts) + 1)):
                continue
            name, sub = self._split(target)
            drive = self._drive(name)
            if not recursive or (sub and maxdepth is None):  # a file, or a folder removed whole
                yield drive.delete(sub)
                removed.add(target)
                continue
            entries: list[FileStat] = []  # listed whole before deleting: deletes change the listing
            yield Each(drive.entries(sub, self.component_name, recursive=maxdepth is not None), entries.append)
            prefix = sub + "/" if sub else ""
            for entry in entries:  # without maxdepth, a drive root: each of this component's top-level entries
                if maxdepth is None or entry.path == sub or entry.path[len(prefix):].count("/") < maxdepth:
                    yield drive.delete(entry.path)
                    removed.add(_join(name, entry.path))

    def _steps_mkdir(self, path: str, exist_ok: bool) -> Steps[None]:
        """mkdir, makedirs: folders are implicit (a folder comes with its first file), so nothing is made; refused as
        a local filesystem refuses it: a file at `path` (or a folder, unless `exist_ok`), or a file above it."""
        name, sub = self._split(path)
        kind = yield from self._steps_type(path)
        if kind == "file" or (kind == "directory" and not exist_ok):
            raise AlreadyExists(f"lit://{_join(name, sub)} exists")
        parent = sub if kind is None else ""
        while parent := parent.rpartition("/")[0]:
            above = yield from self._steps_type(_join(name, parent))
            if above == "file":
                raise NotADirectory(f"lit://{name}/{parent} is a file: there is no folder below it")
            if above == "directory":
                return

    def _steps_rmdir(self, path: str) -> Steps[None]:
        """rmdir: a folder that holds no file is no folder (folders are implicit), so nothing is removed; refused as a
        local filesystem refuses it: a file, or a folder holding files (`rm(path, recursive=True)` removes them)."""
        name, sub = self._split(path)
        kind = yield from self._steps_type(path)
        if kind == "file":
            raise NotADirectory(f"lit://{name}/{sub} is a file, not a folder: rm_file removes it")
        if kind == "directory" and (sub or (yield from self._steps_ls(path, detail=False))):
            raise OSError(errno.ENOTEMPTY, f"lit://{_join(name, sub)} holds files: rm(path, recursive=True) removes "
                                           "them")

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        cache_type: str | None = None,
        **kwargs: Any,
    ) -> DriveFile:
        """A file for blocking code (fsspec's `open`, `touch`; pandas, torch): `DriveFile`, on either face."""
        block = block_size or self.block_size
        details, spool = self._blocking(self._steps_opened(path, mode, block))
        return DriveFile(
            self, self._strip_protocol(path), mode, block, autocommit, cache_type=cache_type or self.cache_type,
            cache_options=self.cache_options if cache_options is None else cache_options, details=details,
            spool=spool, **kwargs,
        )


class DriveFileSystem(_LitFileSystem, AbstractFileSystem):
    """fsspec filesystem over drived's `lit://` drives, on `Drive` (see the module docstring).

    `DriveFileSystem(asynchronous=True, ...)` (and so `fsspec.filesystem("lit", asynchronous=True)`)
    gives an `AsyncDriveFileSystem`.
    """

    _twin = Drive

    def __new__(cls, *args: Any, asynchronous: bool = False, **kwargs: Any) -> Any:
        if asynchronous:
            return AsyncDriveFileSystem(*args, asynchronous=True, **kwargs)
        return super().__new__(cls)

    def _run(self, steps: Steps[T]) -> T:
        step = advance(steps)
        while not isinstance(step, Done):
            try:
                answer = None
                if isinstance(step, Each):
                    for item in step.items:  # type: ignore[union-attr]
                        step.each(item)
                else:
                    answer = step.work(*step.args) if isinstance(step, Local) else step  # called already
            except BaseException as err:  # the steps decide: they may catch it
                step = advance(steps, error=err)
            else:
                step = advance(steps, answer)
        return step.value

    _blocking = _run

    def _expand(self, path: str) -> list[str]:
        return self.expand_path(path)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._run(self._steps_info(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        return self._run(self._steps_ls(path, detail))

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self._run(self._steps_type(path)) is not None

    def isdir(self, path: str) -> bool:
        return self._run(self._steps_type(path)) == "directory"

    def isfile(self, path: str) -> bool:
        return self._run(self._steps_type(path)) == "file"

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:
        """Every file under `path` from one recursive listing (a walk when `maxdepth` is given)."""
        if maxdepth is not None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        return self._run(self._steps_find(path, withdirs, detail))

    def ukey(self, path: str) -> str:
        info = self.info(path)
        return str(info.get("sha256") or super().ukey(path))

    def modified(self, path: str) -> Any:
        info = self.info(path)
        if info.get("modified") is None:
            raise IsADirectory(f"{path!r} is a folder: folders have no modification time")
        return info["modified"]

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return self._run(self._steps_cat(path, start, end))

    def get_file(self, rpath: str, lpath: Any, callback: Any = DEFAULT_CALLBACK, outfile: Any = None,
                 **kwargs: Any) -> None:
        self._run(self._steps_get_file(rpath, lpath, callback, outfile))

    def put_file(self, lpath: Any, rpath: str, callback: Any = DEFAULT_CALLBACK, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        self._run(self._steps_put_file(lpath, rpath, callback, mode))

    def cp_file(self, path1: str, path2: str, move: bool = False, named: str = "", **kwargs: Any) -> None:
        self._run(self._steps_cp_file(path1, path2, move, named))

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any
           ) -> None:
        """Moves file by file: fsspec's `copy` says where each file goes, and each is removed once copied. fsspec's
        move copies all, then removes `path1` whole, which lost every file copied onto itself (a path spelled
        otherwise, a file moved into its own folder), or not copied (a folder in lists, a file put in the folder
        while it moved). A path moved onto itself is left as it is, and a folder moved into itself is refused,
        as `shutil.move` refuses it; a folder moved without `recursive` is refused, as `rm` refuses it."""
        source = ""  # the one path moved, when not a glob or a list: another component's file there is refused
        if isinstance(path1, str) and not _is_glob(path1):
            source = _join(*self._split(path1))
            if isinstance(path2, str):
                target = _join(*self._split(path2))
                if source == target:
                    return
                if target.startswith(f"{source}/"):
                    raise InvalidArgument(f"cannot move lit://{source} into itself (to lit://{target})")
            if not recursive and self.isdir(source):  # fsspec's copy copies no folder: it would move nothing
                raise IsADirectory(f"lit://{source} is a folder: mv(..., recursive=True) moves it; nothing was moved")
        self.copy(path1, path2, recursive=recursive, maxdepth=maxdepth, on_error="raise", move=True, named=source)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._run(self._steps_mkdir(path, exist_ok=True))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._run(self._steps_mkdir(path, exist_ok))

    def rmdir(self, path: str) -> None:
        self._run(self._steps_rmdir(path))

    def rm_file(self, path: str) -> None:
        self._run(self._steps_rm_file(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._run(self._steps_rm(path, recursive, maxdepth))


class AsyncDriveFileSystem(_LitFileSystem, AsyncFileSystem):
    """fsspec filesystem over drived's `lit://` drives for asyncio code, on `AsyncDrive`.

    `fsspec.filesystem("lit", asynchronous=True, ...)` makes one. Await its
    coroutine methods (`_ls`, `_info`, `_cat_file`, `_put_file`, `_get_file`,
    `_pipe_file`, `_rm`, ...) and `open_async`; the operations are
    `DriveFileSystem`'s, driven on the event loop.
    """

    _twin = AsyncDrive

    async def _run(self, steps: Steps[T]) -> T:
        step = advance(steps)
        while not isinstance(step, Done):
            try:
                answer = None
                if isinstance(step, Each):
                    async for item in step.items:  # type: ignore[union-attr]
                        step.each(item)
                elif isinstance(step, Local):
                    answer = await in_thread(step.work, *step.args, abandoned=_discard_spool)
                else:
                    answer = await step
            except BaseException as err:  # the steps decide: they may catch it
                step = advance(steps, error=err)
            else:
                step = advance(steps, answer)
        return step.value

    def _blocking(self, steps: Steps[T]) -> T:
        """Runs `steps` on the filesystem's loop, as fsspec runs every blocking method of an async filesystem made with
        `asynchronous=False`. Refused for `asynchronous=True`, where fsspec refuses its blocking methods too."""
        if self.asynchronous:
            raise NotImplementedError(
                "this filesystem is for asyncio code (asynchronous=True): open its files with "
                "`await fs.open_async(path, mode)`; fsspec.filesystem('lit') gives the blocking one"
            )
        return sync(self.loop, self._run, steps)

    def _expand(self, path: str) -> Any:
        return self._expand_path(path)

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return await self._run(self._steps_info(path))

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        return await self._run(self._steps_type(path)) is not None

    async def _isdir(self, path: str) -> bool:
        return await self._run(self._steps_type(path)) == "directory"

    async def _isfile(self, path: str) -> bool:
        return await self._run(self._steps_type(path)) == "file"

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        return await self._run(self._steps_ls(path, detail))

    async def _find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
                    **kwargs: Any) -> Any:
        """Every file under `path` from one recursive listing (a walk when `maxdepth` is given)."""
        if maxdepth is not None:
            return await super()._find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        return await self._run(self._steps_find(path, withdirs, detail))

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return await self._run(self._steps_cat(path, start, end))

    async def _get_file(self, rpath: str, lpath: Any, callback: Any = DEFAULT_CALLBACK, outfile: Any = None,
                        **kwargs: Any) -> None:
        await self._run(self._steps_get_file(rpath, lpath, callback, outfile))

    async def _put_file(self, lpath: Any, rpath: str, callback: Any = DEFAULT_CALLBACK, mode: str = "overwrite",
                        **kwargs: Any) -> None:
        await self._run(self._steps_put_file(lpath, rpath, callback, mode))

    async def _pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        await self._run(self._steps_pipe_file(path, value, mode))

    async def _cp_file(self, path1: str, path2: str, move: bool = False, named: str = "", **kwargs: Any) -> None:
        await self._run(self._steps_cp_file(path1, path2, move, named))

    async def _mv_file(self, path1: str, path2: str) -> None:
        """Moves one file (`DriveFileSystem.mv`): onto itself, it is left as it is."""
        await self._cp_file(path1, path2, move=True, named=_join(*self._split(path1)))

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        await self._run(self._steps_mkdir(path, exist_ok=True))

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        await self._run(self._steps_mkdir(path, exist_ok))

    async def _rmdir(self, path: str) -> None:
        await self._run(self._steps_rmdir(path))

    rmdir = sync_wrapper(_rmdir)  # fsspec mirrors only the coroutines it knows of; rmdir is not one

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        await self._run(self._steps_rm_file(path))

    async def _rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        await self._run(self._steps_rm(path, recursive, maxdepth))

    async def open_async(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any
                         ) -> AsyncDriveFile:
        """A file for asyncio code: `await f.read(n)` in "rb"; `await f.write(b)` in "wb", "xb", "ab" (put on close)."""
        block = block_size or self.block_size
        details, spool = await self._run(self._steps_opened(path, mode, block))
        # fsspec's async files write in "wb" and "ab" only: "xb" is "wb" with an exclusive spool, checked at close
        return AsyncDriveFile(self, self._strip_protocol(path), "wb" if mode == "xb" else mode, block_size=block,
                              details=details, spool=spool, **kwargs)


class _Spool:
    """What a file open for writing holds until it is put: small writes in memory (up to a block), the rest in a
    local temporary file, which the put reads; removed by `discard()`.

    A write that does not fit in the block goes to the file straight from the caller's buffer, so a large one is
    never copied in memory. The file is opened for appending at the first write that reaches it, so a file
    fetched into `path` before that (an append, "ab") is continued.
    """

    def __init__(self, folder: str | None, block: int) -> None:
        fd, path = tempfile.mkstemp(prefix=".lit-upload-", dir=folder)
        os.close(fd)
        self.path = os.path.abspath(path)
        # For an append, the version of the file it started from (`_NO_FILE`: none), checked before the put,
        # and that file's size: where the first write goes.
        self.appends_to: tuple[str, int] | None = None
        self.start = 0
        self.exclusive = False  # "xb": the path must still hold no file when it is put
        self._block = block
        self._gathered = bytearray()
        self._fd = -1

    @classmethod
    def holding(cls, folder: str | None, data: Any) -> _Spool:
        """A closed spool holding `data`."""
        spool = cls(folder, 0)
        spool.write(memoryview(data).cast("B"))
        spool.close()
        return spool

    def gathers(self, data: memoryview) -> bool:
        """Whether writing `data` only gathers it in memory: it touches no file, so it never blocks."""
        return len(self._gathered) + data.nbytes <= self._block

    def write(self, data: memoryview) -> None:
        if self.gathers(data):
            self._gathered += data
            return
        self._write_gathered()
        write_all(self._fd, data)

    def _write_gathered(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        with memoryview(self._gathered) as gathered:
            write_all(self._fd, gathered)
        self._gathered.clear()

    def close(self) -> None:
        """Writes what is gathered in memory to the file: the file is complete, ready to be put."""
        self._write_gathered()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self._close_fd()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _discard_spool(made: Any) -> None:
    """Removes a spool made by a step whose caller was cancelled (`aio.in_thread`): the steps never got it."""
    if isinstance(made, _Spool):
        made.discard()


def _writable(file: AbstractBufferedFile, data: Any) -> memoryview:
    """`data` as bytes to write to `file`, once `file` takes writes (fsspec's errors otherwise)."""
    if file.closed:
        raise ValueError("I/O operation on closed file.")
    if not file.writable():
        raise ValueError("File not in write mode")
    if file.forced:
        raise ValueError("This file has been force-flushed, can only close")
    return memoryview(data).cast("B")


class _Writing:
    """What the files of both faces add to fsspec's about writing: a file open for writing holds a spool (None
    when reading, or once put or discarded), and what happens to it when the file is not closed normally."""

    _spool: _Spool | None
    closed: bool
    path: str
    mode: str

    def _hold(self, spool: _Spool | None) -> None:
        self._spool = spool
        # The exception being handled as the file is opened (in an `except:` block) and its traceback, which a
        # close may see without unwinding anything (`_unwinding`); raised again, the exception has a new traceback.
        self._opened_during = sys.exc_info()[1:]
        # Whether an exception ends the file's own `with` block, as its exit says; None until then.
        self._exit_raised: bool | None = None
        self._pid = os.getpid()  # a forked child's copy leaves the spool to the process that writes it

    def _abandon(self) -> None:
        """Discards the spool of a file open for writing that was never closed: nothing is stored, as nothing
        said that what was written is whole."""
        if self.closed or self._spool is None or os.getpid() != self._pid:
            return
        warnings.warn(f"unclosed file 'lit://{self.path}' (mode {self.mode!r}): nothing stored", ResourceWarning,
                      stacklevel=2, source=self)
        self.discard()

    # fsspec's closes a file collected unclosed, which puts a writer's partial bytes (the async face's close is a
    # coroutine no one awaits: its spool stayed), and as the interpreter finalizes that put hangs (it starts
    # threads). A reader holds nothing its collection does not release.
    __del__ = _abandon

    def _dealloc_warn(self, source: Any) -> None:
        """What a text wrapper (io.TextIOWrapper) collected unclosed calls on its buffer before it closes it, which
        would put the partial bytes: the file is abandoned first, so the close finds it closed."""
        self._abandon()

    def _unwinding(self) -> bool:
        """Whether the file is being closed as an exception unwinds: what was written is then partial, and the
        previous version of the file must stay. The file's own `with` says so; fsspec's `OpenFile`, a text wrapper
        and a `finally:` (pandas, `torch.save`'s callers) close it without saying why, and an exception being
        handled that was not being handled when the file was opened tells instead."""
        if self._exit_raised is not None:
            return self._exit_raised
        handled, traceback = sys.exc_info()[1:]
        opened_during, opened_traceback = self._opened_during
        return handled is not None and (handled is not opened_during or traceback is not opened_traceback)

    def discard(self) -> None:
        """Drops the spooled bytes without putting them; the file is closed (a transaction abandoned discards the
        files still open in it, which take no more writes)."""
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
        self.closed = True


class _Positioned:
    """What io's files refuse and fsspec's files (of both faces) answer: a closed file has no position."""

    closed: bool

    def tell(self) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return super().tell()  # type: ignore[misc]

    def seek(self, loc: int, whence: int = 0) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return super().seek(loc, whence)  # type: ignore[misc]


class DriveFile(_Writing, _Positioned, AbstractBufferedFile):
    """A file of a `lit://` drive: ranged reads in blocks, or writes spooled to disk and put on close."""

    fs: _LitFileSystem

    def __init__(
        self,
        fs: _LitFileSystem,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = "default",
        autocommit: bool = True,
        cache_type: str = "readahead",
        cache_options: dict[str, Any] | None = None,
        size: int | None = None,
        details: dict[str, Any] | None = None,
        spool: _Spool | None = None,
        **kwargs: Any,
    ) -> None:
        self._hold(spool)
        if details is not None:
            self._details = details
            size = details["size"]
        super().__init__(
            fs, path, mode, block_size, autocommit, cache_type=cache_type, cache_options=cache_options, size=size,
            **kwargs,
        )
        if spool is not None:
            self.loc = spool.start  # like a local file opened to append: at its end

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs._blocking(self.fs._steps_read(self.details, start, min(end, self.size)))

    def _direct_length(self, length: int) -> int:
        """How many bytes of a read of `length` (negative: to the end) are fetched past the cache, straight to where
        they go: 0 to read through the cache."""
        if self.mode != "rb" or self.closed or self.cache.name not in _CACHES_PASSED:
            return 0
        left = max(self.size - self.loc, 0)
        length = left if length < 0 else min(length, left)
        return length if length >= self.blocksize else 0

    def read(self, length: int = -1) -> bytes:
        """fsspec's read; `length` a block or more is fetched once, into the bytes returned (see the module doc)."""
        direct = self._direct_length(-1 if length is None else int(length))
        if not direct:
            return super().read(length)
        data = self._fetch_range(self.loc, self.loc + direct)
        self.loc += len(data)
        return data

    def readinto(self, b: Any) -> int:
        """Reads into `b`; a block or more is fetched straight into it, holding no copy."""
        out = memoryview(b).cast("B")
        direct = self._direct_length(out.nbytes)
        if not direct:
            return super().readinto(out)
        self.fs._blocking(self.fs._steps_read_into(self.details, self.loc, out[:direct]))
        self.loc += direct
        return direct

    def readline(self, size: int | None = -1) -> bytes:
        """io's readline (`size`: a line of at most that many bytes), read through the cache in pieces that double from
        io's buffer size up to a block, then a seek back to the line's end. fsspec's reads with `read`, where a read
        of a block goes past the cache: a Get of a block for every line; and a piece of a block for every line
        copies a block for every line."""
        size = -1 if size is None else size.__index__()
        start, parts, length, piece_size = self.loc, [], 0, io.DEFAULT_BUFFER_SIZE
        while size < 0 or length < size:
            piece = super().read(piece_size if size < 0 else min(size - length, piece_size))
            end = piece.find(b"\n") + 1
            parts.append(piece[:end] if end else piece)
            length += len(parts[-1])
            if end or not piece:
                break
            piece_size = min(2 * piece_size, self.blocksize)
        self.seek(start + length)
        return b"".join(parts)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """io's readlines: the lines left (fsspec's gave `[b""]` at the end), or with `hint`, lines until their total
        size reaches it."""
        if hint is None or hint <= 0:
            return io.BytesIO(self.read()).readlines()
        return io.IOBase.readlines(self, hint)

    def write(self, data: Any) -> int:
        """Writes `data` to the spool: gathered in memory if it fits in the block, else to the local file at once."""
        view = _writable(self, data)
        assert self._spool is not None
        self._spool.write(view)
        self.loc += view.nbytes
        return view.nbytes

    def _upload_chunk(self, final: bool = False) -> bool:
        """Closes the spool when the file is closed (fsspec's buffer stays empty: writes go to the spool); a file
        closed as an exception unwinds puts nothing."""
        if final:
            assert self._spool is not None
            if self._unwinding():
                self.discard()
                return True
            try:
                self._spool.close()
            except BaseException:
                self.discard()
                raise
            if self.autocommit:
                self.commit()
        return True

    def commit(self) -> None:
        """Puts the spooled file (one atomic put), then removes the spool. A file still open when its transaction
        ends is closed first, so that what was written is put whole (`torch.save` closes no file it is given)."""
        if not self.forced:  # not closed: the spool lacks what is gathered in memory
            self.close()
        if self._spool is None:
            return
        try:
            self.fs._blocking(self.fs._steps_put_spool(self._spool, self.path))
        finally:
            self.discard()

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        """Closes the file; one whose block an exception ends puts nothing (`_unwinding`)."""
        self._exit_raised = exc_type is not None
        self.close()


class AsyncDriveFile(_Writing, _Positioned, AbstractAsyncStreamedFile):
    """A file of a `lit://` drive for asyncio code (`AsyncDriveFileSystem.open_async`): `DriveFile`, awaited."""

    fs: AsyncDriveFileSystem

    def __init__(self, fs: AsyncDriveFileSystem, path: str, mode: str = "rb", details: dict[str, Any] | None = None,
                 spool: _Spool | None = None, **kwargs: Any) -> None:
        self._hold(spool)
        self._details = details
        super().__init__(fs, path, mode, size=details["size"] if details else None, **kwargs)
        if spool is not None:
            self.loc = spool.start

    async def _fetch_range(self, start: int, end: int) -> bytes:
        return await self.fs._run(self.fs._steps_read(self.details, start, min(end, self.size)))

    async def write(self, data: Any) -> int:
        """`DriveFile.write`: what does not fit in the block is written in a worker thread."""
        view = _writable(self, data)
        assert self._spool is not None
        if self._spool.gathers(view):
            self._spool.write(view)
        else:
            await in_thread(self._spool.write, view)
        self.loc += view.nbytes
        return view.nbytes

    async def _upload_chunk(self, final: bool = False) -> bool:
        if final:
            assert self._spool is not None
            try:
                if not self._unwinding():
                    await in_thread(self._spool.close)
                    await self.fs._run(self.fs._steps_put_spool(self._spool, self.path))
            finally:
                self.discard()
        return True

    async def close(self) -> None:
        """Puts the file (in a write mode); closed even when the put fails, like `DriveFile`."""
        try:
            await super().close()
        finally:
            self.closed = True

    async def __aexit__(self, exc_type: Any, *args: Any) -> None:
        """`DriveFile.__exit__`, awaited."""
        self._exit_raised = exc_type is not None
        await self.close()
