"""Bucketed, overlapped DP equals single-process training on the full batch."""

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  AdamW imports it lazily: once here, not per forked rank
import torch.distributed as dist
from torch import nn

from megatiny.parallel.data_parallel import DistributedDataParallel, no_sync_unless
from megatiny.testing import run_ranks

GLOBAL_BATCH, STEPS, ACCUM = 16, 3, 2


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4)
    )


def make_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g))
        for _ in range(STEPS)
    ]


def reference(model, data):
    """Plain single-process AdamW on the full batch: losses, grads and params per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads, params = [], [], []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    return losses, grads, params


def accumulate_local_batch(ddp, forward, x, y, rank, world):
    """This rank's slice of the global batch in ACCUM micro-batches, gradients synced only on the
    last one; returns the rank's mean loss (a tensor) after the sync has finished."""
    per_rank = GLOBAL_BATCH // world
    xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    local = torch.zeros(())
    for i, (xm, ym) in enumerate(zip(xs.chunk(ACCUM), ys.chunk(ACCUM))):
        with no_sync_unless(ddp, i == ACCUM - 1):
            loss = nn.functional.mse_loss(forward(xm), ym) / ACCUM
            loss.backward()
        local += loss.detach()
    ddp.finish_grad_sync()
    return local


def _ddp_worker(bucket_mb):
    rank, world = dist.get_rank(), dist.get_world_size()
    model, data = make_model(), make_data()
    ref = reference(copy.deepcopy(model), data)
    ddp = DistributedDataParallel(model, None, bucket_mb=bucket_mb, record_events=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads, params = [], [], []
    for x, y in data:
        opt.zero_grad()  # set_to_none: DDP must re-home the fresh grads into its buffer
        local = accumulate_local_batch(ddp, ddp, x, y, rank, world)
        dist.all_reduce(local)
        losses.append(local.item() / world)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    return dict(ref=ref, got=(losses, grads, params), events=ddp.events, n_buckets=len(ddp.buckets))


def _check_equal(ref, got):
    for step in range(STEPS):
        assert got[0][step] == pytest.approx(ref[0][step], rel=1e-5, abs=1e-6)
        for a, b in zip(got[1][step], ref[1][step]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(got[2][step], ref[2][step]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_matches_full_batch_with_accumulation_and_overlap(world):
    out = run_ranks(_ddp_worker, world, args=(0.0005,), timeout=120)
    for r in out:
        _check_equal(r["ref"], r["got"])
        assert r["n_buckets"] >= 3
        events = r["events"]
        kinds = [k for k, _ in events]
        # Overlap: the first bucket is launched while later parameters still await their grads.
        first_launch = kinds.index("launch")
        last_ready = len(kinds) - 1 - kinds[::-1].index("ready")
        assert first_launch < last_ready
        # The bucket of the last layer (reverse order) goes first.
        assert events[first_launch] == ("launch", 0)
        # Only the last micro-batch of each step communicates: one launch per bucket per step.
        assert kinds.count("launch") == r["n_buckets"] * STEPS


def _single_bucket_worker():
    model = make_model()
    ddp = DistributedDataParallel(model, None, bucket_mb=100.0, record_events=True)
    x, y = make_data()[0]
    nn.functional.mse_loss(ddp(x), y).backward()
    ddp.finish_grad_sync()
    return len(ddp.buckets), ddp.events[-1]


def test_one_big_bucket_launches_after_the_last_grad():
    n, last = run_ranks(_single_bucket_worker, 2)[0]
    assert n == 1 and last == ("launch", 0)


def _double_ready_worker():
    model = make_model()
    ddp = DistributedDataParallel(model, None, bucket_mb=1.0)
    x, y = make_data()[0]
    nn.functional.mse_loss(ddp(x), y).backward()
    try:
        nn.functional.mse_loss(ddp(x), y).backward()  # forgot no_sync on the first micro-batch
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_two_synced_backwards_without_no_sync_is_an_error():
    msg = run_ranks(_double_ready_worker, 2)[0]
    assert "became ready twice" in msg and "no_sync" in msg


def _unused_param_worker():
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    ddp = DistributedDataParallel(model, None, bucket_mb=1e-4)
    x = torch.full((2, 4), float(rank + 1))
    model["a"](x).sum().backward()  # "b" gets no gradient at all
    ddp.finish_grad_sync()
    return model["a"].weight.grad.clone(), model["b"].weight.grad.clone()


def test_parameters_without_grad_are_reduced_as_zeros():
    (ga, gb), _ = run_ranks(_unused_param_worker, 2)
    # d/dW sum(W x + b) = sum over batch of x = 2*(r+1) per column; average over ranks = 3.
    torch.testing.assert_close(ga, torch.full((4, 4), 3.0))
    torch.testing.assert_close(gb, torch.zeros(4, 4))
