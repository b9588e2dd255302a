"""Overhead of the checks that find a rank which slows or corrupts a run (issue 29), same run.

    .venv/bin/python benchmarks/resilience.py                     # dp=2 on 2 gloo ranks
    .venv/bin/python benchmarks/resilience.py --world 1 --steps 300
    .venv/bin/python benchmarks/resilience.py parallel.zero=2      # the check at each reduce-scatter

Each rank runs `Trainer.train_step` on synthetic tokens (data parallel over the ranks, fp32) in
these modes, alternating (each round starts with the next mode), --repeats rounds, each on a fresh Trainer (--warmup untimed steps, then
--steps timed ones, with the loop's log-step collective every 10 steps):

  today              the Trainer as the loop had it before issue 29 (nothing installed)
  checks off         `install_checks` with every check off (returns None: nothing wrapped)
  stragglers 0.7     train.straggler_threshold=0.7: step timing, comm-wait observer, gather
  replay every 100   train.check_replay_every=100
  replay every step  train.check_replay_every=1 (the cost of one check step)

It prints tokens/s (median over rounds) and each mode's ratio against `today` measured in the same
run; the goal for `checks off` is >= 0.98.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import SyntheticTokens, timed_tokens_per_second  # noqa: E402

from megatiny.config import Config  # noqa: E402

MODES = {
    "today": None,
    "checks off": {},
    "stragglers 0.7": {"straggler_threshold": 0.7},
    "replay every 100": {"check_replay_every": 100},
    "replay every step": {"check_replay_every": 1},
}


def _trainer(cfg: Config, ctx):
    from megatiny.parallel.zero_levels import build_data_parallel
    from megatiny.training.optim import build_optimizer, build_scheduler
    from megatiny.training.step import Trainer, build_model

    model = build_model(cfg, ctx)
    p = cfg.parallel  # parallel.zero=1/2/3: the ZeRO wrapper and optimizer, as build_trainer
    ddp = build_data_parallel(model, ctx, bucket_mb=p.ddp_bucket_mb, zero=p.zero)
    optimizer = build_optimizer(model, cfg.train, zero1_ddp=ddp if p.zero else None)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_length)
    return Trainer(cfg, ctx, model, optimizer, build_scheduler(optimizer, cfg.train), data, data,
                   accumulation=cfg.train.accumulation_steps(ctx.dp_size), ddp=ddp)  # fmt: skip


def _measure(cfg: Config, ctx, mode: str, steps: int, warmup: int) -> float:
    from megatiny.training.checks import install_checks

    trainer, checks = _trainer(cfg, ctx), None
    if MODES[mode] is not None:
        cfg = copy.deepcopy(cfg)
        for key, value in MODES[mode].items():
            setattr(cfg.train, key, value)
        checks = install_checks(cfg, trainer, warn=lambda line: None)

    def collect(t):
        if checks is not None and t.step % 10 == 0:
            checks.collect(t.step)

    rate = timed_tokens_per_second(trainer, steps, warmup, after_step=collect)
    if checks is not None:
        checks.close()
    return rate


def _rounds(cfg, ctx, steps, warmup, repeats) -> dict:
    out, modes = {mode: [] for mode in MODES}, list(MODES)
    for r in range(repeats):  # each round starts with another mode: load drifts hit all alike
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            out[mode].append(_measure(cfg, ctx, mode, steps, warmup))
    return out


def main(argv=None) -> int:
    from megatiny.testing import run_ranks

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--world", type=int, default=2, help="data-parallel gloo ranks")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)
    model = dict(vocab_size=512, max_seq_len=64, d_model=64, n_layers=2, n_heads=4)
    cfg = Config.from_dict({"model": model}, ["data.seq_length=64", "train.micro_batch_size=8",
                                              "train.progress_bar=false", *args.overrides])  # fmt: skip
    m = cfg.model
    print(f"model: d_model={m.d_model} n_layers={m.n_layers} params={m.num_parameters() / 1e6:.2f}M"
          f" | seq={cfg.data.seq_length} micro={cfg.train.micro_batch_size} | dp={args.world} "
          f"gloo ranks, 1 thread each | zero={cfg.parallel.zero} | {args.steps} timed steps x {args.repeats} rounds | torch "
          f"{torch.__version__}")  # fmt: skip
    rounds = run_ranks(_rounds_rank, args.world, args=(cfg, args.steps, args.warmup, args.repeats),
                       timeout=3600)[0]  # fmt: skip
    today = statistics.median(rounds["today"])
    print(f"\n{'mode':<20} {'tokens/s':>10} {'vs today':>9}   rounds")
    for mode, values in rounds.items():
        tps = statistics.median(values)
        print(f"{mode:<20} {tps:>10,.0f} {tps / today:>8.3f}x   {[round(v) for v in values]}")
    step_cost = today / statistics.median(rounds["replay every step"]) - 1
    print(
        f"\nratio checks off / today = {statistics.median(rounds['checks off']) / today:.3f} "
        "(goal >= 0.98)"
    )
    print(f"one check step costs {step_cost:.2f} x a step (replay + deferred reduction; ZeRO-2/3: "
          f"+ checksums per reduce-scatter); every "
          f"100 steps that is {step_cost / 100:.2%} of the run; measured: replay every 100 / today "
          f"= {statistics.median(rounds['replay every 100']) / today:.3f}")  # fmt: skip
    return 0


def _rounds_rank(cfg, steps, warmup, repeats):
    from megatiny.parallel import ParallelContext

    ctx = ParallelContext.initialize()
    try:
        return _rounds(cfg, ctx, steps, warmup, repeats)
    finally:
        ctx.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
