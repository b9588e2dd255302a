"""The time model: turns what the dry run counted (FLOPs, bytes moved, collectives) into seconds.

Per pipeline stage, one micro-batch (forward + backward, recomputation included — the dry run
ran it):

    t_compute = matmul FLOPs / (peak x matmul_efficiency)
              + attention FLOPs / 2 / (peak x attention_efficiency)   causal: flash kernels skip
                                                                      the masked half of s x s
              + other bytes / (HBM bandwidth x memory_efficiency)      memory-bound ops
              + transcendental bytes / (transcendental_gb_per_s, else     exp, softmax, SiLU...:
                HBM bandwidth x memory_efficiency)                       compute-bound on CPUs
              + ops x op_overhead_us                                   dispatch cost per op
                                                                       (CPU eager; 0 on GPUs,
                                                                       where launches are async)
    t_tp      = sum over TP collectives of  max(0, latency + bytes x f / bandwidth - window)
                f = 2(n-1)/n all-reduce, (n-1)/n all-gather / reduce-scatter (ring bus factors),
                bytes = the full tensor (the tracer's convention); window = the GEMM / attention
                time the rank issues while the collective is in flight (the dry run measures it
                per collective: 0 for a blocking one; the sequence-parallel linear's backward
                re-gather and reduce-scatter hide behind its dX and dA GEMMs)

Links: a group whose ranks sit in one node (ranks r // gpus_per_node equal) uses the intra-node
link (NVLink), else the inter-node one (InfiniBand, per GPU); bandwidth = gb_per_s x efficiency;
a link's optional `op_scale` multiplies an op's bus factor (calibrated for gloo, whose
reduce-scatter costs more than its all-reduce).

Per step (m micro-batches, p stages, v chunks per stage, the slowest stage sets the pace):

    t_mb      = t_compute + t_tp                                     of the slowest stage
    bubble    = the simulated idle time of the pipeline schedule (parallel/schedule_sim.py;
                (p - 1) / v x t_mb for 1F1B / interleaved, a third of it for zb-h1)
                x (1 - filled): on a CPU profile with more ranks than cores the idle stages'
                cores go to the busy ranks, filled = min(1, world / p / cores), else 0
    pp        = sends per step x (latency + message / bandwidth)     blocking p2p, exposed
    dp        = gradient reduction (all-reduce, or ZeRO-1 reduce-scatter) overlapped with the
                last micro-batch's backward (2/3 of its compute): exposed = max(t - overlap,
                t / buckets); ZeRO-1's parameter all-gather: exposed, or with
                parallel.overlap_param_gather max(0, t - the first forward, 1/3 of t_compute);
                the grad-norm and tied-embedding all-reduces: exposed; ZeRO-2/3's per-micro-
                batch reduce-scatters and ZeRO-3's per-block gathers: each call minus the
                compute between its post and its wait in the dry run (as t_tp)
    optimizer = the optimizer step's bytes / (HBM bandwidth x memory_efficiency)
    step      = m x t_mb + bubble + pp + dp + optimizer

CPU profiles set `comm_overlaps_compute: false`: gloo's copies, reductions and socket work run on
the cores the ranks compute on, so no collective is hidden (every window above is 0).
CPU profiles (`cores`): ranks beyond the core count share them, so a rank's compute and memory
rates are multiplied by min(1, cores / world_size). A calibrated CPU profile carries `by_world`:
every rate and gloo figure measured with N ranks running at once (N = 1, 2, 4, 8); the plan of a
world size takes the entry of the largest N <= world size and shares the cores beyond it
(`for_world`).

MFU = model FLOPs per step (`ModelConfig.flops_per_token`, Megatron's convention: matmuls only,
no recomputation, full s x s attention) / (world_size x step x peak).
"""

from __future__ import annotations

import os

import yaml

from megatiny.parallel.schedule_sim import bubble_seconds

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")
CALIBRATED = os.path.join("runs", "cpu-calibrated.yaml")


def load_profile(name: str) -> dict:
    """A hardware profile by name (megatiny/plan/profiles/NAME.yaml) or a YAML path; `cpu` means
    runs/cpu-calibrated.yaml when `--calibrate` has written it."""
    if name == "cpu" and os.path.exists(CALIBRATED):
        path = CALIBRATED
    elif os.path.exists(name):
        path = name
    else:
        path = os.path.join(PROFILE_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".yaml"))
        raise ValueError(f"unknown GPU profile {name!r}; choose one of {known} or a YAML path")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def for_world(profile: dict, world_size: int) -> dict:
    """The profile as one rank of `world_size` meets it: a calibrated `by_world` entry (rates
    measured with that many ranks at once) laid over the top-level figures, and `share`, the
    fraction of the entry's per-rank rates left when more ranks than that share the cores."""
    out = dict(profile)
    measured = [n for n in profile.get("by_world", {}) if int(n) <= world_size]
    n = max(measured, key=int) if measured else None
    if n is not None:
        out.update(profile["by_world"][n])
    cores = profile.get("cores", world_size)
    out["share"] = min(1.0, max(cores, int(n or 1)) / world_size)
    return out


def _affine(runs, get):
    """(per micro-batch, per step) from two runs of m1 < m2 micro-batches."""
    (m1, y1), (m2, y2) = ((r["m"], get(r)) for r in runs)
    slope = (y2 - y1) / (m2 - m1)
    return slope, y1 - slope * m1


def comm_per_step(stage: dict, m: int) -> list[dict]:
    """The stage's collectives for a step of m micro-batches: rows {group, op, calls, bytes}."""
    keys = {(r["group"], r["op"]) for run in stage["runs"] for r in run["comm"]}
    out = []
    for group, op in sorted(keys):

        def get(run, field, g=group, o=op):
            return sum(r[field] for r in run["comm"] if r["group"] == g and r["op"] == o)

        row = {"group": group, "op": op}
        for field in ("calls", "bytes"):
            slope, base = _affine(stage["runs"], lambda r, f=field: get(r, f))
            row[field] = int(round(base + slope * m))
        out.append(row)
    return out


def ops_per_micro_batch(stage: dict) -> dict[str, float]:
    """FLOPs and bytes of one micro-batch (slope in m of the schedule phase)."""
    out = {}
    for key in ("matmul_flops", "attention_flops", "bytes", "transcendental_bytes", "ops"):
        slope, _ = _affine(stage["runs"], lambda r, k=key: r["ops"]["micro_batches"].get(k, 0))
        out[key] = slope
    return out


def _link(profile: dict, ranks: list[int]) -> dict:
    g = profile["gpus_per_node"]
    intra = len({r // g for r in ranks}) == 1
    return profile["links"]["intra_node" if intra else "inter_node"]


def collective_seconds(op: str, calls: int, nbytes: int, n: int, link: dict) -> float:
    if n <= 1 or calls == 0:
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
              "reduce_scatter": (n - 1) / n, "all_to_all": (n - 1) / n}.get(op, 1.0)  # fmt: skip
    factor *= link.get("op_scale", {}).get(op, 1.0)  # a backend's measured departure (gloo)
    bandwidth = link["gb_per_s"] * 1e9 * link["efficiency"]
    return calls * link["latency_us"] * 1e-6 + nbytes * factor / bandwidth


def _group_ranks(stage: dict, group: str, world_size: int) -> list[int]:
    ranks = stage["ranks"]
    if group in ranks:
        return ranks[group]
    if group == "dp_cp":
        return ranks["dp"]
    if group == "embedding":
        return [ranks["pp"][0], ranks["pp"][-1]]
    return list(range(world_size))  # mp / world: assume the widest span


def stage_times(stage: dict, profile: dict, cfg, world_size: int) -> dict:
    """Seconds of one micro-batch (compute, tp) and the per-step comm of one stage."""
    dtype = "bf16" if cfg.train.precision == "bf16" else "fp32"
    share = profile["share"]
    peak = profile["peak_tflops"][dtype] * 1e12 * share
    hbm = profile["hbm_gb_per_s"] * 1e9 * profile["memory_efficiency"] * share
    ops = ops_per_micro_batch(stage)
    compute = (
        ops["matmul_flops"] / (peak * profile["matmul_efficiency"])
        + ops["attention_flops"] / 2 / (peak * profile["attention_efficiency"])
        + ops["bytes"] / hbm
        + ops["transcendental_bytes"]
        / (profile.get("transcendental_gb_per_s", 0) * 1e9 * share or hbm)  # fmt: skip
        + ops["ops"] * profile.get("op_overhead_us", 0.0) * 1e-6
    )
    m = cfg.train.accumulation_steps(stage["group_sizes"]["dp"])
    sizes = stage["group_sizes"]
    rates = (peak * profile["matmul_efficiency"], 2 * peak * profile["attention_efficiency"])
    overlaps = profile.get("comm_overlaps_compute", True)
    if not overlaps:  # the collective's work needs the cores the GEMMs run on: no window
        rates = (float("inf"), float("inf"))
    tp, tp_hidden = _overlapped_seconds(stage, profile, world_size, m, rates, "tp")
    cp, cp_hidden = _overlapped_seconds(stage, profile, world_size, m, rates, "cp")
    pp = dp_overlap = dp_exposed = 0.0
    buckets = 1
    # ZeRO-2/3 reduce-scatter every micro-batch's buckets as backward fills them and ZeRO-3
    # gathers each block while the one before computes: each call minus the compute the dry
    # run saw between its post and its wait, as for tp
    zero = getattr(cfg.parallel, "zero", 0)
    windowed = {"reduce_scatter"} if zero == 2 else {"reduce_scatter", "all_gather"}
    if zero >= 2:
        for group in ("dp", "dp_cp"):
            exposed, _ = _overlapped_seconds(stage, profile, world_size, m, rates, group, windowed)
            dp_exposed += m * exposed
    for row in comm_per_step(stage, m):
        group, op = row["group"], row["op"]
        if group in ("tp", "cp") or (zero >= 2 and group in ("dp", "dp_cp") and op in windowed):
            continue  # _overlapped_seconds: per micro-batch, each call minus its window
        link = _link(profile, _group_ranks(stage, group, world_size))
        if op in ("send", "recv"):
            if op == "send":  # a send meets its receive in the same exchange
                bw = link["gb_per_s"] * 1e9 * link["efficiency"]
                pp += row["calls"] * link["latency_us"] * 1e-6 + row["bytes"] / bw
            continue
        seconds = collective_seconds(op, row["calls"], row["bytes"], sizes.get(group, 1), link)
        if group in ("dp", "dp_cp") and op in ("all_reduce", "reduce_scatter"):
            dp_overlap += seconds
            buckets = max(buckets, row["calls"])
        elif group in ("dp", "dp_cp") and op == "all_gather" and cfg.parallel.overlap_param_gather:
            # ZeRO-1's parameter gather left in flight: hidden behind the next step's first
            # forward (a third of a micro-batch's compute), bucket by bucket
            dp_exposed += max(0.0, seconds - (compute / 3 if overlaps else 0.0))
        else:
            dp_exposed += seconds
    optimizer = stage["runs"][-1]["ops"].get("step", {}).get("bytes", 0) / hbm
    return {"compute": compute, "tp": tp, "tp_hidden": tp_hidden, "cp": cp,
            "cp_hidden": cp_hidden, "pp": pp,
            "dp_overlap": dp_overlap,
            "dp_buckets": buckets, "dp_exposed": dp_exposed, "optimizer": optimizer,
            "m": m}  # fmt: skip


def _overlapped_seconds(stage, profile, world_size: int, m: int, rates, group: str,
                        ops=None) -> tuple:  # fmt: skip
    """Exposed and hidden seconds per micro-batch of one group's ops (TP collectives, the cp
    ring's sends): each call costs max(0, alpha-beta time - its overlap window), counts taken at
    m (affine in m). A send meets its receive in the same exchange: receives are not counted."""
    if stage["group_sizes"].get(group, 1) <= 1:
        return 0.0, 0.0
    link = _link(profile, _group_ranks(stage, group, world_size))
    n = stage["group_sizes"][group]
    points = []  # per run: its m and {(op, bytes, matmul FLOPs, attention FLOPs): calls}
    for run in stage["runs"]:
        counts: dict[tuple, int] = {}
        for r in run["in_flight"]:
            if r["group"] == group and r["op"] != "recv" and (ops is None or r["op"] in ops):
                key = (r["op"], r["bytes"], r["matmul_flops"], r["attention_flops"])
                counts[key] = counts.get(key, 0) + r["calls"]
        points.append({"m": run["m"], "calls": counts})
    exposed = hidden = 0.0
    for key in set().union(*(pt["calls"] for pt in points)):
        op, nbytes, mm, at = key
        slope, base = _affine(points, lambda pt, k=key: pt["calls"].get(k, 0))
        count = base + slope * m
        seconds = collective_seconds(op, 1, nbytes, n, link)
        window = mm / rates[0] + at / rates[1]
        exposed += count * max(0.0, seconds - window)
        hidden += count * min(seconds, window)
    return exposed / m, hidden / m


def step_time(stages: list[dict], profile: dict, cfg, world_size: int) -> dict:
    """The step's seconds and their split; the slowest stage sets the pace."""
    profile = for_world(profile, world_size)
    times = [stage_times(s, profile, cfg, world_size) for s in stages]
    v = stages[0]["chunks"]
    p = len(stages)
    worst = max(times, key=lambda t: t["compute"] + t["tp"] + t["cp"])
    m = worst["m"]
    t_mb = worst["compute"] + worst["tp"] + worst["cp"]
    # More ranks than cores (a CPU profile): while the pipeline fills and drains, the idle
    # stages' ranks give their share of the cores to the busy ones, which then run faster; once
    # one stage's ranks alone can keep every core busy, the bubble costs no wall time.
    cores = profile.get("cores")
    filled = min(1.0, world_size / p / cores) if cores and world_size > cores else 0.0
    kind = getattr(cfg.parallel, "pipeline_schedule", "auto")  # simulated: schedule_sim.py
    bubble = (1.0 - filled) * bubble_seconds(kind, p, m, v, t_mb)
    pp = max(t["pp"] for t in times)
    overlap_window = 2 / 3 * worst["compute"] if profile.get("comm_overlaps_compute", True) else 0.0
    dp = max(
        max(t["dp_overlap"] - overlap_window, t["dp_overlap"] / t["dp_buckets"]) + t["dp_exposed"]
        for t in times
    )
    optimizer = max(t["optimizer"] for t in times)
    compute = m * worst["compute"] + optimizer
    exposed = m * (worst["tp"] + worst["cp"]) + pp + dp
    step = compute + exposed + bubble
    return {
        "step": step, "compute": compute, "exposed_comm": exposed, "bubble": bubble,
        "exposed_comm_by_group": {"tp": m * worst["tp"], "pp": pp, "dp": dp,
                                  "cp": m * worst["cp"]},
        "hidden_comm_by_group": {"tp": m * worst["tp_hidden"], "cp": m * worst["cp_hidden"]},
    }  # fmt: skip
