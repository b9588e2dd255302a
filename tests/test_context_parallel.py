"""Context parallelism (ring and all-to-all attention) equals one rank: the attention core, the
whole model (logits, loss, every gradient), traced communication = the analytical volume,
activation memory / cp, the training loop (losses, evaluation) and resume across cp.

The 3-step training-loss matrix with cp (cp2, cp2 x tp2 + SP, cp2 x pp2, cp2 x dp2 + ZeRO-1) is in
tests/test_3d.py."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatiny.config import ConfigError, ModelConfig
from megatiny.model import GPT, CoreAttention, attention_core
from megatiny.parallel import ParallelContext
from megatiny.parallel.context_parallel import (
    RingAttention,
    UlyssesAttention,
    apply_context_parallel,
    context_parallel_loss,
    gather_sequence,
    local_positions,
    split_batch,
)
from megatiny.parallel.parallelize import full_parameters, parallelize
from megatiny.parallel.tracer import CommTracer
from megatiny.testing import run_ranks

# ---- layout and configuration (no processes) ---------------------------------------------------


def test_zigzag_and_contiguous_layouts():
    assert local_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert local_positions(8, 1, 2, zigzag=False).tolist() == [4, 5, 6, 7]
    for p, zigzag in [(2, True), (4, True), (3, False), (4, False)]:
        every = torch.cat([local_positions(24, r, p, zigzag) for r in range(p)])
        assert sorted(every.tolist()) == list(range(24))  # a partition of the sequence
    with pytest.raises(ValueError, match="not divisible by 2\\*cp = 8"):
        local_positions(12, 0, 4)
    ids = torch.arange(16).view(2, 8)
    part = split_batch({"input_ids": ids, "labels": ids + 1, "loss_mask": None}, 1, 2)
    assert part["input_ids"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["labels"].tolist() == [[3, 4, 5, 6], [11, 12, 13, 14]]
    assert part["position_ids"].tolist() == [[2, 3, 4, 5]]
    sample = split_batch({"input_ids": torch.arange(8), "position_ids": torch.arange(8) % 3}, 0, 2,
                         dim=0)  # fmt: skip
    assert sample["input_ids"].tolist() == [0, 1, 6, 7]
    assert sample["position_ids"].tolist() == [0, 1, 0, 1]  # given positions are kept, split


def _config(*overrides):
    from tests.test_train import tiny_config

    return tiny_config("unused", "unused", *overrides)


def test_config_validates_cp_before_any_process_group():
    from megatiny.training.step import check_supported

    cfg = _config("parallel.cp=2", "data.seq_length=16")
    assert cfg.validate(2) == 1  # dp = 2 ranks / cp
    check_supported(cfg, 2)  # the loop runs cp now
    with pytest.raises(ConfigError, match=r"data.seq_length=12 is not divisible by 8 \(8 chunks"):
        _config("parallel.cp=4", "data.seq_length=12").validate(4)
    _config("parallel.cp=4", "parallel.cp_mode=a2a", "data.seq_length=12").validate(4)
    with pytest.raises(ConfigError, match="split over tp=2 by sequence_parallel"):
        _config("parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                "data.seq_length=12").validate(4)  # fmt: skip
    with pytest.raises(ConfigError, match="set model.dropout=0 or parallel.cp_mode=a2a"):
        cfg = _config("parallel.cp=2", "model.dropout=0.1").validate(2)
    with pytest.raises(ConfigError, match=r"query heads per tp rank \(model.n_heads/tp = 4\)"):
        _config("parallel.cp=3", "parallel.cp_mode=a2a", "data.seq_length=12").validate(3)
    with pytest.raises(ConfigError, match="choose ring or a2a"):
        _config("parallel.cp_mode=ulysses")


# ---- the attention core ------------------------------------------------------------------------


def _core(fused=False):
    return CoreAttention(SimpleNamespace(dropout=0.0, fused_kernels=fused))


def _attention_worker(cp, mode, n, g, seq, fused):
    ctx = ParallelContext.initialize(cp=cp)
    torch.manual_seed(0)
    b, d = 2, 8
    q, k, v = torch.randn(b, n, seq, d), torch.randn(b, g, seq, d), torch.randn(b, g, seq, d)
    dy = torch.randn(b, n, seq, d)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    attention_core(*ref).backward(dy)
    mine = local_positions(seq, ctx.cp_rank, cp, zigzag=mode == "ring")
    local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
    core = (RingAttention if mode == "ring" else UlyssesAttention)(_core(fused), ctx)
    y = core(*local)
    y.backward(dy[:, :, mine])
    y_full = attention_core(q, k, v)
    torch.testing.assert_close(y, y_full[:, :, mine], rtol=1e-5, atol=1e-5)
    for x, r in zip(local, ref, strict=True):  # dQ, dK, dV of my tokens
        torch.testing.assert_close(x.grad, r.grad[:, :, mine], rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.parametrize(
    "cp,mode,n,g",
    [(2, "ring", 4, 2), (2, "a2a", 4, 2)],
    ids=["ring-cp2-gqa", "a2a-cp2-gqa"],
)
def test_attention_matches_one_rank(cp, mode, n, g):
    assert all(run_ranks(_attention_worker, cp, args=(cp, mode, n, g, 16, False)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "cp,mode,n,g,seq",
    [
        (4, "ring", 4, 2, 16),  # GQA
        (4, "ring", 3, 1, 16),  # odd heads, multi-query
        (3, "ring", 5, 5, 18),  # odd cp, odd heads
        (4, "a2a", 8, 4, 16),  # GQA, kv heads divisible by cp
        (4, "a2a", 4, 2, 16),  # fewer kv heads than ranks: repeated
        (3, "a2a", 3, 3, 12),  # odd heads and cp
    ],
)
def test_attention_matches_one_rank_cp_3_and_4(cp, mode, n, g, seq):
    assert all(run_ranks(_attention_worker, cp, args=(cp, mode, n, g, seq, False)))


@pytest.mark.parametrize("mode", ["ring", "a2a"])
def test_attention_with_the_flash_kernel_matches_one_rank(mode):
    """The fused path (megatiny's flash-attention kernel, with its log-sum-exp for the ring
    merge) under the Triton interpreter; the reference is the plain SDPA core."""
    assert all(run_ranks(_attention_worker, 2, args=(2, mode, 4, 2, 16, True), timeout=240))


def _a2a_heads_worker():
    ctx = ParallelContext.initialize(cp=2)
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="query heads \\(3\\) over cp=2"):
        UlyssesAttention(_core(), ctx)(q, q, q)
    with pytest.raises(NotImplementedError, match="generation with cp > 1 is not supported"):
        RingAttention(_core(), ctx)(q, q, q, 5)  # a KV-cache decoding step
    return True


def test_a2a_needs_heads_divisible_by_cp_and_decoding_is_refused():
    assert all(run_ranks(_a2a_heads_worker, 2))


# ---- the whole model ---------------------------------------------------------------------------

B, S, V = 2, 16, 96


def model_config(family, recompute="none"):
    if family == "gpt2":
        return ModelConfig.gpt2(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=S,
                                recompute=recompute)  # fmt: skip
    return ModelConfig.llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             max_seq_len=S, ffn_hidden=64, recompute=recompute)  # fmt: skip


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()  # uneven token counts per rank
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "loss_mask": mask}


def _model_worker(family, tp, cp, mode, sp, recompute="none"):
    batch = _batch()
    torch.manual_seed(0)
    ref = GPT(model_config(family))
    ref_logits = ref(batch["input_ids"])
    ref_loss = ref(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"])
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    ctx = ParallelContext.initialize(tp=tp, cp=cp)
    torch.manual_seed(0)
    model = GPT(model_config(family, recompute))  # recomputation reruns the ring / all-to-all
    if tp > 1:
        parallelize(model, ctx, sequence_parallel=sp, cp_mode=mode)
    else:
        apply_context_parallel(model, ctx, mode)
    zigzag = mode == "ring"
    mine = split_batch(batch, ctx.cp_rank, cp, zigzag)
    logits = model(mine["input_ids"], position_ids=mine["position_ids"]).detach()
    loss = model(mine["input_ids"], labels=mine["labels"], loss_mask=mine["loss_mask"],
                 position_ids=mine["position_ids"])  # fmt: skip
    loss = context_parallel_loss(loss, mine["labels"], mine["loss_mask"], ctx.cp_group)
    loss.backward()
    torch.testing.assert_close(gather_sequence(logits, ctx.cp_group, zigzag), ref_logits,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)  # the full-sequence mean
    grads = full_parameters(model, grads=True)
    for name, g in grads.items():  # what DDP does over dp x cp: the average
        dist.all_reduce(g, group=ctx.cp_group)
        torch.testing.assert_close(g / cp, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert set(grads) == set(ref_grads)
    return True


@pytest.mark.parametrize(
    "family,tp,cp,mode,sp",
    [("llama", 1, 2, "ring", False), ("gpt2", 2, 2, "ring", True)],
    ids=["llama-cp2-ring", "gpt2-cp2xtp2-sp-ring"],
)
def test_model_logits_and_gradients_match_one_rank(family, tp, cp, mode, sp):
    assert all(run_ranks(_model_worker, tp * cp, args=(family, tp, cp, mode, sp)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,tp,cp,mode,sp",
    [
        ("gpt2", 1, 2, "a2a", False),
        ("llama", 1, 4, "ring", False),
        ("llama", 2, 2, "ring", True),
        ("llama", 2, 2, "a2a", True),
        ("gpt2", 2, 2, "a2a", False),
    ],
)
def test_model_logits_and_gradients_match_one_rank_more_layouts(family, tp, cp, mode, sp):
    assert all(run_ranks(_model_worker, tp * cp, args=(family, tp, cp, mode, sp)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "a2a"])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_model_with_activation_recomputation_matches_one_rank(mode, recompute):
    assert all(run_ranks(_model_worker, 2, args=("llama", 1, 2, mode, False, recompute)))


# ---- communication volume and activation memory -----------------------------------------------


def _traced_worker(cp, mode):
    ctx = ParallelContext.initialize(cp=cp)
    torch.manual_seed(0)
    model = apply_context_parallel(GPT(model_config("llama")), ctx, mode)
    mine = split_batch(_batch(), ctx.cp_rank, cp, zigzag=mode == "ring")
    with CommTracer(ctx.rank) as tracer:
        loss = model(mine["input_ids"], labels=mine["labels"], position_ids=mine["position_ids"])
        context_parallel_loss(loss, mine["labels"], None, ctx.cp_group).backward()
    return tracer.bytes_by("group", "op")


@pytest.mark.parametrize("cp,mode", [(4, "ring"), (2, "a2a")])
def test_cp_bytes_are_analytical(cp, mode):
    """Per layer and rank, with K/V = b * g * (S/p) * d * 4 bytes for k and v each and
    Q = O = b * n * (S/p) * d * 4:
      ring: (p-1) K/V blocks forward; (p-1) K/V blocks + (p-1) dK/dV blocks backward, all p2p;
      a2a:  all-to-all of q, of k|v and of the output forward, and of dO, dQ, dK|dV backward;
    plus the loss: one all-reduce of [sum, count] (8 bytes)."""
    cfg = model_config("llama")
    s_local, d = S // cp, cfg.head_dim
    kv = 2 * B * cfg.n_kv_heads * s_local * d * 4
    q = B * cfg.n_heads * s_local * d * 4
    L = cfg.n_layers
    if mode == "ring":
        expected = {("cp", "send"): L * 3 * (cp - 1) * kv, ("cp", "recv"): L * 3 * (cp - 1) * kv}
    else:
        expected = {("cp", "all_to_all"): L * 2 * (2 * q + kv)}
    expected[("cp", "all_reduce")] = 8
    for traced in run_ranks(_traced_worker, cp, args=(cp, mode)):
        assert traced == expected


def _saved_bytes(model, batch) -> int:
    """Bytes of the unique storages autograd saves in one forward (parameters excluded)."""
    from megatiny.training.memory import ActivationCounter

    with ActivationCounter(model.parameters()) as counter:
        model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))
    return counter.bytes


def _memory_worker(cp, mode):
    ctx = ParallelContext.initialize(cp=cp)
    torch.manual_seed(0)
    cfg = ModelConfig.llama(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_seq_len=256, ffn_hidden=128)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 256), generator=g)
    model = apply_context_parallel(GPT(cfg), ctx, mode)
    batch = split_batch({"input_ids": ids, "labels": ids}, ctx.cp_rank, cp, mode == "ring")
    return _saved_bytes(model, batch)


@pytest.mark.parametrize("mode", ["ring", "a2a"])
def test_activation_memory_per_rank_falls_as_one_over_cp(mode):
    (one,) = run_ranks(_memory_worker, 1, args=(1, mode))
    for cp in (2, 4):
        for saved in run_ranks(_memory_worker, cp, args=(cp, mode)):
            assert saved / one == pytest.approx(1 / cp, rel=0.05), (cp, saved, one)


# ---- the training loop ---------------------------------------------------------------------------


def _loop(tmp_path, name, world, *overrides):
    from tests.test_train import make_corpus, run_training, tiny_config

    prefix = make_corpus(tmp_path)
    cfg = tiny_config(prefix, tmp_path / name, "train.steps=3", "train.global_batch_size=4",
                      "train.eval_iters=2", *overrides)  # fmt: skip
    out = run_training(cfg, world_size=world, timeout=300)
    return out


@pytest.mark.parametrize("mode", ["ring", "a2a"])
def test_train_loop_at_cp2_gives_single_rank_losses(tmp_path, mode):
    """`megatiny train parallel.cp=2` on 2 ranks: the single-rank training and validation losses."""
    (ref,) = _loop(tmp_path, "ref", 1)
    for out in _loop(tmp_path, mode, 2, "parallel.cp=2", f"parallel.cp_mode={mode}"):
        assert out["losses"] == pytest.approx(ref["losses"], rel=2e-5)
        assert out["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=2e-5)


@pytest.mark.slow
def test_checkpoint_saved_at_cp2_resumes_at_cp1(tmp_path):
    """3 steps at cp=1 == 2 steps at cp=2 x tp=2 (ring, SP), saved, then step 3 resumed at cp=1."""
    (ref,) = _loop(tmp_path, "ref", 1, "train.lr_decay_steps=3")
    run = "cp2"
    first = _loop(
        tmp_path,
        run,
        4,
        "parallel.cp=2",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
        "train.steps=2",
        "train.lr_decay_steps=3",
    )
    assert first[0]["losses"] == pytest.approx(ref["losses"][:2], rel=2e-5)
    (resumed,) = _loop(tmp_path, run, 1, "train.resume=auto", "train.lr_decay_steps=3")
    assert resumed["losses"] == pytest.approx(ref["losses"][2:], rel=2e-5)
