"""parallelize(): the TP / SP shard of a GPT computes the single-device function — logits, loss,
every parameter gradient (gathered to full shape) and AdamW trajectories — on gloo ranks."""

import copy
from pathlib import Path

import pytest
import torch

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.parallel import ParallelContext
from megatiny.parallel.parallelize import full_parameters, parallelize
from megatiny.testing import run_ranks

V = 97  # not a multiple of tp: exercises the vocab padding


def tiny(family, **kw):
    if family == "gpt2":
        base = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=4,
                    tie_embeddings=True)  # fmt: skip
    else:  # GQA with 2 query heads per kv head, untied head
        base = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=8,
                    n_kv_heads=4, ffn_hidden=64)  # fmt: skip
    return getattr(ModelConfig, family)(**{**base, **kw})


def _batch(step, b=2, s=8):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (b, s), generator=g)
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[0, :2] = -100
    return ids, labels


def _equivalence(config, tp, sequence_parallel, steps):
    """Compare a parallelized copy with the single-device model on this rank. Returns the max
    deviations (asserted by the test) so failures show numbers."""
    ctx = ParallelContext.initialize(tp=tp)
    torch.manual_seed(0)
    ref = GPT(config)
    par = parallelize(copy.deepcopy(ref), ctx, sequence_parallel=sequence_parallel)
    for name, t in full_parameters(par).items():
        assert torch.equal(t, ref.state_dict()[name]), f"sharding lost {name}"
    ids, labels = _batch(0)
    out = {}
    with torch.no_grad():
        out["logits"] = (par(ids) - ref(ids)).abs().max().item()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_par = torch.optim.AdamW(par.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ids, labels = _batch(step)
        loss_ref, loss_par = ref(ids, labels=labels), par(ids, labels=labels)
        loss_ref.backward()
        loss_par.backward()
        losses.append((loss_ref.item(), loss_par.item()))
        if step == 0:
            full = full_parameters(par, grads=True)
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}
            assert full.keys() == ref_grads.keys()
            out["grad"] = max((full[n] - g).abs().max().item() for n, g in ref_grads.items())
            out["grad_scale"] = min(g.abs().max().item() for g in ref_grads.values())
        opt_ref.step()
        opt_par.step()
        opt_ref.zero_grad()
        opt_par.zero_grad()
    out["losses"] = losses
    ctx.destroy()
    return out


def _check(results):
    for r in results:
        assert r["logits"] < 1e-5, r
        assert r["grad"] < 1e-6, r
        assert r["grad_scale"] > 1e-5, r  # every parameter really gets a gradient
        for loss_ref, loss_par in r["losses"]:
            assert abs(loss_ref - loss_par) < 1e-5, r["losses"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tp2_sequence_parallel_matches_single_device(family):
    _check(run_ranks(_equivalence, 2, args=(tiny(family), 2, True, 1), timeout=120))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_matrix_and_adamw_steps(family, tp, sp):
    _check(run_ranks(_equivalence, tp, args=(tiny(family), tp, sp, 3), timeout=300))


@pytest.mark.slow
def test_untied_gpt2_and_tied_llama_with_bias():
    configs = [tiny("gpt2", tie_embeddings=False), tiny("llama", tie_embeddings=True, bias=True)]
    for config in configs:
        _check(run_ranks(_equivalence, 2, args=(config, 2, True, 2), timeout=120))


def _meta(config, sequence_parallel):
    ctx = ParallelContext.initialize(tp=2)
    torch.manual_seed(5)
    ref = GPT(config)
    torch.manual_seed(5)
    with torch.device("meta"):
        model = GPT(config)
    parallelize(model, ctx, sequence_parallel=sequence_parallel)
    assert not any(p.is_meta for p in model.parameters())
    local = sum(p.numel() for p in model.parameters())
    for name, t in full_parameters(model).items():
        assert torch.equal(t, ref.state_dict()[name]), name
    ids, _ = _batch(1)
    with torch.no_grad():
        diff = (model(ids) - ref(ids)).abs().max().item()
    return local, diff


def test_meta_device_materialises_only_the_shard():
    config = tiny("llama")
    for local, diff in run_ranks(_meta, 2, args=(config, True)):
        assert diff < 1e-5
        # Each rank holds half of every sharded weight; only the norms are replicated, and the
        # embedding / head hold 128 of the 256 padded vocabulary rows.
        h, replicated = config.d_model, (2 * config.n_layers + 1) * config.d_model
        sharded = config.num_parameters() - replicated - 2 * V * h
        assert local == sharded // 2 + replicated + 2 * 128 * h


def _hf_logits(hf_models, ids):
    from megatiny.hf import from_hf

    ctx = ParallelContext.initialize(tp=2)
    out = []
    for hf in hf_models:
        model = parallelize(from_hf(hf).eval(), ctx)
        with torch.no_grad():
            out.append(model(ids))
    return out


def test_hf_import_at_tp2_gives_hf_logits():
    from tests.test_hf import HF_CASES, build_hf

    ids = torch.randint(0, V, (2, 12))
    hf_models = [build_hf(*copy.deepcopy(HF_CASES[c])) for c in ("gpt2-tied", "llama-gqa")]
    with torch.no_grad():
        refs = [hf(ids).logits for hf in hf_models]
    for rank_logits in run_ranks(_hf_logits, 2, args=(hf_models, ids)):
        for logits, ref in zip(rank_logits, refs):
            assert ref.std() > 0.3
            torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)


def _bad_tp(config):
    ctx = ParallelContext.initialize(tp=2)
    try:
        parallelize(GPT(config), ctx)
    except ValueError as e:
        return str(e)
    return "no error"


def test_tp_not_dividing_heads_is_a_clear_error():
    gqa = tiny("llama", n_heads=4, n_kv_heads=1)
    msg = run_ranks(_bad_tp, 2, args=(gqa,))[0]
    assert msg == "n_kv_heads=1 is not divisible by tp=2; choose tp in [1] (or change n_kv_heads)"
    odd = tiny("gpt2", d_model=48, n_heads=3)
    msg = run_ranks(_bad_tp, 2, args=(odd,))[0]
    assert msg.startswith("n_heads=3 is not divisible by tp=2; choose tp in [1, 3]")


def test_tp_suggestions_divide_every_field():
    # 9 query heads / 3 kv heads (SmolLM2-135M's shape): tp=9 would fail on kv heads, so it is
    # not offered; only the values that divide n_heads, n_kv_heads and ffn_hidden are.
    config = tiny("llama", d_model=72, n_heads=9, n_kv_heads=3, ffn_hidden=192)
    assert config.tp_sizes() == [1, 3]
    with pytest.raises(
        ValueError, match=r"n_heads=9 is not divisible by tp=2; choose tp in \[1, 3\]"
    ):
        config.check_tp(2)
    with pytest.raises(
        ValueError, match=r"n_kv_heads=3 is not divisible by tp=9; choose tp in \[1, 3\]"
    ):
        config.check_tp(9)


def test_model_file_knows_no_parallelism():
    source = (Path(__file__).parents[1] / "megatiny" / "model.py").read_text()
    imports = [line for line in source.splitlines() if line.lstrip().startswith(("import", "from"))]
    assert not [line for line in imports if "parallel" in line], imports
    for word in ("tp_group", "sequence_parallel", "sharded_rng"):
        assert word not in source, word


def _forward_is_unchanged(config, sp):
    ctx = ParallelContext.initialize(tp=2)
    model = parallelize(GPT(config), ctx, sequence_parallel=sp)
    out = {
        "class": type(model) is GPT,
        "no_tp_attrs": not hasattr(model, "tp_group") and not hasattr(model, "sequence_parallel"),
        "swapped": sorted({type(m).__name__ for m in model.modules()}),
    }
    ctx.destroy()
    return out


def test_parallelize_swaps_modules_not_code():
    for rank in run_ranks(_forward_is_unchanged, 2, args=(tiny("gpt2", dropout=0.1), True)):
        assert rank["class"] and rank["no_tp_attrs"]
        for name in (
            "VocabParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear",
            "VocabParallelOutput", "SequenceParallelLayerNorm",
            "SequenceParallelPositionEmbedding", "ShardedRNG",
        ):  # fmt: skip
            assert name in rank["swapped"], name


def _dropout_grads(config, sequence_parallel):
    """With dropout, gradients per recompute mode (same seed before each forward), and whether
    the replicated norm gradients agree across TP ranks."""
    ctx = ParallelContext.initialize(tp=2)
    ids, labels = _batch(3)
    out = {}
    for recompute in ("none", "selective", "op", "full"):
        cfg = ModelConfig.from_dict({**config.to_dict(), "recompute": recompute})
        torch.manual_seed(0)
        model = parallelize(GPT(cfg), ctx, sequence_parallel=sequence_parallel)
        torch.manual_seed(1)
        model(ids, labels=labels).backward()
        out[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    ctx.destroy()
    return out


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_dropout_masks_are_consistent_and_recomputed_exactly(sp):
    config = tiny("gpt2", dropout=0.2)
    ranks = run_ranks(_dropout_grads, 2, args=(config, sp))
    for grads in ranks:
        for mode in ("selective", "op", "full"):
            for name, g in grads["none"].items():
                torch.testing.assert_close(grads[mode][name], g, msg=f"{mode} {name}")
    # Replicated parameters (norms, positions) get the same gradient on both ranks: the dropout on
    # replicated activations drew the same mask, and SP's per-shard gradients were summed.
    for name, g in ranks[0]["none"].items():
        if "norm" in name or "pos_embed" in name:
            torch.testing.assert_close(ranks[1]["none"][name], g, msg=name)


def _frozen_stays_frozen():
    ctx = ParallelContext.initialize(tp=2)
    model = GPT(tiny("llama"))
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    model.embed.weight.requires_grad_(False)
    parallelize(model, ctx)
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


def test_parallelize_keeps_frozen_parameters_frozen():
    # Fine-tuning freezes before sharding; the parallel layers' new parameters keep the flag.
    for frozen in run_ranks(_frozen_stays_frozen, 2):
        assert frozen == sorted(
            ["embed.weight"]
            + [f"blocks.0.{n}" for n, _ in GPT(tiny("llama")).blocks[0].named_parameters()]
        )
