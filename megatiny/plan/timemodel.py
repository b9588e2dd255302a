"""The time model: turns what the dry run counted (GEMM and attention shapes, bytes moved,
collectives and what compute each can hide behind) into seconds.

Per pipeline stage, one micro-batch (forward + backward, recomputation included — the dry run
ran it):

    t_compute = sum over GEMM shapes of calls x efficiency.gemm_seconds(shape)   roofline + tile
              + sum over attention calls of efficiency.attention_seconds(shape)   and wave
              + other bytes / (HBM bandwidth x memory_efficiency)                 quantization
              + transcendental bytes / (transcendental_gb_per_s, else the HBM rate)   (CPUs)
              + ops x op_overhead_us                   eager dispatch per op (CPU; 0 on GPUs)
    t_tp      = sum over TP collectives of  max(0, t - window) + overlap_slowdown x min(t, window)
                t = collective_seconds (below); window = the GEMM / attention time the rank
                issues while the collective is in flight (the dry run measures it per
                collective: 0 for a blocking one; the sequence-parallel linear's backward
                re-gather and reduce-scatter hide behind its dX and dA GEMMs); a hidden
                collective is not free: NCCL's kernels take SMs from the GEMMs they hide behind,
                which run `overlap_slowdown` slower while both run

Collectives, as NCCL selects its algorithm (the fastest of those it has for the op and group):

    ring      calls x (latency + steps x step_latency) + bytes x f / (gb_per_s x efficiency)
              f = 2(n-1)/n all-reduce (2(n-1) steps), (n-1)/n all-gather / reduce-scatter
              (n-1 steps); bytes = the full tensor (the tracer's convention)
    NVLS      all-reduce inside one NVSwitch node (Hopper): NVLink SHARP reduces in the switch,
              bus bandwidth gb_per_s x nvls_efficiency, no per-step latency
    tree      all-reduce across nodes: latency + 2 log2(nodes) x tree_step_latency, the ring's
              bandwidth (NCCL's double binary tree reaches it for large messages)

A group whose ranks sit in one node (ranks r // gpus_per_node equal) uses the intra-node link
(NVLink), else the inter-node one (InfiniBand, per GPU); a link's optional `op_scale` multiplies
an op's bus factor (calibrated for gloo, whose reduce-scatter costs more than its all-reduce).

Per step (m micro-batches, p stages, v chunks per stage, the slowest stage sets the pace):

    t_mb      = t_compute + t_tp + t_cp                              of the slowest stage
    bubble    = the simulated idle time of the pipeline schedule (parallel/schedule_sim.py)
                x (1 - filled): on a CPU profile with more ranks than cores the idle stages'
                cores go to the busy ranks, filled = min(1, world / p / cores), else 0
    pp        = sends per step x (latency + message / bandwidth)     blocking p2p, exposed
    dp        = gradient reduction (DDP's buckets, posted async as backward fills them)
                overlapped with the last micro-batch's backward (2/3 of its compute): exposed =
                max(t - overlap, t / buckets) + overlap_slowdown x the hidden part; ZeRO-1's
                parameter all-gather: exposed, or with parallel.overlap_param_gather hidden
                behind the first forward (1/3 of t_compute), the same slowdown on the hidden
                part; the grad-norm and tied-embedding all-reduces: exposed; ZeRO-2/3's
                per-micro-batch reduce-scatters and ZeRO-3's per-block gathers: each call minus
                the compute between its post and its wait in the dry run (as t_tp)
    optimizer = the optimizer step's bytes / (HBM bandwidth x memory_efficiency)
    step      = m x t_mb + bubble + pp + dp + optimizer

Profiles: `megatiny/plan/profiles/NAME.yaml` holds a part's datasheet figures (peak FLOP/s, SMs,
HBM, memory, links) and `chip: CHIP`; `profiles/chips/CHIP.yaml` holds every efficiency fraction,
shared by all parts of that chip (`load_profile` merges them; a profile may not override one).
CPU profiles set `comm_overlaps_compute: false`: gloo's copies, reductions and socket work run on
the cores the ranks compute on, so no collective is hidden (every window above is 0). CPU
profiles (`cores`): ranks beyond the core count share them (`share` = the fraction of the rates a
rank gets). A calibrated CPU profile carries `by_world`, rates per rank count
(`calibrate.world_rates`); `for_world` takes the world size's entry.

MFU = model FLOPs per step (`ModelConfig.flops_per_token`, Megatron's convention: matmuls only,
no recomputation, full s x s attention) / (world_size x step x peak).
"""

from __future__ import annotations

import math
import os

import yaml

from megatiny.parallel.schedule_sim import bubble_seconds
from megatiny.plan.efficiency import kernel_seconds, memory_rate

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")
CALIBRATED = os.path.join("runs", "cpu-calibrated.yaml")  # where --calibrate writes by default
DATASHEET = {"name", "chip", "sources", "gpus_per_node", "memory_gib", "sms", "peak_tflops",
             "peak_range_tflops", "hbm_gb_per_s", "links"}  # fmt: skip


def load_profile(name: str) -> dict:
    """A hardware profile by name (megatiny/plan/profiles/NAME.yaml) or a YAML path, its chip's
    efficiencies merged in (profiles/chips/CHIP.yaml). `path` says which file it came from."""
    path = name if os.path.exists(name) else os.path.join(PROFILE_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".yaml"))
        raise ValueError(f"unknown GPU profile {name!r}; choose one of {known} or a YAML path "
                         "(e.g. runs/cpu-calibrated.yaml, which --calibrate writes)")  # fmt: skip
    with open(path, encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    inside = os.path.abspath(path).startswith(os.path.abspath(PROFILE_DIR) + os.sep)
    profile["path"] = f"megatiny/plan/profiles/{os.path.basename(path)}" if inside else path
    if "chip" in profile:
        extra = set(profile) - DATASHEET - {"path"}
        if extra:
            raise ValueError(f"{path}: {sorted(extra)} belong in profiles/chips/"
                             f"{profile['chip']}.yaml (a profile holds datasheet figures only)")  # fmt: skip
        with open(
            os.path.join(PROFILE_DIR, "chips", f"{profile['chip']}.yaml"), encoding="utf-8"
        ) as f:
            chip = yaml.safe_load(f)
        nccl = chip.pop("nccl")
        links = {k: {**nccl[k], **v} for k, v in profile["links"].items()}
        profile = {
            **chip,
            **profile,
            "links": links,
            "sources": chip["sources"] + profile["sources"],
        }
    profile.setdefault("gemm_efficiency", profile.get("matmul_efficiency", 1.0))
    return profile


def for_world(profile: dict, world_size: int) -> dict:
    """The profile as one rank of `world_size` meets it. `share`: the fraction of the rates left
    when more ranks than cores share them. A calibrated CPU profile gives either `by_world`
    entries (rates measured at N ranks; the largest N <= world applies) or `contention` (rates
    per core and how much each rank beyond the cores costs, fitted at rank counts of its own:
    calibrate.py); a GPU profile shares nothing."""
    out = dict(profile)
    cores = profile.get("cores", world_size)
    measured = [n for n in profile.get("by_world", {}) if int(n) <= world_size]
    n = max(measured, key=int) if measured else None
    if n is not None:
        out.update(profile["by_world"][n])
    out["share"] = min(1.0, max(cores, int(n or 1)) / world_size)
    fit = profile.get("contention")
    if fit:  # rates per core, each rank beyond the cores costing every rank `fit[kind]` more
        over = max(0, world_size - cores)
        compute, memory = (1 / (1 + fit[k] * over) for k in ("compute", "memory"))
        out["peak_tflops"] = {k: v * compute for k, v in profile["peak_tflops"].items()}
        out["hbm_gb_per_s"] = profile["hbm_gb_per_s"] * memory
        out["transcendental_gb_per_s"] = profile["transcendental_gb_per_s"] * compute
        out["op_overhead_us"] = profile["op_overhead_us"] / (compute * out["share"])
        gloo = fit["gloo"]
        link = {"gb_per_s": gloo["gb_per_s"] * out["share"] / (1 + gloo["contention"] * over),
                "latency_us": gloo["latency_us"]
                * (world_size / gloo["latency_ranks"]) ** gloo["latency_exponent"],
                "efficiency": 1.0, "op_scale": gloo["op_scale"]}  # fmt: skip
        out["links"] = {"intra_node": link, "inter_node": link}
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


def ops_per_micro_batch(stage: dict) -> dict:
    """FLOPs, bytes and calls per GEMM / attention shape of one micro-batch (slope in m)."""
    out = {}
    phase = [r["ops"].get("micro_batches", {}) for r in stage["runs"]]
    for key in ("matmul_flops", "attention_flops", "bytes", "transcendental_bytes", "ops"):
        slope, _ = _affine(stage["runs"], lambda r, k=key: r["ops"]["micro_batches"].get(k, 0))
        out[key] = slope
    for table in ("gemm_shapes", "attention_shapes"):
        shapes = set().union(*(p.get(table, {}) for p in phase))
        out[table] = {}
        for shape in shapes:
            slope, _ = _affine(stage["runs"], lambda r, s=shape, t=table:
                               r["ops"]["micro_batches"].get(t, {}).get(s, 0))  # fmt: skip
            if slope:
                out[table][shape] = slope
    return out


def _link(profile: dict, ranks: list[int]) -> tuple[dict, int]:
    """The link a group's collectives use and how many nodes the group spans."""
    nodes = len({r // profile["gpus_per_node"] for r in ranks})
    return profile["links"]["intra_node" if nodes == 1 else "inter_node"], nodes


def collective_seconds(
    op: str, calls: int, nbytes: int, n: int, link: dict, nodes: int = 1
) -> float:
    """Seconds of `calls` collectives moving `nbytes` in all among n ranks: the fastest of the
    algorithms NCCL has for the op (ring; NVLS for an all-reduce in one node; tree for an
    all-reduce across nodes)."""
    if n <= 1 or calls == 0:
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
              "reduce_scatter": (n - 1) / n, "all_to_all": (n - 1) / n}.get(op, 1.0)  # fmt: skip
    factor *= link.get("op_scale", {}).get(op, 1.0)  # a backend's measured departure (gloo)
    raw = link["gb_per_s"] * 1e9
    steps = 2 * (n - 1) if op == "all_reduce" else n - 1
    base = link["latency_us"] * 1e-6
    times = [calls * (base + steps * link.get("step_latency_us", 0.0) * 1e-6)
             + nbytes * factor / (raw * link["efficiency"])]  # fmt: skip
    if op == "all_reduce" and nodes == 1 and link.get("nvls_efficiency"):
        times.append(calls * base + nbytes * factor / (raw * link["nvls_efficiency"]))
    if op == "all_reduce" and nodes > 1 and "tree_step_latency_us" in link:
        hops = 2 * math.ceil(math.log2(nodes))
        latency = link["tree_latency_us"] + hops * link["tree_step_latency_us"]
        times.append(calls * latency * 1e-6 + nbytes * factor / (raw * link["efficiency"]))
    return min(times)


def _group_ranks(stage: dict, group: str, world_size: int) -> list[int]:
    ranks = stage["ranks"]
    if group in ranks:
        return ranks[group]
    if group == "dp_cp":
        return ranks["dp"]
    if group == "embedding":
        return [ranks["pp"][0], ranks["pp"][-1]]
    return list(range(world_size))  # mp / world: assume the widest span


def _hidden_cost(seconds: float, window: float, slowdown: float) -> tuple[float, float]:
    """(exposed, hidden) seconds of a collective with `window` seconds of compute beside it; the
    hidden part slows that compute by `slowdown` of its length."""
    hidden = min(seconds, window)
    return max(0.0, seconds - window) + slowdown * hidden, hidden


def stage_compute(stage: dict, profile: dict) -> dict:
    """Seconds of one micro-batch's compute and the rates its overlap windows run at."""
    ops = ops_per_micro_batch(stage)
    kernels = kernel_seconds(ops, profile)
    hbm = memory_rate(profile)
    special = profile.get("transcendental_gb_per_s", 0) * 1e9 * profile.get("share", 1.0)
    compute = (kernels["matmul"] + kernels["attention"] + ops["bytes"] / hbm
               + ops["transcendental_bytes"] / (special or hbm)
               + ops["ops"] * profile.get("op_overhead_us", 0.0) * 1e-6)  # fmt: skip
    rates = (ops["matmul_flops"] / kernels["matmul"] if kernels["matmul"] else float("inf"),
             ops["attention_flops"] / kernels["attention"] if kernels["attention"] else float("inf"))  # fmt: skip
    return {"compute": compute, "matmul": kernels["matmul"], "attention": kernels["attention"],
            "memory_bound": compute - kernels["matmul"] - kernels["attention"], "rates": rates}  # fmt: skip


def stage_times(stage: dict, profile: dict, cfg, world_size: int) -> dict:
    """Seconds of one micro-batch (compute, tp, cp) and the per-step comm of one stage."""
    kernels = stage_compute(stage, profile)
    compute = kernels["compute"]
    m = cfg.train.accumulation_steps(stage["group_sizes"]["dp"])
    sizes = stage["group_sizes"]
    overlaps = profile.get("comm_overlaps_compute", True)
    slowdown = profile.get("overlap_slowdown", 0.0)
    rates = kernels["rates"]
    if not overlaps:  # the collective's work needs the cores the GEMMs run on: no window
        rates = (float("inf"), float("inf"))
    tp, tp_hidden = _overlapped_seconds(stage, profile, world_size, m, rates, "tp")
    cp, cp_hidden = _overlapped_seconds(stage, profile, world_size, m, rates, "cp")
    pp = dp_overlap = dp_exposed = dp_hidden = 0.0
    buckets = 1
    # ZeRO-2/3 reduce-scatter every micro-batch's buckets as backward fills them and ZeRO-3
    # gathers each block while the one before computes: each call minus the compute the dry
    # run saw between its post and its wait, as for tp
    zero = getattr(cfg.parallel, "zero", 0)
    windowed = {"reduce_scatter"} if zero == 2 else {"reduce_scatter", "all_gather"}
    if zero >= 2:
        for group in ("dp", "dp_cp"):
            exposed, hidden = _overlapped_seconds(stage, profile, world_size, m, rates, group,
                                                  windowed)  # fmt: skip
            dp_exposed += m * exposed
            dp_hidden += m * hidden
    for row in comm_per_step(stage, m):
        group, op = row["group"], row["op"]
        if group in ("tp", "cp") or (zero >= 2 and group in ("dp", "dp_cp") and op in windowed):
            continue  # _overlapped_seconds: per micro-batch, each call minus its window
        link, nodes = _link(profile, _group_ranks(stage, group, world_size))
        if op in ("send", "recv"):
            if op == "send":  # a send meets its receive in the same exchange
                bw = link["gb_per_s"] * 1e9 * link["efficiency"]
                pp += row["calls"] * link["latency_us"] * 1e-6 + row["bytes"] / bw
            continue
        seconds = collective_seconds(op, row["calls"], row["bytes"], sizes.get(group, 1), link,
                                     nodes)  # fmt: skip
        if group in ("dp", "dp_cp") and op in ("all_reduce", "reduce_scatter"):
            dp_overlap += seconds
            buckets = max(buckets, row["calls"])
        elif group in ("dp", "dp_cp") and op == "all_gather" and cfg.parallel.overlap_param_gather:
            # ZeRO-1's parameter gather left in flight: hidden behind the next step's first
            # forward (a third of a micro-batch's compute), bucket by bucket
            exposed, hidden = _hidden_cost(seconds, compute / 3 if overlaps else 0.0, slowdown)
            dp_exposed += exposed
            dp_hidden += hidden
        else:
            dp_exposed += seconds
    optimizer = stage["runs"][-1]["ops"].get("step", {}).get("bytes", 0) / memory_rate(profile)
    return {"compute": compute, "matmul": kernels["matmul"], "attention": kernels["attention"],
            "memory_bound": kernels["memory_bound"], "tp": tp, "tp_hidden": tp_hidden, "cp": cp,
            "cp_hidden": cp_hidden, "pp": pp, "dp_overlap": dp_overlap, "dp_buckets": buckets,
            "dp_exposed": dp_exposed, "dp_hidden": dp_hidden, "optimizer": optimizer,
            "m": m}  # fmt: skip


def _overlapped_seconds(stage, profile, world_size: int, m: int, rates, group: str,
                        ops=None) -> tuple:  # fmt: skip
    """Exposed and hidden seconds per micro-batch of one group's ops (TP collectives, the cp
    ring's sends, ZeRO-2/3's windowed calls): each call costs max(0, t - its overlap window) +
    overlap_slowdown x the hidden part, counts taken at m (affine in m). A send meets its
    receive in the same exchange: receives are not counted."""
    if stage["group_sizes"].get(group, 1) <= 1:
        return 0.0, 0.0
    link, nodes = _link(profile, _group_ranks(stage, group, world_size))
    n = stage["group_sizes"][group]
    slowdown = profile.get("overlap_slowdown", 0.0)
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
        seconds = collective_seconds(op, 1, nbytes, n, link, nodes)
        cost, covered = _hidden_cost(seconds, mm / rates[0] + at / rates[1], slowdown)
        exposed += count * cost
        hidden += count * covered
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
    overlaps = profile.get("comm_overlaps_compute", True)
    window = 2 / 3 * worst["compute"] if overlaps else 0.0
    slowdown = profile.get("overlap_slowdown", 0.0)

    def dp_seconds(t):  # DDP's buckets hide behind the last backward, all but the last bucket
        exposed, hidden = _hidden_cost(t["dp_overlap"], window, slowdown)
        return max(exposed, t["dp_overlap"] / t["dp_buckets"]) + t["dp_exposed"], hidden

    dp, dp_hidden = max((dp_seconds(t) for t in times), key=lambda x: x[0])
    optimizer = max(t["optimizer"] for t in times)
    compute = m * worst["compute"] + optimizer
    exposed = m * (worst["tp"] + worst["cp"]) + pp + dp
    step = compute + exposed + bubble
    return {
        "step": step, "compute": compute, "exposed_comm": exposed, "bubble": bubble,
        "exposed_comm_by_group": {"tp": m * worst["tp"], "pp": pp, "dp": dp,
                                  "cp": m * worst["cp"]},
        "hidden_comm_by_group": {"tp": m * worst["tp_hidden"], "cp": m * worst["cp_hidden"],
                                 "dp": dp_hidden + worst["dp_hidden"]},
        "compute_by_kind": {k: m * worst[k] for k in ("matmul", "attention", "memory_bound")}
        | {"optimizer": optimizer},
    }  # fmt: skip
