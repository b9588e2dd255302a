"""Run a pipeline schedule (megatiny.parallel.schedule_ir) on paper: makespan, idle, memory.

    from megatiny.parallel.schedule_ir import generate
    from megatiny.parallel.schedule_sim import simulate
    result = simulate(generate("zb-h1", p=4, m=8), costs={"F": 1, "B": 1, "W": 1})
    result.bubble            # 3 / 24 = (p-1) / 3m

Semantics (the executor's): each rank runs its actions in order, from time 0. A compute action
takes `cost(op, stage)` (BW = B + W unless given); consecutive SEND / RECV actions form one batch,
posted together: its sends are available to the receiver at once (plus `latency`), and the batch
ends when its last receive has arrived. A send never waits for its receiver.

Definitions. busy_r = the compute time of rank r; makespan = when the last rank ends;
idle_r = makespan - busy_r; C = max_r busy_r (the ranks' work, equal when the stages are);

    bubble fraction = (makespan - C) / C

so with F = B = W = 1 (chunk costs divided by v): 1F1B / GPipe (p-1)/m, interleaved (p-1)/(vm),
ZB-H1 (p-1)/(3m) (m >= p). Activations in flight on a rank: chunk micro-batches whose F ran and
whose B (or BW) did not; `peak_activations` is their peak over v, in units of one 1F1B stage's
micro-batch. Between B and W a micro-batch keeps only what W needs (each linear's input X and
output gradient dY): `peak_stashed` counts those chunk micro-batches separately.

Errors (ScheduleError) name the rank and action: a compute without its input (F before the
activation it needs, B before its F or before the gradient it needs, W before its B), an action
on a rank that does not hold its stage, an action twice or never, a SEND of something not yet
computed, channels whose send and receive orders differ, and a deadlock (every unfinished rank
waits for a message that no rank will send first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatiny.config.layout import V_SCHEDULES
from megatiny.parallel.schedule_ir import COMPUTE, Schedule


class ScheduleError(ValueError):
    """A schedule that would deadlock or break a dependency; the message names rank and action."""


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_in_flight: list[int]  # chunk micro-batches between F and B (or BW)
    peak_stashed: list[int]  # chunk micro-batches between B and W (the linears' X and dY)
    v: int
    end: list[float] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        c = max(self.busy)
        return (self.makespan - c) / c if c else 0.0

    @property
    def peak_activations(self) -> list[float]:
        return [n / self.v for n in self.peak_in_flight]


def _cost_fn(costs):
    if callable(costs):
        return costs
    table = {"F": 1.0, "B": 1.0, "W": 1.0}
    table.update(costs or {})
    table.setdefault("BW", table["B"] + table["W"])
    return lambda op, stage: table[op]


def check_channels(schedule: Schedule) -> None:
    """Each directed channel receives exactly what it sends, in the same order."""
    sends, recvs = {}, {}
    for r, acts in enumerate(schedule.actions):
        for a in acts:
            if a.op == "SEND":
                sends.setdefault((r, a.peer), []).append(a)
            elif a.op == "RECV":
                recvs.setdefault((a.peer, r), []).append(a)
    for key in sorted(set(sends) | set(recvs)):
        src, dst = key
        s, r = sends.get(key, []), recvs.get(key, [])
        for k in range(max(len(s), len(r))):
            sm = s[k].message() if k < len(s) else None
            rm = r[k].message() if k < len(r) else None
            if sm != rm:
                raise ScheduleError(
                    f"channel rank {src} -> rank {dst}, message {k}: rank {src} sends "
                    f"{s[k] if sm else 'nothing'} but rank {dst} receives "
                    f"{r[k] if rm else 'nothing'} (messages match in posting order)"
                )


def simulate(schedule: Schedule, costs=None, latency: float = 0.0) -> SimResult:
    """Run `schedule` with per-action costs (a dict by op, or `cost(op, stage)`); see module doc."""
    cost = _cost_fn(costs)
    check_channels(schedule)
    p, n = schedule.p, schedule.num_stages
    placement = schedule.placement
    acts = schedule.actions
    idx, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    done = [dict() for _ in range(p)]  # (op, mb, stage) -> end time, per rank
    have = [set() for _ in range(p)]  # messages received
    sent = {}  # message -> time available at the receiver
    in_flight, peak, stashed, peak_stash = [0] * p, [0] * p, [0] * p, [0] * p

    def fail(r, a, why):
        raise ScheduleError(f"rank {r}, action {idx[r]} {a}: {why}")

    def compute(r, a):
        key = (a.op, a.mb, a.stage)
        if placement[a.stage] != r:
            fail(r, a, f"stage {a.stage} runs on rank {placement[a.stage]}, not here")
        if not 0 <= a.mb < schedule.m:
            fail(r, a, f"micro-batch {a.mb} is not in 0..{schedule.m - 1}")
        mine = done[r]
        if (
            key in mine
            or (a.op in ("B", "W") and ("BW", a.mb, a.stage) in mine)
            or (a.op == "BW" and (("B", a.mb, a.stage) in mine or ("W", a.mb, a.stage) in mine))
        ):
            fail(r, a, "runs twice")
        s = a.stage
        if a.op == "F" and s > 0:
            local = placement[s - 1] == r
            if not (("F", a.mb, s - 1) in mine if local else ("act", a.mb, s - 1) in have[r]):
                how = f"F(mb {a.mb}, stage {s - 1})" if local else "a RECV of it"
                fail(r, a, f"needs the activation of stage {s - 1}: no {how} before it")
        if a.op in ("B", "BW"):
            if ("F", a.mb, s) not in mine:
                fail(r, a, "backward before its forward")
            if s < n - 1:
                local = placement[s + 1] == r
                ok = (("B", a.mb, s + 1) in mine or ("BW", a.mb, s + 1) in mine) if local else (
                    ("grad", a.mb, s + 1) in have[r])  # fmt: skip
                if not ok:
                    fail(r, a, f"needs the output gradient from stage {s + 1}, not there yet")
        if a.op == "W" and ("B", a.mb, s) not in mine:
            fail(r, a, "W before its B")
        clock[r] += cost(a.op, s)
        busy[r] += cost(a.op, s)
        mine[key] = clock[r]
        if a.op == "F":
            in_flight[r] += 1
            peak[r] = max(peak[r], in_flight[r])
        elif a.op in ("B", "BW"):
            in_flight[r] -= 1
        if a.op == "B":
            stashed[r] += 1
            peak_stash[r] = max(peak_stash[r], stashed[r])
        elif a.op == "W":
            stashed[r] -= 1

    posted = [-1] * p  # index of the batch whose sends rank r has posted

    def batch(r) -> bool:
        """Post rank r's comm batch at idx[r] (its sends at once); False while a receive of it
        has not been sent yet."""
        k = idx[r]
        while k < len(acts[r]) and acts[r][k].op not in COMPUTE:
            k += 1
        group = acts[r][idx[r] : k]
        if posted[r] != idx[r]:
            posted[r] = idx[r]
            for a in group:
                if a.op == "SEND":
                    producer = ("B", "BW") if a.grad else ("F",)
                    if not any((op, a.mb, a.stage) in done[r] for op in producer):
                        fail(r, a, "sends what this rank has not computed yet")
                    sent[a.message()] = clock[r] + latency
        arrive = clock[r]
        for a in group:
            if a.op == "RECV":
                if a.message() not in sent:
                    return False
                arrive = max(arrive, sent[a.message()])
        have[r].update(a.message() for a in group if a.op == "RECV")
        clock[r] = arrive
        idx[r] = k
        return True

    def step(r, a) -> bool:
        if a.op not in COMPUTE:
            return batch(r)
        compute(r, a)
        idx[r] += 1
        return True

    _sweep(acts, idx, step)
    stuck = [r for r in range(p) if idx[r] < len(acts[r])]
    if stuck:
        waits = "; ".join(f"rank {r} waits at action {idx[r]} {acts[r][idx[r]]}" for r in stuck)
        raise ScheduleError(f"deadlock: {waits} (no rank sends first)")
    for r in range(p):
        for s in schedule.stages_of(r):
            for mb in range(schedule.m):
                ran = {op for op in COMPUTE if (op, mb, s) in done[r]}
                if "F" not in ran or not (ran >= {"B", "W"} or "BW" in ran):
                    missing = "F" if "F" not in ran else ("W" if "B" in ran else "B/BW")
                    raise ScheduleError(
                        f"rank {r} never runs {missing}(mb {mb}, stage {s}): every micro-batch "
                        "needs F and either BW or B then W on every stage"
                    )
    makespan = max(clock)
    idle = [makespan - b for b in busy]
    return SimResult(makespan, busy, idle, peak, peak_stash, schedule.v, list(clock))


def simulate_forward(schedule: Schedule, costs=None, latency: float = 0.0) -> float:
    """Makespan of a forward-only schedule (no backward checks)."""
    cost = _cost_fn(costs)
    check_channels(schedule)
    p = schedule.p
    clock = [0.0] * p
    sent, idx = {}, [0] * p
    acts = schedule.actions

    def step(r, a) -> bool:
        if a.op == "RECV":
            if a.message() not in sent:
                return False
            clock[r] = max(clock[r], sent[a.message()])
        elif a.op == "SEND":
            sent[a.message()] = clock[r] + latency
        else:
            clock[r] += cost(a.op, a.stage)
        idx[r] += 1
        return True

    _sweep(acts, idx, step)
    if any(idx[r] < len(acts[r]) for r in range(p)):
        raise ScheduleError("deadlock in the forward-only schedule")
    return max(clock)


def bubble_seconds(kind: str, p: int, m: int, v: int, t_microbatch: float) -> float:
    """Idle time of a step's critical rank under schedule `kind` ("auto": interleaved when v > 1,
    else 1f1b): makespan minus compute, with a stage's micro-batch (F + B + W) costing
    `t_microbatch` split F = B = W (a chunk 1/v of it). The fill and drain do not grow with m
    (m >= p), so m is simulated up to 2p (a multiple of p) and the idle time taken from there."""
    from megatiny.parallel.schedule_ir import generate

    if p <= 1:
        return 0.0
    if kind == "auto":
        kind = "interleaved" if v > 1 else "1f1b"
    v = 2 if kind in V_SCHEDULES else (v if kind == "interleaved" else 1)
    m_sim = min(m, 2 * p) if kind != "interleaved" else p * max(1, min(m, 2 * p) // p)
    unit = t_microbatch / (3 * v)
    res = simulate(generate(kind, p, m_sim, v), {"F": unit, "B": unit, "W": unit})
    return res.makespan - max(res.busy)


def _sweep(acts, idx, step) -> None:
    """Advance every rank through its actions while `step(rank, action)` can take the next one
    (it returns False to wait), sweeping the ranks until a sweep moves none."""
    progress = True
    while progress:
        progress = False
        for r in range(len(acts)):
            while idx[r] < len(acts[r]) and step(r, acts[r][idx[r]]):
                progress = True


def peak_bytes(schedule: Schedule, rank: int, activation, stash=None) -> float:
    """The most bytes `rank` holds for its micro-batches over its compute order (no timing
    needed): activation[c] for each chunk-c micro-batch between its F and its B (or BW), then
    stash[c] until its W (the linears' X and dY; 0 if None)."""
    chunks = schedule.stages_of(rank)
    held = peak = 0.0
    for a in schedule.actions[rank]:
        if a.op not in COMPUTE:
            continue
        c = chunks.index(a.stage)
        s = 0.0 if stash is None else stash[c]
        held += {"F": activation[c], "B": s - activation[c], "BW": -activation[c], "W": -s}[a.op]
        peak = max(peak, held)
    return peak
