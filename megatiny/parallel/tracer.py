"""The communication tracer: every op `collectives` issues, summed per step, phase, group and op.

    tracer = CommTracer(rank=ctx.rank)
    with tracer:                                  # observes collectives while inside
        tracer.mark(step=1, phase="train")
        ...                                       # a training step
        tracer.mark(step=1, phase="eval")         # evaluation after step 1 is attributed to it
    tracer.write("run/comm.jsonl")                # one JSON row per (step, phase, group, op)

A row: {"step", "rank", "phase", "group", "op", "calls", "bytes", "seconds"} — bytes and seconds as
defined in megatiny/parallel/collectives.py. Each rank appends its own rows (one write per row,
O_APPEND), so ranks never interleave inside a line. When no tracer is active, `collectives` calls
torch.distributed directly: tracing off costs nothing.
"""

from __future__ import annotations

import json
import os

from megatiny.parallel import collectives


class CommTracer:
    def __init__(self, rank: int = 0):
        self.rank = rank
        self.step, self.phase = 0, "train"
        self.totals: dict[tuple, list] = {}  # (step, phase, group, op) -> [calls, bytes, seconds]
        self._remove = None

    def mark(self, step: int, phase: str) -> None:
        """Attribute the ops that follow to (step, phase)."""
        self.step, self.phase = step, phase

    def _observe(self, event: collectives.OpEvent) -> None:
        key = (self.step, self.phase, event.group, event.op)
        row = self.totals.setdefault(key, [0, 0, 0.0])
        row[0] += 1
        row[1] += event.bytes
        row[2] += event.seconds

    def __enter__(self):
        self._remove = collectives.add_observer(self._observe)
        return self

    def __exit__(self, *exc):
        if self._remove is not None:
            self._remove()
            self._remove = None
        return False

    def rows(self) -> list[dict]:
        return [
            {"step": step, "rank": self.rank, "phase": phase, "group": group, "op": op,
             "calls": calls, "bytes": nbytes, "seconds": round(seconds, 6)}
            for (step, phase, group, op), (calls, nbytes, seconds) in self.totals.items()
        ]  # fmt: skip

    def bytes_by(self, *fields: str, phase: str | None = None) -> dict:
        """Total bytes keyed by the given row fields, e.g. bytes_by("group", "op")."""
        out: dict = {}
        for row in self.rows():
            if phase is None or row["phase"] == phase:
                key = tuple(row[f] for f in fields)
                out[key] = out.get(key, 0) + row["bytes"]
        return out

    def write(self, path: str) -> None:
        """Append the rows gathered so far to `path` and start afresh."""
        rows = self.rows()
        self.totals = {}
        if not rows:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for row in rows:
                os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)
