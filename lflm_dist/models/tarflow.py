"""TarFlowLM: language modelling in a continuous latent space with stacked transformer-based
autoregressive flows ("Flexible Language Modeling in Continuous Space with Transformer-based
Autoregressive Flows", arXiv 2507.00425; no public code).

  encoder   q(z_t | x_t = k) = N(mu_k, sigma_k^2 I): a learnable Gaussian codebook [V, d]
  decoder   p(x_t = k | z_t) ∝ N(z_t; mu_k, sigma_k^2 I): tied to the codebook (Bayes with a
            uniform class prior), so reconstruction is exact and costs one [V, d] matmul
  prior     z (patches of K tokens, [N, K d]) -> block 1 -> ... -> block L -> u ~ N(0, I):
            each block is autoregressive over positions, alternating left-to-right and
            right-to-left (a right-to-left block also reverses the dimension order: channel
            mixing between blocks); a causal transformer over the block's input h_<t gives the
            context c_t, and the coupling (models/flow_couplings.py) maps h_t -> u_t given c_t:
              affine      per dim, shift/log-scale from a MADE over the dims of h_t (dims < i)
              mix1        per dim, a 1-D Mixture-CDF of `components` Gaussians, from the MADE
              rosenblatt  (block 1 only, K = 1) a d-dim Mixture-Rosenblatt flow whose components
                          are the codebook's Gaussians and whose weights pi_t = softmax(W c_t) are
                          a next-token distribution ("Mix-d")
            log p(z) = log N(u; 0, I) + sum over blocks of log|det|; exact (no ODE, no estimator).

Loss: the negative ELBO per token, one draw z = mu_x + sigma_x * eps (keyed noise):
    -ELBO = -log p(x | z) + log q(z | x) - log p(z).
With the tied Mix-d block alone this is E_q[-log sum_k pi_k r_k(z)], r_k(z) the decoder's
posterior of class k: the AR model's -log pi_x once the codebook's Gaussians separate, which is
why Mix-d can approach an autoregressive transformer's likelihood.

Generation: u ~ N(0, temperature^2 I), each block inverted in its own direction position by position
(a KV-cached conditioner; the dims of a position one at a time, each by bisection), then the
decoder's argmax. A prompt is exact conditioning while the blocks below a given level are all
left-to-right: the prompt's latents are pushed through them and clamped as the prefix of each
such block's inverse; above the first right-to-left block it can only enter through those
clamped levels (an approximation, stated in `sample`). `edit` re-decodes a text after changing
the latents of a span, keeping the rest's base noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lflm_dist.config import ConfigError, ModelConfig, TransformerConfig
from lflm_dist.models.blocks import AttnMask, Transformer, transformer_flops
from lflm_dist.models.family import Bound, BoundSettings, EvalLayout, ModelFamily
from lflm_dist.models.flow_couplings import (MADE, _bisect, affine_forward, affine_inverse, log_normal,
                                             mixture_forward, rosenblatt_forward, rosenblatt_inverse,
                                             soft_clamp)
from lflm_dist.models.noise import Noise

COUPLINGS = ("affine", "mix1", "rosenblatt")


def fp32(x: torch.Tensor) -> torch.Tensor:
    """The couplings' precision: fp32 under bf16 autocast, fp64 kept (tests)."""
    return x if x.dtype == torch.float64 else x.float()


class GaussianCodebook(nn.Module):
    """mu [V, d] ~ N(0, 1) and log sigma [V, d] = log(init_std) at initialisation."""

    def __init__(self, vocab: int, dim: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.mean = nn.Parameter(torch.empty(vocab, dim))
        self.log_std = nn.Parameter(torch.empty(vocab, dim))

    def init_param(self, pname: str, shape, gen: torch.Generator) -> torch.Tensor:  # lflm_dist.models.init
        if pname == "mean":
            return torch.empty(shape, device="cpu").normal_(0.0, 1.0, generator=gen)
        return torch.full(shape, math.log(self.init_std), device="cpu")

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma) in fp32; log sigma soft-clamped like every coupling's log-scale."""
        return fp32(self.mean), soft_clamp(fp32(self.log_std))

    def log_density_all(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mu_k, sigma_k^2 I) for every k: z [..., d] -> [..., V], as matmuls:
        sum_j -(z_j - m_kj)^2 / (2 s_kj^2) = -(z^2 @ s^-2 - 2 z @ (m s^-2) + sum_j m_kj^2 s_kj^-2) / 2."""
        mean, log_std = self.stats()
        prec = torch.exp(-2.0 * log_std)  # [V, d]
        z = fp32(z)
        quad = (z * z) @ prec.t() - 2.0 * z @ (mean * prec).t() + (mean * mean * prec).sum(-1)
        return -0.5 * quad - log_std.sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class FlowBlock(nn.Module):
    """One autoregressive flow over a sequence of N positions of n dims: u_t = coupling(h_t; c_t),
    c_t = causal transformer over [start, h_1 .. h_{t-1}] (in the block's direction)."""

    def __init__(self, coupling: str, net: TransformerConfig, n: int, vocab: int, components: int,
                 made_hidden: int, reverse: bool):
        super().__init__()
        self.coupling, self.reverse, self.components = coupling, reverse, components
        self.start = nn.Embedding(1, net.dim)
        self.inp = nn.Linear(n, net.dim)
        self.net = Transformer(net)
        if coupling == "rosenblatt":
            self.head = nn.Linear(net.dim, vocab)
        else:
            self.made = MADE(n, net.dim, made_hidden, 2 if coupling == "affine" else 3 * components)

    def _orient(self, h: torch.Tensor) -> torch.Tensor:
        """Right-to-left blocks see positions and dims reversed (an involution)."""
        return h.flip(1).flip(-1) if self.reverse else h

    def context(self, h: torch.Tensor) -> torch.Tensor:
        """c [B, N, D]: position t sees h_<t only."""
        B, N, _ = h.shape
        x = torch.cat([self.start.weight[None].expand(B, 1, -1), self.inp(h[:, :-1].to(self.inp.weight.dtype))], 1)
        return self.net(x, torch.arange(N, device=h.device), AttnMask("block_causal", N, 1))

    def _couple(self, h, c, codebook):
        """(u, log|J|) element-wise [..., n] for h [..., n] given contexts c [..., D]."""
        if self.coupling == "rosenblatt":
            log_pi = F.log_softmax(fp32(self.head(c)), -1)
            return rosenblatt_forward(h, log_pi, *codebook.stats())
        p = fp32(self.made(h.to(self.made.inp.weight.dtype), c))
        if self.coupling == "affine":
            return affine_forward(h, p[..., 0], p[..., 1])
        M = self.components
        return mixture_forward(h, p[..., :M], p[..., M:2 * M], p[..., 2 * M:])

    def forward(self, h: torch.Tensor, codebook: GaussianCodebook) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, N, n] -> (u [B, N, n], log|det| [B])."""
        h = self._orient(fp32(h))
        u, logdet = self._couple(h, self.context(h), codebook)
        return self._orient(u), logdet.sum((1, 2))

    @torch.no_grad()
    def inverse(self, u: torch.Tensor, codebook: GaussianCodebook, given: torch.Tensor | None = None,
                tol: float = 1e-5) -> torch.Tensor:
        """h with forward(h) = u, one position at a time (KV-cached conditioner); positions
        < given.shape[1] take `given` (a left-to-right block's prefix) instead of being inverted."""
        assert given is None or not self.reverse
        u = self._orient(fp32(u))
        B, N, n = u.shape
        cache = self.net.new_cache()
        x = self.start.weight[None].expand(B, 1, -1)
        hs = []
        for t in range(N):
            c = self.net(x, torch.arange(t, t + 1, device=u.device), None, cache=cache)[:, 0]
            if given is not None and t < given.shape[1]:
                h_t = fp32(given[:, t])
            else:
                h_t = self._invert_position(u[:, t], c, codebook, tol)
            hs.append(h_t)
            x = self.inp(h_t.to(self.inp.weight.dtype))[:, None]
        return self._orient(torch.stack(hs, 1))

    def _invert_position(self, u, c, codebook, tol):
        if self.coupling == "rosenblatt":
            return rosenblatt_inverse(u, F.log_softmax(fp32(self.head(c)), -1), *codebook.stats(), tol)
        h = torch.zeros_like(u)
        M = self.components
        for i in range(u.shape[-1]):  # dim i's parameters need dims < i (the MADE's order)
            p = fp32(self.made(h.to(self.made.inp.weight.dtype), c))[:, i]
            if self.coupling == "affine":
                h[:, i] = affine_inverse(u[:, i], p[..., 0], p[..., 1])
            else:
                h[:, i] = _bisect(u[:, i], F.log_softmax(p[..., :M], -1), p[..., M:2 * M],
                                  soft_clamp(p[..., 2 * M:]), tol)
        return h


class TarFlowLM(ModelFamily):
    family = "tarflow"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, V = cfg.tarflow, cfg.vocab_size
        self.K, self.d = c.patch_size, c.latent_dim
        n = self.K * self.d
        self.codebook = GaussianCodebook(V, c.latent_dim, c.init_std)
        self.nets = [TransformerConfig(dim=c.dim, n_layers=b.n_layers, n_heads=c.n_heads, ffn_mult=c.ffn_mult)
                     for b in c.blocks]
        self.blocks = nn.ModuleList(
            FlowBlock(b.coupling, net, n, V, b.components, c.made_hidden or c.dim, reverse=i % 2 == 1)
            for i, (b, net) in enumerate(zip(c.blocks, self.nets)))
        if c.frozen_blocks:  # progressive training: earlier stages stay as trained
            self.codebook.requires_grad_(False)
            for blk in self.blocks[:c.frozen_blocks]:
                blk.requires_grad_(False)

    # ------------------------------------------------------------------ config and bookkeeping
    @classmethod
    def validate_config(cls, cfg) -> None:
        c, k = cfg.model.tarflow, "model.tarflow."
        for key in ("latent_dim", "patch_size", "dim", "n_heads"):
            if getattr(c, key) <= 0:
                raise ConfigError(f"{k}{key} must be > 0, got {getattr(c, key)}")
        if c.init_std <= 0 or c.inverse_tol <= 0:
            raise ConfigError(f"{k}init_std and {k}inverse_tol must be > 0, got {c.init_std}, {c.inverse_tol}")
        if c.dim % c.n_heads or (c.dim // c.n_heads) % 2:
            raise ConfigError(f"{k}dim ({c.dim}) must be a multiple of {k}n_heads ({c.n_heads}) with an even "
                              "head size (RoPE)")
        if cfg.model.seq_len % c.patch_size:
            raise ConfigError(f"model.seq_len ({cfg.model.seq_len}) must be a multiple of {k}patch_size "
                              f"({c.patch_size})")
        if not c.blocks:
            raise ConfigError(f"{k}blocks must list at least one flow block")
        for i, b in enumerate(c.blocks):
            if b.coupling not in COUPLINGS:
                raise ConfigError(f"{k}blocks.{i}.coupling must be one of {list(COUPLINGS)}, got {b.coupling!r}")
            if b.coupling == "rosenblatt" and i:
                raise ConfigError(f"{k}blocks.{i}.coupling=rosenblatt: only the first block (on the codebook's "
                                  "latents) can be the Mixture-Rosenblatt flow tied to the codebook")
            if b.coupling == "rosenblatt" and c.patch_size != 1:
                raise ConfigError(f"{k}blocks.0.coupling=rosenblatt needs {k}patch_size=1 (its mixture is over "
                                  f"one token's codebook), got {c.patch_size}")
            if b.n_layers <= 0 or (b.coupling == "mix1" and b.components <= 0):
                raise ConfigError(f"{k}blocks.{i}: n_layers and (mix1) components must be > 0")
        if not 0 <= c.frozen_blocks < len(c.blocks):
            raise ConfigError(f"{k}frozen_blocks must be in [0, {len(c.blocks)}) (at least one block trains), "
                              f"got {c.frozen_blocks}")
        if c.frozen_blocks and not c.init_from:
            raise ConfigError(f"{k}frozen_blocks={c.frozen_blocks} needs {k}init_from: the run dir or checkpoint "
                              "of the previous progressive stage whose codebook and first blocks are frozen")

    def pretrained_weights(self) -> tuple[str, dict[str, str]] | None:
        c = self.cfg.tarflow
        if not c.frozen_blocks:
            return None
        return c.init_from, {"codebook.": "codebook.", **{f"blocks.{i}.": f"blocks.{i}." for i in range(c.frozen_blocks)}}

    def describe(self) -> str:
        c = self.cfg.tarflow
        flows = "+".join(f"{b.coupling}({b.n_layers})" for b in c.blocks)
        return f"flows={flows} patch={c.patch_size}" + (f" frozen={c.frozen_blocks}" if c.frozen_blocks else "")

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6 x matmul parameters (2 for frozen blocks: forward only, as
        nothing below them trains), per block with n = K d and P coupling parameters per dim:
          conditioner  transformer_flops(net, N / 2).train / K + 6 n D / K   (N = seq_len / K)
          MADE         6 (n H + D H + H n P + D n P) / K;  rosenblatt head  6 D V
        plus the tied decoder's two [V, d] matmuls, 6 * 2 V d."""
        c, V = self.cfg.tarflow, self.cfg.vocab_size
        K, n, D, H = self.K, self.K * self.d, c.dim, c.made_hidden or c.dim
        N = self.cfg.seq_len // K
        total = 6.0 * 2 * V * self.d
        for i, (b, net) in enumerate(zip(c.blocks, self.nets)):
            P = 2 if b.coupling == "affine" else 3 * b.components
            heads = 6.0 * D * V if b.coupling == "rosenblatt" else 6.0 * (n * H + D * H + H * n * P + D * n * P) / K
            blk = transformer_flops(net, N / 2).train / K + 6.0 * n * D / K + heads
            total += blk / 3 if i < c.frozen_blocks else blk
        return total

    # ------------------------------------------------------------------ the ELBO
    def _patches(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(z.shape[0], z.shape[1] // self.K, self.K * self.d)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) [B] of latents z [B, T, d] (T a multiple of patch_size), exactly."""
        h, total = self._patches(fp32(z)), 0.0
        for i, blk in enumerate(self.blocks):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.cfg.tarflow.frozen_blocks):
                h, logdet = blk(h, self.codebook)
            total = total + logdet
        return total + log_normal(h).sum((1, 2))

    def _terms(self, tokens: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sequence nats [B] of one posterior draw z = mu_x + sigma_x eps (eps [B, T, d])."""
        mean, log_std = self.codebook.stats()
        ls = log_std[tokens]
        z = mean[tokens] + torch.exp(ls) * eps.to(ls.dtype)
        comp = self.codebook.log_density_all(z)  # [B, T, V]
        recon = -(comp.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(comp, -1)).sum(1)
        log_q = (log_normal(eps.to(ls.dtype)) - ls).sum((1, 2))
        return {"recon": recon, "neg_entropy": log_q, "neg_log_prior": -self.prior_log_prob(z)}

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = batch["input_ids"]
        B, T = tokens.shape
        eps = Noise.for_batch(batch, tokens).normal((B, T, self.d))
        terms = self._terms(tokens, eps)
        nelbo = sum(terms.values())
        out = {"loss": nelbo.mean() / T}
        with torch.no_grad():
            out.update({k: v.detach().mean() / T for k, v in terms.items()})
            out["sigma"] = torch.exp(self.codebook.stats()[1]).mean()
        return out

    # ------------------------------------------------------------------ likelihood
    def eval_layout(self) -> EvalLayout:
        return EvalLayout(window=self.cfg.seq_len, block=self.K)

    def likelihood_kind(self, settings: BoundSettings | None) -> str:
        return "iwae_bound" if settings is not None and settings.iwae_k > 1 else "elbo_bound"

    def estimator_info(self, settings: BoundSettings) -> dict:
        return {"iwae_k": settings.iwae_k, "draws": settings.draws,
                "prior": "stacked autoregressive flows, exact log-density (no ODE, no estimator)"}

    def bound_noise(self, length: int, settings: BoundSettings, generator: torch.Generator) -> dict:
        """Posterior noise of a window; a prefix's share gives the prefix the same latents."""
        return {"eps": torch.randn(max(1, settings.iwae_k), length, self.d, generator=generator)}

    def prefix_noise(self, noise: dict | None, n: int) -> dict | None:
        return None if noise is None else {"eps": noise["eps"][:, :n]}

    @torch.no_grad()
    def nll_bound(self, tokens: torch.Tensor, settings: BoundSettings | None = None,
                  generator: torch.Generator | None = None, noise: dict | None = None) -> Bound:
        """k = iwae_k draws (noise["eps"] [B*k, T, d], sample-major, or drawn on the CPU from
        `generator`): k = 1 the -ELBO, k > 1 the IWAE bound log k - logsumexp_j log w_j. Every term
        is exact for its draw; the figure is an upper bound in expectation."""
        s = settings or BoundSettings()
        B, T = tokens.shape
        k = max(1, s.iwae_k)
        eps = noise["eps"] if noise is not None else torch.randn(B * k, T, self.d, generator=generator)
        eps = eps.to(tokens.device).view(B, k, T, self.d)
        draws = [self._terms(tokens, eps[:, j]) for j in range(k)]
        terms = {key: torch.stack([d[key] for d in draws]).mean(0) for key in draws[0]}
        terms["neg_elbo"] = sum(terms[key] for key in ("recon", "neg_entropy", "neg_log_prior"))
        nll = terms["neg_elbo"]
        if k > 1:
            logw = torch.stack([-sum(d.values()) for d in draws])
            nll = terms["iwae"] = math.log(k) - torch.logsumexp(logw, 0)
        return Bound(nll=nll, kind=self.likelihood_kind(s), terms=terms)

    @torch.no_grad()
    def posterior_means(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codebook.stats()[0][tokens].reshape(-1, self.d)

    # ------------------------------------------------------------------ generation and editing
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Greedy tokens [B, T] of latents [B, T, d] (argmax of the tied decoder)."""
        return self.codebook.log_density_all(z).argmax(-1)

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._inference():
            return self.decode_latents(self.codebook.stats()[0][tokens])

    def _n_clamped(self) -> int:
        """Levels h^0 = z, h^1, ... whose prefix a prompt fixes: those below the first right-to-left block."""
        return next((i for i, b in enumerate(self.blocks) if b.reverse), len(self.blocks))

    def invert(self, u: torch.Tensor, prefix_z: torch.Tensor | None = None) -> torch.Tensor:
        """Base noise u [B, N, K d] -> latents z [B, T, d]. With prefix_z [B, P, d] (P a multiple of
        K): the prefix's latents are pushed through the left-to-right blocks below the first
        right-to-left one, and each of those blocks' inverses keeps its prefix (exact conditioning
        when every block is left-to-right; otherwise the prompt enters through those levels only)."""
        tol = self.cfg.tarflow.inverse_tol
        levels: list[torch.Tensor | None] = [None] * len(self.blocks)  # given prefix of each block's input
        if prefix_z is not None and prefix_z.shape[1]:
            h = self._patches(fp32(prefix_z))
            for i in range(self._n_clamped()):
                levels[i] = h
                h = self.blocks[i](h, self.codebook)[0]
        h = u
        for i in reversed(range(len(self.blocks))):
            h = self.blocks[i].inverse(h, self.codebook, levels[i], tol)
        return h.reshape(h.shape[0], -1, self.d)

    def _noise(self, shape, temperature, generator):
        g_dev = generator.device if generator is not None else torch.device("cpu")
        return (torch.randn(shape, generator=generator, device=g_dev) * temperature).to(self.codebook.mean.device)

    def sample(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
               pad_id: int = 0, generator: torch.Generator | None = None, **_unused) -> list[list[int]]:
        """u ~ N(0, temperature^2 I) inverted through the stack, prompt latents clamped (see `invert`;
        a prompt's latents are its codebook means), greedy decode; a prompt is cut to its last
        patch-aligned part within seq_len / 2 and generation runs in windows of seq_len, each
        continuing the last seq_len / 2 tokens of the one before. Output cut before the first pad_id
        (the end token). top_k / top_p do not apply (the decode is the codebook's argmax)."""
        L, K = self.cfg.seq_len, self.K
        out = []
        with self._inference():
            for p in prompts:
                ctx = list(p)[-(L // 2):]
                ctx = ctx[len(ctx) % K:]  # whole patches only
                new: list[int] = []
                while len(new) < max_new_tokens:
                    toks = torch.tensor([ctx], dtype=torch.long, device=self.codebook.mean.device)
                    z = self.invert(self._noise((1, L // K, K * self.d), temperature, generator),
                                    self.codebook.stats()[0][toks] if ctx else None)
                    gen = self.decode_latents(z)[0, len(ctx):].tolist()
                    new += gen
                    ctx = (ctx + gen)[-(L // 2):]
                    ctx = ctx[len(ctx) % K:]
                new = new[:max_new_tokens]
                out.append(new[:new.index(pad_id)] if pad_id in new else new)
        return out

    def edit(self, tokens: torch.Tensor, start: int, replacement: torch.Tensor) -> torch.Tensor:
        """Continuous-space editing: encode tokens [1, T] (codebook means), put the latents of
        `replacement` [1, R] at positions start..start+R-1, and re-decode everything after the span
        from the original text's own base noise u (computed by the forward flow), with the text up to
        the span's end clamped as a prompt. Returns tokens [1, T]."""
        with self._inference():
            mean = self.codebook.stats()[0]
            edited = tokens.clone()
            edited[:, start:start + replacement.shape[1]] = replacement
            h = self._patches(mean[tokens])  # the original text's base noise
            for blk in self.blocks:
                h = blk(h, self.codebook)[0]
            end = -(-(start + replacement.shape[1]) // self.K) * self.K
            return self.decode_latents(self.invert(h, mean[edited][:, :end]))

    # ------------------------------------------------------------------ parallel layer
    def activation_stacks(self) -> list[tuple]:
        return [(net, self.cfg.seq_len // self.K, False) for net in self.nets]
