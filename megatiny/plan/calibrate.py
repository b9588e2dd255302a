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
    gloo                 2 ranks, each all-reduce issued right after a ~1 ms GEMM (as a step
                         interleaves them, so the peer must be woken): 4 bytes gives the latency,
                         4 MB the bandwidth; an all-gather and a reduce-scatter of 4 MB give
                         how far gloo's are from the ring model's halves of an all-reduce
                         (`op_scale`)
Written to runs/cpu-calibrated.yaml, which `--gpu cpu` uses from then on.
"""

from __future__ import annotations

import os
import time

import torch
import yaml

from megatiny.plan.timemodel import CALIBRATED, PROFILE_DIR


def _mean(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _gloo(sizes):
    """Seconds of an all-reduce of each size in `sizes`, and of an all-gather and a
    reduce-scatter of the largest, each issued right after a GEMM (the GEMM's time taken off)."""
    import torch.distributed as dist

    from megatiny.parallel import collectives

    torch.set_num_threads(1)
    a, b = torch.randn(512, 256), torch.randn(256, 512)
    gemm = _mean(lambda: a @ b, repeats=100)

    def timed(op) -> float:
        dist.barrier()
        return max(_mean(lambda: (a @ b, op()), repeats=100) - gemm, 1e-6)

    out = {}
    for n in sizes:
        t = torch.zeros(n // 4)
        out[n] = timed(lambda t=t: collectives.all_reduce(t))
    full, half = torch.zeros(max(sizes) // 4), torch.zeros(max(sizes) // 8)
    out["all_gather"] = timed(lambda: collectives.all_gather_into(full, half))
    out["reduce_scatter"] = timed(lambda: collectives.reduce_scatter_into(half, full))
    return out


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


def calibrate(path: str = CALIBRATED) -> str:
    import torch.nn.functional as F

    from megatiny.testing import run_ranks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = _gemm_rate()
        q, k, v = (torch.randn(4, 4, 128, 32, requires_grad=True) for _ in range(3))

        def attention():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        counted = 3 * 4 * 4 * 4 * 128 * 128 * 32  # forward 4 b n s^2 d, backward 2x
        attention_eff = counted / 2 / _mean(attention) / flops
        a, b2 = torch.randn(2**24), torch.randn(2**24)
        c = torch.empty_like(a)
        bandwidth = 3 * a.numel() * 4 / _mean(lambda: torch.add(a, b2, out=c))
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

        op_overhead = _mean(chain) / 1000
    finally:
        torch.set_num_threads(threads)
    small, large = 4, 4 * 2**20
    times = run_ranks(_gloo, 2, args=([small, large],))[0]
    latency = times[small]
    gloo_bw = large / max(times[large] - latency, 1e-9)  # 2 ranks: bus factor 2(n-1)/n = 1
    # gloo's all-gather and reduce-scatter are not the halves of its all-reduce that the ring
    # model assumes ((n-1)/n = 1/2 at 2 ranks): the measured multiple of the ring model's time.
    op_scale = {op: round(max(times[op] - latency, 1e-9) * gloo_bw / (large / 2), 3)
                for op in ("all_gather", "reduce_scatter")}  # fmt: skip
    with open(os.path.join(PROFILE_DIR, "cpu.yaml"), encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    profile.update({
        "name": "cpu-calibrated",
        "sources": [f"measured on this machine by megatiny plan --calibrate ({time.ctime()}), mean of repeats, "
                    "one thread per rank"],
        "peak_tflops": {"bf16": flops / 1e12, "fp32": flops / 1e12},
        "matmul_efficiency": 1.0,
        "attention_efficiency": round(min(attention_eff, 1.0), 4),
        "hbm_gb_per_s": bandwidth / 1e9,
        "transcendental_gb_per_s": special / 1e9,
        "memory_efficiency": 1.0,
        "op_overhead_us": op_overhead * 1e6,
        "links": {name: {"gb_per_s": gloo_bw / 1e9, "efficiency": 1.0,
                         "latency_us": latency * 1e6, "op_scale": dict(op_scale)}
                  for name in ("intra_node", "inter_node")},
    })  # fmt: skip
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(profile, f, sort_keys=False)
    return path
