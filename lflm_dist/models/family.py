"""The model-family interface: everything the trainer, evaluation, generation, export, the
parallel layer and sweeps may ask of a model. They call only these methods and never branch on
a family's name or classes; a new family is a subclass in its own file, a registry entry
(`lflm_dist.models.registry.FAMILIES`) and a config section (docs/adding_a_family.md).

Every family is a plain `nn.Module` (no parallel code) built from `ModelConfig` on the meta
device and materialised by `lflm_dist.models.init`. What a family must provide:

  loss(batch)                 -> {"loss": scalar, named terms...}; batch["noise_key"] keys the noise
  nll_bound(tokens, settings) -> Bound: per-sequence NLL in nats and what it is (exact, a bound, an
                                 estimate); evaluation, the lm-eval adapter and sweeps use only this
  eval_layout()               -> EvalLayout: how held-out text is cut into scored windows
  sample(prompts, n, **opts)  -> token lists; `sampling_unavailable()` says why a model cannot
  edit / interpolate / ...    latent tools where a family has them (a clear error otherwise)
  flops_per_token()           -> training FLOPs per token, frozen passes included (the trainer asks
                                 every step: a family whose work changes, LFT's teacher cache, says so)
  shard_units()               -> submodules FSDP2 wraps, activation checkpointing recomputes and
                                 torch.compile compiles (transformer blocks, LSTM layers, ...)
  tp_plan()                   -> TPPlan of the layers megatron-core TP swaps, or None (no TP)
  export_parts()              -> {file stem: state-dict prefix} written by launchers/export.py
  validate_config(cfg)        -> classmethod: the family's own config checks (ConfigError)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# what a likelihood figure is: its estimator (fine) -> the class every report states (coarse)
KIND_CLASS = {"exact": "exact", "elbo_bound": "upper_bound", "iwae_bound": "upper_bound",
              "iwae_estimate": "estimate"}


@dataclass
class BoundSettings:
    """How a latent family's likelihood is estimated (written into the results JSON). Exact
    families ignore it; families without an ODE prior ignore the solver fields."""
    iwae_k: int = 1  # samples z ~ q per window; >1 gives the importance-weighted bound
    draws: int = 1  # independent repeats of the whole estimate per window (for the Monte Carlo SE)
    trace: str = "hutchinson"  # hutchinson | exact
    probes: int = 1  # Hutchinson probes per function evaluation
    probe_dist: str = "rademacher"
    method: str = "dopri5"  # torchdiffeq solver
    steps: int = 8  # for fixed-step solvers
    rtol: float = 1e-4
    atol: float = 1e-4
    seed: int = 0

    def ode_kwargs(self) -> dict:
        return dict(trace=self.trace, probes=self.probes, probe_dist=self.probe_dist, method=self.method,
                    steps=self.steps, rtol=self.rtol, atol=self.atol)


@dataclass
class Bound:
    """A family's likelihood figure for a batch of windows [B, T]."""
    nll: torch.Tensor  # [B] nats of each window's scored tokens (exact NLL, a bound or an estimate)
    kind: str  # a key of KIND_CLASS
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] nats per named term
    nfe: int = 0  # ODE function evaluations spent
    # families whose NLL factorises over tokens exactly: [B, T-1] nats of tokens 1.. and whether each
    # was the argmax (lm-eval's is_greedy); None for latent families
    token_nll: torch.Tensor | None = None
    token_greedy: torch.Tensor | None = None


@dataclass(frozen=True)
class EvalLayout:
    """How held-out text is cut into windows (lflm_dist.eval.likelihood.make_windows): `window`
    text tokens per window scored independently (no context across windows); with `block` > 1
    the last window is right-padded with <|endoftext|> to a multiple of `block` and the padded
    window's bound is charged to its real tokens (still a bound: -log p(x, pad) >= -log p(x));
    with `bos` every window is preceded by <|endoftext|> as context (not scored)."""
    window: int
    block: int = 1
    bos: bool = False

    def describe(self) -> str:
        s = f"non-overlapping windows of {self.window} tokens, each scored from scratch (no context across windows)"
        if self.bos:
            s += ", given <|endoftext|> as BOS"
        if self.block > 1:
            s += (f"; the last window is right-padded with <|endoftext|> to a multiple of {self.block} tokens and the "
                  "bound of the padded window is charged to its real tokens (still an upper bound: "
                  "-log p(x, pad) >= -log p(x))")
        return s + "; every text token is scored exactly once"


# kinds of layer in a TP plan (lflm_dist.parallel.tp applies them)
COL = "col"                # ColumnParallelLinear, output left sharded (feeds a row-parallel layer)
COL_GATHER = "col_gather"  # ColumnParallelLinear, output all-gathered (consumers need every value)
ROW = "row"                # RowParallelLinear on a sharded input, output all-reduced
EMBED = "embed"            # VocabParallelEmbedding, rows padded to a multiple of tp
HEAD = "head"              # column-parallel over the vocabulary (vocab-parallel cross-entropy)


@dataclass
class TPPlan:
    """What megatron-core tensor parallelism changes in a model.
    layers: (parent module, attribute, kind, weight view, shard dim) per swapped layer;
    attention: modules whose `n_heads` becomes n_heads / tp (their heads are split);
    partial: replicated parameters whose grads are partial sums over the TP group (QK-norm gains);
    vocab_ce: modules whose `token_ce` (and `token_argmax`, if any) hooks become vocab-parallel."""
    layers: list[tuple[nn.Module, str, str, tuple, int]] = field(default_factory=list)
    attention: list[nn.Module] = field(default_factory=list)
    partial: list[nn.Parameter] = field(default_factory=list)
    vocab_ce: list[nn.Module] = field(default_factory=list)

    def __iadd__(self, other: "TPPlan") -> "TPPlan":
        for f in ("layers", "attention", "partial", "vocab_ce"):
            getattr(self, f).extend(getattr(other, f))
        return self


def col(parent: nn.Module, name: str, kind: str = COL) -> tuple:
    """Split on the output dim (column-parallel)."""
    return (parent, name, kind, tuple(getattr(parent, name).weight.shape), 0)


def row(parent: nn.Module, name: str) -> tuple:
    """Split on the input dim (row-parallel)."""
    return (parent, name, ROW, tuple(getattr(parent, name).weight.shape), 1)


class ModelFamily(nn.Module):
    """Base class of every model family; the defaults below are what most families want."""

    family: str = ""  # registry name, set by the registry

    # ------------------------------------------------------------------ training
    def forward(self, batch):  # DDP hooks run on forward(); the loss is the forward pass
        return self.loss(batch)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def flops_per_token(self) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        """A few words for the start-up line (e.g. Cola's training stage)."""
        return ""

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Family-specific checks of a whole `Config` (raise ConfigError naming the key)."""

    # ------------------------------------------------------------------ likelihood
    def eval_layout(self) -> EvalLayout:
        raise NotImplementedError

    def nll_bound(self, tokens: torch.Tensor, settings: BoundSettings | None = None,
                  generator: torch.Generator | None = None, noise: dict | None = None) -> Bound:
        raise NotImplementedError

    def likelihood_kind(self, settings: BoundSettings) -> str:
        """The KIND_CLASS key `nll_bound` returns under `settings` (known before evaluating)."""
        raise NotImplementedError

    def estimator_info(self, settings: BoundSettings) -> dict:
        """Estimator settings written beside a likelihood figure."""
        return {"exact": True} if self.likelihood_kind(settings) == "exact" else {**settings.__dict__}

    def bound_noise(self, length: int, settings: BoundSettings, generator: torch.Generator) -> dict | None:
        """The random numbers of one bound evaluation of a window of `length` tokens, such that
        `prefix_noise(noise, n)` gives those of its first n tokens (common random numbers for
        lm-eval's loglikelihood differences); None: the family has no such structure."""
        return None

    def prefix_noise(self, noise: dict | None, n: int) -> dict | None:
        return None

    def posterior_means(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Posterior means of the latents of tokens [B, T], as rows [N, latent_dim] (for counting
        active units: dims whose mean varies across data, Burda et al. 2016); None without latents."""
        return None

    # ------------------------------------------------------------------ generation
    @contextlib.contextmanager
    def _inference(self):
        """eval mode and no autograd for a sampling or latent-tool call; the mode is restored after."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was)

    def sampling_unavailable(self) -> str | None:
        """Why this model cannot sample (e.g. a stage-1 VAE without a prior), else None."""
        return None

    def sample(self, prompts: list[list[int]], max_new_tokens: int, **opts) -> list[list[int]]:
        raise NotImplementedError

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """Greedy reconstruction [B, T] of tokens (latent families; shown when sampling is unavailable)."""
        raise NotImplementedError(f"the {self.family} family has no reconstruction")

    # latent tools of families with one latent per text (launchers/generate.py)
    def interpolate(self, tokens_a: torch.Tensor, tokens_b: torch.Tensor, n_points: int = 5) -> list[list[int]]:
        """Greedy decodes of n_points latents from text a's to text b's, endpoints included."""
        raise NotImplementedError(f"the {self.family} family has no single latent per text to interpolate")

    def latent_arithmetic(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> list[list[int]]:
        """Greedy decode of latent(a) - latent(b) + latent(c)."""
        raise NotImplementedError(f"the {self.family} family has no single latent per text for latent arithmetic")

    def edit(self, tokens: torch.Tensor, start: int, replacement: torch.Tensor) -> torch.Tensor:
        """Continuous-space editing: tokens [1, T] with positions start.. overwritten by
        `replacement` [1, R] and what follows re-generated to fit the change -> tokens [1, T]."""
        raise NotImplementedError(f"the {self.family} family has no continuous-space editing")

    # ------------------------------------------------------------------ parallel layer and export
    def shard_units(self) -> list[nn.Module]:
        """Every transformer Block by default."""
        from lflm_dist.models.blocks import Block
        return [m for m in self.modules() if isinstance(m, Block)]

    def tp_plan(self) -> TPPlan | None:
        return None

    def activation_stacks(self) -> list[tuple]:
        """(TransformerConfig, sequence length, adaLN) of each transformer stack, for the memory planner."""
        return []

    def vocab_logits(self) -> int:
        """How many [seq_len, vocab] logits one training forward computes, for the memory planner."""
        return 1

    def export_parts(self) -> dict[str, str]:
        """{file stem: state-dict prefix}; state outside every prefix is not exported (rebuilt on load)."""
        return {"model": ""}


def gaussian_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) summed over all but the first dim."""
    return (-0.5 * (x.float().pow(2) + math.log(2 * math.pi))).reshape(x.shape[0], -1).sum(-1)


def check_tp_nets(cfg, nets: list[tuple[str, object]]) -> None:
    """parallel.tp must divide each transformer stack's heads and SwiGLU hidden size (`nets`:
    (dotted config key, TransformerConfig)) for the blocks' head-wise split."""
    tp = cfg.parallel.tp
    if tp <= 1:
        return
    from lflm_dist.config import ConfigError
    from lflm_dist.models.blocks import ffn_hidden
    for name, net in nets:
        if net.n_heads % tp or ffn_hidden(net) % tp:
            raise ConfigError(f"parallel.tp={tp} must divide {name}.n_heads ({net.n_heads}) and its "
                              f"SwiGLU hidden size ({ffn_hidden(net)})")
