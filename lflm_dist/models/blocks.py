"""Transformer building blocks shared by every family: RMSNorm, RoPE, attention with the
mask passed in as data (so block-causal, causal and the DiT's clean/noisy layout are all
just boolean matrices), SwiGLU, adaLN modulation, sinusoidal timestep embedding, KV cache.

No parallelism here: `lflm_dist/parallel/` wraps these modules from outside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lflm_dist.config import TransformerConfig
from lflm_dist.models.init import zero_init


# ----------------------------------------------------------------------------- masks
class AttnMask:
    """Which keys each query may attend to, as a rule rather than a matrix, so each attention
    backend can use its fastest form of it (`prepare_mask`): SDPA's `is_causal` flag (flash
    kernels), a FlexAttention `BlockMask` whose fully masked 128x128 tiles are skipped, or the
    dense boolean matrix (the reference the others are tested against).

    kind "block_causal": n positions, bidirectional inside blocks of `block`, causal across
      (block 1 is the ordinary causal mask).
    kind "clean_noisy": the DiT's training layout `[z0 | z_t]` of 2n positions (Cola DLM's
      clean-history + noisy-block): clean block b sees clean blocks <= b; noisy block b sees
      clean blocks < b and itself. `drop_history` (bool [B]) removes the clean history of whole
      samples (classifier-free guidance dropout).
    Queries are rows `q_start`.. of the full matrix (KV-cached decoding continues a sequence)."""

    def __init__(self, kind: str, n: int, block: int, q_start: int = 0, drop_history: torch.Tensor | None = None):
        assert kind in ("block_causal", "clean_noisy"), kind
        self.kind, self.n, self.block, self.q_start, self.drop_history = kind, n, block, q_start, drop_history

    @property
    def kv_len(self) -> int:
        return 2 * self.n if self.kind == "clean_noisy" else self.n

    @property
    def q_len(self) -> int:
        return self.kv_len - self.q_start

    @property
    def is_causal(self) -> bool:
        """Exactly SDPA's is_causal (square, lower triangular)."""
        return self.kind == "block_causal" and self.block == 1 and self.q_start == 0

    def allowed(self, b, q, kv):
        """bool: may query q (absolute row) attend to key kv, in sample b. Plain tensor ops on
        broadcastable index tensors, so the same rule builds the dense matrix and is
        FlexAttention's mask_mod."""
        blk = self.block
        if self.kind == "block_causal":
            return kv // blk <= q // blk
        L = self.n
        q_noisy, kv_noisy = q >= L, kv >= L
        qb, kb = (q % L) // blk, (kv % L) // blk
        clean_q = ~kv_noisy & (kb <= qb)
        history = ~kv_noisy & (kb < qb)
        if self.drop_history is not None:
            history = history & ~self.drop_history[b]
        noisy_q = history | (kv_noisy & (kb == qb))
        return torch.where(q_noisy, noisy_q, clean_q)

    def dense(self, device=None) -> torch.Tensor:
        """bool [Q, KV], or [B, 1, Q, KV] with per-sample history dropout; True = may attend."""
        q = torch.arange(self.q_start, self.kv_len, device=device)[:, None]
        kv = torch.arange(self.kv_len, device=device)[None, :]
        if self.drop_history is None:
            return self.allowed(0, q, kv)
        b = torch.arange(self.drop_history.shape[0], device=device)[:, None, None]
        return self.allowed(b, q[None], kv[None])[:, None]

    def block_mask(self, device):
        from torch.nn.attention.flex_attention import create_block_mask
        B = None if self.drop_history is None else self.drop_history.shape[0]
        q0 = self.q_start
        return create_block_mask(lambda b, h, q, kv: self.allowed(b, q + q0, kv), B, None, self.q_len,
                                 self.kv_len, device=device)


def block_causal_mask(n: int, block: int, device=None) -> torch.Tensor:
    """bool[n, n], True = may attend: bidirectional inside a block, causal across blocks.
    block=1 is the ordinary causal mask."""
    return AttnMask("block_causal", n, block).dense(device)


def clean_noisy_mask(n: int, block: int, device=None) -> torch.Tensor:
    """bool[2n, 2n] for the DiT training layout `[z0 | z_t]` (see AttnMask)."""
    return AttnMask("clean_noisy", n, block).dense(device)


ATTENTION_BACKENDS = ("auto", "flex", "sdpa", "dense")
CAUSAL = "causal"  # prepared form of a plain causal rule: SDPA is_causal=True


def prepare_mask(mask, backend: str, device: torch.device):
    """Turn an AttnMask into what Attention.forward takes, once per stack forward (every layer
    shares it). A dense tensor or None passes through unchanged.
      dense: the boolean matrix everywhere (the reference path).
      sdpa:  is_causal for plain causal masks (flash / efficient kernels), else the matrix.
      flex:  FlexAttention with a BlockMask (causal masks included).
      auto:  is_causal where it applies; flex for block-structured masks in CUDA training passes;
             the matrix on CPU (FlexAttention's CPU path gains nothing at the tiny sizes CPU runs
             use) and for cached decoding / evaluation."""
    if not isinstance(mask, AttnMask):
        return mask
    if backend == "dense":
        return mask.dense(device)
    if mask.is_causal and backend in ("auto", "sdpa"):
        return CAUSAL
    # auto: flex for training passes only; KV-cached decoding and no-grad evaluation see a new
    # length at every block, and each new shape would recompile the kernel
    training_pass = mask.q_start == 0 and torch.is_grad_enabled()
    if backend == "flex" or (backend == "auto" and device.type == "cuda" and training_pass):
        if device.type != "cuda" and torch.is_grad_enabled():
            raise RuntimeError("model.attention=flex trains on CUDA only (PyTorch's FlexAttention has no CPU "
                               "backward); on CPU use model.attention=auto (dense block masks) or sdpa")
        return mask.block_mask(device)
    return mask.dense(device)


_flex_compiled = None


def flex_attention(q, k, v, block_mask):
    """FlexAttention; compiled on CUDA (its fused kernel), eager elsewhere (an unfused
    forward-only implementation: CPU runs use it for inference and tests)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention as fa
    if q.device.type != "cuda":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile()": intended on CPU
            return fa(q, k, v, block_mask=block_mask)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(fa, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask)


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2] for integer positions [T] (rotary embedding, Su et al.)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates pairs (x[2i], x[2i+1])."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class LayerCache:
    """Keys/values of one attention layer for incremental decoding."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k, v, commit: bool):
        """Return cached+new keys/values; store them only if `commit` (the DiT attends to a
        noisy block many times per Euler step but caches only the clean block)."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if commit:
            self.k, self.v = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # QK-norm keeps attention logits bounded (Cola DLM's Text VAE uses it).
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None, commit: bool = True):
        B, T, D = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)  # norms/RoPE upcast under autocast; kernels want one dtype
        if cache is not None:
            k, v = cache.extend(k, v, commit)
        p = self.dropout if self.training else 0.0
        if isinstance(mask, str):  # CAUSAL
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif mask is not None and not torch.is_tensor(mask):  # FlexAttention BlockMask
            if p:
                raise ValueError("attention dropout is not supported by the flex backend; set model.attention=sdpa")
            y = flex_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # -1: heads may be split by TP


def ffn_hidden(cfg: TransformerConfig) -> int:
    return int(math.ceil(cfg.ffn_mult * cfg.dim / 8) * 8)


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h = ffn_hidden(cfg)
        self.w12 = nn.Linear(cfg.dim, 2 * h, bias=False)
        self.w3 = nn.Linear(h, cfg.dim, bias=False)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: h [B, T, D] * (1 + scale) + shift, with scale/shift [B, G, D] shared by each group
    of T/G consecutive positions (G = T: per position; G = number of DiT blocks: per block)."""
    B, T, D = h.shape
    G = shift.shape[1]
    hg = h.view(B, G, T // G, D)
    return (hg * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, T, D)


def gate(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, D = h.shape
    return (h.view(B, g.shape[1], -1, D) * g[:, :, None]).view(B, T, D)


class Block(nn.Module):
    """Pre-norm transformer block; with `adaln`, norms are modulated by a conditioning vector
    and residuals gated (adaLN-Zero, Peebles & Xie 2023). The conditioning `cond` [B, G, D]
    holds one vector per group of T/G consecutive positions: the DiT passes one per block (its
    t is constant over a block), so the 6·D² modulation matmul runs once per block rather than
    once per position."""

    def __init__(self, cfg: TransformerConfig, adaln: bool = False):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn, self.ffn = Attention(cfg), SwiGLU(cfg)
        self.adaln = zero_init(nn.Linear(cfg.dim, 6 * cfg.dim)) if adaln else None

    def forward(self, x, cos, sin, mask, cond=None, cache=None, commit=True):
        if self.adaln is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, commit)
            return x + self.ffn(self.ffn_norm(x))
        s1, c1, g1, s2, c2, g2 = self.adaln(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate(self.attn(modulate(self.attn_norm(x), s1, c1), cos, sin, mask, cache, commit), g1)
        return x + gate(self.ffn(modulate(self.ffn_norm(x), s2, c2)), g2)


class Transformer(nn.Module):
    """A stack of blocks plus final norm; input and output are [B, T, dim] hidden states.
    `attention` picks the attention backend (ATTENTION_BACKENDS; set by `set_attention_backend`)."""

    attention = "auto"

    def __init__(self, cfg: TransformerConfig, adaln: bool = False):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg, adaln) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.layers]

    def forward(self, x, positions, mask, cond=None, cache: list[LayerCache] | None = None, commit=True,
                final_norm: bool = True):
        """mask: an AttnMask rule, a dense bool tensor, or None (attend to everything)."""
        cos, sin = rope_cos_sin(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        mask = prepare_mask(mask, self.attention, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cond, None if cache is None else cache[i], commit)
        return self.norm(x) if final_norm else x


def set_attention_backend(model: nn.Module, backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, Transformer):
            m.attention = backend


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1], scaled x1000 as in DiT/Cola (timesteps 0..1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.dim))


# ----------------------------------------------------------------------------- sampling & FLOPs
def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


@dataclass
class FlopCount:
    """Training FLOPs per token of one transformer stack: 6 x matmul parameters plus the
    attention score/value products (PaLM appendix B convention, 6 = fwd 2 + bwd 4)."""
    matmul_params: float
    attn_flops: float

    @property
    def train(self) -> float:
        return 6.0 * self.matmul_params + self.attn_flops


def transformer_flops(cfg: TransformerConfig, context: float, adaln_group: int = 0) -> FlopCount:
    """`context`: mean number of keys each query attends to (T/2 causal, ~T bidirectional).
    `adaln_group`: positions sharing one adaLN modulation (0: no adaLN), whose 6·D² matmul
    therefore counts 1/adaln_group per position."""
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * ffn_hidden(cfg)
    if adaln_group:
        per_layer += 6 * cfg.dim * cfg.dim / adaln_group
    attn = 6.0 * 2 * cfg.n_layers * cfg.dim * context  # QK^T and AV, fwd+bwd
    return FlopCount(per_layer * cfg.n_layers, attn)
