"""The README's examples run as printed, against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def readme_block(heading: str, language: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n## {heading}\n"):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_python_example_runs_as_printed(daemon, tmp_path):
    code = readme_block("Python", "python")
    env = {**os.environ, "DRIVE_ENDPOINT": daemon.endpoint}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    printed = [line.split("#")[0].strip() for line in code.splitlines() if line.startswith("print(")]
    expected = [re.search(r"#\s*(.*?)(?:\s+\(|$)", line).group(1) for line in code.splitlines()
                if line.startswith("print(")]
    assert len(printed) == 4
    assert run.stdout.splitlines() == expected
