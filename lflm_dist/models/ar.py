"""GPT-style causal transformer baseline, built from the same blocks as the latent models
and trained by the same loop, so comparisons are at equal parameters and FLOPs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lflm_dist.config import ModelConfig
from lflm_dist.models.blocks import AttnMask, Transformer, sample_token, transformer_flops
from lflm_dist.models.family import EMBED, HEAD, Bound, BoundSettings, EvalLayout, ModelFamily, TPPlan, check_tp_nets, col


class ARTransformer(ModelFamily):
    family = "ar"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        net = cfg.ar.net
        self.embed = nn.Embedding(cfg.vocab_size, net.dim)
        self.net = Transformer(net)
        self.head = nn.Linear(net.dim, cfg.vocab_size, bias=False)
        self.token_ce = F.cross_entropy  # vocab-parallel under TP (lflm_dist.parallel)

    def logits(self, tokens, cache=None):
        T = tokens.shape[1]
        start = 0 if cache is None else len(cache[0])
        pos = torch.arange(start, start + T, device=tokens.device)
        # one new token attends to everything cached: no mask at all
        mask = None if T == 1 and start else AttnMask("block_causal", start + T, 1, q_start=start)
        return self.head(self.net(self.embed(tokens), pos, mask, cache=cache))

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_tp_nets(cfg, [("model.ar.net", cfg.model.ar.net)])

    def loss(self, batch) -> dict[str, torch.Tensor]:
        tokens = batch["input_ids"]
        logits = self.logits(tokens[:, :-1])
        ce = self.token_ce(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return {"loss": ce, "nll": ce.detach()}

    # ------------------------------------------------------------------ likelihood
    def eval_layout(self) -> EvalLayout:
        return EvalLayout(window=self.cfg.seq_len - 1, bos=True)

    def likelihood_kind(self, settings: BoundSettings) -> str:
        return "exact"

    @torch.no_grad()
    def nll_bound(self, tokens: torch.Tensor, settings: BoundSettings | None = None,
                  generator: torch.Generator | None = None, noise: dict | None = None) -> Bound:
        """Exact NLL (nats) of tokens 1..T-1 given their prefix (token 0 is the BOS), per sequence."""
        logits = self.logits(tokens[:, :-1]).float()
        ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        return Bound(nll=ce.sum(-1), kind="exact", token_nll=ce, token_greedy=logits.argmax(-1) == tokens[:, 1:])

    # ------------------------------------------------------------------ parallel layer
    def tp_plan(self) -> TPPlan:
        plan = TPPlan(layers=[col(self, "embed", EMBED)], vocab_ce=[self])
        plan += self.net.tp_plan()
        plan.layers.append(col(self, "head", HEAD))
        return plan

    def activation_stacks(self) -> list[tuple]:
        return [(self.cfg.ar.net, self.cfg.seq_len, False)]

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, pad_id: int = 0, generator: torch.Generator | None = None,
               **_unused) -> list[list[int]]:
        """KV-cached decoding; prompts are left-padded with pad_id (the EOS separator)."""
        was_training = self.training
        self.eval()
        device = self.embed.weight.device
        n = max(1, max(len(p) for p in prompts))
        toks = torch.tensor([[pad_id] * (n - len(p)) + list(p) for p in prompts], device=device)
        cache = self.net.new_cache()
        logits = self.logits(toks, cache)[:, -1]
        out = []
        for _ in range(max_new_tokens):
            nxt = sample_token(logits, temperature, top_k, top_p, generator)
            out.append(nxt)
            logits = self.logits(nxt[:, None], cache)[:, -1]
        self.train(was_training)
        return torch.stack(out, 1).tolist()

    def flops_per_token(self) -> float:
        net = self.cfg.ar.net
        return transformer_flops(net, self.cfg.seq_len / 2).train + 6.0 * net.dim * self.cfg.vocab_size
