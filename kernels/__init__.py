"""Fused Triton kernels, installed as ``megatiny.kernels``.

Modules (each: ``@triton.jit`` kernels, a ``torch.autograd.Function``, a public function, a plain-torch
``*_ref`` and the benchmark/compile entries used by ``benchmarks/kernels.py`` and the tests):

- ``softmax``: ``scaled_causal_softmax(x, scale)``, ``scaled_masked_softmax(x, mask, scale)``
- ``layernorm``: ``layer_norm(x, weight, bias, eps)``, ``rms_norm(x, weight, eps)``
- ``cross_entropy``: ``cross_entropy(logits, target, ignore_index=-100)`` and
  ``vocab_parallel_cross_entropy(logits_shard, target, group, ...)``

Where they run: on CUDA tensors (compiled kernels), and on CPU tensors only under the Triton
interpreter, which must be switched on with ``TRITON_INTERPRET=1`` *before* ``triton`` is first
imported (Triton decides at import time whether ``@triton.jit`` builds compiled or interpreted
functions, including its own ``tl.max``/``tl.sum``). Nothing in this package sets that variable.
"""

import os

import torch


def interpreter_requested() -> bool:
    """True when the environment asks for the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def kernels_usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run on tensors like ``x`` in this process.

    CUDA tensors always can (when the kernels were built compiled); CPU tensors only when the
    kernels were built by the interpreter. This is the check ``megatiny.model`` can use to pick the
    fused or the torch path.
    """
    if x.is_cuda:
        return True
    from megatiny.kernels.softmax import _softmax_fwd_kernel

    return x.device.type == "cpu" and _is_interpreted(_softmax_fwd_kernel)


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error when ``kernel`` cannot run on these tensors' device.

    Also checks that all tensors share one device.
    """
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(
                f"all inputs of a fused kernel must be on one device, got {device} and {t.device}; "
                "move them with .to(device)"
            )
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise RuntimeError(
            f"the Triton kernels run on CUDA (or CPU under the interpreter), not {device}"
        )
    if not _is_interpreted(kernel):
        raise RuntimeError(
            "the Triton kernels got CPU tensors but Triton was imported without its interpreter; "
            "set TRITON_INTERPRET=1 in the environment before importing triton (or megatiny.kernels), "
            "or use the *_ref torch functions / move the tensors to CUDA"
        )


def num_warps_for(block: int) -> int:
    """Warps per program for a row kernel whose row block holds ``block`` elements."""
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    if block >= 1024:
        return 4
    return 2 if block >= 256 else 1
