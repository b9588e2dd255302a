"""Preemption before the loop (megatiny/training/preempt.py, StartupGuard): a signal in any
startup phase ends the run at once with one line naming the phase and 143 / 130 (0 under
torchrun), a held phase (the run-dir claim) first finishes its writes, ranks still in startup
meet the ones at the loop, the lock is released and `--resume auto` trains on; the same for
`megatiny finetune`'s startup and the launcher's config check. The loop's own handling:
tests/test_preempt.py."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from megatiny.training.faults import FaultSpecError, startup_sleep_s
from megatiny.training.preempt import (
    HELD,
    Preemption,
    StartupGuard,
    at_stop,
    startup_phase,
)
from tests.test_preempt import ONE_RANK
from tests.test_train import REPO, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


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
    with Preemption(ONE_RANK) as stop:  # the loop ran to its end, unsignalled
        assert stop.signal is None
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
