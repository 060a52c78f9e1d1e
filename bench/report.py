"""Figures, targets, and the JSON/Markdown report.

A figure is `{"value": median or None, "unit": str, "runs": [...], "missing": reason or None}`.
Every key of `expected_keys()` is present in the JSON, measured or not, so a
missing reference (nginx not installable, index benchmark not written yet)
shows as `value: null` with the reason, never as a silently absent row.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

WHY = Path(__file__).with_name("WHY.md")  # the analysis of missed targets, appended to latest.md

SMALL_SYSTEMS = ("drive", "boto3_moto", "nginx", "grpc_raw")
SMALL_OPS = ("put", "get")
SMALL_CONC = (1, 16)
SMALL_STATS = (("ops_s", "ops/s"), ("p50_ms", "ms"), ("p99_ms", "ms"))
# The cluster group's layouts: one replica without --coordinator, one with it, two with it (each with its own
# client process).
CLUSTER_LAYOUTS = ("alone", "one", "two")
CLUSTER_CONC = 16  # threads of each client process

# The DataLoader benchmark (bench/loader.py): one folder of samples, read from each system.
LOADER_SYSTEMS = {
    "drive_lit": "`Drive('lit://…').read_range` → drived",
    "drive_s3": "`Drive('s3://…').read_range` → drived → moto_server",
    "boto3_moto": "boto3 `get_object` → moto_server (the same objects)",
    "s3fs_moto": "s3fs `cat_file` → moto_server (the same objects)",
    "local": "local files (`Path.read_bytes`)",
}
LOADER_WORKERS = 4
LOADER_BATCH = 32

INDEX_KEYS = {
    "index.mount_s": "s",
    "index.mount_cpu_s_per_million": "s",
    "index.boto3_paginator_s": "s",
    "index.list100_ms": "ms",
    "index.daemon_rss_mib": "MiB",
    "index.keys": "keys",
}


def figure_units() -> dict[str, str]:
    units: dict[str, str] = {}
    for k in (
        "tcp",
        "cp_fsync",
        "grpc_raw.up",
        "grpc_raw.down",
        "grpc_crc32c.up",
        "grpc_crc32c.down",
        "boto3_moto.put",
        "boto3_moto.get",
        "nginx.put",
        "nginx.get",
        "drive.put",
        "drive.get",
        "async_drive.put",
        "async_drive.get",
        "drive_streamed.put",
        "drive_streamed.get",
    ):
        units[f"large.{k}"] = "MB/s"
    for sys_ in SMALL_SYSTEMS:
        for op in SMALL_OPS:
            for c in SMALL_CONC:
                for stat, unit in SMALL_STATS:
                    units[f"small.{sys_}.{op}.c{c}.{stat}"] = unit
    for sys_ in ("drive", "nginx_loop"):
        for op in SMALL_OPS:
            units[f"folder.{sys_}.{op}.files_s"] = "files/s"
    for who in ("daemon", "client_put", "client_get"):
        units[f"mem.{who}.peak_mib"] = "MiB"
        units[f"mem.{who}.peak_mib_quarter"] = "MiB"
    units["mem.daemon.baseline_mib"] = "MiB"
    for system in ("drive", "boto3"):
        for op in ("put", "get"):
            units[f"storage.{system}.{op}"] = "MB/s"
    for op in ("put", "get"):
        units[f"storage.drive_streamed.{op}"] = "MB/s"
    units["storage.daemon.peak_mib"] = "MiB"
    for layout in CLUSTER_LAYOUTS:
        units[f"cluster.{layout}.put_ops_s"] = "ops/s"
    for sys_ in LOADER_SYSTEMS:
        units[f"loader.{sys_}.samples_s"] = "samples/s"
    units.update(INDEX_KEYS)
    return units


def expected_keys() -> list[str]:
    return list(figure_units())


class Figures:
    """Collects per-run samples; medians at the end."""

    def __init__(self) -> None:
        self.units = figure_units()
        self.samples: dict[str, list[float]] = {k: [] for k in self.units}
        self.missing: dict[str, str] = {}
        self.notes: dict[str, str] = {}

    def add(self, key: str, value: float | None) -> None:
        if key not in self.units:
            raise KeyError(f"unknown figure {key}")
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.samples[key].append(float(value))

    def miss(self, prefix: str, reason: str) -> None:
        for k in self.units:
            if (k == prefix or k.startswith(prefix)) and k not in self.missing:
                self.missing[k] = reason

    def value(self, key: str) -> float | None:
        s = self.samples.get(key) or []
        return statistics.median(s) if s else None

    def as_json(self) -> dict[str, Any]:
        out = {}
        for k, unit in self.units.items():
            v = self.value(k)
            out[k] = {
                "value": v,
                "unit": unit,
                "runs": self.samples[k],
                "missing": None if v is not None else self.missing.get(k, "not measured"),
            }
            if k in self.notes:
                out[k]["note"] = self.notes[k]
        return out


@dataclass
class Check:
    what: str
    figure: str
    refs: tuple[str, ...]  # the reference is the min of these
    factor: float  # pass when figure >= factor * ref (or < factor when absolute)
    target: str
    # "ratio" (of the medians), "every run" (the ratio of each run, paired by run, and the least of
    # them shown), "below" (absolute upper bound), "growth"
    kind: str = "ratio"
    ceiling: str = ""  # figure of what Python with grpcio reaches here without storage, measured in the same run


def checks(size_label: str, folder_files: int = 1000) -> list[Check]:
    nf = f"{folder_files:,}"
    return [
        Check(
            "get throughput",
            "large.drive.get",
            ("large.grpc_raw.down",),
            1.0,
            "≥ 1.0 × plain grpcio",
            ceiling="large.grpc_crc32c.down",
        ),
        Check(
            "get throughput, streamed",
            "large.drive_streamed.get",
            ("large.grpc_raw.down",),
            1.0,
            "≥ 1.0 × plain grpcio",
            ceiling="large.grpc_crc32c.down",
        ),
        Check(
            "put throughput (durable)",
            "large.drive.put",
            ("large.grpc_raw.up", "large.cp_fsync"),
            0.6,
            "≥ 0.6 × min(plain grpcio, cp+fsync)",
            ceiling="large.grpc_crc32c.up",
        ),
        Check(
            "put throughput (durable), streamed",
            "large.drive_streamed.put",
            ("large.grpc_raw.up", "large.cp_fsync"),
            0.6,
            "≥ 0.6 × min(plain grpcio, cp+fsync)",
            ceiling="large.grpc_crc32c.up",
        ),
        Check("put throughput", "large.drive.put", ("large.boto3_moto.put",), 3.0, "≥ 3 × boto3/moto"),
        Check("get throughput", "large.drive.get", ("large.boto3_moto.get",), 3.0, "≥ 3 × boto3/moto"),
        Check(
            f"get throughput, {size_label}",
            "large.drive.get",
            ("large.nginx.get",),
            1.0,
            "≥ 1.0 × requests/nginx",
            ceiling="large.grpc_crc32c.down",
        ),
        Check(
            f"get throughput, {size_label}, streamed",
            "large.drive_streamed.get",
            ("large.nginx.get",),
            1.0,
            "≥ 1.0 × requests/nginx",
            ceiling="large.grpc_crc32c.down",
        ),
        Check(
            "4 KiB put/s, c16",
            "small.drive.put.c16.ops_s",
            ("small.boto3_moto.put.c16.ops_s",),
            10.0,
            "≥ 10 × boto3 put_object/moto",
            ceiling="small.grpc_raw.put.c16.ops_s",
        ),
        Check(
            "4 KiB put/s, c16",
            "small.drive.put.c16.ops_s",
            ("small.nginx.put.c16.ops_s",),
            0.5,
            "≥ 0.5 × requests PUT/nginx",
        ),
        Check(
            f"folder {nf} × 4 KiB, one put",
            "folder.drive.put.files_s",
            ("folder.nginx_loop.put.files_s",),
            2.0,
            "≥ 2 × loop of requests PUT/nginx, every run",
            "every run",
        ),
        Check(
            f"folder {nf} × 4 KiB, one get",
            "folder.drive.get.files_s",
            ("folder.nginx_loop.get.files_s",),
            2.0,
            "≥ 2 × loop of requests GET/nginx, every run",
            "every run",
        ),
        Check("peak RSS daemon", "mem.daemon.peak_mib", (), 150.0, "< 150 MiB", "below"),
        Check("peak RSS client (put)", "mem.client_put.peak_mib", (), 150.0, "< 150 MiB", "below"),
        Check("peak RSS client (get)", "mem.client_get.peak_mib", (), 150.0, "< 150 MiB", "below"),
        Check(
            "RSS growth daemon, ¼ → full size",
            "mem.daemon.peak_mib",
            ("mem.daemon.peak_mib_quarter",),
            16.0,
            "≤ +16 MiB (not growing)",
            "growth",
        ),
        Check(
            "RSS growth client put, ¼ → full",
            "mem.client_put.peak_mib",
            ("mem.client_put.peak_mib_quarter",),
            16.0,
            "≤ +16 MiB (not growing)",
            "growth",
        ),
        Check(
            "RSS growth client get, ¼ → full",
            "mem.client_get.peak_mib",
            ("mem.client_get.peak_mib_quarter",),
            16.0,
            "≤ +16 MiB (not growing)",
            "growth",
        ),
        Check(
            "put through --storage", "storage.drive.put", ("storage.boto3.put",), 1.0, "≥ 1.0 × boto3 upload_file"
        ),
        Check(
            "put through --storage, streamed", "storage.drive_streamed.put", ("storage.boto3.put",), 1.0,
            "≥ 1.0 × boto3 upload_file",
        ),
        Check(
            "get through --storage", "storage.drive.get", ("storage.boto3.get",), 1.0,
            "≥ 1.0 × boto3 download_file",
        ),
        Check(
            "get through --storage, streamed", "storage.drive_streamed.get", ("storage.boto3.get",), 1.0,
            "≥ 1.0 × boto3 download_file",
        ),
        Check("peak RSS daemon, --storage", "storage.daemon.peak_mib", (), 200.0, "< 200 MiB", "below"),
        Check("mount 1M keys", "index.mount_s", (), 1.5, "≤ 1.5 s", "below"),
        Check("daemon CPU per 1M keys mounted", "index.mount_cpu_s_per_million", (), 1.5, "≤ 1.5 CPU-s", "below"),
        Check(
            "boto3 paginator time ÷ mount time",
            "index.boto3_paginator_s",
            ("index.mount_s",),
            10.0,
            "≥ 10 × faster than the paginator",
        ),
    ]


def evaluate(figs: Figures, size_label: str, folder_files: int = 1000) -> list[dict[str, Any]]:
    rows = []
    for c in checks(size_label, folder_files):
        v = figs.value(c.figure)
        refs = {r: figs.value(r) for r in c.refs}
        ref = (
            min(x for x in refs.values() if x is not None)
            if refs and all(x is not None for x in refs.values())
            else None
        )
        ratio: float | None = None
        ok: bool | None = None
        if c.kind == "below":
            ok = None if v is None else v <= c.factor
        elif c.kind == "growth":
            if v is not None and ref is not None:
                ratio = v / ref if ref else None
                ok = (v - ref) <= c.factor
        elif c.kind == "every run":
            runs = zip(figs.samples[c.figure], *(figs.samples[k] for k in c.refs), strict=False)
            per_run = [x / min(r) for x, *r in runs if min(r) > 0]
            if per_run:
                ratio = min(per_run)
                ok = ratio >= c.factor
        elif v is not None and ref is not None and ref > 0:
            ratio = v / ref
            ok = ratio >= c.factor
        ceiling = figs.value(c.ceiling) if c.ceiling else None
        rows.append(
            {
                "what": c.what,
                "figure": c.figure,
                "value": v,
                "unit": figs.units[c.figure],
                "refs": refs,
                "ref_value": ref,
                "ratio": ratio,
                "target": c.target,
                "pass": ok,
                "ceiling": c.ceiling or None,
                "ceiling_value": ceiling,
                "needs": None if ref is None or c.kind not in ("ratio", "every run") else c.factor * ref,
            }
        )
    return rows


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("grpcio", "protobuf", "boto3", "botocore", "moto", "requests", "drived"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    from bench.services import Nginx

    versions["nginx"] = Nginx.version()
    commit = os.environ.get("BENCH_GIT_COMMIT")
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        commit = commit or r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": mem_gib,
        "os": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- rendering


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    digits = 2 if abs(v) < 10 else 1 if unit in ("MiB", "ms") or abs(v) < 100 else 0
    return f"{v:,.{digits}f} {unit}".strip()


def _label(k: str) -> str:
    return k


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    p = doc["params"]
    figs = doc["figures"]
    lines = [
        "# drived benchmark",
        "",
        f"`{p['command']}` — {m['date']}, commit {m.get('git_commit') or '?'}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".  ",
        f"Large file {p['size_label']}, chunk {p['chunk']} B, {p['small_files']} × 4 KiB small files, "
        f"folder of {p['folder_files']} files, memory test {p['mem_size_label']}, "
        f"medians of {p['runs']} run(s).",
        "",
        "## Targets",
        "",
        "| figure | value | reference | ratio | target | pass |",
        "|---|---:|---|---:|---|:---:|",
    ]
    for r in doc["checks"]:
        refs = ", ".join(f"{k} {_fmt(v, figs[k]['unit'])}" for k, v in r["refs"].items()) or "—"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        ok = {True: "PASS", False: "FAIL", None: "n/a"}[r["pass"]]
        lines.append(
            f"| {r['what']} (`{r['figure']}`) | {_fmt(r['value'], r['unit'])} | {refs} | {ratio} "
            f"| {r['target']} | {ok} |"
        )
    lines += _ceilings(doc)
    lines += ["", "## Large files", "", "| system | put | get |", "|---|---:|---:|"]
    for name, up, down in (
        ("raw TCP, loopback (one direction)", "large.tcp", "large.tcp"),
        ("plain grpcio streaming, no disk", "large.grpc_raw.up", "large.grpc_raw.down"),
        (
            "plain grpcio streaming + CRC32C on both ends (+ sha256 of a put at the server), no disk",
            "large.grpc_crc32c.up",
            "large.grpc_crc32c.down",
        ),
        ("cp + fsync (durable write)", "large.cp_fsync", None),
        ("boto3 upload_file/download_file → moto_server", "large.boto3_moto.put", "large.boto3_moto.get"),
        ("requests PUT/GET → nginx", "large.nginx.put", "large.nginx.get"),
        ("**drive_client.Drive → drived**", "large.drive.put", "large.drive.get"),
        ("drive_client.Drive → drived, bytes streamed (`DRIVE_HANDOFF=0`)", "large.drive_streamed.put",
         "large.drive_streamed.get"),
        ("drive_client.AsyncDrive → drived", "large.async_drive.put", "large.async_drive.get"),
    ):
        lines.append(
            f"| {name} | {_fmt(figs[up]['value'], 'MB/s')} | {_fmt(figs[down]['value'], 'MB/s') if down else '—'} |"
        )
    lines += [
        "",
        f"## Small files ({p['small_files']} × 4 KiB)",
        "",
        "| system | op | conc | ops/s | p50 | p99 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for sys_ in SMALL_SYSTEMS:
        for op in SMALL_OPS:
            for c in SMALL_CONC:
                b = f"small.{sys_}.{op}.c{c}"
                ops, p50, p99 = (figs[f"{b}.{s}"]["value"] for s in ("ops_s", "p50_ms", "p99_ms"))
                lines.append(f"| {sys_} | {op} | {c} | {_fmt(ops)} | {_fmt(p50, 'ms')} | {_fmt(p99, 'ms')} |")
    lines += [
        "",
        "grpc_raw: plain grpcio, one unary call per file to a server that keeps nothing.",
        "",
        f"## Folder of {p['folder_files']} × 4 KiB",
        "",
        "| system | put | get |",
        "|---|---:|---:|",
    ]
    for sys_, label in (
        ("drive", "Drive.put/get of the folder, one call"),
        ("nginx_loop", "loop of requests PUT/GET → nginx"),
    ):
        lines.append(
            f"| {label} | {_fmt(figs[f'folder.{sys_}.put.files_s']['value'], 'files/s')} | "
            f"{_fmt(figs[f'folder.{sys_}.get.files_s']['value'], 'files/s')} |"
        )
    lines += [
        "",
        f"## Memory (peak RSS, VmHWM; {p['mem_size_label']} file, and a ¼-size file first)",
        "",
        "| process | ¼ size | full size |",
        "|---|---:|---:|",
    ]
    for who in ("daemon", "client_put", "client_get"):
        lines.append(
            f"| {who} | {_fmt(figs[f'mem.{who}.peak_mib_quarter']['value'], 'MiB')} | "
            f"{_fmt(figs[f'mem.{who}.peak_mib']['value'], 'MiB')} |"
        )
    lines.append(f"| daemon after start-up | {_fmt(figs['mem.daemon.baseline_mib']['value'], 'MiB')} | |")
    lines += [
        "",
        f"## Managed drives in S3 (`--storage`, moto_server; {p.get('storage_size_label', '?')} file, "
        f"memory moving {p['mem_size_label']})",
        "",
        "| system | put | get |",
        "|---|---:|---:|",
    ]
    for sys_, label in (
        ("drive", "Drive → drived --storage → moto_server"),
        ("boto3", "boto3 upload_file / download_file → moto_server"),
    ):
        lines.append(
            f"| {label} | {_fmt(figs[f'storage.{sys_}.put']['value'], 'MB/s')} | "
            f"{_fmt(figs[f'storage.{sys_}.get']['value'], 'MB/s')} |"
        )
    lines.append(f"| Drive → drived --storage, bytes streamed (`DRIVE_HANDOFF=0`) | "
                 f"{_fmt(figs['storage.drive_streamed.put']['value'], 'MB/s')} | "
                 f"{_fmt(figs['storage.drive_streamed.get']['value'], 'MB/s')} |")
    lines.append(f"| daemon peak RSS | {_fmt(figs['storage.daemon.peak_mib']['value'], 'MiB')} | |")
    lines += _cluster(doc)
    lines += _loader(doc)
    lines += ["", "## s3:// index", "", "| figure | value |", "|---|---:|"]
    for k, unit in INDEX_KEYS.items():
        lines.append(f"| {k} | {_fmt(figs[k]['value'], unit)} |")
    raw = doc.get("index_raw") or {}
    if raw:
        lines.append("")
        lines.append(
            "bench_mount.measure(): "
            + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in raw.items())
        )
    missing = {k: f["missing"] for k, f in figs.items() if f["value"] is None}
    if missing:
        lines += ["", "## Not measured", ""]
        reasons: dict[str, list[str]] = {}
        for k, why in missing.items():
            reasons.setdefault(why, []).append(k)
        for why, keys in reasons.items():
            lines.append(f"- {why}: {len(keys)} figure(s) ({', '.join(keys[:4])}{', …' if len(keys) > 4 else ''})")
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    if doc.get("profile"):
        lines += ["", "## Profile", "", doc["profile"]]
    if WHY.is_file():
        lines += ["", WHY.read_text().strip()]
    return "\n".join(lines) + "\n"



def _cluster(doc: dict[str, Any]) -> list[str]:
    """Aggregate small puts through one replica and two (cluster.*)."""
    figs, p, m = doc["figures"], doc["params"], doc["machine"]
    alone, one, two = (figs[f"cluster.{layout}.put_ops_s"]["value"] for layout in CLUSTER_LAYOUTS)

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or not b else f"{a / b:.2f}×"

    return [
        "",
        f"## Replicas (`--storage` on one moto_server, `--coordinator` on one valkey-server; {p['small_files']} "
        f"× 4 KiB puts per client process, {CLUSTER_CONC} threads each)",
        "",
        "| replicas | client processes | aggregate puts | ÷ one replica with the coordinator |",
        "|---|---:|---:|---:|",
        f"| one, without `--coordinator` | 1 | {_fmt(alone, 'ops/s')} | {ratio(alone, one)} |",
        f"| one | 1 | {_fmt(one, 'ops/s')} | 1.00× |",
        f"| two | 2 | {_fmt(two, 'ops/s')} | {ratio(two, one)} |",
        "",
        f"Every process (replicas, clients, moto_server, valkey-server) shares this machine's {m['cores']} "
        "cores, and one moto_server process serves every replica's S3 requests (about 4 a small put): the "
        "ratios say what the coordinator costs and what a second replica adds here, not on separate machines "
        "with a real store.",
    ]


def _ceilings(doc: dict[str, Any]) -> list[str]:
    """The table that sets each target beside what plain grpcio reaches here without storage."""
    figs = doc["figures"]
    rows = [r for r in doc["checks"] if r.get("ceiling")]
    if not rows:
        return []
    lines = [
        "",
        "## Targets beside what Python with grpcio reaches here (same run)",
        "",
        "Each ceiling is plain grpcio doing only the work the contract requires, with no disk: streaming",
        "with CRC32C on both ends (and the sha256 a put's receiver computes as the file's identity), or",
        "one unary call per 4 KiB file to a server that keeps nothing. Where a target needs more than its",
        "ceiling, no drived that stores and verifies the bytes can reach it in Python with grpcio on this",
        "machine (a get may beat a single stream's ceiling over parallel ranged streams).",
        "",
        "| figure | target | needs | ceiling | needs ÷ ceiling | drive | drive ÷ ceiling |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        unit, ceiling, needs = r["unit"], r["ceiling_value"], r["needs"]
        over = "—" if needs is None or not ceiling else f"{needs / ceiling:.2f}×"
        share = "—" if r["value"] is None or not ceiling else f"{r['value'] / ceiling:.2f}×"
        measured = f"{r['ceiling']} {_fmt(ceiling, figs[r['ceiling']]['unit'])}"
        lines.append(
            f"| {r['what']} | {r['target']} | {_fmt(needs, unit)} | {measured} | {over} "
            f"| {_fmt(r['value'], unit)} | {share} |"
        )
    return lines


def _loader(doc: dict[str, Any]) -> list[str]:
    """The DataLoader table: samples per second of each system, and as a share of local files."""
    figs, p = doc["figures"], doc["params"]
    if "loader_samples" not in p:  # a report from before the DataLoader benchmark
        return []
    local = figs["loader.local.samples_s"]["value"]
    lines = [
        "",
        f"## DataLoader ({p['loader_samples']:,} samples of {p['loader_size_label']}, "
        f"{LOADER_WORKERS} workers, batches of {LOADER_BATCH})",
        "",
        "One Dataset, shaped like the README's `DriveFolder` recipe, reads the same samples from each system; "
        "the second epoch of persistent workers is timed.",
        "",
        "| system | samples/s | ÷ local files |",
        "|---|---:|---:|",
    ]
    for sys_, label in LOADER_SYSTEMS.items():
        v = figs[f"loader.{sys_}.samples_s"]["value"]
        share = "—" if v is None or not local else f"{v / local:.2f}×"
        lines.append(f"| {label} | {_fmt(v)} | {share} |")
    return lines


def render_table(doc: dict[str, Any]) -> str:
    """The targets table for the terminal."""
    figs = doc["figures"]
    rows = [("figure", "value", "reference", "ratio", "target", "pass")]
    for r in doc["checks"]:
        refs = ", ".join(f"{k.split('.', 1)[1]} {_fmt(v, figs[k]['unit'])}" for k, v in r["refs"].items()) or "—"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        rows.append(
            (
                r["what"],
                _fmt(r["value"], r["unit"]),
                refs,
                ratio,
                r["target"],
                {True: "PASS", False: "FAIL", None: "n/a"}[r["pass"]],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows)


def write(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, md = out_dir / "latest.json", out_dir / "latest.md"
    tmp = out_dir / "latest.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(j)
    tmp = out_dir / "latest.md.tmp"
    tmp.write_text(render_markdown(doc))
    tmp.replace(md)
    return j, md
