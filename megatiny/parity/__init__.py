"""Layout parity: find the first module where a parallel layout departs from the reference.

    report = run_parity(cfg, ["tp=1", "tp=2,sequence_parallel=true", "pp=2,virtual_pipeline_size=2"])
    print(format_report(report))                # `megatiny parity --config FILE --layouts ...`

Each layout runs on its own fork-started CPU gloo ranks (`megatiny.testing.run_ranks`; no
torchrun): the model built from the config's seed (`megatiny.training.step.build_trainer`, the
step `megatiny train` runs: DDP buckets, AdamW with eps 1 unless `config_adam_eps`, so that
updates stay linear in the gradient), fp32, dropout 0, no gradient clipping (the global grad norm
is compared instead), on a synthetic batch
drawn from the same seed (no data files), for `steps` optimizer steps. Every module's forward
output and every parameter's gradient is recorded with the last collective before it, gathered
to full shape (and from every pipeline stage) on one rank, and compared with the first layout
(the reference: tp=1, pp=1), in the reference's (single-device) execution order.

Every layout splits the step's batch into the same m micro-batches (default: the least common
multiple of the layouts' pp; `micro_batches=`), which the reference runs by gradient
accumulation and a pipeline by its schedule (1F1B, interleaved with virtual_pipeline_size), so
each module's output is compared micro-batch by micro-batch.

Supported layouts: tp, dp, pp, virtual_pipeline_size and sequence_parallel. cp and zero1 are
refused with an error (their activations are split along the sequence / their gradients
sharded).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from megatiny.config import Config, ConfigError
from megatiny.parallel.local_ranks import run_ranks
from megatiny.parallel.pipeline import validate_pipeline
from megatiny.testing.equivalence import Layout, mismatch, parse_layout
from megatiny.training.step import check_supported

UNSUPPORTED = ("cp", "zero1")


@dataclass
class Difference:
    step: int
    kind: str
    name: str
    index: int  # position in the layout's execution order
    max_abs: float
    ratio: float  # max |diff| / (atol + rtol |ref|); > 1 is a difference
    collective: str
    note: str = ""
    micro_batch: int | None = None


@dataclass
class LayoutResult:
    layout: str
    compared: int
    differences: list[Difference] = field(default_factory=list)


@dataclass
class ParityReport:
    reference: str
    results: list[LayoutResult]
    rtol: float
    atol: float
    micro_batches: int = 1

    @property
    def ok(self) -> bool:
        return all(not r.differences for r in self.results)


def check_pipeline(cfg: Config, layout: Layout) -> None:
    """ConfigError unless cfg's layers divide into layout.pp * virtual_pipeline_size stages."""
    try:
        validate_pipeline(cfg.model.n_layers, layout.pp, layout.virtual_pipeline_size)
    except ValueError as e:
        raise ConfigError(f"layout {layout}: {e}") from None


def layout_config(
    cfg: Config,
    layout: Layout,
    batch_size: int,
    seq_length: int,
    micro_batches: int = 1,
    config_adam_eps: bool = False,
) -> Config:
    """`cfg` at `layout`: fp32, dropout 0, no clipping, `micro_batches` micro-batches of
    batch_size / (dp * micro_batches) samples per rank, AdamW's eps 1 (unless
    `config_adam_eps`). Raises ConfigError for a layout that cannot run (layers vs pp * virtual
    stages, batch vs dp * micro-batches, ...)."""
    bad = [k for k in UNSUPPORTED if getattr(layout, k) not in (1, None, False)]
    if bad:
        raise ConfigError(
            f"layout {layout}: megatiny parity runs tp, dp, pp, virtual_pipeline_size and "
            f"sequence_parallel layouts; {', '.join(bad)} is not supported yet"
        )
    check_pipeline(cfg, layout)
    if batch_size % (layout.dp * micro_batches):
        raise ConfigError(
            f"layout {layout}: --batch-size {batch_size} is not divisible by dp x micro-batches "
            f"= {layout.dp} x {micro_batches} (every layout runs {micro_batches} micro-batches: "
            f"the lcm of the layouts' pp, or --micro-batches); choose a multiple of "
            f"{layout.dp * micro_batches}"
        )
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.dp, p.pp, p.cp = layout.tp, layout.dp, layout.pp, 1
    p.sequence_parallel, p.zero1 = layout.sequence_parallel, False
    p.virtual_pipeline_size = layout.virtual_pipeline_size
    out.model.dropout = 0.0
    out.train.precision = "fp32"
    # Clipping would scale every gradient by the global norm and smear one wrong gradient over
    # all of them; the norm itself is still computed and compared ("grad_norm").
    out.train.grad_clip = 0.0
    # AdamW's first update is lr * g / (|g| + eps): with eps 1e-8 a gradient element at rounding
    # level moves its weight by up to lr, differently at each layout, and later steps part for
    # no bug. With eps 1 the update is about lr * g (SGD-like), so rounding stays rounding.
    if not config_adam_eps:
        out.train.adam_eps = 1.0
    out.train.micro_batch_size = batch_size // (layout.dp * micro_batches)
    out.train.global_batch_size = batch_size
    out.data.seq_length = seq_length
    try:
        out.validate(layout.world_size)
        check_supported(out, layout.world_size)  # layers per stage, interleaving's micro-batches
    except ConfigError as e:
        raise ConfigError(f"layout {layout}: {e}") from None
    return out


def synthetic_batch(seed: int, vocab_size: int, samples: int, seq_length: int):
    """`samples` training samples of random token ids (labels = next token), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (samples, seq_length + 1), generator=g)
    return [
        {"input_ids": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq_length)} for t in tokens
    ]


def _rank(cfg: Config, steps: int, micro_batches: int, full_shapes, patch):
    import torch.distributed as dist

    from megatiny.parallel import ParallelContext
    from megatiny.parity.record import Recorder, gather_step
    from megatiny.training.step import Task, build_model, build_trainer

    samples = synthetic_batch(
        cfg.train.seed, cfg.model.vocab_size, cfg.train.global_batch_size * steps,
        cfg.data.seq_length,
    )  # fmt: skip

    class Synthetic(Task):
        def build_model(self, cfg, ctx):
            model = build_model(cfg, ctx)
            if patch is not None:
                patch(model, ctx)
            return model

        def build_data(self, cfg, ctx, dp):
            return samples, None

    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    trainer = build_trainer(cfg, ctx, task=Synthetic())
    recorder = Recorder(trainer.model, micro_batches)
    gathered = []
    for step in range(steps):
        recorder.begin_step(step)
        metrics = trainer.train_step()
        recorder.end_step({k: metrics[k] for k in ("loss", "grad_norm")})
        gathered += gather_step(recorder, ctx, step, full_shapes)
    recorder.close()
    return gathered if dist.get_rank() == 0 else None


def run_parity(
    cfg: Config,
    layouts,
    steps: int = 1,
    batch_size: int = 4,
    seq_length: int | None = None,
    micro_batches: int | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    patch=None,
    timeout: float = 300.0,
    config_adam_eps: bool = False,
) -> ParityReport:
    """Run `cfg` at each layout (the first is the reference) and compare; see the module
    docstring. `patch(model, ctx)`, if given, is applied to each rank's model after it is built
    (tests plant bugs with it). Every layout is checked before any runs."""
    layouts = [parse_layout(x) for x in layouts]
    if len(layouts) < 2:
        raise ConfigError("give at least two layouts: the reference (tp=1) and one to compare")
    if layouts[0].tp != 1 or layouts[0].pp != 1:
        raise ConfigError(
            f"the first layout is the reference and must have tp=1 and pp=1, got {layouts[0]}"
        )
    for layout in layouts:  # first: the micro-batch count below follows from the pipelines
        check_pipeline(cfg, layout)
    m = micro_batches or math.lcm(*(layout.pp for layout in layouts))
    seq_length = seq_length or cfg.data.seq_length
    configs = [layout_config(cfg, layout, batch_size, seq_length, m, config_adam_eps)
               for layout in layouts]  # fmt: skip
    ref_records = run_ranks(
        _rank, layouts[0].world_size, configs[0], steps, m, None, patch, timeout=timeout
    )[0]
    reference = {r.key: r for r in ref_records}
    shapes = {(r.kind, r.name): tuple(r.tensor.shape) for r in ref_records if r.tensor is not None}
    results = []
    for layout, layout_cfg in zip(layouts[1:], configs[1:]):
        records = run_ranks(
            _rank, layout.world_size, layout_cfg, steps, m, shapes, patch, timeout=timeout
        )[0]
        results.append(compare(str(layout), reference, records, rtol, atol))
    return ParityReport(str(layouts[0]), results, rtol, atol, m)


def compare(layout: str, reference: dict, records: list, rtol: float, atol: float) -> LayoutResult:
    """The records of `layout` against the reference's (keyed by `Record.key`, in the
    reference's execution order), reported in that order."""
    result = LayoutResult(layout, 0)
    position = {key: i for i, key in enumerate(reference)}
    seen = set()
    for r in sorted((r for r in records if r.key in position), key=lambda r: position[r.key]):
        # (a record the reference lacks is a wrapper only the parallel model has: ShardedRNG's
        # inner module)
        ref, index = reference[r.key], position[r.key]
        seen.add(r.key)
        result.compared += 1
        where = dict(step=r.step, kind=r.kind, name=r.name, index=index,
                     collective=r.collective, micro_batch=r.micro_batch)  # fmt: skip
        if r.tensor is None or ref.tensor is None:
            if (r.tensor is None) != (ref.tensor is None):
                note = "no gradient here" if r.tensor is None else "no gradient in the reference"
                inf = float("inf")
                result.differences.append(Difference(**where, max_abs=inf, ratio=inf, note=note))
            continue
        max_abs, ratio = mismatch(r.tensor, ref.tensor, rtol, atol)
        if ratio > 1:
            note = r.note
            if not note and r.tensor.shape != ref.tensor.shape:
                note = f"shape {tuple(r.tensor.shape)} != {tuple(ref.tensor.shape)}"
            result.differences.append(Difference(**where, max_abs=max_abs, ratio=ratio, note=note))
    for key, ref in reference.items():
        if key not in seen:
            result.differences.append(Difference(
                step=ref.step, kind=ref.kind, name=ref.name, index=position[key],
                max_abs=float("inf"), ratio=float("inf"), collective="", note="missing here",
                micro_batch=ref.micro_batch,
            ))  # fmt: skip
    result.differences.sort(key=lambda d: d.index)
    return result


def format_report(report: ParityReport, top: int = 10) -> str:
    m = report.micro_batches
    lines = [f"reference: {report.reference}  (rtol={report.rtol:g}, atol={report.atol:g}"
             + (f", {m} micro-batches)" if m > 1 else ")")]  # fmt: skip
    for res in report.results:
        if not res.differences:
            lines.append(f"{res.layout}: all {res.compared} tensors agree")
            continue
        lines.append(
            f"{res.layout}: {len(res.differences)} of {res.compared} tensors differ; "
            "first in execution order:"
        )
        mb_head = f"{'mb':>3}  " if m > 1 else ""
        lines.append(
            f"  {'#':>4}  {'step':>4}  {mb_head}{'kind':<6}  {'tensor':<32} {'max |diff|':>10} "
            f"{'x tol':>9}  last collective before it"
        )
        for d in res.differences[:top]:
            extra = f"  [{d.note}]" if d.note else ""
            mb = "" if m == 1 else f"{'-' if d.micro_batch is None else d.micro_batch:>3}  "
            lines.append(
                f"  {d.index:>4}  {d.step:>4}  {mb}{d.kind:<6}  {d.name:<32} {d.max_abs:>10.3g} "
                f"{d.ratio:>9.3g}  {d.collective}{extra}"
            )
    return "\n".join(lines)
