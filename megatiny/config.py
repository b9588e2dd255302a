"""Configuration dataclasses. Each validates itself in `__post_init__` with a message that says
what is wrong and what to change.

`ModelConfig` describes one GPT (see megatiny/model.py); the GPT-2 and Llama families are presets.
`Config` is a whole training run (model, parallel, train, data sections), loaded from YAML with
dotted `section.key=value` overrides (`Config.from_yaml(path, overrides)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields

import yaml


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """One decoder-only transformer.

    vocab_size      true vocabulary size (tensor parallelism pads internally, never here)
    max_seq_len     the longest sequence the model accepts (learned position table size)
    d_model         hidden size h
    n_layers        number of decoder blocks L
    n_heads         query heads; head_dim = d_model / n_heads
    n_kv_heads      key/value heads (grouped-query attention); None -> n_heads (multi-head)
    ffn_hidden      MLP hidden size; None -> 4h for GELU, Llama's 2/3 * 4h rounded up to 8 for SwiGLU
    norm            "layernorm" | "rmsnorm"
    activation      "gelu" (tanh approximation, as GPT-2) | "swiglu" (silu(x W_g) * (x W_u))
    position        "learned" (absolute table) | "rope" (rotary, rotate-half layout as HF Llama)
    tie_embeddings  LM head shares the token embedding matrix
    dropout         embedding / attention / residual dropout probability
    bias            biases in the linear layers and in LayerNorm
    norm_eps        epsilon of the norms
    rope_theta      RoPE base
    init_std        std of the normal init; residual output projections use std / sqrt(2 L)
    recompute       activation recomputation: "none" | "selective" (attention core only, as
                    Megatron's selective recompute) | "full" (every block)
    fused_kernels   use megatiny.kernels (Triton) for softmax / norms / cross-entropy when the
                    tensors are on CUDA (or TRITON_INTERPRET=1); plain torch otherwise
    """

    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    norm: str = "layernorm"
    activation: str = "gelu"
    position: str = "learned"
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    recompute: str = "none"
    fused_kernels: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        _choices("norm", self.norm, ("layernorm", "rmsnorm"))
        _choices("activation", self.activation, ("gelu", "swiglu"))
        _choices("position", self.position, ("learned", "rope"))
        _choices("recompute", self.recompute, ("none", "selective", "full"))
        if self.d_model % self.n_heads:
            good = [h for h in _divisors(self.d_model) if h <= 4 * self.n_heads]
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads in {good} or a d_model that is a multiple of {self.n_heads}"
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                f"choose n_kv_heads in {_divisors(self.n_heads)}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"rotary positions need an even head_dim, got d_model/n_heads = {self.head_dim}; "
                f"change d_model or n_heads"
            )
        if self.ffn_hidden is None:
            if self.activation == "swiglu":
                self.ffn_hidden = 8 * math.ceil(int(2 * 4 * self.d_model / 3) / 8)
            else:
                self.ffn_hidden = 4 * self.d_model
        if self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden={self.ffn_hidden} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps, init_std and rope_theta must be positive")

    # -- presets -------------------------------------------------------------------------------

    @classmethod
    def gpt2(cls, **overrides) -> ModelConfig:
        """GPT-2 family (defaults: GPT-2 small, 124M): learned positions, LayerNorm with bias,
        GELU MLP of 4h, tied embeddings."""
        base = dict(
            vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12,
            norm="layernorm", activation="gelu", position="learned", tie_embeddings=True,
            bias=True, norm_eps=1e-5,
        )  # fmt: skip
        return cls(**{**base, **overrides})

    @classmethod
    def llama(cls, **overrides) -> ModelConfig:
        """Llama family (defaults: Llama-2 7B shape): RoPE, RMSNorm, SwiGLU, no biases, untied
        head; set n_kv_heads < n_heads for grouped-query attention."""
        base = dict(
            vocab_size=32000, max_seq_len=4096, d_model=4096, n_layers=32, n_heads=32,
            n_kv_heads=None, norm="rmsnorm", activation="swiglu", position="rope",
            tie_embeddings=False, bias=False, norm_eps=1e-5, rope_theta=10000.0,
        )  # fmt: skip
        if "ffn_hidden" not in overrides and "d_model" not in overrides:
            base["ffn_hidden"] = 11008
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- derived sizes -------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Exact number of parameters of `GPT(self)` (shared tied weights counted once).
        `exclude_embeddings` drops the token and position tables (the usual "non-embedding" count)."""
        h, f, V = self.d_model, self.ffn_hidden, self.vocab_size
        b = 1 if self.bias else 0
        norm = h * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = h * (self.q_dim + 2 * self.kv_dim) + b * (self.q_dim + 2 * self.kv_dim)
        attn += self.q_dim * h + b * h
        n_in = 2 * f if self.activation == "swiglu" else f
        mlp = h * n_in + b * n_in + f * h + b * h
        total = self.n_layers * (2 * norm + attn + mlp) + norm
        embeddings = V * h + (self.max_seq_len * h if self.position == "learned" else 0)
        head = 0 if self.tie_embeddings else V * h
        return total + head + (0 if exclude_embeddings else embeddings)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward, no recomputation) per token, Megatron's formula.

        Megatron-LM (training.py, num_floating_point_operations; Narayanan et al. 2021) counts
        only matmuls, 2 FLOPs per multiply-add, backward = 2x forward (so 3 passes = factor 12
        with the factor 2 folded in), and the full s x s score matrix (no causal halving):

            F = 12 L h^2 [ (1 + g/n + s/h) * (n d_head / h)   attention: QKV, scores, values, out
                          + (f / h) * m                         MLP, m = 3/2 for SwiGLU else 1
                          + V / (2 L h) ]                       LM head

        with g kv heads, n query heads, f = ffn_hidden. For GPT-2 (g = n, f = 4h) this is the
        paper's 72 L h^2 (1 + s / 6h + V / 12 L h). MFU = tokens/s * F / peak FLOP/s.
        """
        s = self.max_seq_len if seq_len is None else seq_len
        h, L = self.d_model, self.n_layers
        gated = 1.5 if self.activation == "swiglu" else 1.0
        attention = (1 + self.n_kv_heads / self.n_heads + s / h) * (self.q_dim / h)
        mlp = self.ffn_hidden / h * gated
        logits = self.vocab_size / (2 * L * h)
        return 12.0 * L * h * h * (attention + mlp + logits)


# ---------------------------------------------------------------------------------------------
# Training configuration: parallel layout, optimizer/loop, data; YAML + dotted overrides.
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration problem, with a message that says what to change."""


@dataclass
class ParallelConfig:
    """The model-parallel layout. dp=None means world_size // (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int | None = None
    sequence_parallel: bool = False
    virtual_pipeline_size: int | None = None
    zero1: bool = False
    ddp_bucket_mb: float = 25.0  # gradient all-reduce bucket size (overlapped with backward)

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp is not None and self.dp < 1:
            raise ConfigError(f"parallel.dp={self.dp} must be >= 1 (or null to derive it)")
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
class TrainConfig:
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
    keep_checkpoints: int = 3
    resume: str = "none"  # none | auto (run_dir's latest) | path to a checkpoint directory
    nan_policy: str = "stop"  # stop: save a checkpoint and exit with an error | skip the step
    peak_tflops: float | None = None  # per device, for MFU; default from the GPU model name
    tensorboard: bool = True
    progress_bar: bool = True
    backend: str | None = None  # default: nccl with CUDA, else gloo

    def __post_init__(self):
        positive = ("steps", "micro_batch_size", "log_interval", "eval_iters", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_interval", "save_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= train.min_lr <= train.lr and lr > 0 (got {self.min_lr}, {self.lr})"
            )
        choices = {"precision": ("auto", "fp32", "bf16"), "nan_policy": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}; choose one of {allowed}")

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
        from megatiny.parallel.grid import build_grid

        p, m, t, d = self.parallel, self.model, self.train, self.data
        dp = p.data_parallel_size(world_size)
        try:
            build_grid(world_size, tp=p.tp, pp=p.pp, cp=p.cp, dp=dp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        heads = [("model.n_heads", m.n_heads)]
        if getattr(m, "n_kv_heads", None):
            heads.append(("model.n_kv_heads", m.n_kv_heads))
        for name, value in heads:
            if value % p.tp:
                ok = [k for k in range(1, value + 1) if value % k == 0]
                raise ConfigError(
                    f"{name}={value} is not divisible by parallel.tp={p.tp}; choose tp in {ok}"
                )
        if m.ffn_hidden % p.tp:
            raise ConfigError(
                f"model.ffn_hidden={m.ffn_hidden} is not divisible by parallel.tp={p.tp}"
            )
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
        t.accumulation_steps(dp)
        return dp

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
                raise ConfigError(_unknown(section, cls.SECTIONS, "config section"))
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            merged[section] = dict(values)
        for item in overrides:
            key, value = _parse_override(item)
            section, name = key.split(".", 1)
            merged.setdefault(section, {})[name] = value
        if merged.get("model", {}).get("vocab_size") == "auto":
            # Megatron-style: the vocabulary comes from the tokenizer the data was made with.
            merged["model"]["vocab_size"] = _tokenizer_vocab_size(merged.get("data", {}))
        sections = {}
        for section in cls.SECTIONS:
            section_cls = {
                "model": ModelConfig,
                "parallel": ParallelConfig,
                "train": TrainConfig,
                "data": DataConfig,
            }[section]
            values = merged.get(section, {})
            known = {f.name: f for f in fields(section_cls)}
            kwargs = {}
            for name, value in values.items():
                if name not in known:
                    full = [f"{section}.{k}" for k in known]
                    raise ConfigError(_unknown(f"{section}.{name}", full, "config key"))
                kwargs[name] = _coerce(value, section_cls, name, f"{section}.{name}")
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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _tokenizer_vocab_size(data: dict) -> int:
    path = data.get("tokenizer")
    if not path:
        raise ConfigError("model.vocab_size=auto needs data.tokenizer (a tokenizer dir or .json)")
    if not os.path.exists(path):
        raise ConfigError(
            f"data.tokenizer {path!r} not found (needed by model.vocab_size=auto); train one with "
            "`megatiny data train-tokenizer` or run `launch/prepare_demo_data.sh .demo`"
        )
    from megatiny.data.tokenizer import load_tokenizer

    return int(load_tokenizer(path).vocab_size)


def _unknown(key: str, known, what: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return f"unknown {what} {key!r}{hint}"


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like section.key=value (e.g. train.steps=20)"
        )
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    if "." not in key:
        raise ConfigError(
            f"override key {key!r} needs a section: one of {', '.join(Config.SECTIONS)} "
            f"(e.g. train.{key}={text})"
        )
    if key.split(".", 1)[0] not in Config.SECTIONS:
        raise ConfigError(_unknown(key.split(".", 1)[0], Config.SECTIONS, "config section"))
    return key, yaml.safe_load(text) if text.strip() else ""


def _coerce(value, section_cls, name: str, key: str):
    """Convert a YAML/CLI value to the annotated type of `section_cls.name` (int, float, bool,
    str, list, or None for optional fields); raise ConfigError saying what was expected."""
    hint = typing.get_type_hints(section_cls)[name]
    args = typing.get_args(hint) or (hint,)
    nullable_text = isinstance(value, str) and value.lower() in ("none", "null") and str not in args
    if value is None or nullable_text:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} cannot be null")
    for target in args:
        if target is type(None):
            continue
        if target is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            continue
        if target is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.replace("_", ""))
                except ValueError:
                    try:
                        f = float(value)
                        if f.is_integer():
                            return int(f)
                    except ValueError:
                        pass
            continue
        if target is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    continue
            continue
        if target is str:
            if isinstance(value, str):
                return value
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value)
            continue
        if target is list or typing.get_origin(target) is list:
            if isinstance(value, list | tuple):
                return list(value)
            continue
        return value  # an annotation we do not coerce (e.g. a nested type): pass through
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise ConfigError(f"{key}={value!r} is not a valid {expected}")


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """`Config.from_yaml(path, overrides)`: the entry point of `megatiny train`."""
    return Config.from_yaml(path, overrides)
