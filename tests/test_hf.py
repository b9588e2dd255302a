"""transformers interop (GPT-2 / Llama, both ways), safetensors save/load, `megatiny convert`."""

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from megatiny.cli import main as cli_main
from megatiny.config import ModelConfig
from megatiny.hf import from_hf, load_model, save_model, to_hf
from megatiny.model import GPT

V = 101


def hf_gpt2(tied=True):
    cfg = GPT2Config(
        vocab_size=V, n_positions=24, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return cfg, GPT2LMHeadModel


def hf_llama(tied=False, bias=False):
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return cfg, LlamaForCausalLM


def build_hf(cfg, cls):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make them informative
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


HF_CASES = {
    "gpt2-tied": hf_gpt2(True),
    "gpt2-untied": hf_gpt2(False),
    "llama-gqa": hf_llama(),
    "llama-tied-bias": hf_llama(tied=True, bias=True),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_from_hf_matches_logits_and_loss(case):
    hf = build_hf(*HF_CASES[case])
    model = from_hf(hf).eval()
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
        assert ref.std() > 0.3  # logits are far from trivial
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
        # HF shifts labels inside; megatiny takes already-shifted labels (Megatron convention).
        shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        torch.testing.assert_close(model(ids, labels=shifted), hf(ids, labels=ids).loss)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig.gpt2(vocab_size=V, max_seq_len=24, d_model=32, n_layers=2, n_heads=4),
        ModelConfig.llama(
            vocab_size=V,
            max_seq_len=24,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=1,
            rope_theta=1e4,
            init_std=0.2,
        ),  # fmt: skip
    ],
    ids=["gpt2", "llama"],
)
def test_to_hf_matches_and_round_trips(config):
    torch.manual_seed(1)
    model = GPT(config).eval()
    hf = to_hf(model)
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-5)
    back = from_hf(hf)
    assert back.config == model.config
    for (name, p), q in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), name


def test_to_hf_rejects_config_without_hf_family():
    model = GPT(ModelConfig.gpt2(vocab_size=V, d_model=32, n_layers=1, n_heads=4, bias=False))
    with pytest.raises(ValueError, match="no transformers architecture"):
        to_hf(model)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(2)
    config = ModelConfig.llama(vocab_size=V, max_seq_len=16, d_model=32, n_layers=1, n_heads=4)
    model = GPT(config)
    save_model(model, str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["model.safetensors", "model_config.json"]
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.config == config
    ids = torch.randint(0, V, (1, 16))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_model(str(tmp_path))


def test_convert_cli_both_ways(tmp_path, capsys):
    hf = build_hf(*HF_CASES["gpt2-tied"])
    hf.save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", "--from-hf", "--input", str(tmp_path / "hf"),
                     "--output", str(tmp_path / "mt")]) == 0  # fmt: skip
    model = load_model(str(tmp_path / "mt"))
    assert cli_main(["convert", "--to-hf", "--input", str(tmp_path / "mt"),
                     "--output", str(tmp_path / "hf2")]) == 0  # fmt: skip
    hf2 = GPT2LMHeadModel.from_pretrained(tmp_path / "hf2").eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(model(ids), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(hf2(ids).logits, ref, atol=2e-5, rtol=1e-5)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp leftovers
    with pytest.raises(SystemExit, match="exists and is not empty"):
        cli_main(["convert", "--to-hf", "--input", str(tmp_path / "mt"),
                  "--output", str(tmp_path / "hf2")])  # fmt: skip
