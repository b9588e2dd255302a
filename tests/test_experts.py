"""Expert parallelism equals the single-device MoE: the layer and the whole GPT at ep 2/4, x tp2
(with and without SP), x pp2, outputs and every gradient (aux losses included); the all-to-all
bytes the tracer counts equal the analytical volume; expert gradients are averaged over the
expert-data-parallel group by DDP and ZeRO-1.

Each data-parallel rank (ep ranks are dp ranks) sees its own rows of the batch; the reference runs
the single-device module on each rank's rows in turn (that is what data parallelism computes: the
sum of the per-replica losses, each with its own router statistics), accumulating gradients.
"""

import pytest
import torch
import torch.distributed as dist

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.moe import MoE
from megatiny.parallel import ParallelContext
from megatiny.parallel.experts import ExpertParallelMoE
from megatiny.parallel.parallelize import full_parameters, parallelize
from megatiny.parallel.sharding import full_from_shard, sharded_parameter_ids, sharding_of
from megatiny.parallel.tracer import CommTracer
from megatiny.testing import run_ranks
from megatiny.testing.equivalence import mismatch

H, E = 16, 4


def moe_config(family="llama", **kw):
    make = ModelConfig.llama if family == "llama" else ModelConfig.gpt2
    base = dict(vocab_size=64, d_model=H, n_layers=2, n_heads=4, max_seq_len=16, ffn_hidden=24,
                moe_experts=E, moe_top_k=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)  # fmt: skip
    if family == "llama":
        base["n_kv_heads"] = 2
    return make(**{**base, **kw})


def _assert_close(got: dict, want: dict, rtol=1e-4, atol=1e-5):
    bad = []
    for name, w in want.items():
        g = got[name]
        _, ratio = mismatch(g, w, rtol, atol)
        if ratio > 1:
            bad.append(f"{name}: max |diff| {mismatch(g, w, rtol, atol)[0]:.3g}")
    assert not bad, bad


# ---- the layer ----------------------------------------------------------------------------------


def _layer_reference(config, x, dy, dp):
    torch.manual_seed(0)
    moe = MoE(config)
    xs = x.clone().requires_grad_()
    outs = []
    for xd, dyd in zip(xs.chunk(dp), dy.chunk(dp)):
        y = moe(xd)
        (y * dyd).sum().backward()
        outs.append(y.detach())
    grads = {f"grad {n}": p.grad for n, p in moe.named_parameters()}
    return {"output": torch.cat(outs), "input.grad": xs.grad, **grads}


def _layer_rank(config, x, dy, tp, ep, sp):
    ctx = ParallelContext.initialize(tp=tp, ep=ep)
    torch.manual_seed(0)
    moe = ExpertParallelMoE(MoE(config), ctx, sequence_parallel=sp)

    def local(t):
        t = t.chunk(ctx.dp_size)[ctx.dp_rank]
        return t.chunk(tp, dim=1)[ctx.tp_rank] if sp else t

    xl = local(x).clone().requires_grad_()
    y = moe(xl)
    (y * local(dy)).sum().backward()

    def full(t):  # sequence over tp (SP), then rows over dp
        if sp:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=ctx.tp_group)
            t = torch.cat(parts, dim=1)
        parts = [torch.empty_like(t) for _ in range(ctx.dp_size)]
        dist.all_gather(parts, t.contiguous(), group=ctx.dp_group)
        return torch.cat(parts)

    out = {"output": full(y.detach()), "input.grad": full(xl.grad)}
    dist.all_reduce(moe.router.weight.grad, group=ctx.dp_group)  # a dense (dp-replicated) param
    for p in moe.experts.parameters():
        dist.all_reduce(p.grad, group=ctx.edp_group)  # replicas of my experts
    for name, p in moe.named_parameters():
        owner, _, leaf = name.rpartition(".")
        g = p.grad
        if owner == "experts":
            g = full_from_shard(g, sharding_of(moe.experts, leaf))
        out[f"grad {name}"] = g
    ctx.destroy()
    return out


slow = pytest.mark.slow
LAYER_CASES = [
    pytest.param("llama", 1, 2, False, id="llama-ep2"),
    pytest.param("llama", 1, 4, False, id="llama-ep4", marks=slow),
    pytest.param("llama", 2, 2, False, id="llama-tp2xep2", marks=slow),
    pytest.param("llama", 2, 2, True, id="llama-tp2spxep2", marks=slow),
    pytest.param("gpt2", 2, 2, True, id="gpt2-tp2spxep2", marks=slow),
]


@pytest.mark.parametrize("family,tp,ep,sp", LAYER_CASES)
def test_moe_layer_expert_parallel_equals_single(family, tp, ep, sp):
    config = moe_config(family)
    dp = ep  # the layout is tp x ep ranks, all of dp an ep group
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * dp, 8, H, generator=g)
    dy = torch.randn(2 * dp, 8, H, generator=g)
    want = _layer_reference(config, x, dy, dp)
    got = run_ranks(_layer_rank, tp * ep, args=(config, x, dy, tp, ep, sp))[0]
    _assert_close(got, want)


# ---- training through the Trainer (`megatiny train`'s loop) --------------------------------------


def _train_config(prefix, run_dir, *overrides):
    from tests.test_train import tiny_config

    model = dict(moe_experts=E, moe_top_k=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                 moe_every=2, n_layers=4)  # fmt: skip
    common = ("train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=2",
              "train.eval_iters=1")  # fmt: skip
    return tiny_config(prefix, run_dir, *common, *overrides, **model)


@pytest.mark.slow
def test_train_losses_at_ep2_x_tp2_x_pp2_equal_one_rank(tmp_path):
    """3 AdamW steps (clipping, 4 micro-batches, blocks 0 and 2 MoE) at ep2, ep2 x tp2 + SP and
    ep2 x pp2 with ZeRO-1 (the aux losses enter through the activations on both stages)."""
    from tests.test_train import make_corpus, run_training

    prefix = make_corpus(tmp_path)
    ref = run_training(_train_config(prefix, tmp_path / "a"))[0]
    ep2 = run_training(_train_config(prefix, tmp_path / "b", "parallel.ep=2"), 2)
    ep2tp2 = run_training(_train_config(
        prefix, tmp_path / "c", "parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"), 4)  # fmt: skip
    pp2ep2 = run_training(_train_config(
        prefix, tmp_path / "d", "parallel.ep=2", "parallel.pp=2", "parallel.zero1=true"), 4)  # fmt: skip
    for out in ep2 + ep2tp2 + pp2ep2:
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
        assert out["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-5)
    # Layout-free checkpoints: every layout saved all experts at full shape, under the same names
    # (AdamW turns fp32 rounding of near-zero gradients into differences of up to ~lr x 0.02).
    from megatiny.training.checkpoint import load_model_for_inference

    want = load_model_for_inference(str(tmp_path / "a"))[0].state_dict()
    for run in "bcd":
        got = load_model_for_inference(str(tmp_path / run))[0].state_dict()
        assert got.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=2e-3, msg=name)


# ---- the whole GPT -------------------------------------------------------------------------------


def _model_reference(config, ids, dp):
    torch.manual_seed(0)
    model = GPT(config)
    losses = [model(x, labels=x) for x in ids.chunk(dp)]
    sum(losses).backward()
    grads = {f"grad {n}": p.grad for n, p in model.named_parameters()}
    return {"loss": torch.stack(losses).detach(), **grads}


def _model_rank(config, ids, tp, ep, sp):
    from megatiny.parallel.experts import apply_expert_parallel

    ctx = ParallelContext.initialize(tp=tp, ep=ep)
    torch.manual_seed(0)
    model = GPT(config)
    if tp > 1:
        parallelize(model, ctx, sequence_parallel=sp)
    else:
        apply_expert_parallel(model, ctx)
    x = ids.chunk(ctx.dp_size)[ctx.dp_rank]
    loss = model(x, labels=x)
    loss.backward()
    experts = sharded_parameter_ids(model, "ep")
    for p in model.parameters():  # the data-parallel sum, over the right group
        dist.all_reduce(p.grad, group=ctx.edp_group if id(p) in experts else ctx.dp_group)
    losses = [torch.zeros(()) for _ in range(ctx.dp_size)]
    dist.all_gather(losses, loss.detach(), group=ctx.dp_group)
    out = {"loss": torch.stack(losses)}
    out.update({f"grad {n}": g for n, g in full_parameters(model, grads=True).items()})
    ctx.destroy()
    return out


MODEL_CASES = [
    pytest.param(1, 2, False, id="ep2"),
    pytest.param(1, 4, False, id="ep4", marks=slow),
    pytest.param(2, 2, True, id="tp2spxep2", marks=slow),
]


@pytest.mark.parametrize("tp,ep,sp", MODEL_CASES)
def test_gpt_with_moe_expert_parallel_equals_single(tp, ep, sp):
    config = moe_config("llama", n_layers=3, moe_every=2)  # blocks 0 and 2 are MoE
    ids = torch.randint(0, 64, (2 * ep, 16), generator=torch.Generator().manual_seed(3))
    want = _model_reference(config, ids, ep)
    got = run_ranks(_model_rank, tp * ep, args=(config, ids, tp, ep, sp))[0]
    assert set(got) == set(want)
    _assert_close(got, want)


# ---- communication volume ----------------------------------------------------------------------


def _a2a_bytes(config, ids):
    from megatiny.parallel.experts import apply_expert_parallel

    ctx = ParallelContext.initialize(ep=2)
    torch.manual_seed(0)
    model = apply_expert_parallel(GPT(config), ctx)
    x = ids.chunk(2)[ctx.dp_rank]
    with CommTracer(ctx.rank) as tracer:
        model(x, labels=x).backward()
    return tracer.bytes_by("group", "op")


def test_all_to_all_bytes_are_analytical():
    """Per MoE layer and rank: the [E] int64 counts (forward), the N k dispatched rows and the R
    received ones each way in the forward (dispatch, combine) and the backward (the reverse
    all-to-alls): 8 E + 2 (N k + R) h 4 bytes. Over the ep group sum R = sum N k, so the total is
    ep (8 E + 4 N k h 4) per layer, whatever the routing."""
    config = moe_config("llama", n_layers=2, moe_every=1)
    b, s, ep, k, L = 2, 16, 2, config.moe_top_k, 2
    ids = torch.randint(0, 64, (b * ep, s), generator=torch.Generator().manual_seed(5))
    traced = run_ranks(_a2a_bytes, ep, args=(config, ids))
    assert all(set(t) == {("ep", "all_to_all")} for t in traced)  # nothing else at tp = 1
    N = b * s
    assert sum(t[("ep", "all_to_all")] for t in traced) == L * ep * (8 * E + 4 * N * k * H * 4)
