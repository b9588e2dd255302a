"""zb-h2 and dualpipev through the executor: the one-rank loss and every gradient (fp32) at pp2
and pp4, and through `megatiny train`'s loop at pp2 x dp2; dualpipev's m >= 2 pp is a
ConfigError before any process group work. (Their orders, bubbles and memory:
tests/test_schedule_sim.py.)"""

import pytest
import torch

from megatiny.config import ConfigError
from megatiny.testing import run_ranks
from tests.test_schedule_zb import ATOL, RTOL, _zb_worker, train_pp2_against_one_rank


def check(kind, pp, m, tp=1, dp=1, sp=False, tie=True):
    """Every rank's loss and gradients against one device (tests/test_schedule_zb.py's worker)."""
    out = run_ranks(_zb_worker, tp * pp * dp, args=(kind, tp, pp, dp, sp, m, tie), timeout=240)
    chunks = 2 if kind == "dualpipev" else 1
    seen = set()
    for r in out:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL)
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, r["ref"][name], rtol=RTOL, atol=ATOL, msg=name)
            seen.add(name)
        # every chunk micro-batch ran its W, and the linears deferred their dW to it
        assert r["w_actions"] == m * chunks and r["deferred"]  # a count, or the names
    assert seen == set(out[0]["ref"])


@pytest.mark.parametrize("kind", ["zb-h2", "dualpipev"])
def test_new_schedules_pp2_match_one_rank(kind):
    check(kind, pp=2, m=4)  # dualpipev: m = 2p


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zb-h2", "dualpipev"])
def test_new_schedules_pp4_match_one_rank(kind):
    check(kind, pp=4, m=8)  # zb-h2's parallelogram from 2p-1, dualpipev's 2p


def test_dualpipev_needs_2pp_micro_batches():
    from megatiny.config import Config
    from megatiny.training.step import check_supported

    def config(global_batch):
        return Config.from_dict(
            {"model": dict(vocab_size=64, max_seq_len=16, d_model=16, n_layers=4, n_heads=2)},
            ["parallel.pp=2", "parallel.pipeline_schedule=dualpipev", "train.micro_batch_size=1",
             f"train.global_batch_size={global_batch}"],
        )  # fmt: skip

    with pytest.raises(ConfigError, match="dualpipev needs at least 2 \\* pp = 4 micro-batches"):
        check_supported(config(6), world_size=4)  # dp 2: 3 micro-batches
    check_supported(config(8), world_size=4)
    check_supported(config(6), world_size=2)  # zb-v's any m: dp 1, 6 micro-batches


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zb-h2", "dualpipev"])
def test_new_schedules_through_the_training_loop(kind, tmp_path):
    """`megatiny train`'s own path at pp2 x dp2 (4 micro-batches per rank, dualpipev's 2 pp): the
    one-rank losses; the checkpoint (single-device names) loads into the plain GPT."""
    common = ("train.global_batch_size=8", "train.micro_batch_size=1", "train.steps=3")
    train_pp2_against_one_rank(tmp_path, common, [f"parallel.pipeline_schedule={kind}"])
