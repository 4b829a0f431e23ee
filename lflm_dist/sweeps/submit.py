"""Run a sweep with Submitit: SLURM job arrays where a SLURM controller answers, local
processes otherwise. State lives in the sweep dir, so re-running the same command skips finished
runs, leaves running ones alone and resubmits failed or interrupted ones:

  SWEEP_DIR/plan.json, sweep.yaml     what was planned (rewritten on every submission)
  SWEEP_DIR/eval_text/                the fixed held-out text every run is scored on
  SWEEP_DIR/runs/FAMILY/BUDGET/SIZE/  one run: job.json (the submission), status.json, result.json
  SWEEP_DIR/submitit/                 Submitit's pickles and logs
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import submitit

import lflm_dist
from lflm_dist.config import ConfigError, load_config
from lflm_dist.sweeps.config import SweepConfig, to_yaml
from lflm_dist.sweeps.job import RESULT, STATUS, SweepJob, write_json
from lflm_dist.sweeps.metric import write_eval_text
from lflm_dist.sweeps.plan import RunPlan, format_plan, make_plan

SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


# ----------------------------------------------------------------------------- state
def run_state(run: RunPlan) -> str:
    """finished | stale (finished, but with another plan) | running | failed | interrupted | new."""
    d = Path(run.dir)
    if (d / RESULT).is_file():
        return "finished" if json.loads((d / RESULT).read_text()).get("key") == run.key() else "stale"
    if (d / "job.json").is_file() and _active(json.loads((d / "job.json").read_text())):
        return "running"
    if (d / STATUS).is_file():
        return "failed" if json.loads((d / STATUS).read_text())["state"] == "failed" else "interrupted"
    return "new"


def _active(job: dict) -> bool:
    if job["cluster"] == "slurm":
        try:
            return submitit.SlurmJob(job["folder"], job["job_id"]).state in SLURM_ACTIVE
        except Exception:  # sacct unreachable: do not submit a second copy blindly
            return True
    if job.get("host") != socket.gethostname():
        return False
    try:  # a local job is a controller process started by the sweep driver
        cmd = Path(f"/proc/{int(job['job_id'])}/cmdline").read_bytes()
        return b"submitit" in cmd
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- executor
def slurm_available() -> bool:
    """A SLURM controller answers (srun on PATH alone is not enough: the client may be installed
    without a running cluster)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def make_executor(cfg: SweepConfig) -> tuple[submitit.AutoExecutor, str]:
    cluster = cfg.sweep.cluster
    if cluster == "auto":
        cluster = "slurm" if slurm_available() else "local"
    ex = submitit.AutoExecutor(folder=Path(cfg.sweep.dir) / "submitit" / "%j", cluster=cluster)
    s = cfg.sweep.slurm
    if cluster == "slurm":
        extra = {k: v for k, v in (("account", s.account), ("qos", s.qos)) if v}
        ex.update_parameters(name=cfg.sweep.name, timeout_min=s.timeout_min, nodes=1, tasks_per_node=1,
                             cpus_per_task=s.cpus_per_task, gpus_per_node=s.gpus_per_node,
                             slurm_array_parallelism=s.array_parallelism,
                             slurm_additional_parameters={**extra, **s.additional},
                             **({"slurm_partition": s.partition} if s.partition else {}),
                             **({"mem_gb": s.mem_gb} if s.mem_gb else {}))
    else:
        ex.update_parameters(name=cfg.sweep.name, timeout_min=cfg.sweep.local_timeout_min, tasks_per_node=1)
    return ex, cluster


def job_spec(cfg: SweepConfig, run: RunPlan, text_dir: str) -> dict:
    return {"run": run.to_dict(), "cwd": os.getcwd(), "threads": cfg.sweep.threads_per_run,
            "eval_text": text_dir, "bound": asdict(cfg.eval.bound), "eval_batch_size": cfg.eval.batch_size}


def eval_source(cfg: SweepConfig, runs: list[RunPlan]) -> str:
    if cfg.eval.data:
        return cfg.eval.data
    last = runs[0].stages[-1]
    c = load_config(last.config, last.overrides)
    return str(Path(c.data.path) / c.data.valid_split)


# ----------------------------------------------------------------------------- driver
def run_sweep(cfg: SweepConfig, dry_run: bool = False, wait: bool | None = None, log=print) -> dict:
    """Plan, then submit every run that is not finished or running. Local runs are always waited
    for (`sweep.local_parallel` at a time); SLURM arrays only with `wait`. Returns the runs' states."""
    runs = make_plan(cfg)
    log(format_plan(runs))
    if dry_run:
        return {}
    root = Path(cfg.sweep.dir)
    root.mkdir(parents=True, exist_ok=True)
    text = write_eval_text(eval_source(cfg, runs), root, cfg.eval.max_chars)
    log(f"\nheld-out text: {text['chars']} characters of {text['source']} -> {text['dir']}")
    states = {r.run_id: run_state(r) for r in runs}
    stale = [k for k, v in states.items() if v == "stale"]
    if stale:
        raise ConfigError(f"{len(stale)} finished runs in {root} were planned differently ({', '.join(stale[:3])}"
                          f"{', ...' if len(stale) > 3 else ''}): a changed plan needs another sweep.dir")
    (root / "sweep.yaml").write_text(to_yaml(cfg))
    write_json(root / "plan.json", {"name": cfg.sweep.name, "runs": [r.to_dict() for r in runs]})
    todo = [r for r in runs if states[r.run_id] not in ("finished", "running")]
    log("state: " + ", ".join(f"{n} {s}" for s, n in _counts(states).items()) + f"; submitting {len(todo)}")
    if todo:
        # the jobs must import this source tree, not another checkout that happens to be installed
        src = str(Path(lflm_dist.__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        ex, cluster = make_executor(cfg)
        specs = [job_spec(cfg, r, text["dir"]) for r in todo]
        if cluster == "slurm":
            jobs = ex.map_array(SweepJob(), specs)  # one job array for the whole sweep
            for job, r in zip(jobs, todo):
                _record(job, r, cluster, root)
            log(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} runs) to SLURM")
            if wait:
                _wait([(j, r) for j, r in zip(jobs, todo)], log)
        else:
            _run_local(ex, cluster, specs, todo, cfg.sweep.local_parallel, root, log)
    states = {r.run_id: run_state(r) for r in runs}
    log("state: " + ", ".join(f"{n} {s}" for s, n in _counts(states).items()))
    return states


def _record(job, run: RunPlan, cluster: str, root: Path) -> None:
    Path(run.dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run.dir) / "job.json", {"cluster": cluster, "job_id": str(job.job_id), "host": socket.gethostname(),
                                            "folder": str(root / "submitit" / "%j"), "submitted": time.time()})


def _run_local(ex, cluster: str, specs: list[dict], todo: list[RunPlan], parallel: int, root: Path, log) -> None:
    """A rolling pool of `parallel` local Submitit jobs (each a process of its own)."""
    pending, active = list(zip(specs, todo)), []
    try:
        while pending or active:
            while pending and len(active) < max(1, parallel):
                spec, run = pending.pop(0)
                job = ex.submit(SweepJob(), spec)
                _record(job, run, cluster, root)
                active.append((job, run))
            active = _wait(active, log, until_one=True)
    except KeyboardInterrupt:
        for job, _ in active:  # local jobs outlive the driver otherwise
            job.cancel()
        raise


def _wait(active: list, log, until_one: bool = False) -> list:
    """Poll jobs, report each that ends; return those still running (after the first ends, with until_one)."""
    while active:
        still = []
        for job, run in active:
            if not job.done():
                still.append((job, run))
                continue
            try:
                r = job.result()
                log(f"[done] {run.run_id}: held-out {r['eval']['bpc']:.4f} bits/char ({r['wall_s']:.0f} s)")
            except Exception as e:  # noqa: BLE001  the traceback is in status.json and the job's log
                log(f"[failed] {run.run_id}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    f" (see {Path(run.dir) / STATUS} and {job.paths.stderr})")
        if until_one and len(still) < len(active):
            return still
        active = still
        if active:
            time.sleep(2)
    return []


def _counts(states: dict) -> dict:
    out: dict[str, int] = {}
    for s in states.values():
        out[s] = out.get(s, 0) + 1
    return out


__all__ = ["run_sweep", "run_state", "make_executor", "format_plan", "make_plan"]
