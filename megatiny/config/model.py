"""`ModelConfig`: the shape of one decoder-only GPT (see megatiny/model.py), its GPT-2 and
Llama presets, and the sizes derived from it (exact parameter count, training FLOPs per token).
Validates itself in `__post_init__` with a message that says what is wrong and what to change.

`divisors` and `ModelConfig.check_tp` are the one divisibility check for tensor parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


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
                    Megatron's selective recompute) | "op" (torchtitan's op-level policy: per
                    block keep every other matmul output and the attention output, recompute
                    the rest) | "full" (every block)
    loss_chunk_tokens  tokens per chunk of the output projection + cross-entropy (0: unchunked);
                    chunked, the loss holds one chunk's logits at a time (megatiny/chunked_loss.py)
    fused_kernels   use megatiny.kernels (Triton) for softmax / norms / cross-entropy when the
                    tensors are on CUDA (or TRITON_INTERPRET=1); plain torch otherwise
    dtype           "fp32" | "bf16": the training run's parameter dtype; bf16 keeps fp32 main
                    parameters and gradient buckets in the optimizer (Megatron's --bf16)
    moe_experts     experts per mixture-of-experts layer (0: a dense model; megatiny/moe.py)
    moe_top_k       experts each token is routed to
    moe_every       block i's MLP is an MoE layer when i % moe_every == 0 (1: every block)
    moe_capacity_factor  None: dropless; c: each expert takes at most ceil(c N k / E) of a
                    micro-batch's N k assignments (per rank), the rest are dropped
    moe_aux_loss_coeff   weight of the Switch/GShard load-balancing loss E sum_e f_e P_e
    moe_z_loss_coeff     weight of the router z-loss mean_t logsumexp(router logits)^2
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
    loss_chunk_tokens: int = 0
    dtype: str = "fp32"
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_capacity_factor: float | None = None
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: float = 0.001

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        _choices("norm", self.norm, ("layernorm", "rmsnorm"))
        _choices("activation", self.activation, ("gelu", "swiglu"))
        _choices("position", self.position, ("learned", "rope"))
        _choices("recompute", self.recompute, ("none", "selective", "op", "full"))
        _choices("dtype", self.dtype, ("fp32", "bf16"))
        if self.d_model % self.n_heads:
            good = [h for h in divisors(self.d_model) if h <= 4 * self.n_heads]
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads in {good} or a d_model that is a multiple of {self.n_heads}"
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                f"choose n_kv_heads in {divisors(self.n_heads)}"
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
        chunk = self.loss_chunk_tokens
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ValueError(
                f"loss_chunk_tokens={chunk!r} must be an integer >= 0 (0: the loss is not "
                "chunked; e.g. 4096 holds 4096 tokens' logits at a time)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps, init_std and rope_theta must be positive")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.moe_experts < 0:
            raise ValueError(f"moe_experts={self.moe_experts} must be >= 0 (0: a dense model)")
        if not self.moe_experts:
            return
        if not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(
                f"moe_top_k={self.moe_top_k} must be in [1, moe_experts={self.moe_experts}]"
            )
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be >= 1 (1: every block)")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(
                f"moe_capacity_factor={self.moe_capacity_factor} must be > 0, or null (dropless)"
            )
        if self.moe_aux_loss_coeff < 0 or self.moe_z_loss_coeff < 0:
            raise ValueError("moe_aux_loss_coeff and moe_z_loss_coeff must be >= 0")

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index`'s MLP is a mixture of experts (Megatron's moe_layer_freq)."""
        return self.moe_experts > 0 and index % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

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

    def tp_sizes(self) -> list[int]:
        """The tensor-parallel sizes this model splits over: the common divisors of n_heads,
        n_kv_heads and ffn_hidden (the vocabulary is padded to fit any tp)."""
        fields = (self.n_heads, self.n_kv_heads, self.ffn_hidden)
        return [t for t in divisors(self.n_heads) if all(n % t == 0 for n in fields)]

    def check_tp(self, tp: int, prefix: str = "") -> None:
        """Raise a ValueError naming the field and the tp values that work for every field."""
        for name in ("n_heads", "n_kv_heads", "ffn_hidden"):
            n = getattr(self, name)
            if n % tp:
                raise ValueError(
                    f"{prefix}{name}={n} is not divisible by tp={tp}; choose tp in "
                    f"{self.tp_sizes()} (or change {prefix}{name})"
                )

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
        moe = self.moe_experts * (h * n_in + f * h) + self.moe_experts * h  # experts + router
        dense_layers = self.n_layers - self.moe_layers
        total = self.n_layers * (2 * norm + attn) + dense_layers * mlp + self.moe_layers * moe
        total += norm
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
        In an MoE layer a token runs through moe_top_k experts (its MLP term times k; the router
        and dropped tokens are not counted, as Megatron).
        """
        s = self.max_seq_len if seq_len is None else seq_len
        h, L = self.d_model, self.n_layers
        gated = 1.5 if self.activation == "swiglu" else 1.0
        attention = (1 + self.n_kv_heads / self.n_heads + s / h) * (self.q_dim / h)
        active = (L - self.moe_layers + self.moe_layers * self.moe_top_k) / L
        mlp = self.ffn_hidden / h * gated * active
        logits = self.vocab_size / (2 * L * h)
        return 12.0 * L * h * h * (attention + mlp + logits)
