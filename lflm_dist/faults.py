"""Fault-injection trials: real training runs (launchers/pretrain.py, torchrun for 2 processes)
hit by a fault, then resumed by the same command, checked against an uninterrupted run.

  sigkill             SIGKILL (the whole process group) at a random moment
  kill_in_checkpoint  the run SIGKILLs itself half-way through a checkpoint write
                      (train.inject_kill_in_checkpoint): the half-written one must be ignored
  sigterm / sigusr2   at a random moment after the first step, to every training process: finish the step,
                      checkpoint, exit 0 / 75 (under torchrun it reports its workers' exit)
  nan                 a NaN loss injected at a random step: skipped and counted, run finishes
                      (DeepSpeed: stops naming the step, then the same command resumes)

Under DDP (1 and 2 processes), FSDP2, DeepSpeed ZeRO-2 and TP=2 (2 processes each). Each trial records: the exit of the faulted run, whether the resumed run reached the end, whether
its per-step losses equal the uninterrupted run's (exactly: same processes, CPU), completed
checkpoints lost (a checkpoint complete before the fault that no longer verifies afterwards: must
be 0) and metric lines lost (steps up to the newest checkpoint missing from metrics.jsonl: 0).
`tests/faults/` runs a few trials of each kind in CI;

    python -m lflm_dist.faults --trials 20 [--data data/shakespeare] [--nproc 1,2]

runs a longer soak, prints the table and writes bench/results/fault_soak.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/cola_tiny.yaml"
# a small Cola stage 2 (no stage-1 run needed) that trains in seconds on CPU
TINY = ["model.vae.encoder.dim=32", "model.vae.decoder.dim=32", "model.vae.encoder.n_heads=2",
        "model.vae.decoder.n_heads=2", "model.dit.net.dim=32", "model.dit.net.n_heads=2", "model.dit.net.n_layers=2",
        "model.cola.lambda_ref=0", "model.cola.ref_checkpoint=", "model.cola.latent_stats=track",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2", "train.lr=3e-3",
        "run.wandb_mode=disabled", "sample.num_samples=0", "data.num_workers=1"]
KINDS = ("sigkill", "kill_in_checkpoint", "sigterm", "sigusr2", "nan")
# parallel strategies a trial can run under (2 processes for all but ddp, which also runs alone)
STRATEGIES = {"ddp": [], "fsdp2": ["parallel.strategy=fsdp2"],
              "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"], "tp2": ["parallel.tp=2"]}
EXPECTED_EXIT = {"sigterm": 0, "sigusr2": 75}


def command(data: Path, run: Path, nproc: int, extra: list[str], base: list[str]) -> list[str]:
    args = [str(ROOT / "launchers" / "pretrain.py"), "--config", str(ROOT / CONFIG), *base,
            f"data.path={data}", f"run.dir={run}", *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _metric_steps(run_dir: Path) -> set[int]:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []
    return {r["step"] for r in rows if "loss" in r}


def _complete(run_dir: Path) -> list[Path]:
    from lflm_dist.train.checkpoint import checkpoint_dir
    d = checkpoint_dir(run_dir)
    return sorted(p for p in d.glob("step_*") if (p / "trainer.json").is_file()) if d.is_dir() else []


def _settings(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", "train.ckpt_every=2", "train.keep_checkpoints=3"]


def reference(data: Path, work: Path, nproc: int, steps: int, base: list[str]) -> list[float]:
    """Losses of the uninterrupted run (cached per process count and settings)."""
    ref = work / f"reference_{nproc}_{zlib.crc32(' '.join(base).encode()):08x}"
    if not (ref / "DONE").is_file():
        p = run(command(data, ref, nproc, _settings(steps), base))
        if p.returncode:
            raise RuntimeError(f"reference run failed:\n{p.stderr[-3000:]}")
    return losses(ref)


def trial(kind: str, data: Path, work: Path, nproc: int, rng: random.Random, steps: int = 12,
          base: list[str] = TINY, strategy: str = "ddp") -> dict:
    """One faulted run and its resumption under `strategy` (STRATEGIES); returns what happened."""
    base = base + STRATEGIES[strategy]
    ref = reference(data, work, nproc, steps, base)
    rdir = work / f"{kind}_{strategy}_{nproc}_{rng.randrange(10**9)}"
    extra = _settings(steps)
    out = {"kind": kind, "strategy": strategy, "nproc": nproc}
    if kind == "kill_in_checkpoint":
        extra = extra + [f"train.inject_kill_in_checkpoint={2 * rng.randint(1, steps // 2 - 1)}"]
    if kind == "nan":
        extra = extra + [f"train.inject_nonfinite_steps=[{rng.randint(2, steps - 1)}]"]
    cmd = command(data, rdir, nproc, extra, base)
    if kind in ("kill_in_checkpoint", "nan"):
        first = run(cmd)
    else:  # a signal at a random moment after a random number of logged steps
        first = _signal_at_random(cmd, rdir, kind, rng, steps)
    out["exit"] = first.returncode
    out["finished_first"] = (rdir / "DONE").is_file()  # the fault came too late: the run had finished
    before = {p.name: p for p in _complete(rdir)}
    newest = int(max(before).split("_")[1]) if before else 0
    from lflm_dist.train.checkpoint import verify_checkpoint
    out["checkpoints_lost"] = sum(1 for p in before.values() if verify_checkpoint(p))
    out["metric_lines_lost"] = len(set(range(1, newest + 1)) - _metric_steps(rdir))
    if kind == "nan":  # finishes with the step skipped; DeepSpeed stops instead (documented), then resumes
        out["stopped"] = first.returncode != 0 and "non-finite loss or gradient" in first.stderr
        resumed = first if first.returncode == 0 else run(command(data, rdir, nproc, _settings(steps), base))
    else:
        resumed = run(command(data, rdir, nproc, _settings(steps), base))
    out["resumed"] = resumed.returncode == 0 and (rdir / "DONE").is_file()
    out["reported_incomplete"] = "[resume] ignoring" in resumed.stdout
    got = losses(rdir) if (rdir / "metrics.jsonl").is_file() else []
    if kind == "nan":
        rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
        out["losses_equal"] = None  # a skipped update changes what follows, by design
        out["skipped_nonfinite"] = max((r.get("skipped_nonfinite", 0) for r in rows), default=None)
    else:
        out["losses_equal"] = got == ref
    # the tails of both runs' stderr (progress bars included, so not too short) when the resume failed
    out["detail"] = (first.stderr[-2000:] + "\n---\n" + resumed.stderr[-2000:]).strip() if not out["resumed"] else ""
    return out


def _signal_at_random(cmd, rdir: Path, kind: str, rng: random.Random, steps: int) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
                         start_new_session=True)
    # logged steps to wait for: SIGKILL from 0 (possibly still starting up); SIGTERM / SIGUSR2 from 1, as
    # before the trainer installs its handlers (imports, model build) their default action kills the
    # process, which is the sigkill case
    after = rng.randint(0 if kind == "sigkill" else 1, steps - 4)
    while len(_metric_steps(rdir)) < after and p.poll() is None:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    if p.poll() is None:
        sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr2": signal.SIGUSR2}[kind]
        if kind == "sigkill":
            os.killpg(p.pid, sig)  # every process of the job, as a node failure would
        else:  # to every training process, as SLURM signals each task (torchrun itself does not relay SIGUSR2)
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            for pid in ([int(k) for k in kids] if "torch.distributed.run" in cmd else [p.pid]):
                os.kill(pid, sig)
    stdout, stderr = p.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def table(rows: list[dict]) -> str:
    lines = [f"{'kind':>20} {'strategy':>8} {'nproc':>5} {'trials':>6} {'resumed':>7} {'losses equal':>12} {'ckpts lost':>10} "
             f"{'metric lines lost':>17}"]
    for key in sorted({(r["kind"], r["strategy"], r["nproc"]) for r in rows}):
        rs = [r for r in rows if (r["kind"], r["strategy"], r["nproc"]) == key]
        eq = [r["losses_equal"] for r in rs if r["losses_equal"] is not None]
        lines.append(f"{key[0]:>20} {key[1]:>8} {key[2]:>5} {len(rs):>6} {sum(r['resumed'] for r in rs):>7} "
                     f"{(str(sum(eq)) if eq else '-'):>12} {sum(r['checkpoints_lost'] for r in rs):>10} "
                     f"{sum(r['metric_lines_lost'] for r in rs):>17}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="trials per (kind, process count)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--nproc", default="1,2", help="process counts for ddp, comma-separated")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"of {', '.join(STRATEGIES)}; all but ddp run on 2 processes")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare"), help="prepared data dir (make data)")
    p.add_argument("--work", default=str(ROOT / "runs" / "fault_soak"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fault_soak.json"))
    a = p.parse_args(argv)
    data = Path(a.data)
    if not (data / "train" / "manifest.json").is_file():
        print(f"{data} has no prepared splits: run `make data` first (or pass --data)", file=sys.stderr)
        return 2
    from lflm_dist.data.shards import read_manifest
    base = TINY + [f"model.seq_len={read_manifest(data / 'train')['seq_len']}"]
    work, rng, rows = Path(a.work), random.Random(a.seed), []
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    setups = [(s, n) for s in a.strategies.split(",") for n in ([int(n) for n in a.nproc.split(",")]
                                                                  if s == "ddp" else [2])]
    for strategy, nproc in setups:
        for kind in a.kinds.split(","):
            for i in range(a.trials):
                r = trial(kind, data, work, nproc, rng, a.steps, base, strategy)
                rows.append(r)
                print(f"[{time.time() - t0:6.0f}s] {kind} {strategy} nproc={nproc} trial {i + 1}/{a.trials}: exit {r['exit']}, "
                      f"resumed {r['resumed']}, losses equal {r['losses_equal']}, ckpts lost {r['checkpoints_lost']}",
                      flush=True)
    if Path(a.out).is_file():  # keep earlier trials of (kind, strategy, nproc) this run did not repeat
        done = {(r["kind"], r["strategy"], r["nproc"]) for r in rows}
        rows = [r for r in json.loads(Path(a.out).read_text())["trials"]
                if (r["kind"], r.get("strategy", "ddp"), r["nproc"]) not in done] + rows
    print(table(rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"trials": rows, "steps": a.steps, "seed": a.seed, "data": str(data),
                                       "seconds_this_run": round(time.time() - t0)}, indent=2) + "\n")
    print(f"wrote {a.out}")
    bad = [r for r in rows if not r["resumed"] or r["losses_equal"] is False or r["checkpoints_lost"]
           or r["metric_lines_lost"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
