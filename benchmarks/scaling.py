"""Scaling: measured tokens/s and step breakdown of parallel layouts on CPU gloo ranks, each point
beside `megatiny plan --gpu runs/cpu-calibrated.yaml`'s prediction (calibrate first: `megatiny plan
--gpu cpu --calibrate`, which measures at shapes and rank counts disjoint from these).

    .venv/bin/python benchmarks/scaling.py                    # d 128, 512, 1024: tables, PNGs, JSON
    .venv/bin/python benchmarks/scaling.py --steps 4 --only strong --widths 512
    .venv/bin/python benchmarks/scaling.py --profile megatiny/plan/profiles/cpu.yaml   # uncalibrated

Every point trains the same small Llama-style GPT with the real `build_trainer` /
`Trainer.train_step` on forked gloo ranks (one torch thread per rank) on random tokens: `--warmup`
steps, then `--steps` timed steps under the communication tracer; every point is measured
`--repeats` times, round-robin over the points, and keeps its median.

    measured step      time per step by the device's clock (megatiny/parallel/timing.py: wall
                       time on CPU, CUDA events on a GPU), slowest rank
    comm (per group)   seconds of collectives by the same clock (CPU: blocking time; DP buckets:
                       posting + wait; CUDA: event time from posting to completion),
                       slowest rank; for pp this includes waiting for the neighbour stage, i.e.
                       the pipeline bubble, which a CPU run cannot separate from the transfer
    compute            step - comm
    efficiency         strong: tokens/s(N) / (N x tokens/s(1));  weak: the same per rank
    predicted          `megatiny.plan.predict.plan(cfg, N, profile)` of the same config

Strong scaling keeps the global batch (16 sequences); weak scaling keeps 16 sequences per dp rank.
On this machine N ranks share 2 cores: past 2 ranks a rank gets 2/N of a core, so efficiency
falls by construction; the plan's CPU profile models that sharing (`cores: 2`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.config import Config  # noqa: E402
from megatiny.parallel.tracer import CommTracer  # noqa: E402
from megatiny.testing import run_ranks  # noqa: E402
from megatiny.training.step import Task  # noqa: E402

MODEL = dict(vocab_size=2048, max_seq_len=128, d_model=512, n_layers=4, n_heads=16, n_kv_heads=8,
             norm="rmsnorm", activation="swiglu", position="rope", tie_embeddings=False,
             bias=False)  # fmt: skip
SEQ, MICRO, GLOBAL = 128, 4, 16

# (name, world size, overrides)
STRONG = [
    ("1 rank", 1, []),
    ("dp2", 2, []),
    ("tp2", 2, ["parallel.tp=2"]),
    ("tp2+sp", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("pp2", 2, ["parallel.pp=2"]),
    ("dp2 zero1", 2, ["parallel.zero1=true"]),
    ("dp4", 4, []),
    ("tp2 dp2", 4, ["parallel.tp=2"]),
    ("dp8", 8, ["train.micro_batch_size=2"]),
    ("tp2 pp2 dp2", 8, ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2"]),
]
WEAK = [(f"dp{n}", n, [f"train.global_batch_size={GLOBAL * n}"]) for n in (1, 2, 4, 8)]


def config(overrides) -> Config:
    raw = {"model": MODEL, "data": {"seq_length": SEQ},
           "train": {"micro_batch_size": MICRO, "global_batch_size": GLOBAL, "precision": "fp32",
                     "lr": 1e-3, "progress_bar": False, "tensorboard": False}}  # fmt: skip
    return Config.from_dict(raw, list(overrides))


class RandomTokens(Task):
    def build_data(self, cfg, ctx, dp):
        g = torch.Generator().manual_seed(0)
        n = max(256, 4 * cfg.train.global_batch_size_for(dp))
        ids = torch.randint(0, cfg.model.vocab_size, (n, cfg.data.seq_length + 1), generator=g)
        rows = [{"input_ids": r[:-1], "labels": r[1:], "loss_mask": torch.ones(SEQ)} for r in ids]
        return rows, None


def _rank(overrides, warmup, steps):
    from megatiny.parallel import ParallelContext
    from megatiny.parallel.timing import DeviceClock
    from megatiny.training.step import build_trainer

    torch.set_num_threads(1)
    cfg = config(overrides)
    p = cfg.parallel
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp)
    trainer = build_trainer(cfg, ctx, task=RandomTokens())
    for _ in range(warmup):
        trainer.train_step()
    torch.distributed.barrier()
    clock = DeviceClock(ctx.device)
    with CommTracer(ctx.rank) as tracer:
        start = clock.start()
        for _ in range(steps):
            trainer.train_step()
        wall = clock.seconds(start)
    seconds = {}
    for row in tracer.rows():
        group = {"dp_cp": "dp", "embedding": "pp", "mp": "other", "world": "other"}.get(
            row["group"], row["group"])  # fmt: skip
        seconds[group] = seconds.get(group, 0.0) + row["seconds"] / steps
    return {"step": wall / steps, "comm": seconds}


def measure(world, overrides, warmup, steps) -> dict:
    """One measurement of a point: the slowest rank's step and its seconds per group."""
    cfg = config(overrides)
    ranks = run_ranks(_rank, world, args=(overrides, warmup, steps), timeout=900)
    slowest = max(ranks, key=lambda r: r["step"])
    comm = {g: max(r["comm"].get(g, 0.0) for r in ranks) for g in ("tp", "pp", "dp", "other")}
    tokens = cfg.train.global_batch_size_for(world // (cfg.parallel.tp * cfg.parallel.pp)) * SEQ
    return {"step_s": slowest["step"], "tokens_per_s": tokens / slowest["step"], "comm_s": comm,
            "compute_s": slowest["step"] - sum(comm.values())}  # fmt: skip


def point(name, world, overrides, measurements, profile) -> dict:
    """A point's row: the median of its measurements (the round-robin repeats), their spread,
    and the plan's prediction of the same config."""
    from megatiny.plan.predict import plan

    runs = sorted(measurements, key=lambda m: m["step_s"])
    median = runs[len(runs) // 2]
    predicted = plan(config(overrides), world, profile)
    return {
        "name": name, "world_size": world, "overrides": overrides,
        "measured": dict(median, runs_tokens_per_s=[m["tokens_per_s"] for m in measurements]),
        "predicted": {"step_s": predicted["time_s"]["step"],
                      "tokens_per_s": predicted["tokens_per_s_per_gpu"] * world,
                      "compute_s": predicted["time_s"]["compute"],
                      "comm_s": predicted["exposed_comm_s"],
                      "bubble_s": predicted["time_s"]["bubble"]},
        "command": "megatiny plan --gpu {} --world-size {} {}".format(profile["path"], world,
                                                                       " ".join(overrides)),
    }  # fmt: skip


def table(rows, kind) -> str:
    base = rows[0]["measured"]["tokens_per_s"]
    head = (f"| {kind} | ranks | measured tok/s (median) | runs (min-max) | predicted tok/s | "
            "pred/meas | efficiency | measured compute / tp / pp(+bubble) / dp s | "
            "predicted compute / tp / pp+bubble / dp s |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        m, p, n = r["measured"], r["predicted"], r["world_size"]
        eff = m["tokens_per_s"] / base / n  # per rank against one rank (strong and weak)
        mc, pc = m["comm_s"], p["comm_s"]
        lines.append(
            f"| {r['name']} | {n} | {m['tokens_per_s']:,.0f} | "
            f"{min(m['runs_tokens_per_s']):,.0f}-{max(m['runs_tokens_per_s']):,.0f} | "
            f"{p['tokens_per_s']:,.0f} | "
            f"{p['tokens_per_s'] / m['tokens_per_s']:.2f} | {eff:.2f} | "
            f"{m['compute_s']:.3f} / {mc['tp']:.3f} / {mc['pp']:.3f} / {mc['dp']:.3f} | "
            f"{p['compute_s']:.3f} / {pc['tp']:.3f} / {pc['pp'] + p['bubble_s']:.3f} / "
            f"{pc['dp']:.3f} |"
        )
    close = sum(abs(r["predicted"]["tokens_per_s"] / r["measured"]["tokens_per_s"] - 1) <= 0.25
                for r in rows)  # fmt: skip
    lines.append(f"\nwithin 25%: {close} of {len(rows)} points")
    return "\n".join(lines)


def plot(results, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, rows in results.items():
        base = rows[0]["measured"]["tokens_per_s"]
        pbase = rows[0]["predicted"]["tokens_per_s"]
        dp = [
            r
            for r in rows
            if r["name"].startswith("dp") and " " not in r["name"] or r["world_size"] == 1
        ]  # plain data parallel: dp2, dp4, dp8
        n = [r["world_size"] for r in dp]
        ax.plot(n, [r["measured"]["tokens_per_s"] / base / r["world_size"] for r in dp], "o-",
                label=f"{kind} (measured)")  # fmt: skip
        ax.plot(n, [r["predicted"]["tokens_per_s"] / pbase / r["world_size"] for r in dp], "x--",
                label=f"{kind} (plan)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks (data parallel)")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("CPU gloo, 2 cores shared by all ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "efficiency.png"), dpi=110)

    rows = results.get("strong", [])
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [r["name"] for r in rows]
    x = range(len(rows))
    for offset, key in ((-0.2, "measured"), (0.2, "predicted")):
        bottom = [0.0] * len(rows)
        parts = [("compute", lambda r, k=key: r[k]["compute_s"])] + [
            (g, lambda r, g=g, k=key: r[k]["comm_s"].get(g, 0.0)) for g in ("tp", "pp", "dp")
        ]
        if key == "predicted":
            parts.append(("bubble", lambda r: r["predicted"]["bubble_s"]))
        for i, (part, get) in enumerate(parts):
            values = [get(r) for r in rows]
            ax.bar([k + offset for k in x], values, 0.38, bottom=bottom,
                   color=f"C{i}", label=part if key == "measured" or part == "bubble" else None,
                   hatch=None if key == "measured" else "//")  # fmt: skip
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("seconds per step")
    ax.set_title("left: measured (median), right hatched: megatiny plan")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "breakdown.png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=("strong", "weak"), default=None)
    parser.add_argument("--out", default="runs/scaling")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024],
                        help="hidden sizes of the benchmark model (heads: d / 32, kv heads: half)")  # fmt: skip
    parser.add_argument("--profile", default="runs/cpu-calibrated.yaml",
                        help="the profile the predictions use (named, never implied)")  # fmt: skip
    parser.add_argument("--points", nargs="+", default=None, help="only these points (names)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure every point this many times, round-robin; report the median")  # fmt: skip
    args = parser.parse_args()
    from megatiny.plan.timemodel import load_profile

    profile = load_profile(args.profile)
    print(f"predictions from {profile['path']} ({profile['name']})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    selected = [(d, kind, *pt) for d in args.widths
                for kind, points in (("strong", STRONG), ("weak", WEAK))
                if args.only in (None, kind)
                for pt in points if not args.points or pt[0] in args.points]  # fmt: skip
    # round-robin: every point once per round, so a drift of the machine's speed (a shared VM
    # moves 10-20 % within minutes) falls on all points alike; each point keeps its median
    runs = {i: [] for i in range(len(selected))}
    for round_ in range(args.repeats):
        for i, (d, kind, name, world, overrides) in enumerate(selected):
            set_width(d)
            m = measure(world, overrides, args.warmup, args.steps)
            runs[i].append(m)
            print(f"round {round_ + 1}/{args.repeats} d={d} {kind:6s} {name:12s} N={world}: "
                  f"{m['tokens_per_s']:,.0f} tok/s", flush=True)  # fmt: skip
    results = {}
    for i, (d, kind, name, world, overrides) in enumerate(selected):
        set_width(d)
        results.setdefault(f"d{d}", {}).setdefault(kind, []).append(
            point(name, world, overrides, runs[i], profile))  # fmt: skip
    with open(os.path.join(args.out, "scaling.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    close = total = 0
    for width, by_kind in results.items():
        for kind, rows in by_kind.items():
            print(f"\n{width}")
            print(table(rows, kind))
            close += sum(abs(r["predicted"]["tokens_per_s"] / r["measured"]["tokens_per_s"] - 1)
                         <= 0.25 for r in rows)  # fmt: skip
            total += len(rows)
        os.makedirs(os.path.join(args.out, width), exist_ok=True)
        plot(by_kind, os.path.join(args.out, width))
    print(
        f"\nall widths: {close} of {total} points within 25% ({100 * close / max(total, 1):.0f}%)"
    )
    print(f"plots: {args.out}/d*/efficiency.png, {args.out}/d*/breakdown.png")


def set_width(d: int) -> None:
    """The benchmark model at hidden size d: d / 32 heads (at least 4), half as many KV heads.
    Forked ranks inherit MODEL, so it is set before each measurement."""
    heads = max(4, d // 32)
    MODEL.update(d_model=d, n_heads=heads, n_kv_heads=heads // 2)


if __name__ == "__main__":
    main()
