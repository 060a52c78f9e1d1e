"""Chunked, checksummed streaming of files into a Put stream and out of a Get stream.

Every byte sent is summed with CRC32C, and every byte received is checked
against the daemon's CRC32C of it (`checksums` set on each Get). With
`sha256=True` the sha256 is computed too: sent with a put, checked on a get
(`Drive(..., verify="sha256")`).

Memory per transfer is a few chunks on this side (`ReadAhead` holds at most
`depth`); gRPC's flow control bounds what is in flight.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import queue
import secrets
import threading
import unicodedata
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import Any, BinaryIO, Generic, TypeVar

import grpc
from crc32c import crc32c

from .checksums import joined_crc32c
from .errors import (
    AlreadyExists,
    DataLoss,
    DriveError,
    InvalidArgument,
    IsADirectory,
    LocalFileError,
    NotADirectory,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StaleIndexError,
)
from .files import Version, version, write_all
from .handoff import GET, hand_over
from .pb import drive_pb2 as pb
from .uri import normalize_path
from .wire import SMALL_FILE, Chunk, GetMessage, PutMessage, chunk_of

CHUNK_SIZE = 1 << 20
T = TypeVar("T")
Progress = Callable[[int], None]  # called with the number of bytes each time some move
_END = object()


class ReadAhead(Generic[T]):
    """Iterates `items` in a thread of its own, at most `depth` items ahead of the consumer.

    Lets disk reads and hashing overlap with gRPC sending (or gRPC receiving
    with disk writes). An exception of `items` is re-raised to the consumer
    and kept in `.error` (gRPC hides what a request iterator raised).
    """

    def __init__(self, items: Iterable[T], depth: int = 2, first_alone: bool = False) -> None:
        """`first_alone`: the consumer gets no item after the first until `held` (see there)."""
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._held = threading.Event()
        if not first_alone:
            self._held.set()
        producing = threading.Thread(target=self._produce, args=(iter(items),), daemon=True, name="drive-read-ahead")
        try:
            producing.start()
        except BaseException:  # a Ctrl-C once the thread runs: the caller never gets this to stop it
            self.stop()
            raise

    def _until_stopped(self, step: Callable[[float], Any], busy: type[Exception]) -> Any:
        """`step(timeout)`, a put or get of the queue, tried again while it finds the queue `busy` (full, empty);
        `_END` once `stop`ped: after it, the producer hands on nothing more, not even the end."""
        while not self._stopped.is_set():
            try:
                return step(0.1)
            except busy:
                continue
        return _END

    def _offer(self, item: Any) -> bool:
        return self._until_stopped(lambda timeout: self._queue.put(item, timeout=timeout), queue.Full) is not _END

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._offer(item):
                    return
        except BaseException as err:  # handed to the consumer
            self.error = err
        finally:
            if isinstance(items, Generator):  # now, not when collected: it may hold a file or a stream open
                items.close()
        self._offer(_END)

    def held(self) -> None:
        """Lets the items after the first through: the caller holds the call that consumes them, and can stop it.
        A call started in another thread, which a Ctrl-C in its start leaves to itself, then ends after its first
        message (a Put's header: the daemon stores nothing of a file without its finish)."""
        self._held.set()

    def _wait_held(self, timeout: float) -> None:
        if not self._held.wait(timeout):
            raise TimeoutError

    def __iter__(self) -> Generator[T, None, None]:
        try:
            while (item := self._until_stopped(lambda timeout: self._queue.get(timeout=timeout),
                                               queue.Empty)) is not _END:
                yield item
                if not self._held.is_set() and self._until_stopped(self._wait_held, TimeoutError) is _END:
                    return
            if self.error is not None:
                raise self.error
        finally:
            self.stop()

    def stop(self) -> None:
        """Ends the producing thread, and the iteration of a consumer in another thread (a cancelled call's)."""
        self._stopped.set()


def local_files(local: Path, remote: str) -> list[tuple[Path, str]]:
    """(local file, drive path) for a file, or for every file under a folder, sorted.

    Each file's drive path is checked here (`normalize_path`): a name no drive path can be (not UTF-8, a
    control character, too long) is refused before any file is sent, naming it, and so are two files whose
    names differ only by their Unicode normalisation, which a drive keeps as one path (`uri.drive_path`). A folder
    or file that cannot be read is the DriveError of its error (`_read_errors`).
    """
    with _read_errors(local, "nothing was stored"):
        return _files_under(local, remote)


def _files_under(local: Path, remote: str) -> list[tuple[Path, str]]:
    """`local_files`, raising the errors of the local file system as they are."""
    if local.is_file():
        return [(local, remote)]
    if not local.is_dir():
        if local.exists():  # a pipe, a socket or a device: no size to announce, nothing to read again after a cut
            raise InvalidArgument(f"local path {str(local)!r} is not a file or a folder: put a file (write the "
                                  "pipe's bytes to one first)")
        raise NotFound(f"local path {str(local)!r} does not exist: nothing to put")
    pairs = []
    # A link is followed, to a folder as to a file: a put stores what reading the folder shows. Each folder to walk
    # knows the folders it is in, by identity, so that a link to one of them is refused, not followed for good.
    within = {os.fspath(local): frozenset({_identity(local)})}  # a folder to walk: it and the folders it is in
    for folder, dirs, names in _walk(os.fspath(local)):
        inside = within.pop(folder)
        for name in dirs:
            sub = os.path.join(folder, name)
            if (identity := _identity(sub)) in inside:
                raise InvalidArgument(f"local path {sub!r} is a link to a folder that holds it: a folder put would "
                                      "follow it for good; remove it, or put the folder's other files by themselves")
            within[sub] = inside | {identity}
        for name in names:  # a link to nothing, a pipe, a socket or a device holds no file: passed by
            path = Path(folder, name)
            if path.is_file():
                rel = path.relative_to(local).as_posix()
                pairs.append((path, normalize_path(f"{remote}/{rel}" if remote else rel)))
    pairs.sort(key=lambda pair: (unicodedata.normalize("NFC", pair[1]), pair[1]))
    for (first, first_remote), (second, second_remote) in itertools.pairwise(pairs):
        if unicodedata.normalize("NFC", first_remote) == unicodedata.normalize("NFC", second_remote):
            raise InvalidArgument(f"local files {str(first)!r} and {str(second)!r} are one drive path: a drive keeps "
                                  "names in Unicode NFC, so their names, which differ only by their normalisation, "
                                  "name one file; rename one of them")
    return pairs


def _identity(path: str | Path) -> tuple[int, int]:
    """The folder `path` is, or links to, as its device and inode numbers."""
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(top, followlinks=True)`, each folder before those in it, raising what it meets (a subfolder it may
    not read: os.walk would pass by its files), and without os.walk's recursion (once a level before Python 3.12):
    a drive path may be some 2,000 folders deep, past Python's recursion limit."""
    pending = [top]
    while pending:
        folder = pending.pop()
        dirs: list[str] = []
        names: list[str] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:  # as os.walk: what cannot be told a folder is walked as a file
                    is_dir = False
                (dirs if is_dir else names).append(entry.name)
        yield folder, dirs, names
        pending += (os.path.join(folder, name) for name in reversed(dirs))




def put_requests(
    header: pb.PutHeader, files: Iterable[tuple[Path, str]], upload_ids: Iterable[str] = (), offset: int = 0,
    chunk_size: int = CHUNK_SIZE, progress: Progress | None = None, sha256: bool = False,
    versions: dict[Path, Version] | None = None, handoff: int | None = None,
) -> Iterator[PutMessage]:
    """The messages of one Put stream carrying `files`, each with a header copied from `header`.

    A file of at most `SMALL_FILE` bytes goes as one message; a bigger one as
    its header, its chunks and a finish with their CRC32C (and sha256, with
    `sha256`). Data chunks are plain bytes (see `wire`): a stub from
    `wire.fast_stub` sends them. `upload_ids`, one per file, make the files
    resumable; the first file's bytes then start at `offset` (a resume: the
    bytes before it are read again to checksum the whole file, not sent).
    `versions` keeps each file's version at its first open over the streams of
    one put: a file changed between them is refused as one changed during a
    stream is (the daemon may hold bytes of the earlier version).
    `handoff`: the port of a daemon on this host that a file sent from its
    first byte is handed to (`drive_client.handoff`), its header then its only
    message before its finish, which carries no checksums; one the daemon
    does not take is sent as bytes.
    """
    ids = iter(upload_ids)
    for local, remote in files:
        upload_id, start, offset = next(ids, ""), offset, 0
        with _read_errors(local, "nothing of it was stored"), _open_to_put(local) as f:
            opened = _version(f)
            if versions is not None:
                opened = versions.setdefault(local, opened)
                _check_unchanged(f, opened, local)
            size = opened[0]
            if size <= SMALL_FILE:
                request = _whole_file_request(f, opened, header, local, remote, sha256)
                request.header.upload_id = upload_id
                yield pb.PutRequest(file=request)
                if progress:
                    progress(size)
                continue
            file_header = pb.PutHeader()
            file_header.CopyFrom(header)
            file_header.path = remote
            file_header.size = size
            file_header.upload_id = upload_id
            file_header.write_offset = start
            if not start and handoff is not None:
                file_header.handoff = hand_over(handoff, f.fileno()) or ""
            yield pb.PutRequest(header=file_header)
            if file_header.handoff:  # the daemon reads the file: its finish carries no checksums
                finish = pb.PutFinish()
                if progress:
                    progress(size)
            else:
                finish = yield from _chunks(f, size, start, chunk_size, progress, sha256)
            _check_unchanged(f, opened, local)  # before the finish: without it the daemon commits nothing
        yield pb.PutRequest(finish=finish)


def _chunks(f: BinaryIO, size: int, start: int, chunk_size: int, progress: Progress | None, sha256: bool
            ) -> Generator[Chunk, None, pb.PutFinish]:
    """The chunks of the `size` bytes of `f` after its first `start`, which are read and summed but not sent; returns
    the finish, with the checksums of all `size`."""
    crc, digest = 0, hashlib.sha256() if sha256 else None
    position = 0
    while position < size:  # never past the size announced: a file that grows is refused by the caller, as changed
        chunk = f.read(min(chunk_size, (start if position < start else size) - position))
        if not chunk:  # the file shrank: refused by the caller
            break
        position += len(chunk)
        crc = crc32c(chunk, crc)
        if digest is not None:
            digest.update(chunk)
        if position <= start:  # held by the daemon already: summed, not sent
            continue
        yield chunk
        if progress:
            progress(len(chunk))
    return pb.PutFinish(crc32c=crc, sha256=digest.hexdigest() if digest else "")


def _open_to_put(local: Path) -> BinaryIO:
    """Opens a local file a put listed; one removed since is `NotFound`, as a put of a missing path is, and one
    replaced by a pipe or a device is `InvalidArgument`, as a put of one is. The open does not wait
    (O_NONBLOCK): that of a pipe waits for a writer, for good."""
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise NotFound(f"local path {str(local)!r} was removed while the put ran (nothing of it was stored): "
                       "put it again once it is there") from err
    if not S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"local path {str(local)!r} is not a file (a pipe or a device took its place while the "
                              "put ran; nothing of it was stored): put it again once it is one")
    os.set_blocking(fd, True)
    return open(fd, "rb")


def _version(f: BinaryIO) -> Version:
    return version(os.fstat(f.fileno()))


def _check_unchanged(f: BinaryIO, opened: Version, local: Path) -> None:
    """Refuses a file written to since it was opened (`_version`): the bytes read may mix two versions of it,
    which their CRC32C, summed as they were read, would not reveal. A write in the clock tick of the open
    may keep the times, so a file being written to is put only once its writer is done."""
    if _version(f) != opened:
        raise StaleIndexError(f"the local file {str(local)!r} changed while it was being put (its size, modification "
                              "or change time moved; nothing of it was stored): put it again once it is written")


def small_file_request(header: pb.PutHeader, local: Path, remote: str, sha256: bool = False
                       ) -> pb.PutFileRequest | None:
    """A PutFile request carrying the whole of `local`, or None when it is bigger than `SMALL_FILE`."""
    with _read_errors(local, "nothing of it was stored"), _open_to_put(local) as f:
        opened = _version(f)
        if opened[0] > SMALL_FILE:
            return None
        return _whole_file_request(f, opened, header, local, remote, sha256)


def _whole_file_request(f: BinaryIO, opened: Version, header: pb.PutHeader, local: Path, remote: str,
                        sha256: bool) -> pb.PutFileRequest:
    """`put_file_request` of the whole of the small file `f`, refused if it changed since it was `opened`."""
    data = f.read()
    _check_unchanged(f, opened, local)
    return put_file_request(header, remote, data, sha256)


def put_file_request(header: pb.PutHeader, remote: str, data: bytes, sha256: bool = False) -> pb.PutFileRequest:
    """A whole small file in one message (a PutFile request, or a `file` in a Put stream), with its CRC32C (and
    sha256, with `sha256`)."""
    request = pb.PutFileRequest(data=data, crc32c=crc32c(data), sha256=hashlib.sha256(data).hexdigest() if sha256
                                else "")
    request.header.CopyFrom(header)
    request.header.path = remote
    request.header.size = len(data)
    return request


# Temporary names: the process id (read each time: a forked child gets its own), a random
# token and a counter tell apart every file being received on this machine. They keep only
# the start of the target's name (at most 128 bytes), so a target name as long as the file
# system allows (255 bytes) still gives a temporary name it allows.
_TMP_NAME_PREFIX = 32  # characters
_TMP_TOKEN = secrets.token_hex(4)
_tmp_numbers = itertools.count()


def _make_folders(folder: Path) -> None:
    """`folder.mkdir(parents=True, exist_ok=True)` a level at a time: pathlib's (as os.makedirs) recurses once a
    missing level, and a drive path may be some 2,000 folders deep, past Python's recursion limit."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(exist_ok=True)


class _Receiving:
    """One file being received into a temporary file beside its target, summed with CRC32C (and sha256).

    `made` holds the folders known to exist (shared by the files of one get),
    so a folder of many files does not re-create its parents for each. Each
    byte is summed once: the CRC32C of the bytes of the stream that carries
    them (checked against the daemon's), joined to that of the earlier
    streams of the file when a cut stream was resumed (checked against the
    stored CRC32C of the whole file).
    """

    def __init__(self, info: pb.FileInfo, target: Path, overwrite: bool, made: set[Path] | None = None,
                 sha256: bool = False) -> None:
        self.info = info
        self.target = target
        self.overwrite = overwrite
        parent = target.parent
        if made is None or parent not in made:
            with _local_errors(target):
                try:
                    _make_folders(parent)
                except (FileExistsError, NotADirectoryError) as err:
                    # An s3:// bucket may hold an object `x/a` and objects below `x/a/`: one folder cannot hold both.
                    raise NotADirectory(
                        f"{info.path!r} cannot be written to {str(target)!r}: a file is in the way at "
                        f"{err.filename!r} or above it, where a folder is needed (a drive may hold a file and files "
                        "below it by one name, as an s3:// bucket may: get those by their paths to other places)"
                    ) from err
            if made is not None:
                made.add(parent)
        refuse_special_file(target)
        self.tmp = parent / f".{target.name[:_TMP_NAME_PREFIX]}.{os.getpid()}-{_TMP_TOKEN}-{next(_tmp_numbers)}.part"
        with _local_errors(target):  # a new file, as a new folder, takes an inode and room for its name
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.digest = hashlib.sha256() if sha256 else None
        self.crc32c = 0  # of the bytes since the file's start, or since the last `resumed`
        self.size = 0
        self.earlier_crc32c = 0  # of the bytes before the last `resumed`
        self.earlier_size = 0

    def resumed(self) -> None:
        """The bytes from here on come from a stream that resumed the file: the daemon's CRC32C covers them."""
        self.earlier_crc32c, self.earlier_size = self.whole_crc32c(), self.size
        self.crc32c = 0

    def whole_crc32c(self) -> int:
        """The CRC32C of all the bytes so far."""
        return joined_crc32c(self.earlier_crc32c, self.crc32c, self.size - self.earlier_size)

    def write(self, data: Chunk) -> None:
        self.crc32c = crc32c(data, self.crc32c)
        if self.digest is not None:
            self.digest.update(data)
        with _local_errors(self.target):
            write_all(self.fd, data)
        self.size += len(data)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def finish(self, crc: int | None) -> Path:
        """Verifies what arrived and moves it into place: replacing a file there with `overwrite`, else only where
        none is.

        Checks the size, the CRC32C against `crc` (the daemon's, of the bytes
        it sent since the file's start, or since it was `resumed`; None when
        the caller checked the bytes already, range by range), the whole
        file's against the stored CRC32C in its info, where the daemon knows
        one, and, when summed, the sha256 against the stored one.
        """
        self._close()
        if self.size != self.info.size:
            raise DataLoss(
                f"{self.info.path!r}: received {self.size} of {self.info.size} bytes; try again",
                grpc.StatusCode.DATA_LOSS,
            )
        if crc is not None and crc != self.crc32c:
            raise crc32c_mismatch(self.info.path)
        if self.info.HasField("crc32c") and self.info.crc32c != self.whole_crc32c():
            raise stored_crc32c_mismatch(self.info.path)
        if self.digest is not None and self.info.sha256 and self.digest.hexdigest() != self.info.sha256:
            raise DataLoss(
                f"{self.info.path!r}: received bytes do not match the stored sha256; try again",
                grpc.StatusCode.DATA_LOSS,
            )
        with _local_errors(self.target):  # a link, or a rename, may need room in the folder for the target's name
            if self.overwrite or not _linked(self.tmp, self.target):
                os.replace(self.tmp, self.target)
        return self.target

    def discard(self) -> None:
        self._close()
        # The .part file went with its folder when that was removed, or a file put in its place, while the get ran.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.tmp.unlink()


def refuse_special_file(target: Path) -> None:
    """Refuses a get's `target` that is a device, a pipe or a socket. A get puts a whole file in the target's
    place, and in the place of a device it would remove the device (run as root, /dev/null itself); written into
    instead, it would no longer be all or nothing. A target the system cannot look at (a path past its length)
    is the DriveError of its error (`_local_errors`)."""
    with _local_errors(target):
        try:
            mode = os.lstat(target).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return
    if not (S_ISREG(mode) or S_ISLNK(mode) or S_ISDIR(mode)):
        raise InvalidArgument(
            f"local path {str(target)!r} is a device, a pipe or a socket: a get replaces only a file or a link "
            "(to write a file's bytes into it, `drive get LOCATION -` > it, or Drive.read_range)"
        )


# What link(2) answers on a file system without hard links: EPERM (FAT), EOPNOTSUPP, ENOSYS (a FUSE file system
# that has no link) or EACCES (some FUSE and network file systems). EPERM and EACCES cannot be the folder's own
# permissions, which let the temporary file be made in it; and the rename that follows meets those checks itself.
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES})


def _linked(tmp: Path, target: Path) -> bool:
    """Links `tmp` at `target`, then removes `tmp`; answers False on a file system without hard links (`_NO_LINKS`),
    where the caller renames instead. A link, unlike a rename, fails where a file is: one made since the get
    checked its target (`core._get_request`) is left as it is. Without links, a file there now is refused alike;
    only one made in the instant before the rename would be replaced."""
    try:
        os.link(tmp, target)
    except OSError as err:
        if err.errno != errno.EEXIST and err.errno not in _NO_LINKS:
            raise
        if err.errno == errno.EEXIST or os.path.lexists(target):
            raise AlreadyExists(f"local path {str(target)!r} was made while the get ran: it is left as it is; pass "
                                "overwrite=True (`drive get --overwrite`) to replace it") from None
        return False
    tmp.unlink()
    return True


# The DriveError each error of the local file system becomes, by the built-in type it keeps; any other becomes a
# `LocalFileError`. Each is an OSError too, typed as one for the fields `_local_errors` sets. A FileExistsError never
# reaches `_local_errors`: `_linked` and the making of the folders answer theirs.
_LOCAL_ERRORS: dict[type[OSError], type[OSError]] = {
    PermissionError: PermissionDenied, FileNotFoundError: NotFound, NotADirectoryError: NotADirectory,
    IsADirectoryError: IsADirectory,
}


@contextlib.contextmanager
def _local_errors(target: Path) -> Iterator[None]:
    """Raises an error of the local file system, met while a get makes, writes or moves `target`, as a DriveError
    naming `target`: a full disk as `ResourceExhausted`, the error of a full disk on the daemon's side, so that a
    caller handles both alike; any other as the DriveError of its built-in type (`_LOCAL_ERRORS`), which keeps the
    system's `errno`, `strerror` and `filename`, so that a caller catching `OSError` or its subclass still does."""
    try:
        yield
    except DriveError:
        raise
    except OSError as err:
        kept = "nothing of it was kept, an existing file is as it was"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"the local disk is full: {str(target)!r} could not be written ({kept}): free "
                                    "some space and get it again") from err
        raise _local_error(err, f"{str(target)!r} could not be written", kept) from err


@contextlib.contextmanager
def _read_errors(local: Path, stored: str) -> Iterator[None]:
    """Raises an error of the local file system, met while a put lists or reads `local`, as a get's are raised
    (`_local_errors`): the DriveError of its built-in type, else `LocalFileError`, naming the path (the system's,
    when it names one) and saying what was `stored`."""
    try:
        yield
    except DriveError:
        raise
    except OSError as err:
        raise _local_error(err, f"local path {str(err.filename or local)!r} could not be read", stored) from err


def _local_error(err: OSError, failed: str, outcome: str) -> OSError:
    """The DriveError of `err`'s built-in type (`_LOCAL_ERRORS`), saying what `failed`, the system's reason and the
    `outcome`, with the system's `errno`, `strerror` and `filename`."""
    error = _LOCAL_ERRORS.get(type(err), LocalFileError)(f"{failed}: {err.strerror or err} ({outcome})")
    error.errno, error.strerror, error.filename = err.errno, err.strerror, err.filename
    return error


def crc32c_mismatch(path: str) -> DataLoss:
    """The error of bytes that arrived damaged: they differ from what the daemon checked and sent."""
    return DataLoss(
        f"{path!r}: the bytes received do not match the CRC32C the daemon sent with them (damaged on the way); "
        "nothing was kept, try again", grpc.StatusCode.DATA_LOSS,
    )


def stored_crc32c_mismatch(path: str) -> DataLoss:
    """The error of a file whose bytes passed the CRC32C of each stream that carried them but not the one stored
    with it: bytes a cut stream carried before its CRC32C came were damaged on the way, or the stored copy is
    damaged where the daemon does not check what it reads (the ranges of a parallel get of a file that an earlier
    drived put through --storage, with no block table)."""
    return DataLoss(
        f"{path!r}: the bytes received do not match the CRC32C stored with the file: its stored copy is damaged, "
        "or bytes were damaged on the way before a stream was cut; nothing was kept. Try again: if this comes "
        "again, the stored copy is damaged: put the file again, or restore it from a backup",
        grpc.StatusCode.DATA_LOSS,
    )


def no_crc32c(path: str) -> DataLoss:
    """The error of a file whose bytes came without the CRC32C a get asks for (`GetRequest.checksums`)."""
    return DataLoss(
        f"{path!r}: the daemon sent no CRC32C with the file's bytes, so they cannot be checked: it is older than "
        "this client; upgrade the daemon", grpc.StatusCode.DATA_LOSS,
    )


def receive_files(
    responses: Iterable[GetMessage], target_of: Callable[[str], Path], overwrite: bool,
    progress: Progress | None = None, sha256: bool = False,
) -> int:
    """Writes the files of a Get stream that asked for `checksums`; `target_of` maps a file's drive path to its
    local path. Answers how many it wrote.

    Each file goes to a temporary file beside its target and is renamed into
    place once complete and its CRC32C matches the daemon's (and, with
    `sha256`, its sha256 the stored one); a failure leaves no partial file
    and every existing target as it was. A local file of a target's name is
    replaced with `overwrite`, else it is an error (`AlreadyExists`). The
    files of a folder written before a failure are kept: its error says how
    many.
    """
    written = 0
    made: set[Path] = set()
    current: _Receiving | None = None
    try:
        for message in responses:
            data = chunk_of(message)
            if data is not None:
                if current is None:
                    raise DataLoss("the server sent data before the file's info", grpc.StatusCode.DATA_LOSS)
                current.write(data)
                if progress:
                    progress(len(data))
                continue
            kind = message.WhichOneof("message")  # type: ignore[union-attr]
            if kind == "crc32c":
                if current is None:
                    raise DataLoss("the server sent a CRC32C before the file's info", grpc.StatusCode.DATA_LOSS)
                current.finish(message.crc32c)  # type: ignore[union-attr]
                written += 1
                current = None
            elif current is not None and kind == "info" and message.info.path == current.info.path:  # type: ignore[union-attr]
                current.resumed()  # a cut stream goes on with a ranged read (`resume.GetPosition`)
            elif current is not None:  # the next file began before this one's CRC32C
                raise no_crc32c(current.info.path)
            elif kind == "file":
                whole = message.file  # type: ignore[union-attr]
                current = _Receiving(whole.info, target_of(whole.info.path), overwrite, made, sha256)
                current.write(whole.data)
                if progress:
                    progress(len(whole.data))
                if not whole.HasField("crc32c"):
                    raise no_crc32c(whole.info.path)
                current.finish(whole.crc32c)
                written += 1
                current = None
            else:
                info = message.info  # type: ignore[union-attr]
                current = _Receiving(info, target_of(info.path), overwrite, made, sha256)
        if current is not None:
            raise no_crc32c(current.info.path)
    except DriveError as err:
        if written:
            err.message += f" (the get wrote {written} file(s) of the folder before this error; they are kept)"
        raise
    finally:
        if current is not None:
            current.discard()
    return written


def fetch_handed(info: pb.FileInfo, target: Path, overwrite: bool, port: int,
                 written: Callable[[str], pb.HandedWrite], progress: Progress | None = None) -> Path | None:
    """Fetches one file through the daemon of `port` on this host (`drive_client.handoff`): hands it the temporary
    file, open for writing, that `fetch_in_ranges` would write, has `written(token)` run the Get that makes the
    daemon write the file's bytes into it and answer what it wrote, checks that (the size, and the CRC32C against
    the stored one) and moves the file into place (`overwrite`: see `receive_files`).

    None, with no file left, when the daemon does not take the file: the
    caller fetches it itself. Whatever `written` raises is raised, with no
    file left either.
    """
    receiving = _Receiving(info, target, overwrite)
    try:
        token = hand_over(port, receiving.fd, GET)
        if token is None:
            receiving.discard()
            return None
        answer = written(token)
        receiving.size, receiving.crc32c = answer.size, answer.crc32c
        fetched = receiving.finish(None)
    except BaseException:
        receiving.discard()
        raise
    if progress:
        progress(info.size)
    return fetched


PARALLEL_MIN_SIZE = 64 << 20  # files at least this big are fetched over several streams
RANGE_BLOCK = 16 << 20  # bytes per ranged read
RANGE_STREAMS = 4


def fetch_in_ranges(
    info: pb.FileInfo, target: Path, read_range: Callable[[int, int, Callable[[int], None]], Iterable[Chunk]],
    overwrite: bool, stop: Callable[[], object], streams: int = RANGE_STREAMS, progress: Progress | None = None,
    sha256: bool = False,
) -> Path:
    """Fetches one file as blocks read by `streams` concurrent ranged reads, then verifies and moves it into place
    (`overwrite`: see `receive_files`).

    `read_range(offset, length, summed)` yields the bytes of one block and
    checks their CRC32C (DataLoss at its end otherwise), then calls
    `summed` with the CRC32C of the whole block; it must pin the version
    (if_match), so blocks of different versions never mix. The blocks'
    CRC32Cs, joined, are the file's, checked against the stored one (this
    covers the bytes a cut stream carried, which its block's check does
    not). The blocks are written in place; with `sha256`, this thread
    hashes the file behind them, in order, from the page cache. Memory: a
    chunk per stream. Interrupted (Ctrl-C), it calls `stop`, which must make
    the reads under way raise at once, and leaves no file.
    """
    receiving = _Receiving(info, target, overwrite, sha256=sha256)
    digest = receiving.digest
    fd = receiving.fd
    offsets = list(range(0, info.size, RANGE_BLOCK))
    pending = iter(offsets)
    finished: dict[int, int] = {}  # the CRC32C of each block read whole, by offset
    errors: list[BaseException] = []
    changed = threading.Condition()
    # One write at a time: the kernel serialises writes to one file anyway, and its
    # waiters spin where ours sleep (bench/WHY.md).
    writing = threading.Lock()

    def fetch_blocks() -> None:
        try:
            while not errors:
                with changed:
                    offset = next(pending, None)
                if offset is None:
                    return
                position, end = offset, min(offset + RANGE_BLOCK, info.size)
                summed: list[int] = []
                for data in read_range(offset, end - offset, summed.append):
                    with writing, _local_errors(target):
                        if errors:  # stopped: the file may be closed, and its number another file's
                            return
                        os.pwrite(fd, data, position)
                    position += len(data)
                    if progress:
                        progress(len(data))
                if position != end:
                    raise DataLoss(f"{info.path!r}: a ranged read ended early; try again", grpc.StatusCode.DATA_LOSS)
                with changed:
                    finished[offset] = summed[0]
                    changed.notify_all()
        except BaseException as err:  # handed to the hashing thread
            with changed:
                errors.append(err)
                changed.notify_all()

    workers = [threading.Thread(target=fetch_blocks, daemon=True) for _ in range(min(streams, len(offsets)))]
    try:
        with _local_errors(target):  # a file system may not hold a file this big (FAT: 4 GiB)
            os.ftruncate(fd, info.size)
        for worker in workers:
            worker.start()
        for offset in offsets:
            with changed:
                changed.wait_for(lambda o=offset: o in finished or bool(errors))  # type: ignore[misc]
                if errors:
                    raise errors[0]
            end = min(offset + RANGE_BLOCK, info.size)
            receiving.crc32c = joined_crc32c(receiving.crc32c, finished[offset], end - offset)
            if digest is not None:
                for position in range(offset, end, CHUNK_SIZE):
                    digest.update(os.pread(fd, min(CHUNK_SIZE, end - position), position))
        receiving.size = info.size
        return receiving.finish(None)
    except BaseException:
        receiving.tmp.unlink(missing_ok=True)  # first: a second Ctrl-C while the workers end leaves no file either
        errors.append(InterruptedError("stopped"))  # the workers write nothing more, and take no other block
        stop()  # their reads raise now, not once their block, or their retries of a daemon gone, end
        try:
            for worker in workers:
                if worker.is_alive():  # none is started when sizing the file failed
                    worker.join()
        finally:
            with writing:
                receiving.discard()
        raise
