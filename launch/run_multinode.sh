#!/usr/bin/env bash
# Multi-node training: run this once on every node (c10d rendezvous). Arguments go to `megatiny train`.
#   node 0..3: NNODES=4 NODE_RANK=0..3 MASTER_ADDR=10.0.0.1 NGPU=8 launch/run_multinode.sh --config launch/configs/llama-7b.yaml
# Env: NNODES, NODE_RANK, MASTER_ADDR (node 0's address, reachable from all nodes), MASTER_PORT
# (default 29500), NGPU/NPROC (processes per node), RDZV_ID (job id, default megatiny),
# LOCAL_ADDR (this node's address, when the hostname does not resolve to it). For gloo pick the
# interface with GLOO_SOCKET_IFNAME, for NCCL with NCCL_SOCKET_IFNAME.
# MAX_RESTARTS (default 3): when a rank dies, torchrun restarts the job on every node up to this
# many times; each attempt runs with --resume auto (the newest intact checkpoint of run_dir).
# MAX_RESTARTS=0 turns that off (and with it the implied --resume auto).
# The config is checked first on every node, in one process: a mistake is printed once, last.
# SIGTERM / SIGINT to this script: the ranks finish their step, agree on it across the nodes,
# save a checkpoint and stop; the script exits 128 + the signal (launch/lib_signals.sh). During the
# config check: the check stops (one line) and the script exits 128 + the signal before torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib_signals.sh
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NPROC=${NPROC:-${NGPU:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# GPUs (no effect on CPU): kernels in launch order, which the sequence-parallel backward overlap
# needs; a failed or timed-out NCCL collective ends the job (megatiny/training/launch_env.py).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
EXTRA=()
# Node 0 hosts the c10d store on MASTER_ADDR:MASTER_PORT.
[ "$NODE_RANK" = 0 ] && EXTRA+=(--rdzv-conf is_host=1)
[ -n "${LOCAL_ADDR:-}" ] && EXTRA+=(--local-addr="$LOCAL_ADDR")
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESUME=()
[ "$MAX_RESTARTS" -gt 0 ] && RESUME=(--resume auto)   # an --resume of yours, later, wins
WORLD_SIZE=$((NNODES * NPROC)) run_check_relaying_signals "$PYTHON" -m megatiny train --check ${RESUME[@]+"${RESUME[@]}"} "$@"
run_relaying_signals "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" \
  --nproc-per-node="$NPROC" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="${RDZV_ID:-megatiny}" --max-restarts="$MAX_RESTARTS" "${EXTRA[@]}" \
  -m megatiny train ${RESUME[@]+"${RESUME[@]}"} "$@"
