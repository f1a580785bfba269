"""The process group of a `torchrun --nproc_per_node=N` training run (WORLD_SIZE > 1); one process needs none.

NCCL on CUDA, gloo on the CPU. Rank 0 is the main process: it alone writes the run's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (a collective: every rank must call it)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_states(state: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's `state` (e.g. an RNG state), in rank order (a collective when world_size > 1)."""
    if world_size == 1:
        return [state]
    out = [None] * world_size
    dist.all_gather_object(out, state)
    return out
