"""`FinetuneConfig`: the options of `megatiny finetune`, and the training `Config` they become.

A fine-tuning run is a training run: `run_config` maps the options onto the four sections the
Trainer and the loop read (model = the pretrained body's config, parallel = the layout, train =
the optimizer / loop settings with `run_dir` = the output directory, data = the sample length).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatiny.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megatiny.finetune.data import PROMPT_FORMATS, FinetuneError
from megatiny.finetune.model import POOLINGS

TASKS = ("classification", "instruction")


@dataclass
class FinetuneConfig:
    task: str  # "classification" | "instruction"
    checkpoint: str
    tokenizer: str
    train: str
    valid: str | None = None
    output: str = "runs/finetune"
    num_classes: int | None = None
    pooling: str = "last"  # classification: the head reads the last real token | their mean
    steps: int = 100
    batch_size: int = 8  # rows per optimizer step, over all dp ranks
    micro_batch_size: int | None = None  # per dp rank; None = batch_size / dp (no accumulation)
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay_steps: int | None = None  # None = steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int | None = None  # tokens per row; None = the model's max_seq_len
    trainable_blocks: int | None = None  # None = everything trains
    eval_interval: int = 50
    log_interval: int = 1
    save_interval: int = 0  # 0: a checkpoint only at the end
    keep_checkpoints: int = 3
    resume: str = "none"  # none | auto (the output dir's latest checkpoint) | a checkpoint dir
    seed: int = 0
    tp: int = 1
    pp: int = 1
    virtual_pipeline_size: int | None = None
    sequence_parallel: bool = False
    zero1: bool = False  # = zero=1
    zero: int = 0  # 0-3: ZeRO level over the data-parallel ranks (parallel.zero)
    recompute: str | None = None  # none | selective | op | full; None = the pretrained config's
    loss_chunk_tokens: int | None = None  # LM loss over chunks of N tokens; None = the pretrained's
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | fp32 | bf16
    progress_bar: bool = True
    tensorboard: bool = False
    prompt_format: str = "auto"  # instruction: auto (chat if a template) | alpaca | chat
    eos_token: str | None = None  # overrides the tokenizer's configured eos spelling

    def __post_init__(self):
        if self.task not in TASKS:
            raise FinetuneError(f"task={self.task!r}; choose classification or instruction")
        for name in ("steps", "batch_size", "eval_interval", "log_interval", "tp", "pp"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name}={getattr(self, name)} must be >= 1")
        if self.prompt_format not in PROMPT_FORMATS:
            raise FinetuneError(
                f"prompt_format={self.prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}"
            )
        if self.pooling not in POOLINGS:
            raise FinetuneError(f"pooling={self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.pooling != "last" and not self.classify:
            raise FinetuneError(f"pooling={self.pooling!r} applies to --task classification only")
        if self.num_classes is not None and self.num_classes < 2:
            raise FinetuneError(f"num_classes={self.num_classes} must be >= 2")

    @property
    def classify(self) -> bool:
        return self.task == "classification"

    def seq_length(self, model: ModelConfig) -> int:
        """Tokens per sample: --max-len (at most max_seq_len), a multiple of tp under sequence
        parallelism (equal sequence shards)."""
        multiple = self.tp if self.sequence_parallel else 1
        return min(self.max_len or model.max_seq_len, model.max_seq_len) // multiple * multiple


def model_config(cfg: FinetuneConfig, body: ModelConfig) -> ModelConfig:
    """The pretrained body's config with the run's recompute and loss-chunking choices (shapes
    unchanged)."""
    for name in ("recompute", "loss_chunk_tokens"):
        if getattr(cfg, name) is not None:
            try:
                body = dataclasses.replace(body, **{name: getattr(cfg, name)})
            except ValueError as e:
                raise FinetuneError(f"--{name.replace('_', '-')}: {e}") from None
    return body


def run_config(cfg: FinetuneConfig, model: ModelConfig, world_size: int) -> Config:
    """The training Config of this fine-tuning run on `world_size` ranks (validated)."""
    try:
        parallel = ParallelConfig(
            tp=cfg.tp, pp=cfg.pp, sequence_parallel=cfg.sequence_parallel,
            virtual_pipeline_size=cfg.virtual_pipeline_size, zero1=cfg.zero1, zero=cfg.zero,
        )  # fmt: skip
        dp = parallel.data_parallel_size(world_size)
        if cfg.batch_size % dp:
            raise FinetuneError(f"batch_size={cfg.batch_size} is not divisible by dp={dp}")
        train = TrainConfig(
            steps=cfg.steps, seed=cfg.seed,
            micro_batch_size=cfg.micro_batch_size or cfg.batch_size // dp,
            global_batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps, lr_decay_steps=cfg.lr_decay_steps,
            weight_decay=cfg.weight_decay, beta2=0.999, grad_clip=cfg.grad_clip,
            precision=cfg.precision, run_dir=cfg.output, log_interval=cfg.log_interval,
            eval_interval=cfg.eval_interval, save_interval=cfg.save_interval,
            keep_checkpoints=cfg.keep_checkpoints, resume=cfg.resume,
            progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard,
        )  # fmt: skip
        run = Config(model, parallel, train, DataConfig(seq_length=cfg.seq_length(model)))
        run.validate(world_size)
        from megatiny.training.step import check_supported

        check_supported(run, world_size)
    except ConfigError as e:
        raise FinetuneError(str(e)) from None
    return run
