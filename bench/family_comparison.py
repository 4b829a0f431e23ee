#!/usr/bin/env python
"""LFLM tiny, Cola DLM tiny and the AR baseline at about equal parameters (2.7M; Cola 3.26M since
its prior grew a token mixture on 2026-11-25, and `ar_equal` is the AR at that size) and equal
optimizer steps, by the same training loop on the demo corpus, scored on the same held-out
text through the family interface only (`nll_bound`, `sample`, `posterior_means`):

  * NLL figure in nats/token and bits/char on the demo's validation split and WikiText-2 valid
    (when ../shared/data is there): exact for AR, an upper bound for the latent families
    (LFLM: -ELBO = recon + KL, exact KL; Cola: -ELBO with the prior's density from the
    probability-flow ODE, rk4);
  * recon accuracy: the final validation `recon_acc` of the run (latent families);
  * active units (Var_x E_q[z_d] > 0.01, Burda et al. 2016);
  * samples: generative PPL under SmolLM2-135M, sample entropy, prompt agreement (see
    bench/cola_bound_ablation.py), and a sample per family.

Cola trains stage 1 (`configs/cola_tiny_vae.yaml`) for --steps1 and stage 2 for the rest; AR and
LFLM train all --steps in one run. Runs are cached in --runs (a finished run has `.bench_done`).

    python bench/family_comparison.py [--steps 1200 --steps1 400]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cola_bound_ablation import add_scoring_args, reference_lm, score, table, train  # noqa: E402

# one-run rows: name -> (config, overrides); Cola trains in two stages (below)
ONE_RUN = {"ar": ("configs/ar_tiny.yaml", {}), "ar_equal": ("configs/ar_tiny.yaml", {"model.ar.net.dim": 176}),
           "lflm": ("configs/lflm_tiny.yaml", {}),
           # free bits against posterior collapse: a latent dim's KL below 0.25 nats is not penalised
           "lflm+fb": ("configs/lflm_tiny.yaml", {"model.lflm.free_bits": 0.25})}

COLUMNS = ("family", "params", "steps", "demo nats/tok", "demo bpc", "wiki nats/tok", "wiki bpc", "what",
           "recon acc", "active units", "gen PPL", "entropy", "prompt agree")


def final_valid(run: Path, key: str) -> float | None:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r[f"valid/{key}"] for r in rows if f"valid/{key}" in r]
    return vals[-1] if vals else None


def cells(name: str, r: dict) -> list[str]:
    d, w, g = r["demo_valid"], r.get("wikitext2_valid"), r["generation"]
    f = lambda v, p=3: "-" if v is None or v != v else f"{v:.{p}f}"  # noqa: E731
    return [name, f"{r['params'] / 1e6:.2f}M", str(r["steps"]), f(d["nll_per_token"]), f(d["bpc"]),
            f(w["nll_per_token"] if w else None), f(w["bpc"] if w else None),
            "exact" if d["kind"] == "exact" else "upper bound", f(r["recon_acc"]),
            str(r["active_dims"]) if r["active_dims"] is not None else "-", f(g.get("gen_ppl"), 1),
            f(g["sample_entropy"], 2), f(g["prompt_agreement"], 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="ar,lflm,lflm+fb,cola", help="rows: cola and any of ONE_RUN")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps of every family (Cola: both stages)")
    p.add_argument("--steps1", type=int, default=400, help="Cola's stage-1 (VAE) share of --steps")
    p.add_argument("--runs", default=str(ROOT / "runs" / "families"))
    add_scoring_args(p)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "family_comparison.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data, runs = Path(a.data), Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    ref = reference_lm(a.ref_lm)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    results.update(steps=a.steps, steps1=a.steps1, max_chars=a.max_chars, data=str(data))
    for fam in a.families.split(","):
        run = runs / fam
        if fam == "cola":
            vae = runs / "cola_vae"
            train("configs/cola_tiny_vae.yaml", vae, {"data.path": data}, a.steps1, runs / "cola_vae.log", a.threads)
            train("configs/cola_tiny.yaml", run, {"data.path": data, "model.cola.ref_checkpoint": vae},
                  a.steps - a.steps1, runs / "cola.log", a.threads)
        elif fam in ONE_RUN:
            config, over = ONE_RUN[fam]
            train(config, run, {"data.path": data, **over}, a.steps, runs / f"{fam}.log", a.threads)
        else:
            sys.exit(f"unknown row {fam!r}: cola or one of {', '.join(ONE_RUN)}")
        t0 = time.time()
        row = score(run, data, a, ref)
        row.update(steps=a.steps, recon_acc=final_valid(run, "recon_acc"), eval_seconds=round(time.time() - t0))
        if out.is_file():  # another bench process may have added rows meanwhile
            results["rows"] = {**json.loads(out.read_text())["rows"], **results["rows"]}
        results["rows"][fam] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(table({fam: row}, columns=COLUMNS, cells_of=cells).splitlines()[-1], flush=True)
    print(table(results["rows"], columns=COLUMNS, cells_of=cells))
    print()
    print(table(results["rows"], markdown=True, columns=COLUMNS, cells_of=cells))
    for fam, r in results["rows"].items():
        print(f"\n--- {fam} sample ---\n{r['generation']['samples'][0]}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
