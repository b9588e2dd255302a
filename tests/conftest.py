"""Test-session setup.

Triton decides at its first import whether `@triton.jit` builds compiled or interpreted kernels,
and transformers imports it (through torch._dynamo) long before the kernel tests run. Switching
the interpreter on here, before any test module is imported, lets the Triton kernels run on CPU
tensors in this process. Nothing else changes: the model uses the kernels only when
`ModelConfig.fused_kernels` is on, and the sm_90 compile test runs in its own process without it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
# Every tensor a collective touches must be on the parallel context's device (collectives.py).
os.environ.setdefault("MEGATINY_CHECK_DEVICES", "1")
