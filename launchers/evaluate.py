#!/usr/bin/env python
"""Evaluate a trained run.

  likelihood (default):
    python launchers/evaluate.py --run runs/cola_tiny --data /work/shared/data/ptb/ptb.valid.txt.gz [--out r.json]
    NLL per token, perplexity, bits per character and per-word perplexity of a text file (.txt, .gz,
    a directory of them, or a shard split dir). Exact for the AR baseline; for Cola DLM an upper
    bound (-ELBO, or the importance-weighted bound with --iwae-k K) with every term, the prior's
    log-density from the probability-flow ODE with a Hutchinson trace estimator.

  harness:
    python launchers/evaluate.py harness --run DIR --tasks hellaswag,... [--include-path DIR]
    lm-evaluation-harness with the `lflm` model (lflm_dist.eval.harness).

  generation:
    python launchers/evaluate.py generation --run DIR --pairs pairs.jsonl [--ref-lm DIR --ref-gguf FILE]
    conditional generation from {"source", "reference"} lines scored with BLEU and ROUGE-L, or
    unconditional samples (--num-samples); sample entropy and, with a reference LM, generative PPL.

Each subcommand has --help."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBCOMMANDS = ("likelihood", "harness", "generation")


def _device_default() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write(out: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {path}")


# ----------------------------------------------------------------------------- likelihood
def likelihood_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py [likelihood]", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir written by launchers/pretrain.py (or an exported dir)")
    p.add_argument("--data", required=True, help="text file, .gz file, directory of them, or a shard split dir")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--max-chars", type=int, default=None, help="score only the first N characters")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iwae-k", type=int, default=1, help="posterior samples per window; >1: importance-weighted bound")
    p.add_argument("--draws", type=int, default=2, help="independent repeats per window (Monte Carlo standard error)")
    p.add_argument("--trace", choices=("hutchinson", "exact"), default="hutchinson")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per ODE function evaluation")
    p.add_argument("--probe-dist", choices=("rademacher", "gaussian"), default="rademacher")
    p.add_argument("--ode-method", default="dopri5", help="torchdiffeq solver (dopri5, rk4, midpoint, euler, ...)")
    p.add_argument("--ode-steps", type=int, default=8, help="steps of a fixed-step solver")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    import torch
    from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text
    from lflm_dist.generate import load_run

    torch.manual_seed(a.seed)
    try:
        model, cfg, tok = load_run(a.run, a.device or _device_default())
        data = load_eval_text(a.data, tok, a.max_chars)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = BoundSettings(iwae_k=a.iwae_k, draws=a.draws, trace=a.trace, probes=a.probes, probe_dist=a.probe_dist,
                      method=a.ode_method, steps=a.ode_steps, rtol=a.rtol, atol=a.atol, seed=a.seed)
    r = evaluate_likelihood(model, cfg, tok, data, settings=s, batch_size=a.batch_size, max_windows=a.max_windows)
    r["run"] = str(a.run)
    print(format_table(r))
    _write(r, a.out)
    return 0


def format_table(r: dict) -> str:
    bound = "<= " if r["is_upper_bound"] else ""
    rows = [("family / estimator", f"{r['family']} / {r['kind']}"),
            ("tokens / chars / words", f"{r['tokens']} / {r['chars']} / {r['words']}"),
            ("windows (seq_len)", f"{r['num_sequences']} ({r['seq_len']})"),
            ("NLL nats/token", f"{bound}{r['nll_per_token']:.4f} ± {r['stderr_nll_per_token']:.4f}"),
            ("perplexity / token", f"{bound}{r['ppl']:.3f}"),
            ("bits / char", f"{bound}{r['bpc']:.4f}"),
            ("perplexity / word", f"{bound}{r['word_ppl']:.3f}" if r["word_ppl"] else "n/a")]
    if r.get("mc_stderr_nll_per_token") is not None:
        rows.append(("Monte Carlo stderr", f"{r['mc_stderr_nll_per_token']:.4f} nats/token"))
    for k, v in r["terms_per_token"].items():
        rows.append((f"  term {k}", f"{v:.4f} nats/token"))
    if r.get("note"):
        rows.append(("note", r["note"]))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- harness
def harness_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py harness",
                                description="Run lm-evaluation-harness tasks on a run with the `lflm` model "
                                            "(loglikelihood from the model's bound, exact for AR).")
    p.add_argument("--run", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs (local tasks)")
    p.add_argument("--only-include-path", action="store_true",
                   help="index only the tasks under --include-path, not lm-eval's built-in ones (faster)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (lm-eval --limit)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iwae-k", type=int, default=1)
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--ode-method", default="rk4")
    p.add_argument("--ode-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="Euler steps per block when generating (Cola)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lflm_dist.eval.harness import run_harness
    res = run_harness(a.run, a.tasks.split(","), include_path=a.include_path, limit=a.limit,
                      num_fewshot=a.num_fewshot, include_defaults=not a.only_include_path, device=a.device or _device_default(),
                      model_kwargs=dict(batch_size=a.batch_size, iwae_k=a.iwae_k, draws=a.draws,
                                        ode_method=a.ode_method, ode_steps=a.ode_steps, steps=a.steps, seed=a.seed))
    for task, metrics in res["results"].items():
        print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    _write(res, a.out)
    return 0


# ----------------------------------------------------------------------------- generation
def generation_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py generation",
                                description="Conditional generation scored with BLEU / ROUGE-L, or unconditional "
                                            "samples; sample entropy and generative perplexity under a reference LM.")
    p.add_argument("--run", required=True)
    p.add_argument("--pairs", default=None, help='jsonl of {"source": ..., "reference": ...}')
    p.add_argument("--num-samples", type=int, default=8, help="unconditional samples when --pairs is not given")
    p.add_argument("--prompt", default="", help="prompt of the unconditional samples")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--churn", type=float, default=None, help="Cola: fraction of each Euler step's noise re-drawn")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--ref-lm", default=None, help="dir of a reference causal LM (transformers, offline)")
    p.add_argument("--ref-gguf", default=None, help="GGUF file name inside --ref-lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import dataclasses
    from lflm_dist.eval import generation as G
    from lflm_dist.generate import can_sample, load_run
    model, cfg, tok = load_run(a.run, a.device or _device_default())
    if not can_sample(model):
        print(f"error: {a.run}: {model.sampling_unavailable()}", file=sys.stderr)
        return 2
    s = dataclasses.replace(cfg.sample, **{k: v for k, v in {
        "max_new_tokens": a.max_new_tokens, "steps": a.steps, "guidance": a.guidance, "churn": a.churn,
        "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}.items() if v is not None})
    try:
        s.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.pairs:
        res = G.conditional_generation(model, tok, G.read_pairs(a.pairs), s, seed=a.seed)
    else:
        res = G.unconditional_samples(model, tok, a.num_samples, s, prompt=a.prompt, seed=a.seed)
    if a.ref_lm:
        res["generative_ppl"] = G.generative_perplexity(res["samples"], a.ref_lm, gguf_file=a.ref_gguf)
    print(json.dumps({k: v for k, v in res.items() if k not in ("samples", "hypotheses", "references")}, indent=2))
    _write(res, a.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        cmd, argv = argv[0], argv[1:]
    else:
        cmd = "likelihood"
    return {"likelihood": likelihood_main, "harness": harness_main, "generation": generation_main}[cmd](argv)


if __name__ == "__main__":
    sys.exit(main())
