"""One rank's training step and how it is built (`build_trainer`); the loop, checkpoints and
the command line are in megatiny/training/loop.py.

One optimizer step (`train_step`):

    micro_batches = the dp rank's share of the global batch, split into `accumulation` pieces
    loss          = schedule(model, micro_batches)     forward + backward of every micro-batch,
                                                       each backward scaled by 1/accumulation
    grads         averaged over the dp (x cp) group (bucketed, overlapped: DistributedDataParallel)
    grad_norm     = the global norm over TP / PP shards, replicated parameters counted once
    clip, AdamW step, lr schedule step

so global batch = micro_batch_size x accumulation x dp and the update equals that of one device
seeing the whole global batch. With context parallelism (cp > 1) every cp rank of a dp rank reads
the same samples and keeps its tokens of them (`ContextParallelSamples`, with their global
positions); the loss is the mean over the whole sequences on every cp rank
(megatiny/parallel/context_parallel.py). `schedule` is a function; the default runs the
micro-batches one after the other on a single pipeline stage (pipeline schedules plug in with the
same signature).

What is trained is a `Task`: its model (this rank's shard), its train / valid datasets, its
micro-batch loss and its evaluation. The default task is causal-LM pretraining on `cfg.data`;
fine-tuning (megatiny/finetune/tasks.py) supplies a pretrained body with its head, its rows and
its evaluation, and runs on the same Trainer, every layout, checkpoint and metric included.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatiny.config import Config, ConfigError
from megatiny.config.layout import V_SCHEDULES, pipeline_micro_batches
from megatiny.moe import set_aux_loss_scale
from megatiny.parallel import collectives


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; `train.nan_policy` decides between stopping and skipping."""


# ---- micro-batches and the schedule -----------------------------------------------------------


def micro_batch_indices(consumed: int, micro: int, dp_rank: int, dp_size: int, index: int):
    """Global sample indices of micro-batch `index` of the step that starts at sample `consumed`.

    Megatron's pretraining sampler order: the step's samples are consumed in slabs of
    micro x dp consecutive indices; dp rank d takes the d-th micro-sized slice of each slab.
    """
    start = consumed + index * micro * dp_size + dp_rank * micro
    return range(start, start + micro)


def collate(dataset, indices, device) -> dict[str, torch.Tensor]:
    """A micro-batch of samples. position_ids are kept only when a dataset gives them for a
    reason (a context-parallel rank's global positions: `ContextParallelSamples`); one row
    [1, s] when every sample has the same."""
    from megatiny.parallel.context_parallel import ContextParallelSamples

    samples = [dataset[i % len(dataset)] for i in indices]
    batch = {k: torch.stack([s[k] for s in samples]).to(device) for k in ("input_ids", "labels")}
    batch["loss_mask"] = torch.stack([s["loss_mask"] for s in samples]).float().to(device)
    if isinstance(dataset, ContextParallelSamples):
        positions = torch.stack([s["position_ids"] for s in samples])
        if bool((positions == positions[:1]).all()):  # CPU tensors: no device sync
            positions = positions[:1]
        batch["position_ids"] = positions.to(device)
    return batch


def compute_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch (labels already shifted); with context
    parallelism the mean over the whole sequences, on every cp rank."""
    from megatiny.parallel.context_parallel import context_parallel_loss, cp_group_of

    loss = model(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                 position_ids=batch.get("position_ids"))  # fmt: skip
    return context_parallel_loss(loss, batch["labels"], batch["loss_mask"], cp_group_of(model))


def forward_backward_no_pipelining(model, micro_batches, *, loss_fn=compute_loss, grad_sync=None,
                                   autocast=contextlib.nullcontext) -> torch.Tensor:  # fmt: skip
    """Forward + backward each micro-batch in turn; gradients accumulate in `.grad`.

    Returns the mean micro-batch loss (detached). `grad_sync(is_last)` returns a context that
    suppresses (False) or allows (True) the DP gradient reduction during that backward.
    """
    n = len(micro_batches)
    total = None  # stays on the device: no host sync per micro-batch
    for i, batch in enumerate(micro_batches):
        sync = grad_sync(i == n - 1) if grad_sync is not None else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = loss_fn(model, batch)
            (loss / n).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    return total / n


class Task:
    """What a training task supplies to the Trainer. This base class is pretraining; a task
    overrides what differs (megatiny/finetune/tasks.py overrides all four).

    - `build_model(cfg, ctx)`: this rank's model (a single-device model goes through
      `shard_model`, so every tp / pp layout applies); the last stage computes the loss with
      `model.head_loss`, so a task's head is its `model.output` module.
    - `build_data(cfg, ctx, dp)`: (train, valid) datasets of {input_ids, labels, loss_mask}
      samples of `cfg.data.seq_length` tokens, indexed by global sample number (`valid` None:
      no evaluation).
    - `loss_fn(model, batch)`: the mean loss of one micro-batch without pipelining.
    - `evaluate(trainer)`: a dict with at least `loss`.
    - `checkpoint_meta()` / `check_resume(saved)`: what a resumed run must share with the run
      that wrote the checkpoint, beyond the model's shapes (fine-tuning: the task and pooling).
    """

    def build_model(self, cfg: Config, ctx) -> torch.nn.Module:
        return build_model(cfg, ctx)

    def build_data(self, cfg: Config, ctx, dp: int):
        from megatiny.training.data import build_data

        return build_data(cfg, ctx, dp)

    def loss_fn(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return compute_loss(model, batch)

    def evaluate(self, trainer: Trainer) -> dict:
        return trainer.evaluate_iters()

    def checkpoint_meta(self) -> dict:
        """JSON this task stores in every checkpoint (`task` in its metadata): the set-up a
        resumed run must share. Pretraining has none beyond the model config."""
        return {}

    def check_resume(self, saved: dict) -> None:
        """Raise, saying what to change, when a checkpoint's `checkpoint_meta` (`saved`) was
        written by another set-up than this task's."""


@dataclass
class Trainer:
    """Everything one rank needs to run steps; built by `build_trainer`."""

    cfg: Config
    ctx: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_data: object
    valid_data: object
    accumulation: int
    schedule: object = forward_backward_no_pipelining
    loss_fn: object = compute_loss
    ddp: object = None
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    losses: list = field(default_factory=list)
    task: Task = field(default_factory=Task)

    @property
    def autocast(self):
        precision = self.cfg.train.precision
        device = self.ctx.device
        use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext
        # fp32 master weights: parameters and optimizer state stay fp32, matmuls run in bf16.
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        micro = self.cfg.train.micro_batch_size
        return [
            collate(
                self.train_data,
                micro_batch_indices(
                    self.consumed_samples, micro, self.ctx.dp_rank, self.ctx.dp_size, i
                ),
                self.ctx.device,
            )
            for i in range(self.accumulation)
        ]

    def _all_reduce_mean(self, value: torch.Tensor, group) -> torch.Tensor:
        """Mean over `group`, on the device."""
        value = value.to(self.ctx.device)
        if dist.get_world_size(group) > 1:
            collectives.all_reduce(value, group)
            value = value / dist.get_world_size(group)
        return value

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns loss, grad_norm, lr, skipped."""
        ctx, tc = self.ctx, self.cfg.train
        self.optimizer.zero_grad(set_to_none=self.ddp is None)
        if self.ddp is not None:
            self.ddp.zero_grad()
        grad_sync = None
        if self.ddp is not None:
            grad_sync = lambda last: contextlib.nullcontext() if last else self.ddp.no_sync()  # noqa: E731
        set_aux_loss_scale(self.model, 1.0 / self.accumulation)  # MoE: as each micro-batch's loss
        loss = self.schedule(
            self.model, self.micro_batches(), loss_fn=self.loss_fn, grad_sync=grad_sync,
            autocast=self.autocast,
        )  # fmt: skip
        if self.ddp is not None:  # dp x cp > 1: wait for the last gradient buckets
            self.ddp.finish_grad_sync()
        skip = None
        if ctx.pp_size > 1:  # tied embedding: first + last stage gradients summed, counted once
            from megatiny.parallel.pipeline import replicated_parameter_ids, sync_tied_grads

            sync_tied_grads(self.model.chunks, ctx, self.ddp)
            skip = replicated_parameter_ids(self.model.chunks, ctx)
        if ctx.pp_size > 1:  # the loss lives on the last stage
            loss = loss.to(ctx.device)
            collectives.broadcast(loss, ctx.pp_ranks[-1], ctx.pp_group)
        loss = self._all_reduce_mean(loss, ctx.dp_group)
        if hasattr(self.optimizer, "clip_grad_norm"):
            grad_norm = self.optimizer.clip_grad_norm(tc.grad_clip, ctx, skip)
        else:
            from megatiny.training.optim import clip_grad_norm_

            grad_norm = clip_grad_norm_(self.model, tc.grad_clip, ctx, skip)
        lr = self.scheduler.lr
        # NaN/inf is checked once per step, on the device; every rank takes the same branch.
        values = torch.stack([loss.float().reshape(()), grad_norm.float().to(ctx.device)])
        finite = torch.isfinite(values).all().float()
        collectives.all_reduce(finite, op=dist.ReduceOp.MIN)
        # The step's one host sync: loss, grad norm and the verdict in one transfer.
        loss_value, norm_value, finite_value = torch.cat([values, finite[None]]).tolist()
        skipped = finite_value < 1
        if skipped:
            if tc.nan_policy == "stop":
                raise NonFiniteLoss(f"loss {loss_value} / grad norm {norm_value}")
            self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.consumed_samples += tc.global_batch_size_for(ctx.dp_size)
        self.losses.append(loss_value)
        return {"loss": loss_value, "grad_norm": norm_value, "lr": lr, "skipped": skipped}

    def evaluate(self) -> dict:
        """The task's evaluation on the validation data (pretraining: `evaluate_iters`)."""
        return self.task.evaluate(self)

    @torch.no_grad()
    def evaluate_iters(self) -> dict:
        """Mean validation loss over `eval_iters` global batches, and its perplexity exp(loss).

        Megatron's evaluation: batch i holds validation samples [i B, (i + 1) B) (B = global
        batch), split over dp ranks and micro-batches exactly like a training step's samples, so
        every layout (tp, pp, dp, accumulation) evaluates the same samples, the same ones each
        time (successive evaluations are comparable)."""
        tc, ctx = self.cfg.train, self.ctx
        global_batch = tc.global_batch_size_for(ctx.dp_size)
        batches = [
            collate(self.valid_data, micro_batch_indices(
                i * global_batch, tc.micro_batch_size, ctx.dp_rank, ctx.dp_size, j), ctx.device)
            for i in range(tc.eval_iters)
            for j in range(self.accumulation)
        ]  # fmt: skip
        self.model.eval()
        try:
            if ctx.pp_size > 1:  # the pipeline schedule runs the micro-batches, forward only
                mean = self.schedule(self.model, batches, forward_only=True, autocast=self.autocast)
            else:
                total = torch.zeros((), device=ctx.device)
                for batch in batches:
                    with self.autocast():
                        total += self.loss_fn(self.model, batch).float()
                mean = total / len(batches)
        finally:
            self.model.train()
        loss = self._all_reduce_mean(mean.float(), ctx.dp_group).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ---- building -----------------------------------------------------------------------------------


def build_model(cfg: Config, ctx) -> torch.nn.Module:
    """This rank's part of the single-device GPT from the run seed: its TP shard of its pipeline
    stages (its experts under ep).

    The model is only described (meta device, in its final dtype), pruned to this rank's stages
    (`keep_stages`), then each kept weight is generated from its deterministic per-parameter
    init as this rank's shard (megatiny/parallel/build.py), so a rank holds its shard plus one
    parameter's full tensor at most, and its weights equal the same-seed single-device model's."""
    from megatiny.model import GPT

    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = GPT(cfg.model)
    if cfg.model.dtype == "bf16":  # generated in fp32, kept in bf16: never an fp32 copy
        model.to(torch.bfloat16)
    return shard_model(model, cfg, ctx)


def shard_model(model: torch.nn.Module, cfg: Config, ctx) -> torch.nn.Module:
    """This rank's part of a single-device GPT whose weights are real or on the meta device
    (generated then from the deterministic init): pruned to its pipeline stages, its TP shard,
    its context-parallel attention (cp > 1), and (pp > 1) the PipelineModel of its chunks; at
    tp = pp = 1 the model moved to the device."""
    from megatiny.parallel.build import materialize
    from megatiny.parallel.context_parallel import apply_context_parallel
    from megatiny.parallel.experts import apply_expert_parallel  # tp > 1: parallelize does it

    p = cfg.parallel
    if ctx.tp_size == 1 and ctx.pp_size == 1:  # this rank's experts first: only they are made
        model = apply_expert_parallel(model, ctx)
        # ZeRO-3: trainable weights stay meta; ShardedDataParallel generates only its slices
        keep = {id(q) for q in model.parameters() if q.requires_grad} if p.zero == 3 else ()
        model = materialize(model, ctx.device, keep_meta=keep)
        for module in model.modules():  # buffers (the parameters are where materialize put them)
            for name, b in module.named_buffers(recurse=False):
                setattr(module, name, b.to(ctx.device))
        return apply_context_parallel(model, ctx, p.cp_mode)
    from megatiny.parallel.parallelize import parallelize
    from megatiny.parallel.pipeline import build_pipeline, keep_stages

    v, placement = pipeline_stages(p)
    keep_stages(model, ctx, v, placement=placement)
    if ctx.tp_size == 1:  # this rank's experts first: only they are generated
        apply_expert_parallel(model, ctx)
        apply_context_parallel(materialize(model, ctx.device), ctx, p.cp_mode)
    else:
        parallelize(model, ctx, sequence_parallel=p.sequence_parallel, cp_mode=p.cp_mode)
    if ctx.pp_size > 1:  # this rank's chunks, under the single-device parameter names
        model = build_pipeline(model, ctx, v, placement=placement)
    return model


def pipeline_stages(p) -> tuple[int | None, str]:
    """(virtual stages per rank, their placement) of a ParallelConfig's pipeline schedule: zb-v
    runs two chunks per rank in a V (rank r: stages r and 2p-1-r), the others as configured."""
    from megatiny.parallel.schedule_ir import stage_placement

    v = 2 if p.pipeline_schedule in V_SCHEDULES else p.virtual_pipeline_size
    return v, stage_placement(p.pipeline_schedule)


def check_supported(cfg: Config, world_size: int | None = None) -> None:
    """Layouts the loop cannot run fail here, before any process group work."""
    from megatiny.parallel.pipeline import validate_pipeline

    p = cfg.parallel
    micro_batches = None
    if world_size is not None:
        micro_batches = cfg.train.accumulation_steps(p.data_parallel_size(world_size))
    v, _ = pipeline_stages(p)
    micro_batches = pipeline_micro_batches(p.pipeline_schedule, p.pp, micro_batches)
    try:  # layers vs pp * virtual stages; the interleaved schedule's micro-batch count
        validate_pipeline(cfg.model.n_layers, p.pp, v, num_microbatches=micro_batches)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None


def build_trainer(cfg: Config, ctx, task: Task | None = None) -> Trainer:
    """The Trainer of `task` (default: pretraining) for this rank."""
    from megatiny.training.optim import build_optimizer, build_scheduler

    task = task or Task()
    check_supported(cfg, ctx.world_size)
    if ctx.cp_size > 1 and isinstance(task, Task) and type(task).loss_fn is not Task.loss_fn:
        raise ConfigError(
            f"parallel.cp={ctx.cp_size}: context parallelism runs causal-LM pretraining (its loss "
            f"is reduced over the sequence split); the {type(task).__name__} task has a loss of "
            "its own, so run it with parallel.cp=1"
        )
    dp = ctx.dp_size
    model = task.build_model(cfg, ctx)
    if cfg.model.dtype == "bf16":  # bf16 weights; fp32 main params/grads in DDP and the optimizer
        model.to(torch.bfloat16)
    from megatiny.parallel.zero_levels import build_data_parallel

    # Gradients averaged over dp x cp in buckets, overlapped with the backward pass (None when
    # dp x cp == 1 without ZeRO-1); ZeRO-1 reduce-scatters them into per-rank slices instead.
    p = cfg.parallel
    ddp = build_data_parallel(model, ctx, bucket_mb=p.ddp_bucket_mb, zero=p.zero,
                              reshard_after_forward=p.reshard_after_forward)  # fmt: skip
    if any(q.is_meta for q in model.parameters()) and ctx.device.type != "meta":
        raise RuntimeError("parameters left on the meta device after building the model")
    optimizer = build_optimizer(model, cfg.train, zero1_ddp=ddp if p.zero else None,
                                overlap_param_gather=p.overlap_param_gather)  # fmt: skip
    scheduler = build_scheduler(optimizer, cfg.train)
    train_data, valid_data = task.build_data(cfg, ctx, dp)
    if ctx.cp_size > 1:  # every cp rank reads the same samples and keeps its tokens of them
        from megatiny.parallel.context_parallel import ContextParallelSamples

        zigzag = p.cp_mode == "ring"
        train_data, valid_data = (
            None if d is None else ContextParallelSamples(d, ctx.cp_rank, ctx.cp_size, zigzag)
            for d in (train_data, valid_data)
        )
    schedule = forward_backward_no_pipelining
    if ctx.pp_size > 1:  # parallel.pipeline_schedule (auto: 1F1B, or interleaved with v chunks)
        from megatiny.parallel.schedules import as_trainer_schedule, build_schedule

        schedule = as_trainer_schedule(build_schedule(
            ctx, model.chunks, cfg.train.micro_batch_size, cfg.data.seq_length,
            schedule=p.pipeline_schedule, sequence_parallel=p.sequence_parallel,
            dtype=torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32,
        ))  # fmt: skip
    # Dropout: same stream on TP ranks (replicated activations), distinct per dp / pp / cp rank.
    torch.manual_seed(
        cfg.train.seed + 1 + 100 * ctx.pp_rank + 10_000 * ctx.dp_rank + 1_000_003 * ctx.cp_rank
    )
    return Trainer(
        cfg, ctx, model, optimizer, scheduler, train_data, valid_data,
        accumulation=cfg.train.accumulation_steps(dp), schedule=schedule, loss_fn=task.loss_fn,
        ddp=ddp, task=task,
    )  # fmt: skip
