"""Save on preemption (megatiny/training/preempt.py): SIGTERM / SIGINT, to every rank or to one, in
a step or in an evaluation pass, under dp and pp, stop all ranks at the same step with an intact
checkpoint and every metrics row; `--resume auto` then gives the uninterrupted run's losses. A
second signal exits at once. Through launch/run_local.sh: the launcher relays the signal, and a
config mistake is printed once, last. Before the loop: tests/test_preempt_startup.py."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from megatiny.testing import run_ranks
from megatiny.training.preempt import (
    REPEAT_S,
    Preemption,
)
from tests.test_train import REPO, make_corpus, tiny_config

ONE_RANK = SimpleNamespace(rank=0, world_size=1, device="cpu")


def test_a_signal_sets_the_flag_and_a_relayed_copy_is_one_signal():
    before = signal.getsignal(signal.SIGINT)
    with Preemption(ONE_RANK) as stop:
        assert not stop.agreed(1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_S: the same preemption, no exit
        assert stop.agreed(2) and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_exit_duration_stops_at_the_deadline():
    now = [0.0]
    stop = Preemption(ONE_RANK, exit_duration_mins=1.0, clock=lambda: now[0])
    now[0] = 59.0
    assert not stop.agreed(1)
    now[0] = 60.0
    assert stop.agreed(2) and stop.reason == "train.exit_duration_mins"


def _second_signal():
    with Preemption(ONE_RANK):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(REPEAT_S + 0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    os._exit(0)  # not reached: the second signal exits


def test_a_second_signal_exits_at_once():
    proc = multiprocessing.get_context("fork").Process(target=_second_signal)
    t0 = time.time()
    proc.start()
    proc.join(20)
    assert proc.exitcode == 128 + signal.SIGINT and time.time() - t0 < REPEAT_S + 4


# ---- multi-rank: stop, save, resume -------------------------------------------------------------


def _run(cfg, signal_at=None):
    """Train on this rank; `signal_at` = (rank, step, signal, where): that rank sends itself the
    signal after the step's train_step ('step') or inside that step's evaluation ('eval')."""
    from megatiny.parallel import ParallelContext
    from megatiny.training.loop import train
    from megatiny.training.step import build_trainer

    p = cfg.parallel
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, cp=p.cp)
    try:
        trainer = build_trainer(cfg, ctx)
        if signal_at is not None and signal_at[0] == ctx.rank:
            _, at, sig, where = signal_at
            name = "train_step" if where == "step" else "evaluate"
            inner = getattr(trainer, name)

            def wrapped(*a, **k):
                out = inner(*a, **k)
                if trainer.step == at:
                    os.kill(os.getpid(), sig)
                return out

            setattr(trainer, name, wrapped)
        out = train(cfg, ctx, trainer)
        return {"losses": out["losses"], "stopped_by": out["stopped_by"], "step": out["step"]}
    finally:
        ctx.destroy()


def _metrics_steps(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["step"] for r in rows if "split" not in r], rows


STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted runs' losses, per layout."""
    out = {}
    for layout in ("parallel.tp=1", "parallel.pp=2"):
        run_dir = tmp_path_factory.mktemp("ref")
        cfg = tiny_config(corpus, run_dir, f"train.steps={STEPS}", "train.eval_interval=2", layout)
        out[layout] = run_ranks(_run, 2, args=(cfg,), timeout=240)[0]["losses"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,signal_at",
    [
        ("parallel.tp=1", (0, 3, signal.SIGTERM, "step")),  # dp2, SIGTERM
        ("parallel.tp=1", (1, 3, signal.SIGINT, "step")),  # one rank only, SIGINT
        ("parallel.tp=1", (0, 4, signal.SIGTERM, "eval")),  # during an evaluation pass
        ("parallel.pp=2", (1, 3, signal.SIGTERM, "step")),  # pipeline: the last stage signalled
    ],
    ids=["sigterm", "sigint-one-rank", "during-eval", "pp2"],
)
def test_signal_saves_the_step_and_resume_gives_the_same_losses(
    corpus, reference, tmp_path, layout, signal_at
):
    run_dir = tmp_path / "run"
    cfg = tiny_config(corpus, run_dir, f"train.steps={STEPS}", "train.eval_interval=2", layout)
    first = run_ranks(_run, 2, args=(cfg, signal_at), timeout=240)
    stop_step = signal_at[1]
    sig = signal.Signals(signal_at[2]).name
    assert [r["stopped_by"] for r in first] == [sig, sig]
    assert [r["step"] for r in first] == [stop_step, stop_step]  # every rank stops at one step
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stop_step}"
    assert _metrics_steps(run_dir)[0] == list(range(1, stop_step + 1))  # every row kept

    cfg.train.resume = "auto"
    second = run_ranks(_run, 2, args=(cfg,), timeout=240)
    assert second[0]["stopped_by"] is None and second[0]["step"] == STEPS
    losses = first[0]["losses"] + second[0]["losses"]
    assert losses == pytest.approx(reference[layout], rel=1e-6, abs=0)
    steps, rows = _metrics_steps(run_dir)
    assert steps == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows if "split" not in r] == pytest.approx(losses, rel=1e-6)


# ---- through the launcher ------------------------------------------------------------------------


def _launch(args, nproc, **kw):
    env = {**os.environ, "NPROC": str(nproc), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", "launch/run_local.sh", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


@pytest.mark.slow
def test_a_mistyped_key_is_printed_once_and_last_even_without_a_tokenizer(tmp_path):
    proc = _launch(["--config", "launch/configs/tiny-cpu.yaml", "train.step=10",
                    "data.tokenizer=/nonexistent", f"train.run_dir={tmp_path}/run"], 4)  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    last = out.strip().splitlines()[-12:]
    assert proc.returncode != 0
    assert any("did you mean 'train.steps'" in line for line in last), out
    assert out.count("did you mean") == 1, out


@pytest.mark.slow
def test_torchrun_root_cause_carries_megatinys_message(tmp_path):
    # past the launcher's pre-check (torchrun directly): rank 0 reports, torchrun's summary shows it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "megatiny", "train", "--config", "launch/configs/tiny-cpu.yaml", "train.step=10"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    tail = out.strip().splitlines()[-4:]
    assert any("did you mean 'train.steps'" in line for line in tail), out
    assert out.count("megatiny train: config error") == 2, out  # printed once + the summary


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_resume_continues(corpus, tmp_path):
    run_dir = tmp_path / "run"
    steps = 30
    args = [f"data.path={corpus}", "data.seq_length=16", "data.split=90,10,0",
            f"train.run_dir={run_dir}", f"train.steps={steps}", "train.micro_batch_size=2",
            "train.lr=1e-2", "train.warmup_steps=2", "train.log_interval=1",
            "train.eval_interval=0", "train.eval_iters=2", "train.progress_bar=false",
            "train.tensorboard=false", "parallel.tp=1", "model.vocab_size=96",
            "model.max_seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "data.tokenizer=null"]  # fmt: skip
    proc = _launch(["--config", "launch/configs/tiny-cpu.yaml", *args], 2)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 60 and proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stop_step = int(latest.split("_")[1])
    assert 3 <= stop_step < steps, out
    assert _metrics_steps(run_dir)[0] == list(range(1, stop_step + 1))
    assert f"stopped by SIGTERM after step {stop_step}" in out

    proc = _launch(["--config", "launch/configs/tiny-cpu.yaml", *args, "--resume", "auto"], 2)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    _, rows = _metrics_steps(run_dir)
    losses = [r["loss"] for r in rows if "split" not in r]
    assert len(losses) == steps
    from megatiny.config import Config

    cfg = Config.from_yaml(os.path.join(REPO, "launch/configs/tiny-cpu.yaml"),
                           [*args[:3], f"train.run_dir={tmp_path / 'ref'}", *args[4:]])  # fmt: skip
    (ref,) = run_ranks(_run, 2, args=(cfg,), timeout=240)[:1]
    assert losses == pytest.approx(ref["losses"], rel=1e-6, abs=0)
