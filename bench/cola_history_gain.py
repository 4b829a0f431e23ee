#!/usr/bin/env python
"""How much does a trained Cola model use its clean history, and where would a prompt's
influence be lost? Prints tables, writes JSON. Sections:

  prior     the DiT's flow-matching loss on a validation batch at fixed t, with each sample's
            true clean history, another sample's history, and no history (block 0, which never
            has one, left out). A prior that follows its prompt has a clearly lower loss with the
            true history; equal losses mean an unconditional prior.
            With dit.token_mixture, also the cross-entropy of the DiT's p(token | z_t, history)
            (over all noisy positions, and over each block's first one, right after the history):
            at t ~ 1 it is what the prior knows of the next tokens from the history alone.
  decoder   the decoder's token cross-entropy on the second half of each window given the true
            latents, with the first half's latents (its history) taken from another sample, and
            with the second half's own latents taken from another sample. The block-causal
            encoder already folds the history into each block's latents, so a decoder that
            reads only its own block shows equal numbers in the first two columns.
  latents   R^2 of a linear (ridge) prediction of each token's normalised posterior mean, fitted on
            training windows and scored on validation ones, from its own token (one-hot), the
            previous token, and the previous 4 positions' latent means: how much of a latent the
            history could explain at all, in the L2 terms the flow-matching loss counts.
  guidance  prompt agreement (the fraction of positions at which the continuations of two
            different validation prompts, sampled with the same seed, agree; ~1 when the
            sampler ignores its prompt) for guidance weights 1..8.
  --dit-steps N  continues training only the DiT (VAE frozen: fixed latents) for N steps at
            --dit-lr and re-measures the prior section every 500 steps: does a longer-trained
            prior learn to use its history?

    python bench/cola_history_gain.py --run runs/cola_tiny --data data/shakespeare [--dit-steps 1000]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.data.loader import eval_batches  # noqa: E402
from lflm_dist.generate import load_run  # noqa: E402
from lflm_dist.models.blocks import AttnMask  # noqa: E402
from lflm_dist.models.noise import Noise, sample_keys  # noqa: E402


def _posterior_sample(model, tokens: torch.Tensor, g: torch.Generator):
    mean, logvar = model.vae.encoder(tokens)
    return mean + torch.randn(mean.shape, generator=g) * (0.5 * logvar).exp()


@torch.no_grad()
def history_gain(model, cfg, tokens: torch.Tensor, ts=(0.95, 0.7, 0.4, 0.1, 0.02), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    bs = cfg.model.dit.block_size
    z0 = model.vae.normalize(_posterior_sample(model, tokens, g))
    B, L, _ = z0.shape
    pos = torch.arange(L).repeat(2)
    rows = []
    mix = model.dit.tokens is not None  # dit.token_mixture: the forward also returns its logits
    unknown = torch.full_like(tokens, -1)  # the noisy half's tokens (dit.history_tokens)
    for t in ts:
        eps = torch.randn(z0.shape, generator=g)
        zt = (1 - t) * z0 + t * eps
        tt = torch.cat([torch.zeros(B, L // bs), torch.full((B, L // bs), t)], 1)
        row = {"t": t}
        for name, hist, hist_tokens, drop in (("true", z0, tokens, None), ("other", z0.roll(1, 0), tokens.roll(1, 0), None),
                                              ("none", z0, tokens, torch.ones(B, dtype=torch.bool))):
            mask = AttnMask("clean_noisy", L, bs, drop_history=drop)
            out = model.dit(torch.cat([hist, zt], 1), tt, pos, mask, keep_from=L, with_logits=mix,
                            tokens=torch.cat([hist_tokens, unknown], 1))
            v, logits = out if mix else (out, None)
            if mix:  # dit.token_mixture: also the CE of its p(token | z_t, history), all and first positions
                ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")[:, bs:]
                row[f"token_ce_{name}_history"] = ce.mean().item()
                row[f"token_ce_{name}_history_first"] = ce[:, ::bs].mean().item()
            row[f"fm_{name}_history"] = (v - (eps - z0)).pow(2)[:, bs:].mean().item()
        row["relative_gain_vs_other"] = 1 - row["fm_true_history"] / row["fm_other_history"]
        rows.append(row)
    return rows


@torch.no_grad()
def decoder_history(model, tokens: torch.Tensor, seed: int = 0) -> dict:
    """Token CE (nats) of the second half of each window under three latent sequences."""
    g = torch.Generator().manual_seed(seed)
    z = _posterior_sample(model, tokens, g)
    h = tokens.shape[1] // 2  # a multiple of the VAE block size for the demo configs

    def ce(latents):
        logits = model.vae.decoder(latents)[:, h:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, h:].reshape(-1)).item()

    other = z.roll(1, 0)
    return {"true": ce(z), "other_history": ce(torch.cat([other[:, :h], z[:, h:]], 1)),
            "other_own_latents": ce(torch.cat([z[:, :h], other[:, h:]], 1))}


@torch.no_grad()
def latent_predictability(model, cfg, data: Path, train_batches: int = 40, lam: float = 1.0) -> dict:
    """Validation R^2 (mean over latent dims) of ridge fits of the normalised posterior mean (the
    "latents" section above), fitted on `train_batches` batches of 64 training windows."""
    V, L = cfg.model.vocab_size, cfg.model.seq_len

    def collect(split, n):
        toks = torch.cat([b["input_ids"] for b in itertools.islice(
            eval_batches(data / split, batch_size=64, seq_len=L), n)])
        return toks, model.vae.normalize(model.vae.encoder(toks)[0])

    def features(toks, means, kind):
        i = torch.arange(8, L)  # positions with 8 predecessors in the window
        one_hot = lambda t: F.one_hot(t, V).float()  # noqa: E731
        x = {"own_token": lambda: one_hot(toks[:, i]), "previous_token": lambda: one_hot(toks[:, i - 1]),
             "previous_4_latents": lambda: torch.cat([means[:, i - k] for k in (1, 2, 3, 4)], -1)}[kind]()
        x = x.reshape(-1, x.shape[-1])
        return torch.cat([x, torch.ones(x.shape[0], 1)], 1), means[:, i].reshape(-1, means.shape[-1])

    (t_tr, m_tr), (t_va, m_va) = collect("train", train_batches), collect("valid", 8)
    out = {}
    for kind in ("own_token", "previous_token", "previous_4_latents"):
        x, y = features(t_tr, m_tr, kind)
        w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1]), x.T @ y)
        xv, yv = features(t_va, m_va, kind)
        out[kind] = (1 - (yv - xv @ w).pow(2).mean(0) / yv.var(0)).mean().item()
    return out


def guidance_sweep(model, cfg, tok, data: Path, weights=(1.0, 2.0, 4.0, 8.0), n_prompts: int = 8) -> list[dict]:
    from cola_bound_ablation import prompt_agreement
    from lflm_dist.eval.likelihood import load_eval_text
    val = load_eval_text(data / "valid", tok, 20000).docs[:32]
    prompts = [d[:16] for d in val[:n_prompts]]
    s = cfg.sample
    rows = []
    for w in weights:
        s.guidance = w
        _, agree = prompt_agreement(model, tok, prompts, s)
        rows.append({"guidance": w, "prompt_agreement": agree})
    return rows


def train_dit_only(model, cfg, data: Path, steps: int, lr: float, x_val: torch.Tensor, every: int = 500) -> list[dict]:
    """AdamW on the DiT alone (warmup 50 steps, clip 1), latents from the frozen VAE."""
    model.vae.requires_grad_(False)
    opt = torch.optim.AdamW(model.dit.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    train = (b["input_ids"] for _ in itertools.count()
             for b in eval_batches(data / "train", batch_size=cfg.train.global_batch_size, seq_len=cfg.model.seq_len))
    log, t0 = [], time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            model.eval()
            rows = history_gain(model, cfg, x_val)
            log.append({"step": step, "minutes": round((time.time() - t0) / 60, 1),
                        "mean_gain": sum(r["relative_gain_vs_other"] for r in rows) / len(rows),
                        "fm_true_history_t0.7": rows[1]["fm_true_history"]})
            print(f"[dit-only] step {step}: mean history gain {100 * log[-1]['mean_gain']:.3f}%", flush=True)
        if step == steps:
            break
        model.dit.train()
        x = next(train)
        with torch.no_grad():
            z = model.vae.normalize(_posterior_sample(model, x, g))
        fm = model.dit.flow_matching_loss(z, Noise(sample_keys(0, step, 0, x.shape[0]), x.device), tokens=x)
        c = cfg.model.cola  # the stage-2 weights relative to flow matching's
        loss = fm["fm"] + c.lambda_token_ce / c.lambda_fm * fm.get("token_ce", 0.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.dit.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        opt.step()
    model.eval()
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a Cola stage-2 run dir")
    p.add_argument("--data", required=True, help="prepared data dir (its valid/ split is used)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-guidance", action="store_true", help="skip the guidance sweep (sampling)")
    p.add_argument("--dit-steps", type=int, default=0, help="then train only the DiT this many steps (see above)")
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument("--out", default="bench/results/cola_history_gain.json")
    a = p.parse_args()
    model, cfg, tok = load_run(a.run)
    model.eval()
    if getattr(model, "dit", None) is None:
        sys.exit(f"{a.run} has no DiT prior: give a stage-2 Cola run")
    data = Path(a.data)
    x = next(iter(eval_batches(data / "valid", batch_size=a.batch, seq_len=cfg.model.seq_len)))["input_ids"]
    result = {"run": a.run, "batch": a.batch, "rows": history_gain(model, cfg, x)}
    print(f"{'t':>5} {'fm true hist':>13} {'other hist':>11} {'no hist':>9} {'gain':>7}")
    for r in result["rows"]:
        print(f"{r['t']:5.2f} {r['fm_true_history']:13.4f} {r['fm_other_history']:11.4f} {r['fm_none_history']:9.4f} "
              f"{100 * r['relative_gain_vs_other']:6.2f}%"
              + ("".join(f"  token CE {h} {r[f'token_ce_{h}_history']:.3f} (first {r[f'token_ce_{h}_history_first']:.3f})"
                         for h in ("true", "other")) if "token_ce_true_history" in r else ""))
    d = result["decoder"] = decoder_history(model, x)
    print(f"decoder CE of the second half (nats/token): true latents {d['true']:.3f}, first half's latents from "
          f"another sample {d['other_history']:.3f}, own latents from another sample {d['other_own_latents']:.3f}")
    r2 = result["latents"] = latent_predictability(model, cfg, data)
    print("R^2 of the normalised posterior mean from: " + ", ".join(f"{k} {v:.3f}" for k, v in r2.items()))
    if not a.no_guidance:
        result["guidance"] = guidance_sweep(model, cfg, tok, data)
        print("prompt agreement by guidance: " + ", ".join(f"w={r['guidance']:g} {r['prompt_agreement']:.3f}"
                                                          for r in result["guidance"]))
    if a.dit_steps:
        result["dit_only"] = {"steps": a.dit_steps, "lr": a.dit_lr,
                              "log": train_dit_only(model, cfg, data, a.dit_steps, a.dit_lr, x)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
