"""The output projection and cross-entropy over chunks of tokens (`model.loss_chunk_tokens`): the
loss of logits = h W^T without ever holding the logits of every token.

For the N tokens of h [N, H] and this rank's vocabulary rows W [V_r, H] (all of V on one device),
chunk c of n tokens computes z_c = h_c W^T [n, V_r] in fp32 and keeps per token only

    lse = m + log sum_v exp(z_v - m)      m = max_v z_v    (both over the whole vocabulary:
    loss = lse - z_target                                    under TP, all-reduced MAX / SUM)

Backward recomputes z_c (one extra logits GEMM per chunk) and, with g the incoming per-token
gradient, forms dz_c = (exp(z_c - lse) - onehot(target)) g, then dh_c = dz_c W and
dW += dz_c^T h_c. So forward and backward hold one chunk's logits (and its gradient) plus dW,
never [N, V_r]; saved for backward are h, the targets and lse (4 bytes a token), not the
softmax. Labels equal to `ignore_index` give 0 loss and no gradient. Under split backward
(megatiny/split_backward.py) B computes dh only and W recomputes each chunk's softmax for dW
(two GEMMs per chunk instead of one: the price of never holding [N, V_r] until W).

Under autocast the GEMMs run in the autocast dtype (as F.linear would), the softmax statistics
in fp32, and dW is accumulated in the weight's dtype: by the GEMM itself when that is the GEMM's
dtype (bf16 weights: bf16, as Liger-Kernel's fused linear cross-entropy), else (fp32 weights
under autocast) each chunk's bf16 product is added to an fp32 dW. The collectives come in through `all_reduce(t, group,
op)` (megatiny.parallel passes its traced one), so this file stays free of parallel code and the
single-device model can use it; it issues the unchunked vocab-parallel cross-entropy's three
all-reduces per chunk (max, target logit, sum of exponentials).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatiny import split_backward
from megatiny.kernels import check_ids


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    # meta: the plan's dry run raises CUDA's autocast flag (megatiny/plan/opcount.py)
    kind = "cuda" if h.is_meta else h.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk, ignore_index, vocab_start, n_valid, group,
                all_reduce, deferred):  # fmt: skip
        dtype = _compute_dtype(h)
        h_low, w_low = h.to(dtype), weight.to(dtype)
        n_tokens = h.shape[0]
        local, owned = _columns(target, vocab_start, weight.shape[0], ignore_index)
        loss = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(loss)
        for i in range(0, n_tokens, chunk):
            j = min(i + chunk, n_tokens)
            z = _logits(h_low[i:j], w_low, n_valid)
            m = z.max(dim=-1).values
            _reduce(all_reduce, m, group, dist.ReduceOp.MAX)
            z.sub_(m.unsqueeze(-1))
            picked = z.gather(-1, local[i:j, None]).squeeze(-1).masked_fill(~owned[i:j], 0.0)
            _reduce(all_reduce, picked, group, dist.ReduceOp.SUM)
            sum_exp = z.exp_().sum(dim=-1)
            _reduce(all_reduce, sum_exp, group, dist.ReduceOp.SUM)
            log_sum = sum_exp.log()
            loss[i:j] = log_sum - picked
            lse[i:j] = m + log_sum
            del z  # before the next chunk's logits exist: one chunk alive at a time
        loss.masked_fill_(target == ignore_index, 0.0)
        ctx.save_for_backward(h_low, weight, target, lse)  # target: the labels' own storage
        ctx.chunk, ctx.n_valid, ctx.dtype, ctx.h_dtype = chunk, n_valid, dtype, h.dtype
        ctx.vocab_start, ctx.ignore_index = vocab_start, ignore_index
        ctx.deferred = deferred  # (weight,) when split backward defers dW to the W action
        if deferred is not None:  # W holds h, the targets, lse and the loss gradient
            split_backward.recorded((h_low, target, lse), lse.nbytes)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        h_low, weight, target, lse = ctx.saved_tensors
        g = dloss.float().masked_fill(target == ctx.ignore_index, 0.0)
        want_dh, want_dw = ctx.needs_input_grad[:2]
        dh, dw = _backward_chunks(ctx, h_low, weight, target, lse, g, want_dh, want_dw)
        if ctx.deferred is not None:  # W recomputes the chunks' softmax for dW (2 more GEMMs)
            args = (ctx, h_low, weight, target, lse, g, False, True)
            split_backward.defer(ctx.deferred[0], lambda: _backward_chunks(*args)[1],
                                 tensors=(h_low, target, lse, g))  # fmt: skip
        dh = None if dh is None else dh.to(ctx.h_dtype)
        return dh, dw, None, None, None, None, None, None, None, None


def _backward_chunks(ctx, h_low, weight, target, lse, g, want_dh, want_dw):
    """(dh, dW) of the loss, one chunk of logits at a time (recomputed from h and lse)."""
    dtype, chunk = ctx.dtype, ctx.chunk
    w_low = weight.to(dtype)
    local, owned = _columns(target, ctx.vocab_start, weight.shape[0], ctx.ignore_index)
    dh = torch.empty_like(h_low) if want_dh else None
    dw = torch.zeros_like(weight) if want_dw else None
    for i in range(0, h_low.shape[0], chunk):
        j = min(i + chunk, h_low.shape[0])
        dz = _logits(h_low[i:j], w_low, ctx.n_valid)
        dz.sub_(lse[i:j, None]).exp_()  # the softmax, from the forward's statistics
        dz.scatter_add_(-1, local[i:j, None], -owned[i:j, None].to(dz.dtype))
        dz.mul_(g[i:j, None])
        dz = dz.to(dtype)
        if want_dh:
            dh[i:j] = dz @ w_low
        if want_dw and dw.dtype == dtype:  # accumulated by the GEMM itself (beta = 1)
            dw.addmm_(dz.t(), h_low[i:j])
        elif want_dw:  # fp32 weight under autocast: a low-precision GEMM, summed in fp32
            dw.add_(dz.t() @ h_low[i:j])
        del dz
    return dh, dw


def _columns(target, vocab_start, width, ignore_index):
    """Each target's column in this rank's rows (0 where another rank owns it, or ignored) and
    whether this rank owns it."""
    local = target - vocab_start
    owned = (local >= 0) & (local < width) & (target != ignore_index)
    return local.masked_fill(~owned, 0), owned


def _logits(h, w_low, n_valid):
    """z = h W^T in fp32, the padding columns (index >= n_valid) at -inf."""
    z = (h @ w_low.t()).float()
    if n_valid < z.shape[-1]:
        z[:, n_valid:] = float("-inf")
    return z


def _reduce(all_reduce, t, group, op):
    if all_reduce is not None:
        all_reduce(t, group, op)


def chunked_cross_entropy(h, weight, labels, chunk_tokens: int, *, group=None, all_reduce=None,
                          vocab_size: int | None = None, ignore_index: int = -100):  # fmt: skip
    """Per-token loss [labels.shape] of logits = h W^T (see the module docstring), `chunk_tokens`
    tokens at a time; the same values and gradients as F.cross_entropy(F.linear(h, W), labels).

    h [..., H] with labels' leading shape; W [V_r, H]. With `group` (a TP group) W holds rank r's
    contiguous rows [r V_r, (r + 1) V_r) of the (padded) vocabulary, rows >= `vocab_size` are
    padding, and `all_reduce(t, group, op)` combines the statistics over the group.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1 (0 means: do not chunk)")
    if h.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden states {tuple(h.shape)} and labels {tuple(labels.shape)} must agree on "
            "every dim but the last"
        )
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    width = weight.shape[0]
    total = world * width if vocab_size is None else vocab_size
    if not 0 < total <= world * width:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {world * width}] (tp x rows)")
    message = f"labels must be in [0, {total}) or ignore_index={ignore_index}, got {{bad}}; "
    check_ids(labels, total, message + "check the tokenizer's vocab_size", ignore_index)
    start = rank * width
    n_valid = max(0, min(width, total - start))
    deferred = None
    if split_backward.armed() and weight.requires_grad and h.requires_grad:
        deferred, weight = (weight,), weight.detach()  # dW by the W action, not autograd
    loss = _ChunkedCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk_tokens, ignore_index,
        start, n_valid, group, all_reduce, deferred,
    )  # fmt: skip
    return loss.view(labels.shape)
