"""Cola DLM: Text VAE + block-causal DiT prior (arXiv 2605.06548).

Stage 1 (VAE pretraining):  L = recon + beta * KL(q || N(0, I)) + lambda_mask * L_mask
Stage 2 (joint):            L = lambda_VAE (recon + beta * E_q log q + lambda_mask * L_mask)
                                + lambda_FM * L_FM + lambda_ref * KL(q_phi || q_phi_ref)
with the reference encoder q_phi_ref a frozen copy of the stage-1 encoder. In stage 2 the
latent normalisation (shift, scale) is frozen at its stage-1 value so the prior's target
does not drift with batch statistics.
"""
from __future__ import annotations

import copy
from dataclasses import asdict

import torch

from lflm_dist.config import ConfigError, ModelConfig
from lflm_dist.models import cola_bound
from lflm_dist.models.blocks import ffn_hidden, sample_token, transformer_flops
from lflm_dist.models.dit import BlockCausalDiT
from lflm_dist.models.family import Bound, BoundSettings, EvalLayout, ModelFamily, TPPlan, check_tp_nets
from lflm_dist.models.noise import Noise
from lflm_dist.models.text_vae import TextEncoder, TextVAE, gaussian_kl


class ColaDLM(ModelFamily):
    family = "cola"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stage = cfg.cola.stage
        self.vae = TextVAE(cfg.vae, cfg.vocab_size)
        self.dit = BlockCausalDiT(cfg.dit, cfg.vae.latent_dim, cfg.vocab_size) if self.stage == 2 else None
        self.ref_encoder: TextEncoder | None = None
        if self.stage == 2:
            # stage1: frozen at the stage-1 values (loaded with its weights) so the prior's target does
            # not drift; track: estimated during this run; identity: shift 0, scale 1
            self.vae.track_latent_stats = cfg.cola.latent_stats == "track"
            if cfg.cola.lambda_ref > 0:
                self.ref_encoder = copy.deepcopy(self.vae.encoder).requires_grad_(False)

    # the frozen reference encoder starts as a copy of the encoder (lflm_dist.models.init)
    init_aliases = {"ref_encoder.": "vae.encoder."}

    def pretrained_weights(self) -> tuple[str, dict[str, str]] | None:
        """Stage 2 starts from the stage-1 VAE (weights and latent statistics), and the frozen
        reference encoder q_phi_ref is the stage-1 encoder: (checkpoint, {prefix: source prefix})."""
        if self.stage != 2 or not self.cfg.cola.ref_checkpoint:
            return None
        return self.cfg.cola.ref_checkpoint, {"vae.": "vae.", "ref_encoder.": "vae.encoder."}

    def describe(self) -> str:
        return f"stage={self.stage}"

    @classmethod
    def validate_config(cls, cfg) -> None:
        m, c = cfg.model, cfg.model.cola
        if c.stage not in (1, 2):
            raise ConfigError(f"model.cola.stage must be one of [1, 2], got {c.stage!r}")
        for key in ("lambda_denoised_ce", "lambda_token_ce"):
            if getattr(c, key) < 0:
                raise ConfigError(f"model.cola.{key} must be >= 0, got {getattr(c, key)}")
        for key, value in (("model.vae.block_size", m.vae.block_size), ("model.dit.block_size", m.dit.block_size)):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if m.seq_len % m.vae.block_size:
            raise ConfigError(f"model.seq_len ({m.seq_len}) must be a multiple of "
                              f"model.vae.block_size ({m.vae.block_size})")
        if m.seq_len % m.dit.block_size:
            raise ConfigError(f"model.seq_len ({m.seq_len}) must be a multiple of "
                              f"model.dit.block_size ({m.dit.block_size})")
        if m.dit.block_size % m.vae.block_size:
            raise ConfigError(f"model.dit.block_size ({m.dit.block_size}) must be a multiple of "
                              f"model.vae.block_size ({m.vae.block_size}) so a generated latent "
                              "block decodes on its own")
        if c.latent_stats not in ("stage1", "track", "identity"):
            raise ConfigError(f"model.cola.latent_stats must be one of ['stage1', 'track', 'identity'], "
                              f"got {c.latent_stats!r}")
        if c.stage == 2 and c.lambda_ref > 0 and not c.ref_checkpoint:
            raise ConfigError("model.cola.ref_checkpoint is required in stage 2 when model.cola.lambda_ref > 0 "
                              "(point it at a stage-1 run dir), or set model.cola.lambda_ref=0")
        if c.stage == 2 and c.latent_stats == "stage1" and not c.ref_checkpoint:
            raise ConfigError("model.cola.ref_checkpoint is required in stage 2 with model.cola.latent_stats=stage1: "
                              "the stage-1 run's latent statistics normalise the prior's input. Point it at a "
                              "stage-1 run dir, or set model.cola.latent_stats=track (estimate them during this run) "
                              "or identity (shift 0, scale 1)")
        check_tp_nets(cfg, [("model.vae.encoder", m.vae.encoder), ("model.vae.decoder", m.vae.decoder)]
                      + ([("model.dit.net", m.dit.net)] if c.stage == 2 else []))

    def loss(self, batch) -> dict[str, torch.Tensor]:
        tokens = batch["input_ids"]
        noise = Noise.for_batch(batch, tokens)
        c = self.cfg.cola
        if self.stage == 1:
            terms, *_ = self.vae(tokens, noise, prior_term="kl")
            loss = terms["recon"] + self.cfg.vae.beta * terms["kl"]
        else:
            terms, mean, logvar, z, enc_in = self.vae(tokens, noise, prior_term="neg_entropy")
            loss = c.lambda_vae * (terms["recon"] + self.cfg.vae.beta * terms["neg_entropy"])
            zn = self.vae.normalize(z)
            fm = self.dit.flow_matching_loss(zn, noise, denoised=c.lambda_denoised_ce > 0, tokens=tokens)
            if self.dit.tokens is not None and self.training:  # the mixture's token means: unmasked inputs only
                self.dit.tokens.accumulate(zn, tokens, keep=enc_in == tokens)
            terms["fm"] = fm["fm"]
            loss = loss + c.lambda_fm * terms["fm"]
            if c.lambda_denoised_ce > 0:
                terms["denoised_ce"] = self._denoised_ce(fm["z0_hat"], tokens, fm["scored"])
                loss = loss + c.lambda_denoised_ce * terms["denoised_ce"]
            if "token_ce" in fm:
                terms["token_ce"] = fm["token_ce"]
                loss = loss + c.lambda_token_ce * terms["token_ce"]
            if self.ref_encoder is not None:
                self.ref_encoder.eval()
                with torch.no_grad():
                    ref_mean, ref_logvar = self.ref_encoder(enc_in)  # same (masked) input as q_phi
                terms["kl_ref"] = gaussian_kl(mean, logvar, ref_mean, ref_logvar).mean()
                loss = loss + c.lambda_ref * terms["kl_ref"]
        if "mask_ce" in terms:
            loss = loss + (c.lambda_vae if self.stage == 2 else 1.0) * self.cfg.vae.mask_weight * terms["mask_ce"]
        terms["loss"] = loss
        return terms

    def _denoised_ce(self, z0_hat: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
        """Token CE of the decoder reading the DiT's clean estimates (every block at its own t, the
        history too): a classification loss on the prior, which the flow-matching MSE is not. Its
        gradient reaches the decoder as well. Mean over all positions (given prompt parts add 0)."""
        logits = self.vae.decoder(self.vae.denormalize(z0_hat))
        ce = self.vae.token_ce(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
        if scored is not None:
            ce = ce * scored.reshape(-1)
        return ce.sum() / ce.numel()

    # ------------------------------------------------------------------ likelihood
    def eval_layout(self) -> EvalLayout:
        return EvalLayout(window=self.cfg.seq_len, block=self.cfg.dit.block_size)

    def likelihood_kind(self, settings: BoundSettings) -> str:
        """elbo_bound: an unbiased estimate of -ELBO, an upper bound on NLL (Hutchinson's trace is
        unbiased and enters linearly); iwae_bound: k > 1 with the exact trace (or stage 1's closed-form
        prior); iwae_estimate: k > 1 with Hutchinson (the log-mean-exp of noisy log-densities is biased
        low, so not a bound). Stage-2 figures carry the ODE solver's discretisation error."""
        if settings.iwae_k == 1:
            return "elbo_bound"
        return "iwae_bound" if settings.trace == "exact" or self.dit is None else "iwae_estimate"

    def nll_bound(self, tokens: torch.Tensor, settings: BoundSettings | None = None,
                  generator: torch.Generator | None = None, noise: dict | None = None) -> Bound:
        s = settings or BoundSettings()
        t = cola_bound.cola_bound_terms(self, tokens, k=s.iwae_k, settings=s, generator=generator, noise=noise)
        terms = {"recon": t["recon"].mean(1), "neg_entropy": -t["entropy"], "neg_log_prior": t["prior_ce"],
                 "neg_log_prior_normalised": -t["log_pzn"].mean(1), "neg_log_jacobian": -t["log_jac"],
                 "neg_elbo": t["neg_elbo"]}
        if s.iwae_k > 1:
            terms["iwae"] = t["iwae"]
        if "kl_analytic" in t:
            terms["kl_analytic"] = t["kl_analytic"]
        return Bound(nll=t["iwae"] if s.iwae_k > 1 else t["neg_elbo"], kind=self.likelihood_kind(s), terms=terms,
                     nfe=int(t["nfe"]))

    def estimator_info(self, settings: BoundSettings) -> dict:
        return {**asdict(settings), "ode_t0": 0.0, "ode_t1": 1.0, "base": "N(0, I) at t=1",
                "prior": "stage-2 DiT CNF" if self.dit is not None else "N(0, I)"}

    def bound_noise(self, length: int, settings: BoundSettings, generator: torch.Generator) -> dict:
        """Posterior noise and Hutchinson probes of a window; a prefix's share of them gives the
        prefix's terms exactly (encoder, decoder and DiT are block-causal, and fixed-step solvers
        integrate each block on its own)."""
        return cola_bound.draw_noise((settings.iwae_k, length, self.cfg.vae.latent_dim), settings, generator)

    def prefix_noise(self, noise: dict | None, n: int) -> dict | None:
        return None if noise is None else cola_bound.prefix_noise(noise, n)

    @torch.no_grad()
    def posterior_means(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token latent means, normalised as the prior sees them."""
        return self.vae.normalize(self.vae.encoder(tokens)[0]).reshape(-1, self.cfg.vae.latent_dim)

    # ------------------------------------------------------------------ parallel layer and export
    def tp_plan(self) -> TPPlan:
        """Both encoders (the frozen reference too), the decoder and the DiT; the VAE's token-CE and
        argmax hooks become vocab-parallel. to_latent / from_latent stay replicated."""
        plan = TPPlan(vocab_ce=[self.vae])
        for enc in [self.vae.encoder] + ([self.ref_encoder] if self.ref_encoder is not None else []):
            plan += enc.tp_plan()
        plan += self.vae.decoder.tp_plan()
        if self.dit is not None:
            plan += self.dit.tp_plan()
        return plan

    def activation_stacks(self) -> list[tuple]:
        L, v = self.cfg.seq_len, self.cfg.vae
        second_decoder = [(v.decoder, L, False)] if self.dit is not None and self.cfg.cola.lambda_denoised_ce > 0 else []
        return ([(v.encoder, L, False), (v.decoder, L, False)] + second_decoder
                + ([(self.cfg.dit.net, 2 * L, True)] if self.dit else []))

    def vocab_logits(self) -> int:
        """The decoder's, its second pass (lambda_denoised_ce) and the DiT's token mixture."""
        if self.dit is None:
            return 1
        return 1 + int(self.cfg.cola.lambda_denoised_ce > 0) + int(self.cfg.dit.token_mixture)

    def export_parts(self) -> dict[str, str]:
        """The VAE and the DiT; the frozen reference encoder is a training aid, not exported."""
        return {"vae": "vae.", **({"dit": "dit."} if self.dit is not None else {})}

    # ------------------------------------------------------------------ generation
    def sampling_unavailable(self) -> str | None:
        if self.dit is None:
            return ("a stage-1 Cola run (VAE only) has no prior to sample from: train stage 2 from it "
                    "(model.cola.stage=2, e.g. configs/cola_tiny.yaml)")
        return None

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], max_new_tokens: int, *, steps: int = 8, guidance: float = 1.0,
               churn: float = 0.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, pad_id: int = 0,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """Block-wise generation. The prompts are encoded (shorter ones left-padded with `pad_id`,
        the EOS/document separator, to the longest); their whole DiT blocks go into the DiT's and the
        decoder's KV caches. A prompt ending inside a block continues inside it when the model was
        trained with dit.prompt_in_block_prob (its last r latents are given, the block's rest is
        sampled); otherwise it is left-padded to whole blocks. Then, per block: integrate the prior
        with `steps` Euler steps (guidance w; churn: `dit.flow_step`), decode the block with the
        decoder's KV cache, sample its tokens, and append its clean latent to the DiT's KV cache."""
        if self.dit is None:
            raise RuntimeError(self.sampling_unavailable())
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        bs = self.cfg.dit.block_size
        n = max(len(p) for p in prompts)
        if self.cfg.dit.prompt_in_block_prob <= 0:  # never saw a block start clean: pad to whole blocks
            n = max(bs, -(-n // bs) * bs)
        B = len(prompts)
        dit_cache, dec_cache = self.dit.net.new_cache(), self.vae.decoder.net.new_cache()
        full, prefix, prefix_tokens = n // bs * bs, None, None
        if n:
            toks = torch.tensor([[pad_id] * (n - len(p)) + list(p) for p in prompts], device=device)
            mean, _ = self.vae.encoder(toks)
            if full:
                self.dit.extend_history(dit_cache, self.vae.normalize(mean[:, :full]), 0, toks[:, :full])
                self.vae.decoder(mean[:, :full], cache=dec_cache)  # decoder history = the prompt's latents
            if n > full:
                prefix, prefix_tokens = self.vae.normalize(mean[:, full:]), toks[:, full:]
        out = [[] for _ in range(B)]
        pos = full
        while len(out[0]) < max_new_tokens:
            zn = self.dit.sample_block(dit_cache, pos, B, steps, guidance, generator, device, prefix=prefix,
                                       prefix_tokens=prefix_tokens, churn=churn)
            logits = self.vae.decoder(self.vae.denormalize(zn), cache=dec_cache)
            new = sample_token(logits, temperature, top_k, top_p, generator)
            r = 0 if prefix is None else prefix.shape[1]  # the prompt's own tokens are not output
            if r:
                new[:, :r] = prefix_tokens
            for i in range(B):
                out[i].extend(new[i, r:].tolist())
            self.dit.extend_history(dit_cache, zn, pos, new)
            pos, prefix, prefix_tokens = pos + bs, None, None
        self.train(was_training)
        return [o[:max_new_tokens] for o in out]

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """Greedy decode of the posterior mean: what stage 1 can show without a prior."""
        mean, _ = self.vae.encoder(tokens)
        return self.vae.decoder(mean).argmax(-1)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: VAE encoder + decoder on L tokens, the DiT on the 2L-long
        [clean | noisy] layout (so twice its per-position cost per token; adaLN once per DiT
        block, or once per distinct t when t is per position: the expectation over block sizes) less what its last block skips for the clean half (attention of its queries, the
        output projection and the MLP: only the noisy half's velocity is read), and the frozen
        reference encoder's forward pass (a third of its training cost), and the decoder's second
        pass when lambda_denoised_ce > 0, and the token mixture's head (dit.token_mixture) on the
        noisy half."""
        L = self.cfg.seq_len
        v = self.cfg.vae
        total = transformer_flops(v.encoder, L / 2).train + transformer_flops(v.decoder, L / 2).train
        total += 6.0 * v.decoder.dim * self.cfg.vocab_size  # output head
        if self.dit is not None:
            d = self.cfg.dit.net
            per_position_t = self.cfg.dit.random_block_size or self.cfg.dit.prompt_in_block_prob > 0
            group = self.cfg.dit.block_size
            if per_position_t:  # adaLN once per distinct t: L / bs noisy blocks per sample, one t = 0 for the clean half
                sizes = self.dit.block_sizes() if self.cfg.dit.random_block_size else [group]
                group = 2 / (sum(1 / b for b in sizes) / len(sizes))
            total += 2 * transformer_flops(d, L / 2, adaln_group=group).train
            total -= 6.0 * (d.dim * d.dim + 3 * d.dim * ffn_hidden(d)) + 6.0 * 2 * d.dim * L / 2
        if self.ref_encoder is not None:
            total += transformer_flops(v.encoder, L / 2).train / 3
        if self.dit is not None and self.cfg.cola.lambda_denoised_ce > 0:  # a second decoder pass
            total += transformer_flops(v.decoder, L / 2).train + 6.0 * v.decoder.dim * self.cfg.vocab_size
        if self.dit is not None and self.cfg.dit.token_mixture:  # logits head + 2 matmuls with the token means
            total += 6.0 * self.cfg.vocab_size * (self.cfg.dit.net.dim + 2 * v.latent_dim)
        return total
