"""The terms of Cola DLM's likelihood bound.

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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lflm_dist.models.cnf import LOG_2PI, cnf_log_density, draw_probes
from lflm_dist.models.family import BoundSettings
from lflm_dist.models.text_vae import gaussian_entropy, gaussian_kl_std_normal


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
        velocity = model.dit.history_velocity(zn, tokens.repeat_interleave(k, 0))
        log_pzn, info = cnf_log_density(velocity, zn, generator=generator, **s.ode_kwargs(),
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
