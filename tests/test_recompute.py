"""recompute="op" (megatiny/recompute.py) keeps what torchtitan's op-level selective checkpointing
keeps on its unfused Llama — q, v, gate, the down projection's output and the attention outputs —
and gives the gradients of no recompute and of full recompute."""

from __future__ import annotations

import pytest
import torch

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.recompute import OP_SAVE_HOOKS, unfused_segments
from megatiny.training.memory import ActivationCounter

B, S, D, N, G, HD, FFN = 2, 12, 32, 4, 2, 8, 40


def config(family: str, layers: int = 2, **kw) -> ModelConfig:
    base = dict(vocab_size=64, max_seq_len=16, d_model=D, n_layers=layers, n_heads=N)
    if family == "llama":
        base.update(n_kv_heads=G, ffn_hidden=FFN, tie_embeddings=False)
        return ModelConfig.llama(**{**base, **kw})
    return ModelConfig.gpt2(**{**base, "ffn_hidden": FFN, **kw})


def _loss_and_grads(cfg: ModelConfig, ids):
    torch.manual_seed(0)
    model = GPT(cfg)
    loss = model(ids, labels=ids.roll(-1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_op_recompute_gives_the_gradients_of_no_and_full_recompute(family):
    ids = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(1))
    results = {
        mode: _loss_and_grads(config(family, recompute=mode), ids)
        for mode in ("none", "op", "full")
    }
    loss, grads = results["op"]
    for ref in ("none", "full"):
        ref_loss, ref_grads = results[ref]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=f"{ref} {name}")


def _block_kept(cfg_layers, family="llama"):
    """Bytes the forward keeps for backward with 2 and 1 layers: one block's is the difference;
    and the shapes the op policy kept."""
    ids = torch.randint(0, 64, (B, S))
    out, shapes = [], []
    for layers in (2, 1):
        model = GPT(config(family, layers=layers, recompute="op"))
        with ActivationCounter(model.parameters()) as counter:
            OP_SAVE_HOOKS.append(lambda kept, layers=layers: layers == 1 and shapes.extend(
                tuple(t.shape) for t in (kept if isinstance(kept, list | tuple) else [kept])
                if isinstance(t, torch.Tensor)))  # fmt: skip
            try:
                model(ids, labels=ids)
            finally:
                OP_SAVE_HOOKS.pop()
        out.append(counter.bytes)
    return out[0] - out[1], shapes


def test_op_keeps_what_torchtitan_keeps_per_llama_block():
    """torchtitan's unfused matmuls per block: wq (kept), wk, wv (kept), wo, w1 = gate (kept),
    w3 = up, w2 = down (kept); plus the attention output and its log-sum-exp, and the block
    input the checkpoint holds. Not k, not up, not the attention output projection."""
    block, shapes = _block_kept(2)
    tokens = B * S
    assert (tokens, N * HD) in shapes and (tokens, G * HD) in shapes  # q, v
    assert (tokens, FFN) in shapes and (tokens, D) in shapes  # gate, down
    assert (tokens, (N + 2 * G) * HD) not in shapes and (tokens, 2 * FFN) not in shapes
    values = tokens * (D + N * HD + G * HD + N * HD + FFN + D)  # input, q, v, attn out, gate, down
    assert block == 4 * values + 4 * B * N * S  # fp32, + the log-sum-exp [b, n, s]


def test_gpt2_counts_its_fused_qkv_as_three_matmuls():
    """GPT-2 (GELU): qkv as [q | k | v] (q, v kept), proj, fc (the 5th unfused: kept), proj."""
    block, _ = _block_kept(2, "gpt2")
    tokens = B * S
    values = tokens * (D + N * HD + N * HD + N * HD + FFN)  # input, q, v, attn out, fc
    assert block == 4 * values + 4 * B * N * S


def test_unfused_segments_follow_the_local_heads():
    model = GPT(config("llama", layers=1))
    assert unfused_segments(model.blocks[0]) == [(N * HD, G * HD, G * HD), None, (2,), None]
    model.blocks[0].attn.n_heads, model.blocks[0].attn.n_kv_heads = N // 2, G // 2  # as at tp2
    assert unfused_segments(model.blocks[0])[0] == (N * HD // 2, G * HD // 2, G * HD // 2)
