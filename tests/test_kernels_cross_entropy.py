"""Fused cross-entropy kernels (plain and vocab-parallel) vs torch, under the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported (Triton fixes
interpreted vs compiled at import time), so the kernels run on CPU tensors here.
"""

import pytest
import torch
import torch.distributed as dist

from megatiny.kernels import cross_entropy as ce
from megatiny.kernels import interpreter_ready
from megatiny.testing import run_ranks

assert interpreter_ready(), "triton was imported compiled before TRITON_INTERPRET=1 was set"


def _inputs(shape, vocab, seed=0, ignore_first=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 4
    target = torch.randint(0, vocab, shape, generator=g)
    if ignore_first:
        target.view(-1)[0] = -100
    return logits, target


def _loss_and_grad(fn, logits, target):
    x = logits.clone().requires_grad_()
    loss = fn(x, target)
    dloss = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7))
    loss.backward(dloss)
    return loss, x.grad


@pytest.mark.parametrize(
    "shape,vocab,max_block",
    [((3, 5), 37, 4096), ((1,), 1, 4096), ((4, 3), 100, 16), ((7,), 5, 2), ((2, 1), 257, 64)],
)
def test_cross_entropy_matches_reference(monkeypatch, shape, vocab, max_block):
    monkeypatch.setattr(ce, "MAX_BLOCK", max_block)  # small blocks: the chunked (online) path
    logits, target = _inputs(shape, vocab)
    loss, grad = _loss_and_grad(ce.cross_entropy, logits, target)
    loss_ref, grad_ref = _loss_and_grad(ce.cross_entropy_ref, logits, target)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert loss.view(-1)[0] == 0 and torch.all(grad.view(-1, vocab)[0] == 0)


def test_all_rows_ignored_and_half_logits():
    logits, target = _inputs((2, 3), 11)
    target.fill_(-100)
    loss, grad = _loss_and_grad(ce.cross_entropy, logits, target)
    assert torch.all(loss == 0) and torch.all(grad == 0)
    logits, target = _inputs((4,), 50, ignore_first=False)
    half = logits.to(torch.bfloat16)
    torch.testing.assert_close(ce.cross_entropy(half, target), ce.cross_entropy_ref(half, target))


def _vocab_parallel(x, t, group, vocab_size, fused=True):
    from megatiny.parallel.layers import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(x, t, group, vocab_size=vocab_size, fused=fused)


@pytest.mark.parametrize("fused", [True, False])
def test_single_rank_vocab_parallel_excludes_padding(fused):
    """The one vocab-parallel cross-entropy (parallel/layers.py), kernel backend and torch."""
    logits, target = _inputs((3, 4), 29)
    padded = torch.cat([logits, torch.randn(3, 4, 3) * 10], dim=-1)
    loss, grad = _loss_and_grad(lambda x, t: _vocab_parallel(x, t, None, 29, fused), padded, target)
    loss_ref, grad_ref = _loss_and_grad(ce.cross_entropy_ref, logits, target)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad[..., :29], grad_ref)
    assert torch.all(grad[..., 29:] == 0)


def test_bad_targets_raise_clear_errors():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="target shape"):
        ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1]))


def _vocab_parallel_rank(vocab, width, max_block):
    ce.MAX_BLOCK = max_block
    rank, world = dist.get_rank(), dist.get_world_size()
    logits, target = _inputs((3, 5), vocab)
    padded = torch.cat([logits, torch.full((3, 5, world * width - vocab), 55.0)], dim=-1)
    shard = padded[..., rank * width : (rank + 1) * width]
    group = dist.group.WORLD
    fused = _loss_and_grad(lambda x, t: _vocab_parallel(x, t, group, vocab), shard, target)
    layers = _loss_and_grad(lambda x, t: _vocab_parallel(x, t, group, vocab, False), shard, target)
    return fused, layers


@pytest.mark.parametrize("world,vocab,width", [(2, 40, 24), (3, 40, 16), (3, 30, 16)])
def test_vocab_parallel_matches_full_logits(world, vocab, width):
    """TP ranks each hold a vocab slice (the last partly or wholly padding); equals the unsharded loss."""
    results = run_ranks(_vocab_parallel_rank, world, args=(vocab, width, 8), timeout=300)
    logits, target = _inputs((3, 5), vocab)
    loss_ref, grad_ref = _loss_and_grad(ce.cross_entropy_ref, logits, target)
    grads = []
    for (loss, grad), (loss_layers, grad_layers) in results:
        torch.testing.assert_close(loss, loss_ref)
        torch.testing.assert_close(loss_layers, loss_ref)
        torch.testing.assert_close(grad, grad_layers)
        grads.append(grad)
    full = torch.cat(grads, dim=-1)
    torch.testing.assert_close(full[..., :vocab], grad_ref)
    assert torch.all(full[..., vocab:] == 0)
