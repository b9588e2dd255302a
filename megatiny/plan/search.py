"""`megatiny plan --search`: rank the layouts of a world size that fit in memory by predicted
tokens/s per GPU.

Candidates: tp among the model's TP sizes within a node, pp dividing n_layers, interleaving
v in {1, 2} (pp > 1: also the split-backward schedules, zb-h1 / zb-h2 at v = 1, zb-v /
dualpipev at v = 2, each where its micro-batch count allows), context parallelism cp in
{1, 2, 4} (the config's cp_mode), sequence parallelism
(tp > 1), ZeRO levels 0-3 (dp > 1; 1 and 2 with their parameter gather overlapped), recompute
none / selective / op /
full, micro-batch 1, 2, 4, 8 or the config's, every combination that validates for the world
size at one global batch: the config's train.global_batch_size, or what it resolves to at this
world size (micro_batch_size x the config's dp), so the ranking compares layouts, not batch
sizes. A dry run costs seconds, so candidates are first ordered by a cheap bound
(fp32 weights + grads + AdamW state per rank, 4 + 4 + 8 bytes/parameter / (tp pp), each
term / dp where the ZeRO level shards it: optimizer from 1, gradients from 2, weights at 3) and the `limit` most promising (smallest model-parallel size first, the
bound under the GPU memory) are planned for real; each result is the full plan.
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


def _state_bound(c: Config, world_size: int) -> float:
    p = c.parallel
    dp = world_size // (p.tp * p.pp * p.cp)
    z = p.zero
    per_param = (4 / dp if z >= 3 else 4) + (4 / dp if z >= 2 else 4) + (8 / dp if z else 8)
    return c.model.num_parameters() * per_param / (p.tp * p.pp)


def search(cfg: Config, world_size: int, profile: dict, limit: int = 24) -> list[dict]:
    """Plans of the `limit` most promising candidates that fit, fastest first."""
    from megatiny.plan.predict import plan, usable_memory_bytes

    budget = usable_memory_bytes(profile)  # what `fits` compares the peak with
    pool = [c for c in candidates(cfg, world_size, profile) if _state_bound(c, world_size) < budget]
    rank = {"none": 0, "selective": 1, "op": 2, "full": 3}
    pool.sort(key=lambda c: (c.parallel.tp * c.parallel.pp * c.parallel.cp, rank[c.model.recompute],
                             not c.parallel.sequence_parallel, -c.parallel.zero,
                             -c.train.micro_batch_size, c.parallel.virtual_pipeline_size or 1))  # fmt: skip
    rows = []
    for c in pool[:limit]:
        result = plan(c, world_size, profile)
        result.pop("stages")
        if result["fits"]:
            rows.append(result)
    rows.sort(key=lambda r: -r["tokens_per_s_per_gpu"])
    return rows


def format_search(rows: list[dict], world_size: int, profile: dict, seconds: float) -> str:
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
    return "\n".join(lines)
