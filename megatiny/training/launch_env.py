"""The environment a GPU run relies on, checked at the start of `megatiny train`.

The launch scripts (launch/run_local.sh, run_multinode.sh, slurm.sbatch) export these; a job
started another way gets one warning line per missing setting, with the fix:

- CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue per GPU, so kernels run in the order they were
  launched. The sequence-parallel backward (megatiny/parallel/sp_linear.py) posts its all-gather
  before the weight-gradient GEMM to overlap them, which holds only in launch order (Megatron
  asserts the same setting). Read when the CUDA context is created: set it before launching.
- TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a collective that fails or outlives the process-group timeout
  (`train.timeout_s`) aborts the communicator and ends the process, so torchrun sees the failure
  (and can restart) instead of ranks hanging in a dead collective.

On CPU (gloo) none of this applies and nothing is checked.
"""

from __future__ import annotations

import os

import torch

GPU_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": (
        "1",
        "kernels must run in launch order for the sequence-parallel backward overlap",
    ),
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": (
        "1",
        "a failed or timed-out NCCL collective must end the job instead of hanging it",
    ),
}


def launch_env_warnings(device: torch.device | str, env=None) -> list[str]:
    """One line per GPU setting missing from `env` (default os.environ); none off CUDA."""
    if torch.device(device).type != "cuda":
        return []
    env = os.environ if env is None else env
    return [
        f"warning: {name}={env.get(name, '<unset>')}; {why}. Fix: export {name}={value} before "
        "launching (launch/run_local.sh, run_multinode.sh and slurm.sbatch do)"
        for name, (value, why) in GPU_ENV.items()
        if env.get(name) != value
    ]
