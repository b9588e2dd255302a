#!/usr/bin/env bash
# The one GPU check: run on a machine with one CUDA GPU (H100 / H200), under 8 minutes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # default runs/gpu_check
#
# 1. the GPU tests (`pytest -m gpu`: kernels vs torch in bf16/fp16 at real shapes incl. flash
#    attention fwd+bwd, the model with fused kernels vs without, a bf16 training step);
# 2. the kernel benchmarks (GB/s vs HBM peak for softmax / norms / cross-entropy, flash attention
#    TFLOP/s vs F.scaled_dot_product_attention);
# 3. 30 steps of single-GPU training of launch/configs/gpt2-124m.yaml on generated tokens
#    (no data files needed), reporting tokens/s and MFU from its metrics.jsonl;
# then OUT_DIR/summary.json and OUT_DIR/summary.md (benchmarks/gpu_summary.py).
# Needs a Python with megatiny installed against a CUDA build of torch (PYTHON, default python).
# CONFIG / STEPS override the training run (e.g. to try the script's plumbing on CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-launch/configs/gpt2-124m.yaml}
STEPS=${STEPS:-30}
mkdir -p "$OUT"
status=0

echo "== 1. GPU tests =="
MEGATINY_GPU_TESTS=1 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py \
    --junitxml "$OUT/gpu_tests.xml" -p no:cacheprovider | tee "$OUT/gpu_tests.txt" || status=1

echo "== 2. kernel benchmarks =="
timeout 240 "$PYTHON" benchmarks/kernels.py --json "$OUT/kernels.json" --plot "$OUT/kernels.png" \
    | tee "$OUT/kernels.txt" || status=1

echo "== 3. training: $CONFIG, $STEPS steps on generated tokens =="
"$PYTHON" - "$OUT/data/tokens" "$CONFIG" <<'PY' || status=1
import sys

import numpy as np

from megatiny.config import Config
from megatiny.data.indexed import IndexedDatasetWriter

prefix, config = sys.argv[1], sys.argv[2]
vocab = Config.from_yaml(config, ["model.vocab_size=50257"]).model.vocab_size
rng = np.random.default_rng(0)
with IndexedDatasetWriter(prefix, dtype=np.uint16 if vocab < 65500 else np.int32,
                          vocab_size=vocab) as w:
    for _ in range(2000):  # ~2M tokens: enough for 30 steps of 96 x 1024 without wrapping much
        w.add_document(rng.integers(0, vocab, size=1024))
print(f"wrote {prefix}.bin/.idx")
PY
rm -rf "$OUT/run"
"$PYTHON" -m megatiny train --config "$CONFIG" data.path="$OUT/data/tokens" data.tokenizer=null \
    model.vocab_size=50257 parallel.tp=1 parallel.pp=1 train.steps="$STEPS" train.global_batch_size=96 train.log_interval=10 \
    train.eval_interval=0 train.eval_iters=5 train.save_interval=0 train.tensorboard=false \
    train.progress_bar=false train.run_dir="$OUT/run" | tee "$OUT/train.txt" || status=1

"$PYTHON" benchmarks/gpu_summary.py "$OUT" || status=1
exit $status
