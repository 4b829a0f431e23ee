"""Tensor parallelism on megatron-core, applied from outside the model.

`apply_tp(model, tp)` swaps, in every transformer `Block`, the attention `wqkv` / `wo` and
the SwiGLU `w12` / `w3` `nn.Linear`s for megatron Column/RowParallelLinear (Megatron-LM's
split: column-parallel in, row-parallel out, one all-reduce per sub-layer in forward and
one in backward). Weights are resharded from the unsharded init that every rank built with
the same seed, so a TP run starts from exactly the 1-process model. Module names are
unchanged (the parallel layers subclass megatron's and keep `.weight`).

Each sharded parameter carries `_lflm_tp = (global_view_shape, shard_dim)`: the full
weight viewed as `global_view_shape` is split into `tp` equal pieces along `shard_dim`, and
rank r holds piece r (reshaped to 2-D). wqkv's rows are (q|k|v, head, head_dim), so its
view is [3, H, hd, D] split on heads; w12's rows are (a|b, hidden), view [2, h, D] split on
hidden; wo / w3 are split on their input dim. Checkpoints store that view as a DTensor
(so DCP can reshard across TP degrees) and export reassembles it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from lflm_dist.parallel import megatron_cpu

_state = {"initialized": False}


def init_tp(tp: int) -> None:
    """Create megatron's TP / DP process groups (TP groups are consecutive ranks)."""
    megatron_cpu.prepare()
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    _state["initialized"] = True


def tp_group():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_group()


def coords() -> tuple[int, int, int, int]:
    """(tp_rank, tp_size, dp_rank, dp_size)."""
    from megatron.core import parallel_state as ps
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def _layers():
    megatron_cpu.prepare()
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        def forward(self, x):  # megatron returns (output, bias)
            return super().forward(x)[0]

    class RowLinear(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return ColumnLinear, RowLinear


def apply_tp(model: nn.Module, tp: int) -> nn.Module:
    """Shard every Block of `model` over the TP group (in place); returns the model."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from lflm_dist.models.blocks import Block
    rank = dist.get_rank(tp_group())
    Column, Row = _layers()
    dtype = next(model.parameters()).dtype
    mcfg = ModelParallelConfig(tensor_model_parallel_size=tp, perform_initialization=False, params_dtype=dtype,
                               gradient_accumulation_fusion=False, **megatron_cpu.layer_kwargs())
    device = next(model.parameters()).device

    def swap(parent: nn.Module, name: str, kind: str, view: tuple, dim: int) -> None:
        old: nn.Linear = getattr(parent, name)
        out_f, in_f = old.weight.shape
        cls = Column if kind == "col" else Row
        extra = {"gather_output": False} if kind == "col" else {"input_is_parallel": True, "skip_bias_add": False}
        new = cls(in_f, out_f, config=mcfg, init_method=lambda w: None, bias=False, **extra).to(device)
        local = old.weight.detach().reshape(view).chunk(tp, dim=dim)[rank]
        with torch.no_grad():
            new.weight.copy_(local.reshape(new.weight.shape))
        new.weight.requires_grad_(old.weight.requires_grad)
        new.weight._lflm_tp = (tuple(view), dim)
        setattr(parent, name, new)

    for block in [m for m in model.modules() if isinstance(m, Block)]:
        attn, ffn = block.attn, block.ffn
        D, H, hd = attn.wo.weight.shape[0], attn.n_heads, attn.head_dim
        h = ffn.w3.weight.shape[1]
        swap(attn, "wqkv", "col", (3, H, hd, D), 1)
        swap(attn, "wo", "row", (D, H * hd), 1)
        swap(ffn, "w12", "col", (2, h, D), 1)
        swap(ffn, "w3", "row", (D, h), 1)
        attn.n_heads = H // tp  # heads computed on this rank
        # QK-norm gains are shared by all heads: each rank sees only its heads, so their grads
        # are partial sums to be all-reduced over the TP group (sync_partial_grads)
        for norm in (attn.q_norm, attn.k_norm):
            for prm in norm.parameters():
                prm._lflm_tp_partial = True
    return model


def is_tp_param(p: torch.Tensor) -> bool:
    return hasattr(p, "_lflm_tp")


def tp_specs(model: nn.Module) -> dict[str, tuple]:
    """name -> (global view shape, shard dim) of the TP-sharded parameters."""
    return {n: p._lflm_tp for n, p in model.named_parameters() if is_tp_param(p)}


def gather_full(local: torch.Tensor, spec: tuple, group=None) -> torch.Tensor:
    """All-gather a TP-sharded weight and reassemble the unsharded 2-D weight."""
    view, dim = spec
    tp = dist.get_world_size(group)
    lview = list(view)
    lview[dim] //= tp
    parts = [torch.empty(lview, dtype=local.dtype, device=local.device) for _ in range(tp)]
    dist.all_gather(parts, local.detach().reshape(lview).contiguous(), group=group)
    return torch.cat(parts, dim=dim).reshape(full_shape(spec))


def full_shape(spec: tuple) -> tuple[int, int]:
    """Shape of the unsharded 2-D weight of a TP spec."""
    view, _ = spec
    n = 1
    for v in view[:-1]:
        n *= v
    return (n, view[-1])


def tp_grad_norm_sq(params: list[torch.Tensor]) -> torch.Tensor:
    """Squared global grad norm: TP-sharded grads summed over the TP group, replicated ones once."""
    dev = params[0].device if params else torch.device("cpu")
    sharded = torch.zeros((), device=dev, dtype=torch.float32)
    repl = torch.zeros((), device=dev, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        s = p.grad.detach().float().pow(2).sum()
        if is_tp_param(p):
            sharded += s
        else:
            repl += s
    dist.all_reduce(sharded, group=tp_group())
    return sharded + repl


def sync_partial_grads(model: nn.Module) -> None:
    """Sum, over the TP group, the grads of replicated parameters each rank only partly
    computes (QK-norm gains). Call after backward, before clipping."""
    grads = [p.grad for p in model.parameters() if getattr(p, "_lflm_tp_partial", False) and p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=tp_group())
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()
