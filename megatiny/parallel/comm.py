"""The Megatron communication mappings as autograd Functions, forward and backward side by side.

Notation: p = size of `group`, X_i = the tensor on rank i, [X_0 | ... | X_{p-1}] = concatenation
along the split dimension, sum_i X_i = all-reduce. Each forward has the adjoint collective as its
backward, so a parallel layer built only from these functions differentiates correctly:

    copy_to_tp           Y_i = X                 dX = sum_j dY_j            (all-reduce)
    reduce_from_tp       Y_i = sum_j X_j         dX_i = dY_i                (identity)
    scatter_to_tp        Y_i = X[..., i-th]      dX = [dY_0 | ... ]         (all-gather, last dim)
    gather_from_tp       Y = [X_0 | ... ]        dX_i = dY_i[..., i-th]     (split, last dim)
    scatter_to_sp        Y_i = X[:, i-th]        dX = [dY_0 | ... ]         (all-gather, dim)
    gather_from_sp       Y = [X_0 | ... ]        dX_i = (sum_j dY_j)[:, i-th]  (reduce-scatter, dim)
    reduce_scatter_to_sp Y_i = (sum_j X_j)[:, i-th]  dX = [dY_0 | ... ]     (all-gather, dim)

`gather_from_sp(..., tensor_parallel_output_grad=False)` is for a gathered tensor whose consumers
are replicated on every rank (each rank already holds the full gradient): its backward only splits.

Collectives never write into a tensor autograd saved: all-reduce works on a fresh clone.
With a group of size 1 every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatiny.parallel import collectives


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    collectives.all_reduce(out, group)
    return out


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous 1/p slice of `x` along `dim`."""
    p = _size(group)
    if p == 1:
        return x
    if x.shape[dim] % p:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} (shape {tuple(x.shape)}) over {p} "
            f"ranks; make it a multiple of {p}"
        )
    rank = dist.get_rank(group)
    return x.chunk(p, dim=dim)[rank].contiguous()


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (all shapes equal)."""
    p = _size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    # The collective concatenates along dim 0, so move `dim` to the front and back.
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((p * xt.shape[0],) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.all_gather_into(out, xt, group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ranks, then keep this rank's 1/p slice along `dim`."""
    p = _size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % p:
        raise ValueError(
            f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {p} ranks; "
            f"make it a multiple of {p}"
        )
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((xt.shape[0] // p,) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.reduce_scatter_into(out, xt, group)
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    """Y_i = X (X replicated); dX = sum_j dY_j. Entry of a column-parallel region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce(dy, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Y = sum_j X_j (partial sums); dX_i = dY. Exit of a row-parallel region."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _Split(torch.autograd.Function):
    """Y_i = X[i-th slice along `dim`]; dX = [dY_0 | ... | dY_{p-1}] (all-gather)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, dy):
        return _all_gather(dy, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    """Y = [X_0 | ... | X_{p-1}] along `dim`.

    Backward: dX_i = (sum_j dY_j)[i-th slice] (reduce-scatter) when every rank's consumer of Y is
    tensor-parallel (each holds a partial gradient); dX_i = dY[i-th slice] (split) when the
    consumers are replicated (each rank already holds the full gradient).
    """

    @staticmethod
    def forward(ctx, x, group, dim, tensor_parallel_output_grad):
        ctx.group, ctx.dim, ctx.tp_grad = group, dim, tensor_parallel_output_grad
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, dy):
        if ctx.tp_grad:
            return _reduce_scatter(dy, ctx.group, ctx.dim), None, None, None
        return _split(dy, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Y_i = (sum_j X_j)[i-th slice along `dim`]; dX = [dY_0 | ... | dY_{p-1}]."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, dy):
        return _all_gather(dy, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dim forward, all-gather backward."""
    return _Split.apply(x, group, -1)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dim forward, keep this rank's slice backward."""
    return _Gather.apply(x, group, -1, False)


def scatter_to_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's slice of `dim` (the sequence) forward, all-gather backward."""
    return _Split.apply(x, group, dim)


def gather_from_sp(
    x: torch.Tensor, group, dim: int = 1, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather `dim` forward; reduce-scatter (or split, see above) backward."""
    return _Gather.apply(x, group, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Reduce-scatter `dim` forward, all-gather backward."""
    return _ReduceScatterToSP.apply(x, group, dim)
