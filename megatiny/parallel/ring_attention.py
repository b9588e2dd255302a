"""Ring attention over the context-parallel group, load-balanced for the causal mask (zig-zag).

Layout. The sequence of S tokens is cut into 2p chunks of c = S / (2p) tokens (p = cp size);
rank r holds chunks r and 2p-1-r, concatenated: its 2c local queries, keys and values. Under the
causal mask chunk j sees chunks 0..j, so every rank does the same work: for the keys/values of
rank s (chunks s and 2p-1-s), rank r computes

    s == r   its local causal attention (the ordinary lower triangle over its 2c tokens)
    s <  r   all 2c queries against chunk s (the first half of s's keys), no mask
    s >  r   the queries of chunk 2p-1-r (the second half) against all 2c keys, no mask

i.e. c x 2c query-key pairs per step besides the diagonal, the same on every rank.

Forward. K/V travel around the ring (send to r+1, receive from r-1), p-1 hops: the next block's
transfer is posted before the current block is computed, so it overlaps the compute. Each block
gives a partial output O_s and its log-sum-exp L_s = log sum_j exp(q k_j / sqrt(d)); partials
merge by the online-softmax rule

    L = log(exp(L_a) + exp(L_b)),   O = exp(L_a - L) O_a + exp(L_b - L) O_b

so the result is exactly softmax attention over every key the query sees. Saved for backward:
the local q, k, v, the output and L (O(S/p) per rank; K/V blocks of other ranks are not kept).

Backward. With the global L and D = rowsum(dO * O), each block's probabilities are
P = exp(q k^T / sqrt(d) - L), and its gradients are exact on their own:

    dV = P^T dO,  dS = P * (dO V^T - D),  dQ = dS K / sqrt(d),  dK = dS^T Q / sqrt(d)

K/V go around the ring again (p-1 hops) and each block's dK/dV is added into an accumulator that
travels one hop behind its K/V (p-1 hops, fp32): after the last hop the accumulator of rank r's
K/V arrives at rank r, which adds its own diagonal block. So per layer each rank sends
(p-1) K/V blocks in the forward, and (p-1) K/V blocks + (p-1) dK/dV blocks in the backward.

GQA: q [b, n, s, d] with k, v [b, g, s, d]; query head i reads kv head i // (n/g). The n/g
query heads of a group are stacked along the rows of one matmul against their kv head, so K/V
are never repeated in memory and dK/dV sum over the group by the matmul itself.

Kernels. The torch path (`block_attention`) materialises one block's scores in fp32. With
`fused` on CUDA (or under TRITON_INTERPRET=1) the forward blocks run megatiny's flash-attention
kernel (`flash_attention_with_lse`); its backward is reached through autograd on a recomputed
block, with d lse chosen so that the kernel's own softmax weights become the global ones
(dO_s = w dO, dL_s = w (dO . O_s - D), w = exp(L_s - L)): exact, at the cost of one extra block
forward per step (a kernel entry point taking the global O and L would remove it).
Dropout is not supported (attention dropout needs the same mask in the forward and the backward
of every block); `megatiny.config` refuses it with cp_mode=ring.
"""

from __future__ import annotations

import math

import torch

from megatiny.kernels import use_kernels
from megatiny.parallel import collectives

# ---- one block: attention with its log-sum-exp, forward and backward ---------------------------


def _grouped(q: torch.Tensor, g: int) -> torch.Tensor:
    """[b, n, s, d] -> [b, g, (n/g) s, d]: the query heads of each kv head stacked as rows."""
    b, n, s, d = q.shape
    return q.reshape(b, g, (n // g) * s, d)


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    """fp32 scores [b, g, (n/g) s, t] of grouped queries against k, causal: lower triangle."""
    b, n, s, _ = q.shape
    g, t = k.shape[1], k.shape[2]
    scores = (_grouped(q, g) @ k.transpose(-2, -1)).float() * scale
    if causal:
        above = torch.ones(s, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.view(b, g, n // g, s, t).masked_fill(above, float("-inf"))
        scores = scores.view(b, g, (n // g) * s, t)
    return scores


def block_attention(q, k, v, causal: bool, scale: float, fused: bool = False):
    """(O [b, n, s, d] in q's dtype, L [b, n, s] fp32) of softmax(q k^T scale (+ mask)) v."""
    if use_kernels(fused, q):
        from megatiny.kernels.flash_attention import flash_attention_with_lse

        out, lse = flash_attention_with_lse(q, k, v, causal=causal, scale=scale, causal_offset=0)
        return out, lse
    b, n, s, d = q.shape
    scores = _scores(q, k, causal, scale)
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - lse[..., None])
    out = probs.to(v.dtype) @ v
    return out.view(b, n, s, d), lse.view(b, n, s)


def block_attention_backward(q, k, v, out, lse, dout, delta, causal, scale, fused=False):
    """(dq, dk, dv) of one block given the *global* output `out`, log-sum-exp `lse` and
    delta = rowsum(dout * out) of the rows of q: P = exp(scores - lse) is the block's share of
    the whole softmax, so the block's gradients add up to the full attention's. fp32 results."""
    if use_kernels(fused, q):
        return _fused_block_backward(q, k, v, lse, dout, delta, causal, scale)
    b, n, s, d = q.shape
    g = k.shape[1]
    probs = torch.exp(_scores(q, k, causal, scale) - lse.reshape(b, g, -1, 1))
    dout_g = _grouped(dout, g).float()
    dv = probs.transpose(-2, -1) @ dout_g
    dprobs = dout_g @ v.float().transpose(-2, -1)
    dscores = probs * (dprobs - delta.reshape(b, g, -1, 1))
    dq = (dscores @ k.float()) * scale
    dk = (dscores.transpose(-2, -1) @ _grouped(q, g).float()) * scale
    return dq.view(b, n, s, d), dk, dv


def _fused_block_backward(q, k, v, lse, dout, delta, causal, scale):
    """The kernel's backward through autograd on a recomputed block; see the module docstring."""
    from megatiny.kernels.flash_attention import flash_attention_with_lse

    with torch.enable_grad():
        q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
        out_s, lse_s = flash_attention_with_lse(
            q_, k_, v_, causal=causal, scale=scale, causal_offset=0
        )
        w = torch.exp(lse_s.detach() - lse)
        dout_s = (dout.float() * w[..., None]).to(out_s.dtype)
        dlse_s = w * ((dout.float() * out_s.detach().float()).sum(-1) - delta)
        grads = torch.autograd.grad((out_s, lse_s), (q_, k_, v_), (dout_s, dlse_s))
    return tuple(x.float() for x in grads)


def merge(out, lse, block_out, block_lse):
    """The online-softmax merge of two partial results over disjoint keys (in place on out/lse,
    which are fp32): L = logaddexp(L_a, L_b), O = e^(L_a - L) O_a + e^(L_b - L) O_b."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse)[..., None])
    out.add_(block_out.float() * torch.exp(block_lse - new_lse)[..., None])
    lse.copy_(new_lse)


# ---- the ring ----------------------------------------------------------------------------------


class _Ring:
    """Send to the next cp rank and receive from the previous one, posted ahead (async)."""

    def __init__(self, group, ranks: list[int], rank: int):
        p = len(ranks)
        self.group, self.rank, self.size = group, rank, p
        self.next, self.prev = ranks[(rank + 1) % p], ranks[(rank - 1) % p]

    def post(self, t: torch.Tensor):
        received = torch.empty_like(t)
        works = collectives.batch_isend_irecv(
            [("send", t, self.next), ("recv", received, self.prev)], self.group
        )
        return received, works

    @staticmethod
    def wait(pending) -> torch.Tensor:
        received, works = pending
        for work in works:
            work.wait()
        return received


def _source(ring: _Ring, step: int) -> int:
    """The cp rank whose K/V this rank holds at ring step `step`."""
    return (ring.rank - step) % ring.size


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, scale: float, fused: bool):
        c = q.shape[2] // 2  # tokens per chunk; this rank holds chunks r and 2p-1-r
        kv = torch.stack([k, v]).contiguous()
        pending = ring.post(kv) if ring.size > 1 else None
        out, lse = block_attention(q, k, v, True, scale, fused)  # the diagonal block
        out = out.float()
        for step in range(1, ring.size):
            kv_s = ring.wait(pending)
            if step < ring.size - 1:
                pending = ring.post(kv_s)  # the next block travels while this one is computed
            if _source(ring, step) < ring.rank:  # every query sees chunk s, not chunk 2p-1-s
                o_s, l_s = block_attention(
                    q, kv_s[0, :, :, :c], kv_s[1, :, :, :c], False, scale, fused
                )
                merge(out, lse, o_s, l_s)
            else:  # only chunk 2p-1-r sees them, both chunks of s
                o_s, l_s = block_attention(q[:, :, c:], kv_s[0], kv_s[1], False, scale, fused)
                merge(out[:, :, c:], lse[:, :, c:], o_s, l_s)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale, ctx.fused = ring, scale, fused
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, fused = ctx.ring, ctx.scale, ctx.fused
        c = q.shape[2] // 2
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        kv = torch.stack([k, v]).contiguous()
        pending_kv = ring.post(kv) if ring.size > 1 else None
        dq, dk, dv = block_attention_backward(q, k, v, out, lse, dout, delta, True, scale, fused)
        pending_acc = None
        for step in range(1, ring.size):
            kv_s = ring.wait(pending_kv)
            if step < ring.size - 1:
                pending_kv = ring.post(kv_s)
            dkv_s = torch.zeros(kv_s.shape, dtype=torch.float32, device=kv_s.device)
            if _source(ring, step) < ring.rank:
                dq_s, dk_s, dv_s = block_attention_backward(
                    q, kv_s[0, :, :, :c], kv_s[1, :, :, :c], out, lse, dout, delta, False,
                    scale, fused,
                )  # fmt: skip
                dq += dq_s
                dkv_s[0, :, :, :c], dkv_s[1, :, :, :c] = dk_s, dv_s
            else:
                rows = slice(c, None)
                dq_s, dk_s, dv_s = block_attention_backward(
                    q[:, :, rows], kv_s[0], kv_s[1], out[:, :, rows], lse[:, :, rows],
                    dout[:, :, rows], delta[:, :, rows], False, scale, fused,
                )  # fmt: skip
                dq[:, :, rows] += dq_s
                dkv_s[0], dkv_s[1] = dk_s, dv_s
            if pending_acc is not None:  # the accumulator of this K/V, one hop behind it
                dkv_s += ring.wait(pending_acc)
            pending_acc = ring.post(dkv_s)
        if pending_acc is not None:  # my own K/V's gradient from every other rank
            dkv = ring.wait(pending_acc)
            dk, dv = dk + dkv[0], dv + dkv[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q, k, v, group, ranks: list[int], rank: int, fused: bool = False):
    """Causal attention of this rank's zig-zag chunks (q [b, n, 2c, d], k, v [b, g, 2c, d]) over
    the whole sequence held by the cp group (`ranks`: its global ranks, `rank`: my cp rank)."""
    if q.shape[2] % 2:
        raise ValueError(
            f"ring attention needs an even local sequence (two zig-zag chunks), got {q.shape[2]}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1])
    return _RingAttention.apply(q, k, v, _Ring(group, ranks, rank), scale, fused)
