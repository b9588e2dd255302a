"""3D parallelism (tp x pp x dp, + interleaving, + ZeRO-1, + context parallelism) equals
single-process training.

Every layout trains the same tiny GPT for 3 AdamW steps (weight decay, gradient clipping by the
global norm, tied embeddings) on the same global batch; the losses and gradient norms must match
the single-process run within fp32 tolerance.
"""

import pytest
import torch
import torch._dynamo  # noqa: F401  AdamW imports it lazily: once here, not per forked rank
import torch.distributed as dist
from torch import nn

from megatiny.model import GPT
from megatiny.parallel import ParallelContext
from megatiny.parallel.context_parallel import apply_context_parallel, split_batch
from megatiny.parallel.data_parallel import DistributedDataParallel
from megatiny.parallel.parallelize import parallelize
from megatiny.parallel.pipeline import (
    build_pipeline,
    replicated_parameter_ids,
    sync_tied_grads,
    tied_embedding_weight,
)
from megatiny.parallel.schedules import build_schedule
from megatiny.parallel.zero import ZeroOptimizer
from megatiny.testing import run_ranks
from megatiny.training.optim import clip_grad_norm_, param_groups
from tests.test_pipeline import MICRO, SEQ, micro_batches, tiny_config

STEPS, GLOBAL_MICRO_BATCHES, LR, WD, CLIP = 3, 4, 3e-3, 0.1, 0.5


def reference_run():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = torch.optim.AdamW(param_groups(model, WD), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        batches = micro_batches(GLOBAL_MICRO_BATCHES, step=step)
        opt.zero_grad()
        loss = sum(model(b["input_ids"], labels=b["labels"]) for b in batches) / len(batches)
        loss.backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms


class Replica:
    """One model replica built from the pieces: schedule + DDP + (ZeRO-1) AdamW."""

    def __init__(self, ctx, v=None, zero=False, sp=False, schedule=None, cp_mode="ring"):
        torch.manual_seed(0)
        model = GPT(tiny_config())
        if ctx.tp_size > 1:
            parallelize(model, ctx, sequence_parallel=sp, cp_mode=cp_mode)
        else:
            apply_context_parallel(model, ctx, cp_mode)  # a no-op at cp = 1
        self.ctx, self.zero, self.zigzag = ctx, zero, cp_mode == "ring"
        self.module = build_pipeline(model, ctx, v)  # the GPT at pp=1, else a PipelineModel
        self.chunks = self.module.chunks
        tied = tied_embedding_weight(self.chunks, ctx)
        self.ddp = DistributedDataParallel(
            self.module, ctx, bucket_mb=0.01, shard=zero, isolate=[tied] if tied is not None else ()
        )
        groups = param_groups(self.module, WD)
        self.opt = (
            ZeroOptimizer(self.ddp, groups, lr=LR) if zero else torch.optim.AdamW(groups, lr=LR)
        )
        self.run = build_schedule(
            ctx, self.chunks, MICRO, SEQ, schedule=schedule, sequence_parallel=sp
        )
        self.skip = replicated_parameter_ids(self.chunks, ctx)

    def train_step(self, step):
        ctx, ddp = self.ctx, self.ddp
        per_rank = GLOBAL_MICRO_BATCHES // ctx.dp_size
        batches = micro_batches(GLOBAL_MICRO_BATCHES, step=step)
        batches = batches[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
        if ctx.cp_size > 1:  # my tokens of the same samples, with their global positions
            batches = [split_batch(b, ctx.cp_rank, ctx.cp_size, self.zigzag) for b in batches]
        loss = self.run(batches, ddp)
        ddp.finish_grad_sync()
        sync_tied_grads(self.chunks, ctx, ddp)
        if self.zero:
            norm = self.opt.clip_grad_norm(CLIP, ctx, skip_parameter_ids=self.skip)
        else:
            norm = clip_grad_norm_(self.module, CLIP, ctx, skip_parameter_ids=self.skip)
        self.opt.step()
        self.opt.zero_grad()
        ddp.zero_grad()
        dist.all_reduce(loss, group=ctx.dp_group)
        return loss.item() / ctx.dp_size, norm.item()


def train_3d(ctx, v, zero, sp, schedule=None, cp_mode="ring"):
    replica = Replica(ctx, v, zero, sp, schedule, cp_mode)
    losses, norms = zip(*(replica.train_step(step) for step in range(STEPS)))
    return list(losses), list(norms)


def _worker(tp, pp, dp, v, sp, zero_modes, schedule, cp, cp_mode):
    ref = reference_run()
    ctx = ParallelContext.initialize(tp=tp, pp=pp, dp=dp, cp=cp)
    return ref, [train_3d(ctx, v, zero, sp, schedule, cp_mode) for zero in zero_modes]


def check_layout(tp, pp, dp, v=None, sp=False, zero_modes=(False, True), schedule=None, cp=1,
                 cp_mode="ring"):  # fmt: skip
    args = (tp, pp, dp, v, sp, zero_modes, schedule, cp, cp_mode)
    out = run_ranks(_worker, tp * pp * dp * cp, args=args, timeout=300)
    for ref, runs in out:
        ref_losses, ref_norms = ref
        assert min(ref_norms) > CLIP  # clipping is active, so the global norm must be right
        for losses, norms in runs:
            assert losses == pytest.approx(ref_losses, rel=2e-5)
            assert norms == pytest.approx(ref_norms, rel=2e-4)


# The fast subset: DP x PP with ZeRO, TP x interleaved PP with SP.
@pytest.mark.parametrize(
    "tp,pp,dp,v,sp",
    [(1, 2, 2, None, False), (2, 2, 1, 2, True)],
)
def test_3d_fast_subset(tp, pp, dp, v, sp):
    check_layout(tp, pp, dp, v, sp)


LAYOUTS = [
    (tp, pp, dp)
    for tp in (1, 2)
    for pp in (1, 2, 4)
    for dp in (1, 2)
    if tp * pp * dp <= 8 and (tp, pp, dp) != (1, 2, 2)
]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_3d_matrix(tp, pp, dp):
    check_layout(tp, pp, dp)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,pp,dp,sp,schedule",
    [(1, 2, 2, False, None), (2, 2, 2, True, None), (2, 2, 2, True, "gpipe")],
)
def test_3d_interleaved_and_gpipe_on_8_ranks(tp, pp, dp, sp, schedule):
    check_layout(tp, pp, dp, v=2 if schedule is None else None, sp=sp, schedule=schedule)


# Context parallelism: the sequence of every sample split over cp ranks (ring attention on
# zig-zag chunks, or all-to-all); gradients averaged over dp x cp.
def test_3d_cp2_x_pp2():
    check_layout(tp=1, pp=2, dp=1, cp=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,pp,dp,cp,sp,cp_mode",
    [
        (1, 1, 1, 2, False, "ring"),
        (1, 1, 1, 2, False, "a2a"),
        (2, 1, 1, 2, True, "ring"),  # cp2 x tp2 with sequence parallelism
        (2, 1, 1, 2, True, "a2a"),
        (1, 1, 2, 2, False, "ring"),  # cp2 x dp2 (ZeRO-1 over dp x cp)
        (1, 2, 1, 2, False, "a2a"),
        (2, 2, 1, 2, True, "ring"),  # 8 ranks: tp2 x cp2 x pp2
        (1, 2, 2, 2, False, "ring"),  # 8 ranks: cp2 x pp2 x dp2
    ],
)
def test_3d_matrix_with_context_parallelism(tp, pp, dp, cp, sp, cp_mode):
    check_layout(tp, pp, dp, sp=sp, cp=cp, cp_mode=cp_mode)


@pytest.mark.slow
def test_3d_cp2_with_interleaved_pipeline():
    check_layout(tp=1, pp=2, dp=1, v=2, cp=2)


def _checkpoint_worker(layout, zero, path, steps):
    """Train `steps` (a range) at `layout`, loading from / saving to `path` around them."""
    from megatiny.training.checkpoint import load_checkpoint, save_checkpoint

    tp, pp, dp, v = layout
    ctx = ParallelContext.initialize(tp=tp, pp=pp, dp=dp)
    replica = Replica(ctx, v, zero, sp=tp > 1)
    if steps[0] > 0:
        load_checkpoint(path, replica.module, replica.opt, None, ctx)
    out = [replica.train_step(step) for step in steps]
    if steps[0] == 0:
        save_checkpoint(path, steps[-1] + 1, replica.module, replica.opt, None, ctx, keep=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero", [False, True])
def test_checkpoint_saved_at_2x2x2_resumes_at_other_layouts(tmp_path, zero):
    ref_losses, ref_norms = reference_run()
    saved = (2, 2, 2, 2)  # tp, pp, dp, virtual stages
    first = run_ranks(_checkpoint_worker, 8, args=(saved, zero, str(tmp_path), range(2)))
    assert [loss for loss, _ in first[0]] == pytest.approx(ref_losses[:2], rel=2e-5)
    for layout in [(1, 1, 1, None), (4, 1, 2, None), (1, 2, 2, None)]:
        world = layout[0] * layout[1] * layout[2]
        out = run_ranks(_checkpoint_worker, world, args=(layout, zero, str(tmp_path), range(2, 3)))
        loss, norm = out[0][0]
        assert loss == pytest.approx(ref_losses[2], rel=2e-5), layout
        assert norm == pytest.approx(ref_norms[2], rel=2e-4), layout


# ---- the training loop (megatiny.training.loop) with pp / dp / ZeRO-1 / interleaving --------------------


def _loop_losses(tmp_path, name, world, *overrides):
    from tests.test_train import make_corpus, run_training
    from tests.test_train import tiny_config as train_config

    prefix = make_corpus(tmp_path)
    cfg = train_config(
        prefix,
        tmp_path / name,
        "train.steps=3",
        "train.global_batch_size=8",
        "train.grad_clip=0.5",
        *overrides,
        n_layers=4,
    )
    out = run_training(cfg, world_size=world, timeout=300)
    return out[0]["losses"], out[0]["eval"]["loss"]


@pytest.mark.slow
def test_train_loop_runs_3d_layouts_with_single_process_losses(tmp_path):
    ref_losses, _ = _loop_losses(tmp_path, "ref", 1)
    # Evaluation reads eval_iters micro-batches per dp rank: compare with the same dp (=2).
    dp2_losses, ref_eval = _loop_losses(tmp_path, "dp2", 2)
    assert dp2_losses == pytest.approx(ref_losses, rel=2e-5)
    layouts = [
        (4, ["parallel.pp=2", "parallel.virtual_pipeline_size=2", "parallel.zero1=true"]),
        (8, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    ]
    for world, overrides in layouts:
        losses, eval_loss = _loop_losses(tmp_path, f"w{world}", world, *overrides)
        assert losses == pytest.approx(ref_losses, rel=2e-5), overrides
        assert eval_loss == pytest.approx(ref_eval, rel=2e-5), overrides


def test_train_rejects_bad_pipeline_layouts_before_any_process_group(tmp_path):
    from megatiny.config import ConfigError
    from megatiny.training.step import check_supported
    from tests.test_train import tiny_config as train_config

    cfg = train_config("unused", tmp_path, "parallel.pp=4", n_layers=6)
    with pytest.raises(ConfigError, match="n_layers=6 is not divisible by pp"):
        check_supported(cfg, world_size=4)
    cfg = train_config(
        "unused",
        tmp_path,
        "parallel.pp=2",
        "parallel.virtual_pipeline_size=2",
        "train.global_batch_size=6",
        n_layers=4,
    )  # 6 samples / (micro 2 x dp 1) = 3 micro-batches: not a multiple of pp=2
    with pytest.raises(ConfigError, match="multiple of pp=2"):
        check_supported(cfg, world_size=2)
