"""Pipeline parallelism, part 2: one executor that runs any schedule written as data.

Notation: p pipeline ranks, m micro-batches, v model chunks per rank (virtual stages). A schedule
(megatiny/parallel/schedule_ir.py) is, for each rank, an ordered list of actions -- F, B, W, BW,
SEND, RECV naming micro-batch and virtual stage; `schedule_sim.simulate` prices it and proves it
free of deadlock before it runs. Every schedule computes the same gradient as running the m
micro-batches one after the other on one device:

    loss = (1/m) sum_i loss_i,        each backward starts from loss_i / m

- `gpipe`: all forwards, then all backwards. Holds m micro-batches of activations.
- `1f1b` (PipeDream-flush / Megatron 1F1B): p - r - 1 warm-up forwards, then one forward / one
  backward, then the remaining backwards. Holds at most p - r micro-batches.
- `interleaved` (Megatron's interleaved schedule): v chunks per rank; needs m % p == 0.
- `zb-h1`, `zb-h2`, `zb-v`, `dualpipev` (zero bubble; SPLIT_SCHEDULES): the backward split into
  B (input gradients) and W (weight gradients, deferred by the linears, the experts and the
  output layer: megatiny/split_backward.py); zb-v and dualpipev on the V placement.

The executor (`Executor.run`) walks this rank's list: a compute action runs the chunk
(`forward_step`, or autograd from the stage's output); consecutive SEND / RECV actions are posted
as one batch (`P2P.post`, batched isend/irecv as Megatron does); receives are waited for at once,
sends only before the next batch is posted (when done) and at the end. Data-parallel gradient
reduction (`grad_sync(is_last)`) is on for the last BW or, when the backward is split, the last W
of each chunk (of the rank, when its chunks share a parameter: a tied embedding under the V
placement); parameters whose gradient comes in B only are reduced by `finish_grad_sync`.

For the flight recorder every compute action labels the ops that follow with its micro-batch and
chunk (`collectives.set_labels`), and every batch names its messages (`recv_forward(mb 7)`).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatiny import split_backward
from megatiny.config.layout import SCHEDULES, SPLIT_SCHEDULES, V_SCHEDULES
from megatiny.parallel import collectives, schedule_ir
from megatiny.parallel.data_parallel import no_sync_unless
from megatiny.parallel.pipeline import P2P, forward_step, validate_pipeline
from megatiny.parallel.schedule_sim import simulate, simulate_forward

_MESSAGE_NAMES = {("SEND", False): "send_forward", ("RECV", False): "recv_forward",
                  ("SEND", True): "send_backward", ("RECV", True): "recv_backward"}  # fmt: skip


@functools.lru_cache(maxsize=64)
def checked_schedule(kind: str, p: int, m: int, v: int, forward_only: bool = False):
    """The IR of `kind`, simulated once with unit costs (raises ScheduleError naming the rank
    and action of a deadlock or a broken dependency, before any message is posted)."""
    if forward_only:
        sched = schedule_ir.forward_only(schedule_ir.placement_for(kind, p, v), p, m, kind)
        simulate_forward(sched)
    else:
        sched = schedule_ir.generate(kind, p, m, v)
        simulate(sched)
    return sched


class Executor:
    """Runs one rank's actions of a Schedule on its model chunks (see the module docstring)."""

    def __init__(self, sched, rank, chunks, batches, p2p, grad_sync, autocast=None, hook=None):
        self.sched, self.rank, self.chunks, self.batches = sched, rank, chunks, batches
        self.p2p, self.grad_sync, self.hook = p2p, grad_sync, hook
        self.autocast = autocast or contextlib.nullcontext
        self.m, self.stages = len(batches), sched.stages_of(rank)
        self.inputs, self.outputs, self.grads = {}, {}, {}  # by (mb, stage)
        self.received, self.to_send, self.queues = {}, {}, {}
        self.losses: list[torch.Tensor] = []
        self.in_flight = self.max_in_flight = 0  # chunk micro-batches between F and B
        self.count = {"B": [0] * len(chunks), "W": [0] * len(chunks)}
        ids = [{id(q) for q in c.parameters()} for c in chunks]
        self.shared = any(ids[i] & ids[j] for i in range(len(ids)) for j in range(i))
        self.sends: list = []

    def run(self, forward_only: bool = False):
        acts, k = self.sched.actions[self.rank], 0
        with split_backward.split_weight_grads(self.sched.splits_backward()):
            while k < len(acts):
                if acts[k].op in schedule_ir.COMPUTE:
                    self.compute(acts[k], forward_only)
                    k += 1
                    continue
                end = k
                while end < len(acts) and acts[end].op not in schedule_ir.COMPUTE:
                    end += 1
                self.exchange(acts[k:end])
                k = end
        for work, _ in self.sends:
            work.wait()
        return self

    def _last(self, op: str, c: int) -> bool:
        n = self.count[op]
        n[c] += 1
        return sum(n) == self.m * len(n) if self.shared else n[c] == self.m

    def compute(self, a, forward_only):
        c, key, s = self.sched.chunk_of(a.stage), (a.mb, a.stage), a.stage
        chunk, placement = self.chunks[c], self.sched.placement
        collectives.set_labels(mb=a.mb, chunk=c)
        if self.hook is not None:
            self.hook(a)
        if a.op == "F":
            x = None
            if s > 0:
                x = self.inputs.pop(key) if placement[s - 1] == self.rank else (
                    self.received.pop(("act", a.mb, s - 1)))  # fmt: skip
            with torch.set_grad_enabled(not forward_only), self.autocast():
                y = forward_step(chunk, x, self.batches[a.mb])
            if chunk.is_last_chunk:
                self.losses.append(y.detach())
                y = y / self.m
            elif placement[s + 1] == self.rank:  # the V's turn: stays on this rank
                self.inputs[(a.mb, s + 1)] = y.detach().requires_grad_(not forward_only)
            else:
                self.to_send[("act", a.mb, s)] = y
            if not forward_only:
                self.outputs[key] = (x, y)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return
        if a.op == "W":
            with self.grad_sync(self._last("W", c)):
                self.queues.pop(key).run()
            return
        x, y = self.outputs.pop(key)
        g = None
        if s < len(placement) - 1:
            g = self.grads.pop(key) if placement[s + 1] == self.rank else (
                self.received.pop(("grad", a.mb, s + 1)))  # fmt: skip
            g = g.to(y.dtype)
        queue = split_backward.WeightGradQueue()
        defer = (
            split_backward.defer_weight_grads(queue) if a.op == "B" else contextlib.nullcontext()
        )
        # Split: the gradients of B are not final (a tied weight, B in the embedding, W in the
        # head), so the data-parallel reduction waits for the last W (and finish_grad_sync).
        last = self._last("B", c) and a.op == "BW"
        with self.grad_sync(last), defer:
            torch.autograd.backward(y, grad_tensors=g)
        if a.op == "B":
            self.queues[key] = queue
        self.in_flight -= 1
        if s > 0:
            if placement[s - 1] == self.rank:
                self.grads[(a.mb, s - 1)] = x.grad
            else:
                self.to_send[("grad", a.mb, s)] = x.grad

    def exchange(self, group):
        """Post one batch of SEND / RECV actions in their order; wait for the receives."""
        self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]
        names, messages = [], []
        for a in group:
            names.append(f"{_MESSAGE_NAMES[(a.op, a.grad)]}(mb {a.mb})")
            tensor = self.to_send.pop(a.message()) if a.op == "SEND" else None
            messages.append(("send" if a.op == "SEND" else "recv", tensor, a.peer))
        collectives.set_labels(p2p=names)
        received, sends = self.p2p.post(messages)
        self.sends += sends
        for a in (a for a in group if a.op == "RECV"):
            t = received.pop(0)
            self.received[a.message()] = t.detach() if a.grad else t


class PipelineSchedule:
    """`schedule(micro_batches, ddp=None, forward_only=False)` -> mean loss on every pp rank.

    micro_batches: list of dicts with input_ids [b, s], labels [b, s] (and optional
    position_ids, loss_mask); every pp rank passes the same list (only the first and last stage
    read it). The returned loss is (1/m) sum_i loss_i, broadcast from the last stage.
    """

    def __init__(self, ctx, chunks, kind, shape, dtype=torch.float32):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {SCHEDULES}")
        n = len(chunks)
        if kind == "interleaved" and n < 2:
            raise ValueError("the interleaved schedule needs virtual_pipeline_size >= 2 chunks")
        if kind in V_SCHEDULES and ctx.pp_size > 1 and n != 2:
            raise ValueError(f"{kind} runs 2 chunks per rank in a V, got {n}")
        if kind not in ("interleaved",) + V_SCHEDULES and n != 1:
            raise ValueError(f"{kind!r} runs one chunk per rank; use 'interleaved' for {n}")
        if ctx.pp_size == 1:  # one stage: F then BW (or F, B, W) per micro-batch
            kind = "zb-h1" if kind in SPLIT_SCHEDULES else "1f1b"
        self.ctx, self.chunks, self.kind = ctx, chunks, kind
        self.p2p = P2P(ctx, shape, dtype)
        self.action_hook = None  # called with each compute action before it runs (benchmarks)
        want = schedule_ir.placement_for(kind, ctx.pp_size, n)
        stages = [getattr(c, "virtual_stage", 0) for c in chunks]
        if ctx.pp_size > 1 and stages != [s for s, r in enumerate(want) if r == ctx.pp_rank]:
            how = "placement='v'" if kind in V_SCHEDULES else "the default placement"
            raise ValueError(
                f"pipeline rank {ctx.pp_rank} holds virtual stages {stages}, but {kind!r} runs "
                f"{[s for s, r in enumerate(want) if r == ctx.pp_rank]} here; build the chunks "
                f"with build_pipeline(..., {how})"
            )
        if kind in SPLIT_SCHEDULES:
            split_backward.split_linears(chunks)

    def __call__(
        self, micro_batches, ddp=None, forward_only=False, grad_sync=None, autocast=None
    ) -> torch.Tensor:
        """Run forward (and backward) of all micro-batches; return the mean loss.

        Gradient reduction: `ddp` (a DistributedDataParallel: reduce only during the last
        backward of each chunk) or `grad_sync(is_last) -> context manager`. `autocast`: a
        callable returning the autocast context for the forward passes.
        """
        ctx, m, v = self.ctx, len(micro_batches), len(self.chunks)
        if self.kind == "interleaved" and not forward_only:
            validate_pipeline(ctx.pp_size * v, ctx.pp_size, v, num_microbatches=m)
        if grad_sync is None:
            grad_sync = functools.partial(no_sync_unless, ddp)
        sched = checked_schedule(self.kind, ctx.pp_size, m, v, forward_only)
        run = Executor(sched, ctx.pp_rank, self.chunks, micro_batches, self.p2p, grad_sync,
                       autocast, self.action_hook).run(forward_only)  # fmt: skip
        collectives.set_labels(mb=None, chunk=None, p2p=None)
        self.max_in_flight = run.max_in_flight  # activation memory, in chunk micro-batches
        device = self.p2p.device
        loss = torch.stack(run.losses).mean() if run.losses else torch.zeros((), device=device)
        loss = loss.to(torch.float32)
        if ctx.pp_size > 1:
            last = schedule_ir.placement_for(self.kind, ctx.pp_size, v)[-1]
            collectives.broadcast(loss, ctx.pp_ranks[last], ctx.pp_group)
        return loss


def build_schedule(
    ctx,
    chunks,
    micro_batch_size: int,
    seq_length: int,
    schedule: str | None = None,
    sequence_parallel: bool = False,
    dtype=torch.float32,
) -> PipelineSchedule:
    """The schedule for these chunks: `schedule` (SCHEDULES; None or "auto": interleaved when
    there are several chunks, else 1F1B).

    The activation shape is [micro_batch_size, seq_length / (tp if sequence_parallel), d_model].
    """
    d_model = chunks[0].config.d_model
    seq = seq_length // (ctx.tp_size if sequence_parallel else 1)
    seq //= getattr(ctx, "cp_size", 1)
    kind = schedule if schedule not in (None, "auto") else (
        "interleaved" if len(chunks) > 1 else "1f1b")  # fmt: skip
    return PipelineSchedule(ctx, chunks, kind, (micro_batch_size, seq, d_model), dtype)


def as_trainer_schedule(schedule: PipelineSchedule):
    """Adapt to the training loop's `schedule(model, micro_batches, *, loss_fn, grad_sync,
    autocast)` signature (the model and loss live in the chunks)."""

    def run(
        model, micro_batches, *, loss_fn=None, grad_sync=None, autocast=None, forward_only=False
    ):
        return schedule(  # on the device: the trainer reads it back once per step
            micro_batches, forward_only=forward_only, grad_sync=grad_sync, autocast=autocast
        )

    return run
