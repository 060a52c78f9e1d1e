"""fsspec filesystem for `lit://` drives: `fsspec.open("lit://drive_1/a.txt")`.

Registered through the `fsspec.specs` entry point as protocol `lit`, so
fsspec, pandas, dask, pyarrow and anything else that takes a URL plus
`storage_options` reach the daemon without importing this module:

    import fsspec, pandas as pd
    fs = fsspec.filesystem("lit", endpoint="127.0.0.1:50051", component_name="work_a")
    fs.put("t.csv", "drive_1/t.csv"); fs.ls("drive_1"); fs.cat_file("drive_1/t.csv", 0, 100)
    with fsspec.open("lit://drive_1/a.txt", "rb") as f: head = f.read(1 << 20)
    df = pd.read_csv("lit://drive_1/t.csv", storage_options={"endpoint": "127.0.0.1:50051"})

URLs are `lit://DRIVE/path/in/drive`: the netloc is the drive name, and
fsspec paths (what `ls`, `find` and `info` answer in `name`) are
`DRIVE/path/in/drive`. Options (all optional):

- `endpoint`: `HOST:PORT` of drived; default `$DRIVE_ENDPOINT`, else
  `127.0.0.1:50051` (read on each call, so a changed environment is honoured).
- `component_name`: the component files are written, replaced and deleted
  as; default `$DRIVE_COMPONENT`, else `"default"`. Reads and listings span
  all components, like `Drive.get` and `Drive.list`.
- `allow_duplicates`: let writes store a path another component holds.
- `token`: bearer token sent with every call.

Only `lit://` (managed) drives live here. `s3://` is fsspec's S3 protocol
(s3fs), a different filesystem that talks to the bucket itself; the
daemon's read-only `s3://` drives are reached with `drive_client.Drive`.

Semantics:

- Reading streams: `open(mode="rb")` gives a buffered file whose blocks
  (`block_size`, default 5 MiB) are fetched with ranged `Get` calls, never
  the whole file. Every range carries the sha256 and owner from `info`, so a
  file replaced while it is being read fails with `StaleIndexError` instead
  of mixing two versions. `cat_file` reads with the same pinning (and checks
  the sha256 of whole-file reads); `get_file` uses the client's verified,
  atomic whole-file download.
- Writing spools: `open(mode="wb")` keeps at most one block in memory and the
  rest in a local temporary file, and puts the whole file on `close()` (a
  single atomic put on the server; readers never see a partial file). An
  exception inside a `with fs.open(path, "wb")` block discards the upload
  (fsspec files commit what was written when closed, whatever happened).
  That applies to binary files used as context managers themselves: text
  wrappers, `fsspec.open(...)` (an `OpenFile`) and libraries that call
  `close()` in a `finally` (pandas) still close, and so put, what was
  written before the error.
  Inside `fs.transaction` files are put when the transaction ends. A path
  another component holds is refused up front with `FileExistsError`
  (unless `allow_duplicates`); the server checks again when it commits.
  Append (`"ab"`) is not supported: files are replaced whole.
- Folders are implicit (a path with files beneath it): `mkdir`/`makedirs`
  are no-ops and a folder disappears with its last file. A drive root always
  exists (an unused drive is empty); `ls` of a missing path below it raises
  `FileNotFoundError`.
- `rm` removes only this component's files (`Drive.delete`); removing a path
  that only other components hold raises `FileNotFoundError`. Folders need
  `recursive=True` and lose only this component's files.
- When several components hold one file path (`allow_duplicates`), `info`
  and reads pick this component's copy if it has one; otherwise they raise
  `AmbiguousPathError`.
- Errors are the client's: `FileNotFoundError`, `FileExistsError`,
  `PermissionError`, `ValueError`, `ConnectionError`, ... (see README).

Caching: nothing read from the daemon is cached across calls. A drive is
shared by workers that put and delete concurrently, so `ls`, `info`, `find`
and `exists` always ask the daemon (fsspec's `dircache` is never filled, and
`use_listings_cache` has nothing to turn off). fsspec's *instance* cache is
kept (it is per process and thread): it holds only options and gRPC channels,
so reusing an instance saves reconnecting and never serves stale data; pass
`skip_instance_cache=True` for a private instance. Within one open file the
read cache holds at most about two blocks of that one version of the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.utils import isfilelike

from .common import DEFAULT_ENDPOINT, FileStat
from .drive import Drive
from .errors import AmbiguousPathError, DataLoss, InvalidArgument, NotFound
from .pb import drive_pb2 as pb
from .uri import check_component, normalize_path, parse_drive

__all__ = ["DriveFile", "DriveFileSystem"]


def _slice(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """Python-slice bounds (None, negative = from the end) clamped to [0, size]."""

    def bound(value: int | None, default: int) -> int:
        if value is None:
            return default
        if value < 0:
            value += size
        return min(max(value, 0), size)

    return bound(start, 0), bound(end, size)


class DriveFileSystem(AbstractFileSystem):
    """fsspec filesystem over drived's `lit://` drives (see the module docstring)."""

    protocol = "lit"
    root_marker = ""

    def __init__(
        self,
        endpoint: str | None = None,
        component_name: str | None = None,
        allow_duplicates: bool = False,
        token: str | None = None,
        spool_dir: str | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(**storage_options)
        self._endpoint = endpoint
        self._component = check_component(component_name) if component_name else None
        self.allow_duplicates = allow_duplicates
        self._token = token
        self.spool_dir = spool_dir  # where `open(mode="wb")` spools; None: the system temp dir
        self._drives: dict[tuple[str, str, str], Drive] = {}
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
        return path.strip("/")

    def _split(self, path: str) -> tuple[str, str]:
        """(drive name, normalized path in the drive); the path is "" for the drive root."""
        name, _, rest = self._strip_protocol(path).partition("/")
        if not name:
            raise InvalidArgument("a lit:// path names a drive first: 'lit://drive_1/path/in/drive'")
        parse_drive(f"lit://{name}")  # validates the name
        return name, normalize_path(rest, allow_root=True)

    def _drive(self, name: str) -> Drive:
        endpoint, component = self.endpoint, self.component_name
        key = (name, endpoint, component)
        with self._drives_lock:
            drive = self._drives.get(key)
            if drive is None:
                drive = Drive(
                    f"lit://{name}", allow_duplicates=self.allow_duplicates, component_name=component,
                    endpoint=endpoint, token=self._token,
                )
                self._drives[key] = drive
        return drive

    @staticmethod
    def _join(name: str, sub: str) -> str:
        return f"{name}/{sub}" if sub else name

    # -- descriptions ---------------------------------------------------------

    def _describe(self, name: str, stat: FileStat) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self._join(name, stat.path),
            "size": 0 if stat.folder else stat.size,
            "type": "directory" if stat.folder else "file",
            "component": stat.component,
        }
        if not stat.folder:
            out.update(modified=stat.modified, generation=stat.generation)
            out.update((key, value) for key, value in (("sha256", stat.sha256), ("etag", stat.etag)) if value)
        return out

    def _entry(self, name: str, entry: pb.FileInfo) -> dict[str, Any]:
        return self._describe(name, FileStat.from_info(entry))

    def _stat(self, drive: Drive, sub: str) -> FileStat:
        """`Drive.stat`; a path several components hold resolves to this component's copy, if any."""
        try:
            return drive.stat(sub)
        except AmbiguousPathError as err:
            try:
                return drive.stat(sub, component_name=self.component_name)
            except NotFound:
                raise err from None

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        name, sub = self._split(path)
        if not sub:
            return {"name": name, "size": 0, "type": "directory", "component": ""}
        return self._describe(name, self._stat(self._drive(name), sub))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        name, sub = self._split(path)
        entries = [self._entry(name, e) for e in self._drive(name)._list(sub, None, recursive=False)]
        if not entries and sub:
            raise NotFound(f"lit://{name}/{sub} does not exist")
        return entries if detail else [e["name"] for e in entries]

    def find(
        self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any
    ) -> Any:
        """Every file under `path` from one recursive listing (a walk when `maxdepth` is given)."""
        if maxdepth is not None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        name, sub = self._split(path)
        out: dict[str, dict[str, Any]] = {}
        top = self._join(name, sub)
        for entry in self._drive(name)._list(sub, None, recursive=True):
            info = self._entry(name, entry)
            out[info["name"]] = info
            if withdirs and entry.path != sub:
                parent = info["name"].rpartition("/")[0]
                while len(parent) >= len(top) and parent not in out:
                    out[parent] = {"name": parent, "size": 0, "type": "directory", "component": ""}
                    parent = parent.rpartition("/")[0]
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    def ukey(self, path: str) -> str:
        info = self.info(path)
        return str(info.get("sha256") or super().ukey(path))

    def modified(self, path: str) -> Any:
        info = self.info(path)
        if info.get("modified") is None:
            raise IsADirectoryError(f"{path!r} is a folder: folders have no modification time")
        return info["modified"]

    # -- reading --------------------------------------------------------------

    def _file_info(self, path: str) -> dict[str, Any]:
        info = self.info(path)
        if info["type"] != "file":
            raise IsADirectoryError(f"lit://{info['name']} is a folder, not a file")
        return info

    def _chunks(self, info: dict[str, Any], start: int, length: int | None) -> Iterator[bytes]:
        """Bytes [start, start+length) of the file `info` describes, pinned to its owner and sha256."""
        name, sub = self._split(info["name"])
        return self._drive(name).read_range(
            sub, start, length, component_name=info.get("component") or None, if_match=info.get("sha256", ""),
        )

    def _read(self, info: dict[str, Any], start: int, end: int) -> bytes:
        if start >= end:
            return b""
        data = b"".join(self._chunks(info, start, end - start))
        if len(data) != end - start:
            raise DataLoss(
                f"lit://{info['name']}: got {len(data)} bytes of range [{start}, {end}); try again",
                grpc.StatusCode.DATA_LOSS,
            )
        whole = start == 0 and end == info["size"]
        if whole and info.get("sha256") and hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise DataLoss(
                    f"lit://{info['name']}: bytes do not match the stored sha256; try again",
                    grpc.StatusCode.DATA_LOSS,
                )
        return data

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        info = self._file_info(path)
        return self._read(info, *_slice(start, end, info["size"]))

    def get_file(
        self, rpath: str, lpath: Any, callback: Any = DEFAULT_CALLBACK, outfile: Any = None, **kwargs: Any
    ) -> None:
        """Downloads one file: verified and renamed into place (or streamed into a file object)."""
        if outfile is None and isfilelike(lpath):
            outfile = lpath
        info = self.info(rpath)
        if info["type"] == "directory":
            if outfile is None:
                os.makedirs(lpath, exist_ok=True)
            return
        callback.set_size(info["size"])
        if outfile is not None:
            for chunk in self._chunks(info, 0, None):
                outfile.write(chunk)
                callback.relative_update(len(chunk))
            return
        name, sub = self._split(info["name"])
        self._drive(name)._get_into(
            sub, Path(lpath), info.get("component") or None, None, True, progress=callback.relative_update
        )

    # -- writing --------------------------------------------------------------

    def _put_local(self, local: str | os.PathLike[str], rpath: str, callback: Any = DEFAULT_CALLBACK) -> None:
        name, sub = self._split(rpath)
        if not sub:
            raise IsADirectoryError(f"lit://{name} is a drive root: name a file in it")
        self._drive(name)._put_files([(Path(local), sub)], progress=callback.relative_update)

    def _check_writable(self, path: str, exclusive: bool = False) -> None:
        """Fails early where the put on close would fail: a folder, or a path another component holds."""
        name, sub = self._split(path)
        if not sub:
            raise IsADirectoryError(f"lit://{name} is a drive root: name a file in it")
        if self.allow_duplicates and not exclusive:
            return
        try:
            stat = self._drive(name).stat(sub)
        except NotFound:
            return
        except AmbiguousPathError:
            raise FileExistsError(f"lit://{name}/{sub} is held by several components") from None
        if stat.folder:
            raise IsADirectoryError(f"lit://{name}/{sub} is a folder")
        if exclusive:
            raise FileExistsError(f"lit://{name}/{sub} exists")
        if stat.component != self.component_name:
            raise FileExistsError(
                f"lit://{name}/{sub} is held by component {stat.component!r}, not {self.component_name!r} "
                "(pass allow_duplicates=True to store your own copy)"
            )

    def put_file(
        self, lpath: Any, rpath: str, callback: Any = DEFAULT_CALLBACK, mode: str = "overwrite", **kwargs: Any
    ) -> None:
        """Uploads one local file in one Put stream; folders need no creating."""
        if os.path.isdir(lpath):
            return
        if mode == "create":
            self._check_writable(rpath, exclusive=True)
        callback.set_size(os.path.getsize(lpath))
        self._put_local(lpath, rpath, callback)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copies through a local temporary file (the daemon has no server-side copy)."""
        with tempfile.TemporaryDirectory(prefix="lit-cp-", dir=self.spool_dir) as tmp:
            local = Path(tmp, "file")
            self.get_file(path1, str(local))
            self._put_local(local, path2)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._split(path)  # folders are implicit: nothing to create

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._split(path)

    def rmdir(self, path: str) -> None:
        self._split(path)  # a folder goes away with its last file

    def rm_file(self, path: str) -> None:
        info = self._file_info(path)
        name, sub = self._split(info["name"])
        self._drive(name).delete(sub)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Removes this component's files at `path` (a list, glob, file, or folder with `recursive`)."""
        paths = path if isinstance(path, list) else [path]
        targets: list[str] = []
        for p in paths:
            stripped = self._strip_protocol(p)
            if any(c in stripped for c in "*?["):
                targets += self.expand_path(stripped)
            else:
                targets.append(stripped)
        for target in targets:
            name, sub = self._split(target)
            drive = self._drive(name)
            if not recursive:
                self.rm_file(target)
            elif maxdepth is not None:
                prefix = sub + "/" if sub else ""
                for entry in list(drive._list(sub, self.component_name, recursive=True)):
                    if entry.path == sub or entry.path[len(prefix):].count("/") < maxdepth:
                        drive.delete(entry.path)
            elif sub:
                drive.delete(sub)
            else:  # a drive root: delete each of this component's top-level entries
                for entry in list(drive._list("", self.component_name, recursive=False)):
                    drive.delete(entry.path)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> DriveFile:
        if mode == "rb":
            kwargs["details"] = self._file_info(path)
        elif mode in ("wb", "xb"):
            self._check_writable(path, exclusive=mode == "xb")
        else:
            raise NotImplementedError(
                f"mode {mode!r} is not supported: files are replaced whole, never appended to; use 'rb', 'wb' or 'xb'"
            )
        return DriveFile(
            self, self._strip_protocol(path), mode, block_size, autocommit, cache_options=cache_options, **kwargs
        )


class DriveFile(AbstractBufferedFile):
    """A file of a `lit://` drive: ranged reads in blocks, or writes spooled to disk and put on close."""

    fs: DriveFileSystem

    def __init__(
        self,
        fs: DriveFileSystem,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = "default",
        autocommit: bool = True,
        cache_type: str = "readahead",
        cache_options: dict[str, Any] | None = None,
        size: int | None = None,
        details: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._spool: Any = None
        self._spool_path: str | None = None
        if details is not None:
            self._details = details
            size = details["size"]
        super().__init__(
            fs, path, mode, block_size, autocommit, cache_type=cache_type, cache_options=cache_options, size=size,
            **kwargs,
        )

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs._read(self.details, start, min(end, self.size))

    def _initiate_upload(self) -> None:
        fd, self._spool_path = tempfile.mkstemp(prefix=".lit-upload-", dir=self.fs.spool_dir)
        self._spool = os.fdopen(fd, "wb")

    def _upload_chunk(self, final: bool = False) -> bool:
        self._spool.write(self.buffer.getbuffer())
        if final:
            self._spool.close()
            if self.autocommit:
                self.commit()
        return True

    def commit(self) -> None:
        """Puts the spooled file (one atomic put), then removes the spool."""
        if self._spool_path is None:
            return
        try:
            self.fs._put_local(self._spool_path, self.path)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drops the spooled bytes without putting them."""
        if self._spool is not None:
            self._spool.close()
        if self._spool_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._spool_path)
        self._spool = self._spool_path = None

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        if exc_type is not None and self.writable():
            self.discard()  # an exception inside `with`: store nothing
            self.closed = True
            return
        self.close()
