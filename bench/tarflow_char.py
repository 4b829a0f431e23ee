#!/usr/bin/env python
"""TarFlowLM's couplings (affine, Mix-1, Mix-d) against the AR baseline on character-level tiny
Shakespeare (issue: the paper's ordering must hold, affine worst and Mix-d best of the flows, with
Mix-d within 10% of the AR baseline's BPC).

Data: ../shared/data/tinyshakespeare/input.txt, the first 90% of the characters for training and
the last 10% held out (nanoGPT's shakespeare_char split), one token per character
(`Tokenizer.characters`), packed into rows of 64 by the project's shard writer (data/shakespeare_char).

Every row trains with the same loop (launchers/pretrain.py, one process) and the same recipe
(configs/tarflow_char.yaml's train section: nanoGPT's CPU recipe, 2000 steps of 12 x 64 tokens),
at about equal parameters (4 transformer layers of width 128 in all; the flows' SwiGLU at 3x width
where mixture heads take the difference; the params column says each row's count):
  ar      the AR baseline, 4 layers, 4 heads, 128 dims (nanoGPT's CPU shape)
  affine  2 affine autoregressive flows, [3, 1] conditioner layers, the second right-to-left
  mix1    2 Mix-1 flows (27 components per dim), [3, 1] layers
  mixd    a Mixture-Rosenblatt flow tied to the codebook (3 layers), then a Mix-1 flow (1 layer)
  *_2_1_1 the same couplings in three alternating blocks of [2, 1, 1] layers (the paper's 3 blocks)
  mixd_4  the tied block alone, 4 layers (a diagnostic: an AR model over the codebook's latents)
The latent families use d = 5 (the paper's text8 setting). Scoring: the held-out text in
non-overlapping windows of 64 characters through each family's `nll_bound` (launchers/evaluate.py's
path): AR exact NLL (BOS + 63 characters per window), TarFlowLM the -ELBO (an upper bound, exact
for its draw), in bits per character; the terms per character for the flows. Runs are cached in
--runs (a finished run has `.bench_done`); JSON: bench/results/tarflow_char.json.

    python bench/tarflow_char.py                      # all rows (~45 min on 2 idle cores)
    python bench/tarflow_char.py --rows ar,mixd --steps 300
    python bench/tarflow_char.py --prepare-only       # just build data/shakespeare_char
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cola_bound_ablation import table, train  # noqa: E402

from lflm_dist.data.shards import write_shards  # noqa: E402
from lflm_dist.data.tokenizer import Tokenizer  # noqa: E402
from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text  # noqa: E402
from lflm_dist.generate import load_run  # noqa: E402

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = "configs/tarflow_char.yaml"
NANOGPT_CPU_VAL = 1.8857  # nats/char, nanoGPT's CPU recipe on this split (its README)


def blocks(coupling: str, first: str | None = None, layers=(2, 1, 1)) -> str:
    b = [{"coupling": first or coupling if i == 0 else coupling, "n_layers": n} for i, n in enumerate(layers)]
    for x in b:
        if x["coupling"] == "mix1":
            x["components"] = 27
    return json.dumps(b)


ROWS = {
    "ar": {"model.family": "ar", "model.ar.net": json.dumps({"dim": 128, "n_layers": 4, "n_heads": 4})},
    # the flows: 3 conditioner layers in the first block (where Mix-d's likelihood is made), 1 in a
    # second block of the other direction; affine's small heads leave room for a 4x SwiGLU
    "affine": {"model.tarflow.blocks": blocks("affine", layers=(3, 1)), "model.tarflow.ffn_mult": 4.0},
    "mix1": {"model.tarflow.blocks": blocks("mix1", layers=(3, 1))},
    "mixd": {"model.tarflow.blocks": blocks("mix1", first="rosenblatt", layers=(3, 1))},  # configs/tarflow_char.yaml
    # the paper's three alternating blocks, [2, 1, 1] layers here
    "affine_2_1_1": {"model.tarflow.blocks": blocks("affine"), "model.tarflow.ffn_mult": 4.0},
    "mix1_2_1_1": {"model.tarflow.blocks": blocks("mix1")},
    "mixd_2_1_1": {"model.tarflow.blocks": blocks("mix1", first="rosenblatt")},
    # the tied block alone (a diagnostic: an AR model over the codebook's latents)
    "mixd_4": {"model.tarflow.blocks": blocks("mix1", first="rosenblatt", layers=(4,))},
}
COLUMNS = ("row", "params", "steps", "train s", "held-out nats/char", "BPC", "what", "recon", "-H(q)", "-log p(z)",
           "vs AR")


def prepare(text_path: Path, out: Path, seq_len: int = 64) -> Path:
    """data/shakespeare_char: character tokenizer, train (first 90%) and valid (last 10%) shards,
    and valid.txt (the held-out text itself, scored by the benchmark)."""
    if (out / "valid" / "manifest.json").is_file() and (out / "valid.txt").is_file():
        return out
    text = text_path.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    tok = Tokenizer.characters([text])
    tok.save(out / "tokenizer.json")
    for split, part in (("train", text[:n]), ("valid", text[n:])):
        write_shards([(split, part)], tok, out / split, seq_len=seq_len, source=str(text_path))
    (out / "valid.txt").write_text(text[n:], encoding="utf-8")
    return out


def score(run: Path, valid_text: Path, max_chars: int | None) -> dict:
    model, cfg, tok = load_run(run)
    torch.manual_seed(0)
    r = evaluate_likelihood(model, cfg, tok, load_eval_text(valid_text, tok, max_chars), settings=BoundSettings(seed=0))
    row = {k: r[k] for k in ("kind", "what", "nll_per_token", "bpc", "tokens", "chars", "stderr_nll_per_token",
                             "terms_per_token")}
    row["params"] = sum(p.numel() for p in model.parameters())
    row["describe"] = model.describe()
    g = torch.Generator().manual_seed(0)
    prompt = tok.encode("ROMEO:\n")
    row["sample"] = tok.decode(prompt + model.sample([prompt], 128, temperature=cfg.sample.temperature,
                                                     pad_id=tok.eos_id, generator=g)[0])
    return row


def cells(name: str, r: dict, ar_bpc: float | None) -> list[str]:
    t = r.get("terms_per_token") or {}
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    return [name, f"{r['params'] / 1e6:.2f}M", str(r["steps"]), str(r.get("train_seconds", "-")),
            f(r["nll_per_token"]), f(r["bpc"]), "exact" if r["kind"] == "exact" else "upper bound",
            f(t.get("recon")), f(t.get("neg_entropy")), f(t.get("neg_log_prior")),
            f(r["bpc"] / ar_bpc, 3) if ar_bpc else "-"]


def verdict(rows: dict) -> list[str]:
    """The acceptance checks, per layout: affine worst and Mix-d best of the flows; Mix-d / AR."""
    out = []
    for sfx in ("", "_2_1_1"):
        names = [f"{c}{sfx}" for c in ("affine", "mix1", "mixd")]
        if all(n in rows for n in names):
            a, m, d = (rows[n]["bpc"] for n in names)
            ok = a > m > d
            out.append(f"ordering {' > '.join(names)} (BPC {a:.3f} > {m:.3f} > {d:.3f}): {'holds' if ok else 'DOES NOT HOLD'}")
        if "ar" in rows and f"mixd{sfx}" in rows:
            ratio = rows[f"mixd{sfx}"]["bpc"] / rows["ar"]["bpc"]
            out.append(f"mixd{sfx} / ar BPC = {ratio:.3f} ({'within' if ratio <= 1.10 else 'NOT within'} 10%)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps of every row (the recipe: 2000)")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="tinyshakespeare input.txt")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare_char"), help="prepared data dir (built if missing)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "tarflow_char"))
    p.add_argument("--max-chars", type=int, default=None, help="score only the first characters of the held-out text")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training run (OMP_NUM_THREADS)")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tarflow_char.json"))
    a = p.parse_args()
    if not Path(a.text).is_file():
        print(f"{a.text} not found (../shared/data is not on this machine); nothing to do")
        return
    data = prepare(Path(a.text), Path(a.data))
    if a.prepare_only:
        print(f"prepared {data}")
        return
    torch.set_num_threads(a.threads)
    runs, out = Path(a.runs), Path(a.out)
    runs.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    results.update(steps=a.steps, data=str(data), text=a.text, config=CONFIG, nanogpt_cpu_val_nats=NANOGPT_CPU_VAL)
    for name in a.rows.split(","):
        if name not in ROWS:
            sys.exit(f"unknown row {name!r}; known: {', '.join(ROWS)}")
        run = runs / name
        t0 = time.time()
        train(CONFIG, run, {"data.path": data, **ROWS[name]}, a.steps, runs / f"{name}.log", a.threads)
        row = score(run, data / "valid.txt", a.max_chars)
        row.update(steps=a.steps, overrides=ROWS[name],
                   train_seconds=int(float((run / ".bench_done").read_text().split()[0])),
                   score_seconds=round(time.time() - t0))
        results["rows"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: {row['bpc']:.3f} BPC ({row['what']}), {row['params'] / 1e6:.2f}M params", flush=True)
    rows = results["rows"]
    ar_bpc = rows.get("ar", {}).get("bpc")
    cells_of = lambda n, r: cells(n, r, ar_bpc)  # noqa: E731
    print(table(rows, columns=COLUMNS, cells_of=cells_of))
    print()
    print(table(rows, markdown=True, columns=COLUMNS, cells_of=cells_of))
    results["verdict"] = verdict(rows)
    print("\n".join(results["verdict"]))
    for name, r in rows.items():
        print(f"\n--- {name} sample ---\n{r['sample']}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}  (nanoGPT's CPU recipe reaches {NANOGPT_CPU_VAL} nats/char = "
          f"{NANOGPT_CPU_VAL / math.log(2):.3f} BPC on this split)")


if __name__ == "__main__":
    main()
