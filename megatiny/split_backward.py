"""Split backward: a layer's input gradient now (B), its weight gradient later (W).

    Y = X A^T + b        B:  dX = dY A                 W:  dA += dY^T X,   db += sum dY

Zero-bubble schedules (megatiny.parallel.schedule_ir) run B as soon as the next stage's gradient
arrives, so the previous stage can go on, and run W where the rank would otherwise idle. What
defers its weight gradient, when asked: the column- and row-parallel linears and the
sequence-parallel column linear (megatiny.parallel), a chunk's plain nn.Linear once
`split_linears` has armed it, the MoE experts (`grouped_linear`: one entry per stacked weight for
all experts), and the output layer's logits GEMM (`linear` in megatiny.model.LMOutput and its
vocab-parallel twin; the chunked loss, megatiny.chunked_loss, stashes a recomputing closure):

    with split_weight_grads():                    # F and B: layers record what W needs
        loss = chunk(x)                           # F
        queue = WeightGradQueue()
        with defer_weight_grads(queue):           # B: dX only; (param, dW closure) to the queue
            torch.autograd.backward(loss)
    queue.run()                                   # W: dA, db into .grad

`queue.run` sums each parameter's contributions first (a weight used twice on one path, an
expert weight used by every expert's rows: each contribution once) and hands the sums to
autograd as the gradient of the leaf (`torch.autograd.backward(params, sums)`), so the
accumulation goes through AccumulateGrad: `.grad` (or, bf16, `main_grad` via the data-parallel
hook) accumulates and every post-accumulate-grad hook fires once per parameter and W -- the
data-parallel bucket is reduced when its last W has run, exactly as after a whole backward.
Other parameters (norms, embeddings) get their gradient in B.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_ARMED = [False]  # linears use the deferrable path (set for the F and B of split schedules)
_QUEUE: list = [None]  # the WeightGradQueue of the B now running, or None
_RECORD: list = [None]  # a StashRecord while `record_stash()` is on


@contextlib.contextmanager
def split_weight_grads(enabled: bool = True):
    """Inside: `linear` records its inputs so that a later B can defer the weight gradient."""
    previous, _ARMED[0] = _ARMED[0], enabled
    try:
        yield
    finally:
        _ARMED[0] = previous


class WeightGradQueue:
    """The weight gradients of one micro-batch's B on one chunk, waiting for its W: entries
    (param, compute, index, tensors) -- `compute()` gives dW (of param[index] when index is not
    None) from `tensors`, what the entry holds until W."""

    def __init__(self):
        self.entries: list[tuple] = []

    def __len__(self) -> int:
        return len(self.entries)

    def params(self) -> list:
        """The parameters this queue's W will give a gradient (each once)."""
        return list({id(p): p for p, _, _, _ in self.entries}.values())

    def bytes(self) -> int:
        """Bytes the queue holds until its W (each storage once)."""
        return unique_bytes(t for *_, held in self.entries for t in held)

    def run(self) -> None:
        """W: every stashed dW computed, summed per parameter, into .grad (hooks fire once)."""
        sums: dict[int, list] = {}
        for p, compute, index, _ in self.entries:
            g = compute().to(p.dtype)
            if index is not None:  # one slice of a stacked weight (an expert)
                if id(p) not in sums:
                    sums[id(p)] = [p, torch.zeros_like(p)]
                sums[id(p)][1][index] += g
            elif id(p) in sums:
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


class StashRecord:
    """What the deferrable layers of a forward will hold from B to W, recorded as they run
    forward (`record_stash`): the inputs they keep (each storage once) plus, for each, an
    output gradient of its output's shape and compute dtype."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.extra = 0  # bytes made in backward: output gradients, a re-gathered input

    def add(self, keeps=(), made: int = 0) -> None:
        self.inputs.extend(keeps)
        self.extra += made

    @property
    def bytes(self) -> int:
        return unique_bytes(self.inputs) + self.extra


@contextlib.contextmanager
def record_stash():
    """Inside: the deferrable layers' forwards add to the yielded StashRecord."""
    previous, _RECORD[0] = _RECORD[0], StashRecord()
    try:
        yield _RECORD[0]
    finally:
        _RECORD[0] = previous


def recorded(keeps=(), made: int = 0) -> None:
    """A deferrable layer's forward: `keeps` (tensors W will hold) and `made` bytes (made in B)."""
    if _RECORD[0] is not None:
        _RECORD[0].add(keeps, made)


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage._cdata  # one StorageImpl: also on meta tensors (no data pointer)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def armed() -> bool:
    return _ARMED[0] and torch.is_grad_enabled()


def defer(param, compute, index=None, tensors=()) -> None:
    """Called by an armed layer's backward: queue param's gradient `compute()` (of
    param[index] if given; `tensors`: what it holds) when a B defers it, else (a whole
    backward) accumulate it now."""
    if param is None or not param.requires_grad:
        return
    queue = _QUEUE[0] if _QUEUE[0] is not None else WeightGradQueue()
    queue.entries.append((param, compute, index, tuple(tensors)))
    if queue is not _QUEUE[0]:
        queue.run()  # a reentrant backward on the leaf: its hooks fire as in one backward


def _dw(x, dy):
    return lambda: dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


def stash(weight, bias, x, dy) -> None:
    """A linear's (A, b, X, dY): dA = dY^T X and db = sum dY, deferred (see `defer`). A whole
    backward runs both at once (one reentrant backward, as one W)."""
    queue = _QUEUE[0]
    if queue is None:
        with defer_weight_grads(WeightGradQueue()) as queue:
            stash(weight, bias, x, dy)
        queue.run()
        return
    defer(weight, _dw(x, dy), tensors=(x, dy))
    defer(bias, lambda: dy.reshape(-1, dy.shape[-1]).sum(0), tensors=(dy,))


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
        y = F.linear(x_low, w_low, b)
        recorded((x_low,), y.numel() * y.element_size())  # W holds X and dY
        return y

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


class _DeferrableGroupedLinear(torch.autograd.Function):
    """Expert e's rows [start_e, start_e + counts[e]) of x times weight[e]^T, for every expert
    (megatiny.moe.Experts); backward returns dX and defers each expert's dW into one entry per
    stacked weight and expert (summed into the weight's one gradient by the W)."""

    @staticmethod
    def forward(ctx, x, weight_ref, counts):
        (weight,) = weight_ref
        kind = "cuda" if x.is_meta else x.device.type
        autocast = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        x_low, w_low = x.detach().to(dtype), weight.detach().to(dtype)
        ctx.save_for_backward(x_low, w_low)
        ctx.weight, ctx.counts, ctx.x_dtype, ctx.dtype = weight, counts, x.dtype, dtype
        outs, start = [], 0
        for e, n in enumerate(counts):
            outs.append(F.linear(x_low[start : start + n], w_low[e]))
            start += n
        y = torch.cat(outs) if outs else x_low.new_zeros(0, weight.shape[1])
        recorded((x_low,), y.numel() * y.element_size())
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.to(ctx.dtype)
        dx, start = torch.empty_like(x), 0
        queue = _QUEUE[0] if _QUEUE[0] is not None else WeightGradQueue()
        with defer_weight_grads(queue):
            for e, n in enumerate(ctx.counts):
                rows = slice(start, start + n)
                dx[rows] = dy[rows].matmul(w[e])
                defer(ctx.weight, _dw(x[rows], dy[rows]), e, (x, dy))
                start += n
        if queue is not _QUEUE[0]:  # a whole backward: every expert's dW now, one hook call
            queue.run()
        return dx.to(ctx.x_dtype), None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """cat_e(x_e weight[e]^T) over the experts' row groups (x sorted by expert, `counts` rows
    each); inside `split_weight_grads()` the weight gradient is deferred (a W action)."""
    if armed() and weight.requires_grad and x.requires_grad:
        return _DeferrableGroupedLinear.apply(x, (weight,), counts)
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(F.linear(x[start : start + n], weight[e]))
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])
