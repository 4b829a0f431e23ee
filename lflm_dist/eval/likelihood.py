"""Likelihood evaluation of any model family, through the family interface only
(`lflm_dist.models.family`): each family's `nll_bound` gives a per-window NLL figure and says
what it is: exact (the AR baseline), an upper bound (-ELBO, the importance-weighted bound of a
latent family) or an estimate; its `eval_layout` says how text is cut into windows.

Text longer than the model's window is split into non-overlapping windows scored
independently (no context across windows); `EvalLayout.describe()` is written into every
result. All aggregates are total nats / total tokens (never a mean of per-batch perplexities),
and families are compared in bits per character of the same held-out text.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lflm_dist.models.family import KIND_CLASS, BoundSettings, EvalLayout

__all__ = ["BoundSettings", "EvalLayout", "evaluate_likelihood", "load_eval_text", "make_windows", "window_bounds"]


# ----------------------------------------------------------------------------- conversions
def perplexity(total_nats: float, tokens: int) -> float:
    return math.exp(total_nats / tokens)


def bits_per_char(total_nats: float, chars: int) -> float:
    return total_nats / chars / math.log(2)


def word_perplexity(total_nats: float, words: int) -> float:
    """exp(total NLL / number of whitespace-separated words) (per-word PPL of word-level sets)."""
    return math.exp(total_nats / words)


def ratio_stderr(nats: list[float], tokens: list[int]) -> float:
    """Standard error of the ratio estimator Σ nats / Σ tokens over independent windows."""
    n = len(nats)
    if n < 2:
        return float("nan")
    r = sum(nats) / sum(tokens)
    resid = [a - r * b for a, b in zip(nats, tokens)]
    return math.sqrt(sum(x * x for x in resid) / (n * (n - 1))) * n / sum(tokens)


def iwae_from_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """Mean importance-weighted bound over consecutive groups of k samples: log_w [B, M] with
    M a multiple of k -> [B]. Groups are nested, so by concavity of log the value is
    non-increasing in k (k | M) on the same samples."""
    B, M = log_w.shape
    g = log_w.view(B, M // k, k)
    return -(torch.logsumexp(g, -1) - math.log(k)).mean(-1)


# ----------------------------------------------------------------------------- windows
def make_windows(ids: list[int], layout: EvalLayout, pad_id: int) -> list[tuple[list[int], int]]:
    """Split a token list into (window tokens, number of real tokens) per the family's `EvalLayout`
    (the BOS, if any, is added when the window is scored: `window_tensor`)."""
    out = []
    for i in range(0, len(ids), layout.window):
        chunk = list(ids[i:i + layout.window])
        n = len(chunk)
        if n % layout.block:
            chunk = chunk + [pad_id] * (layout.block - n % layout.block)
        out.append((chunk, n))
    return out


def window_tensor(windows: list[list[int]], layout: EvalLayout, pad_id: int, device) -> torch.Tensor:
    """Windows of equal length as the [B, T] tensor a family's nll_bound scores (BOS prepended)."""
    return torch.tensor([([pad_id] if layout.bos else []) + list(w) for w in windows], device=device)


def window_bounds(model, windows: list[tuple[list[int], int]], *, pad_id: int, settings: BoundSettings | None = None,
                  batch_size: int = 8, device=None, terms: bool = True) -> dict:
    """Per-window figures of `model.nll_bound` for a list of windows (consecutive windows of
    equal length batched).

    Returns {"nats": [per-window NLL figure, mean over draws], "mc_var": [variance of that mean
    over draws, nan if draws == 1 or the figure is exact], "tokens": [real tokens], "terms":
    {name: total nats}, "nfe": ODE function evaluations}."""
    s = settings or BoundSettings()
    device = device or next(model.parameters()).device
    layout = model.eval_layout()
    draws = 1 if model.likelihood_kind(s) == "exact" else s.draws
    g = torch.Generator().manual_seed(s.seed)
    nats, mc_var, ntok = [], [], []
    totals: dict[str, float] = {}
    nfe = 0
    i = 0
    while i < len(windows):
        j = i
        while j < len(windows) and j - i < batch_size and len(windows[j][0]) == len(windows[i][0]):
            j += 1
        group = windows[i:j]
        toks = window_tensor([w for w, _ in group], layout, pad_id, device)
        figures = []
        for _ in range(draws):
            b = model.nll_bound(toks, settings=s, generator=g)
            figures.append(b.nll)
            nfe += b.nfe
            if terms:
                for name, val in b.terms.items():
                    totals[name] = totals.get(name, 0.0) + float(val.double().sum()) / draws
        d = torch.stack(figures, 0).double()  # [draws, B]
        nats += d.mean(0).tolist()
        mc_var += (d.var(0) / draws).tolist() if draws > 1 else [float("nan")] * len(group)
        ntok += [n for _, n in group]
        i = j
    return {"nats": nats, "mc_var": mc_var, "tokens": ntok, "terms": totals, "nfe": nfe}


# ----------------------------------------------------------------------------- data
@dataclass
class EvalText:
    """Token ids per document plus the character/word counts of the scored text."""
    docs: list[list[int]]
    chars: int
    words: int
    source: str


def load_eval_text(path: str | Path, tok, max_chars: int | None = None) -> EvalText:
    """A plain text file, a .gz file, a directory of them, or a shard split dir (manifest.json).
    `max_chars` keeps the first characters of the text (tests, quick benchmarks)."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        from lflm_dist.data.shards import ShardIndex, read_manifest
        index = ShardIndex(path, read_manifest(path))
        docs, chars, words = [], 0, 0
        for i in range(len(index)):
            row = [int(x) for x in index[i]]
            text = tok.decode([x for x in row if x != tok.eos_id])  # separators are not characters of the text
            if max_chars is not None and chars + len(text) > max_chars:
                break
            docs.append(row)
            chars += len(text)
            words += len(text.split())
        return EvalText(docs, chars, words, f"{path} (shard split, {len(docs)} rows)")
    from lflm_dist.data.corpus import read_documents
    docs, chars, words = [], 0, 0
    for _, text in read_documents(path):
        if max_chars is not None:
            text = text[:max(0, max_chars - chars)]
        if not text:
            continue
        docs.append(tok.encode(text))
        chars += len(text)
        words += len(text.split())
    if not docs:
        raise ValueError(f"{path}: no text to evaluate")
    return EvalText(docs, chars, words, str(path))


# ----------------------------------------------------------------------------- top level
def evaluate_likelihood(model, cfg, tok, data: EvalText, *, settings: BoundSettings | None = None,
                        batch_size: int = 8, max_windows: int | None = None) -> dict:
    """The family's NLL figure of `data` (exact, an upper bound or an estimate: `kind`),
    aggregated by token count."""
    s = settings or BoundSettings()
    layout = model.eval_layout()
    windows = [w for ids in data.docs for w in make_windows(ids, layout, tok.eos_id)]
    chars, words = data.chars, data.words
    if max_windows is not None and len(windows) > max_windows:
        # keep the text stats consistent with the windows actually scored (pro rata by tokens: an
        # approximation; use max_chars in load_eval_text for exact character/word counts)
        kept = windows[:max_windows]
        frac = sum(n for _, n in kept) / sum(n for _, n in windows)
        chars, words = round(chars * frac), round(words * frac)
        windows = kept
    t0 = time.perf_counter()
    r = window_bounds(model, windows, pad_id=tok.eos_id, settings=s, batch_size=batch_size)
    secs = time.perf_counter() - t0
    total, tokens = sum(r["nats"]), sum(r["tokens"])
    mc = [v for v in r["mc_var"] if v == v]
    kind = model.likelihood_kind(s)
    out = {
        "family": model.family,
        "kind": kind,  # the estimator: exact | elbo_bound | iwae_bound | iwae_estimate
        "what": KIND_CLASS[kind],  # exact | upper_bound | estimate
        "is_upper_bound": KIND_CLASS[kind] == "upper_bound",
        "nll_total": total,
        "nll_per_token": total / tokens,
        "ppl": perplexity(total, tokens),
        "bpc": bits_per_char(total, chars),
        "word_ppl": word_perplexity(total, words) if words else None,
        "tokens": tokens,
        "chars": chars,
        "words": words,
        "num_sequences": len(windows),
        "stderr_nll_per_token": ratio_stderr(r["nats"], r["tokens"]),
        "mc_stderr_nll_per_token": (math.sqrt(sum(mc)) / tokens) if mc else None,
        "terms_per_token": {k: v / tokens for k, v in sorted(r["terms"].items())},
        "window_convention": layout.describe(),
        "seq_len": cfg.model.seq_len,
        "data": data.source,
        "seconds": secs,
        "tokens_per_s": tokens / secs if secs > 0 else None,
    }
    if kind == "iwae_estimate":
        out["note"] = ("importance-weighted estimate, not a guaranteed upper bound: the log-mean-exp of "
                       "Hutchinson log-density estimates is biased low; --trace exact gives the IWAE bound")
    out["estimator"] = model.estimator_info(s)
    if KIND_CLASS[kind] != "exact":
        out["estimator"].update(function_evaluations=r["nfe"],
                                stderr_note="stderr_nll_per_token: over windows (data + estimator noise); "
                                            "mc_stderr_nll_per_token: over independent draws of the estimator's "
                                            "random numbers (needs draws >= 2)")
    return out
