"""Flash attention (forward, lse, dq/dk/dv) vs the plain-torch reference, under the interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported (Triton fixes
interpreted vs compiled at import time), so the kernels run on CPU tensors here, in fp32 (the
interpreter's bf16 ``tl.dot`` is wrong; halves are covered by the sm_90 compile test). The
interpreter's blocks are 16 x 16, so the shapes below span several query and key blocks, ragged
ends, head dims padded to the block (8, 24) and GQA groups.
"""

import pytest
import torch

import megatiny.kernels.flash_attention as fa
import megatiny.kernels.softmax
from megatiny.config import ModelConfig
from megatiny.kernels import interpreter_ready
from megatiny.model import GPT, attention_core

assert interpreter_ready(), "triton was imported compiled before TRITON_INTERPRET=1 was set"


def _qkv(b, n, g, s, t, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, s, d, generator=gen)
    k = torch.randn(b, g, t, d, generator=gen)
    v = torch.randn(b, g, t, d, generator=gen)
    return q, k, v


def _run(fn, q, k, v, with_lse=False, **kw):
    """Output (and lse) and the gradients of q, k, v under a random cotangent (also on lse)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    gen = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=gen)).sum()
    if with_lse:  # rows that see no key have lse = -inf and no gradient through it
        loss = (
            loss
            + (torch.where(lse.isinf(), 0.0, lse) * torch.randn(lse.shape, generator=gen)).sum()
        )
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def _compare(shape, with_lse=False, **kw):
    q, k, v = _qkv(*shape)
    got = _run(fa.flash_attention_with_lse, q, k, v, with_lse, **kw)
    ref = _run(
        lambda *a, **k_: fa.flash_attention_ref(*a, return_lse=True, **k_), q, k, v, with_lse, **kw
    )
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    return got


# (b, n, g, s, t, d): odd lengths, GQA n=4/g=2, MQA n=3/g=1, decoding (s=1), KV cache (s < t).
SHAPES = [
    (2, 4, 2, 33, 33, 16),
    (1, 3, 1, 7, 7, 32),
    (1, 2, 2, 64, 64, 16),
    (2, 4, 2, 1, 33, 16),
    (1, 3, 1, 7, 64, 32),
    (1, 2, 1, 17, 17, 8),
    (1, 2, 2, 33, 20, 24),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attention_matches_reference(shape, causal):
    out, lse, *_ = _compare(shape, causal=causal)
    assert torch.isfinite(out).all()
    assert torch.isfinite(lse).all() == (not causal or shape[3] <= shape[4])


@pytest.mark.parametrize("offset", [-5, 0, 3, 40])
def test_causal_offset_and_lse_gradient(offset):
    """Explicit offsets (ring attention's chunks): rows that see no key give O = 0, lse = -inf,
    and zero gradients; the lse output is differentiable."""
    out, lse, dq, _, _ = _compare((1, 4, 2, 20, 40, 16), with_lse=True, causal_offset=offset)
    blind = torch.arange(20) + offset < 0
    assert torch.all(out[:, :, blind] == 0) and torch.all(lse[:, :, blind] == float("-inf"))
    assert torch.all(dq[:, :, blind] == 0)
    assert torch.isfinite(lse[:, :, ~blind]).all()


def test_scale_strided_inputs_and_public_function():
    """q/k/v as the model makes them (transposed views of [b, s, heads, d]); explicit scale."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(2, 4, 2, 9, 9, 16))
    assert not q.is_contiguous()
    out = fa.flash_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(
        out, fa.flash_attention_ref(q, k, v, scale=0.3), atol=2e-5, rtol=2e-5
    )
    _compare((1, 2, 1, 9, 9, 16), causal=False, scale=0.3)


def test_saves_o_s_per_head_not_the_scores():
    """Backward keeps q, k, v, O and the [b, n, s] lse: O(s) per head. The materialised path
    (scores + scaled_causal_softmax) keeps an s x t matrix per head, which this count catches."""
    b, n, g, s, d = 1, 2, 1, 128, 16
    q, k, v = (x.requires_grad_() for x in _qkv(b, n, g, s, s, d))

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes), max(sizes)

    total, largest = saved_bytes(lambda: fa.flash_attention(q, k, v))
    inputs = sum(x.numel() * 4 for x in (q, k, v))
    assert total == inputs + b * n * s * d * 4 + b * n * s * 4  # q, k, v, O, lse
    assert largest < s * s * 4
    _, largest_materialised = saved_bytes(
        lambda: megatiny.kernels.softmax.scaled_causal_softmax(q @ k.transpose(-2, -1), 0.25) @ v
    )
    assert largest_materialised >= b * n * s * s * 4


def test_empty_and_bad_inputs():
    q, k, v = _qkv(1, 2, 1, 0, 5, 16)
    assert fa.flash_attention(q, k, v).shape == (1, 2, 0, 16)
    with pytest.raises(ValueError, match="dividing query heads"):
        fa.flash_attention(*_qkv(1, 3, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="one dtype"):
        q, k, v = _qkv(1, 2, 1, 4, 4, 16)
        fa.flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="head dim 256"):
        fa.flash_attention(*_qkv(1, 1, 1, 2, 2, 256))
    with pytest.raises(ValueError, match=r"q \[b, n, s, d\]"):
        fa.flash_attention(torch.randn(2, 4, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16))


@pytest.fixture
def attention_calls(monkeypatch):
    calls = {}
    for module, name in [
        (fa, "flash_attention"),
        (megatiny.kernels.softmax, "scaled_causal_softmax"),
    ]:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_attention_core_routes_fused_to_flash(attention_calls):
    """fused + no dropout: flash (also for cached decoding, t > s); dropout keeps the softmax path."""
    q, k, v = _qkv(1, 4, 2, 5, 12, 16)
    out = attention_core(q, k, v, causal_offset=7, fused=True)
    torch.testing.assert_close(out, attention_core(q, k, v, causal_offset=7), atol=2e-5, rtol=2e-5)
    assert attention_calls == {"flash_attention": 1}
    attention_core(q, k, v, causal_offset=7, dropout_p=0.1, fused=True)
    assert attention_calls == {"flash_attention": 1, "scaled_causal_softmax": 1}


def _model_run(config, input_ids, labels):
    torch.manual_seed(0)
    model = GPT(config)
    logits = model(input_ids)
    model(input_ids, labels=labels).backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}


def test_gpt_fused_attention_equals_sdpa(attention_calls):
    """The whole tiny Llama (GQA, head dim 8) with fused_kernels: logits and every gradient equal
    the plain SDPA model's; attention ran through the flash kernel."""
    kw = dict(vocab_size=61, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    ids, labels = (
        torch.randint(0, 61, (2, 19), generator=gen),
        torch.randint(0, 61, (2, 19), generator=gen),
    )
    logits_off, grads_off = _model_run(ModelConfig.llama(**kw, fused_kernels=False), ids, labels)
    assert attention_calls == {}
    logits_on, grads_on = _model_run(ModelConfig.llama(**kw, fused_kernels=True), ids, labels)
    assert attention_calls == {"flash_attention": 4}  # 2 layers x 2 forwards
    torch.testing.assert_close(logits_on, logits_off, atol=1e-5, rtol=1e-5)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)
