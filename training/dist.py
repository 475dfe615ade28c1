"""DDP helpers for `torchrun`: process-group setup and a gradient-keeping all-gather for contrastive losses.

Every rank gathers the whole global batch of embeddings and computes the same loss on it (OpenCLIP's
`gather_with_grad=True, local_loss=False`). `torch.distributed.nn.functional.all_gather` sums the gradients of all
ranks back onto the local slice in backward, and DDP then averages parameter gradients over ranks: the result equals
one process on the joined batch (tested with gloo on CPU).
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

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise from the `torchrun` environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(local)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order along dim 0, keeping the autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (labels, masks) from all ranks in rank order; no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
