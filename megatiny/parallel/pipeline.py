"""Pipeline parallelism, part 1: split a GPT into stages, and the point-to-point messages.

    model = parallelize(GPT(cfg), ctx)                       # TP/SP first (optional)
    chunks = build_pipeline_chunks(model, ctx, virtual_pipeline_size=2)
    schedule = build_schedule(ctx, chunks, micro_batch_size=2, seq_length=64)
    loss = schedule(micro_batches, ddp)                      # megatiny.parallel.schedules

Split. The n_layers decoder blocks are cut into S = pp * v consecutive pieces ("virtual
stages"), evenly (n_layers % S == 0) or by an explicit list of S layer counts. Virtual stage s
lives on pipeline rank s % pp as its model chunk s // pp, so with v > 1 every rank holds v
non-adjacent pieces (interleaved 1F1B). The first virtual stage also owns the embeddings, the
last one the final norm, the head and the loss. `keep_stages` prunes a meta-device GPT to this
rank's stages before `parallelize` / `materialize`, so a rank allocates only its own weights.

A chunk is the single-device GPT object with the modules it does not own set to None and its
`blocks` holding only its layers *under their global index* ("blocks.5.attn.qkv.weight" on any
layout), so state-dict keys are layout-free. Chunks share modules with the model they are cut from
(no copy). Each chunk runs `forward_step(chunk, input_tensor, micro_batch)`.

Tied embeddings (`tie_embeddings=True`, pp > 1): the first stage holds the token embedding for
the input, the last stage holds a copy for the output projection. They start equal (same init)
and stay equal because their gradients are summed over `ctx.embedding_group` (the 2-rank group of
the first and last stage of each pipeline) before the optimizer step: d L / d E = dL/dE_in +
dL/dE_out, exactly the single-device gradient of the shared weight. See `sync_tied_grads`.

P2P. Stages exchange [micro_batch, seq / cp / (tp if SP), d_model] tensors whose shape is known in
advance, batched over the pipeline group (`collectives.batch_isend_irecv`, as Megatron does).
NCCL ignores tags and matches messages between two ranks in the order they are posted, so
`P2P.communicate` always posts in one fixed order — activation send, activation receive,
gradient send, gradient receive — on every rank; with pp=2 (where "next" and "prev" are the same
rank) both sides then match activation with activation and gradient with gradient.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from megatiny.parallel import collectives
from megatiny.parallel.context_parallel import context_parallel_loss, cp_group_of
from megatiny.parallel.sharding import declare_tied, named_shardings, tied_parameter_ids


def validate_pipeline(
    n_layers: int,
    pp: int,
    virtual_pipeline_size: int | None = None,
    layer_split: list[int] | None = None,
    num_microbatches: int | None = None,
) -> list[int]:
    """Check the pipeline layout (pure: no communication); return layers per virtual stage.

    Raises ValueError saying what to change.
    """
    v = virtual_pipeline_size or 1
    if pp < 1 or v < 1:
        raise ValueError(f"pp={pp} and virtual_pipeline_size={v} must be >= 1")
    stages = pp * v
    if v > 1 and pp == 1:
        raise ValueError(
            f"virtual_pipeline_size={v} needs pp > 1 (interleaving splits each pipeline rank's "
            "layers into chunks); set parallel.pp >= 2 or parallel.virtual_pipeline_size=null"
        )
    if layer_split is None:
        if n_layers % stages:
            ok = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
            raise ValueError(
                f"n_layers={n_layers} is not divisible by pp*virtual_pipeline_size = {pp}*{v} = "
                f"{stages}; choose pp*v in {ok} or pass an explicit layer split of {stages} "
                f"counts summing to {n_layers}"
            )
        split = [n_layers // stages] * stages
    else:
        split = [int(n) for n in layer_split]
        if len(split) != stages or sum(split) != n_layers or min(split) < 0:
            raise ValueError(
                f"layer split {split} must have pp*virtual_pipeline_size = {stages} non-negative "
                f"entries summing to n_layers={n_layers}"
            )
    if num_microbatches is not None:
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
        if v > 1 and num_microbatches % pp:
            raise ValueError(
                f"the interleaved schedule needs num_microbatches to be a multiple of pp={pp} "
                f"(Megatron's rule), got {num_microbatches}; set global_batch_size / "
                f"(micro_batch_size * dp) to a multiple of {pp} or virtual_pipeline_size=null"
            )
    return split


def _shallow_copy(model: nn.Module) -> nn.Module:
    chunk = copy.copy(model)
    chunk._modules = dict(model._modules)
    chunk._parameters = dict(model._parameters)
    chunk._buffers = dict(model._buffers)
    return chunk


def rank_stages(pp: int, pp_rank: int, v: int, placement: str = "interleaved") -> list[int]:
    """The virtual stages of a pipeline rank, ascending: s = c * pp + rank (interleaved), or
    rank and 2 pp - 1 - rank (placement "v", ZB-V's two chunks)."""
    if placement == "v":
        if v != 2:
            raise ValueError(
                f"the V placement (zb-v) holds 2 chunks per rank, got virtual_pipeline_size={v}; "
                "set parallel.virtual_pipeline_size=2 or null"
            )
        return [pp_rank, 2 * pp - 1 - pp_rank]
    if placement != "interleaved":
        raise ValueError(f"unknown stage placement {placement!r}; choose interleaved or v")
    return [c * pp + pp_rank for c in range(v)]


def _rank_stages(n_layers, ctx, virtual_pipeline_size, layer_split, placement) -> list[tuple]:
    """(virtual stage s, first layer, end layer) of each of this pipeline rank's chunks."""
    pp = ctx.pp_size
    v = virtual_pipeline_size or (2 if placement == "v" else 1)
    split = validate_pipeline(n_layers, pp, v, layer_split)
    starts = [sum(split[:s]) for s in range(pp * v + 1)]
    return [(s, starts[s], starts[s + 1]) for s in rank_stages(pp, ctx.pp_rank, v, placement)]


def _block(model: nn.Module, i: int) -> nn.Module:
    block = model.blocks._modules.get(str(i))  # by global index: the model may be pruned
    if block is None:
        raise ValueError(
            f"the model has no block {i}: it was pruned by keep_stages for another layout; "
            "pass build_pipeline the same ctx, virtual_pipeline_size and layer_split"
        )
    return block


def _prune(module: nn.Module, model: nn.Module, ranges, first: bool, last: bool) -> None:
    """Give `module` the blocks of `ranges` (by global index, taken from `model`) and drop what
    a stage without the first / last position does not run: embeddings on the first stage (the
    token embedding also on the last when tied), norm_f / lm_head / output on the last."""
    blocks = nn.ModuleList()
    for lo, hi in ranges:
        for i in range(lo, hi):
            blocks.add_module(str(i), _block(model, i))  # keep the global layer index in names
    module.blocks = blocks
    if not first:
        module.pos_embed = None
        if not (last and model.config.tie_embeddings):
            module.embed = None
    if not last:
        module.norm_f = module.lm_head = module.output = None


def keep_stages(
    model: nn.Module,
    ctx,
    virtual_pipeline_size: int | None = None,
    layer_split: list[int] | None = None,
    placement: str = "interleaved",
) -> nn.Module:
    """Prune a GPT in place to the modules of this pipeline rank's stages and return it.

    Meant for a model built on the meta device, before `materialize` / `parallelize`, so a rank
    allocates and initialises only its own parameters (each generated from the deterministic
    per-parameter init, hence equal to the same-seed single-device model's). `blocks` keeps
    only this rank's layers under their global index; the embeddings stay on the first stage
    (the token embedding also on the last when tied), norm_f / lm_head on the last. Then call
    `build_pipeline` with the same arguments. A no-op at pp == 1.
    """
    if ctx.pp_size == 1:
        return model
    stages = _rank_stages(model.config.n_layers, ctx, virtual_pipeline_size, layer_split,
                          placement)  # fmt: skip
    last = ctx.pp_size * (2 if placement == "v" else virtual_pipeline_size or 1) - 1
    first_rank = any(s == 0 for s, _, _ in stages)
    last_rank = any(s == last for s, _, _ in stages)
    _prune(model, model, [(lo, hi) for _, lo, hi in stages], first_rank, last_rank)
    return model


def build_pipeline_chunks(
    model: nn.Module,
    ctx,
    virtual_pipeline_size: int | None = None,
    layer_split: list[int] | None = None,
    placement: str = "interleaved",
) -> list[nn.Module]:
    """This pipeline rank's model chunks (v of them), cut from a single-device or TP-sharded GPT
    (whole, or already pruned to this rank's stages by `keep_stages`).

    Each chunk gets `is_first_chunk` / `is_last_chunk` (first/last virtual stage of the whole
    pipeline), `virtual_stage` and `layer_range` attributes. `placement="v"` places stages r and
    2 pp - 1 - r on rank r (zb-v): rank 0 then holds the first and the last stage, and a tied
    embedding is one local parameter (nothing to sync over the embedding group).
    """
    pp = ctx.pp_size
    v = virtual_pipeline_size or (2 if placement == "v" else 1)
    stages = _rank_stages(model.config.n_layers, ctx, v, layer_split, placement)
    both_ends = {0, pp * v - 1} <= {s for s, _, _ in stages}
    if pp == 1:
        model.is_first_chunk = model.is_last_chunk = True
        model.virtual_stage, model.layer_range = 0, (0, len(model.blocks))
        return [model]
    chunks = []
    for s, lo, hi in stages:
        chunk = _shallow_copy(model)
        chunk.is_first_chunk, chunk.is_last_chunk = s == 0, s == pp * v - 1
        chunk.virtual_stage, chunk.layer_range = s, (lo, hi)
        _prune(chunk, model, [(lo, hi)], chunk.is_first_chunk, chunk.is_last_chunk)
        if chunk.config.tie_embeddings and chunk.embed is not None and not both_ends:
            declare_tied(chunk.embed, "weight", "embedding")  # ctx.embedding_group
        chunks.append(chunk)
    return chunks


class PipelineModel(nn.Module):
    """This pipeline rank's part of the GPT, registered under the single-device names.

    `chunks` (run by the schedule) share their modules with this container, whose parameters
    and state-dict keys are those of the full model ("embed.weight", "blocks.5.mlp.fc.weight",
    ...), so optimizers, gradient clipping and layout-free checkpoints treat it like a GPT.
    Call the pipeline schedule, not `forward`.
    """

    def __init__(self, model: nn.Module, chunks: list[nn.Module]):
        super().__init__()
        self.config = model.config
        self.chunks = chunks  # a plain list: the modules are registered below, once

        def first_of(attr):
            return next((getattr(c, attr) for c in chunks if getattr(c, attr) is not None), None)

        self.embed, self.pos_embed = first_of("embed"), first_of("pos_embed")
        self.blocks = nn.ModuleList()
        for chunk in chunks:
            for name, block in chunk.blocks.named_children():
                self.blocks.add_module(name, block)
        self.norm_f, self.lm_head, self.output = (
            first_of(a) for a in ("norm_f", "lm_head", "output")
        )

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "a pipeline-parallel model runs through its schedule: "
            "megatiny.parallel.schedules.build_schedule(ctx, model.chunks, ...)(micro_batches)"
        )


def build_pipeline(
    model: nn.Module,
    ctx,
    virtual_pipeline_size: int | None = None,
    layer_split=None,
    placement: str = "interleaved",
) -> nn.Module:
    """`model` itself when pp == 1, else a `PipelineModel` of this rank's chunks; both have
    `.chunks` (the list the schedule runs)."""
    chunks = build_pipeline_chunks(model, ctx, virtual_pipeline_size, layer_split, placement)
    if ctx.pp_size == 1:
        model.chunks = chunks
        return model
    return PipelineModel(model, chunks)


def forward_step(chunk: nn.Module, input_tensor, batch: dict):
    """Run one model chunk on one micro-batch: hidden states out, or the mean loss on the last
    (with context parallelism: over the whole sequences, whose parts the cp ranks hold; the
    batch then carries each rank's global `position_ids`)."""
    position_ids = batch.get("position_ids")
    if position_ids is None:  # the whole sequence's positions, also when h is a shard (SP)
        ids = batch["input_ids"]
        position_ids = torch.arange(ids.shape[-1], device=ids.device)[None]
    if chunk.is_first_chunk:
        h = chunk.embed_tokens(batch["input_ids"], position_ids)
    else:
        h = input_tensor
    h = chunk.run_blocks(h, position_ids)
    if chunk.is_last_chunk:
        loss = chunk.head_loss(h, batch["labels"], batch.get("loss_mask"))
        return context_parallel_loss(loss, batch["labels"], batch.get("loss_mask"),
                                     cp_group_of(chunk))  # fmt: skip
    return h


def tied_embedding_weight(chunks: list[nn.Module], ctx) -> nn.Parameter | None:
    """The copy of a tied token embedding this rank must sync (None if nothing to sync): the
    parameter declared tied over the embedding group by `build_pipeline_chunks` (at pp == 1 one
    module holds it, embedding and head already share the Parameter)."""
    for chunk in chunks:
        for p, sharding in named_shardings(chunk).values():
            if sharding.tied == "embedding":
                return p
    return None


def replicated_parameter_ids(chunks: list[nn.Module], ctx) -> set[int]:
    """ids of parameters another rank also owns (the last stage's tied embedding copy).

    Pass as `skip_parameter_ids` to the gradient-norm computation so the weight counts once.
    """
    if ctx.pp_size == 1:
        return set()
    rank = 0 if ctx.pp_rank == 0 else 1  # in the embedding group: first stage, last stage
    return set().union(*(tied_parameter_ids(chunk, "embedding", rank) for chunk in chunks))


@torch.no_grad()
def sync_tied_grads(chunks: list[nn.Module], ctx, ddp=None) -> None:
    """Sum the tied embedding's gradient over the first and last pipeline stage.

    Call after `ddp.finish_grad_sync()`. With ZeRO-1 (`ddp.shard`) the weight sits alone in its
    bucket on both stages, so both hold the same slice of it and the slices are summed.
    """
    weight = tied_embedding_weight(chunks, ctx)
    if weight is None:
        return
    if ddp is not None and ddp.shard:
        bucket = ddp.bucket_of[id(weight)]
        if len(bucket.params) != 1:
            raise RuntimeError("the tied embedding must be isolated in its own DDP bucket")
        off = ddp.shard_offset(bucket)
        grad = ddp.shard_grad[off : off + bucket.numel // ddp.dp_size]
    else:  # bf16 parameters: their fp32 main gradient (DistributedDataParallel)
        grad = getattr(weight, "main_grad", None)
        grad = weight.grad if grad is None else grad
    collectives.all_reduce(grad, ctx.embedding_group)


class P2P:
    """Batched isend/irecv to the previous / next pipeline rank (ring neighbours).

    The schedule decides who sends and receives what; the ring (rank 0's previous is the last
    rank) is what the interleaved schedule needs to pass chunk c's output to chunk c+1.
    """

    def __init__(self, ctx, shape, dtype=torch.float32, device=None):
        pp, rank = ctx.pp_size, ctx.pp_rank
        self.rank, self.size, self.group = rank, pp, ctx.pp_group
        self.ranks = list(ctx.pp_ranks)  # global rank of each pipeline rank
        self.prev = ctx.pp_ranks[(rank - 1) % pp]
        self.next = ctx.pp_ranks[(rank + 1) % pp]
        self.shape, self.dtype = tuple(shape), dtype
        self.device = device if device is not None else ctx.device

    def _empty(self):
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, requires_grad=True)

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != self.shape:
            raise RuntimeError(
                f"pipeline stage produced shape {tuple(t.shape)} but the schedule was built for "
                f"{self.shape} ([micro_batch, seq(/tp under SP), d_model])"
            )
        return t.detach().to(self.dtype).contiguous()

    def post(self, messages):
        """Post ("send", tensor, pp rank) / ("recv", None, pp rank) messages in this order, as one
        batch; wait for the receives only. Returns (received tensors in order, send handles):
        a send's tensor must stay alive until its handle is waited for (the schedule does)."""
        posts, received, sends = [], [], []
        for kind, tensor, peer in messages:
            if kind == "send":
                posts.append(("send", self._check(tensor), self.ranks[peer]))
            else:
                received.append(self._empty())
                posts.append(("recv", received[-1].data, self.ranks[peer]))
        works = collectives.batch_isend_irecv(posts, self.group)
        for (kind, tensor, _), work in zip(posts, works):
            if kind == "recv":
                work.wait()
            else:
                sends.append((work, tensor))
        return received, sends

    def communicate(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """One exchange: activations forward (to next / from prev), gradients backward.

        Returns (tensor from prev or None, tensor from next or None).
        """
        messages = []
        if send_next is not None:
            messages.append(("send", send_next, (self.rank + 1) % self.size))
        if recv_prev:
            messages.append(("recv", None, (self.rank - 1) % self.size))
        if send_prev is not None:
            messages.append(("send", send_prev, (self.rank - 1) % self.size))
        if recv_next:
            messages.append(("recv", None, (self.rank + 1) % self.size))
        received, sends = self.post(messages)
        for work, _ in sends:
            work.wait()
        from_prev = received.pop(0) if recv_prev else None
        from_next = received.pop(0).detach() if recv_next else None
        return from_prev, from_next
