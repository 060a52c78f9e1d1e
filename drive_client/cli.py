"""`drive`: the command line for people.

    drive ls [-r] lit://drive_1[/folder]   drive put LOCAL lit://drive_1[/path]
    drive get lit://drive_1/path [LOCAL]   drive rm lit://drive_1/path
    drive stat lit://drive_1/path          drive mount s3://bucket/prefix/

A LOCAL of `-` is stdin (put) or stdout (get), as for cat and `aws s3 cp`; `./-` is a local file of that name.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

from .channels import add_tls_arguments
from .common import VERIFY, FileStat
from .drive import Drive
from .errors import DataLoss, DriveError, InvalidArgument, IsADirectory, LocalFileError
from .files import write_all
from .malloc import keep_transfer_buffers
from .progress import ProgressBar
from .transfer import CHUNK_SIZE, local_files
from .uri import normalize_path

STDIO = "-"  # a LOCAL of put (stdin) or get (stdout)


class UsageError(InvalidArgument):
    """A command line argparse cannot read: a missing or unknown argument, a value of the wrong type."""


class _Parser(argparse.ArgumentParser):
    """Raises what it cannot read, for `main` to print as it prints every error (one line, or JSON with --json),
    where argparse prints its usage and exits. Its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _given(value: str) -> str:
    """An argument's value, refused when empty: `--component "$C"` or `put "$F" ...` with $C or $F unset means some
    component or file, where an empty value would be taken for one not given (the default component, every one for
    --only, the current folder for a put's LOCAL, the drive path's name for a get's)."""
    if not value:
        raise argparse.ArgumentTypeError("is empty (an unset variable?): give a value, or leave an option out for "
                                         "its default")
    return value


def split_uri(uri: str, folder: bool) -> tuple[str, str]:
    """(drive URI, path) of a CLI location like `lit://d/a/b` or `s3://bucket/data/x.bin`.

    For s3 the drive is the location's folder (`folder`: the whole location
    is a folder), so only that prefix is indexed; otherwise the drive is the
    folder above the object or folder named, with or without its trailing '/'.
    """
    if uri.startswith("lit://"):
        name, _, path = uri[len("lit://"):].partition("/")
        return f"lit://{name}", path
    if uri.startswith("s3://"):
        if folder:
            return (uri if uri.endswith("/") else uri + "/"), ""
        head, slash, name = uri[len("s3://"):].rstrip("/").rpartition("/")
        if not slash:
            raise InvalidArgument(f"{uri!r} is a whole bucket: give an object's key, or a folder in it")
        return f"s3://{head}/", name
    raise InvalidArgument(f"unsupported location {uri!r}: use lit://DRIVE/PATH or s3://bucket/key")


def _drive(uri: str, args: argparse.Namespace) -> Drive:
    return Drive(
        uri, component_name=args.component, endpoint=args.endpoint, allow_duplicates=args.allow_duplicates,
        token=args.token, verify=args.verify, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, insecure=args.insecure, retry_seconds=args.retry_seconds,
    )


def _progress(args: argparse.Namespace, label: str, total: int) -> ProgressBar | None:
    """A progress bar on a terminal; none when quiet, with --json, or when stderr is not a TTY."""
    if args.quiet or args.json or not sys.stderr.isatty():
        return None
    return ProgressBar(label, total)


def run(args: argparse.Namespace) -> Any:
    """Runs one subcommand; returns what --json prints (a listing: an iterator of its entries); the plain output
    is printed here."""
    if args.command == "ls":
        drive_uri, path = split_uri(args.location, folder=True)
        entries = _drive(drive_uri, args).entries(path or ".", args.only, args.recursive)
        if args.json:
            return map(_stat_fields, entries)
        for entry in entries:
            print(entry.path)
        return None
    if args.command == "put":
        drive_uri, path = split_uri(args.location, folder=False)
        if args.local != STDIO:
            local = Path(args.local)
            if not path or path.endswith("/"):
                path += local.resolve().name
            return _put(args, drive_uri, local, path)
        if not path or path.endswith("/"):
            raise InvalidArgument(f"stdin has no name: give the drive path to store it at, e.g. {drive_uri}/{path}"
                                  "x.tar (nothing was read)")
        normalize_path(path)  # refused before stdin is read
        with _stdin_spooled(_progress(args, "read stdin", 0)) as spool:
            return _put(args, drive_uri, spool, path)
    if args.command == "get":
        drive_uri, path = split_uri(args.location, folder=False)
        remote = normalize_path(path)
        if args.local == STDIO:
            _get_to_stdout(args, _drive(drive_uri, args), remote)
            return None
        target = Path(args.local) if args.local else Path(remote.rsplit("/", 1)[-1])
        if target.is_dir() and args.local:  # into an existing folder, as cp does: --overwrite replaces what is in it
            target = target / remote.rsplit("/", 1)[-1]
        drive = _drive(drive_uri, args)
        bar = _progress(args, f"get {args.location}", 0)
        try:
            got = drive.get(remote, args.only, args.timeout, args.overwrite, to=target, progress=bar)
        finally:
            if bar:
                bar.close()
        if not args.json:
            print(got)
        return {"path": str(got)}
    if args.command == "rm":
        drive_uri, path = split_uri(args.location, folder=False)
        _drive(drive_uri, args).delete(path)
        return {"deleted": args.location}
    if args.command == "stat":
        drive_uri, path = split_uri(args.location, folder=False)
        fields = _stat_fields(_drive(drive_uri, args).stat(path, component_name=args.only))
        if not args.json:
            print(json.dumps(fields, indent=2, ensure_ascii=False))  # structured either way
        return fields
    drive_uri, _ = split_uri(args.location, folder=True)  # mount
    result = _drive(drive_uri, args).mount()
    if not args.json:
        print(f"indexed {result.objects} objects in {result.seconds:.2f} s")
    return result._asdict()


def _put(args: argparse.Namespace, drive_uri: str, local: Path, path: str) -> Any:
    bar = _progress(args, f"put {args.local}", _local_size(local, path))
    try:
        stored = _drive(drive_uri, args).put(local, to=path, progress=bar)
    finally:
        if bar:
            bar.close()
    if not args.json:
        print(f"put {len(stored)} file(s), {sum(f.size for f in stored)} bytes, into {drive_uri}")
    return [_stat_fields(f) for f in stored]


@contextlib.contextmanager
def _stdin_spooled(bar: ProgressBar | None) -> Iterator[Path]:
    """A temporary file of the system's temp dir ($TMPDIR) holding all of stdin, removed after.

    A put of stdin starts once stdin ends: a put announces its file's size, and after a cut connection it reads
    again the bytes the daemon did not get, which a pipe no longer holds. A chunk at a time goes through memory.
    """
    stdin = _descriptor(sys.__stdin__, "stdin")
    fd, name = tempfile.mkstemp(prefix="drive-put-stdin-")
    try:
        try:
            while chunk := _read(stdin):
                try:
                    write_all(fd, chunk)
                except OSError as err:
                    raise LocalFileError(f"stdin could not be written to {name!r}: {err.strerror or err} (nothing was "
                                         "stored): set TMPDIR to a folder with room for all of it") from err
                if bar:
                    bar(len(chunk))
        finally:
            os.close(fd)
            if bar:
                bar.close()
        yield Path(name)
    finally:
        os.unlink(name)


def _descriptor(stream: TextIO | None, name: str) -> int:
    """The file descriptor of stdin or stdout, read and written as it is, without Python's buffers. Python leaves
    `stream` None when it started with the descriptor closed: the descriptor's number may be a file or a connection
    this process opened since."""
    if stream is None:
        raise LocalFileError(f"{name} is closed: give `-` an open {name}, or a local path instead (nothing was "
                             "read or stored)")
    return stream.fileno()


def _read(stdin: int) -> bytes:
    try:
        return os.read(stdin, CHUNK_SIZE)
    except OSError as err:
        raise LocalFileError(f"stdin could not be read: {err.strerror or err} (nothing was stored)") from err


def _on_stdout(call: Any, *args: Any) -> Any:
    """`call(*args)`, a write to stdout: its failure (a full disk) says it is stdout's, where a built-in OSError
    reads as any local file's. A reader gone stays BrokenPipeError (`main`)."""
    try:
        return call(*args)
    except BrokenPipeError:
        raise
    except OSError as err:
        raise LocalFileError(f"stdout could not be written: {err.strerror or err}") from err


class _Stdout:
    """sys.stdout, whose writes go through `_on_stdout`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return _on_stdout(self._stream.write, text)

    def flush(self) -> None:
        _on_stdout(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _get_to_stdout(args: argparse.Namespace, drive: Drive, remote: str) -> None:
    """Writes a drive file's bytes to stdout as they come; a failure after some were written says how many.

    The file is the version its stat found (`if_match`), whatever puts replace it while it streams; its bytes
    are checked with CRC32C as they come, and with `--verify sha256` its sha256 at the end.
    """
    stdout = _descriptor(sys.__stdout__, "stdout")
    found = drive.stat(remote, args.only)
    if found.folder:
        raise IsADirectory(f"{args.location} is a folder: `-` writes one file's bytes to stdout; get a folder to a "
                           "local path")
    digest = hashlib.sha256() if args.verify == "sha256" and found.sha256 else None
    bar = _progress(args, f"get {args.location}", found.size)
    written = 0
    try:
        for chunk in drive.read_range(remote, 0, None, found.component or None, found.sha256 or found.etag):
            _on_stdout(write_all, stdout, chunk)
            written += len(chunk)
            if digest:
                digest.update(chunk)
            if bar:
                bar(len(chunk))
        if digest and digest.hexdigest() != found.sha256:
            raise DataLoss(f"{args.location}: the bytes received do not match the stored sha256")
    except DriveError as err:
        if written:
            err.message += f" ({written} bytes of it went to stdout before this error: discard them)"
        raise
    finally:
        if bar:
            bar.close()


def _print_json(result: Any) -> None:
    """Prints `result` as JSON, indented; an iterator (a listing's entries) as an array, an item at a time as it
    comes, so that a listing of any size takes a page's memory. Its first item comes before the array begins: an
    error of the first page prints the error alone, as JSON."""
    if not isinstance(result, Iterator):
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    opening = "[\n"
    for item in result:
        print(opening + textwrap.indent(json.dumps(item, indent=2, ensure_ascii=False), "  "), end="")
        opening = ",\n"
    print("[]" if opening == "[\n" else "\n]")


def _local_size(local: Path, remote: str) -> int:
    """Bytes in the files a put of `local` to `remote` sends, as its walk finds them (which raises the put's errors
    of a missing path, a name that is no drive path, ...)."""
    return sum(_file_size(f) for f, _ in local_files(local, remote))


def _file_size(file: Path) -> int:
    """The size of a file the walk found; 0 once it cannot be seen (removed since): the put lists the folder again,
    and passes it by, or reports it, naming it, as it reports any file it cannot read."""
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _stat_fields(stat: FileStat) -> dict[str, Any]:
    return {**stat.__dict__, "modified": stat.modified.isoformat() if stat.modified else None}


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="drive", description="Put, list, get and delete files in drived drives.")
    top.add_argument("--endpoint", type=_given, help="drived address HOST:PORT, or dns:///NAME:PORT for round-robin "
                     "over NAME's addresses (default: $DRIVE_ENDPOINT, else 127.0.0.1:50051)")
    top.add_argument("--component", type=_given, help="your component name (default: $DRIVE_COMPONENT, else 'default')")
    top.add_argument("--token", type=_given, help="bearer token for a daemon started with --token or --auth-tokens "
                     "(default: $DRIVE_TOKEN)")
    add_tls_arguments(top)
    top.add_argument("--insecure", action="store_true", default=None,
                     help="send the token in plaintext to another machine (default: $DRIVE_INSECURE); only on a "
                     "network you trust")
    top.add_argument("--retry-seconds", type=float, metavar="SECONDS",
                     help="how long a transfer, list, stat, delete or mount keeps trying through a network cut or a "
                     "daemon restart (default: $DRIVE_RETRY_SECONDS, else 60; 0: no retries)")
    _add_output_arguments(top, default=False)
    # options of some commands
    top.set_defaults(only=None, allow_duplicates=False, timeout=None, overwrite=False, verify="crc32c")
    commands = top.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list a folder: drive ls [-r] lit://d[/folder]")
    ls.add_argument("location")
    ls.add_argument("-r", "--recursive", action="store_true", help="every file below the folder, not its entries")
    put = commands.add_parser("put", help="store a file or folder: drive put LOCAL lit://d[/path]")
    put.add_argument("local", type=_given)
    put.add_argument("location")
    put.add_argument("--allow-duplicates", action="store_true", help="allow a path another component holds")
    get = commands.add_parser("get", help="fetch a file or folder: drive get lit://d/path [LOCAL]")
    get.add_argument("location")
    get.add_argument("local", nargs="?", type=_given)
    get.add_argument("--timeout", type=float,
                     help="wait up to this many seconds for the path to appear (the transfer after it is not bounded)")
    get.add_argument("--overwrite", action="store_true", help="replace an existing local file")
    for sub in (put, get):
        sub.add_argument(
            "--verify", choices=VERIFY, default="crc32c",
            help="crc32c (default): check every byte moved with CRC32C; sha256: also check (get) or send (put) "
            "each file's sha256",
        )
    commands.add_parser("rm", help="delete your file or folder: drive rm lit://d/path").add_argument("location")
    commands.add_parser("stat", help="describe a file: drive stat lit://d/path").add_argument("location")
    commands.add_parser("mount", help="re-index an s3 drive: drive mount s3://bucket/prefix/").add_argument("location")
    for sub in (ls, get, commands.choices["stat"]):
        sub.add_argument("--only", metavar="COMPONENT", type=_given, help="only this component's files")
    for sub in commands.choices.values():  # given after the subcommand too; when not, the top's value stays
        _add_output_arguments(sub, default=argparse.SUPPRESS)
    return top


def _add_output_arguments(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--json", action="store_true", default=default, help="print results as JSON on stdout "
                        "(for scripts)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
        if args.command == "get" and args.local == STDIO:
            _check_get_to_stdout(args)
    except UsageError as err:  # 2, as argparse and POSIX tools exit on a command line they cannot read
        return _failed(err, _asks_json(argv), 2)
    keep_transfer_buffers()
    signal.signal(signal.SIGTERM, _terminate)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Local paths print as the bytes the system named them with, a name that is not UTF-8 too, as ls prints
        # them: a strict stdout (Python's in a UTF-8 locale) failed on such a name once its get had written it.
        sys.stdout.reconfigure(errors="surrogateescape")
        sys.stdout = cast(TextIO, _Stdout(sys.stdout))
    try:
        result = run(args)
        if args.json:
            _print_json(result)
        sys.stdout.flush()  # a reader gone fails here, not in Python's flush at exit
    except BrokenPipeError:
        return _reader_gone()
    except (DriveError, OSError) as err:
        return _failed(err, args.json, 1)
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT, without the traceback of where it landed
        print("drive: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("drive: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


class _Terminated(BaseException):
    """SIGTERM (`timeout`, a job's end), raised as Ctrl-C raises KeyboardInterrupt: the default action ends the
    process at once, leaving a get's temporary file beside its target and a put's spool of stdin in $TMPDIR."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _check_get_to_stdout(args: argparse.Namespace) -> None:
    """Refuses the options `drive get ... -` cannot keep, before any call."""
    if args.json:
        raise UsageError("--json prints to stdout, where `drive get ... -` writes the file's bytes: leave it out "
                         "(errors go to stderr either way)")
    if args.timeout is not None:
        raise UsageError("--timeout waits in a get to a local path, not to stdout (`-`): get to a file, then read it")


def _asks_json(argv: Sequence[str]) -> bool:
    """Whether a command line that did not parse asks for JSON, read as the whole parse reads `--json` (abbreviated,
    and not after `--`): the arguments that parse read are lost with its error."""
    probe = _Parser(add_help=False)
    probe.add_argument("--json", action="store_true")
    try:
        return bool(probe.parse_known_args(argv)[0].json)
    except UsageError:
        return False


def _failed(err: Exception, as_json: bool, status: int) -> int:
    """Prints `err` on one line of stderr, and as JSON on stdout with --json; answers the exit status."""
    print(f"drive: {err}", file=sys.stderr)
    if as_json:
        code = err.code.name if isinstance(err, DriveError) and err.code else None
        try:
            print(json.dumps({"error": str(err), "code": code, "type": type(err).__name__}), flush=True)
        except BrokenPipeError:
            return _reader_gone()
        except OSError:  # stdout fails (a full disk): stderr has the error
            pass
    return status


def _reader_gone() -> int:
    """Ends quietly when stdout's reader is gone (`drive ls ... | head -1`): answers the status of a tool killed by
    SIGPIPE (128 + 13), with stdout pointed at /dev/null so that Python's flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(main())
