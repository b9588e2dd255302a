"""The peak of live tensor bytes over a region of code, on any device (CPU included, where torch
keeps no allocator statistics).

    with LiveTensorPeak() as mem:
        loss = model.output.loss(h, weight, labels).sum()
        loss.backward()
    mem.peak        # most bytes allocated inside the region and alive at once
    mem.live        # bytes allocated inside it that are still alive

A TorchDispatchMode sees every aten op the region runs (forward, backward, autograd's own ops)
after autograd, so it sees each tensor an op creates. A storage met for the first time as an
op's output is a new allocation: its bytes are added to `live`, and a weakref finalizer on the
storage (torch keeps one Python object per live storage) takes them off when it is freed,
whoever held it: a local, autograd's saved tensors, a .grad. Storages that existed before the
region (parameters, inputs) are never counted, nor the views and in-place results that share an
existing storage. What a kernel allocates internally and frees before returning is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatiny.plan.opcount import _tensors  # the tensors of a nested args tree


class LiveTensorPeak(TorchDispatchMode):
    """`peak` / `live` bytes of the storages allocated while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._known: set[int] = set()  # storages alive now that were seen: counted or pre-existing

    def _forget(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.live -= nbytes

    def _meet(self, t: torch.Tensor, allocated: bool) -> None:
        if t.layout != torch.strided or t.is_meta:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._known:
            return
        self._known.add(key)
        nbytes = storage.nbytes() if allocated else 0
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._forget, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):  # inputs from before the region: never counted
            self._meet(t, allocated=False)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self._meet(t, allocated=True)
        return out
