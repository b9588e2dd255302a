"""Fused scale + mask + softmax for attention scores (Megatron's ``FusedScaleMaskSoftmax``).

Two public functions, both over the last dim of ``x`` = ``[b, np, sq, sk]`` (or ``[attn_batches, sq,
sk]``, or ``[sq, sk]``):

- ``scaled_causal_softmax(x, scale)``:  ``y = softmax(scale * x + C)`` with ``C[i, j] = -inf`` for
  ``j > i + (sk - sq)`` (upper triangle masked; the diagonal is aligned bottom-right, which for
  ``sq == sk`` is Megatron's ``scaled_upper_triang_masked_softmax``). Masked entries are exactly 0.
- ``scaled_masked_softmax(x, mask, scale)``: ``y = softmax(where(mask, -10000, scale * x))`` with
  ``mask`` broadcastable to ``x`` and ``True`` meaning *masked out* (Megatron's
  ``scaled_masked_softmax`` and ``attention_mask_func``). A fully masked row is therefore uniform,
  exactly as in Megatron.

Backward: ``dx = scale * y * (dy - sum_j dy_j y_j)``, and 0 where ``mask`` is set (the masked input
does not reach the output). Inputs may be fp32/fp16/bf16; everything is accumulated in fp32 and
the output has the input's dtype. Rows of any length: up to ``MAX_BLOCK`` columns a row is held in
registers (one read, one write; short rows packed several to a program); longer rows are streamed
in chunks with an online max/sum.
"""

import torch
import triton
import triton.language as tl

from megatiny.kernels import check_launchable, jit, num_warps_for

MASK_FILL = -10000.0
# Longest row held whole in registers; longer rows are processed in CHUNK-column pieces.
MAX_BLOCK = 16384
CHUNK = 4096
# Short rows are packed into [ROWS, BLOCK] tiles of about this many elements per program.
ROW_TILE = 2048


@jit
def _load_scores(X, M, row, row_ok, q, cols, sk, causal_offset, scale, m_off, stride_mk,
                 HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):  # fmt: skip
    """Scaled fp32 scores of a row chunk (or a [ROWS, BLOCK] tile); -inf outside the row or
    above the causal diagonal."""
    inb = (cols < sk) & row_ok
    keep = inb
    if CAUSAL:
        keep = keep & (cols <= q + causal_offset)
    s = tl.load(X + row * sk + cols, mask=keep, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        m = tl.load(M + m_off + cols * stride_mk, mask=inb, other=0)
        s = tl.where(m != 0, -10000.0, s)  # MASK_FILL
    return tl.where(keep, s, float("-inf"))


@jit
def _row_coords(row, sq, n_heads, stride_mb, stride_mh, stride_mq):
    """Query index of a flat row of [b, np, sq, sk] and the mask offset of that row."""
    q = row % sq
    m_off = (
        (row // (sq * n_heads)) * stride_mb + ((row // sq) % n_heads) * stride_mh + q * stride_mq
    )
    return q, m_off


@jit
def _softmax_fwd_kernel(X, Y, M, n_rows, sq, sk, n_heads, causal_offset, scale,
                        stride_mb, stride_mh, stride_mq, stride_mk,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
                        NUM_CHUNKS: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    if NUM_CHUNKS == 1:
        # A [ROWS, BLOCK] tile: short rows are packed several per program.
        row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        q, m_off = _row_coords(row, sq, n_heads, stride_mb, stride_mh, stride_mq)
        s = _load_scores(X, M, row, row < n_rows, q, cols, sk, causal_offset, scale, m_off,
                         stride_mk, HAS_MASK, CAUSAL)  # fmt: skip
        s = tl.where(row < n_rows, s, 0.0)  # rows past the end: finite, never stored
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
        tl.store(Y + row * sk + cols, y.to(Y.dtype.element_ty), mask=(cols < sk) & (row < n_rows))
    else:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        q, m_off = _row_coords(row, sq, n_heads, stride_mb, stride_mh, stride_mq)
        # Online softmax statistics per lane; -1e30 (not -inf) so that exp(m_old - m_new) is never nan.
        m_i = tl.full([BLOCK], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            s = _load_scores(X, M, row, True, q, c * BLOCK + cols, sk, causal_offset, scale, m_off,
                             stride_mk, HAS_MASK, CAUSAL)  # fmt: skip
            m_new = tl.maximum(m_i, s)
            l_i = l_i * tl.exp(m_i - m_new) + tl.exp(s - m_new)
            m_i = m_new
        m_row = tl.max(m_i, axis=0)
        inv_l = 1.0 / tl.sum(l_i * tl.exp(m_i - m_row), axis=0)
        for c in range(NUM_CHUNKS):
            s = _load_scores(X, M, row, True, q, c * BLOCK + cols, sk, causal_offset, scale, m_off,
                             stride_mk, HAS_MASK, CAUSAL)  # fmt: skip
            y = tl.exp(s - m_row) * inv_l
            tl.store(Y + row * sk + c * BLOCK + cols, y.to(Y.dtype.element_ty),
                     mask=c * BLOCK + cols < sk)  # fmt: skip


@jit
def _softmax_bwd_kernel(DY, Y, DX, M, n_rows, sq, sk, n_heads, scale,
                        stride_mb, stride_mh, stride_mq, stride_mk,
                        HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                        ROWS: tl.constexpr):  # fmt: skip
    if NUM_CHUNKS == 1:
        row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        inb = (cols < sk) & (row < n_rows)
        y = tl.load(Y + row * sk + cols, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sk + cols, mask=inb, other=0.0).to(tl.float32)
        dx = scale * y * (dy - tl.sum(y * dy, axis=1)[:, None])
        if HAS_MASK:
            _, m_off = _row_coords(row, sq, n_heads, stride_mb, stride_mh, stride_mq)
            m = tl.load(M + m_off + cols * stride_mk, mask=inb, other=0)
            dx = tl.where(m != 0, 0.0, dx)
        tl.store(DX + row * sk + cols, dx.to(DX.dtype.element_ty), mask=inb)
    else:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        _, m_off = _row_coords(row, sq, n_heads, stride_mb, stride_mh, stride_mq)
        acc = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            inb = c * BLOCK + cols < sk
            y = tl.load(Y + row * sk + c * BLOCK + cols, mask=inb, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * sk + c * BLOCK + cols, mask=inb, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for c in range(NUM_CHUNKS):
            k = c * BLOCK + cols
            inb = k < sk
            y = tl.load(Y + row * sk + k, mask=inb, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * sk + k, mask=inb, other=0.0).to(tl.float32)
            dx = scale * y * (dy - dot)
            if HAS_MASK:
                m = tl.load(M + m_off + k * stride_mk, mask=inb, other=0)
                dx = tl.where(m != 0, 0.0, dx)
            tl.store(DX + row * sk + k, dx.to(DX.dtype.element_ty), mask=inb)


def _block_config(sk: int) -> tuple[int, int, int]:
    """(BLOCK, NUM_CHUNKS, ROWS) for rows of ``sk`` columns: rows shorter than ``ROW_TILE``
    columns are packed ``ROW_TILE // BLOCK`` to a program so each moves a useful amount of data."""
    block = triton.next_power_of_2(sk)
    if block <= MAX_BLOCK:
        return block, 1, max(1, min(ROW_TILE // block, 16))
    chunk = min(CHUNK, MAX_BLOCK)
    return chunk, triton.cdiv(sk, chunk), 1


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2 or x.dim() > 4:
        raise ValueError(
            f"attention scores must be [b, np, sq, sk], [attn_batches, sq, sk] or [sq, sk]; got shape "
            f"{tuple(x.shape)}"
        )
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def _prepare_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` broadcast (as a stride-0 view, never copied) to ``x``'s 4-d shape, as uint8."""
    try:
        m = mask.expand(x.shape)
    except RuntimeError as e:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
            f"{tuple(x.shape)}; use e.g. [b, 1, sq, sk]"
        ) from e
    m = m if m.dtype == torch.bool else m != 0
    return _as_4d(m.view(torch.uint8))


class _ScaledSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, causal):
        shape = x.shape
        x4 = _as_4d(x).contiguous()
        m4 = _prepare_mask(mask, x) if mask is not None else None
        b, h, sq, sk = x4.shape
        if causal and sq > sk:
            raise ValueError(
                f"causal softmax needs sq <= sk (queries are the last sq keys), got {sq} > {sk}"
            )
        check_launchable(_softmax_fwd_kernel, x4, *([m4] if m4 is not None else []))
        y = torch.empty_like(x4)
        block, chunks, rows = _block_config(sk)
        strides = m4.stride() if m4 is not None else (0, 0, 0, 0)
        n_rows = b * h * sq
        if x4.numel() > 0:
            _softmax_fwd_kernel[(triton.cdiv(n_rows, rows),)](
                x4, y, m4 if m4 is not None else x4, n_rows, sq, sk, h, sk - sq, float(scale),
                *strides, HAS_MASK=m4 is not None, CAUSAL=causal, BLOCK=block, NUM_CHUNKS=chunks,
                ROWS=rows, num_warps=num_warps_for(block * rows),
            )  # fmt: skip
        ctx.save_for_backward(y, m4)
        ctx.scale = float(scale)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        y, m4 = ctx.saved_tensors
        b, h, sq, sk = y.shape
        dy4 = dy.reshape(y.shape).contiguous()
        dx = torch.empty_like(y)
        block, chunks, rows = _block_config(sk)
        strides = m4.stride() if m4 is not None else (0, 0, 0, 0)
        n_rows = b * h * sq
        if y.numel() > 0:
            _softmax_bwd_kernel[(triton.cdiv(n_rows, rows),)](
                dy4, y, dx, m4 if m4 is not None else y, n_rows, sq, sk, h, ctx.scale, *strides,
                HAS_MASK=m4 is not None, BLOCK=block, NUM_CHUNKS=chunks, ROWS=rows,
                num_warps=num_warps_for(block * rows),
            )  # fmt: skip
        return dx.view(dy.shape), None, None, None


def scaled_causal_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * x)`` over the last dim with keys after each query masked (bottom-right causal)."""
    return _ScaledSoftmax.apply(x, None, scale, True)


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(where(mask, -10000, scale * x))`` over the last dim; ``mask`` True = masked out."""
    if mask is None:
        raise ValueError("scaled_masked_softmax needs a mask; for no mask pass an all-False mask")
    return _ScaledSoftmax.apply(x, mask, scale, False)


def scaled_causal_softmax_ref(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch ``scaled_causal_softmax`` (fp32 math, output in ``x``'s dtype)."""
    sq, sk = x.shape[-2:]
    above = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(sk - sq + 1)
    s = (x.float() * scale).masked_fill(above, float("-inf"))
    return torch.softmax(s, dim=-1).to(x.dtype)


def scaled_masked_softmax_ref(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch ``scaled_masked_softmax`` (fp32 math, output in ``x``'s dtype)."""
    s = (x.float() * scale).masked_fill(mask.bool(), MASK_FILL)
    return torch.softmax(s, dim=-1).to(x.dtype)


def compile_specs() -> list[dict]:
    """Kernel instances the compile test builds for an H100 (signature + constexprs)."""
    specs = []
    ints = {"n_rows": "i32", "sq": "i32", "sk": "i32", "n_heads": "i32"}
    strides = {k: "i64" for k in ("stride_mb", "stride_mh", "stride_mq", "stride_mk")}
    for dtype in ("fp32", "bf16"):
        for has_mask, causal in ((False, True), (True, False)):
            # packed short rows, one whole row, a streamed long row
            for block, chunks, rows in ((128, 1, 16), (4096, 1, 1), (4096, 3, 1)):
                warps = num_warps_for(block * rows)
                flags = {"HAS_MASK": has_mask, "BLOCK": block, "NUM_CHUNKS": chunks, "ROWS": rows}
                specs.append(
                    dict(
                        fn=_softmax_fwd_kernel,
                        signature={
                            "X": f"*{dtype}",
                            "Y": f"*{dtype}",
                            "M": "*u8",
                            **ints,
                            "causal_offset": "i32",
                            "scale": "fp32",
                            **strides,
                        },  # fmt: skip
                        constexprs={**flags, "CAUSAL": causal},
                        num_warps=warps,
                    )
                )
                specs.append(
                    dict(
                        fn=_softmax_bwd_kernel,
                        signature={
                            "DY": f"*{dtype}",
                            "Y": f"*{dtype}",
                            "DX": f"*{dtype}",
                            "M": "*u8",
                            **ints,
                            "scale": "fp32",
                            **strides,
                        },  # fmt: skip
                        constexprs=flags,
                        num_warps=warps,
                    )
                )
    return specs


def benchmark_cases(device: str, dtype: torch.dtype) -> list[dict]:
    """Cases for ``benchmarks/kernels.py``. ``setup()`` allocates lazily and returns the input that
    gets gradients, the fused and the eager-torch callables, and the bytes each pass must move."""

    def setup(seq, masked):
        x = torch.randn(4, 16, seq, seq, device=device, dtype=dtype, requires_grad=True)
        n = x.numel() * x.element_size()
        if masked:
            mask = torch.rand(4, 1, seq, seq, device=device) < 0.1
            return dict(
                x=x,
                fused=lambda: scaled_masked_softmax(x, mask, 0.125),
                eager=lambda: torch.softmax((x * 0.125).masked_fill(mask, MASK_FILL), dim=-1),
                bytes_fwd=2 * n + mask.numel(),
                bytes_bwd=3 * n + mask.numel(),
            )
        above = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
        return dict(
            x=x,
            fused=lambda: scaled_causal_softmax(x, 0.125),
            eager=lambda: torch.softmax((x * 0.125).masked_fill(above, float("-inf")), dim=-1),
            bytes_fwd=1.5 * n,  # only the lower triangle of x is read
            bytes_bwd=3 * n,
        )

    return [
        dict(
            kernel=f"{kind}_softmax",
            size=seq,
            setup=lambda seq=seq, m=(kind == "masked"): setup(seq, m),
        )
        for kind in ("causal", "masked")
        for seq in (256, 512, 1024, 2048, 4096)
    ]
