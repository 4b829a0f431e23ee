"""FSDP2 (`torch.distributed.fsdp.fully_shard`), activation checkpointing and compile,
applied from outside the model to each of its `shard_units()` (transformer blocks, LSTM
layers, ...: the family says which; torchtitan's order: checkpoint / compile each unit, shard
each unit, then shard the root)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def units(model: nn.Module) -> list[nn.Module]:
    """The units the model family names (lflm_dist.models.family.ModelFamily.shard_units)."""
    return list(model.shard_units())


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each shard unit in backward. The forward is replaced on the instance, so module
    names (and hence checkpoints) are unchanged, unlike checkpoint_wrapper."""
    for b in units(model):
        orig = b.forward

        @functools.wraps(orig)
        def fwd(*args, _orig=orig, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        b.forward = fwd


def apply_compile(model: nn.Module) -> None:
    """torch.compile each shard unit in place (names unchanged), with static shapes: the shapes
    that vary (the DiT's distinct-t table, padded to powers of two; evaluation's batch) take a
    few distinct values, each compiled once, and a dynamic size made Inductor (torch 2.11, CUDA)
    generate a wrong reduction for Cola's DiT. Units of one class share one code object, hence
    one recompile budget: raised from 8 so that training and evaluation shapes of the VAE, the
    DiT and the reference encoder all stay compiled."""
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    for b in units(model):
        b.compile(dynamic=False)


def mixed_precision(device: torch.device, precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16:  # bf16 compute/all-gather, fp32 gradient reduction and fp32 sharded master weights
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # CPU fp32: none


def apply_fsdp2(model: nn.Module, mesh, mp_policy) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    for b in units(model):
        fully_shard(b, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model
