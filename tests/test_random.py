"""Dropout randomness under TP: identical across TP ranks outside fork(), different inside it,
reproducible from the seed, and recomputed exactly under activation checkpointing."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatiny.parallel import ParallelContext
from megatiny.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatiny.parallel.random import TPRandom
from megatiny.testing import run_ranks


def mask(shape=(64, 64)):
    return F.dropout(torch.ones(shape), 0.5) != 0


def _draws(seed):
    ctx = ParallelContext.initialize(tp=2, pp=2)
    rng = TPRandom(seed, ctx)
    out = {"tp": ctx.tp_rank, "pp": ctx.pp_rank, "outside1": mask()}
    with rng.fork():
        out["fork1"] = mask()
    out["outside2"] = mask()
    with rng.fork():
        out["fork2"] = mask()
        with rng.fork():
            out["nested"] = mask()
        out["fork2_after_nested"] = mask()
    out["outside3"] = mask()

    # A replicated activation stays replicated: MLP with sharded dropout (fork) inside the TP
    # region and replicated dropout on its output.
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    c = ColumnParallelLinear.from_linear(fc1, ctx.tp_group)
    r = RowParallelLinear.from_linear(fc2, ctx.tp_group)
    x = torch.randn(2, 4, 8)
    TPRandom(seed, ctx)
    h = c(x)
    with rng.fork():
        h = F.dropout(h, 0.5)
    out["mlp"] = F.dropout(r(h), 0.5)
    gathered = [torch.empty_like(out["mlp"]) for _ in range(ctx.tp_size)]
    dist.all_gather(gathered, out["mlp"], group=ctx.tp_group)
    out["mlp_tp_equal"] = all(torch.equal(gathered[0], t) for t in gathered)
    ctx.destroy()
    return out


def test_fork_differs_across_tp_and_default_matches():
    outs = run_ranks(_draws, 4, args=(1234,))
    again = run_ranks(_draws, 4, args=(1234,))
    other = run_ranks(_draws, 4, args=(99,))
    by = {(o["tp"], o["pp"]): o for o in outs}
    keys = ["outside1", "fork1", "outside2", "fork2", "nested", "fork2_after_nested", "outside3"]
    for pp in (0, 1):
        a, b = by[(0, pp)], by[(1, pp)]
        for k in ("outside1", "outside2", "outside3"):
            assert torch.equal(a[k], b[k]), f"replicated dropout differs across TP ({k})"
        for k in ("fork1", "fork2", "nested", "fork2_after_nested"):
            assert not torch.equal(a[k], b[k]), f"sharded dropout equal across TP ({k})"
        assert a["mlp_tp_equal"] and b["mlp_tp_equal"]
    for o in outs:
        masks = [o[k] for k in keys]
        # All draws distinct from each other (a fork neither repeats nor resets a stream).
        assert all(not torch.equal(m1, m2) for i, m1 in enumerate(masks) for m2 in masks[i + 1 :])
        assert 0.4 < o["fork1"].float().mean() < 0.6
    assert not torch.equal(by[(0, 0)]["outside1"], by[(0, 1)]["outside1"]), "stages must differ"
    for o, o2, o3 in zip(outs, again, other):
        for k in keys:
            assert torch.equal(o[k], o2[k]), f"not reproducible from the seed ({k})"
            assert not torch.equal(o[k], o3[k]), f"seed has no effect ({k})"


def _recompute():
    ctx = ParallelContext.initialize(tp=2)
    rng = TPRandom(7, ctx)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    c = ColumnParallelLinear.from_linear(fc1, ctx.tp_group)
    r = RowParallelLinear.from_linear(fc2, ctx.tp_group)
    x0 = torch.randn(2, 4, 8)

    def block(x):
        h = c(x)
        with rng.fork():
            h = F.dropout(F.gelu(h), 0.5)
        return F.dropout(r(h), 0.5)

    def forked_block(x):  # fork around the whole block, as with dropout on SP shards
        with rng.fork():
            return block(x)

    results = []
    for mode in ("plain", "reentrant", "non_reentrant", "fork_outside"):
        TPRandom(7, ctx)
        x = x0.clone().requires_grad_()
        if mode == "plain":
            y = block(x)
        elif mode == "fork_outside":
            with rng.fork():
                y = checkpoint(block, x, use_reentrant=False)
            TPRandom(7, ctx)
            xr = x0.clone().requires_grad_()
            y_ref = forked_block(xr)
            y_ref.sum().backward()
        else:
            y = checkpoint(block, x, use_reentrant=mode == "reentrant")
        y.sum().backward()
        grads = (y.detach(), x.grad, c.weight.grad.clone(), r.weight.grad.clone())
        if mode == "fork_outside":
            # Checkpointed fork-around-block equals its plain twin (grads accumulate twice).
            assert torch.equal(y.detach(), y_ref.detach())
            assert torch.allclose(x.grad, xr.grad)
        else:
            results.append(grads)
        c.weight.grad = r.weight.grad = c.bias.grad = r.bias.grad = None
    plain = results[0]
    for other in results[1:]:
        for a, b in zip(plain, other):
            assert torch.equal(a, b), "recomputed dropout masks differ from the forward ones"
    ctx.destroy()
    return True


def test_recompute_reproduces_forked_dropout():
    assert run_ranks(_recompute, 2) == [True, True]


def test_single_rank_fork_restores_default_stream():
    class Ctx:
        tp_rank, pp_rank, cp_rank, device = 0, 0, 0, torch.device("cpu")

    rng = TPRandom(5, Ctx())
    with rng.fork():
        inside = mask()
    after = mask()
    torch.manual_seed(5)
    torch.randint(0, 1 << 62, (1,))  # the one draw fork() takes from the default stream
    assert torch.equal(after, mask())
    assert not torch.equal(inside, after)
