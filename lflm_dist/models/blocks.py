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


# ----------------------------------------------------------------------------- masks
def block_causal_mask(n: int, block: int, device=None) -> torch.Tensor:
    """bool[n, n], True = may attend: bidirectional inside a block, causal across blocks.
    block=1 is the ordinary causal mask."""
    b = torch.arange(n, device=device) // block
    return b[None, :] <= b[:, None]


def clean_noisy_mask(n: int, block: int, device=None) -> torch.Tensor:
    """bool[2n, 2n] for the DiT training layout `[z0 | z_t]` (Cola DLM, clean-history +
    noisy-block): clean block b sees clean blocks <= b; noisy block b sees clean blocks < b
    and itself. Every noisy block is thus trained in one pass, each seeing exactly what it
    will see at sampling time (its clean history in the KV cache)."""
    b = torch.arange(n, device=device) // block
    clean_clean = b[None, :] <= b[:, None]
    noisy_clean = b[None, :] < b[:, None]
    noisy_noisy = b[None, :] == b[:, None]
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


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
        if cache is not None:
            k, v = cache.extend(k, v, commit)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
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


class Block(nn.Module):
    """Pre-norm transformer block; with `adaln`, norms are modulated by a conditioning
    vector per position and residuals gated (adaLN-Zero, Peebles & Xie 2023)."""

    def __init__(self, cfg: TransformerConfig, adaln: bool = False):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn, self.ffn = Attention(cfg), SwiGLU(cfg)
        self.adaln = nn.Linear(cfg.dim, 6 * cfg.dim) if adaln else None
        if adaln:
            nn.init.zeros_(self.adaln.weight)
            nn.init.zeros_(self.adaln.bias)

    def forward(self, x, cos, sin, mask, cond=None, cache=None, commit=True):
        if self.adaln is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, commit)
            return x + self.ffn(self.ffn_norm(x))
        s1, c1, g1, s2, c2, g2 = self.adaln(F.silu(cond)).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.attn_norm(x) * (1 + c1) + s1, cos, sin, mask, cache, commit)
        return x + g2 * self.ffn(self.ffn_norm(x) * (1 + c2) + s2)


class Transformer(nn.Module):
    """A stack of blocks plus final norm; input and output are [B, T, dim] hidden states."""

    def __init__(self, cfg: TransformerConfig, adaln: bool = False):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg, adaln) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.layers]

    def forward(self, x, positions, mask, cond=None, cache: list[LayerCache] | None = None, commit=True,
                final_norm: bool = True):
        cos, sin = rope_cos_sin(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cond, None if cache is None else cache[i], commit)
        return self.norm(x) if final_norm else x


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
    matmul_params: int
    attn_flops: float

    @property
    def train(self) -> float:
        return 6.0 * self.matmul_params + self.attn_flops


def transformer_flops(cfg: TransformerConfig, context: float, adaln: bool = False) -> FlopCount:
    """`context`: mean number of keys each query attends to (T/2 causal, ~T bidirectional)."""
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * ffn_hidden(cfg) + (6 * cfg.dim * cfg.dim if adaln else 0)
    attn = 6.0 * 2 * cfg.n_layers * cfg.dim * context  # QK^T and AV, fwd+bwd
    return FlopCount(per_layer * cfg.n_layers, attn)
