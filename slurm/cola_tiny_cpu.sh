#!/bin/bash
# Cola DLM tiny on CPU under SLURM: one task per process, srun sets the ranks
# (lflm_dist.train.dist maps SLURM_PROCID/SLURM_NTASKS onto RANK/WORLD_SIZE).
#   sbatch slurm/cola_tiny_cpu.sh [dotted.key=value ...]
#SBATCH --job-name=cola_tiny
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=runs/slurm-%j.out
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} WANDB_MODE=${WANDB_MODE:-offline}
# Stage 1 then stage 2; a requeued job re-runs both commands and each resumes from its checkpoint.
srun .venv/bin/python launchers/pretrain.py --config configs/cola_tiny_vae.yaml "$@"
srun .venv/bin/python launchers/pretrain.py --config configs/cola_tiny.yaml "$@"
