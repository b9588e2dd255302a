"""The one place collectives are issued: the device check, the observers, and dry runs of the
real layout code on the meta device under torch's fake process group (no GPU, no peers)."""

import pytest
import torch
import torch.distributed as dist

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.parallel import collectives
from megatiny.parallel.context import ParallelContext
from megatiny.parallel.parallelize import parallelize
from megatiny.testing import run_in_fork, run_ranks


def _fake_world(world_size: int, **layout):
    from megatiny.plan.fake_group import init_fake_process_group

    init_fake_process_group(0, world_size)
    return ParallelContext.initialize(device="meta", **layout)


def test_device_check_names_the_op_group_and_devices(monkeypatch):
    monkeypatch.setenv("MEGATINY_CHECK_DEVICES", "1")
    collectives.expect_device("meta")
    try:
        with pytest.raises(
            RuntimeError, match=r"all_reduce over the world group got a tensor on cpu"
        ):
            collectives.all_reduce(torch.ones(2))
    finally:
        collectives.expect_device(None)


def test_device_check_is_off_without_the_variable(monkeypatch):
    monkeypatch.delenv("MEGATINY_CHECK_DEVICES", raising=False)
    collectives.expect_device("meta")
    seen = []
    try:
        collectives._check_devices("all_reduce", None, [torch.ones(2)])  # no error
        remove = collectives.add_observer(seen.append)
        remove()
    finally:
        collectives.expect_device(None)
    assert seen == []


def _observed_ops():
    ctx = _fake_world(4, tp=2)
    seen = []
    collectives.add_observer(seen.append)
    t = torch.ones(3, 5, device="meta")
    collectives.all_reduce(t, ctx.tp_group)
    out = torch.empty(6, 5, device="meta")
    collectives.all_gather_into(out, t, ctx.dp_group, async_op=True).wait()
    return [(e.group, e.op, e.bytes, e.shape) for e in seen]


def test_observers_see_group_op_and_bytes():
    assert run_in_fork(_observed_ops) == [
        ("tp", "all_reduce", 3 * 5 * 4, (3, 5)),
        ("dp", "all_gather", 6 * 5 * 4, (6, 5)),
    ]


def _meta_tp_step(sp):
    torch.manual_seed(0)
    ctx = _fake_world(4, tp=2)
    config = ModelConfig.llama(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               max_seq_len=16)  # fmt: skip
    with torch.device("meta"):
        model = GPT(config)
    parallelize(model, ctx, sequence_parallel=sp)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    model(ids, labels=ids).backward()
    return sorted(
        {p.device.type for p in model.parameters()}
        | {p.grad.device.type for p in model.parameters()}
    )


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tensor_parallel_step_runs_on_meta_under_the_fake_group(sp, monkeypatch):
    monkeypatch.setenv("MEGATINY_CHECK_DEVICES", "1")
    assert run_in_fork(_meta_tp_step, sp) == ["meta"]


def _meta_zero1_checkpoint_state():
    from megatiny.config import TrainConfig
    from megatiny.parallel.zero_levels import build_data_parallel
    from megatiny.training.optim import build_optimizer

    torch.manual_seed(0)
    ctx = _fake_world(2, dp=2)
    config = ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    with torch.device("meta"):
        model = GPT(config)
    ddp = build_data_parallel(model, ctx, shard=True, bucket_mb=1)
    optimizer = build_optimizer(model, TrainConfig(), zero1_ddp=ddp)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    model(ids, labels=ids).backward()
    ddp.finish_grad_sync()
    optimizer.clip_grad_norm(1.0, ctx)
    optimizer.step()
    state = optimizer.state  # the consolidation a checkpoint save runs (all-reduce of `step`)
    return sorted(type(v).__name__ for st in state.values() for v in st.values())[:1]


def test_zero1_checkpoint_state_keeps_collectives_on_the_device(monkeypatch):
    # Before the fix, ZeRO-1 all-reduced AdamW's CPU `step` over dp: NCCL rejects that at the first
    # save. On meta under the device check the same stray CPU tensor raises here.
    monkeypatch.setenv("MEGATINY_CHECK_DEVICES", "1")
    assert run_in_fork(_meta_zero1_checkpoint_state) == ["Tensor"]


def _meta_grad_norm_without_grads():
    from megatiny.training.optim import global_grad_norm

    ctx = _fake_world(4, tp=2)
    with torch.device("meta"):
        model = GPT(ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2))
    parallelize(model, ctx)
    return global_grad_norm(model, ctx).device.type  # no gradients on this rank


def test_grad_norm_of_a_rank_without_gradients_stays_on_the_device(monkeypatch):
    monkeypatch.setenv("MEGATINY_CHECK_DEVICES", "1")
    assert run_in_fork(_meta_grad_norm_without_grads) == "meta"


def _set_device_before_first_collective():
    calls = []
    real_new_group = dist.new_group

    def new_group(*args, **kwargs):
        calls.append("new_group")
        return real_new_group(*args, **kwargs)

    torch.cuda.is_available = lambda: True
    torch.cuda.set_device = lambda d: calls.append(f"set_device({d})")
    dist.get_backend = lambda group=None: "nccl"  # the backend that binds a device
    dist.new_group = new_group
    ParallelContext.initialize(tp=2)
    return calls[:2]


def test_initialize_sets_the_cuda_device_before_any_collective():
    # Before the fix only from_env set it, and only when it created the default group itself.
    first = run_ranks(_set_device_before_first_collective, 2)
    assert first == [["set_device(cuda:0)", "new_group"], ["set_device(cuda:1)", "new_group"]]


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _meta_train_step(corpus_dir, layout, overrides):
    """One real training step (build_trainer: model, data, schedule, DDP/ZeRO-1, clip, AdamW) on
    the meta device under the fake group; returns the host reads of device tensors it made."""
    from megatiny.training.step import build_trainer
    from tests.test_train import tiny_config

    ctx = _fake_world(int(torch.tensor(list(layout.values())).prod()), **layout)
    sets = [f"parallel.{k}={v}" for k, v in layout.items() if k != "dp"]
    cfg = tiny_config(f"{corpus_dir}/corpus", f"{corpus_dir}/run", *sets, *overrides)
    trainer = build_trainer(cfg, ctx)
    reads = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _real=real, **k):
            if self.device.type != "meta":
                return _real(self, *a, **k)
            reads.append(_name)  # a meta tensor has no value: answer "finite, 1.0"
            return torch.ones(self.shape).tolist() if _name == "tolist" else 1

        setattr(torch.Tensor, name, counted)
    out = trainer.train_step()
    return reads, out["skipped"]


LAYOUTS = {
    "tp2": ({"tp": 2}, []),
    "tp2+sp": ({"tp": 2}, ["parallel.sequence_parallel=true"]),
    "pp2": ({"pp": 2}, []),
    "pp2-interleaved": (
        {"pp": 2},
        ["parallel.virtual_pipeline_size=2", "model.n_layers=4", "train.global_batch_size=4"],
    ),  # fmt: skip
    "tp2xpp2": ({"tp": 2, "pp": 2}, []),
    "dp2": ({"dp": 2}, ["train.global_batch_size=8"]),
    "dp2+zero1": ({"dp": 2}, ["parallel.zero1=true", "train.global_batch_size=8"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_training_step_reads_the_device_once(name, tmp_path, monkeypatch):
    # Every layout's step runs on the meta device under the fake group (so a stray CPU tensor in
    # a collective raises), and reads device values back to the host exactly once: loss, grad
    # norm and the NaN verdict in one transfer (no .item() per micro-batch).
    from tests.test_train import make_corpus

    monkeypatch.setenv("MEGATINY_CHECK_DEVICES", "1")
    make_corpus(tmp_path)
    layout, overrides = LAYOUTS[name]
    reads, skipped = run_in_fork(_meta_train_step, str(tmp_path), layout, overrides)
    assert reads == ["tolist"] and not skipped
