"""`megatiny plan --search`: rank the layouts of a world size that fit in memory by predicted
tokens/s per GPU.

Candidates: tp among the model's TP sizes within a node, pp dividing n_layers, interleaving
v in {1, 2} (pp > 1: also the split-backward schedules, zb-h1 / zb-h2 at v = 1, zb-v /
dualpipev at v = 2, each where its micro-batch count allows), context parallelism cp in
{1, 2, 4} (the config's cp_mode), sequence parallelism (tp > 1), ZeRO levels 0-3 (dp > 1; 1 and
2 with their parameter gather overlapped), recompute none / selective / op / full, micro-batch
1, 2, 4, 8 or the config's, every combination that validates for the world size at one global
batch: the config's train.global_batch_size, or what it resolves to at this world size
(micro_batch_size x the config's dp), so the ranking compares layouts, not batch sizes. A dry
run costs seconds, so at most `limit` (24) candidates are planned, each in full, spread over the
model-parallel shapes (tp, pp, cp) rather than spent on the smallest bounds (which put every one
at tp = pp = 1 for 70B on 64 GPUs):

1. Floor: a candidate is dropped whose cheap lower bound of the peak is over the usable memory:
   weights + fp32 gradients + AdamW state per rank (bf16: 2 + 4 + 12 bytes/parameter with the
   fp32 main weights, fp32: 4 + 4 + 8) / (tp pp), each term / dp x cp where the ZeRO level shards
   it, plus what every recompute mode keeps: each layer's input for the micro-batches in flight
   on the first stage. A shape left with no candidate is dropped.
2. Probes: the shapes by model-parallel size (cp = 1 first, then tp x pp, pp, tp), at most
   half the limit (rounded up) of them, each planned once at full recompute, the smallest
   micro-batch, SP, one chunk and the lowest ZeRO level whose floor fits (full recompute keeps
   about the floor's activations, so shapes are compared at one recompute mode and the probe
   fits where the floor says); a probe that does not fit is planned once more, tightened.
3. Successive halving: the rest goes to the fastest half of the shapes (by their fastest layout
   that fit), then the fastest quarter, ... down to one, one dry run per shape and round: a
   neighbour of the shape's fastest layout, one knob relaxed (less recompute, a lower ZeRO
   level, a larger micro-batch; a higher ZeRO level for less recompute or a larger micro-batch;
   another schedule; SP off). A neighbour is skipped, unplanned, where it holds at least the
   memory of a layout that did not fit knob by knob, or where its peak predicted from the planned
   layout (activations: the least multiple of the floor's planned for its recompute mode, or x
   the micro-batch ratio; state: + the bound's ZeRO difference) is over the memory.

Deterministic (fixed orders; ties by shape order). `explore` returns the plans of the layouts that
fit, fastest first, and a summary (how many candidates and shapes, how many under the floor, what
was planned per shape, which shapes were not); the CLI prints it under the table and adds it to
each `--json` row as "search".
"""

from __future__ import annotations

import copy
import itertools

from megatiny.config import Config, ConfigError
from megatiny.config.layout import SPLIT_SCHEDULES, V_SCHEDULES


def search_schedules(v: int) -> tuple[str, ...]:
    """The zero-bubble schedules `--search` tries beside `auto` for a pp > 1 layout of v chunks
    per rank (one chunk: the 1F1B-shaped ones; two: the V-shaped ones)."""
    return tuple(k for k in SPLIT_SCHEDULES if (k in V_SCHEDULES) == (v == 2))


def global_batch(cfg: Config, world_size: int) -> int:
    """The global batch every candidate keeps: the config's, or micro x dp of its own layout."""
    if cfg.train.global_batch_size:
        return cfg.train.global_batch_size
    return cfg.train.global_batch_size_for(cfg.parallel.data_parallel_size(world_size))


def candidates(cfg: Config, world_size: int, profile: dict) -> list[Config]:
    m, t = cfg.model, cfg.train
    batch = global_batch(cfg, world_size)
    out = []
    tps = [x for x in m.tp_sizes() if x <= profile["gpus_per_node"] and world_size % x == 0]
    pps = [x for x in range(1, m.n_layers + 1) if m.n_layers % x == 0 and world_size % x == 0]
    micro = sorted({1, 2, 4, 8, t.micro_batch_size})
    cps = sorted({1, 2, 4, cfg.parallel.cp})
    modes = ("none", "selective", "op", "full")
    for tp, pp, cp, v, sp, zero, rc, mb in itertools.product(
        tps, pps, cps, (1, 2), (False, True), (0, 1, 2, 3), modes, micro
    ):
        if (sp and tp == 1) or (v > 1 and pp == 1) or world_size % (tp * pp * cp):
            continue
        dp = world_size // (tp * pp * cp)
        if zero and dp == 1:
            continue
        c = copy.deepcopy(cfg)
        c.parallel.tp, c.parallel.pp, c.parallel.cp, c.parallel.dp = tp, pp, cp, None
        c.parallel.virtual_pipeline_size = v if v > 1 else None
        c.parallel.sequence_parallel, c.parallel.zero, c.parallel.zero1 = sp, zero, zero >= 1
        c.parallel.overlap_param_gather = zero in (1, 2)  # never slower, same bytes and memory
        c.model.recompute, c.train.micro_batch_size = rc, mb
        c.train.global_batch_size = batch
        try:
            c.validate(world_size)
            from megatiny.plan.predict import check

            check(c, world_size)
        except (ConfigError, ValueError):
            continue
        from megatiny.plan.predict import check

        for kind in ("auto",) if pp == 1 else ("auto",) + search_schedules(v):
            layout = copy.deepcopy(c)  # and the zero-bubble schedules of the same layout
            layout.parallel.pipeline_schedule = kind
            try:  # a schedule's own needs (dualpipev: m >= 2 pp micro-batches)
                check(layout, world_size)
            except (ConfigError, ValueError):
                continue
            out.append(layout)
    return out


RECOMPUTE = (
    "full",
    "op",
    "selective",
    "none",
)  # most memory last (selective keeps all but attention's core)


def _shape(c: Config) -> tuple[int, int, int]:
    return c.parallel.tp, c.parallel.pp, c.parallel.cp


def _key(c: Config) -> tuple:
    """A candidate's knobs within its shape: recompute, zero, micro-batch, (v, schedule), sp."""
    p = c.parallel
    sched = (p.virtual_pipeline_size or 1, p.pipeline_schedule or "auto")
    return c.model.recompute, p.zero, c.train.micro_batch_size, sched, p.sequence_parallel


def _heavier(k: tuple, f: tuple) -> bool:
    """Holds at least the memory of `f` knob by knob (same schedule): less recompute, a lower
    ZeRO level, a larger micro-batch, SP off."""
    return (k[3] == f[3] and RECOMPUTE.index(k[0]) >= RECOMPUTE.index(f[0]) and k[1] <= f[1]
            and k[2] >= f[2] and k[4] <= f[4])  # fmt: skip


def _state_bound(c: Config, world_size: int) -> float:
    """Weights + fp32 gradients + AdamW state per rank (bf16: 2 + 4 + 12 bytes/parameter with the
    fp32 main weights; fp32: 4 + 4 + 8), each term / dp x cp (ZeRO's group) where the ZeRO level
    shards it."""
    p, half = c.parallel, c.model.dtype == "bf16"
    dp = world_size // (p.tp * p.pp)
    z, w, o = p.zero, (2 if half else 4), (12 if half else 8)
    per_param = (w / dp if z >= 3 else w) + (4 / dp if z >= 2 else 4) + (o / dp if z else o)
    return c.model.num_parameters() * per_param / (p.tp * p.pp)


def _act_floor(c: Config, world_size: int) -> float:
    """What every recompute mode keeps on the first pipeline stage: each layer's input
    (micro-batch x seq / cp tokens x d_model, / tp under SP) for its micro-batches in flight."""
    from megatiny.training.memory import in_flight

    p, m = c.parallel, c.model
    dp = world_size // (p.tp * p.pp * p.cp)
    kind = p.pipeline_schedule or "auto"
    v = 2 if kind in V_SCHEDULES else p.virtual_pipeline_size or 1  # chunks per rank
    micro = c.train.global_batch_size // (dp * c.train.micro_batch_size)
    chunks = in_flight(p.pp, 0, micro, v, kind)
    tokens = c.train.micro_batch_size * c.data.seq_length // p.cp
    layer = tokens * m.d_model * (2 if m.dtype == "bf16" else 4) / (p.tp if _sp(c) else 1)
    return chunks * m.n_layers / (p.pp * v) * layer


def floor_bytes(c: Config, world_size: int) -> float:
    """A cheap lower bound of a candidate's peak: `_state_bound` + `_act_floor`."""
    return _state_bound(c, world_size) + _act_floor(c, world_size)


def _sp(c: Config) -> bool:  # activations split over tp (SP, or no tp)
    return c.parallel.sequence_parallel or c.parallel.tp == 1


class _Shape:
    """One (tp, pp, cp): its candidates by knobs, what was planned, the fastest that fit."""

    def __init__(self, shape: tuple, pool: list[Config], world_size: int, budget: float):
        self.shape, self.world, self.budget = shape, world_size, budget
        self.by_key, self.results, self.skipped, self.best = (
            {_key(c): c for c in pool},
            {},
            set(),
            None,
        )
        axes = list(zip(*self.by_key))
        self.axes = [sorted(set(axes[0]), key=RECOMPUTE.index), sorted(set(axes[1]), reverse=True),
                     sorted(set(axes[2])), sorted(set(axes[3])), sorted(set(axes[4]), reverse=True)]  # fmt: skip
        frugal = [c for c in pool if _key(c)[0] == "full" and _key(c)[2] == self.axes[2][0]
                  and _key(c)[3] == (1, "auto") and _key(c)[4] == self.axes[4][0]]  # fmt: skip
        # the probe: full recompute, the smallest micro-batch, SP, one chunk, the lowest ZeRO
        # level whose floor is under the budget (else the most frugal candidate of the shape)
        under = [c for c in frugal if floor_bytes(c, world_size) < budget]
        self.probe = _key(min(under, key=lambda c: c.parallel.zero)) if under else None
        if self.probe is None:
            self.probe = _key(min(pool, key=lambda c: (floor_bytes(c, world_size), _key(c)[1:3])))

    def _steps(self, key: tuple, sign: int) -> list[tuple]:
        """Keys one step along each axis from `key`: +1 relaxes (more memory, likely faster):
        recompute, ZeRO, micro-batch, then the trades (ZeRO up for less recompute or a larger
        micro-batch), then the other schedules, SP off; -1 tightens each axis."""

        def step(k: tuple, i: int, s: int) -> list[tuple]:
            axis = self.axes[i]
            if i == 3:  # schedules: every other one relaxes, back to (1, auto) tightens
                near = [x for x in axis if x != k[3]] if s > 0 else axis[:1]
            else:
                j = axis.index(k[i]) + s
                near = axis[j : j + 1] if j >= 0 else []
            return [k[:i] + (x,) + k[i + 1 :] for x in near if x != k[i]]

        if sign < 0:
            return [k for i in range(5) for k in step(key, i, -1)]
        out = [k for i in range(3) for k in step(key, i, +1)]
        out += [k for up in step(key, 1, -1) for i in (0, 2) for k in step(up, i, +1)]
        return out + [k for i in (3, 4) for k in step(key, i, +1)]

    def _predict(self, ref: tuple, k: tuple, multiple: dict) -> float | None:
        """The peak of `k` from the planned `ref`, knob by knob: activations = the least multiple
        of `_act_floor` planned for the recompute mode, or x the micro-batch's `_act_floor` ratio;
        state + the ZeRO step's `_state_bound` difference (not to or from ZeRO-3, whose transient
        differs); None where a knob has no rule (the schedule, SP, an unplanned mode)."""
        r, c, c2 = self.results[ref], self.by_key[ref], self.by_key[k]
        mem = r["memory_bytes"]
        state, act = mem["params"] + mem["grads"] + mem["optimizer"], mem["activations"]
        if k[3:] != ref[3:] or (k[1] != ref[1] and (k[1] == 3) != (ref[1] == 3)):
            return None
        state += _state_bound(c2, self.world) - _state_bound(c, self.world)
        if k[0] != ref[0]:
            if (k[0], _sp(c2)) not in multiple:
                return None
            act = multiple[k[0], _sp(c2)] * _act_floor(c2, self.world)
        else:
            act *= _act_floor(c2, self.world) / _act_floor(c, self.world)
        return state + act + r["memory_transient_bytes"]

    def next(self, multiple: dict) -> tuple | None:
        """The next candidate to plan: the probe, then the neighbours of the fastest layout that
        fit (while none fit: of those that did not, tightened first), skipping any planned, any
        that holds at least the memory of a layout that did not fit knob by knob (`_heavier`), and
        any whose `_predict`ed peak is over the budget."""
        if not self.results:
            return self.probe
        failed = [k for k, r in self.results.items() if not r["fits"]]
        if self.best is not None:
            ref = _key_of(self.best)
            steps = [(ref, k) for k in self._steps(ref, +1)]
        else:
            steps = [(f, k) for f in failed for k in self._steps(f, -1)]
            steps += [(f, k) for f in failed for k in self._steps(f, +1) if k[3] != f[3]]
        for ref, k in steps:
            if (k not in self.by_key or k in self.results or k in self.skipped
                    or any(_heavier(k, f) for f in failed)):  # fmt: skip
                continue
            peak = self._predict(ref, k, multiple)
            if peak is not None and peak > self.budget:
                self.skipped.add(k)
                continue
            return k
        return None

    def record(self, key: tuple, result: dict) -> None:
        self.results[key] = result
        if result["fits"] and (self.best is None or _speed(result) > _speed(self.best)):
            self.best = result

    def score(self) -> tuple:
        return (self.best is not None, _speed(self.best) if self.best else 0.0, bool(self.results))

    def summary(self) -> dict:
        trials = [dict(zip(("recompute", "zero", "micro_batch_size"), k[:3]),
                       virtual_pipeline_size=k[3][0], pipeline_schedule=k[3][1], sequence_parallel=k[4],
                       fits=r["fits"], peak_bytes=r["memory_bytes"]["peak"],
                       tokens_per_s_per_gpu=_speed(r)) for k, r in self.results.items()]  # fmt: skip
        return {"tp": self.shape[0], "pp": self.shape[1], "cp": self.shape[2],
                "planned": len(trials), "fit": sum(t["fits"] for t in trials),
                "skipped": len(self.skipped),
                "best_tokens_per_s_per_gpu": _speed(self.best) if self.best else None,
                "trials": trials}  # fmt: skip


def _speed(r: dict) -> float:
    return r["tokens_per_s_per_gpu"]


def _key_of(r: dict) -> tuple:
    a = r["layout"]
    sched = (a["virtual_pipeline_size"], a.get("pipeline_schedule") or "auto")
    return a["recompute"], a["zero"], a["micro_batch_size"], sched, a["sequence_parallel"]


def explore(cfg: Config, world_size: int, profile: dict, limit: int = 24) -> tuple[list, dict]:
    """The plans of at most `limit` candidates spread over the model-parallel shapes (module
    docstring), those that fit fastest first, and a summary of what was and was not planned."""
    from megatiny.plan.predict import plan, usable_memory_bytes

    budget = usable_memory_bytes(profile)  # what `fits` compares the peak with
    every = candidates(cfg, world_size, profile)
    pool = [c for c in every if floor_bytes(c, world_size) < budget]
    groups: dict[tuple, list[Config]] = {}
    for c in pool:
        groups.setdefault(_shape(c), []).append(c)
    order = sorted(groups, key=lambda s: (s[2], s[0] * s[1], s[1], s[0]))  # cp last, small mp first
    shapes = [_Shape(s, groups[s], world_size, budget) for s in order]
    rows, multiple, width = [], {}, max(1, min(len(shapes), (limit + 1) // 2))

    def run(sh: _Shape, key: tuple) -> None:
        c, result = sh.by_key[key], plan(sh.by_key[key], world_size, profile)
        result.pop("stages")
        sh.record(key, result)
        x = result["memory_bytes"]["activations"] / _act_floor(c, world_size)
        multiple[key[0], _sp(c)] = min(multiple.get((key[0], _sp(c)), x), x)
        if result["fits"]:
            rows.append(result)

    planned = 0
    for sh in shapes[:width]:  # a probe per shape, smallest model-parallel size first; one that
        for _ in range(2):  # does not fit is tried once more, tightened
            key = sh.next(multiple)
            if planned >= limit or key is None or sh.best is not None:
                break
            run(sh, key)
            planned += 1
    while planned < limit:  # successive halving: the fastest half of the shapes, then a quarter
        width = max(1, (width + 1) // 2)
        ranked = sorted(shapes, key=lambda sh: sh.score(), reverse=True)  # stable: `order` on ties
        todo = [sh for sh in ranked if sh.next(multiple) is not None][:width]
        if not todo:
            break
        for sh in todo:
            key = sh.next(multiple)
            if planned < limit and key is not None:
                run(sh, key)
                planned += 1
    rows.sort(key=lambda r: (-_speed(r), sorted(r["layout"].items())))
    summary = {
        "candidates": len(every), "shapes": len({_shape(c) for c in every}),
        "candidates_under_floor": len(pool), "shapes_under_floor": len(shapes),
        "limit": limit, "planned": planned, "skipped": sum(len(sh.skipped) for sh in shapes),
        "planned_shapes": [sh.summary() for sh in shapes if sh.results],
        "unplanned_shapes": [list(sh.shape) for sh in shapes if not sh.results],
    }  # fmt: skip
    return rows, summary


def search(cfg: Config, world_size: int, profile: dict, limit: int = 24) -> list[dict]:
    """Plans of at most `limit` candidates that fit, fastest first (`explore` without its
    summary)."""
    return explore(cfg, world_size, profile, limit)[0]


def format_search(
    rows: list[dict], world_size: int, profile: dict, seconds: float, summary: dict | None = None
) -> str:
    head = (f"{'tp':>3} {'pp':>3} {'v':>2} {'cp':>3} {'dp':>4} {'sp':>3} {'zero':>4} "
            f"{'schedule':>11} {'recompute':>9} {'mb':>3} {'gbs':>5} {'peak GiB':>9} {'step s':>8} {'tok/s/gpu':>10} {'MFU':>6}")  # fmt: skip
    batch = (
        f" at a global batch of {rows[0]['layout']['global_batch_size']} sequences" if rows else ""
    )
    from megatiny.plan.predict import usable_memory_bytes

    lines = [f"layouts of {world_size} ranks on {profile['name']} that fit in "
             f"{usable_memory_bytes(profile) / 2**30:.1f} of {profile['memory_gib']} GiB (the rest "
             f"reserved){batch}, fastest first ({seconds:.0f} s):", head]  # fmt: skip
    for r in rows:
        a = r["layout"]
        lines.append(
            f"{a['tp']:>3} {a['pp']:>3} {a['virtual_pipeline_size']:>2} {a['cp']:>3} {a['dp']:>4} "
            f"{'y' if a['sequence_parallel'] else 'n':>3} {a.get('zero', int(a['zero1'])):>4} "
            f"{a.get('pipeline_schedule', 'auto') if a['pp'] > 1 else '-':>11} "
            f"{a['recompute']:>9} {a['micro_batch_size']:>3} {a['global_batch_size']:>5} "
            f"{r['memory_bytes']['peak'] / 2**30:>9.2f} {r['time_s']['step']:>8.3g} "
            f"{r['tokens_per_s_per_gpu']:>10,.0f} {100 * r['mfu']:>5.1f}%"
        )
    if not rows:
        lines.append("(none fits: add ranks, or lower train.micro_batch_size / seq_length)")
    return "\n".join(lines + (format_summary(summary) if summary else []))


def format_summary(s: dict) -> list[str]:
    """What the search planned and what it did not, shape by shape."""
    out = [f"searched {s['candidates']:,} candidate layouts in {s['shapes']} shapes (tp x pp x cp); "
           f"{s['candidates_under_floor']:,} in {s['shapes_under_floor']} shapes under the memory "
           f"floor; planned {s['planned']} (limit {s['limit']}) in {len(s['planned_shapes'])} "
           "shapes" + (":" if s["planned_shapes"] else "")]  # fmt: skip
    if s["planned_shapes"]:
        out.append("   tp x pp x cp  planned  fit  best tok/s/gpu")
    for g in s["planned_shapes"]:
        best = f"{g['best_tokens_per_s_per_gpu']:,.0f}" if g["fit"] else "-"
        shape = f"{g['tp']:>2} x {g['pp']:>2} x {g['cp']}"
        out.append(f"  {shape:>12}  {g['planned']:>7}  {g['fit']:>3}  {best:>14}")
    if s["unplanned_shapes"]:
        names = " ".join("x".join(map(str, x)) for x in s["unplanned_shapes"])
        out.append(f"not planned ({len(s['unplanned_shapes'])} shapes): {names}")
    return out
