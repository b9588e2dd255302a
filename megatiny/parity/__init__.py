"""Layout parity: find the first module where a parallel layout departs from the reference.

    report = run_parity(cfg, ["tp=1", "tp=2", "tp=2,sequence_parallel=true", "tp=2,dp=2"])
    print(format_report(report))                # `megatiny parity --config FILE --layouts ...`

Each layout runs on its own fork-started CPU gloo ranks (`megatiny.testing.run_ranks`; no
torchrun): the model built from the config's seed (`megatiny.training.step.build_trainer`, the
step `megatiny train` runs: DDP buckets, AdamW), fp32, dropout 0, no gradient clipping (the global
grad norm is compared instead), on a synthetic batch
drawn from the same seed (no data files), for `steps` optimizer steps. Every module's forward
output and every parameter's gradient is recorded in execution order with the last collective
before it, gathered to full shape, and compared with the first layout (the reference, tp=1).

Supported layouts: tp, dp and sequence_parallel. pp, virtual_pipeline_size, cp and zero1 are
refused with an error (their modules live on other ranks or their gradients are sharded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from megatiny.config import Config, ConfigError
from megatiny.testing.equivalence import Layout, mismatch, parse_layout
from megatiny.testing.ranks import run_ranks

UNSUPPORTED = ("pp", "cp", "virtual_pipeline_size", "zero1")


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

    @property
    def ok(self) -> bool:
        return all(not r.differences for r in self.results)


def layout_config(cfg: Config, layout: Layout, batch_size: int, seq_length: int) -> Config:
    """`cfg` at `layout`: fp32, dropout 0, no clipping, one micro-batch of batch_size / dp per
    rank."""
    bad = [k for k in UNSUPPORTED if getattr(layout, k) not in (1, None, False)]
    if bad:
        raise ConfigError(
            f"layout {layout}: megatiny parity runs tp, dp and sequence_parallel layouts only; "
            f"{', '.join(bad)} is not supported yet (pipeline layouts are checked by loss in "
            "tests/test_3d.py)"
        )
    if batch_size % layout.dp:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by dp={layout.dp}")
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.dp, p.pp, p.cp = layout.tp, layout.dp, 1, 1
    p.sequence_parallel, p.virtual_pipeline_size, p.zero1 = layout.sequence_parallel, None, False
    out.model.dropout = 0.0
    out.train.precision = "fp32"
    # Clipping would scale every gradient by the global norm and smear one wrong gradient over
    # all of them; the norm itself is still computed and compared ("grad_norm").
    out.train.grad_clip = 0.0
    out.train.micro_batch_size = batch_size // layout.dp
    out.train.global_batch_size = batch_size
    out.data.seq_length = seq_length
    out.validate(layout.world_size)
    return out


def synthetic_batch(seed: int, vocab_size: int, samples: int, seq_length: int):
    """`samples` training samples of random token ids (labels = next token), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (samples, seq_length + 1), generator=g)
    return [
        {"input_ids": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq_length)} for t in tokens
    ]


def _rank(cfg: Config, steps: int, full_shapes, patch):
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

    ctx = ParallelContext.initialize(tp=cfg.parallel.tp)
    trainer = build_trainer(cfg, ctx, task=Synthetic())
    recorder = Recorder(trainer.model)
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
    rtol: float = 1e-4,
    atol: float = 1e-5,
    patch=None,
    timeout: float = 300.0,
) -> ParityReport:
    """Run `cfg` at each layout (the first is the reference) and compare; see the module
    docstring. `patch(model, ctx)`, if given, is applied to each rank's model after it is built
    (tests plant bugs with it)."""
    layouts = [parse_layout(x) for x in layouts]
    if len(layouts) < 2:
        raise ConfigError("give at least two layouts: the reference (tp=1) and one to compare")
    if layouts[0].tp != 1:
        raise ConfigError(f"the first layout is the reference and must have tp=1, got {layouts[0]}")
    seq_length = seq_length or cfg.data.seq_length
    configs = [layout_config(cfg, layout, batch_size, seq_length) for layout in layouts]
    ref_records = run_ranks(
        _rank, layouts[0].world_size, configs[0], steps, None, patch, timeout=timeout
    )[0]
    reference = {(r.step, r.kind, r.name): r for r in ref_records}
    shapes = {(r.kind, r.name): tuple(r.tensor.shape) for r in ref_records if r.tensor is not None}
    results = []
    for layout, layout_cfg in zip(layouts[1:], configs[1:]):
        records = run_ranks(
            _rank, layout.world_size, layout_cfg, steps, shapes, patch, timeout=timeout
        )[0]
        results.append(compare(str(layout), reference, records, rtol, atol))
    return ParityReport(str(layouts[0]), results, rtol, atol)


def compare(layout: str, reference: dict, records: list, rtol: float, atol: float) -> LayoutResult:
    """The records of `layout` against the reference's, in the layout's execution order."""
    result = LayoutResult(layout, 0)
    seen = set()
    for index, r in enumerate(records):
        key = (r.step, r.kind, r.name)
        ref = reference.get(key)
        if ref is None:  # a wrapper only the parallel model has (ShardedRNG's inner module)
            continue
        seen.add(key)
        result.compared += 1
        if r.tensor is None or ref.tensor is None:
            if (r.tensor is None) != (ref.tensor is None):
                note = "no gradient here" if r.tensor is None else "no gradient in the reference"
                result.differences.append(
                    Difference(*key, index, float("inf"), float("inf"), r.collective, note)
                )
            continue
        max_abs, ratio = mismatch(r.tensor, ref.tensor, rtol, atol)
        if ratio > 1:
            note = r.note
            if not note and r.tensor.shape != ref.tensor.shape:
                note = f"shape {tuple(r.tensor.shape)} != {tuple(ref.tensor.shape)}"
            result.differences.append(Difference(*key, index, max_abs, ratio, r.collective, note))
    for key in reference:
        if key not in seen:
            result.differences.append(
                Difference(*key, len(records), float("inf"), float("inf"), "", "missing here")
            )
    return result


def format_report(report: ParityReport, top: int = 10) -> str:
    lines = [f"reference: {report.reference}  (rtol={report.rtol:g}, atol={report.atol:g})"]
    for res in report.results:
        if not res.differences:
            lines.append(f"{res.layout}: all {res.compared} tensors agree")
            continue
        lines.append(
            f"{res.layout}: {len(res.differences)} of {res.compared} tensors differ; "
            "first in execution order:"
        )
        lines.append(
            f"  {'#':>4}  {'step':>4}  {'kind':<6}  {'tensor':<32} {'max |diff|':>10} "
            f"{'x tol':>9}  last collective before it"
        )
        for d in res.differences[:top]:
            extra = f"  [{d.note}]" if d.note else ""
            lines.append(
                f"  {d.index:>4}  {d.step:>4}  {d.kind:<6}  {d.name:<32} {d.max_abs:>10.3g} "
                f"{d.ratio:>9.3g}  {d.collective}{extra}"
            )
    return "\n".join(lines)
