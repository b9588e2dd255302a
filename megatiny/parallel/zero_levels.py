"""Which data-parallel wrapper a run gets for its `parallel.zero` level, and whole parameters
for the code that must read them all (checkpoints).

    ddp = build_data_parallel(model, ctx, zero=3)        # None when there is nothing to reduce
    with whole_parameters(optimizer):                     # ZeRO-3: every unit gathered
        state = model_state(model, ctx)

    zero   wrapper                                         optimizer
    0      DistributedDataParallel (all-reduce)            AdamW
    1      DistributedDataParallel(shard=True)             ZeroOptimizer (megatiny/parallel/zero.py)
    2, 3   ShardedDataParallel (megatiny/parallel/fsdp.py) ZeroOptimizer
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel.data_parallel import DistributedDataParallel, resolve_dp_group
from megatiny.parallel.fsdp import ShardedDataParallel
from megatiny.parallel.zero import ZeroOptimizer, finish_param_sync


def build_data_parallel(model: nn.Module, ctx, shard: bool = False, bucket_mb: float = 25.0,
                        zero: int = 0, reshard_after_forward: bool = True):  # fmt: skip
    """The DDP wrapper a training loop needs, or None when there is nothing to reduce.

    Gradients need averaging when dp x cp > 1; ZeRO (`zero` >= 1, or `shard`: ZeRO-1) needs the
    wrapper at any dp; zero 2 and 3 get ShardedDataParallel. A pipeline
    model's tied embedding copy (first / last stage) gets its own bucket.
    """
    zero = max(zero, int(shard))
    group = resolve_dp_group(ctx)
    low_precision = any(p.dtype != torch.float32 for p in model.parameters())
    if dist.get_world_size(group) == 1 and not zero and not low_precision:
        return None  # (bf16 parameters need it at any dp: it holds their fp32 main gradients)
    isolate = ()
    if getattr(model, "chunks", None) is not None:
        from megatiny.parallel.pipeline import tied_embedding_weight

        tied = tied_embedding_weight(model.chunks, ctx)
        isolate = () if tied is None else (tied,)
    if zero >= 2:
        return ShardedDataParallel(model, ctx, level=zero, bucket_mb=bucket_mb, isolate=isolate,
                                   reshard_after_forward=reshard_after_forward)  # fmt: skip
    return DistributedDataParallel(model, ctx, bucket_mb=bucket_mb, shard=zero == 1,
                                   isolate=isolate)  # fmt: skip


@contextlib.contextmanager
def whole_parameters(optimizer, loading: bool = False):
    """Inside, every parameter of the model is whole and final: ZeRO-1/2 gathers in flight are
    waited for; ZeRO-3 units are all gathered (collective over dp), and freed at the end.
    `loading`: what was written into the parameters is taken back into this rank's slices.
    Checkpoint save and load run inside it (their files stay layout-free)."""
    finish_param_sync(optimizer)
    ddp = getattr(optimizer, "ddp", None) if isinstance(optimizer, ZeroOptimizer) else None
    if ddp is None or ddp.param_buffer is not None:
        yield
        return
    ddp.gather_all()
    try:
        yield
        if loading:
            ddp.scatter_back()
            if optimizer.master.data_ptr() != ddp.param_shard.data_ptr():
                optimizer.master.copy_(ddp.param_shard)  # bf16: main_param state may refine it
    finally:
        ddp.reshard_all()
