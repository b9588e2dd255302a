"""The GPT modules that `parallelize` swaps in besides the linears and the token embedding; each
carries its own communication, so `GPT.forward` runs unchanged code.

    VocabParallelOutput          logits_r = h W_r^T for this rank's vocabulary rows W_r; the loss is
                                 the vocab-parallel cross-entropy (logits never gathered), full
                                 logits are all-gathered on request
    SequenceParallelLayerNorm    a norm applied to a sequence shard: its weights enter through
    SequenceParallelRMSNorm      copy_to_tp, so their gradient is summed over the TP group
    SequenceParallelPositionEmbedding   learned positions for the whole sequence, then this rank's
                                 sequence shard (scatter_to_sp; backward all-gathers)

The parameters keep their names and full single-device values; only the forward changes.
"""

from __future__ import annotations

from torch import nn

from megatiny.chunked_loss import chunked_cross_entropy
from megatiny.kernels import use_kernels
from megatiny.model import LayerNorm, RMSNorm
from megatiny.parallel import collectives
from megatiny.parallel.comm import copy_to_tp, gather_from_sp, gather_from_tp, scatter_to_sp
from megatiny.parallel.layers import vocab_parallel_cross_entropy
from megatiny.split_backward import linear


class VocabParallelOutput(nn.Module):
    """The output layer over a vocabulary split across the TP group (megatiny.model.LMOutput's
    parallel twin). `weight` is this rank's rows [V'/p, h] of the padded head (or tied embedding).

    The input h is replicated (copy_to_tp: backward all-reduces dh) or, with `sequence_parallel`,
    a sequence shard that is all-gathered (backward reduce-scatters dh). With `chunk_tokens` > 0
    the loss runs megatiny.chunked_loss on the full h, one chunk of tokens' logits at a time, its
    softmax statistics all-reduced per chunk (the same communication, in more calls)."""

    def __init__(self, group, vocab_size: int, sequence_parallel: bool = False, fused=False,
                 chunk_tokens: int = 0):  # fmt: skip
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        self.sequence_parallel, self.fused = sequence_parallel, fused
        self.chunk_tokens = chunk_tokens

    def full_input(self, h):
        """h as every rank's logits GEMM reads it: the whole sequence, dh summed over TP."""
        if self.sequence_parallel:
            return gather_from_sp(h, self.group, dim=1)
        return copy_to_tp(h, self.group)

    def local_logits(self, h, weight):
        return linear(self.full_input(h), weight)  # under split backward: dW in the W action

    def logits(self, h, weight):
        """The full logits [b, s, V] on every rank (all-gathered, padding dropped)."""
        return gather_from_tp(self.local_logits(h, weight), self.group)[..., : self.vocab_size]

    def loss(self, h, weight, labels):
        if self.chunk_tokens:
            return chunked_cross_entropy(
                self.full_input(h), weight, labels, self.chunk_tokens, group=self.group,
                all_reduce=collectives.all_reduce, vocab_size=self.vocab_size,
            )  # fmt: skip
        logits = self.local_logits(h, weight)
        fused = use_kernels(self.fused, logits)
        return vocab_parallel_cross_entropy(
            logits, labels, self.group, vocab_size=self.vocab_size, fused=fused
        )

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, sequence_parallel={self.sequence_parallel}, "
            f"chunk_tokens={self.chunk_tokens}"
        )


def _grad_summed(norm, group):
    bias = None if norm.bias is None else copy_to_tp(norm.bias, group)
    return copy_to_tp(norm.weight, group), bias


class SequenceParallelLayerNorm(LayerNorm):
    """LayerNorm on a sequence shard; weight and bias gradients summed over TP."""

    def __init__(self, norm: LayerNorm, group):
        super().__init__(norm.weight.shape[0], norm.eps, norm.bias is not None, norm.fused)
        self.weight, self.bias, self.group = norm.weight, norm.bias, group

    def forward(self, x):
        return self.normalize(x, *_grad_summed(self, self.group))


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence shard; weight gradient summed over TP."""

    def __init__(self, norm: RMSNorm, group):
        super().__init__(norm.weight.shape[0], norm.eps, norm.fused)
        self.weight, self.group = norm.weight, group

    def forward(self, x):
        return self.normalize(x, *_grad_summed(self, self.group))


def sequence_parallel_norm(norm: nn.Module, group) -> nn.Module:
    """The sequence-parallel twin of a megatiny norm, sharing its parameters."""
    if isinstance(norm, RMSNorm):
        return SequenceParallelRMSNorm(norm, group)
    if isinstance(norm, LayerNorm):
        return SequenceParallelLayerNorm(norm, group)
    raise TypeError(f"no sequence-parallel version of {type(norm).__name__}")


class SequenceParallelPositionEmbedding(nn.Embedding):
    """Learned positions P[pos] for the whole sequence, then this rank's sequence shard (the token
    embedding is reduce-scattered to the same shard). Backward all-gathers, so the table's
    gradient is complete on every rank."""

    def __init__(self, emb: nn.Embedding, group):
        super().__init__(emb.num_embeddings, emb.embedding_dim, device="meta")
        self.weight, self.group = emb.weight, group

    def forward(self, position_ids):
        return scatter_to_sp(super().forward(position_ids), self.group, dim=1)
