"""One sweep run, as Submitit executes it: train each stage (world size 1), then score the
held-out text. Writes into the run's directory in the sweep dir:

  status.json   running / failed (with the traceback) / finished, host and pid
  <stage>/      the stage's run dir (config.yaml, metrics.jsonl, checkpoints/), plus stage_done.json
  result.json   the plan of the run, validation terms per stage and the held-out metric (`eval`)

result.json is written last and atomically, so its presence is what "finished" means.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path

import submitit

RESULT, STATUS, STAGE_DONE = "result.json", "status.json", "stage_done.json"


class SweepJob(submitit.helpers.Checkpointable):
    """On SLURM preemption or timeout Submitit calls `checkpoint()`, whose default resubmits this
    same call; the trainer then resumes each unfinished stage from its last checkpoint by itself."""

    def __call__(self, spec: dict) -> dict:
        return run_job(spec)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_job(spec: dict) -> dict:
    """Train every stage of `spec["run"]` (a RunPlan.to_dict()) and evaluate the last one."""
    os.chdir(spec["cwd"])  # configs and data paths are relative to where the sweep was launched
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    run = spec["run"]
    run_dir = Path(run["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    status = {"state": "running", "host": socket.gethostname(), "pid": os.getpid(), "started": t0,
              "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_JOB_ID", "")}
    write_json(run_dir / STATUS, status)
    try:
        valid = {s["name"]: train_stage(s) for s in run["stages"]}
        from lflm_dist.eval.likelihood import BoundSettings
        from lflm_dist.sweeps.metric import heldout_bpc
        metric = heldout_bpc(run["stages"][-1]["run_dir"], spec["eval_text"], BoundSettings(**spec["bound"]),
                             spec["eval_batch_size"])
    except BaseException:
        write_json(run_dir / STATUS, {**status, "state": "failed", "error": traceback.format_exc()})
        raise
    result = {**run, "valid": valid, "eval": metric, "wall_s": time.time() - t0}
    write_json(run_dir / RESULT, result)
    write_json(run_dir / STATUS, {**status, "state": "finished", "finished": time.time()})
    return result


def train_stage(stage: dict) -> dict:
    """Train one stage to its planned steps (resuming from its checkpoint if it has one) and return
    its final validation terms; a stage already marked done is skipped."""
    done = Path(stage["run_dir"]) / STAGE_DONE
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("steps") == stage["steps"]:
            return info["valid"]
    from lflm_dist.config import load_config
    from lflm_dist.train.dist import destroy
    from lflm_dist.train.trainer import Trainer

    cfg = load_config(stage["config"], stage["overrides"])
    try:
        final = Trainer(cfg).fit()
    finally:
        destroy()
    write_json(done, {"steps": stage["steps"], "valid": final})
    return final
