"""ZeRO levels 0-3 on CPU ranks: tokens/s as a ratio to zero=0 of the same dp, and the bytes each
rank keeps (parameters, gradients, optimizer state), measured in the same run.

    .venv/bin/python benchmarks/zero_levels.py                  # dp 2 and 4, 3 rounds, PNG
    .venv/bin/python benchmarks/zero_levels.py --dp 2 --rounds 1 --steps 6

Each point is a real `Trainer.train_step` loop on gloo ranks (fork-started), synthetic tokens,
a Llama-style model (--d-model, --layers, --vocab), two micro-batches per step (so ZeRO-2/3's
per-micro-batch reduce-scatter shows). The levels of one dp alternate round by round and each
figure is the median of the rounds (min-max shown), timed over the steps after --warmup. The
bytes are this rank's `memory_params/grads/optimizer` (megatiny.training.memory.state_bytes).
On CPU gloo's work runs on the cores the ranks compute on, so overlap buys little: the table is
the cost of the extra communication, and the memory is what the levels are for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import SyntheticTokens, timed_tokens_per_second  # noqa: E402

from megatiny.config import Config  # noqa: E402
from megatiny.testing import run_ranks  # noqa: E402
from megatiny.training.step import Task  # noqa: E402


class SyntheticTask(Task):
    def build_data(self, cfg, ctx, dp):
        return SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_length, size=512), None


def config(args, dp: int, zero: int) -> Config:
    model = dict(vocab_size=args.vocab, max_seq_len=args.seq, d_model=args.d_model,
                 n_layers=args.layers, n_heads=8, n_kv_heads=4, norm="rmsnorm",
                 activation="swiglu", position="rope", tie_embeddings=False, bias=False)  # fmt: skip
    return Config.from_dict({"model": model}, [
        f"data.seq_length={args.seq}", f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={2 * args.micro * dp}", f"parallel.zero={zero}",
        "train.precision=fp32", "train.progress_bar=false", "train.tensorboard=false",
    ])  # fmt: skip


def _rank(cfg, steps: int, warmup: int, threads: int) -> dict:
    from megatiny.parallel import ParallelContext
    from megatiny.training.memory import state_bytes
    from megatiny.training.step import build_trainer

    torch.set_num_threads(threads)
    ctx = ParallelContext.initialize()
    trainer = build_trainer(cfg, ctx, task=SyntheticTask())
    rate = timed_tokens_per_second(trainer, steps, warmup)
    return {"tokens_per_s": rate, **state_bytes(trainer.model, trainer.optimizer, trainer.ddp)}


def measure(args, dp: int) -> dict[int, dict]:
    runs: dict[int, list[dict]] = {z: [] for z in range(4)}
    for _ in range(args.rounds):
        for zero in range(4):
            out = run_ranks(_rank, dp, args=(config(args, dp, zero), args.steps, args.warmup,
                                             args.threads), timeout=1800)  # fmt: skip
            runs[zero].append(out[0])
    result = {}
    for zero, rows in runs.items():
        speeds = [r["tokens_per_s"] for r in rows]
        result[zero] = {"tokens_per_s": statistics.median(speeds), "min": min(speeds),
                        "max": max(speeds), **{k: rows[0][k] for k in
                                               ("params", "grads", "optimizer")}}  # fmt: skip
    return result


def table(results: dict[int, dict[int, dict]]) -> str:
    lines = [f"{'dp':>3} {'zero':>4} {'tok/s':>9} {'(min-max)':>15} {'vs zero=0':>9} "
             f"{'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} {'sum vs 0':>8}"]  # fmt: skip
    for dp, levels in results.items():
        base = levels[0]
        base_sum = base["params"] + base["grads"] + base["optimizer"]
        for zero, r in levels.items():
            total = r["params"] + r["grads"] + r["optimizer"]
            spread = "({:,.0f}-{:,.0f})".format(r["min"], r["max"])
            lines.append(
                f"{dp:>3} {zero:>4} {r['tokens_per_s']:>9,.0f} {spread:>15} "
                f"{r['tokens_per_s'] / base['tokens_per_s']:>9.2f} {r['params'] / 2**20:>10.1f} "
                f"{r['grads'] / 2**20:>9.1f} {r['optimizer'] / 2**20:>9.1f} "
                f"{total / base_sum:>8.2f}"
            )
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    levels = list(range(4))
    width = 0.8 / len(results)
    for i, (dp, r) in enumerate(results.items()):
        xs = [z + i * width for z in levels]
        ax1.bar(xs, [r[z]["tokens_per_s"] / r[0]["tokens_per_s"] for z in levels], width,
                label=f"dp {dp}")  # fmt: skip
        ax2.bar(xs, [(r[z]["params"] + r[z]["grads"] + r[z]["optimizer"]) / 2**20 for z in levels],
                width, label=f"dp {dp}")  # fmt: skip
    for ax, title in (
        (ax1, "tokens/s vs zero=0 (same dp)"),
        (ax2, "MiB per rank: params+grads+optim"),
    ):
        ax.set_xticks(
            [z + width * (len(results) - 1) / 2 for z in levels], [f"zero={z}" for z in levels]
        )
        ax.set_title(title)
        ax.legend()
    fig.suptitle("benchmarks/zero_levels.py (CPU gloo ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--plot", default="docs/zero_levels.png", help="PNG path ('' for none)")
    args = ap.parse_args()
    results = {dp: measure(args, dp) for dp in args.dp}
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
