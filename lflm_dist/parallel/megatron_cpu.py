"""The only place that adapts megatron-core to a machine without CUDA.

megatron-core 0.16.1's `parallel_state` and its Column/RowParallelLinear run on CPU with
gloo as long as the layers are built with `use_cpu_initialization=True` (the default path
calls `torch.cuda.current_device()` to allocate weights) and no fused kernels are asked
for (`gradient_accumulation_fusion=False`). Nothing in megatron is monkey-patched: this
module only chooses those settings and silences the warnings about missing Apex /
Transformer Engine and CUDA_DEVICE_MAX_CONNECTIONS, which do not apply on CPU. It is used
only when CUDA is absent. (megatron's output gather, gather_output=True, allocates on CUDA
regardless; `tp.gather_last_dim` does the same all-gather on every device instead.)
"""
from __future__ import annotations

import warnings

import torch


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def prepare() -> None:
    """Call before importing megatron.core when CUDA is absent."""
    if not cpu_only():
        return
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")


def layer_kwargs() -> dict:
    """ModelParallelConfig settings needed on CPU (none beyond the defaults on CUDA)."""
    return {"use_cpu_initialization": True} if cpu_only() else {}
