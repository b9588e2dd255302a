"""Split backward: a linear's input gradient now (B), its weight gradient later (W).

    Y = X A^T + b        B:  dX = dY A                 W:  dA += dY^T X,   db += sum dY

Zero-bubble schedules (megatiny.parallel.schedule_ir) run B as soon as the next stage's gradient
arrives, so the previous stage can go on, and run W where the rank would otherwise idle. The
linears (ColumnParallelLinear, RowParallelLinear, the sequence-parallel column linear and, once
`split_linears` has armed them, a chunk's plain nn.Linear) do this when asked:

    with split_weight_grads():                    # F and B: linears record what W needs
        loss = chunk(x)                           # F
        queue = WeightGradQueue()
        with defer_weight_grads(queue):           # B: dX only; (A, b, X, dY) go to the queue
            torch.autograd.backward(loss)
    queue.run()                                   # W: dA, db into .grad

`queue.run` sums each parameter's contributions first (a weight used twice on one path gets
both, once each) and hands the sums to autograd as the gradient of the leaf
(`torch.autograd.backward(params, sums)`), so the accumulation goes through AccumulateGrad:
`.grad` (or, bf16, `main_grad` via the data-parallel hook) accumulates and every
post-accumulate-grad hook fires once per parameter -- the data-parallel bucket is reduced when
its last W has run, exactly as after a whole backward. Other parameters (norms, embeddings, the
output layer) get their gradient in B as usual.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_ARMED = [False]  # linears use the deferrable path (set for the F and B of split schedules)
_QUEUE: list = [None]  # the WeightGradQueue of the B now running, or None


@contextlib.contextmanager
def split_weight_grads(enabled: bool = True):
    """Inside: `linear` records its inputs so that a later B can defer the weight gradient."""
    previous, _ARMED[0] = _ARMED[0], enabled
    try:
        yield
    finally:
        _ARMED[0] = previous


class WeightGradQueue:
    """The (weight, bias, X, dY) of one micro-batch's B on one chunk, waiting for its W."""

    def __init__(self):
        self.entries: list[tuple] = []

    def __len__(self) -> int:
        return len(self.entries)

    def run(self) -> None:
        """W: every stashed dA = dY^T X (and db = sum dY), summed per parameter, into .grad."""
        sums: dict[int, list] = {}
        for weight, bias, x, dy in self.entries:
            dy2 = dy.reshape(-1, dy.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            for p, g in ((weight, dy2.t().matmul(x2)), (bias, dy2.sum(0))):
                if p is None or not p.requires_grad:
                    continue
                g = g.to(p.dtype)
                if id(p) in sums:
                    sums[id(p)][1] = sums[id(p)][1] + g
                else:
                    sums[id(p)] = [p, g]
        self.entries.clear()
        if sums:
            params, grads = zip(*sums.values())
            torch.autograd.backward(list(params), list(grads))


@contextlib.contextmanager
def defer_weight_grads(queue: WeightGradQueue):
    """Inside (a B): the armed linears' backward stashes (A, b, X, dY) in `queue`."""
    previous, _QUEUE[0] = _QUEUE[0], queue
    try:
        yield queue
    finally:
        _QUEUE[0] = previous


def armed() -> bool:
    return _ARMED[0] and torch.is_grad_enabled()


def stash(weight, bias, x, dy) -> None:
    """Called by an armed linear's backward: queue its weight-gradient GEMM when a B defers it,
    else (a whole backward) accumulate it now."""
    queue = _QUEUE[0]
    if queue is not None:
        queue.entries.append((weight, bias, x, dy))
        return
    now = WeightGradQueue()
    now.entries.append((weight, bias, x, dy))
    now.run()  # a reentrant backward on the leaves: their hooks fire as in one backward


class _DeferrableLinear(torch.autograd.Function):
    """F.linear whose backward returns dX only and hands (A, b, X, dY) to `stash`. The parameters
    travel outside autograd's inputs (a None gradient for an input would still fire its
    post-accumulate-grad hooks, i.e. tell data parallelism the gradient is ready)."""

    @staticmethod
    def forward(ctx, x, params):
        weight, bias = params
        kind = "cuda" if x.is_meta else x.device.type
        autocast = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        x_low, w_low = x.detach().to(dtype), weight.detach().to(dtype)
        ctx.save_for_backward(x_low, w_low)
        ctx.params, ctx.x_dtype, ctx.dtype = params, x.dtype, dtype
        b = None if bias is None else bias.detach().to(dtype)
        return F.linear(x_low, w_low, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.to(ctx.dtype)
        stash(*ctx.params, x, dy)
        return dy.matmul(w).to(ctx.x_dtype), None


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear, or its deferrable twin inside `split_weight_grads()`."""
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not armed() or not trainable or not x.requires_grad:  # no backward would run
        return F.linear(x, weight, bias)
    return _DeferrableLinear.apply(x, (weight, bias))


def _split_forward(module: nn.Linear):
    def forward(x):
        return linear(x, module.weight, module.bias)

    return forward


def split_linears(modules) -> int:
    """Let the plain nn.Linear layers of `modules` (tp = 1 chunks) defer their weight gradient:
    their forward becomes `linear(x, weight, bias)` (F.linear unless armed; same parameters,
    same names). Idempotent; returns how many were armed."""
    n = 0
    for root in modules:
        for mod in root.modules():
            if type(mod) is nn.Linear and "forward" not in mod.__dict__:
                mod.forward = _split_forward(mod)
                n += 1
    return n
