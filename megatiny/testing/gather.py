"""Shards back to full (single-device) shape, for comparing a parallel module with the plain one.

A tensor-parallel tensor is either replicated (same shape as the single-device tensor) or split
along one dim over the TP group, possibly padded at the end (a vocabulary padded to a multiple of
tp x 128). So, given the full shape it must have, a local shard is gathered by shape alone:

    full_tensor(local, full_shape, group)     the one dim where local * p >= full is all-gathered
                                              (rank-major) and cut to the full size (padding dropped:
                                              a shard may even exceed the full size); differentiable

That is how outputs and input gradients are gathered. A layer whose output shard is not one
contiguous block per rank has `unshard(gathered, dim)`, which reorders a rank-major
concatenation into the full order (`ColumnParallelLinear` with `splits`, e.g. a fused
[q | k | v]: rank i holds [q_i | k_i | v_i]).

Parameters (and their gradients) are gathered by what their module declares in
`parameter_sharding` (megatiny/parallel/sharding.py): which dims are split over which group,
fused segments, padding. The same declaration drives checkpoints and gradient clipping, so a
layer the harness can gather also checkpoints. An undeclared parameter is replicated and must
have its single-device shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel.comm import gather_from_sp
from megatiny.parallel.sharding import full_from_shard, sharding_of


def split_dims(local_shape, full_shape, p: int) -> list[int]:
    """Dims along which a local shard of `full_shape` is split over p ranks."""
    local_shape, full_shape = tuple(local_shape), tuple(full_shape)
    if len(local_shape) != len(full_shape):
        raise ValueError(f"shard shape {local_shape} and full shape {full_shape} differ in rank")
    dims = [d for d, (a, b) in enumerate(zip(local_shape, full_shape)) if a != b]
    for d in dims:
        if local_shape[d] * p < full_shape[d]:
            raise ValueError(
                f"shard shape {local_shape} is not a 1/{p} split of full shape {full_shape} "
                f"(dim {d})"
            )
    if len(dims) > 1:
        raise ValueError(
            f"shard shape {local_shape} differs from full shape {full_shape} in dims {dims}; "
            "only one split dim can be gathered by shape"
        )
    return dims


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    # Forward all-gather, backward split: each rank's consumer of the full tensor is replicated.
    return gather_from_sp(t, group, dim=dim, tensor_parallel_output_grad=False)


def full_tensor(local: torch.Tensor, full_shape, group, unshard=None) -> torch.Tensor:
    """`local`'s full tensor of `full_shape`: all-gathered over `group` along its split dim (if
    any), reordered by `unshard(gathered, dim)` when given, cut to size (padding dropped).
    Differentiable (backward gives each rank its slice). Collective when a dim is split."""
    p = dist.get_world_size(group)
    full_shape = tuple(full_shape)
    if p == 1 or tuple(local.shape) == full_shape:
        return local
    (dim,) = split_dims(local.shape, full_shape, p)
    out = _gather(local, group, dim)
    if unshard is not None:
        out = unshard(out, dim=dim)
    return out.narrow(dim, 0, full_shape[dim])


def module_output_unshard(module: nn.Module, local: torch.Tensor, full_shape):
    """The `unshard` to apply to a module's output: a column-parallel layer's output is split
    along the last dim in its segment order."""
    unshard = getattr(module, "unshard", None)
    if unshard is None or local.dim() == 0 or local.shape[-1] == full_shape[-1]:
        return None
    return unshard


def full_parameter(
    module: nn.Module, leaf: str, local: torch.Tensor, full_shape, group
) -> torch.Tensor:
    """The full tensor of parameter `leaf` of `module` (or of its gradient, given as `local`),
    gathered as the module declares (`parameter_sharding`) over `group`: the TP group of the
    layout, not the layer's own idea of it (or {group name: process group})."""
    groups = group if isinstance(group, Mapping) else {"tp": group}
    sharding = sharding_of(module, leaf)
    full = full_from_shard(local, sharding, groups) if sharding.splits else local
    if tuple(full.shape) != tuple(full_shape):
        what = (
            f"declared as {sharding}, gathers to {tuple(full.shape)}"
            if sharding.splits
            else f"undeclared (so replicated), has shape {tuple(full.shape)}"
        )
        raise ValueError(
            f"parameter {leaf} of {type(module).__name__} is {what}, not the single-device "
            f"{tuple(full_shape)}: declare how it is split in the module's parameter_sharding "
            "(megatiny/parallel/sharding.py, docs/extending.md)"
        )
    return full


@torch.no_grad()
def full_parameters(
    model: nn.Module, full_shapes: dict[str, tuple], group, grads: bool = False
) -> dict[str, torch.Tensor | None]:
    """Every parameter of `model` named in `full_shapes` (or its gradient: `grads=True`, None
    where it has none) at its full shape, on every rank of `group`. Collective: every rank of
    the group must call it with the same model structure."""
    out = {}
    for name, p in model.named_parameters():
        if name not in full_shapes:
            continue
        t = p.grad if grads else p.detach()
        if t is None:
            out[name] = None
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        out[name] = full_parameter(module, leaf, t, full_shapes[name], group).detach().clone()
    return out
