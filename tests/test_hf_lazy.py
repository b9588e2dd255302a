"""Lazy checkpoint loading (megatiny/hf/lazy.py): the weights of `from_hf` / `load_model`, and a
tp rank reads only its slices (never a whole tensor through get_tensor)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from megatiny.hf import from_hf, save_model
from megatiny.hf.lazy import lazy_from_hf_dir, lazy_model
from megatiny.parallel.build import host_bytes, materialize
from megatiny.parallel.sharding import checkpoint_pieces, shard_from_full, sharding_of
from megatiny.testing import run_ranks
from tests.test_hf import HF_CASES, build_hf


class SlicesOnly:
    """A safetensors file that serves slices and refuses whole tensors."""

    def __init__(self, path):
        self.f = safe_open(path, framework="pt")

    def get_slice(self, key):
        return self.f.get_slice(key)

    def get_tensor(self, key):
        raise AssertionError(f"read the whole tensor {key}")


def _save(case, tmp_path):
    hf = build_hf(*HF_CASES[case])
    hf.save_pretrained(tmp_path / case)
    return hf, str(tmp_path / case)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_lazy_hf_load_gives_from_hf_weights(case, tmp_path):
    hf, directory = _save(case, tmp_path)
    model = lazy_from_hf_dir(directory, opener=SlicesOnly)
    assert host_bytes(model) == 0  # nothing read before materialize
    materialize(model, "cpu")
    want = from_hf(hf).state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def _tp2_worker(directory):
    from megatiny.parallel.context import ParallelContext
    from megatiny.parallel.parallelize import parallelize

    ctx = ParallelContext.initialize(tp=2)
    model = lazy_from_hf_dir(directory, opener=SlicesOnly)
    full = {n: p.detach().clone() for n, p in materialize(lazy_from_hf_dir(directory), "cpu")
            .named_parameters()}  # fmt: skip
    parallelize(model, ctx)
    mismatched, real_bytes = [], 0
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        sharding = sharding_of(model.get_submodule(owner), leaf)
        if not torch.equal(p.detach(), shard_from_full(full[name], sharding)):
            mismatched.append(name)
        real_bytes += sum(v.numel() * 4 for v, _ in checkpoint_pieces(p.detach(), sharding)[1])
    ctx.destroy()
    return {
        "mismatched": mismatched,
        "bytes_read": model.weight_source.bytes_read,
        "real_bytes": real_bytes,
        "full_bytes": sum(t.numel() * 4 for t in full.values()),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama-gqa", "gpt2-untied"])
def test_tp2_load_reads_only_its_slices(case, tmp_path):
    _, directory = _save(case, tmp_path)
    ranks = run_ranks(_tp2_worker, 2, args=(directory,))
    for r in ranks:
        assert r["mismatched"] == []
        assert r["bytes_read"] == r["real_bytes"]  # its slices, each once (vocab padding: none)
    # Together the ranks read the model about once (norms twice), not twice.
    assert sum(r["bytes_read"] for r in ranks) < 1.1 * ranks[0]["full_bytes"]


def test_lazy_model_dir_round_trip(tmp_path):
    hf, _ = _save("llama-gqa", tmp_path)
    model = from_hf(hf)
    save_model(model, str(tmp_path / "mt"))
    lazy = materialize(lazy_model(str(tmp_path / "mt"), opener=SlicesOnly), "cpu")
    for (n, p), (_, q) in zip(lazy.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
