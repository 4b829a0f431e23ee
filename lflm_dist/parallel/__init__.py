"""Parallelism applied from outside the model (torchtitan-style `parallelize`)."""
from lflm_dist.parallel.wrap import parallelize, unwrap

__all__ = ["parallelize", "unwrap"]
