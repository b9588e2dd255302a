"""Every parallel layer at tp = 1, 2, 4 (and SP) against nn.Linear / nn.Embedding / F.cross_entropy.

Each rank builds the full reference module from the same seed, runs it locally, then runs its
shard; outputs, input grads and gathered parameter grads must match in fp32.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatiny.parallel import ParallelContext
from megatiny.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatiny.testing import run_ranks

B, S, H = 2, 8, 16


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def gather(t, group, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def leaf(t):
    return t.detach().clone().requires_grad_()


def _reference(module, x, dy):
    x = leaf(x)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


def check_column(g, tp, r):
    torch.manual_seed(1)
    for splits, gather_output in [
        (None, False),
        (None, True),
        ([16, 8, 8], False),
        ([16, 8, 8], True),
    ]:
        out = 24 if splits is None else 32
        lin = nn.Linear(H, out)
        x, dy = torch.randn(B, S, H), torch.randn(B, S, out)
        y_ref, dx_ref = _reference(lin, x, dy)
        col = ColumnParallelLinear.from_linear(lin, g, splits=splits, gather_output=gather_output)
        assert col.weight.shape == (out // tp, H)
        xp = leaf(x)
        y = col(xp)
        if gather_output:
            close(y, y_ref, f"column splits={splits} gathered output")
            y.backward(dy)
        else:
            # Local output = this rank's piece of every segment, i.e. col.shard on the out dim.
            expect = col.shard(y_ref.movedim(-1, 0)).movedim(0, -1)
            close(y, expect, f"column splits={splits} local output")
            y.backward(col.shard(dy.movedim(-1, 0)).movedim(0, -1))
        close(xp.grad, dx_ref, f"column splits={splits} input grad")
        close(col.unshard(gather(col.weight.grad, g, 0), dim=0), lin.weight.grad, "column dW")
        close(col.unshard(gather(col.bias.grad, g, 0), dim=0), lin.bias.grad, "column db")


def check_row(g, tp, r):
    torch.manual_seed(2)
    for input_is_parallel in (True, False):
        lin = nn.Linear(24, H)
        x, dy = torch.randn(B, S, 24), torch.randn(B, S, H)
        y_ref, dx_ref = _reference(lin, x, dy)
        row = RowParallelLinear.from_linear(lin, g, input_is_parallel=input_is_parallel)
        xp = leaf(x.chunk(tp, dim=-1)[r] if input_is_parallel else x)
        y = row(xp)
        close(y, y_ref, "row output")
        y.backward(dy)
        close(xp.grad, dx_ref.chunk(tp, -1)[r] if input_is_parallel else dx_ref, "row input grad")
        close(gather(row.weight.grad, g, 1), lin.weight.grad, "row dW")
        close(row.bias.grad, lin.bias.grad, "row db")


def check_mlp(g, tp, r):
    """Column -> GELU -> Row, with and without sequence parallelism."""
    torch.manual_seed(3)
    for sp in (False, True):
        fc1, fc2 = nn.Linear(H, 32), nn.Linear(32, H)
        x, dy = torch.randn(B, S, H), torch.randn(B, S, H)
        y_ref, dx_ref = _reference(nn.Sequential(fc1, nn.GELU(), fc2), x, dy)
        c = ColumnParallelLinear.from_linear(fc1, g, sequence_parallel=sp)
        rw = RowParallelLinear.from_linear(fc2, g, sequence_parallel=sp)
        xp = leaf(x.chunk(tp, dim=1)[r] if sp else x)
        y = rw(F.gelu(c(xp)))
        close(y, y_ref.chunk(tp, 1)[r] if sp else y_ref, f"mlp sp={sp} output")
        y.backward(dy.chunk(tp, 1)[r] if sp else dy)
        close(xp.grad, dx_ref.chunk(tp, 1)[r] if sp else dx_ref, f"mlp sp={sp} input grad")
        close(gather(c.weight.grad, g, 0), fc1.weight.grad, "mlp fc1 dW")
        close(gather(c.bias.grad, g, 0), fc1.bias.grad, "mlp fc1 db")
        close(gather(rw.weight.grad, g, 1), fc2.weight.grad, "mlp fc2 dW")
        close(rw.bias.grad, fc2.bias.grad, f"mlp sp={sp} fc2 db")


def check_embedding(g, tp, r):
    torch.manual_seed(4)
    vocab = 37  # not divisible by 2 or 4: padded
    for sp in (False, True):
        emb = nn.Embedding(vocab, H)
        ids = torch.randint(0, vocab, (B, S))
        ids[0, 0], ids[1, -1] = 0, vocab - 1
        dy = torch.randn(B, S, H)
        y_ref = emb(ids)
        y_ref.backward(dy)
        pe = VocabParallelEmbedding.from_embedding(emb, g, padding_divisor=4, sequence_parallel=sp)
        assert pe.padded_vocab_size % (4 * tp) == 0 and pe.padded_vocab_size >= vocab
        assert pe.padded_vocab_size - vocab < 4 * tp and pe.num_embeddings == vocab
        assert pe.vocab_end - pe.vocab_start == pe.padded_vocab_size // tp
        y = pe(ids)
        close(y, y_ref.detach().chunk(tp, 1)[r] if sp else y_ref.detach(), f"emb sp={sp} output")
        y.backward(dy.chunk(tp, 1)[r] if sp else dy)
        full = gather(pe.weight.grad, g, 0)
        close(full[:vocab], emb.weight.grad, f"emb sp={sp} dW")
        assert not full[vocab:].any(), "padded rows got a gradient"
        assert not gather(pe.weight.detach(), g, 0)[vocab:].any(), "padded rows are not zero"
    default = VocabParallelEmbedding(vocab, H, g)
    assert default.padded_vocab_size == 128 * tp


def check_cross_entropy(g, tp, r):
    torch.manual_seed(5)
    vocab, padded = 37, 48  # 48 divisible by 1, 2, 4
    for vocab_size, real in [(vocab, vocab), (None, padded)]:
        logits = torch.randn(B, S, padded) * 3
        logits[..., vocab:] += 0 if vocab_size is None else 50.0  # padding must not count
        target = torch.randint(0, real, (B, S))
        target[0, :3] = -100
        target[1, 0] = real - 1
        dloss = torch.rand(B, S) + 0.5
        ref_in = leaf(logits)
        ref = F.cross_entropy(
            ref_in[..., :real].reshape(-1, real), target.reshape(-1), reduction="none"
        ).view(B, S)
        ref.backward(dloss)
        shard = leaf(logits.chunk(tp, -1)[r])
        loss = vocab_parallel_cross_entropy(shard, target, g, vocab_size=vocab_size)
        close(loss, ref.detach(), f"ce vocab_size={vocab_size} loss")
        assert torch.equal(loss[0, :3], torch.zeros(3))
        loss.backward(dloss)
        close(shard.grad, ref_in.grad.chunk(tp, -1)[r], f"ce vocab_size={vocab_size} dlogits")
    # bf16 logits: computed in fp32, gradient returned in the logits dtype.
    lp = leaf(torch.randn(B, S, padded // tp, dtype=torch.bfloat16))
    loss = vocab_parallel_cross_entropy(lp, torch.randint(0, padded, (B, S)), g)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16


def check_meta(g, tp, r):
    """from_* on a meta-device module gives a meta shard of the right shape (no copy)."""
    col = ColumnParallelLinear.from_linear(nn.Linear(H, 32, device="meta"), g, splits=[16, 8, 8])
    row = RowParallelLinear.from_linear(nn.Linear(32, H, device="meta"), g)
    emb = VocabParallelEmbedding.from_embedding(nn.Embedding(37, H, device="meta"), g)
    assert (
        col.weight.is_meta and col.weight.shape == (32 // tp, H) and col.bias.shape == (32 // tp,)
    )
    assert col.local_splits == [16 // tp, 8 // tp, 8 // tp]
    assert row.weight.is_meta and row.weight.shape == (H, 32 // tp) and row.bias.shape == (H,)
    assert emb.weight.is_meta and emb.weight.shape == (128, H)


def _layers_at(tp, dp):
    ctx = ParallelContext.initialize(tp=tp, dp=dp)
    g, r = ctx.tp_group, ctx.tp_rank
    check_meta(g, tp, r)
    for check in (check_column, check_row, check_mlp, check_embedding, check_cross_entropy):
        check(g, tp, r)
    ctx.destroy()
    return True


@pytest.mark.parametrize(
    "tp,dp",
    [(1, 1), (2, 2), (4, 1)],
    ids=["tp1", "tp2xdp2", "tp4"],
)
def test_layers_match_single_device(tp, dp):
    assert run_ranks(_layers_at, tp * dp, args=(tp, dp)) == [True] * (tp * dp)


def _raises(fn, *patterns):
    import re

    try:
        fn()
    except ValueError as e:
        for p in patterns:
            assert re.search(p, str(e)), f"{p!r} not in {e}"
        return
    raise AssertionError(f"no ValueError (expected {patterns})")


def _bad_inputs():
    g = dist.group.WORLD
    _raises(
        lambda: ColumnParallelLinear(16, 6, g),
        r"out_features=6 is not divisible by tp=4",
        r"\[1, 2, 3, 6\]",
    )
    _raises(
        lambda: ColumnParallelLinear(16, 24, g, splits=[16, 6, 2]),
        r"splits\[1\]=6 is not divisible by tp=4",
    )
    _raises(lambda: ColumnParallelLinear(16, 24, g, splits=[16, 4]), "must sum to out_features=24")
    _raises(lambda: RowParallelLinear(10, 16, g), r"in_features=10 is not divisible by tp=4")
    _raises(
        lambda: RowParallelLinear(16, 16, g, input_is_parallel=False, sequence_parallel=True),
        "input_is_parallel=True",
    )
    row = RowParallelLinear(16, 8, g, sequence_parallel=True)
    _raises(lambda: row(torch.randn(2, 6, 4)), r"seq divisible by tp=4", r"\(2, 6, 8\)")
    emb = VocabParallelEmbedding(10, 8, g, padding_divisor=1)
    _raises(lambda: emb(torch.tensor([[1, 10]])), r"token ids must be in \[0, 10\)", "got 10")
    _raises(lambda: emb(torch.tensor([[-1, 2]])), r"got -1")
    emb_sp = VocabParallelEmbedding(10, 8, g, padding_divisor=1, sequence_parallel=True)
    _raises(lambda: emb_sp(torch.tensor([[1, 2, 3]])), r"seq divisible by tp=4")
    logits = torch.randn(2, 3, 4)
    _raises(
        lambda: vocab_parallel_cross_entropy(
            logits, torch.tensor([[0, 1, 10]] * 2), g, vocab_size=10
        ),
        r"targets must be in \[0, 10\)",
    )
    _raises(lambda: vocab_parallel_cross_entropy(logits, torch.zeros(2, 4).long(), g), "must agree")
    _raises(
        lambda: vocab_parallel_cross_entropy(logits, torch.zeros(2, 3).long(), g, vocab_size=17),
        r"vocab_size=17",
    )
    return True


def test_bad_inputs_name_the_fix():
    assert run_ranks(_bad_inputs, 4) == [True] * 4


def _saved_activation_bytes(fn, params):
    """(bytes of the tensors autograd saves while running fn(), parameters excluded, each storage
    counted once; fn's output)."""
    from megatiny.training.memory import ActivationCounter

    with ActivationCounter(params) as counter:
        out = fn()
    return counter.bytes, out


def _sp_column_memory():
    ctx = ParallelContext.initialize(tp=2)
    g, r = ctx.tp_group, ctx.tp_rank
    torch.manual_seed(0)
    full = nn.Linear(16, 32)
    x = torch.randn(2, 8, 16, requires_grad=True)
    ref_bytes, ref_out = _saved_activation_bytes(lambda: full(x), full.parameters())
    col = ColumnParallelLinear.from_linear(full, g, sequence_parallel=True)
    shard = x.detach()[:, r * 4 : (r + 1) * 4].clone().requires_grad_()
    sp_bytes, out = _saved_activation_bytes(lambda: col(shard), col.parameters())
    out.backward(torch.ones_like(out))
    ref_out.backward(torch.ones_like(ref_out))
    close(shard.grad, x.grad[:, r * 4 : (r + 1) * 4] * 1.0, "dX shard")  # dX summed over ranks
    close(col.weight.grad, full.weight.grad.chunk(2)[r], "dA")
    ctx.destroy()
    return ref_bytes, sp_bytes


def test_sequence_parallel_column_saves_only_the_shard():
    # tp=1 saves X [b, s, h] for dA; at tp=2 with SP each rank saves its X_i [b, s/2, h] and
    # gathers X again in backward (Megatron's approach), not the gathered X.
    for ref_bytes, sp_bytes in run_ranks(_sp_column_memory, 2):
        assert ref_bytes == 2 * 8 * 16 * 4
        assert sp_bytes == ref_bytes // 2


def _sp_column_under_autocast():
    from megatiny.parallel.tracer import CommTracer

    ctx = ParallelContext.initialize(tp=2)
    g, r = ctx.tp_group, ctx.tp_rank
    torch.manual_seed(0)
    full = nn.Linear(16, 32)
    x = torch.randn(2, 8, 16)
    col = ColumnParallelLinear.from_linear(full, g, sequence_parallel=True)
    shard = x[:, r * 4 : (r + 1) * 4].clone().requires_grad_()
    with CommTracer(rank=r) as tracer:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved, out = _saved_activation_bytes(lambda: col(shard), col.parameters())
        out.float().sum().backward()
    # The reference: gather in fp32, then the GEMM casts (what autocast does to F.linear).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, full.weight.chunk(2)[r], full.bias.chunk(2)[r])
    ctx.destroy()
    close_ = torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    return tracer.bytes_by("op"), saved, out.dtype, close_, shard.grad.dtype


def test_sequence_parallel_column_gathers_in_the_autocast_dtype():
    # Under autocast the shard is cast to bf16 before the all-gather (forward, and the re-gather
    # in backward), so the gathers move half the bytes and the saved shard is bf16; the output is
    # what gathering fp32 and casting for the GEMM gives. dX returns in fp32.
    for by_op, saved, dtype, equal, grad_dtype in run_ranks(_sp_column_under_autocast, 2):
        assert by_op[("all_gather",)] == 2 * (2 * 8 * 16 * 2)  # two gathers of X [2, 8, 16] bf16
        assert by_op[("reduce_scatter",)] == 2 * 8 * 16 * 4  # dX reduced in fp32
        assert saved == 2 * 4 * 16 * 2
        assert dtype == torch.bfloat16 and equal and grad_dtype == torch.float32
