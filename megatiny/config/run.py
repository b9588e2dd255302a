"""Configuration dataclasses. Each validates itself in `__post_init__` with a message that says
what is wrong and what to change.

`ModelConfig` describes one GPT (megatiny/config/model.py); the GPT-2 and Llama
families are presets. `Config` is a whole training run (model, parallel, train, data sections),
loaded from YAML with dotted `section.key=value` overrides (`Config.from_yaml(path, overrides)`;
the parsing and type conversion live in megatiny/config_io.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import yaml

from megatiny.config.io import (
    ConfigError,
    coerce,
    parse_override,
    tokenizer_vocab_size,
    unknown_key_message,
)
from megatiny.config.layout import (
    check_context_parallel,
    check_expert_parallel,
    check_grid_sizes,
    check_pipeline_schedule,
)
from megatiny.config.model import ModelConfig
from megatiny.config.resilience import ResilienceConfig

# ---------------------------------------------------------------------------------------------
# Training configuration: parallel layout, optimizer/loop, data; YAML + dotted overrides.
# ---------------------------------------------------------------------------------------------


@dataclass
class ParallelConfig:
    """The model-parallel layout. dp=None means world_size // (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    cp_mode: str = "ring"  # ring (zig-zag ring attention) | a2a (all-to-all, Ulysses)
    dp: int | None = None
    ep: int = 1  # expert parallelism: experts split over ep of the dp ranks (MoE models)
    sequence_parallel: bool = False
    virtual_pipeline_size: int | None = None
    # auto (1F1B; interleaved with v > 1) | gpipe | 1f1b | interleaved | zb-h1 | zb-h2 | zb-v |
    # dualpipev (V-shaped, m >= 2 pp); docs/pipeline_dp.md "Schedules"
    pipeline_schedule: str = "auto"
    # ZeRO level over the data-parallel ranks: 0 none | 1 optimizer state | 2 + gradients |
    # 3 + parameters (FSDP-style, gathered per block); megatiny/parallel/zero.py, fsdp.py
    zero: int = 0
    zero1: bool = False  # the older spelling of zero=1 (kept true at every level >= 1)
    reshard_after_forward: bool = True  # zero=3: free a block's gathered parameters after forward
    # ZeRO-1/2: leave the parameter all-gather in flight after the optimizer step; each bucket is
    # waited for by the first module of the next forward that uses it (Megatron's flag)
    overlap_param_gather: bool = False
    ddp_bucket_mb: float = 25.0  # gradient all-reduce bucket size (overlapped with backward)

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp is not None and self.dp < 1:
            raise ConfigError(f"parallel.dp={self.dp} must be >= 1 (or null to derive it)")
        if self.cp_mode not in ("ring", "a2a"):
            raise ConfigError(f"parallel.cp_mode={self.cp_mode!r}; choose ring or a2a")
        check_pipeline_schedule(self.pipeline_schedule, self.virtual_pipeline_size)
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(
                f"parallel.zero={self.zero}: choose 0 (replicated), 1 (optimizer state sharded), "
                "2 (+ gradients) or 3 (+ parameters, FSDP-style)"
            )
        if self.zero1 and self.zero == 0:
            self.zero = 1
        self.zero1 = self.zero >= 1
        if self.overlap_param_gather and self.zero not in (1, 2):
            raise ConfigError(
                f"parallel.overlap_param_gather=true overlaps the parameter all-gather after the "
                f"optimizer step of parallel.zero=1 or 2 (this run: zero={self.zero}); "
                + (
                    "set parallel.zero=1"
                    if self.zero == 0
                    else "zero=3 gathers each block before its forward, prefetched; drop the flag"
                )
            )
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tp > 1 (it shards the sequence "
                "over the TP group); set parallel.tp=2 or parallel.sequence_parallel=false"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """dp implied by world_size, with a clear error when the layout does not fit."""
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*"
                f"{self.cp} = {model_parallel}; launch a multiple of {model_parallel} ranks "
                f"(e.g. torchrun --nproc-per-node {model_parallel}) or change parallel.tp/pp/cp"
            )
        dp = world_size // model_parallel
        if self.dp is not None and self.dp != dp:
            raise ConfigError(
                f"parallel.dp={self.dp} but world size {world_size} / (tp*pp*cp = "
                f"{model_parallel}) gives dp={dp}; launch {self.dp * model_parallel} ranks or "
                "set parallel.dp=null"
            )
        return dp


@dataclass
class TrainConfig(ResilienceConfig):  # + straggler_threshold, check_replay_every, sdc_policy
    """The training loop. global_batch_size=None means micro_batch_size * dp (no accumulation)."""

    steps: int = 100
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int | None = None
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 10
    lr_decay_steps: int | None = None  # default: steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    run_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables periodic evaluation (a final one still runs)
    eval_iters: int = 10
    save_interval: int = 0  # 0: save only at the end
    keep_checkpoints: int = 3  # this run's newest K (never the one `latest` names)
    # none (a fresh run: refuses a run_dir holding another run) | auto (run_dir's newest intact
    # checkpoint, else fresh) | verify-only (check run_dir's checkpoints, train nothing) | a path
    resume: str = "none"
    overwrite: bool = False  # a fresh run moves run_dir's old run aside (never deletes it)
    nan_policy: str = "stop"  # stop: save a checkpoint and exit with an error | skip the step
    spike_factor: float = 0.0  # loss > factor x running median is a spike (0: off)
    spike_window: int = 50  # steps in the running median
    spike_policy: str = "log"  # log: warn and count | skip: also drop that update
    timeout_s: float = 600.0  # process-group timeout: a stuck collective fails after this
    flight_recorder: int = 1000  # last N communication ops per rank, dumped on a hang (0: off)
    peak_tflops: float | None = None  # per device, for MFU; default from the GPU model name
    tensorboard: bool = True
    wandb: bool = False  # also log to Weights & Biases (pip install 'megatiny[wandb]'); offline: WANDB_MODE=offline
    wandb_project: str = "megatiny"  # the W&B project of train.wandb
    wandb_name: str | None = None  # the W&B run name (default: the run directory's name)
    progress_bar: bool = True
    backend: str | None = None  # default: nccl with CUDA, else gloo
    trace_comm: bool = False  # run_dir/comm.jsonl: bytes and seconds per step/phase/group/op
    exit_duration_mins: float = 0.0  # save a checkpoint and stop after this many minutes (0: off)

    def __post_init__(self):
        positive = ("steps", "micro_batch_size", "log_interval", "eval_iters", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_interval", "save_interval", "exit_duration_mins"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= train.min_lr <= train.lr and lr > 0 (got {self.min_lr}, {self.lr})"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"train.timeout_s={self.timeout_s} must be > 0 (seconds)")
        if self.spike_factor and self.spike_factor <= 1:
            raise ConfigError(
                f"train.spike_factor={self.spike_factor}: a spike is loss > factor x median, so "
                "use a factor > 1 (e.g. 3) or 0 to switch the detector off"
            )
        if self.spike_window < 3 or self.flight_recorder < 0:
            raise ConfigError(
                f"need train.spike_window >= 3 and train.flight_recorder >= 0 (got "
                f"{self.spike_window}, {self.flight_recorder})"
            )
        choices = {"precision": ("auto", "fp32", "bf16"), "nan_policy": ("stop", "skip"),
                   "spike_policy": ("log", "skip")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}; choose one of {allowed}")
        self.check_resilience()

    def global_batch_size_for(self, dp: int) -> int:
        return self.global_batch_size or self.micro_batch_size * dp

    def accumulation_steps(self, dp: int) -> int:
        """global = micro x accumulation x dp; the global batch must split evenly."""
        per_step = self.micro_batch_size * dp
        global_batch = self.global_batch_size or per_step
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not divisible by micro_batch_size * "
                f"dp = {self.micro_batch_size} * {dp} = {per_step}; use a multiple of {per_step}"
            )
        return global_batch // per_step


@dataclass
class DataConfig:
    """Training data: an indexed-dataset prefix (PREFIX.bin/.idx) or a weighted list
    ["0.7", "a", "0.3", "b"]; the Megatron train/valid/test split; the sample length."""

    path: str | list | None = None
    tokenizer: str | None = None
    split: str = "969,30,1"
    seq_length: int = 256
    cache_dir: str | None = None

    def prefixes(self) -> list[str]:
        if self.path is None:
            return []
        if isinstance(self.path, str):
            return [self.path]
        items = [str(x) for x in self.path]
        if len(items) % 2 == 0 and all(_is_number(w) for w in items[0::2]):
            return items[1::2]
        return items

    def check_exists(self) -> None:
        """Every prefix must have its .bin and .idx; say which one is missing and how to make it."""
        if self.path is None:
            raise ConfigError(
                "data.path is not set; pass data.path=PREFIX (files PREFIX.bin and PREFIX.idx, "
                "made by `megatiny data tokenize`)"
            )
        for prefix in self.prefixes():
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.exists(prefix + ext)]
            if missing:
                raise ConfigError(
                    f"data prefix {prefix!r} not found: missing {', '.join(missing)}. Create it "
                    "with `megatiny data tokenize --output-prefix PREFIX ...` (or "
                    "`launch/prepare_demo_data.sh .demo` for the demo corpus) and set data.path"
                )


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class Config:
    """A whole training run: `model`, `parallel`, `train`, `data` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    SECTIONS = ("model", "parallel", "train", "data")

    def validate(self, world_size: int) -> int:
        """Check the combination of sections for `world_size` ranks (pure: no process groups).

        Returns dp. Raises ConfigError naming the key to change.
        """
        p, m, t, d = self.parallel, self.model, self.train, self.data
        dp = p.data_parallel_size(world_size)
        check_expert_parallel(p, m, dp)
        try:
            check_grid_sizes(world_size, tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, ep=p.ep)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            m.check_tp(p.tp, prefix="model.")
        except ValueError as e:
            raise ConfigError(str(e).replace("tp=", "parallel.tp=", 1)) from None
        if d.seq_length > m.max_seq_len:
            raise ConfigError(
                f"data.seq_length={d.seq_length} exceeds model.max_seq_len={m.max_seq_len}; "
                "lower data.seq_length or raise model.max_seq_len"
            )
        if p.sequence_parallel and d.seq_length % p.tp:
            raise ConfigError(
                f"data.seq_length={d.seq_length} is not divisible by parallel.tp={p.tp} "
                "(needed by sequence_parallel)"
            )
        check_context_parallel(p, m, d.seq_length)
        t.accumulation_steps(dp)
        self._check_vocab()
        return dp

    def _check_vocab(self) -> None:
        """A model vocabulary smaller than the tokenizer's would fail at step 1 on every rank."""
        tok = self.data.tokenizer
        if not tok or not os.path.exists(tok):
            return
        n = tokenizer_vocab_size({"tokenizer": tok})
        if self.model.vocab_size < n:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the {n} tokens of "
                f"data.tokenizer={tok}; set model.vocab_size=auto (or >= {n})"
            )

    # ---- dict / YAML round trip --------------------------------------------------------------

    def to_dict(self) -> dict:
        return {name: asdict(getattr(self, name)) for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict | None, overrides: list[str] | tuple = ()) -> Config:
        """Build from nested dicts (YAML), then apply `section.key=value` overrides."""
        raw = dict(raw or {})
        merged: dict[str, dict] = {}
        for section, values in raw.items():
            if section not in cls.SECTIONS:
                raise ConfigError(unknown_key_message(section, cls.SECTIONS, "config section"))
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            merged[section] = dict(values)
        for item in overrides:
            key, value = parse_override(item, cls.SECTIONS)
            section, name = key.split(".", 1)
            merged.setdefault(section, {})[name] = value
        classes = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig,
                   "data": DataConfig}  # fmt: skip
        for section, values in merged.items():  # unknown keys first, before any file is read
            known = [f"{section}.{f.name}" for f in fields(classes[section])]
            for name in values:
                if f"{section}.{name}" not in known:
                    raise ConfigError(unknown_key_message(f"{section}.{name}", known, "config key"))
        if merged.get("model", {}).get("vocab_size") == "auto":
            # Megatron-style: the vocabulary comes from the tokenizer the data was made with.
            merged["model"]["vocab_size"] = tokenizer_vocab_size(merged.get("data", {}))
        sections = {}
        for section in cls.SECTIONS:
            section_cls = classes[section]
            values = merged.get(section, {})
            kwargs = {}
            for name, value in values.items():
                kwargs[name] = coerce(value, section_cls, name, f"{section}.{name}")
            try:
                sections[section] = section_cls(**kwargs)
            except ConfigError:
                raise
            except (ValueError, TypeError) as e:
                raise ConfigError(f"invalid {section} config: {e}") from None
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] | tuple = ()) -> Config:
        raw = {}
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"config file {path!r} not found (see launch/configs/*.yaml)")
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
        return cls.from_dict(raw, overrides)

    def save_yaml(self, path: str) -> None:
        """Write the resolved config atomically (temp file, fsync, rename)."""
        from megatiny.fsutil import atomic_write

        atomic_write(
            path, lambda f: yaml.safe_dump(self.to_dict(), f, sort_keys=False), "w", "utf-8"
        )


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """`Config.from_yaml(path, overrides)`: the entry point of `megatiny train`."""
    return Config.from_yaml(path, overrides)
