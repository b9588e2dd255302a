"""What one rank records during a parity step: every module's forward output and every
parameter's gradient, in execution order, each with the last collective issued before it; then
gathered to full (single-device) shape, and (pp > 1) from every pipeline stage, on every rank.

Outputs come from forward hooks on every named module of the model and of its pipeline chunks
(global names: "blocks.5.attn.proj" on any stage). With m micro-batches a module runs m times a
step, in micro-batch order on every layout (gradient accumulation at pp = 1, any pipeline
schedule at pp > 1), so its k-th output is micro-batch k * m // calls (a module called twice per
micro-batch is recorded as `name` and `name#2`; recomputation during backward is not recorded).
A gradient's place in the order is the last time backward accumulated into it
(post-accumulate-grad hooks: it is complete then); its value is read after the step
(dp-averaged); the step's loss and global grad norm come last.
Collectives are observed through `megatiny.parallel.collectives` (every collective of the
codebase goes through it): op, group, shape, the function that issued it, and the module
whose forward was running (none during backward); a pipeline exchange (its sends and receives,
posted together) by the schedule's names of its messages (`recv_forward(mb 1)`).
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
    micro_batch: int | None = None  # outputs only

    @property
    def key(self) -> tuple:
        return (self.step, self.micro_batch, self.kind, self.name)


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


def _in_backward() -> bool:
    """Whether the autograd engine is running (a checkpointed block recomputing its forward:
    the reference recomputes right after each forward, a pipeline after other micro-batches)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class Recorder:
    """Hooks on `model` (this rank's shard, and its pipeline chunks) recording outputs, gradient
    order and collectives; `micro_batches` is the step's micro-batch count (the same at every
    layout)."""

    def __init__(self, model: torch.nn.Module, micro_batches: int = 1):
        self.model, self.micro_batches = model, micro_batches
        self.step, self.order, self.active = 0, 0, False
        self.records: list[Record] = []
        self.modules: dict[str, torch.nn.Module] = {}  # record name -> module
        self.modules_by_name: dict[str, torch.nn.Module] = {}
        self.calls: dict[str, int] = {}
        self.outputs: list[tuple[Record, str, int, str]] = []  # named at end_step
        self.stack: list[str] = []
        self.last = "none"
        self.grad_order: dict[str, tuple[int, str]] = {}
        self._handles = []
        hooked = set()
        # A pipeline chunk runs modules its container does not register (the GPT's dropout after
        # the embeddings); chunks share the container's modules, under the same global names.
        for root in (model, *getattr(model, "chunks", ())):
            for name, module in root.named_modules():
                if not name or id(module) in hooked:
                    continue  # the root's output is the loss: compared as the step's "loss"
                hooked.add(id(module))
                self.modules_by_name[name] = module
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave(name)))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad(name)))
        self._remove_observer = None
        try:
            from megatiny.parallel import collectives

            self._labels = collectives.labels
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
            if not self.active or _in_backward():  # activation recomputation: not a forward
                return
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            outs = output if isinstance(output, tuple | list) else (output,)
            tensors = [(i, o) for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
            for i, o in tensors:
                suffix = "" if len(tensors) == 1 and len(outs) == 1 else f"[{i}]"
                record = Record(self.step, "output", name, self._tick(), self.last,
                                o.detach().clone())  # fmt: skip
                self.records.append(record)
                self.outputs.append((record, name, call, suffix))

        return hook

    def _grad(self, name):
        def hook(p):
            if self.active:  # the last accumulation wins: the gradient is complete there
                self.grad_order[name] = (self._tick(), self.last)

        return hook

    def _collective(self, event) -> None:
        if not self.active:
            return
        op, shape = event.op, list(event.shape)
        if op in ("send", "recv"):  # one exchange of the pipeline schedule: all its messages
            names = self._labels().get("p2p") or []
            op = "p2p" if len(names) > 1 else op
            where = f": {', '.join(names)}" if names else ""
        else:
            where = f" in {self.stack[-1]}" if self.stack else " in backward"
        self.last = f"{op}({event.group}) {shape} by {_caller()}{where}"

    def begin_step(self, step: int) -> None:
        self.step, self.active, self.calls, self.grad_order = step, True, {}, {}
        self.outputs = []

    def _name_outputs(self) -> None:
        """Each output's micro-batch and name, now that every module's call count is known."""
        m = self.micro_batches
        for record, name, call, suffix in self.outputs:
            calls = self.calls[name]
            if calls % m:  # not once (or j times) per micro-batch: number the calls instead
                record.name = f"{name}#{call + 1}{suffix}" if call else f"{name}{suffix}"
            else:
                per = calls // m
                repeat = f"#{call % per + 1}" if call % per else ""
                record.name, record.micro_batch = f"{name}{repeat}{suffix}", call // per
            self.modules[record.name] = self.modules_by_name[name]

    def end_step(self, metrics: dict[str, float]) -> None:
        """Close the step; `metrics` (the step's loss, grad norm: identical on every rank) are
        recorded after the gradients."""
        self.active = False
        self._name_outputs()
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
    """This step's records at full shape, those of every pipeline stage on every rank
    (collective over the whole world). `full_shapes` maps (kind, name) to the reference's
    shape; None at the reference (tp = 1: only the dp split is undone)."""
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
    return _merge_stages(records, ctx) if ctx.pp_size > 1 else records


def _merge_stages(records: list[Record], ctx) -> list[Record]:
    """Every pipeline stage's records, stage by stage (each holds the modules and parameters of
    its own layers: disjoint names). The loss and grad norm are the same on every stage: kept
    once. A parameter two stages hold (the tied embedding's copy on the last stage) is kept on
    both, the later one noted, so a copy that drifted from the first is named too."""
    parts = [None] * ctx.pp_size
    dist.all_gather_object(parts, records, group=ctx.pp_group)
    merged, seen = [], set()
    for stage, part in enumerate(parts):
        for r in part:
            if r.key in seen:
                if r.kind == "step":
                    continue
                r.note = r.note or f"its copy on pipeline rank {stage}"
            seen.add(r.key)
            merged.append(r)
    return merged
