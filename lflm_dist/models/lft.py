"""Latent Flow Transformer (LFT, Wu et al. 2025): a pretrained causal LM (the teacher, frozen)
with its decoder layers [m, n) replaced by one flow layer (lflm_dist.models.lft_layers.FlowLayer)
that transports the hidden state entering layer m (x0) to the one leaving layer n-1 (x1).

Training pairs are computed by the teacher on the fly from the project's token shards (each
batch: one teacher forward through layers 0..n-1 without autograd). Objectives:

  flow matching   x_t = (1 - t) x0 + t x1, t ~ U(0, 1) (a share t0_frac at t = 0);
                  L_FM = |v(x_t, t) - (x1 - x0)|^2
  Flow Walking    k - 1 random sorted times 0 < t_1 < ... < t_{k-1} < 1 per sample; x0 carried
                  to t = 1 by the learned field (one midpoint or Euler step per interval);
                  L_FW = |x_hat(1) - x1|^2 + alpha L_FM   (the paper's distillation objective: it
                  trains the map the student runs, and the random times keep it a flow)

Both squared errors are normalised by the block's update energy |x1 - x0|^2 (an NMSE), so the loss
is on the same scale for any teacher and a batch's loss is the mean of its halves'. `lft.loss_norm`
says over what: `sequence` (the sum over a sequence's tokens by its update energy), `token`
(each token's error by its own update energy, then the mean over tokens) or `both` (their mean).
In Llama-family teachers the first token carries a massive activation (SmolLM2: state norm
~23,000 against ~330 elsewhere) and where a block builds it (layers 9-11 of SmolLM2) it holds 98%
of the block's update energy, so per sequence the loss is nearly all that one token; per token
every position counts alike (the next layer's RMSNorm reads each token's direction, not its size)
but the massive token, the later layers' attention sink, weighs 1/T; `both` trains each.

With `lft.kl_weight` > 0 the loss adds a distillation term in the quantity the student is judged
by: KL(teacher || student) of the next-token distributions, the teacher's layers n.. and head run
on x1 (no autograd) and on the student's x1_hat (the walk's end for Flow Walking, the one-step
extrapolation x_t + (1 - t) v for flow matching), at `lft.kl_tokens` random positions per sequence
(the head is vocabulary-wide; the layers above the block run on every position). The NMSE weighs
every direction of the residual stream alike; the layers above the block do not.

The student is the teacher with the block swapped for the flow layer run `steps` times; it is a
causal LM, so its NLL is exact (`nll_bound`), and it works with `transformers`' `generate`
inside `student()`. The teacher's weights come from `lft.teacher` (an HF model dir) through the
trainer's pretrained-weights hook; the flow layer starts as a copy of teacher layer `init_layer`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from lflm_dist.config import ConfigError, ModelConfig
from lflm_dist.models.blocks import sample_token
from lflm_dist.models.family import Bound, BoundSettings, EvalLayout, ModelFamily
from lflm_dist.models.lft_layers import (BlockCapture, FlowLayer, InjectState, StopForward, decoder_layers,
                                        layers_replaced, next_token_kl)
from lflm_dist.models.noise import Noise

OBJECTIVES = ("flow_matching", "flow_walking")
SOLVERS = {"euler": 1, "midpoint": 2}  # velocity evaluations per step
LOSS_NORMS = ("sequence", "token", "both")


def teacher_config(path: str):
    """The teacher's transformers config, read from its local dir (never the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _rebuild_buffers(module: nn.Module) -> None:
    """Recompute a teacher module's non-persistent buffers (rotary inverse frequencies) after
    materialisation: they are computed at construction, which happened on the meta device."""
    with torch.device("cpu"):
        fresh = type(module)(config=module.config)
    for name, buf in fresh.named_buffers(recurse=False):
        getattr(module, name).copy_(buf)


class LatentFlowTransformer(ModelFamily):
    family = "lft"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoModelForCausalLM
        self.cfg, c = cfg, cfg.lft
        hf = teacher_config(c.teacher)
        self.tied = bool(getattr(hf, "tie_word_embeddings", False))
        hf.tie_word_embeddings = False  # a separate head tensor: checkpoints must not share storage
        self.teacher = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
        self.teacher.requires_grad_(False)
        parent, attr = decoder_layers(self.teacher)
        self.layers_name = f"{self._name_of(parent)}{attr}"
        self.m, self.n = c.block_start, c.block_end
        init_layer = c.block_start if c.init_layer < 0 else c.init_layer
        self.flow = FlowLayer(self.teacher_layers[init_layer], hf.hidden_size, c.steps, c.solver)
        self.flow.field.layer.requires_grad_(True)
        self._init_layer = init_layer
        self._pair_cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # lft.pair_cache_gb
        self._pair_cache_bytes = 0
        # the share of the last batch's sequences the teacher ran through layers 0..n-1 (the others'
        # pairs came from the cache, which costs no teacher layer); see flops_per_token
        self._teacher_share = 1.0
        self._layer_flops = self._count_layer_flops()
        for part in (self.teacher, self.flow.field.layer):
            for mod in part.modules():  # values come from the teacher's weights (init.py leaves them at 0)
                mod.loaded_from_pretrained = True
                if any(True for _ in mod.buffers(recurse=False)) and hasattr(mod, "config"):
                    mod.reset_buffers = (lambda m=mod: _rebuild_buffers(m))

    def _name_of(self, module: nn.Module) -> str:
        name = next(k for k, v in self.teacher.named_modules() if v is module)
        return f"{name}." if name else ""

    @property
    def teacher_layers(self) -> list[nn.Module]:
        parent, attr = decoder_layers(self.teacher)
        return list(getattr(parent, attr))

    # ------------------------------------------------------------------ config and bookkeeping
    @classmethod
    def validate_config(cls, cfg) -> None:
        c, k = cfg.model.lft, "model.lft."
        if not c.teacher or not (Path(c.teacher) / "config.json").is_file():
            raise ConfigError(f"{k}teacher={c.teacher!r} must be a local Hugging Face model dir with config.json and "
                              "model.safetensors (SmolLM2-135M: python data_tools/fetch_reference_lm.py --hf-dir DIR)")
        hf = json.loads((Path(c.teacher) / "config.json").read_text())
        L = hf.get("num_hidden_layers", hf.get("n_layer"))
        if not 0 <= c.block_start <= c.block_end <= L or c.block_start == L:
            raise ConfigError(f"{k}block_start/block_end = {c.block_start}/{c.block_end}: need 0 <= block_start <= "
                              f"block_end <= {L} (the teacher's layers; equal: an empty block, the student is the teacher)")
        if not -1 <= c.init_layer < L:
            raise ConfigError(f"{k}init_layer={c.init_layer} must be -1 (block_start) or a teacher layer in [0, {L})")
        if c.objective not in OBJECTIVES:
            raise ConfigError(f"{k}objective must be one of {list(OBJECTIVES)}, got {c.objective!r}")
        for key in ("solver", "walk_solver"):
            if getattr(c, key) not in SOLVERS:
                raise ConfigError(f"{k}{key} must be one of {list(SOLVERS)}, got {getattr(c, key)!r}")
        if c.loss_norm not in LOSS_NORMS:
            raise ConfigError(f"{k}loss_norm must be one of {list(LOSS_NORMS)}, got {c.loss_norm!r}")
        if c.steps < 1 or c.walk_steps < 1 or c.alpha_fm < 0 or not 0 <= c.t0_frac <= 1:
            raise ConfigError(f"{k}steps and walk_steps must be >= 1, alpha_fm >= 0 and t0_frac in [0, 1]")
        if c.kl_weight < 0 or c.kl_tokens < 0:
            raise ConfigError(f"{k}kl_weight and kl_tokens must be >= 0 (kl_tokens 0: every position), "
                              f"got {c.kl_weight} and {c.kl_tokens}")
        vocab = hf.get("vocab_size", 0)
        if cfg.model.vocab_size > vocab:
            raise ConfigError(f"the tokenizer has {cfg.model.vocab_size} tokens, the teacher {c.teacher} {vocab}: "
                              "shard the data with the teacher's tokenizer (its tokenizer.json)")
        max_pos = hf.get("max_position_embeddings", hf.get("n_positions", 1 << 30))
        if cfg.model.seq_len > max_pos:
            raise ConfigError(f"model.seq_len={cfg.model.seq_len} exceeds the teacher's {max_pos} positions")

    def pretrained_weights(self) -> tuple[str, dict[str, str]] | None:
        """With `lft.init_from`, the flow layer (velocity field and adaLN) of another LFT run."""
        return (self.cfg.lft.init_from, {"flow.": "flow."}) if self.cfg.lft.init_from else None

    def load_external_weights(self) -> None:
        """The teacher's weights, loaded by transformers from `lft.teacher` (its checkpoint
        conventions and name conversions included), and teacher layer `init_layer` copied into
        the flow layer unless it came from `lft.init_from` (loaded before this); each rank keeps
        its shard of a sharded parameter."""
        from transformers import AutoModelForCausalLM
        from lflm_dist.models.init import _local, local_part
        src = AutoModelForCausalLM.from_pretrained(self.cfg.lft.teacher, local_files_only=True, dtype=torch.float32)
        full = src.state_dict()
        if self.tied:  # our head is a separate tensor (see __init__); a tied checkpoint may list it once
            full.setdefault(f"{self._name_of(self.teacher.get_output_embeddings())}weight", src.get_output_embeddings().weight)
        layer = f"{self.layers_name}.{self._init_layer}."
        full.update({f"flow.field.layer.{k[len(layer):]}": v for k, v in full.items() if k.startswith(layer)})
        own = self.state_dict()
        with torch.no_grad():
            for k, dst in own.items():
                name = k[len("teacher."):] if k.startswith("teacher.") else k
                if k.startswith("teacher.") or (k.startswith("flow.field.layer.") and not self.cfg.lft.init_from):
                    if name not in full:
                        raise RuntimeError(f"{self.cfg.lft.teacher}: the teacher's weights lack {name!r}")
                    _local(dst).copy_(local_part(full[name].to(dst.dtype), dst))

    def describe(self) -> str:
        c = self.cfg.lft
        return (f"teacher={Path(c.teacher).name} layers[{self.m},{self.n}) -> flow layer "
                f"({c.objective}, {c.steps} {c.solver} step{'s' * (c.steps > 1)})")

    def _layer_params(self, layer: nn.Module) -> int:
        return sum(p.numel() for p in layer.parameters() if p.dim() > 1)

    def _count_layer_flops(self) -> tuple[list[float], float, float]:
        """(each teacher layer's forward FLOPs per token, the flow layer's forward, the head's per
        scored position), counted once, as the model is built: ZeRO-3 later leaves each rank's
        parameters empty."""
        D = self.teacher.config.hidden_size
        attn = 4.0 * (self.cfg.seq_len / 2) * D
        head = self.teacher.get_output_embeddings().weight
        return ([2.0 * self._layer_params(l) + attn for l in self.teacher_layers],
                2.0 * self._layer_params(self.flow.field.layer) + attn, 2.0 * head.shape[0] * D)

    def flops_per_token(self) -> float:
        """Teacher forward through layers 0..n-1 (2 x matmul params + causal attention 4 (T/2) D
        per layer), plus training the flow layer, 3 x its forward per velocity evaluation:
        1 for flow matching, (k x evaluations per step) + 1 (the regulariser) for Flow Walking.
        The adaLN's t embedding and modulation run once per sequence, not per token: left out.
        With lft.pair_cache_gb the teacher's share is that of the last training batch: a cached
        pair costs no teacher layer (layer m's arguments come from the embedding and positions,
        the forward stopping at layer m's input), so once every sequence is cached only the flow
        layer counts (counting the teacher then gave an MFU above 100%). Before training, and
        without the cache, every sequence runs 0..n-1. With lft.kl_weight, the layers n.. and the
        head (at kl_tokens of seq_len positions) run forward on x1 and forward and backward on x1_hat."""
        c = self.cfg.lft
        cost, flow, head = self._layer_flops
        teacher = self._teacher_share * sum(cost[:self.n])
        evals = 1 if c.objective == "flow_matching" else c.walk_steps * SOLVERS[c.walk_solver] + (c.alpha_fm > 0)
        total = teacher + evals * 3 * flow
        if c.kl_weight > 0:
            scored = min(c.kl_tokens, self.cfg.seq_len) / self.cfg.seq_len if c.kl_tokens > 0 else 1.0
            total += 4 * (sum(cost[self.n:]) + scored * head)
        return total

    def shard_units(self) -> list[nn.Module]:
        return [self.flow.field]  # called through forward() once per velocity evaluation

    def export_parts(self) -> dict[str, str]:
        return {"flow": "flow."}  # the teacher is rebuilt from lft.teacher

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _teacher_capture(self, tokens: torch.Tensor, stop: bool = False) -> BlockCapture:
        """x0, x1 and layer m's arguments from one teacher forward through layers 0..n-1 (with
        stop: the arguments only, the forward ended at layer m)."""
        layers = self.teacher_layers
        cap = BlockCapture(layers[self.m], layers[self.n - 1] if self.n > self.m else None, stop=stop)
        # for the arguments alone, layer m runs first: they depend on positions, not on earlier layers
        run = [layers[self.m]] if stop else layers[:max(self.n, self.m + 1)]
        try:
            with layers_replaced(self.teacher, run):
                self.teacher.base_model(input_ids=tokens, use_cache=False)
        except StopForward:
            pass
        finally:
            cap.remove()
        return cap

    @torch.no_grad()
    def block_states(self, tokens: torch.Tensor) -> BlockCapture:
        """x0, x1 and layer m's arguments for a batch; with `lft.pair_cache_gb`, the states of
        sequences seen before come from host memory (keyed by their tokens) and the teacher runs
        only on the others."""
        if self.cfg.lft.pair_cache_gb <= 0:
            self._teacher_share = 1.0
            return self._teacher_capture(tokens)
        cache = self._pair_cache
        keys = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest() for row in tokens]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        self._teacher_share = len(todo) / len(tokens)
        if len(todo) == len(tokens):
            cap = self._teacher_capture(tokens)
            fresh = {i: (cap.x0[i], cap.x1[i]) for i in todo}
        else:
            cap = self._teacher_capture(tokens, stop=True)  # the arguments for the whole batch
            if todo:
                part = self._teacher_capture(tokens[todo])
                fresh = {i: (part.x0[j], part.x1[j]) for j, i in enumerate(todo)}
            else:
                fresh = {}
        for i, (x0, x1) in fresh.items():
            if self._pair_cache_bytes < self.cfg.lft.pair_cache_gb * 2 ** 30:
                cache[keys[i]] = (x0.to("cpu", copy=True), x1.to("cpu", copy=True))
                self._pair_cache_bytes += 2 * x0.numel() * x0.element_size()
        dev = tokens.device
        pairs = [fresh[i] if i in fresh else (cache[k][0].to(dev), cache[k][1].to(dev)) for i, k in enumerate(keys)]
        cap.x0, cap.x1 = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return cap

    def _final_hidden(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden state (after its final norm) when the state leaving layer n-1
        is h: its layers n.. run on h (an empty block above: h itself is normed)."""
        with layers_replaced(self.teacher, [InjectState(h)] + self.teacher_layers[self.n:]):
            return self.teacher.base_model(input_ids=tokens, use_cache=False).last_hidden_state

    def _logits_kl(self, tokens: torch.Tensor, x1_hat: torch.Tensor, x1: torch.Tensor, noise: Noise) -> torch.Tensor:
        """KL(teacher || student) of the next-token distributions at lft.kl_tokens random positions
        per sequence (all if 0 or >= T), mean over positions: the student's state x1_hat and the
        teacher's x1 carried through the teacher's layers n.. and its head."""
        B, T = tokens.shape
        P = self.cfg.lft.kl_tokens
        keep = noise.uniform((B, T)).argsort(-1)[:, :P] if 0 < P < T else None
        head = self.teacher.get_output_embeddings()

        def log_probs(h):
            h = self._final_hidden(tokens, h)
            if keep is not None:
                h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
            return head(h).float().log_softmax(-1)
        with torch.no_grad():
            teacher = log_probs(x1)
        return next_token_kl(teacher, log_probs(x1_hat)).mean()

    def _nmse(self, pred: torch.Tensor, target: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """|pred - target|^2 over the update energy |u|^2 (lft.loss_norm): per sequence, per token
        (each token's floored at 1% of its sequence's median token, not the mean, which a massive
        token sets, so a token the block barely moves is not weighted without bound; per sequence,
        so a batch's loss stays the mean of its halves'), or the mean of the two (both: the massive
        token trains through the first, the others through the second)."""
        err = (pred.float() - target.float()).pow(2)
        e = u.float().pow(2)
        norm = self.cfg.lft.loss_norm
        per_seq = (err.sum((1, 2)) / e.sum((1, 2)).clamp_min(1e-12)).mean() if norm != "token" else None
        if norm == "sequence":
            return per_seq
        e_tok = e.sum(-1)
        floor = e_tok.median(dim=1, keepdim=True).values * 1e-2 + 1e-12
        per_tok = (err.sum(-1) / torch.maximum(e_tok, floor)).mean()
        return per_tok if norm == "token" else (per_seq + per_tok) / 2

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.cfg.lft
        cap = self.block_states(batch["input_ids"])
        x0, x1 = cap.x0, cap.x1
        u = x1 - x0
        noise = Noise.for_batch(batch, x0)
        B = x0.shape[0]
        t = noise.uniform((B,))
        if c.t0_frac > 0:  # a share at t = 0: the point a one-step Euler student evaluates
            t = torch.where(noise.uniform((B,)) < c.t0_frac, torch.zeros_like(t), t)
        tb = t.to(x0.dtype)[:, None, None]
        xt = x0 + tb * u
        v = self.flow.velocity(xt, t, cap.args, cap.kwargs) \
            if c.objective == "flow_matching" or c.alpha_fm > 0 else None
        fm = self._nmse(v, u, u) if v is not None else torch.zeros((), device=x0.device)
        if c.objective == "flow_matching":
            out = {"loss": fm, "fm": fm.detach()}
            x1_hat = xt + (1 - tb) * v if c.kl_weight > 0 else None  # the one-step extrapolation
        else:
            inner = noise.uniform((B, c.walk_steps - 1)).sort(-1).values
            times = torch.cat([torch.zeros(B, 1, device=x0.device), inner, torch.ones(B, 1, device=x0.device)], 1)
            x1_hat = self.flow.integrate(x0, times, cap.args, cap.kwargs, c.walk_solver)
            walk = self._nmse(x1_hat, x1, u)
            out = {"loss": walk + c.alpha_fm * fm, "walk": walk.detach(), "fm": fm.detach()}
        if c.kl_weight > 0:
            kl = self._logits_kl(batch["input_ids"], x1_hat, x1, noise)
            out["loss"] = out["loss"] + c.kl_weight * kl
            out["kl"] = kl.detach()
        return out

    # ------------------------------------------------------------------ the student
    @contextlib.contextmanager
    def student(self, steps: int | None = None, solver: str | None = None):
        """The teacher with layers [m, n) replaced by the flow layer (`steps` x `solver`):
        `with model.student(): model.teacher(...)` or `model.teacher.generate(..., use_cache=False)`."""
        old = self.flow.steps, self.flow.solver
        self.flow.steps, self.flow.solver = steps or old[0], solver or old[1]
        gen = getattr(self.teacher, "generation_config", None)
        caching = self.teacher.config.use_cache, getattr(gen, "use_cache", None)
        self.teacher.config.use_cache = False  # the flow layer keeps no KV cache
        if gen is not None:
            gen.use_cache = False
        layers = self.teacher_layers
        try:
            flow = [self.flow] if self.n > self.m else []  # an empty block: nothing to replace
            with layers_replaced(self.teacher, layers[:self.m] + flow + layers[self.n:]):
                yield self.teacher
        finally:
            self.flow.steps, self.flow.solver = old
            self.teacher.config.use_cache = caching[0]
            if gen is not None:
                gen.use_cache = caching[1]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.student():
            return self.teacher(input_ids=tokens, use_cache=False).logits

    def eval_layout(self) -> EvalLayout:
        return EvalLayout(window=self.cfg.seq_len - 1, bos=True)

    def likelihood_kind(self, settings: BoundSettings) -> str:
        return "exact"

    def nll_bound(self, tokens: torch.Tensor, settings: BoundSettings | None = None,
                  generator: torch.Generator | None = None, noise: dict | None = None) -> Bound:
        """Exact NLL (nats) of tokens 1..T-1 given their prefix under the student."""
        logits = self.logits(tokens[:, :-1]).float()
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        return Bound(nll=ce.sum(-1), kind="exact", token_nll=ce, token_greedy=logits.argmax(-1) == tokens[:, 1:])

    def sample(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, pad_id: int = 0, generator: torch.Generator | None = None,
               **_unused) -> list[list[int]]:
        """Token-by-token decoding with the student (no KV cache: the flow layer's attention runs
        at a different t in each step); prompts are left-padded with pad_id (the EOS separator)."""
        with self._inference():
            device = next(self.flow.parameters()).device
            n = max(1, max(len(p) for p in prompts))
            toks = torch.tensor([[pad_id] * (n - len(p)) + list(p) for p in prompts], device=device)
            out = []
            for _ in range(max_new_tokens):
                nxt = sample_token(self.logits(toks[:, -self.cfg.seq_len:])[:, -1], temperature, top_k, top_p,
                                   generator)
                out.append(nxt)
                toks = torch.cat([toks, nxt[:, None]], 1)
            return torch.stack(out, 1).tolist()
