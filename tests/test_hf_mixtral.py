"""Mixtral interop: a tiny random transformers MixtralForCausalLM (no download) and megatiny's GPT
give the same logits after from_mixtral and after to_mixtral."""

import pytest
import torch

from megatiny.hf.mixtral import from_mixtral, to_mixtral

transformers = pytest.importorskip("transformers")


def tiny_mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("top_k", [2, 3])
def test_from_mixtral_gives_the_same_logits(top_k):
    hf = tiny_mixtral(num_experts_per_tok=top_k)
    model = from_mixtral(hf).eval()
    assert model.config.moe_experts == 4 and model.config.moe_top_k == top_k
    assert model.config.moe_aux_loss_coeff == pytest.approx(hf.config.router_aux_loss_coef * top_k)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_to_mixtral_round_trip_gives_the_same_logits():
    from megatiny.config import ModelConfig
    from megatiny.model import GPT

    torch.manual_seed(0)
    config = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_hidden=48, max_seq_len=32, moe_experts=4, moe_top_k=2)  # fmt: skip
    model = GPT(config).eval()
    hf = to_mixtral(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    back = from_mixtral(hf)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_unsupported_mixtral_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok=1"):
        from_mixtral(tiny_mixtral(num_experts_per_tok=1))
    with pytest.raises(ValueError, match="sliding_window=8"):
        from_mixtral(tiny_mixtral(sliding_window=8))


def test_from_hf_and_to_hf_dispatch_mixtral():
    from megatiny.hf import from_hf, to_hf

    hf = tiny_mixtral()
    model = from_hf(hf).eval()
    assert model.config.moe_experts == 4
    back = to_hf(model)
    assert type(back).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
