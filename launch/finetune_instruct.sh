#!/usr/bin/env bash
# Instruction fine-tuning (the LLMs-from-scratch book, ch. 7) of a chat model in its own chat
# format, on question/answer pairs from `chatterbot-corpus==1.3.3` (pip wheel, BSD-3; English
# conversations: the first line is the instruction, the second the response), loss on the
# response only; held-out loss before and after, then `generate --chat` on held-out questions.
#
#   launch/finetune_instruct.sh MODEL_DIR OUTDIR      (PYTHON defaults to .venv/bin/python)
#
# MODEL_DIR: a megatiny model directory with a chat tokenizer (launch/prepare_smollm.sh). Knobs
# (environment): STEPS (60), BATCH (8), LR (5e-5), TRAINABLE (last N blocks, 4; "all" = every
# block), MAX_LEN (128), PRECISION (auto; bf16 speeds up CPUs with AMX), HELD_OUT (fraction, 0.1).
# Writes OUTDIR/data/{train,valid}.jsonl, OUTDIR/before (one step at lr 1e-30, which changes no
# fp32 weight: the held-out loss of the untouched model), OUTDIR/run (the fine-tuned model) and
# OUTDIR/replies.txt.
set -euo pipefail

MODEL="${1:?usage: launch/finetune_instruct.sh MODEL_DIR OUTDIR}"
OUT="${2:?usage: launch/finetune_instruct.sh MODEL_DIR OUTDIR}"
PYTHON="${PYTHON:-.venv/bin/python}"
STEPS="${STEPS:-60}" BATCH="${BATCH:-8}" LR="${LR:-5e-5}" TRAINABLE="${TRAINABLE:-4}"
MAX_LEN="${MAX_LEN:-128}" PRECISION="${PRECISION:-auto}" HELD_OUT="${HELD_OUT:-0.1}"

mkdir -p "$OUT/raw" "$OUT/data"
if [[ ! -d "$OUT/raw/chatterbot_corpus" ]]; then
    "$PYTHON" -m pip download --quiet --no-deps -d "$OUT/raw" chatterbot-corpus==1.3.3
    "$PYTHON" -m zipfile -e "$OUT"/raw/chatterbot_corpus-1.3.3-*.whl "$OUT/raw"
fi
"$PYTHON" - "$OUT" "$HELD_OUT" <<'PY'
import glob, json, random, sys
import yaml
out, held_out = sys.argv[1], float(sys.argv[2])
rows = []
for path in sorted(glob.glob(f"{out}/raw/chatterbot_corpus/data/english/*.yml")):
    with open(path, encoding="utf-8") as f:
        for conv in yaml.safe_load(f)["conversations"]:
            if len(conv) >= 2 and all(isinstance(x, str) and x.strip() for x in conv[:2]):
                rows.append({"instruction": conv[0].strip(), "input": "", "output": conv[1].strip()})
seen, unique = set(), []
for r in rows:  # one answer per question: held-out questions are unseen in training
    if r["instruction"].lower() not in seen:
        seen.add(r["instruction"].lower())
        unique.append(r)
random.Random(0).shuffle(unique)
n_valid = int(len(unique) * held_out)
for name, part in (("valid", unique[:n_valid]), ("train", unique[n_valid:])):
    with open(f"{out}/data/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
print(f"{len(unique)} question/answer pairs: {len(unique) - n_valid} train, {n_valid} held out")
PY
BLOCKS=(--trainable-blocks "$TRAINABLE")
[[ "$TRAINABLE" == all ]] && BLOCKS=()
COMMON=(--task instruction --checkpoint "$MODEL" --tokenizer "$MODEL" --prompt-format chat
        --train "$OUT/data/train.jsonl" --valid "$OUT/data/valid.jsonl" --max-len "$MAX_LEN"
        --batch-size "$BATCH" --precision "$PRECISION" --no-progress-bar "${BLOCKS[@]}")
echo "== held-out loss of the untouched model (one step at lr 1e-30: below fp32 resolution) =="
[[ -f "$OUT/before/finetune.json" ]] ||
    "$PYTHON" -m megatiny finetune "${COMMON[@]}" --output "$OUT/before" --steps 1 --lr 1e-30
echo "== fine-tuning =="
[[ -f "$OUT/run/finetune.json" ]] ||
    "$PYTHON" -m megatiny finetune "${COMMON[@]}" --output "$OUT/run" --steps "$STEPS" --lr "$LR" \
        --warmup-steps 5 --eval-interval "$STEPS" --log-interval 10 --resume auto
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
before = json.load(open(f"{out}/before/finetune.json"))["evals"][-1]
after = json.load(open(f"{out}/run/finetune.json"))["evals"][-1]
print(f"held-out loss: before {before['loss']:.4f} (perplexity {before['perplexity']:.2f}), "
      f"after {after['loss']:.4f} (perplexity {after['perplexity']:.2f})")
PY
echo "== generate --chat on held-out questions =="
: > "$OUT/replies.txt"
head -n 3 "$OUT/data/valid.jsonl" | while IFS= read -r row; do
    q=$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["instruction"])' "$row")
    for model in "$MODEL" "$OUT/run"; do
        reply=$("$PYTHON" -m megatiny generate --checkpoint "$model" --chat --temperature 0 \
            --max-new-tokens 60 --prompt "$q")
        printf '%s\n  Q: %s\n  A: %s\n' "$model" "$q" "$reply" | tee -a "$OUT/replies.txt"
    done
done
