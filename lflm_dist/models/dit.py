"""Block-causal DiT prior over (normalised) VAE latents, trained with rectified flow.

Flow-matching convention (Cola DLM community script): z_t = (1 - t) z0 + t eps, t = 1 is
noise, the network predicts the velocity v = eps - z0, and t ~ sigmoid(loc + scale N(0,1))
(logit-normal). Sampling integrates dz/dt = v from t = 1 to t = 0 with Euler steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lflm_dist.config import DiTConfig
from lflm_dist.models.init import zero_init
from lflm_dist.models.noise import Noise
from lflm_dist.models.blocks import AttnMask, LayerCache, TimestepEmbedder, Transformer, modulate


class BlockCausalDiT(nn.Module):
    def __init__(self, cfg: DiTConfig, latent_dim: int):
        super().__init__()
        self.cfg, self.latent_dim = cfg, latent_dim
        d = cfg.net.dim
        self.inp = nn.Linear(latent_dim, d)
        self.t_embed = TimestepEmbedder(d)
        self.net = Transformer(cfg.net, adaln=True)
        # adaLN-Zero: the prior starts as the zero velocity field.
        self.final_mod = zero_init(nn.Linear(d, 2 * d))
        self.out = zero_init(nn.Linear(d, latent_dim))

    def _head(self, h, c):
        shift, scale = self.final_mod(F.silu(c)).chunk(2, dim=-1)
        return self.out(modulate(h, shift, scale))

    def forward(self, x, t, positions, mask, cache: list[LayerCache] | None = None, commit: bool = True,
                keep_from: int = 0):
        """x [B, T, C] latents -> velocity [B, T, C]. t is the time of each DiT block, [B, T/bs]
        (T a multiple of the block size), or of each position, [B, T]: the conditioning is
        embedded, and the adaLN modulations computed, once per entry of t. With keep_from (a
        multiple of the block size), only the velocity of positions keep_from.. is computed."""
        c = self.t_embed(t)
        h = self.net(self.inp(x), positions, mask, cond=c, cache=cache, commit=commit, keep_from=keep_from)
        return self._head(h, c[:, keep_from * c.shape[1] // x.shape[1]:])

    # ------------------------------------------------------------------ training
    def flow_matching_loss(self, z0: torch.Tensor, noise: Noise) -> torch.Tensor:
        """Clean-history + noisy-block layout: run `[sg(z0) | z_t]` (length 2L) once under
        `clean_noisy_mask`; noisy block b has its own t and sees clean blocks < b. The loss
        (MSE to eps - z0) is on the noisy half. With probability cfg_drop_prob a sequence
        loses its clean history, which trains the unconditional velocity for guidance."""
        B, L, C = z0.shape
        bs = self.cfg.block_size
        t_block = torch.sigmoid(self.cfg.t_loc + self.cfg.t_scale * noise.normal((B, L // bs)))
        t = t_block.repeat_interleave(bs, dim=1)  # [B, L]
        eps = noise.normal(z0.shape).to(z0.dtype)
        zt = (1 - t[..., None]) * z0 + t[..., None] * eps
        x = torch.cat([z0.detach(), zt], dim=1)
        tt = torch.cat([torch.zeros_like(t_block), t_block], dim=1)  # per block: [B, 2L/bs]
        drop = None
        if self.training and self.cfg.cfg_drop_prob > 0:
            drop = noise.uniform((B,)) < self.cfg.cfg_drop_prob
        mask = AttnMask("clean_noisy", L, bs, drop_history=drop)
        pos = torch.arange(L, device=z0.device).repeat(2)  # noisy block b sits at clean block b's positions
        v = self(x, tt, pos, mask, keep_from=L)  # the clean half's outputs are never read
        return (v.float() - (eps - z0).float()).pow(2).mean()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_block(self, cache: list[LayerCache] | None, start: int, batch: int, steps: int,
                     guidance: float = 1.0, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Integrate one block of latents from noise (t=1) to data (t=0) given the clean
        history in `cache` (positions < start). Guidance: v = v_u + w (v_c - v_u), where the
        unconditional velocity sees no history (off when there is none)."""
        bs = self.cfg.block_size
        pos = torch.arange(start, start + bs, device=device)
        x = torch.randn(batch, bs, self.latent_dim, generator=generator, device=device, dtype=dtype)
        has_hist = cache is not None and len(cache[0]) > 0  # the block sees all its history: no mask
        ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
        for i in range(steps):
            t = torch.full((batch, 1), float(ts[i]), device=device)  # one DiT block
            v = self(x, t, pos, None, cache=cache if has_hist else None, commit=False)
            if has_hist and guidance != 1.0:
                v_u = self(x, t, pos, None)
                v = v_u + guidance * (v - v_u)
            x = x + (ts[i + 1] - ts[i]) * v
        return x

    @torch.no_grad()
    def extend_history(self, cache: list[LayerCache], z0_block: torch.Tensor, start: int) -> None:
        """Append a clean block (t = 0) to the KV cache, as the clean half sees it in training."""
        T = z0_block.shape[1]
        pos = torch.arange(start, start + T, device=z0_block.device)
        mask = AttnMask("block_causal", start + T, self.cfg.block_size, q_start=start)
        t = torch.zeros(z0_block.shape[0], T // self.cfg.block_size, device=z0_block.device)
        self(z0_block, t, pos, mask, cache=cache, commit=True)

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def history_velocity(self, z0: torch.Tensor):
        """Velocity field of every noisy block at once, each conditioned on its clean history.

        The clean latents `z0` [B, L, C] go into a KV cache once (exactly as `extend_history`
        appends them at sampling time, t = 0, block-causal); the returned `velocity(x, t)` then
        runs the noisy blocks x [B, L, C] at time t (a scalar or [B]) as queries over
        `[cached clean | x]` with the bottom half of `clean_noisy_mask`: noisy block b sees clean
        blocks < b and itself, the visible set of training and of `sample_block`. Noisy blocks
        never see each other, so the Jacobian dv/dx is block diagonal and the divergence of the
        joint field is the sum of the per-block divergences: one ODE over all blocks gives
        sum_b log p(z_b | z_<b). Gradients flow to x only (the cache is constant)."""
        B, L, _ = z0.shape
        bs = self.cfg.block_size
        if L % bs:
            raise ValueError(f"latent length {L} is not a multiple of the DiT block size {bs}")
        cache = self.net.new_cache()
        self.extend_history(cache, z0, 0)
        mask = AttnMask("clean_noisy", L, bs, q_start=L)
        pos = torch.arange(L, device=z0.device)

        def velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
            tt = (t.reshape(-1, 1) if t.dim() else t.reshape(1, 1)).expand(x.shape[0], L // bs)
            return self(x, tt, pos, mask, cache=cache, commit=False)

        return velocity
