"""PyTorch, Lightning and pyarrow on drives, with the real packages (marker `ml`).

What torch or Lightning runs, runs in a subprocess, as a user's job would (and so the client's
memory is its own): a 200 MiB state dict through `fsspec.open("lit://…")` with the client's and
the daemon's peak memory measured; the README's DataLoader recipe over a lit:// folder with 4
workers; Lightning's CSVLogger on a drive, alone and under a Trainer (its flushes append). pyarrow
runs here: a scan of a folder of Parquet files, with and without read-ahead, with the bytes the
daemon sent counted by its own metrics; scripts that read Parquet and exit at once, run again and
again, exit 0 (pyarrow's threads are done with the files first). The README's examples (Lightning
checkpoints, an evaluator watching them, a resumed run, a DataLoader over an s3:// drive) run in
tests/test_readme.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import MIB, DaemonHandle, wait_until
from test_fsspec import get_requests
from test_metrics import scrape
from test_readme import as_files, readme_blocks, run_python

from bench.services import free_port, peak_rss_mib, reset_peak_rss, rss_mib
from drive_client import Drive

pytestmark = [pytest.mark.ml, pytest.mark.timeout(300)]

STATE_DICT = 200 * MIB


def bytes_sent(daemon: DaemonHandle) -> float:
    """What the daemon has sent in file bytes since it started (its own counter)."""
    return scrape(daemon.metrics)['drived_transfer_bytes_total{direction="out"}']


def last_json(run: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(run.stdout.splitlines()[-1])


# --- a 200 MiB state dict --------------------------------------------------------------------

# Saves a state dict of `count` float32 tensors of `mib` MiB each to URL, loads it back, and prints
# how far the process's peak RSS rose above its RSS before each step (MiB), and whether the bytes
# loaded are the bytes saved.
STATE_DICT_ROUND_TRIP = """
import gc, hashlib, json, os, sys
import fsspec, torch
from bench.services import peak_rss_mib, reset_peak_rss, rss_mib

url, count, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pid = os.getpid()
torch.manual_seed(0)
state = {f"layer{i}.weight": torch.empty(mib << 18).uniform_() for i in range(count)}

def digest(tensors):
    h = hashlib.sha256()
    for tensor in tensors.values():
        h.update(tensor.numpy())
    return h.hexdigest()

saved = digest(state)
gc.collect()
before = rss_mib(pid)
reset_peak_rss(pid)
with fsspec.open(url, "wb") as f:
    torch.save(state, f)
save = peak_rss_mib(pid) - before
del state
gc.collect()
before = rss_mib(pid)
reset_peak_rss(pid)
with fsspec.open(url, "rb") as f:
    loaded = torch.load(f)
load = peak_rss_mib(pid) - before
print(json.dumps({"save_mib": save, "load_mib": load, "same": digest(loaded) == saved}))
"""


def round_trip(daemon: DaemonHandle, tmp_path: Path, count: int, mib: int) -> tuple[dict, float]:
    """The client's report, and how far the daemon's peak RSS rose above its RSS before the round trip."""
    uri = f"lit://state_{count}x{mib}/model.pt"
    pid = daemon.proc.pid
    before = rss_mib(pid)
    reset_peak_rss(pid)
    report = last_json(run_python(["-c", STATE_DICT_ROUND_TRIP, uri, str(count), str(mib)], tmp_path,
                                  daemon.endpoint))
    rise = peak_rss_mib(pid) - before
    stored = Drive(uri.rpartition("/")[0], endpoint=daemon.endpoint).stat("model.pt")
    assert report["same"] and stored.size > count * mib * MIB
    return report, rise


# What streaming may hold beside the tensors: the client's imports on the first lit:// open (~17 MiB),
# a 5 MiB block of gathered writes or read-ahead, and the transfer's 1 MiB chunks (~30 MiB in all,
# bench/WHY.md); a quarter of the file (50 MiB) is more than that and far less than one more copy of
# a tensor as big as the file. torch.save into a local file object holds nothing beyond the tensors,
# and torch.load exactly the tensors it returns (both measured in bench/WHY.md).
BUFFERS_MIB = STATE_DICT / MIB / 4


def test_a_200_mib_state_dict_saves_and_loads_holding_a_fraction_of_it(daemon, tmp_path):
    """50 tensors of 4 MiB (a model's layers): neither the client nor the daemon holds the whole file."""
    client, served = round_trip(daemon, tmp_path, count=50, mib=4)
    assert client["save_mib"] < BUFFERS_MIB, client
    assert client["load_mib"] < STATE_DICT / MIB + BUFFERS_MIB, client  # the loaded tensors, and buffers
    assert served < BUFFERS_MIB, served  # a few chunks per stream


def test_one_200_mib_tensor_saves_and_loads_holding_a_fraction_of_it(daemon, tmp_path):
    """One tensor as big as the file: torch.save writes it in one call, which goes to the spool straight from the
    tensor's memory, and torch.load reads it with one readinto, fetched straight into the tensor."""
    client, served = round_trip(daemon, tmp_path, count=1, mib=200)
    assert served < BUFFERS_MIB, served
    assert client["save_mib"] < BUFFERS_MIB, client
    assert client["load_mib"] < STATE_DICT / MIB + BUFFERS_MIB, client


# --- Parquet: only the row groups asked for ------------------------------------------------------

ROWS = 1 << 18  # rows of a row group: 2 MiB a column
GROUPS = 8  # row groups of a file


@pytest.fixture(scope="module")
def parquet_folder(daemon: DaemonHandle) -> str:
    """lit://parquet_1/table/: two files of 8 row groups each; `step` counts rows across both files."""
    import fsspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("lit", endpoint=daemon.endpoint, skip_instance_cache=True)
    for part in range(2):
        first = part * GROUPS * ROWS
        table = pa.table({"step": np.arange(first, first + GROUPS * ROWS, dtype=np.int64),
                          "x": np.random.default_rng(part).random(GROUPS * ROWS)})
        with fs.open(f"parquet_1/table/part-{part}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=ROWS, compression="none")
    return "parquet_1/table"


def read_group_3_of_part_1(how: str, endpoint: str, folder: str, cache_type: str):
    """Column x of the rows of part-1's row group 3, selected by a filter on step."""
    import fsspec
    import pandas as pd
    import pyarrow.dataset as ds

    low = GROUPS * ROWS + 3 * ROWS
    options = {"endpoint": endpoint, "cache_type": cache_type}
    if how == "pyarrow.dataset":
        fs = fsspec.filesystem("lit", skip_instance_cache=True, **options)
        dataset = ds.dataset(folder, filesystem=fs, format="parquet")
        return dataset.to_table(columns=["x"], filter=(ds.field("step") >= low) & (ds.field("step") < low + ROWS))
    frame = pd.read_parquet(f"lit://{folder}/part-1.parquet", columns=["x"],
                            filters=[("step", ">=", low), ("step", "<", low + ROWS)], storage_options=options)
    return frame.to_numpy()


@pytest.mark.parametrize(("how", "cache_type"), [
    ("pyarrow.dataset", "readahead"), ("pandas.read_parquet", "readahead"),
    ("pyarrow.dataset", "none"), ("pandas.read_parquet", "none"),
])
def test_parquet_reads_send_only_the_row_groups_asked_for(daemon, parquet_folder, how, cache_type):
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq
    from fsspec.spec import AbstractBufferedFile

    fs = fsspec.filesystem("lit", endpoint=daemon.endpoint, skip_instance_cache=True)
    files = fs.find(parquet_folder)
    total = sum(fs.size(path) for path in files)
    with fs.open(files[1]) as f:
        group = pq.ParquetFile(f).metadata.row_group(3)
    asked = group.column(0).total_compressed_size + group.column(1).total_compressed_size  # step and x
    footers = 2 * len(files) * 64 * 1024  # pyarrow reads a file's last 64 KiB for its footer, here twice

    before = bytes_sent(daemon)
    got = read_group_3_of_part_1(how, daemon.endpoint, parquet_folder, cache_type)
    sent = bytes_sent(daemon) - before

    expected = np.random.default_rng(1).random(GROUPS * ROWS)[3 * ROWS:4 * ROWS]
    assert np.array_equal(np.asarray(got["x"] if how == "pyarrow.dataset" else got[:, 0]), expected)
    # The two column chunks asked for (one contiguous range), plus the one block fsspec reads ahead of
    # a read (none with cache_type "none"), plus the footers; the other 15 row groups (more than 80 % of
    # the files) are never sent.
    read_ahead = AbstractBufferedFile.DEFAULT_BLOCK_SIZE if cache_type == "readahead" else 0
    assert asked <= sent <= asked + read_ahead + footers, (sent, asked, total)
    assert sent < total / 5


# --- exiting right after a read ------------------------------------------------------------------

# A pyarrow.dataset scan of a lit:// folder beside a thread that holds the GIL whenever it runs (as a
# progress reporter or a prefetching thread may): pyarrow's threads, which let go of the files they
# read just after the scan returns, then wait longest for the GIL, so the script's exit comes first.
SCAN_BESIDE_A_BUSY_THREAD = """
import sys, threading
import fsspec
import pyarrow.dataset as ds

def busy():
    while True:
        pass

threading.Thread(target=busy, daemon=True).start()
dataset = ds.dataset(sys.argv[1], filesystem=fsspec.filesystem("lit"), format="parquet")
print(dataset.to_table(columns=["loss"], filter=ds.field("step") >= 95_000).num_rows)
"""
EXIT_RUNS = 10  # of each script: an abort at exit is a race that a single run seldom loses


def test_scripts_that_read_parquet_from_a_drive_exit_0_every_time(daemon, tmp_path):
    """The README's pandas block and a pyarrow.dataset scan, each run again and again in a fresh process (the
    two side by side), exit 0 every time: no thread of pyarrow drops a lit:// file once Python has begun to
    shut down (that aborts the process: "terminate called without an active exception", exit 134)."""
    import pandas as pd

    steps = pd.DataFrame({"step": range(100_000), "loss": [1 / (1 + s) for s in range(100_000)]})
    steps.to_parquet("lit://exit_1/run_1/part-0.parquet", row_group_size=10_000,
                     storage_options={"endpoint": daemon.endpoint})
    [readme] = readme_blocks("Parquet with pandas and pyarrow")
    env = {**os.environ, "DRIVE_ENDPOINT": daemon.endpoint}

    def runs(args: list[str]) -> list[subprocess.CompletedProcess[str]]:
        return [subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120) for _ in range(EXIT_RUNS)]

    # The README block rewrites its own file, so its runs follow one another; the scans read another drive.
    with ThreadPoolExecutor(2) as pool:
        readme_runs, scan_runs = pool.map(runs, [["-c", readme], ["-c", SCAN_BESIDE_A_BUSY_THREAD, "exit_1/run_1"]])
    failed = [(run.returncode, run.stderr[-1000:]) for run in readme_runs + scan_runs if run.returncode]
    assert not failed, failed
    assert [run.stdout for run in readme_runs] == ["(5000, 1)\n"] * EXIT_RUNS
    assert [run.stdout for run in scan_runs] == ["5000\n"] * EXIT_RUNS


def test_the_exit_wait_finds_pyarrows_thread_pools():
    """The C++ functions the wait at exit calls are in the installed pyarrow (else it would wait for nothing)."""
    import pyarrow.dataset  # noqa: F401  (starts no thread: the pools are idle)

    from drive_client.pyarrow_exit import wait_for_pyarrow_threads

    assert wait_for_pyarrow_threads()


# --- Lightning's loggers ------------------------------------------------------------------------

def test_lightning_csv_logger_on_a_drive_flushes_twice(daemon, tmp_path):
    """CSVLogger writes metrics.csv at its first save and appends to it ("a") from the second on."""
    code = """
import fsspec
from lightning.pytorch.loggers import CSVLogger

logger = CSVLogger("lit://logs_1/", name="run")
for step in range(2):
    logger.log_metrics({"loss": 1 / (1 + step)}, step=step)
    logger.save()
with fsspec.open(f"{logger.log_dir}/metrics.csv", "r") as f:
    print(repr(f.read()))
"""
    run = run_python(["-c", code], tmp_path, daemon.endpoint)
    assert run.stdout.strip() == repr("loss,step\n1.0,0\n0.5,1\n")


def metrics_csv_gets(daemon: DaemonHandle) -> list[dict]:
    return [g for g in get_requests(daemon, "lit://train_logs_1") if g["path"].endswith("/metrics.csv")]


def test_a_trainer_logs_every_step_to_a_drive(daemon, tmp_path):
    """A Trainer on the CPU whose CSVLogger (Lightning's default logger when tensorboard is not installed) writes
    to a drive, flushing after every logged step: metrics.csv is put at the first flush and appended to at each
    of the 23 others, and ends with a row for every step, in order."""
    code = """
import csv, fsspec, json
import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
trainer = L.Trainer(default_root_dir="lit://train_logs_1/", logger=CSVLogger("lit://train_logs_1/"), max_epochs=3,
                    log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(Regression(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))
with fsspec.open(f"{trainer.logger.log_dir}/metrics.csv", "r") as f:
    rows = list(csv.DictReader(f))
print(json.dumps({"log_dir": trainer.logger.log_dir, "rows": rows}))
"""
    report = last_json(run_python(["-W", "ignore::UserWarning", "-c", code], tmp_path, daemon.endpoint))
    assert report["log_dir"] == "lit://train_logs_1/lightning_logs/version_0"
    assert [int(row["step"]) for row in report["rows"]] == list(range(24))  # 3 epochs of 8 batches
    assert [int(row["epoch"]) for row in report["rows"]] == [step // 8 for step in range(24)]
    assert all(float(row["loss"]) >= 0 for row in report["rows"])
    # Each append fetched the file first: one Get of metrics.csv for each of the 23 flushes after the first,
    # and one for reading it back.
    assert wait_until(lambda: len(metrics_csv_gets(daemon)) >= 24), daemon.log()[-2000:]
    assert len(metrics_csv_gets(daemon)) == 24


# --- the DataLoader recipe ---------------------------------------------------------------------

def test_the_dataloader_recipe_reads_every_file_of_a_lit_folder_in_4_workers(daemon, tmp_path):
    """README's DriveFolder over lit://: every sample is its file's bytes, read by several worker processes."""
    files = as_files("A DataLoader over a folder of a drive", tmp_path)
    assert "dataset.py" in files
    samples = tmp_path / "src" / "train"
    samples.mkdir(parents=True)
    digests = []
    for i in range(96):
        data = os.urandom(4096)
        (samples / f"{i:04d}.bin").write_bytes(data)
        digests.append(hashlib.sha256(data).hexdigest())
    Drive("lit://dataset_1", root_folder=tmp_path / "src", endpoint=daemon.endpoint).put("train")
    code = """
import hashlib, json, os
from torch.utils.data import DataLoader
from dataset import DriveFolder
from drive_client import Drive

class Traced(DriveFolder):
    def __getitem__(self, index):
        return super().__getitem__(index), os.getpid()

data = Traced(Drive("lit://dataset_1"), "train")
digests, workers = [], set()
for batch, pids in DataLoader(data, batch_size=8, num_workers=4):
    digests += [hashlib.sha256(sample.numpy()).hexdigest() for sample in batch]
    workers.update(pids.tolist())
print(json.dumps({"paths": data.paths, "digests": digests, "workers": sorted(workers), "main": os.getpid()}))
"""
    report = last_json(run_python(["-W", "ignore::UserWarning", "-c", code], tmp_path, daemon.endpoint))
    assert report["paths"] == [f"train/{i:04d}.bin" for i in range(96)]
    assert report["digests"] == digests
    assert len(report["workers"]) > 1 and report["main"] not in report["workers"], report["workers"]


# --- sharded checkpoints: torch.distributed.checkpoint ------------------------------------------

# Two ranks (gloo) save a tensor sharded by rows into URL with DCP's FsspecWriter, then load it back
# resharded by columns, and each writes whether its shard holds the bytes saved to rank<N>.txt (a file
# each: the two processes' prints to one pipe interleave).
DCP_TWO_RANKS = """
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

def rank(index, url, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=index, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(512 * 384, dtype=torch.float32).reshape(512, 384)
    dcp.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, storage_writer=FsspecWriter(url, thread_count=2))
    state = {"w": distribute_tensor(torch.zeros(512, 384), mesh, [Shard(1)])}
    dcp.load(state, storage_reader=FsspecReader(url))
    with open(f"rank{index}.txt", "w") as out:
        out.write(str(torch.equal(state["w"].to_local(), full.chunk(2, dim=1)[index])))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_a_checkpoint_sharded_over_two_ranks_saves_and_loads_resharded(daemon, tmp_path):
    """DCP's FsspecWriter: both ranks put their shards into one folder at once, rank 0 its `.metadata` (written as
    `.metadata.tmp` and renamed); FsspecReader reads each rank's new shard from ranges of both ranks' files."""
    (tmp_path / "dcp_two_ranks.py").write_text(DCP_TWO_RANKS)
    url = "lit://ckpt_1/step_7"
    run_python(["dcp_two_ranks.py", url, str(free_port())], tmp_path, daemon.endpoint)
    assert [(tmp_path / f"rank{i}.txt").read_text() for i in (0, 1)] == ["True", "True"]
    names = [n.rpartition("/")[2] for n in Drive("lit://ckpt_1", endpoint=daemon.endpoint).list("step_7")]
    assert ".metadata" in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert sum(n.endswith(".distcp") for n in names) >= 2
