"""`megatiny train`: pretraining under torchrun.

    torchrun --nproc-per-node 2 -m megatiny train --config launch/configs/tiny-cpu.yaml train.steps=50

`train` runs (or resumes) the loop: steps, logging, evaluation, checkpoints. One optimizer step
(`Trainer.train_step`: micro-batches, schedule, gradient sync, clipping, AdamW) and the building of
model, data and optimizer live in megatiny/training/step.py. This is the only training loop:
`megatiny finetune` passes its Trainer (built with a fine-tuning `Task`) to `train`.
"""

from __future__ import annotations

import os
import sys
import time

from megatiny.config import Config, ConfigError
from megatiny.training.step import NonFiniteLoss, Trainer, build_trainer, check_supported

EXAMPLE = """example:
  torchrun --standalone --nproc-per-node 2 -m megatiny train \\
      --config launch/configs/tiny-cpu.yaml train.steps=100 train.run_dir=runs/try1
  megatiny train --config launch/configs/tiny-cpu.yaml parallel.tp=1 --resume auto"""


# ---- the loop -----------------------------------------------------------------------------------


def train(cfg: Config, ctx, trainer: Trainer | None = None) -> dict:
    """Run (or resume) the configured training on this rank; returns a summary dict with the
    per-step `losses`, the last `eval`, `run_dir`, `checkpoint` (last saved) and `step`."""
    from megatiny.parallel.tracer import CommTracer
    from megatiny.training.checkpoint import load_checkpoint, resolve, save_checkpoint
    from megatiny.training.metrics import (
        MetricsWriter,
        Throughput,
        format_line,
        peak_memory_gib,
        peak_tflops,
        progress_bar,
    )

    tc = cfg.train
    trainer = trainer or build_trainer(cfg, ctx)
    rank0 = ctx.rank == 0
    run_dir = tc.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if rank0:
        cfg.save_yaml(os.path.join(run_dir, "config.yaml"))
    resume_from = None
    if tc.resume == "auto":
        resume_from = resolve(run_dir) if os.path.isdir(ckpt_dir) else None
    elif tc.resume not in ("none", ""):
        resume_from = tc.resume
    if resume_from is not None:
        meta = load_checkpoint(
            resume_from, trainer.model, trainer.optimizer, trainer.scheduler, ctx
        )
        trainer.step, trainer.consumed_samples = meta["step"], meta["consumed_samples"]
        trainer.skipped_steps = meta.get("skipped_steps", 0)
        if rank0:
            print(f"resumed from {meta['path']} at step {trainer.step}", flush=True)

    def save() -> str:
        extra = {
            "consumed_samples": trainer.consumed_samples,
            "skipped_steps": trainer.skipped_steps,
            "config": cfg.to_dict(),
        }
        return save_checkpoint(ckpt_dir, trainer.step, trainer.model, trainer.optimizer,
                               trainer.scheduler, ctx, extra, keep=tc.keep_checkpoints)  # fmt: skip

    writer = MetricsWriter(run_dir, enabled=rank0, tensorboard=tc.tensorboard)
    tokens_per_step = tc.global_batch_size_for(ctx.dp_size) * cfg.data.seq_length
    meter = Throughput(
        tokens_per_step, cfg.model.flops_per_token(cfg.data.seq_length), ctx.world_size,
        peak_tflops(ctx.device, tc.peak_tflops),
    )  # fmt: skip
    bar = progress_bar(tc.steps, trainer.step, enabled=rank0 and tc.progress_bar)
    say = bar.write if bar is not None else (lambda m: print(m, flush=True))
    last_checkpoint = meta["path"] if resume_from is not None else None
    last_eval, evals = None, []
    can_evaluate = trainer.valid_data is not None  # a task may have no validation data
    tracer = CommTracer(ctx.rank) if tc.trace_comm else None
    comm_path = os.path.join(run_dir, "comm.jsonl")

    def phase(step: int, name: str) -> None:
        """Attribute the collectives that follow to (step, phase); eval and checkpoint ops to
        the step they follow."""
        if tracer is not None:
            tracer.mark(step, name)

    def evaluate(step: int) -> dict:
        phase(step, "eval")
        result = trainer.evaluate()
        evals.append({"step": step, **result})
        writer.write(step, result, prefix="valid")
        if rank0:
            say(f"step {step}: " + eval_line(result))
        return result

    if trainer.step >= tc.steps and rank0:
        say(f"nothing to train: the checkpoint is at step {trainer.step} >= train.steps={tc.steps}")
    try:
        if tracer is not None:
            tracer.__enter__()
        while trainer.step < tc.steps:
            phase(trainer.step + 1, "train")
            try:
                out = trainer.train_step()
            except NonFiniteLoss as e:
                last_checkpoint = save()
                raise NonFiniteLoss(
                    f"non-finite {e} at step {trainer.step + 1}; saved checkpoint {last_checkpoint}"
                    ". Lower train.lr, check the data, or set train.nan_policy=skip"
                ) from None
            meter.add_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
            step = trainer.step
            if step % tc.log_interval == 0 or step == tc.steps:
                m = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                     **meter.measure(), "peak_memory_gib": peak_memory_gib(ctx.device),
                     "consumed_samples": trainer.consumed_samples,
                     "skipped_steps": trainer.skipped_steps}  # fmt: skip
                if rank0:
                    say(format_line(step, tc.steps, m))
                writer.write(step, m)
            evaluate_now = (tc.eval_interval and step % tc.eval_interval == 0) or step == tc.steps
            if evaluate_now and can_evaluate:
                last_eval = evaluate(step)
                meter.reset()  # evaluation time is not training throughput
            if (tc.save_interval and step % tc.save_interval == 0) or step == tc.steps:
                phase(step, "checkpoint")
                last_checkpoint = save()
                meter.reset()
            if tracer is not None and (step % tc.log_interval == 0 or step == tc.steps):
                tracer.write(comm_path)
        if last_eval is None and can_evaluate:  # resumed at the final step: report the model
            last_eval = trainer.evaluate()
    finally:
        if tracer is not None:
            tracer.__exit__(None, None, None)
            tracer.write(comm_path)
        if bar is not None:
            bar.close()
        writer.close()
    return {"losses": trainer.losses, "eval": last_eval, "evals": evals, "run_dir": run_dir,
            "step": trainer.step, "checkpoint": last_checkpoint,
            "skipped_steps": trainer.skipped_steps}  # fmt: skip


def eval_line(result: dict) -> str:
    """'validation loss 2.3456 | perplexity 10.45' (and any other metric the task reports)."""
    parts = [f"validation loss {result['loss']:.4f}"]
    for key, value in result.items():
        if key == "perplexity":
            parts.append(f"perplexity {value:.2f}")
        elif key != "loss":
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)


# ---- command line -------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    parser.add_argument("--config", help="YAML config (see launch/configs/)")
    parser.add_argument(
        "--resume", default=None,
        help="auto: continue from run_dir's latest checkpoint (fresh start when none); none; "
        "or a checkpoint directory",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config key, e.g. train.steps=20 parallel.tp=2")  # fmt: skip


def _ensure_env() -> None:
    """Single-process runs without torchrun get a one-rank environment."""
    if "RANK" in os.environ:
        return
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip


def main(args) -> int:
    from megatiny.training.checkpoint import CheckpointError

    try:
        cfg = Config.from_yaml(args.config, args.overrides)
        if args.resume is not None:
            cfg.train.resume = args.resume
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size)  # before any process group exists
        check_supported(cfg, world_size)
        cfg.data.check_exists()
    except (ConfigError, ValueError) as e:
        print(f"megatiny train: config error: {e}", file=sys.stderr)
        return 2
    _ensure_env()
    from megatiny.parallel.context import ParallelContext

    p = cfg.parallel
    ctx = ParallelContext.from_env(tp=p.tp, pp=p.pp, cp=p.cp, dp=p.dp, backend=cfg.train.backend)
    t0 = time.time()
    try:
        summary = train(cfg, ctx)
    except (NonFiniteLoss, CheckpointError, ConfigError) as e:
        print(f"megatiny train: rank {ctx.rank}: {e}", file=sys.stderr)
        return 1
    finally:
        ctx.destroy()
    if ctx.rank == 0:
        ev = summary["eval"] or {}
        print(f"done: {summary['step']} steps in {time.time() - t0:.0f}s; validation loss "
              f"{ev.get('loss', float('nan')):.4f}, perplexity {ev.get('perplexity', float('nan')):.2f}")  # fmt: skip
        print(f"run dir:    {summary['run_dir']}")
        print(f"metrics:    {os.path.join(summary['run_dir'], 'metrics.jsonl')} (+ tensorboard/)")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0
