"""The README's examples run as printed, against a real daemon.

The "With PyTorch and Lightning" examples need torch, Lightning and pyarrow (marker `ml`):
each block runs in its own process, as a user would run it, and what it prints is checked
against the comment beside its `print`.
"""

from __future__ import annotations

import argparse
import builtins
import csv
import io
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import tomllib
from conftest import BIN, ROOT, wait_until
from moto_server import AWS_ENV, running_moto

import drive_client
from drive_client import Drive, DriveError, PermissionDenied
from drive_client.cli import parser as drive_parser
from drive_client.uri import parse_drive
from drived.auth import TokenTable
from drived.config import PARSERS, SETTINGS


def readme_section(heading: str) -> str:
    """The README's text under `heading` (of any level), up to the next heading of that level or above."""
    lines = (ROOT / "README.md").read_text().splitlines(keepends=True)
    in_code, level, section = False, 0, []
    for line in lines:
        in_code ^= line.startswith("```")
        marks = len(line) - len(line.lstrip("#")) if not in_code and line.startswith("#") else 0
        if level and 0 < marks <= level:
            break
        if level:
            section.append(line)
        elif marks and line[marks:].strip() == heading:
            level = marks
    assert level, f"README has no heading {heading!r}"
    return "".join(section)


def readme_blocks(heading: str, language: str = "python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme_section(heading), re.S)


def readme_block(heading: str, language: str) -> str:
    return readme_blocks(heading, language)[0]


def commented_output(code: str) -> list[str]:
    """What each `print(...)` line of `code` says it prints: its comment, up to a parenthesised aside."""
    return [re.search(r"#\s*(.*?)(?:\s+\(|$)", line).group(1) for line in code.splitlines()
            if line.strip().startswith("print(")]


def test_python_example_runs_as_printed(daemon, tmp_path):
    code = readme_block("Python", "python")
    env = {**os.environ, "DRIVE_ENDPOINT": daemon.endpoint}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    expected = commented_output(code)
    assert len(expected) == 4
    assert run.stdout.splitlines() == expected


def test_the_install_line_names_every_dependency_of_the_client():
    readme = " ".join((ROOT / "README.md").read_text().split())
    named = re.search(r"`pip install drived` gives .+? with only (.+?);", readme).group(1)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(re.split(r", | and ", named)) == {re.match(r"[\w.-]+", dep).group() for dep in dependencies}


def test_every_exception_the_errors_table_names_is_drive_clients_and_is_what_it_says():
    """Each `Builtin` (`Class`) of the table's raises column is drive_client.Class, a DriveError and a Builtin."""
    rows = re.findall(r"^\| .+? \| (.+?) \| .+? \|$", readme_section("Errors"), re.M)
    named = [pair for raises in rows for pair in re.findall(r"`(\w+)`(?: \(`(\w+)`)?", raises)]
    assert len(named) > 10
    for base, cls in ((base, cls) if cls else ("Exception", base) for base, cls in named):
        raised = getattr(drive_client, cls)
        assert issubclass(raised, DriveError) and issubclass(raised, getattr(builtins, base)), (cls, base)


def test_the_configuration_table_has_every_flag_with_its_variable():
    rows = re.findall(r"^\| `--([a-z0-9-]+)` \| `([A-Z0-9_]+)` \|", readme_section("Configuration"), re.M)
    flags = {(f.name.replace("_", "-"), f"DRIVED_{f.name.upper()}") for f in SETTINGS}
    assert set(rows) == flags


def test_the_configuration_table_gives_each_flag_its_default_and_units():
    """Each row's default (its first `value`, or "empty") is what the daemon takes, and every flag that reads
    bytes as `512M` or `10G` says so in its row."""
    rows = re.findall(r"^\| `--([a-z0-9-]+)` \| `[A-Z0-9_]+` \| (.+?) \| (.+) \|$", readme_section("Configuration"),
                      re.M)
    setting = {f.name.replace("_", "-"): f for f in SETTINGS}
    for flag, default, meaning in rows:
        shown = re.match(r"`([^`]*)`", default)
        parser = PARSERS[setting[flag].name]
        assert (parser(shown.group(1)) if shown else "") == setting[flag].default, (flag, default)
        assert reads_units(parser) == ("`512M`" in meaning), (flag, meaning)


def test_every_option_of_drive_and_drived_health_is_named_in_the_readme():
    """Each option `drive`, its subcommands and `drived health` take is named in the README, in a `code` span."""
    readme = (ROOT / "README.md").read_text()
    top = drive_parser()
    commands = [action.choices for action in top._actions if isinstance(action, argparse._SubParsersAction)]
    helps = [top.format_help(), *(command.format_help() for each in commands for command in each.values())]
    health = subprocess.run([sys.executable, "-m", "drived", "health", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert health.returncode == 0, health.stderr
    helps.append(health.stdout)
    options = {option for text in helps for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text)} - {"--help"}
    assert len(options) > 15
    unnamed = {option for option in options if not re.search(rf"`[^`\n]*(?<![\w-]){option}(?![\w-])[^`\n]*`", readme)}
    assert not unnamed


def reads_units(parser: Callable[[str], object]) -> bool:
    """Whether a setting's parser reads `1K` as 1024 bytes."""
    try:
        return parser("1K") == 1024
    except (argparse.ArgumentTypeError, ValueError):
        return False


def test_bench_results_end_with_bench_why_as_it_is():
    """latest.md ends with bench/WHY.md, as the README says (`make bench` appends it): after an edit of WHY.md,
    `bench.report.render_markdown` of latest.json writes latest.md again."""
    latest = (ROOT / "bench" / "results" / "latest.md").read_text()
    assert latest.rstrip().endswith((ROOT / "bench" / "WHY.md").read_text().strip()), "latest.md lacks WHY.md's edits"


def test_the_performance_figures_are_those_of_bench_results():
    """The Performance section names the commit of the run `bench/results/latest.md` holds, and each number of its
    table's drived, reference and ratio columns is one that run measured (latest.md above the copy of bench/WHY.md
    appended to it), as printed or rounded."""
    latest = (ROOT / "bench" / "results" / "latest.md").read_text()
    why_heading = (ROOT / "bench" / "WHY.md").read_text().splitlines()[0]
    run = re.search(r"^`python -m bench.*`.*, commit (\w+)$", latest, re.M)
    section = readme_section("Performance")
    assert run and f"of {run.group(1)}" in " ".join(section.split()), f"README names no run of {run and run.group(1)}"
    number = r"\d[\d,]*(?:\.\d+)?"
    measured = [float(n.replace(",", "")) for n in re.findall(number, latest.partition(why_heading)[0])]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    assert len(rows) == 10
    for row in rows:
        for shown in re.findall(number, " ".join(row[1:4])):
            value, places = float(shown.replace(",", "")), len(shown.partition(".")[2])
            assert any(abs(n - value) <= 0.5 * 10**-places for n in measured), (shown, row[0])


DEFAULT_ENDPOINT = "127.0.0.1:50051"


def as_script(code: str, endpoint: str, scratch: Path) -> str:
    """A README block as the script a user runs: the daemon's endpoint for the default one, a scratch folder for
    /tmp, and a block that awaits at its top level inside asyncio.run (as in a notebook or `python -m asyncio`)."""
    code = code.replace(DEFAULT_ENDPOINT, endpoint).replace("/tmp/", f"{scratch}/")
    if re.search(r"^(await |async (with|for) )", code, re.M):
        body = "".join(f"    {line}" for line in code.splitlines(keepends=True))
        code = f"import asyncio\n\n\nasync def main():\n{body}\n\nasyncio.run(main())\n"
    return code


def test_the_python_asyncio_and_fsspec_examples_run_one_after_another(start_daemon, tmp_path):
    """A new user runs the Python section's blocks in order, in one folder, against one daemon (the fsspec block
    that reads a parquet file needs pyarrow: the ml tests read parquet). What the fsspec block reads, the user has
    put before it: t.csv locally, big.bin in the drive."""
    daemon = start_daemon(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    (tmp_path / "t.csv").write_text("step,loss\n1,0.5\n")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    blocks = [readme_block("Python", "python"), *readme_blocks("asyncio"),
              *(code for code in readme_blocks("fsspec and pandas") if "parquet" not in code)]
    assert len(blocks) == 4
    printed = []
    for number, code in enumerate(blocks):
        if number == 2:  # the first fsspec block
            Drive("lit://drive_1", endpoint=daemon.endpoint, root_folder=tmp_path).put("big.bin")
        (tmp_path / f"block_{number}.py").write_text(as_script(code, daemon.endpoint, scratch))
        printed.append(run_python([f"block_{number}.py"], tmp_path, daemon.endpoint).stdout.splitlines())
    assert printed[0] == commented_output(blocks[0])
    assert printed[1][:2] == [str(["a.txt", "b.txt"])] * 2 and (scratch / "b.txt").read_text() == "hello from b.txt"
    assert printed[3] == ["b'hello'"]
    assert b"".join(Drive("lit://drive_1", endpoint=daemon.endpoint).read_range("out.bin")) == b"..."


def test_the_command_line_and_grpcurl_examples_run_as_printed(start_daemon, tmp_path):
    """Each command of the Command line section (its pipelines too: a folder through tar, put from stdin and got to
    stdout), then of the grpcurl section, against a fresh daemon, from a folder holding a.txt and a checkpoints
    folder; grpcurl's Stat finds the a.txt of the Python example (the CLI's `rm` removed its own)."""
    daemon = start_daemon(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_10.pt").write_bytes(b"weights")

    def run_commands(heading: str) -> list[str]:
        """What each command of the section's first block prints, each run as a user would in tmp_path."""
        printed = []
        for line in readme_blocks(heading, "")[0].splitlines():
            program, *args = shlex.split(as_script(line.split("#")[0], daemon.endpoint, scratch))
            run = subprocess.run([str(BIN / program), *args], cwd=tmp_path, capture_output=True, text=True,
                                 env={**os.environ, "DRIVE_ENDPOINT": daemon.endpoint}, timeout=60)
            assert run.returncode == 0, (line, run.stderr)
            printed.append(run.stdout)
        return printed

    cli = run_commands("Command line")
    assert len(cli) == 7 and cli[2].split() == ["a.txt", "run_7"] and (scratch / "a.txt").read_text() == "hello"
    assert cli[3] == "run_7/checkpoints/step_10.pt\n"  # ls -r: every file below, as deep as it lies
    # the section's pipelines, each run by a shell that fails when any command of it does
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.bin").write_bytes(kept := os.urandom(5000))
    put, get = readme_blocks("Command line", "")[1].splitlines()
    for pipeline in (put, "rm -r data", get):
        run = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "DRIVE_ENDPOINT": daemon.endpoint,
                                  "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, timeout=60)
        assert run.returncode == 0, (pipeline, run.stderr)
    assert (tmp_path / "data" / "x.bin").read_bytes() == kept
    Drive("lit://drive_1", component_name="work_a", endpoint=daemon.endpoint, root_folder=tmp_path).put("a.txt")
    grpcurl = run_commands("grpcurl")
    assert len(grpcurl) == 5 and '"component": "work_a"' in grpcurl[3] and '"status": "SERVING"' in grpcurl[4]


def test_the_token_file_example_is_one_the_daemon_reads(tmp_path):
    [example] = readme_blocks("Tokens", "toml")
    (tmp_path / "tokens.toml").write_text(example)
    table = TokenTable.read(str(tmp_path / "tokens.toml"))
    grants = {grant.name: grant for grant in table.grants.values()}
    assert sorted(grants) == ["dashboard", "trainer"] and table.plaintext
    grants["trainer"].check("Put", parse_drive("lit://team_a_run1"))
    grants["trainer"].check("Get", parse_drive("s3://datasets/imagenet/train/"))
    grants["dashboard"].check("List", parse_drive("lit://team_a_run1"))
    with pytest.raises(PermissionDenied):
        grants["dashboard"].check("Delete", parse_drive("lit://team_a_run1"))
    with pytest.raises(PermissionDenied):
        grants["trainer"].check("Get", parse_drive("s3://datasets/"))


# --- With PyTorch and Lightning ------------------------------------------------------------------


def as_files(heading: str, folder: Path) -> dict[str, Path]:
    """Writes each block of a README section that opens with `# NAME.py` to folder/NAME.py."""
    files = {}
    for code in readme_blocks(heading):
        name = re.match(r"# (\w+\.py)\n", code)
        if name:
            files[name.group(1)] = folder / name.group(1)
            files[name.group(1)].write_text(code)
    return files


def run_python(args: list[str], cwd: Path, endpoint: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs `python ARGS` as a user would, against the daemon on `endpoint`; fails with its output."""
    env = {**os.environ, "DRIVE_ENDPOINT": endpoint}
    run = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"python {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr[-6000:]}"
    return run


@pytest.mark.ml
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("heading", "printed"), [
    ("torch.save and torch.load", ["True"]),
    ("Sharded checkpoints: torch.distributed.checkpoint", ["True"]),
    ("Parquet with pandas and pyarrow", ["(5000, 1)"]),
])
def test_one_block_examples(daemon, tmp_path, heading, printed):
    [code] = readme_blocks(heading)
    run = run_python(["-c", code], tmp_path, daemon.endpoint)
    assert run.stdout.splitlines() == commented_output(code) == printed


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_lightning_checkpoints_an_evaluator_and_a_resumed_run(start_daemon, tmp_path):
    """train.py checkpoints to the drive while evaluate.py (another process) loads each checkpoint as it
    lands; resume.py (a third) continues the run from last.ckpt. The evaluator sees every checkpoint, and
    each loads (a partial file would not); the resumed run trains on top of the restored steps instead of
    starting again (the first checkpoints are never re-put). Each run's CSVLogger logs every 4th step to a
    metrics.csv on the drive, appending to it from its second flush on."""
    daemon = start_daemon(tmp_path)
    heading = "Lightning: checkpoints on a drive, an evaluator, a resumed run"
    files = as_files(heading, tmp_path)
    assert sorted(files) == ["evaluate.py", "resume.py", "train.py"]
    run_1 = Drive("lit://run_1", endpoint=daemon.endpoint)

    with open(tmp_path / "evaluate.err", "w") as errors:
        evaluator = subprocess.Popen(
            [sys.executable, "evaluate.py"], cwd=tmp_path, env={**os.environ, "DRIVE_ENDPOINT": daemon.endpoint},
            stdout=subprocess.PIPE, stderr=errors, text=True,
        )
    evaluated: list[str] = []
    reader = threading.Thread(target=lambda: evaluated.extend(evaluator.stdout or ()), daemon=True)
    reader.start()
    try:
        # The trainer starts once the evaluator's Watch is open: from then on, no put can be missed.
        assert wait_until(lambda: evaluator.poll() is not None or daemon.open_requests("Watch") == 1, timeout=240), (
            "evaluate.py did not start watching"
        )
        assert evaluator.poll() is None, (tmp_path / "evaluate.err").read_text()[-4000:]

        run_python(["train.py"], tmp_path, daemon.endpoint)
        first = [path for path in run_1.list("checkpoints") if "epoch=" in path]
        assert first == [f"checkpoints/epoch={e}-step={8 * (e + 1)}.ckpt" for e in range(3)]
        generation = {path: run_1.stat(path).generation for path in first}

        resumed = run_python(["resume.py"], tmp_path, daemon.endpoint)
        assert resumed.stdout.splitlines()[-1:] == commented_output(files["resume.py"].read_text()) == ["40"]
        assert "Restored all states from the checkpoint at lit://run_1/checkpoints/last.ckpt" in resumed.stderr
        every = [path for path in run_1.list("checkpoints") if "epoch=" in path]
        assert every == [*first, "checkpoints/epoch=3-step=32.ckpt", "checkpoints/epoch=4-step=40.ckpt"]
        assert {path: run_1.stat(path).generation for path in first} == generation
        for version, steps in ((0, range(3, 24, 4)), (1, range(27, 40, 4))):
            rows = csv.DictReader(io.StringIO(b"".join(
                run_1.read_range(f"logs/lightning_logs/version_{version}/metrics.csv")).decode()))
            assert [int(row["step"]) for row in rows] == list(steps)

        assert wait_until(lambda: len(evaluated) >= len(every), timeout=120), (
            evaluated, (tmp_path / "evaluate.err").read_text()[-4000:]
        )
        assert [line.split()[0] for line in evaluated] == every
        assert all(re.fullmatch(r"\S+ loss \d+\.\d{3}\n", line) for line in evaluated), evaluated
    finally:
        evaluator.terminate()
        evaluator.wait(30)


@pytest.mark.ml
@pytest.mark.timeout(300)
def test_dataloader_example_over_an_s3_drive(start_daemon, tmp_path):
    """dataset.py as printed: 64 objects of my-bucket/images/train/ read by a DataLoader of 4 workers."""
    files = as_files("A DataLoader over a folder of a drive", tmp_path)
    with running_moto() as url:
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                          region_name=AWS_ENV["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket="my-bucket")
        for i in range(64):
            s3.put_object(Bucket="my-bucket", Key=f"images/train/{i:04d}.bin", Body=os.urandom(4096))
        daemon = start_daemon(tmp_path, env={**AWS_ENV, "AWS_ENDPOINT_URL": url})
        run = run_python(["dataset.py"], tmp_path, daemon.endpoint)
    assert run.stdout.splitlines() == commented_output(files["dataset.py"].read_text())
    assert run.stdout.splitlines() == ["64 torch.Size([32, 4096])"]

