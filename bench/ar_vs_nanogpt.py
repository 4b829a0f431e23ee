#!/usr/bin/env python
"""Our AR baseline beside nanoGPT on nanoGPT's CPU recipe, timed in one run.

nanoGPT's CPU recipe (README, "I only have a macbook"): shakespeare_char (character level,
vocab 65, 90/10 train/val split of tinyshakespeare), 4 layers, 4 heads, 128 dims, context 64,
batch 12, 2000 iters, lr 1e-3 (warmup 100, cosine to 1e-4 at 2000), AdamW betas (0.9, 0.99),
weight decay 0.1, grad clip 1.0, dropout 0, fp32, no compile.

Two models of that shape train on the same batches, in one process, interleaved in chunks of
`--chunk` steps so that machine noise hits both alike:

  ours     lflm_dist.models.ar.ARTransformer (RMSNorm, SwiGLU, RoPE, QK-norm, untied head; on CPU
           its norms and QK-norm + RoPE run as fused C++ kernels, lflm_dist/models/cpu_kernels.cpp), built
           by the registry and trained by the trainer's own step: the parallel engine
           (lflm_dist.parallel.build_parallel, with lflm_dist.train.optim's AdamW), the trainer's
           learning-rate schedule, lflm_dist.train.trainer.forward_backward, the engine's grad
           clipping, the loss read-back and the engine's optimizer step. SwiGLU hidden size is
           ffn_mult = 8/3 of dim (rounded up to a multiple of 8: 344), so its MLP has 3*128*344 =
           132k weights per layer, about nanoGPT's 2*128*512 = 131k.
  nanogpt  a minimal GPT written the nanoGPT way (model.py / train.py): learned positions,
           LayerNorm without bias, GELU MLP 4x, SDPA is_causal=True, tied embedding / head, normal
           0.02 init (residual projections 0.02/sqrt(2 n_layer)), torch AdamW with nanoGPT's
           defaults (fused only on CUDA), nanoGPT's get_lr, clip_grad_norm_, loss.item() every step.

Each step is timed on its own (batch sampling excluded for both); the table reports the median
ms/step, the ratio ours / nanoGPT, and the validation loss (nats/char) of both after the run on
the same `--eval-batches` random validation batches. Writes bench/results/ar_vs_nanogpt.json.
The process first applies lflm_dist.train.host_memory.retain_freed_memory(), as our trainer does
on CPU; it is process-wide, so nanoGPT's steps run under it too. Compare ratios from an idle
machine: under CPU contention every multithreaded kernel can wait a scheduler slice for its
second thread, and ours launches more elementwise kernels (RMSNorm, QK-norm, RoPE), so its
ratio rises with the load.

    python bench/ar_vs_nanogpt.py                 # the recipe: 2000 steps each (~4 min on 2 idle cores)
    python bench/ar_vs_nanogpt.py --steps 300     # quicker timing-only check
    python bench/ar_vs_nanogpt.py --attribution   # + ours on PyTorch ops (no fused kernels), without QK-norm,
                                                  #   and (PyTorch ops) with LayerNorm, without RoPE

The text is read from ../shared/data/tinyshakespeare/input.txt relative to the repository root
(or --data); without it the script exits with a message and status 0.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# nanoGPT config/train_shakespeare_char.py with the README's CPU overrides
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr=1e-3,
              min_lr=1e-4, warmup_iters=100, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0)


# ----------------------------------------------------------------------------- data (nanoGPT's prepare.py)
def load_chars(path: Path):
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.int64)
    n = int(0.9 * len(data))
    return data[:n], data[n:], len(chars)


def get_batch(data: torch.Tensor, block: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """[batch, block + 1] windows at random offsets (x = [:, :-1], y = [:, 1:], as nanoGPT)."""
    ix = torch.randint(len(data) - block, (batch,), generator=g)
    return torch.stack([data[i:i + block + 1] for i in ix.tolist()])


# ----------------------------------------------------------------------------- nanoGPT (model.py, minimal)
class LayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.n_head = h
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = LayerNorm(d), CausalSelfAttention(d, h), LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, d):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d),
            h=nn.ModuleList([NanoBlock(d, n_head) for _ in range(n_layer)]), ln_f=LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, lr, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def nano_lr(it: int, r=RECIPE, decay_iters: int = RECIPE["max_iters"]) -> float:
    if it < r["warmup_iters"]:
        return r["lr"] * (it + 1) / (r["warmup_iters"] + 1)
    if it > decay_iters:
        return r["min_lr"]
    ratio = (it - r["warmup_iters"]) / (decay_iters - r["warmup_iters"])
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["lr"] - r["min_lr"])


# ----------------------------------------------------------------------------- the two trainers
class PhaseTimes:
    """Seconds per phase of each step (forward + backward, clipping, optimizer), so the table
    says where a difference in ms/step comes from."""

    def _phase(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.phases.setdefault(name, []).append(t1 - t0)
        return t1


class Ours(PhaseTimes):
    name = "ours"

    def __init__(self, vocab: int, steps: int, attention: str, ffn_mult: float, qk_norm: bool = True):
        from lflm_dist.config import load_config
        from lflm_dist.models.registry import build_model, count_params
        from lflm_dist.parallel import build_parallel
        r = RECIPE
        net = f"{{dim: {r['n_embd']}, n_layers: {r['n_layer']}, n_heads: {r['n_head']}, ffn_mult: {ffn_mult}, qk_norm: {str(qk_norm).lower()}}}"
        self.cfg = load_config(None, [
            "model.family=ar", f"model.vocab_size={vocab}", f"model.seq_len={r['block_size']}",
            f"model.attention={attention}", f"model.ar.net={net}",
            f"train.max_steps={steps}", f"train.global_batch_size={r['batch_size']}", f"train.lr={r['lr']}",
            f"train.min_lr={r['min_lr']}", f"train.warmup_steps={r['warmup_iters']}",
            f"train.weight_decay={r['weight_decay']}", f"train.betas=[{r['beta1']}, {r['beta2']}]",
            f"train.grad_clip={r['grad_clip']}", "train.precision=fp32", "run.wandb_mode=disabled"])
        model = build_model(self.cfg.model, init_pretrained=False)
        self.params = count_params(model)
        self.device = torch.device("cpu")
        self.engine = build_parallel(model, self.cfg, self.device)
        self.step = 0
        self.phases: dict[str, list[float]] = {}

    def train_step(self, x: torch.Tensor) -> float:
        """Trainer.train_step without the data loader / logging (see lflm_dist.train.trainer)."""
        from lflm_dist.models.noise import sample_keys
        from lflm_dist.train.dist import all_reduce_mean
        from lflm_dist.train.optim import lr_at
        from lflm_dist.train.trainer import forward_backward
        t, eng = self.cfg.train, self.engine
        eng.set_lr(lr_at(self.step, t))
        mb = {"input_ids": x, "noise_key": sample_keys(t.seed, self.step, 0, x.shape[0])}
        tick = time.perf_counter()
        sums = forward_backward(eng, [mb], self.cfg, self.device)
        tick = self._phase("fwd+bwd", tick)
        eng.clip_grad_norm(t.grad_clip)
        names = sorted(sums)
        out = dict(zip(names, all_reduce_mean(torch.stack([sums[k] for k in names])).tolist()))
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"ours: non-finite loss at step {self.step}")
        tick = self._phase("clip", tick)
        eng.step()
        self._phase("optimizer", tick)
        self.step += 1
        return out["loss"]

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor) -> float:
        m = self.engine.module
        m.eval()
        loss = float(m.loss({"input_ids": x})["loss"])
        m.train()
        return loss


class _LayerNormNoBias(nn.Module):
    """Diagnostic stand-in for RMSNorm: PyTorch's fused LayerNorm kernel (not our model)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, self.eps)


class OursAttribution(Ours):
    """Where ours' time per step goes (--attribution): ours on PyTorch ops instead of the fused
    CPU kernels (lflm_dist/models/cpu_kernels.cpp; what LFLM_CPU_KERNELS=0 or a machine without a
    C++ compiler runs), ours with QK-norm off (a config: model.ar.net.qk_norm=false), and two
    diagnostic models of the PyTorch-ops path that are not ours: every RMSNorm replaced by the
    fused LayerNorm kernel, or RoPE skipped."""

    def __init__(self, variant: str, vocab: int, steps: int, attention: str, ffn_mult: float):
        super().__init__(vocab, steps, attention, ffn_mult, qk_norm=variant != "noqk")
        self.name, self.variant = f"ours-{variant}", variant
        if variant == "layernorm":
            from lflm_dist.models.blocks import RMSNorm
            for mod in list(self.engine.module.modules()):
                for child_name, child in list(mod.named_children()):
                    if isinstance(child, RMSNorm):
                        setattr(mod, child_name, _LayerNormNoBias(child.weight, child.eps))

    def _run(self, fn, x: torch.Tensor) -> float:
        from lflm_dist.models import blocks, cpu_kernels
        if self.variant == "noqk":
            return fn(x)
        rope = blocks.apply_rope
        if self.variant == "norope":
            blocks.apply_rope = lambda t, freqs: t.float()
        try:
            with cpu_kernels.disabled():
                return fn(x)
        finally:
            blocks.apply_rope = rope

    def train_step(self, x: torch.Tensor) -> float:
        return self._run(super().train_step, x)

    def eval_loss(self, x: torch.Tensor) -> float:
        return self._run(super().eval_loss, x)


ATTRIBUTION = ("nokernels", "noqk", "layernorm", "norope")


class Nano(PhaseTimes):
    name = "nanogpt"

    def __init__(self, vocab: int, steps: int):
        r = RECIPE
        self.model = NanoGPT(vocab, r["block_size"], r["n_layer"], r["n_head"], r["n_embd"])
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = self.model.configure_optimizers(r["weight_decay"], r["lr"], (r["beta1"], r["beta2"]), "cpu")
        self.decay_iters = max(steps, r["warmup_iters"] + 1)
        self.step = 0
        self.phases: dict[str, list[float]] = {}

    def train_step(self, x: torch.Tensor) -> float:
        """nanoGPT train.py's loop body (grad accumulation 1; its GradScaler is disabled in fp32)."""
        lr = nano_lr(self.step, decay_iters=self.decay_iters)
        for g in self.opt.param_groups:
            g["lr"] = lr
        tick = time.perf_counter()
        loss = self.model(x[:, :-1], x[:, 1:])
        loss.backward()
        tick = self._phase("fwd+bwd", tick)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), RECIPE["grad_clip"])
        value = loss.item()
        tick = self._phase("clip", tick)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._phase("optimizer", tick)
        self.step += 1
        return value

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor) -> float:
        self.model.eval()
        loss = float(self.model(x[:, :-1], x[:, 1:]))
        self.model.train()
        return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="tinyshakespeare input.txt")
    p.add_argument("--steps", type=int, default=RECIPE["max_iters"], help="training steps per model")
    p.add_argument("--chunk", type=int, default=10, help="steps of one model before switching to the other")
    p.add_argument("--warmup", type=int, default=10, help="first steps of each model left out of the timing")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (nanoGPT's CPU eval_iters)")
    p.add_argument("--attention", default="auto", help="our model.attention")
    p.add_argument("--ffn-mult", type=float, default=8 / 3, help="our SwiGLU hidden / dim")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--attribution", action="store_true",
                   help=f"also time ours with {', '.join(ATTRIBUTION)} (see OursAttribution) in the same run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ar_vs_nanogpt.json"))
    a = p.parse_args()
    path = Path(a.data)
    if not path.is_file():
        print(f"[ar_vs_nanogpt] {path} not found: this benchmark needs tinyshakespeare's input.txt "
              "(pass --data PATH); skipping.")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    from lflm_dist.train.host_memory import retain_freed_memory
    kept = retain_freed_memory()  # as our trainer does on CPU; process-wide, so nanoGPT's steps get it too
    from lflm_dist.models import cpu_kernels
    from lflm_dist.parallel.mfu import _cpu_name as cpu_name
    kernels = cpu_kernels.get() is not None  # built before timing (a first build takes ~30 s)
    r = RECIPE
    train, val, vocab = load_chars(path)
    torch.manual_seed(a.seed)
    runners = [Ours(vocab, a.steps, a.attention, a.ffn_mult)]
    for variant in ATTRIBUTION if a.attribution else ():
        torch.manual_seed(a.seed)
        runners.append(OursAttribution(variant, vocab, a.steps, a.attention, a.ffn_mult))
    torch.manual_seed(a.seed)
    runners.append(Nano(vocab, a.steps))
    gens = {m.name: torch.Generator().manual_seed(a.seed) for m in runners}  # same batches for both
    times = {m.name: [] for m in runners}
    last = {m.name: float("nan") for m in runners}
    t_start = time.perf_counter()
    done = 0
    while done < a.steps:
        n = min(a.chunk, a.steps - done)
        # alternate which model goes first, so neither always follows the other
        order = runners if (done // a.chunk) % 2 == 0 else runners[::-1]
        for m in order:
            for i in range(n):
                x = get_batch(train, r["block_size"], r["batch_size"], gens[m.name])
                t0 = time.perf_counter()
                last[m.name] = m.train_step(x)
                dt = time.perf_counter() - t0
                if done + i >= a.warmup:
                    times[m.name].append(dt)
        done += n
        print(f"[ar_vs_nanogpt] step {done}/{a.steps}  " + "  ".join(
            f"{k}: loss {last[k]:.3f} {1e3 * statistics.median(v):.1f} ms/step" for k, v in times.items() if v),
            flush=True)
    wall = time.perf_counter() - t_start
    gv = torch.Generator().manual_seed(a.seed + 1)
    val_batches = [get_batch(val, r["block_size"], r["batch_size"], gv) for _ in range(a.eval_batches)]
    rows = {}
    for m in runners:
        ts = times[m.name]
        rows[m.name] = {"params": m.params, "ms_per_step_median": 1e3 * statistics.median(ts),
                        "ms_per_step_mean": 1e3 * statistics.fmean(ts), "ms_per_step_min": 1e3 * min(ts),
                        "steps_timed": len(ts), "final_train_loss": last[m.name],
                        "val_loss": statistics.fmean(m.eval_loss(x) for x in val_batches),
                        "phase_ms_median": {k: 1e3 * statistics.median(v[a.warmup:]) for k, v in m.phases.items()}}
    for v in rows.values():
        v["ratio_over_nanogpt"] = v["ms_per_step_median"] / rows["nanogpt"]["ms_per_step_median"]
    ratio = rows["ours"]["ratio_over_nanogpt"]
    desc = (f"{a.steps} steps each (interleaved in chunks of {a.chunk}, first {a.warmup} untimed), batch "
            f"{r['batch_size']} x context {r['block_size']}, {r['n_layer']}L/{r['n_head']}H/{r['n_embd']}d, "
            f"vocab {vocab}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}"
            + (", glibc malloc keeps freed memory (both)" if kept else "")
            + f", ours with fused CPU kernels: {'yes' if kernels else 'no (PyTorch ops)'}")
    print(f"\n{desc}")
    print(f"{'model':14} {'params':>8} {'ms/step':>8} {'(mean)':>7} {'(min)':>7} {'/ nanogpt':>9} {'train loss':>10} "
          f"{'val loss':>9}")
    for k, v in rows.items():
        print(f"{k:14} {v['params'] / 1e6:7.3f}M {v['ms_per_step_median']:8.1f} {v['ms_per_step_mean']:7.1f} "
              f"{v['ms_per_step_min']:7.1f} {v['ratio_over_nanogpt']:9.3f} {v['final_train_loss']:10.3f} {v['val_loss']:9.3f}")
    phases = list(rows["nanogpt"]["phase_ms_median"])
    print("median ms per phase: " + "   ".join(
        f"{k} " + " / ".join(f"{v['phase_ms_median'][p]:.1f}" for p in phases) for k, v in rows.items())
        + f"   ({' / '.join(phases)})")
    print(f"ours / nanogpt ms/step (median): {ratio:.3f}   (val loss: nats/char on {a.eval_batches} batches of "
          f"{r['batch_size']}x{r['block_size']}; wall {wall:.0f}s)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": desc, "steps": a.steps, "chunk": a.chunk, "warmup": a.warmup,
                               "ffn_mult": a.ffn_mult, "attention": a.attention, "recipe": RECIPE,
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "platform": platform.platform(), "cpu": cpu_name(), "fused_cpu_kernels": kernels, "rows": rows, "ratio_ours_over_nanogpt": ratio},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
