"""The column-parallel linear under sequence parallelism, saving only the sequence shard.

    forward    X = all_gather(X_i)  (sequence dim)      Y_i = X A_i^T + b_i
    backward   dX = dY_i A_i  -> reduce_scatter -> dX_i      dA_i = dY_i^T X      db_i = sum dY_i

Autograd through `gather_from_sp` + `F.linear` would save the gathered X ([b, s, h], p times the
shard) for dA_i. Like Megatron's `LinearWithGradAccumulationAndAsyncCommunication`, this saves X_i
and gathers X again in backward, overlapping that gather with the dX GEMM, and the reduce-scatter
of dX with the dA GEMM. Activation memory of the region's input then falls as 1/p.
Under split backward (megatiny/split_backward.py) the dA GEMM waits for the W action,
which keeps the gathered X until then.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatiny import split_backward
from megatiny.parallel import collectives


def _gather_seq(x: torch.Tensor, group, async_op: bool):
    """all-gather along dim 1: returns (gathered [b, p*s, ...], handle or None)."""
    p = dist.get_world_size(group)
    xt = x.movedim(1, 0).contiguous()
    out = torch.empty((p * xt.shape[0],) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    handle = collectives.all_gather_into(out, xt, group, async_op=async_op)
    return out, handle


class _SequenceParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, split_params=None):
        # Under autocast the GEMMs run in its dtype; backward (outside autocast) uses the same.
        # The shard is cast before it is gathered (the GEMM would cast it anyway: same result),
        # so the all-gathers move, and the saved shard holds, bf16 rather than fp32.
        kind = "cuda" if x.is_meta else x.device.type  # meta: the plan's dry run sets CUDA's flag
        autocast = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        x_low = x.to(dtype)
        total, _ = _gather_seq(x_low, group, async_op=False)
        total = total.movedim(0, 1)
        ctx.save_for_backward(x_low, weight)
        ctx.group, ctx.dtype, ctx.x_dtype = group, dtype, x.dtype
        ctx.split_params = split_params  # (weight, bias): W computes their gradient later
        ctx.bias_dtype = None if bias is None else bias.dtype
        b = None if bias is None else bias.to(dtype)
        y = torch.nn.functional.linear(total, weight.to(dtype), b)
        if split_params is not None:  # W holds the input all-gathered again in B, and dY
            split_backward.recorded((), total.numel() * total.element_size() + y.nbytes)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        group = ctx.group
        p = dist.get_world_size(group)
        gathered, handle = _gather_seq(x, group, async_op=True)  # overlaps the dX GEMM below
        dy = dy.to(ctx.dtype)
        dx_total = dy.matmul(weight.to(ctx.dtype))
        if handle is not None:
            handle.wait()
        total = gathered.movedim(0, 1)
        dx_t = dx_total.to(ctx.x_dtype).movedim(1, 0).contiguous()
        dx = torch.empty((dx_t.shape[0] // p,) + tuple(dx_t.shape[1:]), dtype=ctx.x_dtype,
                         device=dy.device)  # fmt: skip
        handle = collectives.reduce_scatter_into(dx, dx_t, group, async_op=True)  # overlaps dA
        if ctx.split_params is not None:  # split backward: dA, db in the W action
            split_backward.stash(*ctx.split_params, total, dy)
            if handle is not None:
                handle.wait()
            return dx.movedim(0, 1), None, None, None, None
        dy2 = dy.reshape(-1, dy.shape[-1])
        dweight = dy2.t().matmul(total.reshape(-1, total.shape[-1])).to(weight.dtype)
        dbias = None if ctx.bias_dtype is None else dy2.sum(0).to(ctx.bias_dtype)
        if handle is not None:
            handle.wait()
        return dx.movedim(0, 1), dweight, dbias, None, None


def sequence_parallel_linear(x: torch.Tensor, weight, bias, group) -> torch.Tensor:
    """Y_i = all_gather_seq(X_i) A_i^T + b_i, saving only X_i for backward (see module docstring)."""
    if dist.get_world_size(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    if split_backward.armed() and weight.requires_grad and x.requires_grad:
        detached = None if bias is None else bias.detach()
        return _SequenceParallelLinear.apply(x, weight.detach(), detached, group, (weight, bias))
    return _SequenceParallelLinear.apply(x, weight, bias, group)
