"""Pipeline schedules as data: for each pipeline rank an ordered list of actions.

    F(mb, s)      forward of virtual stage s on micro-batch mb
    B(mb, s)      its input-gradient backward (dX only; the linears stash (X, dY) for W)
    W(mb, s)      its weight-gradient backward (the stashed dW GEMMs; frees the stash)
    BW(mb, s)     the whole backward (B and W at once)
    SEND / RECV   a message to / from `peer`: the activation `stage` sends to stage + 1
                  (grad=False) or the input gradient `stage` sends to stage - 1 (grad=True)

There are S = p * v virtual stages; `placement[s]` is the rank that runs stage s. Megatron's
layout puts s on rank s % p (chunk s // p); the V layout of ZB-V puts stages r and 2p-1-r on rank r,
so the turn from stage p-1 to p stays on the last rank (no message). A rank's chunk c is its c-th
lowest stage.

A generator returns each rank's *compute* order (F / B / W / BW); `with_communication` inserts the
messages: a RECV right before the first compute that needs it, a SEND right after the compute that
produced it. Messages between two ranks are matched in the order they are posted (NCCL ignores
tags), so each directed channel is a FIFO: before a rank receives message k of a channel it
receives messages 0 .. k-1 of it (held until their compute runs). Sends never wait for their
receiver (the executor waits for them at the end of the step), so a schedule deadlocks only
through a cycle of receives; `megatiny.parallel.schedule_sim.simulate` finds one, or a broken
dependency, and names the rank and action.

The schedules (p ranks, m micro-batches, v chunks per rank):
- `gpipe`: all forwards, then all backwards.
- `1f1b`: rank r runs min(p-r-1, m) warm-up forwards, then one forward / one backward, then drains.
- `interleaved`: Megatron's interleaved 1F1B over v chunks (m % p == 0).
- `zb-h1` (Qi et al., Zero Bubble Pipeline Parallelism, 2024): 1F1B with the backward split; the
  W passes of rank r trail its B passes by p-1-r, filling the drain where 1F1B idles. Bubble
  (p-1)(F+B-W), a third of 1F1B's with F = B = W; activations of at most p-r micro-batches.
- `zb-h2` (the same paper): 2(p-r)-1 micro-batches between F and B on rank r (2p-1 between F and
  W), so its warm-up forwards fill the wait for the first B; for m >= 2p-1 each rank runs without
  a gap from its first action to its last, and the bubble is (p-1)F: the last rank's first wait.
- `zb-v`: two chunks per rank in a V, ordered by a greedy list scheduler (B first, then F while
  under the 1F1B activation budget of 2p chunk micro-batches, else W).
- `dualpipev` (DeepSeek's DualPipeV): the same V, in DualPipeV's phases; m >= 2p.
The zero-bubble orders are in `schedule_zb` (`greedy_split_orders`, `dualpipev`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from megatiny.config.layout import SCHEDULES, V_SCHEDULES, min_micro_batches
from megatiny.parallel import schedule_zb

COMPUTE = ("F", "B", "W", "BW")


class Action(NamedTuple):
    op: str  # F B W BW SEND RECV
    mb: int
    stage: int
    grad: bool = False  # SEND / RECV: an input gradient (to stage - 1), else an activation
    peer: int = -1  # SEND / RECV: the other rank

    def message(self) -> tuple[str, int, int]:
        """The message a SEND / RECV moves: ("act" | "grad", mb, producing stage)."""
        return ("grad" if self.grad else "act", self.mb, self.stage)

    def __str__(self) -> str:
        if self.op in COMPUTE:
            return f"{self.op}(mb {self.mb}, stage {self.stage})"
        to = self.stage - 1 if self.grad else self.stage + 1
        what = "grad" if self.grad else "act"
        where = "to" if self.op == "SEND" else "from"
        return f"{self.op} {what}(mb {self.mb}, stage {self.stage}->{to}) {where} rank {self.peer}"


@dataclass
class Schedule:
    """A pipeline schedule: `actions[r]` is rank r's ordered list (see the module docstring)."""

    name: str
    p: int
    m: int
    v: int
    placement: tuple[int, ...]  # rank of each virtual stage
    actions: list[list[Action]]

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    def stages_of(self, rank: int) -> list[int]:
        return sorted(s for s, r in enumerate(self.placement) if r == rank)

    def chunk_of(self, stage: int) -> int:
        return self.stages_of(self.placement[stage]).index(stage)

    def splits_backward(self) -> bool:
        return any(a.op == "W" for rank in self.actions for a in rank)

    def __str__(self) -> str:
        rows = [f"{self.name} p={self.p} m={self.m} v={self.v}"]
        for r, acts in enumerate(self.actions):
            rows.append(f"rank {r}: " + " ".join(str(a) for a in acts if a.op in COMPUTE))
        return "\n".join(rows)


def interleaved_placement(p: int, v: int = 1) -> tuple[int, ...]:
    return tuple(s % p for s in range(p * v))


def v_placement(p: int) -> tuple[int, ...]:
    return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))


def placement_for(name: str, p: int, v: int) -> tuple[int, ...]:
    return v_placement(p) if name in V_SCHEDULES else interleaved_placement(p, v)


def stage_placement(name: str) -> str:
    """build_pipeline's `placement` for a schedule: "v" for the V schedules, else "interleaved"."""
    return "v" if name in V_SCHEDULES else "interleaved"


# ------------------------------------------------------------------ compute orders per rank
def _gpipe(p, m, v):
    return [[("F", i, r) for i in range(m)] + [("BW", i, r) for i in range(m)] for r in range(p)]


def _one_f_one_b(p, m, v):
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        order = [("F", i, r) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", warmup + i, r), ("BW", i, r)]
        orders.append(order + [("BW", i, r) for i in range(m - warmup, m)])
    return orders


def _interleaved(p, m, v):
    total = v * m
    orders = []

    def stage_mb(k, r, forward):
        c = (k % (p * v)) // p
        c = c if forward else v - 1 - c
        return (k // (p * v)) * p + k % p, c * p + r

    for r in range(p):
        warmup = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [("F", *stage_mb(k, r, True)) for k in range(warmup)]
        for k in range(total - warmup):
            order.append(("F", *stage_mb(k + warmup, r, True)))
            order.append(("BW", *stage_mb(k, r, False)))
        order += [("BW", *stage_mb(k, r, False)) for k in range(total - warmup, total)]
        orders.append(order)
    return orders


def _split(orders, v_shaped: bool = False):
    """A generator of schedule_zb's orders(p, m, placement) on the interleaved (v = 1) or V
    placement."""
    return lambda p, m, v: orders(p, m, v_placement(p) if v_shaped else interleaved_placement(p))


GENERATORS = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved": _interleaved,
    "zb-h1": _split(schedule_zb.zb_h1),
    "zb-h2": _split(schedule_zb.zb_h2),
    "zb-v": _split(schedule_zb.zb_v, v_shaped=True),
    "dualpipev": lambda p, m, v: schedule_zb.dualpipev(p, m),
}


def _needs(op, mb, s, placement, r):
    """Messages compute (op, mb, s) on rank r must receive first."""
    n = len(placement)
    if op == "F" and s > 0 and placement[s - 1] != r:
        return [("act", mb, s - 1)]
    if op in ("B", "BW") and s < n - 1 and placement[s + 1] != r:
        return [("grad", mb, s + 1)]
    return []


def _makes(op, mb, s, placement, r):
    """(message, destination rank) that compute (op, mb, s) on rank r sends."""
    n = len(placement)
    if op == "F" and s < n - 1 and placement[s + 1] != r:
        return [(("act", mb, s), placement[s + 1])]
    if op in ("B", "BW") and s > 0 and placement[s - 1] != r:
        return [(("grad", mb, s), placement[s - 1])]
    return []


def with_communication(name, p, m, v, placement, orders) -> Schedule:
    """The Schedule of these compute orders with its SEND / RECV actions (module docstring)."""
    channel = {}  # (src, dst) -> messages in send order
    source = {}  # message -> src
    for r, order in enumerate(orders):
        for op, mb, s in order:
            for msg, dst in _makes(op, mb, s, placement, r):
                channel.setdefault((r, dst), []).append(msg)
                source[msg] = r
    actions = []
    for r, order in enumerate(orders):
        received = {}  # src -> how many of its channel's messages this rank has received
        acts = []
        for op, mb, s in order:
            for msg in _needs(op, mb, s, placement, r):
                src = source.get(msg)
                if src is None:  # never sent: the simulator reports the missing dependency
                    continue
                queue, k = channel[(src, r)], received.get(src, 0)
                if msg in queue[:k]:
                    continue
                upto = queue.index(msg) + 1
                for kind, i, st in queue[k:upto]:
                    acts.append(Action("RECV", i, st, kind == "grad", src))
                received[src] = upto
            acts.append(Action(op, mb, s))
            for (kind, i, st), dst in _makes(op, mb, s, placement, r):
                acts.append(Action("SEND", i, st, kind == "grad", dst))
        actions.append(acts)
    return Schedule(name, p, m, v, tuple(placement), actions)


def generate(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The IR of a named schedule (SCHEDULES) for p ranks, m micro-batches, v chunks per rank."""
    if name not in GENERATORS:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")
    if name in V_SCHEDULES and v not in (None, 1, 2):  # 1: unset
        raise ValueError(f"{name} runs two chunks per rank in a V; got virtual_pipeline_size={v}")
    v = 2 if name in V_SCHEDULES else (v or 1)
    if name == "interleaved" and (v < 2 or m % p):
        raise ValueError(
            f"the interleaved schedule needs v >= 2 chunks per rank (got {v}) and m a multiple "
            f"of p={p} (got {m})"
        )
    if m < min_micro_batches(name, p):
        raise ValueError(
            f"{name} needs at least 2p = {min_micro_batches(name, p)} micro-batches for p={p} "
            f"pipeline ranks (got m={m}); raise the global batch or lower the micro-batch size"
        )
    if name not in ("interleaved",) + V_SCHEDULES and v != 1:
        raise ValueError(f"{name!r} runs one chunk per rank; use 'interleaved' for v={v}")
    placement = placement_for(name, p, v)
    return with_communication(name, p, m, v, placement, GENERATORS[name](p, m, v))


def forward_only(placement, p: int, m: int, name: str = "forward") -> Schedule:
    """Evaluation for any m: each micro-batch walks the virtual stages in order (the sends do
    not wait, so consecutive micro-batches still overlap across ranks)."""
    orders = [[] for _ in range(p)]
    for mb in range(m):
        for s, r in enumerate(placement):
            orders[r].append(("F", mb, s))
    return with_communication(name, p, m, len(placement) // p, placement, orders)
