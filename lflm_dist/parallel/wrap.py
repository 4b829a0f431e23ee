"""Apply the configured data-parallel strategy to a built model."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lflm_dist.config import ParallelConfig


def parallelize(model: torch.nn.Module, cfg: ParallelConfig, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if cfg.strategy == "ddp":
        if dist.is_initialized() and dist.get_world_size() > 1:
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model
    raise ValueError(f"parallel.strategy={cfg.strategy!r} is not supported; supported: ddp")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
