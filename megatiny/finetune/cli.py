"""`megatiny finetune`: a classification head or instruction SFT on top of a pretrained GPT.

    megatiny finetune --task classification --checkpoint runs/tiny --tokenizer data/tok \\
        --train train.jsonl --valid valid.jsonl --num-classes 2 --output runs/cls
    megatiny finetune --task instruction --checkpoint runs/tiny --tokenizer data/tok \\
        --train alpaca.json --output runs/sft          # then: megatiny generate --checkpoint runs/sft

The body is a pretrained GPT: a training checkpoint (run / checkpoints / step dir, read with
`megatiny.training.checkpoint.load_model_for_inference`) or a model directory (`model.safetensors` +
`model_config.json`, `megatiny.hf`). Data formats and the loss mask: megatiny/finetune_data.py;
the classifier model and its loading: megatiny/finetune_model.py.

Classification: logits = W h_last + b, with h_last = norm_f(body(ids))[last real token] (the EOD
appended to every text) and loss = mean cross-entropy over the rows. The head is small and
replicated on every tensor-parallel rank; its input is replicated too (after the row-parallel
all-reduce, or gathered from the sequence shards under SP), so its gradient is the same on every
TP rank without communication.

Instruction SFT: loss = mean next-token cross-entropy over the response tokens of the batch.

One optimizer step sees `batch_size` rows, split over dp ranks and micro-batches. Each micro-batch
contributes (sum of its losses) / (number of rows or response tokens in the whole global batch),
and gradients are summed over dp, so the update equals one device seeing the
whole batch, whatever the dp / micro-batch split. `--trainable-blocks K` freezes the embeddings
and all but the last K blocks (the final norm and the head always train).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatiny.finetune import data as fd
from megatiny.finetune.data import FinetuneError
from megatiny.finetune.model import (
    HEAD_FILE,
    LABELS_FILE,
    SequenceClassifier,
    freeze,
    load_classifier,
    load_pretrained,
    predict,
)
from megatiny.fsutil import atomic_path, atomic_write
from megatiny.parallel.parallelize import tp_group_of

__all__ = [
    "HEAD_FILE",
    "LABELS_FILE",
    "SUMMARY_FILE",
    "FinetuneConfig",
    "SequenceClassifier",
    "add_arguments",
    "evaluate",
    "finetune",
    "freeze",
    "load_classifier",
    "load_pretrained",
    "loss_sum",
    "main",
    "predict",
]

SUMMARY_FILE = "finetune.json"


@dataclass
class FinetuneConfig:
    task: str  # "classification" | "instruction"
    checkpoint: str
    tokenizer: str
    train: str
    valid: str | None = None
    output: str = "runs/finetune"
    num_classes: int | None = None
    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int | None = None  # per dp rank; None = batch_size / dp (no accumulation)
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int | None = None  # tokens per row; None = the model's max_seq_len
    trainable_blocks: int | None = None  # None = everything trains
    eval_interval: int = 50
    seed: int = 0
    tp: int = 1
    sequence_parallel: bool = False
    progress_bar: bool = True

    def __post_init__(self):
        if self.task not in ("classification", "instruction"):
            raise FinetuneError(f"task={self.task!r}; choose classification or instruction")
        for name in ("steps", "batch_size", "eval_interval", "tp"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_classes is not None and self.num_classes < 2:
            raise FinetuneError(f"num_classes={self.num_classes} must be >= 2")


# ---- distributed helpers --------------------------------------------------------------------


def _sum(values: list[float], ctx) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if ctx is not None and ctx.dp_size > 1:
        t = t.to(ctx.device)
        dist.all_reduce(t, group=ctx.dp_group)
    return t.cpu().tolist()


def _write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), "w", "utf-8")


# ---- the run --------------------------------------------------------------------------------


def loss_sum(task: fd.TaskData, model, batch):
    """(sum of per-term losses, number of correct predictions or 0)."""
    if task.classify:
        logits = model(batch["input_ids"], batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss, int((logits.argmax(-1) == batch["labels"]).sum())
    mean = model(batch["input_ids"], labels=batch["labels"])
    return mean * (batch["labels"] != fd.IGNORE_INDEX).sum(), 0


@torch.no_grad()
def evaluate(model, task: fd.TaskData, examples, ctx, micro: int, device) -> dict:
    """Loss over the whole set (and accuracy for classification), rows split over dp."""
    dp, rank = (ctx.dp_size, ctx.dp_rank) if ctx is not None else (1, 0)
    mine = examples[rank::dp]
    loss, correct = 0.0, 0
    model.eval()
    try:
        for i in range(0, len(mine), micro):
            part = mine[i : i + micro]
            value, right = loss_sum(task, model, task.collate(part, device))
            loss, correct = loss + float(value), correct + right
    finally:
        model.train()
    loss, correct, count = _sum([loss, correct, task.count(mine)], ctx)
    out = {"loss": loss / max(count, 1)}
    if task.classify:
        out["accuracy"] = correct / len(examples)
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def finetune(cfg: FinetuneConfig, ctx=None) -> dict:
    """Run the fine-tuning on this rank (ctx None: one process). Returns a summary with the
    per-step `losses`, every `evals` record, and the `output` directory."""
    from megatiny.data.tokenizer import load_tokenizer
    from megatiny.hf import save_model
    from megatiny.parallel.comm import all_reduce_grads
    from megatiny.training.metrics import MetricsWriter, progress_bar
    from megatiny.training.optim import WarmupCosine, clip_grad_norm_, param_groups

    tp = ctx.tp_size if ctx is not None else 1
    dp, dp_rank = (ctx.dp_size, ctx.dp_rank) if ctx is not None else (1, 0)
    rank0 = ctx is None or ctx.rank == 0
    device = (
        ctx.device
        if ctx is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if ctx is not None and (ctx.pp_size > 1 or ctx.cp_size > 1):
        raise FinetuneError("finetune supports tensor and data parallelism only (pp = cp = 1)")
    if cfg.tp != tp:
        raise FinetuneError(f"cfg.tp={cfg.tp} but the parallel context has tp={tp}")
    if cfg.batch_size % dp:
        raise FinetuneError(f"batch_size={cfg.batch_size} is not divisible by dp={dp}")
    micro = cfg.micro_batch_size or cfg.batch_size // dp
    if (cfg.batch_size // dp) % micro:
        raise FinetuneError(
            f"batch_size/dp = {cfg.batch_size // dp} is not a multiple of micro_batch_size={micro}"
        )
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise FinetuneError(f"--tokenizer: {e}") from None
    body = load_pretrained(cfg.checkpoint)
    mc = body.config
    if tokenizer.vocab_size > mc.vocab_size:
        raise FinetuneError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{mc.vocab_size}; use the tokenizer the checkpoint was pretrained with"
        )
    multiple = tp if cfg.sequence_parallel else 1
    max_len = min(cfg.max_len or mc.max_seq_len, mc.max_seq_len) // multiple * multiple
    task = fd.TaskData(cfg, tokenizer, max_len, multiple)

    torch.manual_seed(cfg.seed)
    model = body
    if task.classify:
        model = SequenceClassifier(body, len(task.labels.names), cfg.seed)
    if tp > 1:
        from megatiny.parallel.parallelize import parallelize

        parallelize(body, ctx, sequence_parallel=cfg.sequence_parallel)
    # After parallelize, which creates new parameters.
    freeze(body, cfg.trainable_blocks)
    if task.classify and body.lm_head is not None:
        body.lm_head.requires_grad_(False)  # the classifier does not use the LM head
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = WarmupCosine(optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
    torch.manual_seed(cfg.seed + 1 + 10_000 * dp_rank)  # dropout: same over TP, distinct over dp

    if rank0:
        os.makedirs(cfg.output, exist_ok=True)
    writer = MetricsWriter(cfg.output, enabled=rank0, tensorboard=False)
    bar = progress_bar(cfg.steps, 0, enabled=rank0 and cfg.progress_bar)
    say = bar.write if bar is not None else (lambda m: print(m, flush=True))
    if rank0 and task.dropped:
        say(f"dropped {task.dropped} rows whose prompt fills --max-len {max_len}")
    per_rank = cfg.batch_size // dp
    losses, evals = [], []
    for step in range(cfg.steps):
        rows = fd.step_rows(len(task.train), step, cfg.batch_size, cfg.seed)
        mine = [task.train[i] for i in rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]]
        (total,) = _sum([task.count(mine)], ctx)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i in range(0, per_rank, micro):
            loss, _ = loss_sum(task, model, task.collate(mine[i : i + micro], device))
            (loss / max(total, 1)).backward()
            step_loss += float(loss.detach())
        if dp > 1:  # each rank holds its rows' share of the global-batch gradient: sum them
            all_reduce_grads(model.parameters(), ctx.dp_group)
        (step_loss,) = _sum([step_loss], ctx)
        losses.append(step_loss / max(total, 1))
        grad_norm = float(clip_grad_norm_(model, cfg.grad_clip, ctx))
        if not (math.isfinite(losses[-1]) and math.isfinite(grad_norm)):  # same on every rank
            raise FinetuneError(
                f"non-finite loss {losses[-1]} / grad norm {grad_norm} at step {step + 1}; "
                "lower --lr or check the data"
            )
        lr = scheduler.lr
        optimizer.step()
        scheduler.step()
        writer.write(step + 1, {"loss": losses[-1], "grad_norm": grad_norm, "lr": lr})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        last = step + 1 == cfg.steps
        if task.valid and ((step + 1) % cfg.eval_interval == 0 or last):
            ev = evaluate(model, task, task.valid, ctx, micro, device)
            evals.append({"step": step + 1, **ev})
            writer.write(step + 1, ev, prefix="valid")
            if rank0:
                say(f"step {step + 1}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    if bar is not None:
        bar.close()
    writer.close()
    _save(cfg, body, model, task, ctx, rank0, save_model, losses, evals)
    return {"losses": losses, "evals": evals, "output": cfg.output, "dropped": task.dropped}


def _save(cfg, body, model, task, ctx, rank0, save_model, losses, evals) -> None:
    """Rank 0 writes the single-device model (gathered over TP): model.safetensors +
    model_config.json (loadable by `megatiny generate`), plus the head and labels."""
    from megatiny.model import GPT

    single = body
    if tp_group_of(body) is not None:
        from megatiny.parallel.parallelize import full_parameters

        state = full_parameters(body)  # collective over TP
        if rank0:
            with torch.device("meta"):
                single = GPT(body.config)
            single.load_state_dict({k: v.cpu() for k, v in state.items()}, assign=True)
    if rank0:
        save_model(single, cfg.output)
        if task.classify:
            from safetensors.torch import save_file

            head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
            with atomic_path(os.path.join(cfg.output, HEAD_FILE)) as tmp:
                save_file(head, tmp)
            _write_json(os.path.join(cfg.output, LABELS_FILE), task.labels.to_dict())
        summary = {"config": asdict(cfg), "final_loss": losses[-1], "evals": evals}
        _write_json(os.path.join(cfg.output, SUMMARY_FILE), summary)
    if ctx is not None and ctx.world_size > 1:
        dist.barrier()


# ---- CLI ------------------------------------------------------------------------------------

EXAMPLE = """examples:
  megatiny finetune --task classification --checkpoint runs/tiny --tokenizer data/tok \\
      --train cls_train.jsonl --valid cls_valid.jsonl --num-classes 2 --output runs/cls
  megatiny finetune --task instruction --checkpoint runs/tiny --tokenizer data/tok \\
      --train alpaca.json --output runs/sft --steps 200
  torchrun --nproc-per-node 2 -m megatiny finetune --tp 2 ...   (tensor parallel)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    a = parser.add_argument
    a("--task", required=True, choices=["classification", "instruction"])
    a("--checkpoint", required=True, help="pretrained model dir or training run/checkpoint")
    a("--tokenizer", required=True, help="tokenizer dir or tokenizer.json")
    a("--train", required=True, help='JSONL rows: {"text","label"} or {"instruction","input",'
      '"output"} (a .json list works too)')  # fmt: skip
    a("--valid", help="validation rows, same format (evaluated every --eval-interval steps)")
    a("--output", default="runs/finetune", help="directory for the model, metrics and labels")
    a("--num-classes", type=int, help="classification: number of classes (default: inferred)")
    a("--steps", type=int, default=100)
    a("--batch-size", type=int, default=8, help="rows per optimizer step (over all dp ranks)")
    a("--micro-batch-size", type=int, help="rows per forward pass per dp rank")
    a("--lr", type=float, default=1e-4)
    a("--min-lr", type=float, default=0.0)
    a("--warmup-steps", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--max-len", type=int, help="tokens per row (default: the model's max_seq_len)")
    a("--trainable-blocks", type=int,
      help="freeze embeddings and all but the last K blocks (head and final norm train)")  # fmt: skip
    a("--eval-interval", type=int, default=50)
    a("--seed", type=int, default=0)
    a("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    a("--sequence-parallel", action="store_true")
    a("--no-progress-bar", action="store_true")


def main(args) -> int:
    from megatiny.training.checkpoint import CheckpointError

    fields = set(FinetuneConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in fields}
    try:
        cfg = FinetuneConfig(**kw, progress_bar=not args.no_progress_bar)
    except FinetuneError as e:
        print(f"megatiny finetune: {e}", file=sys.stderr)
        return 2
    ctx = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megatiny.parallel import ParallelContext

        ctx = ParallelContext.from_env(tp=cfg.tp)
    elif cfg.tp > 1:
        print("megatiny finetune: --tp > 1 needs torchrun --nproc-per-node >= tp", file=sys.stderr)
        return 2
    try:
        summary = finetune(cfg, ctx)
    except (FinetuneError, CheckpointError) as e:
        print(f"megatiny finetune: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            ctx.destroy()
    if ctx is None or ctx.rank == 0:
        last = summary["evals"][-1] if summary["evals"] else {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
        print(
            f"done: final train loss {summary['losses'][-1]:.4f}"
            + (f"; valid {shown}" if shown else "")
        )
        print(f"model: {summary['output']}")
    return 0
