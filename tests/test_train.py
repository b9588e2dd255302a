"""The training loop: layouts give the same losses, accumulation, clipping, recompute, NaN
handling, bad input, metrics files, and one end-to-end torchrun run of `megatiny train`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatiny.config import Config, ModelConfig
from megatiny.data.indexed import IndexedDatasetWriter
from megatiny.testing import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96


def make_corpus(directory, num_docs=120, seed=0) -> str:
    """A learnable corpus: documents from a sparse random Markov chain over VOCAB tokens."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, VOCAB, size=(VOCAB, 3))
    prefix = os.path.join(str(directory), "corpus")
    with IndexedDatasetWriter(prefix, dtype=np.uint16, vocab_size=VOCAB) as w:
        for _ in range(num_docs):
            tok = [int(rng.integers(VOCAB))]
            for _ in range(int(rng.integers(20, 90))):
                tok.append(int(nxt[tok[-1], rng.integers(3)]))
            w.add_document(np.array(tok, dtype=np.uint16))
    return prefix


def tiny_config(prefix, run_dir, *overrides, **model) -> Config:
    model_cfg = dict(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)
    model_cfg.update(model)
    return Config.from_dict(
        {"model": model_cfg},
        [
            f"data.path={prefix}",
            "data.seq_length=16",
            "data.split=90,10,0",
            f"train.run_dir={run_dir}",
            "train.steps=5",
            "train.micro_batch_size=2",
            "train.lr=1e-2",
            "train.warmup_steps=2",
            "train.log_interval=1",
            "train.eval_interval=0",
            "train.eval_iters=2",
            "train.progress_bar=false",
            "train.tensorboard=false",
            *overrides,
        ],
    )


def _train_on_ranks(cfg):
    from megatiny.parallel import ParallelContext
    from megatiny.training.loop import train

    p = cfg.parallel
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)
    try:
        return train(cfg, ctx)
    finally:
        ctx.destroy()


def run_training(cfg, world_size=1, timeout=240):
    return run_ranks(_train_on_ranks, world_size, args=(cfg,), timeout=timeout)


def test_single_rank_run_writes_metrics_config_and_checkpoint(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    cfg = tiny_config(prefix, run_dir, "train.tensorboard=true", "train.eval_interval=3")
    (out,) = run_training(cfg)
    assert len(out["losses"]) == 5 and all(np.isfinite(out["losses"]))
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_records = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5]
    for key in ("loss", "lr", "grad_norm", "tokens_per_second", "mfu", "peak_memory_gib"):
        assert key in train_records[0]
    assert [r["loss"] for r in train_records] == pytest.approx(out["losses"])
    # memory accounting once early and at the end (megatiny.training.memory): state bytes exact
    params = cfg.model.num_parameters() * 4
    for record in (train_records[0], train_records[-1]):
        assert record["memory_params"] == params and record["memory_grads"] == params
        assert record["memory_optimizer"] == 2 * params and record["memory_activations"] > 0
    assert "memory_params" not in train_records[1]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid] == [3, 5] and valid[-1]["perplexity"] == pytest.approx(
        np.exp(valid[-1]["loss"])
    )
    assert Config.from_yaml(str(run_dir / "config.yaml")) == cfg
    assert os.listdir(run_dir / "tensorboard")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_5"


def test_loss_falls(tmp_path):
    prefix = make_corpus(tmp_path)
    cfg = tiny_config(prefix, tmp_path / "run", "train.steps=40", "train.micro_batch_size=8",
                      "train.log_interval=100")  # fmt: skip
    (out,) = run_training(cfg)
    assert np.mean(out["losses"][-5:]) < out["losses"][0] - 1.0
    assert out["eval"]["loss"] < out["losses"][0] - 1.0


def _bf16_steps(cfg):
    """Run a few steps of the live Trainer; report the dtypes the matmuls ran in and those of the
    model parameters, the optimizer's parameters and its AdamW state."""
    from megatiny.parallel import ParallelContext
    from megatiny.training.step import build_trainer

    ctx = ParallelContext.initialize()
    try:
        trainer = build_trainer(cfg, ctx)
        matmul_dtypes = set()
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda mod, args, out: matmul_dtypes.add(out.dtype))
        for _ in range(3):
            trainer.train_step()
        opt = trainer.optimizer
        inner = getattr(opt, "optimizer", opt)  # ZeroOptimizer wraps an AdamW over fp32 slices
        params = [p for g in opt.param_groups for p in g["params"]]
        states = [inner.state[p] for p in params]
        return {
            "losses": trainer.losses,
            "matmul": matmul_dtypes,
            "model": {p.dtype for p in trainer.model.parameters()},
            "optimizer_params": {p.dtype for p in params},
            "with_state": (sum(bool(s) for s in states), len(states)),
            "state": {
                key: {s[key].dtype for s in states if key in s} for key in ("exp_avg", "exp_avg_sq")
            },
        }
    finally:
        ctx.destroy()


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    """precision=bf16 runs the matmuls under bf16 autocast, while the live optimizer's parameters
    (the master weights) and its AdamW state stay fp32; the losses stay close to fp32's."""
    prefix = make_corpus(tmp_path)
    ref = run_training(tiny_config(prefix, tmp_path / "a", "train.steps=3"))[0]["losses"]
    cfg = tiny_config(prefix, tmp_path / "b", "train.steps=3", "train.precision=bf16")
    (out,) = run_ranks(_bf16_steps, 1, args=(cfg,))
    assert torch.bfloat16 in out["matmul"]  # autocast really ran ...
    assert out["model"] == out["optimizer_params"] == {torch.float32}  # ... on fp32 masters
    n_with_state, n_params = out["with_state"]
    assert n_params > 0 and n_with_state == n_params  # every master weight was stepped
    assert out["state"] == {"exp_avg": {torch.float32}, "exp_avg_sq": {torch.float32}}
    assert out["losses"] != ref  # bf16 rounding changes the numbers ...
    np.testing.assert_allclose(out["losses"], ref, rtol=3e-2)  # ... but not the training


@pytest.mark.slow
def test_bf16_zero1_keeps_fp32_master_shards(tmp_path):
    """The same under ZeRO-1 (dp=2): each rank's fp32 master slice and its AdamW state."""
    prefix = make_corpus(tmp_path)
    cfg = tiny_config(prefix, tmp_path / "z", "train.steps=3", "train.precision=bf16",
                      "parallel.zero1=true")  # fmt: skip
    for out in run_ranks(_bf16_steps, 2, args=(cfg,)):
        assert torch.bfloat16 in out["matmul"]
        assert out["optimizer_params"] == {torch.float32}
        assert out["with_state"][0] == out["with_state"][1] > 0
        assert out["state"] == {"exp_avg": {torch.float32}, "exp_avg_sq": {torch.float32}}


@pytest.mark.slow
def test_tp2_matches_tp1(tmp_path):
    """Acceptance: tp=1 and tp=2 runs of 5 steps on the same data give the same losses."""
    prefix = make_corpus(tmp_path)
    ref = run_training(tiny_config(prefix, tmp_path / "a"))[0]["losses"]
    for extra in (["parallel.tp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]):
        outs = run_training(tiny_config(prefix, tmp_path / "_".join(extra), *extra), world_size=2)
        for out in outs:
            np.testing.assert_allclose(out["losses"], ref, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_global_batch_is_micro_x_accumulation_x_dp(tmp_path):
    """micro 4 x accum 1 x dp 1 == micro 2 x accum 2 x dp 1 == micro 2 x accum 1 x dp 2
    (bucketed DDP), also with tp=2 x dp=2 on 4 ranks."""
    prefix = make_corpus(tmp_path)
    common = ("train.global_batch_size=4", "train.steps=3")
    ref = run_training(tiny_config(prefix, tmp_path / "a", *common, "train.micro_batch_size=4"))
    acc = run_training(tiny_config(prefix, tmp_path / "b", *common, "train.micro_batch_size=2"))
    dp2 = run_training(tiny_config(prefix, tmp_path / "c", *common, "train.micro_batch_size=2"), 2)
    np.testing.assert_allclose(acc[0]["losses"], ref[0]["losses"], rtol=1e-5)
    tp2dp2 = run_training(
        tiny_config(prefix, tmp_path / "d", *common, "train.micro_batch_size=2", "parallel.tp=2"), 4
    )
    for out in dp2 + tp2dp2:
        np.testing.assert_allclose(out["losses"], ref[0]["losses"], rtol=1e-5)


def _clip_on_ranks(model_kw, max_norm):
    from megatiny.model import GPT
    from megatiny.parallel import ParallelContext
    from megatiny.parallel.parallelize import parallelize
    from megatiny.training.optim import clip_grad_norm_

    ctx = ParallelContext.initialize(tp=dist.get_world_size())
    try:
        torch.manual_seed(3)
        model = GPT(ModelConfig(**model_kw))
        if ctx.tp_size > 1:
            parallelize(model, ctx)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, model_kw["vocab_size"], (2, 16), generator=g)
        labels = torch.randint(0, model_kw["vocab_size"], (2, 16), generator=g)
        model(ids, labels=labels).backward()
        norm = clip_grad_norm_(model, max_norm, ctx)
        return float(norm), {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        ctx.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_clip_grad_norm_equals_single_device(tie):
    """The global norm over TP shards (replicated params once) equals torch's clip_grad_norm_
    on the single-device model, and clipped gradients agree."""
    from megatiny.model import GPT

    kw = dict(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_layers=2, n_heads=4,
              tie_embeddings=tie)  # fmt: skip
    torch.manual_seed(3)
    ref = GPT(ModelConfig(**kw))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    ref(ids, labels=labels).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))
    outs = run_ranks(_clip_on_ranks, 2, args=(kw, 0.1))
    for norm, grads in outs:
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        # replicated parameters carry the full clipped gradient on every rank
        for name in ("norm_f.weight", "blocks.0.norm1.weight"):
            if name in grads:
                torch.testing.assert_close(grads[name], dict(ref.named_parameters())[name].grad)
    assert ref_norm > 0.1  # the clip actually scaled


@pytest.mark.slow
def test_recompute_modes_give_identical_gradients():
    from megatiny.model import GPT

    grads = {}
    for mode in ("none", "selective", "op", "full"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_layers=2,
                                n_heads=4, recompute=mode, dropout=0.1))  # fmt: skip
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        torch.manual_seed(7)  # same dropout masks; recompute must replay them
        model(ids, labels=ids).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("selective", "op", "full"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=0, atol=1e-6, msg=name)


def _nan_run(cfg, bad_step):
    from megatiny.parallel import ParallelContext
    from megatiny.training.loop import train
    from megatiny.training.step import NonFiniteLoss, build_trainer, compute_loss

    ctx = ParallelContext.initialize()
    trainer = build_trainer(cfg, ctx)

    def loss_fn(model, batch):
        loss = compute_loss(model, batch)
        return loss * float("nan") if trainer.step + 1 == bad_step else loss

    trainer.loss_fn = loss_fn
    try:
        return train(cfg, ctx, trainer)
    except NonFiniteLoss as e:
        return str(e)
    finally:
        ctx.destroy()


def test_nan_loss_stops_with_checkpoint_or_skips(tmp_path):
    prefix = make_corpus(tmp_path)
    (msg,) = run_ranks(_nan_run, 1, args=(tiny_config(prefix, tmp_path / "a"), 3))
    assert "at step 3" in msg and "saved checkpoint" in msg and "nan_policy=skip" in msg
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text().strip() == "step_2"
    cfg = tiny_config(prefix, tmp_path / "b", "train.nan_policy=skip")
    (out,) = run_ranks(_nan_run, 1, args=(cfg, 3))
    assert out["skipped_steps"] == 1 and out["step"] == 5
    assert np.isnan(out["losses"][2]) and np.isfinite(out["losses"][3:]).all()


def test_bad_input_is_reported_before_any_process_group(tmp_path, capsys, monkeypatch):
    from megatiny.cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = os.path.join(REPO, "launch", "configs", "tiny-cpu.yaml")
    missing = str(tmp_path / "nothing")
    argv = ["train", "--config", cfg, "model.vocab_size=64", f"data.path={missing}"]
    assert main(argv + [f"data.tokenizer={missing}"]) == 2
    assert "nothing.bin" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(argv) == 2
    assert "world size 3 is not divisible by tp*pp*cp" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv + ["train.stepz=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert not dist.is_initialized()


def torchrun_tiny_cmd(prefix, run_dir, *overrides) -> list[str]:
    """`torchrun --nproc-per-node 2 -m megatiny train` of tiny-cpu.yaml shrunk to a 2-layer d 32
    model on the corpus at `prefix`: 6 steps of 2 micro-batches of 2 (then `overrides`)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "megatiny", "train", "--config", os.path.join(REPO, "launch/configs/tiny-cpu.yaml"),
        f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.max_seq_len=32",
        f"data.path={prefix}", "data.tokenizer=null", "data.seq_length=16", "data.split=90,10,0",
        f"train.run_dir={run_dir}", "train.steps=6", "train.micro_batch_size=2",
        "train.global_batch_size=4", *overrides,
    ]  # fmt: skip


@pytest.mark.slow
def test_torchrun_end_to_end(tmp_path):
    """`torchrun --nproc-per-node 2 -m megatiny train` at tp=2: exits 0, logs, checkpoints."""
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    cmd = torchrun_tiny_cmd(prefix, run_dir, "train.log_interval=2", "train.eval_interval=3",
                            "train.save_interval=3")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation loss" in proc.stdout and "checkpoint:" in proc.stdout
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records if "split" not in r] == [2, 4, 6]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_3", "step_6"]


def test_throughput_tflops_and_mfu(monkeypatch):
    from megatiny.training import metrics

    clock = iter([10.0, 12.0, 12.0])  # reset at construction, measure, reset after measure
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput(tokens_per_step=1000, flops_per_token=6e9, world_size=2, peak=2.0)
    meter.add_step()
    meter.add_step()
    m = meter.measure()  # 2 steps x 1000 tokens in 2 s
    assert m["tokens_per_second"] == 1000.0 and m["step_time_s"] == 1.0
    assert m["tflops_per_device"] == pytest.approx(1000 * 6e9 / 2 / 1e12)
    assert m["mfu"] == pytest.approx(3.0 / 2.0)
    assert metrics.peak_tflops(torch.device("cpu")) is None
    assert metrics.peak_tflops(torch.device("cpu"), 123.0) == 123.0
    line = metrics.format_line(5, 10, {**m, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5,
                                        "peak_memory_gib": 0.1})  # fmt: skip
    assert "step      5/10" in line and "MFU 150.0%" in line and "tok/s 1,000" in line


def test_adamw_groups_skip_norms_biases_embeddings():
    from megatiny.model import GPT
    from megatiny.training.optim import param_groups

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_layers=2, n_heads=4))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = (sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, 0.1))
    assert all(n.endswith(".weight") and "norm" not in n for n in decay)
    assert "embed.weight" in no_decay and "pos_embed.weight" in no_decay
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)
    assert len(decay) + len(no_decay) == len(names)  # every parameter once (tied head included)
    groups = param_groups(model, 0.1, decay_embeddings=True, decay_norms_and_biases=True)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(names)


def test_warmup_cosine_schedule():
    from megatiny.training.optim import WarmupCosine

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, max_lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.9 * (1 + np.cos(np.pi / 4)) / 2, 0.55,
                                 0.1 + 0.9 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.1, 0.1])  # fmt: skip
    again = WarmupCosine(opt, 1.0, 0.1, 2, 6)
    again.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and again.last_step == 8


def _eval_loss(cfg, world_size):
    return [out["eval"]["loss"] for out in run_training(cfg, world_size)]


@pytest.mark.slow
def test_validation_loss_is_the_same_at_every_layout(tmp_path):
    """Finding 6 of issue 16: evaluation used eval_iters micro-batches *per dp rank*, so dp=2
    evaluated other samples than dp=1. Now every layout evaluates eval_iters global batches,
    split like a training step: dp 1 / 2, tp 2 and pp 2 give the same validation loss."""
    prefix = make_corpus(tmp_path)
    base = ("train.steps=1", "train.global_batch_size=8", "train.lr=1e-9", "train.min_lr=0",
            "train.eval_iters=3")  # fmt: skip
    ref = _eval_loss(tiny_config(prefix, tmp_path / "dp1", *base), 1)[0]
    for name, layout in [("dp2", ()), ("tp2", ("parallel.tp=2",)), ("pp2", ("parallel.pp=2",))]:
        for loss in _eval_loss(tiny_config(prefix, tmp_path / name, *base, *layout), 2):
            np.testing.assert_allclose(loss, ref, rtol=1e-5, err_msg=name)


def test_vocab_smaller_than_the_tokenizer_is_refused(tmp_path):
    from megatiny.config import ConfigError
    from megatiny.data.tokenizer import train_tokenizer

    tok = str(tmp_path / "tok")
    texts = [f"word{i} and more text number {i * 7}" for i in range(300)]
    n = train_tokenizer(texts, vocab_size=300, output=tok).vocab_size
    cfg = Config.from_dict({"model": {"vocab_size": n - 1}}, [f"data.tokenizer={tok}"])
    with pytest.raises(ConfigError, match=rf"model.vocab_size={n - 1} is smaller than the {n} "):
        cfg.validate(1)
    Config.from_dict({"model": {"vocab_size": n}}, [f"data.tokenizer={tok}"]).validate(1)
