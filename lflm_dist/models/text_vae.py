"""Cola DLM Text VAE: tokens -> block-causal encoder -> per-token Gaussian latent ->
block-causal decoder -> token logits.

Block-causal means the latent of block b depends only on tokens of blocks <= b, and the
decoder reconstructs block b from latents of blocks <= b, so text can be generated block by
block while each block is decoded in parallel.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lflm_dist.config import VAEConfig
from lflm_dist.models.blocks import AttnMask, LayerCache, Transformer
from lflm_dist.models.family import EMBED, HEAD, TPPlan, col
from lflm_dist.models.noise import Noise


class TextEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig, vocab_size: int):
        super().__init__()
        self.block_size, self.min_std = cfg.block_size, cfg.min_std
        # One extra row: the [MASK] embedding of the BERT-style masked-token loss.
        self.embed = nn.Embedding(vocab_size + 1, cfg.encoder.dim)
        self.net = Transformer(cfg.encoder)
        self.to_latent = nn.Linear(cfg.encoder.dim, 2 * cfg.latent_dim)

    def tp_plan(self) -> TPPlan:
        """Vocab-parallel embedding (its [MASK] row makes the table vocab + 1: padded to a multiple
        of tp, the padding never looked up) and the blocks' split; to_latent stays replicated
        (2·latent_dim outputs)."""
        plan = self.net.tp_plan()
        plan.layers.insert(0, col(self, "embed", EMBED))
        return plan

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] -> (mean, logvar) each [B, L, latent_dim]."""
        T = tokens.shape[1]
        pos = torch.arange(T, device=tokens.device)
        h = self.net(self.embed(tokens), pos, AttnMask("block_causal", T, self.block_size))
        mean, logvar = self.to_latent(h).chunk(2, dim=-1)
        logvar = logvar.clamp(-20.0, 10.0)
        if self.min_std > 0:  # var = min_std^2 + exp(logvar): a smooth floor, gradients everywhere
            logvar = torch.logaddexp(logvar, torch.full_like(logvar, 2 * math.log(self.min_std)))
        return mean, logvar


class TextDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig, vocab_size: int):
        super().__init__()
        self.block_size = cfg.block_size
        self.from_latent = nn.Linear(cfg.latent_dim, cfg.decoder.dim)
        self.net = Transformer(cfg.decoder)
        self.head = nn.Linear(cfg.decoder.dim, vocab_size, bias=False)

    def tp_plan(self) -> TPPlan:
        plan = self.net.tp_plan()
        plan.layers.append(col(self, "head", HEAD))  # vocab-parallel head: logits never gathered
        return plan

    def forward(self, z: torch.Tensor, cache: list[LayerCache] | None = None) -> torch.Tensor:
        """z [B, T, C] -> logits [B, T, V]. With a cache, z continues the cached blocks."""
        T = z.shape[1]
        start = 0 if cache is None else len(cache[0])
        pos = torch.arange(start, start + T, device=z.device)
        mask = AttnMask("block_causal", start + T, self.block_size, q_start=start)
        return self.head(self.net(self.from_latent(z), pos, mask, cache=cache))


def gaussian_kl_std_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over the latent dim."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_kl(mean, logvar, ref_mean, ref_logvar):
    """KL(N(mean, var) || N(ref_mean, ref_var)) for diagonal Gaussians, summed over dims."""
    return 0.5 * (ref_logvar - logvar + (logvar.exp() + (mean - ref_mean).pow(2)) / ref_logvar.exp() - 1.0).sum(-1)


def gaussian_entropy(logvar):
    """Entropy of a diagonal Gaussian, summed over dims: 0.5 * sum(log(2*pi*e*var))."""
    return 0.5 * (logvar + math.log(2 * math.pi * math.e)).sum(-1)


class TextVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.encoder = TextEncoder(cfg, vocab_size)
        self.decoder = TextDecoder(cfg, vocab_size)
        # Running latent statistics; the prior sees (z - shift) * scale (Cola DLM release),
        # so the DiT works on roughly unit-variance latents whatever the VAE's scale.
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_dim))
        self.register_buffer("latent_scale", torch.ones(cfg.latent_dim))
        self.track_latent_stats = True
        self._stat_sums: torch.Tensor | None = None  # this step's [sum, sum of squares, count] of latent means
        self.reset_buffers()
        self.token_ce, self.token_argmax = F.cross_entropy, torch.argmax  # vocab-parallel under TP (lflm_dist.parallel)

    def reset_buffers(self) -> None:
        """Identity normalisation until statistics are tracked (lflm_dist.models.init.materialize)."""
        if not self.latent_shift.is_meta:
            self.latent_shift.zero_()
            self.latent_scale.fill_(1.0)

    def mask_tokens(self, tokens, noise: Noise):
        """BERT-style corruption of the encoder input; returns (corrupted, masked positions)."""
        masked = noise.uniform(tokens.shape) < self.cfg.mask_prob
        return tokens.masked_fill(masked, self.vocab_size), masked

    @torch.no_grad()
    def accumulate_latent_stats(self, mean: torch.Tensor) -> None:
        """Add a micro-batch's latent means to this step's sums (applied by update_statistics)."""
        flat = mean.detach().double().reshape(-1, mean.shape[-1])
        sums = torch.cat([flat.sum(0), flat.pow(2).sum(0), flat.new_tensor([flat.shape[0]])])
        self._stat_sums = sums if self._stat_sums is None else self._stat_sums + sums

    @torch.no_grad()
    def update_statistics(self, all_reduce_sum=None) -> None:
        """Once per optimizer step (the trainer calls it through its engine): one EMA update of the
        latent shift/scale from the step's whole global batch, its sums added over micro-batches
        here and over data-parallel ranks by `all_reduce_sum`. Every rank therefore holds the
        same statistics, equal to those of a one-process run at the same global batch."""
        if self._stat_sums is None:
            return
        sums, self._stat_sums = self._stat_sums, None
        if all_reduce_sum is not None:
            all_reduce_sum(sums)
        C = self.cfg.latent_dim
        n = sums[-1]
        mean = sums[:C] / n
        var = (sums[C:2 * C] / n - mean.pow(2)).clamp_min(0) * n / (n - 1).clamp_min(1)  # unbiased, as torch.std
        m = self.cfg.latent_stats_momentum
        self.latent_shift.mul_(m).add_((1 - m) * mean.to(self.latent_shift.dtype))
        self.latent_scale.mul_(m).add_((1 - m) / var.sqrt().clamp_min(1e-4).to(self.latent_scale.dtype))

    def normalize(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalize(self, zn):
        return zn / self.latent_scale + self.latent_shift

    def forward(self, tokens: torch.Tensor, noise: Noise, prior_term: str = "kl"):
        """Returns (terms, mean, logvar, z, encoder input). `prior_term` "kl" gives KL to N(0, I) (stage 1);
        "neg_entropy" gives E_q log q = -H(q) (stage 2, where the DiT is the prior)."""
        enc_in, masked = (self.mask_tokens(tokens, noise) if self.training and self.cfg.mask_prob > 0
                          else (tokens, None))
        mean, logvar = self.encoder(enc_in)
        z = mean + noise.normal(mean.shape).to(mean.dtype) * (0.5 * logvar).exp()
        logits = self.decoder(z)
        ce = self.token_ce(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
        terms = {"recon": ce.mean()}
        if prior_term == "kl":
            terms["kl"] = gaussian_kl_std_normal(mean, logvar).mean()
        else:
            terms["neg_entropy"] = -gaussian_entropy(logvar).mean()
        if masked is not None:
            # Normalised by the expected (not the drawn) number of masked tokens, so the term is a
            # per-sample sum and the loss is the same however a batch is split over ranks.
            terms["mask_ce"] = (ce * masked.reshape(-1)).sum() / (self.cfg.mask_prob * ce.numel())
        with torch.no_grad():
            terms["recon_acc"] = (self.token_argmax(logits, dim=-1) == tokens).float().mean()
        if self.training and self.track_latent_stats:
            self.accumulate_latent_stats(mean)
        return terms, mean, logvar, z, enc_in
