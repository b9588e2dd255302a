"""Sampling: filters, KV cache == recompute, TP ranks agree with each other and one device, CLI."""

import pytest
import torch

from megatiny.cli import main as cli_main
from megatiny.config import ModelConfig
from megatiny.generate import filter_logits, generate, next_token
from megatiny.hf import save_model
from megatiny.model import GPT
from megatiny.testing import run_ranks

V = 97


def tiny(family="llama"):
    kw = dict(vocab_size=V, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, init_std=0.2)
    if family == "llama":
        kw.update(n_kv_heads=2, ffn_hidden=64)
    return getattr(ModelConfig, family)(**kw)


def build(family="llama"):
    torch.manual_seed(0)
    return GPT(tiny(family))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_and_uncached_greedy_agree_with_argmax_loop(family):
    model = build(family)
    prompt = torch.randint(0, V, (2, 5))
    cached = generate(model, prompt, max_new_tokens=12, temperature=0)
    uncached = generate(model, prompt, max_new_tokens=12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)
    assert len(set(ids[0, 5:].tolist())) > 1  # not a degenerate constant continuation


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = build()
    prompt = [3, 14, 15]
    a = generate(model, prompt, 10, temperature=1.0, seed=1)
    assert torch.equal(a, generate(model, prompt, 10, temperature=1.0, seed=1))
    assert not torch.equal(a, generate(model, prompt, 10, temperature=1.0, seed=2))
    greedy = generate(model, prompt, 10, temperature=0)
    assert torch.equal(generate(model, prompt, 10, temperature=1.3, top_k=1, seed=5), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_p=1e-6, seed=5), greedy)


def test_filters_keep_the_right_sets():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda z: torch.isfinite(z)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.4)) == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.7)) == [False, True, False, True]


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        draws = next_token(logits.expand(40000, 4), temperature, generator=g)
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.01, rtol=0)


def test_eos_stops_and_bad_arguments():
    model = build()
    prompt = [1, 2, 3]
    first = int(generate(model, prompt, 1, temperature=0)[0, -1])
    out = generate(model, prompt, 10, temperature=0, eos_id=first)
    assert out.tolist() == [[1, 2, 3, first]]
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        generate(model, prompt, 30)
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        generate(model, prompt, 3, top_p=0)


def _tp_generate(config, prompt):
    from megatiny.parallel import ParallelContext
    from megatiny.parallel.parallelize import parallelize

    ctx = ParallelContext.initialize(tp=2)
    torch.manual_seed(0)
    model = parallelize(GPT(config), ctx)
    greedy = generate(model, prompt, 10, temperature=0)
    sampled = generate(model, prompt, 10, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    return greedy, sampled


def test_tensor_parallel_ranks_generate_the_single_device_tokens():
    config = tiny("llama")
    torch.manual_seed(0)
    model = GPT(config)
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(model, prompt, 10, temperature=0)
    sampled = generate(model, prompt, 10, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    for rank_greedy, rank_sampled in run_ranks(_tp_generate, 2, args=(config, prompt)):
        assert torch.equal(rank_greedy, greedy)
        assert torch.equal(rank_sampled, sampled)


def test_cli_generates_from_a_saved_model(tmp_path, capsys):
    from megatiny.data.tokenizer import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog"] * 50
    tok = train_tokenizer(texts, vocab_size=300, output=str(tmp_path / "tok"), show_progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig.gpt2(vocab_size=tok.vocab_size, max_seq_len=64, d_model=32,
                                 n_layers=1, n_heads=4))  # fmt: skip
    save_model(model, str(tmp_path / "m"))
    prompt = "the quick"
    args = ["generate", "--checkpoint", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"),
            "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos"]  # fmt: skip
    assert cli_main(args) == 0
    text = capsys.readouterr().out.strip()
    expected = generate(model, tok.encode(prompt), 8, temperature=0)[0].tolist()
    assert text == tok.decode(expected).strip()
    assert text.startswith(prompt) and len(text) > len(prompt)
    ids_args = ["generate", "--checkpoint", str(tmp_path / "m"), "--prompt-ids", "5,6,7",
                "--max-new-tokens", "3", "--temperature", "0"]  # fmt: skip
    assert cli_main(ids_args) == 0
    expected = generate(model, [5, 6, 7], 3, temperature=0)[0].tolist()
    assert capsys.readouterr().out.strip() == ",".join(map(str, expected))


def test_generate_device_choice():
    import torch

    from megatiny.generate import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU here; use --device cpu"):
            resolve_device("cuda:0")
