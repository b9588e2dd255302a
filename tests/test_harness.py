"""megatiny.testing.run_ranks: per-rank results, a failing rank's traceback, hangs and deaths
named by rank, both ways of passing fn's arguments."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatiny.testing import RankError, run_ranks


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("planted failure")
    return 0


def _stuck_here_on_one():
    if dist.get_rank() == 1:
        time.sleep(60)
    return 0


def _die_on_one():
    if dist.get_rank() == 1:
        os._exit(7)
    return 0


def _scaled(a, b=1.0):
    return dist.get_rank() * a * b


def test_run_ranks_returns_per_rank_results():
    out = run_ranks(_sum_ranks, 4)
    assert [r for r, _ in out] == [0, 1, 2, 3]
    assert all(t.item() == 6.0 for _, t in out)


def test_run_ranks_passes_arguments_positionally_or_as_args():
    assert run_ranks(_scaled, 2, 3.0) == [0.0, 3.0]
    assert run_ranks(_scaled, 2, args=(3.0,), kwargs={"b": 2.0}) == [0.0, 6.0]
    with pytest.raises(TypeError, match="not both"):
        run_ranks(_scaled, 2, 3.0, args=(3.0,))


def test_run_ranks_surfaces_traceback():
    with pytest.raises(RankError, match="(?s)rank 1 of 2 failed.*planted failure"):
        run_ranks(_fail_on_one, 2)


def test_run_ranks_reports_hang_with_the_rank_and_its_stack():
    with pytest.raises(RankError, match=r"hang: ranks \[1\] of 2") as info:
        run_ranks(_stuck_here_on_one, 2, timeout=3)
    assert "_stuck_here_on_one" in str(info.value)  # where rank 1 was stuck


def test_run_ranks_reports_a_dead_rank():
    with pytest.raises(RankError, match=r"died without a result, exit codes \{1: 7\}"):
        run_ranks(_die_on_one, 2)


def test_a_process_group_that_fails_to_form_is_retried_on_a_new_port(tmp_path, monkeypatch):
    # e.g. the free port was taken by another process before gloo bound it: the first attempt's
    # rank 0 fails inside init_process_group; run_ranks starts afresh and the job succeeds.
    real = dist.init_process_group
    marker = tmp_path / "failed-once"

    def flaky(*args, **kwargs):
        if kwargs.get("rank") == 0 and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("Gloo connectFullMesh failed: Connection closed by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", flaky)
    assert run_ranks(_rank_and_world, 2, timeout=60) == [(0, 2), (1, 2)]
    assert marker.exists()


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()
