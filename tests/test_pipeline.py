"""Pipeline stages and schedules: same loss and every gradient as the single-device model."""

import copy

import pytest
import torch
import torch.distributed as dist

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.parallel import ParallelContext
from megatiny.parallel.pipeline import (
    build_pipeline,
    build_pipeline_chunks,
    replicated_parameter_ids,
    sync_tied_grads,
    validate_pipeline,
)
from megatiny.parallel.schedules import build_schedule
from megatiny.testing import run_ranks

VOCAB, SEQ, MICRO = 64, 8, 2


def tiny_config(**kw):
    base = dict(vocab_size=VOCAB, max_seq_len=SEQ, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64)
    base.update(kw)
    return ModelConfig(**base)


def micro_batches(m, seed=0, step=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    out = []
    for _ in range(m):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def reference_grads(model, batches):
    """Single device: loss = mean of micro-batch mean losses; grads by parameter name."""
    model.zero_grad()
    loss = sum(model(b["input_ids"], labels=b["labels"]) for b in batches) / len(batches)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _pipe_worker(pp, v, kind, m, tie, split):
    torch.manual_seed(0)
    model = GPT(tiny_config(tie_embeddings=tie, n_layers=sum(split) if split else 4))
    batches = micro_batches(m)
    ref_loss, ref_grads = reference_grads(copy.deepcopy(model), batches)
    ctx = ParallelContext.initialize(pp=pp)
    chunks = build_pipeline_chunks(model, ctx, v, layer_split=split)
    schedule = build_schedule(ctx, chunks, MICRO, SEQ, schedule=kind)
    loss = schedule(batches)
    sync_tied_grads(chunks, ctx)
    grads = {}
    for chunk in chunks:
        for n, p in chunk.named_parameters():
            grads[n] = p.grad.clone()
    names = [[n for n, _ in c.named_parameters()] for c in chunks]
    skip = replicated_parameter_ids(chunks, ctx)
    return dict(
        loss=loss.item(), ref_loss=ref_loss, grads=grads, ref=ref_grads, names=names, skip=len(skip)
    )


def _check(out, tie):
    seen = set()
    for r in out:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, r["ref"][name], rtol=1e-5, atol=1e-6)
            seen.add(name)
    assert seen == set(out[0]["ref"])  # every parameter lives on some stage
    if tie:
        assert [r["skip"] for r in out] == [0] * (len(out) - 1) + [1]


@pytest.mark.parametrize(
    "pp,v,kind,m,tie,split",
    [
        (2, 1, "1f1b", 4, True, None),
        (2, 2, "interleaved", 4, False, None),
    ],
)
def test_schedules_match_single_device(pp, v, kind, m, tie, split):
    _check(run_ranks(_pipe_worker, pp, args=(pp, v, kind, m, tie, split), timeout=120), tie)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pp,v,kind,m,tie,split",
    [
        (2, 1, "gpipe", 3, False, None),
        (4, 1, "1f1b", 6, True, None),
        (4, 1, "1f1b", 2, False, [2, 0, 1, 1]),  # fewer micro-batches than stages; empty stage
        (4, 1, "gpipe", 5, True, None),
        (2, 2, "interleaved", 2, True, None),  # m == pp: all forwards are warm-up
        (2, 2, "interleaved", 6, True, [1, 1, 1, 1]),
        (4, 2, "interleaved", 8, True, [1, 0, 1, 1, 0, 1, 1, 1]),
        (2, 3, "interleaved", 4, False, [1, 1, 1, 1, 1, 1]),
    ],
)
def test_schedules_match_single_device_matrix(pp, v, kind, m, tie, split):
    _check(run_ranks(_pipe_worker, pp, args=(pp, v, kind, m, tie, split), timeout=180), tie)


def _names_worker():
    torch.manual_seed(0)
    ctx = ParallelContext.initialize(pp=2)
    chunks = build_pipeline_chunks(GPT(tiny_config()), ctx, 2)
    return [
        sorted({n.split(".")[1] for n, _ in c.named_parameters() if n.startswith("blocks")})
        for c in chunks
    ]


def test_chunks_keep_global_layer_names():
    # pp=2, v=2, 4 layers: virtual stage s = c * pp + rank holds layer s.
    assert run_ranks(_names_worker, 2) == [[["0"], ["2"]], [["1"], ["3"]]]


def _container_worker():
    torch.manual_seed(0)
    ctx = ParallelContext.initialize(pp=2)
    module = build_pipeline(GPT(tiny_config(tie_embeddings=True)), ctx, 2)
    try:
        module(torch.zeros(1, 4, dtype=torch.long))
    except RuntimeError as e:
        err = str(e)
    return [n for n, _ in module.named_parameters()], list(module.state_dict()), err


def test_pipeline_model_uses_single_device_names():
    out = run_ranks(_container_worker, 2)
    full = {n for n, _ in GPT(tiny_config(tie_embeddings=True)).named_parameters()}
    union = set(out[0][0]) | set(out[1][0])
    assert union == full
    assert "embed.weight" in out[0][0] and "embed.weight" in out[1][0]  # tied: both ends
    assert "pos_embed.weight" not in out[1][0] and "norm_f.weight" not in out[0][0]
    assert all(set(names) == set(keys) for names, keys, _ in out)
    assert "schedule" in out[0][2]


def test_bad_layouts_fail_before_any_communication():
    with pytest.raises(ValueError, match="not divisible by pp\\*virtual_pipeline_size"):
        validate_pipeline(6, pp=2, virtual_pipeline_size=2)
    assert validate_pipeline(6, 2, 2, layer_split=[2, 1, 2, 1]) == [2, 1, 2, 1]
    with pytest.raises(ValueError, match="summing to n_layers=6"):
        validate_pipeline(6, 2, 2, layer_split=[2, 2, 2, 2])
    with pytest.raises(ValueError, match="multiple of pp=4"):
        validate_pipeline(8, 4, 2, num_microbatches=6)
    with pytest.raises(ValueError, match="needs pp > 1"):
        validate_pipeline(8, 1, 2)
    from megatiny.parallel.grid import build_grid

    with pytest.raises(ValueError, match="does not equal world_size=8"):
        build_grid(8, tp=2, pp=2, dp=3)


def _interleaved_bad_m_worker():
    torch.manual_seed(0)
    ctx = ParallelContext.initialize(pp=2)
    chunks = build_pipeline_chunks(GPT(tiny_config()), ctx, 2)
    schedule = build_schedule(ctx, chunks, MICRO, SEQ)
    try:
        schedule(micro_batches(3))
    except ValueError as e:
        # Nothing was sent: the group is still usable.
        dist.barrier()
        return str(e)
    return "no error"


def test_interleaved_rejects_micro_batch_count_before_communicating():
    assert all("multiple of pp=2" in msg for msg in run_ranks(_interleaved_bad_m_worker, 2))


def _forward_only_worker(kind, v, m):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    batches = micro_batches(m, seed=3)
    with torch.no_grad():
        ref = sum(model(b["input_ids"], labels=b["labels"]) for b in batches).item() / m
    ctx = ParallelContext.initialize(pp=2)
    chunks = build_pipeline_chunks(model, ctx, v)
    loss = build_schedule(ctx, chunks, MICRO, SEQ, schedule=kind)(batches, forward_only=True)
    grads = [p.grad for c in chunks for p in c.parameters()]
    return loss.item(), ref, all(g is None for g in grads)


@pytest.mark.parametrize("kind,v,m", [("1f1b", 1, 3), ("interleaved", 2, 3)])
def test_forward_only_evaluation(kind, v, m):
    # m=3 is not a multiple of pp: evaluation still runs under interleaving.
    for loss, ref, no_grads in run_ranks(_forward_only_worker, 2, args=(kind, v, m)):
        assert loss == pytest.approx(ref, rel=1e-6) and no_grads


def _in_flight_worker(kind, v, m):
    torch.manual_seed(0)
    ctx = ParallelContext.initialize(pp=4)
    split = [1] * (4 * v) if v > 1 else None
    chunks = build_pipeline_chunks(GPT(tiny_config(n_layers=4 * v)), ctx, v, layer_split=split)
    schedule = build_schedule(ctx, chunks, MICRO, SEQ, schedule=kind)
    schedule(micro_batches(m))
    return schedule.max_in_flight


@pytest.mark.slow
def test_activation_memory_of_each_schedule():
    # Micro-batches whose activations are alive at once, per pipeline rank r (p=4, m=8).
    assert run_ranks(_in_flight_worker, 4, args=("gpipe", 1, 8)) == [8, 8, 8, 8]
    assert run_ranks(_in_flight_worker, 4, args=("1f1b", 1, 8)) == [4, 3, 2, 1]  # p - r
    # Interleaved (v=2): 2(p-r-1) + (v-1)p warm-up chunk forwards + 1.
    assert run_ranks(_in_flight_worker, 4, args=("interleaved", 2, 8)) == [11, 9, 7, 5]


def _build_model_worker(tp, pp, v, tie):
    """build_model's rank-local model vs the old path (the whole same-seed GPT, then its TP
    shard, then this rank's stages), and the weights it generated on the way."""
    from megatiny.config import Config, ParallelConfig
    from megatiny.parallel.parallelize import full_parameters, parallelize
    from megatiny.training.step import build_model

    cfg = Config(
        model=tiny_config(tie_embeddings=tie),
        parallel=ParallelConfig(tp=tp, pp=pp, virtual_pipeline_size=v),
    )
    ctx = ParallelContext.initialize(tp=tp, pp=pp)
    generated = []  # (name, numel) of every weight initialised while building
    initial_value = GPT.initial_value

    def recording(self, name, shape, dtype=torch.float32):
        generated.append((name, torch.Size(shape).numel()))
        return initial_value(self, name, shape, dtype)

    GPT.initial_value = recording
    try:
        model = build_model(cfg, ctx)
    finally:
        GPT.initial_value = initial_value
    torch.manual_seed(cfg.train.seed)
    full = GPT(cfg.model)
    full_numel = sum(p.numel() for p in full.parameters())
    single = {n: p.detach().clone() for n, p in full.named_parameters()}
    old = parallelize(full, ctx) if tp > 1 else full
    old = build_pipeline(old, ctx, v)
    got = {n: p.detach() for n, p in model.named_parameters()}
    gathered = {}  # TP shards gathered back to single-device shapes (collective over TP)
    for chunk in model.chunks:
        gathered.update(full_parameters(chunk) if tp > 1 else dict(chunk.named_parameters()))
    want = {n: p.detach() for n, p in old.named_parameters()}
    return {
        "names": (sorted(got), sorted(want)),
        "equal_old": all(torch.equal(got[n], want[n]) for n in want if n in got),
        "equal_single": all(torch.equal(t, single[n]) for n, t in gathered.items()),
        "gathered": sorted(gathered),
        "generated": sorted(n for n, _ in generated),
        "generated_numel": sum(k for _, k in generated),
        "numel": sum(p.numel() for p in model.parameters()),
        "stage_numel": sum(p.numel() for p in old.parameters()),
        "stage_full_numel": sum(single[n].numel() for n in want),
        "full_numel": full_numel,
        "chunks": len(model.chunks),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, pp, v, tie",
    [
        (1, 2, None, False),
        (1, 4, None, True),
        (1, 2, 2, True),
        (2, 2, None, False),
        (2, 2, 2, True),
    ],
)
def test_build_model_allocates_only_own_stages(tp, pp, v, tie):
    out = run_ranks(_build_model_worker, tp * pp, args=(tp, pp, v, tie), timeout=180)
    names = set()
    for r in out:
        got, want = r["names"]
        assert got == want == r["gathered"]
        assert r["equal_old"] and r["equal_single"]
        assert r["chunks"] == (v or 1)
        # Only this rank's stages were ever generated (the old path generated every weight),
        # each weight once, and the rank keeps just its (TP share of its) stages.
        assert r["generated"] == got
        assert r["generated_numel"] == r["stage_full_numel"] < r["full_numel"]
        assert r["numel"] == r["stage_numel"]
        names |= set(got)
    assert names == {n for n, _ in GPT(tiny_config(tie_embeddings=tie)).named_parameters()}
