"""Expert parallelism: the MoE layer of megatiny/moe.py with its experts split over an ep group
(carved from dp, megatiny/parallel/grid.py) and each expert's MLP split over tp.

Expert parallelism (p = ep size, E experts, rank r holds experts [r E/p, (r+1) E/p)). Every ep rank
routes its own tokens (it is a data-parallel replica: different tokens), sorts the N k assignments
by expert, and then

    counts   all-to-all of the [E] per-expert counts          rank j learns how many rows it gets
    dispatch all_to_all_single(rows, splits = counts per rank)  my rows for expert e go to its owner
    experts  the received rows regrouped by local expert, each expert's MLP on its rows
    combine  all_to_all_single back (the splits swapped)         outputs return in dispatch order

and the gate-weighted sum y_t = sum_j g_t,j out_t,j is formed where the token lives. Backward is
the same two all-to-alls with the splits swapped (`_AllToAll`). An expert's weight gradient sums
the contributions of the tokens of all ep ranks; data-parallel averaging then runs over the
expert-data-parallel group (edp = dp / ep replicas of the same experts) with the 1/dp factor of
the whole dp group (megatiny/parallel/data_parallel.py).

Tensor parallelism (q = tp size), Megatron's MLP split inside every expert: fc rows [gate_r | up_r],
proj columns [f/q]. Every tp rank routes the same tokens (the full sequence: under sequence
parallelism the input is all-gathered first), so each computes its partial sum of every expert
output; the gate-weighted sum of partials is reduced once at the exit (all-reduce, or
reduce-scatter under SP), as the dense MLP does. Gradients stay exact on every tp rank:

    gates     enter through copy_to_tp (backward: the partial dL/dg summed over tp)
    router    input gradient scaled by 1/q (the router's gradient is then identical on the q ranks,
              and the entry's all-reduce / reduce-scatter adds it q times)

so the router weight (replicated over tp) gets its full gradient on every rank without a reduction,
and the aux losses (computed on the same routing on every tp rank) need no correction either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatiny.moe import Experts, MoE, metrics_from_totals, moe_stat_totals
from megatiny.parallel import collectives
from megatiny.parallel.comm import copy_to_tp, gather_from_sp, reduce_from_tp, reduce_scatter_to_sp
from megatiny.parallel.sharding import Sharding, Split, shard_from_full


class _AllToAll(torch.autograd.Function):
    """Rows [sum(in_splits), ...] -> [sum(out_splits), ...]; backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        collectives.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        dx = dy.new_empty((sum(in_splits),) + tuple(dy.shape[1:]))
        collectives.all_to_all_single(dx, dy.contiguous(), in_splits, out_splits, ctx.group)
        return dx, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.scale, None


def all_to_all_rows(x, out_splits: list[int], in_splits: list[int], group):
    """Differentiable variable-size all-to-all of the rows of `x` over `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def expert_major_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """Rows received source-major ([ep, local experts] blocks of recv_counts[j, e] rows) ->
    the permutation that groups them by local expert (source order inside an expert)."""
    sizes = recv_counts.reshape(-1)
    starts = (sizes.cumsum(0) - sizes).view_as(recv_counts)
    ep, n = recv_counts.shape
    pieces = [
        torch.arange(int(starts[j, e]), int(starts[j, e] + recv_counts[j, e]))
        for e in range(n)
        for j in range(ep)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class ExpertShard(Experts):
    """This rank's experts [ep_rank E/p, ...), each cut to its tp slice; `parameter_sharding`
    (megatiny/parallel/sharding.py) declares both splits: the expert dim 0 over ep, and fc's
    rows (per [gate | up] segment with SwiGLU) or proj's columns over tp."""

    def __init__(self, experts: Experts, ctx, full: Callable, device):
        nn.Module.__init__(self)
        self.swiglu = experts.swiglu
        self.tp_group, self.ep_group = ctx.tp_group, ctx.ep_group
        self.tp_size, self.tp_rank, self.ep_size, self.ep_rank = (
            ctx.tp_size, ctx.tp_rank, ctx.ep_size, ctx.ep_rank
        )  # fmt: skip
        f = experts.proj_weight.shape[2]
        over_ep = Split(0, "ep", ctx.ep_size, ctx.ep_rank, process_group=ctx.ep_group)
        tp = (ctx.tp_size, ctx.tp_rank, (f, f) if self.swiglu else ())
        self.parameter_sharding = {
            "fc_weight": Sharding((over_ep, Split(1, "tp", *tp, process_group=ctx.tp_group))),
            "proj_weight": Sharding((over_ep, Split(2, "tp", *tp[:2], process_group=ctx.tp_group))),
        }
        trainable = experts.fc_weight.requires_grad
        for leaf in ("fc_weight", "proj_weight"):
            shard = shard_from_full(
                full(leaf, getattr(experts, leaf)), self.parameter_sharding[leaf]
            )
            setattr(self, leaf, nn.Parameter(shard.to(device).clone(), requires_grad=trainable))


class ExpertParallelMoE(MoE):
    """An MoE layer over an ep group (token all-to-all) and a tp group (split experts); see the
    module doc. Built from the single-device layer by `apply_expert_parallel` / `parallelize`."""

    def __init__(self, moe: MoE, ctx, sequence_parallel: bool = False, full: Callable | None = None,
                 device=None):  # fmt: skip
        nn.Module.__init__(self)
        for attr in ("num_experts", "top_k", "capacity_factor", "aux_loss_coeff",
                     "z_loss_coeff", "aux_loss_scale", "stats"):  # fmt: skip
            setattr(self, attr, getattr(moe, attr))
        if self.num_experts % ctx.ep_size:
            raise ValueError(
                f"moe_experts={self.num_experts} is not divisible by ep={ctx.ep_size}; choose ep "
                f"in {[e for e in range(1, self.num_experts + 1) if self.num_experts % e == 0]}"
            )
        self.router, self.dropout = moe.router, moe.dropout
        full = full or (lambda leaf, p: p.detach())
        device = ctx.device if device is None else device
        self.experts = ExpertShard(moe.experts, ctx, full, device)
        self.tp_group, self.tp_size = ctx.tp_group, ctx.tp_size
        self.ep_group, self.ep_size, self.ep_rank = ctx.ep_group, ctx.ep_size, ctx.ep_rank
        self.sequence_parallel = sequence_parallel
        self.local_experts = self.num_experts // ctx.ep_size

    def forward(self, x):
        group, tp = self.tp_group, self.tp_size
        if self.sequence_parallel:  # [b, s/q, h] -> [b, s, h]; backward reduce-scatters dX
            x = gather_from_sp(x, group, dim=1)
        elif tp > 1:
            x = copy_to_tp(x, group)
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        router_in = _ScaleGrad.apply(h, 1.0 / tp) if tp > 1 else h
        y = self.mix(router_in, h).view(shape)  # this rank's partial sum over tp
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, group, dim=1)
        elif tp > 1:
            y = reduce_from_tp(y, group)
        return self.dropout(y)

    def combine_weights(self, gates):
        return copy_to_tp(gates, self.tp_group) if self.tp_size > 1 else gates

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return self.experts(x_sorted, counts.tolist())
        ep, n = self.ep_size, self.local_experts
        received = torch.empty_like(counts)
        collectives.all_to_all(received, counts, self.ep_group)  # [ep, n]: rows from rank j
        both = torch.stack([counts, received]).cpu()  # one host sync for all the splits
        send, recv = both[0].view(ep, n), both[1].view(ep, n)
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all_rows(x_sorted, out_splits, in_splits, self.ep_group)
        order = expert_major_order(recv).to(rows.device)
        out = self.experts(rows[order], recv.sum(0).tolist())
        back = out.index_select(0, order.argsort())  # source-major again
        return all_to_all_rows(back, in_splits, out_splits, self.ep_group)


def expert_source(model: nn.Module, prefix: str) -> Callable:
    """full(leaf, p): p's full tensor, generated from the model's deterministic init on meta."""

    def full(leaf: str, p: torch.Tensor) -> torch.Tensor:
        if p.is_meta:
            return model.initial_value(prefix + leaf, p.shape, p.dtype)
        return p.detach()

    return full


def apply_expert_parallel(model: nn.Module, ctx, sequence_parallel: bool = False) -> nn.Module:
    """Swap every MoE layer of `model`'s blocks for an ExpertParallelMoE (in place; returns the
    model). A no-op at tp = ep = 1. Expert weights on the meta device are generated from
    `model.initial_value`, this rank's experts only; the router is left to `materialize`."""
    if ctx.tp_size == 1 and ctx.ep_size == 1:
        return model
    for index, block in model.blocks.named_children():
        mlp = block.mlp
        if isinstance(mlp, MoE) and not isinstance(mlp, ExpertParallelMoE):
            full = expert_source(model, f"blocks.{index}.mlp.experts.")
            block.mlp = ExpertParallelMoE(mlp, ctx, sequence_parallel, full)
    return model


def reduce_moe_metrics(model: nn.Module, ctx) -> dict[str, float]:
    """The MoE statistics since the last call averaged over every layer, micro-batch and rank
    (one all-reduce over the world). Collective: call it on every rank of an MoE run (a pipeline
    stage without MoE layers contributes zeros)."""
    total = moe_stat_totals(model)
    total = torch.zeros(5, device=ctx.device) if total is None else total.to(ctx.device)
    if dist.get_world_size() > 1:
        collectives.all_reduce(total)
    return metrics_from_totals(total.cpu())
