"""What a GPU user gets by default: the kernels a shipped GPU config calls, listed on the meta
device with megatiny's kernels standing as usable (as they are on a CUDA tensor). By default none
of megatiny's Triton kernels run (torch's SDPA, norms and cross-entropy do); with
`model.fused_kernels=true` they do. The launch environment check is here too."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import megatiny.kernels as kernels
from megatiny.config import load_config
from megatiny.kernels import cross_entropy, flash_attention, layernorm, softmax
from megatiny.model import GPT
from megatiny.training.launch_env import GPU_ENV, launch_env_warnings

CONFIGS = Path(__file__).parents[1] / "launch" / "configs"
# module, public kernel, its torch reference (what the stand-in computes on meta)
KERNELS = [(flash_attention, "flash_attention", "flash_attention_ref"),
           (softmax, "scaled_causal_softmax", "scaled_causal_softmax_ref"),
           (layernorm, "layer_norm", "layer_norm_ref"),
           (layernorm, "rms_norm", "rms_norm_ref"),
           (cross_entropy, "cross_entropy", "cross_entropy_ref")]  # fmt: skip
TORCH_KERNELS = {F.scaled_dot_product_attention: "sdpa", F.layer_norm: "layer_norm",
                 F.cross_entropy: "cross_entropy"}  # fmt: skip


class _TorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.called = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in TORCH_KERNELS:
            self.called.add(TORCH_KERNELS[func])
        return func(*args, **(kwargs or {}))


def _kernels_called(monkeypatch, config: str, *overrides: str) -> tuple[list, list]:
    """(megatiny kernels, torch kernels) one forward + loss of `config` calls, on meta."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "kernels_usable", lambda x: True)  # as for a CUDA tensor
    called = []
    for module, name, ref in KERNELS:
        reference = getattr(module, ref)

        def stand_in(*args, _name=name, _ref=reference, **kw):
            called.append(_name)
            kw.pop("causal_offset", None)
            return _ref(*args, **kw)

        monkeypatch.setattr(module, name, stand_in)
    cfg = load_config(str(CONFIGS / config), ["model.n_layers=2", *overrides])
    with torch.device("meta"):
        model = GPT(cfg.model)
    ids = torch.zeros(1, 64, dtype=torch.long, device="meta")
    with _TorchCalls() as mode:
        model(ids, labels=ids)
    return sorted(set(called)), sorted(mode.called)


@pytest.mark.parametrize("config", ["gpt2-124m.yaml", "llama-1b.yaml", "llama-7b.yaml"])
def test_default_gpu_config_calls_no_megatiny_kernel(monkeypatch, config):
    ours, torchs = _kernels_called(monkeypatch, config)
    assert ours == [], f"{config} runs megatiny's unverified Triton kernels {ours} by default"
    assert {"sdpa", "cross_entropy"} <= set(torchs), torchs


def test_fused_kernels_are_opt_in(monkeypatch):
    ours, torchs = _kernels_called(monkeypatch, "gpt2-124m.yaml", "model.fused_kernels=true")
    assert ours == ["cross_entropy", "flash_attention", "layer_norm"]
    assert "sdpa" not in torchs
    ours, _ = _kernels_called(monkeypatch, "llama-1b.yaml", "model.fused_kernels=true")
    assert ours == ["cross_entropy", "flash_attention", "rms_norm"]


def test_launch_env_is_checked_on_cuda_only():
    assert launch_env_warnings("cpu", env={}) == []
    missing = launch_env_warnings("cuda", env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    assert len(missing) == 1 and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in missing[0]
    ok = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert launch_env_warnings(torch.device("cuda", 0), env=ok) == []


@pytest.mark.parametrize("script", ["run_local.sh", "run_multinode.sh", "slurm.sbatch"])
def test_launch_scripts_export_the_gpu_environment(script):
    text = (CONFIGS.parent / script).read_text()
    for name, (value, _) in GPU_ENV.items():
        assert f"export {name}=${{{name}:-{value}}}" in text, (script, name)
