"""Single-device GPT and ModelConfig: shapes, loss semantics, causality, errors, recompute."""

import pytest
import torch
import torch.nn.functional as F

from megatiny.config import ModelConfig
from megatiny.model import GPT, KVCache

V = 97


def tiny(family="gpt2", **kw):
    base = dict(vocab_size=V, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)
    if family == "llama":
        base["n_kv_heads"] = 2
    return getattr(ModelConfig, family)(**{**base, **kw})


def build(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


CONFIGS = {
    "gpt2": tiny("gpt2"),
    "gpt2-untied-nobias": tiny("gpt2", tie_embeddings=False, bias=False),
    "llama-gqa": tiny("llama"),
    "llama-tied-bias": tiny("llama", tie_embeddings=True, bias=True, n_kv_heads=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_model(name):
    cfg = CONFIGS[name]
    model = build(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (
        model.pos_embed.weight.numel() if model.pos_embed is not None else 0
    )
    assert cfg.num_parameters(exclude_embeddings=True) == cfg.num_parameters() - emb


def test_presets_match_published_sizes():
    assert ModelConfig.gpt2().num_parameters() == 124_439_808  # GPT-2 small
    assert ModelConfig.llama().num_parameters() == 6_738_415_616  # Llama-2 7B


def test_flops_per_token_megatron_formula():
    cfg = ModelConfig.gpt2()
    L, h, s, V_ = cfg.n_layers, cfg.d_model, 1024, cfg.vocab_size
    paper = 72 * L * h * h * (1 + s / (6 * h) + V_ / (12 * L * h))
    assert cfg.flops_per_token(s) == pytest.approx(paper, rel=1e-12)
    # Llama with GQA: count the matmuls by hand, x3 for forward + backward.
    c = tiny("llama", ffn_hidden=88)
    h, q, kv, f, L = c.d_model, c.q_dim, c.kv_dim, c.ffn_hidden, c.n_layers
    fwd = (
        L * (2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * s * q + 2 * 3 * h * f)
        + 2 * h * c.vocab_size
    )
    assert c.flops_per_token(s) == pytest.approx(3 * fwd, rel=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_causality(name):
    cfg = CONFIGS[name]
    model = build(cfg)
    ids = torch.randint(0, V, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, V)
    labels = torch.randint(0, V, (2, 12))
    labels[0, :3] = -100
    loss = model(ids, labels=labels)
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    mask = torch.zeros(2, 12)
    mask[1] = 1.0
    masked = model(ids, labels=labels, loss_mask=mask)
    torch.testing.assert_close(masked, F.cross_entropy(logits[1], labels[1]))
    # Changing a later token must not change earlier logits.
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % V
    torch.testing.assert_close(model(ids2)[:, :8], logits[:, :8])
    assert not torch.allclose(model(ids2)[:, 8:], logits[:, 8:])


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_kv_cache_matches_full_forward(name):
    model = build(CONFIGS[name]).eval()
    ids = torch.randint(0, V, (2, 14))
    full = model(ids)
    cache = KVCache(model.config.n_layers)
    parts = [model(ids[:, :5], kv_cache=cache)]
    parts += [model(ids[:, i : i + 1], kv_cache=cache) for i in range(5, 9)]
    parts.append(model(ids[:, 9:], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_same_seed_same_weights_and_meta_initial_values():
    cfg = CONFIGS["llama-gqa"]
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.embed.weight, build(cfg, seed=4).embed.weight)
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = GPT(cfg)
    assert meta.embed.weight.is_meta and meta.init_seed == a.init_seed
    for n, p in a.named_parameters():
        assert torch.equal(meta.initial_value(n, p.shape), p), n
    # Residual output projections use the scaled std / sqrt(2L).
    std = a.blocks[0].mlp.proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * cfg.n_layers) ** 0.5, rel=0.1)


@pytest.mark.parametrize("mode", ["selective", "op", "full"])
def test_recompute_gives_same_loss_and_grads(mode):
    ids = torch.randint(0, V, (2, 12))
    grads = []
    for recompute in ("none", mode):
        model = build(tiny("llama", recompute=recompute))
        loss = model(ids, labels=ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1)


def test_bad_inputs_have_clear_errors():
    model = build(CONFIGS["gpt2"])
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="longer than max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"not divisible by n_heads=5; choose n_heads in"):
        tiny(n_heads=5)
    with pytest.raises(ValueError, match=r"choose n_kv_heads in \[1, 2, 4\]"):
        tiny("llama", n_kv_heads=3)
    with pytest.raises(ValueError, match="norm='batchnorm' is not supported"):
        tiny(norm="batchnorm")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_model": 32, "heads": 4})


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.5))
    ids = torch.randint(0, V, (1, 8))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


_FUSED_CACHED = """
import torch
from megatiny.config import ModelConfig
from megatiny.model import GPT, KVCache
cfg = ModelConfig.llama(vocab_size=61, max_seq_len=16, d_model=32, n_layers=1, n_heads=4,
                        n_kv_heads=2, ffn_hidden=32, init_std=0.2)
torch.manual_seed(0)
plain = GPT(cfg)
fused = GPT(ModelConfig.from_dict({**cfg.to_dict(), "fused_kernels": True}))
fused.load_state_dict(plain.state_dict())
ids = torch.randint(0, 61, (1, 6))
cache = KVCache(1)
out = torch.cat([fused(ids[:, :4], kv_cache=cache), fused(ids[:, 4:], kv_cache=cache)], 1)
torch.testing.assert_close(out, plain(ids), atol=1e-5, rtol=1e-5)
"""


@pytest.mark.slow
def test_fused_softmax_with_kv_cache_under_interpreter():
    """The fused (bottom-right causal) softmax also serves cached decoding. A subprocess, since
    TRITON_INTERPRET must be set before triton is imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _FUSED_CACHED], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
