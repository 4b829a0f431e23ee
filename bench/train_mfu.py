#!/usr/bin/env python
"""Training throughput, MFU, step time and peak memory of Cola DLM (stage 2: Text VAE + DiT
prior + frozen reference encoder) beside the AR baseline of equal trainable parameters
(configs/ar_tiny.yaml, configs/ar_2b.yaml), on one
device, through the trainer's own step (lflm_dist.train.trainer.forward_backward) and the
parallel layer, with and without activation checkpointing and torch.compile.

  --size 2b    configs/cola_2b.yaml (0.6B VAE + 2.2B DiT, vocab 100352, seq 512) on one GPU, bf16.
               MFU = model FLOP/s / 989 TFLOP/s (H100/H200 bf16 dense; never the sparse figure).
  --size tiny  configs/cola_tiny.yaml and ar_tiny.yaml on CPU (fp32): MFU is the fraction of this machine's
               dense fp32 matmul peak, measured in this run (the best of `--peak-reps` 1024^3
               matmuls at the variants' thread count, before they start), so CI-like machines can
               run it. As the trainer does on CPU, each variant first makes glibc keep freed memory
               (lflm_dist.train.host_memory).

Weights are random (throughput does not depend on them) and batches are random token ids.
Each variant runs in a fresh subprocess (clean memory peak and compile caches); with
`--repeats N` the whole list runs N times, interleaved, and each row reports the median of its
runs' step times (machine noise then hits every row alike). Beside each measured peak memory is
the planner's prediction (lflm_dist.parallel.plan) for the same micro-batch. Prints a table, the
Cola / AR tokens/s ratio per variant, and writes JSON (default
bench/results/train_mfu_<size>_<device>.json).

    python bench/train_mfu.py --size tiny --repeats 3
    python bench/train_mfu.py --size 2b --micro-batch 8 --variants base,ac,compile,ac+compile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lflm_dist.config import load_config  # noqa: E402

SIZES = {  # size: (Cola config, AR baseline config of equal trainable parameters)
    "2b": ("configs/cola_2b.yaml", "configs/ar_2b.yaml"),
    "tiny": ("configs/cola_tiny.yaml", "configs/ar_tiny.yaml"),
}
# configs/ar_tiny.yaml stays at 2.71M (the AR row of docs/cola_ablation.md); at dim 176 it has
# cola_tiny's parameters (3.20M against 3.26M since cola_tiny's prior grew a token mixture)
AR_EQUAL = {"tiny": ["model.ar.net.dim=176"], "2b": []}


def bench_config(size: str, model: str, micro_batch: int, variant: str, strategy: str, extra: list[str],
                 grad_accum: int = 1):
    parts = variant.split("+")
    ov = [f"train.global_batch_size={micro_batch * grad_accum}", f"train.grad_accum={grad_accum}",
          f"parallel.strategy={strategy}",
          f"parallel.activation_checkpointing={'ac' in parts}", f"parallel.compile={'compile' in parts}",
          "run.wandb_mode=disabled"]
    if model == "cola":  # the reference encoder is a random frozen copy: init_pretrained=False never reads it
        ov += ["model.cola.ref_checkpoint=bench-random-init"]
    if size == "tiny":
        ov += ["model.vocab_size=2048", "train.precision=fp32"]
    else:
        ov += ["train.precision=bf16"]
    if model == "ar":
        ov += AR_EQUAL[size]
    return load_config(ROOT / SIZES[size][model == "ar"], ov + extra)


def run_one(args) -> dict:
    """One variant in this process: build, parallelise, time `steps` optimizer steps."""
    from lflm_dist.models.registry import build_model, count_params, init_model
    from lflm_dist.parallel import build_parallel, needs_process_group
    from lflm_dist.parallel.mfu import device_peak, peak_memory_mb
    from lflm_dist.parallel.plan import plan
    from lflm_dist.train.dist import init_distributed
    from lflm_dist.train.trainer import forward_backward

    cfg = bench_config(args.size, args.model, args.micro_batch, args.variant, args.strategy, args.override,
                       args.grad_accum)
    d = init_distributed(cfg.parallel.backend, force=needs_process_group(cfg.parallel))
    if d.device.type == "cpu":
        from lflm_dist.train.host_memory import retain_freed_memory
        retain_freed_memory()  # as the trainer does on CPU
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(cfg.model, device="meta")
    n_params, fpt = count_params(model), model.flops_per_token()
    engine = build_parallel(model, cfg, d.device, init=lambda m, dev: init_model(m, dev, 0, pretrained=False))
    build_s = time.perf_counter() - t0
    bf16 = cfg.train.precision == "bf16"
    peak = args.peak_flops or device_peak(d.device, bf16)
    B, L = args.micro_batch, cfg.model.seq_len
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)

    def train_step(batches: list[dict]) -> float:
        """One optimizer step as the trainer takes it; returns the loss (a host sync)."""
        terms = forward_backward(engine, batches, cfg, d.device)
        engine.clip_grad_norm(cfg.train.grad_clip)
        engine.step()
        return float(terms["loss"])

    def batches_of(step: int) -> list[dict]:
        return random_batches(cfg, B, step, args.grad_accum, g, d.device)

    if args.profile:
        return profile_steps(lambda step: train_step(batches_of(step)), sync, d.device, args)
    times = []
    for step in range(args.warmup + args.steps):
        batches = batches_of(step)
        sync()
        t = time.perf_counter()
        loss = train_step(batches)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
        if step == 0:
            first_step_s = time.perf_counter() - t
    step_s = statistics.median(times)
    tok_s = B * L * args.grad_accum / step_s
    measured_mb = peak_memory_mb(d.device)
    predicted = plan(cfg, "ddp", 1, 1, B, bf16, cfg.parallel.activation_checkpointing)
    return {"model": args.model, "variant": args.variant, "strategy": args.strategy,
            "params": n_params, "flops_per_token": fpt, "micro_batch": B, "grad_accum": args.grad_accum, "seq_len": L,
            "step_time_s": step_s, "step_time_min_s": min(times), "tokens_per_s": tok_s,
            "flops_per_s": fpt * tok_s, "mfu": fpt * tok_s / peak if peak else None, "peak_flops": peak,
            "peak_mem_gib": measured_mb / 1024, "planned_mem_gib": predicted["total"] / 2 ** 30,
            "build_s": build_s, "first_step_s": first_step_s, "final_loss": loss, "steps_timed": len(times),
            "attention": cfg.model.attention, "dtype": "bf16" if bf16 else "fp32"}


def random_batches(cfg, B: int, step: int, grad_accum: int, g: torch.Generator, device) -> list[dict]:
    """One optimizer step's micro-batches of random token ids (throughput does not depend on them)."""
    from lflm_dist.models.noise import sample_keys
    return [{"input_ids": torch.randint(0, cfg.model.vocab_size, (B, cfg.model.seq_len), generator=g).to(device),
             "noise_key": sample_keys(0, step, i * B, B).to(device)} for i in range(grad_accum)]


def profile_steps(step, sync, device, args) -> dict:
    """`--profile N`: after the warm-up steps, N steps (`step(i)`, run_one's optimizer step) under
    torch.profiler; prints the kernels (or CPU ops) that take most of the device's time and writes
    the table to --out (.txt). Returns the profiled wall time and kernel-busy time per step (the
    rest is launch/host gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    for i in range(args.warmup):
        step(i)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(args.profile):
            step(args.warmup + i)
        sync()
    wall = (time.perf_counter() - t) / args.profile
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    # kernels only (an op's self device time is its kernels' again); "Command Buffer Full" is the
    # host waiting for room in the launch queue, not work
    kernels = [e for e in events if (e.device_type == DeviceType.CUDA) == cuda and "Command Buffer" not in e.key]
    busy = sum(getattr(e, key) for e in kernels) / 1e6 / args.profile  # seconds per step
    table = events.table(sort_by=key, row_limit=40, max_name_column_width=70)
    head = (f"{args.model} {args.variant}: {wall * 1e3:.1f} ms/step wall, {busy * 1e3:.1f} ms/step "
            f"{'kernel' if cuda else 'CPU op'} time ({100 * busy / wall:.0f}%), {args.profile} steps profiled")
    print(head + "\n" + table, file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(head + "\n" + table)
    return {"model": args.model, "variant": args.variant, "profile_wall_s": wall, "profile_busy_s": busy}


def run_variant(a, model: str, v: str, peak: float, rep: int) -> dict:
    """One variant in a fresh subprocess (run_one); its result row, or one with an error."""
    cmd = [sys.executable, __file__, "--one", "--size", a.size, "--model", model, "--variant", v,
           "--strategy", a.strategy, "--micro-batch", str(a.micro_batch), "--grad-accum", str(a.grad_accum),
           "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--peak-flops", str(peak), *a.override]
    print(f"[train_mfu] {model} {v}" + (f" (run {rep + 1}/{a.repeats})" if a.repeats > 1 else "") + " ...",
          flush=True)
    try:
        pr = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"model": model, "variant": v, "error": f"timed out after {a.timeout}s"}
    out = [ln for ln in pr.stdout.splitlines() if ln.startswith("RESULT ")]
    if pr.returncode or not out:
        print(pr.stderr[-2000:], file=sys.stderr)
        return {"model": model, "variant": v, "error": (pr.stderr.strip().splitlines() or ["?"])[-1][-300:]}
    return json.loads(out[-1][len("RESULT "):])


def merge_runs(runs: list[dict]) -> dict:
    """One row from a variant's repeated runs: the run with the median step time, with every
    run's step time listed (an error row if no run succeeded)."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["step_time_s"])
    if not ok:
        return runs[-1]
    return {**ok[(len(ok) - 1) // 2], "runs_step_time_s": [r["step_time_s"] for r in runs if "error" not in r]}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from lflm_dist.parallel.mfu import _cpu_name
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="2b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--models", default="cola,ar", help="comma list of cola, ar")
    p.add_argument("--variants", default="", help="comma list of base, ac, compile, ac+compile "
                   "(default: all four on CUDA, base,ac on CPU)")
    p.add_argument("--strategy", default="ddp", help="ddp (one device, plain) | fsdp2 | deepspeed")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default 8 for 2b, 32 for tiny)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (a run of the "
                   "config's global batch on few GPUs accumulates; the optimizer's cost is then shared)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, allocator warm-up)")
    p.add_argument("--out", default="", help="JSON path (default bench/results/train_mfu_<size>_<device>.json)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    p.add_argument("--repeats", type=int, default=1, help="run the model/variant list this many times, "
                   "interleaved; rows report the median")
    p.add_argument("--peak-reps", type=int, default=100, help="CPU: 1024^3 fp32 matmuls timed for the peak "
                   "(the best counts; contention only lowers it, so more reps approach the real peak)")
    p.add_argument("--peak-flops", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("override", nargs="*", help="dotted config overrides for both models")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="with --one: profile N steps after the warm-up and print the top ops by device time "
                   "(the table also goes to --out); e.g. --one --model ar --variant base --profile 2")
    p.add_argument("--one", action="store_true", help="run one model/variant in this process (--model, --variant)")
    p.add_argument("--model", default="cola", help="with --one: cola or ar")
    p.add_argument("--variant", default="base", help="with --one: base, ac, compile or ac+compile")
    a = p.parse_args()
    a.micro_batch = a.micro_batch or (8 if a.size == "2b" else 32)
    if a.one:
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return
    if a.size == "2b" and not torch.cuda.is_available():
        sys.exit("--size 2b needs a CUDA GPU (about 60 GiB at micro-batch 8); use --size tiny on CPU")
    variants = a.variants.split(",") if a.variants else (
        ["base", "ac", "compile", "ac+compile"] if torch.cuda.is_available() else ["base", "ac"])
    peak = 0.0
    if not torch.cuda.is_available():
        from lflm_dist.parallel.mfu import measure_cpu_peak
        peak = measure_cpu_peak(1024, a.peak_reps)
        print(f"[train_mfu] fp32 matmul peak {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads, best of "
              f"{a.peak_reps})", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(a.repeats):
        for model in a.models.split(","):
            for v in variants:
                runs.setdefault((model, v), []).append(run_variant(a, model, v, peak, rep))
    rows = [merge_runs(rs) for rs in runs.values()]
    dev = device_name()
    what = "MFU (of 989 TFLOP/s bf16 dense)" if torch.cuda.is_available() else (
        f"of this run's measured fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s)")
    print(f"\ndevice: {dev}   torch {torch.__version__}   size {a.size}   micro-batch {a.micro_batch} "
          f"x {a.grad_accum} accumulated   "
          f"strategy {a.strategy}")
    print(f"{'model':5} {'variant':11} {'params':>8} {'GFLOP/tok':>9} {'step s':>7} {'tokens/s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'plan GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:5} {r['variant']:11} error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        print(f"{r['model']:5} {r['variant']:11} {r['params'] / 1e6:7.1f}M {r['flops_per_token'] / 1e9:9.3f} "
              f"{r['step_time_s']:7.3f} {r['tokens_per_s']:9.0f} {r['flops_per_s'] / 1e12:8.2f} {mfu} "
              f"{r['peak_mem_gib']:8.2f} {r['planned_mem_gib']:8.2f}")
    print(f"MFU column: {what}")
    ratios = {}
    for v in variants:
        tok = {r["model"]: r["tokens_per_s"] for r in rows if r.get("variant") == v and "error" not in r}
        if "cola" in tok and "ar" in tok:
            ratios[v] = tok["cola"] / tok["ar"]
            print(f"cola / ar tokens/s ({v}): {ratios[v]:.3f}")
    import re
    tag = "cpu" if not torch.cuda.is_available() else next(
        (w.lower() for w in dev.split() if re.fullmatch(r"[A-Z]+\d+[A-Z]*", w)), re.sub(r"\W+", "_", dev).lower())
    out = Path(a.out or ROOT / f"bench/results/train_mfu_{a.size}_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "size": a.size, "platform": platform.platform(),
                               "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "strategy": a.strategy,
                               "steps": a.steps,
                               "warmup": a.warmup, "repeats": a.repeats, "peak_flops": peak or None,
                               "mfu_denominator": what, "cola_over_ar_tokens_per_s": ratios, "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
