"""Memory accounting per rank, shared by a training run (`memory_*` fields in metrics.jsonl) and
`megatiny plan` (the same functions on meta tensors under a fake process group).

    params      bytes of this rank's parameters (unique storages; ZeRO-1's flat buffer included)
    grads       the gradient buffer (DDP's flat buffer, + ZeRO-1's reduce-scattered slice), or
                the .grad tensors without DDP
    optimizer   AdamW's exp_avg / exp_avg_sq (+ ZeRO-1's fp32 master slice), sharded over dp
                under ZeRO-1
    activations bytes of the tensors autograd saves for backward in one micro-batch's forward
                (unique storages, counted with saved-tensor hooks; plus the inputs that
                torch.utils.checkpoint keeps to recompute from, plus a non-last pipeline
                stage's output that the schedule holds until its backward), times the
                micro-batches in flight for the schedule (`in_flight`); under a split backward
                (zero-bubble schedules) plus what W holds from B on (each linear's X and dY),
                at the peak along the rank's actions (`activation_bytes`)

Parameters saved by autograd (a linear's weight) are not activations; their autocast copies
(bf16 weights saved by a bf16 matmul) are, because they live as long as the micro-batch's graph.
Transient buffers (the logits gradient in backward, all-gather buffers) are not activations:
`megatiny plan` estimates them separately and adds them only to its `peak`.
"""

from __future__ import annotations

import contextlib

import torch

from megatiny.config.layout import SPLIT_SCHEDULES

# ---- activations: saved-tensor hooks ---------------------------------------------------------


def _storage(t: torch.Tensor):
    return t.untyped_storage()


class ActivationCounter:
    """Count the unique storages autograd saves while inside the context (not parameters).

        with ActivationCounter(model.parameters()) as counter:
            out = forward_step(chunk, x, batch)      # forward only
        counter.bytes                                # saved for backward by that forward

    Regions under torch.utils.checkpoint save nothing (they are recomputed); what checkpoint
    keeps is its tensor inputs, counted through `megatiny.model.RUNTIME["checkpoint"]`, which the counter
    wraps while active, and under recompute="op" the outputs its policy keeps
    (`megatiny.recompute.OP_SAVE_HOOKS`). Storages are held until exit, so addresses cannot be
    reused meanwhile.
    """

    def __init__(self, parameters=()):
        self._params = {_storage(p)._cdata for p in parameters}
        self._held: dict[int, object] = {}
        self.bytes = 0
        self.checkpoint_bytes = 0
        self.records: list[tuple[tuple, str, int, bool]] = []  # (shape, dtype, bytes, new)
        self._stack = contextlib.ExitStack()

    def add(self, t: torch.Tensor, checkpoint_input: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        storage = _storage(t)
        key = storage._cdata
        new = key not in self._params and key not in self._held
        nbytes = storage.nbytes() if new else 0
        if new:
            self._held[key] = storage
            self.bytes += nbytes
            if checkpoint_input:
                self.checkpoint_bytes += nbytes
        self.records.append((tuple(t.shape), str(t.dtype).replace("torch.", ""), nbytes, new))

    def _pack(self, t):
        self.add(t)
        return t

    def __enter__(self):
        import megatiny.model as model_module
        from megatiny.recompute import OP_SAVE_HOOKS

        real = model_module.RUNTIME["checkpoint"]

        def counted_checkpoint(fn, *args, **kwargs):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.add(a, checkpoint_input=True)
                elif isinstance(a, tuple):  # rope = (cos, sin)
                    for x in a:
                        if isinstance(x, torch.Tensor):
                            self.add(x, checkpoint_input=True)
            return real(fn, *args, **kwargs)

        self._stack.enter_context(model_module.runtime(checkpoint=counted_checkpoint))

        def kept(out):  # recompute="op": outputs the checkpoint keeps in its own cache
            for t in out if isinstance(out, tuple | list) else (out,):
                self.add(t)

        OP_SAVE_HOOKS.append(kept)
        self._stack.callback(OP_SAVE_HOOKS.remove, kept)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._held = {}
        return False


def _unpack(t):
    return t


def chunk_activation_bytes(chunks, batch: dict, input_shape, dtype=torch.float32,
                           autocast=contextlib.nullcontext) -> list[int]:  # fmt: skip
    """Activation bytes of one micro-batch in each model chunk of this rank (`chunk_memory_bytes`
    without the split backward)."""
    return chunk_memory_bytes(chunks, batch, input_shape, dtype, autocast)[0]


def chunk_memory_bytes(chunks, batch: dict, input_shape, dtype=torch.float32,
                       autocast=contextlib.nullcontext, split: bool = False):  # fmt: skip
    """([activation bytes], [W-stash bytes]) of one micro-batch in each model chunk of this
    rank: the chunk's forward (`megatiny.parallel.pipeline.forward_step`, the function the
    schedules run) under an `ActivationCounter`; a non-first chunk gets a stand-in input of the
    pipeline message shape (as received), a non-last chunk's output is added (the schedule
    holds it until backward). With `split` (a zero-bubble schedule) the forward runs the
    deferrable layers (megatiny/split_backward.py), which record what their W will hold from B
    on: the stash bytes (0 without `split`). Runs the tensor-parallel collectives of a forward,
    so every TP rank must call it together. The graphs are dropped: no backward runs."""
    from megatiny import split_backward
    from megatiny.parallel.pipeline import forward_step

    device = next(p.device for c in chunks for p in c.parameters())
    activations, stashes = [], []
    for chunk in chunks:
        x = None
        if not chunk.is_first_chunk:
            x = torch.zeros(input_shape, dtype=dtype, device=device, requires_grad=True)
        params = list(chunk.parameters())
        with (
            torch.enable_grad(),
            ActivationCounter(params) as counter,
            split_backward.split_weight_grads(split),
            split_backward.record_stash() as stash,
        ):
            with autocast():
                y = forward_step(chunk, x, batch)
        held = 0
        if not chunk.is_last_chunk:
            held = y.numel() * y.element_size()
        activations.append(counter.bytes + held)
        stashes.append(stash.bytes)
        del y, stash
    return activations, stashes


# ---- micro-batches in flight -----------------------------------------------------------------


FORMULA_SCHEDULES = ("auto", "1f1b", "interleaved")  # in_flight's closed forms


def in_flight(pp: int, pp_rank: int, num_microbatches: int, virtual_pipeline_size: int = 1,
              schedule: str = "auto") -> int:  # fmt: skip
    """Most chunk micro-batches whose forward has run and backward has not, on pipeline rank r:

        pp = 1                  1 (each micro-batch's backward follows its forward)
        1F1B                    min(p - r, m)
        interleaved (v chunks)  min(2 (p - r - 1) + (v - 1) p + 1, v m)  (Megatron's warm-up + 1;
                                all v m when m == p: the schedule then warms up fully)
        any other schedule      counted along the rank's actions (schedule_sim.peak_bytes)

    in units of one chunk (1/v of the stage's layers). Equals `PipelineSchedule.max_in_flight`
    after a run (tests/test_memory.py)."""
    p, r, m, v = pp, pp_rank, num_microbatches, virtual_pipeline_size or 1
    if p == 1:
        return 1
    if schedule not in FORMULA_SCHEDULES:
        return int(_schedule_peak(schedule, p, r, m, v, (1,) * v, None))
    if v == 1:
        return min(p - r, m)
    if m == p:
        return v * m
    return min(2 * (p - r - 1) + (v - 1) * p + 1, v * m)


def _schedule_peak(kind, p, r, m, v, activation, stash) -> float:
    from megatiny.parallel.schedule_sim import peak_bytes
    from megatiny.parallel.schedules import checked_schedule

    return peak_bytes(checked_schedule(kind, p, m, v), r, activation, stash)


def activation_bytes(per_chunk: list[int], pp: int, pp_rank: int, num_microbatches: int,
                     virtual_pipeline_size: int = 1, schedule: str = "auto",
                     stash_per_chunk: list[int] | None = None) -> int:  # fmt: skip
    """Activation bytes of the rank. Closed-form schedules (FORMULA_SCHEDULES): micro-batches in
    flight x bytes per chunk micro-batch (interleaved: the mean over this rank's chunks, the
    in-flight set cycles through them). Any other (gpipe, the zero-bubble ones): the peak along
    the rank's actions of each chunk's bytes between F and B plus its W stash
    (`stash_per_chunk`) between B and W, exact for the schedule's order."""
    if pp > 1 and schedule not in FORMULA_SCHEDULES:
        v = len(per_chunk)
        return int(_schedule_peak(schedule, pp, pp_rank, num_microbatches, v, tuple(per_chunk),
                                  tuple(stash_per_chunk or [0] * v)))  # fmt: skip
    n = in_flight(pp, pp_rank, num_microbatches, virtual_pipeline_size)
    return int(round(n * sum(per_chunk) / len(per_chunk)))


# ---- parameters, gradients, optimizer state --------------------------------------------------


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = _storage(t)
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def state_bytes(model: torch.nn.Module, optimizer, ddp=None) -> dict[str, int]:
    """{params, grads, optimizer} bytes this rank holds (see the module docstring). Call after
    the first optimizer step (AdamW creates its state lazily)."""
    shard = getattr(ddp, "param_shard", None)  # ZeRO-3: my slices, not the gathered blocks
    held = [p for p in model.parameters() if shard is None or id(p) not in ddp.offsets]
    params = _unique_bytes([*held, shard])
    if ddp is not None:
        grads = _unique_bytes([ddp.grad_buffer, ddp.shard_grad])
    else:
        grads = _unique_bytes(p.grad for p in model.parameters())
    from megatiny.parallel.zero import ZeroOptimizer

    if isinstance(optimizer, ZeroOptimizer):
        inner = optimizer.optimizer
        opt = 0 if optimizer.master is shard else _unique_bytes([optimizer.master])
    else:
        inner = optimizer
        opt = 0
    opt += sum(
        t.numel() * t.element_size()
        for st in inner.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor) and t.numel() > 1  # not the scalar `step`
    )
    return {"params": params, "grads": grads, "optimizer": opt}


def stage_message_shape(cfg, ctx) -> tuple[int, int, int]:
    """[micro-batch, tokens, d_model] of the hidden states between pipeline stages on this rank:
    s / tp tokens under sequence parallelism, and s / cp of each sequence on a cp rank."""
    seq = cfg.data.seq_length // (ctx.tp_size if cfg.parallel.sequence_parallel else 1)
    return (cfg.train.micro_batch_size, seq // ctx.cp_size, cfg.model.d_model)


def memory_metrics(trainer, batch: dict | None = None) -> dict[str, int]:
    """The `memory_*` fields of a training run for this rank: `memory_params`, `memory_grads`,
    `memory_optimizer`, `memory_activations` (one micro-batch's forward of each chunk under the
    saved-tensor hooks, times the schedule's micro-batches in flight) and `memory_total` (their
    sum). Collective over the TP group (the forward's collectives): call on every rank, after
    an optimizer step. `batch` defaults to the trainer's first micro-batch of the next step."""
    ctx, cfg = trainer.ctx, trainer.cfg
    out = state_bytes(trainer.model, trainer.optimizer, trainer.ddp)
    if batch is None:
        batch = trainer.micro_batches()[0]
    chunks = getattr(trainer.model, "chunks", None) or [_as_chunk(trainer.model)]
    shape = stage_message_shape(cfg, ctx)
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32  # pipeline messages
    kind = cfg.parallel.pipeline_schedule
    split = ctx.pp_size > 1 and kind in SPLIT_SCHEDULES
    per_chunk, stash = chunk_memory_bytes(chunks, batch, shape, dtype, trainer.autocast, split)
    out["activations"] = activation_bytes(
        per_chunk, ctx.pp_size, ctx.pp_rank, trainer.accumulation,
        cfg.parallel.virtual_pipeline_size or 1, kind, stash,
    )  # fmt: skip
    out["total"] = sum(out.values())
    return {f"memory_{k}": v for k, v in out.items()}


def _as_chunk(model):
    """A pp = 1 model seen as the one chunk forward_step runs (first and last)."""
    if not hasattr(model, "is_first_chunk"):
        model.is_first_chunk = model.is_last_chunk = True
    return model
