# Stage flow shared by slurm/cola_2b.sh and slurm/cola_tiny_cpu.sh; sourced, not run.
#
#   slurm_setup                      rendezvous host/port, SIGUSR2 trap, a banner line in the log
#   run_stage NAME RUN_DIR ARGS...   `srun "${SRUN_ARGS[@]}" $PYTHON launchers/pretrain.py
#                                    ARGS... run.dir=RUN_DIR` unless RUN_DIR/DONE exists
#
# Preemption (docs/slurm.md): SIGUSR2 reaches the trainer either straight from SLURM
# (`--signal=USR2@120` signals the job steps) or through this shell (`scancel --signal=USR2
# --batch` signals only the batch shell). srun runs in the background so that bash can run
# the trap while it `wait`s (a foreground child would delay the trap until it exits); the
# trap forwards the signal to srun, which forwards it to every task. The trainer
# checkpoints, rank 0 runs `scontrol requeue` and the tasks exit with PREEMPT_EXIT: this
# script then stops instead of starting the next stage. On the requeued run, finished stages
# are skipped (their DONE file) and the interrupted one resumes from its checkpoint.

PREEMPT_EXIT=75  # lflm_dist.train.preemption.EXIT_CODE
PREEMPTED=0      # set by the trap: this shell was signalled
SIGNALS=0        # trap count: tells an interrupted `wait` from a finished srun
SRUN_PID=

_log() { echo "[slurm $(date +%T)] $*"; }

_on_usr2() {
  PREEMPTED=1
  SIGNALS=$((SIGNALS + 1))
  if [ -n "$SRUN_PID" ]; then
    _log "batch shell got SIGUSR2: forwarding it to srun (pid $SRUN_PID)"
    kill -USR2 "$SRUN_PID" 2>/dev/null || true
  else
    _log "batch shell got SIGUSR2 between stages"
  fi
}

slurm_setup() {
  # every task rendezvouses at the allocation's first node (dist.py's fallback computes the same)
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
  export PYTHONUNBUFFERED=1  # log lines reach %x-%j.out as they happen
  trap _on_usr2 USR2
  _log "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}," \
       "master ${MASTER_ADDR}:${MASTER_PORT}"
}

_job_id() {  # what scontrol requeue takes; array tasks are ARRAYJOB_TASK
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; else echo "$SLURM_JOB_ID"; fi
}

_requeue_and_exit() {
  _log "requeueing job $(_job_id): $1"
  scontrol requeue "$(_job_id)" || _log "scontrol requeue failed: submit the same sbatch command again to resume"
  exit "$PREEMPT_EXIT"
}

run_stage() {
  local name=$1 dir=$2 rc n
  shift 2
  if [ -f "$dir/DONE" ]; then
    _log "$name: $dir/DONE exists (reached train.max_steps), skipping"
    return 0
  fi
  # signalled while no stage ran (the previous one had just finished): no time for this one
  [ "$PREEMPTED" = 1 ] && _requeue_and_exit "signalled before $name started"
  _log "$name: ${PYTHON} launchers/pretrain.py $* run.dir=$dir"
  srun "${SRUN_ARGS[@]}" "$PYTHON" launchers/pretrain.py "$@" run.dir="$dir" &
  SRUN_PID=$!
  while :; do  # a trap interrupts `wait` (status > 128) while srun still runs: wait again
    n=$SIGNALS
    rc=0
    wait "$SRUN_PID" || rc=$?
    [ "$n" = "$SIGNALS" ] && break
  done
  SRUN_PID=
  case $rc in
    0) if [ -f "$dir/DONE" ]; then _log "$name: finished"; return 0; fi
       # exit 0 without DONE: stopped by SIGTERM after a checkpoint (scancel): end the job, resumable
       _log "$name: stopped before train.max_steps (checkpointed); the same sbatch command resumes it"
       exit 0 ;;
    "$PREEMPT_EXIT") _log "$name: checkpointed on SIGUSR2; the trainer requeued the job"; exit "$PREEMPT_EXIT" ;;
  esac
  # a task died on the signal itself (it came before the trainer installed its handler): the
  # last periodic checkpoint is what there is; requeue so the job resumes from it
  [ "$PREEMPTED" = 1 ] && _requeue_and_exit "$name exited with $rc after SIGUSR2"
  _log "$name: failed with exit code $rc (see the errors above)"
  exit "$rc"
}

# A dotted override naming what the script sets per stage would silently split the stages'
# run dirs or the stage-2 reference: refuse it, naming the variable to use instead.
check_overrides() {
  local a
  for a in "$@"; do
    case $a in
      run.dir=*) echo "error: $a: the run dirs come from STAGE1_DIR / STAGE2_DIR (or RUN_ROOT)" >&2; exit 2 ;;
      model.cola.ref_checkpoint=*) echo "error: $a: stage 2's reference is STAGE1_DIR" >&2; exit 2 ;;
    esac
  done
}
