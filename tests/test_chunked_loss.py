"""model.loss_chunk_tokens: the output projection + cross-entropy over chunks of tokens
(megatiny/chunked_loss.py) gives the unchunked loss and every gradient — one device (fp32, bf16
autocast, bf16 weights, fused kernels), tp2 +/- SP, through the training loop at pp2 / cp2 /
tp2+SP, and for the SFT loss — while its live-tensor peak is a fraction of the unchunked one,
and `megatiny plan` sees the smaller transient and activations."""

import json

import numpy as np
import pytest
import torch
import yaml

from megatiny.chunked_loss import chunked_cross_entropy
from megatiny.config import Config, ModelConfig
from megatiny.model import GPT, LMOutput
from megatiny.testing import run_ranks
from megatiny.testing.live_memory import LiveTensorPeak

V = 97  # not a multiple of tp * 128: at tp2 the vocabulary is padded (rank 1 holds padding only)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family="gpt2", **kw) -> ModelConfig:
    if family == "gpt2":  # tied head
        base = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
    else:  # untied head, GQA
        base = dict(vocab_size=V, max_seq_len=16, d_model=32, n_layers=2, n_heads=8,
                    n_kv_heads=4, ffn_hidden=64)  # fmt: skip
    return getattr(ModelConfig, family)(**{**base, **kw})


def batch(b=2, s=8, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[0, :3] = -100  # ignored (an SFT prompt)
    loss_mask = torch.ones(b, s)
    loss_mask[1, -2:] = 0.0
    return ids, labels, loss_mask


def loss_and_grads(config, dtype=None, autocast=False):
    torch.manual_seed(0)
    model = GPT(config)
    if dtype is not None:
        model = model.to(dtype)
    ids, labels, loss_mask = batch(vocab=config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=labels, loss_mask=loss_mask)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def assert_same(got, want, rel):
    """|got - want| <= rel * max|want|, tensor by tensor (named in the failure)."""
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= rel * w.abs().max().item(), f"{name}: max |diff| {err:.3g}"


def test_the_key_validates_and_overrides():
    with pytest.raises(ValueError, match="loss_chunk_tokens=-1 must be an integer >= 0"):
        ModelConfig(loss_chunk_tokens=-1)
    cfg = Config.from_dict({"model": tiny().to_dict()}, ["model.loss_chunk_tokens=64"])
    assert cfg.model.loss_chunk_tokens == 64 and LMOutput(cfg.model).chunk_tokens == 64
    assert ModelConfig().loss_chunk_tokens == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])  # 16 tokens: ragged, exact, one chunk
def test_one_device_equals_unchunked(family, chunk):
    want_loss, want = loss_and_grads(tiny(family))
    got_loss, got = loss_and_grads(tiny(family, loss_chunk_tokens=chunk))
    assert_same({"loss": got_loss}, {"loss": want_loss}, 1e-6)
    assert_same(got, want, 1e-6)


def test_fused_kernels_flag_gives_the_fused_loss():
    """With fused_kernels the unchunked loss is the Triton cross-entropy (interpreted on CPU);
    the chunked path (torch ops) gives the same numbers."""
    from megatiny.kernels import use_kernels

    assert use_kernels(True, torch.zeros(1)), "the Triton interpreter is off (tests/conftest.py)"
    want_loss, want = loss_and_grads(tiny("llama", fused_kernels=True))
    got_loss, got = loss_and_grads(tiny("llama", fused_kernels=True, loss_chunk_tokens=5))
    assert_same({"loss": got_loss, **got}, {"loss": want_loss, **want}, 1e-6)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bf16_equals_unchunked_within_bf16(mode):
    kw = dict(autocast=True) if mode == "autocast" else dict(dtype=torch.bfloat16)
    want_loss, want = loss_and_grads(tiny("llama"), **kw)
    got_loss, got = loss_and_grads(tiny("llama", loss_chunk_tokens=5), **kw)
    assert_same({"loss": got_loss}, {"loss": want_loss}, 1e-2)
    assert_same(got, want, 3e-2)


def test_labels_outside_the_vocabulary_are_refused():
    h, w = torch.randn(2, 3, 8), torch.randn(V, 8)
    labels = torch.tensor([[0, 1, V], [2, -100, 3]])
    with pytest.raises(ValueError, match=f"labels must be in \\[0, {V}\\)"):
        chunked_cross_entropy(h, w, labels, 2)


# ---- tensor parallelism ------------------------------------------------------------------------


def _tp_equivalence(family, sequence_parallel, vocab):
    from megatiny.parallel import ParallelContext
    from megatiny.parallel.parallelize import full_parameters, parallelize

    ctx = ParallelContext.initialize(tp=2)
    want_loss, want = loss_and_grads(tiny(family, vocab_size=vocab))
    torch.manual_seed(0)
    config = tiny(family, vocab_size=vocab, loss_chunk_tokens=5)
    par = parallelize(GPT(config), ctx, sequence_parallel)
    assert par.output.chunk_tokens == 5
    ids, labels, loss_mask = batch(vocab=vocab)
    loss = par(ids, labels=labels, loss_mask=loss_mask)
    loss.backward()
    got = full_parameters(par, grads=True)
    ctx.destroy()
    return loss.item(), want_loss.item(), {n: (got[n], want[n]) for n in want}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("vocab", [V, 300])  # 300 = 256 + 44: real columns on both ranks
def test_tp2_chunked_equals_one_device_unchunked(family, sp, vocab):
    for got_loss, want_loss, grads in run_ranks(_tp_equivalence, 2, args=(family, sp, vocab)):
        assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss)
        assert_same({n: g for n, (g, _) in grads.items()}, {n: w for n, (_, w) in grads.items()},
                    1e-6)  # fmt: skip


# ---- through the training loop -----------------------------------------------------------------

LOOP_LAYOUTS = [
    ["parallel.pp=2", "train.global_batch_size=4"],
    ["parallel.cp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LOOP_LAYOUTS, ids=lambda o: ",".join(o))
def test_training_losses_equal_unchunked(tmp_path, layout):
    from tests.test_train import make_corpus, run_training, tiny_config

    prefix = make_corpus(tmp_path)
    runs = {}
    for chunk in (0, 5):
        cfg = tiny_config(prefix, tmp_path / f"c{chunk}", *layout, "train.steps=3",
                          f"model.loss_chunk_tokens={chunk}")  # fmt: skip
        runs[chunk] = [out["losses"] for out in run_training(cfg, world_size=2)]
    assert len(runs[5][0]) == 3
    for got, want in zip(runs[5], runs[0]):
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- fine-tuning: the masked SFT loss ----------------------------------------------------------


@pytest.mark.slow
def test_sft_losses_equal_unchunked(tmp_path):
    from megatiny.data.tokenizer import train_tokenizer
    from megatiny.finetune.cli import finetune
    from megatiny.finetune.config import FinetuneConfig
    from megatiny.finetune.data import PROMPT_WITH_INPUT
    from megatiny.hf import save_model
    from tests.test_finetune import ALPACA

    rows = json.load(open(ALPACA))
    texts = [PROMPT_WITH_INPUT.format(**r) + r["output"] for r in rows] * 3
    tok = train_tokenizer(texts, vocab_size=300, output=str(tmp_path / "tok"), show_progress=False)
    config = ModelConfig.gpt2(vocab_size=tok.vocab_size, max_seq_len=160, d_model=32,
                              n_layers=2, n_heads=4)  # fmt: skip
    torch.manual_seed(0)
    save_model(GPT(config), str(tmp_path / "base"))
    losses = {}
    for chunk in (None, 7):
        cfg = FinetuneConfig(task="instruction", checkpoint=str(tmp_path / "base"),
                             tokenizer=str(tmp_path / "tok"), train=ALPACA,
                             output=str(tmp_path / f"sft{chunk}"), steps=3, batch_size=5,
                             lr=3e-3, progress_bar=False, loss_chunk_tokens=chunk)  # fmt: skip
        losses[chunk] = finetune(cfg)["losses"]
    saved = yaml.safe_load(open(tmp_path / "sft7" / "config.yaml"))
    assert saved["model"]["loss_chunk_tokens"] == 7
    assert len(losses[7]) == 3
    np.testing.assert_allclose(losses[7], losses[None], rtol=1e-6)


# ---- memory: the live-tensor peak and the plan ----------------------------------------------------


def _loss_peak(chunk, vocab=32768, d_model=32, tokens=1024):
    torch.manual_seed(0)
    h = torch.randn(1, tokens, d_model, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, d_model) * 0.02)
    labels = torch.randint(0, vocab, (1, tokens))
    output = LMOutput(ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=4,
                                  loss_chunk_tokens=chunk))  # fmt: skip
    with LiveTensorPeak() as mem:
        loss = output.loss(h, weight, labels).mean()
        loss.backward()
    return mem.peak, loss.item(), weight.grad


def test_live_tensor_peak_of_the_loss_is_under_an_eighth_at_32k_vocab():
    """Forward and backward of the loss at V = 32768, 1024 tokens: the unchunked loss holds the
    [1024, V] fp32 logits, their log-softmax and gradient (>= 3 x 128 MiB); chunks of 128 tokens
    hold one chunk's logits (16 MiB) plus dW (4 MiB)."""
    full_peak, full_loss, full_grad = _loss_peak(0)
    peak, loss, grad = _loss_peak(128)
    logits = 1024 * 32768 * 4
    assert full_peak >= 3 * logits  # the tracker sees the unchunked logits
    assert peak * 8 <= full_peak, (peak, full_peak)
    assert peak <= 128 * 32768 * 4 + 32768 * 32 * 4 + 2**20  # one chunk's logits + dW (+ small)
    assert abs(loss - full_loss) <= 1e-6 * full_loss
    assert (grad - full_grad).abs().max() <= 1e-6 * full_grad.abs().max()


def test_live_tensor_peak_counts_what_it_should():
    x = torch.randn(1000)  # before the region: not counted
    with LiveTensorPeak() as mem:
        a = x * 2  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        a.add_(1)  # in place: no new storage
        c = torch.ones(500)  # 2000 bytes
        del a, b
        d = c + 1  # 2000 bytes; the 4000 are freed by now
    assert mem.peak == 6000 and mem.live == 4000 and d.shape == c.shape


def _planned(chunk):
    from megatiny.plan.predict import plan
    from megatiny.plan.timemodel import load_profile

    raw = {
        "model": dict(vocab_size=32768, max_seq_len=256, d_model=64, n_layers=2, n_heads=4,
                      loss_chunk_tokens=chunk),
        "train": dict(micro_batch_size=2, steps=1, precision="fp32", progress_bar=False,
                      tensorboard=False),
        "data": dict(seq_length=256),
    }  # fmt: skip
    return plan(Config.from_dict(raw, []), 1, load_profile("h100-sxm"))


def test_plan_sees_one_chunks_logits():
    """The dry run runs the chunked code on meta tensors: its transient (the largest backward op)
    falls from the [512, V] fp32 logits' to one 64-token chunk's (with dW beside it), and the
    activations lose the saved softmax."""
    full, chunked = _planned(0), _planned(64)
    logits, chunk_logits, dw = 512 * 32768 * 4, 64 * 32768 * 4, 32768 * 64 * 4
    assert full["memory_transient_bytes"] >= 2 * logits
    assert chunked["memory_transient_bytes"] <= max(2 * chunk_logits, 2 * dw + chunk_logits)
    assert chunked["memory_transient_bytes"] * 8 <= full["memory_transient_bytes"]
    saved = full["memory_bytes"]["activations"] - chunked["memory_bytes"]["activations"]
    # the [512, V] fp32 log-softmax is no longer saved; the per-token logsumexp (fp32) is (and
    # F.cross_entropy's scalars are not)
    assert 0 <= saved - (logits - 512 * 4) <= 64
