"""Flash attention (forward and backward) for causal / full attention with grouped KV heads.

``O = softmax(scale * Q K^T + C) V`` per head, for ``q`` ``[b, n, s, d]`` and ``k``, ``v``
``[b, g, t, d]`` with ``g | n``: query head ``h`` reads kv head ``h // (n / g)`` (GQA; ``g == n``
is plain multi-head, ``g == 1`` multi-query). K/V are never repeated in memory. With ``causal``
``C[i, j] = -inf`` for ``j > i + causal_offset``, ``causal_offset = t - s`` by default (the mask
is bottom-right aligned: ``s`` new queries after ``t - s`` cached positions, as in KV-cache
decoding; ``s == t`` is the usual lower triangle). A query row that sees no key (possible with an
explicit ``causal_offset < 0``, or ``s > t``) gives ``O = 0`` and ``lse = -inf``.

Forward (FlashAttention-2): one program per ``BLOCK_M`` query rows of one head streams the
keys in ``BLOCK_N`` blocks, keeping a running row max ``m``, sum ``l`` and the unnormalised
output in registers (online softmax, base-2 exponentials). Key blocks every row of the block sees
run without a mask; only the blocks on the diagonal (and the ragged end) are masked; blocks above
the diagonal are skipped. It saves ``lse = m + log l`` ``[b, n, s]`` (fp32) next to q, k, v and O:
O(s) per head, never the ``s x t`` scores.

Backward recomputes ``P = exp(scale * Q K^T - lse)``. With ``delta_i = sum_d dO_i O_i - dlse_i``
(the ``lse`` output is differentiable too, for ring attention merging partial results):
``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, ``dV = P^T dO``.
One kernel per key block accumulates ``dK``/``dV`` over the query blocks of every query head of
its kv group (no atomics, no repeated K/V, deterministic); another per query block accumulates
``dQ``. Inputs fp32/fp16/bf16, fp32 accumulation, outputs in the input dtype. Dropout is not
supported (``megatiny.model.attention_core`` keeps the softmax path for ``dropout_p > 0``).
"""

import math

import torch
import triton

from megatiny.kernels import check_launchable, interpreter_ready
from megatiny.kernels.flash_attention.kernels import (
    _flash_bwd_dkdv_kernel,
    _flash_bwd_dq_kernel,
    _flash_bwd_preprocess_kernel,
    _flash_fwd_kernel,
)

MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gpu_config(head_dim: int, dtype: torch.dtype, seqlen_q: int) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel on sm_90: Triton's FA tutorial tiles,
    trimmed until ``ptxas -v`` reports no spills (tests/test_kernels_compile.py); not yet tuned."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32 and block_d > 64:  # fp32 dots run as FMAs, whole rows per thread
        fwd, dkdv, dq = (32, 16, 8, 1), (32, 16, 8, 1), (32, 16, 4, 1)
    elif dtype == torch.float32:
        fwd, dkdv, dq = (64, 32, 8, 2), (32, 32, 8, 1), (32, 32, 8, 1)
    elif block_d <= 64:
        fwd, dkdv, dq = (128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)
    else:
        fwd, dkdv, dq = (128, 32, 8, 3), (32, 64, 8, 3), (64, 32, 8, 2)
    # Short query blocks (decoding) waste less of a smaller BLOCK_M (tl.dot needs 16), 4 warps.
    block_m = max(16, triton.next_power_of_2(seqlen_q))
    if dtype != torch.float32 and block_m < fwd[0]:
        fwd = (block_m, 64, 4, 3)
    return dict(fwd=fwd, dkdv=dkdv, dq=dq, block_d=block_d)


def _config(head_dim: int, dtype: torch.dtype, seqlen_q: int) -> dict:
    """The GPU configuration, or one small one under the interpreter (several blocks per tiny test)."""
    if interpreter_ready():
        block_d = max(16, triton.next_power_of_2(head_dim))
        return dict(fwd=(16, 16, 1, 1), dkdv=(16, 16, 1, 1), dq=(16, 16, 1, 1), block_d=block_d)
    return _gpu_config(head_dim, dtype, seqlen_q)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in true fp32 unless torch allows TF32 matmuls; halves ignore this."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, causal_offset):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        check_launchable(_flash_fwd_kernel, q, k, v)
        (b, n, s, d), (g, t) = q.shape, k.shape[1:3]
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((b, n, s), device=q.device, dtype=torch.float32)
        cfg = _config(d, q.dtype, s)
        bm, bn, warps, stages = cfg["fwd"]
        if o.numel() > 0:
            _flash_fwd_kernel[(triton.cdiv(s, bm), b * n)](
                q, k, v, o, lse, scale, s, t, causal_offset, n, n // g, *q.stride()[:3],
                *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], CAUSAL=causal, HEAD_DIM=d,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["block_d"], PRECISION=_precision(q.dtype),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, scale, causal_offset)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        causal, scale, causal_offset = ctx.args
        (b, n, s, d), (g, t) = q.shape, k.shape[1:3]
        dq = torch.zeros((b, n, s, d), device=q.device, dtype=q.dtype)
        dk = torch.zeros((b, g, t, d), device=k.device, dtype=k.dtype)
        dv = torch.zeros((b, g, t, d), device=v.device, dtype=v.dtype)
        if q.numel() == 0 or k.numel() == 0 or (do is None and dlse is None):
            return dq, dk, dv, None, None, None
        do = torch.zeros_like(o) if do is None else (do if do.stride(-1) == 1 else do.contiguous())
        cfg, precision = _config(d, q.dtype, s), _precision(q.dtype)
        delta = torch.empty_like(lse)
        _flash_bwd_preprocess_kernel[(triton.cdiv(s, 16), b * n)](
            o, do, dlse.contiguous() if dlse is not None else lse, delta, s, n, *o.stride()[:3],
            *do.stride()[:3], HAS_DLSE=dlse is not None, HEAD_DIM=d, BLOCK_M=16,
            BLOCK_D=cfg["block_d"],
        )  # fmt: skip
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
        flags = dict(CAUSAL=causal, HEAD_DIM=d, BLOCK_D=cfg["block_d"], PRECISION=precision)
        bm, bn, warps, stages = cfg["dkdv"]
        _flash_bwd_dkdv_kernel[(triton.cdiv(t, bn), b * g)](
            q, k, v, do, lse, delta, dk, dv, scale, s, t, causal_offset, g, n // g, *strides,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags,
        )  # fmt: skip
        bm, bn, warps, stages = cfg["dq"]
        _flash_bwd_dq_kernel[(triton.cdiv(s, bm), b * n)](
            q, k, v, do, lse, delta, dq, scale, s, t, causal_offset, n, n // g, *strides,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention needs q [b, n, s, d] and k, v [b, g, t, d]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    (b, n, _, d), (bk, g, _, dk) = q.shape, k.shape
    if b != bk or d != dk or g == 0 or n % g:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} need the same batch and head "
                         f"dim, and kv heads g={g} dividing query heads n={n}")  # fmt: skip
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")  # fmt: skip
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is outside 1..{MAX_HEAD_DIM}; use "
                         "torch.nn.functional.scaled_dot_product_attention")  # fmt: skip


def flash_attention_with_lse(q, k, v, causal=True, scale=None, causal_offset=None):
    """``(O, lse)``: attention output ``[b, n, s, d]`` and ``lse = logsumexp_j(scale q_i k_j)``
    ``[b, n, s]`` fp32 over the keys each query sees (-inf where none); both differentiable.
    ``scale`` defaults to ``1/sqrt(d)``, ``causal_offset`` (query i sees keys ``<= i + offset``) to
    ``t - s``."""
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    offset = k.shape[2] - q.shape[2] if causal_offset is None else int(causal_offset)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, offset)


def flash_attention(q, k, v, causal=True, scale=None, causal_offset=None):
    """``softmax(scale q k^T + causal mask) v`` for q ``[b, n, s, d]``, k/v ``[b, g, t, d]``, g | n."""
    return flash_attention_with_lse(q, k, v, causal, scale, causal_offset)[0]


def flash_attention_ref(q, k, v, causal=True, scale=None, causal_offset=None, return_lse=False):
    """Plain torch ``flash_attention`` (fp32 math, output in q's dtype; materialises the scores)."""
    (n, s, d), (g, t) = q.shape[1:], k.shape[1:3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = k.repeat_interleave(n // g, dim=1).float(), v.repeat_interleave(n // g, dim=1).float()
    scores = (q.float() @ k.transpose(-2, -1)) * scale
    if causal:
        offset = t - s if causal_offset is None else causal_offset
        above = torch.ones(s, t, dtype=torch.bool, device=q.device).triu(offset + 1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    out = (probs @ v).to(q.dtype)
    return (out, lse) if return_lse else out


def compile_specs() -> list[dict]:
    """Kernel instances the compile test builds for an H100 (signature + constexprs)."""

    def spec(fn, dtype, constexprs, warps=4, stages=3):
        # Pointers are the upper-case arguments (fp32 row statistics, the rest in `dtype`).
        names = [p.name for p in fn.params if not p.is_constexpr]
        sig = {a: "fp32" if a == "sm_scale" else "i32" for a in names}
        stats = ("LSE", "DELTA", "DLSE")
        sig |= {a: "*fp32" if a in stats else f"*{dtype}" for a in names if a.isupper()}
        return dict(fn=fn, signature=sig, constexprs=constexprs, num_warps=warps, num_stages=stages)

    specs = []
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for dtype, head_dim, seqlen_q in (("bf16", 64, 4096), ("bf16", 128, 4096), ("bf16", 128, 1),
                                      ("fp16", 128, 4096), ("fp32", 64, 4096), ("fp32", 128, 4096),
                                      ("bf16", 24, 77)):  # fmt: skip
        cfg = _gpu_config(head_dim, torch_dtypes[dtype], seqlen_q)
        flags = dict(
            HEAD_DIM=head_dim, BLOCK_D=cfg["block_d"], PRECISION=_precision(torch_dtypes[dtype])
        )
        for causal in (
            (True, False) if (dtype, head_dim, seqlen_q) == ("bf16", 128, 4096) else (True,)
        ):
            for fn, (bm, bn, warps, stages) in ((_flash_fwd_kernel, cfg["fwd"]),
                                                (_flash_bwd_dkdv_kernel, cfg["dkdv"]),
                                                (_flash_bwd_dq_kernel, cfg["dq"])):  # fmt: skip
                if seqlen_q == 1 and fn is not _flash_fwd_kernel:
                    continue  # decoding runs only the forward
                consts = dict(CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, **flags)
                specs.append(spec(fn, dtype, consts, warps, stages))
        pre = dict(HAS_DLSE=True, HEAD_DIM=head_dim, BLOCK_M=16, BLOCK_D=cfg["block_d"])
        specs.append(spec(_flash_bwd_preprocess_kernel, dtype, pre))
    return specs


def benchmark_cases(device: str, dtype: torch.dtype) -> list[dict]:
    """Cases for ``benchmarks/kernels.py``: causal attention on 16k tokens, d_model 2048, against
    ``F.scaled_dot_product_attention``; the figure of merit is TFLOP/s (``flops_*``, causal half)."""
    import torch.nn.functional as F

    def setup(seq, head_dim, kv_ratio):
        b, n = 16384 // seq, 2048 // head_dim
        q = torch.randn(b, n, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, n // kv_ratio, seq, head_dim, device=device, dtype=dtype,
                            requires_grad=True) for _ in range(2))  # fmt: skip
        flops = 4 * b * n * seq * seq * head_dim // 2
        return dict(
            x=[q, k, v],
            fused=lambda: flash_attention(q, k, v),
            eager=lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=kv_ratio > 1
            ),
            flops_fwd=flops,
            flops_bwd=2.5 * flops,  # five s x t matmuls against the forward's two
            compile=False,  # the reference is already a fused kernel
        )

    return [
        dict(kernel=f"flash_attn_d{d}" + (f"_gqa{r}" if r > 1 else ""), size=seq,
             setup=lambda seq=seq, d=d, r=r: setup(seq, d, r))
        for d, r in ((64, 1), (128, 1), (128, 4))
        for seq in (512, 1024, 2048, 4096, 8192)
    ]  # fmt: skip
