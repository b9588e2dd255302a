"""Run directory ownership (issue 16): a fresh run refuses another run's directory, --overwrite
moves it aside, a lock stops a second run, config.yaml is written only after every check,
retention prunes only this run's checkpoints, a resumed run logs each step once; the spike
detector; the flight recorder and `megatiny debug hang`."""

import json
import os
import signal
import time

import numpy as np
import pytest

from megatiny.testing import run_ranks
from megatiny.training.rundir import RunDirError, RunLock, drop_rows_after, prune
from tests.test_train import make_corpus, run_training, tiny_config


def _train_rows(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in rows if "split" not in r]


def test_fresh_run_refuses_a_run_dir_holding_another_run(tmp_path):
    """Finding 1: a shorter fresh run in a longer run's directory used to have its checkpoints
    pruned right after `latest` named them, and mixed its metrics into the old file."""
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    long = ("train.save_interval=2", "train.keep_checkpoints=2")
    run_training(tiny_config(prefix, run_dir, "train.steps=6", *long))
    with pytest.raises(Exception, match=r"already holds a run \(checkpoints step_4\.\.step_6") as e:
        run_training(tiny_config(prefix, run_dir, "train.steps=2", *long))
    assert "--resume auto" in str(e.value) and "--overwrite" in str(e.value)
    assert "train.steps=2" in str(e.value)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_4", "step_6"]
    out = run_training(tiny_config(prefix, run_dir, "train.steps=2", "train.overwrite=true", *long))
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_2"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2\n"
    assert [r["step"] for r in _train_rows(run_dir)] == [1, 2]
    (aside,) = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert sorted(os.listdir(tmp_path / aside / "checkpoints")) == ["latest", "step_4", "step_6"]
    assert [r["step"] for r in _train_rows(tmp_path / aside)] == list(range(1, 7))
    assert out[0]["checkpoint"].endswith("step_2") and not os.path.exists(run_dir / ".lock")


def test_retention_prunes_only_this_runs_checkpoints_and_never_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step, run in [(10, "old"), (20, "old"), (1, "me"), (2, "me"), (3, "me"), (4, None)]:
        d = ckpt / f"step_{step}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step, "run_id": run}))
    (ckpt / "latest").write_text("step_1\n")
    prune(str(ckpt), 1, "me")
    assert sorted(os.listdir(ckpt)) == [
        "latest",
        "step_1",
        "step_10",
        "step_20",
        "step_3",
        "step_4",
    ]


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(str(tmp_path))
    assert lock.acquire() is None
    other = RunLock(str(tmp_path))
    with pytest.raises(RunDirError, match=rf"in use by another run: pid {os.getpid()} on "):
        other.acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    # A lock whose process is gone (a killed run) is stale.
    info = json.loads(json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename, "job": None}))
    (tmp_path / ".lock").write_text(json.dumps(info))
    assert "stale lock" in other.acquire()
    other.release()
    # An earlier attempt of the same torchrun job (elastic restart) left it: taken over.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": 1, "host": "node-b", "job": "TORCHELASTIC_RUN_ID=job-1"})
    )
    assert "earlier attempt of this job" in RunLock(str(tmp_path)).acquire()


def test_training_stops_at_the_lock_of_a_live_run(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                               "started": "now", "job": None}))  # fmt: skip
    with pytest.raises(Exception, match="in use by another run"):
        run_training(tiny_config(prefix, run_dir, "train.steps=1"))
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_rejected_resume_leaves_config_yaml_alone(tmp_path):
    """Finding 4: a resume refused for another model shape had overwritten config.yaml."""
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    run_training(tiny_config(prefix, run_dir, "train.steps=1"))
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(Exception, match="different model shape"):
        run_training(tiny_config(prefix, run_dir, "train.steps=2", "train.resume=auto", d_model=64))
    assert (run_dir / "config.yaml").read_text() == before


def test_resumed_run_logs_each_step_once(tmp_path, capfd):
    """Finding 5: after a crash between logging and saving, the resumed run replays steps 3-4;
    metrics.jsonl and TensorBoard keep each step once (the crashed rows go to .replaced)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    opts = ("train.steps=4", "train.save_interval=2", "train.tensorboard=true")
    full = run_training(tiny_config(prefix, run_dir, *opts))[0]["losses"]
    # The crash: step 4 was logged, its checkpoint never completed.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    (run_dir / "checkpoints" / "latest").write_text("step_2\n")
    capfd.readouterr()
    again = run_training(tiny_config(prefix, run_dir, *opts, "train.resume=auto"))[0]["losses"]
    assert again == full[2:]
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx(full)
    replaced = [json.loads(line) for line in open(run_dir / "metrics.jsonl.replaced")]
    assert [r["step"] for r in replaced if "split" not in r] == [3, 4]
    assert "moved to metrics.jsonl.replaced" in capfd.readouterr().out
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_drop_rows_after_keeps_torn_lines_aside(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert drop_rows_after(str(path), 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / "m.jsonl.replaced").read_text() == '{"step": 3}\n{"ste\n'


def test_resume_with_other_steps_warns(tmp_path, capfd):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    run_training(tiny_config(prefix, run_dir, "train.steps=2"))
    capfd.readouterr()
    run_training(tiny_config(prefix, run_dir, "train.steps=3", "train.resume=auto"))
    err = capfd.readouterr().err
    assert "train.steps=3 but the checkpoint's run was set up for 2" in err
    assert "train.lr_decay_steps=2 to keep the schedule" in err


# ---- loss spikes ------------------------------------------------------------------------------


def test_spike_detector_median_rule():
    from megatiny.training.spike import SpikeDetector

    d = SpikeDetector(factor=3.0, window=20)
    for loss in [2.0, 2.1, 1.9] * 3:
        assert not d.is_spike(loss)
        d.observe(loss, False)
    assert not d.is_spike(100.0)  # fewer than 10 losses: no verdict yet
    d.observe(2.0, False)
    assert d.is_spike(6.1) and not d.is_spike(5.9) and not d.is_spike(float("nan"))


def _spiky_run(cfg, at_step):
    from megatiny.parallel import ParallelContext
    from megatiny.training.loop import train
    from megatiny.training.step import build_trainer

    ctx = ParallelContext.initialize()
    try:
        trainer = build_trainer(cfg, ctx)
        loss_fn = trainer.loss_fn

        def poisoned(model, batch):
            loss = loss_fn(model, batch)
            return loss * 50 if trainer.step + 1 == at_step else loss

        trainer.loss_fn = poisoned
        out = train(cfg, ctx, trainer)
        return out["skipped_steps"], out["losses"]
    finally:
        ctx.destroy()


def test_spike_is_logged_and_skipped(tmp_path, capfd):
    prefix = make_corpus(tmp_path)
    opts = (
        "train.steps=13",
        "train.spike_factor=3",
        "train.spike_window=20",
        "train.log_interval=20",
    )
    skipped, losses = run_ranks(
        _spiky_run,
        1,
        args=(tiny_config(prefix, tmp_path / "a", *opts, "train.spike_policy=skip"), 12),
    )[0]
    out = capfd.readouterr().out
    assert skipped == 1 and "loss spike at step 12" in out and "update skipped" in out
    kept, losses_kept = run_ranks(
        _spiky_run, 1, args=(tiny_config(prefix, tmp_path / "b", *opts), 12)
    )[0]
    assert kept == 0 and "update kept" in capfd.readouterr().out
    assert losses[:12] == losses_kept[:12] and losses[12] != losses_kept[12]


# ---- flight recorder and `megatiny debug hang` ------------------------------------------------


def _sleepy_run(cfg, sleeper, at_step, seconds):
    import megatiny.training.step as step_module
    from megatiny.parallel import ParallelContext
    from megatiny.training.loop import train

    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    real = step_module.Trainer.train_step

    def slow_step(self):
        if ctx.rank == sleeper and self.step + 1 == at_step:
            time.sleep(seconds)
        return real(self)

    step_module.Trainer.train_step = slow_step
    try:
        return train(cfg, ctx)["step"]
    finally:
        ctx.destroy()


@pytest.mark.parametrize("layout", ["parallel.tp=1", "parallel.tp=2", "parallel.pp=2"])
def test_stalled_rank_is_named_by_debug_hang(tmp_path, layout, capsys):
    """A rank that sleeps inside step 3: after timeout_s / 2 without progress every rank dumps
    its flight recorder; `megatiny debug hang` names the sleeper and who waits for it."""
    from megatiny.cli import main

    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    cfg = tiny_config(prefix, run_dir, "train.steps=3", "train.timeout_s=2", layout)
    assert run_ranks(_sleepy_run, 2, args=(cfg, 1, 3, 4.0)) == [3, 3]
    assert sorted(os.listdir(run_dir / "debug")) == ["rank0.json", "rank1.json"]
    assert main(["debug", "hang", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "rank 1 holds the job up: it is in no communication op, at slow_step" in out
    if layout == "parallel.pp=2":  # its send posted (not waited for), rank 0 waits to receive
        assert "rank 0 waits in recv_backward(mb 0) from rank 1 of step 3 for rank 1" in out
        return
    group = "tp" if layout.endswith("2") else "dp"
    assert f"rank 0 waits in the {group}" in out and "of step 3" in out and "for rank 1" in out


def test_flight_recorder_dumps_on_sigusr1(tmp_path):
    from types import SimpleNamespace

    from megatiny.training.flight import FlightRecorder

    ctx = SimpleNamespace(rank=0, world_size=1, dp_ranks=[0])
    rec = FlightRecorder(ctx, str(tmp_path), size=4).start()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if (tmp_path / "debug" / "rank0.json").exists():
                break
            time.sleep(0.05)
        dump = json.loads((tmp_path / "debug" / "rank0.json").read_text())
        assert dump["reason"] == "SIGUSR1" and "main" in dump["stacks"]
    finally:
        rec.stop()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_debug_hang_without_dumps_says_how_to_get_them(tmp_path, capsys):
    from megatiny.cli import main

    assert main(["debug", "hang", str(tmp_path)]) == 1
    assert "kill -USR1" in capsys.readouterr().err


def test_eval_samples_do_not_depend_on_accumulation(tmp_path):
    """Same global batch, micro 2 x accumulation 2 vs micro 4: the same validation samples."""
    prefix = make_corpus(tmp_path)
    base = ("train.steps=1", "train.global_batch_size=4", "train.lr=1e-9", "train.min_lr=0")
    a = run_training(tiny_config(prefix, tmp_path / "a", *base))[0]["eval"]["loss"]
    b = run_training(tiny_config(prefix, tmp_path / "b", *base, "train.micro_batch_size=4"))[0]
    np.testing.assert_allclose(b["eval"]["loss"], a, rtol=1e-5)
