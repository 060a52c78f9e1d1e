"""The DataLoader benchmark: one folder of samples, read by a torch DataLoader from each system.

Every system gets the same `Dataset`, the shape of the README's `DriveFolder` recipe; only the
call that reads one sample differs: `Drive.read_range` (lit:// and s3:// drives), boto3
`get_object` and s3fs `cat_file` (the objects in moto_server that the s3:// drive serves), and a
local file read. Readers that hold a connection make it in the process that reads (DataLoader
workers are forked), as the recipe's Drive does.

`samples_per_second(...)` runs one warm-up epoch (workers start, connect, an s3:// drive mounts),
then times the second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class Samples(Dataset):
    """The files `names`, each read whole by `read` and returned as a uint8 tensor."""

    def __init__(self, names: list[str], read: Callable[[str], bytes]) -> None:
        self.names = names
        self.read = read

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.read(self.names[index])), dtype=torch.uint8)


class PerProcess:
    """A client made by `make` on first use in each process: boto3 and s3fs clients do not survive a fork."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.made: tuple[int, Any] | None = None

    def get(self) -> Any:
        if self.made is None or self.made[0] != os.getpid():
            self.made = (os.getpid(), self.make())
        return self.made[1]


def reader(system: str, endpoint: str, url: str, bucket: str, root: str) -> tuple[list[str], Callable[[str], bytes]]:
    """The sample names of folder `train` and the function that reads one, for `system`."""
    if system in ("drive_lit", "drive_s3"):
        from drive_client import Drive

        uri = "lit://loader" if system == "drive_lit" else f"s3://{bucket}/loader/"
        drive = Drive(uri, endpoint=endpoint)
        return drive.list("train"), lambda name: b"".join(drive.read_range(name))
    names = sorted(f"train/{p.name}" for p in (Path(root) / "train").iterdir())
    if system == "local":
        return names, lambda name: Path(root, name).read_bytes()
    if system == "boto3_moto":
        from bench.worker import _boto3_client

        client = PerProcess(lambda: _boto3_client(url))
        return names, lambda name: client.get().get_object(Bucket=bucket, Key=f"loader/{name}")["Body"].read()
    if system == "s3fs_moto":
        import s3fs

        fs = PerProcess(lambda: s3fs.S3FileSystem(
            key="bench", secret="bench", client_kwargs={"endpoint_url": url, "region_name": "us-east-1"},
            skip_instance_cache=True,
        ))
        return names, lambda name: fs.get().cat_file(f"{bucket}/loader/{name}")
    raise ValueError(system)


def samples_per_second(system: str, workers: int, batch: int, endpoint: str = "", url: str = "", bucket: str = "",
                       root: str = "") -> dict[str, float]:
    names, read = reader(system, endpoint, url, bucket, root)
    loader = DataLoader(Samples(names, read), batch_size=batch, num_workers=workers, persistent_workers=True)
    for _ in loader:
        pass
    count = 0
    start = time.perf_counter()
    for samples in loader:
        count += len(samples)
    seconds = time.perf_counter() - start
    if not names or count != len(names):
        raise RuntimeError(f"{system}: the DataLoader gave {count} samples of {len(names)}")
    return {"samples": count, "seconds": seconds, "samples_s": count / seconds}
