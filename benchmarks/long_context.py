"""Long context: activation bytes per rank and tokens/s against sequence length, cp 1/2/4, ring vs
all-to-all, on CPU gloo ranks with a tiny Llama-style GPT.

    .venv/bin/python benchmarks/long_context.py --seq 1024 2048 4096 8192 16384 --cp 1 2 4 \
        --out docs/context_parallel.png

For each (sequence length S, cp, mode) every rank builds the same model (megatiny.model.GPT with
its attention core swapped by `apply_context_parallel`), takes its tokens of one sample
(`split_batch`: zig-zag chunks for ring, contiguous for a2a) and runs forward + backward of the
full-sequence loss. Reported:

- activation MiB per rank: unique storages autograd saves in the forward (saved-tensor hooks,
  parameters excluded), the worst rank;
- tokens/s: S / (wall time of one forward + backward, the slowest rank, best of `--repeat`).

cp = 1 runs the ordinary attention core (SDPA), the reference. On a machine with fewer cores than
ranks the ranks share cores, so tokens/s shows communication and load balance overhead rather than
speed-up; activation bytes are exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.config import ModelConfig  # noqa: E402
from megatiny.model import GPT  # noqa: E402
from megatiny.parallel import ParallelContext  # noqa: E402
from megatiny.parallel.context_parallel import (  # noqa: E402
    apply_context_parallel,
    context_parallel_loss,
    split_batch,
)
from megatiny.testing import run_ranks  # noqa: E402
from megatiny.training.memory import ActivationCounter  # noqa: E402

VOCAB = 256


def model_config(seq: int) -> ModelConfig:
    return ModelConfig.llama(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden=128, max_seq_len=seq)  # fmt: skip


def saved_bytes(model, batch) -> int:
    with ActivationCounter(model.parameters()) as counter:
        model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    return counter.bytes


def _rank(seq: int, cp: int, mode: str, repeat: int):
    ctx = ParallelContext.initialize(cp=cp)
    torch.manual_seed(0)
    model = apply_context_parallel(GPT(model_config(seq)), ctx, mode)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, seq + 1), generator=g)
    full = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    batch = split_batch(full, ctx.cp_rank, cp, zigzag=mode == "ring")
    activation = saved_bytes(model, batch)
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        dist.barrier()
        start = time.perf_counter()
        loss = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
        context_parallel_loss(loss, batch["labels"], None, ctx.cp_group).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return activation, min(times[1:])


def measure(seq: int, cp: int, mode: str, repeat: int) -> dict:
    out = run_ranks(_rank, cp, args=(seq, cp, mode, repeat), timeout=1800)
    activation = max(a for a, _ in out)
    seconds = max(t for _, t in out)
    return {"seq": seq, "cp": cp, "mode": mode, "activation_mib": activation / 2**20,
            "tokens_per_s": seq / seconds}  # fmt: skip


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatiny.fsutil import atomic_path

    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["cp"], r["mode"]) for r in rows}):
        sel = [r for r in rows if (r["cp"], r["mode"]) == key]
        label = "cp=1" if key[0] == 1 else f"cp={key[0]} {key[1]}"
        style = "-" if key[1] == "ring" else "--"
        ax_mem.plot([r["seq"] for r in sel], [r["activation_mib"] for r in sel], style, marker="o",
                    label=label)  # fmt: skip
        ax_tps.plot([r["seq"] for r in sel], [r["tokens_per_s"] for r in sel], style, marker="o",
                    label=label)  # fmt: skip
    for ax, title in ((ax_mem, "activation MiB per rank"), (ax_tps, "tokens/s (2 CPU cores)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["ring", "a2a"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", help="write a PNG plot here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'seq':>6} {'cp':>3} {'mode':>5} {'act MiB/rank':>13} {'vs cp=1':>8} {'tokens/s':>9}")
    for seq in args.seq:
        base = None
        for cp in args.cp:
            for mode in args.modes if cp > 1 else ["ring"]:
                row = measure(seq, cp, mode, args.repeat)
                if cp == 1:
                    row["mode"], base = "-", row["activation_mib"]
                rows.append(row)
                ratio = f"{row['activation_mib'] / base:.3f}" if base else "-"
                print(f"{seq:>6} {cp:>3} {row['mode']:>5} {row['activation_mib']:>13.1f} "
                      f"{ratio:>8} {row['tokens_per_s']:>9.0f}", flush=True)  # fmt: skip
    if args.out:
        for row in rows:
            if row["mode"] == "-":
                row["mode"] = "ring"
        plot(rows, args.out)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
