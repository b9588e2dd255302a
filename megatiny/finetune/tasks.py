"""The fine-tuning task on the pretraining Trainer: a pretrained body + its head, the encoded
rows, the loss and the evaluation (`megatiny.training.step.Task`).

    task = FinetuneTask.prepare(cfg)                  # tokenizer, body, rows: input errors first
    trainer = build_trainer(run_config(...), ctx, task)
    train(run, ctx, trainer)                          # megatiny.training.loop: the one loop

Classification: the body's `output` becomes a `ClassificationOutput` and each row's class id is
the label of its last real token (megatiny/finetune/model.py). Instruction SFT: the LM loss on
the response tokens. Either way a micro-batch's loss is `GPT.head_loss`, the mean over its
labelled tokens, so the Trainer's step (micro-batches averaged, gradients averaged over dp)
equals one device seeing the whole batch, at every tp / pp / dp / ZeRO-1 layout.

Samples are `seq_length` (= --max-len) tokens, right-padded: pipeline stages exchange tensors of
that fixed shape. Without pipelining `loss_fn` first cuts the padding columns that follow the
micro-batch's last labelled token (causal attention: they change nothing before them).
"""

from __future__ import annotations

import torch

from megatiny.finetune import data as fd
from megatiny.finetune.config import FinetuneConfig, model_config
from megatiny.finetune.data import FinetuneError
from megatiny.finetune.model import ClassificationOutput, attach_classifier, freeze, load_pretrained
from megatiny.parallel import collectives
from megatiny.training.step import Task, Trainer, collate, compute_loss, micro_batch_indices


class FinetuneTask(Task):
    """Classification or instruction SFT for `build_trainer`. `body` is the single-device
    pretrained GPT under the run's model config (`model_config`); `build_model` attaches the
    head and shards it (once per task object). `body_config` is the config as pretrained (the
    exported model's)."""

    def __init__(self, cfg: FinetuneConfig, body, pad_id: int, train: list[dict],
                 valid: list[dict] | None, labels: fd.LabelMap | None, dropped: int = 0,
                 body_config=None):  # fmt: skip
        self.cfg, self.body, self.pad_id = cfg, body, pad_id
        self.model_config, self.body_config = body.config, body_config or body.config
        self.train, self.valid, self.labels, self.dropped = train, valid, labels, dropped
        self.seq_length = cfg.seq_length(body.config)
        self.multiple = cfg.tp if cfg.sequence_parallel else 1

    def checkpoint_meta(self) -> dict:
        """The set-up a resumed run must share: the task and, for classification, the pooling
        (it has no parameters, so the checkpoint's shapes cannot tell)."""
        meta = {"task": self.cfg.task}
        if self.cfg.task == "classification":
            meta["pooling"] = self.cfg.pooling
        return meta

    def check_resume(self, saved: dict) -> None:
        for key, value in self.checkpoint_meta().items():
            if key in saved and saved[key] != value:
                raise FinetuneError(
                    f"--resume: the checkpoint in {self.cfg.output} was written by a run with "
                    f"--{key} {saved[key]}, but this command has --{key} {value}; pass --{key} "
                    f"{saved[key]} to continue that run, or another --output to start a new one"
                )

    @classmethod
    def prepare(cls, cfg: FinetuneConfig) -> FinetuneTask:
        """Load the tokenizer and the pretrained body, read and encode the rows; every input
        problem is a FinetuneError here, before any process group exists."""
        from megatiny.data.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token)
        except (FileNotFoundError, ValueError) as e:
            raise FinetuneError(f"--tokenizer: {e}") from None
        body = load_pretrained(cfg.checkpoint)
        mc = body.config
        if tokenizer.vocab_size > mc.vocab_size:
            raise FinetuneError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{mc.vocab_size}; use the tokenizer the checkpoint was pretrained with"
            )
        max_len = cfg.seq_length(mc)
        labels, dropped = None, 0
        if cfg.classify:
            rows = fd.classification_rows(cfg.train)
            labels = fd.LabelMap.from_rows(rows, cfg.num_classes)
            train = fd.encode_classification(rows, tokenizer, labels, max_len)
            valid = None
            if cfg.valid:
                valid_rows = fd.classification_rows(cfg.valid)
                valid = fd.encode_classification(valid_rows, tokenizer, labels, max_len)
        else:
            fmt = cfg.prompt_format
            train, dropped = fd.encode_instruction(fd.instruction_rows(cfg.train), tokenizer,
                                                   max_len, fmt)  # fmt: skip
            valid = None
            if cfg.valid:
                valid, d = fd.encode_instruction(fd.instruction_rows(cfg.valid), tokenizer,
                                                 max_len, fmt)  # fmt: skip
                dropped += d
            if not train:
                raise FinetuneError(
                    f"every row of {cfg.train} has a prompt longer than --max-len {max_len}; "
                    "raise --max-len (up to the model's max_seq_len) or shorten the prompts"
                )
        return cls(cfg, _with_config(body, model_config(cfg, mc)), tokenizer.pad_id, train,
                   valid or None, labels, dropped, body_config=mc)  # fmt: skip

    # ---- the Task hooks ---------------------------------------------------------------------

    def build_model(self, run, ctx):
        from megatiny.training.step import shard_model

        if self.body is None:
            raise RuntimeError("FinetuneTask.build_model runs once: the body is sharded in place")
        model, self.body = self.body, None
        if self.labels is not None:
            attach_classifier(model, len(self.labels.names), self.cfg.seed, self.cfg.pooling)
        model = shard_model(model, run, ctx)
        freeze(model, self.cfg.trainable_blocks)  # after parallelize, which makes new parameters
        _zero_grad_for_frozen_tied_embedding(model, run, ctx)
        return model

    def build_data(self, run, ctx, dp: int):
        tc = run.train
        train = fd.RowDataset(self.train, self.seq_length, self.pad_id, seed=self.cfg.seed,
                              num_samples=tc.steps * tc.global_batch_size_for(dp))  # fmt: skip
        valid = None if self.valid is None else fd.RowDataset(self.valid, self.seq_length,
                                                              self.pad_id)  # fmt: skip
        return train, valid

    def loss_fn(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return compute_loss(model, trim_padding(batch, self.multiple))

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict:
        """Loss over the whole validation set (classification: and accuracy and macro F1): its
        rows in micro-batches over the dp ranks, each micro-batch's mean loss weighted by its
        number of loss terms (rows or response tokens). The class predictions are read off the
        head's output by a forward hook (on the last pipeline stage), so every layout scores
        with the same forward as training."""
        ctx, micro = trainer.ctx, trainer.cfg.train.micro_batch_size
        valid, model = trainer.valid_data, trainer.model
        head = getattr(model, "output", None)  # None on a pipeline stage without the head
        n_cls = len(self.labels.names) if self.labels is not None else 0
        confusion = torch.zeros(n_cls * n_cls, dtype=torch.float64, device=ctx.device)
        logits, hook = [], None  # confusion[true, predicted], flat
        if isinstance(head, ClassificationOutput):
            head.correct = 0
            hook = head.head.register_forward_hook(lambda m, i, out: logits.append(out.detach()))
        loss_sum, terms = 0.0, 0
        model.eval()
        try:
            for start in range(0, len(valid), micro * ctx.dp_size):
                idx = micro_batch_indices(start, micro, ctx.dp_rank, ctx.dp_size, 0)
                samples = [valid[i] if i < len(valid) else valid.empty() for i in idx]
                batch = collate(samples, range(len(samples)), ctx.device)
                n = int((batch["labels"] != fd.IGNORE_INDEX).sum())
                if ctx.pp_size == 1:
                    with trainer.autocast():
                        loss = trainer.loss_fn(model, batch)
                else:
                    loss = trainer.schedule(model, [batch], forward_only=True,
                                            autocast=trainer.autocast)  # fmt: skip
                loss_sum, terms = loss_sum + float(loss) * n, terms + n
                for scores in logits:  # [b, s' <= s, classes]: the (trimmed) batch's columns
                    labels = batch["labels"][:, : scores.shape[1]]
                    labelled = labels != fd.IGNORE_INDEX
                    pairs = labels[labelled] * n_cls + scores[labelled].argmax(-1)
                    confusion += torch.bincount(pairs, minlength=n_cls * n_cls).to(confusion)
                logits.clear()
        finally:
            model.train()
            if hook is not None:
                hook.remove()
        correct = head.correct if isinstance(head, ClassificationOutput) else 0
        totals = torch.tensor([loss_sum, terms, correct], dtype=torch.float64, device=ctx.device)
        totals = torch.cat([totals, confusion])
        if ctx.pp_size > 1:  # the accuracy is counted on the last stage
            collectives.broadcast(totals, ctx.pp_ranks[-1], ctx.pp_group)
        if ctx.dp_size > 1:
            collectives.all_reduce(totals, ctx.dp_group)
        loss_sum, terms, correct = totals[:3].tolist()
        out = {"loss": loss_sum / max(terms, 1.0)}
        if self.labels is not None:
            out["accuracy"] = correct / len(valid)
            out["f1"] = macro_f1(totals[3:].view(n_cls, n_cls))
        else:
            out["perplexity"] = float(torch.tensor(min(out["loss"], 50.0)).exp())
        return out


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN), from confusion[true, predicted]
    (a class with no rows and no predictions counts as F1 1)."""
    tp = confusion.diag()
    denom = 2 * tp + (confusion.sum(0) - tp) + (confusion.sum(1) - tp)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.ones_like(tp))
    return float(f1.mean())


def trim_padding(batch: dict[str, torch.Tensor], multiple: int = 1) -> dict[str, torch.Tensor]:
    """The batch cut after its last labelled column (rounded up to a multiple of `multiple`)."""
    labelled = (batch["labels"] != fd.IGNORE_INDEX).any(0).nonzero()
    end = int(labelled[-1]) + 1 if len(labelled) else 1
    end = min(-(-end // multiple) * multiple, batch["labels"].shape[1])
    return {k: v[:, :end] for k, v in batch.items()}


def _with_config(body, config):
    """`body` under `config` (same shapes; e.g. another recompute mode)."""
    if config == body.config:
        return body
    from megatiny.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(body.state_dict(), assign=True)
    return model


def _zero_grad_for_frozen_tied_embedding(model, run, ctx) -> None:
    """A frozen tied embedding split over the first and last pipeline stage still takes part in
    the Trainer's first/last-stage gradient sum: give it a zero gradient (the optimizer does
    not hold it, so nothing resets it)."""
    if ctx.pp_size == 1:
        return
    from megatiny.parallel.pipeline import tied_embedding_weight

    weight = tied_embedding_weight(model.chunks, ctx)
    if weight is None or weight.requires_grad:
        return
    if run.parallel.zero1:
        raise FinetuneError(
            "--trainable-blocks freezes the tied embedding, which ZeRO-1 under pipeline "
            "parallelism cannot leave out; drop --zero1 or --trainable-blocks at --pp > 1"
        )
    weight.grad = torch.zeros_like(weight)
