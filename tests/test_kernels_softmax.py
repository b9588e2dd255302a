"""Fused scale-mask-softmax kernels vs their torch references, under the Triton interpreter (fp32).

tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported (Triton fixes
interpreted vs compiled at import time), so the kernels run on CPU tensors here.
"""

import pytest
import torch

from megatiny.kernels import interpreter_ready, softmax

assert interpreter_ready(), "triton was imported compiled before TRITON_INTERPRET=1 was set"


SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 6, 6), (4, 9), (2, 2, 3, 17), (1, 2, 1, 13)]


def _check(fused, ref, x, **tol):
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = fused(a), ref(b)
    torch.testing.assert_close(ya, yb, **tol)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(a.grad, b.grad, **tol)
    return ya, a.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_causal_matches_reference(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    y, _ = _check(
        lambda t: softmax.scaled_causal_softmax(t, 0.37),
        lambda t: softmax.scaled_causal_softmax_ref(t, 0.37),
        x,
    )
    sq, sk = shape[-2:]
    above = torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1)
    assert torch.all(y[..., above] == 0)
    torch.testing.assert_close(y.sum(-1), torch.ones(shape[:-1]))


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_matches_reference_incl_fully_masked_rows(shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * 3
    mask_shape = (shape[0], 1, *shape[-2:]) if len(shape) == 4 else shape
    mask = torch.rand(mask_shape) < 0.4
    mask[..., 0, :] = True  # a fully masked row: uniform, as in Megatron (fill -10000)
    y, grad = _check(
        lambda t: softmax.scaled_masked_softmax(t, mask, 0.5),
        lambda t: softmax.scaled_masked_softmax_ref(t, mask, 0.5),
        x,
    )
    torch.testing.assert_close(y[..., 0, :], torch.full_like(y[..., 0, :], 1.0 / shape[-1]))
    assert torch.all(grad[mask.expand(shape)] == 0)


def test_chunked_path_long_rows(monkeypatch):
    """Rows longer than MAX_BLOCK take the streamed (online max/sum) path."""
    monkeypatch.setattr(softmax, "MAX_BLOCK", 4)
    monkeypatch.setattr(softmax, "CHUNK", 4)
    torch.manual_seed(2)
    x = torch.randn(2, 2, 5, 11) * 4
    _check(
        lambda t: softmax.scaled_causal_softmax(t, 0.9),
        lambda t: softmax.scaled_causal_softmax_ref(t, 0.9),
        x,
    )
    mask = torch.rand(2, 1, 5, 11) < 0.5
    mask[1, 0, 2] = True
    _check(
        lambda t: softmax.scaled_masked_softmax(t, mask, 0.9),
        lambda t: softmax.scaled_masked_softmax_ref(t, mask, 0.9),
        x,
    )


def test_causal_bottom_right_for_decoding():
    """sq < sk (a KV cache): query i sees keys j <= i + sk - sq; one query sees every key."""
    torch.manual_seed(3)
    x = torch.randn(2, 1, 9)
    y = softmax.scaled_causal_softmax(x, 1.0)
    torch.testing.assert_close(y, torch.softmax(x, -1))


def test_half_inputs_accumulate_in_fp32():
    torch.manual_seed(4)
    x = (torch.randn(2, 3, 6, 6) * 3).to(torch.bfloat16)
    y = softmax.scaled_causal_softmax(x, 0.25)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, softmax.scaled_causal_softmax_ref(x, 0.25), atol=4e-3, rtol=1e-2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="sq <= sk"):
        softmax.scaled_causal_softmax(torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        softmax.scaled_masked_softmax(
            torch.randn(2, 3, 4, 4), torch.zeros(3, 1, 4, 4, dtype=torch.bool), 1.0
        )
    with pytest.raises(ValueError, match=r"\[b, np, sq, sk\]"):
        softmax.scaled_causal_softmax(torch.randn(5), 1.0)
