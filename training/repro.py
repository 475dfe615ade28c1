"""Repeatable training: the same seed gives the same model on the same machine.

`seed_everything` seeds Python, NumPy and torch (every device) and asks torch for deterministic kernels
(`use_deterministic_algorithms`, cuDNN without autotuning, the cuBLAS workspace setting it needs): a kernel with no
deterministic version warns instead of failing, so a run never stops over it. Samplers and patch subsamples take
their own generators seeded from the run's seed; `seed_worker` gives each DataLoader worker a seed derived from
the loader's generator, so worker-side randomness does not depend on the process layout.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every global RNG and (by default) select deterministic torch algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: NumPy and `random` seeded from the worker's torch seed (set by the loader's
    generator), which plain forking would otherwise copy into every worker alike."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """A DataLoader's own generator: creating a loader then draws nothing from the global RNG (dropout)."""
    return torch.Generator().manual_seed(int(seed) + int(epoch))
