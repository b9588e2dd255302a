"""Fused Triton kernels (``megatiny.kernels``).

Modules (each: Triton kernels (``@jit`` below: ``triton.jit`` in Triton's import mode), a
``torch.autograd.Function``, a public function, a plain-torch
``*_ref`` and the benchmark/compile entries used by ``benchmarks/kernels.py`` and the tests):

- ``softmax``: ``scaled_causal_softmax(x, scale)``, ``scaled_masked_softmax(x, mask, scale)``
- ``layernorm``: ``layer_norm(x, weight, bias, eps)``, ``rms_norm(x, weight, eps)``
- ``cross_entropy``: ``cross_entropy(logits, target, ignore_index=-100)`` and
  ``sharded_cross_entropy`` (the fused backend of
  ``megatiny.parallel.layers.vocab_parallel_cross_entropy``)
- ``flash_attention`` (a package: Python side + ``kernels.py``): ``flash_attention(q, k, v,
  causal=True, scale=None, causal_offset=None)`` and ``flash_attention_with_lse`` (GQA by head
  groups; the log-sum-exp for merging partial results)

Where they run: on CUDA tensors (compiled kernels), and on CPU tensors only under the Triton
interpreter, which must be switched on with ``TRITON_INTERPRET=1`` *before* ``triton`` is first
imported (Triton decides at import time whether ``@triton.jit`` builds compiled or interpreted
functions, including its own ``tl.max``/``tl.sum``). Nothing in this package sets that variable.
"""

import os

import torch


def interpreter_ready() -> bool:
    """Whether CPU tensors can run the kernels here: Triton was imported in interpreter mode
    (TRITON_INTERPRET=1 was set before ``triton`` was first imported).

    False when something imported ``triton`` earlier without it (``torch._dynamo`` does, e.g. via
    ``transformers``): the interpreter cannot be switched on afterwards in the same process.
    """
    import triton.language as tl

    return _is_interpreted(tl.max)


def jit(fn):
    """``triton.jit`` that follows the mode Triton itself was imported in.

    ``triton.jit`` reads TRITON_INTERPRET when each kernel is decorated, while ``tl.max`` /
    ``tl.sum`` were fixed when ``triton`` was imported; a kernel built in the other mode can run
    neither compiled nor interpreted. Following Triton's own mode keeps them consistent.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return InterpretedFunction(fn) if interpreter_ready() else JITFunction(fn)


def use_kernels(enabled: bool, x: torch.Tensor) -> bool:
    """Whether a module with ``fused_kernels=enabled`` should run the kernels on ``x``: on CUDA
    tensors, or on CPU under the Triton interpreter; plain torch when triton is unavailable."""
    if not enabled or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        return kernels_usable(x)
    except ImportError:
        return False


def kernels_usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run on tensors like ``x`` in this process: CUDA tensors
    always; CPU tensors when :func:`interpreter_ready`. A model can use this to pick its path."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreter_ready()


def check_ids(ids: torch.Tensor, limit: int, message: str, ignore_index: int | None = None) -> None:
    """Fail on ids outside ``[0, limit)`` (``ignore_index`` allowed): token ids into an embedding,
    labels into a vocabulary. On the CPU a ValueError, ``message`` formatted with the first bad id
    (``{bad}``); on CUDA a device-side assert (``torch._assert_async``: no host sync; the next
    synchronising call fails with "device-side assert triggered"), because an out-of-range id
    there is a silent wrong answer (masked gather) or a crash far from its cause; on meta nothing."""
    if ids.numel() == 0 or ids.is_meta:
        return
    valid = (ids >= 0) & (ids < limit)
    if ignore_index is not None:
        valid |= ids == ignore_index
    if ids.device.type != "cpu":
        torch._assert_async(valid.all(), message.format(bad="out of range"))
    elif not bool(valid.all()):
        raise ValueError(message.format(bad=int(ids[~valid].flatten()[0])))


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
            "set TRITON_INTERPRET=1 in the environment before triton is first imported (directly or "
            "by torch._dynamo / transformers), or use the *_ref torch functions / CUDA tensors"
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
