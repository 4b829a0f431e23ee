"""Parallelism applied from outside the model (torchtitan-style `parallelize`): DDP, FSDP2,
DeepSpeed ZeRO 1/2/3 and megatron-core tensor parallelism. See docs/parallel.md."""
from lflm_dist.parallel.wrap import build_parallel, needs_process_group, unwrap

__all__ = ["build_parallel", "needs_process_group", "unwrap"]
