"""GPT: one decoder-only transformer, written once for a single device (in the spirit of nanoGPT).

    x_0 = E[ids] (+ P[pos])                         token (+ learned position) embedding
    x_l = x_{l-1} + Attn(Norm(x_{l-1}))             pre-norm causal self-attention
    x_l = x_l + MLP(Norm(x_l))                      GELU 4h, or SwiGLU: (silu(x W_g) * x W_u) W_d
    logits = Norm_f(x_L) W_head^T                   W_head = E when embeddings are tied

Two families are presets of `ModelConfig`: GPT-2 (learned positions, LayerNorm, GELU, tied head)
and Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention with n_kv_heads < n_heads).

Weight layouts are chosen for tensor parallelism (megatiny/parallel/parallelize.py):
- `attn.qkv` is one fused linear whose output is [q | k | v], each head-major (head 0's head_dim
  features, then head 1's, ...). Splitting each segment evenly over tp splits by heads.
- SwiGLU's `mlp.fc` is fused [gate | up]; split as two segments it stays [gate_r | up_r] per rank.

This file knows no parallelism: `parallelize(model, ctx)` (megatiny/parallel/parallelize.py)
swaps in parallel linears, token and position embeddings, norms (sequence parallelism), dropouts
on sharded activations, the attention core (per-rank dropout masks) and `output` (logits and loss
over a split vocabulary); `GPT.forward` runs the same code before and after.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatiny.chunked_loss import chunked_cross_entropy
from megatiny.config import ModelConfig
from megatiny.kernels import check_ids, use_kernels
from megatiny.moe import MoE
from megatiny.recompute import op_context_fn
from megatiny.split_backward import linear

# The two calls a dry run on meta tensors swaps (megatiny/plan/dryrun.py; training/memory.py
# counts checkpoint inputs): attention's SDPA and activation checkpointing.
RUNTIME = {"sdpa": F.scaled_dot_product_attention, "checkpoint": checkpoint}


@contextlib.contextmanager
def runtime(**calls):
    """Within the block, the model calls `calls` (keys of RUNTIME) instead of torch's."""
    saved = {key: RUNTIME[key] for key in calls}  # a KeyError names an unknown call
    RUNTIME.update(calls)
    try:
        yield
    finally:
        RUNTIME.update(saved)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * w (+ b), over the last dim."""

    def __init__(self, dim: int, eps: float, bias: bool, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def normalize(self, x, weight, bias):
        if use_kernels(self.fused, x):
            from megatiny.kernels.layernorm import layer_norm

            return layer_norm(x, weight, bias, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def forward(self, x):
        return self.normalize(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (as HF Llama)."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None

    def normalize(self, x, weight, bias=None):
        if use_kernels(self.fused, x):
            from megatiny.kernels.layernorm import rms_norm

            return rms_norm(x, weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def forward(self, x):
        return self.normalize(x, self.weight)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps, config.fused_kernels)
    return LayerNorm(config.d_model, config.norm_eps, config.bias, config.fused_kernels)


# --- rotary positions ------------------------------------------------------------------------


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos/sin [b|1, 1, s, head_dim] for positions p: angle_{p,i} = p / theta^(2i/d), the two
    halves of the head duplicated (rotate-half layout, as HF Llama)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float()
        / head_dim
    )
    angles = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a] over the head dim."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


# --- attention -------------------------------------------------------------------------------


def attention_core(q, k, v, *, causal_offset=0, dropout_p=0.0, fused=False):
    """softmax(q k^T / sqrt(d) + causal mask) v for q [b, n, s, d] and k, v [b, g, t, d], g | n
    (kv head j serves query heads j*n/g .. (j+1)*n/g - 1). Query i sits at absolute position
    causal_offset + i and sees keys 0 .. causal_offset + i (t = causal_offset + s).

    The one place the attention math lives: plain SDPA by default; with `fused` on CUDA (or
    TRITON_INTERPRET=1), megatiny.kernels' flash attention (O(s) memory, GQA without repeating
    k/v), or for dropout_p > 0, which it lacks, the fused scaled causal softmax on the scores."""
    n, g = q.shape[1], k.shape[1]
    s, t = q.shape[2], k.shape[2]
    if use_kernels(fused, q):
        from megatiny.kernels.flash_attention import MAX_HEAD_DIM, flash_attention
        from megatiny.kernels.softmax import scaled_causal_softmax

        if dropout_p == 0 and q.shape[-1] <= MAX_HEAD_DIM:
            return flash_attention(q, k, v, causal=True, causal_offset=causal_offset)

        if g != n:
            k, v = k.repeat_interleave(n // g, dim=1), v.repeat_interleave(n // g, dim=1)

        # The kernel's mask is bottom-right aligned: query i sees keys <= t - s + i.
        probs = scaled_causal_softmax(q @ k.transpose(-2, -1), 1.0 / math.sqrt(q.shape[-1]))
        return F.dropout(probs, dropout_p) @ v
    gqa = g != n  # SDPA maps query head i to kv head i // (n/g) itself
    if causal_offset == 0:
        return RUNTIME["sdpa"](q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    mask = None
    if s > 1:
        key_pos = torch.arange(t, device=q.device)
        mask = key_pos[None, :] <= (causal_offset + torch.arange(s, device=q.device))[:, None]
    return RUNTIME["sdpa"](q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


class CoreAttention(nn.Module):
    """The attention core as a module (no parameters): `attention_core` with the model's dropout
    and kernel choice. A module so that parallelize can wrap it (dropout on sharded heads draws
    per-rank masks) and context parallelism can replace it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dropout_p, self.fused = config.dropout, config.fused_kernels

    def forward(self, q, k, v, causal_offset: int = 0):
        p = self.dropout_p if self.training else 0.0
        return attention_core(q, k, v, causal_offset=causal_offset, dropout_p=p, fused=self.fused)


class KVCache:
    """Keys/values per layer, [b, kv_heads (local under TP), t, head_dim], grown by concatenation.
    `length` is the number of positions already cached (the next token's position)."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k, v):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """Fused QKV projection, (rotary,) attention core, output projection.

    `n_heads` / `n_kv_heads` are the heads this module computes: all of them on one device, the
    rank's share (n/tp, g/tp) after parallelize."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, config.q_dim + 2 * config.kv_dim, bias=config.bias)
        self.proj = nn.Linear(config.q_dim, config.d_model, bias=config.bias)
        self.core = CoreAttention(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.selective_recompute = config.recompute == "selective"

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, offset: int = 0):
        qkv = self.qkv(x)  # [b, s, (n + 2g) d]; under SP the input was gathered to the full s
        b, s, _ = qkv.shape
        d, n, g = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = qkv.split([n * d, g * d, g * d], dim=-1)
        q = q.view(b, s, n, d).transpose(1, 2)
        k = k.view(b, s, g, d).transpose(1, 2)
        v = v.view(b, s, g, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)
        if self.selective_recompute and torch.is_grad_enabled():
            y = RUNTIME["checkpoint"](self.core, q, k, v, offset, use_reentrant=False)
        else:
            y = self.core(q, k, v, offset)
        y = y.transpose(1, 2).reshape(b, s, n * d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GELU: proj(gelu(fc x)); SwiGLU: fc is fused [gate | up], proj(silu(gate) * up)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        n_in = 2 * config.ffn_hidden if self.swiglu else config.ffn_hidden
        self.fc = nn.Linear(config.d_model, n_in, bias=config.bias)
        self.proj = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.norm2 = make_norm(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_index) else MLP(config)

    def forward(self, x, rope=None, kv_cache=None, offset=0):
        x = x + self.attn(self.norm1(x), rope, kv_cache, offset)
        return x + self.mlp(self.norm2(x))


class LMOutput(nn.Module):
    """logits = h W^T (W: the LM head's or tied embedding's weight); `loss`: per-token cross-entropy
    (0 at labels -100), `chunk_tokens` at a time if > 0 (chunked_loss.py); TP: parallel.modules."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fused, self.chunk_tokens = config.fused_kernels, config.loss_chunk_tokens

    def logits(self, h, weight):
        return linear(h, weight)  # F.linear; under split backward its dW waits for W

    def loss(self, h, weight, labels):
        if self.chunk_tokens:
            return chunked_cross_entropy(h, weight, labels, self.chunk_tokens)
        logits = self.logits(h, weight).flatten(0, -2)
        if use_kernels(self.fused, logits):
            from megatiny.kernels.cross_entropy import cross_entropy

            return cross_entropy(logits, labels.flatten()).view_as(labels)
        return F.cross_entropy(logits.float(), labels.flatten(), reduction="none").view_as(labels)


class GPT(nn.Module):
    """The model. `forward(input_ids)` -> logits [b, s, V]; `forward(input_ids, labels=labels)`
    -> mean cross-entropy over positions with labels != -100 (times `loss_mask` when given).

    Labels are already shifted by the data pipeline (Megatron convention): labels[:, i] is the
    token that follows input_ids[:, i], so no shift happens here.

    Attributes: `config`, `embed` (token embedding), `pos_embed` (learned positions or None),
    `blocks`, `norm_f`, `lm_head` (None when tied), `output` (logits and loss from the final
    hidden states; a task such as classification swaps in its own). Pipeline stages call
    `embed_tokens`, `run_blocks`, `head_logits` / `head_loss` directly.

    Initialisation is deterministic per parameter: `init_seed` is drawn from torch's global RNG
    at construction, and each parameter's full tensor is generated by `initial_value(name, shape)`
    from a generator seeded with (init_seed, name). So the same torch.manual_seed gives the same
    weights whatever the construction order, device (meta included) or tensor-parallel size.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Drawn before any submodule exists: their default inits consume the global RNG on a
        # real device but not on meta.
        self.init_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.position == "learned"
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = make_norm(config)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.output = LMOutput(config)
        if not self.embed.weight.is_meta:
            self.init_weights()

    # -- initialisation ------------------------------------------------------------------------

    def initial_value(self, name: str, shape, dtype=torch.float32) -> torch.Tensor:
        """The initial full tensor of parameter `name` (CPU): norms 1, biases 0, residual output
        projections N(0, std / sqrt(2L)) (GPT-2 / Megatron scaled init), the rest N(0, std)."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        if "norm" in name:
            return torch.ones(shape, dtype=dtype)
        std = self.config.init_std
        if name.endswith(("attn.proj.weight", "mlp.proj.weight", "experts.proj_weight")):
            std = std / math.sqrt(2 * self.config.n_layers)
        g = torch.Generator().manual_seed((self.init_seed ^ zlib.crc32(name.encode())) % 2**63)
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, p.dtype))

    # -- the three stages ----------------------------------------------------------------------

    def _check_inputs(self, input_ids: torch.Tensor, offset: int) -> None:
        V, s = self.config.vocab_size, input_ids.shape[-1]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if offset + s > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {offset + s} tokens is longer than max_seq_len={self.config.max_seq_len}"
                "; truncate the input or build the model with a larger max_seq_len"
            )
        check_ids(input_ids, V, f"token id {{bad}} is outside the vocabulary [0, {V}); the "
                  "tokenizer and the model disagree: raise vocab_size or re-tokenize")  # fmt: skip

    @staticmethod
    def positions(input_ids, offset: int = 0):
        """The default position ids [1, s]: offset .. offset + s - 1."""
        s = input_ids.shape[-1]
        return torch.arange(offset, offset + s, device=input_ids.device)[None]

    def embed_tokens(self, input_ids, position_ids=None, offset: int = 0):
        """[b, s] token ids -> hidden states [b, s, h]."""
        self._check_inputs(input_ids, offset)
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            if position_ids is None:
                position_ids = self.positions(input_ids, offset)
            h = h + self.pos_embed(position_ids)
        return self.drop(h)

    def run_blocks(self, h, position_ids=None, kv_cache: KVCache | None = None, offset: int = 0):
        """The decoder blocks. `position_ids` are the positions of the whole sequence (RoPE needs
        them); by default offset .. offset + h.shape[1] - 1, so pass them when `h` is only a
        part of the sequence (as a sequence-parallel shard is)."""
        rope = None
        if self.config.position == "rope":
            if position_ids is None:
                position_ids = torch.arange(offset, offset + h.shape[1], device=h.device)[None]
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        mode = self.config.recompute if torch.is_grad_enabled() and kv_cache is None else "none"
        for block in self.blocks:
            if mode in ("full", "op"):  # op: torchtitan's policy, megatiny/recompute.py
                policy = {"context_fn": op_context_fn(block)} if mode == "op" else {}
                h = RUNTIME["checkpoint"](block, h, rope, use_reentrant=False, **policy)
            else:
                h = block(h, rope, kv_cache, offset)
        return h

    def head_weight(self) -> torch.Tensor:
        """W of logits = h W^T: the LM head's weight, or the token embedding's when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def head_logits(self, h):
        """Hidden states -> logits [b, s, V] over the whole vocabulary."""
        return self.output.logits(self.norm_f(h), self.head_weight())

    def head_loss(self, h, labels, loss_mask=None):
        """Mean per-token cross-entropy over labels != -100 (weighted by loss_mask)."""
        per_token = self.output.loss(self.norm_f(h), self.head_weight(), labels)
        mask = (labels != -100).to(per_token.dtype)
        if loss_mask is not None:
            mask = mask * loss_mask.to(per_token.dtype)
        return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(self, input_ids, labels=None, position_ids=None, loss_mask=None, kv_cache=None):
        offset = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            position_ids = self.positions(input_ids, offset)
        h = self.embed_tokens(input_ids, position_ids, offset)
        h = self.run_blocks(h, position_ids, kv_cache, offset)
        if labels is None:
            return self.head_logits(h)
        return self.head_loss(h, labels, loss_mask)
