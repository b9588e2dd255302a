import pytest
import torch
import torch.distributed as dist

from megatiny.parallel import ParallelContext
from megatiny.parallel.grid import build_grid
from megatiny.testing import run_ranks


def _describe(tp, pp, cp):
    ctx = ParallelContext.initialize(tp=tp, pp=pp, cp=cp)
    out = {"rank": ctx.rank, "device": str(ctx.device), "first": ctx.is_first_stage}
    out["last"] = ctx.is_last_stage
    for dim in ("tp", "cp", "dp", "pp", "mp", "dp_cp", "embedding"):
        group = getattr(ctx, f"{dim}_group")
        ranks = getattr(ctx, f"{dim}_ranks")
        # The group really contains these ranks: all-gather each member's global rank.
        got = [torch.zeros(1) for _ in ranks]
        dist.all_gather(got, torch.tensor([float(ctx.rank)]), group=group)
        out[dim] = (ranks, [int(t.item()) for t in got], dist.get_rank(group))
        if dim in ("tp", "cp", "dp", "pp"):
            out[dim + "_coord"] = (getattr(ctx, f"{dim}_rank"), getattr(ctx, f"{dim}_size"))
    ctx.destroy()
    return out


@pytest.mark.parametrize("world,tp,pp,cp", [(4, 2, 1, 1), (4, 1, 2, 2), (8, 2, 2, 1), (8, 2, 2, 2)])
def test_groups_and_coordinates_match_grid(world, tp, pp, cp):
    grid = build_grid(world, tp=tp, pp=pp, cp=cp)
    for r, out in enumerate(run_ranks(_describe, world, args=(tp, pp, cp))):
        assert out["rank"] == r and out["device"] == "cpu"
        coords = grid.coords(r)
        for dim in ("tp", "cp", "dp", "pp"):
            ranks, gathered, group_rank = out[dim]
            assert ranks == grid.group_of(dim, r) == gathered
            assert group_rank == coords[dim]
            assert out[dim + "_coord"] == (coords[dim], grid.sizes[dim])
        assert out["mp"][0] == out["mp"][1] == grid.model_parallel_group_of(r)
        dp_cp = sorted(out["dp_cp"][0])
        assert dp_cp == out["dp_cp"][1]
        assert len(dp_cp) == grid.dp * grid.cp
        assert all(
            grid.coords(m)["tp"] == coords["tp"] and grid.coords(m)["pp"] == coords["pp"]
            for m in dp_cp
        )
        pp_ranks = grid.group_of("pp", r)
        assert out["embedding"][0] == out["embedding"][1] == sorted({pp_ranks[0], pp_ranks[-1]})
        assert out["first"] == (coords["pp"] == 0)
        assert out["last"] == (coords["pp"] == pp - 1)


def _bad_layout():
    ParallelContext.initialize(tp=3)


def test_bad_layout_raises_on_every_rank():
    from megatiny.testing import RankError

    with pytest.raises(RankError, match=r"world_size=4 is not divisible by tp\*pp\*cp"):
        run_ranks(_bad_layout, 4)


def test_initialize_without_process_group_names_the_fix(monkeypatch):
    # Robust to another test having left a default group up in this process.
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_process_group.*from_env"):
        ParallelContext.initialize(tp=1)


def test_from_env_outside_torchrun_names_the_fix(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        ParallelContext.from_env(tp=1)


def _from_env_in_rank():
    # The harness already set RANK/WORLD_SIZE/...; start from a fresh default group like torchrun.
    dist.destroy_process_group()
    ctx = ParallelContext.from_env(tp=2, timeout_s=30)
    out = (ctx.backend, ctx.tp_rank, ctx.dp_rank, ctx.tp_ranks)
    ctx.destroy()
    return out, dist.is_initialized()


def test_from_env_initializes_gloo_and_destroys():
    outs = run_ranks(_from_env_in_rank, 4)
    for r, (desc, still_up) in enumerate(outs):
        assert desc == ("gloo", r % 2, r // 2, [r - r % 2, r - r % 2 + 1])
        assert not still_up


def _describe_experts(tp, ep):
    ctx = ParallelContext.initialize(tp=tp, ep=ep)
    out = {}
    for dim in ("ep", "edp"):
        group, ranks = getattr(ctx, f"{dim}_group"), getattr(ctx, f"{dim}_ranks")
        got = [torch.zeros(1) for _ in ranks]
        dist.all_gather(got, torch.tensor([float(ctx.rank)]), group=group)
        out[dim] = (ranks, [int(t.item()) for t in got], getattr(ctx, f"{dim}_rank"),
                    getattr(ctx, f"{dim}_size"))  # fmt: skip
    ctx.destroy()
    return out


def test_expert_groups_match_grid():
    grid = build_grid(8, tp=2, ep=2)
    for r, out in enumerate(run_ranks(_describe_experts, 8, args=(2, 2))):
        for dim, size in (("ep", 2), ("edp", 2)):
            ranks, gathered, coord, got_size = out[dim]
            assert ranks == gathered == grid.group_of(dim, r)
            assert (coord, got_size) == (grid.expert_coords(r)[dim], size)
