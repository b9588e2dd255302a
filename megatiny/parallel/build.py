"""Shard-only building: a model described on the meta device gets real tensors for this rank's
parameters only, each generated (or read) as the shard its module declares.

    with torch.device("meta"):
        model = GPT(config)          # shapes only; init_seed drawn from the global RNG
    keep_stages(model, ctx, v)       # pipeline: drop the other stages' blocks (still meta)
    parallelize(model, ctx)          # TP: swap in parallel modules, their shards still meta
    materialize(model, ctx.device)   # every meta parameter: this rank's shard, from its source

A parameter's value comes from the model's *weight source*: by default `InitialValues`, the
deterministic per-parameter init (`GPT.initial_value(name, full_shape)`: a generator seeded by
the parameter's name), so the shards equal the same-seed single-device model's slices at any
layout. A model loaded lazily from a checkpoint carries its own source as `model.weight_source`
(megatiny/hf/lazy.py: safetensors slices), which reads only this rank's rows.

Peak memory of building: this rank's shard, plus one parameter's full tensor while it is generated
(the RNG stream of a parameter is drawn for the whole tensor, so a slice cannot be generated
without it). `initial_slice` is that one-parameter step for a flat slice (a ZeRO-3 shard).
"""

from __future__ import annotations

import torch
from torch import nn

from megatiny.parallel.sharding import Sharding, shard_from_full, sharding_of


def full_shape(local_shape, sharding: Sharding) -> tuple[int, ...]:
    """The single-device shape of a parameter whose shard (this rank's) has `local_shape`."""
    shape = list(local_shape)
    for s in sharding.splits:
        shape[s.dim] = s.pieces(local_shape[s.dim])[0]
    return tuple(shape)


def initial_slice(model, name: str, shape, flat_lo: int, flat_hi: int,
                  dtype=torch.float32) -> torch.Tensor:  # fmt: skip
    """Elements [flat_lo, flat_hi) of parameter `name`'s initial value (full shape `shape`,
    flattened row-major), a 1-D tensor that owns its memory. The full tensor is generated once
    and dropped: the transient is one parameter."""
    numel = torch.Size(shape).numel()
    if not 0 <= flat_lo <= flat_hi <= numel:
        raise ValueError(f"slice [{flat_lo}, {flat_hi}) is outside {name} of {numel} elements")
    return model.initial_value(name, shape, dtype).reshape(-1)[flat_lo:flat_hi].clone()


class InitialValues:
    """The deterministic per-parameter init of `model` (a GPT or anything with its
    `initial_value(name, shape, dtype)`), as a weight source."""

    def __init__(self, model):
        self.model = model

    def shard(self, name: str, shape, sharding: Sharding, dtype) -> torch.Tensor:
        """This rank's shard of parameter `name` (full shape `shape`)."""
        return shard_from_full(self.model.initial_value(name, shape, dtype), sharding)


def weight_source(model):
    """Where `model`'s meta parameters get their values: its `weight_source` (a lazily loaded
    checkpoint) or its deterministic init."""
    return getattr(model, "weight_source", None) or InitialValues(model)


def shard_value(model, name: str, p: torch.Tensor) -> torch.Tensor:
    """This rank's shard (CPU) of `model`'s meta parameter `name` from the model's weight
    source: what `materialize` gives it. ZeRO-3 calls it for parameters it leaves on meta, one
    at a time, and keeps only its flat slice of the result."""
    owner, _, leaf = name.rpartition(".")
    sharding = sharding_of(model.get_submodule(owner), leaf)
    return weight_source(model).shard(name, full_shape(p.shape, sharding), sharding, p.dtype)


def materialize(model, device, keep_meta=()) -> nn.Module:
    """Give every parameter of `model` a real tensor on `device`, in place, and return it:
    a parameter on the meta device gets this rank's shard (the sharding its module declares;
    replicated: the whole tensor) from the model's weight source, the others are moved.

    With `keep_stages` (megatiny.parallel.pipeline) first, a pipeline rank allocates only its
    own stages' parameters; `parallelize` calls this once its modules are swapped in.
    `keep_meta`: ids of parameters left on meta (ZeRO-3 generates only its slices of them)."""
    source = weight_source(model)
    device = torch.device(device)
    for name, p in list(model.named_parameters()):
        if (not p.is_meta and p.device == device) or id(p) in keep_meta:
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if p.is_meta:
            sharding = sharding_of(module, leaf)
            value = source.shard(name, full_shape(p.shape, sharding), sharding, p.dtype)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name}: the weight source gave a shard of shape {tuple(value.shape)}, the "
                    f"module holds {tuple(p.shape)}; the checkpoint and the model config disagree"
                )
        else:
            value = p.detach()
        with torch.no_grad():
            setattr(module, leaf, nn.Parameter(value.to(device).contiguous().clone(),
                                               requires_grad=p.requires_grad))  # fmt: skip
    return model


def host_bytes(model: nn.Module) -> int:
    """Bytes of the real (not meta) parameters and buffers `model` holds, each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
