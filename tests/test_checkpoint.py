"""Checkpoints: bitwise resume, atomic layout + keep-K, shape mismatch refused, layout-free
(tp=2 -> single device), safe metadata unpickling."""

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
