"""Fused LayerNorm / RMSNorm (optionally with the residual add fused in), forward and backward.

Over the last dim (``N`` features) of ``x``, in fp32 whatever the input dtype:

- LayerNorm: ``mu = mean(x)``, ``rstd = 1 / sqrt(mean((x - mu)^2) + eps)``, ``xhat = (x - mu) rstd``,
  ``y = xhat * w + b``.
- RMSNorm: ``rstd = 1 / sqrt(mean(x^2) + eps)``, ``xhat = x rstd``, ``y = xhat * w``.
- Backward, with ``g = w * dy``: LayerNorm ``dx = rstd (g - xhat mean(g xhat) - mean(g))``,
  RMSNorm ``dx = rstd (g - xhat mean(g xhat))``; ``dw = sum_rows dy xhat``, ``db = sum_rows dy``.

Weight/bias gradients: each of ``G`` programs walks rows ``pid, pid + G, ...`` and keeps its own
fp32 partial ``dw``/``db`` in registers, written to a ``[G, N]`` buffer that is summed afterwards —
deterministic, no atomics.

Residual fusion (pre-LN blocks): ``layer_norm(x, w, b, eps, residual=r)`` returns ``(y, h)`` with
``h = x + r`` and ``y = LN(h)`` in one pass (reads x and r, writes h and y: 4 passes over the
activation instead of the 5 of a separate add and norm). The gradient reaching ``h`` directly is
added to the norm's input gradient inside the backward kernel.
"""

import torch
import triton
import triton.language as tl

from megatiny.kernels import check_launchable, jit

# Widest row the kernels take: the backward keeps w, x, dy, dh and the dw/db partial sums of a whole
# row in registers; past 8192 features on an H100 that spills heavily (checked with ptxas -v).
MAX_FEATURES = 8192


def _fwd_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _bwd_warps(block: int) -> int:
    # More warps than the forward: ~6 row-sized fp32 arrays live per thread (128 registers at 4096).
    return max(1, min(16, block // 256))


@jit
def _norm_fwd_kernel(X, RES, W, B, Y, H, MEAN, RSTD, N, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    off = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    inb = cols < N
    x = tl.load(X + off + cols, mask=inb, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(RES + off + cols, mask=inb, other=0.0).to(tl.float32)
        tl.store(H + off + cols, x.to(H.dtype.element_ty), mask=inb)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(inb, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=inb, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=inb, other=0.0).to(tl.float32)
    tl.store(Y + off + cols, y.to(Y.dtype.element_ty), mask=inb)


@jit
def _norm_bwd_kernel(X, W, DY, DH, DX, MEAN, RSTD, DW_PART, DB_PART, M, N,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_DH: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    inb = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=inb, other=0.0).to(tl.float32)
    else:
        w = tl.where(inb, 1.0, 0.0)
    dw_acc = tl.zeros([BLOCK], tl.float32)
    db_acc = tl.zeros([BLOCK], tl.float32)
    off = pid.to(tl.int64) * N
    step = n_progs.to(tl.int64) * N
    for row in range(pid, M, n_progs):
        x = tl.load(X + off + cols, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(DY + off + cols, mask=inb, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(inb, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(xhat * g, axis=0) / N
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, axis=0) / N) * rstd
        if HAS_DH:
            dx += tl.load(DH + off + cols, mask=inb, other=0.0).to(tl.float32)
        tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=inb)
        dw_acc += dy * xhat
        db_acc += dy
        off += step
    if HAS_W:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=inb)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, db_acc, mask=inb)


def _num_partials(rows: int, device: torch.device) -> int:
    """Programs of the backward kernel: enough to fill the GPU, few enough that [G, N] stays small."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # >= 8 rows per program, so summing the [G, N] partials stays small next to the main pass.
        return max(1, min(4 * sms, triton.cdiv(rows, 8)))
    return max(1, min(rows, 4))


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms):
        n = x.shape[-1]
        if n > MAX_FEATURES:
            raise ValueError(
                f"the fused norm handles up to {MAX_FEATURES} features, got {n}; use layer_norm_ref / "
                "rms_norm_ref (or torch.nn.functional) for wider rows"
            )
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (n,):
                raise ValueError(
                    f"{name} must have shape ({n},) to match x's last dim, got {tuple(p.shape)}"
                )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(
                f"residual shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}"
            )
        x2 = x.reshape(-1, n).contiguous()
        res2 = residual.reshape(-1, n).contiguous() if residual is not None else None
        present = [t for t in (x2, weight, bias, res2) if t is not None]
        check_launchable(_norm_fwd_kernel, *present)
        m = x2.shape[0]
        y = torch.empty_like(x2)
        h = torch.empty_like(x2) if res2 is not None else None
        mean = torch.empty(m, device=x.device, dtype=torch.float32)
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(n)
        if m > 0:
            _norm_fwd_kernel[(m,)](
                x2, res2 if res2 is not None else x2, weight if weight is not None else x2,
                bias if bias is not None else x2, y, h if h is not None else y, mean, rstd, n, float(eps),
                IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_RES=res2 is not None, BLOCK=block, num_warps=_fwd_warps(block),
            )  # fmt: skip
        ctx.save_for_backward(h if h is not None else x2, weight, bias, mean, rstd)
        ctx.is_rms = is_rms
        ctx.has_res = res2 is not None
        ctx.x_shape = x.shape
        if h is not None:
            return y.view(x.shape), h.view(x.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dh2 = dh.reshape(m, n).contiguous() if dh is not None else None
        dx = torch.empty_like(x2)
        g = _num_partials(m, x2.device)
        dw_part = (
            torch.empty(g, n, device=x2.device, dtype=torch.float32) if weight is not None else None
        )
        db_part = (
            torch.empty(g, n, device=x2.device, dtype=torch.float32) if bias is not None else None
        )
        block = triton.next_power_of_2(n)
        if m > 0:
            _norm_bwd_kernel[(g,)](
                x2, weight if weight is not None else x2, dy2, dh2 if dh2 is not None else dy2, dx,
                mean, rstd, dw_part if dw_part is not None else rstd,
                db_part if db_part is not None else rstd, m, n,
                IS_RMS=ctx.is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_DH=dh2 is not None, BLOCK=block, num_warps=_bwd_warps(block),
            )  # fmt: skip
        else:
            for part in (dw_part, db_part):
                if part is not None:
                    part.zero_()
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        dx = dx.view(ctx.x_shape)
        return dx, dw, db, (dx if ctx.has_res else None), None, None


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with ``residual``, returns ``(LN(x + residual), x + residual)``.

    ``weight`` and ``bias`` may each be None (no affine scale / shift).
    """
    return _Norm.apply(x, weight, bias, residual, eps, False)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim; with ``residual``, returns ``(RMS(x + residual), x + residual)``."""
    return _Norm.apply(x, weight, None, residual, eps, True)


def layer_norm_ref(x, weight, bias, eps=1e-5, residual=None):
    """Plain torch ``layer_norm`` (fp32 math, outputs in ``x``'s dtype)."""
    h = x + residual if residual is not None else x
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = torch.nn.functional.layer_norm(h.float(), h.shape[-1:], w, b, eps).to(x.dtype)
    return (y, h) if residual is not None else y


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    """Plain torch ``rms_norm`` (fp32 math, outputs in ``x``'s dtype)."""
    h = x + residual if residual is not None else x
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


def compile_specs() -> list[dict]:
    """Kernel instances the compile test builds for an H100 (signature + constexprs)."""
    specs = []
    for dtype in ("fp32", "bf16"):
        for is_rms in (False, True):
            for block in (1024, 4096):
                flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms, BLOCK=block)
                specs.append(
                    dict(
                        fn=_norm_fwd_kernel,
                        signature={
                            "X": f"*{dtype}",
                            "RES": f"*{dtype}",
                            "W": "*fp32",
                            "B": "*fp32",
                            "Y": f"*{dtype}",
                            "H": f"*{dtype}",
                            "MEAN": "*fp32",
                            "RSTD": "*fp32",
                            "N": "i32",
                            "eps": "fp32",
                        },  # fmt: skip
                        constexprs={**flags, "HAS_RES": True},
                        num_warps=_fwd_warps(block),
                    )
                )
                specs.append(
                    dict(
                        fn=_norm_bwd_kernel,
                        signature={
                            "X": f"*{dtype}",
                            "W": "*fp32",
                            "DY": f"*{dtype}",
                            "DH": f"*{dtype}",
                            "DX": f"*{dtype}",
                            "MEAN": "*fp32",
                            "RSTD": "*fp32",
                            "DW_PART": "*fp32",
                            "DB_PART": "*fp32",
                            "M": "i32",
                            "N": "i32",
                        },  # fmt: skip
                        constexprs={**flags, "HAS_DH": True},
                        num_warps=_bwd_warps(block),
                    )
                )
    return specs


def benchmark_cases(device: str, dtype: torch.dtype) -> list[dict]:
    """Cases for ``benchmarks/kernels.py``. ``setup()`` allocates lazily and returns the input that
    gets gradients, the fused and the eager-torch callables, and the bytes each pass must move."""

    def setup(n, rms):
        x = torch.randn(16384, n, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        b = None if rms else torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        nbytes = x.numel() * x.element_size()
        if rms:
            fused = lambda: rms_norm(x, w, 1e-6)  # noqa: E731
            eager = lambda: torch.nn.functional.rms_norm(x, (n,), w, 1e-6)  # noqa: E731
        else:
            fused = lambda: layer_norm(x, w, b, 1e-5)  # noqa: E731
            eager = lambda: torch.nn.functional.layer_norm(x, (n,), w, b, 1e-5)  # noqa: E731
        # forward: read x, write y; backward: read x and dy, write dx (weights are negligible)
        return dict(x=x, fused=fused, eager=eager, bytes_fwd=2 * nbytes, bytes_bwd=3 * nbytes)

    return [
        dict(kernel=kind, size=n, setup=lambda n=n, r=(kind == "rms_norm"): setup(n, r))
        for kind in ("layer_norm", "rms_norm")
        for n in (1024, 2048, 4096, 8192)
    ]
