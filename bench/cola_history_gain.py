#!/usr/bin/env python
"""How much does a trained Cola prior use its clean history? The DiT's flow-matching loss on a
validation batch at fixed t, with each sample's true clean history, another sample's history,
and no history (block 0, which never has one, left out). A prior that follows its prompt has a
clearly lower loss with the true history; equal losses mean an unconditional prior (issue:
samples that ignore their prompt). Prints a table, writes JSON.

    python bench/cola_history_gain.py --run runs/cola_tiny --data data/shakespeare
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.data.loader import eval_batches  # noqa: E402
from lflm_dist.generate import load_run  # noqa: E402
from lflm_dist.models.blocks import AttnMask  # noqa: E402


@torch.no_grad()
def history_gain(model, cfg, tokens: torch.Tensor, ts=(0.95, 0.7, 0.4, 0.1, 0.02), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    bs = cfg.model.dit.block_size
    mean, logvar = model.vae.encoder(tokens)
    z0 = model.vae.normalize(mean + torch.randn(mean.shape, generator=g) * (0.5 * logvar).exp())
    B, L, _ = z0.shape
    pos = torch.arange(L).repeat(2)
    rows = []
    for t in ts:
        eps = torch.randn(z0.shape, generator=g)
        zt = (1 - t) * z0 + t * eps
        tt = torch.cat([torch.zeros(B, L // bs), torch.full((B, L // bs), t)], 1)
        row = {"t": t}
        for name, hist, drop in (("true", z0, None), ("other", z0.roll(1, 0), None),
                                 ("none", z0, torch.ones(B, dtype=torch.bool))):
            v = model.dit(torch.cat([hist, zt], 1), tt, pos, AttnMask("clean_noisy", L, bs, drop_history=drop))[:, L:]
            row[f"fm_{name}_history"] = (v - (eps - z0)).pow(2)[:, bs:].mean().item()
        row["relative_gain_vs_other"] = 1 - row["fm_true_history"] / row["fm_other_history"]
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a Cola stage-2 run dir")
    p.add_argument("--data", required=True, help="prepared data dir (its valid/ split is used)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="bench/results/cola_history_gain.json")
    a = p.parse_args()
    model, cfg, _ = load_run(a.run)
    model.eval()
    if getattr(model, "dit", None) is None:
        sys.exit(f"{a.run} has no DiT prior: give a stage-2 Cola run")
    x = next(iter(eval_batches(Path(a.data) / "valid", batch_size=a.batch, seq_len=cfg.model.seq_len)))["input_ids"]
    rows = history_gain(model, cfg, x)
    print(f"{'t':>5} {'fm true hist':>13} {'other hist':>11} {'no hist':>9} {'gain':>7}")
    for r in rows:
        print(f"{r['t']:5.2f} {r['fm_true_history']:13.4f} {r['fm_other_history']:11.4f} {r['fm_none_history']:9.4f} "
              f"{100 * r['relative_gain_vs_other']:6.2f}%")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": a.run, "batch": a.batch, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
