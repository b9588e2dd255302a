"""Fault injection under torchrun (issue 16): ranks SIGKILLed at seeded random points of a job
with elastic restarts on (`--max-restarts`, `--resume auto`), a second run on a busy run_dir, and
a rank that stalls inside a step under a short `train.timeout_s`.

The faults are injected by a small wrapper script (written per test) that torchrun runs instead
of `python -m megatiny`: it arms a kill on one rank of one attempt, at its N-th collective /
p2p op (`collectives.add_start_observer`) or its N-th atomic file write of a checkpoint save,
then calls `megatiny.cli.main`. At the start of every attempt rank 0 records whether the
checkpoint `latest` names verifies against its manifest.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from megatiny.config import Config
from megatiny.testing import run_ranks
from tests.test_train import REPO, VOCAB, make_corpus

WRAPPER = r"""
import json, os, signal, sys
plan = json.loads(os.environ["FAULT_PLAN"])
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
rank = int(os.environ["RANK"])
run_dir = plan["run_dir"]

if rank == 0:  # does `latest` name a complete, intact checkpoint right now?
    from megatiny.training.manifest import latest_name, verify
    ckpt = os.path.join(run_dir, "checkpoints")
    name = latest_name(ckpt)
    problem = verify(os.path.join(ckpt, name))[1] if name else None
    with open(plan["log"], "a") as f:
        f.write(json.dumps({"attempt": attempt, "latest": name, "problem": problem}) + "\n")

kill = plan["kills"].get(str(attempt))
if kill and kill[0] == rank:
    _, kind, n = kill
    count = [0]
    def tick(*_):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    if kind == "op":
        from megatiny.parallel import collectives
        collectives.add_start_observer(tick)
    else:  # the n-th atomic write of a checkpoint save (manifest part, meta, manifest, latest)
        import megatiny.fsutil as fsutil
        import megatiny.training.checkpoint as checkpoint
        real = fsutil.atomic_write_text
        def write(path, text):
            if "checkpoints" in path:
                tick()
            return real(path, text)
        fsutil.atomic_write_text = checkpoint.atomic_write_text = write
    if kind == "sleep":
        import time
        import megatiny.training.step as step
        real_step = step.Trainer.train_step
        def slow_step(self):
            if self.step + 1 == n:
                time.sleep(60)
            return real_step(self)
        step.Trainer.train_step = slow_step

from megatiny.cli import main
sys.exit(main(sys.argv[1:]))
"""

CONFIG = os.path.join(REPO, "launch/configs/tiny-cpu.yaml")
MODEL = (f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2",
         "model.max_seq_len=32", "model.dropout=0.1")  # fmt: skip


def _overrides(prefix, run_dir, *extra):
    return [*MODEL, f"data.path={prefix}", "data.tokenizer=null", "data.seq_length=16",
            "data.split=90,10,0", f"train.run_dir={run_dir}", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.lr=1e-2", "train.warmup_steps=2",
            "train.log_interval=1", "train.eval_interval=0", "train.eval_iters=2",
            "train.progress_bar=false", "train.tensorboard=false", *extra]  # fmt: skip


def _torchrun(tmp_path, run_dir, plan, args, restarts=0, nproc=2, timeout=240):
    script = tmp_path / "fault_wrapper.py"
    script.write_text(WRAPPER)
    log = tmp_path / f"attempts-{os.path.basename(run_dir)}.jsonl"
    plan = {"run_dir": str(run_dir), "log": str(log), **plan}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", "--monitor-interval=0.2",
           str(script), "train", "--config", CONFIG,
           *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_PLAN": json.dumps(plan),
           "PYTHONPATH": REPO}  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    attempts = [json.loads(line) for line in open(log)] if log.exists() else []
    return proc, attempts


def _train_losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "split" not in r]


def _one_thread_training(cfg):
    """The uninterrupted reference, with one intra-op thread like the torchrun ranks."""
    import torch

    from tests.test_train import _train_on_ranks

    torch.set_num_threads(1)
    return _train_on_ranks(cfg)["losses"]


def _kill_plan(seed, ops):
    """Attempt -> [rank, kind, n]: SIGKILL that rank at its n-th collective ("op", n <= ops) or
    its n-th checkpoint file write ("write": rank 0 writes a manifest part, meta.json,
    manifest.json and `latest` per save, rank 1 its part). One kill per kind, one more op."""
    rng = random.Random(seed)
    plan = {}
    for attempt, kind in enumerate(rng.sample(["op", "write", "op"], 3)):
        rank = rng.randrange(2)
        n = rng.randint(1, ops) if kind == "op" else rng.randint(1, 4 if rank == 0 else 2)
        plan[str(attempt)] = [rank, kind, n]
    return plan


@pytest.mark.slow
@pytest.mark.parametrize("seed, layout", [(0, "parallel.tp=2"), (1, "parallel.tp=1")])
def test_killed_ranks_restart_to_the_uninterrupted_losses(tmp_path, seed, layout):
    """3 SIGKILLs at seeded random points (collectives, checkpoint writes) of one torchrun job
    with --max-restarts 3: the job finishes, every step is logged once with the uninterrupted
    run's loss (bitwise), and at every restart `latest` named an intact checkpoint."""
    prefix = make_corpus(tmp_path)
    steps = ("train.steps=8", "train.save_interval=2", "train.keep_checkpoints=2", layout)
    run_dir = tmp_path / "killed"
    args = [*_overrides(prefix, run_dir, *steps), "--resume", "auto"]
    ref_args = _overrides(prefix, tmp_path / "ref", *steps)
    ref = run_ranks(_one_thread_training, 2, args=(Config.from_yaml(CONFIG, ref_args),))[0]
    # About 25 collectives a step at tp=2, 6 at dp=2: an op kill falls within 3 steps.
    plan = {"kills": _kill_plan(seed, ops=75 if layout.endswith("2") else 18)}
    # Two restarts more than kills: a loaded CI machine may fail a rendezvous on its own.
    proc, attempts = _torchrun(tmp_path, run_dir, plan, args, restarts=5)
    out = proc.stdout + proc.stderr
    (tmp_path / "torchrun.log").write_text(out)
    assert proc.returncode == 0, f"plan {plan}, attempts {attempts}\n{out[-3000:]}"
    assert [s for s, _ in _train_losses(run_dir)] == list(range(1, 9)), out[-3000:]
    assert [loss for _, loss in _train_losses(run_dir)] == ref, plan  # bitwise
    assert len(attempts) == 4, f"not every kill fired: {plan}, {attempts}"
    assert all(a["problem"] is None for a in attempts), attempts
    assert "is not intact" not in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_8\n"
    assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_dir_is_refused(tmp_path):
    """Finding 2: a concurrent run used to delete the first one's .tmp_step_N and rewrite its
    config.yaml. Now it stops at the lock, naming the first run's pid; after the first run is
    killed, --resume auto takes over its stale lock and continues."""
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "megatiny", "train", "--config",
            os.path.join(REPO, "launch/configs/tiny-cpu.yaml"), "parallel.tp=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    first = subprocess.Popen(
        base + _overrides(prefix, run_dir, "train.steps=100000", "train.save_interval=5",
                          "train.log_interval=50"),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        config_before = (run_dir / "config.yaml").read_text()
        for extra in ([], ["--resume", "auto"]):
            second = subprocess.run(base + _overrides(prefix, run_dir, "train.steps=3") + extra,
                                    cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
            assert second.returncode == 1, second.stdout + second.stderr
            assert f"is in use by another run: pid {first.pid} on" in second.stderr
        assert (run_dir / "config.yaml").read_text() == config_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / ".lock").exists()  # killed: the lock stays, stale
    # The killed run's lock is stale: the next run takes it over (and finds step_N intact).
    resumed = subprocess.run(base + _overrides(prefix, run_dir, "train.steps=1") + ["--resume", "auto"],
                             cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "took over the stale lock" in resumed.stderr and "nothing to train" in resumed.stdout
    assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_stalled_rank_under_timeout_is_diagnosed(tmp_path):
    """A rank that sleeps inside step 2 under train.timeout_s=6: the job fails after the
    timeout instead of hanging, every rank left a flight-recorder dump, and `megatiny debug
    hang` names the sleeper and who waits for it."""
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    args = _overrides(prefix, run_dir, "train.steps=4", "train.timeout_s=6", "parallel.tp=2")
    start = time.monotonic()
    proc, _ = _torchrun(tmp_path, run_dir, {"kills": {"0": [1, "sleep", 2]}}, args)
    assert proc.returncode != 0 and time.monotonic() - start < 55, proc.stderr[-3000:]
    assert "flight recorder dumped" in proc.stderr
    assert sorted(os.listdir(run_dir / "debug")) == ["rank0.json", "rank1.json"]
    hang = subprocess.run([sys.executable, "-m", "megatiny", "debug", "hang", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert hang.returncode == 0, hang.stderr
    assert "rank 1 holds the job up: it is in no communication op, at slow_step" in hang.stdout
    assert "rank 0 waits in the tp all_reduce of step 2" in hang.stdout
    assert "for rank 1" in hang.stdout
