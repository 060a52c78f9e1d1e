"""The drive command's output for scripts (--json) and for people (a progress bar on a terminal only)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from conftest import ROOT


def drive_cmd(daemon, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "drive_client.cli", "--endpoint", daemon.endpoint, *args],
        capture_output=True, text=True, timeout=60, cwd=kwargs.pop("cwd", ROOT), **kwargs,
    )


def test_json_output_for_each_command(daemon, drive_uri, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    put = drive_cmd(daemon, "--json", "put", str(tmp_path / "a.txt"), drive_uri + "/")
    assert put.returncode == 0, put.stderr
    assert [(f["path"], f["size"], f["component"]) for f in json.loads(put.stdout)] == [("a.txt", 3, "default")]
    listed = json.loads(drive_cmd(daemon, "--json", "ls", drive_uri).stdout)
    assert [(e["path"], e["folder"]) for e in listed] == [("a.txt", False)]
    stat = json.loads(drive_cmd(daemon, "--json", "stat", drive_uri + "/a.txt").stdout)
    assert stat["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    got = json.loads(drive_cmd(daemon, "--json", "get", drive_uri + "/a.txt", str(tmp_path / "b.txt")).stdout)
    assert got == {"path": str(tmp_path / "b.txt")} and (tmp_path / "b.txt").read_bytes() == b"abc"
    failed = drive_cmd(daemon, "--json", "rm", drive_uri + "/missing")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["code"] == "NOT_FOUND"
    assert json.loads(drive_cmd(daemon, "--json", "ls", drive_uri).stdout)[0]["path"] == "a.txt"  # untouched


def run_on_terminal(daemon, *args: str) -> tuple[int, str]:
    """Runs `drive ARGS` with stderr on a pseudo-terminal; returns the exit code and what the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "drive_client.cli", "--endpoint", daemon.endpoint, *args],
        stdout=subprocess.DEVNULL, stderr=follower, cwd=ROOT,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(leader)
    return proc.wait(60), shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_and_quiet_otherwise(daemon, drive_uri, tmp_path):
    (tmp_path / "p.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    code, shown = run_on_terminal(daemon, "put", str(tmp_path / "p.bin"), drive_uri + "/")
    assert code == 0
    assert "8.0 MiB / 8.0 MiB (100%)" in shown and "/s" in shown
    code, shown = run_on_terminal(daemon, "--quiet", "get", drive_uri + "/p.bin", str(tmp_path / "q.bin"))
    assert code == 0 and shown == ""
    not_a_tty = drive_cmd(daemon, "get", drive_uri + "/p.bin", str(tmp_path / "r.bin"))
    assert not_a_tty.returncode == 0 and not_a_tty.stderr == ""
    assert (tmp_path / "r.bin").read_bytes() == (tmp_path / "p.bin").read_bytes()


def test_json_and_quiet_are_taken_after_the_subcommand_too(daemon, drive_uri, tmp_path):
    """`drive get lit://d/a.txt out --quiet` failed with "unrecognized arguments: --quiet": the output flags were
    taken before the subcommand only."""
    (tmp_path / "p.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    put = drive_cmd(daemon, "put", str(tmp_path / "p.bin"), drive_uri + "/", "--json")
    assert put.returncode == 0, put.stderr
    assert [f["path"] for f in json.loads(put.stdout)] == ["p.bin"]
    code, shown = run_on_terminal(daemon, "get", drive_uri + "/p.bin", str(tmp_path / "q.bin"), "--quiet")
    assert code == 0 and shown == ""
    assert (tmp_path / "q.bin").read_bytes() == (tmp_path / "p.bin").read_bytes()
    (tmp_path / "mine.bin").write_bytes(b"mine")
    refused = drive_cmd(daemon, "--quiet", "get", drive_uri + "/p.bin", str(tmp_path / "mine.bin"), "--json")
    assert refused.returncode == 1 and json.loads(refused.stdout)["type"] == "AlreadyExists"
    assert (tmp_path / "mine.bin").read_bytes() == b"mine"


def test_a_folder_puts_progress_bar_counts_the_files_of_a_linked_folder(daemon, drive_uri, tmp_path):
    """The bar's total summed the files the put would send with a walk of its own, which passed by a link to a
    folder that the put follows: it showed 8 MiB sent of a total of 4 (200%)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "b.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "shared")
    code, shown = run_on_terminal(daemon, "put", str(tmp_path / "d"), drive_uri + "/")
    assert code == 0
    assert "8.0 MiB / 8.0 MiB (100%)" in shown and "(200%)" not in shown



def traced_ls(daemon, location: str, *output: str) -> tuple[str, int]:
    """What `drive [OUTPUT] ls LOCATION` prints, listing pages of 50 entries, and the most memory (bytes) its
    Python objects held at once while it ran (tracemalloc)."""
    script = ("import sys, tracemalloc; import drive_client.core as core; from drive_client.cli import main; "
              "core.LIST_PAGE_SIZE = 50; tracemalloc.start(); status = main(); "
              "print(tracemalloc.get_traced_memory()[1], file=sys.stderr); sys.exit(status)")
    listed = subprocess.run([sys.executable, "-c", script, "--endpoint", daemon.endpoint, *output, "ls", location],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout, int(listed.stderr.splitlines()[-1])


def test_ls_holds_a_page_of_entries_at_most_whatever_the_folder_holds(daemon, drive_uri, tmp_path):
    """`drive ls` listed the whole folder into memory before printing its first line: of a folder of 200,000
    files, 252 MiB at its peak (against 58 MiB for a program that iterates `Drive.entries`), and nothing printed
    for the 26 s the listing took; with --json too. It prints each page as it comes, holding one at most: a folder
    of 20 pages takes the memory of a folder of one."""
    names = sorted(f"{i:04}-{'n' * 200}" for i in range(1000))
    for folder, count in (("few", 50), ("many", len(names))):
        (tmp_path / folder).mkdir()
        for name in names[:count]:
            (tmp_path / folder / name).touch()
        assert drive_cmd(daemon, "put", str(tmp_path / folder), f"{drive_uri}/{folder}").returncode == 0
    for output in ((), ("--json",)):
        printed, peak = traced_ls(daemon, f"{drive_uri}/many", *output)
        paths = [f"many/{name}" for name in names]
        if output:
            entries = json.loads(printed)
            assert [(e["path"], e["size"], e["folder"]) for e in entries] == [(p, 0, False) for p in paths]
            assert printed == json.dumps(entries, indent=2, ensure_ascii=False) + "\n"  # as it was printed
        else:
            assert printed.splitlines() == paths
        _, one_page = traced_ls(daemon, f"{drive_uri}/few", *output)
        # Held whole, the 950 entries more took some 1.1 MB more (1.3 MB with --json).
        assert peak < one_page + 250_000, (output, peak, one_page)
