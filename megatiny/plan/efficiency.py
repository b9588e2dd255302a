"""Kernel times from kernel shapes: the GEMM, attention and memory-bound models of the time model.

The dry run records every GEMM's shape (batch, m, n, k, element size) and every flash-attention
call's (batch x heads, s_q, s_k, head dim, causal, forward or backward): `ShapeCounter`. These
functions turn one shape into seconds on a profile (`timemodel.load_profile`: datasheet figures of
the part + the efficiency fractions its chip shares with every other part of that chip).

GEMM (cuBLAS on a GPU; the profile has `sms`):

    tiles  = batch x ceil(m / tm) x ceil(n / tn)          for each cuBLAS-like tile tm x tn
    waves  = ceil(tiles / sms)                            (tile and wave quantization)
    t_tile = 2 tm tn (k + k_overhead) / (peak x gemm_efficiency / sms)
    t      = max(min over tiles of waves x t_tile,        compute: the tile cuBLAS would pick
                 bytes(A, B, C) / (HBM x memory_efficiency))   roofline: memory-bound GEMMs
             + kernel_floor_us                            a kernel's fixed start and drain

`gemm_efficiency` is the largest fraction of peak a GEMM reaches (Stas Bekman's Maximum
Achievable Matmul FLOPS, ml-engineering), `k_overhead` the pipeline prologue and epilogue of one
tile in k-elements and `kernel_floor_us` the fixed cost, both checked against a published cuBLASLt
shape sweep on H100 (tests/test_timemodel.py; docs/scaling.md lists the sources). Every tile is
assumed to run at the same per-SM rate; the model picks the tile with the fewest padded
FLOP-waves, as cuBLAS's heuristics aim to. Without `sms` (a CPU: one core per rank, micro-kernels
far smaller than any layer) only the k term and the roofline remain.

Attention (FlashAttention-2, which torch's SDPA calls on H100; the profile has `attention`):

    scores = batch x heads x s_q x s_k (/2 causal)
    fwd    = scores x (4 d (1 + row_overhead / s_k_eff) / (peak x fwd_efficiency) + 1 / SFU)
    bwd    = scores x (10 d (1 + row_overhead / s_k_eff) / (peak x bwd_efficiency) + 1 / SFU)

4 d and 10 d are the multiply-add FLOPs per score of the forward's 2 GEMMs and the backward's 5
(it recomputes P); the exponential runs on the special-function units, peak / sfu_ratio FLOP/s
(FlashAttention-3 paper: 989 TFLOP/s of matmul against 3.9 TFLOP/s of exp on H100 SXM), which
FlashAttention-2 does not overlap with its GEMMs; `row_overhead` is the per-row cost (load Q,
rescale, write O) in keys. Without `attention` (a CPU) the calibrated fraction of the GEMM rate
applies to the causal half: attention FLOPs / 2 / (peak x attention_efficiency).

Memory-bound ops: bytes / (HBM x memory_efficiency) (a STREAM-like measurement on the chip).
"""

from __future__ import annotations

import math

from megatiny.plan.opcount import _FLASH, _FLASH_BACKWARD, OpCounter

_GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def peak_flops(profile: dict, itemsize: int) -> float:
    """FLOP/s of a GEMM on inputs of this element size (2: bf16, 4: fp32), shared among ranks."""
    dtype = "bf16" if itemsize <= 2 else "fp32"
    return profile["peak_tflops"][dtype] * 1e12 * profile.get("share", 1.0)


def memory_rate(profile: dict) -> float:
    return profile["hbm_gb_per_s"] * 1e9 * profile["memory_efficiency"] * profile.get("share", 1.0)


def gemm_seconds(shape, profile: dict) -> float:
    """One GEMM of shape (batch, m, n, k, itemsize) on `profile`."""
    batch, m, n, k, itemsize = shape
    rate = peak_flops(profile, itemsize) * profile["gemm_efficiency"]
    k_eff = k + profile.get("k_overhead", 0)
    sms = profile.get("sms")
    if sms:
        compute = min(
            math.ceil(batch * math.ceil(m / tm) * math.ceil(n / tn) / sms)
            * 2 * tm * tn * k_eff / (rate / sms)
            for tm, tn in profile["gemm_tiles"]
        )  # fmt: skip
    else:
        compute = 2 * batch * m * n * k_eff / rate
    out_size = max(itemsize, 2)  # an 8-bit GEMM writes 16-bit results
    memory = batch * (itemsize * (m * k + k * n) + out_size * m * n) / memory_rate(profile)
    return max(compute, memory) + profile.get("kernel_floor_us", 0.0) * 1e-6


def attention_seconds(shape, profile: dict) -> float:
    """One flash-attention call of shape (batch x heads, s_q, s_k, d, causal, "fwd" | "bwd")."""
    bn, s_q, s_k, d, causal, kind, itemsize = shape
    half = causal and s_q == s_k
    scores = bn * s_q * s_k * (0.5 if half else 1.0)
    peak = peak_flops(profile, itemsize)
    att = profile.get("attention")
    if not att:  # CPU: the calibrated fraction of the GEMM rate, on the causal half
        flops = 4 * scores * d * (2 if kind == "bwd" else 1)
        return flops / (peak * profile["attention_efficiency"])
    s_eff = s_k * (0.5 if half else 1.0)
    per_score = (4 if kind == "fwd" else 10) * d * (1 + att["row_overhead"] / s_eff)
    efficiency = att["fwd_efficiency" if kind == "fwd" else "bwd_efficiency"]
    sfu = peak / att["sfu_ratio"]
    return scores * (per_score / (peak * efficiency) + 1 / sfu)


def gemm_shape(func, args) -> tuple:
    a, b = (args[1], args[2]) if func._overloadpacket.__name__ in ("addmm", "baddbmm") else args[:2]
    batch = a.shape[0] if a.dim() == 3 else 1
    return (batch, a.shape[-2], b.shape[-1], a.shape[-1], a.element_size())


class ShapeCounter(OpCounter):
    """`OpCounter` that also counts calls per GEMM and attention shape, per phase:
    `totals()[phase]["gemm_shapes"]` {(batch, m, n, k, itemsize): calls} and
    `["attention_shapes"]` {(batch x heads, s_q, s_k, d, causal, "fwd" | "bwd", itemsize): calls}."""

    def __init__(self):
        super().__init__()
        self.shapes: dict[str, dict[str, dict[tuple, int]]] = {}

    def _shape(self, kind: str, key: tuple) -> None:
        table = self.shapes.setdefault(self.phase, {"gemm_shapes": {}, "attention_shapes": {}})
        table[kind][key] = table[kind].get(key, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        kwargs = kwargs or {}
        if func._overloadpacket.__name__ in _GEMMS and func.namespace == "aten":
            self._shape("gemm_shapes", gemm_shape(func, args))
        elif func in _FLASH or func in _FLASH_BACKWARD:
            backward = func in _FLASH_BACKWARD
            q, k = (args[1], args[2]) if backward else (args[0], args[1])
            at = 7 if backward else 4
            causal = bool(args[at] if len(args) > at else kwargs.get("is_causal", False))
            b, n, s_q, d = q.shape
            key = (b * n, s_q, k.shape[-2], d, causal, "bwd" if backward else "fwd",
                   q.element_size())  # fmt: skip
            self._shape("attention_shapes", key)
        return out

    def totals(self) -> dict:
        out = super().totals()
        for phase, tables in self.shapes.items():
            out.setdefault(phase, {}).update({k: dict(v) for k, v in tables.items()})
        return out


def kernel_seconds(ops: dict, profile: dict) -> dict:
    """Seconds of one phase's recorded shapes: {"matmul": s, "attention": s, "matmul_flops": F}
    (`ops`: a `ShapeCounter.totals()` row, call counts possibly fractional: per micro-batch)."""
    matmul = sum(
        calls * gemm_seconds(s, profile) for s, calls in ops.get("gemm_shapes", {}).items()
    )
    attention = sum(calls * attention_seconds(s, profile)
                    for s, calls in ops.get("attention_shapes", {}).items())  # fmt: skip
    return {"matmul": matmul, "attention": attention}
