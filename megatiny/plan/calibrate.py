"""`megatiny plan --gpu cpu --calibrate`: measure this machine so predictions can be checked here.

Measured with one thread per rank (as benchmarks/scaling.py runs its ranks), each figure the mean
of repeated runs, as a training step meets them (not the best run: on a shared machine the best
is 1.5x faster than the typical):
    peak fp32 FLOP/s     the three GEMMs of a linear layer's training step (forward X W^T,
                         backward dY W and dY^T X) for 512 tokens at hidden 128 .. 1024 (d -> 4d,
                         4d -> d, d -> d), the mean rate over those 12 shapes
                         (matmul_efficiency = 1)
    attention            flash SDPA forward + backward, causal, b=4 n=4 s=128 d=32: the fraction
                         of the GEMM rate it reaches on the causal half (attention_efficiency)
    memory bandwidth     a + b into c over 16M floats (3 x 64 MB moved)
    transcendentals      exp, SiLU and log-softmax over 1M floats (bytes in + out per second):
                         compute-bound on a CPU (transcendental_gb_per_s)
    op overhead          a chain of tiny autograd ops, forward + backward: the eager cost of
                         one op (dispatch, autograd node), what a small model pays per op
    gloo                 each all-reduce issued right after a ~1 ms GEMM (as a step interleaves
                         them, so the peer must be woken): 4 bytes gives the latency, 4 MB the
                         bus bandwidth; an all-gather and a reduce-scatter of 4 MB give how far
                         gloo's are from the ring model (`op_scale`)

Every figure is measured with N ranks running at once, for N in 1, 2, 4, 8 (`by_world`): what
one rank gets while the others compete for the same cores, caches and memory bus, and gloo
between all N; the whole set is measured `repeats` (3) times round-robin over N and each figure
keeps its median. On this 2-core VM two ranks do not each get a whole core's memory bandwidth, and
eight ranks get less than a quarter of two cores each (context switches, evicted caches); the time
model takes the entry of the world size it plans (`timemodel.for_world`). The top-level figures
are the one-rank entry. Written to runs/cpu-calibrated.yaml, which `--gpu cpu` uses from then on.
"""

from __future__ import annotations

import os
import time

import torch
import yaml

from megatiny.fsutil import atomic_write
from megatiny.plan.timemodel import CALIBRATED, PROFILE_DIR

WORLDS = (1, 2, 4, 8)
SMALL, LARGE = 4, 4 * 2**20  # gloo message sizes: latency, bandwidth


def _mean(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _gemm_rate() -> float:
    """Mean FLOP rate of a linear layer's three training GEMMs over transformer shapes: 512 tokens,
    hidden d in 128 .. 1024, the d -> 4d, 4d -> d and d -> d projections (each shape counts once,
    so small layers weigh as much as large ones)."""
    rates = []
    for d in (128, 256, 512, 1024):
        for m, k, n in ((512, d, 4 * d), (512, 4 * d, d), (512, d, d)):
            x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
            seconds = _mean(lambda x=x, w=w, dy=dy: (x @ w.t(), dy @ w, dy.t() @ x),
                            repeats=max(3, int(3e8 / (6 * m * k * n))))  # fmt: skip
            rates.append(6 * m * k * n / seconds)
    return sum(rates) / len(rates)


def _compute_rates() -> dict:
    """This rank's GEMM, attention, memory, transcendental and per-op rates."""
    import torch.nn.functional as F

    flops = _gemm_rate()
    q, k, v = (torch.randn(4, 4, 128, 32, requires_grad=True) for _ in range(3))

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    counted = 3 * 4 * 4 * 4 * 128 * 128 * 32  # forward 4 b n s^2 d, backward 2x
    attention_eff = counted / 2 / _mean(attention) / flops
    a, b = torch.randn(2**24), torch.randn(2**24)
    c = torch.empty_like(a)
    bandwidth = 3 * a.numel() * 4 / _mean(lambda: torch.add(a, b, out=c))
    big = torch.randn(2**20)
    rows = big.view(256, -1)
    special = 3 * 2 * big.numel() * 4 / (_mean(lambda: torch.exp(big))
                                         + _mean(lambda: F.silu(big))
                                         + _mean(lambda: torch.log_softmax(rows, -1)))  # fmt: skip
    tiny = torch.ones(8, requires_grad=True)

    def chain():  # 500 forward ops recorded by autograd, then their 500 backward ops
        y = tiny
        for _ in range(500):
            y = y * 1.0
        y.sum().backward()

    return {"flops": flops, "attention_efficiency": min(attention_eff, 1.0),
            "bandwidth": bandwidth, "special": special, "op_overhead": _mean(chain) / 1000}  # fmt: skip


def _gloo() -> dict:
    """Seconds of an all-reduce of SMALL and LARGE bytes over all ranks, and of an all-gather and
    a reduce-scatter of LARGE, each issued right after a GEMM (the GEMM's time taken off)."""
    import torch.distributed as dist

    from megatiny.parallel import collectives

    a, b = torch.randn(512, 256), torch.randn(256, 512)
    gemm = _mean(lambda: a @ b, repeats=100)

    def timed(op) -> float:
        dist.barrier()
        return max(_mean(lambda: (a @ b, op()), repeats=100) - gemm, 1e-6)

    n = dist.get_world_size()
    full = torch.zeros(LARGE // 4)
    part = torch.zeros(LARGE // 4 // n)
    return {
        "small": timed(lambda: collectives.all_reduce(torch.zeros(SMALL // 4))),
        "large": timed(lambda: collectives.all_reduce(full)),
        "all_gather": timed(lambda: collectives.all_gather_into(full, part)),
        "reduce_scatter": timed(lambda: collectives.reduce_scatter_into(part, full)),
    }


def _measure_rank() -> dict:
    """On every rank of the group at once: the compute rates, then gloo between all ranks."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.barrier()  # start together: each figure is met while the other ranks run theirs
    out = _compute_rates()
    if dist.get_world_size() > 1:
        out.update(_gloo())
    return out


def world_entry(rounds: list[list[dict]]) -> dict:
    """One `by_world` entry from every round's per-rank measurements: each figure is the mean
    over the ranks of a round, then the median over the rounds (a shared VM's speed moves
    between rounds; the median keeps the typical one)."""
    n = len(rounds[0])

    def typical(key):
        per_round = sorted(sum(r[key] for r in ranks) / n for ranks in rounds)
        return per_round[len(per_round) // 2]

    flops = typical("flops")
    entry = {
        "peak_tflops": {"bf16": flops / 1e12, "fp32": flops / 1e12},
        "attention_efficiency": round(typical("attention_efficiency"), 4),
        "hbm_gb_per_s": typical("bandwidth") / 1e9,
        "transcendental_gb_per_s": typical("special") / 1e9,
        "op_overhead_us": typical("op_overhead") * 1e6,
    }
    if n > 1:
        latency = typical("small")
        ring = 2 * (n - 1) / n  # the ring all-reduce's bus factor
        bandwidth = LARGE * ring / max(typical("large") - latency, 1e-9)
        # gloo's all-gather and reduce-scatter are not the halves of its all-reduce that the ring
        # model assumes ((n-1)/n each): the measured multiple of the ring model's time
        half = LARGE * (n - 1) / n / bandwidth
        op_scale = {op: round(max(typical(op) - latency, 1e-9) / half, 3)
                    for op in ("all_gather", "reduce_scatter")}  # fmt: skip
        link = {"gb_per_s": bandwidth / 1e9, "efficiency": 1.0, "latency_us": latency * 1e6,
                "op_scale": op_scale}  # fmt: skip
        entry["links"] = {"intra_node": link, "inter_node": dict(link)}
    return entry


def calibrate(path: str = CALIBRATED, worlds=WORLDS, repeats: int = 3) -> str:
    from megatiny.testing import run_ranks

    rounds = {n: [] for n in worlds}
    for _ in range(repeats):  # round-robin over the world sizes, so drift falls on all alike
        for n in worlds:
            rounds[n].append(run_ranks(_measure_rank, n, timeout=600))
    by_world = {n: world_entry(rounds[n]) for n in worlds}
    with open(os.path.join(PROFILE_DIR, "cpu.yaml"), encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    solo = by_world[min(worlds)]
    profile.update({
        "name": "cpu-calibrated",
        "sources": [f"measured on this machine by megatiny plan --calibrate ({time.ctime()}): "
                    f"means of repeats, one thread per rank, {', '.join(map(str, worlds))} ranks "
                    f"at once, the median of {repeats} rounds"],
        "matmul_efficiency": 1.0,
        "memory_efficiency": 1.0,
        **{k: v for k, v in solo.items() if k != "links"},
        "links": by_world[min(n for n in worlds if n > 1)]["links"],
        "by_world": by_world,
    })  # fmt: skip
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: yaml.safe_dump(profile, f, sort_keys=False), "w", "utf-8")
    return path
