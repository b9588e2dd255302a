"""Context parallelism: the sequence of every sample split over the cp group.

    model = parallelize(GPT(cfg), ctx, cp_mode="ring")       # or apply_context_parallel(model, ctx)
    batch = split_batch(full_batch, ctx.cp_rank, ctx.cp_size, zigzag=True)   # my tokens + positions
    loss = context_parallel_loss(model(**batch), batch["labels"], batch["loss_mask"], ctx.cp_group)

Everything outside attention is per token, so it runs unchanged on this rank's tokens: only the
attention core (`attn.core`) needs the other ranks' keys and values. `apply_context_parallel`
swaps it for one of two cores (the model file does not change):

- `RingAttention` (cp_mode=ring, megatiny/parallel/ring_attention.py): K/V blocks travel around
  the ring, partial results merged by log-sum-exp; the sequence is laid out zig-zag (rank r holds
  chunks r and 2p-1-r of 2p) so every rank does the same causal work. Needs S % 2p == 0.
- `UlyssesAttention` (cp_mode=a2a, DeepSpeed-Ulysses): an all-to-all turns [heads, S/p] into
  [heads/p, S] (heads scattered, sequence gathered), the ordinary attention core runs on whole
  sequences of n/p heads, and a second all-to-all turns the output back. The sequence is laid out
  in p contiguous chunks. Needs S % p == 0 and the (TP-local) query heads divisible by p; kv heads
  are repeated only when fewer than p (GQA with g < p; g must then divide p).

Positions: RoPE and learned positions need each token's global position, which the data path
supplies as `position_ids` (`split_batch`); `GPT.forward`'s default (0 .. s-1) would be wrong.

Loss: each rank's `head_loss` is the mean over its own tokens. `context_parallel_loss` turns it
into the full-sequence mean on every cp rank, L = sum_r S_r / sum_r C_r (S_r: rank r's summed
token losses, C_r its counted tokens; one all-reduce of two numbers), exactly what one rank
computes. Its backward gives rank r d L / d S_r times p: the gradients are then *averaged* over
dp x cp (DistributedDataParallel over ctx.dp_cp_group, as Megatron does), and the average over
the p cp ranks of p x (rank r's part) is the sum of the parts, the full-sequence gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel import collectives
from megatiny.parallel.random import ShardedRNG
from megatiny.parallel.ring_attention import ring_attention

CP_MODES = ("ring", "a2a")

# ---- layout: which tokens a cp rank holds ------------------------------------------------------


def local_positions(seq_length: int, cp_rank: int, cp_size: int, zigzag: bool = True):
    """The global positions [S/p] of cp rank r's tokens, in the order the rank holds them: chunks
    r and 2p-1-r of 2p (zig-zag, ring attention) or chunk r of p (contiguous, all-to-all)."""
    chunks = 2 * cp_size if zigzag else cp_size
    if seq_length % chunks:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by {'2*' if zigzag else ''}cp = "
            f"{chunks}; use a multiple of {chunks}"
        )
    c = seq_length // chunks
    mine = [cp_rank, chunks - 1 - cp_rank] if zigzag else [cp_rank]
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in mine])


def split_batch(batch: dict, cp_rank: int, cp_size: int, zigzag: bool = True, dim: int = 1):
    """This cp rank's part of a micro-batch of whole samples (dim=1), or of one sample (dim=0):
    input_ids, labels, loss_mask and position_ids at its tokens, and, when there were no
    position_ids, the global positions ([1, S/p], or [S/p] for a sample)."""
    ids = batch["input_ids"]
    seq = ids.shape[dim]
    index = local_positions(seq, cp_rank, cp_size, zigzag).to(ids.device)
    out = dict(batch)
    for key in ("input_ids", "labels", "loss_mask", "position_ids"):
        t = batch.get(key)
        if t is not None and t.dim() > dim and t.shape[dim] == seq:
            out[key] = t.index_select(dim, index)
    if batch.get("position_ids") is None:
        out["position_ids"] = index if dim == 0 else index[None]
    return out


class ContextParallelSamples:
    """The samples of `dataset` (dicts of 1-D tensors) as cp rank `cp_rank` sees them: its
    tokens of each sample and their global positions (`split_batch` along dim 0)."""

    def __init__(self, dataset, cp_rank: int, cp_size: int, zigzag: bool):
        self.dataset, self.cp_rank, self.cp_size, self.zigzag = dataset, cp_rank, cp_size, zigzag

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i) -> dict:
        return split_batch(self.dataset[i], self.cp_rank, self.cp_size, self.zigzag, dim=0)


def gather_sequence(local: torch.Tensor, group, zigzag: bool = True, dim: int = 1):
    """The whole sequence from every cp rank's part along `dim`, in token order (for tests and
    inspection; no gradient)."""
    p = dist.get_world_size(group)
    if p == 1:
        return local.clone()
    x = local.movedim(dim, 0).contiguous()
    out = torch.empty((p * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.all_gather_into(out, x, group)
    order = torch.cat([local_positions(out.shape[0], r, p, zigzag) for r in range(p)])
    full = torch.empty_like(out)
    full[order.to(out.device)] = out
    return full.movedim(0, dim)


# ---- the loss over the whole sequence ----------------------------------------------------------


class _FullSequenceMean(torch.autograd.Function):
    """L = sum_r S_r / sum_r C_r from rank r's mean loss S_r / C_r and count C_r; dS_r = p dL
    (the dp x cp gradient average divides by p again)."""

    @staticmethod
    def forward(ctx, local_mean, count, group):
        sums = torch.stack([local_mean.float() * count, count.float()])
        collectives.all_reduce(sums, group)
        total = sums[1].clamp(min=1.0)
        ctx.scale = dist.get_world_size(group) * count.float() / total
        return (sums[0] / total).to(local_mean.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale.to(grad.dtype), None, None


def context_parallel_loss(local_mean, labels, loss_mask, group):
    """The full-sequence mean loss on every cp rank from this rank's `head_loss` (the mean over
    its tokens with labels != -100, weighted by loss_mask); see the module docstring."""
    if group is None or dist.get_world_size(group) == 1:
        return local_mean
    mask = (labels != -100).float()
    if loss_mask is not None:
        mask = mask * loss_mask.float()
    return _FullSequenceMean.apply(local_mean, mask.sum(), group)


# ---- all-to-all (Ulysses) ----------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into p blocks along scatter_dim, send block j to rank j, concatenate the blocks
    received (rank-major) along gather_dim."""
    p = dist.get_world_size(group)
    blocks = torch.stack(x.chunk(p, dim=scatter_dim)).contiguous()  # [p, ...]
    out = torch.empty_like(blocks)
    collectives.all_to_all(out, blocks, group)
    return torch.cat(out.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim`, gather `gather_dim` over the group; backward is the same exchange
    with the two dims swapped."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim=scatter_dim, gather_dim=gather_dim)

    @staticmethod
    def backward(ctx, dy):
        scatter_dim, gather_dim = ctx.dims
        dx = _all_to_all(dy, ctx.group, scatter_dim=gather_dim, gather_dim=scatter_dim)
        return dx, None, None, None


def seq_to_heads(x, group):
    """[b, h, s/p, d] -> [b, h/p, s, d]: heads scattered, sequence gathered."""
    return _AllToAll.apply(x, group, 1, 2)


def heads_to_seq(x, group):
    """[b, h/p, s, d] -> [b, h, s/p, d]: the inverse of seq_to_heads."""
    return _AllToAll.apply(x, group, 2, 1)


# ---- the attention cores -------------------------------------------------------------------------


def _no_cache(offset: int) -> None:
    if offset:
        raise NotImplementedError(
            "context-parallel attention does not run KV-cache decoding: generation with cp > 1 "
            "is not supported; generate with the checkpoint on a layout without cp (it is "
            "layout-free)"
        )


class RingAttention(nn.Module):
    """Causal attention over the cp group's zig-zag chunks (megatiny/parallel/ring_attention.py).
    `core` is the model's CoreAttention (its kernel choice is kept; dropout is refused)."""

    zigzag = True

    def __init__(self, core: nn.Module, ctx):
        super().__init__()
        self.core, self.group = core, ctx.cp_group
        self.ranks, self.rank = list(ctx.cp_ranks), ctx.cp_rank

    def forward(self, q, k, v, causal_offset: int = 0):
        _no_cache(causal_offset)
        if self.training and self.core.dropout_p > 0:
            raise ValueError(
                f"ring attention has no attention dropout (model.dropout={self.core.dropout_p}); "
                "set model.dropout=0 or use parallel.cp_mode=a2a"
            )
        return ring_attention(q, k, v, self.group, self.ranks, self.rank, self.core.fused)


class UlyssesAttention(nn.Module):
    """All-to-all attention: `core` (the model's CoreAttention, dropout and kernels included) runs
    on whole sequences of n/p query heads and their kv heads."""

    zigzag = False

    def __init__(self, core: nn.Module, ctx):
        super().__init__()
        self.core, self.group, self.size = core, ctx.cp_group, ctx.cp_size

    def forward(self, q, k, v, causal_offset: int = 0):
        _no_cache(causal_offset)
        n, g, p = q.shape[1], k.shape[1], self.size
        check_a2a_heads(n, g, p)
        if g % p:  # fewer kv heads than ranks: kv head j serves ranks j*p/g .. (j+1)*p/g - 1
            k, v = k.repeat_interleave(p // g, dim=1), v.repeat_interleave(p // g, dim=1)
        b = k.shape[0]
        q = seq_to_heads(q, self.group)
        kv = seq_to_heads(torch.cat([k, v]), self.group)  # k and v stacked along the batch
        y = self.core(q, kv[:b], kv[b:], 0)
        return heads_to_seq(y, self.group)


def check_a2a_heads(n_heads: int, n_kv_heads: int, cp: int, what: str = "") -> None:
    """All-to-all attention needs the query heads divisible by cp and the kv heads either
    divisible by cp or dividing it. (`what` names the config keys in the message.)"""
    if n_heads % cp:
        ok = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        raise ValueError(
            f"parallel.cp_mode=a2a scatters the {what}query heads ({n_heads}) over cp={cp}, which "
            f"does not divide them; choose cp in {ok} or use parallel.cp_mode=ring"
        )
    if n_kv_heads % cp and cp % n_kv_heads:
        raise ValueError(
            f"parallel.cp_mode=a2a needs the {what}kv heads ({n_kv_heads}) divisible by cp={cp} "
            "or dividing it; change cp or use parallel.cp_mode=ring"
        )


_CORES = {"ring": RingAttention, "a2a": UlyssesAttention}


def apply_context_parallel(model: nn.Module, ctx, mode: str = "ring") -> nn.Module:
    """Swap every block's attention core for the context-parallel one (in place; returns `model`).

    A core wrapped by TP's `ShardedRNG` stays wrapped (dropout masks per rank) around the new
    core. A no-op at cp == 1."""
    if mode not in CP_MODES:
        raise ValueError(f"cp_mode={mode!r}; choose one of {CP_MODES}")
    if ctx.cp_size == 1:
        return model
    if cp_group_of(model) is not None:
        raise ValueError("model is already context-parallel")
    for block in model.blocks.children():
        attn = block.attn
        if mode == "a2a":
            check_a2a_heads(attn.n_heads, attn.n_kv_heads, ctx.cp_size, "TP-local ")
        if isinstance(attn.core, ShardedRNG):
            attn.core.module = _CORES[mode](attn.core.module, ctx)
        else:
            attn.core = _CORES[mode](attn.core, ctx)
    return model


def context_parallel_core(model: nn.Module):
    """The first context-parallel attention core of `model` (or a pipeline chunk), or None."""
    for module in model.modules():
        if isinstance(module, RingAttention | UlyssesAttention):
            return module
    return None


def cp_group_of(model: nn.Module):
    """The cp group `model` was made context-parallel over, or None."""
    core = context_parallel_core(model)
    return None if core is None else core.group
