#!/usr/bin/env bash
# Issue 12's GPU checks in one pass, for a session that is lent a GPU for a few minutes:
#   1. bench/train_mfu.py --size 2b: Cola 2B stage 2 and the AR of equal parameters, bf16, one GPU,
#      without and with activation checkpointing (each stage its own JSON file, so a stage cut
#      short by its time limit keeps what the earlier stages measured);
#   2. tests/test_cuda.py: FlexAttention vs the dense mask on CUDA, and the trainer on NCCL with one
#      process under FSDP2 / ZeRO 1-3 giving the plain run's losses (TP needs 2 GPUs: NCCL
#      refuses two ranks on one device);
#   3. torch.compile rows (Cola's and the AR's; COMPILE_VARIANTS=compile,ac+compile for both) last.
# Each stage has its own time limit (seconds, below) and writes its log and JSON under OUT.
# Seen on one H200 (2026-12-04): a machine started in ~30 s; each 2B variant took ~40 s (20 s
# to build and initialise, the rest imports and steps); the AR's compile row finished within
# 130 s; the FlexAttention tests passed within ~100 s; the NCCL strategy tests (11 training runs,
# each a fresh process importing torch and DeepSpeed) did not finish in 200 s, hence 330 below.
# The defaults add up to ~12.5 minutes, inside a 15-minute lease (an estimate, not yet run whole).
# The GPU image needs pytest-timeout (it has it) for the tests stage.
#
#   bash bench/gpu_checks.sh OUT [WHEEL_DIR]
# WHEEL_DIR: wheels to install first on a machine whose Python has torch but not this project's
# other dependencies (nothing can be downloaded there). Made here, for CPython 3.12 on x86-64:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d WHEEL_DIR \
#     webdataset==1.0.2 braceexpand megatron-core==0.16.1 hjson pydantic pydantic-core \
#     annotated-types typing-inspection typing_extensions
#   pip wheel --no-deps deepspeed==0.19.8 -w WHEEL_DIR     # a pure-Python wheel; ops build lazily
set -u
OUT=${1:?usage: bash bench/gpu_checks.sh OUT [WHEEL_DIR]}
WHEELS=${2:-}
T_MFU=${T_MFU:-200} T_COMPILE=${T_COMPILE:-200} T_TEST=${T_TEST:-330}
MFU_ARGS=${MFU_ARGS:---steps 6 --warmup 2 --timeout 120}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl 2>&1 | tail -3
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -m pip list 2>/dev/null | grep -iE '^(deepspeed|megatron|webdataset|triton) '
} 2>&1 | tee "$OUT/env.txt"

stage() {  # name, limit, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.log"
  echo "=== $name: rc $rc in $((SECONDS - t0))s ==="
}
stage mfu "$T_MFU" python3 bench/train_mfu.py --size 2b --variants base,ac $MFU_ARGS --out "$OUT/train_mfu_2b.json"
stage cuda_tests "$T_TEST" python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/test_cuda.py
stage mfu_compile "$T_COMPILE" python3 bench/train_mfu.py --size 2b --models ${COMPILE_MODELS:-ar,cola} \
  --variants ${COMPILE_VARIANTS:-compile} $MFU_ARGS --out "$OUT/train_mfu_2b_compile.json"
