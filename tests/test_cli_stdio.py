"""`-` as stdin and stdout in the `drive` command, as in shell pipelines: `tar c . | drive put - lit://d/x.tar`,
`drive get lit://d/x.tar - | tar x`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import sha256_hex
from test_cli import assert_one_line_error, ctrl_c, drive_cmd, ok, run, stat_fields

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20

# Runs `drive` and writes its peak resident memory (VmHWM) to $PEAK_FILE as it exits.
_PEAK = ("import atexit, os, sys; atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w').write(next("
         "line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))); "
         "from drive_client.cli import main; sys.exit(main())")


def run_bytes(daemon, *args: str, stdin: bytes | None = None, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`drive ARGS` with `stdin` on its stdin; stdout as bytes, stderr as text."""
    proc = subprocess.run([*drive_cmd(), "--endpoint", daemon.endpoint, *args], input=stdin, capture_output=True,
                          cwd=cwd, timeout=40, env={**os.environ, **(env or {})})
    proc.stderr = proc.stderr.decode()
    return proc


def streamed(daemon, tmp_path, args: list[str], size: int, send: bool) -> tuple[int, bytes, float]:
    """Runs `drive ARGS` with `size` random bytes piped into it (`send`) or out of it, a MiB at a time; answers its
    exit status, their sha256 and its peak memory in MiB."""
    peak = tmp_path / "peak"
    proc = subprocess.Popen([sys.executable, "-c", _PEAK, "--endpoint", daemon.endpoint, *args],
                            stdin=subprocess.PIPE if send else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PEAK_FILE": str(peak)})
    digest = hashlib.sha256()
    if send:
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        with proc.stdin:
            for _ in range(size // MIB):
                piece = os.urandom(MIB)
                digest.update(piece)
                proc.stdin.write(piece)
    else:
        while piece := proc.stdout.read(MIB):
            digest.update(piece)
    assert proc.wait(40) == 0, proc.stderr.read()
    return proc.returncode, digest.digest(), int(peak.read_text()) / 1024


def test_get_to_stdout_writes_the_bytes_there_and_no_file(daemon, tmp_path, drive_uri):
    """`drive get lit://d/p -` wrote a local file named '-' and printed its path."""
    data = os.urandom(3 * MIB + 5)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.bin").write_bytes(data)
    (tmp_path / "src" / "small.txt").write_bytes(b"small")
    ok(run(daemon, "put", str(tmp_path / "src" / "x.bin"), f"{drive_uri}/x.bin"))
    ok(run(daemon, "put", str(tmp_path / "src" / "small.txt"), f"{drive_uri}/small.txt"))
    out = tmp_path / "out"
    out.mkdir()
    for path, expected in (("x.bin", data), ("small.txt", b"small")):
        got = run_bytes(daemon, "get", f"{drive_uri}/{path}", "-", cwd=out)
        assert (got.returncode, got.stderr) == (0, "")
        assert got.stdout == expected
    assert list(out.iterdir()) == []


def test_put_from_stdin_stores_what_comes_and_leaves_no_spool(daemon, tmp_path, drive_uri):
    """`drive put - lit://d/p` put a local file named '-' (or failed: no such file): stdin was never read."""
    (tmp_path / "-").write_bytes(b"a local file named -")
    spool = tmp_path / "tmp"
    spool.mkdir()
    data = os.urandom(2 * MIB + 3)
    put = run_bytes(daemon, "put", "-", f"{drive_uri}/in/x.tar", stdin=data, cwd=tmp_path, env={"TMPDIR": str(spool)})
    assert put.returncode == 0, put.stderr
    assert stat_fields(ok(run(daemon, "stat", f"{drive_uri}/in/x.tar")))["sha256"] == sha256_hex(data)
    assert list(spool.iterdir()) == []
    empty = run_bytes(daemon, "put", "-", f"{drive_uri}/in/empty", stdin=b"", env={"TMPDIR": str(spool)})
    assert empty.returncode == 0, empty.stderr
    assert stat_fields(ok(run(daemon, "stat", f"{drive_uri}/in/empty")))["size"] == "0"
    # a local file named '-' is reached as ./-, a drive file named '-' by its path
    ok(run(daemon, "put", "./-", f"{drive_uri}/-", cwd=tmp_path))
    got = run_bytes(daemon, "get", f"{drive_uri}/-", "./-", "--overwrite", cwd=tmp_path)
    assert got.returncode == 0 and (tmp_path / "-").read_bytes() == b"a local file named -"
    assert run_bytes(daemon, "get", f"{drive_uri}/-", "-").stdout == b"a local file named -"


def test_put_from_stdin_needs_a_drive_path_and_reads_nothing_without_one(daemon, tmp_path, drive_uri):
    ok(run(daemon, "put", str(__file__), f"{drive_uri}/kept.py"))
    for location in (drive_uri, f"{drive_uri}/", f"{drive_uri}/sub/"):
        res = run_bytes(daemon, "put", "-", location, stdin=b"x")
        assert res.stdout == b""
        assert_one_line_error(res, "stdin", "path")
    assert ok(run(daemon, "ls", drive_uri)).stdout.split() == ["kept.py"]


def test_pipes_of_any_size_move_in_bounded_memory(daemon, tmp_path, drive_uri):
    """What goes through `put -` and `get -` is never held whole in memory."""
    size = 256 * MIB
    status, sent, peak = streamed(daemon, tmp_path, ["--quiet", "put", "-", f"{drive_uri}/big.bin"], size, True)
    assert status == 0 and peak < 160, peak
    status, got, peak = streamed(daemon, tmp_path, ["--quiet", "get", f"{drive_uri}/big.bin", "-"], size, False)
    assert status == 0 and peak < 160, peak
    assert got == sent


def test_get_to_stdout_refuses_json_timeout_and_a_folder_with_nothing_on_stdout(daemon, tmp_path, drive_uri):
    """`--json` would mix its answer into the file's bytes on stdout; a folder has no one stream of bytes."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"a")
    ok(run(daemon, "put", str(tmp_path / "t"), f"{drive_uri}/t"))
    for args in (("--json", "get", f"{drive_uri}/t/a.txt", "-"), ("get", f"{drive_uri}/t/a.txt", "-", "--json")):
        res = run_bytes(daemon, *args, cwd=tmp_path)
        assert res.returncode == 2 and json.loads(res.stdout)["type"] == "UsageError"  # what --json asks, alone
        assert_one_line_error(res, "--json", "stdout")
    waits = run_bytes(daemon, "get", f"{drive_uri}/t/a.txt", "-", "--timeout", "5")  # its wait was passed by
    assert (waits.returncode, waits.stdout) == (2, b"")
    assert_one_line_error(waits, "--timeout")
    folder = run_bytes(daemon, "get", f"{drive_uri}/t", "-", cwd=tmp_path)
    assert (folder.returncode, folder.stdout) == (1, b"")
    assert_one_line_error(folder, "folder")
    missing = run_bytes(daemon, "get", f"{drive_uri}/nope", "-", cwd=tmp_path)
    assert (missing.returncode, missing.stdout) == (1, b"")
    assert_one_line_error(missing, "nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_get_to_a_closed_stdout_ends_quietly_as_sigpipe_does(daemon, tmp_path, drive_uri):
    """`drive get lit://d/big - | head -c 10`: the reader leaves early."""
    (tmp_path / "big.bin").write_bytes(os.urandom(8 * MIB))
    ok(run(daemon, "put", str(tmp_path / "big.bin"), f"{drive_uri}/big.bin"))
    proc = subprocess.Popen([*drive_cmd(), "--endpoint", daemon.endpoint, "get", f"{drive_uri}/big.bin", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False, cwd=tmp_path)
    assert proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert (proc.wait(40), err) == (141, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_get_to_stdout_cut_midway_fails_saying_stdout_has_part_of_it(start_daemon, tmp_path, drive_uri):
    daemon = start_daemon(tmp_path)  # its own: it is killed
    data = os.urandom(64 * MIB)
    (tmp_path / "big.bin").write_bytes(data)
    ok(run(daemon, "put", str(tmp_path / "big.bin"), f"{drive_uri}/big.bin"))
    proc = subprocess.Popen([*drive_cmd(), "--endpoint", daemon.endpoint, "--retry-seconds", "0", "get",
                             f"{drive_uri}/big.bin", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = proc.stdout.read(MIB)
    daemon.proc.kill()
    daemon.proc.wait()
    got += proc.stdout.read()
    err = proc.stderr.read().decode()
    assert proc.wait(40) == 1
    assert 0 < len(got) < len(data) and data.startswith(got)
    assert_one_line_error(subprocess.CompletedProcess([], 1, got, err), "stdout", daemon.endpoint)


def test_get_to_a_full_stdout_fails_naming_stdout_and_what_went_there(daemon, tmp_path, drive_uri):
    """`drive get lit://d/big - > file` on a full disk printed only "[Errno 28] No space left on device"."""
    data = os.urandom(3 * MIB)
    (tmp_path / "big.bin").write_bytes(data)
    ok(run(daemon, "put", str(tmp_path / "big.bin"), f"{drive_uri}/big.bin"))
    with open("/dev/full", "wb") as full:  # every write fails ENOSPC
        proc = subprocess.run([*drive_cmd(), "--endpoint", daemon.endpoint, "get", f"{drive_uri}/big.bin", "-"],
                              stdout=full, stderr=subprocess.PIPE, timeout=40, text=True)
    assert proc.returncode == 1
    assert_one_line_error(proc, "stdout could not be written", "No space left on device")
    got = subprocess.run([*drive_cmd(), "--endpoint", daemon.endpoint, "get", f"{drive_uri}/big.bin", "-"],
                         capture_output=True, timeout=40)
    assert got.stdout == data  # the stored file is untouched


@pytest.mark.parametrize("args", [["ls", "{d}/"], ["--json", "stat", "{d}/small.txt"], ["--json", "ls", "{d}/"]])
def test_output_to_a_full_stdout_fails_naming_stdout(daemon, tmp_path, drive_uri, args):
    """`drive ls lit://d/ > file` on a full disk said only "[Errno 28] ...", and with --json printed two
    tracebacks (its error's JSON failed on stdout too)."""
    (tmp_path / "small.txt").write_bytes(b"small")
    ok(run(daemon, "put", str(tmp_path / "small.txt"), f"{drive_uri}/small.txt"))
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*drive_cmd(), "--endpoint", daemon.endpoint, *(a.format(d=drive_uri) for a in args)],
                              stdout=full, stderr=subprocess.PIPE, timeout=40, text=True)
    assert proc.returncode == 1
    assert_one_line_error(proc, "stdout could not be written", "No space left on device")
    assert run_bytes(daemon, "get", f"{drive_uri}/small.txt", "-").stdout == b"small"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_stdin_comes_stores_nothing_and_leaves_no_spool(daemon, tmp_path, drive_uri, sig):
    spool = tmp_path / "tmp"
    spool.mkdir()
    a_mib_and_no_end = "import os, time\nos.write(1, os.urandom(1 << 20))\ntime.sleep(60)"
    writer = subprocess.Popen([sys.executable, "-c", a_mib_and_no_end], stdout=subprocess.PIPE)
    try:
        def spooling() -> bool:
            return any(p.stat().st_size for p in spool.iterdir())

        ctrl_c(daemon, spooling, "put", "-", f"{drive_uri}/x", stdin=writer.stdout, env={"TMPDIR": str(spool)},
               sig=sig)
    finally:
        writer.kill()
        writer.wait()
    assert list(spool.iterdir()) == []
    assert ok(run(daemon, "ls", drive_uri)).stdout.split() == []


def test_a_closed_stdin_or_stdout_is_refused_not_read_or_written_as_another_file(daemon, tmp_path, drive_uri):
    """With stdin closed (`<&-`), `put -` stored an empty file: its temporary file took descriptor 0 and was read;
    with stdout closed, `get -` wrote the file's bytes to whatever descriptor 1 had become (EINVAL here)."""
    (tmp_path / "a.txt").write_bytes(b"a")
    ok(run(daemon, "put", str(tmp_path / "a.txt"), f"{drive_uri}/a.txt"))
    closing = "import os, sys\nos.close(int(sys.argv[1]))\nos.execv(sys.argv[2], sys.argv[2:])"
    for fd, args in ((0, ("put", "-", f"{drive_uri}/b.txt")), (1, ("get", f"{drive_uri}/a.txt", "-"))):
        res = subprocess.run([sys.executable, "-c", closing, str(fd), *drive_cmd(), "--endpoint", daemon.endpoint,
                              *args], stdin=subprocess.DEVNULL if fd else None, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, timeout=40)
        assert_one_line_error(res, "closed", ("stdin", "stdout")[fd])
        assert res.returncode == 1
    assert ok(run(daemon, "ls", drive_uri)).stdout.split() == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
