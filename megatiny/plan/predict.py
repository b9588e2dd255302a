"""`plan(cfg, world_size, profile)`: the dry run of every pipeline stage, then memory, bytes and
time for the step, as the JSON object `megatiny plan --json` prints (its schema: docs/scaling.md)."""

from __future__ import annotations

import copy

from megatiny.config import Config, ConfigError
from megatiny.plan.dryrun import dry_run
from megatiny.plan.timemodel import comm_per_step, step_time
from megatiny.training.memory import activation_bytes, in_flight

COMM_CATEGORY = {"tp": "tp", "pp": "pp", "embedding": "pp", "dp": "dp", "dp_cp": "dp",
                 "cp": "cp"}  # fmt: skip


def world_size_of(cfg: Config, world_size: int | None) -> int:
    p = cfg.parallel
    mp = p.tp * p.pp * p.cp
    if world_size is None:
        return mp * (p.dp or 1)
    return world_size


def prepare(cfg: Config, world_size: int) -> Config:
    """A copy of `cfg` validated for `world_size` ranks (data files are not needed)."""
    from megatiny.training.step import check_supported

    cfg = copy.deepcopy(cfg)
    if cfg.model.moe_experts:
        raise ConfigError(
            f"model.moe_experts={cfg.model.moe_experts}: megatiny plan does not model MoE layers "
            "(how many tokens each expert and all-to-all gets depends on the router's data); "
            "plan the dense model (model.moe_experts=0), and measure MoE with train.trace_comm"
        )
    dp = cfg.validate(world_size)
    cfg.parallel.dp = dp
    check_supported(cfg, world_size)
    return cfg


def stage_memory(stage: dict, cfg: Config, m: int) -> dict:
    p = cfg.parallel
    v = p.virtual_pipeline_size or 1
    out = dict(stage["state"])
    kind = p.pipeline_schedule
    out["activations"] = activation_bytes(stage["activation_bytes_per_chunk"], p.pp,
                                          stage["pp_rank"], m, v, kind,
                                          stage.get("stash_bytes_per_chunk"))  # fmt: skip
    out["transient"] = stage["transient_bytes"] + stage.get("zero_transient_bytes", 0)
    out["peak"] = sum(out.values())
    chunks = len(stage["activation_bytes_per_chunk"])
    out["micro_batches_in_flight"] = in_flight(p.pp, stage["pp_rank"], m, chunks, kind)
    return out


def stage_comm(stage: dict, m: int) -> dict:
    out = {"tp": 0, "pp": 0, "dp": 0, "cp": 0, "other": 0}
    for row in comm_per_step(stage, m):
        out[COMM_CATEGORY.get(row["group"], "other")] += row["bytes"]
    return out


def plan(
    cfg: Config,
    world_size: int,
    profile: dict,
    stages_parallel: int = 2,
    stages: list[dict] | None = None,
) -> dict:
    """The plan of `cfg` at `world_size` on `profile`; `stages`: a dry run of the same config and
    world size to reuse (the dry run does not depend on the profile)."""
    cfg = prepare(cfg, world_size)
    p, t = cfg.parallel, cfg.train
    m = t.accumulation_steps(p.dp)
    if stages is None:
        stages = dry_run(cfg, world_size, parallel=stages_parallel)
    memories = [stage_memory(s, cfg, m) for s in stages]
    comms = [stage_comm(s, m) for s in stages]
    worst_mem = max(range(len(stages)), key=lambda i: memories[i]["peak"])
    worst_comm = max(range(len(stages)), key=lambda i: sum(comms[i].values()))
    times = step_time(stages, profile, cfg, world_size)
    seq = cfg.data.seq_length
    tokens = t.global_batch_size_for(p.dp) * seq
    flops = cfg.model.flops_per_token(seq) * tokens
    dtype = "bf16" if t.precision == "bf16" else "fp32"
    peak = profile["peak_tflops"][dtype] * 1e12
    mem = memories[worst_mem]
    usable = usable_memory_bytes(profile)
    return {
        "layout": {
            "tp": p.tp, "pp": p.pp, "dp": p.dp, "cp": p.cp,
            "virtual_pipeline_size": p.virtual_pipeline_size or 1,
            "sequence_parallel": p.sequence_parallel, "zero1": p.zero1, "zero": p.zero,
            "reshard_after_forward": p.reshard_after_forward,
            "pipeline_schedule": p.pipeline_schedule,
            "recompute": cfg.model.recompute, "micro_batch_size": t.micro_batch_size,
            "global_batch_size": t.global_batch_size_for(p.dp),
        },
        "world_size": world_size,
        "gpu": profile["name"],
        "profile_path": profile.get("path"),
        "params": cfg.model.num_parameters(),
        "flops_per_step": flops,
        "flop_convention": "Megatron model FLOPs: matmuls only, 2 per multiply-add, backward = 2x "
        "forward, full s x s attention, no recomputation (ModelConfig.flops_per_token)",
        "memory_bytes": {k: mem[k] for k in ("params", "grads", "optimizer", "activations",
                                             "peak")},  # fmt: skip
        "memory_transient_bytes": mem["transient"],
        "memory_worst_stage": worst_mem,
        "micro_batches_in_flight": mem["micro_batches_in_flight"],
        "comm_bytes_per_step": {k: comms[worst_comm][k] for k in ("tp", "pp", "dp", "cp")},
        "comm_worst_stage": worst_comm,
        "time_s": {k: times[k] for k in ("step", "compute", "exposed_comm", "bubble")},
        "exposed_comm_s": times["exposed_comm_by_group"],
        "hidden_comm_s": times["hidden_comm_by_group"],
        "mfu": flops / (world_size * times["step"] * peak),
        "tokens_per_s_per_gpu": tokens / times["step"] / world_size,
        "memory_usable_bytes": usable,
        "fits": mem["peak"] <= usable,
        "compute_s": times["compute_by_kind"],
        "stages": [
            {"pp_rank": s["pp_rank"], "rank": s["rank"], "memory_bytes": memories[i],
             "comm_bytes_per_step": comms[i],
             "comm": comm_per_step(s, m)}
            for i, s in enumerate(stages)
        ],
    }  # fmt: skip


def usable_memory_bytes(profile: dict) -> int:
    """What a rank may plan to hold: the device memory less `memory_fragmentation` (the caching
    allocator's cached-but-free blocks) and `memory_reserve_gib` (CUDA context, NCCL buffers,
    cuBLAS workspaces)."""
    total = profile["memory_gib"] * 2**30
    return int(total * (1 - profile.get("memory_fragmentation", 0.0))
               - profile.get("memory_reserve_gib", 0.0) * 2**30)  # fmt: skip


def check(cfg: Config, world_size: int) -> None:
    """Raise ConfigError for a layout the plan cannot run (before forking)."""
    try:
        prepare(cfg, world_size)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
