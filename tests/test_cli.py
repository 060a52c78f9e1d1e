"""The `drive` command: each subcommand against the session daemon, and readable one-line
errors with a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import BIN, sha256_hex, snapshot, wait_until

pytestmark = pytest.mark.timeout(60)


def drive_cmd() -> list[str]:
    script = BIN / "drive"
    if script.exists():
        return [str(script)]
    print(f"{script} is not installed (no `pip install -e .` yet): running drive_client.cli via python")
    return [sys.executable, "-c", "import sys; from drive_client.cli import main; sys.exit(main())"]


def run(daemon, *args: str, cwd=None, component: str | None = None, env=None) -> subprocess.CompletedProcess:
    cmd = [*drive_cmd(), "--endpoint", daemon.endpoint]
    if component:
        cmd += ["--component", component]
    full_env = {k: v for k, v in os.environ.items() if k != "DRIVE_COMPONENT"}
    full_env.update(env or {})
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=40, env=full_env)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    return res


def names(res: subprocess.CompletedProcess) -> list[str]:
    """The entries `drive ls` printed, one a line (a trailing '/' marking folders is allowed)."""
    return [line.strip().rstrip("/") for line in res.stdout.splitlines() if line.strip()]


def stat_fields(res: subprocess.CompletedProcess) -> dict[str, str]:
    """`drive stat` output as {field: text}: JSON, or one `field: value` a line."""
    try:
        return {k: str(v) for k, v in json.loads(res.stdout).items()}
    except json.JSONDecodeError:
        pairs = (line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
        return {k.strip(): v.strip() for k, v in pairs}


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


def test_help():
    res = ok(subprocess.run([*drive_cmd(), "--help"], capture_output=True, text=True, timeout=30))
    for word in ("ls", "put", "get", "rm", "stat", "--endpoint", "--component"):
        assert word in res.stdout


def test_put_ls_stat_get_rm(daemon, tmp_path, drive_uri):
    (tmp_path / "a.txt").write_bytes(b"cli content")
    ok(run(daemon, "put", "a.txt", f"{drive_uri}/a.txt", cwd=tmp_path, component="cli_comp"))
    ok(run(daemon, "put", "a.txt", f"{drive_uri}/sub/renamed.txt", cwd=tmp_path, component="cli_comp"))

    ls = ok(run(daemon, "ls", drive_uri))
    assert names(ls) == ["a.txt", "sub"]
    ls_sub = ok(run(daemon, "ls", f"{drive_uri}/sub"))
    assert names(ls_sub) == ["sub/renamed.txt"]

    st = stat_fields(ok(run(daemon, "stat", f"{drive_uri}/a.txt")))
    assert st["sha256"] == sha256_hex(b"cli content")
    assert st["component"] == "cli_comp"
    assert st["size"] == "11"

    out = tmp_path / "out"
    out.mkdir()
    ok(run(daemon, "get", f"{drive_uri}/a.txt", cwd=out))
    assert (out / "a.txt").read_bytes() == b"cli content"
    ok(run(daemon, "get", f"{drive_uri}/sub/renamed.txt", str(out / "local_name.txt")))
    assert (out / "local_name.txt").read_bytes() == b"cli content"

    ok(run(daemon, "rm", f"{drive_uri}/a.txt", component="cli_comp"))
    assert names(ok(run(daemon, "ls", drive_uri))) == ["sub"]


def test_stat_fields(daemon, tmp_path, drive_uri):
    (tmp_path / "s.bin").write_bytes(b"12345")
    ok(run(daemon, "put", "s.bin", f"{drive_uri}/s.bin", cwd=tmp_path))
    fields = stat_fields(ok(run(daemon, "stat", f"{drive_uri}/s.bin")))
    assert (fields["size"], fields["path"], fields["component"]) == ("5", "s.bin", "default")
    assert fields["sha256"] == sha256_hex(b"12345")
    assert fields["modified"].startswith("20")


def test_put_folder_and_get_folder(daemon, tmp_path, drive_uri):
    src = tmp_path / "src" / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("y")
    ok(run(daemon, "put", str(src), f"{drive_uri}/tree"))
    assert names(ok(run(daemon, "ls", f"{drive_uri}/tree"))) == ["tree/sub", "tree/x.txt"]
    out = tmp_path / "out"
    out.mkdir()
    ok(run(daemon, "get", f"{drive_uri}/tree", cwd=out))
    assert (out / "tree" / "x.txt").read_text() == "x"
    assert (out / "tree" / "sub" / "y.txt").read_text() == "y"


# sitecustomize.py of a `drive` whose folder put sees GONE removed just after its first listing of the folder (the
# size count for the progress bar), before it stats the files: as a file another process removes at that moment.
REMOVED_AFTER_LISTING = """
import os
import drive_client.transfer as transfer

listed = transfer.local_files


def local_files(local, remote):
    files = listed(local, remote)
    if os.path.exists({gone!r}):
        os.remove({gone!r})
    return files


transfer.local_files = local_files
"""


def test_a_file_removed_while_a_folder_put_counts_its_bytes_is_passed_by(daemon, tmp_path, drive_uri):
    """The count of the bytes to put stats each file the listing found: one removed meanwhile raised a bare
    FileNotFoundError ("drive: [Errno 2] No such file or directory: ..."). The put lists the folder again and stores
    what is there, as for a file removed before the command."""
    src = tmp_path / "tree"
    src.mkdir()
    (src / "kept.txt").write_text("kept")
    (src / "gone.txt").write_text("gone")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(REMOVED_AFTER_LISTING.format(gone=str(src / "gone.txt")))
    path = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    res = ok(run(daemon, "put", str(src), f"{drive_uri}/tree", env={"PYTHONPATH": path}))
    assert res.stderr == "" and res.stdout.startswith("put 1 file(s), 4 bytes"), res.stdout
    assert not (src / "gone.txt").exists()
    assert names(ok(run(daemon, "ls", f"{drive_uri}/tree"))) == ["tree/kept.txt"]


def test_component_flag_and_env(daemon, tmp_path, drive_uri):
    (tmp_path / "f.txt").write_text("f")
    ok(run(daemon, "put", "f.txt", f"{drive_uri}/f.txt", cwd=tmp_path, component="flag_comp"))
    ok(run(daemon, "put", "f.txt", f"{drive_uri}/g.txt", cwd=tmp_path, env={"DRIVE_COMPONENT": "x"}))
    assert stat_fields(ok(run(daemon, "stat", f"{drive_uri}/f.txt")))["component"] == "flag_comp"
    assert stat_fields(ok(run(daemon, "stat", f"{drive_uri}/g.txt")))["component"] == "x"
    # rm by another component is refused, and the file stays
    res = run(daemon, "rm", f"{drive_uri}/f.txt", component="other_comp")
    assert_one_line_error(res, "f.txt")
    assert names(ok(run(daemon, "ls", drive_uri))) == ["f.txt", "g.txt"]


def test_endpoint_from_env(daemon, tmp_path, drive_uri):
    res = subprocess.run([*drive_cmd(), "ls", drive_uri], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "DRIVE_ENDPOINT": daemon.endpoint})
    ok(res)
    assert res.stdout.strip() == ""


def test_error_get_missing(daemon, tmp_path, drive_uri):
    res = run(daemon, "get", f"{drive_uri}/missing.txt", cwd=tmp_path)
    assert_one_line_error(res, "missing.txt")
    assert list(tmp_path.iterdir()) == []


def test_error_stat_missing(daemon, drive_uri):
    assert_one_line_error(run(daemon, "stat", f"{drive_uri}/missing.txt"), "missing.txt")


def test_error_put_missing_local(daemon, tmp_path, drive_uri):
    res = run(daemon, "put", "nope.txt", f"{drive_uri}/nope.txt", cwd=tmp_path)
    assert_one_line_error(res, "nope.txt")
    assert ok(run(daemon, "ls", drive_uri)).stdout.strip() == ""


def test_error_bad_uri(daemon, tmp_path):
    assert_one_line_error(run(daemon, "ls", "lit://"))
    assert_one_line_error(run(daemon, "ls", "ftp://x"))
    assert_one_line_error(run(daemon, "get", "lit://d/../x", cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_error_existing_local_target(daemon, tmp_path, drive_uri):
    (tmp_path / "e.txt").write_text("remote")
    ok(run(daemon, "put", "e.txt", f"{drive_uri}/e.txt", cwd=tmp_path))
    (tmp_path / "e.txt").write_text("local")
    assert_one_line_error(run(daemon, "get", f"{drive_uri}/e.txt", cwd=tmp_path))
    assert (tmp_path / "e.txt").read_text() == "local"


def test_error_duplicate_put(daemon, tmp_path, drive_uri):
    (tmp_path / "d.txt").write_text("d")
    ok(run(daemon, "put", "d.txt", f"{drive_uri}/d.txt", cwd=tmp_path, component="one"))
    assert_one_line_error(run(daemon, "put", "d.txt", f"{drive_uri}/d.txt", cwd=tmp_path, component="two"))


def test_error_unreachable(tmp_path):
    from conftest import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    res = subprocess.run([*drive_cmd(), "--endpoint", endpoint, "--retry-seconds", "0", "ls", "lit://d"],
                         capture_output=True, text=True, timeout=40)
    assert_one_line_error(res, endpoint)
    get = [*drive_cmd(), "--endpoint", endpoint, "--retry-seconds", "0", "get", "lit://d/x", str(tmp_path / "x")]
    assert_one_line_error(subprocess.run(get, capture_output=True, text=True, timeout=40), endpoint)
    get[get.index("--retry-seconds") + 1] = "1"  # a transfer tries again for that long, saying so on stderr
    res = subprocess.run(get, capture_output=True, text=True, timeout=40)
    *retries, error = res.stderr.strip().splitlines()
    assert res.returncode == 1 and endpoint in error and "Traceback" not in res.stderr
    assert retries and all("trying again in" in line for line in retries)
    assert not (tmp_path / "x").exists()


def test_a_command_line_it_cannot_read_exits_2_with_one_line_and_json_with_json(daemon):
    """argparse printed its usage and exited 2 without a JSON error, whatever --json said."""
    for args, words in [(("ls",), ("location", "drive ls --help")),
                        (("--retry-seconds", "abc", "ls", "lit://d"), ("--retry-seconds", "'abc'", "drive --help")),
                        (("frob",), ("invalid choice: 'frob'",))]:
        res = run(daemon, *args)
        assert res.returncode == 2 and res.stdout == ""
        assert_one_line_error(res, *words)
        # --js: argparse takes an unambiguous abbreviation (only --json as written was seen)
        for as_json in (("--json", *args), (*args, "--json"), ("--js", *args)):
            res = run(daemon, *as_json)
            assert res.returncode == 2
            assert_one_line_error(res, *words)
            error = json.loads(res.stdout)
            assert (error["code"], error["type"]) == (None, "UsageError") and words[0] in error["error"]
    res = run(daemon, "put", "--", "--json")  # a local path, not the option (and no location)
    assert res.returncode == 2 and res.stdout == ""


def with_stdout_closed(daemon, *args: str) -> tuple[int, str]:
    """Runs `drive ARGS` with its stdout's reader gone before it prints, as `head -1` is once it has read its line;
    answers its exit status and stderr."""
    drive = subprocess.Popen([*drive_cmd(), "--endpoint", daemon.endpoint, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    drive.stdout.close()
    with drive.stderr:
        err = drive.stderr.read()  # to its end, when the command ends
    return drive.wait(timeout=40), err


def test_a_closed_stdout_ends_it_quietly_as_sigpipe_does(daemon, tmp_path, drive_uri):
    """`drive ls ... | head -1` printed `drive: [Errno 32] Broken pipe` and exited 1."""
    (tmp_path / "a.txt").write_bytes(b"a")
    ok(run(daemon, "put", str(tmp_path / "a.txt"), drive_uri))
    for args in (("ls", drive_uri), ("--json", "ls", drive_uri)):
        # 128 + SIGPIPE, as the shell reports a tool SIGPIPE ends
        assert with_stdout_closed(daemon, *args) == (141, "")


def test_a_closed_stdout_ends_an_error_printed_as_json_quietly_too(daemon, drive_uri):
    """With --json, an error (of the call, or of the command line) printed to a closed stdout raised a
    BrokenPipeError while the error was handled: a chained traceback, and exit 1. The error's line on stderr
    stays."""
    for args, words in ((("--json", "stat", f"{drive_uri}/nope/x"), "nope/x"), (("--json", "bogus"), "bogus")):
        status, err = with_stdout_closed(daemon, *args)
        assert (status, err.count("\n"), err.startswith("drive: ")) == (141, 1, True), err
        assert words in err


def test_get_into_an_existing_folder_goes_there_with_overwrite_too(daemon, tmp_path, drive_uri):
    """`drive get REMOTE FOLDER` puts REMOTE into an existing FOLDER, as cp does; with --overwrite it went onto
    FOLDER itself: a folder's files spread over FOLDER (replacing the user's files there) and a file failed
    renaming its temporary file onto FOLDER, after the error without --overwrite had said to pass it."""
    src = tmp_path / "src"
    (src / "tree").mkdir(parents=True)
    (src / "tree" / "x.txt").write_text("x1")
    (src / "f.txt").write_text("f1")
    ok(run(daemon, "put", str(src / "tree"), f"{drive_uri}/tree"))
    ok(run(daemon, "put", str(src / "f.txt"), f"{drive_uri}/f.txt"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("the user's own")
    ok(run(daemon, "get", f"{drive_uri}/tree", str(out)))
    ok(run(daemon, "get", f"{drive_uri}/f.txt", str(out)))
    (src / "tree" / "x.txt").write_text("x2")
    (src / "f.txt").write_text("f2")
    ok(run(daemon, "put", str(src / "tree"), f"{drive_uri}/tree"))
    ok(run(daemon, "put", str(src / "f.txt"), f"{drive_uri}/f.txt"))
    assert_one_line_error(run(daemon, "get", f"{drive_uri}/f.txt", str(out)), "f.txt", "--overwrite")
    assert (out / "f.txt").read_text() == "f1"
    ok(run(daemon, "get", f"{drive_uri}/tree", str(out), "--overwrite"))
    ok(run(daemon, "get", f"{drive_uri}/f.txt", str(out), "--overwrite"))
    assert snapshot(out) == {"x.txt": sha256_hex(b"the user's own"), "tree": "dir",
                             "tree/x.txt": sha256_hex(b"x2"), "f.txt": sha256_hex(b"f2")}


def ctrl_c(daemon, ready: Callable[[], bool], *args: str, stdin=None, env=None, sig=signal.SIGINT) -> None:
    """Runs `drive ARGS` (with `stdin` and the variables of `env`), sends it SIGINT once `ready()`, and checks that
    it ends within 20 s as Ctrl-C ends it: one line, exit 130. `sig=SIGTERM`: as `timeout` ends it, exit 143."""
    # As from a terminal: SIGINT's default action on entry (a CI job run in the background ignores it, and its
    # children inherit that), which Python turns into KeyboardInterrupt.
    sigint_default = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")
    command = subprocess.Popen([sys.executable, "-c", sigint_default, *drive_cmd(), "--endpoint", daemon.endpoint,
                                *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})})
    try:
        assert wait_until(ready, timeout=20), f"drive {' '.join(args)} never got far enough"
        command.send_signal(sig)  # what Ctrl-C sends, or SIGTERM
        try:
            out, err = command.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # SIGABRT makes faulthandler print where each thread is
            command.send_signal(signal.SIGABRT)
            stacks = command.communicate(timeout=20)[1]
            raise AssertionError(f"drive did not end within 20 s of SIGINT:\n{stacks}") from None
    finally:
        command.kill()
    status, line = (130, "drive: interrupted") if sig == signal.SIGINT else (143, "drive: terminated")
    assert command.returncode == status, f"exit {command.returncode}\nstdout: {out}\nstderr: {err}"
    assert err.strip() == line, err


def test_ctrl_c_ends_a_waiting_get_with_one_line_and_no_file(start_daemon, tmp_path, drive_uri):
    daemon = start_daemon(tmp_path)  # its own: the one Get it counts open is this test's
    (tmp_path / "kept.txt").write_bytes(b"kept")
    ok(run(daemon, "put", str(tmp_path / "kept.txt"), f"{drive_uri}/kept.txt"))
    target = tmp_path / "late.txt"
    ctrl_c(daemon, lambda: daemon.open_requests("Get") == 1, "get", f"{drive_uri}/late.txt", str(target),
           "--timeout", "60")
    assert not target.exists()
    assert ok(run(daemon, "ls", drive_uri)).stdout.split() == ["kept.txt"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_ends_a_get_of_a_big_file_from_a_hung_daemon_with_no_file(start_daemon, tmp_path, drive_uri, sig):
    """A get of 64 MiB or more (ranged reads in worker threads) ignored Ctrl-C until its workers ended: with the
    daemon hung, never. SIGTERM (`timeout 60 drive get ...`) ended it at once, its temporary file left beside the
    target."""
    daemon = start_daemon(tmp_path)  # its own: it is frozen
    data = os.urandom(160 * 1024 * 1024)  # big enough that its get is caught while it runs
    (tmp_path / "big.bin").write_bytes(data)
    ok(run(daemon, "put", str(tmp_path / "big.bin"), f"{drive_uri}/big.bin"))
    out = tmp_path / "out"
    out.mkdir()

    def receiving() -> bool:  # bytes written to the temporary file: the workers are reading
        with contextlib.suppress(FileNotFoundError):  # no file yet, or renamed since the listing
            if any(p.name != "big.bin" and p.stat().st_blocks for p in out.iterdir()):
                daemon.proc.send_signal(signal.SIGSTOP)  # hung: a frozen VM, a host gone from the network
                return True
        return False

    try:
        ctrl_c(daemon, receiving, "--quiet", "get", f"{drive_uri}/big.bin", str(out / "big.bin"), sig=sig)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert list(out.iterdir()) == []
    ok(run(daemon, "get", f"{drive_uri}/big.bin", str(out / "big.bin")))
    assert (out / "big.bin").read_bytes() == data


def test_a_local_path_that_is_not_utf8_is_printed_as_its_bytes(daemon, tmp_path, drive_uri):
    """With a strict stdout (Python's in a UTF-8 locale such as en_US.UTF-8), `drive get lit://d/a.txt $'\\xff.txt'`
    wrote the file, then failed printing its path with a UnicodeEncodeError traceback, and exit 1."""
    (tmp_path / "a.txt").write_bytes(b"a")
    ok(run(daemon, "put", str(tmp_path / "a.txt"), f"{drive_uri}/a.txt"))
    target = os.fsencode(tmp_path) + b"/\xff.txt"
    for args in ((), ("--json",)):
        got = subprocess.run([*drive_cmd(), "--endpoint", daemon.endpoint, *args, "get", f"{drive_uri}/a.txt",
                              target, "--overwrite"], capture_output=True, timeout=40,
                             env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
        assert (got.returncode, got.stderr) == (0, b"")
        assert target in got.stdout
        with open(target, "rb") as f:
            assert f.read() == b"a"


# A command line (`{d}`: the drive), and the flags its error must name where the Python API's names its arguments
# (allow_duplicates=True, component_name, tls_ca, ...): each error is refused before anything is stored or written.
FLAG_NAMED = [
    (("--component", "two", "put", "a.txt", "{d}/held.txt"), ("--allow-duplicates",)),
    (("stat", "{d}/both.txt"), ("--only",)),
    (("get", "{d}/both.txt", "out.txt"), ("--only",)),
    (("get", "{d}/held.txt"), ("--overwrite",)),
    (("get", "{d}/held.txt", "out.txt", "--timeout", "-1"), ("--timeout",)),
    (("--retry-seconds", "-1", "ls", "{d}"), ("--retry-seconds",)),
    (("--no-tls", "--tls-ca", "ca.pem", "ls", "{d}"), ("--tls-ca", "--tls-cert", "--tls-key", "--no-tls")),
    (("--tls-cert", "cert.pem", "ls", "{d}"), ("--tls-cert", "--tls-key")),
    (("--tls-ca", "missing.pem", "ls", "{d}"), ("--tls-ca",)),
    (("--endpoint", "{unused}", "--retry-seconds", "0", "ls", "{d}"), ("--tls",)),
    (("--endpoint", "{unused}", "--retry-seconds", "0", "--tls", "ls", "{d}"), ("--tls-ca", "--tls-cert", "--tls-key")),
    (("--endpoint", "198.51.100.7:50051", "--token", "t0ken", "ls", "{d}"), ("--insecure", "--tls")),
]


@pytest.mark.parametrize(("args", "flags"), FLAG_NAMED, ids=[" ".join(a) for a, _ in FLAG_NAMED])
def test_an_error_names_the_flag_where_python_names_its_argument(daemon, tmp_path, drive_uri, args, flags):
    from conftest import free_port

    (tmp_path / "a.txt").write_text("one's")
    (tmp_path / "held.txt").write_text("local")
    ok(run(daemon, "put", "a.txt", f"{drive_uri}/held.txt", cwd=tmp_path, component="one"))
    for component, duplicates in (("one", ()), ("two", ("--allow-duplicates",))):
        ok(run(daemon, "put", "a.txt", f"{drive_uri}/both.txt", *duplicates, cwd=tmp_path, component=component))
    stored, local = ok(run(daemon, "--json", "ls", drive_uri)).stdout, snapshot(tmp_path)
    filled = [arg.format(d=drive_uri, unused=f"127.0.0.1:{free_port()}") for arg in args]
    res = subprocess.run([*drive_cmd(), "--endpoint", daemon.endpoint, *filled], capture_output=True, text=True,
                         cwd=tmp_path, timeout=40, env={k: v for k, v in os.environ.items() if k != "DRIVE_COMPONENT"})
    assert_one_line_error(res)
    assert res.returncode == 1 and all(re.search(re.escape(flag) + r"(?![\w-])", res.stderr) for flag in flags), res
    assert ok(run(daemon, "--json", "ls", drive_uri)).stdout == stored and snapshot(tmp_path) == local


def test_ls_recursive_lists_every_file_below_a_folder_one_a_line(daemon, tmp_path, drive_uri):
    for path in ("top.txt", "sub/a.txt", "sub/deeper/b.txt", "subway.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(path)
    ok(run(daemon, "put", "sub", f"{drive_uri}/sub", cwd=tmp_path, component="one"))
    for path in ("top.txt", "subway.txt"):
        ok(run(daemon, "put", path, f"{drive_uri}/{path}", cwd=tmp_path, component="two"))
    everything = ["sub/a.txt", "sub/deeper/b.txt", "subway.txt", "top.txt"]
    assert ok(run(daemon, "ls", "-r", drive_uri)).stdout.splitlines() == everything
    assert ok(run(daemon, "ls", "--recursive", f"{drive_uri}/sub")).stdout.splitlines() == everything[:2]
    assert ok(run(daemon, "ls", f"{drive_uri}/sub")).stdout.splitlines() == ["sub/a.txt", "sub/deeper"]  # as before
    assert ok(run(daemon, "ls", "-r", drive_uri, "--only", "two")).stdout.splitlines() == everything[2:]
    listed = json.loads(ok(run(daemon, "--json", "ls", "-r", drive_uri)).stdout)
    assert [(e["path"], e["component"], e["folder"]) for e in listed] == [
        ("sub/a.txt", "one", False), ("sub/deeper/b.txt", "one", False), ("subway.txt", "two", False),
        ("top.txt", "two", False)]
    assert ok(run(daemon, "ls", "-r", f"{drive_uri}/missing")).stdout == ""
    assert_one_line_error(run(daemon, "ls", "-r", f"{drive_uri}/sub/../../x"), "'..'")
    assert ok(run(daemon, "ls", "-r", drive_uri)).stdout.splitlines() == everything
