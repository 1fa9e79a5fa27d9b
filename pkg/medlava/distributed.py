"""torch.distributed from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def ensure_process_group(dist: Dist) -> None:
    """A one-process group when not started by torchrun: DeepSpeed needs one (else it probes for MPI)."""
    if torch_dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", dist.rank), ("WORLD_SIZE", dist.world_size), ("LOCAL_RANK", dist.local_rank)):
        os.environ.setdefault(key, str(value))
    torch_dist.init_process_group(
        "nccl" if dist.device.type == "cuda" else "gloo", rank=dist.rank, world_size=dist.world_size
    )


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when it is true on one (e.g. a stop signal that reached one node first)."""
    if dist.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=dist.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[float], dist: Dist) -> list[float]:
    """Each value's sum over ranks, in one all-reduce."""
    if dist.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: list[float], dist: Dist) -> list[float]:
    """Each value's mean over ranks, in one all-reduce."""
    if dist.world_size == 1:
        return values
    return [v / dist.world_size for v in sum_over_ranks(values, dist)]


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
