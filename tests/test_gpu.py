"""Checks that need a CUDA GPU (`pytest -m gpu`, run by benchmarks/gpu_check.sh; skipped elsewhere
with that reason): the Triton kernels against their torch references in bf16 / fp16 at real
shapes, the model with fused kernels against plain torch, and a bf16 training step."""

import pytest
import torch

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol, msg=what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_and_norms_at_real_shapes(dtype):
    from megatiny.kernels.layernorm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
    from megatiny.kernels.softmax import scaled_causal_softmax, scaled_causal_softmax_ref

    torch.manual_seed(0)
    x = torch.randn(4, 12, 1024, 1024, device=DEV, dtype=dtype)
    _close(scaled_causal_softmax(x, 0.125), scaled_causal_softmax_ref(x, 0.125), dtype, "softmax")
    h = torch.randn(8192, 4096, device=DEV, dtype=dtype)
    w, b = torch.randn(4096, device=DEV, dtype=dtype), torch.randn(4096, device=DEV, dtype=dtype)
    _close(layer_norm(h, w, b), layer_norm_ref(h, w, b), dtype, "layer_norm")
    _close(rms_norm(h, w), rms_norm_ref(h, w), dtype, "rms_norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_at_gpt2_vocab(dtype):
    from megatiny.kernels.cross_entropy import cross_entropy, cross_entropy_ref

    torch.manual_seed(0)
    logits = torch.randn(8192, 50257, device=DEV, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 50257, (8192,), device=DEV)
    loss = cross_entropy(logits, target)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    ref = cross_entropy_ref(logits, target)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    _close(loss, ref, dtype, "loss")
    _close(grad, ref_grad, dtype, "dlogits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,kv_heads", [(64, 12), (128, 8), (128, 2)])
def test_flash_attention_fwd_bwd_at_real_shapes(dtype, head_dim, kv_heads):
    from megatiny.kernels.flash_attention import flash_attention, flash_attention_ref

    torch.manual_seed(0)
    n = 16 if head_dim == 128 else 12
    q = torch.randn(2, n, 2048, head_dim, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, 2048, head_dim, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = flash_attention(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = flash_attention_ref(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    _close(out, ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(g, r, dtype, name)


def _model(fused, family="llama"):
    from megatiny.config import ModelConfig
    from megatiny.model import GPT

    make = ModelConfig.llama if family == "llama" else ModelConfig.gpt2
    kw = {"n_kv_heads": 4} if family == "llama" else {}
    torch.manual_seed(0)
    cfg = make(vocab_size=32000, d_model=1024, n_layers=4, n_heads=16, max_seq_len=1024,
               fused_kernels=fused, **kw)  # fmt: skip
    return GPT(cfg).to(DEV)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_with_fused_kernels_matches_plain_torch(family):
    ids = torch.randint(0, 32000, (4, 1024), device=DEV)
    losses, grads = [], []
    for fused in (False, True):
        model = _model(fused, family)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
    for name, g in grads[0].items():
        scale = g.abs().max().clamp(min=1e-6)
        assert (grads[1][name] - g).abs().max() / scale < 5e-2, name


def test_bf16_training_steps_lower_the_loss():
    model = _model(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 32000, (8, 512), device=DEV)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0], losses
