"""`megatiny finetune`: a classification head or instruction SFT on top of a pretrained GPT.

    megatiny finetune --task classification --checkpoint runs/tiny --tokenizer data/tok \\
        --train train.jsonl --valid valid.jsonl --num-classes 2 --output runs/cls
    megatiny finetune --task instruction --checkpoint runs/tiny --tokenizer data/tok \\
        --train alpaca.json --output runs/sft          # then: megatiny generate --checkpoint runs/sft

A fine-tuning run is a training run: `finetune` builds the task (megatiny/finetune/tasks.py: the
pretrained body + head, the encoded rows, the loss, the evaluation), hands it to the pretraining
Trainer (megatiny/training/step.py) and runs the one training loop (megatiny/training/loop.py).
So every layout of `megatiny train` (tp, sequence parallelism, pp with 1F1B or interleaving, dp,
ZeRO-1), recompute, bf16 autocast, metrics, `--resume auto` and SIGTERM / SIGINT handling (save at
a step boundary in the loop; before it, cli.py's StartupGuard ends the run with one line) apply.
The output directory is the run directory (config.yaml, metrics.jsonl, checkpoints/) and,
written by rank 0 from the final layout-free checkpoint, a single-device model directory:
model.safetensors + model_config.json (+ classifier_head.safetensors and labels.json), the
tokenizer's files and finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

from megatiny.data.tokenizer import copy_tokenizer_files
from megatiny.finetune.config import TASKS, FinetuneConfig, run_config
from megatiny.finetune.data import FinetuneError
from megatiny.finetune.model import export
from megatiny.finetune.tasks import FinetuneTask
from megatiny.parallel import collectives

SUMMARY_FILE = "finetune.json"


def finetune(cfg: FinetuneConfig, ctx=None) -> dict:
    """Run (or resume) the fine-tuning on this rank. `ctx` None: a context for the layout of
    `cfg` (the torchrun ranks, an initialized default group, or one process). Returns the
    per-step `losses`, every `evals` record, the `output` directory and the last `checkpoint`."""
    from megatiny.training.loop import train
    from megatiny.training.preempt import startup_phase
    from megatiny.training.step import build_trainer

    # Under `megatiny finetune` (cli.py's StartupGuard) a signal before the loop ends the run at
    # once, with one line naming the phase; the loop's phases follow in train().
    startup_phase("loading the pretrained model, tokenizer and data")
    task = FinetuneTask.prepare(cfg)
    own_ctx, own_group = ctx is None, False
    if ctx is None:
        startup_phase("starting the process group")
        ctx, own_group = _context(cfg)
    try:
        if (ctx.tp_size, ctx.pp_size) != (cfg.tp, cfg.pp):
            raise FinetuneError(f"cfg has tp={cfg.tp}, pp={cfg.pp} but the parallel context "
                                f"has tp={ctx.tp_size}, pp={ctx.pp_size}")  # fmt: skip
        run = run_config(cfg, task.model_config, ctx.world_size)
        rank0 = ctx.rank == 0
        if rank0 and task.dropped:
            print(f"dropped {task.dropped} rows whose prompt fills --max-len {task.seq_length}")
        summary = train(run, ctx, build_trainer(run, ctx, task))
        if rank0:
            export(summary["checkpoint"], task.body_config, cfg.output, task.labels, cfg.pooling)
            # the tokenizer travels with the model: `generate --checkpoint OUT [--chat]` finds it
            copy_tokenizer_files(cfg.tokenizer, cfg.output)
            losses = summary["losses"]
            record = {"config": asdict(cfg), "final_loss": losses[-1] if losses else None,
                      "evals": summary["evals"]}  # fmt: skip
            from megatiny.fsutil import atomic_write

            atomic_write(os.path.join(cfg.output, SUMMARY_FILE),
                         lambda f: json.dump(record, f, indent=1), "w", "utf-8")  # fmt: skip
        if ctx.world_size > 1:
            collectives.barrier()
    finally:
        if own_ctx:
            ctx.destroy()
        if own_group:
            dist.destroy_process_group()
    return {"losses": summary["losses"], "evals": summary["evals"], "output": cfg.output,
            "dropped": task.dropped, "checkpoint": summary["checkpoint"]}  # fmt: skip


def _context(cfg: FinetuneConfig):
    """(ParallelContext for cfg's layout, whether we created the default group)."""
    from megatiny.parallel import ParallelContext

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        if dist.is_initialized():
            return ParallelContext.initialize(tp=cfg.tp, pp=cfg.pp), False
        if "RANK" in os.environ:  # under torchrun
            return ParallelContext.from_env(tp=cfg.tp, pp=cfg.pp, backend=backend), False
    except ValueError as e:  # the layout does not fit the ranks
        raise FinetuneError(f"--tp {cfg.tp} --pp {cfg.pp}: {e}") from None
    if cfg.tp * cfg.pp > 1:
        raise FinetuneError(
            f"--tp {cfg.tp} --pp {cfg.pp} needs {cfg.tp * cfg.pp} ranks: launch with torchrun "
            f"--nproc-per-node {cfg.tp * cfg.pp} -m megatiny finetune ..."
        )
    from socket import socket

    with socket() as s:  # one process: a private one-rank group, no environment changes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return ParallelContext.initialize(), True


# ---- CLI ------------------------------------------------------------------------------------

EXAMPLE = """examples:
  megatiny finetune --task classification --checkpoint runs/tiny --tokenizer data/tok \\
      --train cls_train.jsonl --valid cls_valid.jsonl --num-classes 2 --output runs/cls
  megatiny finetune --task instruction --checkpoint runs/tiny --tokenizer data/tok \\
      --train alpaca.json --output runs/sft --steps 200
  torchrun --nproc-per-node 4 -m megatiny finetune --tp 2 --pp 2 --sequence-parallel ...
  megatiny finetune ... --output runs/sft --resume auto      (continue an interrupted run)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    a = parser.add_argument
    a("--task", required=True, choices=list(TASKS))
    a("--checkpoint", required=True, help="pretrained model dir or training run/checkpoint")
    a("--tokenizer", required=True, help="tokenizer dir or tokenizer.json")
    a("--train", required=True, help='JSONL rows: {"text","label"} or {"instruction","input",'
      '"output"} (a .json list works too)')  # fmt: skip
    a("--valid", help="validation rows, same format (evaluated every --eval-interval steps)")
    a("--output", default="runs/finetune",
      help="run directory: the model, metrics, labels and checkpoints")  # fmt: skip
    a("--num-classes", type=int, help="classification: number of classes (default: inferred)")
    a("--pooling", default="last", choices=["last", "mean"],
      help="classification: the head reads the last real token's hidden state (last) or the "
      "mean over the row's real tokens (mean)")  # fmt: skip
    a("--steps", type=int, default=100)
    a("--batch-size", type=int, default=8, help="rows per optimizer step (over all dp ranks)")
    a("--micro-batch-size", type=int, help="rows per forward pass per dp rank")
    a("--lr", type=float, default=1e-4)
    a("--min-lr", type=float, default=0.0)
    a("--warmup-steps", type=int, default=0)
    a("--lr-decay-steps", type=int, help="cosine decay length (default: --steps)")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--max-len", type=int, help="tokens per row (default: the model's max_seq_len)")
    a("--trainable-blocks", type=int,
      help="freeze embeddings and all but the last K blocks (head and final norm train)")  # fmt: skip
    a("--eval-interval", type=int, default=50)
    a("--log-interval", type=int, default=1)
    a("--save-interval", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    a("--keep-checkpoints", type=int, default=3)
    a("--resume", default="none",
      help="auto: continue from --output's latest checkpoint; none; or a checkpoint dir")  # fmt: skip
    a("--seed", type=int, default=0)
    a("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    a("--pp", type=int, default=1, help="pipeline-parallel size (under torchrun)")
    a("--virtual-pipeline-size", type=int, help="model chunks per pipeline rank (interleaved)")
    a("--sequence-parallel", action="store_true")
    a("--zero1", action="store_true", help="shard AdamW's state over the data-parallel ranks")
    a("--zero", type=int, choices=[0, 1, 2, 3], default=0,
      help="ZeRO level: 1 optimizer state, 2 + gradients, 3 + parameters (FSDP-style)")  # fmt: skip
    a("--recompute", choices=["none", "selective", "op", "full"],
      help="activation recomputation (default: the pretrained config's)")  # fmt: skip
    a("--loss-chunk-tokens", type=int, metavar="N",
      help="instruction: compute the LM head and loss N tokens at a time, never holding the "
      "whole logits (0: unchunked; default: the pretrained config's)")  # fmt: skip
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast on CUDA, fp32 on CPU")  # fmt: skip
    a("--prompt-format", default="auto", choices=["auto", "alpaca", "chat"],
      help="instruction: the model's chat template (chat), the Alpaca prompt, or auto: chat "
      "when the tokenizer has a template")  # fmt: skip
    a("--eos-token", help="end-of-sequence spelling, overriding the tokenizer's configuration")
    a("--tensorboard", action="store_true")
    a("--no-progress-bar", action="store_true")


def main(args) -> int:
    from megatiny.config import ConfigError
    from megatiny.training.checkpoint import CheckpointError
    from megatiny.training.step import NonFiniteLoss

    fields = set(FinetuneConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in fields}
    try:
        cfg = FinetuneConfig(**kw, progress_bar=not args.no_progress_bar)
        summary = finetune(cfg)
    except (FinetuneError, ConfigError) as e:
        print(f"megatiny finetune: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLoss) as e:
        print(f"megatiny finetune: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        last = summary["evals"][-1] if summary["evals"] else {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
        final = f"{summary['losses'][-1]:.4f}" if summary["losses"] else "n/a (nothing to train)"
        print(f"done: final train loss {final}" + (f"; valid {shown}" if shown else ""))
        print(f"model: {summary['output']}")
    return 0
