"""`megatiny plan --gpu cpu --calibrate`: measure this machine so predictions can be checked here.

Measured with one thread per rank (as benchmarks/scaling.py runs its ranks):
    peak fp32 FLOP/s     a 512 x 512 x 512 matmul, best of several (matmul_efficiency = 1)
    attention            flash SDPA forward + backward, causal, b=4 n=4 s=128 d=32: the fraction
                         of the GEMM rate it reaches on the causal half (attention_efficiency)
    memory bandwidth     a + b into c over 16M floats (3 x 64 MB moved)
    op overhead          a chain of tiny autograd ops, forward + backward: the eager cost of
                         one op (dispatch, autograd node), what a small model pays per op
    gloo                 2 ranks all-reduce of 4 bytes (latency) and 4 MB (bandwidth)
Written to runs/cpu-calibrated.yaml, which `--gpu cpu` uses from then on.
"""

from __future__ import annotations

import os
import time

import torch
import yaml

from megatiny.plan.timemodel import CALIBRATED, PROFILE_DIR


def _best(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gloo(sizes):
    import torch.distributed as dist

    from megatiny.parallel import collectives

    out = {}
    for n in sizes:
        t = torch.zeros(n // 4)
        out[n] = _best(lambda t=t: collectives.all_reduce(t), repeats=20)
        dist.barrier()
    return out


def calibrate(path: str = CALIBRATED) -> str:
    import torch.nn.functional as F

    from megatiny.testing import run_ranks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 512
        x, y = torch.randn(n, n), torch.randn(n, n)
        flops = 2 * n**3 / _best(lambda: x @ y)
        q, k, v = (torch.randn(4, 4, 128, 32, requires_grad=True) for _ in range(3))

        def attention():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        counted = 3 * 4 * 4 * 4 * 128 * 128 * 32  # forward 4 b n s^2 d, backward 2x
        attention_eff = counted / 2 / _best(attention) / flops
        a, b2 = torch.randn(2**24), torch.randn(2**24)
        c = torch.empty_like(a)
        bandwidth = 3 * a.numel() * 4 / _best(lambda: torch.add(a, b2, out=c))
        tiny = torch.ones(8, requires_grad=True)

        def chain():  # 500 forward ops recorded by autograd, then their 500 backward ops
            y = tiny
            for _ in range(500):
                y = y * 1.0
            y.sum().backward()

        op_overhead = _best(chain) / 1000
    finally:
        torch.set_num_threads(threads)
    small, large = 4, 4 * 2**20
    times = run_ranks(_gloo, 2, args=([small, large],))[0]
    latency = times[small]
    gloo_bw = large / max(times[large] - latency, 1e-9)  # 2 ranks: bus factor 2(n-1)/n = 1
    with open(os.path.join(PROFILE_DIR, "cpu.yaml"), encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    profile.update({
        "name": "cpu-calibrated",
        "sources": [f"measured on this machine by megatiny plan --calibrate ({time.ctime()}), "
                    "one thread per rank"],
        "peak_tflops": {"bf16": flops / 1e12, "fp32": flops / 1e12},
        "matmul_efficiency": 1.0,
        "attention_efficiency": round(min(attention_eff, 1.0), 4),
        "hbm_gb_per_s": bandwidth / 1e9,
        "memory_efficiency": 1.0,
        "op_overhead_us": op_overhead * 1e6,
        "links": {name: {"gb_per_s": gloo_bw / 1e9, "efficiency": 1.0,
                         "latency_us": latency * 1e6} for name in ("intra_node", "inter_node")},
    })  # fmt: skip
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(profile, f, sort_keys=False)
    return path
