"""Tensor-parallel layers built only from the mappings in `comm.py`.

Each layer takes its process group as a constructor argument and can be cut from a full
`nn.Linear` / `nn.Embedding` (`from_linear` / `from_embedding`), so the same seed gives the same
function for any tp. Activations are batch-first [b, s, h]; with `sequence_parallel` the tensors
outside the TP region are sequence shards [b, s/p, h] (p = tp size, dim 1 split).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatiny.config.model import divisors
from megatiny.kernels import check_ids
from megatiny.parallel import collectives
from megatiny.parallel.comm import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from megatiny.parallel.sharding import Sharding, shard_from_full
from megatiny.parallel.sp_linear import sequence_parallel_linear
from megatiny.split_backward import linear


def _check_divisible(what: str, n: int, tp: int) -> None:
    if n % tp:
        raise ValueError(
            f"{what}={n} is not divisible by tp={tp}; choose tp in {divisors(n)} (or change {what})"
        )


def _check_seq(x: torch.Tensor, tp: int, layer: str) -> None:
    if x.dim() < 2 or x.shape[1] % tp:
        raise ValueError(
            f"{layer} with sequence_parallel needs [batch, seq, ...] with seq divisible by tp={tp}, "
            f"got shape {tuple(x.shape)}; pad or choose the sequence length as a multiple of {tp}"
        )


def _param(t: torch.Tensor, device, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(t.to(device).contiguous().clone(), requires_grad=requires_grad)


class _ParallelLinear(nn.Module):
    """What the column- and row-parallel linears share: the group, the (sharded) parameters,
    nn.Linear's default init with the full layer's fan-in, and cutting from a full nn.Linear.
    `parameter_sharding` (megatiny/parallel/sharding.py) says how each parameter is split."""

    def __init__(self, in_features, out_features, group, weight_shape, bias_shape, device, dtype):
        super().__init__()
        self.group = group
        self.tp = dist.get_world_size(group)
        self.tp_rank = dist.get_rank(group)
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(bias_shape, **factory)) if bias_shape else None
        if self.weight.device.type != "meta":
            bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
            with torch.no_grad():
                for p in self.parameters():
                    p.uniform_(-bound, bound)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full weight (or of a tensor split like it)."""
        return shard_from_full(full, self.parameter_sharding["weight"])

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        return shard_from_full(full, self.parameter_sharding.get("bias", Sharding()))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, weight=None, bias=None, **kw):
        """Cut this rank's shard from a full `nn.Linear` (weight [out, in]). `weight` / `bias`
        replace the linear's full tensors (e.g. generated for a meta model); a meta weight gives a
        meta shard, to be materialised later. `device` defaults to the weight's."""
        w = linear.weight if weight is None else weight
        b = linear.bias if bias is None else bias
        device = kw.pop("device", w.device)
        layer = cls(
            linear.in_features, w.shape[0] + kw.get("padding", 0), group, bias=b is not None,
            device="meta", dtype=kw.pop("dtype", w.dtype), **kw,
        )  # fmt: skip
        if w.is_meta:
            return layer
        with torch.no_grad():
            # A frozen parameter stays frozen in its shard.
            frozen = not linear.weight.requires_grad
            layer.weight = _param(layer.shard(w.detach()), device, not frozen)
            if b is not None:
                trainable = linear.bias is None or linear.bias.requires_grad
                layer.bias = _param(layer.shard_bias(b.detach()), device, trainable)
        return layer


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A's output rows split over p ranks: A = [A_1; ...; A_p], Y_i = X A_i^T + b_i.

    Input X is replicated (backward all-reduces dX: `copy_to_tp`) or, with `sequence_parallel`, a
    sequence shard that is all-gathered first (backward reduce-scatters dX). The output is this
    rank's column block Y_i [..., out/p], or the full Y with `gather_output`.

    `splits` lists output-segment sizes of the full weight (e.g. [q, k, v] of a fused QKV); each
    segment is split evenly over p and this rank's pieces are concatenated, so Y_i holds
    [q_i | k_i | v_i]. `local_splits` gives those local segment sizes. The last `padding` of the
    out_features rows are zero padding the full layer lacks (an LM head padded like the vocab).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
        splits: list[int] | None = None,
        padding: int = 0,
    ):
        tp = dist.get_world_size(group)
        self_splits = list(splits) if splits is not None else [out_features]
        if sum(self_splits) != out_features:
            raise ValueError(f"splits={self_splits} must sum to out_features={out_features}")
        for i, seg in enumerate(self_splits):
            _check_divisible("out_features" if splits is None else f"splits[{i}]", seg, tp)
        local = out_features // tp
        super().__init__(
            in_features, out_features, group, (local, in_features), local if bias else 0,
            device, dtype,
        )  # fmt: skip
        self.splits = self_splits
        self.local_splits = [seg // tp for seg in self.splits]
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        rows = Sharding.split(0, "tp", tp, self.tp_rank, self.splits, padding, group)
        self.parameter_sharding = {"weight": rows, "bias": rows}

    def unshard(self, gathered: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Reorder a rank-major concatenation of local outputs along `dim` into the full order."""
        if len(self.splits) == 1:
            return gathered
        per_rank = gathered.chunk(self.tp, dim=dim)
        segs = [r.split(self.local_splits, dim=dim) for r in per_rank]
        return torch.cat([s[i] for i in range(len(self.splits)) for s in segs], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # saves only the shard X_i for backward, not the gathered X
            y = sequence_parallel_linear(x, self.weight, self.bias, self.group)
        else:
            y = linear(copy_to_tp(x, self.group), self.weight, self.bias)  # split_backward
        if self.gather_output:
            y = self.unshard(gather_from_tp(y, self.group))
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
            f"splits={self.splits}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}, bias={self.bias is not None}"
        )


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A's input columns split: A = [A_1 ... A_p], Y = sum_i X_i A_i^T + b.

    Input is this rank's feature block X_i [..., in/p] (`input_is_parallel`) or the full X, which is
    split here. The partial products are all-reduced (`reduce_from_tp`) or, with
    `sequence_parallel`, reduce-scattered along the sequence to [b, s/p, out]. The bias is replicated
    and added once, after the reduction; under sequence parallelism each rank adds it to its own
    sequence shard, so its gradient is summed over the TP group (`copy_to_tp` on the bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        tp = dist.get_world_size(group)
        _check_divisible("in_features", in_features, tp)
        if sequence_parallel and not input_is_parallel:
            raise ValueError(
                "RowParallelLinear with sequence_parallel=True needs input_is_parallel=True "
                "(its input comes from a ColumnParallelLinear)"
            )
        super().__init__(
            in_features, out_features, group, (out_features, in_features // tp),
            out_features if bias else 0, device, dtype,
        )  # fmt: skip
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        # Input columns split; the bias is replicated (undeclared).
        self.parameter_sharding = {
            "weight": Sharding.split(1, "tp", tp, self.tp_rank, (), 0, group)
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = linear(x, self.weight)  # F.linear, or its weight gradient deferred (split_backward)
        if self.sequence_parallel:
            _check_seq(y, self.tp, "RowParallelLinear")
            y = reduce_scatter_to_sp(y, self.group, dim=1)
            if self.bias is not None:
                y = y + copy_to_tp(self.bias, self.group)
            return y
        y = reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
            f"input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}, bias={self.bias is not None}"
        )


class VocabParallelEmbedding(nn.Module):
    """E[ids] with the vocabulary rows split: rank i holds rows [vocab_start, vocab_end).

    The vocabulary is padded to `padded_vocab_size`, a multiple of tp * padding_divisor (padded rows
    are zero and never looked up). Each rank looks up the ids in its range, writes zeros for the
    others, and the partial results are summed: all-reduce to the full [b, s, h], or with
    `sequence_parallel` reduce-scatter to [b, s/p, h].
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group,
        padding_divisor: int = 128,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding_divisor < 1:
            raise ValueError(f"padding_divisor={padding_divisor} must be >= 1")
        self.group = group
        self.tp = dist.get_world_size(group)
        self.tp_rank = dist.get_rank(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        multiple = self.tp * padding_divisor
        self.padded_vocab_size = math.ceil(num_embeddings / multiple) * multiple
        per_rank = self.padded_vocab_size // self.tp
        self.vocab_start = self.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.sequence_parallel = sequence_parallel
        padding = self.padded_vocab_size - num_embeddings
        self.parameter_sharding = {
            "weight": Sharding.split(0, "tp", self.tp, self.tp_rank, (), padding, group)
        }
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.normal_()
                self.weight[self._num_real_rows() :].zero_()

    def _num_real_rows(self) -> int:
        return max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)

    def shard(self, full_weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full [num_embeddings, dim] table, zero-padded to vocab_end."""
        return shard_from_full(full_weight, self.parameter_sharding["weight"])

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, weight=None, **kw):
        """Cut this rank's (padded) vocabulary shard from a full `nn.Embedding` (or from the full
        `weight` given, as `_ParallelLinear.from_linear`)."""
        w = emb.weight if weight is None else weight
        device = kw.pop("device", w.device)
        layer = cls(
            emb.num_embeddings, emb.embedding_dim, group, device="meta",
            dtype=kw.pop("dtype", w.dtype), **kw,
        )  # fmt: skip
        if w.is_meta:
            return layer
        with torch.no_grad():
            layer.weight = _param(layer.shard(w.detach()), device, emb.weight.requires_grad)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.num_embeddings, f"token ids must be in [0, {self.num_embeddings}), "
                  "got {bad}; check the tokenizer's vocab_size against the model's")  # fmt: skip
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            _check_seq(out, self.tp, "VocabParallelEmbedding")
            return reduce_scatter_to_sp(out, self.group, dim=1)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp}, "
            f"rows=[{self.vocab_start}, {self.vocab_end}), padded_vocab_size="
            f"{self.padded_vocab_size}, sequence_parallel={self.sequence_parallel}"
        )


def _all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        collectives.all_reduce(t, group, op=op)
    return t


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log sum_v exp(z_v) - z_target over the vocabulary split across ranks.

    With m = max_v z_v (all-reduce MAX), S = sum_v exp(z_v - m) (all-reduce SUM of local sums) and
    t = z_target - m (all-reduce SUM; only the owning rank contributes): loss = log S - t.
    Gradient: dz_v = (softmax_v - [v == target]) * dloss, computed locally on each shard.
    """

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, start, n_valid):
        per_rank = logits.shape[-1]
        z = logits.float()
        if n_valid < per_rank:
            z = z.masked_fill(torch.arange(per_rank, device=z.device) >= n_valid, float("-inf"))
        m = _all_reduce_(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
        z = z - m.unsqueeze(-1)
        ignored = target == ignore_index
        outside = (target < start) | (target >= start + per_rank) | ignored
        local = (target - start).masked_fill(outside, 0)
        picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        picked = _all_reduce_(picked, group)
        exp = z.exp()
        sum_exp = _all_reduce_(exp.sum(dim=-1), group)
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        softmax, local, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        # Subtract 1 at the target column on the rank that owns it.
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -onehot)
        grad.mul_(dloss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    group,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy of vocabulary-sharded logits, without gathering them.

    `logits_shard` [..., V_padded/p] holds this rank's contiguous vocabulary slice (rank i: columns
    [i*V_padded/p, (i+1)*V_padded/p)); `target` [...] holds global ids. Columns with global index
    >= `vocab_size` (padding) are excluded from the softmax. Returns the loss with `target`'s
    shape, 0 where target == ignore_index. Computed in fp32. `group` None means one rank.

    The one implementation: torch ops by default; with `fused` the Triton kernels
    (megatiny.kernels.cross_entropy.sharded_cross_entropy, which never materialises the softmax).
    Targets outside [0, vocab_size) raise on the CPU and trip a device-side assert on CUDA.
    """
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(
            f"logits_shard {tuple(logits_shard.shape)} and target {tuple(target.shape)} must "
            "agree on every dim but the last"
        )
    width = logits_shard.shape[-1]
    world, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    limit = world * width if vocab_size is None else vocab_size
    if not 0 < limit <= world * width:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {world * width}] (tp * logits_shard.shape[-1])"
        )
    message = f"targets must be in [0, {limit}) or ignore_index={ignore_index}, got {{bad}}"
    check_ids(target, limit, message, ignore_index)
    start = rank * width
    n_valid = max(0, min(width, limit - start))
    if fused:
        from megatiny.kernels.cross_entropy import sharded_cross_entropy

        return sharded_cross_entropy(
            logits_shard, target, group, ignore_index, start, n_valid, collectives.all_reduce
        )
    return _VocabParallelCrossEntropy.apply(
        logits_shard, target, group, ignore_index, start, n_valid
    )
