"""Data-parallel training under `torchrun`: one process per GPU (or CPU process, with gloo).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with WORLD_SIZE=1) the
trainer runs as one ordinary process and nothing here is used. Each rank takes an equal
slice of every global batch, so the recipe's batch size and learning rate mean the same
thing at any world size; DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, saves checkpoints and writes metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of indices."""
        return global_batch[self.rank::self.size]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity in one process)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


SINGLE_PROCESS = World()
"""The world of an ordinary run (immutable)."""


def init_world(device: str) -> World:
    """Join the process group torchrun describes in the environment, if any.

    Backend: NCCL when training on CUDA (one GPU per local rank), gloo on CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE_PROCESS
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
