"""ZeRO-2 and ZeRO-3 (FSDP-style): gradients, then parameters too, sharded over data parallelism.

    ddp = ShardedDataParallel(model, ctx, level=3)        # level 2: gradients only
    opt = ZeroOptimizer(ddp, groups, lr=...)              # the ZeRO-1 optimizer, on my slices
    ... forward + backward of every micro-batch ...      (gathers / reduce-scatters run in hooks)
    ddp.finish_grad_sync(); opt.clip_grad_norm(1.0, ctx); opt.step(); opt.zero_grad()

The layout is ZeRO-1's (megatiny/parallel/zero.py, data_parallel.py): parameters laid out in flat
buckets, each bucket padded to D equal slices, rank d owning slice d of every bucket. What a rank
keeps between steps:

    level   fp32 grads held      parameters held       optimizer (AdamW m, v + fp32 master)
    1       whole (4 B/param)    whole                 1/D
    2       1/D                  whole                 1/D
    3       1/D                  1/D                   1/D

ZeRO-2. No whole gradient buffer exists. When backward produces a parameter's gradient, a hook
adds it into its bucket's buffer (allocated at the bucket's first gradient) and drops `p.grad`;
when every parameter of the bucket has its gradient, the bucket is reduce-scattered (async,
overlapped with the rest of backward) and, once done, my slice is *added* into `shard_grad` and
the bucket buffer is freed. At most `max_in_flight` buckets wait at once.

Gradient accumulation: every micro-batch is reduce-scattered (FSDP's choice, not Megatron's
accumulate-then-reduce): accumulating first would need the whole gradient held across micro-
batches, the memory level 2 exists to save. The cost: with m micro-batches a step moves m
reduce-scatters of the gradients, (D-1)/D x 4 B/param each (fp32), instead of one; `no_sync()`
has no effect here. Every parameter must get a gradient in every micro-batch's backward (true of
megatiny's models, MoE experts included), so that every rank issues the same collectives in the
same order.

ZeRO-3. Parameters too live only as my slices between uses (`param_shard`). The model is cut into
units: each transformer block, and one root unit of everything else (embeddings, final norm,
head). A unit's parameters are views into a flat buffer whose storage is allocated and
all-gathered just before the unit's forward, and freed after it (`reshard_after_forward`;
False keeps them from forward to backward: ZeRO-2's memory for fewer gathers); a hook on the
unit's output gathers them again when backward reaches it, and they are freed once all of its
gradients are produced. The next unit's gather is posted before the current one computes
(prefetch: the next block in forward, the previous block in backward). Recomputation
(`model.recompute`) re-runs a block's forward inside backward with its parameters still
gathered. The root unit is gathered at its first use in a step and freed when the step's
gradients are all reduced (`finish_grad_sync`): the head uses it last in forward and first in
backward, and under pipelining several micro-batches hold it at once (torchtitan keeps its root
gathered the same way). Under pipeline parallelism a stage gathers each block once per
micro-batch forward and once per micro-batch backward (`reshard_after_forward=false`: once per
micro-batch whose gradients are pending).

At any moment a ZeRO-3 rank holds its slices, at most two gathered blocks (current, prefetched),
the root unit, and one bucket's gradient per reduce-scatter in flight; `held_peak` counts the most
of them held at once (the plan's dry run reads it on the meta device).
"""

from __future__ import annotations

import torch
from torch import nn

from megatiny.parallel import collectives
from megatiny.parallel.data_parallel import Bucket, DistributedDataParallel

FREE, FORWARD, BACKWARD = "free", "forward", "backward"


class Unit:
    """Parameters gathered and freed together: one block, or the root (everything else)."""

    def __init__(self, name: str, buckets: list[Bucket], siblings: list | None = None):
        self.name, self.buckets = name, buckets
        self.siblings = siblings  # the units of the same ModuleList, in forward order
        self.state = FREE
        self.gathered = False
        self.works: list = []
        self.launched: set[int] = set()


def _unit_modules(module: nn.Module) -> tuple[list[list[tuple[str, nn.Module]]], set[int]]:
    """The blocks of every `blocks` ModuleList in `module` (a model or a pipeline stage's
    chunks), each list in forward order; and the ids of their parameters."""
    lists, inside = [], set()
    for name, m in module.named_modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            prefix = f"{name}.blocks" if name else "blocks"
            lists.append([(f"{prefix}.{i}", b) for i, b in enumerate(blocks)])
            inside |= {id(p) for b in blocks for p in b.parameters()}
    return lists, inside


class ShardedDataParallel(DistributedDataParallel):
    """ZeRO-2 (`level=2`) or ZeRO-3 (`level=3`) data parallelism; see the module docstring.

    Args beyond DistributedDataParallel's: `level`; `reshard_after_forward` (level 3);
    `max_in_flight`: reduce-scatters (each holding one bucket's gradient) left to run while
    backward goes on before the oldest is waited for.
    """

    def __init__(self, module: nn.Module, ctx=None, level: int = 2, bucket_mb: float = 25.0,
                 reshard_after_forward: bool = True, max_in_flight: int = 2,
                 record_events: bool = False, isolate=()):  # fmt: skip
        if level not in (2, 3):
            raise ValueError(f"ShardedDataParallel level={level}: choose 2 or 3")
        self.level = level
        self.reshard_after_forward = reshard_after_forward
        self.max_in_flight = max(1, max_in_flight)
        self._in_flight: list[tuple] = []
        self.held_now = self.held_peak = 0
        # local_grad_hook(bucket, flat), when set, sees each bucket's local gradient (this
        # micro-batch's, undivided) before its reduce-scatter, which a True return skips (the
        # replay check's checksums, faults and replays: megatiny/training/sdc.py).
        self.local_grad_hook = None
        self._lists, self._in_blocks = _unit_modules(module)
        if level == 3:
            bucket_mb = 2.0**40  # one bucket per block (and kind): gathered whole
            # The root's parameters a bucket each: the head's gradient is reduce-scattered as
            # soon as backward has it, not held until the embedding's comes last.
            isolate = (*isolate, *(p for p in module.parameters()
                                   if p.requires_grad and id(p) not in self._in_blocks))  # fmt: skip
        super().__init__(module, ctx, bucket_mb=bucket_mb, shard=True,
                         record_events=record_events, isolate=isolate)  # fmt: skip
        self.units: list[Unit] = []
        self.unit_of_bucket: dict[int, Unit] = {}
        if level == 3:
            self._build_units()

    # ----------------------------------------------------------------------------- layout
    def _kinds(self, ctx) -> list[tuple]:
        kinds = super()._kinds(ctx)
        if self.level == 2:
            return kinds
        # Level 3: the kinds cut per unit, so each bucket lies inside one unit.
        out = []
        for ids in self._unit_param_ids():
            for ordered, *where in kinds:
                mine = [p for p in ordered if id(p) in ids]
                if mine:
                    out.append((mine, *where))
        return out

    def _unit_param_ids(self) -> list[set[int]]:
        """Parameter ids of each unit, root first (its head gradients come first in backward)
        then the blocks last to first; parameters of the root outside any block."""
        root = {id(p) for p in self.params if id(p) not in self._in_blocks}
        units = [root] if root else []
        for blocks in self._lists:
            for _, block in reversed(blocks):
                units.append({id(p) for p in block.parameters() if p.requires_grad})
        return [u for u in units if u]

    def _build_units(self) -> None:
        by_param = {id(p): b for b in self.buckets for p in b.params}
        # (again: shard-only building replaced the meta parameters by real ones)
        self._in_blocks = {
            id(p) for blocks in self._lists for _, b in blocks for p in b.parameters()
        }
        for blocks in self._lists:
            siblings: list[Unit] = []
            for name, block in blocks:
                buckets = _unique(by_param[id(p)] for p in block.parameters() if p.requires_grad)
                unit = Unit(name, buckets, siblings)
                siblings.append(unit)
                block.register_forward_pre_hook(lambda _m, _a, u=unit: self._pre_forward(u))
                block.register_forward_hook(lambda _m, _a, out, u=unit: self._post_forward(u, out))
            self.units += siblings
        root = _unique(by_param[id(p)] for p in self.params if id(p) not in self._in_blocks)
        if root:
            unit = Unit("root", root)
            self.units.insert(0, unit)
            root_ids = {id(p) for b in root for p in b.params}
            for module in self.module.modules():  # the modules using root parameters
                if any(id(p) in root_ids for p in module.parameters(recurse=False)) or (
                    module is getattr(self.module, "norm_f", None)):  # fmt: skip
                    module.register_forward_pre_hook(lambda _m, _a, u=unit: self._unshard(u))
        for unit in self.units:
            for b in unit.buckets:
                self.unit_of_bucket[b.index] = unit

    # --------------------------------------------------------------------------- buffers
    @property
    def shard_grad(self) -> torch.Tensor:
        """My gradient slices, allocated at first use (building a model allocates no gradient)."""
        if self._shard_grad is None:
            self._shard_grad = torch.zeros(self.shard_total, dtype=self.dtype, device=self.device)
        return self._shard_grad

    @shard_grad.setter
    def shard_grad(self, value) -> None:
        self._shard_grad = value

    def _allocate(self) -> None:
        for b in self.buckets:
            b.grad = None
        for p in self.params:  # gradients arrive in p.grad and are moved into bucket buffers
            p.grad = None
            if self.main_grads:
                p.main_grad = None
        if self.level == 2:
            self._flatten_params()
            return
        # Level 3: my slices persist (`param_shard`); each bucket's whole buffer is allocated
        # only while gathered. Parameters are views into the whole buffers.
        self.param_shard = torch.zeros(self.shard_total, dtype=self.param_dtype,
                                       device=self.device)  # fmt: skip
        for b in self.buckets:
            b.full = torch.zeros(b.numel, dtype=self.param_dtype, device=self.device)
            lo, hi = self.shard_range(b)
            for i, p in enumerate(list(b.params)):
                a = self.offsets[id(p)]
                view = b.full[a - b.start : a - b.start + p.numel()].view_as(p)
                if not p.is_meta or self.device.type == "meta":
                    view.copy_(p.detach())
                    p.data = view
                else:  # left on meta by shard-only building: generated one at a time
                    from megatiny.parallel.build import shard_value

                    view.copy_(shard_value(self.module, self.names[id(p)], p))
                    # its own version counter (a plain view shares the buffer's, which gathers
                    # bump), as `p.data = view` gives the others
                    new = nn.Parameter(view.new_empty(0), p.requires_grad)
                    new.data = view
                    b.params[i] = self._replace(p, new)
            mine = self.param_shard[b.shard_start : b.shard_start + hi - lo]
            mine.copy_(b.full[lo - b.start : hi - b.start])
            _free(b.full)
            b.reset()

    def _replace(self, old: nn.Parameter, new: nn.Parameter) -> nn.Parameter:
        """Put `new` where the meta parameter `old` was, in the module and in every map."""
        name = self.names.pop(id(old))
        owner, _, leaf = name.rpartition(".")
        setattr(self.module.get_submodule(owner), leaf, new)
        self.names[id(new)] = name
        self.offsets[id(new)] = self.offsets.pop(id(old))
        self.bucket_of[id(new)] = self.bucket_of.pop(id(old))
        self.params = [new if q is old else q for q in self.params]
        if id(old) in self._isolated:
            self._isolated = (self._isolated - {id(old)}) | {id(new)}
        return new

    # ------------------------------------------------------------------------- gradients
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bucket = self.bucket_of[id(p)]
        if bucket.grad is None:
            bucket.grad = torch.zeros(bucket.numel, dtype=self.dtype, device=self.device)
            self._held(bucket.grad.nbytes)
        a = self.offsets[id(p)] - bucket.start
        bucket.grad[a : a + p.numel()].view_as(p).add_(p.grad)
        p.grad = None  # (bf16 parameters: accumulated in fp32 right here)
        self._mark_ready(bucket, p)

    def _launch(self, bucket: Bucket) -> None:
        if self.events is not None:
            self.events.append(("launch", bucket.index))
        flat = bucket.grad
        if flat is None:  # no gradient this step (finish_grad_sync): every rank still joins
            flat = torch.zeros(bucket.numel, dtype=self.dtype, device=self.device)
            self._held(flat.nbytes)
        bucket.grad = None
        bucket.reset()  # the next micro-batch fills it again
        skip = self.local_grad_hook is not None and self.local_grad_hook(bucket, flat)
        if self.dp_size > 1 and not skip:
            flat.div_(self.dp_size)
        n = bucket.numel // bucket.size
        mine = self.shard_grad[bucket.shard_start : bucket.shard_start + n]
        if skip:  # not reduced: shard_grad keeps what it has
            self._held(-flat.nbytes)
        elif bucket.size == 1:
            mine.add_(flat)
            self._held(-flat.nbytes)
        else:
            out = torch.empty(n, dtype=self.dtype, device=self.device)
            self._held(out.nbytes)
            work = collectives.reduce_scatter_into(out, flat, bucket.group, async_op=True)
            self._in_flight.append((work, flat, out, mine))
            while len(self._in_flight) > self.max_in_flight:
                self._complete_oldest()
        unit = self.unit_of_bucket.get(bucket.index)
        if unit is not None and unit.siblings is not None:  # a block (the root: at the end)
            unit.launched.add(bucket.index)
            if len(unit.launched) == len(unit.buckets):  # its backward is done: free it
                unit.launched.clear()
                self._reshard(unit)

    def _complete_oldest(self) -> None:
        work, flat, out, mine = self._in_flight.pop(0)
        work.wait()
        mine.add_(out)
        self._held(-flat.nbytes - out.nbytes)

    def finish_grad_sync(self) -> None:
        """Reduce-scatter what is left (buckets some parameters of which got no gradient), wait
        for every reduce-scatter; under ZeRO-3 every unit ends freed."""
        for bucket in self.buckets:
            if bucket.grad is not None:
                self._launch(bucket)
        while self._in_flight:
            self._complete_oldest()
        for bucket in self.buckets:
            bucket.reset()
        self.reshard_all()

    def zero_grad(self) -> None:
        self.shard_grad.zero_()
        for bucket in self.buckets:
            bucket.grad = None
            bucket.reset()
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ parameters (ZeRO-3)
    def _gather(self, unit: Unit, async_op: bool) -> None:
        for b in unit.buckets:
            _alloc(b.full)
            self._held(b.full.nbytes)
            lo, hi = self.shard_range(b)
            mine = self.param_shard[b.shard_start : b.shard_start + hi - lo]
            if b.size == 1:
                b.full.copy_(mine)
            else:
                unit.works.append(
                    collectives.all_gather_into(b.full, mine, b.group, async_op=async_op)
                )
        unit.gathered = True

    def _unshard(self, unit: Unit) -> None:
        """Make the unit's parameters whole (waiting for a prefetched gather)."""
        if not unit.gathered:
            self._gather(unit, async_op=False)
        for work in unit.works:
            if work is not None:
                work.wait()
        unit.works = []

    def _prefetch(self, unit: Unit | None) -> None:
        if unit is not None and not unit.gathered:
            self._gather(unit, async_op=True)

    def _reshard(self, unit: Unit) -> None:
        if unit.gathered:
            self._unshard(unit)  # a prefetch still in flight writes into the buffers
            for b in unit.buckets:
                _free(b.full)
                self._held(-b.full.nbytes)
            unit.gathered = False
        unit.state = FREE

    def reshard_all(self) -> None:
        """Free every gathered unit (after the optimizer updated the slices they came from)."""
        for unit in self.units:
            self._reshard(unit)

    def gather_all(self) -> None:
        """Every unit whole: for checkpoint saving and loading, which read all parameters."""
        for unit in self.units:
            self._unshard(unit)

    @torch.no_grad()
    def scatter_back(self) -> None:
        """`param_shard` <- my slices of the whole parameters (something loaded into them)."""
        for b in self.buckets:
            if self.unit_of_bucket[b.index].gathered:
                lo, hi = self.shard_range(b)
                dst = self.param_shard[b.shard_start : b.shard_start + hi - lo]
                dst.copy_(b.full[lo - b.start : hi - b.start])

    def _neighbour(self, unit: Unit, step: int) -> Unit | None:
        if unit.siblings is None:
            return None
        i = unit.siblings.index(unit) + step
        return unit.siblings[i] if 0 <= i < len(unit.siblings) else None

    def _pre_forward(self, unit: Unit) -> None:
        if unit.state == BACKWARD:  # recomputation inside backward: already gathered
            self._unshard(unit)
            return
        self._unshard(unit)
        unit.state = FORWARD
        self._prefetch(self._neighbour(unit, +1))

    def _post_forward(self, unit: Unit, output) -> None:
        if unit.state == BACKWARD:
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        tensors = [t for t in outputs if torch.is_tensor(t) and t.requires_grad]
        if torch.is_grad_enabled() and tensors:
            tensors[0].register_hook(lambda g, u=unit: self._pre_backward(u) or g)
            if not self.reshard_after_forward:
                return
        self._reshard(unit)

    def _pre_backward(self, unit: Unit) -> None:
        self._unshard(unit)
        unit.state = BACKWARD
        self._prefetch(self._neighbour(unit, -1))

    # ---------------------------------------------------------------------------- report
    def _held(self, nbytes: int) -> None:
        """Count bytes this wrapper allocates (+) or frees (-) beyond its slices: gathered
        units, gradient buckets and received slices; `held_peak` is their most at once."""
        self.held_now += nbytes
        self.held_peak = max(self.held_peak, self.held_now)


def _unique(buckets) -> list[Bucket]:
    out: dict[int, Bucket] = {}
    for b in buckets:
        out.setdefault(b.index, b)
    return sorted(out.values(), key=lambda b: b.index)


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    want = t.numel() * t.element_size()
    if storage.nbytes() < want:
        storage.resize_(want)
