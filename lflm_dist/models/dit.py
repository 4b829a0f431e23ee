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
from lflm_dist.models.family import COL_GATHER, TPPlan, col, row
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

    def tp_plan(self) -> TPPlan:
        """The blocks' split, Megatron's MLP split for the timestep MLP (one all-reduce), and
        final_mod gathered (its shift / scale multiply the full hidden state). inp / out stay
        replicated: latent_dim wide, ~17·D parameters each (35k at D = 2048); sharding them would
        add a collective to every forward for nothing measurable."""
        plan = self.net.tp_plan()
        plan.layers += [col(self.t_embed.mlp, "0"), row(self.t_embed.mlp, "2"), col(self, "final_mod", COL_GATHER)]
        return plan

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
    def _draw_t(self, noise: Noise, shape: tuple) -> torch.Tensor:
        """Logit-normal t (a share t_uniform_frac of it uniform on (0, 1))."""
        t = torch.sigmoid(self.cfg.t_loc + self.cfg.t_scale * noise.normal(shape))
        if self.cfg.t_uniform_frac > 0:  # drawn only when used, so the default keeps its noise streams
            uniform = noise.uniform(shape) < self.cfg.t_uniform_frac
            t = torch.where(uniform, noise.uniform(shape).clamp(1e-5, 1 - 1e-5), t)
        return t

    def block_sizes(self) -> list[int]:
        """Block sizes a model trained with random_block_size has seen: powers of two up to its own."""
        bs = self.cfg.block_size
        return sorted({bs} | {1 << i for i in range(bs.bit_length()) if 1 << i <= bs})

    def flow_matching_loss(self, z0: torch.Tensor, noise: Noise, denoised: bool = False):
        """Clean-history + noisy-block layout: run `[sg(z0) | z_t]` (length 2L) once under
        `clean_noisy_mask`; noisy block b has its own t and sees clean blocks < b. The loss
        (MSE to eps - z0) is on the noisy half. With probability cfg_drop_prob a sequence
        loses its clean history, which trains the unconditional velocity for guidance. Given
        (clean) positions of the release's recipe add 0 to the loss, whose denominator stays
        B*L*C, so it is a per-sample sum and equal however a batch is split. With `denoised`,
        returns (loss, z0_hat [B, L, C], scored positions [B, L] or None for all): the network's
        clean estimate z0_hat = z_t - t v (z_t = (1 - t) z0 + t eps and v = eps - z0)."""
        B, L, C = z0.shape
        block, t, t_cond, given = self._draw_layout(noise, B, L, z0.device)
        eps = noise.normal(z0.shape).to(z0.dtype)
        zt = (1 - t[..., None]) * z0 + t[..., None] * eps
        if given is not None:
            zt = torch.where(given[..., None], z0.detach(), zt)  # a prompt is given, as the clean half is
        x = torch.cat([z0.detach(), zt], dim=1)
        tt = torch.cat([torch.zeros_like(t_cond), t_cond], dim=1)  # [B, 2 * t_cond.shape[1]]
        mask = AttnMask("clean_noisy", L, block, drop_history=self._drop_history(noise, B))
        pos = torch.arange(L, device=z0.device).repeat(2)  # noisy block b sits at clean block b's positions
        v = self(x, tt, pos, mask, keep_from=L)  # the clean half's outputs are never read
        err = (v.float() - (eps - z0).float()).pow(2)
        if given is not None:
            err = err * (~given)[..., None]
        loss = err.sum() / err.numel()
        if not denoised:
            return loss
        return loss, zt - t[..., None].to(v.dtype) * v, (None if given is None else ~given)

    def _draw_layout(self, noise: Noise, B: int, L: int, dev):
        """(block size: int or per-sample [B], t per position [B, L], the DiT's conditioning t
        (per block when every sample has the configured block size, else per position), the
        given positions [B, L] or None)."""
        bs = self.cfg.block_size
        if not (self.cfg.random_block_size or self.cfg.prompt_in_block_prob > 0):
            t_block = self._draw_t(noise, (B, L // bs))
            return bs, t_block.repeat_interleave(bs, dim=1), t_block, None
        if self.cfg.random_block_size:
            sizes = torch.tensor(self.block_sizes(), device=dev)
            blk = sizes[(noise.uniform((B,)).to(dev) * len(sizes)).long().clamp_max(len(sizes) - 1)]
            if L % int(blk.max()):
                raise ValueError(f"sequence length {L} is not a multiple of the DiT block size {int(blk.max())}")
        else:
            blk = torch.full((B,), bs, device=dev, dtype=torch.long)
        idx = torch.arange(L, device=dev)[None, :]
        t = self._draw_t(noise, (B, L)).gather(1, (idx // blk[:, None]).expand(B, L))  # one t per block
        given = torch.zeros(B, L, dtype=torch.bool, device=dev)
        if self.cfg.prompt_in_block_prob > 0:
            chosen = noise.uniform((B,)).to(dev) < self.cfg.prompt_in_block_prob
            k = 1 + (noise.uniform((B,)).to(dev) * (blk - 1)).long()  # given part of 1..size-1 positions
            given = chosen[:, None] & (blk[:, None] > 1) & (idx % blk[:, None] < k[:, None])
            t = t.masked_fill(given, 0.0)
        return (blk if self.cfg.random_block_size else bs), t, t, given

    def _drop_history(self, noise: Noise, B: int) -> torch.Tensor | None:
        if self.training and self.cfg.cfg_drop_prob > 0:
            return noise.uniform((B,)) < self.cfg.cfg_drop_prob
        return None

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_block(self, cache: list[LayerCache] | None, start: int, batch: int, steps: int,
                     guidance: float = 1.0, generator=None, device=None, dtype=torch.float32,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate one block of latents from noise (t=1) to data (t=0) given the clean
        history in `cache` (positions < start). Guidance: v = v_u + w (v_c - v_u), where the
        unconditional velocity sees no history (off when there is none). `prefix` [B, r, C]:
        the block's first r latents are given (a prompt ending inside the block; models trained
        with prompt_in_block_prob): they stay clean at t = 0 and the rest is integrated."""
        bs = self.cfg.block_size
        r = 0 if prefix is None else prefix.shape[1]
        pos = torch.arange(start, start + bs, device=device)
        x = torch.randn(batch, bs, self.latent_dim, generator=generator, device=device, dtype=dtype)
        if r:
            x[:, :r] = prefix.to(dtype)
        has_hist = cache is not None and len(cache[0]) > 0  # the block sees all its history: no mask
        ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
        for i in range(steps):
            t = torch.full((batch, 1), float(ts[i]), device=device)  # one DiT block
            if r:  # per position: the given part is clean
                t = torch.cat([torch.zeros(batch, r, device=device), t.expand(batch, bs - r)], 1)
            v = self(x, t, pos, None, cache=cache if has_hist else None, commit=False)
            if has_hist and guidance != 1.0:
                v_u = self(x, t, pos, None)
                v = v_u + guidance * (v - v_u)
            if r:
                v[:, :r] = 0
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
