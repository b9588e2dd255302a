"""Pipeline bubble: measured on gloo CPU ranks against the schedule simulator.

    .venv/bin/python benchmarks/pipeline_bubble.py --pp 4 --micro-batches 8 --out bubble.png

Every stage is a one-linear model chunk; the executor's action hook sleeps each compute action's
cost (F = B = W = t per stage, BW = 2t, a chunk of v costs 1/v of it), so the measurement does
not depend on how many cores the machine has. The schedules run through the real executor and
batched p2p of megatiny.parallel (megatiny/parallel/schedules.py); the simulated figures come
from megatiny/parallel/schedule_sim.py with the same costs. Per schedule:

    bubble = (T - C) / C       T: wall time of one step (worst rank), C: compute (slept) time

The table prints the simulated and measured bubble and their ratio to 1F1B's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.config.layout import min_micro_batches  # noqa: E402
from megatiny.fsutil import atomic_path  # noqa: E402
from megatiny.parallel import ParallelContext  # noqa: E402
from megatiny.parallel.schedule_ir import placement_for  # noqa: E402
from megatiny.parallel.schedule_sim import simulate  # noqa: E402
from megatiny.parallel.schedules import build_schedule, checked_schedule  # noqa: E402
from megatiny.testing import run_ranks  # noqa: E402

D_MODEL, SEQ, MICRO = 8, 4, 1
SCHEDULES = [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-h2", 1), ("zb-v", 2),
             ("dualpipev", 2)]  # fmt: skip


class SleepChunk(nn.Module):
    """A model chunk with the interface forward_step uses: one small linear (W has a GEMM)."""

    def __init__(self, stage: int, n_stages: int):
        super().__init__()
        self.config = type("Cfg", (), {"d_model": D_MODEL})()
        self.lin = nn.Linear(D_MODEL, D_MODEL)
        self.is_first_chunk, self.is_last_chunk = stage == 0, stage == n_stages - 1
        self.virtual_stage = stage

    def embed_tokens(self, input_ids, position_ids=None):
        return input_ids.float()[..., None].expand(*input_ids.shape, D_MODEL)

    def run_blocks(self, h, position_ids=None):
        return self.lin(h)

    def head_loss(self, h, labels, loss_mask=None):
        return h.mean()


def _rank_worker(kind, v, pp, m, t, repeats):
    ctx = ParallelContext.initialize(pp=pp)
    placement = placement_for(kind, pp, v)
    chunks = [SleepChunk(s, pp * v) for s, r in enumerate(placement) if r == ctx.pp_rank]
    run = build_schedule(ctx, chunks, MICRO, SEQ, schedule=kind)
    busy = [0.0]

    def hook(action):
        start = time.perf_counter()
        time.sleep((2 if action.op == "BW" else 1) * t / v)
        busy[0] += time.perf_counter() - start

    run.action_hook = hook
    batch = {"input_ids": torch.ones(MICRO, SEQ, dtype=torch.long), "labels": None}
    batches = [dict(batch) for _ in range(m)]
    run(batches)  # warm-up: gloo opens its pair connections on first use
    best = None
    for _ in range(repeats):
        dist.barrier()
        busy[0] = 0.0
        start = time.perf_counter()
        run(batches)
        wall = time.perf_counter() - start
        walls = [torch.tensor([wall, busy[0]]) for _ in range(pp)]
        dist.all_gather(walls, torch.tensor([wall, busy[0]]))
        worst_wall = max(w[0].item() for w in walls)
        compute = max(w[1].item() for w in walls)
        bubble = (worst_wall - compute) / compute
        best = bubble if best is None else min(best, bubble)
    return best


def measure(pp, m, t, repeats):
    rows = []
    for kind, v in SCHEDULES:
        if (kind == "interleaved" and m % pp) or m < min_micro_batches(kind, pp):
            continue  # interleaved: m % p == 0; dualpipev: m >= 2p
        measured = run_ranks(_rank_worker, pp, args=(kind, v, pp, m, t, repeats), timeout=600)[0]
        unit = {"F": t / v, "B": t / v, "W": t / v}
        simulated = simulate(checked_schedule(kind, pp, m, v), unit).bubble
        rows.append(dict(kind=kind, v=v, m=m, simulated=simulated, measured=measured))
    return rows


def plot(rows, path, pp, m):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["simulated"] for r in rows], 0.4, label="simulated")
    ax.bar([i + 0.2 for i in x], [r["measured"] for r in rows], 0.4, label="measured")
    ax.set_xticks(list(x), [r["kind"] for r in rows])
    ax.set_ylabel("bubble = idle / compute (worst rank)")
    ax.set_title(f"pipeline bubble, p={pp}, m={m} (benchmarks/pipeline_bubble.py)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[8])
    ap.add_argument("--t", type=float, default=0.05, help="seconds per stage pass (F, B or W)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N")
    ap.add_argument("--out", default=None, help="write a PNG plot here (last m)")
    args = ap.parse_args(argv)
    p = args.pp
    print(f"p={p}  F = B = W = {args.t}s per stage  (bubble = idle / compute, worst rank)")
    print(f"{'schedule':<14}{'m':>4}{'simulated':>11}{'measured':>10}{'ratio':>7}{'vs 1f1b':>9}")
    for m in args.micro_batches:
        rows = measure(p, m, args.t, args.repeats)
        base = rows[0]["measured"]
        for r in rows:
            ratio = r["measured"] / r["simulated"] if r["simulated"] else float("nan")
            print(f"{r['kind']:<14}{m:>4}{r['simulated']:>11.3f}{r['measured']:>10.3f}"
                  f"{ratio:>7.2f}{r['measured'] / base:>9.2f}")  # fmt: skip
        if args.out:
            plot(rows, args.out, p, m)
            print(f"plot written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
