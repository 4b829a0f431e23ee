"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""
from __future__ import annotations

import math

import torch

from lflm_dist.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters: PyTorch's fused kernel on GPU and CPU (one
    pass over each parameter; on CPU some 20x faster than the multi-tensor `foreach` path, which
    runs each of its elementwise ops over every parameter in turn); with DeepSpeed optimizer
    offload (`cpu_offload`), DeepSpeed's vectorised CPU Adam, which steps the fp32 partitions
    held in host memory."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm gains, biases and embeddings are not decayed (GPT-2 / nanoGPT convention).
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), adamw_mode=True)
    fused = all(p.device.type in ("cuda", "cpu") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate used for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
