"""The dry run: the real training code for one representative rank of each pipeline stage, on the
meta device under torch's fake process group of the full world size.

For pipeline stage r the child process joins a fake group as global rank (tp=0, cp=0, dp=0, pp=r),
builds the `ParallelContext`, the model (`megatiny.training.step.build_trainer`: meta GPT,
keep_stages, parallelize, build_pipeline; DDP; AdamW or ZeRO-1), the pipeline schedule
(`build_schedule`), and runs training steps: the schedule over micro-batches, the gradient sync,
the tied-embedding sync, clipping and the optimizer step. Meta tensors carry shapes and dtypes
only, so a 7B model costs no memory and no FLOPs; every collective is issued through
`megatiny.parallel.collectives` and summed by the `CommTracer`, and activations are counted by
the saved-tensor hooks of `megatiny.training.memory` — the same instruments a real run uses.

Scaling to the step: one step runs m micro-batches. The dry run runs the schedule twice, with m1
and m2 > m1 micro-batches (m1 = 1, or p for the interleaved schedule; m2 = m1 + 1, or m1 + p);
every quantity of a step is affine in m (a + b m: TP collectives and p2p per micro-batch, the
DP reduction and optimizer once), so the two runs give it exactly at the real m. Memory per
micro-batch does not depend on m; micro-batches in flight come from `memory.in_flight`.

Substitutions make meta behave like a device (only inside the child process; attention and
checkpointing through the model's explicit hook, `megatiny.model.RUNTIME`):
- weights are never generated: the GPT's `initial_value` returns meta tensors of the shape;
- attention runs the flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, which
  saves q, k, v, out and the log-sum-exp, as flash attention on a GPU and SDPA on CPU tensors
  do): on meta tensors SDPA would otherwise take the math path and save the s x s scores.
bf16 runs (`train.precision=bf16`) use `opcount.MetaAutocast`, which applies CUDA autocast's
rules (matmuls and attention in bf16, the fp32 list in fp32) because torch has no meta autocast.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import torch
import torch.distributed as dist


def _flash_sdpa(real):
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):  # fmt: skip
        if q.is_meta and attn_mask is None:
            from megatiny.plan.opcount import MetaAutocast

            if MetaAutocast.active:
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return op(q, k, v, dropout_p, is_causal, scale=scale)[0]
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)  # fmt: skip

    return sdpa


def _autocast_checkpoint(real):
    """torch.utils.checkpoint re-enters the forward's autocast state for the recomputation; do
    the same for MetaAutocast."""

    def checkpoint(fn, *args, **kwargs):
        from megatiny.plan.opcount import MetaAutocast

        if not MetaAutocast.active:
            return real(fn, *args, **kwargs)

        def under_autocast(*a, **k):
            with MetaAutocast():
                return fn(*a, **k)

        return real(under_autocast, *args, **kwargs)

    return checkpoint


class _MetaTask:
    """The pretraining Task with a meta model (no weights generated) and no data."""

    def __init__(self):
        from megatiny.training.step import Task

        self.base = Task()

    def build_model(self, cfg, ctx):
        from megatiny.model import GPT
        from megatiny.training.step import shard_model

        torch.manual_seed(cfg.train.seed)
        with torch.device("meta"):
            model = GPT(cfg.model)
        model.initial_value = lambda name, shape, dtype=torch.float32: torch.empty(
            shape, dtype=dtype, device="meta"
        )
        return shard_model(model, cfg, ctx)

    def build_data(self, cfg, ctx, dp):
        return None, None

    def loss_fn(self, model, batch):
        return self.base.loss_fn(model, batch)


def _micro_batches(cfg, n: int) -> list[dict]:
    b, s = cfg.train.micro_batch_size, cfg.data.seq_length
    ids = torch.zeros(b, s, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids, "loss_mask": torch.ones(b, s, device="meta")}
    if cfg.parallel.cp > 1:  # the representative rank (cp rank 0) holds its s / cp tokens
        from megatiny.parallel.context_parallel import split_batch

        batch = split_batch(batch, 0, cfg.parallel.cp, zigzag=cfg.parallel.cp_mode == "ring")
    return [batch] * n


def _run_stage(cfg, world_size: int, pp_rank: int) -> dict:
    """In the child: everything the plan needs from pipeline stage `pp_rank`."""

    import megatiny.model as model_module
    from megatiny.config.layout import SPLIT_SCHEDULES
    from megatiny.parallel import collectives
    from megatiny.parallel.context import ParallelContext
    from megatiny.parallel.grid import build_grid
    from megatiny.parallel.pipeline import (
        build_pipeline_chunks,
        replicated_parameter_ids,
        sync_tied_grads,
    )
    from megatiny.parallel.schedules import build_schedule
    from megatiny.parallel.tracer import CommTracer
    from megatiny.parallel.zero import finish_param_sync
    from megatiny.plan.efficiency import ShapeCounter as OpCounter  # + GEMM/attention shapes
    from megatiny.plan.fake_group import init_fake_process_group
    from megatiny.plan.opcount import MetaAutocast
    from megatiny.training import memory
    from megatiny.training.optim import clip_grad_norm_
    from megatiny.training.step import build_trainer

    model_module.RUNTIME.update(  # this child process only: the model's explicit hook
        sdpa=_flash_sdpa(model_module.RUNTIME["sdpa"]),
        checkpoint=_autocast_checkpoint(model_module.RUNTIME["checkpoint"]),
    )
    p = cfg.parallel
    grid = build_grid(world_size, tp=p.tp, pp=p.pp, cp=p.cp, dp=p.dp)
    rank = grid.rank_of(pp=pp_rank)
    init_fake_process_group(rank, world_size)
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, cp=p.cp, dp=grid.dp, device="meta")
    trainer = build_trainer(cfg, ctx, task=_MetaTask())
    model, ddp, optimizer = trainer.model, trainer.ddp, trainer.optimizer
    chunks = getattr(model, "chunks", None) or build_pipeline_chunks(model, ctx)
    schedule = build_schedule(ctx, chunks, cfg.train.micro_batch_size, cfg.data.seq_length,
                              schedule=p.pipeline_schedule,
                              sequence_parallel=p.sequence_parallel)  # fmt: skip
    bf16 = cfg.train.precision == "bf16"
    autocast = MetaAutocast if bf16 else None

    def step(m, counter):
        optimizer.zero_grad(set_to_none=ddp is None)
        if ddp is not None:
            ddp.zero_grad()
        counter.phase = "micro_batches"
        schedule(_micro_batches(cfg, m), ddp=ddp, autocast=autocast)
        counter.phase = "step"
        if ddp is not None:
            ddp.finish_grad_sync()
        skip = None
        if ctx.pp_size > 1:
            sync_tied_grads(model.chunks, ctx, ddp)
            skip = replicated_parameter_ids(model.chunks, ctx)
        _scalar_collectives(ctx)
        if hasattr(optimizer, "clip_grad_norm"):
            optimizer.clip_grad_norm(cfg.train.grad_clip, ctx, skip)
        else:
            clip_grad_norm_(model, cfg.train.grad_clip, ctx, skip)
        finite = torch.ones((), device=ctx.device)
        collectives.all_reduce(finite, op=dist.ReduceOp.MIN)
        optimizer.step()
        finish_param_sync(optimizer)  # gathers left in flight: count them in this step

    v = len(chunks)
    m1 = ctx.pp_size if v > 1 else 1
    m2 = m1 + (ctx.pp_size if v > 1 else 1)
    runs, transient = [], 0
    for m in (m1, m2):
        with CommTracer(rank) as tracer, OpCounter() as counter, InFlight(counter) as flight:
            step(m, counter)
        runs.append({"m": m, "comm": _comm_rows(tracer), "ops": counter.totals(),
                     "in_flight": flight.rows()})  # fmt: skip
        transient = max(transient, counter.max_backward_bytes)
    shape = memory.stage_message_shape(cfg, ctx)
    batch = _micro_batches(cfg, 1)[0]
    split = ctx.pp_size > 1 and p.pipeline_schedule in SPLIT_SCHEDULES
    per_chunk, stash = memory.chunk_memory_bytes(chunks, batch, shape, autocast=autocast or _null,
                                                 split=split)  # fmt: skip
    return {
        "pp_rank": pp_rank,
        "rank": rank,
        "state": memory.state_bytes(model, optimizer, ddp),
        "activation_bytes_per_chunk": per_chunk,
        "stash_bytes_per_chunk": stash,  # split backward: what W holds from B on
        "runs": runs,
        "transient_bytes": transient,
        # ZeRO-2/3: bucket buffers in flight and gathered blocks (megatiny/parallel/fsdp.py)
        # ZeRO-2/3: the most bytes of gathered blocks and gradient buckets held at once during
        # the steps above (megatiny/parallel/fsdp.py counts them as it allocates and frees)
        "zero_transient_bytes": getattr(ddp, "held_peak", 0),
        "chunks": v,
        "layers": sum(len(c.blocks) for c in chunks),
        "group_sizes": {
            "tp": ctx.tp_size,
            "pp": ctx.pp_size,
            "dp": ctx.dp_size,
            "cp": ctx.cp_size,
            "dp_cp": ctx.dp_size * ctx.cp_size,
            "mp": ctx.tp_size * ctx.pp_size * ctx.cp_size,
            "embedding": 2,
            "world": world_size,
        },  # fmt: skip
        # every group's ranks: the time model plans a group inside one node on NVLink
        "ranks": {
            g: getattr(ctx, f"{g}_ranks")
            for g in ("tp", "pp", "dp", "cp", "dp_cp", "mp", "embedding")
        },  # fmt: skip
    }


def _scalar_collectives(ctx) -> None:
    """What `Trainer.train_step` adds to the schedule, which the dry run cannot call (it reads the
    loss on the host): the loss broadcast from the last stage and its mean over dp (the NaN
    verdict's all-reduce follows the clipping, in `step`). tests/test_plan.py checks that the
    plan's bytes equal the tracer's in a real `train_step`, so a drift here fails there."""
    from megatiny.parallel import collectives

    loss = torch.zeros((), device=ctx.device)
    if ctx.pp_size > 1:
        collectives.broadcast(loss, ctx.pp_ranks[-1], ctx.pp_group)
    if ctx.dp_size > 1:
        collectives.all_reduce(loss, ctx.dp_group)


def _null():
    import contextlib

    return contextlib.nullcontext()


class InFlight:
    """For every collective: the GEMM and attention FLOPs this rank issues between posting it and
    its completion (`wait()` of an async op; nothing for a blocking one) — the compute it can
    hide behind. E.g. the sequence-parallel linear's backward re-gather of X overlaps the dX
    GEMM, and its reduce-scatter of dX the dA GEMM. Rows {group, op, bytes, matmul_flops,
    attention_flops, calls}, one per distinct (group, op, bytes, window)."""

    def __init__(self, counter):
        self.counter, self.open, self.counts = counter, {}, {}

    def _flops(self) -> tuple[float, float]:
        rows = self.counter.counts.values()
        return (sum(r["matmul_flops"] for r in rows), sum(r["attention_flops"] for r in rows))

    def _start(self, event) -> None:
        self.open[event.seq] = self._flops()

    def _end(self, event) -> None:
        start = self.open.pop(event.seq, None)
        if start is None or event.op == "barrier":
            return
        mm, at = (b - a for a, b in zip(start, self._flops(), strict=True))
        key = (event.group, event.op, event.bytes, mm, at)
        self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self):
        from megatiny.parallel import collectives

        self._removes = (collectives.add_start_observer(self._start),
                         collectives.add_observer(self._end))  # fmt: skip
        return self

    def __exit__(self, *exc):
        for remove in self._removes:
            remove()
        return False

    def rows(self) -> list[dict]:
        return [
            {"group": g, "op": op, "bytes": b, "matmul_flops": mm, "attention_flops": at,
             "calls": n}
            for (g, op, b, mm, at), n in sorted(self.counts.items())
        ]  # fmt: skip


def _comm_rows(tracer) -> list[dict]:
    return [
        {k: r[k] for k in ("group", "op", "calls", "bytes")}
        for r in tracer.rows()
        if r["op"] != "barrier"
    ]


def _child(queue, cfg, world_size, pp_rank):
    try:
        os.environ.pop("MEGATINY_CHECK_DEVICES", None)
        torch.set_num_threads(1)
        queue.put(("ok", _run_stage(cfg, world_size, pp_rank)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def representative_stages(pp: int) -> list[int]:
    """The stages the dry run measures: the first, one middle and the last. Middle stages
    (1 .. p-2) hold the same modules (blocks only, evenly split) and send the same messages; they
    differ only in their micro-batches in flight, which `memory.in_flight` gives per stage."""
    return sorted({0, min(1, pp - 1), pp - 1})


def dry_run(cfg, world_size: int, stages: list[int] | None = None, parallel: int = 2) -> list[dict]:
    """Run `_run_stage` for the given pipeline stages (default: every stage, the middle ones
    measured once) in forked processes, `parallel` at a time, and return one result per stage
    in stage order. The fake default group never touches this process."""
    pp = cfg.parallel.pp
    wanted = list(range(pp)) if stages is None else stages
    measured = representative_stages(pp) if stages is None else wanted
    ctx = mp.get_context("fork")
    results, pending = {}, list(measured)
    while pending:
        batch, pending = pending[:parallel], pending[parallel:]
        procs = []
        for r in batch:
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(queue, cfg, world_size, r))
            proc.start()
            procs.append((r, queue, proc))
        for r, queue, proc in procs:
            kind, value = queue.get()
            proc.join()
            if kind == "error":
                raise RuntimeError(f"dry run of pipeline stage {r} failed: {value}")
            results[r] = value
    out = []
    for r in wanted:
        if r in results:
            out.append(results[r])
        else:  # a middle stage: stage 1's measurement, its own coordinates
            stage = dict(results[1], pp_rank=r, measured_as=1)
            out.append(stage)
    return out
