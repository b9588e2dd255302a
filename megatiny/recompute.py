"""Activation recomputation policies beside torch.utils.checkpoint (megatiny/model.py applies
them per block): `recompute="op"`, torchtitan's op-level selective checkpointing."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_ATTENTION = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(torch.ops.aten, name)}  # fmt: skip
# Called with each output that recompute="op" keeps (memory.ActivationCounter counts them: they
# live in the checkpoint's own cache, where saved-tensor hooks do not see them).
OP_SAVE_HOOKS: list = []


def op_policy_contexts():
    """recompute="op", torchtitan's op-level selective checkpointing of a block: keep the
    outputs of the attention kernel and of the 1st, 3rd, ... matmul (every other one: megatiny's
    fused QKV and MLP up-projection); recompute the rest in backward — the other matmuls, norms,
    RoPE, activations — from the block input and what was kept."""
    counts = {False: 0, True: 0}  # matmuls seen in the forward / in the recompute

    def policy(ctx, func, *args, **kwargs):
        if func in _MATMULS:
            counts[ctx.is_recompute] += 1
            keep = counts[ctx.is_recompute] % 2 == 1
        else:
            keep = func in _ATTENTION
        if keep and not ctx.is_recompute:
            for hook in OP_SAVE_HOOKS:
                hook(ctx.op_output)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
