"""`megatiny debug comm RUN_DIR`: what `train.trace_comm=true` wrote to run_dir/comm.jsonl, totalled.

    $ megatiny debug comm runs/tp2dp2
    communication of rank 0 (the rank that moves the most bytes in training steps), per step,
    averaged over 5 traced steps; step time 0.0412 s (metrics.jsonl)
    group   op               phase        calls/step      bytes/step   seconds/step  share of step
    tp      all_reduce       train                24       1,572,864         0.0061          14.8%
    ...
    per training step: tp 1,572,864 | pp 0 | dp 423,936 | cp 0 bytes  (= `megatiny plan
    --config runs/tp2dp2/config.yaml --world-size 4 --json`'s comm_bytes_per_step)

Bytes are as megatiny/parallel/collectives.py counts them (numel x itemsize of the full tensor an
op works on), grouped as the planner groups them (megatiny/plan/predict.py's COMM_CATEGORY), so the
`train` phase's totals are the planner's `comm_bytes_per_step` for the run's layout.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict

# group name -> the planner's category (megatiny/plan/predict.py COMM_CATEGORY)
CATEGORY = {"tp": "tp", "pp": "pp", "embedding": "pp", "dp": "dp", "dp_cp": "dp", "cp": "cp"}


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _step_seconds(run_dir: str, world_size: int) -> float | None:
    """Median seconds of a training step: the global batch's tokens / metrics.jsonl's tokens/s."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    except OSError:
        return None
    rates = [r["tokens_per_second"] for r in rows
             if "split" not in r and r.get("tokens_per_second")]  # fmt: skip
    if not rates:
        return None
    p, t = cfg["parallel"], cfg["train"]
    dp = world_size // (p["tp"] * p["pp"] * p["cp"])
    batch = t.get("global_batch_size") or t["micro_batch_size"] * dp
    return batch * cfg["data"]["seq_length"] / statistics.median(rates)


def summarize(run_dir: str, rank: int | None = None) -> dict:
    """{rank, steps, rows: [{group, op, phase, calls, bytes, seconds} per step], per_step: {tp,
    pp, dp, cp} bytes of the train phase per step, step_seconds}."""
    path = os.path.join(run_dir, "comm.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {path}: run with train.trace_comm=true to record communication per step"
        )
    rows = read_rows(path)
    train_steps: dict[int, set] = defaultdict(set)
    moved: dict[int, int] = defaultdict(int)
    for r in rows:
        if r["phase"] == "train":
            train_steps[r["rank"]].add(r["step"])
            moved[r["rank"]] += r["bytes"]
    if rank is None:
        rank = max(moved, key=lambda k: (moved[k], -k)) if moved else min(r["rank"] for r in rows)
    steps = max(len(train_steps.get(rank, ())), 1)
    totals: dict[tuple, list] = defaultdict(lambda: [0, 0, 0.0])
    for r in rows:
        if r["rank"] == rank:
            t = totals[(r["group"], r["op"], r["phase"])]
            t[0] += r["calls"]
            t[1] += r["bytes"]
            t[2] += r["seconds"]
    per_step = {"tp": 0, "pp": 0, "dp": 0, "cp": 0}
    out_rows = []
    for (group, op, phase), (calls, nbytes, seconds) in sorted(totals.items()):
        out_rows.append({"group": group, "op": op, "phase": phase, "calls": calls / steps,
                         "bytes": nbytes / steps, "seconds": seconds / steps})  # fmt: skip
        if phase == "train" and group in CATEGORY:
            per_step[CATEGORY[group]] += nbytes / steps
    return {"rank": rank, "steps": steps, "rows": out_rows, "per_step": per_step,
            "step_seconds": _step_seconds(run_dir, len({r["rank"] for r in rows}))}  # fmt: skip


def format_summary(s: dict, run_dir: str) -> str:
    step_s = s["step_seconds"]
    when = (
        f"step time {step_s:.4g} s (metrics.jsonl)" if step_s else "no step time in metrics.jsonl"
    )
    lines = [
        f"communication of rank {s['rank']} (the rank that moves the most bytes in training "
        f"steps), per step, averaged over {s['steps']} traced steps; {when}",
        f"{'group':<10} {'op':<18} {'phase':<11} {'calls/step':>10} {'bytes/step':>15} "
        f"{'seconds/step':>13} {'share of step':>14}",
    ]
    for r in s["rows"]:
        share = f"{100 * r['seconds'] / step_s:.1f}%" if step_s else "-"
        lines.append(f"{r['group']:<10} {r['op']:<18} {r['phase']:<11} {r['calls']:>10.3g} "
                     f"{r['bytes']:>15,.0f} {r['seconds']:>13.4f} {share:>14}")  # fmt: skip
    p = s["per_step"]
    lines.append(
        "per training step: " + " | ".join(f"{k} {v:,.0f}" for k, v in p.items()) + " bytes  "
        f"(compare `megatiny plan --config {os.path.join(run_dir, 'config.yaml')} --world-size N "
        "--json`'s comm_bytes_per_step)"
    )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory of a run with train.trace_comm=true")
    parser.add_argument("--rank", type=int, default=None,
                        help="this rank (default: the one that moves the most bytes)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    try:
        s = summarize(args.run_dir, args.rank)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"megatiny debug comm: {e}", file=sys.stderr)
        return 1
    print(json.dumps(s) if args.json else format_summary(s, args.run_dir))
    return 0
