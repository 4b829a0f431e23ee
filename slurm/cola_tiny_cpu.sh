#!/bin/bash
# Cola DLM tiny on one CPU node under SLURM: the flow of slurm/cola_2b.sh at demo size, and
# what tests/test_slurm.py submits to a local SLURM. Two srun tasks (one process each; ranks
# from SLURM_PROCID/SLURM_NTASKS via lflm_dist.train.dist), gloo.
#
# Usage (from the repository root; the job cds to the submit dir):
#   sbatch slurm/cola_tiny_cpu.sh [dotted.key=value ...]     overrides for both stages
#   STAGE1_ARGS="train.max_steps=50" STAGE2_ARGS="train.max_steps=100" sbatch slurm/cola_tiny_cpu.sh
#
# Environment (default):
#   RUN_ROOT     (runs)                      parent of the two run dirs below
#   STAGE1_DIR   ($RUN_ROOT/cola_tiny_vae)   stage 1 run dir, configs/cola_tiny_vae.yaml (Text VAE)
#   STAGE2_DIR   ($RUN_ROOT/cola_tiny)       stage 2 run dir, configs/cola_tiny.yaml; its
#                                            model.cola.ref_checkpoint is STAGE1_DIR
#   STAGE1_ARGS, STAGE2_ARGS  ()             overrides for one stage (split on spaces)
#   DATA_DIR     (data/shakespeare)          data.path (`make data` prepares it)
#   VENV         (.venv)                     PYTHON defaults to $VENV/bin/python
#   PYTHON       ($VENV/bin/python)
# run.dir and model.cola.ref_checkpoint are set per stage from these; passing them as
# overrides is an error. A stage whose run dir holds DONE is skipped, so resubmitting a
# finished job does nothing and a requeued job continues where it stopped.
#
# Preemption: SIGUSR2 (`--signal=USR2@120` below, or `scancel --signal=USR2 [--batch] JOBID`)
# makes the trainer checkpoint after the current step and requeue the job; exit code 75.
# Logs: %x-%j.out / %x-%j.err in the submit dir, appended to across requeues.
#SBATCH --job-name=cola_tiny
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR2@120
#SBATCH --requeue
set -uo pipefail  # no -e: run_stage inspects exit codes itself

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: submit with sbatch: sbatch $0 [overrides]" >&2
  exit 2
fi
cd "$SLURM_SUBMIT_DIR" || exit 2
[ -f slurm/stages.sh ] || { echo "error: no slurm/stages.sh in $PWD: run sbatch from the repository root" >&2; exit 2; }
source slurm/stages.sh

: "${RUN_ROOT:=runs}"
: "${STAGE1_DIR:=$RUN_ROOT/cola_tiny_vae}"
: "${STAGE2_DIR:=$RUN_ROOT/cola_tiny}"
: "${DATA_DIR:=data/shakespeare}"
: "${VENV:=.venv}"
: "${PYTHON:=$VENV/bin/python}"
read -ra STAGE1 <<< "${STAGE1_ARGS:-}"
read -ra STAGE2 <<< "${STAGE2_ARGS:-}"
check_overrides "$@" "${STAGE1[@]}" "${STAGE2[@]}"
[ -x "$PYTHON" ] || { echo "error: no python at $PYTHON: run \`make setup\`, or set VENV= or PYTHON=" >&2; exit 2; }

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# srun of SLURM >= 22.05 does not inherit --cpus-per-task from sbatch; --kill-on-bad-exit: a
# crashed rank must not leave the others waiting in a collective
SRUN_ARGS=(--kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
slurm_setup

run_stage "stage 1 (Text VAE)" "$STAGE1_DIR" --config configs/cola_tiny_vae.yaml data.path="$DATA_DIR" \
  "$@" "${STAGE1[@]}"
run_stage "stage 2 (VAE + DiT prior)" "$STAGE2_DIR" --config configs/cola_tiny.yaml data.path="$DATA_DIR" \
  model.cola.ref_checkpoint="$STAGE1_DIR" "$@" "${STAGE2[@]}"
