"""Invertible element-wise couplings of TarFlowLM's autoregressive flows (arXiv 2507.00425), and
the masked MLP (MADE) that makes a coupling autoregressive over the dimensions of a token.

Every forward returns (u, log|du/dx|) per element; a flow block sums the log-determinants.

  affine          u = (x - m) exp(-s),                          log|J| = -s
  Mixture-CDF     u = Phi^-1(F_mix(x)), F_mix = sum_k w_k Phi((x - m_k) / s_k),
                  log|J| = log p_mix(x) - log N(u; 0, 1)       (paper, Mechanism 1)
  Rosenblatt      a d-dim Gaussian mixture with diagonal components sum_k pi_k N(x; mu_k, sigma_k^2 I)
                  taken one dimension at a time: dim i is a 1-D Mixture-CDF whose weights are the
                  posterior of the component given dims < i, w_ik ∝ pi_k prod_{j<i} N(x_j; mu_kj, sigma_kj);
                  summed over i the log|J| is log p_mix(x) - sum_i log N(u_i) (chain rule)

Numerics: F_mix and 1 - F_mix are both kept in log space (log_ndtr of the standardised
distances, logsumexp over components) and u is taken from whichever is below 1/2, so neither
tail loses precision to 1 - F rounding. Phi^-1 of a log-probability (`ndtri_log`) uses ndtri
where exp(log p) is comfortably representable and, below log p = -30, the asymptotic tail
expansion refined by Newton steps on log Phi; its gradient is the implicit one, Phi(u) / phi(u)
= exp(log p - log phi(u)), exact and finite everywhere. The only clamp: log-scales pass through
a soft clamp to (-LOG_SCALE_MAX, LOG_SCALE_MAX) (a tanh, smooth), so a scale can neither vanish
nor explode. Inverses are by bisection on a bracket that provably contains the root (below).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_SCALE_MAX = 7.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_HALF = math.log(0.5)


def soft_clamp(s: torch.Tensor, bound: float = LOG_SCALE_MAX) -> torch.Tensor:
    return bound * torch.tanh(s / bound)


def log_normal(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, 1) element-wise."""
    return -0.5 * x * x - _HALF_LOG_2PI


def ndtri_log(logp: torch.Tensor, newton_steps: int = 3) -> torch.Tensor:
    """Phi^-1(exp(logp)) for logp <= log(1/2), accurate for arbitrarily small p."""
    with torch.no_grad():
        lp = logp.detach()
        u = torch.special.ndtri(lp.exp())
        # Phi(u) ~ phi(u) / |u| for u -> -inf, so u^2 ~ a - log a - log(2 pi) with a = -2 log p
        a = (-2.0 * lp).clamp(min=60.0)
        v = -torch.sqrt(a - torch.log(a) - 2 * _HALF_LOG_2PI)
        for _ in range(newton_steps):  # Newton on log Phi(v) = lp; d/dv log Phi(v) = phi(v) / Phi(v)
            lv = torch.special.log_ndtr(v)
            v = v - (lv - lp) / torch.exp(log_normal(v) - lv)
        u = torch.where(lp < -30.0, v, u)
    # implicit gradient du/dlogp = Phi(u) / phi(u)
    return u + (logp - lp) * torch.exp(lp - log_normal(u))


# ----------------------------------------------------------------------------- affine
def affine_forward(x, shift, log_scale):
    s = soft_clamp(log_scale)
    return (x - shift) * torch.exp(-s), -s


def affine_inverse(u, shift, log_scale):
    return u * torch.exp(soft_clamp(log_scale)) + shift


# ----------------------------------------------------------------------------- 1-D Mixture-CDF
def _mixture_logs(x, log_w, mean, log_scale):
    """log F(x), log (1 - F(x)) and log p(x) of a 1-D Gaussian mixture; x [...], params [..., M]."""
    zc = (x[..., None] - mean) * torch.exp(-log_scale)
    log_cdf = torch.logsumexp(log_w + torch.special.log_ndtr(zc), -1)
    log_sf = torch.logsumexp(log_w + torch.special.log_ndtr(-zc), -1)
    log_pdf = torch.logsumexp(log_w + log_normal(zc) - log_scale, -1)
    return log_cdf, log_sf, log_pdf


def mixture_forward(x, logits, mean, log_scale):
    """u = Phi^-1(F_mix(x)) and log|du/dx| = log p_mix(x) - log N(u); x [...], params [..., M]
    (`logits` unnormalised mixture weights, `log_scale` soft-clamped here)."""
    log_w, log_scale = F.log_softmax(logits, -1), soft_clamp(log_scale)
    log_cdf, log_sf, log_pdf = _mixture_logs(x, log_w, mean, log_scale)
    u = torch.where(log_cdf <= log_sf, ndtri_log(log_cdf.clamp(max=_LOG_HALF)),
                    -ndtri_log(log_sf.clamp(max=_LOG_HALF)))
    return u, log_pdf - log_normal(u)


@torch.no_grad()
def mixture_inverse(u, logits, mean, log_scale, tol: float = 1e-6, max_iter: int = 200):
    """x with F_mix(x) = Phi(u), by bisection to |x - x*| <= tol * (1 + |x*|) (or the dtype's
    resolution, whichever is larger). Bracket: at x = max_k (m_k + s_k u) every component's CDF is
    >= Phi(u), so F_mix >= Phi(u); at min_k (m_k + s_k u) every one is <= Phi(u): the root lies
    between. The comparison is made in log space on the tail u lies in (log F vs log Phi(u) for
    u < 0, log(1 - F) vs log Phi(-u) otherwise), so extreme u keep their precision."""
    return _bisect(u, F.log_softmax(logits, -1), mean, soft_clamp(log_scale), tol, max_iter)


def _bisect(u, log_w, mean, log_scale, tol: float, max_iter: int = 200):
    """mixture_inverse on normalised log-weights and final log-scales."""
    ends = mean + torch.exp(log_scale) * u[..., None]
    lo, hi = ends.min(-1).values, ends.max(-1).values
    lower = u < 0
    target = torch.where(lower, torch.special.log_ndtr(u), torch.special.log_ndtr(-u))
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        log_cdf, log_sf, _ = _mixture_logs(mid, log_w, mean, log_scale)
        left_of_root = torch.where(lower, log_cdf < target, log_sf > target)
        lo, hi = torch.where(left_of_root, mid, lo), torch.where(left_of_root, hi, mid)
        mid_new = 0.5 * (lo + hi)
        if bool(((hi - lo) <= tol * (1 + mid_new.abs())).all()) or bool((mid_new == mid).all()):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- d-D Mixture-Rosenblatt
def component_log_density(x, mean, log_std):
    """log N(x_j; mu_kj, sigma_kj) for every component k and dim j: x [..., d] -> [..., K, d]."""
    zc = (x[..., None, :] - mean) * torch.exp(-log_std)
    return log_normal(zc) - log_std


def rosenblatt_weights(log_pi, comp_logp):
    """Per-dim mixture weights w_ik ∝ pi_k prod_{j<i} N(x_j; mu_kj, sigma_kj): log_pi [..., K],
    comp_logp [..., K, d] -> log weights [..., d, K]."""
    prefix = torch.cumsum(comp_logp, -1) - comp_logp  # exclusive: dims j < i
    return F.log_softmax(log_pi[..., None] + prefix, -2).transpose(-1, -2)


def rosenblatt_forward(x, log_pi, mean, log_std):
    """x [..., d]; log_pi [..., K] (normalised); mean, log_std [K, d] (the codebook, not clamped
    here) -> u [..., d], log|J| [..., d] whose sum over d is log p_mix(x) - log N(u; 0, I)."""
    log_w = rosenblatt_weights(log_pi, component_log_density(x, mean, log_std))
    log_cdf, log_sf, log_pdf = _mixture_logs(x, log_w, mean.t(), log_std.t())
    u = torch.where(log_cdf <= log_sf, ndtri_log(log_cdf.clamp(max=_LOG_HALF)),
                    -ndtri_log(log_sf.clamp(max=_LOG_HALF)))
    return u, log_pdf - log_normal(u)


@torch.no_grad()
def rosenblatt_inverse(u, log_pi, mean, log_std, tol: float = 1e-6):
    """Sequential over dims: dim i's weights need the already inverted dims < i."""
    x = torch.zeros_like(u)
    for i in range(u.shape[-1]):
        log_w = rosenblatt_weights(log_pi, component_log_density(x, mean, log_std))[..., i, :]
        x[..., i] = _bisect(u[..., i], log_w, mean[:, i], log_std[:, i], tol)
    return x


# ----------------------------------------------------------------------------- MADE
class MADE(nn.Module):
    """Coupling parameters for the n dims of a token (or patch) h, given a context c, such that
    dim i's parameters depend on c and h_<i only (Germain et al. 2015): one hidden layer whose
    units carry degrees 0..n-2; input j feeds unit k iff j <= deg(k); unit k feeds output i iff
    deg(k) < i; the context feeds the hidden layer and every output unmasked.
    forward(h [..., n], c [..., D]) -> [..., n, per_dim]."""

    def __init__(self, n: int, context_dim: int, hidden: int, per_dim: int):
        super().__init__()
        self.n, self.per_dim = n, per_dim
        self.inp = nn.Linear(n, hidden, bias=False)
        self.ctx = nn.Linear(context_dim, hidden)
        self.out = nn.Linear(hidden, n * per_dim)
        self.ctx_out = nn.Linear(context_dim, n * per_dim)
        self.register_buffer("mask_in", torch.empty(hidden, n), persistent=False)
        self.register_buffer("mask_out", torch.empty(n * per_dim, hidden), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.mask_in.is_meta:
            return
        hidden = self.mask_in.shape[0]
        deg = torch.arange(hidden) % max(1, self.n - 1)
        dims = torch.arange(self.n)
        self.mask_in.copy_((dims[None, :] <= deg[:, None]).float())
        out_deg = dims.repeat_interleave(self.per_dim)
        self.mask_out.copy_((deg[None, :] < out_deg[:, None]).float())

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a = F.linear(h, self.inp.weight * self.mask_in) + self.ctx(c)
        y = F.linear(F.silu(a), self.out.weight * self.mask_out, self.out.bias) + self.ctx_out(c)
        return y.view(*y.shape[:-1], self.n, self.per_dim)
