"""torch.distributed behind a few small helpers.

The same code runs as one process (``python -m gpt2repro train``) and under
``torchrun``, which sets RANK, LOCAL_RANK and WORLD_SIZE. NCCL on CUDA, gloo on
the CPU; multi-node works through torchrun's rendezvous flags unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, alone: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for one process, unless ``alone``
    asks for a group of one (FSDP runs in one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if alone and not dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else None
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, device_id=device)
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity for one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean across ranks (gloo has no AVG, so sum and divide)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_min(value: int, device) -> int:
    t = torch.tensor([value], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def max_over_ranks(value: int, device) -> int:
    t = torch.tensor([value], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device) -> bool:
    """True if the flag is set on any rank: every rank takes the same branch."""
    return bool(max_over_ranks(int(flag), device))


def rounds_on_every_rank(n_items: int, world_size: int, per_round: int) -> int:
    """How many rounds of ``per_round`` items every rank gets when items r, r + W, ... go to
    rank r: the last rank's count. Collectives inside a loop are safe in those rounds only."""
    return math.ceil(len(range(world_size - 1, n_items, world_size)) / per_round)
