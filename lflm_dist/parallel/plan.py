"""Memory planner: bytes per GPU of parameters, gradients, optimizer state and activations
for each strategy and TP degree, and which plans fit.

    python -m lflm_dist.parallel.plan --config configs/cola_2b.yaml --gpus 64 --gpu-mem 80

Formulas (P = trainable parameters held by one TP rank, N = data-parallel degree):
  ddp        params 4P, grads 4P, Adam m+v 8P (fp32 master weights; bf16 is autocast)
  fsdp2      params 4P/N, grads 4P/N, Adam 8P/N (fp32 sharded; bf16 all-gather buffers under "other")
  zero1      params bP, grads bP, optimizer 12P/N   (b = 2 with bf16, 4 in fp32; 12 = fp32 master + m + v)
  zero2      params bP, grads bP/N, optimizer 12P/N
  zero3      params bP/N, grads bP/N, optimizer 12P/N
Activations per micro-batch: saved tensors of each block, e·T·B·(16·d + 5·f) plus the
attention probabilities e·B·H·T²·2 (math SDPA; flash attention keeps none), T the block's
sequence (the DiT sees 2L), and per logits tensor its fp32 log-probabilities 4·B·L·V plus, for
one at a time, the logits and their gradients (2e + 4)·B·L·V; with activation checkpointing only
each block's input e·T·B·d is kept plus one block's activations. TP divides the per-block
activations and the (vocab-parallel) logits by tp (no sequence parallelism). The factor is an estimate: tests check it
within 2x of the saved-tensor bytes of a tiny model.
"""
from __future__ import annotations

import argparse
import math

import torch

from lflm_dist.config import Config, TransformerConfig, load_config
from lflm_dist.models.blocks import ffn_hidden

STRATEGIES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")


def param_layout(cfg: Config, tp: int = 1) -> dict:
    """Trainable parameters held by one TP rank, and the largest block's size, from the
    model built on the meta device (so exact for any size). What is sharded is read from
    `tp.tp_plan`, the list `apply_tp` swaps."""
    from lflm_dist.models.registry import build_model
    from lflm_dist.parallel import tp as tpmod
    model = build_model(cfg.model, init_pretrained=False, device="meta")
    local = {}  # id(param) -> (rows, numel) held by one TP rank
    if tp > 1:
        for parent, name, kind, _, _ in tpmod.tp_plan(model).layers:
            lin = getattr(parent, name)
            w, b = lin.weight, getattr(lin, "bias", None)
            if kind == tpmod.EMBED:  # padded to a multiple of tp
                rows = -(-w.shape[0] // tp)
                local[id(w)] = (rows, rows * w.shape[1])
            elif kind == tpmod.ROW:  # columns split; the bias (added after the all-reduce) replicated
                local[id(w)] = (w.shape[0], w.numel() // tp)
            else:  # column-parallel: rows and bias split
                local[id(w)] = (w.shape[0] // tp, w.numel() // tp)
                if b is not None:
                    local[id(b)] = (b.shape[0] // tp, b.numel() // tp)
    total = per_rank = frozen = 0
    shapes = []
    for p in model.parameters():
        if not p.requires_grad:
            frozen += p.numel()
            continue
        total += p.numel()
        rows, n = local.get(id(p), (p.shape[0], p.numel()))
        per_rank += n
        shapes.append((rows, n))
    block = max((sum(local.get(id(q), (0, q.numel()))[1] for q in b.parameters()) for b in model.shard_units()),
                default=0)
    return {"total": total, "per_tp_rank": per_rank, "frozen": frozen, "largest_block": block,
            "shapes": shapes, "stacks": model.activation_stacks(), "vocab_logits": model.vocab_logits()}


def _block_acts(net: TransformerConfig, T: int, B: int, e: int, tp: int, adaln: bool) -> float:
    d, f, H = net.dim, ffn_hidden(net), net.n_heads
    per = e * T * B * (16 * d + 5 * f + (8 * d if adaln else 0)) + e * B * H * T * T * 2
    return per / tp


def activation_bytes(cfg: Config, micro_batch: int, tp: int = 1, bf16: bool = True, checkpointing: bool = False,
                     include_recompute: bool = True, stacks: list[tuple] | None = None,
                     vocab_logits: int | None = None) -> float:
    """Activation bytes of one micro-batch. With checkpointing: block inputs kept in forward,
    plus (include_recompute) one block's activations rebuilt during backward. `stacks`: the
    family's transformer stacks (`activation_stacks()`, kept by `param_layout`); built on the
    meta device when not given, with `vocab_logits` (how many [L, V] logits one forward makes)."""
    if stacks is None or vocab_logits is None:
        from lflm_dist.models.registry import build_model
        model = build_model(cfg.model, init_pretrained=False, device="meta")
        stacks, vocab_logits = model.activation_stacks(), model.vocab_logits()
    e = 2 if bf16 else 4
    m, L, B = cfg.model, cfg.model.seq_len, micro_batch
    V = m.vocab_size
    # each logits tensor keeps its fp32 log-probabilities (or softmax) for backward; one at a time
    # also has its e-byte logits and, in backward, their fp32 and e-byte gradients; vocab-parallel under TP
    head = (vocab_logits * 4 + 2 * e + 4) * B * L * V / tp
    if not checkpointing:
        return sum(_block_acts(n, T, B, e, tp, a) * n.n_layers for n, T, a in stacks) + head
    kept = sum(e * T * B * n.dim * n.n_layers for n, T, _ in stacks)
    return kept + head + (max(_block_acts(n, T, B, e, tp, a) for n, T, a in stacks) if include_recompute else 0)


def plan(cfg: Config, strategy: str, gpus: int, tp: int = 1, micro_batch: int = 1, bf16: bool = True,
         checkpointing: bool = False, layout: dict | None = None) -> dict:
    """Bytes per GPU of one plan."""
    lay = layout or param_layout(cfg, tp)
    P, N = lay["per_tp_rank"], gpus // tp
    b = 2 if bf16 else 4
    if strategy == "ddp":
        params, grads, opt, other = 4 * P, 4 * P, 8 * P, 0
    elif strategy == "fsdp2":
        # exact per-rank shard of rank 0: ceil(dim0 / N) rows of each parameter
        shard = sum(math.ceil(r / N) * (n // r) if r else 0 for r, n in lay["shapes"])
        params, grads, opt = 4 * shard, 4 * shard, 8 * shard
        other = 2 * b * lay["largest_block"]  # unsharded current + prefetched block
    else:
        stage = int(strategy[-1])
        params = b * P / (N if stage == 3 else 1)
        grads = b * P / (N if stage >= 2 else 1)
        opt, other = 12 * P / N, (2 * b * lay["largest_block"] if stage == 3 else 0)
    acts = activation_bytes(cfg, micro_batch, tp, bf16, checkpointing, stacks=lay["stacks"],
                            vocab_logits=lay["vocab_logits"])
    return {"strategy": strategy, "tp": tp, "dp": N, "params": params, "grads": grads, "optimizer": opt,
            "other": other, "activations": acts, "total": params + grads + opt + other + acts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per GPU per micro-step (default: "
                    "train.global_batch_size / (dp x grad_accum))")
    ap.add_argument("--tp", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--fp32", action="store_true", help="fp32 training (default bf16)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 100_000
    lay = param_layout(cfg, 1)
    print(f"{a.config}: {lay['total'] / 1e6:.1f}M trainable parameters (+{lay['frozen'] / 1e6:.1f}M frozen), "
          f"seq_len {cfg.model.seq_len}, vocab {cfg.model.vocab_size}, {a.gpus} GPUs x {a.gpu_mem:g} GiB, "
          f"{'fp32' if a.fp32 else 'bf16'}")
    G = 2 ** 30
    print(f"{'strategy':8} {'tp':>3} {'dp':>4} {'mb':>3} {'params':>8} {'grads':>8} {'optim':>8} {'other':>7} "
          f"{'acts':>8} {'acts+ckpt':>9} {'total':>8} {'fits':>5} {'fits+ckpt':>9}   (GiB per GPU)")
    for tp in a.tp:
        if a.gpus % tp:
            continue
        try:
            lay_tp = param_layout(cfg, tp)
        except ValueError as e:  # ConfigError: a family without a tensor-parallel plan
            print(f"tp={tp}: {e}")
            continue
        dp = a.gpus // tp
        mb = a.micro_batch or max(1, cfg.train.global_batch_size // (dp * cfg.train.grad_accum))
        for s in STRATEGIES:
            if tp > 1 and s not in ("ddp", "fsdp2"):
                continue  # TP is supported with DDP and FSDP2 (config.SUPPORTED_PARALLEL)
            r = plan(cfg, s, a.gpus, tp, mb, not a.fp32, False, lay_tp)
            rc = plan(cfg, s, a.gpus, tp, mb, not a.fp32, True, lay_tp)
            print(f"{s:8} {tp:>3} {dp:>4} {mb:>3} {r['params'] / G:8.2f} {r['grads'] / G:8.2f} {r['optimizer'] / G:8.2f} "
                  f"{r['other'] / G:7.2f} {r['activations'] / G:8.2f} {rc['activations'] / G:9.2f} {r['total'] / G:8.2f} "
                  f"{'yes' if r['total'] < a.gpu_mem * G * 0.9 else 'no':>5} "
                  f"{'yes' if rc['total'] < a.gpu_mem * G * 0.9 else 'no':>9}")
    print("fits: total < 90% of GPU memory (10% left for the allocator, NCCL buffers and CUDA context)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
