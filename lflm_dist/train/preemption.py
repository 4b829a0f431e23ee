"""Preemption under SLURM, the way lingua does it: SIGUSR2 asks the run to stop.

SLURM sends SIGUSR2 ahead of the time limit (`#SBATCH --signal=USR2@120`) and `scancel
--signal=USR2` sends it on demand; USR1 is avoided because NCCL and Lightning install their
own USR1 handlers. The handler only sets a flag (a signal can land anywhere, even inside a
collective). After each optimizer step every rank calls `requested()`, an all-reduce (max)
of the flag: SLURM may signal only some ranks, or only the batch shell, which forwards to
srun; the all-reduce makes all ranks stop at the same step. The trainer then writes a
checkpoint and raises `Preempted`; the launcher has rank 0 run `scontrol requeue` and exits
with EXIT_CODE, which tells the batch script (slurm/stages.sh) not to start the next stage.
The requeued job re-runs the batch script; the trainer resumes from the checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import torch
import torch.distributed as dist

SIGNAL = signal.SIGUSR2
# EX_TEMPFAIL of sysexits.h: "temporary failure, retry later". Distinct from 1 (an exception)
# and 2 (a configuration or data error); slurm/stages.sh tests for it.
EXIT_CODE = 75


class Preempted(Exception):
    """Training stopped at `step` on a preemption signal, after checkpointing to `checkpoint`."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class PreemptionFlag:
    """Installs the SIGUSR2 handler (main thread only: Python runs handlers there) and keeps
    the flag it sets. The flag is per process; `requested()` is the collective decision."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(SIGNAL, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.flag = True  # nothing else: printing or collectives here could re-enter what was interrupted

    def requested(self) -> bool:
        """Collective: True on every rank when any rank got the signal."""
        if not dist.is_initialized():
            return self.flag
        t = torch.tensor([float(self.flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: array tasks are named ARRAYJOB_TASK."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue() -> bool:
    """Rank 0, after the checkpoint is complete on every rank: put the SLURM job back in the
    queue (SLURM then ends this allocation). Outside SLURM there is nothing to requeue: the
    caller exits and the same command resumes later. Returns whether the job was requeued."""
    job = slurm_job_id()
    if job is None:
        print("[preempt] not under SLURM (no SLURM_JOB_ID): checkpoint written, exiting; re-run the same "
              "command to resume", flush=True)
        return False
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        ok, why = p.returncode == 0, (p.stderr or p.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    if ok:
        print(f"[preempt] requeued SLURM job {job}; it resumes from the checkpoint", flush=True)
    else:
        print(f"[preempt] could not requeue SLURM job {job} ({why}); the checkpoint is complete: submit the "
              "same sbatch command again to resume (scontrol requeue needs a batch job "
              "submitted with --requeue, or JobRequeue=1 in slurm.conf)", file=sys.stderr, flush=True)
    return ok
