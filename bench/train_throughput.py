#!/usr/bin/env python
"""Training throughput of cola_tiny (stage 2: VAE + DiT) beside the AR baseline of equal
parameter count, trained by the same loop on the same shards, in one process.

Reports tokens/s, achieved FLOP/s (model FLOPs per token x tokens/s) and that as a fraction
of this machine's dense fp32 matmul FLOP/s, measured in the same run. Prints a table and
writes JSON (default bench/results/train_throughput.json).

    python bench/train_throughput.py [--steps 30] [--data data/shakespeare]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.config import load_config  # noqa: E402
from lflm_dist.train.trainer import Trainer  # noqa: E402

MODELS = {
    "cola_tiny (VAE+DiT)": ("configs/cola_tiny.yaml", ["model.cola.lambda_ref=0", "model.cola.ref_checkpoint="]),
    "ar_tiny": ("configs/ar_tiny.yaml", []),
}


def matmul_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """Dense fp32 matmul FLOP/s: best of repeated n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def train_rate(config: str, overrides: list[str], data: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, overrides + [f"run.dir={tmp}/run", f"data.path={data}", f"train.max_steps={steps}",
                                               f"train.ckpt_every={steps}", "train.eval_batches=1",
                                               "run.wandb_mode=disabled", "sample.num_samples=0"])
        trainer = Trainer(cfg)
        trainer.fit()
        rows = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][warmup:]
    step_time = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    return {"params": trainer.n_params, "flops_per_token": trainer.flops_per_token, "step_time_s": step_time,
            "tokens_per_s": tokens / step_time, "flops_per_s": trainer.flops_per_token * tokens / step_time,
            "final_loss": rows[-2]["loss"] if len(rows) > 1 else None, "steps_timed": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from timing")
    p.add_argument("--data", default="data/shakespeare", help="prepared data dir (make data)")
    p.add_argument("--out", default="bench/results/train_throughput.json")
    a = p.parse_args()
    if not (Path(a.data) / "tokenizer.json").is_file():
        sys.exit(f"{a.data} has no prepared data: run `make data` first")
    peak = matmul_peak()
    results = {name: train_rate(cfg, ov, a.data, a.steps, a.warmup) for name, (cfg, ov) in MODELS.items()}
    for r in results.values():
        r["fraction_of_matmul_peak"] = r["flops_per_s"] / peak
    print(f"\nmeasured dense fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s  (torch threads: {torch.get_num_threads()})")
    print(f"{'model':22} {'params':>9} {'MFLOP/tok':>10} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8}")
    for name, r in results.items():
        print(f"{name:22} {r['params'] / 1e6:8.2f}M {r['flops_per_token'] / 1e6:10.1f} {r['tokens_per_s']:10.0f} "
              f"{r['flops_per_s'] / 1e9:9.2f} {100 * r['fraction_of_matmul_peak']:7.1f}%")
    names = list(results)
    ratio = results[names[0]]["tokens_per_s"] / results[names[1]]["tokens_per_s"]
    print(f"tokens/s ratio {names[0]} / {names[1]}: {ratio:.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "matmul_peak_flops": peak, "steps": a.steps,
                               "results": results, "tokens_per_s_ratio_cola_over_ar": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
