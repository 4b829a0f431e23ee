"""Transformer building blocks shared by every family: RMSNorm, RoPE, attention with the
mask passed in as data (so block-causal, causal and the DiT's clean/noisy layout are all
just boolean matrices), SwiGLU, adaLN modulation, sinusoidal timestep embedding, KV cache.

No parallelism here: `lflm_dist/parallel/` wraps these modules from outside.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lflm_dist.config import TransformerConfig
from lflm_dist.models import cpu_kernels
from lflm_dist.models.family import COL, COL_GATHER, ROW, TPPlan, col
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
    `block` is an int, or a LongTensor [B] of per-sample block sizes (the Cola release trains with
    block sizes drawn among powers of two, so a model serves every block size up to its own).
    Queries are rows `q_start`.. of the full matrix (KV-cached decoding continues a sequence)."""

    def __init__(self, kind: str, n: int, block: int | torch.Tensor, q_start: int = 0,
                 drop_history: torch.Tensor | None = None):
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
        return self.kind == "block_causal" and isinstance(self.block, int) and self.block == 1 and self.q_start == 0

    @property
    def per_sample(self) -> int | None:
        """Batch size when the rule differs between samples, else None."""
        if not isinstance(self.block, int):
            return self.block.shape[0]
        return None if self.drop_history is None else self.drop_history.shape[0]

    def allowed(self, b, q, kv):
        """bool: may query q (absolute row) attend to key kv, in sample b. Plain tensor ops on
        broadcastable index tensors, so the same rule builds the dense matrix and is
        FlexAttention's mask_mod."""
        blk = self.block if isinstance(self.block, int) else self.block[b]
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
        """bool [Q, KV], or [B, 1, Q, KV] with per-sample history dropout; True = may attend.
        The matrices of a rule are built once and cached (shared: do not modify them); history
        dropout selects per sample between the rule's matrix and its history-free one."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if isinstance(self.block, int):
            base = _dense_rule(self.kind, self.n, self.block, self.q_start, device, False)
            if self.drop_history is None:
                return base
            no_history = _dense_rule(self.kind, self.n, self.block, self.q_start, device, True)
            return torch.where(self.drop_history.to(device)[:, None, None, None], no_history, base)
        drop = [False] * self.block.shape[0] if self.drop_history is None else self.drop_history.tolist()
        return torch.stack([_dense_rule(self.kind, self.n, int(blk), self.q_start, device, bool(d))
                            for blk, d in zip(self.block.tolist(), drop)])[:, None]

    def block_mask(self, device):
        from torch.nn.attention.flex_attention import create_block_mask
        B = self.per_sample
        q0 = self.q_start
        return create_block_mask(lambda b, h, q, kv: self.allowed(b, q + q0, kv), B, None, self.q_len,
                                 self.kv_len, device=device)


@functools.lru_cache(maxsize=64)
def _dense_rule(kind: str, n: int, block: int, q_start: int, device: torch.device, drop_all: bool) -> torch.Tensor:
    """AttnMask.allowed as a bool [Q, KV] matrix (every sample's history dropped if drop_all).
    Built outside inference mode, so a matrix first made while sampling can serve training."""
    with torch.inference_mode(False):
        drop = torch.ones(1, dtype=torch.bool, device=device) if drop_all else None
        rule = AttnMask(kind, n, block, q_start, drop)
        q = torch.arange(q_start, rule.kv_len, device=device)[:, None]
        kv = torch.arange(rule.kv_len, device=device)[None, :]
        return rule.allowed(0, q, kv)


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
def _eager_cpu(x: torch.Tensor) -> bool:
    """Whether the hand-written CPU autograd functions below apply: fp32 (CPU training) outside
    CUDA and outside torch.compile (which fuses the plain formulas itself)."""
    return x.dtype == torch.float32 and not x.is_cuda and not torch.compiler.is_compiling()


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward. The forward is the reference formula, op for
    op (bit-identical); the backward, gx = rstd * (g w - xh * mean(g w xh)) and
    gw = sum(g xh), takes 4 elementwise passes into one buffer, a reduction and a
    matrix-vector product, where autograd's derivative of the composite takes about twice that
    (pow, mean, rsqrt, two products and their sums) and allocates each."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xh = x * rstd
        ctx.save_for_backward(xh, rstd, weight)
        return xh * weight

    @staticmethod
    def backward(ctx, gy):
        xh, rstd, weight = ctx.saved_tensors
        t = gy * xh
        gw = t.sum(tuple(range(gy.dim() - 1))) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            dot = (t @ weight).unsqueeze_(-1)  # sum over the row of gy * w * xh
            gx = torch.mul(gy, weight, out=t).addcmul_(xh, dot, value=-1.0 / xh.shape[-1]).mul_(rstd)
        return gx, gw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in fp32 and returned in x's dtype times
    the weight (so bf16 activations with fp32 gains give fp32, as autocast expects)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """rms_norm_reference. fp32 activations and gains take a faster path: F.rms_norm (a fused
        kernel) on CUDA and under torch.compile; on CPU the fused C++ kernel (cpu_kernels), or
        _RMSNormFn's shorter backward where it did not build."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if _eager_cpu(x):
                if cpu_kernels.applies(x, self.weight):  # one fused pass each way (C++)
                    return cpu_kernels.get().rms_norm(x.contiguous(), self.weight, self.eps)
                return _RMSNormFn.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotary embedding (Su et al.) of integer positions [T] as unit complex numbers
    exp(i * pos * theta^(-2j/head_dim)), complex64 [T, 1, head_dim/2] (broadcast over heads)."""
    ang = positions.float()[:, None, None] * _inv_freq(head_dim, theta, positions.device)
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]; rotates pairs (x[2i], x[2i+1]) by freqs [T, 1, hd/2] (rope_freqs):
    (x[2i] + i x[2i+1]) * e^(i a) = (x[2i] cos a - x[2i+1] sin a) + i (x[2i] sin a + x[2i+1] cos a),
    as one complex multiply (forward and backward) rather than slices, four products and a stack.
    Computed in fp32; returns fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2)


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

    def _qkv(self, x, rope, q_from: int):
        """Projection, QK-norm and RoPE: q [B, H, T - q_from, hd], k and v [B, H, T, hd]."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        fused = isinstance(self.q_norm, RMSNorm) and cpu_kernels.applies(qkv, self.q_norm.weight, self.k_norm.weight)
        if fused and not q_from:
            # one C++ pass per head row reads q, k, v from the projection, normalises and rotates
            # q and k, and writes all three [B, H, T, hd] (the attention kernel's layout); its
            # backward writes the projection's grad directly
            return cpu_kernels.get().qkv_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight,
                                                   torch.view_as_real(rope).flatten(1), self.q_norm.eps)
        q, k, v = qkv.unbind(2)
        rope_q = rope
        if q_from:  # (a slice that keeps everything would still cost a zero-filled copy in backward)
            q, rope_q = q[:, q_from:], rope[q_from:]
        if fused:  # the same kernels for q (queries from q_from on) and k apart
            kern = cpu_kernels.get()
            return (kern.rms_norm_rope(q, self.q_norm.weight, torch.view_as_real(rope_q).flatten(1), self.q_norm.eps),
                    kern.rms_norm_rope(k, self.k_norm.weight, torch.view_as_real(rope).flatten(1), self.k_norm.eps),
                    v.transpose(1, 2))
        # QK-norm and RoPE run in the [B, T, H, hd] layout of the projection, whose rows of
        # H * hd elements are contiguous (elementwise kernels on the [B, H, T, hd] view walk
        # hd-long runs, ~3x slower on CPU); attention takes [B, H, T, hd] views, as nanoGPT.
        q, k = apply_rope(self.q_norm(q), rope_q), apply_rope(self.k_norm(k), rope)
        # norms/RoPE upcast under autocast; kernels want one dtype
        return q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, rope, mask, cache: LayerCache | None = None, commit: bool = True, q_from: int = 0):
        """rope: rope_freqs of the positions of x. With q_from, only positions q_from.. are
        queries (all positions are keys and values; `mask` holds the query rows only)."""
        B, T, D = x.shape
        q, k, v = self._qkv(x, rope, q_from)
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
        return self.wo(y.transpose(1, 2).reshape(B, T - q_from, -1))  # -1: heads may be split by TP


def ffn_hidden(cfg: TransformerConfig) -> int:
    return int(math.ceil(cfg.ffn_mult * cfg.dim / 8) * 8)


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h = ffn_hidden(cfg)
        self.w12 = nn.Linear(cfg.dim, 2 * h, bias=False)
        self.w3 = nn.Linear(h, cfg.dim, bias=False)

    def forward(self, x):
        h = self.w12(x)
        if _eager_cpu(h):
            return self.w3(_SwiGLUFn.apply(h))
        a, b = h.chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _SwiGLUFn(torch.autograd.Function):
    """silu(a) * b for h = [a | b], bit-identical to autograd's, whose backward ends in a
    `cat` of the two halves' grads (a full extra copy of h's size): here they are written
    straight into one buffer."""

    @staticmethod
    def forward(ctx, h):
        a, b = h.chunk(2, dim=-1)
        s = F.silu(a)
        ctx.save_for_backward(a, b, s)
        return s * b

    @staticmethod
    def backward(ctx, gy):
        a, b, s = ctx.saved_tensors
        gh = gy.new_empty(*gy.shape[:-1], 2 * gy.shape[-1])
        ga, gb = gh.chunk(2, dim=-1)
        torch.mul(gy, s, out=gb)
        torch.ops.aten.silu_backward.grad_input(gy * b, a, grad_input=ga)
        return gh


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: h [B, T, D] * (1 + scale) + shift, with scale/shift [B, G, D] shared by each group
    of T/G consecutive positions (G = T: per position; G = number of DiT blocks: per block)."""
    B, T, D = h.shape
    G = shift.shape[1]
    hg = h.view(B, G, T // G, D)
    return (hg * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, T, D)


def norm_modulate(norm: RMSNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale): in fp32 on CPU one fused C++ pass each way (cpu_kernels),
    where the norm, the product and the sum (and their group reductions in backward) were each a
    pass over the activations."""
    if _eager_cpu(x) and x.dim() == 3 and shift.stride() == scale.stride() and shift.stride(-1) == 1 \
            and cpu_kernels.applies(x, norm.weight, shift, scale):  # the kernel's layout (else the formulas)
        return cpu_kernels.get().rms_norm_modulate(x.contiguous(), norm.weight, shift, scale, norm.eps)
    return modulate(norm(x), shift, scale)


def gate(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, D = h.shape
    return (h.view(B, g.shape[1], -1, D) * g[:, :, None]).view(B, T, D)


def conditioning(proj: nn.Module, cond: torch.Tensor, cond_index: torch.Tensor | None) -> torch.Tensor:
    """proj(silu(cond)) per group [B, G, out]; with cond_index [B, G] cond is a table [U, D] of
    the distinct conditioning vectors, projected once each and then looked up (`BlockCausalDiT`
    passes one row per distinct t when t varies per position). The lookup is an embedding, not
    `out[cond_index]`: each row is read by hundreds of positions, and advanced indexing's backward
    (a sorted, serial accumulate per row on CUDA) took ~100 ms of cola_2b's 513 ms step on an H200
    (bench/results/profile_cola_2b_h200.txt); the embedding's backward reduces segments in parallel
    and in fp32."""
    out = proj(F.silu(cond))
    return out if cond_index is None else F.embedding(cond_index, out)


class Block(nn.Module):
    """Pre-norm transformer block; with `adaln`, norms are modulated by a conditioning vector
    and residuals gated (adaLN-Zero, Peebles & Xie 2023). The conditioning `cond` [B, G, D]
    holds one vector per group of T/G consecutive positions: the DiT passes one per block (its
    t is constant over a block), so the 6·D² modulation matmul runs once per block rather than
    once per position; or `cond` is a table [U, D] and `cond_index` [B, G] picks each group's row
    (`conditioning`): the matmul then runs once per distinct t."""

    def __init__(self, cfg: TransformerConfig, adaln: bool = False):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn, self.ffn = Attention(cfg), SwiGLU(cfg)
        self.adaln = zero_init(nn.Linear(cfg.dim, 6 * cfg.dim)) if adaln else None

    def forward(self, x, rope, mask, cond=None, cache=None, commit=True, q_from: int = 0, cond_index=None):
        """With q_from, returns positions q_from.. only: their attention (over all positions),
        residual and MLP; `mask` holds those query rows, and q_from is a multiple of T/G."""
        xq = x[:, q_from:] if q_from else x
        if self.adaln is None:
            x = xq + self.attn(self.attn_norm(x), rope, mask, cache, commit, q_from)
            return x + self.ffn(self.ffn_norm(x))
        mod = conditioning(self.adaln, cond, cond_index)
        s1, c1, g1, s2, c2, g2 = mod.chunk(6, dim=-1)
        g0 = q_from * mod.shape[1] // x.shape[1]  # conditioning groups before q_from
        x = xq + gate(self.attn(norm_modulate(self.attn_norm, x, s1, c1), rope, mask, cache, commit, q_from), g1[:, g0:])
        return x + gate(self.ffn(norm_modulate(self.ffn_norm, x, s2[:, g0:], c2[:, g0:])), g2[:, g0:])

    def tp_plan(self) -> TPPlan:
        """Megatron-LM's split: attention wqkv / SwiGLU w12 column-parallel, wo / w3 row-parallel
        (one all-reduce per sub-layer in forward and one in backward), so each rank computes its
        heads; the QK-norm gains are shared by all heads, so each rank's grads of them are partial
        sums; adaLN's modulation vectors multiply the whole (replicated) hidden state, so its output
        is gathered. wqkv's rows are (q|k|v, head, head_dim), viewed [3, H, hd, D] and split on heads;
        w12's rows (a|b, hidden), viewed [2, h, D] and split on hidden."""
        attn, ffn = self.attn, self.ffn
        D, H, hd = attn.wo.weight.shape[0], attn.n_heads, attn.head_dim
        h = ffn.w3.weight.shape[1]
        layers = [(attn, "wqkv", COL, (3, H, hd, D), 1), (attn, "wo", ROW, (D, H * hd), 1),
                  (ffn, "w12", COL, (2, h, D), 1), (ffn, "w3", ROW, (D, h), 1)]
        if self.adaln is not None:
            layers.append(col(self, "adaln", COL_GATHER))
        return TPPlan(layers=layers, attention=[attn],
                      partial=[*attn.q_norm.parameters(), *attn.k_norm.parameters()])


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

    def tp_plan(self) -> TPPlan:
        plan = TPPlan()
        for layer in self.layers:
            plan += layer.tp_plan()
        return plan

    def forward(self, x, positions, mask, cond=None, cache: list[LayerCache] | None = None, commit=True,
                final_norm: bool = True, keep_from: int = 0, cond_index=None):
        """mask: an AttnMask rule, a dense bool tensor, or None (attend to everything).
        keep_from: return positions keep_from.. only. The last block then computes its queries,
        residual and MLP for those rows alone (the others are still its keys and values): the
        DiT's loss reads only the noisy half of its [clean | noisy] layout. cond / cond_index:
        see `Block`."""
        rope = rope_freqs(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        prepared = prepare_mask(mask, self.attention, x.device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if keep_from and i == last:
                rows = prepare_mask(_mask_rows_from(mask, keep_from), self.attention, x.device)
                x = layer(x, rope, rows, cond, layer_cache, commit, keep_from, cond_index)
            else:
                x = layer(x, rope, prepared, cond, layer_cache, commit, cond_index=cond_index)
        return self.norm(x) if final_norm else x


def _mask_rows_from(mask, q0: int):
    """The query rows q0.. of a mask (an AttnMask rule, a dense [..., Q, KV] tensor or None)."""
    if isinstance(mask, AttnMask):
        return AttnMask(mask.kind, mask.n, mask.block, mask.q_start + q0, mask.drop_history)
    return None if mask is None else mask[..., q0:, :]


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
