"""The pieces of the Latent Flow Transformer that touch a Hugging Face causal LM (the teacher):
finding its decoder layers, running a block of them, and the flow layer that replaces a block.

LFT (Wu et al. 2025, `../shared/papers/lft-latent-flow-transformer.md`): the hidden state
entering layer m, x0, and the one leaving layer n-1, x1, are joined by one learned transport

    dx/dt = v_theta(x_t, t),   x(0) = x0,   x(1) ~= x1,

so layers m..n-1 become one velocity layer run for k solver steps. The velocity layer is a
copy of a teacher decoder layer (so it starts as a layer that already reads this residual
stream) with DiT adaLN time conditioning (Peebles & Xie 2023) applied from outside through
forward hooks on the copy's two norms and two sublayers:

    norm_i(h) -> norm_i(h) * (1 + scale_i(t)) + shift_i(t),   sublayer_i(.) -> (1 + gate_i(t)) sublayer_i(.),

with the modulation zero-initialised, so v_theta(x, t) = layer(x) - x at the start and one Euler
step reproduces the copied layer. Hooks keep the layer's own forward (its attention kernel, RoPE,
GQA, parallel residual) untouched, so any pre-norm HF decoder layer serves: Llama/Mistral/Qwen,
GPT-NeoX/Pythia and GPT-2 are named in LAYER_PARTS.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn as nn

from lflm_dist.models.init import zero_init

# (first norm, attention, second norm, MLP) attribute names of a decoder layer, per architecture
LAYER_PARTS = [("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),  # Llama, Mistral, Qwen2
               ("input_layernorm", "attention", "post_attention_layernorm", "mlp"),  # GPT-NeoX / Pythia
               ("ln_1", "attn", "ln_2", "mlp")]  # GPT-2


# the KV-cache arguments an LM may pass its decoder layers (names differ across transformers versions
# and architectures); the flow layer never forwards them to its copied layer
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache")


def decoder_layers(lm: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the ModuleList holding a causal LM's decoder layers: the one
    ModuleList with config.num_hidden_layers entries (model.layers, gpt_neox.layers, transformer.h)."""
    if "_decoder_layers_at" in vars(lm):  # found before (the list may be swapped now: layers_replaced)
        parent_name, attr = lm._decoder_layers_at
        return lm.get_submodule(parent_name) if parent_name else lm, attr
    n = lm.config.num_hidden_layers
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            parent_name, _, attr = name.rpartition(".")
            lm._decoder_layers_at = (parent_name, attr)
            return lm.get_submodule(parent_name) if parent_name else lm, attr
    raise ValueError(f"{type(lm).__name__}: found no ModuleList of its {n} decoder layers")


@contextlib.contextmanager
def layers_replaced(lm: nn.Module, layers: list[nn.Module]):
    """Run `lm` with its decoder layers replaced by `layers` (restored after)."""
    parent, attr = decoder_layers(lm)
    original = getattr(parent, attr)
    # bypass Module.__setattr__'s registration: the original stays the registered child
    parent._modules[attr] = nn.ModuleList(layers)
    try:
        yield
    finally:
        parent._modules[attr] = original


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of t in [0, 1] (scaled by 1000, as DiT's diffusion steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], -1)


class VelocityField(nn.Module):
    """v_theta(x, t): a copy of a teacher decoder layer with adaLN time conditioning (see the
    module docstring). Evaluated through `forward`, so FSDP2's hooks gather its shard each time."""

    def __init__(self, layer: nn.Module, width: int, freq_dim: int = 256):
        super().__init__()
        self.layer = copy.deepcopy(layer)
        parts = next((p for p in LAYER_PARTS if all(hasattr(self.layer, a) for a in p)), None)
        if parts is None:
            raise ValueError(f"{type(layer).__name__}: not a pre-norm decoder layer with one of the part names "
                             f"{LAYER_PARTS} (add its names to lflm_dist/models/lft_layers.py::LAYER_PARTS)")
        self.freq_dim = freq_dim
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = zero_init(nn.Linear(width, 6 * width))  # shift1, scale1, gate1, shift2, scale2, gate2
        self._mod: list[torch.Tensor] | None = None
        norm1, attn, norm2, mlp = (getattr(self.layer, a) for a in parts)
        norm1.register_forward_hook(self._norm_hook(0))
        norm2.register_forward_hook(self._norm_hook(3))
        attn.register_forward_hook(self._gate_hook(2))
        mlp.register_forward_hook(self._gate_hook(5))

    def _norm_hook(self, i: int):
        def hook(_m, _inp, out):
            shift, scale = self._mod[i], self._mod[i + 1]
            return out * (1 + scale) + shift
        return hook

    def _gate_hook(self, i: int):
        def hook(_m, _inp, out):
            gate = 1 + self._mod[i]
            return (out[0] * gate, *out[1:]) if isinstance(out, tuple) else out * gate
        return hook

    def forward(self, x: torch.Tensor, t: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
        """v_theta(x, t) for hidden states x [B, T, D] at times t [B] (or a scalar); args and
        kwargs: what the LM passes its decoder layers."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.t_mlp(timestep_embedding(t, self.freq_dim).to(x.dtype))
        self._mod = [m[:, None, :] for m in self.ada(nn.functional.silu(emb)).chunk(6, -1)]
        try:
            out = self.layer(x, *args, **(kwargs or {}))
        finally:
            self._mod = None
        out = out[0] if isinstance(out, tuple) else out
        return out - x


class FlowLayer(nn.Module):
    """The drop-in for the replaced block: `forward` integrates dx/dt = v_theta(x, t) from t = 0
    to 1 in `steps` uniform steps of `solver` (euler | midpoint), passing through whatever
    arguments the LM gives its decoder layers (mask, rotary position embeddings)."""

    def __init__(self, layer: nn.Module, width: int, steps: int = 1, solver: str = "euler", freq_dim: int = 256):
        super().__init__()
        self.field = VelocityField(layer, width, freq_dim)
        self.steps, self.solver = steps, solver

    def velocity(self, x: torch.Tensor, t: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
        return self.field(x, t, args, kwargs)

    def integrate(self, x: torch.Tensor, times: torch.Tensor, args: tuple = (), kwargs: dict | None = None,
                  solver: str | None = None) -> torch.Tensor:
        """x(times[-1]) from x(times[0]) = x along the learned field (see `integrate`)."""
        return integrate(lambda y, t: self.field(y, t, args, kwargs), x, times, solver or self.solver)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """x0 -> x1 in `self.steps` uniform steps."""
        if kwargs.get("use_cache") and any(kwargs.get(k) is not None for k in CACHE_KWARGS if k != "use_cache"):
            # each step attends at its own t, so cached keys of one forward don't serve the next
            raise RuntimeError("the LFT flow layer keeps no KV cache: run the student with use_cache=False "
                               "(e.g. generate(..., use_cache=False))")
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
        times = torch.linspace(0, 1, self.steps + 1, device=hidden_states.device)
        return self.integrate(hidden_states, times, args, kwargs)


def integrate(velocity, x: torch.Tensor, times: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Carry x [B, ...] from times[..., 0] to times[..., -1] along dx/dt = velocity(x, t [B]), one
    `solver` step (euler | midpoint) per interval of `times` ([S+1] shared, or [B, S+1] per sample)."""
    times = times.expand(x.shape[0], -1) if times.dim() == 1 else times
    for j in range(times.shape[1] - 1):
        t0, t1 = times[:, j], times[:, j + 1]
        h = (t1 - t0).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        if solver == "euler":
            x = x + h * velocity(x, t0)
        elif solver == "midpoint":
            x = x + h * velocity(x + 0.5 * h * velocity(x, t0), (t0 + t1) / 2)
        else:
            raise ValueError(f"unknown solver {solver!r}: euler | midpoint")
    return x


def next_token_kl(teacher_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at each position, from log-probs
    [..., V]: the quantity an LFT student is judged by (evaluation) and, with lft.kl_weight, trained on."""
    return (teacher_lp.exp() * (teacher_lp - lp)).sum(-1)


class InjectState(nn.Module):
    """A decoder-layer stand-in whose output is a given hidden state, whatever it is passed: the
    LM's layers after it, final norm and head then run on that state (the embedding lookup before
    it is the only other work)."""

    def __init__(self, state: torch.Tensor):
        super().__init__()
        self.state = state

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.state


class StopForward(Exception):
    """Raised by a BlockCapture with stop=True once layer m's arguments are known."""


class BlockCapture:
    """Hooks that record, during one teacher forward, the input of layer m with the arguments
    the LM passed to it (x0, args, kwargs) and the output of layer n-1 (x1). With stop, the
    forward ends (StopForward) as soon as layer m is called: only its arguments are wanted."""

    def __init__(self, first: nn.Module, last: nn.Module | None, stop: bool = False):
        """last None: an empty block, x1 = x0."""
        self.x0 = self.x1 = None
        self.args, self.kwargs, self.stop = (), {}, stop
        self._handles = [first.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if last is not None:
            self._handles.append(last.register_forward_hook(self._post))

    def _pre(self, _m, args, kwargs):
        self.x0 = self.x1 = args[0] if args else kwargs["hidden_states"]
        self.args = args[1:] if args else ()
        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in CACHE_KWARGS}
        if self.stop:
            raise StopForward

    def _post(self, _m, _inp, out):
        self.x1 = out[0] if isinstance(out, tuple) else out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
