"""What one rank records during a parity step: every module's forward output and every
parameter's gradient, in execution order, each with the last collective issued before it; then
gathered to full (single-device) shape on every rank.

Outputs come from forward hooks on every named module (a module called twice in a step is
recorded as `name#2`); the order of gradients is the order in which backward produces them
(post-accumulate-grad hooks), their values are read after the step (dp-averaged); the step's
loss and global grad norm come last.
Collectives are observed through `megatiny.parallel.collectives` (every collective of the
codebase goes through it): op, group, shape, the function that issued it, and the module
whose forward was running (none during backward).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatiny.testing.gather import full_parameters, full_tensor, module_output_unshard

_OWN_FILES = ("collectives.py", str(Path(__file__).parent))


@dataclass
class Record:
    step: int
    kind: str  # "output" | "grad"
    name: str
    order: int
    collective: str
    tensor: torch.Tensor | None = None
    note: str = ""


def _caller() -> str:
    """`file_stem.Function.method` of the innermost megatiny frame outside the tracing code and
    private helpers (`comm._all_reduce` is reported as its caller, `comm._ReduceFromTP.forward`)."""
    frame = sys._getframe(2)
    while frame is not None:
        path, code = frame.f_code.co_filename, frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        helper = "." not in name and name.startswith("_")
        if "megatiny" in path and not helper and not any(own in path for own in _OWN_FILES):
            return f"{Path(path).stem}.{name}"
        frame = frame.f_back
    return "?"


class Recorder:
    """Hooks on `model` (this rank's shard) recording outputs, gradient order and collectives."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.step, self.order, self.active = 0, 0, False
        self.records: list[Record] = []
        self.modules: dict[str, torch.nn.Module] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[str] = []
        self.last = "none"
        self.grad_order: dict[str, tuple[int, str]] = {}
        self._handles = []
        for name, module in model.named_modules():
            if name:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave(name or "(model)")))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad(name)))
        self._remove_observer = None
        try:
            from megatiny.parallel import collectives

            self._remove_observer = collectives.add_observer(self._collective)
        except ImportError:  # a checkout without the collectives module: no collective column
            self.last = "n/a"

    def _tick(self) -> int:
        self.order += 1
        return self.order

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _leave(self, name):
        def hook(module, args, output):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            if not self.active:
                return
            self.calls[name] = self.calls.get(name, 0) + 1
            key = name if self.calls[name] == 1 else f"{name}#{self.calls[name]}"
            outs = output if isinstance(output, tuple | list) else (output,)
            tensors = [(i, o) for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
            for i, o in tensors:
                rec_name = key if len(tensors) == 1 and len(outs) == 1 else f"{key}[{i}]"
                self.modules[rec_name] = module
                self.records.append(
                    Record(self.step, "output", rec_name, self._tick(), self.last,
                           o.detach().clone())
                )  # fmt: skip

        return hook

    def _grad(self, name):
        def hook(p):
            if self.active and name not in self.grad_order:
                self.grad_order[name] = (self._tick(), self.last)

        return hook

    def _collective(self, event) -> None:
        if not self.active:
            return
        where = f" in {self.stack[-1]}" if self.stack else " in backward"
        shape = list(event.shape)
        self.last = f"{event.op}({event.group}) {shape} by {_caller()}{where}"

    def begin_step(self, step: int) -> None:
        self.step, self.active, self.calls, self.grad_order = step, True, {}, {}

    def end_step(self, metrics: dict[str, float]) -> None:
        """Close the step; `metrics` (the step's loss, grad norm: identical on every rank) are
        recorded after the gradients."""
        self.active = False
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                order, last = self.grad_order.get(name, (self._tick(), self.last))
                self.records.append(Record(self.step, "grad", name, order, last))
        for name, value in metrics.items():
            tensor = torch.tensor(float(value), dtype=torch.float64)
            self.records.append(Record(self.step, "step", name, self._tick(), self.last, tensor))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self._remove_observer is not None:
            self._remove_observer()


def _dp_full(t: torch.Tensor, group) -> torch.Tensor:
    """The dp replicas' batch rows concatenated (dim 0), or `t` itself where every replica
    holds the same tensor (positions [1, s, h], not split over the batch): the synthetic batch
    makes the rows of different replicas differ."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    if all(torch.equal(parts[0], x) for x in parts[1:]):
        return t
    return torch.cat(parts, dim=0)


def gather_step(recorder: Recorder, ctx, step: int, full_shapes: dict | None) -> list[Record]:
    """This step's records at full shape (collective over the whole world, same order on every
    rank). `full_shapes` maps (kind, name) to the reference's shape; None at the reference
    (tp = 1: only the dp split is undone)."""
    records = [r for r in recorder.records if r.step == step]
    params = {name: p for name, p in recorder.model.named_parameters()}
    grad_shapes = {
        r.name: (full_shapes or {}).get(("grad", r.name), tuple(params[r.name].shape))
        for r in records
        if r.kind == "grad"
    }
    grads = full_parameters(recorder.model, grad_shapes, ctx.tp_group, grads=True)
    for r in records:
        if r.kind == "grad":
            r.tensor = grads.get(r.name)
            continue
        if r.kind == "step":
            continue
        t = r.tensor
        if t.dim() == 0:  # a per-replica mean (the loss): averaged over dp
            if ctx.dp_size > 1:
                t = t.clone()
                dist.all_reduce(t, group=ctx.dp_group)
                t = t / ctx.dp_size
            r.tensor = t
            continue
        if ctx.dp_size > 1:
            t = _dp_full(t, ctx.dp_group)
        full = (full_shapes or {}).get(("output", r.name))
        if full is not None and ctx.tp_size > 1:
            try:
                unshard = module_output_unshard(recorder.modules[r.name], t, full)
                t = full_tensor(t, full, ctx.tp_group, unshard)
            except ValueError as e:  # same shapes on every rank: all skip the collective
                r.note = f"cannot gather: {e}"
        r.tensor = t.detach().clone()
    records.sort(key=lambda r: r.order)
    return records
