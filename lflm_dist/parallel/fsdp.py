"""FSDP2 (`torch.distributed.fsdp.fully_shard`), activation checkpointing and compile,
applied per transformer block from outside the model (torchtitan's order: checkpoint /
compile each block, shard each block, then shard the root)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lflm_dist.models.blocks import Block


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each Block in backward. The forward is replaced on the instance, so module
    names (and hence checkpoints) are unchanged, unlike checkpoint_wrapper."""
    for b in blocks(model):
        orig = b.forward

        @functools.wraps(orig)
        def fwd(*args, _orig=orig, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        b.forward = fwd


def apply_compile(model: nn.Module) -> None:
    for b in blocks(model):
        b.compile()  # nn.Module.compile: in place, names unchanged


def mixed_precision(device: torch.device, precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16:  # bf16 compute/all-gather, fp32 gradient reduction and fp32 sharded master weights
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # CPU fp32: none


def apply_fsdp2(model: nn.Module, mesh, mp_policy) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    for b in blocks(model):
        fully_shard(b, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model
