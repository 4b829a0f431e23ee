"""LFLM, the Latent Flow Language Model: one continuous latent per sequence, evolved by a neural
ODE and decoded in parallel (the LFLM paper: Encoder, Latent Flow with Neural ODE, Parallel Decoder).

  encoder   tokens -> embedding -> BiLSTM -> attention pooling -> (mean, logvar) of q(z0|x) [B, C]
  flow      dz/dt = f_theta(z, t), an MLP of (z, time features), integrated t = 0 -> 1 (torchdiffeq)
  decoder   z1 -> `latent_tokens` prefix tokens + (sinusoidal PE(i) + W z1) at every position i ->
            bidirectional transformer -> logits of every position at once (non-autoregressive:
            position i's distribution depends on z1 and i only, never on tokens)

Loss: the -ELBO per token, with an annealed KL weight beta(step),
    -ELBO = E_q[-log p(x | z1(z0))] + KL(q(z0|x) || N(0, I)),
    loss  = mean_i CE(x_i) + beta(step) * sum_d max(KL_d, free_bits) / L,
KL_d the batch-mean KL of latent dim d. The prior is N(0, I) on z0 and the ODE is a bijection
z0 -> z1, so the flow only reparameterises the decoder's input: the KL and likelihood bounds are
taken on z0, exactly. Dividing the per-sequence KL by L puts it on the per-token nats scale of the
reconstruction, so at beta = 1 the loss is the -ELBO per token (and stays comparable across seq_len).
Every random number comes from `Noise.for_batch`, so the loss of a batch is the mean of its halves'
(world-size parity) -- except with free_bits > 0 (the clamp acts on a batch mean) and with adaptive
solvers (their step sizes follow the error of the whole batch; equal within rtol/atol).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchdiffeq import odeint, odeint_adjoint

from lflm_dist.config import ConfigError, ModelConfig
from lflm_dist.models.blocks import Transformer, sample_token, transformer_flops
from lflm_dist.models.family import Bound, BoundSettings, EvalLayout, ModelFamily, gaussian_log_prob
from lflm_dist.models.noise import Noise
from lflm_dist.models.text_vae import gaussian_kl_std_normal

# torchdiffeq solvers -> function evaluations per step (adaptive: per attempted step, nominal)
FIXED_STEP = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "explicit_adams": 1,
              "implicit_adams": 2, "fixed_adams": 1}
ADAPTIVE = {"dopri5": 6, "dopri8": 12, "bosh3": 3, "fehlberg2": 3, "adaptive_heun": 2}
BETA_SCHEDULES = ("constant", "linear", "cyclical")
TIME_FREQS = 4  # f_theta sees t, sin(k pi t), cos(k pi t) for k = 1..4: smooth in t, so few solver steps suffice


def sinusoidal_positions(n: int, dim: int, device) -> torch.Tensor:
    """Fixed absolute encoding [n, dim]: (sin, cos)(i / 10000^(2j/dim)) interleaved (Vaswani et al.)."""
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] / 10000.0 ** (
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    return torch.stack([ang.sin(), ang.cos()], -1).flatten(-2)[:, :dim]


class ODEFunc(nn.Module):
    """f_theta(t, z) = MLP([z, t, sin(k pi t), cos(k pi t)]); counts its evaluations in `nfe`.
    An nn.Module so `odeint_adjoint` finds its parameters."""

    def __init__(self, latent_dim: int, hidden: int, layers: int):
        super().__init__()
        dims = [latent_dim + 1 + 2 * TIME_FREQS] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*mods, nn.Linear(dims[-1], latent_dim))
        self.nfe = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        k = torch.arange(1, TIME_FREQS + 1, device=z.device, dtype=z.dtype) * math.pi * t.to(z.dtype)
        feats = torch.cat([t.to(z.dtype).reshape(1), k.sin(), k.cos()]).expand(z.shape[0], -1)
        return self.net(torch.cat([z, feats], -1)).to(z.dtype)  # the solver state stays fp32 under autocast


class LFLM(ModelFamily):
    family = "lflm"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, V = cfg.lflm, cfg.vocab_size
        h, d = c.encoder_hidden, c.decoder.dim
        self.embed = nn.Embedding(V, c.embed_dim)
        self.lstm = nn.LSTM(c.embed_dim, h, c.encoder_layers, batch_first=True, bidirectional=True)
        self.pool_proj, self.pool_score = nn.Linear(2 * h, 2 * h), nn.Linear(2 * h, 1)
        self.to_mean, self.to_logvar = nn.Linear(2 * h, c.latent_dim), nn.Linear(2 * h, c.latent_dim)
        self.ode = ODEFunc(c.latent_dim, c.ode_hidden, c.ode_layers)
        self.from_latent = nn.Linear(c.latent_dim, d)
        self.to_prefix = nn.Linear(c.latent_dim, c.latent_tokens * d) if c.latent_tokens else None
        self.decoder = Transformer(c.decoder)
        self.head = nn.Linear(d, V, bias=False)
        self.token_ce = F.cross_entropy
        self.register_buffer("kl_step", torch.zeros((), dtype=torch.long))  # optimizer steps, for beta(step)
        self.last_nfe = 0

    # ------------------------------------------------------------------ components
    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> (mean, logvar) of q(z0|x), fp32 [B, C]."""
        # Meta-device materialisation and FSDP2 swap the LSTM's parameter tensors without telling it:
        # rebuild its cached list of weights (`_flat_weights`), or it would run on stale tensors. Not
        # `_init_flat_weights()`: its flatten_parameters() would, on CUDA, copy the weights into a new
        # cuDNN buffer at every call and re-point the parameters' storage, which FSDP2 owns; the refs
        # are cleared so that nn.LSTM.forward does not do it either (FSDP2's own swaps go through
        # nn.LSTM.__setattr__, which updates `_flat_weights`).
        lstm = self.lstm
        lstm._flat_weights = [getattr(lstm, n, None) for n in lstm._flat_weights_names]
        lstm._flat_weight_refs = [None] * len(lstm._flat_weights)
        with warnings.catch_warnings():  # cuDNN: weights not in one flat buffer (they cannot be: FSDP owns them)
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            hs, _ = self.lstm(self.embed(tokens))
        w = self.pool_score(torch.tanh(self.pool_proj(hs))).squeeze(-1).float().softmax(-1)
        ctx = (w.to(hs.dtype)[..., None] * hs).sum(1)
        return self.to_mean(ctx).float(), self.to_logvar(ctx).float().clamp(-20.0, 10.0)

    def _solve(self, z: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        c = self.cfg.lflm
        t = torch.tensor([t0, t1], device=z.device, dtype=z.dtype)
        kw = ({"options": {"step_size": 1.0 / c.ode_steps}} if c.ode_method in FIXED_STEP
              else {"rtol": c.rtol, "atol": c.atol})
        solve = odeint_adjoint if c.adjoint and torch.is_grad_enabled() else odeint
        self.ode.nfe = 0
        out = solve(self.ode, z, t, method=c.ode_method, **kw)[-1]
        self.last_nfe = self.ode.nfe  # function evaluations of this solve (the adjoint's backward adds more)
        return out

    def flow(self, z0: torch.Tensor) -> torch.Tensor:
        """z(0) -> z(1), fp32; the evaluations spent are in `last_nfe`."""
        return self._solve(z0.float() if z0.dtype != torch.float64 else z0, 0.0, 1.0)

    def flow_inverse(self, z1: torch.Tensor) -> torch.Tensor:
        """z(1) -> z(0): the same ODE integrated backwards."""
        return self._solve(z1.float() if z1.dtype != torch.float64 else z1, 1.0, 0.0)

    def decode(self, z1: torch.Tensor, length: int) -> torch.Tensor:
        """z1 [B, C] -> logits [B, length, V] of every position in one forward. The decoder always
        runs on max(length, seq_len) positions (the layout it trains on) and returns the first
        `length`, so position i's logits depend on z1 and i only; as p(x|z) factorises over
        positions, scoring a shorter window scores the marginal of its tokens exactly."""
        B, d = z1.shape[0], self.cfg.lflm.decoder.dim
        n, P = max(length, self.cfg.seq_len), self.cfg.lflm.latent_tokens
        z = z1.to(self.from_latent.weight.dtype)
        x = self.from_latent(z)[:, None] + sinusoidal_positions(n, d, z1.device).to(self.from_latent.weight.dtype)
        if self.to_prefix is not None:
            x = torch.cat([self.to_prefix(z).view(B, P, d).to(x.dtype), x], 1)
        hid = self.decoder(x, torch.arange(P + n, device=z1.device), None)  # mask None: full attention
        return self.head(hid[:, P:P + length])

    # ------------------------------------------------------------------ training
    def reset_buffers(self) -> None:
        if not self.kl_step.is_meta:
            self.kl_step.zero_()

    @torch.no_grad()
    def update_statistics(self, all_reduce_sum=None) -> None:
        """Called once per optimizer step (the engine): count it, for beta(step)."""
        if self.training:
            self.kl_step += 1

    def beta(self) -> torch.Tensor:
        """KL weight at the current step (a tensor op: no host sync). constant: beta; linear: beta *
        min(1, step / beta_steps); cyclical (Fu et al. 2019): period beta_steps, a linear ramp over
        the first half of each period, then beta."""
        c, step = self.cfg.lflm, self.kl_step.float()
        if c.beta_schedule == "linear":
            return c.beta * (step / c.beta_steps).clamp(max=1.0)
        if c.beta_schedule == "cyclical":
            return c.beta * (2.0 * torch.remainder(step, c.beta_steps) / c.beta_steps).clamp(max=1.0)
        return torch.full_like(step, c.beta)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = batch["input_ids"]
        B, L = tokens.shape
        c = self.cfg.lflm
        noise = Noise.for_batch(batch, tokens)
        mean, logvar = self.encode(tokens)
        z0 = mean + noise.normal(mean.shape) * (0.5 * logvar).exp()
        logits = self.decode(self.flow(z0), L)
        recon = self.token_ce(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        kl_dim = (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).mean(0)  # [C], batch mean
        kl_pen = kl_dim.clamp(min=c.free_bits) if c.free_bits > 0 else kl_dim
        beta = self.beta()
        terms = {"loss": recon + beta * kl_pen.sum() / L}
        with torch.no_grad():
            kl = kl_dim.sum()
            terms.update(recon=recon.detach(), kl=kl, kl_per_token=kl / L, beta=beta,
                         recon_acc=(logits.argmax(-1) == tokens).float().mean())
            var = mean.var(0) if B > 1 else torch.zeros_like(mean[0])
            terms["active_units"] = (var > 0.01).sum().float()
            terms.update({f"kl_dim/{i:02d}": v for i, v in enumerate(kl_dim.detach())})
        return terms

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6 x matmul parameters: forward 2, backward 4), L = seq_len,
        P = latent_tokens, h = encoder_hidden, E = embed_dim, C = latent_dim, d = decoder.dim:
          LSTM     sum_layers 6 * 2 dirs * 4 gates * h * (in_l + h), in_0 = E, in_l>0 = 2h
          pooling  6 * (2h * 2h + 2h)
          decoder  transformer_flops(decoder, context=L + P).train * (L + P) / L   (prefix tokens)
          head     6 * d * V
        + per sequence, divided by L:
          latent maps  6 * 2 * 2h * C (mean, logvar) + 6 * C * d * (1 + P) (input map, prefix)
          ODE          nfe * 2 * mlp_params * 3 (forward solve + backprop through it; 4 with the
                       adjoint's extra solve), nfe = steps x evaluations per step (FIXED_STEP;
                       adaptive solvers: nominal, ADAPTIVE per step x ode_steps steps)."""
        c, L, V = self.cfg.lflm, self.cfg.seq_len, self.cfg.vocab_size
        h, C, d, P = c.encoder_hidden, c.latent_dim, c.decoder.dim, c.latent_tokens
        lstm = sum(6.0 * 2 * 4 * h * ((c.embed_dim if i == 0 else 2 * h) + h) for i in range(c.encoder_layers))
        per_token = lstm + 6.0 * (4 * h * h + 2 * h) + 6.0 * d * V
        per_token += transformer_flops(c.decoder, L + P).train * (L + P) / L
        mlp = sum(m.in_features * m.out_features for m in self.ode.modules() if isinstance(m, nn.Linear))
        nfe = c.ode_steps * {**FIXED_STEP, **ADAPTIVE}.get(c.ode_method, 1)
        per_seq = 6.0 * 2 * 2 * h * C + 6.0 * C * d * (1 + P) + nfe * 2.0 * mlp * (4 if c.adjoint else 3)
        return per_token + per_seq / L

    def describe(self) -> str:
        return f"ode={self.cfg.lflm.ode_method}"

    @classmethod
    def validate_config(cls, cfg) -> None:
        c = cfg.model.lflm
        k = "model.lflm."
        if c.ode_method not in FIXED_STEP and c.ode_method not in ADAPTIVE:
            raise ConfigError(f"{k}ode_method must be a torchdiffeq solver, one of "
                              f"{sorted(FIXED_STEP) + sorted(ADAPTIVE)}, got {c.ode_method!r}")
        if c.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"{k}beta_schedule must be one of {list(BETA_SCHEDULES)}, got {c.beta_schedule!r}")
        if c.beta_schedule != "constant" and c.beta_steps <= 0:
            raise ConfigError(f"{k}beta_steps must be > 0 with {k}beta_schedule={c.beta_schedule}, got {c.beta_steps}")
        for key in ("latent_dim", "encoder_hidden", "embed_dim", "encoder_layers", "ode_hidden", "ode_steps"):
            if getattr(c, key) <= 0:
                raise ConfigError(f"{k}{key} must be > 0, got {getattr(c, key)}")
        for key in ("latent_tokens", "free_bits", "ode_layers", "beta"):
            if getattr(c, key) < 0:
                raise ConfigError(f"{k}{key} must be >= 0, got {getattr(c, key)}")
        if c.decoder.n_heads <= 0 or c.decoder.dim % c.decoder.n_heads or (c.decoder.dim // c.decoder.n_heads) % 2:
            raise ConfigError(f"{k}decoder.dim ({c.decoder.dim}) must be a multiple of {k}decoder.n_heads "
                              f"({c.decoder.n_heads}) with an even head size (RoPE)")

    # ------------------------------------------------------------------ likelihood
    def eval_layout(self) -> EvalLayout:
        return EvalLayout(window=self.cfg.seq_len)

    def likelihood_kind(self, settings: BoundSettings | None) -> str:
        return "iwae_bound" if settings is not None and settings.iwae_k > 1 else "elbo_bound"

    def estimator_info(self, settings: BoundSettings) -> dict:
        c = self.cfg.lflm
        return {"iwae_k": settings.iwae_k, "draws": settings.draws, "ode_method": c.ode_method,
                "ode_steps": c.ode_steps, "prior": "N(0, I) on z(0); the ODE is a bijection"}

    @torch.no_grad()
    def nll_bound(self, tokens: torch.Tensor, settings: BoundSettings | None = None,
                  generator: torch.Generator | None = None, noise: dict | None = None) -> Bound:
        """k = iwae_k draws z0 = mean + std * eps (eps from noise["eps"] [B*k, C], sample-major, or
        drawn on the CPU from `generator`). k = 1: recon + analytic KL (the -ELBO); k > 1: the IWAE
        bound -logmeanexp_j [log p(x|z1(z0_j)) + log N(z0_j; 0, I) - log q(z0_j|x)]."""
        s = settings or BoundSettings()
        B, T = tokens.shape
        k = max(1, s.iwae_k)
        mean, logvar = self.encode(tokens)
        C = mean.shape[1]
        eps = noise["eps"] if noise is not None else torch.randn(B * k, C, generator=generator)
        eps = eps.to(mean.device, mean.dtype).view(B, k, C)
        recon, logw, nfe = [], [], 0
        for j in range(k):
            z0 = mean + (0.5 * logvar).exp() * eps[:, j]
            logits = self.decode(self.flow(z0), T).float()
            nfe += self.last_nfe
            rj = self.token_ce(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
            recon.append(rj.view(B, T).sum(-1))
            log_q = gaussian_log_prob(eps[:, j]) - 0.5 * logvar.sum(-1)
            logw.append(-recon[-1] + gaussian_log_prob(z0) - log_q)
        kl = gaussian_kl_std_normal(mean, logvar)
        terms = {"recon": torch.stack(recon).mean(0), "kl": kl}
        terms["neg_elbo"] = terms["recon"] + kl
        nll = terms["neg_elbo"]
        if k > 1:
            nll = terms["iwae"] = math.log(k) - torch.logsumexp(torch.stack(logw), 0)
        return Bound(nll=nll, kind=self.likelihood_kind(s), terms=terms, nfe=nfe)

    # ------------------------------------------------------------------ generation and latent tools
    def _prior(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        dev = self.head.weight.device
        g_dev = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(n, self.cfg.lflm.latent_dim, generator=generator, device=g_dev).to(dev)

    def sample(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, pad_id: int = 0, generator: torch.Generator | None = None,
               prompt_candidates: int = 64, **_unused) -> list[list[int]]:
        """z0 ~ N(0, I) -> flow -> decode every position -> sample_token. A prompt of n tokens
        conditions by sampling importance resampling: `prompt_candidates` z0 from the prior, one
        picked with probability ∝ p(prompt at positions 0..n-1 | z1); the output is positions
        n..n+max_new_tokens-1 (within seq_len), cut before the first `pad_id` (the end token)."""
        L = self.cfg.seq_len
        with self._inference():
            z0, starts = [], []
            for p in prompts:
                p = list(p)[-(L // 2):] if len(p) >= L else list(p)
                starts.append(len(p))
                if not p:
                    z0.append(self._prior(1, generator))
                    continue
                cand = self._prior(prompt_candidates, generator)
                target = torch.tensor(p, device=cand.device)
                score = torch.cat([-self.token_ce(self.decode(self.flow(zc), len(p)).float().transpose(1, 2),
                                                  target.expand(zc.shape[0], -1), reduction="none").sum(-1)
                                   for zc in cand.split(16)])
                probs = score.softmax(0).to(generator.device if generator is not None else "cpu")
                z0.append(cand[int(torch.multinomial(probs, 1, generator=generator))][None])
            logits = self.decode(self.flow(torch.cat(z0)), L)
            if generator is not None:
                logits = logits.to(generator.device)
            toks = sample_token(logits, temperature, top_k, top_p, generator).tolist()
        out = []
        for row, n in zip(toks, starts):
            row = row[n:n + max_new_tokens]
            out.append(row[:row.index(pad_id)] if pad_id in row else row)
        return out

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """Greedy decode [B, T] of the flowed posterior mean."""
        return self.decode_latent(self.encode_mean(tokens), tokens.shape[1])

    def encode_mean(self, tokens: torch.Tensor) -> torch.Tensor:
        """Posterior mean of z0 [B, C]."""
        with self._inference():
            return self.encode(tokens)[0]

    def posterior_means(self, tokens: torch.Tensor) -> torch.Tensor:
        """One row [B, C] per text: LFLM has one latent per sequence."""
        return self.encode_mean(tokens)

    def decode_latent(self, z0: torch.Tensor, length: int | None = None, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """z0 [B, C] -> token ids [B, length] (flow, decode; temperature 0: argmax)."""
        with self._inference():
            logits = self.decode(self.flow(z0), length or self.cfg.seq_len)
            return sample_token(logits, temperature, top_k, top_p, generator)

    def interpolate(self, tokens_a: torch.Tensor, tokens_b: torch.Tensor, n_points: int = 5,
                    spherical: bool = True) -> list[list[int]]:
        """Greedy decodes of n_points latents from mean(a) to mean(b), endpoints included; spherical
        (slerp) by default, linear when the means are (anti)parallel or spherical=False."""
        a, b = self.encode_mean(tokens_a)[0], self.encode_mean(tokens_b)[0]
        t = torch.linspace(0, 1, n_points, device=a.device)[:, None]
        omega = torch.arccos((F.normalize(a, dim=0) @ F.normalize(b, dim=0)).clamp(-1, 1))
        if spherical and 1e-4 < float(omega) < math.pi - 1e-4:
            z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
            z[0], z[-1] = a, b
        else:
            z = (1 - t) * a + t * b
        return self.decode_latent(z, tokens_a.shape[1]).tolist()

    def latent_arithmetic(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> list[list[int]]:
        """Greedy decode of mean(a) - mean(b) + mean(c), each [B, T] (one output per row)."""
        z = self.encode_mean(a) - self.encode_mean(b) + self.encode_mean(c)
        return self.decode_latent(z, a.shape[1]).tolist()

    # ------------------------------------------------------------------ parallel layer
    def shard_units(self) -> list[nn.Module]:
        return [self.lstm, *self.decoder.layers]

    def activation_stacks(self) -> list[tuple]:
        return [(self.cfg.lflm.decoder, self.cfg.seq_len + self.cfg.lflm.latent_tokens, False)]
