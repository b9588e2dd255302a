"""Random numbers for tensor parallelism: the same dropout mask where activations are replicated
across the TP group, different masks where they are sharded.

    rng = TPRandom(seed, ctx)           # seeds torch's default generators, identical across TP
    y = F.dropout(replicated, p)        # same mask on every TP rank (default stream)
    with rng.fork():
        h = F.dropout(sharded, p)       # each TP rank draws its own mask

Default stream. `TPRandom(seed, ctx)` calls `torch.manual_seed(seed + 100 * pp_rank + 10 * cp_rank)`
(Megatron's per-stage offset, plus one per context-parallel chunk): every rank of a TP group gets
the same default stream, so replicated dropout agrees, while pipeline stages and sequence chunks
differ.

Forked stream. Megatron keeps a second, persistent generator state for the TP region; that state
is invisible to activation recomputation (torch.utils.checkpoint restores only torch's default
generators), so recomputed dropout masks would differ from the forward ones. Here `fork()` keeps no
state: it draws a 62-bit number u from the default CPU generator (the same draw on every TP rank
and, because torch.utils.checkpoint restores the CPU generator, the same draw on recompute),
seeds the compute device's generator with mix(u, tp_rank) and restores the device generator on
exit. So forked masks differ across TP ranks, are reproducible from the seed, and are recomputed
exactly; checkpointing the default generators (torch.get_rng_state / torch.cuda.get_rng_state)
is all a resumable run needs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive ranks over the seed space


def _mix(u: int, tp_rank: int) -> int:
    x = (u ^ ((tp_rank + 1) * _GOLDEN)) & ((1 << 64) - 1)
    # splitmix64 finalizer: nearby inputs give unrelated seeds.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK63


class TPRandom:
    """Dropout randomness for a TP group; see the module docstring.

    seed: seeds torch's default generators (None: leave them as they are, e.g. when the caller
    seeds). ctx: the ParallelContext (uses tp_rank, pp_rank, cp_rank, device). device: the device
    whose generator `fork()` swaps (default ctx.device).
    """

    def __init__(self, seed: int | None, ctx, device: torch.device | str | None = None):
        self.tp_rank = ctx.tp_rank
        self.device = torch.device(device if device is not None else ctx.device)
        self.default_seed = None
        if seed is not None:
            self.default_seed = seed + 100 * ctx.pp_rank + 10 * getattr(ctx, "cp_rank", 0)
            torch.manual_seed(self.default_seed)

    def _generator(self) -> torch.Generator:
        if self.device.type == "cuda":
            torch.cuda.init()  # default_generators is empty until CUDA is initialized
            index = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
            return torch.cuda.default_generators[index]
        return torch.default_generator

    @contextlib.contextmanager
    def fork(self):
        """Within the block, the device generator is seeded per TP rank; restored on exit."""
        u = int(torch.randint(0, 1 << 62, (1,)).item())  # default CPU generator, advances it
        gen = self._generator()
        saved = gen.get_state()
        gen.manual_seed(_mix(u, self.tp_rank))
        try:
            yield
        finally:
            gen.set_state(saved)


class ShardedRNG(nn.Module):
    """Runs `module` (parameter-free: a dropout, the attention core) under `rng.fork()`, so each
    TP rank draws its own random numbers: dropout on sharded heads, or on sequence shards."""

    def __init__(self, module: nn.Module, rng: TPRandom):
        super().__init__()
        self.module, self.rng = module, rng

    def forward(self, *args, **kwargs):
        with self.rng.fork():
            return self.module(*args, **kwargs)
