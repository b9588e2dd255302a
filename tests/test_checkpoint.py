"""Checkpoints: bitwise resume, atomic layout + keep-K, shape mismatch refused, layout-free
(tp=2 -> single device), safe metadata unpickling."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from megatiny.training.checkpoint import (
    CheckpointError,
    SafeFileSystemReader,
    load_model_for_inference,
    read_meta,
)
from tests.test_train import VOCAB, make_corpus, run_training, tiny_config


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path):
    """6 steps straight == 3 steps, stop, `--resume auto`, 3 more steps (CPU, bitwise)."""
    prefix = make_corpus(tmp_path)
    common = ("train.steps=6",)  # dropout on: the RNG state must round-trip too
    full = run_training(tiny_config(prefix, tmp_path / "full", *common, dropout=0.1))[0]
    part = tmp_path / "part"
    first = run_training(tiny_config(prefix, part, "train.steps=3", "train.lr_decay_steps=6",
                                     dropout=0.1))[0]  # fmt: skip
    assert first["losses"] == full["losses"][:3]
    resumed = run_training(
        tiny_config(
            prefix, part, *common, "train.resume=auto", "train.lr_decay_steps=6", dropout=0.1
        )  # fmt: skip
    )[0]
    assert resumed["losses"] == full["losses"][3:]  # exact float equality, not approx
    assert read_meta(str(part / "checkpoints" / "step_6"))["consumed_samples"] == 12


def test_resume_at_the_final_step_reports_the_model(tmp_path):
    """`--resume auto` on a finished run trains nothing but still reports its checkpoint and a
    validation loss (not NaN / None)."""
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    first = run_training(tiny_config(prefix, run_dir, "train.steps=2"))[0]
    again = run_training(tiny_config(prefix, run_dir, "train.steps=2", "train.resume=auto"))[0]
    assert again["losses"] == [] and again["step"] == 2
    assert again["checkpoint"] == first["checkpoint"]
    assert again["eval"]["loss"] == pytest.approx(first["eval"]["loss"], rel=1e-6)


def test_atomic_layout_and_keep_last_k(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    cfg = tiny_config(prefix, run_dir, "train.save_interval=1", "train.keep_checkpoints=2")
    run_training(cfg)
    ckpt = run_dir / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_4", "step_5"]
    assert (ckpt / "latest").read_text() == "step_5\n"
    meta = read_meta(str(ckpt / "step_5"))
    assert meta["step"] == 5 and meta["consumed_samples"] == 10
    assert meta["config"]["train"]["steps"] == 5 and meta["scheduler"] == {"last_step": 5}
    assert {".metadata", "meta.json"} <= set(os.listdir(ckpt / "step_5"))


@pytest.mark.slow
def test_different_model_shape_is_refused(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    run_training(tiny_config(prefix, run_dir, "train.steps=1"))
    cfg = tiny_config(prefix, run_dir, "train.steps=2", "train.resume=auto", d_model=64)
    with pytest.raises(
        Exception, match=r"different model shape \(d_model: checkpoint 32 vs this run 64"
    ):
        run_training(cfg)


def test_inference_load_and_missing(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    run_training(tiny_config(prefix, run_dir, "train.steps=2"))
    model, config = load_model_for_inference(str(run_dir))
    assert config.vocab_size == VOCAB and not model.training
    ids = torch.randint(0, VOCAB, (1, 8))
    assert model(ids).shape == (1, 8, VOCAB)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model_for_inference(str(tmp_path / "nowhere"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_unpickler_refuses_foreign_objects(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    run_training(tiny_config(prefix, run_dir, "train.steps=1"))
    step = run_dir / "checkpoints" / "step_1"
    SafeFileSystemReader(str(step)).read_metadata()  # the real metadata passes
    with open(step / ".metadata", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_model_for_inference(str(run_dir))


def _logits(path, ids):
    model, _ = load_model_for_inference(path)
    with torch.no_grad():
        return model(ids)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_tp2_checkpoint_is_layout_free(tmp_path, tie):
    """A checkpoint written at tp=2 loads into the single-device model and into tp=1 training;
    one written at tp=1 resumes at tp=2 x dp=2; both continue with the same losses."""
    prefix = make_corpus(tmp_path)
    extra = ("train.steps=3", "train.lr_decay_steps=5", "train.global_batch_size=4")
    tp2 = tmp_path / "tp2"
    tp1 = tmp_path / "tp1"
    run_training(tiny_config(prefix, tp2, "parallel.tp=2", *extra, tie_embeddings=tie), 2)
    run_training(tiny_config(prefix, tp1, *extra, tie_embeddings=tie))
    ids = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(_logits(str(tp2), ids), _logits(str(tp1), ids), rtol=1e-4, atol=1e-4)
    # continue both from their tp=2 / tp=1 checkpoints at the other layout
    # tp=2 checkpoint -> 1 rank; tp=1 checkpoint -> tp=2 x dp=2 on 4 ranks
    cont = ("train.steps=5", "train.lr_decay_steps=5", "train.global_batch_size=4",
            "train.resume=auto")  # fmt: skip
    a = run_training(tiny_config(prefix, tp2, *cont, tie_embeddings=tie))[0]["losses"]
    b = run_training(tiny_config(prefix, tp1, "parallel.tp=2", *cont, tie_embeddings=tie), 4)
    assert len(a) == 2
    for out in b:
        np.testing.assert_allclose(out["losses"], a, rtol=1e-4)


# ---- integrity: manifests, corrupt files, fallback (issue 16, finding 3) ----------------------


def _shard(step_dir):
    return sorted(p for p in os.listdir(step_dir) if p.endswith(".distcp"))[0]


def _two_checkpoints(tmp_path):
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    opts = ("train.steps=4", "train.save_interval=2", "train.lr_decay_steps=6")
    run_training(tiny_config(prefix, run_dir, *opts, dropout=0.1))
    return prefix, run_dir


def _damage(path, how):
    if how == "zeroed":  # 4 KiB of zeros inside the shard: same size, other bytes
        with open(path, "r+b") as f:
            f.seek(min(4096, os.path.getsize(path) // 2))
            f.write(b"\0" * 4096)
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        os.unlink(path)


@pytest.mark.parametrize("how", ["zeroed", "truncated", "missing"])
def test_corrupt_shard_is_named_and_resume_falls_back(tmp_path, how, capfd):
    """A damaged shard of the newest checkpoint: `--resume auto` names the file, falls back to
    step_2 and continues exactly like the uninterrupted run."""
    from megatiny.cli import main

    prefix, run_dir = _two_checkpoints(tmp_path)
    step4 = run_dir / "checkpoints" / "step_4"
    name = _shard(step4)
    _damage(step4 / name, how)
    assert main(["checkpoint", "verify", str(run_dir)]) == 1
    out = capfd.readouterr().out
    assert "step_4 (latest): BAD" in out and name in out and "step_2: OK" in out
    opts = ("train.steps=6", "train.lr_decay_steps=6")
    resumed = run_training(tiny_config(prefix, run_dir, *opts, "train.resume=auto", dropout=0.1))
    err = capfd.readouterr().err
    assert f"step_4 is not intact: {step4 / name}" in err
    assert "resuming from the older intact checkpoint" in err and "step_2" in err
    full = run_training(tiny_config(prefix, tmp_path / "full", *opts, dropout=0.1))[0]["losses"]
    assert resumed[0]["losses"] == full[2:]  # bitwise, from step_2


def test_truncated_metadata_and_shard_name_the_file_without_a_manifest(tmp_path):
    """Without a manifest to check first, a truncated shard or .metadata is still a
    CheckpointError naming the checkpoint and pointing at `megatiny checkpoint verify`."""
    _, run_dir = _two_checkpoints(tmp_path)
    step4 = run_dir / "checkpoints" / "step_4"
    os.unlink(step4 / "manifest.json")
    with open(step4 / _shard(step4), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*step_4.*verify"):
        load_model_for_inference(str(step4))
    step2 = run_dir / "checkpoints" / "step_2"
    _damage(step2 / ".metadata", "truncated")
    with pytest.raises(CheckpointError, match=r"cannot read .*step_2/\.metadata .*truncated"):
        load_model_for_inference(str(step2))


def test_verify_only_checks_without_training(tmp_path, capsys):
    from megatiny.cli import main

    prefix, run_dir = _two_checkpoints(tmp_path)
    cfg = os.path.join(os.path.dirname(__file__), "..", "launch", "configs", "tiny-cpu.yaml")
    argv = ["train", "--config", cfg, "model.vocab_size=96", f"data.path={prefix}",
            f"train.run_dir={run_dir}", "--resume", "verify-only"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step_4 (latest): OK" in out and "step_2: OK" in out
    assert not (run_dir / "debug").exists()
    manifest = json.loads((run_dir / "checkpoints" / "step_4" / "manifest.json").read_text())
    assert {".metadata", "meta.json"} <= set(manifest["files"]) and manifest[
        "algorithm"
    ] == "sha256"
