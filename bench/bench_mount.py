"""Benchmark: mounting an s3:// location of keys_per_level ** 3 keys (1M by default).

In one run, over the same local ListObjectsV2 endpoint (bench/s3_listing_server.py,
in its own process):

- `mount_s`: drived's mount (S3Mounts.mount: parallel lister + index), first
  thing in a fresh child process, which then holds the index: its RSS
  (`daemon_rss_mib`, and the peak during the mount) is the index's cost plus
  the interpreter-and-boto3 baseline (`baseline_rss_mib`). `mount_cpu_s` is the
  CPU time (user + system, all threads) the child spent on the mount, boto3
  client set-up included, and `mount_cpu_s_per_million` the same per million
  keys; `responder_cpu_s` is what the listing endpoint spent meanwhile (it
  shares the machine's cores). The mount is repeated `runs` times, each in a
  fresh child: these figures are the medians, and `*_runs` lists every run;
- `list_s` / `list_cpu_s` / `index_build_s`: a second listing in the same child, split
  into its two phases (ListObjectsV2 + parsing, then `S3Index.from_runs` alone);
- `list100_ms`: one List of a 100-entry folder from that index (median), and
  `stat_us`, one Stat;
- `boto3_paginator_s`: the reference, a plain boto3 `list_objects_v2` paginator
  over the same key space, collecting the keys (what a naive mount does).

    python bench/bench_mount.py [--keys-per-level 100] [--runs 3] [--json]

`measure(keys_per_level)` returns the figures as a dict (the bench harness calls it).
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.s3_listing_server import BUCKET  # noqa: E402 - after the path set-up above
from bench.services import S3ListingServer, cpu_seconds  # noqa: E402

_RESULT = "BENCH_MOUNT_RESULT "


def _env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _cpu_self() -> float:
    """CPU seconds (user + system, every thread) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(keys_per_level: int, concurrency: int, responder_pid: int) -> dict[str, Any]:
    """Runs in a fresh process pointed at the endpoint: drived's side of the benchmark."""
    import asyncio

    from drived.s3index import S3Mounts
    from drived.s3index.index import S3Index
    from drived.s3index.lister import Lister, make_listing_client

    n = keys_per_level
    rss_before = _status_mib("VmRSS")

    async def mount() -> tuple[S3Mounts, float, int, S3Index]:
        mounts = S3Mounts(concurrency=concurrency)
        t = time.perf_counter()
        objects, _ = await mounts.mount(BUCKET, "")
        seconds = time.perf_counter() - t
        return mounts, seconds, objects, await mounts.index(BUCKET, "")

    # The mount first, in this fresh process: its RSS is what a daemon holding the index pays,
    # and its CPU time (this process's, apart from the responder's) what a daemon spends on it.
    cpu0, responder0 = _cpu_self(), cpu_seconds(responder_pid)
    mounts, mount_s, objects, index = asyncio.run(mount())
    mount_cpu, responder_cpu = _cpu_self() - cpu0, cpu_seconds(responder_pid) - responder0
    rss, peak = _status_mib("VmRSS"), _status_mib("VmHWM")

    # Then the two phases, measured apart (this second index is dropped).
    client = make_listing_client(concurrency + 4)
    t0, cpu0 = time.perf_counter(), _cpu_self()
    result = Lister(client, BUCKET, "", concurrency=concurrency).run()
    list_s, list_cpu = time.perf_counter() - t0, _cpu_self() - cpu0
    t0 = time.perf_counter()
    S3Index.from_runs(result.runs)
    build_s = time.perf_counter() - t0
    requests = result.requests
    del result, client

    folder = f"d{n // 2:03d}/d{n // 2:03d}"
    laps = []
    for _ in range(200):
        t0 = time.perf_counter()
        entries, _more = index.list(folder, False, "", 1000)
        laps.append(time.perf_counter() - t0)
    root_laps = []
    for _ in range(50):
        t0 = time.perf_counter()
        index.list("", False, "", 1000)
        root_laps.append(time.perf_counter() - t0)
    probe = f"{folder}/f{n // 3:03d}.bin"
    t0 = time.perf_counter()
    for _ in range(1000):
        index.stat(probe)
    stat_us = (time.perf_counter() - t0) * 1000
    assert index.stat(probe) is not None and len(entries) == n
    return {
        "keys": objects,
        "mount_s": mount_s,
        "mount_cpu_s": mount_cpu,
        "mount_cpu_s_per_million": mount_cpu / objects * 1e6 if objects else None,
        "responder_cpu_s": responder_cpu,
        "list_s": list_s,
        "list_cpu_s": list_cpu,
        "index_build_s": build_s,
        "requests": requests,
        "concurrency": concurrency,
        "list100_ms": statistics.median(laps) * 1000,
        "list100_entries": len(entries),
        "list_root_ms": statistics.median(root_laps) * 1000,
        "stat_us": stat_us,
        "index_mib": index.nbytes() / 2**20,
        "daemon_rss_mib": rss,
        "daemon_peak_rss_mib": peak,
        "baseline_rss_mib": rss_before,
        "mounted": mounts.mounted(BUCKET, ""),
    }


def _paginator(endpoint: str) -> tuple[float, int]:
    """The reference: boto3's own paginator, every page parsed by botocore."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
        config=Config(retries={"mode": "standard"}),
    )
    t0 = time.perf_counter()
    keys = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=""):
        keys += sum(1 for _ in page.get("Contents", ()))
    return time.perf_counter() - t0, keys


def _run_child(endpoint: str, keys_per_level: int, concurrency: int, responder_pid: int) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--keys-per-level",
            str(keys_per_level),
            "--concurrency",
            str(concurrency),
            "--responder-pid",
            str(responder_pid),
        ],
        env=_env(endpoint),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_mount child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    got: dict[str, Any] = json.loads(lines[-1][len(_RESULT) :])
    return got


# Figures that move from run to run: reported as the median of the runs, with every run's value.
_PER_RUN = ("mount_s", "mount_cpu_s", "mount_cpu_s_per_million", "responder_cpu_s", "list_s", "list_cpu_s")


def measure(keys_per_level: int = 100, concurrency: int = 16, reference: bool = True,
            runs: int = 3) -> dict[str, Any]:
    """Runs the benchmark (endpoint, `runs` drived children, paginator reference); returns the figures."""
    with tempfile.TemporaryDirectory(prefix="bench-mount-") as workdir, S3ListingServer(
        Path(workdir), keys_per_level
    ) as server:
        endpoint = server.url
        children = [_run_child(endpoint, keys_per_level, concurrency, server.pid) for _ in range(max(1, runs))]
        got = dict(children[-1])
        for key in _PER_RUN:
            got[key] = statistics.median(c[key] for c in children)
            got[key + "_runs"] = [round(c[key], 3) for c in children]
        got["expected_keys"] = keys_per_level**3
        if reference:
            seconds, keys = _paginator(endpoint)
            got["boto3_paginator_s"] = seconds
            got["boto3_paginator_keys"] = keys
            got["speedup_vs_paginator"] = seconds / got["mount_s"] if got["mount_s"] else None
    return got


def _table(got: dict[str, Any]) -> str:
    ref = got.get("boto3_paginator_s")
    rows = [
        ("keys indexed", f"{got['keys']:,}", f"of {got['expected_keys']:,}"),
        (
            "mount (list + index)",
            f"{got['mount_s']:.2f} s",
            (f"{ref / got['mount_s']:.1f}x faster than boto3 paginator; " if ref else "")
            + f"median of runs {got['mount_s_runs']}",
        ),
        (
            "  daemon CPU per 1M keys",
            f"{got['mount_cpu_s_per_million']:.2f} s",
            f"runs {got['mount_cpu_s_per_million_runs']}; the listing responder used "
            f"{got['responder_cpu_s']:.2f} CPU-s",
        ),
        (
            "  listing phase",
            f"{got['list_s']:.2f} s",
            f"{got['requests']} ListObjectsV2 requests, {got['concurrency']} threads",
        ),
        ("  index build alone", f"{got['index_build_s'] * 1000:.0f} ms", "target <= 500 ms"),
        ("boto3 paginator", f"{ref:.2f} s" if ref else "-", f"{got.get('boto3_paginator_keys', 0):,} keys"),
        (
            "RSS holding the index",
            f"{got['daemon_rss_mib']:.0f} MiB",
            f"peak {got['daemon_peak_rss_mib']:.0f} MiB, index arrays {got['index_mib']:.0f} MiB, "
            f"baseline {got['baseline_rss_mib']:.0f} MiB",
        ),
        (
            "list 100-entry folder",
            f"{got['list100_ms']:.3f} ms",
            f"root ({got['keys'] ** (1 / 3):.0f} folders) {got['list_root_ms']:.3f} ms",
        ),
        ("stat", f"{got['stat_us']:.1f} us", ""),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="s3:// mount benchmark")
    ap.add_argument("--keys-per-level", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="mounts, each in a fresh process (medians reported)")
    ap.add_argument("--no-reference", action="store_true", help="skip the boto3 paginator run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--responder-pid", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(_RESULT + json.dumps(_child(a.keys_per_level, a.concurrency, a.responder_pid)), flush=True)
        return
    got = measure(a.keys_per_level, a.concurrency, reference=not a.no_reference, runs=a.runs)
    print(json.dumps(got, indent=2) if a.json else _table(got))


if __name__ == "__main__":
    main()
