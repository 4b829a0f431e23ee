"""Model family name -> constructor. The trainer, eval and sweeps only see this interface:
`loss(batch) -> {"loss": ..., terms}`, `sample(prompts, max_new_tokens, **opts)`,
`flops_per_token()`."""
from __future__ import annotations

import torch
import torch.nn as nn

from lflm_dist.config import ModelConfig
from lflm_dist.models.ar import ARTransformer
from lflm_dist.models.blocks import set_attention_backend
from lflm_dist.models.cola import ColaDLM
from lflm_dist.models.init import load_pretrained, materialize

FAMILIES = {"cola": ColaDLM, "ar": ARTransformer}


def build_model(cfg: ModelConfig, init_pretrained: bool = True, seed: int = 0,
                device: torch.device | str = "cpu") -> nn.Module:
    """Build a family's model on the meta device, then (unless `device` is "meta")
    materialise it on `device` with `init_model`. The trainer passes "meta" and lets the
    parallel layer shard the model before materialising it (lflm_dist.parallel.build_parallel)."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    with torch.device("meta"):
        model = FAMILIES[cfg.family](cfg)
    set_attention_backend(model, cfg.attention)
    if str(device) != "meta":
        init_model(model, device, seed, init_pretrained)
    return model


def init_model(model: nn.Module, device: torch.device | str, seed: int, pretrained: bool) -> None:
    """Materialise a meta model (plain or sharded) on `device` with the seeded, shard-independent
    init, then, with `pretrained`, load the weights the model names (`pretrained_weights()`:
    Cola stage 2 starts from its stage-1 VAE), each rank reading its own shard."""
    materialize(model, device, seed)
    source = getattr(model, "pretrained_weights", lambda: None)() if pretrained else None
    if source is not None:
        load_pretrained(model, *source)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
