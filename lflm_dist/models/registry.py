"""Model family name -> model class (a `lflm_dist.models.family.ModelFamily`). The trainer,
evaluation, generation, export, the parallel layer and sweeps see only that interface.
A family's config is its own section of `ModelConfig` (Cola: model.vae, model.dit, model.cola;
AR: model.ar; LFLM: model.lflm; TarFlowLM: model.tarflow; LFT: model.lft), chosen by model.family; see docs/adding_a_family.md."""
from __future__ import annotations

import torch
import torch.nn as nn

from lflm_dist.config import ConfigError, ModelConfig
from lflm_dist.models.ar import ARTransformer
from lflm_dist.models.blocks import set_attention_backend
from lflm_dist.models.cola import ColaDLM
from lflm_dist.models.family import ModelFamily
from lflm_dist.models.init import load_pretrained, materialize
from lflm_dist.models.lflm import LFLM
from lflm_dist.models.lft import LatentFlowTransformer
from lflm_dist.models.tarflow import TarFlowLM

FAMILIES: dict[str, type[ModelFamily]] = {"cola": ColaDLM, "ar": ARTransformer, "lflm": LFLM, "tarflow": TarFlowLM,
                                      "lft": LatentFlowTransformer}


def family_class(name: str) -> type[ModelFamily]:
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is not a registered model family; registered: "
                          f"{', '.join(sorted(FAMILIES))} (lflm_dist/models/registry.py)")
    return FAMILIES[name]


def build_model(cfg: ModelConfig, init_pretrained: bool = True, seed: int = 0,
                device: torch.device | str = "cpu") -> nn.Module:
    """Build a family's model on the meta device, then (unless `device` is "meta")
    materialise it on `device` with `init_model`. The trainer passes "meta" and lets the
    parallel layer shard the model before materialising it (lflm_dist.parallel.build_parallel)."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    with torch.device("meta"):
        model = family_class(cfg.family)(cfg)
    set_attention_backend(model, cfg.attention)
    if str(device) != "meta":
        init_model(model, device, seed, init_pretrained)
    return model


def init_model(model: nn.Module, device: torch.device | str, seed: int, pretrained: bool) -> None:
    """Materialise a meta model (plain or sharded) on `device` with the seeded, shard-independent
    init, then, with `pretrained`, load the weights the model names (`load_named_weights`)."""
    materialize(model, device, seed)
    if pretrained:
        load_named_weights(model)


def load_named_weights(model: nn.Module) -> bool:
    """Load the weights a model names, each rank reading its own shard: a checkpoint of another
    run (`pretrained_weights()` -> (checkpoint, {prefix: source prefix}); Cola stage 2 starts
    from its stage-1 VAE) or weights from outside the project (`load_external_weights()`: LFT's
    Hugging Face teacher). False if it names none."""
    source = getattr(model, "pretrained_weights", lambda: None)()
    if source is not None:
        load_pretrained(model, *source)
    external = getattr(model, "load_external_weights", None)
    if external is not None:
        external()
    return source is not None or external is not None


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
