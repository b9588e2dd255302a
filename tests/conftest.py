"""Test-session setup.

Triton decides at its first import whether `@triton.jit` builds compiled or interpreted kernels,
and transformers imports it (through torch._dynamo) long before the kernel tests run. Switching
the interpreter on here, before any test module is imported, lets the Triton kernels run on CPU
tensors in this process. Nothing else changes: the model uses the kernels only when
`ModelConfig.fused_kernels` is on, and the sm_90 compile test runs in its own process without it.
"""

import os

import pytest

# On a GPU machine, benchmarks/gpu_check.sh sets MEGATINY_GPU_TESTS=1 and runs `pytest -m gpu`:
# the kernels then compile for the GPU instead of running in the interpreter.
if os.environ.get("MEGATINY_GPU_TESTS") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
# Every tensor a collective touches must be on the parallel context's device (collectives.py).
os.environ.setdefault("MEGATINY_CHECK_DEVICES", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: thread fan-out only costs time on a shared CPU (use per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
