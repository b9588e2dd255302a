"""Silent data corruption (issue 29): MEGATINY_FAULT parsing and bit flips, the checksums, and on
dp2 ranks the step replay (`train.check_replay_every`) naming the rank, the step and the parameter,
transient vs persistent, `sdc_policy=skip` equal to a clean run with that update skipped, `stop`
exiting 1 with the previous step's intact checkpoint, and the replicas' comparison after the
reduction; under ZeRO-2/3 (parallel.zero=2, 3) the same through the checksums of each bucket's
reduce-scatter."""

import json
import os
import subprocess

import pytest
import torch

from megatiny.testing import run_ranks
from megatiny.training.faults import FaultInjector, FaultSpecError, parse
from megatiny.training.sdc import checksums
from tests.test_train import REPO, make_corpus, tiny_config, torchrun_tiny_cmd

CHECK = ("train.steps=6", "train.check_replay_every=1", "train.sdc_policy=skip")


def test_fault_specs_parse_and_bad_ones_say_the_forms():
    (slow, flip) = parse("slow:rank=2:ms=150,grad_bitflip:rank=1:step=3:param=head.weight:repeat=1")
    assert (slow.kind, slow.rank, slow.ms) == ("slow", 2, 150.0)
    assert (flip.rank, flip.step, flip.param, flip.repeat, flip.bit) == (
        1,
        3,
        "head.weight",
        True,
        22,
    )
    for bad in ("slow:rank=1", "grad_bitflip:rank=1", "melt:rank=0", "slow:rank=x:ms=1",
                "grad_bitflip:rank=0:step=0", "slow:rank=0:ms=5:speed=2"):  # fmt: skip
        with pytest.raises(FaultSpecError, match="rank=R"):
            parse(bad)
    assert parse("") == [] and FaultInjector.from_env(0, {}) is None


def test_bitflip_flips_one_bit_of_the_named_gradient_once_or_per_pass():
    grads = [("a", torch.zeros(8)), ("b", torch.ones(5))]
    once = FaultInjector(parse("grad_bitflip:rank=1:step=3:param=b"), rank=1)
    assert not once.flip_due(2) and once.flip_due(3) and not once.flip_due(3, 1)
    assert FaultInjector(parse("grad_bitflip:rank=1:step=3"), rank=0).defer_due(3)  # every rank
    before = grads[1][1].clone()
    once.flip(3, 0, grads)
    changed = (grads[1][1] != before).nonzero().flatten()
    assert len(changed) == 1 and torch.equal(grads[0][1], torch.zeros(8))
    xor = grads[1][1].view(torch.int32)[changed] ^ before.view(torch.int32)[changed]
    assert xor.item() == 1 << 22
    again = FaultInjector(parse("grad_bitflip:rank=0:step=2:repeat=1"), rank=0)
    assert again.flip_due(5, 2) and not again.flip_due(1)
    with pytest.raises(FaultSpecError, match="not a parameter of this rank"):
        once.flip(3, 0, [("a", torch.zeros(2))])


def test_checksums_see_one_flip_and_two_that_cancel_in_a_plain_sum():
    g = torch.randn(64)
    base = checksums([("g", None, g)])
    one, two = g.clone(), g.clone()
    one.view(torch.int32)[5] ^= 1
    i, j = [int(k) for k in (g.view(torch.int32) & 2 == 0).nonzero()[:2]]
    two.view(torch.int32)[i] += 2  # bit 1 set at two places: the plain sum moves by 4 ...
    two.view(torch.int32)[j] += 2
    three = g.clone()
    three.view(torch.int32)[i] += 4  # ... as it does with 4 added at one of them
    sums = [checksums([("g", None, t)]) for t in (one, two, three)]
    assert all(not torch.equal(s[0], base[0]) for s in sums)
    assert sums[1][0, 0] == sums[2][0, 0] and sums[1][0, 1] != sums[2][0, 1]


def _run(cfg, skip_update_at=None, corrupt_reduced_at=None):
    """Train on this rank; optionally drop one step's update (the reference of `skip`) or flip a
    bit of rank 1's *reduced* gradient (a fault the replicas' comparison must see)."""
    from megatiny.parallel import ParallelContext
    from megatiny.training.loop import train
    from megatiny.training.sdc import SilentDataCorruption
    from megatiny.training.step import build_trainer

    ctx = ParallelContext.initialize()
    trainer = build_trainer(cfg, ctx)
    if skip_update_at is not None:
        step = trainer.optimizer.step
        trainer.optimizer.step = lambda: None if trainer.step + 1 == skip_update_at else step()
    if corrupt_reduced_at is not None and ctx.rank == 1:
        finish = trainer.ddp.finish_grad_sync

        def corrupted():
            finish()
            if trainer.step + 1 == corrupt_reduced_at:
                trainer.ddp.grad_buffer[7:8].view(torch.int32).bitwise_xor_(1 << 3)

        trainer.ddp.finish_grad_sync = corrupted
    try:
        return train(cfg, ctx, trainer)
    except SilentDataCorruption as e:
        return str(e)
    finally:
        ctx.destroy()


@pytest.mark.slow
def test_dp2_bitflip_is_transient_and_skip_equals_a_clean_run_without_that_update(tmp_path, capfd):
    prefix = make_corpus(tmp_path)
    fault = {"MEGATINY_FAULT": "grad_bitflip:rank=1:step=3:param=blocks.0.mlp.fc.weight"}
    cfg = tiny_config(prefix, tmp_path / "a", *CHECK, dropout=0.1)
    out = run_ranks(_run, 2, args=(cfg,), env=fault, timeout=240)[0]
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if "silent data corruption" in x)
    for said in ("rank 1", "step 3", "blocks.0.mlp.fc.weight", "transient", "skipped"):
        assert said in line, line
    assert err.count("silent data corruption") == 1 and out["skipped_steps"] == 1
    ref_cfg = tiny_config(prefix, tmp_path / "b", "train.steps=6", dropout=0.1)
    ref = run_ranks(_run, 2, args=(ref_cfg, 3), timeout=240)[0]
    assert out["losses"] == ref["losses"]  # bitwise: the replays leave no trace
    clean_cfg = tiny_config(prefix, tmp_path / "c", "train.steps=6", dropout=0.1)
    clean = run_ranks(_run, 2, args=(clean_cfg,), timeout=240)[0]
    assert out["losses"][:3] == clean["losses"][:3] and out["losses"][3] != clean["losses"][3]


@pytest.mark.slow
def test_dp2_repeated_bitflip_is_persistent(tmp_path, capfd):
    prefix = make_corpus(tmp_path)
    fault = {"MEGATINY_FAULT": "grad_bitflip:rank=1:step=3:repeat=1"}
    cfg = tiny_config(prefix, tmp_path / "a", *CHECK[1:], "train.steps=4")
    out = run_ranks(_run, 2, args=(cfg,), env=fault, timeout=240)[0]
    lines = [x for x in capfd.readouterr().err.splitlines() if "silent data corruption" in x]
    assert [("step 3" in x, "step 4" in x) for x in lines] == [(True, False), (False, True)]
    assert all("rank 1" in x and "persistent" in x and "embed.weight" in x for x in lines)
    assert out["skipped_steps"] == 2


@pytest.mark.slow
def test_replicas_disagreeing_after_the_reduction_are_named(tmp_path):
    prefix = make_corpus(tmp_path)
    cfg = tiny_config(prefix, tmp_path / "a", *CHECK[1:], "train.steps=3", "train.sdc_policy=stop")
    msgs = run_ranks(_run, 2, args=(cfg, None, 2), timeout=240)
    assert all(isinstance(m, str) for m in msgs), msgs
    assert "at step 2" in msgs[0] and "data-parallel replicas" in msgs[0]
    assert "rank 0" in msgs[0] and "rank 1" in msgs[0] and "saved checkpoint" in msgs[0]


@pytest.mark.slow
def test_stop_exits_1_with_the_intact_checkpoint_before_the_corrupt_step(tmp_path):
    from megatiny.training.manifest import verify

    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    cmd = torchrun_tiny_cmd(prefix, run_dir, "parallel.tp=1", "train.log_interval=1",
                            "train.check_replay_every=1", "train.sdc_policy=stop")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATINY_FAULT": "grad_bitflip:rank=1:step=3"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "rank 1 at step 3" in proc.stderr and "transient" in proc.stderr
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_2"
    assert verify(str(ckpt / "step_2"))[1] is None
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2]  # nothing lost, nothing of 3


def test_zero23_bucket_flip_acts_once_per_pass_where_the_parameter_is():
    """Under ZeRO-2/3 a fault acts on one bucket's local gradient as it is launched: once per
    pass, in the named (default: first) parameter's bucket; a missing one is named after."""
    inj = FaultInjector(parse("grad_bitflip:rank=0:step=2,grad_bitflip:rank=0:step=2:param=c"), 0)
    first, other = [("a", torch.zeros(4)), ("b", torch.zeros(3))], [("c", torch.ones(6))]
    inj.flip_bucket(2, 0, other, first="a")  # the param=c fault
    inj.flip_bucket(2, 0, first, first="a")  # the default one: a, the first parameter
    inj.flip_bucket(2, 0, first, first="a")  # a second micro-batch: nothing more this pass
    inj.flip_bucket(2, 0, other, first="a")
    assert [x.split(":")[1].split("[")[0] for x in inj.flipped] == [" c", " a"]
    assert (first[0][1] != 0).sum() == 1 and (other[0][1] != 1).sum() == 1
    inj.check_flipped(2, 0, ["a", "b", "c"])  # both done
    inj.flip_bucket(2, 0, first, first="a")
    assert len(inj.flipped) == 2
    fresh = FaultInjector(parse("grad_bitflip:rank=0:step=2:param=z"), 0)
    with pytest.raises(FaultSpecError, match="not a parameter of this rank"):
        fresh.check_flipped(2, 0, ["a", "b"])
    fresh = FaultInjector(parse("grad_bitflip:rank=0:step=2"), 0)
    with pytest.raises(FaultSpecError, match="never launched"):
        fresh.check_flipped(2, 0, ["a", "b"])


ZERO = ("train.global_batch_size=8",)  # dp2 x micro 2: 2 micro-batches, 2 reduce-scatters each


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_zero23_bitflip_is_transient_skip_equals_the_clean_run_without_it(tmp_path, capfd, zero):
    prefix = make_corpus(tmp_path)
    fault = {"MEGATINY_FAULT": "grad_bitflip:rank=1:step=3:param=blocks.0.mlp.fc.weight"}

    def run(name, *extra, env=None, skip=None):
        cfg = tiny_config(prefix, tmp_path / name, "train.steps=6", f"parallel.zero={zero}", *ZERO,
                          *extra, dropout=0.1)  # fmt: skip
        return run_ranks(_run, 2, args=(cfg, skip), env=env, timeout=240)[0]

    out = run("a", *CHECK, env=fault)
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if "silent data corruption" in x)
    for said in ("rank 1", "step 3", "blocks.0.mlp.fc.weight", "reduce-scatter 1 of the step",
                 "transient", "skipped"):  # fmt: skip
        assert said in line, line
    assert err.count("silent data corruption") == 1 and out["skipped_steps"] == 1
    assert out["losses"] == run("b", skip=3)["losses"]  # bitwise: the replays leave no trace
    clean = run("c")
    assert out["losses"][:3] == clean["losses"][:3] and out["losses"][3] != clean["losses"][3]
    checked = run("d", *CHECK)  # no fault: no false positive, the same run
    assert checked["losses"] == clean["losses"] and checked["skipped_steps"] == 0
    assert "silent data corruption" not in capfd.readouterr().err


@pytest.mark.parametrize("zero", [2, 3])  # ~1 s: the ZeRO-2/3 path in the default run
def test_zero23_repeated_bitflip_is_persistent(tmp_path, capfd, zero):
    prefix = make_corpus(tmp_path)
    fault = {"MEGATINY_FAULT": "grad_bitflip:rank=1:step=3:repeat=1"}
    cfg = tiny_config(prefix, tmp_path / "a", *CHECK[1:], "train.steps=4", *ZERO,
                      f"parallel.zero={zero}")  # fmt: skip
    out = run_ranks(_run, 2, args=(cfg,), env=fault, timeout=240)[0]
    lines = [x for x in capfd.readouterr().err.splitlines() if "silent data corruption" in x]
    assert [("step 3" in x, "step 4" in x) for x in lines] == [(True, False), (False, True)]
    assert all("rank 1" in x and "persistent" in x and "embed.weight" in x for x in lines)
    assert out["skipped_steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [("parallel.tp=2",), ("parallel.pp=2",), ("parallel.pp=2", "parallel.zero=3", *ZERO),
     ("parallel.ep=2", "model.moe_experts=4", "parallel.zero=2", *ZERO)],
    ids=["tp2xdp2", "pp2xdp2", "pp2xdp2-zero3", "ep2xdp2-moe-zero2"],
)  # fmt: skip
def test_replays_change_nothing_on_4_ranks(tmp_path, capfd, layout):
    prefix = make_corpus(tmp_path)
    runs = [
        run_ranks(
            _run,
            4,
            args=(
                tiny_config(prefix, tmp_path / k, "train.steps=4", *layout, *extra, dropout=0.1),
            ),
            timeout=240,
        )[0]  # fmt: skip
        for k, extra in (("a", ()), ("b", ("train.check_replay_every=1",)))
    ]
    assert runs[0]["losses"] == runs[1]["losses"] and runs[1]["skipped_steps"] == 0
    assert "silent data corruption" not in capfd.readouterr().err
