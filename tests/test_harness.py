import pytest
import torch
import torch.distributed as dist

from tests.dist import RankError, run_ranks


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("planted failure")
    return 0


def _hang_on_one():
    if dist.get_rank() == 1:
        import time

        time.sleep(60)
    return 0


def test_run_ranks_returns_per_rank_results():
    out = run_ranks(_sum_ranks, 4)
    assert [r for r, _ in out] == [0, 1, 2, 3]
    assert all(t.item() == 6.0 for _, t in out)


def test_run_ranks_surfaces_traceback():
    with pytest.raises(RankError, match="planted failure"):
        run_ranks(_fail_on_one, 2)


def test_run_ranks_reports_hang():
    with pytest.raises(RankError, match="hang"):
        run_ranks(_hang_on_one, 2, timeout=3)
