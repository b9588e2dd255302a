"""Pipeline bubble: measured idle time per stage against (p-1)/m (1F1B) and (p-1)/(v m) (interleaved).

    .venv/bin/python benchmarks/pipeline_bubble.py --pp 4 --micro-batches 4 8 16 --out bubble.png

Every stage is a fake model chunk whose forward sleeps t_f / v and whose backward sleeps
t_b / v (so a rank's total compute per step is m (t_f + t_b) whatever v), driven by the real
schedules and the real batched p2p of megatiny.parallel on gloo CPU ranks. Sleeping instead of
computing keeps the measurement independent of how many cores the machine has.

For each stage, with T the wall time of one schedule call and C the time it really spent inside
its forward/backward passes (about m (t_f + t_b)):

    bubble = (T - C) / C        theory: (p - 1) / m  (GPipe, 1F1B),   (p - 1) / (v m)  (interleaved)

The table lists the worst stage (the schedule is as slow as it) and every stage's value, and
"p2p only": the wall time of the same schedule with free stages, over C — the share of the gap
that is message latency rather than pipeline bubble.
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

from megatiny.fsutil import atomic_path
from megatiny.parallel import ParallelContext  # noqa: E402
from megatiny.parallel.schedules import build_schedule  # noqa: E402
from megatiny.testing import run_ranks  # noqa: E402

D_MODEL, SEQ, MICRO = 8, 4, 1
BUSY = [0.0]  # seconds this rank spent inside stage forward/backward (per forked rank)


def _busy_sleep(seconds: float) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    BUSY[0] += time.perf_counter() - start


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t_forward, t_backward):
        ctx.t_backward = t_backward
        _busy_sleep(t_forward)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        _busy_sleep(ctx.t_backward)
        return grad, None, None


class SleepChunk(nn.Module):
    """A model chunk with the interface the schedules use, costing a fixed time per pass."""

    def __init__(self, t_forward, t_backward, first, last):
        super().__init__()
        self.config = type("Cfg", (), {"d_model": D_MODEL})()
        self.weight = nn.Parameter(torch.ones(D_MODEL))
        self.t_forward, self.t_backward = t_forward, t_backward
        self.is_first_chunk, self.is_last_chunk = first, last

    def embed_tokens(self, input_ids, position_ids=None):
        return input_ids.float()[..., None] * self.weight

    def run_blocks(self, h, position_ids=None):
        return _Sleep.apply(h * self.weight, self.t_forward, self.t_backward)

    def head_loss(self, h, labels, loss_mask=None):
        return h.mean()


def _rank_worker(pp, v, m, kind, t_forward, t_backward, repeats):
    ctx = ParallelContext.initialize(pp=pp)
    chunks = [
        SleepChunk(
            t_forward / v,
            t_backward / v,
            first=c == 0 and ctx.pp_rank == 0,
            last=c == v - 1 and ctx.pp_rank == pp - 1,
        )
        for c in range(v)
    ]
    run = build_schedule(ctx, chunks, MICRO, SEQ, schedule=kind)
    batch = {"input_ids": torch.ones(MICRO, SEQ, dtype=torch.long), "labels": None}
    batches = [dict(batch) for _ in range(m)]
    run(batches)  # warm-up: gloo opens its pair connections on first use
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        BUSY[0] = 0.0
        start = time.perf_counter()
        run(batches)
        wall = time.perf_counter() - start
        # idle / busy, with busy the time really spent in the stages (sleep overshoot included)
        free_stages = t_forward == 0 and t_backward == 0
        best = min(best, wall if free_stages else (wall - BUSY[0]) / BUSY[0])
    return best


def measure(pp, v, m, kind, t_forward, t_backward, repeats):
    """Per stage: bubble = idle / busy; and the wall time of the same schedule with free stages
    over the nominal compute m (t_f + t_b) (what the P2P exchanges alone cost here)."""
    args = (pp, v, m, kind, t_forward, t_backward, repeats)
    bubbles = run_ranks(_rank_worker, pp, args=args, timeout=600)
    comm = run_ranks(_rank_worker, pp, args=(pp, v, m, kind, 0.0, 0.0, repeats), timeout=600)
    return bubbles, max(comm) / (m * (t_forward + t_backward))


def plot(rows, path, pp):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (kind, v), marker in zip(sorted({(r["kind"], r["v"]) for r in rows}), "osd^"):
        sel = [r for r in rows if (r["kind"], r["v"]) == (kind, v)]
        ms = [r["m"] for r in sel]
        label = kind if v == 1 else f"{kind} v={v}"
        line = ax.plot(ms, [r["measured"] for r in sel], marker=marker, label=f"{label} measured")
        ax.plot(ms, [r["theory"] for r in sel], "--", color=line[0].get_color(), label="theory")
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble = idle / compute (worst stage)")
    ax.set_title(f"pipeline bubble, p={pp}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--virtual", type=int, default=2, help="chunks per rank for interleaved")
    ap.add_argument("--t-forward", type=float, default=0.02, help="seconds per stage forward")
    ap.add_argument("--t-backward", type=float, default=0.04, help="seconds per stage backward")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (per stage)")
    ap.add_argument("--out", default=None, help="write a PNG plot here")
    args = ap.parse_args(argv)
    p = args.pp
    configs = [("gpipe", 1), ("1f1b", 1), ("interleaved", args.virtual)]
    rows = []
    print(f"p={p}  t_f={args.t_forward}s  t_b={args.t_backward}s  (bubble = idle / compute)")
    print(
        f"{'schedule':<16}{'m':>4}{'theory':>9}{'measured':>10}{'ratio':>7}{'p2p only':>10}"
        "   per stage"
    )
    for kind, v in configs:
        for m in args.micro_batches:
            if kind == "interleaved" and m % p:
                continue
            per_stage, comm = measure(p, v, m, kind, args.t_forward, args.t_backward, args.repeats)
            theory = (p - 1) / (v * m)
            worst = max(per_stage)
            rows.append(dict(kind=kind, v=v, m=m, theory=theory, measured=worst, p2p=comm))
            name = kind if v == 1 else f"{kind} v={v}"
            stages = " ".join(f"{b:.3f}" for b in per_stage)
            print(
                f"{name:<16}{m:>4}{theory:>9.3f}{worst:>10.3f}{worst / theory:>7.2f}{comm:>10.3f}"
                f"   {stages}"
            )
    if args.out:
        plot(rows, args.out, p)
        print(f"plot written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
