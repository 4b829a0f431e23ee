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

SIGTERM (`kill`, `scancel`, SLURM's own preemption, torchrun passing on its own SIGTERM) is
handled the same way up to the checkpoint, but never requeues: a job must stay cancellable. The
run exits with STOP_EXIT_CODE, 0: it ended as asked, with nothing lost. A finished run is told
from a stopped one by `<run.dir>/DONE` (written only at train.max_steps), which is what the batch
script (slurm/stages.sh) checks before starting the next stage; the same command resumes it. The step in progress finishes first: the grace period the
sender allows (SLURM's KillWait / GraceTime, torchrun's 30 s) must cover one step and a checkpoint.
`train.preempt_grace_s` bounds it from this side: when that many seconds pass after the signal
before the checkpoint is complete, the process requeues (SIGUSR2) and exits with the same code
without it, the previous checkpoint being the newest, rather than being killed mid-write.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import torch
import torch.distributed as dist

SIGNAL = signal.SIGUSR2  # checkpoint, requeue, exit EXIT_CODE
STOP_SIGNAL = signal.SIGTERM  # checkpoint, exit STOP_EXIT_CODE
# EX_TEMPFAIL of sysexits.h: "temporary failure, retry later". Distinct from 1 (an exception)
# and 2 (a configuration or data error); slurm/stages.sh tests for it.
EXIT_CODE = 75
STOP_EXIT_CODE = 0  # stopped as asked; DONE is absent, so the run is not taken for finished
_CODES = {STOP_SIGNAL: 1.0, SIGNAL: 2.0}  # all-reduced with max: a requeue request wins over a stop


class Preempted(Exception):
    """Training stopped at `step` on a signal, after checkpointing to `checkpoint`; `requeue`:
    SIGUSR2 (put the job back in the queue) rather than SIGTERM (just stop)."""

    def __init__(self, step: int, checkpoint, requeue: bool = True):
        super().__init__(f"{'preempted' if requeue else 'stopped'} at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.requeue = step, checkpoint, requeue
        self.signal = SIGNAL if requeue else STOP_SIGNAL


class PreemptionFlag:
    """Installs the SIGUSR2 and SIGTERM handlers (main thread only: Python runs handlers there)
    and keeps what they set. The flag is per process; `requested()` is the collective decision."""

    def __init__(self, device: torch.device, grace_s: float = 0.0):
        self.device, self.grace_s = device, grace_s
        self.code = 0.0
        self.previous = {}
        self.timer: threading.Timer | None = None
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._on_signal) for sig in _CODES}

    def restore(self) -> None:
        """Put back the handlers found at start (a process that goes on after training, such as a
        test runner, must die of SIGTERM again)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self.timer is not None:  # the step and checkpoint finished in time
            self.timer.cancel()
            self.timer = None

    def _on_signal(self, signum, frame) -> None:
        # nothing else: printing or collectives here could re-enter what was interrupted
        self.code = max(self.code, _CODES[signum])
        if self.grace_s > 0 and self.timer is None:
            self.timer = threading.Timer(self.grace_s, self._expire, args=(signum,))
            self.timer.daemon = True
            self.timer.start()

    def _expire(self, signum) -> None:
        """The grace period ran out before the step and its checkpoint were done: exit now, as
        the signal asked, with the previous checkpoint the newest (a half-written one is ignored)."""
        requeued = signum == SIGNAL and requeue()
        print(f"[preempt] train.preempt_grace_s={self.grace_s:g} s ran out before this step's checkpoint was "
              f"complete: exiting without it{'; requeued' if requeued else ''}. The same command resumes from "
              "the previous checkpoint.", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE if signum == SIGNAL else STOP_EXIT_CODE)

    @property
    def flag(self) -> bool:
        return self.code > 0

    def requested(self) -> float:
        """Collective, the same on every rank: 0 (carry on), 1 (SIGTERM: stop) or 2 (SIGUSR2:
        stop and requeue) when any rank got a signal."""
        if not dist.is_initialized():
            return self.code
        t = torch.tensor([self.code], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


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
