"""Model family name -> constructor. The trainer, eval and sweeps only see this interface:
`loss(batch) -> {"loss": ..., terms}`, `sample(prompts, max_new_tokens, **opts)`,
`flops_per_token()`."""
from __future__ import annotations

import torch.nn as nn

from lflm_dist.config import ModelConfig
from lflm_dist.models.ar import ARTransformer
from lflm_dist.models.blocks import set_attention_backend
from lflm_dist.models.cola import ColaDLM

FAMILIES = {"cola": ColaDLM, "ar": ARTransformer}


def build_model(cfg: ModelConfig, init_pretrained: bool = True) -> nn.Module:
    """Build a family's model. With `init_pretrained`, weights named by the config are
    loaded (Cola stage 2 starts from the stage-1 VAE in `model.cola.ref_checkpoint`)."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    model = FAMILIES[cfg.family](cfg)
    set_attention_backend(model, cfg.attention)
    if init_pretrained and cfg.family == "cola" and cfg.cola.stage == 2 and cfg.cola.ref_checkpoint:
        from lflm_dist.train.checkpoint import read_model_state, resolve_checkpoint
        ckpt = resolve_checkpoint(cfg.cola.ref_checkpoint)  # any strategy's checkpoint format
        model.load_stage1(read_model_state(ckpt), ckpt)
    return model


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
