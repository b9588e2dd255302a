"""Shard-only building (megatiny/parallel/build.py): at tp2, pp2 and dp2 a rank holds exactly its
shard's bytes, equal to the same-seed single-device model's slices, and never generates more
than one parameter's full tensor at a time."""

from __future__ import annotations

import pytest
import torch

from megatiny.config import Config, ModelConfig, ParallelConfig
from megatiny.model import GPT
from megatiny.parallel.build import full_shape, host_bytes, initial_slice, materialize
from megatiny.parallel.sharding import shard_from_full, sharding_of
from megatiny.testing import run_ranks


def llama(**kw) -> ModelConfig:
    base = dict(vocab_size=200, max_seq_len=16, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                ffn_hidden=48, tie_embeddings=False)  # fmt: skip
    base.update(kw)
    return ModelConfig.llama(**base)


def _build_worker(tp, pp, dtype):
    from megatiny.parallel.context import ParallelContext
    from megatiny.training.step import build_model

    cfg = Config(model=llama(dtype=dtype), parallel=ParallelConfig(tp=tp, pp=pp))
    ctx = ParallelContext.initialize(tp=tp, pp=pp)
    generated = []  # numel of every full tensor generated while building
    real_initial_value = GPT.initial_value

    def recording(self, name, shape, dtype=torch.float32):
        generated.append(torch.Size(shape).numel())
        return real_initial_value(self, name, shape, dtype)

    GPT.initial_value = recording
    try:
        model = build_model(cfg, ctx)
    finally:
        GPT.initial_value = real_initial_value
    torch.manual_seed(cfg.train.seed)
    single = dict(GPT(llama()).named_parameters())  # fp32, real device
    want_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    shard_bytes, mismatched = 0, []
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        sharding = sharding_of(model.get_submodule(owner), leaf)
        expect = shard_from_full(single[name].detach(), sharding).to(want_dtype)
        shard_bytes += expect.numel() * expect.element_size()
        if p.is_meta or p.dtype != want_dtype or not torch.equal(p.detach(), expect):
            mismatched.append(name)
    ctx.destroy()
    return {
        "host_bytes": host_bytes(model),
        "shard_bytes": shard_bytes,
        "full_bytes": sum(t.numel() for t in single.values())
        * torch.empty((), dtype=want_dtype).element_size(),
        "mismatched": mismatched,
        "largest_generated": max(generated),
        "largest_parameter": max(t.numel() for t in single.values()),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, pp, world, dtype",
    [(2, 1, 2, "fp32"), (1, 2, 2, "fp32"), (1, 1, 2, "fp32"), (2, 2, 4, "bf16")],
    ids=["tp2", "pp2", "dp2", "tp2xpp2-bf16"],
)
def test_a_rank_holds_exactly_its_shard_of_the_single_device_weights(tp, pp, world, dtype):
    ranks = run_ranks(_build_worker, world, args=(tp, pp, dtype))
    for r in ranks:
        assert r["mismatched"] == []
        # Every real tensor the model holds is its shard (no full copy left behind, no buffers).
        assert r["host_bytes"] == r["shard_bytes"]
        assert r["largest_generated"] <= r["largest_parameter"]  # one parameter's transient
    if tp * pp > 1:  # the ranks together hold about the model once (+ replicated norms, padding)
        assert all(r["host_bytes"] < 0.7 * r["full_bytes"] for r in ranks)
    else:
        assert all(r["host_bytes"] == r["full_bytes"] for r in ranks)


def test_initial_slice_is_the_flat_slice_of_the_initial_value():
    torch.manual_seed(3)
    model = GPT(llama(n_layers=1))
    name = "blocks.0.mlp.fc.weight"
    full = dict(model.named_parameters())[name].detach().reshape(-1)
    shape = (2 * 48, 32)
    for lo, hi in [(0, 7), (100, 1000), (3000, 3072), (5, 5)]:
        piece = initial_slice(model, name, shape, lo, hi)
        assert torch.equal(piece, full[lo:hi])
        assert piece.untyped_storage().nbytes() == (hi - lo) * 4  # owns only its slice
    with pytest.raises(ValueError, match="outside"):
        initial_slice(model, name, shape, 10, 4000)


def test_materialize_fills_a_meta_model_with_the_same_seed_weights():
    torch.manual_seed(5)
    with torch.device("meta"):
        meta = GPT(llama(n_layers=2))
    torch.manual_seed(5)
    real = GPT(llama(n_layers=2))
    assert host_bytes(meta) == 0
    materialize(meta, "cpu")
    for (n, p), (_, q) in zip(meta.named_parameters(), real.named_parameters()):
        assert torch.equal(p, q), n
        assert full_shape(p.shape, sharding_of(meta, "embed")) == tuple(p.shape)
    assert host_bytes(meta) == host_bytes(real)
