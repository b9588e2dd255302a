"""The Triton kernels of ``megatiny.kernels.flash_attention`` (the algorithm is described there).

Tiles are ``[BLOCK_M or BLOCK_N, BLOCK_D]`` rows of one head; ``BLOCK_D`` is ``HEAD_DIM`` rounded up
to a power of two (at least 16, for ``tl.dot``), the extra columns read as 0 and are never stored.
Per-(batch, head) bases are 64-bit; exponentials are base 2 (``qk_scale = scale * log2 e``).
"""

import triton.language as tl

from megatiny.kernels import jit


@jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               ROW_MASK: tl.constexpr):  # fmt: skip
    """A [rows, BLOCK_D] tile; rows past n_rows and columns past HEAD_DIM read as 0."""
    if ROW_MASK:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(
            ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0
        )
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@jit
def _tile(base, stride, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          ROW_MASK: tl.constexpr):  # fmt: skip
    """Rows `rows` of the [n_rows, HEAD_DIM] matrix at `base` (row stride `stride`)."""
    return _load_rows(base + rows[:, None] * stride + offs_d[None, :], rows, n_rows, offs_d,
                      HEAD_DIM, BLOCK_D, ROW_MASK)  # fmt: skip


@jit
def _visible(cols, rows, seqlen_k, causal_offset, CAUSAL: tl.constexpr):
    """[rows, cols] True where query row i may see key j: j < seqlen_k (and j <= i + offset)."""
    keep = cols[None, :] < seqlen_k
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
    return keep


@jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    tl.store(
        ptrs,
        x.to(ptrs.dtype.element_ty),
        mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
    )


@jit
def _causal_range(start_m, seqlen_k, causal_offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """Key range of a query block: [0, full) is seen by every row (no mask), [full, hi) is masked."""
    if CAUSAL:
        full = tl.minimum(start_m * BLOCK_M + causal_offset + 1, seqlen_k)
        hi = tl.maximum(tl.minimum(start_m * BLOCK_M + BLOCK_M + causal_offset, seqlen_k), 0)
    else:
        full = seqlen_k
        hi = seqlen_k
    return tl.maximum(full, 0) // BLOCK_N * BLOCK_N, hi


@jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, seqlen_k,
               causal_offset, qk_scale, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _tile(k_base, stride_ks, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = _visible(cols, offs_m, seqlen_k, causal_offset, CAUSAL)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_base, stride_vs, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _flash_fwd_kernel(Q, K, V, OUT, LSE, sm_scale, seqlen_q, seqlen_k, causal_offset, n_heads, group,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                      CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = _load_rows(q_ptrs, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exponentials in base 2
    # -1e30, not -inf: exp2(m_old - m_new) stays finite while a row has seen only masked keys.
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_range(start_m, seqlen_k, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               seqlen_k, causal_offset, qk_scale, 0, full, False, CAUSAL, HEAD_DIM,
                               BLOCK_N, BLOCK_D, PRECISION)  # fmt: skip
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               seqlen_k, causal_offset, qk_scale, full, hi, True, CAUSAL, HEAD_DIM,
                               BLOCK_N, BLOCK_D, PRECISION)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key: O = 0, lse = -inf
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + bh * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    _store_rows(o_ptrs, acc / l_safe[:, None], offs_m, seqlen_q, offs_d, HEAD_DIM)


@jit
def _flash_bwd_preprocess_kernel(OUT, DO, DLSE, DELTA, seqlen_q, n_heads, stride_ob, stride_oh,
                                 stride_os, stride_db, stride_dh, stride_ds, HAS_DLSE: tl.constexpr,
                                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_D: tl.constexpr):  # fmt: skip
    """delta = rowsum(dO * O) - dlse, [b, n, s] fp32."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    do = _load_rows(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                    offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + bh * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@jit
def _load_row_stats(LSE, DELTA, bh, rows, seqlen_q):
    """lse (as +inf where a row saw no key or is padding, so P = 0 there) and delta of query rows."""
    lse = tl.load(LSE + bh * seqlen_q + rows, mask=rows < seqlen_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    return lse, tl.load(DELTA + bh * seqlen_q + rows, mask=rows < seqlen_q, other=0.0)


@jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, bh, stride_qs, stride_ds, offs_n,
                    offs_d, seqlen_q, causal_offset, qk_scale, lo, hi, MASKED: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):  # fmt: skip
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _tile(q_base, stride_qs, rows, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
        do = _tile(do_base, stride_ds, rows, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
        lse, delta = _load_row_stats(LSE, DELTA, bh, rows, seqlen_q)
        p_t = tl.math.exp2(
            tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :]
        )
        if MASKED:  # key j is seen by query i when j <= i + causal_offset
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, seqlen_q, seqlen_k,
                           causal_offset, n_kv_heads, group, stride_qb, stride_qh, stride_qs,
                           stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                           stride_db, stride_dh, stride_ds, CAUSAL: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dK, dV of one key block of kv head j, summed over its query heads j*group .. (j+1)*group-1.
    DK/DV are contiguous [b, g, t, d]."""
    start_n = tl.program_id(0) * BLOCK_N
    bj = tl.program_id(1).to(tl.int64)
    b, j = bj // n_kv_heads, bj % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + j * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    v = _load_rows(V + b * stride_vb + j * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = 0
    full = 0
    if CAUSAL:  # queries before lo see none of these keys; from `full` on they see all of them
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M,
                          tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M)  # fmt: skip
        full = tl.maximum(full, lo)
    for hq in range(0, group):
        h = j * group + hq
        bh = b * n_kv_heads * group + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, bh, stride_qs, stride_ds,
                                 offs_n, offs_d, seqlen_q, causal_offset, qk_scale, lo, full, True,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)  # fmt: skip
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, bh, stride_qs, stride_ds,
                                 offs_n, offs_d, seqlen_q, causal_offset, qk_scale, full, seqlen_q,
                                 False, HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)  # fmt: skip
    out = bj * seqlen_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    _store_rows(DK + out, dk * sm_scale, offs_n, seqlen_k, offs_d, HEAD_DIM)
    _store_rows(DV + out, dv, offs_n, seqlen_k, offs_d, HEAD_DIM)


@jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_d, seqlen_k,
                  causal_offset, qk_scale, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        v = _tile(v_base, stride_vs, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        k = _tile(k_base, stride_ks, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        p = tl.math.exp2(
            tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None]
        )
        if MASKED:  # past the keys' end exp2 may overflow: select, never multiply by 0
            p = tl.where(_visible(cols, rows, seqlen_k, causal_offset, CAUSAL), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@jit
def _flash_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, seqlen_q, seqlen_k, causal_offset,
                         n_heads, group, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                         stride_ks, stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                         CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):  # fmt: skip
    """dQ of one query block of one head; DQ is contiguous [b, n, s, d]."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                   rows, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    do = _load_rows(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + offs_d[None, :],
                    rows, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    lse, delta = _load_row_stats(LSE, DELTA, bh, rows, seqlen_q)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_range(start_m, seqlen_k, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                       seqlen_k, causal_offset, qk_scale, 0, full, False, CAUSAL, HEAD_DIM, BLOCK_N,
                       BLOCK_D, PRECISION)  # fmt: skip
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                       seqlen_k, causal_offset, qk_scale, full, hi, True, CAUSAL, HEAD_DIM, BLOCK_N,
                       BLOCK_D, PRECISION)  # fmt: skip
    out = bh * seqlen_q * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    _store_rows(DQ + out, dq * sm_scale, rows, seqlen_q, offs_d, HEAD_DIM)
