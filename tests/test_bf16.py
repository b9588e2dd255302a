"""bf16 parameters with fp32 main parameters and gradients (`model.dtype=bf16`, Megatron's --bf16):
every layout trains like fp32 within bf16 tolerance, the optimizer and the DDP buckets hold fp32,
and a resumed run continues exactly (the fp32 main weights are checkpointed)."""

import pytest
import torch

from megatiny.testing import run_ranks
from tests.test_train import make_corpus, run_training, tiny_config

LAYOUTS = {
    "1 rank": (1, []),
    "dp2": (2, ["parallel.tp=1", "train.global_batch_size=8"]),
    "dp2+zero1": (2, ["parallel.tp=1", "parallel.zero1=true", "train.global_batch_size=8"]),
    "tp2+sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.tp=1", "parallel.pp=2"]),
}


@pytest.mark.parametrize("name", ["1 rank", "dp2+zero1"])
def test_bf16_parameters_train_like_fp32(name, tmp_path):
    world, overrides = LAYOUTS[name]
    prefix = make_corpus(tmp_path)
    fp32 = run_training(tiny_config(prefix, tmp_path / "a", *overrides), world)[0]["losses"]
    bf16 = run_training(tiny_config(prefix, tmp_path / "b", "model.dtype=bf16", *overrides), world)[
        0
    ]["losses"]
    assert bf16 == pytest.approx(fp32, rel=2e-3)
    assert bf16 != fp32  # it really ran in bf16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp2", "tp2+sp", "pp2"])
def test_bf16_parameters_train_like_fp32_at_more_layouts(name, tmp_path):
    test_bf16_parameters_train_like_fp32(name, tmp_path)


def _dtypes(prefix, run_dir, overrides):
    from megatiny.parallel import ParallelContext
    from megatiny.training.step import build_trainer

    cfg = tiny_config(prefix, run_dir, "model.dtype=bf16", *overrides)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp)
    trainer = build_trainer(cfg, ctx)
    trainer.train_step()
    from megatiny.parallel.tracer import CommTracer

    with CommTracer(rank=ctx.rank) as tracer:
        trainer.train_step()
    gathered = tracer.bytes_by("op").get(("all_gather",), 0)
    if trainer.ddp.shard:  # ZeRO-1 gathers the updated parameters in their own dtype (bf16)
        assert gathered == trainer.ddp.param_buffer.numel() * 2, gathered
    params = {p.dtype for p in trainer.model.parameters()}
    main_grads = {p.main_grad.dtype for p in trainer.model.parameters()}
    grads = {p.grad is None for p in trainer.model.parameters()}
    opt = trainer.optimizer
    mains = {t.dtype for g in opt.param_groups for t in g["params"]}
    moments = {v.dtype for st in opt.optimizer.state.values() for k, v in st.items() if k != "step"}
    return params, main_grads, grads, mains, moments, trainer.ddp.grad_buffer.dtype


@pytest.mark.parametrize("zero1", [False, True])
def test_bf16_model_fp32_main_grads_buckets_and_optimizer(zero1, tmp_path):
    overrides = ["parallel.tp=1", "train.global_batch_size=8"]
    overrides += ["parallel.zero1=true"] if zero1 else []
    prefix = make_corpus(tmp_path)
    for params, main_grads, grads, mains, moments, bucket in run_ranks(
        _dtypes, 2, args=(prefix, str(tmp_path / "run"), overrides)
    ):
        assert params == {torch.bfloat16} and bucket == torch.float32
        assert main_grads == {torch.float32} and grads == {True}  # bf16 grads folded in, freed
        assert mains == {torch.float32} and moments == {torch.float32}


@pytest.mark.parametrize("zero1", [False, True])
def test_bf16_resume_continues_exactly(zero1, tmp_path):
    overrides = ["model.dtype=bf16", "parallel.tp=1", "train.global_batch_size=8"]
    overrides += ["parallel.zero1=true"] if zero1 else []
    prefix = make_corpus(tmp_path)
    straight = run_training(tiny_config(prefix, tmp_path / "a", *overrides, "train.steps=4"), 2)
    run_training(tiny_config(prefix, tmp_path / "b", *overrides, "train.steps=2"), 2)
    resumed = run_training(
        tiny_config(prefix, tmp_path / "b", *overrides, "train.steps=4", "train.resume=auto"), 2
    )
    assert resumed[0]["losses"][-2:] == straight[0]["losses"][-2:]
