"""Tensor parallelism on megatron-core, applied from outside the model.

`apply_tp(model, tp)` swaps, in every transformer `Block`, the attention `wqkv` / `wo` and
the SwiGLU `w12` / `w3` `nn.Linear`s for megatron Column/RowParallelLinear (Megatron-LM's
split: column-parallel in, row-parallel out, one all-reduce per sub-layer in forward and
one in backward). Weights are resharded from the unsharded init that every rank built with
the same seed, so a TP run starts from exactly the 1-process model. Module names are
unchanged (the parallel layers subclass megatron's and keep `.weight`).

Token embeddings become megatron `VocabParallelEmbedding`s and the vocabulary heads
column-parallel linears over the vocabulary (`gather_output=False`); the models' token
cross-entropy hook (`token_ce`, and the VAE's `token_argmax` for recon_acc) is swapped for
megatron's `vocab_parallel_cross_entropy` / a cross-shard argmax, so full logits are never
gathered. The VAE encoder's table has one extra row ([MASK]); it is padded with zero rows to
a multiple of tp (the padding is never looked up, gets no gradient and is dropped on export).

Each sharded parameter carries `_lflm_tp = (global_view_shape, shard_dim, real)`: the full
weight (padded to `global_view_shape[shard_dim]` along `shard_dim`) viewed as
`global_view_shape` is split into `tp` equal pieces along `shard_dim`, rank r holds piece r
(reshaped to 2-D), and `real` is the unpadded size along `shard_dim`. wqkv's rows are
(q|k|v, head, head_dim), so its view is [3, H, hd, D] split on heads; w12's rows are
(a|b, hidden), view [2, h, D] split on hidden; wo / w3 are split on their input dim;
embeddings and heads on the vocabulary. Checkpoints store the unpadded view as a DTensor
(so DCP can reshard across TP degrees) and export reassembles it. The specs are read once,
before FSDP2 replaces the parameters (`tp_specs`), and kept by the engine by name.
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
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class ColumnLinear(ColumnParallelLinear):
        def forward(self, x):  # megatron returns (output, bias)
            return super().forward(x)[0]

    class RowLinear(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return ColumnLinear, RowLinear, VocabParallelEmbedding


def vocab_parallel_ce(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy over vocab-sharded logits [N, V/tp] (megatron's vocab_parallel_cross_entropy;
    it shifts its input in place, hence the clone)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    ce = vocab_parallel_cross_entropy(logits.clone(), target)
    return ce.mean() if reduction == "mean" else ce.sum() if reduction == "sum" else ce


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """argmax(-1) over vocab-sharded logits [..., V/tp] (first maximum, as torch.argmax)."""
    assert dim in (-1, logits.dim() - 1), "the vocabulary is the last dim"
    group = tp_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    val, idx = logits.float().max(-1)
    both = torch.stack([val, (idx + rank * logits.shape[-1]).float()])
    parts = [torch.empty_like(both) for _ in range(tp)]
    dist.all_gather(parts, both.contiguous(), group=group)
    vals, idxs = torch.stack([q[0] for q in parts]), torch.stack([q[1] for q in parts])
    best = vals.argmax(0, keepdim=True)  # first shard holding the maximum
    return idxs.gather(0, best)[0].long()


def apply_tp(model: nn.Module, tp: int) -> nn.Module:
    """Shard every Block, token embedding and vocabulary head of `model` over the TP group
    (in place); returns the model."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from lflm_dist.models.ar import ARTransformer
    from lflm_dist.models.blocks import Block
    from lflm_dist.models.text_vae import TextDecoder, TextEncoder, TextVAE
    rank = dist.get_rank(tp_group())
    Column, Row, VocabEmbedding = _layers()
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
        new.weight._lflm_tp = (tuple(view), dim, view[dim])
        setattr(parent, name, new)

    def swap_embedding(parent: nn.Module, name: str) -> None:
        old: nn.Embedding = getattr(parent, name)
        rows, D = old.weight.shape
        padded = -(-rows // tp) * tp  # the VAE encoder's [MASK] row makes its table vocab + 1
        new = VocabEmbedding(padded, D, init_method=lambda w: None, config=mcfg).to(device)
        full = torch.cat([old.weight.detach(), old.weight.new_zeros(padded - rows, D)])
        with torch.no_grad():
            new.weight.copy_(full.chunk(tp, dim=0)[rank])
        new.weight.requires_grad_(old.weight.requires_grad)
        new.weight._lflm_tp = ((padded, D), 0, rows)
        setattr(parent, name, new)

    def swap_head(parent: nn.Module, name: str) -> None:
        old: nn.Linear = getattr(parent, name)
        V, D = old.weight.shape
        if V % tp:
            from lflm_dist.config import ConfigError
            raise ConfigError(f"parallel.tp={tp} must divide the vocabulary size ({V}) for the vocab-parallel "
                              "head and cross-entropy")
        swap(parent, name, "col", (V, D), 0)

    for m in list(model.modules()):
        if isinstance(m, TextEncoder):
            swap_embedding(m, "embed")
        elif isinstance(m, TextDecoder):
            swap_head(m, "head")
        elif isinstance(m, ARTransformer):
            swap_embedding(m, "embed")
            swap_head(m, "head")
        if isinstance(m, (TextVAE, ARTransformer)):  # the models' token-CE hooks
            if not hasattr(m, "token_ce"):
                raise RuntimeError(f"{type(m).__name__} has no token_ce hook: vocab-parallel TP cannot apply")
            m.token_ce = vocab_parallel_ce
            if hasattr(m, "token_argmax"):
                m.token_argmax = vocab_parallel_argmax

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
    """name -> (global view shape, shard dim, unpadded size) of the TP-sharded parameters."""
    return {n: p._lflm_tp for n, p in model.named_parameters() if is_tp_param(p)}


def tp_info(model: nn.Module) -> dict:
    """What the engine keeps of the TP layout: specs, TP-local shapes, partial-grad names."""
    specs = tp_specs(model)
    return {"specs": specs, "shapes": {n: p.shape for n, p in model.named_parameters() if n in specs},
            "partial": tp_partial(model)}


def tp_partial(model: nn.Module) -> set[str]:
    """Names of replicated parameters whose grads are partial sums over the TP group."""
    return {n for n, p in model.named_parameters() if getattr(p, "_lflm_tp_partial", False)}


def local_view(spec: tuple, tp: int) -> list[int]:
    view, dim, _ = spec
    lview = list(view)
    lview[dim] //= tp
    return lview


def real_range(spec: tuple, tp: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank's unpadded rows along the shard dim, within its local piece."""
    view, dim, real = spec
    per = view[dim] // tp
    return 0, max(0, min(per, real - rank * per))


def gather_full(local: torch.Tensor, spec: tuple, group=None) -> torch.Tensor:
    """All-gather a TP-sharded weight and reassemble the unsharded (unpadded) 2-D weight."""
    view, dim, real = spec
    lview = local_view(spec, dist.get_world_size(group))
    parts = [torch.empty(lview, dtype=local.dtype, device=local.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().reshape(lview).contiguous(), group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, real).reshape(full_shape(spec))


def full_shape(spec: tuple) -> tuple[int, int]:
    """Shape of the unsharded (unpadded) 2-D weight of a TP spec."""
    view, dim, real = spec
    view = list(view)
    view[dim] = real
    n = 1
    for v in view[:-1]:
        n *= v
    return (n, view[-1])


def _loc(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tp_grad_norm_sq(named: list[tuple[str, torch.Tensor]], specs: dict, fsdp: bool = False) -> torch.Tensor:
    """Squared global grad norm. Without FSDP (DDP: grads replicated over DP): TP-sharded
    grads summed over the TP group, replicated ones counted once. With FSDP2 over the DP
    group each rank holds a DP shard of its TP shard: TP-sharded grads are summed over all
    ranks (TP x DP), replicated ones over the DP group only."""
    dev = named[0][1].device if named else torch.device("cpu")
    sharded = torch.zeros((), device=dev, dtype=torch.float32)
    repl = torch.zeros((), device=dev, dtype=torch.float32)
    for n, p in named:
        if p.grad is None:
            continue
        s = _loc(p.grad).detach().float().pow(2).sum()
        if n in specs:
            sharded += s
        else:
            repl += s
    if fsdp:
        dist.all_reduce(sharded)
        dist.all_reduce(repl, group=dp_group())
    else:
        dist.all_reduce(sharded, group=tp_group())
    return sharded + repl


def sync_partial_grads(named: list[tuple[str, torch.Tensor]], partial: set[str]) -> None:
    """Sum, over the TP group, the grads of replicated parameters each rank only partly
    computes (QK-norm gains). Call after backward, before clipping. Under FSDP2 the TP peers
    hold the same DP shard of these parameters, so their local shards are summed."""
    grads = [_loc(p.grad) for n, p in named if n in partial and p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=tp_group())
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()
