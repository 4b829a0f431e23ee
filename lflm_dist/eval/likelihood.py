"""Likelihood evaluation: exact NLL for the AR baseline, an upper bound on NLL for Cola DLM.

Cola DLM (stage 2) is a latent-variable model p(x) = ∫ p(x|z) p_ψ(z) dz with a Gaussian
encoder q(z|x). Its negative ELBO is an upper bound on −log p(x):

    −ELBO = E_q[−log p(x|z)] − H(q(z|x)) − E_q[log p_ψ(z)]

* −log p(x|z): the decoder's cross-entropy of every token (nats, summed);
* H(q): the encoder's entropy, in closed form for a diagonal Gaussian;
* log p_ψ(z): the flow-matching prior, an ODE (continuous normalising flow). The DiT predicts
  the velocity of z_t = (1 − t) z0 + t ε on normalised latents zn = (z − shift)·scale;
  integrating dx/dt = v(x, t) from t = 0 (data) to t = 1 (noise, N(0, I)) gives
  log p(zn) = log N(x_1; 0, I) + ∫_0^1 div v(x_t, t) dt (instantaneous change of variables,
  Chen et al. 2018), with div v estimated by Hutchinson's ε^T (∂v/∂x) ε (FFJORD) or computed
  exactly (one vector-Jacobian product per dimension; for tests and small latents). Blocks
  are autoregressive: block b is conditioned on its clean history z0^(<b) through the DiT's
  KV cache (`BlockCausalDiT.history_velocity`), so the joint ODE over all noisy blocks
  gives Σ_b log p(z_b | z_<b). Finally log p(z) = log p(zn) + L·Σ_c log|scale_c| (Jacobian of
  the normalisation).

With K samples z_1..K ~ q the importance-weighted bound (Burda et al. 2016)
    −log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x)
is tighter; K = 1 equals −ELBO in expectation (−log q(z) is an unbiased estimate of −H(q)).
A stage-1 Cola run has the fixed prior N(0, I) on z: the bound is recon + KL.

Text longer than the model's window is split into non-overlapping windows scored
independently (no context across windows), see `WINDOW_CONVENTION`. All aggregates are
total nats / total tokens (never a mean of per-batch perplexities).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lflm_dist.models.text_vae import gaussian_entropy, gaussian_kl_std_normal

LOG_2PI = math.log(2 * math.pi)
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")

WINDOW_CONVENTION = {
    "cola": "non-overlapping windows of seq_len tokens, each scored from scratch (no context across windows); "
            "the last window is right-padded with <|endoftext|> to a whole number of DiT blocks and the bound "
            "of the padded window is charged to its real tokens (still an upper bound: "
            "-log p(x, pad) >= -log p(x))",
    "ar": "non-overlapping windows of seq_len-1 tokens, each scored exactly given <|endoftext|> as BOS "
          "(no context across windows); every text token is scored exactly once",
}


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


# ----------------------------------------------------------------------------- CNF density
def _divergence(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """Per-sample divergence of v(x) [B, ...]: exact (probes None) or Hutchinson mean over probes [P, B, ...]."""
    B = x.shape[0]
    if probes is None:
        flat = v.reshape(B, -1)
        div = torch.zeros(B, dtype=torch.float32, device=x.device)
        for i in range(flat.shape[1]):
            g = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
            div = div + g.reshape(B, -1)[:, i].float()
        return div
    div = torch.zeros(B, dtype=torch.float32, device=x.device)
    for p in range(probes.shape[0]):
        g = torch.autograd.grad(v, x, probes[p], retain_graph=p < probes.shape[0] - 1)[0]
        div = div + (g * probes[p]).reshape(B, -1).sum(-1).float()
    return div / probes.shape[0]


def draw_probes(shape: tuple, probe_dist: str, generator: torch.Generator | None) -> torch.Tensor:
    """Hutchinson probe vectors (fp32, CPU): Rademacher ±1 or standard Gaussian."""
    if probe_dist == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device="cpu").float() * 2 - 1
    if probe_dist == "gaussian":
        return torch.randn(shape, generator=generator, device="cpu")
    raise ValueError(f"probe_dist must be rademacher or gaussian, got {probe_dist!r}")


def cnf_log_density(velocity, x0: torch.Tensor, *, trace: str = "hutchinson", probes: int = 1,
                    probe_dist: str = "rademacher", method: str = "dopri5", steps: int = 8, rtol: float = 1e-4,
                    atol: float = 1e-4, generator: torch.Generator | None = None,
                    probe_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """log p_0(x0) [B] for the flow dx/dt = velocity(x, t), t from 0 to 1, with p_1 = N(0, I).

    velocity(x [B, ...], t scalar tensor) -> [B, ...]. `trace`: "hutchinson" (`probes` probe
    vectors drawn once per call and held fixed along the trajectory, Rademacher or Gaussian) or
    "exact"; `probe_vectors` [probes, B, ...] gives the probes instead of drawing them (common random
    numbers across calls). `method`: a torchdiffeq solver; fixed-step ones use `steps` steps, adaptive ones
    (dopri5, ...) `rtol`/`atol`. Returns (log density, {"nfe": function evaluations})."""
    from torchdiffeq import odeint

    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace must be hutchinson or exact, got {trace!r}")
    B = x0.shape[0]
    D = x0[0].numel()
    eps = None
    if trace == "hutchinson" and probe_vectors is not None:
        eps = probe_vectors.to(x0.device, x0.dtype)
    elif trace == "hutchinson":
        eps = draw_probes((probes, *x0.shape), probe_dist, generator).to(x0.device, x0.dtype)
    nfe = [0]

    def f(t, state):
        nfe[0] += 1
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            v = velocity(x, t)
            div = _divergence(v, x, eps)
        return v.detach(), div.detach().to(state[1].dtype)

    options = {"step_size": 1.0 / steps} if method in FIXED_STEP_METHODS else None
    ts = torch.tensor([0.0, 1.0], device=x0.device)
    state0 = (x0.detach(), torch.zeros(B, device=x0.device, dtype=torch.float64 if x0.dtype == torch.float64
                                       else torch.float32))
    xs, divs = odeint(f, state0, ts, method=method, rtol=rtol, atol=atol, options=options)
    x1, int_div = xs[-1], divs[-1]
    log_p1 = -0.5 * x1.reshape(B, -1).pow(2).sum(-1) - 0.5 * D * LOG_2PI
    return log_p1 + int_div, {"nfe": nfe[0]}


# ----------------------------------------------------------------------------- estimator settings
@dataclass
class BoundSettings:
    """How the Cola bound is estimated (written into the results JSON)."""
    iwae_k: int = 1  # samples z ~ q per window; >1 gives the importance-weighted bound
    draws: int = 1  # independent repeats of the whole estimate per window (for the Monte Carlo SE)
    trace: str = "hutchinson"  # hutchinson | exact
    probes: int = 1  # Hutchinson probes per function evaluation
    probe_dist: str = "rademacher"
    method: str = "dopri5"  # torchdiffeq solver
    steps: int = 8  # for fixed-step solvers
    rtol: float = 1e-4
    atol: float = 1e-4
    seed: int = 0

    def ode_kwargs(self) -> dict:
        return dict(trace=self.trace, probes=self.probes, probe_dist=self.probe_dist, method=self.method,
                    steps=self.steps, rtol=self.rtol, atol=self.atol)


# ----------------------------------------------------------------------------- Cola terms
@torch.no_grad()
def cola_bound_terms(model, tokens: torch.Tensor, *, k: int = 1, settings: BoundSettings | None = None,
                     generator: torch.Generator | None = None, noise: dict | None = None) -> dict[str, torch.Tensor]:
    """Every term of the Cola bound for tokens [B, L], with k posterior samples per sequence.

    Returns per-sequence nats: recon, log_q, log_pz, log_pzn [B, k] (per sample) and
    entropy, log_jac, prior_ce = E_q[-log p(z)] [B] (mean over the k samples; closed form for
    stage 1); plus neg_elbo [B] = mean recon + prior_ce − entropy (analytic entropy) and
    iwae [B] (−log-mean-exp of the importance weights; = −log w for k = 1).
    Stage-1 models use the N(0, I) prior on z. `noise` ({"eps": [B*k, L, C], "probes": [P, B*k, L, C]},
    see `draw_noise`) fixes the random numbers instead of drawing them from `generator`."""
    s = settings or BoundSettings()
    B, L = tokens.shape
    vae = model.vae
    mean, logvar = vae.encoder(tokens)
    mean_k, logvar_k = mean.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0)
    std_k = (0.5 * logvar_k).exp()
    eps = (noise["eps"] if noise else torch.randn(mean_k.shape, generator=generator, device="cpu")).to(mean.device, mean.dtype)
    z = mean_k + std_k * eps
    logits = vae.decoder(z).float()
    recon = F.cross_entropy(logits.transpose(1, 2), tokens.repeat_interleave(k, 0), reduction="none").sum(-1)
    log_q = (-0.5 * (eps.float().pow(2) + logvar_k.float() + LOG_2PI)).sum((-1, -2))
    entropy = gaussian_entropy(logvar.float()).sum(-1)
    out: dict[str, torch.Tensor] = {}
    if getattr(model, "dit", None) is None:  # stage 1: p(z) = N(0, I)
        log_pzn = (-0.5 * (z.float().pow(2) + LOG_2PI)).sum((-1, -2))
        log_jac = torch.zeros(B, device=tokens.device)
        out["kl_analytic"] = gaussian_kl_std_normal(mean.float(), logvar.float()).sum(-1)
        # E_q[-log N(z; 0, I)] in closed form (so -ELBO = recon + KL exactly, no sampling noise)
        prior_ce = 0.5 * (mean.float().pow(2) + logvar.float().exp() + LOG_2PI).sum((-1, -2))
        nfe = 0
    else:
        zn = vae.normalize(z)
        log_pzn, info = cnf_log_density(model.dit.history_velocity(zn), zn, generator=generator, **s.ode_kwargs(),
                                        probe_vectors=noise.get("probes") if noise else None)
        log_jac = (L * vae.latent_scale.float().abs().log().sum()).expand(B)
        nfe = info["nfe"]
    log_pz = log_pzn.view(B, k) + log_jac[:, None]
    recon, log_q, log_pzn = recon.view(B, k), log_q.view(B, k), log_pzn.view(B, k)
    log_w = -recon + log_pz - log_q
    if getattr(model, "dit", None) is not None:
        prior_ce = -log_pz.mean(1)
    out.update(recon=recon, log_q=log_q, log_pz=log_pz, log_pzn=log_pzn, entropy=entropy, log_jac=log_jac,
               log_w=log_w, prior_ce=prior_ce, neg_elbo=recon.mean(1) + prior_ce - entropy,
               iwae=-(torch.logsumexp(log_w, 1) - math.log(k)),
               nfe=torch.tensor(nfe))
    return out


def draw_noise(shape: tuple, s: BoundSettings, generator: torch.Generator) -> dict:
    """The random numbers of one bound evaluation of windows of `shape` [B*k, L, C]: posterior
    noise and (Hutchinson) probe vectors. Evaluating a prefix of a window with the prefix of
    these (common random numbers) makes the prefix's terms equal in both: the encoder, decoder
    and DiT are block-causal and fixed-step ODE solvers integrate each block on its own."""
    eps = torch.randn(shape, generator=generator)
    if s.trace != "hutchinson":
        return {"eps": eps}
    return {"eps": eps, "probes": draw_probes((s.probes, *shape), s.probe_dist, generator)}


def prefix_noise(noise: dict, n: int) -> dict:
    return {"eps": noise["eps"][:, :n], **({"probes": noise["probes"][:, :, :n]} if "probes" in noise else {})}


def iwae_from_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """Mean importance-weighted bound over consecutive groups of k samples: log_w [B, M] with
    M a multiple of k -> [B]. Groups are nested, so by concavity of log the value is
    non-increasing in k (k | M) on the same samples."""
    B, M = log_w.shape
    g = log_w.view(B, M // k, k)
    return -(torch.logsumexp(g, -1) - math.log(k)).mean(-1)


# ----------------------------------------------------------------------------- AR exact NLL
@torch.no_grad()
def ar_token_nll(model, tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Exact per-token NLL [B, T] of tokens [B, T] given <bos> and their prefix."""
    inp = torch.cat([torch.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], dim=1)
    logits = model.logits(inp).float()
    return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")


# ----------------------------------------------------------------------------- windows
def family_of(model) -> str:
    return "cola" if hasattr(model, "vae") else "ar"


def make_windows(ids: list[int], family: str, seq_len: int, block: int, pad_id: int) -> list[tuple[list[int], int]]:
    """Split a token list into (window tokens, number of real tokens) per `WINDOW_CONVENTION`."""
    w = seq_len if family == "cola" else seq_len - 1
    out = []
    for i in range(0, len(ids), w):
        chunk = list(ids[i:i + w])
        n = len(chunk)
        if family == "cola" and n % block:
            chunk = chunk + [pad_id] * (block - n % block)
        out.append((chunk, n))
    return out


def window_bounds(model, windows: list[tuple[list[int], int]], *, pad_id: int, settings: BoundSettings | None = None,
                  batch_size: int = 8, device=None, terms: bool = True) -> dict:
    """Per-window estimates for a list of windows (consecutive windows of equal length batched).

    Returns {"nats": [per-window bound, mean over draws], "mc_var": [variance of that mean over
    draws, nan if draws == 1], "tokens": [real tokens], "terms": {name: total nats}} where the AR
    baseline's nats are exact."""
    s = settings or BoundSettings()
    device = device or next(model.parameters()).device
    family = family_of(model)
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
        toks = torch.tensor([w for w, _ in group], device=device)
        real = torch.tensor([n for _, n in group], device=device)
        if family == "ar":
            mask = torch.arange(toks.shape[1], device=device)[None, :] < real[:, None]
            per = (ar_token_nll(model, toks, pad_id) * mask).sum(-1).double()
            nats += per.tolist()
            mc_var += [float("nan")] * len(group)
        else:
            draws = []
            for _ in range(s.draws):
                t = cola_bound_terms(model, toks, k=s.iwae_k, settings=s, generator=g)
                draws.append(t["iwae"] if s.iwae_k > 1 else t["neg_elbo"])
                nfe += int(t["nfe"])
                if terms:
                    add = {"recon": t["recon"].mean(1), "neg_entropy": -t["entropy"],
                           "neg_log_prior": t["prior_ce"], "neg_log_prior_normalised": -t["log_pzn"].mean(1),
                           "neg_log_jacobian": -t["log_jac"], "neg_elbo": t["neg_elbo"]}
                    if s.iwae_k > 1:
                        add["iwae"] = t["iwae"]
                    if "kl_analytic" in t:
                        add["kl_analytic"] = t["kl_analytic"]
                    for name, val in add.items():
                        totals[name] = totals.get(name, 0.0) + float(val.double().sum()) / s.draws
            d = torch.stack(draws, 0).double()  # [draws, B]
            nats += d.mean(0).tolist()
            mc_var += (d.var(0) / s.draws).tolist() if s.draws > 1 else [float("nan")] * len(group)
        ntok += real.tolist()
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
def likelihood_kind(family: str, s: BoundSettings) -> str:
    """exact (AR); elbo_bound (an unbiased estimate of -ELBO, an upper bound on NLL: Hutchinson's
    trace is unbiased and enters linearly); iwae_bound (k > 1 with the exact trace); iwae_estimate
    (k > 1 with Hutchinson: log-mean-exp of noisy log-densities is biased low, so not a bound).
    All Cola figures carry the ODE solver's discretisation error."""
    if family == "ar":
        return "exact"
    if s.iwae_k == 1:
        return "elbo_bound"
    return "iwae_bound" if s.trace == "exact" else "iwae_estimate"


def evaluate_likelihood(model, cfg, tok, data: EvalText, *, settings: BoundSettings | None = None,
                        batch_size: int = 8, max_windows: int | None = None) -> dict:
    """NLL (exact for AR, an upper bound for Cola) of `data`, aggregated by token count."""
    s = settings or BoundSettings()
    family = family_of(model)
    block = cfg.model.dit.block_size if family == "cola" else 1
    windows = [w for ids in data.docs for w in make_windows(ids, family, cfg.model.seq_len, block, tok.eos_id)]
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
    out = {
        "family": family,
        "kind": likelihood_kind(family, s),
        "is_upper_bound": family == "cola" and likelihood_kind(family, s) != "iwae_estimate",
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
        "window_convention": WINDOW_CONVENTION[family],
        "seq_len": cfg.model.seq_len,
        "data": data.source,
        "seconds": secs,
        "tokens_per_s": tokens / secs if secs > 0 else None,
    }
    if out["kind"] == "iwae_estimate":
        out["note"] = ("importance-weighted estimate, not a guaranteed upper bound: the log-mean-exp of "
                       "Hutchinson log-density estimates is biased low; --trace exact gives the IWAE bound")
    if family == "cola":
        out["estimator"] = {**asdict(s), "ode_t0": 0.0, "ode_t1": 1.0, "base": "N(0, I) at t=1",
                            "prior": "stage-2 DiT CNF" if getattr(model, "dit", None) is not None else "N(0, I)",
                            "function_evaluations": r["nfe"],
                            "stderr_note": "stderr_nll_per_token: over windows (data + estimator noise); "
                                           "mc_stderr_nll_per_token: over independent draws of z and Hutchinson "
                                           "probes (needs draws >= 2)"}
    else:
        out["estimator"] = {"exact": True}
    return out
