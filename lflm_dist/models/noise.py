"""Per-sample keyed randomness.

Latent models draw noise inside the loss (VAE reparameterisation, flow-matching time and
noise, guidance dropout). If that noise came from a process-wide RNG, a 2-process run
would draw different noise for a sample than a 1-process run does, and losses could never
match across world sizes or gradient-accumulation splits. Instead every sample carries a
64-bit key (the trainer derives it from the seed, the step and the sample's position in the
global batch) and noise is a counter-based hash of (key, stream, element index): the same
sample gets the same noise however the batch is split. Without keys we fall back to torch's
RNG, which is what ad-hoc calls and sampling use.
"""
from __future__ import annotations

import functools
import math

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sample_keys(seed: int, step: int, first_index: int, count: int) -> torch.Tensor:
    """Keys for `count` samples at global positions first_index.. of the batch of `step`."""
    idx = torch.arange(first_index, first_index + count, dtype=torch.int64)
    lo = _mix32((idx + step * 0x9E3779B1) & _M32)
    hi = _mix32(torch.full_like(idx, (seed * 0x85EBCA77 + step) & _M32))
    return (hi << 31) ^ lo


@functools.lru_cache(maxsize=32)
def _index_hash(n: int, device: torch.device) -> torch.Tensor:
    """The per-element half of keyed_uniform's hash (the same for every key and stream)."""
    return _mix32(torch.arange(n, dtype=torch.int64, device=device) * 0x165667B1 & _M32)


def keyed_uniform(keys: torch.Tensor, shape: tuple[int, ...], stream: int) -> torch.Tensor:
    """Uniform(0, 1) float32 of shape [B, *shape] that depends only on (key, stream, index)."""
    n = math.prod(shape)
    state = _mix32(_mix32(keys & _M32) ^ _mix32((keys >> 31) & _M32) ^ (stream * 0x27D4EB2F & _M32))
    idx = _index_hash(n, keys.device)
    u = _mix32(state[:, None] ^ idx[None, :])
    return ((u.double() + 0.5) / 2.0**32).float().view(keys.shape[0], *shape)


def keyed_normal(keys: torch.Tensor, shape: tuple[int, ...], stream: int) -> torch.Tensor:
    """Standard normal via Box-Muller on two keyed uniform streams."""
    u1 = keyed_uniform(keys, shape, 2 * stream)
    u2 = keyed_uniform(keys, shape, 2 * stream + 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


class Noise:
    """Noise source for one batch: keyed if the batch has `noise_key`, else torch's RNG."""

    def __init__(self, keys: torch.Tensor | None, device, dtype=torch.float32):
        self.keys, self.device, self.dtype = keys, device, dtype
        self._stream = 0

    @classmethod
    def for_batch(cls, batch: dict, like: torch.Tensor) -> "Noise":
        return cls(batch.get("noise_key"), like.device)

    def _next(self) -> int:
        self._stream += 1
        return self._stream

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """shape includes the batch dimension first."""
        s = self._next()
        if self.keys is None:
            return torch.randn(shape, device=self.device, dtype=self.dtype)
        return keyed_normal(self.keys, tuple(shape[1:]), s).to(self.device, self.dtype)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        s = self._next()
        if self.keys is None:
            return torch.rand(shape, device=self.device, dtype=self.dtype)
        return keyed_uniform(self.keys, tuple(shape[1:]), s).to(self.device, self.dtype)
