#!/usr/bin/env bash
# Single-node training under torchrun. All arguments go to `megatiny train`.
#   NPROC=2 launch/run_local.sh --config launch/configs/tiny-cpu.yaml train.steps=100   # CPU ranks
#   NGPU=8  launch/run_local.sh --config launch/configs/gpt2-124m.yaml                  # one GPU node
# NPROC (or NGPU) = processes on this node (default: number of GPUs, else 1).
# MAX_RESTARTS=N (default 0): torchrun restarts the whole job up to N times when a rank dies, and
# every attempt runs with --resume auto, so it continues from the newest intact checkpoint.
# The config is checked first, in one process (unknown keys, values, files): a mistake is printed
# once, last, before any rank starts.
# SIGTERM / SIGINT (Ctrl-C) to this script: every rank finishes its step, the ranks agree on it and
# save a checkpoint, and the script exits 128 + the signal (143, 130); a second signal (2 s or more
# later) stops the ranks at once, keeping the last complete checkpoint. Continue with --resume auto.
# A signal during the config check stops it (one line) and the script exits 143 / 130 at once.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib_signals.sh
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${NPROC:-}" ]; then
  NPROC=${NGPU:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
fi
# One intra-op thread per CPU rank unless told otherwise (ranks share the cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# GPUs (no effect on CPU): kernels in launch order, which the sequence-parallel backward overlap
# needs; a failed or timed-out NCCL collective ends the job (megatiny/training/launch_env.py).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RESUME=()
[ "$MAX_RESTARTS" -gt 0 ] && RESUME=(--resume auto)   # an --resume of yours, later, wins
WORLD_SIZE=$NPROC run_check_relaying_signals "$PYTHON" -m megatiny train --check ${RESUME[@]+"${RESUME[@]}"} "$@"
run_relaying_signals "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 \
  --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  -m megatiny train ${RESUME[@]+"${RESUME[@]}"} "$@"
