"""Straggler scores: which rank is slow, judged on its compute apart from its communication waits.

Each training step, every rank measures its step time and the seconds it spent blocked in
collectives and point-to-point messages (an observer on megatiny.parallel.collectives: a rank that
waits for a slow peer waits *there*); compute = step - communication wait. Every `log_interval`
steps the ranks all-gather the median of their interval and score each rank (NVIDIA Resiliency
Extension's two scores):

    relative   = fastest compute among the ranks doing the same work (same pipeline stage)
                 / this rank's compute                       (1 = the fastest; 0.5 = twice as slow)
    individual = this rank's best interval so far / this interval   (1 = as fast as it ever was)

A rank is named a straggler when its relative score is below `train.straggler_threshold`, or its
individual score is below threshold x the median individual score of all ranks (it slowed down
more than the job did: a machine that slows every rank names none). Rank 0 warns in one line per straggler and the scores go to metrics.jsonl
(`straggler_relative`, `straggler_individual`, `compute_s`, `comm_wait_s`: one value per rank;
`stragglers`: the ranks named). `megatiny debug stragglers RUN_DIR` reads them back.

Timing (`DeviceClock`, megatiny/parallel/timing.py, the one place that chooses): wall time on CPU;
on CUDA the step's device time between two CUDA events, and communication seconds by the same
clock (collectives.py: event time from posting to completion; not validated on a GPU yet).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from megatiny.parallel import collectives
from megatiny.parallel.timing import DeviceClock


class StragglerDetector:
    """Times `trainer.train_step` (wraps it) and scores the ranks at every `report(step)`."""

    def __init__(self, trainer, threshold: float, warn=print):
        self.trainer, self.ctx, self.threshold, self.warn = trainer, trainer.ctx, threshold, warn
        self.clock = DeviceClock(self.ctx.device)
        self.compute: list[float] = []
        self.comm: list[float] = []
        self.best: list[float] | None = None
        self._wait = 0.0
        self._remove = collectives.add_observer(self._observe)
        self._train_step = trainer.train_step
        trainer.train_step = self.train_step

    def _observe(self, event) -> None:
        self._wait += event.seconds

    def train_step(self):
        self._wait = 0.0
        started = self.clock.start()
        out = self._train_step()
        total = self.clock.seconds(started)
        self.comm.append(self._wait)
        self.compute.append(max(total - self._wait, 0.0))
        return out

    def close(self) -> None:
        self._remove()

    def report(self, step: int) -> dict:
        """Collective (every rank, at the same log step): the scores of every rank."""
        ctx = self.ctx
        mine = [statistics.median(self.compute) if self.compute else 0.0,
                statistics.median(self.comm) if self.comm else 0.0, float(ctx.pp_rank)]  # fmt: skip
        self.compute, self.comm = [], []
        row = torch.tensor(mine, dtype=torch.float64, device=ctx.device)[None]
        if ctx.world_size > 1:
            row = collectives.all_gather_cat(row, None, 0)
        compute, comm, stage = (row.cpu().T.tolist()[i] for i in range(3))
        out = score(compute, stage, self.best, self.threshold)
        self.best = out.pop("best")
        out["comm_wait_s"] = comm
        if ctx.rank == 0:
            for line in out.pop("lines"):
                self.warn(f"straggler at step {step}: {line}")
        else:
            out.pop("lines")
        return out


def score(compute: list[float], stage: list[float], best: list[float] | None,
          threshold: float) -> dict:  # fmt: skip
    """Relative and individual scores of every rank, the ranks named and a line for each."""
    eps = 1e-9
    fastest = {s: min(c for c, t in zip(compute, stage) if t == s) for s in set(stage)}
    relative = [(fastest[s] + eps) / (c + eps) for c, s in zip(compute, stage)]
    best = compute if best is None else [min(b, c) for b, c in zip(best, compute)]
    individual = [(b + eps) / (c + eps) for b, c in zip(best, compute)]
    typical = statistics.median(individual)
    named, lines = [], []
    for rank, (rel, ind) in enumerate(zip(relative, individual)):
        why = []
        if rel < threshold:
            peer = min(
                (r for r, s in enumerate(stage) if s == stage[rank]), key=lambda r: compute[r]
            )
            why.append(f"runs at {rel:.2f} x the speed of rank {peer} ({compute[rank]:.4f} "
                       f"vs {compute[peer]:.4f} s/step)")  # fmt: skip
        if ind < threshold * typical:
            why.append(f"runs at {ind:.2f} x its own best ({compute[rank]:.4f} vs {best[rank]:.4f} "
                       f"s/step) while the ranks' median is {typical:.2f}")  # fmt: skip
        if why:
            named.append(rank)
            lines.append(f"rank {rank} is a straggler: it " + " and ".join(why) +
                         f" (train.straggler_threshold={threshold})")  # fmt: skip
    return {"straggler_relative": relative, "straggler_individual": individual,
            "compute_s": compute, "stragglers": named, "best": best, "lines": lines}  # fmt: skip


# ---- megatiny debug stragglers RUN_DIR --------------------------------------------------------


def load_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [r for r in rows if "straggler_relative" in r and "split" not in r]


def table(rows: list[dict]) -> list[str]:
    """One line per rank: its scores over the logged intervals and how often it was named."""
    world = len(rows[0]["straggler_relative"])
    lines = [f"{'rank':>4}  {'relative min/median':>19}  {'individual min':>14}  "
             f"{'compute s/step':>14}  {'comm wait s/step':>16}  named"]  # fmt: skip
    for rank in range(world):
        rel = [r["straggler_relative"][rank] for r in rows]
        ind = [r["straggler_individual"][rank] for r in rows]
        comp = [r["compute_s"][rank] for r in rows]
        comm = [r["comm_wait_s"][rank] for r in rows]
        named = [r["step"] for r in rows if rank in r.get("stragglers", ())]
        when = f"{len(named)}/{len(rows)} intervals" + (
            f", first at step {named[0]}" if named else ""
        )
        lines.append(f"{rank:>4}  {min(rel):>9.2f}/{statistics.median(rel):<9.2f}  "
                     f"{min(ind):>14.2f}  {statistics.median(comp):>14.4f}  "
                     f"{statistics.median(comm):>16.4f}  {when}")  # fmt: skip
    return lines


def heatmap(rows: list[dict], path: str) -> str:
    """A rank x step PNG of the relative scores (dark = slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [[r["straggler_relative"][rank] for r in rows]
              for rank in range(len(rows[0]["straggler_relative"]))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(rows) + 2), max(2, 0.4 * len(scores) + 1)))
    image = ax.imshow(
        scores, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_xticks(range(len(rows)), [str(r["step"]) for r in rows], rotation=90, fontsize=7)
    ax.set_yticks(range(len(scores)), [f"rank {r}" for r in range(len(scores))], fontsize=7)
    ax.set_xlabel("step (end of log interval)")
    ax.set_title("relative compute score (1 = fastest rank of its stage)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--output", default=None,
                        help="heatmap PNG (default RUN_DIR/stragglers.png)")  # fmt: skip


def main(args) -> int:
    rows = load_rows(args.run_dir)
    if not rows:
        print(f"megatiny debug stragglers: no straggler scores in "
              f"{os.path.join(args.run_dir, 'metrics.jsonl')}; train with "
              "train.straggler_threshold=0.7 (any value in (0, 1)) to record them",
              file=sys.stderr)  # fmt: skip
        return 1
    for line in table(rows):
        print(line)
    named = sorted({rank for r in rows for rank in r.get("stragglers", ())})
    for rank in named:
        steps = [r["step"] for r in rows if rank in r.get("stragglers", ())]
        print(f"straggler: rank {rank} (named at steps {', '.join(map(str, steps))})")
    if not named:
        print("no straggler: every rank kept within the threshold at every logged interval")
    print(f"heatmap: {heatmap(rows, args.output or os.path.join(args.run_dir, 'stragglers.png'))}")
    return 0
