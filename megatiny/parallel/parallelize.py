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
`forward(ids, labels=)` returns the loss from the vocab-parallel cross-entropy. Each swapped-in
layer declares how its parameters are split (`parameter_sharding`, megatiny/parallel/sharding.py:
the fused segments, the vocab padding); checkpoints, clipping and `full_parameters` read that.

    output           VocabParallelOutput          (megatiny/parallel/modules.py)
    attn.core        ShardedRNG                   attention dropout on sharded heads: per-rank masks
                     (cp > 1: around RingAttention or UlyssesAttention, context_parallel.py)
    mlp (an MoE)     ExpertParallelMoE            experts split over ep (all-to-all token dispatch)
                                                  and each expert over tp (experts.py)

Sequence parallelism (`sequence_parallel=True`): outside the column/row regions activations are
sequence shards [b, s/p, h]; column-parallel inputs are all-gathered (backward reduce-scatter),
row-parallel outputs are reduce-scattered. Norms and residual/embedding dropout run on shards:
the dropouts are wrapped in `ShardedRNG` (each rank draws its own mask) and the norms become
`SequenceParallel*Norm`, whose weights enter through `copy_to_tp` (identity forward, all-reduce
backward): each rank's gradient covers only its shard, so it is summed over TP inside autograd
and the training loop needs no extra call. Learned positions are computed for the full sequence
and scattered (`SequenceParallelPositionEmbedding`), so their gradient is full on every rank.

A task that replaces `model.output` (a classification head, say) gives its module a
`parallelize(ctx, sequence_parallel) -> nn.Module` method; parallelize calls it.

Meta device. A model built under `torch.device("meta")` is swapped to parallel modules whose
shards are still meta, then `materialize` (megatiny/parallel/build.py) gives each its shard from
the model's weight source: the deterministic per-parameter init (`model.initial_value(name,
shape)`, the full tensor generated and sliced, so the result equals the same-seed model built on
a real device and sliced) or a lazily loaded checkpoint's slices. Replicated parameters (norms,
positions) are whole. Peak extra memory is one full weight.

Create the optimizer after parallelize(): the parameters are new tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from megatiny.model import LMOutput
from megatiny.moe import MoE
from megatiny.parallel.build import materialize
from megatiny.parallel.context_parallel import apply_context_parallel
from megatiny.parallel.experts import ExpertParallelMoE, expert_source
from megatiny.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatiny.parallel.modules import (
    SequenceParallelPositionEmbedding,
    VocabParallelOutput,
    sequence_parallel_norm,
)
from megatiny.parallel.random import ShardedRNG, TPRandom
from megatiny.parallel.sharding import full_from_shard, sharding_of

_TP_MODULES = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelOutput)


def tp_group_of(model: nn.Module):
    """The TP group `model` was parallelized over, or None for a single-device model."""
    for module in model.modules():
        if isinstance(module, _TP_MODULES):
            return module.group
    return None


def is_sequence_parallel(model: nn.Module) -> bool:
    return any(
        getattr(m, "sequence_parallel", False)
        for m in model.modules()
        if isinstance(m, _TP_MODULES)
    )


def parallelize(model, ctx, sequence_parallel: bool = False, cp_mode: str = "ring"):
    """Shard `model` (a megatiny GPT) in place for this rank's TP group and return it; with
    ctx.cp_size > 1 also swap the attention cores for context-parallel ones (`cp_mode` ring or
    a2a: megatiny/parallel/context_parallel.py).

    Modules may be None (e.g. a pipeline stage without embedding or head) and are skipped."""
    if tp_group_of(model) is not None:
        raise ValueError("model is already parallelized")
    config, group, tp, sp = model.config, ctx.tp_group, ctx.tp_size, sequence_parallel
    config.check_tp(tp)
    device = ctx.device
    rng = TPRandom(None, ctx)

    def column(linear, splits=None, padding=0):  # a meta linear gives a meta shard
        return ColumnParallelLinear.from_linear(
            linear, group, sequence_parallel=sp, device=device, splits=splits, padding=padding
        )

    def row(linear):
        return RowParallelLinear.from_linear(linear, group, sequence_parallel=sp, device=device)

    padded_vocab = None
    if getattr(model, "embed", None) is not None:
        model.embed = VocabParallelEmbedding.from_embedding(
            model.embed, group, sequence_parallel=sp, device=device
        )
        padded_vocab = model.embed.padded_vocab_size
    if sp and getattr(model, "pos_embed", None) is not None:
        model.pos_embed = SequenceParallelPositionEmbedding(model.pos_embed, group)
    if sp and getattr(model, "drop", None) is not None:
        model.drop = ShardedRNG(model.drop, rng)

    for index, block in model.blocks.named_children():  # pipeline chunks keep global indices
        prefix = f"blocks.{index}."
        attn, mlp = block.attn, block.mlp
        qkv_splits = [config.q_dim, config.kv_dim, config.kv_dim]
        attn.qkv = column(attn.qkv, splits=qkv_splits)
        attn.proj = row(attn.proj)
        attn.n_heads, attn.n_kv_heads = config.n_heads // tp, config.n_kv_heads // tp
        attn.core = ShardedRNG(attn.core, rng)
        if isinstance(mlp, MoE):  # experts over ep x tp, token all-to-all (experts.py)
            meta = mlp.experts.fc_weight.is_meta  # meta: sharded by materialize below
            full = (lambda leaf, p: p) if meta else expert_source(model, prefix + "mlp.experts.")
            block.mlp = mlp = ExpertParallelMoE(mlp, ctx, sp, full, "meta" if meta else device)
        else:
            fc_splits = [config.ffn_hidden] * 2 if config.activation == "swiglu" else None
            mlp.fc = column(mlp.fc, splits=fc_splits)
            mlp.proj = row(mlp.proj)
        if sp:
            attn.resid_dropout = ShardedRNG(attn.resid_dropout, rng)
            mlp.dropout = ShardedRNG(mlp.dropout, rng)
            block.norm1 = sequence_parallel_norm(block.norm1, group)
            block.norm2 = sequence_parallel_norm(block.norm2, group)

    if getattr(model, "lm_head", None) is not None:
        if padded_vocab is None:  # a stage with the head but without the embedding
            multiple = tp * 128
            padded_vocab = -(-config.vocab_size // multiple) * multiple
        # vocabulary padding of an untied head: zero rows
        model.lm_head = column(model.lm_head, padding=padded_vocab - config.vocab_size)
    if sp and getattr(model, "norm_f", None) is not None:
        model.norm_f = sequence_parallel_norm(model.norm_f, group)
    output = getattr(model, "output", None)
    if isinstance(output, LMOutput):
        model.output = VocabParallelOutput(group, config.vocab_size, sp, output.fused,
                                           output.chunk_tokens)  # fmt: skip
    elif output is not None:
        if not hasattr(output, "parallelize"):
            raise TypeError(
                f"model.output is a {type(output).__name__}, which parallelize does not know: "
                "give it a parallelize(ctx, sequence_parallel) method returning its TP version"
            )
        model.output = output.parallelize(ctx, sp)

    materialize(model, device)  # meta shards, and replicated norms, positions, task heads
    if getattr(ctx, "cp_size", 1) > 1:
        apply_context_parallel(model, ctx, cp_mode)
    return model


# --- gathering shards back to single-device shapes -------------------------------------------


@torch.no_grad()
def full_parameters(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its .grad with `grads=True`) gathered to its single-device shape, in
    single-device names and order, on every rank. For equivalence tests and for exporting a
    TP-trained model (`GPT(config).load_state_dict(full_parameters(model))`). Collective: call on
    every rank of the groups the parameters are split over (megatiny/parallel/sharding.py: tp,
    and with expert parallelism ep)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            raise ValueError(f"parameter {name} has no gradient; run backward first")
        owner, _, leaf = name.rpartition(".")
        out[name] = full_from_shard(t, sharding_of(model.get_submodule(owner), leaf))
    return out
