"""Activation recomputation policies beside torch.utils.checkpoint (megatiny/model.py applies
them per block): `recompute="op"`, torchtitan's op-level selective checkpointing.

torchtitan's policy (torchtitan/distributed/activation_checkpoint.py, `SelectiveAC`) keeps, per
block, the attention kernel's outputs and the output of every other matmul — the 1st, 3rd, ... in
the order they run — and recomputes the rest in backward. Its Llama runs seven matmuls per block,
unfused: wq, wk, wv, wo, w1 (gate), w3 (up), w2 (down), so it keeps q, v, gate and the down
projection's output. megatiny fuses [q | k | v] and [gate | up] into one matmul each; keeping
every other *fused* output would keep q, k, v, gate and up (on Llama-3.1-8B 40% more bytes per
token: 34,816 + 4,096 vs 23,552 + 4,096 values).

So megatiny counts a fused matmul as its unfused parts (`unfused_segments`) and keeps what
torchtitan keeps: of a fused output only the kept parts' columns are copied aside (q and v of
QKV, gate of gate|up); the fused tensor itself is freed with the rest of the forward. In backward
the recompute runs the matmul for the dropped columns only (x W_k^T, x W_up^T) and puts the
output back together, so the recomputed block sees the same tensors, at the FLOPs of the dropped
parts. The attention outputs are kept by torch's own selective-checkpoint cache.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_ATTENTION = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(torch.ops.aten, name)}  # fmt: skip
# Called with each output that recompute="op" keeps (memory.ActivationCounter counts them: they
# live in the checkpoint's own cache, where saved-tensor hooks do not see them).
OP_SAVE_HOOKS: list = []


def unfused_segments(block) -> list[tuple[int, ...] | None]:
    """Per matmul of `block`'s forward, in order, the output widths of the unfused matmuls it
    stands for: [q, k, v] for the fused QKV, two equal halves for SwiGLU's [gate | up]; None is
    one matmul. Widths are this rank's (after tensor parallelism: its heads, its ffn slice).
    Matmuls past the list (an MoE layer's router and experts) count one each."""
    attn, mlp = block.attn, block.mlp
    d = attn.head_dim
    q, kv = attn.n_heads * d, attn.n_kv_heads * d
    segments = [(q, kv, kv), None]  # qkv, output projection
    if getattr(mlp, "swiglu", False) and hasattr(mlp, "fc"):  # a dense MLP (not MoE)
        segments += [(2,), None]  # (2,): two equal halves of whatever width fc has here
    elif hasattr(mlp, "fc"):
        segments += [None, None]
    return segments


def _column_ranges(widths, total: int) -> list[tuple[int, int]] | None:
    if widths is None:
        return None
    if len(widths) == 1:  # n equal parts
        n = widths[0]
        if total % n:
            return None
        widths = (total // n,) * n
    if sum(widths) != total:  # not the layout we know (a swapped-in module): one matmul
        return None
    out, lo = [], 0
    for w in widths:
        out.append((lo, lo + w))
        lo += w
    return out


class _Plan:
    """Which columns of each matmul's output to keep: torchtitan's counter over unfused matmuls
    (keep the 1st, 3rd, ...), the same in the forward and in the recompute."""

    def __init__(self, segments):
        self.segments = segments
        self.matmuls = 0
        self.unfused = 0

    def next(self, width: int) -> list[tuple[int, int, bool]]:
        """[(lo, hi, keep)] column ranges of the next matmul's [tokens, width] output."""
        widths = self.segments[self.matmuls] if self.matmuls < len(self.segments) else None
        self.matmuls += 1
        ranges = _column_ranges(widths, width) or [(0, width)]
        out = []
        for lo, hi in ranges:
            self.unfused += 1
            out.append((lo, hi, self.unfused % 2 == 1))
        return out


def _narrow_columns(func, args, kwargs, lo: int, hi: int):
    """The matmul `func(*args)` computing only output columns [lo, hi): mm(a, b[:, lo:hi]),
    addmm(bias[lo:hi], a, b[:, lo:hi])."""
    if func is torch.ops.aten.mm.default:
        a, b = args
        return func(a, b.narrow(1, lo, hi - lo), **kwargs)
    bias, a, b = args[:3]
    if bias.dim() >= 1 and bias.shape[-1] == b.shape[1]:
        bias = bias.narrow(-1, lo, hi - lo)
    return func(bias, a, b.narrow(1, lo, hi - lo), *args[3:], **kwargs)


class _KeepColumns(TorchDispatchMode):
    """Forward: run each matmul, store what the plan keeps (a whole output, or copies of its
    kept columns). Recompute: give back the stored output, or rebuild it from the stored columns
    and the matmul of the dropped ones."""

    def __init__(self, segments, storage: list, recompute: bool):
        super().__init__()
        self.plan, self.storage, self.recompute = _Plan(segments), storage, recompute

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _MATMULS:
            return func(*args, **kwargs)
        width = args[-1].shape[1]
        ranges = self.plan.next(width)
        index = self.plan.matmuls - 1
        if self.recompute:
            return self._rebuild(func, args, kwargs, ranges, index)
        out = func(*args, **kwargs)
        if all(keep for _, _, keep in ranges):
            kept = [out.detach()]
            self.storage.append((out._version, kept))
        elif any(keep for _, _, keep in ranges):
            kept = [out.narrow(-1, lo, hi - lo).clone() for lo, hi, keep in ranges if keep]
            self.storage.append((None, kept))
        else:
            self.storage.append((None, []))
            return out
        for hook in OP_SAVE_HOOKS:
            hook(kept)
        return out

    def _rebuild(self, func, args, kwargs, ranges, index):
        if index >= len(self.storage):
            raise RuntimeError(
                "recompute='op': the recomputed block ran more matmuls than its forward; the "
                "block's forward must run the same operations each time"
            )
        version, kept = self.storage[index]
        self.storage[index] = (None, [])  # consumed: freed as soon as backward is done with it
        if not kept:
            return func(*args, **kwargs)
        if version is not None:  # the whole output was kept
            if kept[0]._version != version:
                raise RuntimeError(
                    "recompute='op': a kept matmul output was modified in place after the "
                    "forward; recompute that matmul instead (use recompute='full')"
                )
            return kept[0]
        stored = iter(kept)
        pieces = [
            next(stored) if keep else _narrow_columns(func, args, kwargs, lo, hi)
            for lo, hi, keep in ranges
        ]
        return torch.cat(pieces, dim=-1)


def _attention_policy(ctx, func, *args, **kwargs):
    if func in _ATTENTION:
        if not ctx.is_recompute:
            for hook in OP_SAVE_HOOKS:
                hook(ctx.op_output)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _both(below, above):
    # torch's cache (`above`) sees each op first and hands the matmuls down to ours, so the
    # slicing and concatenation ours adds in the recompute are not ops torch's cache must match.
    with below, above:
        yield


def op_policy_contexts(block=None):
    """recompute="op" for one block (torch.utils.checkpoint's `context_fn`): keep the attention
    kernel's outputs and torchtitan's every other unfused matmul output (see the module doc);
    recompute the rest — the other matmuls (of a fused one: its dropped columns only), norms,
    RoPE, activations — from the block input and what was kept. Without `block`, every matmul
    counts as one (torchtitan's rule on fused outputs)."""
    segments = unfused_segments(block) if block is not None else []
    sac_forward, sac_recompute = create_selective_checkpoint_contexts(_attention_policy)
    storage: list = []
    return (
        _both(_KeepColumns(segments, storage, recompute=False), sac_forward),
        _both(_KeepColumns(segments, storage, recompute=True), sac_recompute),
    )


def op_context_fn(block):
    """`op_policy_contexts` for `block`, as torch.utils.checkpoint's `context_fn` argument."""
    return functools.partial(op_policy_contexts, block)
