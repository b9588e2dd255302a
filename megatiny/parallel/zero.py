"""ZeRO-1: the optimizer state sharded over the data-parallel group.

    ddp = DistributedDataParallel(model, ctx, bucket_mb=25, shard=True)
    opt = ZeroOptimizer(ddp, param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95))
    ... backward over the micro-batches ...
    ddp.finish_grad_sync()            # reduce-scatter done: shard_grad holds my averaged slice
    norm = opt.clip_grad_norm(1.0, ctx)
    opt.step()                        # AdamW on my slice, then all-gather the updated parameters
    opt.zero_grad()

With D data-parallel ranks, every bucket of the flat buffers of `ddp` is cut into D equal slices;
rank d owns slice d of every bucket. Per step:

    g_d  = reduce_scatter(g / D)[d]        (done by ddp during backward, overlapped)
    w_d  = AdamW(w_d, g_d; m_d, v_d)       (fp32 master slice, optimizer state only for the slice)
    w    = all_gather(w_d)                 (into the flat parameter buffer the model's params view)

AdamW is element-wise, so stepping D disjoint slices equals stepping the whole vector — except
for anything that needs a global reduction: gradient clipping uses the norm of the *full*
gradient, sum_d ||g_d||^2 all-reduced over dp (then over the model-parallel group, counting
TP-replicated parameters once). The optimizer state per rank drops from 8 bytes/param (AdamW fp32
m and v) to 8/D bytes/param, plus a 4/D bytes/param fp32 master copy of the slice.

Each parameter's part of my slice is its own tensor in the inner optimizer, placed in the param
group of the original parameter (so weight decay rules still apply per parameter). Those tensors
are views into one flat fp32 `master` buffer.

Expert parallelism: the buckets of expert weights split over ep are sliced over the
expert-data-parallel group (each bucket knows its group, `bucket.group` / `bucket.size`), so D
above is that group's size for them; the clipping norm's all-reduce over the whole dp group then
sums the slices of every expert exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel import collectives
from megatiny.parallel.data_parallel import DistributedDataParallel


def finish_param_sync(optimizer) -> None:
    """Wait for the parameter all-gathers a ZeRO-1 optimizer left in flight
    (`overlap_param_gather`), so the model's weights are final; other optimizers have none."""
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.finish_param_sync()


class ZeroOptimizer:
    """A ZeRO-1 distributed optimizer on top of a `DistributedDataParallel(..., shard=True)`.

    Args:
        ddp: the gradient synchronizer (must be built with shard=True).
        param_groups: torch-style groups over the model's parameters (default: one group).
        optimizer_cls: the element-wise optimizer run on the slice (AdamW by default).
        overlap_param_gather: leave each bucket's parameter all-gather in flight after `step()`
            and wait for it in a forward pre-hook of the first module that uses the bucket's
            parameters (Megatron's --overlap-param-gather): the gather hides behind the next
            forward. `finish_param_sync()` waits for all of them (checkpoints call it).
        **optimizer_kwargs: its hyper-parameters (lr, betas, eps, weight_decay, ...).
    """

    def __init__(
        self,
        ddp: DistributedDataParallel,
        param_groups=None,
        optimizer_cls=torch.optim.AdamW,
        overlap_param_gather: bool = False,
        **optimizer_kwargs,
    ):
        if not ddp.shard:
            raise ValueError(
                "ZeroOptimizer needs DistributedDataParallel(model, ctx, shard=True) so gradients "
                "are reduce-scattered into per-rank slices"
            )
        self.ddp = ddp
        groups = param_groups if param_groups is not None else [{"params": ddp.params}]
        groups = [dict(g) for g in groups]
        group_of = {}
        for gi, g in enumerate(groups):
            g["params"] = list(g["params"])
            for p in g["params"]:
                if id(p) not in ddp.offsets:
                    raise ValueError("param_groups hold a parameter the DDP wrapper does not know")
                group_of[id(p)] = gi
        missing = [ddp.names[id(p)] for p in ddp.params if id(p) not in group_of]
        if missing:
            raise ValueError(f"parameters {missing[:4]} are in no param group")

        # ZeRO-3 keeps the parameters only as slices (`ddp.param_shard`): the fp32 master is
        # that buffer itself for fp32 parameters, an fp32 copy of it for bf16 ones.
        shard = getattr(ddp, "param_shard", None)
        if shard is not None and shard.dtype == torch.float32:
            self.master = shard
        else:
            self.master = torch.zeros(ddp.shard_total, dtype=torch.float32, device=ddp.device)
        # (piece, owner param, [lo, hi) in the flat buffers, offset in master / shard_grad)
        self.pieces: list[tuple[nn.Parameter, nn.Parameter, int, int, int]] = []
        inner_groups = [{**g, "params": []} for g in groups]
        for bucket in ddp.buckets:
            lo, hi = ddp.shard_range(bucket)
            soff = ddp.shard_offset(bucket)
            for p in bucket.params:
                a = ddp.offsets[id(p)]
                s, e = max(a, lo), min(a + p.numel(), hi)
                if s >= e:
                    continue
                m = self.master[soff + s - lo : soff + e - lo]
                if shard is None:
                    m.copy_(p.detach().reshape(-1)[s - a : e - a])
                elif m.data_ptr() != shard.data_ptr() or shard.dtype != m.dtype:
                    m.copy_(shard[soff + s - lo : soff + e - lo])
                piece = nn.Parameter(m)  # shares storage with `master`
                self.pieces.append((piece, p, s, e, soff + s - lo))
                inner_groups[group_of[id(p)]]["params"].append(piece)
        self.optimizer = optimizer_cls(inner_groups, **optimizer_kwargs)
        self._consolidated: _ConsolidatedState | None = None
        self.overlap_param_gather = overlap_param_gather
        self._pending: dict[int, tuple] = {}  # bucket index -> (work, the slice it sends)
        if overlap_param_gather:
            bucket_of = {id(p): i for i, b in enumerate(ddp.buckets) for p in b.params}
            for module in ddp.module.modules():
                ids = sorted({bucket_of[id(p)] for p in module.parameters(recurse=False)
                              if id(p) in bucket_of})  # fmt: skip
                if ids:
                    module.register_forward_pre_hook(lambda _m, _a, ids=ids: self._wait(ids))

    def _wait(self, buckets) -> None:
        for i in buckets:
            pending = self._pending.pop(i, None)
            if pending is not None:
                pending[0].wait()

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers `step()` left in flight (overlap_param_gather)."""
        self._wait(list(self._pending))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self) -> _ConsolidatedState:
        """Per *model parameter* state, {"step", "exp_avg", "exp_avg_sq"} with the parameter's
        shape, like a plain AdamW's `state[p]` — what layout-free checkpoints read and load into.

        The first lookup all-gathers the slices over dp (collective: every dp rank must look it
        up, as checkpoint save/load do). Tensors loaded into these dicts in place are scattered
        back into the slices at the next `step()`. The sharded state is `self.optimizer.state`.
        """
        if self._consolidated is None:
            self._consolidated = _ConsolidatedState(self._consolidate())
        return self._consolidated

    def _attach_grads(self) -> None:
        shard_grad = self.ddp.shard_grad
        for piece, _, s, e, off in self.pieces:
            piece.grad = shard_grad[off : off + (e - s)].to(torch.float32)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, ctx=None, skip_parameter_ids=None) -> torch.Tensor:
        """Clip my slice by the global gradient norm; return the pre-clip norm (same on all ranks).

            ||g||^2 = sum over dp slices (sum over model-parallel ranks, TP replicas counted once)

        `skip_parameter_ids`: parameters owned by another stage (the last stage's copy of a tied
        embedding). Call after `ddp.finish_grad_sync()`.
        """
        self._attach_grads()
        skip = skip_parameter_ids or set()
        tp_size = getattr(ctx, "tp_size", 1)
        tp_rank = getattr(ctx, "tp_rank", 0)
        sharded = set()
        if tp_size > 1:
            from megatiny.parallel.sharding import sharded_parameter_ids

            sharded = sharded_parameter_ids(self.ddp.module, "tp")
        total = torch.zeros((), dtype=torch.float32, device=self.master.device)
        for piece, p, *_ in self.pieces:
            if id(p) in skip or not (id(p) in sharded or tp_rank == 0):
                continue
            total += piece.grad.pow(2).sum()
        if self.ddp.dp_size > 1:
            collectives.all_reduce(total, self.ddp.group)
        if ctx is not None and getattr(ctx, "mp_group", None) is not None:
            if getattr(ctx, "cp_rank", 0) != 0:  # the dp x cp all-reduce already counted cp
                total.zero_()
            collectives.all_reduce(total, ctx.mp_group)
        norm = total.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for piece, *_ in self.pieces:
                piece.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def _refresh_master(self) -> None:
        """master <- my slices of the parameters, when both are fp32 (then they are equal unless
        something, e.g. a checkpoint load, wrote the parameters in place)."""
        ddp = self.ddp
        if ddp.param_buffer is None or ddp.param_buffer.dtype != self.master.dtype:
            return  # (ZeRO-3: the slices are the master, or loaded into it by `whole_parameters`)
        for bucket in ddp.buckets:
            lo, hi = ddp.shard_range(bucket)
            off = ddp.shard_offset(bucket)
            self.master[off : off + hi - lo].copy_(ddp.param_buffer[lo:hi])

    @torch.no_grad()
    def step(self) -> None:
        """Step the inner optimizer on my slice, then all-gather the parameters of every bucket."""
        self.finish_param_sync()
        if not any(piece.grad is not None for piece, *_ in self.pieces):
            self._attach_grads()
        if self._consolidated is not None:  # a checkpoint may have loaded into it
            self._scatter(self._consolidated.by_id)
            self._consolidated = None
        self._refresh_master()
        self.optimizer.step()
        ddp = self.ddp
        if ddp.param_buffer is None:  # ZeRO-3: update my parameter slices; blocks gather them
            if ddp.param_shard.data_ptr() != self.master.data_ptr():
                ddp.param_shard.copy_(self.master)  # bf16: rounded, as ZeRO-1 gathers them
            ddp.reshard_all()
            for piece, *_ in self.pieces:
                piece.grad = None
            return
        # The last bucket holds the first layers (buckets fill in backward order): post it first.
        for index in reversed(range(len(ddp.buckets))):
            bucket = ddp.buckets[index]
            soff = ddp.shard_offset(bucket)
            mine = self.master[soff : soff + bucket.numel // bucket.size]
            out = ddp.param_buffer[bucket.start : bucket.end]
            if bucket.size == 1:
                out.copy_(mine)
                continue
            # bf16 parameters: each rank rounds its fp32 slice before the gather (rounding after
            # it gives the same bits), so the all-gather moves the parameters' dtype, as
            # Megatron's distributed optimizer gathers its bf16 parameter buffer.
            mine = mine.to(out.dtype)
            work = collectives.all_gather_into(out, mine, bucket.group, async_op=True)
            self._pending[index] = (work, mine)
        if not self.overlap_param_gather:
            self.finish_param_sync()
        for piece, *_ in self.pieces:
            piece.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp.zero_grad()
        for piece, *_ in self.pieces:
            piece.grad = None

    def memory_report(self) -> dict[str, int]:
        """Bytes held by this rank: model params/grads, fp32 master slice, optimizer state.

        `optimizer_state_bytes_unsharded` is what the same optimizer would hold without ZeRO.
        """
        ddp = self.ddp
        state_bytes = sum(
            t.numel() * t.element_size()
            for st in self.optimizer.state.values()
            for t in st.values()
            if torch.is_tensor(t) and t.numel() > 1
        )
        mine = sum(piece.numel() for piece, *_ in self.pieces)
        full = sum(p.numel() for p in ddp.params)
        per_element = state_bytes / mine if mine else 0.0
        params = ddp.param_buffer if ddp.param_buffer is not None else ddp.param_shard
        grads = [t for t in (ddp.grad_buffer, ddp.shard_grad) if t is not None]
        return {
            "param_bytes": params.numel() * params.element_size(),
            "grad_bytes": sum(t.numel() * t.element_size() for t in grads),
            "master_param_bytes": 0
            if self.master is params
            else self.master.numel() * self.master.element_size(),
            "optimizer_state_bytes": int(state_bytes),
            "optimizer_state_bytes_unsharded": int(round(per_element * full)),
            "dp_size": ddp.dp_size,
        }

    def state_dict(self) -> dict:
        """This rank's slice of the optimizer state (a ZeRO checkpoint is saved per dp rank)."""
        return {"optimizer": self.optimizer.state_dict(), "dp_size": self.ddp.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dp_size") != self.ddp.dp_size:
            raise ValueError(
                f"ZeRO state was saved with dp={state.get('dp_size')} but this run has "
                f"dp={self.ddp.dp_size}; use full_state_dict()/load_full_state_dict() to reshard"
            )
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def _gather_flat(self, key: str) -> torch.Tensor:
        """State `key` of every slice all-gathered into one tensor laid out like the buffers."""
        ddp = self.ddp
        flat_shard = torch.zeros_like(self.master)
        for piece, _, s, e, off in self.pieces:
            value = piece.detach() if key == "main_param" else self.optimizer.state[piece][key]
            flat_shard[off : off + (e - s)] = value
        flat = torch.zeros(ddp.total, dtype=flat_shard.dtype, device=flat_shard.device)
        for bucket in ddp.buckets:
            soff = ddp.shard_offset(bucket)
            n = bucket.numel // bucket.size
            dst = flat[bucket.start : bucket.end]
            if bucket.size == 1:
                dst.copy_(flat_shard[soff : soff + n])
            else:
                collectives.all_gather_into(dst, flat_shard[soff : soff + n], bucket.group)
        return flat

    @torch.no_grad()
    def _consolidate(self) -> dict[int, dict[str, torch.Tensor]]:
        """{id(param): {key: full tensor}} (collective over dp; empty dicts before any step)."""
        ddp = self.ddp
        states = [self.optimizer.state[piece] for piece, *_ in self.pieces]
        has_state = torch.tensor([float(any(states))], device=self.master.device)
        if ddp.dp_size > 1:
            collectives.all_reduce(has_state, ddp.group, op=dist.ReduceOp.MAX)
        out: dict[int, dict[str, torch.Tensor]] = {id(p): {} for p in ddp.params}
        if ddp.main_grads:  # bf16 parameters: the fp32 main weights are state to save too
            self._gather_into(out, "main_param")
        # A dry run on the meta device has no values: it takes this rank's own answer.
        if not (any(states) if has_state.is_meta else has_state.item()):
            return out
        step = next((st["step"] for st in states if "step" in st), None)
        # On the device for the collective (NCCL rejects CPU tensors); AdamW keeps `step` on CPU.
        device = self.master.device
        step = torch.zeros((), device=device) if step is None else step.detach().to(device)
        if ddp.dp_size > 1:  # a rank whose slices are all padding has no state of its own
            collectives.all_reduce(step, ddp.group, op=dist.ReduceOp.MAX)
        step = torch.zeros(()) if step.is_meta else step.cpu()  # AdamW keeps `step` on CPU
        for key in ("exp_avg", "exp_avg_sq"):
            self._gather_into(out, key)
        for p in ddp.params:
            out[id(p)]["step"] = step.clone()
        return out

    def _gather_into(self, out: dict, key: str) -> None:
        flat = self._gather_flat(key)
        for p in self.ddp.params:
            off = self.ddp.offsets[id(p)]
            out[id(p)][key] = flat[off : off + p.numel()].view(p.shape)

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The per-parameter tensors a checkpoint saves (see `state`)."""
        return ("exp_avg", "exp_avg_sq") + (("main_param",) if self.ddp.main_grads else ())

    @torch.no_grad()
    def _scatter(self, by_id: dict[int, dict[str, torch.Tensor]]) -> None:
        """Set each slice's state from full per-parameter tensors (any dp layout wrote them)."""
        ddp = self.ddp
        for piece, p, s, e, _ in self.pieces:
            full = by_id.get(id(p)) or {}
            if "exp_avg" not in full:
                continue
            a = ddp.offsets[id(p)]
            st = {}
            for key, t in full.items():
                if key == "main_param":  # into the fp32 master slice itself
                    piece.data.copy_(t.reshape(-1)[s - a : e - a])
                elif t.numel() > 1 or key != "step":
                    st[key] = t.reshape(-1)[s - a : e - a].clone().to(piece.device)
                else:
                    st[key] = t.detach().clone().reshape(())
            self.optimizer.state[piece] = st

    def full_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Layout-free optimizer state: {param name: {state key: full tensor}} (collective)."""
        names = self.ddp.names
        return {names[pid]: st for pid, st in self._consolidate().items()}

    def load_full_state_dict(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of `full_state_dict`, for any dp size: take my slice of each full tensor."""
        by_name = {n: pid for pid, n in self.ddp.names.items()}
        self._scatter({by_name[n]: st for n, st in full.items()})
        self._consolidated = None


class _ConsolidatedState:
    """A read/write mapping param -> full state dict (see `ZeroOptimizer.state`)."""

    def __init__(self, by_id: dict[int, dict[str, torch.Tensor]]):
        self.by_id = by_id

    def __getitem__(self, p) -> dict[str, torch.Tensor]:
        return self.by_id.setdefault(id(p), {})

    def __contains__(self, p) -> bool:
        return bool(self.by_id.get(id(p)))

    def __len__(self) -> int:
        return sum(1 for st in self.by_id.values() if st)

    def values(self):
        return [st for st in self.by_id.values() if st]
