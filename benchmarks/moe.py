"""Mixture of experts on CPU ranks: tokens/s and the all-to-all's share of the step at ep 1, 2, 4,
and a histogram of how many tokens each expert received.

    .venv/bin/python benchmarks/moe.py --ep 1 2 4 --steps 5 --out moe_load.png

Every rank is one data-parallel replica (ep = world size, all of dp one expert-parallel group)
that trains a Llama-style GPT whose every block is an MoE layer (E experts, top-k) on its own
random batch: forward + backward, no optimizer (the expert compute and the token exchange are
what differ between ep sizes). The model is the same at every ep (same seed); each rank holds
E/ep experts. Reported per ep:

    tokens/s        all ranks' tokens per second of wall time (one step = every rank's batch)
    a2a share       seconds inside all_to_all (counts, dispatch, combine, both directions) over
                    the step's wall time, worst rank (collectives are timed by an observer)
    a2a MB/step     bytes the tracer counts per rank and step (analytical: 4 N k h 4 + 8 E per layer)

On a CPU, gloo's all-to-all goes through local sockets and the ranks share the cores, so the
numbers show the mechanism, not a GPU cluster; `megatiny plan` models the latter.
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
from megatiny.fsutil import atomic_path  # noqa: E402
from megatiny.model import GPT  # noqa: E402
from megatiny.parallel import ParallelContext, collectives  # noqa: E402
from megatiny.parallel.experts import apply_expert_parallel  # noqa: E402
from megatiny.testing import run_ranks  # noqa: E402


def model_config(args) -> ModelConfig:
    return ModelConfig.llama(
        vocab_size=1024, d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
        max_seq_len=args.seq, ffn_hidden=2 * args.d_model, moe_experts=args.experts,
        moe_top_k=args.top_k,
    )  # fmt: skip


def _rank(args, ep):
    ctx = ParallelContext.initialize(ep=ep)
    torch.manual_seed(0)
    model = apply_expert_parallel(GPT(model_config(args)), ctx)
    g = torch.Generator().manual_seed(100 + ctx.rank)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=g)
    counts = torch.zeros(args.experts)
    seconds, nbytes = [0.0], [0]

    def observe(event):
        if event.op == "all_to_all":
            seconds[0] += event.seconds
            nbytes[0] += event.bytes

    def count(module, inputs, logits):
        counts.add_(
            torch.bincount(logits.topk(args.top_k).indices.flatten(), minlength=args.experts)
        )

    hooks = [
        m.register_forward_hook(count) for n, m in model.named_modules() if n.endswith("router")
    ]
    model(ids, labels=ids).backward()  # warm-up
    counts.zero_()
    remove = collectives.add_observer(observe)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        model(ids, labels=ids).backward()
    dist.barrier()
    wall = time.perf_counter() - start
    remove()
    for h in hooks:
        h.remove()
    dist.all_reduce(counts)
    return {"wall": wall, "a2a": seconds[0], "bytes": nbytes[0] / args.steps, "counts": counts}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="moe_load.png", help="expert-load histogram (PNG)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"MoE: {args.experts} experts, top-{args.top_k}, h={args.d_model}, {args.layers} MoE "
          f"layers, {args.batch} x {args.seq} tokens per rank, {args.steps} steps")  # fmt: skip
    print(f"{'ep':>3} {'tokens/s':>10} {'per rank':>10} {'a2a share':>10} {'a2a MB/step':>12}")
    loads = {}
    for ep in args.ep:
        outs = run_ranks(_rank, ep, args=(args, ep), timeout=600)
        wall = max(o["wall"] for o in outs)
        tokens = ep * args.batch * args.seq * args.steps
        share = max(o["a2a"] / o["wall"] for o in outs)
        mb = max(o["bytes"] for o in outs) / 2**20
        print(
            f"{ep:>3} {tokens / wall:>10,.0f} {tokens / wall / ep:>10,.0f} {share:>10.1%} {mb:>12.3f}"
        )
        loads[ep] = outs[0]["counts"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = max(loads)
    counts = loads[ep] / loads[ep].sum()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(args.experts), counts.tolist(), color="tab:blue")
    ax.axhline(1 / args.experts, color="gray", linestyle="--", label="uniform")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of routed tokens")
    ax.set_title(f"expert load, ep={ep}, {args.steps} steps, all layers")
    ax.legend()
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    print(
        f"expert load histogram: {args.out} (max/uniform {counts.max().item() * args.experts:.2f})"
    )


if __name__ == "__main__":
    main()
