"""Every comm Function at 2 and 4 ranks: forward and backward against the math.

Each rank feeds a different input and a different upstream gradient, so a missing or extra sum
shows up.
"""

import pytest
import torch
import torch.distributed as dist

from megatiny.parallel import comm
from megatiny.testing import run_ranks

SHAPE = (2, 8, 4)  # [b, s, h]; s and h divisible by 2 and 4


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _run_all():
    group = dist.group.WORLD
    rank = dist.get_rank()
    out = {}
    cases = {
        "copy_to_tp": lambda x: comm.copy_to_tp(x, group),
        "reduce_from_tp": lambda x: comm.reduce_from_tp(x, group),
        "scatter_to_tp": lambda x: comm.scatter_to_tp(x, group),
        "gather_from_tp": lambda x: comm.gather_from_tp(x, group),
        "scatter_to_sp": lambda x: comm.scatter_to_sp(x, group),
        "gather_from_sp": lambda x: comm.gather_from_sp(x, group),
        "gather_from_sp_replicated": lambda x: comm.gather_from_sp(
            x, group, tensor_parallel_output_grad=False
        ),
        "reduce_scatter_to_sp": lambda x: comm.reduce_scatter_to_sp(x, group),
        "gather_from_sp_dim2": lambda x: comm.gather_from_sp(x, group, dim=2),
    }
    for name, fn in cases.items():
        x, _ = _inputs(rank)
        x = x.clone().requires_grad_()
        x_before = x.detach().clone()
        y = fn(x)
        gen = torch.Generator().manual_seed(1000 + rank)
        dy = torch.randn(y.shape, generator=gen)
        dy_before = dy.clone()
        y.backward(dy)
        assert torch.equal(x.detach(), x_before), f"{name} modified its input"
        assert torch.equal(dy, dy_before), f"{name} modified the upstream gradient"
        out[name] = (y.detach(), dy, x.grad)
    # A size-1 group is the identity in both directions.
    solo = dist.new_group([rank], use_local_synchronization=True)
    x = _inputs(rank)[0].requires_grad_()
    y = comm.gather_from_sp(comm.reduce_from_tp(x, solo), solo)
    y.backward(torch.ones_like(y))
    out["solo"] = (torch.equal(y, x), torch.equal(x.grad, torch.ones_like(x)))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_comm_forward_backward_match_math(world):
    outs = run_ranks(_run_all, world)
    xs = [_inputs(r)[0] for r in range(world)]
    total_x = sum(xs)

    def dy(name):
        return [outs[r][name][1] for r in range(world)]

    def chunk(t, r, dim):
        return t.chunk(world, dim=dim)[r]

    for r in range(world):
        o = outs[r]
        y, _, dx = o["copy_to_tp"]
        assert torch.equal(y, xs[r])
        torch.testing.assert_close(dx, sum(dy("copy_to_tp")))

        y, _, dx = o["reduce_from_tp"]
        torch.testing.assert_close(y, total_x)
        assert torch.equal(dx, dy("reduce_from_tp")[r])

        y, _, dx = o["scatter_to_tp"]
        assert torch.equal(y, chunk(xs[r], r, -1))
        assert torch.equal(dx, torch.cat(dy("scatter_to_tp"), dim=-1))

        y, _, dx = o["gather_from_tp"]
        assert torch.equal(y, torch.cat(xs, dim=-1))
        assert torch.equal(dx, chunk(dy("gather_from_tp")[r], r, -1))

        y, _, dx = o["scatter_to_sp"]
        assert torch.equal(y, chunk(xs[r], r, 1))
        assert torch.equal(dx, torch.cat(dy("scatter_to_sp"), dim=1))

        y, _, dx = o["gather_from_sp"]
        assert torch.equal(y, torch.cat(xs, dim=1))
        torch.testing.assert_close(dx, chunk(sum(dy("gather_from_sp")), r, 1))

        y, _, dx = o["gather_from_sp_replicated"]
        assert torch.equal(y, torch.cat(xs, dim=1))
        assert torch.equal(dx, chunk(dy("gather_from_sp_replicated")[r], r, 1))

        y, _, dx = o["reduce_scatter_to_sp"]
        torch.testing.assert_close(y, chunk(total_x, r, 1))
        assert torch.equal(dx, torch.cat(dy("reduce_scatter_to_sp"), dim=1))

        y, _, dx = o["gather_from_sp_dim2"]
        assert torch.equal(y, torch.cat(xs, dim=2))
        torch.testing.assert_close(dx, chunk(sum(dy("gather_from_sp_dim2")), r, 2))

        assert o["solo"] == (True, True)


def _bad_split():
    comm.scatter_to_sp(torch.zeros(2, 5, 4), dist.group.WORLD)


def test_indivisible_split_names_the_fix():
    from megatiny.testing import RankError

    with pytest.raises(RankError, match="cannot split dim 1 of size 5.*multiple of 2"):
        run_ranks(_bad_split, 2)
