"""`megatiny plan --gpu cpu --calibrate`: measure this machine so predictions can be checked here.

Held out from benchmarks/scaling.py: the calibration measures at shapes and rank counts of its own
(docs/scaling.md lists both sets; tests/test_timemodel.py checks they do not meet):

    rank counts          3 and 6 at once (the benchmark runs 1, 2, 4, 8)
    GEMMs                a linear layer's three training GEMMs (forward X W^T, backward dY W and
                         dY^T X) for 384 tokens at hidden 192, 384, 768 (d -> 4d, 4d -> d,
                         d -> d): 27 shapes, each timed alone (the benchmark: 512 tokens at hidden
                         128, 512, 1024); fitted as rate = peak x k / (k + k_overhead)
    attention            flash SDPA forward + backward, causal, b=2 n=6 s=96 d=40 (the
                         benchmark: s=128, d=32): its fraction of the GEMM rate on the causal half
    memory bandwidth     a + b into c over 16M floats (3 x 64 MB moved)
    transcendentals      exp, SiLU and log-softmax over 1M floats (bytes in + out per second)
    op overhead          a chain of tiny autograd ops, forward + backward: one op's eager cost
    gloo                 each all-reduce issued right after a ~1 ms GEMM (as a step interleaves
                         them): 4 bytes gives the latency, 4 MB the bus bandwidth; an all-gather
                         and a reduce-scatter of 4 MB give gloo's departure from the ring model

One thread per rank (as the benchmark runs its ranks); each figure the mean of repeated runs, the
mean over the ranks, the median of `repeats` rounds round-robin over the rank counts. From the two
rank counts the model of any other is fitted (`contention`): a rank gets min(1, cores / N) of a
core, and each rank beyond the cores slows every rank's rate by a further factor 1 + g (N - cores)
(context switches, evicted caches), g fitted per kind (compute, memory, gloo bandwidth); gloo's
latency is a power of N through the two measurements (a rank waits for more peers, each
scheduled later). `timemodel.for_world` applies it at the plan's world size. Written to
runs/cpu-calibrated.yaml (or `--calibrate-out`), with the machine's cores and memory; a plan uses
it only when named: `--gpu runs/cpu-calibrated.yaml`.
"""

from __future__ import annotations

import math
import os
import time

import torch
import yaml

from megatiny.fsutil import atomic_write
from megatiny.plan.timemodel import CALIBRATED, PROFILE_DIR

WORLDS = (3, 6)  # disjoint from benchmarks/scaling.py's 1, 2, 4, 8
TOKENS, HIDDEN = 384, (192, 384, 768)  # the benchmark: 512 tokens, hidden 128, 512, 1024
ATTENTION = (2, 6, 96, 40)  # b, heads, s, head dim (the benchmark: s 128, head dim 32)
SMALL, LARGE = 4, 4 * 2**20  # gloo message sizes: latency, bandwidth


def _mean(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def gemm_shapes() -> list[tuple[int, int, int]]:
    """(m, n, k) of a linear layer's three training GEMMs at the calibration's shapes."""
    out = []
    for d in HIDDEN:
        for d_in, d_out in ((d, 4 * d), (4 * d, d), (d, d)):
            out += [(TOKENS, d_out, d_in), (TOKENS, d_in, d_out), (d_out, d_in, TOKENS)]
    return out


def _gemm_rates() -> list[float]:
    """FLOP/s of each calibration GEMM, timed alone."""
    rates = []
    for m, n, k in gemm_shapes():
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = _mean(lambda a=a, b=b: a @ b, repeats=max(3, int(1e8 / (2 * m * n * k))))
        rates.append(2 * m * n * k / seconds)
    return rates


def fit_gemm(rates: list[float]) -> tuple[float, float]:
    """(peak FLOP/s, k_overhead) of rate = peak x k / (k + k_overhead), least squares on
    1 / rate = 1 / peak + k_overhead / (peak k) over the calibration shapes."""
    xs = [1 / k for _, _, k in gemm_shapes()]
    ys = [1 / r for r in rates]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    slope = max(slope, 0.0)
    intercept = my - slope * mx
    if intercept <= 0:  # no k effect measurable: the mean rate, no overhead
        return n / sum(ys), 0.0
    return 1 / intercept, slope / intercept


def _compute_rates() -> dict:
    """This rank's GEMM, attention, memory, transcendental and per-op rates."""
    import torch.nn.functional as F

    gemms = _gemm_rates()
    flops, _ = fit_gemm(gemms)
    b, h, n, d = ATTENTION
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    counted = 3 * 4 * b * h * n * n * d  # forward 4 b h s^2 d, backward 2x
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

    return {"gemms": gemms, "attention_efficiency": min(attention_eff, 1.0),
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
    part = torch.zeros(LARGE // 4 // n)
    full = torch.zeros(part.numel() * n)  # ~LARGE bytes, divisible among the ranks
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
    """One rank count's figures from every round's per-rank measurements: each the mean over the
    ranks of a round, then the median over the rounds (a shared VM's speed moves between rounds;
    the median keeps the typical one)."""
    n = len(rounds[0])

    def typical(get):
        per_round = sorted(sum(get(r) for r in ranks) / n for ranks in rounds)
        return per_round[len(per_round) // 2]

    out = {key: typical(lambda r, k=key: r[k])
           for key in ("attention_efficiency", "bandwidth", "special", "op_overhead")}  # fmt: skip
    out["gemms"] = [
        typical(lambda r, i=i: r["gemms"][i]) for i in range(len(rounds[0][0]["gemms"]))
    ]
    if n > 1:
        out.update({key: typical(lambda r, k=key: r[k])
                    for key in ("small", "large", "all_gather", "reduce_scatter")})  # fmt: skip
    return out


def _contention(per_rank: dict[int, float], cores: int) -> tuple[float, float]:
    """(rate per core, g) of rate(N) = per_core x min(1, cores / N) / (1 + g max(0, N - cores))
    from the rates measured at two rank counts."""
    (n1, r1), (n2, r2) = sorted(per_rank.items())
    a, b = r1 / min(1.0, cores / n1), r2 / min(1.0, cores / n2)  # per core, contention included
    o1, o2 = max(0, n1 - cores), max(0, n2 - cores)
    g = (a - b) / (b * o2 - a * o1) if b * o2 - a * o1 > 0 else 0.0
    g = max(g, 0.0)
    return a * (1 + g * o1), g


def fit_profile(entries: dict[int, dict], cores: int) -> dict:
    """The profile's rates per core and their `contention` from the entries of two rank counts."""
    fits = {n: fit_gemm(e["gemms"]) for n, e in entries.items()}
    peak, g_compute = _contention({n: f[0] for n, f in fits.items()}, cores)
    hbm, g_memory = _contention({n: e["bandwidth"] for n, e in entries.items()}, cores)
    special, _ = _contention({n: e["special"] for n, e in entries.items()}, cores)
    per_op, _ = _contention({n: 1 / e["op_overhead"] for n, e in entries.items()}, cores)
    k_overhead = sum(f[1] for f in fits.values()) / len(fits)
    latency = {n: e["small"] for n, e in entries.items()}
    (n1, l1), (n2, l2) = sorted(latency.items())
    exponent = max(math.log(l2 / l1) / math.log(n2 / n1), 0.0)  # latency = l1 (N / n1)^exponent
    bus = {}
    for n, e in entries.items():
        ring = 2 * (n - 1) / n  # the ring all-reduce's bus factor
        bus[n] = LARGE * ring / max(e["large"] - e["small"], 1e-9)
    gloo_bw, g_gloo = _contention(bus, cores)
    op_scale = {}
    for op in ("all_gather", "reduce_scatter"):
        scales = [max(e[op] - e["small"], 1e-9) / (LARGE * (n - 1) / n / bus[n])
                  for n, e in entries.items()]  # fmt: skip
        op_scale[op] = round(sum(scales) / len(scales), 3)
    attention = sum(e["attention_efficiency"] for e in entries.values()) / len(entries)
    return {
        "peak_tflops": {"bf16": peak / 1e12, "fp32": peak / 1e12},
        "k_overhead": round(k_overhead, 1),
        "attention_efficiency": round(attention, 4),
        "hbm_gb_per_s": hbm / 1e9,
        "transcendental_gb_per_s": special / 1e9,
        "op_overhead_us": 1e6 / per_op,
        "contention": {"compute": round(g_compute, 4), "memory": round(g_memory, 4),
                       "gloo": {"gb_per_s": gloo_bw / 1e9, "contention": round(g_gloo, 4),
                                "latency_us": l1 * 1e6, "latency_ranks": n1,
                                "latency_exponent": round(exponent, 3), "op_scale": op_scale}},
    }  # fmt: skip


def machine() -> dict:
    """This machine's cores (those this process may run on) and memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = 0.0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024 / 2**30
    except OSError:  # no /proc (not Linux): the memory is unknown, written as 0
        memory = 0.0
    return {"cores": cores, "memory_gib": round(memory, 1)}


def calibrate(path: str = CALIBRATED, worlds=WORLDS, repeats: int = 3) -> str:
    from megatiny.parallel.local_ranks import run_ranks

    if len(worlds) != 2 or min(worlds) < 2:
        raise ValueError(f"--calibrate fits its model from two rank counts >= 2, got {worlds}")
    rounds = {n: [] for n in worlds}
    for _ in range(repeats):  # round-robin over the world sizes, so drift falls on all alike
        for n in worlds:
            rounds[n].append(run_ranks(_measure_rank, n, timeout=600))
    entries = {n: world_entry(rounds[n]) for n in worlds}
    with open(os.path.join(PROFILE_DIR, "cpu.yaml"), encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    host = machine()
    fitted = fit_profile(entries, host["cores"])
    profile.update({
        "name": "cpu-calibrated",
        "sources": [f"measured on this machine by megatiny plan --calibrate ({time.ctime()}): "
                    f"means of repeats, one thread per rank, {' and '.join(map(str, worlds))} "
                    f"ranks at once, the median of {repeats} rounds; shapes and rank counts "
                    "disjoint from benchmarks/scaling.py's"],
        **host,
        "gemm_efficiency": 1.0,
        "memory_efficiency": 1.0,
        **fitted,
        "measured": {n: {k: v for k, v in e.items() if k != "gemms"} for n, e in entries.items()},
    })  # fmt: skip
    profile.pop("links", None)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: yaml.safe_dump(profile, f, sort_keys=False), "w", "utf-8")
    return path
