"""Data parallelism: bucketed gradient reduction overlapped with the backward pass.

    ddp = DistributedDataParallel(model, ctx, bucket_mb=25)
    for i, micro_batch in enumerate(micro_batches):
        with ddp.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            (model(**micro_batch) / len(micro_batches)).backward()
    ddp.finish_grad_sync()           # wait for the last buckets; p.grad is now the dp average
    optimizer.step(); ddp.zero_grad()

Math. With D data-parallel replicas holding the same parameters and replica d seeing the loss
L_d on its share of the global batch, the global-batch loss is L = (1/D) sum_d L_d, hence

    dL/dw = (1/D) sum_d dL_d/dw          (all-reduce SUM of grads pre-scaled by 1/D)

Buckets. Trainable parameters are laid out, in *reverse* registration order (roughly the order in
which backward produces their gradients), in one flat gradient buffer cut into buckets of about
`bucket_mb` MiB. Each `p.grad` becomes a view into that buffer, so autograd accumulates straight
into it. A post-accumulate-grad hook marks a parameter ready; when every parameter of a bucket is
ready, the bucket's collective is launched with `async_op=True` and runs on the communication
backend while autograd keeps computing the gradients of earlier layers. `finish_grad_sync` waits
for the work handles (and launches, in bucket order, any bucket whose parameters got no gradient).

Gradient accumulation: inside `no_sync()` the hooks do nothing and gradients simply accumulate in
`p.grad`; the backward of the last micro-batch (outside `no_sync`) launches the reduction.

Low-precision parameters (bf16): the buffer stays fp32 (Megatron's main grads). Each parameter's
slice is `p.main_grad`; the hook adds every micro-batch's bf16 `p.grad` into it and frees `p.grad`,
so accumulation and reduction happen in fp32.

ZeRO-1 (`shard=True`, used by `megatiny.parallel.zero.ZeroOptimizer`): each bucket is padded to a
multiple of D and reduce-scattered instead of all-reduced; rank d receives the averaged gradient of
the d-th 1/D slice of every bucket in `shard_grad`. The flat *parameter* buffer with the same layout
(parameters become views into it) lets the optimizer all-gather updated slices in place.

Expert parallelism (megatiny/parallel/experts.py): the weights of experts split over an ep group
are not replicated over dp but over the expert-data-parallel group (dp / ep replicas of the same
experts). They get buckets of their own, laid out after the dense ones, reduced (or, for ZeRO-1,
reduce-scattered and sharded) over that group; the factor stays 1/D of the whole dp group, since
an expert's gradient already sums the tokens of its ep group (the all-to-all's backward).

The wrapper is not an nn.Module: the model keeps its own parameter names (checkpoints stay
layout-free) and is called as before; `ddp(...)` forwards to it for convenience.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel import collectives


def resolve_dp_group(ctx):
    """The gradient-averaging group of `ctx`: a ParallelContext (dp x cp), a group, or None=WORLD."""
    if ctx is None or isinstance(ctx, dist.ProcessGroup):
        return ctx
    return getattr(ctx, "dp_cp_group", None) or ctx.dp_group


class Bucket:
    """A contiguous range [start, end) of the flat buffers and the parameters that live in it,
    reduced over `group` (`size` ranks, this one `rank`); its ZeRO-1 slices start at `shard_start`
    of the shard buffer."""

    def __init__(self, index: int, params: list[nn.Parameter], start: int, end: int,
                 group=None, size: int = 1, rank: int = 0, shard_start: int = 0):  # fmt: skip
        self.index = index
        self.params = params
        self.start, self.end = start, end
        self.group, self.size, self.rank, self.shard_start = group, size, rank, shard_start
        self.pending: set[int] = {id(p) for p in params}
        self.handle = None

    @property
    def numel(self) -> int:
        return self.end - self.start

    def reset(self) -> None:
        self.pending = {id(p) for p in self.params}
        self.handle = None


class DistributedDataParallel:
    """Average gradients of `module` over the data-parallel group, overlapped with backward.

    Args:
        module: the (possibly TP-sharded or pipeline-stage) model. Every DP rank must hold the
            same parameters in the same order.
        ctx: a ParallelContext (its dp x cp group is used), a ProcessGroup, or None (WORLD).
        bucket_mb: target bucket size in MiB; smaller buckets start communicating earlier.
        shard: reduce-scatter into `shard_grad` (for ZeRO-1) instead of all-reduce.
        isolate: parameters that get a bucket of their own (a tied embedding under ZeRO-1, so
            the first and last pipeline stage own the same slice of it).
        record_events: keep `events`, a list of ("ready", param_name) / ("launch", bucket_index)
            in the order they happened (used to prove overlap).
    """

    def __init__(
        self,
        module: nn.Module,
        ctx=None,
        bucket_mb: float = 25.0,
        shard: bool = False,
        record_events: bool = False,
        isolate=(),
    ):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be > 0 (e.g. 25)")
        self.module = module
        self.group = resolve_dp_group(ctx)
        self.dp_size = dist.get_world_size(self.group)
        self.dp_rank = dist.get_rank(self.group)
        self.shard = shard
        self.sync_enabled = True
        self.events: list[tuple[str, object]] | None = [] if record_events else None

        named, seen = [], set()
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        if not named:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise ValueError(
                f"DistributedDataParallel needs one parameter dtype, got {sorted(map(str, dtypes))}"
                "; keep fp32 master parameters and use autocast for low precision"
            )
        self.param_dtype = named[0][1].dtype
        self.main_grads = self.param_dtype in (torch.bfloat16, torch.float16)
        self.dtype = torch.float32 if self.main_grads else self.param_dtype  # the grad buffer
        self.device = named[0][1].device
        if self.device.type == "meta" and getattr(ctx, "device", None) is not None:
            self.device = torch.device(ctx.device)  # ZeRO-3 fills meta parameters as slices
        self.names = {id(p): n for n, p in named}
        self.params = [p for _, p in named]
        self._isolated = {id(p) for p in isolate}
        self.buckets, self.offsets = self._layout(self._kinds(ctx), bucket_mb)
        self.total = self.buckets[-1].end
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.grad_buffer = self.shard_grad = self.param_buffer = None
        self._allocate()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _kinds(self, ctx) -> list[tuple]:
        """(params in bucket order, group, size, rank) of each kind of parameter: the dense ones
        over the dp (x cp) group, then experts split over ep over their expert-data-parallel
        group. Parameters go in *reverse* registration order (roughly backward's order)."""
        experts = _expert_ids(self.module, ctx)
        dense = [p for p in reversed(self.params) if id(p) not in experts]
        kinds = [(dense, self.group, self.dp_size, self.dp_rank)]
        if experts:  # expert weights split over ep: replicated (and reduced) over edp only
            expert = [p for p in reversed(self.params) if id(p) in experts]
            kinds.append((expert, ctx.edp_group, ctx.edp_size, ctx.edp_rank))
        return kinds

    def _allocate(self) -> None:
        """The flat gradient buffer every p.grad views (and, ZeRO-1, the shard and the flat
        parameter buffer)."""
        self.grad_buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        if self.shard:
            self.shard_grad = torch.zeros(self.shard_total, dtype=self.dtype, device=self.device)
            self._flatten_params()
        for p in self.params:
            self._point(p)

    @property
    def shard_total(self) -> int:
        """Elements of this rank's slices of all buckets (the size of `shard_grad`)."""
        last = self.buckets[-1]
        return last.shard_start + last.numel // last.size

    def _point(self, p: nn.Parameter) -> None:
        """Make the parameter's gradient (or, bf16, its fp32 main gradient) its buffer slice."""
        if self.main_grads:
            p.main_grad, p.grad = self._grad_view(p), None
        else:
            p.grad = self._grad_view(p)

    # ----------------------------------------------------------------------------- layout
    def _layout(self, kinds, bucket_mb: float):
        """Buckets for each (params in order, group, size, rank) in `kinds`, one after the other."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        cap = max(1, int(bucket_mb * 2**20 / elem))
        buckets, offsets, current, start, pos, shard_pos = [], {}, [], 0, 0, 0

        def close(group, size, rank):
            nonlocal current, start, pos, shard_pos
            align = size if self.shard else 1
            end = start + -(-(pos - start) // align) * align  # pad: `size` equal slices
            buckets.append(Bucket(len(buckets), current, start, end, group, size, rank, shard_pos))
            shard_pos += (end - start) // size
            current, start, pos = [], end, end

        for ordered, *where in kinds:
            for p in ordered:
                if id(p) in self._isolated and current:
                    close(*where)
                offsets[id(p)] = pos
                pos += p.numel()
                current.append(p)
                if pos - start >= cap or id(p) in self._isolated:
                    close(*where)
            if current:
                close(*where)
        return buckets, offsets

    def _grad_view(self, p: nn.Parameter) -> torch.Tensor:
        off = self.offsets[id(p)]
        return self.grad_buffer[off : off + p.numel()].view_as(p)

    def _flatten_params(self) -> None:
        """Make every parameter a view into one flat buffer laid out like the gradients."""
        self.param_buffer = torch.zeros(self.total, dtype=self.param_dtype, device=self.device)
        for p in self.params:
            off = self.offsets[id(p)]
            view = self.param_buffer[off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """[lo, hi) of the flat buffers owned by this rank within `bucket` (ZeRO-1)."""
        size = bucket.numel // bucket.size
        lo = bucket.start + bucket.rank * size
        return lo, lo + size

    def shard_offset(self, bucket: Bucket) -> int:
        """Where this rank's slice of `bucket` starts in `shard_grad`."""
        return bucket.shard_start

    # ------------------------------------------------------------------------ hooks & comm
    def _absorb(self, p: nn.Parameter) -> None:
        # optimizer.zero_grad(set_to_none=True) drops our view; copy the fresh grad back in.
        if self.main_grads:  # already added into p.main_grad by the hook
            return
        view = self._grad_view(p)
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if self.main_grads:  # every micro-batch: accumulate in fp32, free the bf16 gradient
            p.main_grad.add_(p.grad)
            p.grad = None
        if not self.sync_enabled:
            return
        bucket = self.bucket_of[id(p)]
        if id(p) not in bucket.pending:
            raise RuntimeError(
                f"gradient of {self.names[id(p)]!r} became ready twice with grad sync enabled; "
                "run every micro-batch but the last inside ddp.no_sync()"
            )
        self._absorb(p)
        self._mark_ready(bucket, p)

    def _mark_ready(self, bucket: Bucket, p: nn.Parameter) -> None:
        """`p`'s gradient is in `bucket`: launch the bucket's collective when it was the last."""
        bucket.pending.discard(id(p))
        if self.events is not None:
            self.events.append(("ready", self.names[id(p)]))
        if not bucket.pending:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if self.events is not None:
            self.events.append(("launch", bucket.index))
        flat = self.grad_buffer[bucket.start : bucket.end]
        if self.dp_size > 1:
            flat.div_(self.dp_size)  # experts too: their replicas x ep group = the dp group
        if bucket.size == 1:
            if self.shard:
                self.shard_grad[self.shard_offset(bucket) :][: bucket.numel].copy_(flat)
            bucket.handle = _DONE
            return
        if self.shard:
            off = self.shard_offset(bucket)
            out = self.shard_grad[off : off + bucket.numel // bucket.size]
            bucket.handle = collectives.reduce_scatter_into(out, flat, bucket.group, async_op=True)
        else:
            bucket.handle = collectives.all_reduce(flat, bucket.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Wait until every bucket is reduced; call once per step before the optimizer."""
        for bucket in self.buckets:
            if bucket.handle is None:  # some parameters got no gradient in this step
                for p in bucket.params:
                    if id(p) in bucket.pending:
                        self._absorb(p)
                bucket.pending.clear()
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.reset()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no communication) inside this block."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def set_grad_sync(self, enabled: bool) -> None:
        """Turn reduction on (last micro-batch) or off (earlier micro-batches)."""
        self.sync_enabled = enabled

    def zero_grad(self) -> None:
        """Zero the gradient buffer (and ZeRO's shard) and re-point every p.grad into it."""
        self.grad_buffer.zero_()
        if self.shard_grad is not None:
            self.shard_grad.zero_()
        for p in self.params:
            self._point(p)
        for bucket in self.buckets:
            bucket.reset()

    @torch.no_grad()
    def broadcast_params(self, src_dp_rank: int = 0) -> None:
        """Copy dp-rank `src_dp_rank`'s parameters to every replica (start from identical weights)."""
        for bucket in self.buckets:  # experts: from the first replica of the same experts
            if bucket.size == 1:
                continue
            group = bucket.group
            src = dist.get_global_rank(group, src_dp_rank) if group is not None else src_dp_rank
            for p in bucket.params:
                collectives.broadcast(p.data, src, group)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self):
        return iter(self.params)


def _expert_ids(module: nn.Module, ctx) -> set[int]:
    """Expert weights split over an ep group > 1 (empty without expert parallelism)."""
    if getattr(ctx, "ep_size", 1) == 1:
        return set()
    from megatiny.parallel.sharding import sharded_parameter_ids

    return sharded_parameter_ids(module, "ep")


class _Done:
    """A finished work handle (dp_size == 1: nothing to communicate)."""

    def wait(self) -> bool:
        return True


_DONE = _Done()


def no_sync_unless(
    ddp: DistributedDataParallel | None, sync: bool
) -> contextlib.AbstractContextManager:
    """`ddp.no_sync()` when `sync` is False (and ddp is given), else a null context."""
    if ddp is None or sync:
        return contextlib.nullcontext()
    return ddp.no_sync()
