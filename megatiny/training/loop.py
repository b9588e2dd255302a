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

import torch

from megatiny.config import Config, ConfigError
from megatiny.parallel.zero import finish_param_sync
from megatiny.training import rundir
from megatiny.training.preempt import HELD, Preemption, startup_phase
from megatiny.training.report import fail
from megatiny.training.step import NonFiniteLoss, Trainer, build_trainer, check_supported

EXAMPLE = """example:
  torchrun --standalone --nproc-per-node 2 -m megatiny train \\
      --config launch/configs/tiny-cpu.yaml train.steps=100 train.run_dir=runs/try1
  megatiny train --config launch/configs/tiny-cpu.yaml parallel.tp=1 --resume auto
  megatiny train --config launch/configs/tiny-cpu.yaml --resume verify-only   # check checkpoints

every key: `megatiny config keys` (docs/config.md); what a config resolves to, non-defaults
marked: `megatiny config show --config FILE key=value ...`. SIGTERM / SIGINT save a checkpoint
at the end of the current step and exit (a second signal exits at once), see docs/training.md."""


# ---- the loop -----------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def train(cfg: Config, ctx, trainer: Trainer | None = None) -> dict:
    """Run (or resume) the configured training on this rank; returns a summary dict with the
    per-step `losses`, the last `eval`, `run_dir`, `checkpoint` (last saved) and `step`.

    Rank 0 first claims `run_dir` (lock; a fresh run refuses another run's directory unless
    `train.overwrite`, see megatiny/training/rundir.py); everything is written after that."""
    tc = cfg.train
    lock, notes, error = None, [], None
    startup_phase("claiming the run directory", hold=HELD)  # a signal waits for the claim
    if ctx.rank == 0:
        try:
            lock, notes = rundir.claim(tc.run_dir, tc.resume, tc.overwrite, tc.steps)
        except rundir.RunDirError as e:
            error = e
    try:
        rundir.agree(ctx, error)
        for note in notes:
            _warn(note)
        startup_phase("building the model and data")
        return _train(cfg, ctx, trainer or build_trainer(cfg, ctx))
    finally:
        if lock is not None:
            lock.release()


def _resume_point(cfg: Config, ctx) -> str | None:
    """The checkpoint to resume from: `auto` takes run_dir's newest intact one (verified against
    its manifest; a bad one is named and skipped), a path is verified and used as given."""
    from megatiny.training.checkpoint import CheckpointError, resolve
    from megatiny.training.manifest import CheckpointCorrupt, newest_intact, verify_collectively

    tc = cfg.train
    warn = _warn if ctx.rank == 0 else None
    try:
        if tc.resume == "auto":
            return newest_intact(os.path.join(tc.run_dir, "checkpoints"), ctx, warn)
        if tc.resume in ("none", ""):
            return None
        step_dir = resolve(tc.resume)
        if step_dir is None:
            raise CheckpointError(f"no checkpoint at {tc.resume} (train.resume)")
        problem = verify_collectively(step_dir, ctx)
        if problem:
            raise CheckpointCorrupt(f"train.resume={tc.resume}: {problem}")
        return step_dir
    except CheckpointCorrupt as e:
        raise CheckpointError(str(e)) from None


def _check_schedule(cfg: Config, meta: dict) -> None:
    """Warn when the resumed run's length differs from the checkpoint's (schedule and data)."""
    tc = cfg.train
    old = (meta.get("config") or {}).get("train") or {}
    if "steps" not in old or old["steps"] == tc.steps:
        return
    old_decay = old.get("lr_decay_steps") or old["steps"]
    new_decay = tc.lr_decay_steps or tc.steps
    decay = (f"the learning rate now decays over {new_decay} steps instead of {old_decay} (set "
             f"train.lr_decay_steps={old_decay} to keep the schedule), and ") if old_decay != new_decay else ""  # fmt: skip
    _warn(f"train.steps={tc.steps} but the checkpoint's run was set up for {old['steps']}: "
          f"{decay}the sample order may change (it depends on the number of samples asked for)")  # fmt: skip


def _train(cfg: Config, ctx, trainer: Trainer) -> dict:
    from megatiny.parallel import collectives
    from megatiny.parallel.tracer import CommTracer
    from megatiny.training.checkpoint import load_checkpoint, save_checkpoint
    from megatiny.training.checks import SilentDataCorruption, install_checks
    from megatiny.training.flight import FlightRecorder
    from megatiny.training.metrics import (
        MetricsWriter,
        Throughput,
        format_line,
        peak_memory_gib,
        peak_tflops,
        progress_bar,
    )
    from megatiny.training.spike import SpikeDetector, guard_trainer
    from megatiny.training.wandb_sink import wandb_settings

    tc = cfg.train
    rank0 = ctx.rank == 0
    run_dir = tc.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    startup_phase("verifying the checkpoints")
    resume_from = _resume_point(cfg, ctx)
    meta, run_id = {}, rundir.new_run_id()
    if resume_from is not None:
        startup_phase(f"loading checkpoint {resume_from}")
        meta = load_checkpoint(
            resume_from, trainer.model, trainer.optimizer, trainer.scheduler, ctx
        )
        trainer.step, trainer.consumed_samples = meta["step"], meta["consumed_samples"]
        trainer.skipped_steps = meta.get("skipped_steps", 0)
        run_id = meta.get("run_id") or run_id
        trainer.task.check_resume(meta.get("task") or {})
        if rank0:
            print(f"resumed from {meta['path']} at step {trainer.step}", flush=True)
            _check_schedule(cfg, meta)
    startup_phase("preparing the run", hold=HELD)  # writes; a signal waits for the loop's start
    # Rows after the starting step were logged by a run that crashed before saving them.
    replaying = resume_from is not None or tc.resume == "auto"
    if rank0:  # every check passed: this run's config, and each step logged once
        cfg.save_yaml(os.path.join(run_dir, "config.yaml"))
        if replaying:
            for name in ("metrics.jsonl", "comm.jsonl"):
                moved = rundir.drop_rows_after(os.path.join(run_dir, name), trainer.step)
                if moved:
                    print(f"{name}: {moved} rows after step {trainer.step} (replayed now) moved "
                          f"to {name}.replaced", flush=True)  # fmt: skip
    checks = install_checks(cfg, trainer, _warn)  # stragglers, SDC replay, MEGATINY_FAULT; or None
    spikes = None
    if tc.spike_factor:
        spikes = SpikeDetector(tc.spike_factor, tc.spike_window, meta.get("loss_history", ()))
        spike_state = guard_trainer(trainer, spikes) if tc.spike_policy == "skip" else None

    def save() -> str:
        extra = {
            "consumed_samples": trainer.consumed_samples,
            "skipped_steps": trainer.skipped_steps,
            "config": cfg.to_dict(),
            "run_id": run_id,
            "task": trainer.task.checkpoint_meta(),
        }
        if spikes is not None:
            extra["loss_history"] = list(spikes.history)
        return save_checkpoint(ckpt_dir, trainer.step, trainer.model, trainer.optimizer,
                               trainer.scheduler, ctx, extra, keep=tc.keep_checkpoints)  # fmt: skip

    writer = MetricsWriter(run_dir, enabled=rank0, tensorboard=tc.tensorboard,
                           purge_step=trainer.step + 1 if replaying else None,
                           wandb=wandb_settings(cfg, run_id))  # fmt: skip
    tokens_per_step = tc.global_batch_size_for(ctx.dp_size) * cfg.data.seq_length
    meter = Throughput(
        tokens_per_step, cfg.model.flops_per_token(cfg.data.seq_length), ctx.world_size,
        peak_tflops(ctx.device, tc.peak_tflops),
    )  # fmt: skip
    bar = progress_bar(tc.steps, trainer.step, enabled=rank0 and tc.progress_bar)
    say = bar.write if bar is not None else (lambda m: print(m, flush=True))
    last_checkpoint = meta.get("path")
    last_eval, evals = None, []
    can_evaluate = trainer.valid_data is not None  # a task may have no validation data
    tracer = CommTracer(ctx.rank) if tc.trace_comm else None
    comm_path = os.path.join(run_dir, "comm.jsonl")
    recorder = None
    if tc.flight_recorder and ctx.world_size > 1:
        recorder = FlightRecorder(ctx, run_dir, tc.flight_recorder, stall_s=tc.timeout_s / 2)

    def phase(step: int, name: str) -> None:
        """Attribute the collectives that follow to (step, phase); eval and checkpoint ops to
        the step they follow."""
        collectives.set_labels(step=step, phase=name)
        if tracer is not None:
            tracer.mark(step, name)

    def collective_metrics(step: int) -> dict:
        """Metrics every rank computes together (they issue collectives): MoE router statistics
        at each log step; `memory_*` (one extra forward under saved-tensor hooks) once early and
        at the end. The RNG is restored so the extra forward changes no dropout mask."""
        out = {}
        phase(step, "metrics")
        if cfg.model.moe_experts:
            from megatiny.parallel.experts import reduce_moe_metrics

            out.update(reduce_moe_metrics(trainer.model, ctx))
        out.update(checks.collect(step) if checks is not None else {})  # straggler scores
        if step in (tc.log_interval, tc.steps):
            from megatiny.training.memory import memory_metrics

            devices = [ctx.device] if ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                out.update(memory_metrics(trainer))
        return out

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
    stop = Preemption(ctx, tc.exit_duration_mins).__enter__()  # SIGTERM/SIGINT: save, then exit
    try:
        if tracer is not None:
            tracer.__enter__()
        if recorder is not None:
            recorder.start()
        while trainer.step < tc.steps:
            phase(trainer.step + 1, "train")
            try:
                out = trainer.train_step()
            except SilentDataCorruption as e:  # the model is the previous step's: keep it
                raise SilentDataCorruption(f"{e}; saved checkpoint {save()}") from None
            except NonFiniteLoss as e:
                last_checkpoint = save()
                raise NonFiniteLoss(
                    f"non-finite {e} at step {trainer.step + 1}; saved checkpoint {last_checkpoint}"
                    ". Lower train.lr, check the data, or set train.nan_policy=skip"
                ) from None
            step = trainer.step
            if spikes is not None:
                spike = (
                    spike_state["spike"]
                    if spike_state is not None
                    else spikes.is_spike(out["loss"])
                )
                if spike and rank0:
                    action = "update skipped" if spike_state is not None else "update kept"
                    say(f"loss spike at step {step}: {out['loss']:.4f} > {tc.spike_factor} x "
                        f"median {spikes.median():.4f} of the last {len(spikes.history)} ({action})")  # fmt: skip
                if spike and spike_state is not None:
                    trainer.skipped_steps += 1
                spikes.observe(out["loss"], spike)
            meter.add_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
            if step % tc.log_interval == 0 or step == tc.steps:
                m = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                     **meter.measure(), "peak_memory_gib": peak_memory_gib(ctx.device),
                     "consumed_samples": trainer.consumed_samples,
                     "skipped_steps": trainer.skipped_steps}  # fmt: skip
                m.update(collective_metrics(step))
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
            phase(step, "preempt")
            if step < tc.steps and stop.agreed(step):  # every rank stops after the same step
                if not (last_checkpoint or "").endswith(f"step_{step}"):
                    phase(step, "checkpoint")
                    last_checkpoint = save()
                if rank0:
                    say(f"stopped by {stop.reason} after step {step}: saved {last_checkpoint}; "
                        "continue with --resume auto")  # fmt: skip
                break
        finish_param_sync(trainer.optimizer)  # ZeRO-1 gathers left in flight: weights final
        if last_eval is None and can_evaluate and not stop.reason:  # resumed at the last step
            last_eval = trainer.evaluate()
    except NonFiniteLoss:
        raise
    except Exception as e:
        if recorder is not None:  # e.g. a collective timed out: leave the evidence
            path = recorder.dump(f"exception: {type(e).__name__}: {str(e)[:500]}")
            print(f"rank {ctx.rank}: flight recorder dumped to {path}; run `megatiny debug hang "
                  f"{run_dir}`", file=sys.stderr, flush=True)  # fmt: skip
        raise
    finally:
        stop.__exit__()
        if checks is not None:
            checks.close()
        if recorder is not None:
            recorder.stop()
        if tracer is not None:
            tracer.__exit__(None, None, None)
            tracer.write(comm_path)
        if bar is not None:
            bar.close()
        writer.close()
    return {"losses": trainer.losses, "eval": last_eval, "evals": evals, "run_dir": run_dir,
            "step": trainer.step, "checkpoint": last_checkpoint,
            "skipped_steps": trainer.skipped_steps, "stopped_by": stop.reason}  # fmt: skip


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
        help="auto: continue from run_dir's newest intact checkpoint (fresh start when none); "
        "none: a fresh run (refuses a run_dir that holds another run); verify-only: check "
        "run_dir's checkpoints and exit; or a checkpoint directory",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="a fresh run in a run_dir that holds another run moves that run aside to "
        "RUN_DIR.old-<time>/ (nothing is deleted)",
    )  # fmt: skip
    parser.add_argument("--check", action="store_true",
                        help="validate the config for WORLD_SIZE ranks (unknown keys, values, "
                        "files) and exit; the launchers run this before torchrun")  # fmt: skip
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
        if getattr(args, "overwrite", False):
            cfg.train.overwrite = True
        if cfg.train.resume == "verify-only":  # no training, no process group
            from megatiny.training.manifest import verify_tree

            if os.environ.get("RANK", "0") != "0":
                return 0
            return verify_tree(cfg.train.run_dir)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size)  # before any process group exists
        check_supported(cfg, world_size)
        cfg.data.check_exists()
    except (ConfigError, ValueError) as e:
        return fail(f"megatiny train: config error: {e}", 2)
    if getattr(args, "check", False):
        return 0
    _ensure_env()
    from megatiny.parallel.context import ParallelContext
    from megatiny.training.launch_env import launch_env_warnings

    p = cfg.parallel
    startup_phase("starting the process group")
    ctx = ParallelContext.from_env(tp=p.tp, pp=p.pp, cp=p.cp, dp=p.dp, backend=cfg.train.backend,
                                   timeout_s=cfg.train.timeout_s, ep=p.ep)  # fmt: skip
    for line in launch_env_warnings(ctx.device) if ctx.rank == 0 else ():
        print(line, file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        summary = train(cfg, ctx)
    except (NonFiniteLoss, CheckpointError, ConfigError, rundir.RunDirError) as e:
        return fail(f"megatiny train: {e}", 1)
    finally:
        ctx.destroy()
    if ctx.rank == 0 and not summary["stopped_by"]:  # a stopped run said so in one line
        ev = summary["eval"] or {}
        print(f"done: {summary['step']} steps in {time.time() - t0:.0f}s; validation loss "
              f"{ev.get('loss', float('nan')):.4f}, perplexity {ev.get('perplexity', float('nan')):.2f}")  # fmt: skip
        print(f"run dir:    {summary['run_dir']}")
        print(f"metrics:    {os.path.join(summary['run_dir'], 'metrics.jsonl')} (+ tensorboard/)")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0
