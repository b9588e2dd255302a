"""parallelize(model, ctx): turn a single-device GPT into this rank's tensor-parallel shard.

The plan (p = tp size, Megatron's parallel attention / MLP):

    embed            VocabParallelEmbedding       rows [r V'/p, (r+1) V'/p), V' = padded vocab
    attn.qkv         ColumnParallelLinear         splits [q, k, v]: rank r gets query heads
                                                  [r n/p, (r+1) n/p) and kv heads [r g/p, (r+1) g/p)
    attn.proj        RowParallelLinear            all-reduce (SP: reduce-scatter over the sequence)
    mlp.fc           ColumnParallelLinear         SwiGLU: splits [ffn, ffn] -> [gate_r | up_r]
    mlp.proj         RowParallelLinear
    lm_head          ColumnParallelLinear         weight padded to V' rows (zeros); tied: the
                                                  embedding's vocab shard is the head's shard
    loss             vocab_parallel_cross_entropy on the [b, s, V'/p] logits shard, never gathered
    norms, pos_embed replicated

With GQA, query head i uses kv head i // (n/g); splitting both segments evenly keeps each rank's
query heads with their kv heads. `forward(ids)` gathers the logits on every TP rank;
`forward(ids, labels=)` returns the loss from the vocab-parallel cross-entropy.

Sequence parallelism (`sequence_parallel=True`): outside the column/row regions activations are
sequence shards [b, s/p, h]; column-parallel inputs are all-gathered (backward reduce-scatter),
row-parallel outputs are reduce-scattered. Norms and residual/embedding dropout run on shards
(dropout under `TPRandom.fork()`, so each rank draws its own mask). Each rank's norm-weight
gradient covers only its shard, so the norms wrap their weights in `copy_to_tp` (identity
forward, all-reduce backward): the gradient is summed over TP inside autograd, and the training
loop needs no extra call. Learned positions are computed for the full sequence and scattered
(`scatter_to_sp`, backward all-gather), so their gradient is full on every rank too.

Meta device. A model built under `torch.device("meta")` is materialised shard by shard: for each
replaced module the full weight is generated on the CPU from `model.initial_value(name, shape)`
(the deterministic per-parameter init, so the result equals the same-seed model built on a real
device and sliced), sliced, and only the shard is kept, on `ctx.device`. Replicated parameters
(norms, positions) are generated whole. Peak extra memory is one full weight.

Create the optimizer after parallelize(): the parameters are new tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel.comm import copy_to_tp
from megatiny.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatiny.parallel.random import TPRandom


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp(config, tp: int) -> None:
    """Raise a ValueError naming the field and the valid tp values if `config` cannot be split."""
    for name in ("n_heads", "n_kv_heads", "ffn_hidden"):
        n = getattr(config, name)
        if n % tp:
            raise ValueError(
                f"{name}={n} is not divisible by tp={tp}; choose tp in {_divisors(n)} "
                f"(or change {name})"
            )


class _Source:
    """Full (unsharded) tensors of the model's parameters: the live ones, or, for parameters on
    the meta device, freshly generated initial values (CPU)."""

    def __init__(self, model):
        self.model = model

    def full(self, name: str, p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        if p.is_meta:
            return self.model.initial_value(name, p.shape, p.dtype)
        return p.detach()


def _param(t: torch.Tensor, device) -> nn.Parameter:
    return nn.Parameter(t.to(device).contiguous().clone())


def _column(src, name, linear: nn.Linear, group, sp, device, splits=None, pad_rows=0):
    w = src.full(name + ".weight", linear.weight)
    b = src.full(name + ".bias", linear.bias)
    if pad_rows:
        w = torch.cat([w, w.new_zeros(pad_rows, w.shape[1])])
    layer = ColumnParallelLinear(
        linear.in_features, w.shape[0], group, bias=b is not None, sequence_parallel=sp,
        device="meta", dtype=w.dtype, splits=splits,
    )  # fmt: skip
    layer.weight = _param(layer.shard(w), device)
    if b is not None:
        layer.bias = _param(layer.shard(b), device)
    return layer


def _row(src, name, linear: nn.Linear, group, sp, device):
    w = src.full(name + ".weight", linear.weight)
    b = src.full(name + ".bias", linear.bias)
    layer = RowParallelLinear(
        linear.in_features, linear.out_features, group, bias=b is not None,
        sequence_parallel=sp, device="meta", dtype=w.dtype,
    )  # fmt: skip
    layer.weight = _param(layer.shard(w), device)
    if b is not None:
        layer.bias = _param(b, device)
    return layer


def materialize(model, device) -> nn.Module:
    """Give every parameter of `model` a real tensor on `device`, in place, and return it:
    parameters on the meta device get their deterministic initial value (`initial_value`, so
    the same weights as the same-seed model built on a real device), the others are moved.

    With `keep_stages` (megatiny.parallel.pipeline) first, a pipeline rank allocates only its
    own stages' parameters; under TP `parallelize` calls this for the replicated ones."""
    src = _Source(model)
    for name, p in list(model.named_parameters()):
        if p.is_meta or p.device != torch.device(device):
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            module = model.get_submodule(owner)
            setattr(module, leaf, _param(src.full(name, p), device))
    return model


def parallelize(model, ctx, sequence_parallel: bool = False):
    """Shard `model` (a megatiny GPT) in place for this rank's TP group and return it.

    Modules may be None (e.g. a pipeline stage without embedding or head) and are skipped."""
    if model.tp_group is not None:
        raise ValueError("model is already parallelized")
    config, group, tp, sp = model.config, ctx.tp_group, ctx.tp_size, sequence_parallel
    check_tp(config, tp)
    device = ctx.device
    src = _Source(model)
    rng = TPRandom(None, ctx)
    grad_sum = functools.partial(copy_to_tp, group=group) if sp else None

    padded_vocab = None
    if getattr(model, "embed", None) is not None:
        full = src.full("embed.weight", model.embed.weight)
        emb = VocabParallelEmbedding(
            config.vocab_size, config.d_model, group, sequence_parallel=sp, device="meta",
            dtype=full.dtype,
        )  # fmt: skip
        emb.weight = _param(emb.shard(full), device)
        model.embed = emb
        padded_vocab = emb.padded_vocab_size

    for index, block in model.blocks.named_children():  # pipeline chunks keep global indices
        prefix = f"blocks.{index}."
        attn, mlp = block.attn, block.mlp
        qkv_splits = [config.q_dim, config.kv_dim, config.kv_dim]
        attn.qkv = _column(src, prefix + "attn.qkv", attn.qkv, group, sp, device, qkv_splits)
        attn.proj = _row(src, prefix + "attn.proj", attn.proj, group, sp, device)
        attn.n_heads, attn.n_kv_heads = config.n_heads // tp, config.n_kv_heads // tp
        attn.sharded_rng = rng.fork
        fc_splits = [config.ffn_hidden] * 2 if config.activation == "swiglu" else None
        mlp.fc = _column(src, prefix + "mlp.fc", mlp.fc, group, sp, device, fc_splits)
        mlp.proj = _row(src, prefix + "mlp.proj", mlp.proj, group, sp, device)
        block.norm1.weight_transform = block.norm2.weight_transform = grad_sum

    if getattr(model, "lm_head", None) is not None:
        if padded_vocab is None:  # a stage with the head but without the embedding
            multiple = tp * 128
            padded_vocab = -(-config.vocab_size // multiple) * multiple
        pad = padded_vocab - config.vocab_size
        model.lm_head = _column(src, "lm_head", model.lm_head, group, sp, device, pad_rows=pad)
    if getattr(model, "norm_f", None) is not None:
        model.norm_f.weight_transform = grad_sum

    materialize(model, device)  # replicated parameters: norms, positions
    model.tp_group = group
    model.sequence_parallel = sp
    model.sharded_rng = rng.fork if sp else model.sharded_rng
    return model


# --- gathering shards back to single-device shapes -------------------------------------------


def _gather_dim(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    p = dist.get_world_size(group)
    if p == 1:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(p)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def full_parameters(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its .grad with `grads=True`) gathered to its single-device shape, in
    single-device names and order, on every TP rank. For equivalence tests and for exporting a
    TP-trained model (`GPT(config).load_state_dict(full_parameters(model))`). Collective: call on
    every rank of the TP group."""
    group, V = model.tp_group, model.config.vocab_size
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            raise ValueError(f"parameter {name} has no gradient; run backward first")
        if group is None:
            out[name] = t.clone()
            continue
        owner, leaf = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        if isinstance(module, VocabParallelEmbedding):
            t = _gather_dim(t, group, 0)[:V]
        elif isinstance(module, ColumnParallelLinear):
            t = module.unshard(_gather_dim(t, group, 0), dim=0)
            if owner == "lm_head":
                t = t[:V]
        elif isinstance(module, RowParallelLinear) and leaf == "weight":
            t = _gather_dim(t, group, 1)
        out[name] = t.clone()
    return out
