"""How well a Latent Flow Transformer's student matches its teacher, and which block to replace.

  KL        KL(teacher || student) of the next-token distributions, nats, averaged over every
            position of every window (the LFT paper's logits KL)
  NMSE      |x_hat1 - x1|^2 / |x1 - mean(x1)|^2 over all positions: the flow layer's output against
            the teacher's hidden state leaving the block, both from the teacher's x0 (the variance
            of x1 is dominated by the first position's massive activations, so this is small)
  update NMSE  |x_hat1 - x1|^2 / |x1 - x0|^2: the same error against the block's update (1: no
            better than skipping the block; the training loss's normalisation)
  PPL       exp(total NLL / total tokens) of tokens 1.. of each window (never a mean of per-batch
            perplexities)
  recoupling ratio  R = 1 - Tr(M) / N for the optimal-transport matching M between N token states
            x0 and x1 of a block (squared Euclidean cost, exact assignment): 0 when every state is
            matched to its own successor (a flow can carry x0 to x1 without paths crossing), large
            when the teacher's pairing disagrees with the OT one (paths must cross; harder to learn)

Skip baselines run the teacher with layers [m, m + s) removed; everything here reads the teacher
through `lflm_dist.models.lft_layers`, so any HF causal LM works.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from lflm_dist.data.corpus import _read_text
from lflm_dist.models.lft_layers import BlockCapture, decoder_layers, layers_replaced, next_token_kl


def read_text(path: str | Path, max_chars: int = 0, from_char: int = 0) -> str:
    """A text or .gz file (the data tools' reader: UTF-8, clear errors): max_chars characters (0: all)
    from character from_char on."""
    text = _read_text(Path(path))[from_char:]
    return text[:max_chars] if max_chars else text


def token_windows(ids: list[int], window: int, n_windows: int = 0) -> torch.Tensor:
    """Consecutive non-overlapping windows [W, window] of a token stream (the tail dropped)."""
    n = len(ids) // window
    n = min(n, n_windows) if n_windows else n
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens: fewer than one window of {window}")
    return torch.tensor(ids[:n * window]).view(n, window)


def layer_list(lm: nn.Module) -> list[nn.Module]:
    parent, attr = decoder_layers(lm)
    return list(getattr(parent, attr))


@torch.no_grad()
def _log_probs(lm: nn.Module, windows: torch.Tensor, batch: int, layers: list[nn.Module] | None = None) -> torch.Tensor:
    outs = []
    with layers_replaced(lm, layers if layers is not None else layer_list(lm)):
        for i in range(0, len(windows), batch):
            outs.append(lm(input_ids=windows[i:i + batch], use_cache=False).logits.float().log_softmax(-1))
    return torch.cat(outs)


def kl_and_ppl(teacher_lp: torch.Tensor, lp: torch.Tensor, windows: torch.Tensor) -> dict:
    """KL(teacher || model) per position (mean) and the model's perplexity on the windows."""
    kl = next_token_kl(teacher_lp, lp).mean()
    nll = -lp[:, :-1].gather(-1, windows[:, 1:, None]).sum()
    return {"kl": float(kl), "ppl": math.exp(float(nll) / windows[:, 1:].numel())}


@torch.no_grad()
def skip_baselines(lm: nn.Module, windows: torch.Tensor, start: int, skips: list[int], batch: int = 4,
                   teacher_lp: torch.Tensor | None = None) -> list[dict]:
    """The teacher without layers [start, start + s) for each s in `skips`."""
    layers = layer_list(lm)
    teacher_lp = _log_probs(lm, windows, batch) if teacher_lp is None else teacher_lp
    rows = []
    for s in skips:
        lp = _log_probs(lm, windows, batch, layers[:start] + layers[start + s:])
        rows.append({"model": f"skip [{start},{start + s})", "layers_removed": s, **kl_and_ppl(teacher_lp, lp, windows)})
    return rows


@torch.no_grad()
def student_rows(model, windows: torch.Tensor, steps: list[int], batch: int = 4,
                 teacher_lp: torch.Tensor | None = None, solver: str | None = None) -> list[dict]:
    """KL, NMSE and perplexity of an LFT model's student run with each number of solver steps."""
    lm = model.teacher
    teacher_lp = _log_probs(lm, windows, batch) if teacher_lp is None else teacher_lp
    caps = [model.block_states(windows[i:i + batch]) for i in range(0, len(windows), batch)]
    x1 = torch.cat([c.x1 for c in caps]).float()
    var = (x1 - x1.mean((0, 1))).pow(2).sum()
    update = (x1 - torch.cat([c.x0 for c in caps]).float()).pow(2).sum()
    rows = []
    for k in steps:
        with model.student(steps=k, solver=solver) as student:
            lp = _log_probs(student, windows, batch)
            x1_hat = torch.cat([model.flow(c.x0, *c.args, **c.kwargs) for c in caps]).float()
        rows.append({"model": f"flow [{model.m},{model.n}) k={k}", "layers_removed": model.n - model.m - 1,
                     "steps": k, "nmse": float((x1_hat - x1).pow(2).sum() / var),
                     "update_nmse": float((x1_hat - x1).pow(2).sum() / update), **kl_and_ppl(teacher_lp, lp, windows)})
    return rows


def recoupling_ratio(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """R = 1 - Tr(M)/N for the exact OT assignment between rows of x0 [N, D] and x1 [N, D]."""
    from scipy.optimize import linear_sum_assignment
    cost = torch.cdist(x0.double(), x1.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float((cols[rows.argsort()] != range(len(cols))).mean())


@torch.no_grad()
def recoupling_table(lm: nn.Module, windows: torch.Tensor, blocks: list[tuple[int, int]], states: int = 256,
                     seed: int = 0, skip_kl: bool = False, batch: int = 4) -> list[dict]:
    """The recoupling ratio of each candidate block (m, n) on `states` token states drawn from
    the windows (the same states for every block), with the block's relative update size and,
    with `skip_kl`, the KL(teacher || teacher without the block) on the windows: how much the
    flow layer has to restore (on SmolLM2 it separates blocks where the ratio does not)."""
    layers = layer_list(lm)
    teacher_lp = _log_probs(lm, windows, batch) if skip_kl else None
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(windows.numel(), generator=g)[:states]
    rows = []
    for m, n in blocks:
        cap = BlockCapture(layers[m], layers[n - 1])
        try:
            with layers_replaced(lm, layers[:n]):
                lm.base_model(input_ids=windows, use_cache=False)
        finally:
            cap.remove()
        x0 = cap.x0.reshape(-1, cap.x0.shape[-1])[flat].float()
        x1 = cap.x1.reshape(-1, cap.x1.shape[-1])[flat].float()
        rows.append({"block": f"[{m},{n})", "m": m, "n": n, "layers": n - m, "recoupling": recoupling_ratio(x0, x1),
                     "update_over_state": float((x1 - x0).norm(dim=-1).mean() / x0.norm(dim=-1).mean())})
        if teacher_lp is not None:
            rows[-1]["skip_kl"] = skip_baselines(lm, windows, m, [n - m], batch, teacher_lp)[0]["kl"]
    return rows


def format_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_kl(skips: list[dict], flows: list[tuple[str, str, dict]], path: str | Path) -> None:
    """KL against layers removed (log scale): skip baselines as a line, each flow row
    (label, marker, row) as a point; a flow layer counts as one layer kept."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # the legend sits beside the axes past 6 entries; the figure grows so that none is cut off
    fig, ax = plt.subplots(figsize=(5.5 + 2.5 * (len(flows) > 6), max(3.8, 0.75 + 0.14 * (len(flows) + 1))))
    ax.plot([r["layers_removed"] for r in skips], [r["kl"] for r in skips], "o-", color="gray", label="skip layers")
    # tab20 less its two greys (the skip line's colour): 18 before a colour repeats (the default has 10)
    ax.set_prop_cycle(color=[c for i, c in enumerate(plt.cm.tab20.colors) if i not in (14, 15)])
    for label, marker, r in flows:
        ax.plot(r["layers_removed"], r["kl"], marker, ms=8, label=label)
    ax.set_xlabel("layers removed (net: a flow layer counts as one)")
    ax.set_ylabel("KL(teacher || student), nats")
    ax.set_yscale("log")
    ax.legend(fontsize=6, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if len(flows) > 6 else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
