"""The whole tiny GPT with ``fused_kernels`` on equals it off (logits, loss, every gradient).

Runs the Triton kernels under the interpreter (fp32): tests/conftest.py sets TRITON_INTERPRET=1
before triton is first imported (Triton fixes interpreted vs compiled at import time).
"""

import pytest
import torch

import megatiny.kernels.cross_entropy
import megatiny.kernels.flash_attention
import megatiny.kernels.layernorm
from megatiny.config import ModelConfig
from megatiny.kernels import interpreter_ready
from megatiny.model import GPT

assert interpreter_ready(), "triton was imported compiled before TRITON_INTERPRET=1 was set"

V = 61  # not a power of two: the cross-entropy rows are ragged


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the public kernel functions, so the test proves the fused path ran."""
    calls = {}
    for module, name in [
        (megatiny.kernels.flash_attention, "flash_attention"),
        (megatiny.kernels.layernorm, "layer_norm"),
        (megatiny.kernels.layernorm, "rms_norm"),
        (megatiny.kernels.cross_entropy, "cross_entropy"),
    ]:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _run(config, input_ids, labels):
    torch.manual_seed(0)
    model = GPT(config)
    logits = model(input_ids)
    loss = model(input_ids, labels=labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits, loss, grads


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,norm_kernel,extra",
    [("gpt2", "layer_norm", {}), ("llama", "rms_norm", {"n_kv_heads": 2})],
)
def test_fused_kernels_on_equals_off(kernel_calls, family, norm_kernel, extra):
    kw = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, **extra)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (2, 7), generator=g)
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[0, :3] = -100
    preset = getattr(ModelConfig, family)
    logits_off, loss_off, grads_off = _run(preset(**kw, fused_kernels=False), input_ids, labels)
    assert kernel_calls == {}
    logits_on, loss_on, grads_on = _run(preset(**kw, fused_kernels=True), input_ids, labels)
    # 2 layers x 2 forwards: flash attention and both block norms per layer, plus the final norm.
    assert kernel_calls["flash_attention"] == 4
    assert kernel_calls[norm_kernel] == 2 * (2 * 2 + 1)
    assert kernel_calls["cross_entropy"] == 1
    torch.testing.assert_close(logits_on, logits_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_kernels_off_the_interpreter_take_the_torch_path(kernel_calls, monkeypatch):
    """Without CUDA and without TRITON_INTERPRET the switch falls back to plain torch."""
    monkeypatch.delenv("TRITON_INTERPRET")
    config = ModelConfig.llama(vocab_size=V, max_seq_len=8, d_model=16, n_layers=1, n_heads=2)
    config.fused_kernels = True
    model = GPT(config)
    model(torch.randint(0, V, (1, 5)), labels=torch.randint(0, V, (1, 5))).backward()
    assert kernel_calls == {}
