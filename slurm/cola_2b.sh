#!/bin/bash
# Cola DLM at 2B (configs/cola_2b_vae.yaml, then configs/cola_2b.yaml) on NODES x GPUS_PER_NODE
# GPUs: one srun task per GPU, no torchrun (ranks from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
# via lflm_dist.train.dist), rendezvous at the allocation's first node.
#
# Usage (from the repository root; the job cds to the submit dir):
#   sbatch slurm/cola_2b.sh [dotted.key=value ...]          the #SBATCH defaults below
#   sbatch -N 16 -p gpu -A myproj slurm/cola_2b.sh          sbatch flags override them
#   NODES=16 PARTITION=gpu ACCOUNT=myproj bash slurm/cola_2b.sh [overrides]
#       run outside a job, the script submits itself with the settings below
#   STAGE2_ARGS="train.max_steps=100000" DATA_DIR=/data/pretrain_100k sbatch slurm/cola_2b.sh
#
# Settings: environment variables (default). The first six only apply when the script
# submits itself (#SBATCH lines cannot read variables); inside a job the allocation rules.
#   PARTITION      ()                 sbatch --partition; empty: the cluster's default
#   ACCOUNT        ()                 sbatch --account; empty: your default account
#   NODES          (8)                sbatch --nodes
#   GPUS_PER_NODE  (8)                --gpus-per-node and --ntasks-per-node (one task per GPU)
#   CPUS_PER_GPU   (12)               --cpus-per-task (data loader workers + the main thread)
#   TIME           (2-00:00:00)       --time; with --signal=USR2@120 a run checkpoints and
#                                     requeues itself 2 minutes before it
#   CONTAINER      ()                 an image for pyxis/enroot (srun --container-image); empty: VENV
#   CONTAINER_MOUNTS ($PWD:$PWD)      --container-mounts (add your data and run dirs)
#   VENV           (.venv)            without CONTAINER, PYTHON is $VENV/bin/python
#   PYTHON         ($VENV/bin/python; python in a container)
#   DATA_DIR       (data/pretrain_100k)  data.path: tokenizer.json, train/ and valid/ shards
#   RUN_ROOT       (runs)             parent of the two run dirs
#   STAGE1_DIR     ($RUN_ROOT/cola_2b_vae)   stage 1 run dir (Text VAE)
#   STAGE2_DIR     ($RUN_ROOT/cola_2b)       stage 2 run dir; model.cola.ref_checkpoint=STAGE1_DIR
#   STAGE1_ARGS, STAGE2_ARGS ()       overrides for one stage (split on spaces); arguments to
#                                     the script apply to both. run.dir and ref_checkpoint are
#                                     set from the dirs above; passing them is an error.
#
# Each stage is skipped once its run dir holds DONE (it reached train.max_steps). Preemption
# (docs/slurm.md): on SIGUSR2 the trainer finishes the step, checkpoints, rank 0 runs
# `scontrol requeue`, the tasks exit 75 and this script stops; the requeued job resumes.
# Logs: %x-%j.out / %x-%j.err in the submit dir, appended to across requeues.
#SBATCH --job-name=cola_2b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR2@120
#SBATCH --requeue
set -uo pipefail  # no -e: run_stage inspects exit codes itself

: "${PARTITION:=}" "${ACCOUNT:=}" "${NODES:=8}" "${GPUS_PER_NODE:=8}" "${CPUS_PER_GPU:=12}" "${TIME:=2-00:00:00}"

if [ -z "${SLURM_JOB_ID:-}" ]; then
  # not in a job: submit this file with the settings above; the environment (DATA_DIR, ...)
  # travels with it (sbatch --export=ALL)
  exec sbatch --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_GPU" --time="$TIME" ${PARTITION:+--partition="$PARTITION"} \
    ${ACCOUNT:+--account="$ACCOUNT"} "$0" "$@"
fi
cd "$SLURM_SUBMIT_DIR" || exit 2
[ -f slurm/stages.sh ] || { echo "error: no slurm/stages.sh in $PWD: run sbatch from the repository root" >&2; exit 2; }
source slurm/stages.sh

: "${RUN_ROOT:=runs}"
: "${STAGE1_DIR:=$RUN_ROOT/cola_2b_vae}"
: "${STAGE2_DIR:=$RUN_ROOT/cola_2b}"
: "${DATA_DIR:=data/pretrain_100k}"
: "${VENV:=.venv}"
: "${CONTAINER:=}"
: "${CONTAINER_MOUNTS:=$PWD:$PWD}"
read -ra STAGE1 <<< "${STAGE1_ARGS:-}"
read -ra STAGE2 <<< "${STAGE2_ARGS:-}"
check_overrides "$@" "${STAGE1[@]}" "${STAGE2[@]}"

# --kill-on-bad-exit: a crashed rank must not leave the others waiting in a collective until
# the NCCL timeout. srun of SLURM >= 22.05 does not inherit --cpus-per-task from sbatch.
SRUN_ARGS=(--kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
if [ -n "$CONTAINER" ]; then
  SRUN_ARGS+=(--container-image="$CONTAINER" --container-mounts="$CONTAINER_MOUNTS" --container-workdir="$PWD")
  : "${PYTHON:=python}"
else
  : "${PYTHON:=$VENV/bin/python}"
  [ -x "$PYTHON" ] || { echo "error: no python at $PYTHON: set VENV= (a venv with this package) or CONTAINER=" >&2; exit 2; }
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun sets it: 8 processes a node share its cores
slurm_setup

run_stage "stage 1 (Text VAE)" "$STAGE1_DIR" --config configs/cola_2b_vae.yaml data.path="$DATA_DIR" \
  "$@" "${STAGE1[@]}"
run_stage "stage 2 (VAE + DiT prior)" "$STAGE2_DIR" --config configs/cola_2b.yaml data.path="$DATA_DIR" \
  model.cola.ref_checkpoint="$STAGE1_DIR" "$@" "${STAGE2[@]}"
