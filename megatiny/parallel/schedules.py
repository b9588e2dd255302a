"""Pipeline parallelism, part 2: the schedules, each a plain loop over micro-batches.

Notation: p pipeline ranks, m micro-batches, v model chunks per rank (virtual stages), F_i / B_i
the forward / backward of micro-batch i on this stage. Every schedule computes the same gradient
as running the m micro-batches one after the other on one device:

    loss = (1/m) sum_i loss_i,        each backward starts from loss_i / m

and the bubble (idle) fraction of a stage is about (p - 1) / m for GPipe and 1F1B, and
(p - 1) / (v m) for interleaved 1F1B (see benchmarks/pipeline_bubble.py).

- `no_pipelining` (p = 1): F_i B_i for i = 1..m.
- `gpipe`: all forwards, then all backwards. Holds m micro-batches of activations.
- `one_f_one_b` (PipeDream-flush / Megatron 1F1B): rank r runs p - r - 1 warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. Holds at most
  p - r micro-batches of activations.
- `interleaved_one_f_one_b` (Megatron's interleaved schedule): the same with v chunks per rank,
  visited in groups of p micro-batches; needs m % p == 0.

Communication happens in lock-step exchanges (`P2P.communicate`), so every send meets the
matching receive posted in the same exchange on the neighbour. Data-parallel gradient reduction
(`ddp`) is enabled only for the last backward of each chunk (gradient accumulation).

For the flight recorder, every forward / backward labels the ops that follow with its
micro-batch, chunk and pass (`collectives.set_labels`), and every exchange names its messages
(`recv_forward(mb 7)`, ...; with several chunks the micro-batch count is the chunk's).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatiny.parallel import collectives
from megatiny.parallel.data_parallel import no_sync_unless
from megatiny.parallel.pipeline import P2P, forward_step, validate_pipeline

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class _Steps:
    """Forward / backward of one chunk on one micro-batch, with the bookkeeping all schedules share."""

    def __init__(self, chunks, batches, grad_sync, forward_only, autocast=None):
        self.chunks, self.batches, self.grad_sync = chunks, batches, grad_sync
        self.forward_only = forward_only
        self.autocast = autocast or contextlib.nullcontext
        self.m = len(batches)
        self.n_forward = [0] * len(chunks)
        self.n_backward = [0] * len(chunks)
        self.losses: list[torch.Tensor] = []
        self.max_in_flight = 0  # most chunk forwards whose backward had not run yet
        collectives.set_labels(mb=None, chunk=None, next_fwd=0, next_bwd=0)

    def forward(self, c: int, input_tensor):
        i = self.n_forward[c]
        self.n_forward[c] += 1
        collectives.set_labels(mb=i, chunk=c, next_fwd=i + 1, next_bwd=self.n_backward[c])
        if not self.forward_only:
            in_flight = sum(self.n_forward) - sum(self.n_backward)
            self.max_in_flight = max(self.max_in_flight, in_flight)
        with torch.set_grad_enabled(not self.forward_only), self.autocast():
            out = forward_step(self.chunks[c], input_tensor, self.batches[i])
        if self.chunks[c].is_last_chunk:
            self.losses.append(out.detach())
            out = out / self.m
        return out

    def backward(self, c: int, input_tensor, output, output_grad):
        """Backprop `output` (loss_i / m on the last stage); return d loss / d input_tensor."""
        collectives.set_labels(mb=self.n_backward[c], chunk=c, next_fwd=self.n_forward[c],
                               next_bwd=self.n_backward[c] + 1)  # fmt: skip
        self.n_backward[c] += 1
        with self.grad_sync(self.n_backward[c] == self.m):
            if output_grad is not None:
                output_grad = output_grad.to(output.dtype)
            torch.autograd.backward(output, grad_tensors=output_grad)
        return None if input_tensor is None else input_tensor.grad


def no_pipelining(chunks, batches, p2p, grad_sync, forward_only=False, autocast=None):
    steps = _Steps(chunks, batches, grad_sync, forward_only, autocast)
    for _ in range(len(batches)):
        loss = steps.forward(0, None)
        if not forward_only:
            steps.backward(0, None, loss, None)
    return steps


def gpipe(chunks, batches, p2p: P2P, grad_sync, forward_only=False, autocast=None):
    """All forwards (F_1 .. F_m), then all backwards (B_1 .. B_m)."""
    steps, chunk = _Steps(chunks, batches, grad_sync, forward_only, autocast), chunks[0]
    saved = []
    for _ in range(steps.m):
        x, _ = p2p.communicate(recv_prev=not chunk.is_first_chunk)
        y = steps.forward(0, x)
        p2p.communicate(send_next=None if chunk.is_last_chunk else y)
        saved.append((x, y))
    if forward_only:
        return steps
    for x, y in saved:
        _, g = p2p.communicate(recv_next=not chunk.is_last_chunk)
        gx = steps.backward(0, x, y, g)
        p2p.communicate(send_prev=None if chunk.is_first_chunk else gx)
    return steps


def one_f_one_b(chunks, batches, p2p: P2P, grad_sync, forward_only=False, autocast=None):
    """Warm-up forwards, steady 1F1B, cool-down backwards (Megatron's non-interleaved schedule)."""
    steps, chunk = _Steps(chunks, batches, grad_sync, forward_only, autocast), chunks[0]
    m, rank, pp = steps.m, p2p.rank, p2p.size
    has_prev, has_next = not chunk.is_first_chunk, not chunk.is_last_chunk
    warmup = m if forward_only else min(pp - rank - 1, m)
    steady = m - warmup
    saved = []

    for _ in range(warmup):
        x, _ = p2p.communicate(recv_prev=has_prev)
        y = steps.forward(0, x)
        p2p.communicate(send_next=y if has_next else None)
        if not forward_only:
            saved.append((x, y))

    x = p2p.communicate(recv_prev=has_prev)[0] if steady else None
    for i in range(steady):
        last_iteration = i == steady - 1
        y = steps.forward(0, x)
        saved.append((x, y))
        # Send F_i's output and, in the same exchange, get the gradient for the oldest F.
        _, g = p2p.communicate(send_next=y if has_next else None, recv_next=has_next)
        x_old, y_old = saved.pop(0)
        gx = steps.backward(0, x_old, y_old, g)
        x, _ = p2p.communicate(
            send_prev=gx if has_prev else None, recv_prev=has_prev and not last_iteration
        )

    for _ in range(0 if forward_only else warmup):
        _, g = p2p.communicate(recv_next=has_next)
        x_old, y_old = saved.pop(0)
        gx = steps.backward(0, x_old, y_old, g)
        p2p.communicate(send_prev=gx if has_prev else None)
    return steps


def interleaved_one_f_one_b(
    chunks, batches, p2p: P2P, grad_sync, forward_only=False, autocast=None
):
    """Megatron's interleaved 1F1B: v chunks per rank, micro-batches in groups of p per chunk.

    Virtual step k (0 <= k < v m) runs chunk `chunk_id(k)` on micro-batch
    (k // (p v)) * p + k % p of that chunk; backward visits chunks in reverse.
    """
    v, m = len(chunks), len(batches)
    rank, pp = p2p.rank, p2p.size
    validate_pipeline(pp * v, pp, v, num_microbatches=m)
    steps = _Steps(chunks, batches, grad_sync, forward_only, autocast)
    total = v * m
    all_warmup = m == pp
    if forward_only or all_warmup:
        warmup = total
    else:
        warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    steady = total - warmup
    first_rank, last_rank = rank == 0, rank == pp - 1

    def chunk_id(k: int, forward: bool) -> int:
        c = (k % (pp * v)) // pp
        return c if forward else v - 1 - c

    inputs = [[] for _ in range(v)]
    outputs = [[] for _ in range(v)]
    out_grads = [[] for _ in range(v)]

    def forward_k(k):
        c = chunk_id(k, True)
        if chunks[c].is_first_chunk and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        y = steps.forward(c, inputs[c][-1])
        outputs[c].append(y)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return None if chunks[c].is_last_chunk else y

    def backward_k(k):
        c = chunk_id(k, False)
        if chunks[c].is_last_chunk and not out_grads[c]:
            out_grads[c].append(None)
        x, y, g = inputs[c].pop(0), outputs[c].pop(0), out_grads[c].pop(0)
        gx = steps.backward(c, x, y, g)
        return None if chunks[c].is_first_chunk else gx

    inputs[0].append(p2p.communicate(recv_prev=not first_rank)[0])
    for k in range(warmup):
        y = forward_k(k)
        next_c = chunk_id(k + 1, True)
        recv_prev = not (first_rank and next_c == 0) and k != total - 1
        if k == warmup - 1 and not forward_only and not all_warmup:
            x, g = p2p.communicate(send_next=y, recv_prev=recv_prev, recv_next=not last_rank)
            out_grads[v - 1].append(g)
        else:
            x, _ = p2p.communicate(send_next=y, recv_prev=recv_prev)
        inputs[next_c].append(x)

    for k in range(steady):
        fk, bk = k + warmup, k
        y = forward_k(fk)
        gx = backward_k(bk)
        # Which chunk the tensors arriving now belong to. The first rank receives from the last
        # rank, which is p - 1 virtual steps behind it (and symmetrically in backward).
        recv_prev = True
        if first_rank:
            next_fc = chunk_id(fk - (pp - 1), True)
            recv_prev = next_fc != v - 1
            next_fc += 1
        else:
            next_fc = chunk_id(fk + 1, True)
        recv_next = True
        if last_rank:
            next_bc = chunk_id(bk - (pp - 1), False)
            recv_next = next_bc != 0
            next_bc -= 1
        else:
            next_bc = chunk_id(bk + 1, False)
        if k == steady - 1:
            recv_prev = False
        x, g = p2p.communicate(send_next=y, send_prev=gx, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_fc].append(x)
        if recv_next:
            out_grads[next_bc].append(g)

    if not forward_only:
        if all_warmup:
            out_grads[v - 1].append(p2p.communicate(recv_next=not last_rank)[1])
        for k in range(steady, total):
            gx = backward_k(k)
            next_bc = chunk_id(k + 1, False)
            recv_next = not (last_rank and next_bc == v - 1) and k != total - 1
            _, g = p2p.communicate(send_prev=gx, recv_next=recv_next)
            out_grads[next_bc].append(g)
    return steps


def forward_only_in_order(chunks, batches, p2p: P2P, grad_sync, forward_only=True, autocast=None):
    """Evaluation for any m and v: each micro-batch walks the virtual stages 0 .. pv-1 in order.

    No pipelining (evaluation is a small part of a run), but no constraint on m either.
    """
    steps = _Steps(chunks, batches, grad_sync, True, autocast)
    v, pp, rank = len(chunks), p2p.size, p2p.rank
    for _ in batches:
        for s in range(rank, pp * v, pp):  # my virtual stages, chunk s // pp
            x = p2p.communicate(recv_prev=True)[0] if s > 0 else None
            y = steps.forward(s // pp, x)
            if s < pp * v - 1:
                p2p.communicate(send_next=y)
    return steps


class _LabeledP2P:
    """The schedule's P2P, naming each exchange's messages for the flight recorder, in the order
    P2P posts them (send_next, recv_prev, send_prev, recv_next)."""

    def __init__(self, p2p: P2P):
        self._p2p = p2p
        self.rank, self.size, self.device = p2p.rank, p2p.size, p2p.device

    def communicate(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        now = collectives.labels()
        fwd, bwd = now.get("next_fwd", 0), now.get("next_bwd", 0)
        names = [name for name, on in (
            (f"send_forward(mb {fwd - 1})", send_next is not None),
            (f"recv_forward(mb {fwd})", recv_prev),
            (f"send_backward(mb {bwd - 1})", send_prev is not None),
            (f"recv_backward(mb {bwd})", recv_next),
        ) if on]  # fmt: skip
        collectives.set_labels(p2p=names)
        return self._p2p.communicate(send_next, send_prev, recv_prev, recv_next)


class PipelineSchedule:
    """`schedule(micro_batches, ddp=None, forward_only=False)` -> mean loss on every pp rank.

    micro_batches: list of dicts with input_ids [b, s], labels [b, s] (and optional
    position_ids, loss_mask); every pp rank passes the same list (only the first and last stage
    read it). The returned loss is (1/m) sum_i loss_i, broadcast from the last stage.
    """

    def __init__(self, ctx, chunks, kind, shape, dtype=torch.float32):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {SCHEDULES}")
        if kind == "interleaved" and len(chunks) < 2:
            raise ValueError("the interleaved schedule needs virtual_pipeline_size >= 2 chunks")
        if kind != "interleaved" and len(chunks) != 1:
            raise ValueError(
                f"{kind!r} runs one chunk per rank; use 'interleaved' for {len(chunks)}"
            )
        self.ctx, self.chunks, self.kind = ctx, chunks, kind
        self.p2p = P2P(ctx, shape, dtype)
        if ctx.pp_size == 1:
            self.fn = no_pipelining
        else:
            self.fn = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_one_f_one_b}[
                kind
            ]

    def __call__(
        self, micro_batches, ddp=None, forward_only=False, grad_sync=None, autocast=None
    ) -> torch.Tensor:
        """Run forward (and backward) of all micro-batches; return the mean loss.

        Gradient reduction: `ddp` (a DistributedDataParallel: reduce only during the last
        backward of each chunk) or `grad_sync(is_last) -> context manager`. `autocast`: a
        callable returning the autocast context for the forward passes.
        """
        fn = self.fn
        if forward_only and self.kind == "interleaved":
            fn = forward_only_in_order
        elif self.kind == "interleaved":
            validate_pipeline(
                self.ctx.pp_size * len(self.chunks),
                self.ctx.pp_size,
                len(self.chunks),
                num_microbatches=len(micro_batches),
            )
        if grad_sync is None:
            grad_sync = functools.partial(no_sync_unless, ddp)
        p2p = _LabeledP2P(self.p2p)
        steps = fn(self.chunks, micro_batches, p2p, grad_sync, forward_only, autocast)
        losses = steps.losses
        self.max_in_flight = steps.max_in_flight  # activation memory, in chunk micro-batches
        ctx = self.ctx
        device = self.p2p.device
        loss = torch.stack(losses).mean() if losses else torch.zeros((), device=device)
        loss = loss.to(torch.float32)
        if ctx.pp_size > 1:
            collectives.broadcast(loss, ctx.pp_ranks[-1], ctx.pp_group)
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
    """The schedule for these chunks: interleaved when there are several, else 1F1B (or `schedule`).

    The activation shape is [micro_batch_size, seq_length / (tp if sequence_parallel), d_model].
    """
    d_model = chunks[0].config.d_model
    seq = seq_length // (ctx.tp_size if sequence_parallel else 1)
    seq //= getattr(ctx, "cp_size", 1)
    kind = schedule or ("interleaved" if len(chunks) > 1 else "1f1b")
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
