"""Save on preemption (megatiny/training/preempt.py): SIGTERM / SIGINT, to every rank or to one, in
a step or in an evaluation pass, under dp and pp, stop all ranks at the same step with an intact
checkpoint and every metrics row; `--resume auto` then gives the uninterrupted run's losses. A
second signal exits at once. Through launch/run_local.sh: the launcher relays the signal, and a
config mistake is printed once, last. Before the loop (StartupGuard): a signal in any startup phase
ends the run at once with one line naming the phase and 143 / 130, a held phase (the run-dir claim)
first finishes its writes, ranks still in startup meet the ones at the loop, the lock is released
and `--resume auto` trains on; the same for `megatiny finetune`'s startup and the launcher's config
check."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from megatiny.testing import run_ranks
from megatiny.training.faults import FaultSpecError, startup_sleep_s
from megatiny.training.preempt import (
    HELD,
    REPEAT_S,
    Preemption,
    StartupGuard,
    at_stop,
    startup_phase,
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


# ---- before the loop: StartupGuard ----------------------------------------------------------------


def _guarded(script, out, env):
    """In a forked child: stderr to `out`, `env` set, `script()` under a StartupGuard; exit 0."""
    sys.stderr = open(out, "w")  # noqa: SIM115 - the child ends with os._exit
    os.environ.update(env)
    with StartupGuard("megatiny train"):
        script(out)
    sys.stderr.flush()
    os._exit(0)


def _signal_while_building(out):
    at_stop(lambda: open(out + ".cleaned", "w").close())  # as the run-dir lock is released
    startup_phase("building the model and data")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)


def _signal_while_blocked(out):
    startup_phase("starting the process group")
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    r, _ = os.pipe()
    os.read(r, 1)  # blocks, as a rendezvous or a collective would: the watcher thread ends it


def _signal_while_claiming(out):
    startup_phase("claiming the run directory", hold=HELD)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
    open(out + ".claimed", "w").close()  # the held phase's work finishes
    startup_phase("building the model and data")  # ends here
    time.sleep(10)


def _signal_after_the_loop(out):
    with Preemption(ONE_RANK):
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # the run ends as it would
    time.sleep(0.3)


def _in_child(script, tmp_path, env=None):
    out = str(tmp_path / "stderr")
    proc = multiprocessing.get_context("fork").Process(
        target=_guarded, args=(script, out, env or {})
    )
    t0 = time.time()
    proc.start()
    proc.join(20)
    return proc.exitcode, time.time() - t0, out


@pytest.mark.parametrize("torchrun", [False, True], ids=["alone", "under-torchrun"])
def test_a_signal_during_startup_ends_the_rank_with_one_line(tmp_path, torchrun):
    env = {"TORCHELASTIC_RUN_ID": "t"} if torchrun else {}
    code, seconds, out = _in_child(_signal_while_building, tmp_path, env)
    assert code == (0 if torchrun else 128 + signal.SIGTERM) and seconds < 8  # torchrun: 0, its
    lines = open(out).read().splitlines()  # launcher exits 143 (a failed rank would restart)
    assert lines == [
        "megatiny train: stopped by SIGTERM during startup (building the model and data): nothing "
        "was trained or saved since the last checkpoint; continue with --resume auto"
    ]
    assert os.path.exists(out + ".cleaned")


def test_a_rank_blocked_outside_python_ends_at_once(tmp_path):
    code, seconds, out = _in_child(_signal_while_blocked, tmp_path)
    assert code == 128 + signal.SIGTERM and seconds < 8
    assert "(starting the process group)" in open(out).read()


def test_a_held_phase_finishes_its_writes_first(tmp_path):
    code, _, out = _in_child(_signal_while_claiming, tmp_path)
    assert code == 128 + signal.SIGINT and os.path.exists(out + ".claimed")
    assert "stopped by SIGINT during startup (claiming the run directory)" in open(out).read()


def test_after_the_loop_the_run_ends_as_it_would(tmp_path):
    code, _, out = _in_child(_signal_after_the_loop, tmp_path)
    assert code == 0 and open(out).read() == ""


def test_the_guard_restores_the_handlers():
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    with StartupGuard("megatiny train"):
        assert signal.getsignal(signal.SIGINT) is not before[1]
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before
    assert signal.set_wakeup_fd(-1) == -1


def test_startup_sleep_fault():
    env = {"MEGATINY_FAULT": "slow:rank=0:ms=5,startup_sleep:phase=load:ms=1500:rank=1"}
    assert startup_sleep_s("loading checkpoint x", 1, env) == 1.5
    assert startup_sleep_s("loading checkpoint x", 0, env) == 0
    assert startup_sleep_s("building the model and data", 1, env) == 0
    with pytest.raises(FaultSpecError, match="startup_sleep:phase=P:ms=M"):
        startup_sleep_s("x", 0, {"MEGATINY_FAULT": "startup_sleep:ms=1"})


# ---- before the loop: whole runs -------------------------------------------------------------------


def _cli_args(corpus, run_dir, steps):
    return [
        "--config", "launch/configs/tiny-cpu.yaml", f"data.path={corpus}", "data.seq_length=16",
        "data.split=90,10,0", f"train.run_dir={run_dir}", f"train.steps={steps}",
        "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0",
        "train.eval_iters=2", "train.progress_bar=false", "train.tensorboard=false",
        "parallel.tp=1", "model.vocab_size=96", "model.max_seq_len=32", "model.d_model=32",
        "model.n_layers=2", "model.n_heads=4", "data.tokenizer=null",
    ]  # fmt: skip


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("TORCHELASTIC")}  # fmt: skip
    return {**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def _signal_at_fault(cmd, env, sig, log, faults=1, ready=None):
    """Run `cmd`; once `faults` ranks print their startup_sleep line (and path `ready` exists), send
    `sig`. Returns the exit code, the output, and the seconds from the signal to the exit."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and open(log).read().count("fault: rank") < faults:
        assert proc.poll() is None, open(log).read()
        time.sleep(0.1)
    while ready is not None and time.time() < deadline and not os.path.exists(ready):
        time.sleep(0.1)
    proc.send_signal(sig)
    t0 = time.time()
    proc.wait(timeout=60)
    return proc.returncode, open(log).read(), time.time() - t0


def _launcher(args):
    return ["bash", "launch/run_local.sh", *args]


def _alone(args):
    return [sys.executable, "-m", "megatiny", "train", *args]


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault,faults,phase",
    [
        ("startup_sleep:phase=building:ms=60000", 2, "building the model and data"),
        # rank 1 still verifying while rank 0 waits at the loop: they meet there, no step begins
        ("startup_sleep:phase=verifying:ms=60000:rank=1", 1, "waiting for the other ranks"),
    ],
    ids=["both-building", "one-at-the-loop"],
)
def test_sigterm_to_the_launcher_during_startup_exits_143_and_resume_trains(
    corpus, tmp_path, fault, faults, phase
):
    run_dir = tmp_path / "run"
    args = _cli_args(corpus, run_dir, 3)
    env = _env(NPROC="2", MEGATINY_FAULT=fault)
    # one-at-the-loop: rank 0 wrote config.yaml ("preparing the run", held: it goes on to the loop)
    ready = run_dir / "config.yaml" if faults == 1 else None
    code, out, seconds = _signal_at_fault(
        _launcher(args), env, signal.SIGTERM, tmp_path / "log", faults, ready
    )
    assert code == 128 + signal.SIGTERM and seconds < 30, out
    assert "Traceback" not in out and "FAILED" not in out, out
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert len(stopped) == 1 and f"stopped by SIGTERM during startup ({phase}" in stopped[0], out
    assert not (run_dir / ".lock").exists() and not (run_dir / "checkpoints").exists()

    proc = subprocess.run(_launcher([*args, "--resume", "auto"]), cwd=REPO, env=_env(NPROC="2"),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "took over the stale lock" not in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_3"


def test_sigint_while_loading_the_checkpoint_exits_130_and_keeps_it(corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run(_alone(_cli_args(corpus, run_dir, 2)), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    args = [*_cli_args(corpus, run_dir, 3), "--resume", "auto"]
    env = _env(MEGATINY_FAULT="startup_sleep:phase=loading:ms=60000")
    code, out, _ = _signal_at_fault(_alone(args), env, signal.SIGINT, tmp_path / "log")
    assert code == 128 + signal.SIGINT, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    step_2 = run_dir / "checkpoints" / "step_2"
    assert f"stopped by SIGINT during startup (loading checkpoint {step_2})" in out, out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert not (run_dir / ".lock").exists()


def test_sigterm_during_the_launchers_check_exits_143_before_torchrun(corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = _env(NPROC="2", MEGATINY_FAULT="startup_sleep:phase=checking:ms=60000")
    code, out, seconds = _signal_at_fault(
        _launcher(_cli_args(corpus, run_dir, 2)), env, signal.SIGTERM, tmp_path / "log"
    )
    assert code == 128 + signal.SIGTERM and seconds < 20, out
    assert "Traceback" not in out and "torch.distributed" not in out, out
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert stopped == [
        "megatiny train: stopped by SIGTERM during startup (checking the config): nothing was "
        "trained or saved since the last checkpoint; continue with --resume auto"
    ], out
    assert not run_dir.exists()  # torchrun never started


def test_sigterm_during_finetune_startup_exits_143_with_one_line(tmp_path):
    # the signal comes while the pretrained model would load (nothing is read before it)
    out_dir = tmp_path / "ft"
    cmd = [sys.executable, "-m", "megatiny", "finetune", "--task", "classification",
           "--checkpoint", str(tmp_path / "base"), "--tokenizer", str(tmp_path / "tok"),
           "--train", str(tmp_path / "train.jsonl"), "--output", str(out_dir),
           "--no-progress-bar"]  # fmt: skip
    env = _env(MEGATINY_FAULT="startup_sleep:phase=loading:ms=60000")
    code, out, seconds = _signal_at_fault(cmd, env, signal.SIGTERM, tmp_path / "log")
    assert code == 128 + signal.SIGTERM and seconds < 20, out
    assert "Traceback" not in out, out
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert stopped == [
        "megatiny finetune: stopped by SIGTERM during startup (loading the pretrained model, "
        "tokenizer and data): nothing was trained or saved since the last checkpoint; continue "
        "with --resume auto"
    ], out
    assert not out_dir.exists()


def test_sigterm_while_claiming_the_run_dir_lets_the_claim_finish(corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = _env(MEGATINY_FAULT="startup_sleep:phase=claiming:ms=1500")
    code, out, seconds = _signal_at_fault(
        _alone(_cli_args(corpus, run_dir, 2)), env, signal.SIGTERM, tmp_path / "log"
    )
    assert code == 128 + signal.SIGTERM and 0.8 < seconds < 20, out  # after the claim's sleep
    assert "stopped by SIGTERM during startup (claiming the run directory)" in out, out
    assert not (run_dir / ".lock").exists()
