"""Sharding metadata (megatiny/parallel/sharding.py): every parameter of a parallelized model says
how it is split, and that declaration alone rebuilds the single-device tensor, cuts the shard,
places checkpoint pieces and counts replicated gradients once — also for a layer megatiny does
not know."""

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.parallel import ParallelContext
from megatiny.parallel.experts import apply_expert_parallel
from megatiny.parallel.parallelize import parallelize
from megatiny.parallel.sharding import (
    Sharding,
    Split,
    checkpoint_pieces,
    full_from_shard,
    group_of,
    is_replicated,
    named_shardings,
    shard_from_full,
    sharded_parameter_ids,
)
from megatiny.testing import full_parameters, run_ranks
from megatiny.training.checkpoint import model_state
from megatiny.training.optim import global_grad_norm

ROOT = Path(__file__).parents[1] / "megatiny"
V = 97  # not a multiple of tp x 128: padded vocabulary


def _with_rank(sharding: Sharding, ranks: dict) -> Sharding:
    """`sharding` as declared on another rank ({group: rank}), without its process groups."""
    splits = tuple(
        dataclasses.replace(s, rank=ranks.get(s.group, s.rank), process_group=None)
        for s in sharding.splits
    )
    return dataclasses.replace(sharding, splits=splits)


def _assemble(full_shape, per_rank_pieces, dtype=torch.float32):
    """The full tensor from every rank's checkpoint pieces, and how often each element was hit."""
    out, hits = torch.zeros(full_shape, dtype=dtype), torch.zeros(full_shape, dtype=torch.int)
    for offsets, piece in per_rank_pieces:
        where = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))
        out[where] = piece
        hits[where] += 1
    return out, hits


# ---- the record itself, without processes ----------------------------------------------------

CASES = {
    "rows": Sharding.split(0, "tp", 2, 0),
    "columns": Sharding.split(1, "tp", 4, 0),
    "fused qkv (GQA)": Sharding.split(0, "tp", 2, 0, segments=(8, 4, 4)),
    "padded vocab": Sharding.split(0, "tp", 4, 0, padding=512 - 97),
    "padded + segments": Sharding.split(0, "tp", 2, 0, segments=(6, 10), padding=3),
    "experts ep x tp": Sharding((Split(0, "ep", 2, 0), Split(1, "tp", 2, 0, segments=(6, 6)))),
    "padding only (tp=1)": Sharding.split(0, "tp", 1, 0, padding=31),
}
FULL = {
    "rows": (8, 5),
    "columns": (3, 8),
    "fused qkv (GQA)": (16, 3),
    "padded vocab": (97, 2),
    "padded + segments": (13, 2),
    "experts ep x tp": (4, 12, 3),
    "padding only (tp=1)": (97, 2),
}


@pytest.mark.parametrize("case", CASES)
def test_every_rank_slices_its_shard_and_the_pieces_tile_the_full_tensor(case):
    sharding, full = CASES[case], torch.randn(FULL[case])
    groups = [(s.group, s.parts) for s in sharding.splits]
    pieces = []
    for coords in torch.cartesian_prod(*[torch.arange(p) for _, p in groups]).reshape(
        -1, len(groups)
    ):
        ranks = {g: int(c) for (g, _), c in zip(groups, coords)}
        local = shard_from_full(full, sharding, ranks)
        shape, mine = checkpoint_pieces(local, _with_rank(sharding, ranks))
        assert shape == tuple(full.shape)
        pieces += [(offsets, view) for view, offsets in mine]
    rebuilt, hits = _assemble(full.shape, pieces)
    assert torch.equal(rebuilt, full)
    assert (hits == 1).all(), "every element of the full tensor is stored exactly once"


def test_segments_are_split_one_by_one_and_padding_is_zero():
    full = torch.arange(13.0)[:, None]  # segments [0..5], [6..12] + 3 padding rows
    sharding = Sharding.split(0, "tp", 2, 1, segments=(6, 10), padding=3)
    assert shard_from_full(full, sharding).flatten().tolist() == [3, 4, 5, 11, 12, 0, 0, 0]
    # a shard of one rank (parts 1) drops the padding when gathered, without communication
    one = Sharding.split(0, "tp", 1, 0, padding=3)
    assert torch.equal(full_from_shard(shard_from_full(full, one), one), full)


def test_a_declaration_that_does_not_fit_the_tensor_is_refused():
    with pytest.raises(ValueError, match="segments divisible"):
        Split(0, "tp", 2, 0, segments=(3, 5))
    with pytest.raises(ValueError, match="does not fit"):
        shard_from_full(torch.zeros(10, 2), Sharding.split(0, "tp", 2, 0, segments=(4, 4)))
    with pytest.raises(ValueError, match="does not match the tensor"):
        checkpoint_pieces(torch.zeros(3, 2), Sharding.split(0, "tp", 2, 0, segments=(4, 4)))


# ---- megatiny's layers: GPT-2 and Llama at tp=2 with SP, MoE experts over ep (x tp) ------------


def _tiny(family, **kw):
    if family == "gpt2":  # biases, tied head, learned positions, LayerNorm
        base = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
    else:  # GQA (2 query heads per kv head), SwiGLU, untied (padded) head
        base = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=8,
                    n_kv_heads=4, ffn_hidden=64)  # fmt: skip
    return getattr(ModelConfig, family)(**{**base, **kw})


def _check_model(config, tp, ep, sequence_parallel, path):
    """On this rank: each parameter's declaration rebuilds the single-device parameter and cuts
    this rank's shard from it; saves a layout-free checkpoint at `path`; returns what the parent
    checks across ranks."""
    ctx = ParallelContext.initialize(tp=tp, ep=ep)
    torch.manual_seed(0)
    ref = GPT(config)
    par = copy.deepcopy(ref)
    if tp > 1:
        parallelize(par, ctx, sequence_parallel=sequence_parallel)
    else:
        apply_expert_parallel(par, ctx)
    full = ref.state_dict()
    out = {"split": {}, "pieces": {}, "members": {}, "replicated": [], "rank": ctx.rank}
    for name, (p, sharding) in named_shardings(par).items():
        assert torch.equal(full_from_shard(p.detach(), sharding), full[name]), name
        assert torch.equal(shard_from_full(full[name], sharding), p.detach()), name
        owner, _, leaf = name.rpartition(".")
        if is_replicated(par.get_submodule(owner), leaf):
            out["replicated"].append(name)
            continue
        out["split"][name] = _with_rank(sharding, {})  # without process groups: picklable
        shape, pieces = checkpoint_pieces(p.detach(), sharding)
        assert shape == tuple(full[name].shape), name
        out["pieces"][name] = [(offsets, view.clone()) for view, offsets in pieces]
        # the ranks a checkpoint saves the pieces over: together they hold each element once
        out["members"][name] = dist.get_process_group_ranks(group_of(ctx, sharding))
    # the harness's gatherer (parity uses it too) reads the same declarations
    shapes = {n: tuple(t.shape) for n, t in full.items()}
    groups = {"tp": ctx.tp_group, "ep": ctx.ep_group}
    for name, t in full_parameters(par, shapes, groups).items():
        assert torch.equal(t, full[name]), name
    dcp.save(model_state(par, ctx), checkpoint_id=path)
    out["tp ids"] = len(sharded_parameter_ids(par, "tp"))
    out["ep ids"] = len(sharded_parameter_ids(par, "ep"))
    ctx.destroy()
    return out, {n: t.clone() for n, t in full.items()}


def _check_pieces_tile(results, path, config):
    full = results[0][1]
    # the checkpoint holds the single-device tensors: it loads into the plain GPT
    with torch.device("meta"):
        plain = GPT(config)
    plain = plain.to_empty(device="cpu")
    dcp.load(model_state(plain), checkpoint_id=path, no_dist=True)
    for name, t in plain.state_dict().items():
        assert torch.equal(t, full[name]), name
    names = results[0][0]["pieces"]
    for name in names:
        members = results[0][0]["members"][name]
        pieces = [p for out, _ in results if out["rank"] in members for p in out["pieces"][name]]
        rebuilt, hits = _assemble(full[name].shape, pieces)
        assert torch.equal(rebuilt, full[name]), name
        assert (hits == 1).all(), f"{name}: checkpoint pieces overlap or leave holes"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_parameter_of_a_tp2_sp_gpt_is_declared_and_rebuilds_exactly(family, tmp_path):
    config, path = _tiny(family), str(tmp_path / "ckpt")
    results = run_ranks(_check_model, 2, config, 2, 1, True, path)
    out = results[0][0]
    split, replicated = out["split"], out["replicated"]
    assert split["embed.weight"].over("tp").padding == 256 - V  # padded to tp x 128
    q, kv = (32, 32) if family == "gpt2" else (32, 16)
    assert split["blocks.0.attn.qkv.weight"].over("tp").segments == (q, kv, kv)
    assert split["blocks.1.attn.proj.weight"].over("tp").dim == 1
    if family == "llama":  # SwiGLU [gate | up], untied head padded like the vocabulary
        assert split["blocks.0.mlp.fc.weight"].over("tp").segments == (64, 64)
        assert split["lm_head.weight"].over("tp").padding == 256 - V
        assert set(replicated) == {f"blocks.{i}.norm{j}.weight" for i in (0, 1) for j in (1, 2)} | {
            "norm_f.weight"
        }
    else:  # row-parallel biases, norms and positions replicated; column biases split
        assert "blocks.0.attn.proj.bias" in replicated and "pos_embed.weight" in replicated
        assert "blocks.0.mlp.fc.bias" in split and "lm_head.weight" not in split  # tied
    assert out["tp ids"] == len(split) and out["ep ids"] == 0
    _check_pieces_tile(results, path, config)


@pytest.mark.slow
@pytest.mark.parametrize("tp, ep", [(1, 2), (2, 2)])
def test_moe_expert_weights_are_declared_over_ep_and_tp(tp, ep, tmp_path):
    config = _tiny("llama", d_model=16, n_heads=4, n_kv_heads=2, ffn_hidden=24, moe_experts=4)
    path = str(tmp_path / "ckpt")
    results = run_ranks(_check_model, tp * ep, config, tp, ep, tp > 1, path)
    out = results[0][0]
    fc = out["split"]["blocks.0.mlp.experts.fc_weight"]
    assert fc.over("ep").dim == 0 and fc.is_split("ep")
    assert fc.over("tp").segments == (24, 24) and fc.is_split("tp") == (tp > 1)
    assert out["split"]["blocks.1.mlp.experts.proj_weight"].over("tp").dim == 2
    assert "blocks.0.mlp.router.weight" in out["replicated"]
    assert out["ep ids"] == 4  # fc and proj of 2 MoE layers
    _check_pieces_tile(results, path, config)


# ---- the seam: training/ and testing/ never ask for layer classes ------------------------------

LAYER_CLASSES = {
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ExpertShard",
    "ExpertParallelMoE",
}


def test_training_and_testing_do_not_import_layer_classes():
    offenders = []
    for folder in ("training", "testing"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = {a.name for a in node.names} & LAYER_CLASSES
                    offenders += [f"{path.name}: {n}" for n in sorted(names)]
    assert offenders == []
    for name in ("checkpoint.py", "optim.py"):
        text = (ROOT / "training" / name).read_text()
        assert "megatiny.parallel.layers" not in text and "megatiny.parallel.experts" not in text


# ---- a layer megatiny does not know, declaring its own sharding --------------------------------


class Lookup(nn.Module):
    """A researcher's layer: a table, a fused [a | b] projection and a scale."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(11, 4))  # rows; not a multiple of the ranks
        self.fused = nn.Parameter(torch.randn(4, 12))  # columns [a (4) | b (8)]
        self.scale = nn.Parameter(torch.randn(4))


class ShardedLookup(nn.Module):
    """Its parallel twin: table rows padded to 12 and split, fused columns split per segment,
    scale replicated (undeclared). Nothing in megatiny knows this class."""

    def __init__(self, full: Lookup, group):
        super().__init__()
        p, r = dist.get_world_size(group), dist.get_rank(group)
        self.parameter_sharding = {
            "table": Sharding.split(0, "tp", p, r, padding=12 - 11, process_group=group),
            "fused": Sharding.split(1, "tp", p, r, segments=(4, 8), process_group=group),
        }
        for name, t in full.named_parameters():
            shard = shard_from_full(t.detach(), self.parameter_sharding.get(name, Sharding()))
            setattr(self, name, nn.Parameter(shard.clone()))


def _custom_layer(path):
    ctx = ParallelContext.initialize(tp=2)
    torch.manual_seed(0)
    ref = Lookup()
    par = ShardedLookup(ref, ctx.tp_group)
    full = dict(ref.named_parameters())
    shapes = {n: tuple(t.shape) for n, t in full.items()}
    gathered = full_parameters(par, shapes, ctx.tp_group)
    # layout-free checkpoint of the shards, with the code megatiny trains with
    dcp.save(model_state(par, ctx), checkpoint_id=path)
    # grad-norm clipping counts the replicated scale once and skips the padding
    for name, p in par.named_parameters():
        p.grad = shard_from_full(
            full[name].detach() * 2, par.parameter_sharding.get(name, Sharding())
        )
    norm = global_grad_norm(par, ctx)
    # and loads back into a zeroed shard at the same layout
    fresh = ShardedLookup(Lookup(), ctx.tp_group)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    dcp.load(model_state(fresh, ctx), checkpoint_id=path)
    reloaded = {n: torch.equal(p, getattr(par, n)) for n, p in fresh.named_parameters()}
    ctx.destroy()
    return {n: t.clone() for n, t in gathered.items()}, norm.item(), reloaded


@pytest.mark.slow
def test_a_custom_layer_declaring_its_sharding_is_gathered_checkpointed_and_clipped(tmp_path):
    torch.manual_seed(0)
    ref = Lookup()
    path = str(tmp_path / "ckpt")
    results = run_ranks(_custom_layer, 2, path)
    for gathered, norm, reloaded in results:
        for name, t in ref.named_parameters():
            assert torch.equal(gathered[name], t.detach()), name
        want = torch.linalg.vector_norm(
            torch.cat([t.detach().flatten() * 2 for t in ref.parameters()])
        )
        assert norm == pytest.approx(want.item(), rel=1e-6)
        assert all(reloaded.values()), reloaded
    # the checkpoint holds full single-device tensors: it loads into the plain layer
    single = Lookup()
    state = {n: torch.zeros_like(t) for n, t in single.state_dict().items()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    for name, t in ref.named_parameters():
        assert torch.equal(state[name], t.detach()), name
