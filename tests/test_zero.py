"""ZeRO-1 (sharded AdamW state, reduce-scatter / all-gather) equals plain AdamW on the full batch."""

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  AdamW imports it lazily: once here, not per forked rank
import torch.distributed as dist
from torch import nn

from megatiny.parallel.data_parallel import DistributedDataParallel
from megatiny.parallel.zero import ZeroOptimizer
from megatiny.testing import run_ranks
from tests.test_data_parallel import (
    GLOBAL_BATCH,
    STEPS,
    accumulate_local_batch,
    make_data,
    make_model,
)

MAX_NORM = 0.05  # small enough that clipping is active in every step


def groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def reference(model, data):
    opt = torch.optim.AdamW(groups(model), lr=1e-2)
    losses, norms = [], []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        losses.append(loss.item())
        opt.step()
    state = {n: opt.state[p] for n, p in model.named_parameters()}
    return losses, norms, [p.detach().clone() for p in model.parameters()], state


def _zero_worker(bucket_mb):
    rank, world = dist.get_rank(), dist.get_world_size()
    model, data = make_model(), make_data()
    ref = reference(copy.deepcopy(model), data)
    ddp = DistributedDataParallel(model, None, bucket_mb=bucket_mb, shard=True)
    opt = ZeroOptimizer(ddp, groups(model), lr=1e-2)
    losses, norms = [], []
    for x, y in data:
        local = accumulate_local_batch(ddp, model, x, y, rank, world)
        norms.append(opt.clip_grad_norm(MAX_NORM).item())
        opt.step()
        opt.zero_grad()
        dist.all_reduce(local)
        losses.append(local.item() / world)
    full_state = opt.full_state_dict()
    view = {n: {k: t.clone() for k, t in opt.state[p].items()} for n, p in model.named_parameters()}
    return dict(
        view=view,
        ref=ref,
        losses=losses,
        norms=norms,
        params=[p.detach().clone() for p in model.parameters()],
        full_state=full_state,
        memory=opt.memory_report(),
    )


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_matches_full_batch_adamw_with_global_clipping(world):
    out = run_ranks(_zero_worker, world, args=(0.0005,), timeout=120)
    for r in out:
        ref_losses, ref_norms, ref_params, ref_state = r["ref"]
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert r["norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert min(ref_norms) > MAX_NORM  # clipping really happened
        for a, b in zip(r["params"], ref_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # The gathered (layout-free) optimizer state equals plain AdamW's.
        for name, st in ref_state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(
                    r["full_state"][name][key], st[key], rtol=1e-5, atol=1e-8
                )
            # The per-parameter view that layout-free checkpoints read is the same state.
            torch.testing.assert_close(r["view"][name]["exp_avg"], st["exp_avg"])
            assert r["view"][name]["step"].item() == STEPS
        mem = r["memory"]
        # AdamW keeps two fp32 tensors per element: 8 bytes/param unsharded, about 8/D sharded.
        n_params = sum(p.numel() for p in make_model().parameters())
        assert mem["optimizer_state_bytes_unsharded"] == 8 * n_params
        assert mem["optimizer_state_bytes"] <= 8 * n_params / world + 8 * 4 * world
        assert mem["optimizer_state_bytes"] < mem["optimizer_state_bytes_unsharded"]


def _reshard_worker(full_state):
    model = make_model()
    ddp = DistributedDataParallel(model, None, bucket_mb=0.0003, shard=True)
    opt = ZeroOptimizer(ddp, groups(model), lr=1e-2)
    opt.load_full_state_dict(full_state)
    return opt.full_state_dict()


def test_full_state_round_trips_across_dp_sizes():
    full = run_ranks(_zero_worker, 2, args=(0.0005,))[0]["full_state"]
    again = run_ranks(_reshard_worker, 4, args=(full,))[1]
    for name in full:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(again[name][key], full[name][key])


def _no_shard_worker():
    ddp = DistributedDataParallel(make_model(), None)
    try:
        ZeroOptimizer(ddp, lr=1e-3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_zero_needs_a_sharded_ddp():
    assert "shard=True" in run_ranks(_no_shard_worker, 2)[0]


def _resume_worker(params, view):
    """Load params + per-parameter state in place (as DCP does) at a new dp; take one more step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), params):
            p.copy_(saved)
    ddp = DistributedDataParallel(model, None, bucket_mb=0.0003, shard=True)
    opt = ZeroOptimizer(ddp, groups(model), lr=1e-2)
    for name, p in model.named_parameters():
        st = opt.state[p]  # empty before the first step: fill it like a checkpoint loader
        for key, t in view[name].items():
            st[key] = t.clone()
    x, y = make_data(seed=7)[0]
    per_rank = GLOBAL_BATCH // world
    xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    nn.functional.mse_loss(model(xs), ys).backward()
    ddp.finish_grad_sync()
    opt.clip_grad_norm(MAX_NORM)
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_zero_state_resumes_at_another_dp_size():
    r = run_ranks(_zero_worker, 2, args=(0.0005,))[0]
    # Reference: plain AdamW with the saved state, one more step on the full batch.
    model = make_model()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), r["params"]):
            p.copy_(saved)
    opt = torch.optim.AdamW(groups(model), lr=1e-2)
    for name, p in model.named_parameters():
        opt.state[p] = {k: t.clone() for k, t in r["view"][name].items()}
    x, y = make_data(seed=7)[0]
    nn.functional.mse_loss(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    got = run_ranks(_resume_worker, 4, args=(r["params"], r["view"]))[3]
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


# ---- overlap_param_gather: the updated parameters' all-gather hides behind the next forward ----


def _final_weights(run_dir):
    from megatiny.training.checkpoint import load_model_for_inference

    model = load_model_for_inference(str(run_dir))[0]
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "layout",
    [
        (2, ["parallel.zero1=true", "train.global_batch_size=8"]),
        (2, ["parallel.zero1=true", "train.global_batch_size=8", "model.dtype=bf16"]),
        pytest.param(
            (4, ["parallel.zero1=true", "parallel.pp=2", "train.global_batch_size=8"]),
            marks=pytest.mark.slow,
        ),  # fmt: skip
    ],
    ids=["dp2", "dp2-bf16", "pp2xdp2"],
)
def test_overlapped_parameter_gather_trains_identically(layout, tmp_path):
    from tests.test_train import make_corpus, run_training, tiny_config

    world, overrides = layout
    prefix = make_corpus(tmp_path)
    runs = {}
    for overlap in (False, True):
        run_dir = tmp_path / f"overlap-{overlap}"
        cfg = tiny_config(prefix, run_dir, *overrides, f"parallel.overlap_param_gather={overlap}")
        runs[overlap] = (run_training(cfg, world)[0]["losses"], _final_weights(run_dir))
    assert runs[True][0] == runs[False][0]  # bitwise: the same gathers, only waited for later
    for name, value in runs[False][1].items():
        assert torch.equal(runs[True][1][name], value), name


def _gather_left_in_flight(tmp):
    from megatiny.parallel import ParallelContext
    from megatiny.training.step import build_trainer
    from tests.test_train import make_corpus, tiny_config

    prefix = make_corpus(tmp)
    overrides = ["parallel.zero1=true", "parallel.overlap_param_gather=true",
                 "train.global_batch_size=8"]  # fmt: skip
    cfg = tiny_config(prefix, tmp / "run", *overrides)
    ctx = ParallelContext.initialize()
    trainer = build_trainer(cfg, ctx)
    trainer.train_step()
    after_step = len(trainer.optimizer._pending)
    trainer.model(torch.zeros(1, 4, dtype=torch.long))  # the forward pre-hooks wait for them
    after_forward = len(trainer.optimizer._pending)
    ctx.destroy()
    return after_step, after_forward, len(trainer.ddp.buckets)


def test_parameter_gather_stays_in_flight_until_the_next_forward(tmp_path):
    for i, (after_step, after_forward, buckets) in enumerate(
        run_ranks(_gather_left_in_flight, 2, args=(tmp_path,))
    ):
        assert after_step == buckets >= 1 and after_forward == 0, i


def test_overlap_param_gather_needs_zero1():
    from megatiny.config import Config, ConfigError

    with pytest.raises(ConfigError, match="set parallel.zero=1"):
        Config.from_dict({}, ["parallel.overlap_param_gather=true"])
