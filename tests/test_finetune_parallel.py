"""Fine-tuning runs on the pretraining Trainer, so every layout applies: tp=2 (+ sequence
parallelism), pp=2, dp=2 and dp=2 with ZeRO-1 give the one-rank losses, evaluation and final
weights, for classification (last-token and mean pooling) and instruction SFT; `--resume auto`
continues bitwise."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatiny.cli import main as cli_main
from megatiny.config import ModelConfig
from megatiny.data.tokenizer import train_tokenizer
from megatiny.finetune.cli import finetune
from megatiny.finetune.config import FinetuneConfig
from megatiny.finetune.data import PROMPT_WITH_INPUT
from megatiny.hf import load_model, save_model
from megatiny.model import GPT
from megatiny.testing import run_ranks
from tests.test_finetune import ALPACA, MAX_LEN, TOPICS, topic_text, write_jsonl

# fp32 on CPU: the same sums in another order (measured: losses within 2e-7, weights within
# 3e-6). Weights are compared after AdamW steps, whose update lr g / (sqrt(v) + eps) turns
# rounding noise in a gradient that is zero in exact arithmetic into an O(lr) step: the bodies
# here have no biases (a key bias is such a gradient), and the tolerance is 1 % of lr.
LR = 1e-3
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-2 * LR


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer, two tiny 'pretrained' bodies (GPT-2 style: tied embeddings, learned positions;
    Llama style: RoPE, untied head) and classification rows."""
    d = tmp_path_factory.mktemp("ftp")
    rng = random.Random(0)
    texts = [topic_text(rng, t) for t in TOPICS for _ in range(30)]
    texts += [PROMPT_WITH_INPUT.format(**r) + r["output"] for r in json.load(open(ALPACA))] * 3
    tok = train_tokenizer(texts, vocab_size=400, output=str(d / "tok"), show_progress=False)
    shape = dict(vocab_size=tok.vocab_size, max_seq_len=MAX_LEN, d_model=32, n_layers=2,
                 n_heads=4, bias=False)  # fmt: skip
    torch.manual_seed(0)
    save_model(GPT(ModelConfig.gpt2(**shape)), str(d / "gpt2"))
    save_model(GPT(ModelConfig.llama(**shape, ffn_hidden=64, n_kv_heads=2)), str(d / "llama"))
    save_model(GPT(ModelConfig.gpt2(**{**shape, "n_layers": 4})), str(d / "gpt2-4"))
    save_model(GPT(ModelConfig.gpt2(**shape, dropout=0.1)), str(d / "gpt2-dropout"))
    rows = [{"text": topic_text(rng, t), "label": t} for _ in range(12) for t in TOPICS]
    rng.shuffle(rows)
    bodies = {name: str(d / name) for name in ("gpt2", "llama", "gpt2-4", "gpt2-dropout")}
    return {"dir": d, "tok": str(d / "tok"), **bodies,
            "train": write_jsonl(d / "train.jsonl", rows[:24]),
            "valid": write_jsonl(d / "valid.jsonl", rows[24:])}  # fmt: skip


def config(assets, task, body, out, **kw):
    base = dict(task=task, checkpoint=assets[body], tokenizer=assets["tok"], output=str(out),
                steps=3, batch_size=4, micro_batch_size=2, lr=LR, weight_decay=0.1,
                grad_clip=0.5, eval_interval=2, progress_bar=False)  # fmt: skip
    if task == "classification":
        base.update(train=assets["train"], valid=assets["valid"])
    else:
        base.update(train=ALPACA, valid=ALPACA)
    return FinetuneConfig(**{**base, **kw})


def _finetune_on_ranks(cfg):
    out = finetune(cfg)  # the context comes from the initialized default group and cfg
    return out["losses"], out["evals"]


def assert_same_run(run, ref, out_dir, ref_dir):
    losses, evals = run
    np.testing.assert_allclose(losses, ref[0], rtol=LOSS_RTOL, atol=0)
    assert [e["step"] for e in evals] == [e["step"] for e in ref[1]] == [2, 3]
    for e, r in zip(evals, ref[1]):
        assert e.keys() == r.keys()
        for key in r:
            assert e[key] == pytest.approx(r[key], rel=LOSS_RTOL), key
    want = load_model(str(ref_dir)).state_dict()
    for name, value in load_model(str(out_dir)).state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    head = out_dir / "classifier_head.safetensors"
    if head.exists():
        from safetensors.torch import load_file

        want = load_file(str(ref_dir / head.name))
        for name, value in load_file(str(head)).items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2-sp": dict(tp=2, sequence_parallel=True),
    "pp2": dict(pp=2),
    "dp2": dict(),
    "dp2-zero1": dict(zero1=True),
    "dp2-zero3": dict(zero=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("body", ["gpt2", "llama"])
@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_layouts_match_one_rank(assets, tmp_path, task, body):
    """tp=2, tp=2 + SP, pp=2, dp=2, dp=2 + ZeRO-1 / ZeRO-3 (2 ranks each) == one rank: per-step losses,
    every evaluation (loss and accuracy / perplexity) and the exported weights."""
    ref = finetune(config(assets, task, body, tmp_path / "ref"))
    ref = (ref["losses"], ref["evals"])
    moved = max(
        float((value - load_model(assets[body]).state_dict()[name]).abs().max())
        for name, value in load_model(str(tmp_path / "ref")).state_dict().items()
    )
    assert moved > 100 * WEIGHT_ATOL  # the steps really train
    for name, layout in LAYOUTS.items():
        cfg = config(assets, task, body, tmp_path / name, **layout)
        for run in run_ranks(_finetune_on_ranks, 2, args=(cfg,), timeout=240):
            assert_same_run(run, ref, tmp_path / name, tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("body", ["gpt2", "llama"])
def test_mean_pooling_layouts_match_one_rank(assets, tmp_path, body):
    """The mean-pooled classifier (`pooling="mean"`: the head reads the running mean of the
    hidden states, gathered whole under sequence parallelism): tp=2 + SP, pp=2 and dp=2 +
    ZeRO-1 == one rank, and it is another function than the last-token head."""
    ref = finetune(config(assets, "classification", body, tmp_path / "ref", pooling="mean"))
    ref = (ref["losses"], ref["evals"])
    last = finetune(config(assets, "classification", body, tmp_path / "last", steps=1))
    assert abs(last["losses"][0] - ref[0][0]) > 1e-4  # the same init, another pooled input
    for name in ("tp2-sp", "pp2", "dp2-zero1"):
        cfg = config(assets, "classification", body, tmp_path / name, pooling="mean",
                     **LAYOUTS[name])  # fmt: skip
        for run in run_ranks(_finetune_on_ranks, 2, args=(cfg,), timeout=240):
            assert_same_run(run, ref, tmp_path / name, tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [dict(tp=2, pp=2, sequence_parallel=True), dict(pp=2, virtual_pipeline_size=2, zero1=True)],
    ids=["tp2-pp2-sp", "pp2-interleaved-dp2-zero1"],
)
def test_4_rank_layouts_match_one_rank(assets, tmp_path, layout):
    """tp x pp with sequence parallelism, and interleaved pp x dp with ZeRO-1, on 4 ranks; a
    4-layer body with tied embeddings (the head on the last stage, the embedding on both)."""
    kw = dict(micro_batch_size=1, recompute="full")
    ref = finetune(config(assets, "classification", "gpt2-4", tmp_path / "ref", **kw))
    cfg = config(assets, "classification", "gpt2-4", tmp_path / "run", **kw, **layout)
    for run in run_ranks(_finetune_on_ranks, 4, args=(cfg,), timeout=240):
        assert_same_run(run, (ref["losses"], ref["evals"]), tmp_path / "run", tmp_path / "ref")


def _cli(assets, out, *args):
    argv = ["finetune", "--task", "classification", "--checkpoint", assets["gpt2-dropout"],
            "--tokenizer", assets["tok"], "--train", assets["train"], "--valid", assets["valid"],
            "--output", str(out), "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
            "--lr-decay-steps", "4", "--eval-interval", "2", "--no-progress-bar", *args]  # fmt: skip
    assert cli_main(argv) == 0


def _losses(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in rows if "split" not in r]


def _assert_same_files(a, b):
    from safetensors.torch import load_file

    for name in ("model.safetensors", "classifier_head.safetensors"):
        want = load_file(str(a / name))
        got = load_file(str(b / name))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key  # bitwise


def test_resume_auto_continues_bitwise(assets, tmp_path):
    """`megatiny finetune --resume auto`: 4 steps straight == 2 steps, stop, resume to 4 (body
    with dropout, so the RNG state is restored too): the same losses and the same weights."""
    _cli(assets, tmp_path / "straight", "--steps", "4")
    _cli(assets, tmp_path / "parts", "--steps", "2")
    assert sorted(os.listdir(tmp_path / "parts" / "checkpoints")) == ["latest", "step_2"]
    _cli(assets, tmp_path / "parts", "--steps", "4", "--resume", "auto")
    assert _losses(tmp_path / "parts") == _losses(tmp_path / "straight")  # exact floats
    _assert_same_files(tmp_path / "straight", tmp_path / "parts")
    summary = json.load(open(tmp_path / "parts" / "finetune.json"))
    assert [e["step"] for e in summary["evals"]] == [4]  # this invocation's evaluations
    # The head is saved and resumed like any parameter: weights and AdamW moments.
    from megatiny.training.checkpoint import SafeFileSystemReader

    step_dir = tmp_path / "parts" / "checkpoints" / "step_4"
    saved = SafeFileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    for key in ("model/output.head.weight", "optim/output.head.bias.exp_avg_sq"):
        assert key in saved


def test_resume_refuses_another_pooling_before_training(assets, tmp_path, capsys):
    """Pooling has no parameters, so the checkpoint's shapes cannot catch a changed --pooling:
    the checkpoint records the task's set-up and `--resume auto` with another pooling exits 2,
    naming the one to pass, before any step (the run directory is left as it was)."""
    import pytest

    out = tmp_path / "run"
    _cli(assets, out, "--steps", "2", "--pooling", "mean")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(AssertionError):  # _cli asserts exit 0
        _cli(assets, out, "--steps", "4", "--resume", "auto")  # default --pooling last
    err = capsys.readouterr().err
    assert "--pooling mean" in err and "--pooling last" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_2"]
    _cli(assets, out, "--steps", "4", "--resume", "auto", "--pooling", "mean")  # continues
    assert sorted(os.listdir(out / "checkpoints"))[-1] == "step_4"


def _resume_on_ranks(cfg, steps, resume):
    cfg.steps, cfg.resume = steps, resume
    return finetune(cfg)["losses"]


@pytest.mark.slow
def test_resume_at_pp2_continues_bitwise(assets, tmp_path):
    """The same at pp=2 on 2 ranks (DCP checkpoint with the head on the last stage)."""
    kw = dict(pp=2, lr_decay_steps=4, body="gpt2-dropout")
    straight = run_ranks(_resume_on_ranks, 2, args=(_cfg(assets, tmp_path / "a", **kw), 4, "none"))
    first = run_ranks(_resume_on_ranks, 2, args=(_cfg(assets, tmp_path / "b", **kw), 2, "none"))
    second = run_ranks(_resume_on_ranks, 2, args=(_cfg(assets, tmp_path / "b", **kw), 4, "auto"))
    assert first[0] + second[0] == straight[0]
    _assert_same_files(tmp_path / "a", tmp_path / "b")


def _cfg(assets, out, body, **kw):
    return config(assets, "classification", body, out, **kw)


def test_recompute_and_bf16_run_the_same_training(assets, tmp_path):
    """recompute=full gives the same losses; bf16 autocast stays close to fp32."""
    ref = finetune(config(assets, "instruction", "llama", tmp_path / "ref", steps=2))["losses"]
    full = finetune(config(assets, "instruction", "llama", tmp_path / "full", steps=2,
                           recompute="full"))["losses"]  # fmt: skip
    np.testing.assert_allclose(full, ref, rtol=0, atol=1e-6)
    bf16 = finetune(config(assets, "instruction", "llama", tmp_path / "bf16", steps=2,
                           precision="bf16"))["losses"]  # fmt: skip
    assert bf16 != ref
    np.testing.assert_allclose(bf16, ref, rtol=3e-2)


@pytest.mark.slow
def test_torchrun_tp2_end_to_end(assets, tmp_path):
    """`torchrun --nproc-per-node 2 -m megatiny finetune --tp 2 --sequence-parallel`: exits 0,
    logs the one-rank losses, writes the model directory and the checkpoint."""
    args = ["--task", "classification", "--checkpoint", assets["gpt2"], "--tokenizer",
            assets["tok"], "--train", assets["train"], "--valid", assets["valid"], "--steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--eval-interval", "2", "--no-progress-bar"]  # fmt: skip
    assert cli_main(["finetune", *args, "--output", str(tmp_path / "ref")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatiny", "finetune", *args, "--output", str(tmp_path / "tp2"), "--tp", "2",
           "--sequence-parallel"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation loss" in proc.stdout and "accuracy" in proc.stdout
    ref, tp2 = _losses(tmp_path / "ref"), _losses(tmp_path / "tp2")
    assert [s for s, _ in tp2] == [1, 2, 3]
    np.testing.assert_allclose([x for _, x in tp2], [x for _, x in ref], rtol=LOSS_RTOL)
    want = load_model(str(tmp_path / "ref")).state_dict()
    for name, value in load_model(str(tmp_path / "tp2")).state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    for name in ("classifier_head.safetensors", "labels.json", "finetune.json"):
        assert (tmp_path / "tp2" / name).exists()
    assert (tmp_path / "tp2" / "checkpoints" / "latest").read_text().strip() == "step_3"
