"""What the dry run's ops cost: FLOPs of the matmuls and attention, bytes moved by everything else,
and the largest backward op (the transient); plus CUDA autocast's dtype rules for meta tensors.

`OpCounter` is a TorchDispatchMode, so it sees every aten op the real code runs — the forward,
the backward, the recomputation under activation checkpointing, the optimizer step — after
autograd has decomposed them:

    matmul FLOPs    mm / addmm / bmm / baddbmm: 2 m n k (torch.utils.flop_counter's formulas)
    attention FLOPs flash attention forward 4 b n s_q s_k d (q k^T and p v over the full
                    s x s, the Megatron convention), backward 2x forward
    bytes           every other op that is not a view: the bytes of its tensor inputs and outputs
                    (one read of each input, one write of each output: what a memory-bound
                    kernel moves through HBM)
    transcendental_bytes   the same for exp / log / softmax / SiLU / GELU / tanh / sigmoid / erf
                    (and their backward ops): memory-bound on a GPU, compute-bound on a CPU,
                    so a profile may give them a rate of their own
    ops             the number of non-view ops (each costs a launch / dispatch overhead)
    transient       the largest (inputs + outputs) bytes of one op during backward, e.g. the
                    logits gradient beside the softmax it is computed from; an in-place op's
                    output is its input, counted once (one buffer, however it is written)

Collectives (the c10d namespace) are the tracer's business and are skipped here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
_FLASH = {aten._scaled_dot_product_flash_attention_for_cpu.default}
_FLASH_BACKWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
_TRANSCENDENTAL = {"exp", "log", "_softmax", "_log_softmax", "_softmax_backward_data",
                   "_log_softmax_backward_data", "silu", "silu_backward", "gelu", "gelu_backward",
                   "tanh", "tanh_backward", "sigmoid", "sigmoid_backward", "erf", "exp_", "log1p",
                   "rsqrt"}  # fmt: skip
_FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
         aten.new_empty_strided.default, aten.empty_like.default}  # fmt: skip


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(tree))


def _unique_nbytes(*trees) -> int:
    seen = {id(t): t for tree in trees for t in _tensors(tree)}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _attention_flops(q, k) -> int:
    b, n, s_q, d = q.shape
    return 4 * b * n * s_q * k.shape[-2] * d


class OpCounter(TorchDispatchMode):
    """Sum FLOPs and bytes per `phase` (set by the caller: "micro_batches", "step", ...)."""

    def __init__(self):
        super().__init__()
        self.phase = "micro_batches"
        self.counts: dict[str, dict[str, float]] = {}
        self.max_backward_bytes = 0

    def _add(self, key: str, value: float) -> None:
        row = self.counts.setdefault(self.phase, {"matmul_flops": 0, "attention_flops": 0,
                                                  "bytes": 0, "transcendental_bytes": 0,
                                                  "ops": 0})  # fmt: skip
        row[key] += value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional") or func in _FREE:
            return out
        packet = func._overloadpacket
        if not func.is_view:
            self._add("ops", 1)
        if packet in flop_registry:
            self._add("matmul_flops", flop_registry[packet](*args, **kwargs, out_val=out))
        elif func in _FLASH:
            self._add("attention_flops", _attention_flops(args[0], args[1]))
        elif func in _FLASH_BACKWARD:
            self._add("attention_flops", 2 * _attention_flops(args[1], args[2]))
        elif not func.is_view:
            moved = _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
            kind = "transcendental_bytes" if packet.__name__ in _TRANSCENDENTAL else "bytes"
            self._add(kind, moved)
            if torch._C._current_graph_task_id() != -1:  # inside backward
                live = _unique_nbytes(args, kwargs, out)
                self.max_backward_bytes = max(self.max_backward_bytes, live)
        return out

    def totals(self) -> dict[str, dict[str, float]]:
        return {phase: dict(row) for phase, row in self.counts.items()}


# ---- autocast for meta tensors ---------------------------------------------------------------

_LOW_PRECISION = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                  torch.bmm, torch.addmm, torch.baddbmm}  # fmt: skip
_FP32 = {F.layer_norm, F.softmax, F.log_softmax, F.cross_entropy, torch.softmax,
         torch.Tensor.softmax, torch.log_softmax, torch.Tensor.log_softmax}  # fmt: skip


def _cast(tree, src, dst):
    if isinstance(tree, torch.Tensor):
        return tree.to(dst) if tree.dtype == src else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast(x, src, dst) for x in tree)
    return tree


class MetaAutocast(TorchFunctionMode):
    """`torch.autocast("cuda", torch.bfloat16)`'s rules at the Python level, for meta tensors
    (torch has no meta autocast): matmuls and attention cast fp32 inputs to bf16, the fp32 list
    (norms, softmax, cross-entropy) casts bf16 inputs to fp32, everything else runs in its
    inputs' dtype. The casts are autograd ops, so a bf16 copy of a weight is saved for backward
    exactly as under CUDA autocast. `active` tells the dry run's attention wrapper. It also
    raises CUDA autocast's flag (a flag only: no CUDA tensor exists here), which code that picks
    a GEMM dtype by hand reads for meta tensors (the sequence-parallel linear casts before it
    gathers)."""

    active = 0

    def __enter__(self):
        if MetaAutocast.active == 0:
            self._saved = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.bfloat16)
        MetaAutocast.active += 1
        return super().__enter__()

    def __exit__(self, *exc):
        MetaAutocast.active -= 1
        if MetaAutocast.active == 0:
            torch.set_autocast_enabled("cuda", self._saved[0])
            torch.set_autocast_dtype("cuda", self._saved[1])
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION:
            args = _cast(args, torch.float32, torch.bfloat16)
        elif func in _FP32:
            args = _cast(args, torch.bfloat16, torch.float32)
        return func(*args, **kwargs)
