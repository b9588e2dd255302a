"""assert_parallel_equivalent: a module at 1 rank vs its parallel version at each layout.

    assert_parallel_equivalent(
        build_single=lambda: MyMLP(64),                       # the plain module (seeded)
        build_parallel=lambda m, ctx, sequence_parallel: ParallelMyMLP.from_module(
            m, ctx.tp_group, sequence_parallel),               # cut from it for this rank
        inputs=torch.randn(4, 8, 64),
        layouts=["tp=2", "tp=2,sequence_parallel=true", "tp=2,dp=2", "tp=4"],
    )

For each layout the harness forks tp x dp CPU gloo ranks (`run_ranks`), seeds torch with `seed`
before `build_single()` (in this process for the reference, on every rank for the parallel
copy, so both start from the same weights), and compares with the single-device run:

- every output, gathered to full shape;
- the gradient of every floating-point input and of every parameter (by name; sharded ones
  gathered to full shape by `megatiny.testing.gather`), for the backward of sum(output * dy)
  with a fixed random dy.

Inputs are split the Megatron way: the batch (dim 0) over dp; under sequence parallelism the
sequence (dim 1) of floating-point inputs over tp (hidden states arrive as sequence shards, token
ids whole). Pass `shard_inputs(inputs, ctx, sequence_parallel) -> tuple` to split otherwise. dp
replicas see different batch rows; the harness sums their parameter gradients over dp (the
gradient of a loss summed over the batch), so a layer that communicates over the wrong group
(the world instead of its TP group) fails at tp=2,dp=2.

A failure raises AssertionError with a table, worst tensor first: layout, tensor name, max |diff|
and how many times over the tolerance (elementwise |a - b| <= atol + rtol |b|, as torch.allclose).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatiny.parallel.local_ranks import run_ranks
from megatiny.testing.gather import full_parameters, full_tensor, module_output_unshard

LAYOUT_KEYS = ("tp", "dp", "pp", "cp", "virtual_pipeline_size", "sequence_parallel", "zero1")


@dataclass(frozen=True)
class Layout:
    """A parallel layout: `tp=2,sequence_parallel=true,dp=2` as text."""

    tp: int = 1
    dp: int = 1
    pp: int = 1
    cp: int = 1
    virtual_pipeline_size: int | None = None
    sequence_parallel: bool = False
    zero1: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp * self.cp

    def __str__(self) -> str:
        parts = [f"tp={self.tp}"]
        for key in LAYOUT_KEYS[1:]:
            value = getattr(self, key)
            if value is True or (value is not None and value is not False and value != 1):
                parts.append(f"{key}={str(value).lower()}")
        return ",".join(parts)


def parse_layout(spec) -> Layout:
    """A Layout from "tp=2,sequence_parallel=true", a dict, or a Layout."""
    if isinstance(spec, Layout):
        return spec
    if isinstance(spec, dict):
        items = dict(spec)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"layout {spec!r}: {part!r} must look like key=value (tp=2)")
            items[key.strip()] = value.strip()
    values = {}
    for key, value in items.items():
        if key not in LAYOUT_KEYS:
            raise ValueError(
                f"layout {spec!r}: unknown key {key!r}; known: {', '.join(LAYOUT_KEYS)}"
            )
        if key in ("sequence_parallel", "zero1"):
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(f"layout {spec!r}: {key}={value!r} must be true or false")
            values[key] = text in ("true", "1")
        else:
            values[key] = int(value)
            if values[key] < 1:
                raise ValueError(f"layout {spec!r}: {key}={value} must be >= 1")
    layout = Layout(**values)
    if layout.sequence_parallel and layout.tp == 1:
        raise ValueError(f"layout {spec!r}: sequence_parallel=true needs tp > 1")
    return layout


def mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    """(max |actual - expected|, max of |actual - expected| / (atol + rtol |expected|)): the
    second is > 1 where the tolerance is exceeded. A shape mismatch counts as infinitely far."""
    if actual.shape != expected.shape:
        return float("inf"), float("inf")
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    if diff.numel() == 0:
        return 0.0, 0.0
    ratio = diff / (atol + rtol * e.abs())
    ratio = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), ratio)
    return float(diff.nan_to_num(float("inf")).max()), float(ratio.max())


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, list | tuple) else (x,)


def _grad_targets(outputs: tuple, seed: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed + 1)
    return [
        torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
        if o.is_floating_point() and o.requires_grad
        else None
        for o in outputs
    ]


def _leaves(inputs: tuple) -> tuple:
    return tuple(
        x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in inputs
    )


def _backward(outputs, dys) -> None:
    pairs = [(o, dy) for o, dy in zip(outputs, dys) if dy is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [dy for _, dy in pairs])


def _reference(build_single, inputs, seed):
    torch.manual_seed(seed)
    module = build_single()
    leaves = _leaves(inputs)
    outputs = _as_tuple(module(*leaves))
    dys = _grad_targets(outputs, seed)
    _backward(outputs, dys)
    tensors = {f"output[{i}]": o.detach() for i, o in enumerate(outputs)}
    tensors.update({f"input[{i}].grad": x.grad for i, x in enumerate(leaves) if x.grad is not None})
    for name, p in module.named_parameters():
        if p.grad is not None:
            tensors[f"grad {name}"] = p.grad
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    return tensors, shapes, [tuple(o.shape) for o in outputs], dys


def default_shard_inputs(inputs: tuple, ctx, sequence_parallel: bool) -> tuple:
    """Batch (dim 0) over dp; the sequence (dim 1) of floating-point inputs over tp under SP."""
    out = []
    for x in inputs:
        if ctx.dp_size > 1:
            x = x.chunk(ctx.dp_size, dim=0)[ctx.dp_rank]
        if sequence_parallel and x.is_floating_point():
            x = x.chunk(ctx.tp_size, dim=1)[ctx.tp_rank]
        out.append(x.contiguous())
    return tuple(out)


def _dp_full(t: torch.Tensor, ctx) -> torch.Tensor:
    return full_tensor(t, (t.shape[0] * ctx.dp_size,) + tuple(t.shape[1:]), ctx.dp_group)


def _parallel_rank(build_single, build_parallel, inputs, layout, seed, ref, shard_inputs):
    from megatiny.parallel import ParallelContext

    param_shapes, output_shapes, dys = ref
    ctx = ParallelContext.initialize(tp=layout.tp)
    torch.manual_seed(seed)
    module = build_parallel(build_single(), ctx, sequence_parallel=layout.sequence_parallel)
    local_in = (shard_inputs or default_shard_inputs)(inputs, ctx, layout.sequence_parallel)
    leaves = _leaves(local_in)
    local_out = _as_tuple(module(*leaves))
    if len(local_out) != len(output_shapes):
        raise ValueError(f"parallel module returned {len(local_out)} outputs, single {len(dys)}")
    full_out = []
    for o, shape in zip(local_out, output_shapes):
        if o.dim() == 0 and ctx.dp_size > 1:
            raise ValueError("a scalar output cannot be split over dp; use a layout with dp=1")
        dp_shape = (shape[0] // ctx.dp_size,) + shape[1:] if o.dim() else shape
        unshard = module_output_unshard(module, o, dp_shape)
        full_out.append(full_tensor(o, dp_shape, ctx.tp_group, unshard))
    local_dys = [
        None if dy is None else (dy.chunk(ctx.dp_size, 0)[ctx.dp_rank] if dy.dim() else dy)
        for dy in dys
    ]
    _backward(full_out, local_dys)
    tensors = {}
    for i, o in enumerate(full_out):
        tensors[f"output[{i}]"] = _dp_full(o.detach(), ctx) if o.dim() else o.detach()
    for i, (x, full) in enumerate(zip(leaves, inputs)):
        if x.grad is not None:
            shape = (full.shape[0] // ctx.dp_size,) + tuple(full.shape[1:])
            tensors[f"input[{i}].grad"] = _dp_full(full_tensor(x.grad, shape, ctx.tp_group), ctx)
    for p in module.parameters():
        if p.grad is not None and ctx.dp_size > 1:
            dist.all_reduce(p.grad, group=ctx.dp_group)
    grads = full_parameters(module, param_shapes, ctx.tp_group, grads=True)
    extra = sorted(n for n, _ in module.named_parameters() if n not in param_shapes)
    for name, g in grads.items():
        if g is not None:
            tensors[f"grad {name}"] = g
    return (tensors, extra) if dist.get_rank() == 0 else None


def assert_parallel_equivalent(
    build_single: Callable[[], torch.nn.Module],
    build_parallel: Callable[..., torch.nn.Module],
    inputs,
    layouts=("tp=2",),
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
    shard_inputs: Callable | None = None,
    timeout: float = 120.0,
) -> None:
    """Run `build_single()` on one process and `build_parallel(build_single(), ctx,
    sequence_parallel=...)` at each layout; raise AssertionError naming the worst tensor when an
    output, input gradient or parameter gradient differs. See the module docstring."""
    inputs = _as_tuple(inputs)
    expected, param_shapes, output_shapes, dys = _reference(build_single, inputs, seed)
    ref = (param_shapes, output_shapes, dys)
    rows = []
    for spec in layouts:
        layout = parse_layout(spec)
        if layout.pp > 1 or layout.cp > 1 or layout.zero1 or layout.virtual_pipeline_size:
            raise ValueError(f"layout {layout}: the harness runs tp, dp and sequence_parallel only")
        (result, *_) = run_ranks(
            _parallel_rank, layout.world_size, build_single, build_parallel, inputs, layout,
            seed, ref, shard_inputs, timeout=timeout,
        )  # fmt: skip
        got, extra = result
        for name in extra:
            rows.append((float("inf"), float("inf"), str(layout), f"grad {name} (not in single)"))
        for name, want in expected.items():
            if name not in got:
                rows.append((float("inf"), float("inf"), str(layout), f"{name} (missing)"))
                continue
            max_abs, ratio = mismatch(got[name], want, rtol, atol)
            if got[name].shape != want.shape:
                name += f" (shape {tuple(got[name].shape)} != {tuple(want.shape)})"
            if ratio > 1:
                rows.append((ratio, max_abs, str(layout), name))
    if rows:
        rows.sort(key=lambda r: -r[0])
        _, max_abs, layout, name = rows[0]
        lines = [
            f"parallel != single: worst {name} at {layout} (max |diff| {max_abs:.3g}); "
            f"{len(rows)} tensors over rtol={rtol:g}, atol={atol:g}:",
            f"  {'layout':<28} {'tensor':<40} {'max |diff|':>11} {'x tol':>9}",
        ]
        for ratio, max_abs, layout, name in rows[:20]:
            lines.append(f"  {layout:<28} {name:<40} {max_abs:>11.3g} {ratio:>9.3g}")
        raise AssertionError("\n".join(lines))
