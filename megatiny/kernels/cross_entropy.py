"""Fused softmax cross-entropy that never materialises the probabilities; plain and vocab-parallel.

Per row (token) with logits ``x`` over ``V`` classes and target ``t``:
``loss = lse(x) - x_t`` with ``lse(x) = m + log(sum_j exp(x_j - m))``, ``m = max_j x_j``, and
``d loss / d x_j = exp(x_j - lse) - [j == t]``. Rows whose target is ``ignore_index`` give loss 0
and gradient 0. The forward streams the row in ``BLOCK``-column chunks keeping an online max and
sum (per lane, merged at the end), saving only ``lse`` (4 bytes per row); the backward streams
the logits once more and writes the gradient directly. Loss is fp32 whatever the logits' dtype.

Vocab-parallel form, the fused backend of ``megatiny.parallel.layers.vocab_parallel_cross_entropy``
(the one implementation: it validates, then calls ``sharded_cross_entropy`` here): rank ``r`` of the TP group holds
the contiguous slice ``[vocab_start, vocab_start + V_r)`` of the (padded) vocabulary. The kernel
returns the local ``m_r``, ``s_r = sum exp(x - m_r)`` over the columns with global index
``< vocab_size`` (padding excluded) and ``x_t`` when the target falls in the slice (else 0); then
``m = allreduce_max(m_r)``, ``(S, x_t) = allreduce_sum(s_r exp(m_r - m), x_t)`` and
``lse = m + log S``. Two small collectives of ``[rows]`` tensors; the full logits are never
gathered. The backward needs no communication: each rank's gradient uses the global ``lse``.
"""

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatiny.kernels import check_ids, check_launchable, jit, num_warps_for

# Columns per chunk for long rows; rows up to this length are processed in one chunk.
MAX_BLOCK = 4096


@jit
def _ce_fwd_kernel(LOGITS, TARGET, LOSS, LSE, TLOGIT, n_valid, vocab_start, ignore_index, stride_row,
                   PARALLEL: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK)
    # -1e30 (not -inf) keeps exp(m_old - m_new) finite for lanes that only saw padding.
    m_i = tl.full([BLOCK], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for c in range(NUM_CHUNKS):
        k = c * BLOCK + cols
        x = tl.load(base + k, mask=k < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, x)
        l_i = l_i * tl.exp(m_i - m_new) + tl.exp(x - m_new)
        m_i = m_new
    m = tl.max(m_i, axis=0)
    s = tl.sum(l_i * tl.exp(m_i - m), axis=0)
    t = tl.load(TARGET + row)
    local_t = t - vocab_start
    hit = (t != ignore_index) & (local_t >= 0) & (local_t < n_valid)
    x_t = tl.load(base + local_t, mask=hit, other=0.0).to(tl.float32)
    if PARALLEL:
        # Local statistics; the caller reduces them over the TP group.
        tl.store(LSE + row, m)
        tl.store(LOSS + row, s)
        tl.store(TLOGIT + row, x_t)
    else:
        lse = m + tl.log(s)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(t == ignore_index, 0.0, lse - x_t))


@jit
def _ce_bwd_kernel(LOGITS, TARGET, LSE, DLOSS, DLOGITS, n_cols, n_valid, vocab_start, ignore_index,
                   stride_row, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    out = DLOGITS + row * n_cols
    cols = tl.arange(0, BLOCK)
    t = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    dloss = tl.where(t == ignore_index, 0.0, tl.load(DLOSS + row).to(tl.float32))
    local_t = t - vocab_start
    for c in range(NUM_CHUNKS):
        k = c * BLOCK + cols
        x = tl.load(base + k, mask=k < n_valid, other=float("-inf")).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(k == local_t, 1.0, 0.0)) * dloss
        tl.store(out + k, g.to(DLOGITS.dtype.element_ty), mask=k < n_cols)


def _block_config(n: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(n, 1)), MAX_BLOCK)
    return block, triton.cdiv(max(n, 1), block)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, vocab_start, n_valid, all_reduce):
        n_cols = logits.shape[-1]
        if target.shape != logits.shape[:-1]:
            raise ValueError(f"target shape {tuple(target.shape)} must be logits' shape without the last dim, "
                             f"{tuple(logits.shape[:-1])}")  # fmt: skip
        x2 = logits.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        t = target.reshape(-1).contiguous().long()
        check_launchable(_ce_fwd_kernel, x2, t)
        rows = x2.shape[0]
        parallel = group is not None and dist.get_world_size(group) > 1
        loss = torch.empty(rows, device=x2.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        x_t = torch.empty_like(loss) if parallel else loss
        block, chunks = _block_config(n_valid)
        if rows > 0:
            _ce_fwd_kernel[(rows,)](
                x2, t, loss, lse, x_t, n_valid, vocab_start, ignore_index, x2.stride(0),
                PARALLEL=parallel, BLOCK=block, NUM_CHUNKS=chunks, num_warps=num_warps_for(block),
            )  # fmt: skip
        if parallel:
            local_max, local_sum = lse, loss
            global_max = local_max.clone()
            all_reduce(global_max, group, op=dist.ReduceOp.MAX)
            sums = torch.stack([local_sum * torch.exp(local_max - global_max), x_t])
            all_reduce(sums, group, op=dist.ReduceOp.SUM)
            lse = global_max + torch.log(sums[0])
            loss = torch.where(t == ignore_index, 0.0, lse - sums[1])
        ctx.save_for_backward(x2, t, lse)
        ctx.meta = (ignore_index, vocab_start, n_valid, n_cols, logits.shape)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, dloss):
        x2, t, lse = ctx.saved_tensors
        ignore_index, vocab_start, n_valid, n_cols, shape = ctx.meta
        dlogits = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
        block, chunks = _block_config(n_cols)
        if x2.shape[0] > 0:
            _ce_bwd_kernel[(x2.shape[0],)](
                x2, t, lse, dloss.reshape(-1).contiguous(), dlogits, n_cols, n_valid, vocab_start,
                ignore_index, x2.stride(0), BLOCK=block, NUM_CHUNKS=chunks,
                num_warps=num_warps_for(block),
            )  # fmt: skip
        return dlogits.view(shape), None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token loss ``lse(logits) - logits[target]`` (fp32, target's shape; 0 where ignored)."""
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits have an empty class dimension")
    check_ids(target, vocab, f"target {{bad}} is outside the vocabulary [0, {vocab}); use "
              f"ignore_index={ignore_index} for positions without a label", ignore_index)  # fmt: skip
    return _CrossEntropy.apply(logits, target, None, ignore_index, 0, vocab, None)


def sharded_cross_entropy(logits_shard, target, group, ignore_index, vocab_start, n_valid,
                          all_reduce):  # fmt: skip
    """The kernels on this rank's vocabulary columns ``[vocab_start, vocab_start + n_valid)`` of
    ``logits_shard`` (the rest padding), statistics combined by ``all_reduce(t, group, op)``.
    Called by ``megatiny.parallel.layers.vocab_parallel_cross_entropy``, which checks the inputs."""
    return _CrossEntropy.apply(
        logits_shard, target, group, ignore_index, vocab_start, n_valid, all_reduce
    )


def cross_entropy_ref(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Plain torch per-token cross-entropy in fp32 (0 where ignored)."""
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, v),
        target.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return loss.view(target.shape)


def compile_specs() -> list[dict]:
    """Kernel instances the compile test builds for an H100 (signature + constexprs)."""
    specs = []
    for dtype in ("fp32", "bf16"):
        for block, chunks in ((1024, 1), (4096, 13)):
            ints = {
                "n_valid": "i32",
                "vocab_start": "i32",
                "ignore_index": "i32",
                "stride_row": "i64",
            }
            for parallel in (False, True):
                specs.append(
                    dict(
                        fn=_ce_fwd_kernel,
                        signature={
                            "LOGITS": f"*{dtype}",
                            "TARGET": "*i64",
                            "LOSS": "*fp32",
                            "LSE": "*fp32",
                            "TLOGIT": "*fp32",
                            **ints,
                        },  # fmt: skip
                        constexprs={"PARALLEL": parallel, "BLOCK": block, "NUM_CHUNKS": chunks},
                        num_warps=num_warps_for(block),
                    )
                )
            specs.append(
                dict(
                    fn=_ce_bwd_kernel,
                    signature={
                        "LOGITS": f"*{dtype}",
                        "TARGET": "*i64",
                        "LSE": "*fp32",
                        "DLOSS": "*fp32",
                        "DLOGITS": f"*{dtype}",
                        "n_cols": "i32",
                        **ints,
                    },  # fmt: skip
                    constexprs={"BLOCK": block, "NUM_CHUNKS": chunks},
                    num_warps=num_warps_for(block),
                )
            )
    return specs


def benchmark_cases(device: str, dtype: torch.dtype) -> list[dict]:
    """Cases for ``benchmarks/kernels.py``. ``setup()`` allocates lazily and returns the input that
    gets gradients, the fused and the eager-torch callables, and the bytes each pass must move."""

    def setup(vocab):
        rows = 8192 if vocab <= 65536 else 4096
        x = torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, vocab, (rows,), device=device)
        nbytes = x.numel() * x.element_size()
        return dict(
            x=x,
            fused=lambda: cross_entropy(x, t),
            eager=lambda: torch.nn.functional.cross_entropy(x, t, reduction="none"),
            bytes_fwd=nbytes,  # read the logits once
            bytes_bwd=2 * nbytes,  # read the logits, write their gradient
        )

    return [
        dict(kernel="cross_entropy", size=v, setup=lambda v=v: setup(v))
        for v in (8192, 32768, 50304, 131072)
    ]
