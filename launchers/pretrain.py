#!/usr/bin/env python
"""Pretrain a model family: `python launchers/pretrain.py --config configs/cola_tiny.yaml [key=value ...]`.

Single process as is; DDP under `torchrun --nproc_per_node N`. Re-running the same command
on a run dir that has a checkpoint resumes from it. At the end, prints validation loss
terms and a few samples (or, for a stage-1 Cola VAE, reconstructions)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.run_pretrain import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 run.dir=runs/x")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.exit(main(args.config, args.overrides))
