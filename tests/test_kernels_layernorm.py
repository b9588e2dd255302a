"""Fused LayerNorm / RMSNorm kernels vs their torch references, under the Triton interpreter (fp32).

tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported (Triton fixes
interpreted vs compiled at import time), so the kernels run on CPU tensors here.
"""

import pytest
import torch

from megatiny.kernels import interpreter_ready, layernorm

assert interpreter_ready(), "triton was imported compiled before TRITON_INTERPRET=1 was set"


SHAPES = [(3, 5, 7), (1, 1), (13, 33), (2, 1, 100), (9, 64)]
TOL = dict(atol=2e-5, rtol=1e-5)


def _run(fn, shape, weight=True, bias=True, residual=False, seed=0):
    """Outputs and grads of x, weight, bias, residual (None where absent)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    tensors = [
        torch.randn(shape, generator=g) * 2 + 0.5,
        torch.randn(n, generator=g) if weight else None,
        torch.randn(n, generator=g) if bias else None,
        torch.randn(shape, generator=g) if residual else None,
    ]
    leaves = [t.requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g2 = torch.Generator().manual_seed(seed + 1)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g2) for o in outs])
    return outs, [t.grad if t is not None else None for t in leaves]


def _compare(a, b):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, **TOL)
    for x, y in zip(a[1], b[1]):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_reference(shape, weight, bias):
    fused = _run(lambda x, w, b, r: layernorm.layer_norm(x, w, b, 1e-5), shape, weight, bias)
    ref = _run(lambda x, w, b, r: layernorm.layer_norm_ref(x, w, b, 1e-5), shape, weight, bias)
    _compare(fused, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_matches_reference(shape, weight):
    fused = _run(lambda x, w, b, r: layernorm.rms_norm(x, w, 1e-6), shape, weight, False)
    ref = _run(lambda x, w, b, r: layernorm.rms_norm_ref(x, w, 1e-6), shape, weight, False)
    _compare(fused, ref)


@pytest.mark.parametrize("rms", [False, True])
def test_residual_fused_variant(rms):
    """(norm(x + r), x + r) in one kernel; both outputs used so both gradients paths are exercised."""
    if rms:
        fused_fn = lambda x, w, b, r: layernorm.rms_norm(x, w, 1e-6, residual=r)  # noqa: E731
        ref_fn = lambda x, w, b, r: layernorm.rms_norm_ref(x, w, 1e-6, residual=r)  # noqa: E731
    else:
        fused_fn = lambda x, w, b, r: layernorm.layer_norm(x, w, b, 1e-5, residual=r)  # noqa: E731
        ref_fn = lambda x, w, b, r: layernorm.layer_norm_ref(x, w, b, 1e-5, residual=r)  # noqa: E731
    for shape in [(2, 5, 19), (1, 1)]:
        _compare(
            _run(fused_fn, shape, True, not rms, True), _run(ref_fn, shape, True, not rms, True)
        )


def test_weight_grad_partials_cover_many_rows():
    """More rows than backward programs: each program's dw/db partial sums several rows."""
    fused = _run(lambda x, w, b, r: layernorm.layer_norm(x, w, b, 1e-5), (37, 12))
    ref = _run(lambda x, w, b, r: layernorm.layer_norm_ref(x, w, b, 1e-5), (37, 12))
    assert layernorm._num_partials(37, torch.device("cpu")) < 37
    _compare(fused, ref)


def test_half_inputs():
    x = (torch.randn(4, 40) * 3).to(torch.bfloat16)
    w = torch.randn(40)
    y = layernorm.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, layernorm.rms_norm_ref(x, w, 1e-6), atol=2e-2, rtol=1e-2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="weight must have shape"):
        layernorm.layer_norm(torch.randn(2, 8), torch.ones(7), None)
    with pytest.raises(ValueError, match="residual shape"):
        layernorm.rms_norm(torch.randn(2, 8), torch.ones(8), residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="up to 8192 features"):
        layernorm.rms_norm(torch.randn(1, 8193), None)
