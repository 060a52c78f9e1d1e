"""`python -m bench`: every figure of issue 4 beside references measured in the same run.

Starts what it needs as subprocesses on free 127.0.0.1 ports (drived,
moto_server, nginx, a raw grpc server), runs each measurement in its own
worker process (bench/worker.py), interleaves the systems within each run in
an order that rotates from run to run, neither deletes nor overwrites files
while measuring (every run puts fresh files under new names), and reports
medians of --runs runs as a table, bench/results/latest.json and
bench/results/latest.md (or --out DIR).

Exit status: 0 when every figure was measured, or left out for a reason that
was printed (nginx not installable, bench/bench_mount.py not there yet);
1 when a measurement failed (the report is still written, with the reasons).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.report import CLUSTER_CONC, CLUSTER_LAYOUTS, LOADER_BATCH, LOADER_WORKERS, SMALL_CONC, SMALL_OPS, Figures
from bench.services import (
    Drived,
    MotoServer,
    Nginx,
    RawGrpcServer,
    ServiceUnavailable,
    ValkeyServer,
    _bench_env,
    peak_rss_mib,
    rss_mib,
)
from bench.worker import RESULT_PREFIX

HERE = Path(__file__).resolve().parent
BUCKET = "drived-bench"
STORE_BUCKET = "drived-bench-store"  # where the --storage daemon keeps its drives
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
S3FS_MISSING = (
    "s3fs not installed: its aiobotocore pins botocore below what boto3 1.44 needs (aiobotocore 3.10: "
    "botocore <1.43.118), so the dev extra leaves it out; boto3 get_object reads the same objects instead"
)
KIB, MIB, GIB = 1024, 1024**2, 1024**3


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 1G, 512M, 4096)")
    mult = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024**4}[m.group(2)]
    return int(float(m.group(1)) * mult)


def size_label(n: int) -> str:
    for unit, m in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= m and n % (m // 1024 or 1) == 0:
            v = n / m
            return f"{v:g} {unit}"
    return f"{n} B"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=parse_size, default=None, help="large-file size (default 1G; smoke 4M)")
    p.add_argument("--runs", type=int, default=None, help="runs, medians reported (default 3; smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, whole thing in seconds")
    p.add_argument("--small-files", type=int, default=None, help="4 KiB files per small-file loop (default 1000)")
    p.add_argument("--folder-files", type=int, default=None, help="files in the folder test (default 1000)")
    p.add_argument("--mem-size", type=parse_size, default=None, help="file size for the memory test (default 2G)")
    p.add_argument(
        "--storage-size", type=parse_size, default=None,
        help="file size of the --storage put/get against moto_server (default 256M; smoke 12M: two parts)",
    )
    p.add_argument(
        "--index-keys-per-level",
        type=int,
        default=None,
        help="bench_mount.measure(keys_per_level) (default 100 = 1M keys; smoke 4)",
    )
    p.add_argument(
        "--loader-samples", type=int, default=None, help="samples the DataLoader reads (default 1000; smoke 64)"
    )
    p.add_argument("--loader-size", type=parse_size, default=None, help="bytes of a sample (default 64K; smoke 4K)")
    p.add_argument("--chunk", type=parse_size, default=MIB, help="chunk size of the raw references (1M)")
    p.add_argument("--budget", type=float, default=None, help="max seconds per small-file loop (default 60; smoke 5)")
    p.add_argument(
        "--only",
        default="large,small,folder,mem,storage,cluster,index,loader",
        help="comma-separated groups to run (large,small,folder,mem,storage,cluster,index,loader)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where latest.json/md go")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the scratch dir (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the figures of groups not run (--only) from the existing latest.json in --out",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy profiles (raw collapsed stacks) of the drive client and daemon "
        "during the first run's large put/get and c16 small puts into this dir",
    )
    a = p.parse_args(argv)
    smoke = a.smoke
    a.size = a.size or (4 * MIB if smoke else GIB)
    a.runs = a.runs or (1 if smoke else 3)
    a.small_files = a.small_files or (40 if smoke else 1000)
    a.folder_files = a.folder_files or (40 if smoke else 1000)
    a.mem_size = a.mem_size or (16 * MIB if smoke else 2 * GIB)
    a.storage_size = a.storage_size or (12 * MIB if smoke else 256 * MIB)
    a.index_keys_per_level = a.index_keys_per_level or (4 if smoke else 100)
    a.budget = a.budget or (5.0 if smoke else 60.0)
    a.loader_samples = a.loader_samples or (64 if smoke else 1000)
    a.loader_size = a.loader_size or (4 * KIB if smoke else 64 * KIB)
    a.groups = {g.strip() for g in a.only.split(",") if g.strip()}
    return a


class WorkerFailed(RuntimeError):
    pass


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.figs = Figures()
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.exit_stack = contextlib.ExitStack()
        parent = str(args.workdir) if args.workdir else None
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="drived-bench-", dir=parent))
        self.src = self.work / "src"
        self.dst = self.work / "dst"
        self.loader_root = self.src / "loader"
        self.loader_systems: list[tuple[str, dict[str, Any]]] = []
        self.src.mkdir()
        self.dst.mkdir()
        self.env = _bench_env()
        self.moto: MotoServer | None = None
        self.nginx: Nginx | None = None
        self.raw: RawGrpcServer | None = None
        self.drived: Drived | None = None
        self.prof_done: set[str] = set()

    # ------------------------------------------------------------ plumbing

    def say(self, msg: str) -> None:
        print(f"bench: {msg}", flush=True)

    def fail(self, keys: list[str] | str, what: str, err: BaseException | str) -> None:
        reason = f"{what} failed: {err}"
        self.say(reason)
        self.errors.append(reason)
        for k in [keys] if isinstance(keys, str) else keys:
            self.figs.miss(k, reason)

    def leave_out(self, reason: str, *prefixes: str) -> None:
        """Leaves figures out for a reason that is printed and kept in the report's notes."""
        self.say(reason)
        self.notes.append(reason)
        for prefix in prefixes:
            self.figs.miss(prefix, reason)

    def worker(self, spec: dict[str, Any], timeout: float, profile: str | None = None) -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.worker", json.dumps(spec)]
        daemon_prof: subprocess.Popen | None = None
        if profile and self.a.profile and profile not in self.prof_done:
            self.prof_done.add(profile)
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            self.a.profile.mkdir(parents=True, exist_ok=True)
            argv = [
                pyspy,
                "record",
                "--format",
                "raw",
                "-r",
                "250",
                "-o",
                str(self.a.profile / f"client-{profile}.txt"),
                "--",
                *argv,
            ]
            if self.drived is not None:
                daemon_prof = subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--format",
                        "raw",
                        "-r",
                        "250",
                        "--pid",
                        str(self.drived.pid),
                        "-o",
                        str(self.a.profile / f"daemon-{profile}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.work)
        except subprocess.TimeoutExpired as e:
            raise WorkerFailed(f"timed out after {timeout:.0f}s") from e
        finally:
            if daemon_prof is not None:
                daemon_prof.send_signal(signal.SIGINT)
                try:
                    daemon_prof.wait(30)
                except subprocess.TimeoutExpired:
                    daemon_prof.kill()
        for line in reversed(r.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WorkerFailed(f"exit {r.returncode}: {tail[-600:]}")

    def timeout_for(self, nbytes: int) -> float:
        return 120.0 + nbytes / (20 * MIB)  # generous: 20 MB/s floor

    # ------------------------------------------------------------ setup

    def make_data(self) -> None:
        a = self.a
        t0 = time.perf_counter()
        if a.groups & {"large"}:
            write_random(self.src / "large.bin", a.size)
        # Fresh files and names for every run: no measurement overwrites (deletes) what another stored.
        for run in range(a.runs):
            if a.groups & {"small"}:
                for conc in SMALL_CONC:
                    for i in range(a.small_files):
                        write_random(self.src / small_dir(run, conc) / f"{i:05d}.bin", 4 * KIB)
            if a.groups & {"folder"}:
                for i in range(a.folder_files):
                    write_random(self.src / folder_dir(run) / f"d{i % 10}" / f"{i:05d}.bin", 4 * KIB)
        if "loader" in a.groups:
            for i in range(a.loader_samples):
                write_random(self.loader_root / "train" / f"{i:05d}.bin", a.loader_size)
        self.say(f"test data written in {time.perf_counter() - t0:.1f}s under {self.work}")

    def start_services(self) -> None:
        groups = self.a.groups
        if groups & {"large", "small", "loader"}:
            try:
                self.moto = self.exit_stack.enter_context(MotoServer(self.work))
                import boto3

                boto3.session.Session(
                    aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
                ).client("s3", endpoint_url=self.moto.url).create_bucket(Bucket=BUCKET)
                self.say(f"moto_server on {self.moto.url}")
            except Exception as e:
                self.fail(["large.boto3_moto", "small.boto3_moto", "loader.boto3_moto", "loader.s3fs_moto",
                           "loader.drive_s3"], "moto_server", e)
        if groups & {"large", "small", "folder"}:
            try:
                self.nginx = self.exit_stack.enter_context(Nginx(self.work))
                self.say(f"nginx on {self.nginx.url} (root {self.nginx.root})")
            except ServiceUnavailable as e:
                self.leave_out(f"nginx unavailable: {e}", "large.nginx", "small.nginx", "folder.nginx_loop")
        if groups & {"large", "small"}:
            try:
                self.raw = self.exit_stack.enter_context(RawGrpcServer(self.work))
                self.say(f"raw grpc server on {self.raw.endpoint}")
            except Exception as e:
                self.fail(["large.grpc_raw", "large.grpc_crc32c", "small.grpc_raw"], "raw grpc server", e)
        if groups & {"large", "small", "folder", "loader"}:
            # Its s3:// drives read the bench's moto_server (the DataLoader's s3:// drive).
            s3_env = {"AWS_ENDPOINT_URL": self.moto.url, **MOTO_CREDENTIALS} if self.moto else {}
            try:
                self.drived = self.exit_stack.enter_context(Drived(self.work, env=s3_env))
                self.say(f"drived on {self.drived.endpoint} (pid {self.drived.pid})")
            except Exception as e:
                self.fail(["large.drive", "small.drive", "folder.drive", "loader.drive"], "drived", e)

    # ------------------------------------------------------------ groups

    def measure(
        self,
        keys: str | list[str],
        what: str,
        spec: dict[str, Any],
        timeout: float,
        profile: str | None = None,
    ) -> dict[str, Any] | None:
        try:
            return self.worker(spec, timeout, profile)
        except Exception as e:
            self.fail(keys, what, e)
            return None

    def run_large(self, run: int) -> None:
        a, size = self.a, self.a.size
        to = self.timeout_for(size)
        big = str(self.src / "large.bin")
        out = str(self.dst / "large.bin")

        def measure(key: str, what: str, spec: dict[str, Any], profile: str | None = None) -> dict[str, Any] | None:
            # Each transfer starts from the same state of memory and disk (worker.settle_before_transfer).
            return self.measure(key, what, {**spec, "settle": [size, str(self.dst)]}, to, profile)

        def rec(key: str, res: dict[str, Any] | None) -> None:
            if res:
                self.figs.add(key, res["bytes"] / res["seconds"] / 1e6)

        rec(
            "large.tcp",
            measure("large.tcp", "raw TCP", {"task": "tcp", "size": size, "chunk": a.chunk}),
        )
        rec(
            "large.cp_fsync",
            measure(
                "large.cp_fsync",
                "cp+fsync",
                {"task": "cp_fsync", "src": big, "dst": str(self.dst / "cp.bin")},
            ),
        )
        if self.raw:
            ep = self.raw.endpoint
            for system, checksums in (("grpc_raw", False), ("grpc_crc32c", True)):
                for direction, task in (("up", "grpc_up"), ("down", "grpc_down")):
                    key = f"large.{system}.{direction}"
                    spec = {"task": task, "endpoint": ep, "size": size, "chunk": a.chunk, "checksums": checksums}
                    rec(key, measure(key, f"plain grpc {direction}{' + checksums' if checksums else ''}", spec))
        if self.moto:
            u = self.moto.url
            if run == 0 and size > 64 * MIB:
                self.notes.append(
                    "boto3 download_file against moto_server is bounded by moto: download_file issues 8 MiB "
                    "ranged GETs and moto reads and copies the whole object for each one (moto/s3/models.py "
                    "FakeKey.value, responses.py _handle_range_header), so its time grows with size²; "
                    "upload_file and the small-object figures are not affected."
                )
            rec(
                "large.boto3_moto.put",
                measure(
                    "large.boto3_moto.put",
                    "boto3 upload_file",
                    {"task": "boto3_put", "url": u, "bucket": BUCKET, "src": big, "key": "large.bin"},
                ),
            )
            rec(
                "large.boto3_moto.get",
                measure(
                    "large.boto3_moto.get",
                    "boto3 download_file",
                    {"task": "boto3_get", "url": u, "bucket": BUCKET, "key": "large.bin", "dst": out},
                ),
            )
        if self.nginx:
            u = self.nginx.url
            rec(
                "large.nginx.put",
                measure(
                    "large.nginx.put",
                    "requests PUT nginx",
                    {"task": "nginx_put", "url": u, "src": big, "name": "large.bin"},
                ),
            )
            rec(
                "large.nginx.get",
                measure(
                    "large.nginx.get",
                    "requests GET nginx",
                    {"task": "nginx_get", "url": u, "name": "large.bin", "dst": out},
                ),
            )
        if self.drived:
            ep = self.drived.endpoint
            for system, twin in (("drive", "Drive"), ("async_drive", "AsyncDrive")):
                for op, root in (("put", self.src), ("get", self.dst)):
                    key = f"large.{system}.{op}"
                    spec = {"task": f"drive_{op}", "endpoint": ep, "root": str(root), "relpath": "large.bin",
                            "twin": twin}
                    profile = f"large-{op}" if twin == "Drive" else None
                    rec(key, measure(key, f"{twin}.{op} large", spec, profile=profile))
            for op, root in (("put", self.src), ("get", self.dst)):
                key = f"large.drive_streamed.{op}"
                spec = {"task": f"drive_{op}", "endpoint": ep, "root": str(root), "relpath": "large.bin",
                        "handoff": False}
                rec(key, measure(key, f"Drive.{op} large, streamed", spec))

    def run_small(self, run: int) -> None:
        a = self.a
        to = a.budget * 2 + 120
        systems: list[tuple[str, dict[str, Any]]] = []
        if self.drived:
            systems.append(("drive", {"endpoint": self.drived.endpoint}))
        if self.moto:
            systems.append(("boto3_moto", {"url": self.moto.url, "bucket": BUCKET}))
        if self.nginx:
            systems.append(("nginx", {"url": self.nginx.url}))
        if self.raw:
            systems.append(("grpc_raw", {"endpoint": self.raw.endpoint}))
        for conc in SMALL_CONC:
            names = [f"{small_dir(run, conc)}/{i:05d}.bin" for i in range(a.small_files)]
            for op in SMALL_OPS:  # put before get: get reads what put stored
                for system, extra in rotated(systems, run):
                    base = f"small.{system}.{op}.c{conc}"
                    res = self.measure(
                        base,
                        f"{system} small {op} c{conc}",
                        {
                            "task": "small",
                            "system": system,
                            "op": op,
                            "conc": conc,
                            "names": names,
                            "src_root": str(self.src),
                            "dst_root": str(self.dst / f"run{run}-small-c{conc}-{system}"),
                            "budget": a.budget,
                            **extra,
                        },
                        to,
                        profile=f"small-{op}-c16" if system == "drive" and conc == 16 else None,
                    )
                    if res:
                        for stat in ("ops_s", "p50_ms", "p99_ms"):
                            self.figs.add(f"{base}.{stat}", res[stat])
                        if not res["complete"]:
                            note = (
                                f"{base}: stopped by the {a.budget:.0f}s budget after {res['ops']} of "
                                f"{len(names)} ops (run {run + 1})"
                            )
                            self.notes.append(note)
                            self.say(note)

    def run_folder(self, run: int) -> None:
        a = self.a
        to = a.budget * 2 + 120
        systems: list[tuple[str, dict[str, Any]]] = []
        if self.drived:
            systems.append(("drive", {"endpoint": self.drived.endpoint}))
        if self.nginx:
            systems.append(("nginx_loop", {"url": self.nginx.url}))
        for op in SMALL_OPS:
            for system, extra in rotated(systems, run):
                base = f"folder.{system}.{op}"
                res = self.measure(
                    base,
                    f"{system} folder {op}",
                    {
                        "task": "folder",
                        "system": system,
                        "op": op,
                        "folder": folder_dir(run),
                        "src_root": str(self.src),
                        "dst_root": str(self.dst / f"run{run}-folder-{system}"),
                        "budget": a.budget,
                        **extra,
                    },
                    to,
                    profile=f"folder-{op}" if system == "drive" else None,
                )
                if res:
                    self.figs.add(f"{base}.files_s", res["files_s"])
                    if not res["complete"]:
                        self.notes.append(f"{base}: stopped by the budget after {res['files']} files")

    def prepare_loader(self) -> None:
        """Puts the DataLoader's samples where each system reads them, and picks the systems that can run."""
        if importlib.util.find_spec("torch") is None:
            self.leave_out("torch not installed: `make install-ml` for the DataLoader figures", "loader.")
            return
        root = str(self.loader_root)
        if self.drived:
            from drive_client import Drive

            Drive("lit://loader", root_folder=self.loader_root, endpoint=self.drived.endpoint).put("train")
            self.loader_systems.append(("drive_lit", {"endpoint": self.drived.endpoint}))
        if self.moto:
            from concurrent.futures import ThreadPoolExecutor

            from bench.worker import _boto3_client

            s3 = _boto3_client(self.moto.url)
            names = sorted(p.name for p in (self.loader_root / "train").iterdir())
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: s3.upload_file(f"{root}/train/{n}", BUCKET, f"loader/train/{n}"), names))
            where = {"url": self.moto.url, "bucket": BUCKET, "root": root}  # root: the sample names
            if self.drived:
                self.loader_systems.append(("drive_s3", {"endpoint": self.drived.endpoint, "bucket": BUCKET}))
            self.loader_systems.append(("boto3_moto", where))
            if importlib.util.find_spec("s3fs") is None:
                self.leave_out(S3FS_MISSING, "loader.s3fs_moto")
            else:
                self.loader_systems.append(("s3fs_moto", where))
        self.loader_systems.append(("local", {"root": root}))

    def run_loader(self, run: int) -> None:
        for system, extra in rotated(self.loader_systems, run):
            key = f"loader.{system}.samples_s"
            spec = {"task": "loader", "system": system, "workers": LOADER_WORKERS, "batch": LOADER_BATCH, **extra}
            res = self.measure(key, f"DataLoader over {system}", spec, timeout=self.a.budget * 2 + 180)
            if res:
                self.figs.add(key, res["samples_s"])

    def run_mem(self) -> None:
        """Peak RSS of a fresh daemon and of each client process, ¼-size file then full size."""
        a = self.a
        mem_src = self.work / "mem-src"
        mem_dst = self.work / "mem-dst"
        mem_dst.mkdir(exist_ok=True)
        full, quarter = a.mem_size, max(a.mem_size // 4, 1)
        t0 = time.perf_counter()
        write_random(mem_src / "quarter.bin", quarter)
        write_random(mem_src / "full.bin", full)
        self.say(f"memory-test data ({size_label(full)}) written in {time.perf_counter() - t0:.1f}s")
        try:
            d = Drived(self.work)
        except Exception as e:
            self.fail("mem.", "drived (memory test)", e)
            return
        try:
            time.sleep(0.5)
            self.figs.add("mem.daemon.baseline_mib", rss_mib(d.pid))
            for name, suffix, nbytes in (("quarter.bin", "_quarter", quarter), ("full.bin", "", full)):
                to = self.timeout_for(nbytes)
                res = self.measure(
                    f"mem.client_put.peak_mib{suffix}",
                    f"memory test put {name}",
                    {"task": "drive_put", "endpoint": d.endpoint, "root": str(mem_src), "relpath": name},
                    to,
                )
                if res:
                    self.figs.add(f"mem.client_put.peak_mib{suffix}", res["client_peak_mib"])
                res = self.measure(
                    f"mem.client_get.peak_mib{suffix}",
                    f"memory test get {name}",
                    {"task": "drive_get", "endpoint": d.endpoint, "root": str(mem_dst), "relpath": name},
                    to,
                )
                if res:
                    self.figs.add(f"mem.client_get.peak_mib{suffix}", res["client_peak_mib"])
                self.figs.add(f"mem.daemon.peak_mib{suffix}", peak_rss_mib(d.pid))
        finally:
            d.stop()
            shutil.rmtree(d.dir, ignore_errors=True)
            shutil.rmtree(mem_src, ignore_errors=True)
            shutil.rmtree(mem_dst, ignore_errors=True)

    def run_storage(self) -> None:
        """Large put and get through a daemon with --storage beside boto3's own transfers, against one moto_server;
        then the daemon's peak RSS after it also moved a --mem-size file each way."""
        a = self.a
        src, dst = self.work / "storage-src", self.work / "storage-dst"
        dst.mkdir(exist_ok=True)
        write_random(src / "large.bin", a.storage_size)
        write_random(src / "mem.bin", a.mem_size)
        try:
            moto = MotoServer(self.work)
        except Exception as e:
            self.fail("storage.", "moto_server (storage)", e)
            return
        try:
            credentials = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}
            import boto3

            boto3.session.Session(**credentials).client("s3", endpoint_url=moto.url).create_bucket(Bucket=STORE_BUCKET)
            env = {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL": moto.url}
            d = Drived(self.work, storage=f"s3://{STORE_BUCKET}/drives/", env=env)
        except Exception as e:
            moto.stop()
            self.fail("storage.", "drived --storage", e)
            return
        try:
            self._storage_runs(d, moto.url, src, dst)
            to = self.timeout_for(a.mem_size) * 3  # moto_server moves about 30 MB/s here
            for task in ("drive_put", "drive_get"):
                root = src if task == "drive_put" else dst
                self.measure("storage.daemon.peak_mib", f"--storage memory test {task}",
                             {"task": task, "endpoint": d.endpoint, "root": str(root), "relpath": "mem.bin"}, to)
            self.figs.add("storage.daemon.peak_mib", peak_rss_mib(d.pid))
        finally:
            d.stop()
            moto.stop()
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)

    def _storage_runs(self, d: Drived, url: str, src: Path, dst: Path) -> None:
        size = self.a.storage_size
        to = self.timeout_for(size) * 3
        for run in range(self.a.runs):
            name = f"r{run}.bin"
            (src / name).unlink(missing_ok=True)
            (src / name).hardlink_to(src / "large.bin")  # a fresh name each run: nothing is overwritten
            systems = [
                ("drive", {"task": "drive_put", "endpoint": d.endpoint, "root": str(src), "relpath": name},
                 {"task": "drive_get", "endpoint": d.endpoint, "root": str(dst), "relpath": name}),
                ("boto3", {"task": "boto3_put", "url": url, "bucket": STORE_BUCKET, "src": str(src / name),
                           "key": name},
                 {"task": "boto3_get", "url": url, "bucket": STORE_BUCKET, "key": name, "dst": str(dst / name)}),
                ("drive_streamed", {"task": "drive_put", "endpoint": d.endpoint, "root": str(src),
                                    "relpath": name, "handoff": False},
                 {"task": "drive_get", "endpoint": d.endpoint, "root": str(dst), "relpath": name, "handoff": False}),
            ]
            for system, put, get in rotated(systems, run):
                for op, spec in (("put", put), ("get", get)):
                    key = f"storage.{system}.{op}"
                    res = self.measure(key, f"{system} {op} (storage)", {**spec, "settle": [size, str(dst)]}, to)
                    if res:
                        self.figs.add(key, res["bytes"] / res["seconds"] / 1e6)

    def run_cluster(self) -> None:
        """Aggregate small-file puts through two replicas, each with its own client process, beside one
        replica with one client, and one replica without --coordinator, in the same run: all over one
        moto_server (and one valkey-server)."""
        a = self.a
        src = self.work / "cluster-src"
        names = [f"c/{i:05d}.bin" for i in range(a.small_files)]
        for name in names:
            write_random(src / name, 4 * KIB)
        services: list[Any] = []
        try:
            moto = MotoServer(self.work)
            services.append(moto)
            import boto3

            boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
                                  ).client("s3", endpoint_url=moto.url).create_bucket(Bucket=STORE_BUCKET)
            valkey = ValkeyServer(self.work)
            services.append(valkey)
            env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": moto.url, "DRIVED_COORDINATOR": valkey.url}
            storage = f"s3://{STORE_BUCKET}/drives/"
            replicas = [Drived(self.work, storage=storage, env=env) for _ in range(2)]
            services += replicas
            alone = Drived(self.work, storage=storage, env={k: v for k, v in env.items() if k != "DRIVED_COORDINATOR"})
            services.append(alone)
        except Exception as e:
            for service in services:
                service.stop()
            self.fail("cluster.", "the replicas (moto_server, valkey-server, three drived)", e)
            return
        layouts = {"alone": [alone], "one": replicas[:1], "two": replicas}
        try:
            for run in range(a.runs):
                for layout in rotated(list(CLUSTER_LAYOUTS), run):
                    self._cluster_put(run, layout, layouts[layout], src, names)
        finally:
            for service in services:
                service.stop()
            shutil.rmtree(src, ignore_errors=True)

    def _cluster_put(self, run: int, layout: str, replicas: list[Drived], src: Path, names: list[str]) -> None:
        """One client process per replica, all starting at once (each into a drive of its own)."""
        key = f"cluster.{layout}.put_ops_s"
        start_at = time.time() + 5  # after every client process has started and warmed its channels
        specs = [
            {"task": "small", "system": "drive", "op": "put", "conc": CLUSTER_CONC, "names": names,
             "src_root": str(src), "dst_root": str(self.work / "cluster-dst"), "budget": self.a.budget,
             "endpoint": replica.endpoint, "drive": f"lit://cluster-r{run}-{layout}-{i}", "start_at": start_at}
            for i, replica in enumerate(replicas)
        ]
        results: list[dict[str, Any] | None] = [None] * len(specs)

        def one(i: int) -> None:
            results[i] = self.measure(key, f"cluster put ({layout}, client {i + 1})", specs[i],
                                      self.a.budget * 2 + 120)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if all(results):
            done = [r for r in results if r is not None]
            self.figs.add(key, sum(r["ops"] for r in done) / max(r["seconds"] for r in done))

    def run_index(self) -> None:
        k = self.a.index_keys_per_level
        res = self.measure("index.", "s3:// index benchmark", {"task": "index", "keys_per_level": k}, timeout=1800)
        if res is None:
            return
        if "missing" in res:
            self.say(res["missing"])
            self.notes.append(res["missing"])
            self.figs.miss("index.", res["missing"])
            return
        got = res["result"] or {}
        self.index_raw = got
        mapped = map_index_result(got)
        for key, v in mapped.items():
            self.figs.add(key, v)
        for key in report.INDEX_KEYS:
            if key not in mapped:
                self.figs.miss(key, f"bench_mount.measure() returned no such figure (keys: {sorted(got)})")

    # ------------------------------------------------------------ main

    def run(self) -> int:
        a = self.a
        t_start = time.perf_counter()
        self.index_raw: dict[str, Any] | None = None
        try:
            self.make_data()
            self.start_services()
            if "loader" in a.groups:
                self.prepare_loader()
            for run in range(a.runs):
                self.say(f"run {run + 1}/{a.runs}")
                if "large" in a.groups:
                    self.run_large(run)
                if "small" in a.groups:
                    self.run_small(run)
                if "folder" in a.groups:
                    self.run_folder(run)
                if "loader" in a.groups:
                    self.run_loader(run)
            self.exit_stack.close()
            if "mem" in a.groups:
                self.say("memory test")
                self.run_mem()
            if "storage" in a.groups:
                self.say("managed drives in S3 (--storage)")
                self.run_storage()
            if "cluster" in a.groups:
                self.say("replicas over --storage and --coordinator")
                self.run_cluster()
            if "index" in a.groups:
                self.say("s3:// index")
                self.run_index()
        finally:
            self.exit_stack.close()
            if not a.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        merged: dict[str, Any] | None = None
        prev_path = a.out / "latest.json"
        if a.merge and prev_path.exists():
            merged = json.loads(prev_path.read_text())
        for g, prefix in (
            ("large", "large."),
            ("small", "small."),
            ("folder", "folder."),
            ("mem", "mem."),
            ("storage", "storage."),
            ("cluster", "cluster."),
            ("index", "index."),
            ("loader", "loader."),
        ):
            if g in a.groups:
                continue
            if merged:
                for key, fig in merged["figures"].items():
                    if key.startswith(prefix) and key in self.figs.units:
                        for v in fig.get("runs") or []:
                            self.figs.add(key, v)
                        if fig.get("missing"):
                            self.figs.miss(key, fig["missing"])
                if g == "index":
                    self.index_raw = merged.get("index_raw")
            else:
                self.figs.miss(prefix, f"group {g} not run (--only)")
        if merged:
            self.notes = [n for n in merged.get("notes", []) if n not in self.notes] + self.notes
            self.notes.append(
                f"groups {', '.join(sorted(a.groups))} re-measured on "
                f"{time.strftime('%Y-%m-%d %H:%M')}; the others are from {merged['machine']['date']}"
            )
        lbl = size_label(a.size)
        doc: dict[str, Any] = {
            "machine": report.machine_info(),
            "params": {
                "command": "python -m bench " + " ".join(sys.argv[1:])
                if sys.argv[0].endswith("__main__.py")
                else "python -m bench",
                "size": a.size,
                "size_label": lbl,
                "runs": a.runs,
                "smoke": a.smoke,
                "chunk": a.chunk,
                "small_files": a.small_files,
                "folder_files": a.folder_files,
                "mem_size": a.mem_size,
                "mem_size_label": size_label(a.mem_size),
                "storage_size": a.storage_size,
                "storage_size_label": size_label(a.storage_size),
                "index_keys_per_level": a.index_keys_per_level,
                "loader_samples": a.loader_samples,
                "loader_size": a.loader_size,
                "loader_size_label": size_label(a.loader_size),
                "budget_s": a.budget,
                "groups": sorted(a.groups),
                "seconds": round(time.perf_counter() - t_start, 1),
            },
            "figures": self.figs.as_json(),
            "checks": report.evaluate(self.figs, lbl, a.folder_files),
            "index_raw": self.index_raw,
            "notes": self.notes,
            "errors": self.errors,
        }
        if a.profile:
            doc["profile_dir"] = str(a.profile)
            doc["notes"].append(
                "run 1's drive transfers were recorded with py-spy (--profile, 250 Hz, pausing the "
                "sampled processes), which slows them a little; the figures are medians of all runs"
            )
        jpath, mpath = report.write(doc, a.out)
        print()
        print(report.render_table(doc))
        print()
        self.say(f"wrote {jpath} and {mpath} in {doc['params']['seconds']:.0f}s")
        if self.errors:
            self.say(f"{len(self.errors)} measurement(s) failed; first: {self.errors[0]}")
            return 1
        return 0


def small_dir(run: int, conc: int) -> str:
    return f"small-r{run}-c{conc}"


def folder_dir(run: int) -> str:
    return f"folder-r{run}"


def rotated(systems: list[Any], run: int) -> list[Any]:
    """`systems` in a different order each run, so no system always measures first (or last).

    Going first matters here: the VM's file system makes each new file slower
    for a minute or more after many deletes, and freed memory is handed back
    to the host, so the first writer after a cleanup pays for both.
    """
    k = run % len(systems) if systems else 0
    return systems[k:] + systems[:k]


def map_index_result(got: dict[str, Any]) -> dict[str, float]:
    """bench_mount.measure()'s dict onto our index.* figures (tolerant of its key names)."""
    aliases = {
        "index.mount_s": ("mount_s", "mount_seconds", "drived_mount_s", "mount"),
        "index.mount_cpu_s_per_million": ("mount_cpu_s_per_million",),
        "index.boto3_paginator_s": (
            "boto3_paginator_s",
            "paginator_s",
            "boto3_s",
            "boto3_seconds",
            "paginator_seconds",
        ),
        "index.list100_ms": ("list100_ms", "list_ms", "list_latency_ms", "list_100_ms"),
        "index.daemon_rss_mib": ("daemon_rss_mib", "rss_mib", "daemon_peak_rss_mib", "daemon_rss_peak_mib"),
        "index.keys": ("keys", "objects", "n_keys", "total_keys"),
    }
    out: dict[str, float] = {}
    for key, names in aliases.items():
        for n in names:
            v = got.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)
                break
    return out


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return Harness(args).run()
