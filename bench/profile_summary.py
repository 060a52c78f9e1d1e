"""Summarise py-spy raw (collapsed-stack) profiles: where the samples go.

`python -m bench.profile_summary DIR_OR_FILES... [--top 15]` prints, per
profile, the functions with the most samples on top of the stack (self) and
in the stack (inclusive), with file:line stripped to file name and function.
Record profiles with `python -m bench --profile DIR`.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# Leaf frames where a thread waits rather than works (py-spy's idle detection misses
# these when a C call releases the GIL): left out with --busy.
IDLE_LEAVES = (
    "Condition.wait (",
    "EpollSelector.select (",
    "_worker (concurrent/futures/thread.py:81)",
    "channel_spin (grpc/_channel.py",
    "Queue.get (",
    "Queue.put (",
    "Event.wait (",
    "Thread.join (",
)
FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]+?)(?::\d+)?\)$")


def _name(frame: str, lines: bool = False) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    if lines:
        f = frame.strip().rsplit("(", 1)[1].rstrip(")")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    return f"{m.group('fn')} ({f})"


def summarise(path: Path, top: int = 15, lines: bool = False, busy: bool = False) -> str:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_name(f, lines) for f in stack.split(";") if f]
        if not frames:
            continue
        if busy and any(m in _name(stack.split(";")[-1], True) for m in IDLE_LEAVES):
            continue
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return f"{path.name}: no samples\n"
    out = [f"{path.name}: {total} samples"]
    out.append("  self:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in self_c.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--busy", action="store_true", help="leave out samples of threads waiting (IDLE_LEAVES)")
    p.add_argument("--lines", action="store_true", help="keep file:line (native time shows on the calling line)")
    a = p.parse_args(argv)
    for path in a.paths:
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        for f in files:
            print(summarise(f, a.top, a.lines, a.busy))


if __name__ == "__main__":
    main()
