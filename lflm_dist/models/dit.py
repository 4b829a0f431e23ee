"""Block-causal DiT prior over (normalised) VAE latents, trained with rectified flow.

Flow-matching convention (Cola DLM community script): z_t = (1 - t) z0 + t eps, t = 1 is
noise, the network predicts the velocity v = eps - z0, and t ~ sigmoid(loc + scale N(0,1))
(logit-normal). Sampling integrates dz/dt = v from t = 1 to t = 0 with Euler steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lflm_dist.config import DiTConfig
from lflm_dist.models.family import COL_GATHER, EMBED, TPPlan, col, row
from lflm_dist.models.init import zero_init
from lflm_dist.models.noise import Noise
from lflm_dist.models.blocks import AttnMask, LayerCache, TimestepEmbedder, Transformer, conditioning, modulate


class TokenMixtureHead(nn.Module):
    """The velocity of a Gaussian mixture with one component per token (dit.token_mixture).

    A latent is close to a fixed embedding of its own token (docs/cola_ablation.md: 98.5% of a
    posterior mean's variance), so model z0 | history as sum_k p(k | history) N(mu_k, diag s2).
    Under z_t = (1 - t) z0 + t eps the posterior over k given z_t is
    p(k | z_t, h) ∝ p(k | h) N(z_t; (1 - t) mu_k, var_t), var_t = (1 - t)^2 s2 + t^2, and the exact
    velocity E[eps - z0 | z_t, h] is, per component, a_t (z_t - (1 - t) mu_k) - mu_k with
    a_t = (t - (1 - t) s2) / var_t (finite at t = 0 and 1), so v = a_t z_t - (1 + (1 - t) a_t) m
    with m = sum_k p(k | z_t, h) mu_k. The network gives the logits of p(k | z_t, h) less the
    analytic log N term, i.e. what the history says about the token (an AR model's job at t = 1),
    trained by a token cross-entropy (CDCD's score interpolation, here with the exact Gaussian
    denoiser per token); the usual velocity head adds a residual for what is not per-token.

    mu_k and s2 are running statistics of the latents the DiT is trained on, not parameters
    (learned by gradient they hardly moved from their initial values in 800 steps): per token, the
    mean of its normalised latents over about its last `window` occurrences; per dim, an EMA of the
    squared residual z0 - mu_token. Like the VAE's latent shift/scale they are summed over a step's
    micro-batches and data-parallel ranks and applied once per optimizer step (update_statistics),
    so every rank holds those of a one-process run."""

    window = 1000  # occurrences a token's mean averages over (a running mean until then)
    momentum = 0.99  # EMA of the residual variance, per optimizer step

    def __init__(self, dim: int, latent_dim: int, vocab_size: int):
        super().__init__()
        self.logits = zero_init(nn.Linear(dim, vocab_size))  # uniform over tokens at the start
        self.register_buffer("means", torch.zeros(vocab_size, latent_dim))  # mu_k, normalised latent units
        self.register_buffer("counts", torch.zeros(vocab_size))  # occurrences behind mu_k, capped at window
        self.register_buffer("var", torch.ones(latent_dim))  # s2
        self._sums: torch.Tensor | None = None
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """No token seen: mu = 0, s2 = 1 (the mixture is N(0, I), as normalised latents are)."""
        if not self.means.is_meta:
            self.means.zero_()
            self.counts.zero_()
            self.var.fill_(1.0)

    @torch.no_grad()
    def accumulate(self, z0: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add a micro-batch's latents [B, L, C] and their tokens [B, L] (where `keep` [B, L], if
        given) to this step's sums."""
        V, C = self.means.shape
        z, tok = z0.detach().double().reshape(-1, C), tokens.reshape(-1)
        if keep is not None:
            z, tok = z[keep.reshape(-1)], tok[keep.reshape(-1)]
        per_token = torch.zeros(V, C + 1, dtype=torch.float64, device=z.device)
        per_token.index_add_(0, tok, torch.cat([z, torch.ones_like(z[:, :1])], 1))
        resid = (z - self.means[tok].double()).pow(2).sum(0)
        sums = torch.cat([per_token.flatten(), resid, z.new_tensor([z.shape[0]])])
        self._sums = sums if self._sums is None else self._sums + sums

    @torch.no_grad()
    def update_statistics(self, all_reduce_sum=None) -> None:
        if self._sums is None:
            return
        sums, self._sums = self._sums, None
        if all_reduce_sum is not None:
            all_reduce_sum(sums)
        V, C = self.means.shape
        per_token, resid, n = sums[:V * (C + 1)].view(V, C + 1), sums[V * (C + 1):-1], sums[-1]
        n_k = per_token[:, C]
        batch_mean = per_token[:, :C] / n_k.clamp_min(1)[:, None]
        w = (n_k / (self.counts.double() + n_k).clamp_min(1))[:, None]  # 0 for tokens not in the step
        self.means.copy_((self.means.double() + w * (batch_mean - self.means.double())).to(self.means.dtype))
        self.counts.copy_((self.counts + n_k.to(self.counts.dtype)).clamp_max(self.window))
        self.var.mul_(self.momentum).add_((1 - self.momentum) * (resid / n).clamp_min(1e-4).to(self.var.dtype))

    def forward(self, h: torch.Tensor, x: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None = None):
        """h [B, T, D] modulated hidden state, x = z_t [B, T, C], t per position [B, T] ->
        (velocity [B, T, C], logits of p(k | z_t, h) [B, T, V], fp32). With targets [B, T] (the
        latents' tokens): (velocity, the cross-entropy of p(k | z_t, h) at the targets [B, T]), the
        softmax, its mean and the CE fused (mixture_mean_and_ce: one vocabulary-wide pass each way)."""
        net = self.logits(h).float()  # a bf16 Linear under autocast, like any LM head
        # The analytic term is ~w (z_t . mu_k), w ~ 1 / s2: hundreds of nats near t = 0, told apart
        # by differences of a few, so it and the mean m run in fp32 whatever autocast says (a bf16
        # matmul rounded it by up to ~3 nats). Both of its products are one addmm into the logits
        # (one vocabulary-wide pass instead of three).
        with torch.autocast(x.device.type, enabled=False):
            x, t, mu, s2 = x.float(), t.float()[..., None], self.means.float(), self.var.float()
            var_t = (1 - t) ** 2 * s2 + t ** 2
            w = (1 - t) / var_t  # log N(z_t; (1 - t) mu_k, var_t) = w.(z_t mu_k - (1 - t) mu_k^2 / 2) + const(k)
            feats = torch.cat([x * w, -0.5 * (1 - t) * w], -1)
            logits = torch.addmm(net.flatten(0, -2), feats.flatten(0, -2), torch.cat([mu, mu * mu], 1).T)
            logits = logits.view(net.shape)
            if targets is None:
                m, out = logits.softmax(-1) @ mu, logits
            else:
                m, out = mixture_mean_and_ce(logits, mu, targets)
            a = (t - (1 - t) * s2) / var_t
            return a * x - (1 + (1 - t) * a) * m, out


class _MixtureMeanAndCE(torch.autograd.Function):
    """(m, ce) = (softmax(l) @ mu, -log_softmax(l)[y]) for logits l [N, V], means mu [V, C], targets y [N].
    Unfused, autograd keeps a softmax and a log-softmax of l and runs a backward for each, plus
    the CE's zero-filled one-hot gradient and the sum of the two gradients: six vocabulary-wide
    passes. Here the softmax p is computed once (as exp of the log-softmax the CE reads) and
    dL/dl = p * (g_m mu^T - <g_m, m> + g_ce) - g_ce e_y  (d(p @ mu)/dl = diag(p) - p p^T, and
    <p, g_m mu^T> = <g_m, p @ mu> = <g_m, m>): one matmul of width C + 1 writes the bracket, then
    one in-place product and the one-hot scatter."""

    @staticmethod
    def forward(ctx, logits, mu, targets):
        p = torch.log_softmax(logits, -1)
        ce = -p.gather(-1, targets[:, None]).squeeze(-1)
        p = p.exp_()
        m = p @ mu
        ctx.save_for_backward(p, mu, targets, m)
        return m, ce

    @staticmethod
    def backward(ctx, g_m, g_ce):
        p, mu, targets, m = ctx.saved_tensors
        shift = g_ce - torch.linalg.vecdot(g_m, m)  # [N]: one dot of width C per row
        grad = torch.cat([g_m, shift[:, None]], 1) @ torch.cat([mu, torch.ones_like(mu[:, :1])], 1).T
        grad = grad.mul_(p).scatter_add_(-1, targets[:, None], -g_ce[:, None])
        return grad, (p.T @ g_m if ctx.needs_input_grad[1] else None), None


def mixture_mean_and_ce(logits: torch.Tensor, mu: torch.Tensor, targets: torch.Tensor):
    """logits [..., V], mu [V, C], targets [...] -> (softmax(logits) @ mu [..., C], the cross-entropy
    at the targets [...]); fused forward and backward (_MixtureMeanAndCE)."""
    m, ce = _MixtureMeanAndCE.apply(logits.reshape(-1, logits.shape[-1]), mu, targets.reshape(-1))
    return m.view(*logits.shape[:-1], mu.shape[1]), ce.view(targets.shape)


def flow_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, churn: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of the linear path x_t = (1 - t) x0 + t eps from t to s < t with velocity
    v = eps - x0. churn = 0: Euler, x + (s - t) v (the ODE; = (1-s) x0_hat + s eps_hat with
    x0_hat = x - t v, eps_hat = x + (1 - t) v). churn = rho > 0: the noise estimate is partly
    re-drawn, x_s = (1-s) x0_hat + s (sqrt(1 - rho^2) eps_hat + rho xi), xi ~ N(0, I) (DDIM's
    eta, Song et al. 2021, on this path): the same marginals when x0_hat and eps_hat are
    right, and a sample that depends less on its starting noise and more on its history, so
    continuations of different prompts under one seed share fewer tokens."""
    if not 0.0 <= churn <= 1.0:
        raise ValueError(f"churn must be in [0, 1] (0 = the deterministic ODE), got {churn}")
    if churn == 0.0 or s == 0.0:
        return x + (s - t) * v
    x0, eps = x - t * v, x + (1 - t) * v
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (1 - s) * x0 + s * ((1 - churn ** 2) ** 0.5 * eps + churn * xi)


class BlockCausalDiT(nn.Module):
    def __init__(self, cfg: DiTConfig, latent_dim: int, vocab_size: int = 0):
        super().__init__()
        self.cfg, self.latent_dim = cfg, latent_dim
        self.dedup_t = True  # False: adaLN per position when t is per position (the reference in tests)
        d = cfg.net.dim
        self.inp = nn.Linear(latent_dim, d)
        self.t_embed = TimestepEmbedder(d)
        self.net = Transformer(cfg.net, adaln=True)
        # adaLN-Zero: the prior starts as the zero velocity field (plus the mixture's, if any).
        self.final_mod = zero_init(nn.Linear(d, 2 * d))
        self.out = zero_init(nn.Linear(d, latent_dim))
        if cfg.token_mixture and vocab_size <= 0:
            raise ValueError("dit.token_mixture needs the vocabulary size")
        self.tokens = TokenMixtureHead(d, latent_dim, vocab_size) if cfg.token_mixture else None
        if cfg.history_tokens and vocab_size <= 0:
            raise ValueError("dit.history_tokens needs the vocabulary size")
        # the clean history's tokens (dit.history_tokens); vocab-parallel under TP
        self.tok_embed = nn.Embedding(vocab_size, d) if cfg.history_tokens else None

    def tp_plan(self) -> TPPlan:
        """The blocks' split, Megatron's MLP split for the timestep MLP (one all-reduce), and
        final_mod gathered (its shift / scale multiply the full hidden state). inp / out stay
        replicated: latent_dim wide, ~17·D parameters each (35k at D = 2048); sharding them would
        add a collective to every forward for nothing measurable. tok_embed (dit.history_tokens) is
        vocab-parallel like the VAE's table: vocab x D is 0.2B parameters at cola_2b size."""
        plan = self.net.tp_plan()
        plan.layers += [col(self.t_embed.mlp, "0"), row(self.t_embed.mlp, "2"), col(self, "final_mod", COL_GATHER)]
        if self.tok_embed is not None:
            plan.layers.append(col(self, "tok_embed", EMBED))
        if self.tokens is not None:  # the mixture's softmax needs every token's logit
            plan.layers.append(col(self.tokens, "logits", COL_GATHER))
        return plan

    def forward(self, x, t, positions, mask, cache: list[LayerCache] | None = None, commit: bool = True,
                keep_from: int = 0, targets: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        """x [B, T, C] latents -> velocity [B, T, C]. t is the time of each DiT block, [B, T/bs]
        (T a multiple of the block size), or of each position, [B, T]: the conditioning is
        embedded, and the adaLN modulations computed, once per entry of t. With keep_from (a
        multiple of the block size), only the velocity of positions keep_from.. is computed.
        targets [B, T - keep_from] (dit.token_mixture): (velocity, the token mixture's cross-entropy at
        these tokens [B, T - keep_from]). tokens [B, T]
        (dit.history_tokens): the token of each clean position, -1 where none is known (noisy)."""
        idx = None
        if self.dedup_t and t.shape[1] == x.shape[1] > 1 and self.cfg.block_size > 1:
            # t per position (random block sizes, prompts inside blocks): positions of one block share
            # their t, so the embedding and each layer's 6·D² adaLN run once per distinct t (~1/5 of
            # the positions at the release's block sizes) and are looked up per position
            t, idx = torch.unique(t, return_inverse=True)
            # padded to a power of two (rows never looked up): the table's size would otherwise
            # change every step, and under torch.compile a dynamic size made Inductor (torch 2.11,
            # CUDA) generate a wrong reduction (bench/results/train_mfu_2b_h200.json); with few
            # sizes each compiles statically (lflm_dist.parallel.fsdp.apply_compile)
            t = torch.cat([t, t[-1:].expand((1 << (t.numel() - 1).bit_length()) - t.numel())])
        c = self.t_embed(t)
        h = self.inp(x)
        if self.tok_embed is not None and tokens is not None:
            known = (tokens >= 0)[..., None]
            h = h + self.tok_embed(tokens.clamp_min(0)).to(h.dtype) * known
        h = self.net(h, positions, mask, cond=c, cache=cache, commit=commit, keep_from=keep_from, cond_index=idx)
        if idx is not None:
            idx = idx[:, keep_from:]
        else:
            c = c[:, keep_from * c.shape[1] // x.shape[1]:]
        shift, scale = conditioning(self.final_mod, c, idx).chunk(2, dim=-1)
        h = modulate(h, shift, scale)
        v = self.out(h)
        if self.tokens is None:
            if targets is not None:
                raise ValueError("targets (a token cross-entropy) needs dit.token_mixture")
            return v
        t_pos = t[idx] if idx is not None else t.repeat_interleave(x.shape[1] // t.shape[1], dim=1)[:, keep_from:]
        v_mix, ce = self.tokens(h, x[:, keep_from:], t_pos, targets)
        v = v.float() + v_mix  # fp32, as the mixture computes it (under autocast the head's residual is bf16)
        return v if targets is None else (v, ce)

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

    def flow_matching_loss(self, z0: torch.Tensor, noise: Noise, denoised: bool = False,
                           tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Clean-history + noisy-block layout: run `[sg(z0) | z_t]` (length 2L) once under
        `clean_noisy_mask`; noisy block b has its own t and sees clean blocks < b. The loss
        "fm" (MSE to eps - z0) is on the noisy half. With probability cfg_drop_prob a sequence
        loses its clean history, which trains the unconditional velocity for guidance. Given
        (clean) positions of the release's recipe add 0 to the loss, whose denominator stays
        B*L*C, so it is a per-sample sum and equal however a batch is split. With `denoised`,
        also "z0_hat" [B, L, C] and "scored" (positions [B, L], or None for all): the network's
        clean estimate z0_hat = z_t - t v (z_t = (1 - t) z0 + t eps and v = eps - z0). With
        dit.token_mixture, "token_ce": the cross-entropy of p(k | z_t, history) against the
        latents' tokens [B, L], a per-sample mean over the noisy positions like "fm"."""
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
        tok_in = None
        if self.tok_embed is not None:
            if tokens is None:
                raise ValueError("dit.history_tokens: flow_matching_loss needs the latents' tokens")
            unknown = torch.full_like(tokens, -1)  # a given prompt part's tokens are known, the rest not
            tok_in = torch.cat([tokens, unknown if given is None else torch.where(given, tokens, unknown)], 1)
        if self.tokens is not None and tokens is None:
            raise ValueError("dit.token_mixture: flow_matching_loss needs the latents' tokens")
        out = self(x, tt, pos, mask, keep_from=L, targets=tokens if self.tokens is not None else None,
                   tokens=tok_in)  # clean half: never read
        v, ce = out if self.tokens is not None else (out, None)
        err = (v.float() - (eps - z0).float()).pow(2)
        if given is not None:
            err = err * (~given)[..., None]
        res = {"fm": err.sum() / err.numel()}
        if ce is not None:
            if given is not None:
                ce = ce * ~given
            res["token_ce"] = ce.sum() / ce.numel()
        if denoised:
            res["z0_hat"] = zt - t[..., None].to(v.dtype) * v
            res["scored"] = None if given is None else ~given
        return res

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
                     prefix: torch.Tensor | None = None, prefix_tokens: torch.Tensor | None = None,
                     churn: float = 0.0) -> torch.Tensor:
        """Integrate one block of latents from noise (t=1) to data (t=0) given the clean
        history in `cache` (positions < start). Guidance: v = v_u + w (v_c - v_u), where the
        unconditional velocity sees no history (off when there is none). `prefix` [B, r, C]:
        the block's first r latents are given (a prompt ending inside the block; models trained
        with prompt_in_block_prob): they stay clean at t = 0 and the rest is integrated;
        `prefix_tokens` [B, r] are their tokens (dit.history_tokens). `churn`: see `flow_step`."""
        bs = self.cfg.block_size
        r = 0 if prefix is None else prefix.shape[1]
        pos = torch.arange(start, start + bs, device=device)
        x = torch.randn(batch, bs, self.latent_dim, generator=generator, device=device, dtype=dtype)
        if r:
            x[:, :r] = prefix.to(dtype)
        has_hist = cache is not None and len(cache[0]) > 0  # the block sees all its history: no mask
        tok = None
        if r and prefix_tokens is not None:
            tok = torch.full((batch, bs), -1, dtype=torch.long, device=device)
            tok[:, :r] = prefix_tokens
        ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
        for i in range(steps):
            t = torch.full((batch, 1), float(ts[i]), device=device)  # one DiT block
            if r:  # per position: the given part is clean
                t = torch.cat([torch.zeros(batch, r, device=device), t.expand(batch, bs - r)], 1)
            v = self(x, t, pos, None, cache=cache if has_hist else None, commit=False, tokens=tok)
            if has_hist and guidance != 1.0:
                v_u = self(x, t, pos, None, tokens=tok)
                v = v_u + guidance * (v - v_u)
            if r:
                v[:, :r] = 0
            x = flow_step(x, v, float(ts[i]), float(ts[i + 1]), churn, generator)
            if r and churn:  # the given part stays clean (Euler leaves it: v = 0 there)
                x[:, :r] = prefix.to(dtype)
        return x

    @torch.no_grad()
    def extend_history(self, cache: list[LayerCache], z0_block: torch.Tensor, start: int,
                       tokens: torch.Tensor | None = None) -> None:
        """Append a clean block (t = 0) to the KV cache, as the clean half sees it in training;
        `tokens` [B, T] its tokens (required with dit.history_tokens)."""
        if self.tok_embed is not None and tokens is None:
            raise ValueError("dit.history_tokens: the clean history's tokens are needed beside its latents")
        T = z0_block.shape[1]
        pos = torch.arange(start, start + T, device=z0_block.device)
        mask = AttnMask("block_causal", start + T, self.cfg.block_size, q_start=start)
        t = torch.zeros(z0_block.shape[0], T // self.cfg.block_size, device=z0_block.device)
        self(z0_block, t, pos, mask, cache=cache, commit=True, tokens=tokens)

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def history_velocity(self, z0: torch.Tensor, tokens: torch.Tensor | None = None):
        """Velocity field of every noisy block at once, each conditioned on its clean history
        (and its tokens [B, L] with dit.history_tokens).

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
        self.extend_history(cache, z0, 0, tokens)
        mask = AttnMask("clean_noisy", L, bs, q_start=L)
        pos = torch.arange(L, device=z0.device)

        def velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
            tt = (t.reshape(-1, 1) if t.dim() else t.reshape(1, 1)).expand(x.shape[0], L // bs)
            return self(x, tt, pos, mask, cache=cache, commit=False)

        return velocity
