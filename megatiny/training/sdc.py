"""Silent data corruption: replay a step, compare, classify, skip or stop.

`train.check_replay_every=N` makes every N-th step a check step (Megatron's rerun state machine,
torchtitan's step replay, done in place):

    1. the step's forward + backward runs with the data-parallel reduction deferred (no bucket
       is launched during the backward: the overlap of that one step is lost), so this rank's
       local gradient is whole and unreduced; two checksums per parameter (64-bit sums of its
       gradient's raw bits, plain and weighted by position: any single flipped bit changes
       both) and the loss's bits are kept;
    2. the RNG state of the step's start is restored and the same micro-batches run again into
       zeroed gradients (the replay); its loss and checksums must equal the first pass's
       bitwise (the same data, RNG and kernels give the same bits on CPU);
    3. if any rank's differ, every rank replays once more (a replay is collective: tp all-reduces,
       pipeline messages). A rank whose second replay equals its first replay had a
       **transient** fault (the first pass was hit once); one whose replays disagree too is
       **persistent** (it keeps computing different numbers: take its device out of service);
    4. `train.sdc_policy`: skip drops the step's update on every rank (the gradients are zeroed,
       the lr schedule and data move on, as `nan_policy=skip`); stop raises
       `SilentDataCorruption`, and the loop saves a checkpoint of the state before the step
       (nothing the step did is in it) and exits 1.
    5. after the reduction (the deferred buckets are launched by the Trainer as usual) the
       replicas' reduced gradients, bitwise equal by construction, are compared through an
       all-gather of their checksums over the dp group; a difference (a fault in or after the
       reduction, which no replay reproduces) names the ranks and is handled by the same policy.

Under parallel.zero=2/3 (megatiny/parallel/fsdp.py) no rank ever holds its whole local gradient:
each micro-batch's is reduce-scattered bucket by bucket during the backward and freed, and no
reduction can be deferred. It does exist, one bucket at a time, as each reduce-scatter is launched
(`ShardedDataParallel.local_grad_hook`): there the check takes the checksum pair of every
parameter's region of the bucket's local gradient (before its division by dp), so a pass yields
the ordered list of its launches' checksums (bucket index, parameter, micro-batch), which steps
2-4 compare as above, naming the parameter of the first differing row. The replays' buckets are
not reduce-scattered (the hook returns True: no communication, and `shard_grad` keeps the first
pass's reduced slices as a step without a check has them); `skip` zeroes them. Step 5 is not done
under any ZeRO level (1, 2, 3): each rank holds a different slice of the reduced gradient, so no
replica to compare with exists; a fault in or after the reduce-scatter goes unseen there. The
first pass keeps its overlap; a check step adds its replay (computation only) and the checksums
of every launch (per bucket and micro-batch: a few element-wise passes over its gradient).

The replay runs the step's micro-batches: all of them, since the schedule scales each backward by
1/accumulation and (pipelines) interleaves them, so a lone micro-batch's gradient is not bitwise
comparable with its share of the accumulated one. A check step costs one more forward + backward
of the step, the overlap of its reduction and a small all-gather (benchmarks/resilience.py).
The MoE router statistics of a check step count the replays too.
"""

from __future__ import annotations

import contextlib

import torch

from megatiny.parallel import collectives
from megatiny.training.step import NonFiniteLoss

_NAME_BYTES = 120


class SilentDataCorruption(NonFiniteLoss):
    """A replay or the replicas disagree and `train.sdc_policy=stop`: like a non-finite loss,
    the step's numbers cannot be trusted; the loop saves the state before the step and exits 1."""


def local_grads(model) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, local gradient) of every parameter with a gradient: the fp32 main
    gradient of low-precision parameters (DDP's buffer), else `.grad`."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        if grad is not None:
            out.append((name, p, grad))
    return out


def checksums(grads) -> torch.Tensor:
    """[gradients, 2] int64: the sum of each gradient's raw bits and their sum weighted by
    position (so two flips that shift the plain sum alike, at two places, still show)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    rows = []
    for _, _, g in grads:
        bits = g.detach().reshape(-1).view(ints[g.element_size()]).to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
        rows.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64)


def _loss_bits(loss: torch.Tensor) -> int:
    return int(loss.detach().float().reshape(()).view(torch.int32).item())


class ReplayCheck:
    """Wraps `trainer.schedule` (deferred reduction, fault injection, replay) and
    `trainer.optimizer.step` (replica comparison, skipping) for the check and fault steps."""

    def __init__(self, trainer, every: int, policy: str, injector=None, warn=print):
        self.trainer, self.every, self.policy = trainer, every, policy
        self.injector, self.warn = injector, warn
        self.ctx = trainer.ctx
        self.events: list[dict] = []  # every detected corruption, in order
        self.skip = False
        ddp = trainer.ddp
        self.sharded = ddp is not None and hasattr(ddp, "local_grad_hook")  # ZeRO-2/3
        self._launches: list[tuple[int, torch.Tensor]] | None = None  # this pass's (ZeRO-2/3)
        self._schedule, self._optimizer_step = trainer.schedule, trainer.optimizer.step
        trainer.schedule, trainer.optimizer.step = self.schedule, self.optimizer_step

    # ---- the step's forward + backward --------------------------------------------------------
    def schedule(self, model, micro_batches, **kwargs):
        if kwargs.get("forward_only"):
            return self._schedule(model, micro_batches, **kwargs)
        step = self.trainer.step + 1
        self.skip = False
        if self.injector is not None:
            self.injector.slow_down()
        check = bool(self.every) and step % self.every == 0
        if not check and not (self.injector and self.injector.defer_due(step)):
            return self._schedule(model, micro_batches, **kwargs)
        ddp = self.trainer.ddp
        kwargs["grad_sync"] = lambda last: ddp.no_sync() if ddp else contextlib.nullcontext()
        rng = self._rng_state()
        loss = self._pass(model, micro_batches, kwargs, step, 0, record=check)
        if not check:
            return loss
        first = (_loss_bits(loss), self._sums(model))
        order = self._launches  # ZeRO-2/3: which rows belong to which parameter
        replay = self._replay(model, micro_batches, kwargs, step, 1, rng)
        mismatch, kind, where = _differs(first, replay), 0, ""
        flags = self._gather(torch.tensor([int(mismatch is not None)], dtype=torch.uint8))
        if flags.any():
            again = self._replay(model, micro_batches, kwargs, step, 2, rng)
            kind = 0 if mismatch is None else (1 if _differs(replay, again) is None else 2)
            where = "" if mismatch is None else self._where(model, mismatch, order)
            self._verdict(step, kind, where, "the first pass and its replay")
        return loss

    def _pass(self, model, micro_batches, kwargs, step: int, index: int, record: bool = True):
        flip = self.injector is not None and self.injector.flip_due(step, index)
        if not self.sharded:
            loss = self._schedule(model, micro_batches, **kwargs)
            if flip:
                self.injector.flip(step, index, [(n, g) for n, _, g in local_grads(model)])
            return loss
        ddp = self.trainer.ddp  # ZeRO-2/3: act on each bucket's local gradient at its launch
        self._launches = [] if record else None
        if flip or record:  # (a replay, index > 0, is not reduce-scattered: the hook says True)
            ddp.local_grad_hook = lambda bucket, flat: self._on_launch(bucket, flat, step, index,
                                                                       flip)  # fmt: skip
        try:
            loss = self._schedule(model, micro_batches, **kwargs)
            ddp.finish_grad_sync()  # every reduce-scatter of this pass is done
        finally:
            ddp.local_grad_hook = None
        if flip:
            self.injector.check_flipped(step, index, self._names())
        return loss

    def _on_launch(self, bucket, flat, step: int, index: int, flip: bool) -> bool:
        """ZeRO-2/3: `flat` is `bucket`'s local gradient of one micro-batch, before its
        reduce-scatter: flip a due fault's bit in it, record its checksums; True (a replay):
        skip the reduce-scatter."""
        ddp = self.trainer.ddp
        grads = []
        for p in bucket.params:
            a = ddp.offsets[id(p)] - bucket.start
            grads.append((ddp.names[id(p)], flat[a : a + p.numel()]))
        if flip:
            self.injector.flip_bucket(step, index, grads, self._names()[0])
        if self._launches is not None:
            self._launches.append((bucket.index, checksums([(n, None, g) for n, g in grads])))
        return index > 0

    def _names(self) -> list[str]:  # the trainable parameters' names, the model's order
        return [n for n, p in self.trainer.ddp.module.named_parameters() if p.requires_grad]

    def _sums(self, model) -> torch.Tensor:
        """The pass's checksums: [parameters, 2]; ZeRO-2/3: [launched parameters, 3], each row
        led by its bucket's index (so a different order of launches differs too)."""
        if not self.sharded:
            return checksums(local_grads(model))
        rows = [torch.cat([torch.full_like(c[:, :1], b), c], 1) for b, c in self._launches]
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)

    def _replay(self, model, micro_batches, kwargs, step, index, rng):
        self._set_rng_state(rng)
        if not self.sharded:  # (ZeRO-2/3: the buckets are empty; shard_grad is the first pass's)
            self._zero_grad()
        loss = self._pass(model, micro_batches, kwargs, step, index)
        return _loss_bits(loss), self._sums(model)

    def _zero_grad(self) -> None:  # as Trainer.train_step starts a step
        ddp = self.trainer.ddp
        self.trainer.optimizer.zero_grad(set_to_none=ddp is None)
        if ddp is not None:
            ddp.zero_grad()

    def _where(self, model, index: int, order=None) -> str:
        if index < 0:
            return "the loss"
        if self.sharded:  # the index-th row of the first pass's launches
            seen: dict[int, int] = {}
            for b, rows in order:
                seen[b] = seen.get(b, 0) + 1
                if index < len(rows):
                    name = self.trainer.ddp.names[id(self.trainer.ddp.buckets[b].params[index])]
                    return f"parameter {name} (bucket {b}'s reduce-scatter {seen[b]} of the step)"
                index -= len(rows)
            return "the number of bucket reduce-scatters"
        name, p, _ = local_grads(model)[index]
        ddp = self.trainer.ddp
        bucket = getattr(ddp, "bucket_of", {}).get(id(p)) if ddp is not None else None
        return f"parameter {name}" + (f" (bucket {bucket.index})" if bucket is not None else "")

    # ---- after the reduction: the replicas ----------------------------------------------------
    def optimizer_step(self, *args, **kwargs):
        step = self.trainer.step + 1
        ddp = self.trainer.ddp
        if (not self.skip and self.every and step % self.every == 0 and ddp is not None
                and not getattr(ddp, "shard", False) and ddp.dp_size > 1):  # fmt: skip
            self._compare_replicas(step, ddp)
        if self.skip:
            self.trainer.skipped_steps += 1
            return None
        return self._optimizer_step(*args, **kwargs)

    def _compare_replicas(self, step: int, ddp) -> None:
        grads = [(n, p, g) for n, p, g in local_grads(self.trainer.model)
                 if ddp.bucket_of[id(p)].group is ddp.group]  # fmt: skip
        mine = checksums(grads).reshape(-1).to(self.ctx.device)  # 2 per parameter
        rows = collectives.all_gather_cat(mine[None], ddp.group, 0)  # [dp, params]
        odd = (rows != rows[0]).any(dim=0).nonzero().flatten().tolist()
        where = ""
        if odd:
            import torch.distributed as dist

            others = [dist.get_global_rank(ddp.group, d) for d in range(ddp.dp_size)
                      if not torch.equal(rows[d].cpu(), mine.cpu())]  # fmt: skip
            where = (f"the reduced gradient of parameter {grads[odd[0] // 2][0]} (unlike "
                     f"rank {', rank '.join(map(str, others))}'s)")  # fmt: skip
        self._verdict(step, 3 if odd else 0, where, "the data-parallel replicas")

    # ---- every rank learns every rank's verdict -------------------------------------------------
    def _gather(self, row: torch.Tensor) -> torch.Tensor:
        """[world, len(row)]: every rank's `row`."""
        if self.ctx.world_size == 1:
            return row[None]
        return collectives.all_gather_cat(row[None].to(self.ctx.device), None, 0).cpu()

    def _verdict(self, step: int, kind: int, where: str, compared: str) -> None:
        """kind 0 fine, 1 transient, 2 persistent, 3 replicas differ. Collective."""
        row = torch.zeros(_NAME_BYTES + 1, dtype=torch.uint8)
        row[0] = kind
        text = where.encode()[:_NAME_BYTES]
        row[1 : 1 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        rows = self._gather(row)
        lines = []
        for rank, r in enumerate(rows.tolist()):
            if not r[0]:
                continue
            said = bytes(b for b in r[1:] if b).decode(errors="replace")
            what = {1: "transient (a second replay matches the first: the first pass was hit "
                       "once)",
                    2: "persistent (the second replay differs again: this rank keeps computing "
                       "different numbers; take its device out of service)",
                    3: "persistent (a reduced gradient, which no replay reproduces)"}[r[0]]  # fmt: skip
            lines.append(f"silent data corruption on rank {rank} at step {step}: {said} differs "
                         f"between {compared}; {what}")  # fmt: skip
            self.events.append({"rank": rank, "step": step, "where": said, "kind": what.split()[0]})
        if not lines:
            return
        if self.policy == "stop":
            raise SilentDataCorruption("; ".join(lines) + " (train.sdc_policy=stop)")
        self.skip = True
        self._zero_grad()  # harmless reduction and norm; the update is dropped
        if self.ctx.rank == 0:
            for line in lines:
                self.warn(line + f"; step {step}'s update skipped on every rank "
                          "(train.sdc_policy=skip)")  # fmt: skip

    # ---- RNG: the replay draws the first pass's dropout masks -----------------------------------
    def _rng_state(self):
        device = self.ctx.device
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.ctx.device)


def _differs(a: tuple[int, torch.Tensor], b: tuple[int, torch.Tensor]) -> int | None:
    """None when two passes agree; else the index of the first differing gradient (-1: only
    the loss differs)."""
    if a[1].shape != b[1].shape:  # (ZeRO-2/3: another number of launches)
        return min(len(a[1]), len(b[1]))
    diff = (a[1] != b[1]).any(dim=1).nonzero().flatten()
    if len(diff):
        return int(diff[0])
    return -1 if a[0] != b[0] else None
