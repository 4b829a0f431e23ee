"""Tensor parallelism on megatron-core, applied from outside the model.

`apply_tp(model, tp)` replaces the layers listed by `tp_plan(model)` with megatron-core
parallel layers (module names unchanged: the parallel layers subclass megatron's and keep
`.weight` / `.bias`). Weights are resharded from the unsharded init that every rank built
with the same seed, so a TP run starts from exactly the 1-process model.

  every transformer Block   attention wqkv / SwiGLU w12 column-parallel, wo / w3 row-parallel
                            (Megatron-LM's split: one all-reduce per sub-layer in forward and
                            one in backward)
  DiT Block.adaln           column-parallel, output all-gathered (below)
  DiT t_embed.mlp           column-parallel (hidden sharded) -> SiLU -> row-parallel
  DiT final_mod             column-parallel, output all-gathered
  token embeddings          megatron VocabParallelEmbedding
  vocabulary heads          column-parallel over the vocabulary, output not gathered

Why the adaLN projections gather their output: the shift / scale they produce multiply the
whole (replicated) hidden state before the column-parallel wqkv / w12, which need the full
vector, and the gates multiply the (all-reduced, replicated) sub-layer outputs; so every rank
needs all 6·D values. Gathering the [B, G, 6D] output (G = DiT blocks, not tokens) costs
little and the 6·D² weights, a third of the DiT at cola_2b size, are held 1/tp per rank.
The DiT's `inp` (latent_dim -> D) and `out` (D -> latent_dim) stay replicated, like the VAE's
to_latent / from_latent: with latent_dim = 16 they are ~17·D parameters each (35k at D = 2048),
and sharding them would add a collective to every forward for nothing measurable.

The models' token cross-entropy hook (`token_ce`, and the VAE's `token_argmax` for
recon_acc) is swapped for megatron's `vocab_parallel_cross_entropy` / a cross-shard argmax, so
full logits are never gathered. The VAE encoder's table has one extra row ([MASK]); it is
padded with zero rows to a multiple of tp (the padding is never looked up, gets no gradient
and is dropped on export).

Each sharded parameter (weights, and the column-parallel layers' biases) carries
`_lflm_tp = (global_view_shape, shard_dim, real)`: the full tensor (padded to
`global_view_shape[shard_dim]` along `shard_dim`) viewed as `global_view_shape` is split into
`tp` equal pieces along `shard_dim`, rank r holds piece r (reshaped to the local shape), and
`real` is the unpadded size along `shard_dim`. wqkv's rows are (q|k|v, head, head_dim), so
its view is [3, H, hd, D] split on heads; w12's rows are (a|b, hidden), view [2, h, D] split
on hidden; row-parallel weights are split on their input dim; the rest on their rows.
Checkpoints store the unpadded view as a DTensor (so DCP can reshard across TP degrees) and
export reassembles it. The specs are read once, before FSDP2 replaces the parameters
(`tp_specs`), and kept by the engine by name.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from lflm_dist.models.family import COL_GATHER, EMBED, HEAD, ROW, TPPlan
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
        gather = False  # per layer: all-gather the output over TP (gather_last_dim)

        def forward(self, x):  # megatron returns (output, bias)
            y = super().forward(x)[0]
            return gather_last_dim(y) if self.gather else y

    class RowLinear(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return ColumnLinear, RowLinear, VocabParallelEmbedding


class _GatherLastDim(torch.autograd.Function):
    """Concatenate the TP ranks' pieces along the last dim; backward keeps this rank's slice of
    the gradient (identical on every TP rank, as the consumers are replicated). This is
    megatron's gather_from_tensor_model_parallel_region, i.e. what gather_output=True does;
    megatron-core 0.16.1's allocates its output on torch.cuda.current_device() even for CPU
    tensors, so the same two lines are written here and used on CPU and CUDA alike."""

    @staticmethod
    def forward(ctx, x):
        group = tp_group()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        group = tp_group()
        return grad.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)].contiguous()


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    return _GatherLastDim.apply(x)


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


def tp_plan(model: nn.Module) -> TPPlan:
    """The model's `tp_plan()` (lflm_dist.models.family.TPPlan): every layer `apply_tp`
    replaces, as (parent module, attribute, kind, weight view, shard dim), and the attention
    modules, partial-grad parameters and vocab-CE hooks it adjusts. The memory planner
    (`plan.param_layout`) reads the same plan, so its per-rank parameter counts follow what is
    actually sharded. A family without a plan cannot run with parallel.tp > 1."""
    plan = model.tp_plan()
    if plan is None:
        from lflm_dist.config import ConfigError
        raise ConfigError(f"parallel.tp > 1: the {model.family!r} model family has no tensor-parallel plan "
                          "(its tp_plan() is None); use parallel.tp=1 with ddp, fsdp2 or deepspeed")
    return plan


def apply_tp(model: nn.Module, tp: int) -> nn.Module:
    """Shard the layers of `tp_plan(model)` over the TP group (in place); returns the model."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    plan = tp_plan(model)
    rank = dist.get_rank(tp_group())
    Column, Row, VocabEmbedding = _layers()
    dtype = next(model.parameters()).dtype
    mcfg = ModelParallelConfig(tensor_model_parallel_size=tp, perform_initialization=False, params_dtype=dtype,
                               gradient_accumulation_fusion=False, **megatron_cpu.layer_kwargs())
    device = next(model.parameters()).device

    def load_shard(new: nn.Parameter, old: torch.Tensor, view: tuple, dim: int, padded: int | None = None) -> None:
        """new <- rank's piece of `old` viewed as `view` (zero-padded to `padded` along dim)."""
        full = old.detach().reshape(view)
        real = view[dim]
        if padded is not None and padded > real:
            pad = list(view)
            pad[dim] = padded - real
            full = torch.cat([full, full.new_zeros(pad)], dim=dim)
        with torch.no_grad():
            new.copy_(full.chunk(tp, dim=dim)[rank].reshape(new.shape))
        new.requires_grad_(old.requires_grad)
        view = list(view)
        view[dim] = full.shape[dim]
        new._lflm_tp = (tuple(view), dim, real)

    def swap(parent: nn.Module, name: str, kind: str, view: tuple, dim: int) -> None:
        old = getattr(parent, name)
        if kind == EMBED:
            rows, D = old.weight.shape
            padded = -(-rows // tp) * tp  # the VAE encoder's [MASK] row makes its table vocab + 1
            new = VocabEmbedding(padded, D, init_method=lambda w: None, config=mcfg).to(device)
            load_shard(new.weight, old.weight, view, 0, padded)
            setattr(parent, name, new)
            return
        if kind == HEAD and old.weight.shape[0] % tp:
            from lflm_dist.config import ConfigError
            raise ConfigError(f"parallel.tp={tp} must divide the vocabulary size ({old.weight.shape[0]}) for the "
                              "vocab-parallel head and cross-entropy")
        out_f, in_f = old.weight.shape
        bias = old.bias is not None
        if kind == ROW:
            new = Row(in_f, out_f, config=mcfg, init_method=lambda w: None, bias=bias, input_is_parallel=True,
                      skip_bias_add=False)
        else:
            new = Column(in_f, out_f, config=mcfg, init_method=lambda w: None, bias=bias, gather_output=False)
            new.gather = kind == COL_GATHER
        new = new.to(device)
        load_shard(new.weight, old.weight, view, dim)
        if bias and kind == ROW:  # added after the all-reduce: replicated, its grad the same on every rank
            with torch.no_grad():
                new.bias.copy_(old.bias)
            new.bias.requires_grad_(old.bias.requires_grad)
        elif bias:  # column-parallel: sharded with the output rows (the view's leading dims)
            load_shard(new.bias, old.bias, view[:-1], dim)
        setattr(parent, name, new)

    for parent, name, kind, view, dim in plan.layers:
        swap(parent, name, kind, view, dim)
    for m in plan.vocab_ce:  # the models' token-CE (and argmax) hooks
        if not hasattr(m, "token_ce"):
            raise RuntimeError(f"{type(m).__name__} has no token_ce hook: vocab-parallel TP cannot apply")
        m.token_ce = vocab_parallel_ce
        if hasattr(m, "token_argmax"):
            m.token_argmax = vocab_parallel_argmax
    for attn in plan.attention:
        attn.n_heads //= tp  # heads computed on this rank
    # QK-norm gains are shared by all heads: each rank sees only its heads, so their grads are
    # partial sums to be all-reduced over the TP group (sync_partial_grads)
    for prm in plan.partial:
        prm._lflm_tp_partial = True
    # megatron marks what it shards (tensor_model_parallel); each such parameter needs our spec,
    # or checkpoints would store one rank's piece as the whole tensor and the clip norm miscount it
    unspecified = [n for n, p in model.named_parameters()
                   if getattr(p, "tensor_model_parallel", False) and not is_tp_param(p)]
    if unspecified:
        raise RuntimeError(f"TP-sharded parameters without a layout spec: {unspecified[:5]}")
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


def full_shape(spec: tuple) -> tuple[int, ...]:
    """Shape of the unsharded (unpadded) parameter of a TP spec: 2-D for weights (the view's
    leading dims flattened into rows), 1-D for biases."""
    view, dim, real = spec
    view = list(view)
    view[dim] = real
    if len(view) == 1:
        return (real,)
    n = 1
    for v in view[:-1]:
        n *= v
    return (n, view[-1])


def _loc(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tp_grad_norm_sq(named: list[tuple[str, torch.Tensor]], specs: dict, fsdp: bool = False) -> torch.Tensor:
    """Squared global grad norm, each element counted once, by megatron's rule
    (`param_is_not_tensor_parallel_duplicate`): TP-sharded grads on every rank, replicated ones
    on TP rank 0 only, then one all-reduce: over the TP group under DDP (grads already equal over
    DP), over all ranks (TP x DP) under FSDP2 (each rank holds a DP shard of its TP shard).

    Not megatron's own get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 (megatron-core
    0.16.1): they allocate on 'cuda' unconditionally and assert torch.cuda.FloatTensor grads (no
    CPU / gloo), return the norm as a host float (a device sync each step), and the attribute
    they select with (`tensor_model_parallel`) is gone once FSDP2 replaces the parameters with
    DTensors; hence names (`specs`, read before FSDP2) and local shards here."""
    dev = named[0][1].device if named else torch.device("cpu")
    tp_rank = dist.get_rank(tp_group())
    grads = [_loc(p.grad).detach() for n, p in named if p.grad is not None and (n in specs or tp_rank == 0)]
    sq = (torch.nn.utils.get_total_norm(grads).to(device=dev, dtype=torch.float32) ** 2 if grads
          else torch.zeros((), device=dev, dtype=torch.float32))
    dist.all_reduce(sq, group=None if fsdp else tp_group())
    return sq


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
