"""Which layouts of Llama-3.1-8B and -70B fit on 8 and 64 H100 (`megatiny plan --search` of
benchmarks/plan_configs/llama3-8b-torchtitan.yaml, ZeRO levels 0-3 among the candidates; each
search plans at most 24 layouts spread over the (tp, pp, cp) shapes and says which shapes it
planned), written into docs/scaling.md between its `zero-search` markers.

    .venv/bin/python benchmarks/zero_search.py            # ~4-5 min on a 2-core machine
    .venv/bin/python benchmarks/zero_search.py --print    # the block only, docs untouched
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "benchmarks/plan_configs/llama3-8b-torchtitan.yaml"
MODELS = {
    "Llama-3.1-8B": [],
    "Llama-3.1-70B": ["model.d_model=8192", "model.n_layers=80", "model.n_heads=64",
                      "model.n_kv_heads=8", "model.ffn_hidden=28672"],
}  # fmt: skip
BEGIN, END = "<!-- zero-search:begin -->", "<!-- zero-search:end -->"


def run(model: str, world: int) -> str:
    cmd = ["megatiny", "plan", "--config", CONFIG, "--world-size", str(world), "--search",
           "--top", "8", *MODELS[model]]  # fmt: skip
    exe = [sys.executable, "-m", "megatiny", *cmd[1:]]
    out = subprocess.run(exe, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return f"{model} on {world} H100 (`{' '.join(cmd)}`):\n\n```\n{out.strip()}\n```\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print", action="store_true", help="print the block, leave the docs alone")
    args = ap.parse_args()
    parts = []
    for world in (8, 64):
        for model in MODELS:
            parts.append(run(model, world))
            print(parts[-1], flush=True)
    block = "\n".join(parts)
    if args.print:
        return 0
    path = os.path.join(ROOT, "docs/scaling.md")
    text = open(path, encoding="utf-8").read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{block}{END}{tail}")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
