"""`megatiny plan`: predict a layout's memory, communication and step time without a GPU."""

from __future__ import annotations

import json
import sys
import time

EXAMPLE = """examples:
  megatiny plan --config launch/configs/llama-7b.yaml                     # 32 ranks: tp=8 x dp=4
  megatiny plan --config launch/configs/llama-7b.yaml --gpu a100-80g --json
  megatiny plan --config launch/configs/gpt2-124m.yaml --world-size 64 --search
  megatiny plan --config benchmarks/plan_configs/llama3-8b-torchtitan.yaml --world-size 8 --gpu h100-hbm2e-500w
  megatiny plan --gpu cpu --calibrate                                   # writes runs/cpu-calibrated.yaml
  megatiny plan --gpu runs/cpu-calibrated.yaml --config launch/configs/tiny-cpu.yaml model.vocab_size=4096

The world size is tp*pp*cp*dp when parallel.dp is set, else --world-size (default: dp=1).
Data files are not needed (data.path may not exist here); model.vocab_size=auto needs the
tokenizer, so pass model.vocab_size=N instead. A calibrated profile is used only when named by
its path (--gpu runs/cpu-calibrated.yaml); the plan prints the profile file it used."""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    parser.add_argument("--config", help="YAML config (see launch/configs/)")
    parser.add_argument("--gpu", default="h100-sxm",
                        help="hardware profile: h100-sxm | h100-hbm2e-500w | h200 | a100-80g | cpu | a YAML "
                        "path (e.g. runs/cpu-calibrated.yaml)")  # fmt: skip
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="override the profile's GPUs per node")  # fmt: skip
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of ranks (default: from parallel.dp, else dp=1)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--search", action="store_true",
                        help="rank the layouts that fit in memory by predicted tokens/s")  # fmt: skip
    parser.add_argument("--top", type=int, default=10, help="--search: how many to show")
    parser.add_argument("--limit", type=int, default=24,
                        help="--search: how many layouts to plan (dry runs, seconds each)")  # fmt: skip
    parser.add_argument("--calibrate", action="store_true",
                        help="with --gpu cpu: measure this machine's GEMM FLOP/s, memory "
                        "bandwidth and gloo latency/bandwidth into runs/cpu-calibrated.yaml "
                        "(--calibrate-out), at shapes and rank counts of its own")  # fmt: skip
    parser.add_argument("--calibrate-out", default=None,
                        help="--calibrate: where to write the profile (default runs/cpu-calibrated.yaml)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config key, e.g. parallel.tp=4 train.micro_batch_size=2")  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def format_plan(r: dict) -> str:
    lay = r["layout"]
    lines = [
        f"layout       tp={lay['tp']} pp={lay['pp']} (v={lay['virtual_pipeline_size']}) "
        f"dp={lay['dp']} cp={lay['cp']} sp={lay['sequence_parallel']} zero={lay['zero']} "
        f"recompute={lay['recompute']} micro_batch={lay['micro_batch_size']} "
        f"global_batch={lay['global_batch_size']}  ({r['world_size']} ranks, {r['gpu']})",
        f"profile      {r['profile_path']}",
        f"model        {r['params']:,} parameters, {r['flops_per_step']:.3e} FLOPs per step",
        "memory       (worst rank, pipeline stage {}) params {} | grads {} | optimizer {} | "
        "activations {} ({} micro-batches in flight) | transient {} | peak {}{}".format(
            r["memory_worst_stage"],
            *(_gib(r["memory_bytes"][k]) for k in ("params", "grads", "optimizer", "activations")),
            r["micro_batches_in_flight"],
            _gib(r["memory_transient_bytes"]),
            _gib(r["memory_bytes"]["peak"]),
            "" if r["fits"] else f"  DOES NOT FIT ({_gib(r['memory_usable_bytes'])} usable)",
        ),  # fmt: skip
        "comm / step  (worst rank) "
        + " | ".join(f"{k} {_gb(v)}" for k, v in r["comm_bytes_per_step"].items()),  # fmt: skip
        "time / step  {:.4g} s = compute {:.4g} + exposed comm {:.4g} ({}) + bubble {:.4g}; "
        "hidden behind compute: {}".format(
            r["time_s"]["step"],
            r["time_s"]["compute"],
            r["time_s"]["exposed_comm"],
            ", ".join(f"{g} {v:.3g}" for g, v in r["exposed_comm_s"].items()),
            r["time_s"]["bubble"],
            ", ".join(f"{g} {v:.3g}" for g, v in r["hidden_comm_s"].items()),
        ),  # fmt: skip
        "compute      {}".format(" + ".join(f"{k} {v:.4g}" for k, v in r["compute_s"].items())),
        f"throughput   {r['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU "
        f"{100 * r['mfu']:.1f}% ({r['flop_convention']})",
    ]
    return "\n".join(lines)


def main(args) -> int:
    from megatiny.config import Config, ConfigError
    from megatiny.plan.predict import check, plan, world_size_of
    from megatiny.plan.timemodel import load_profile

    try:
        if args.calibrate:
            if args.gpu != "cpu":
                raise ConfigError("--calibrate measures this machine: use it with --gpu cpu")
            from megatiny.plan.calibrate import calibrate
            from megatiny.plan.timemodel import CALIBRATED

            path = calibrate(args.calibrate_out or CALIBRATED)
            print(f"calibrated this machine: {path} (plan with it: --gpu {path})", file=sys.stderr)
            if args.config is None:
                return 0
        if args.config is None:
            raise ConfigError("--config is required (see launch/configs/*.yaml)")
        cfg = Config.from_yaml(args.config, args.overrides)
        profile = load_profile(args.gpu)
        if args.gpus_per_node:
            profile["gpus_per_node"] = args.gpus_per_node
        world_size = world_size_of(cfg, args.world_size)
        if args.search:
            from megatiny.plan.search import explore, format_search, format_summary, global_batch

            print(f"megatiny plan --search: every layout at a global batch of "
                  f"{global_batch(cfg, world_size)} sequences (train.global_batch_size, or "
                  f"micro_batch_size x the config's dp at {world_size} ranks)", file=sys.stderr)  # fmt: skip
            t0 = time.time()
            rows, summary = explore(cfg, world_size, profile, args.limit)
            if args.json:  # each row: a plan, plus the search's summary (also on stderr)
                print(json.dumps([dict(r, search=summary) for r in rows[: args.top]]))
                print("\n".join(format_summary(summary)), file=sys.stderr)
            else:
                seconds = time.time() - t0
                print(format_search(rows[: args.top], world_size, profile, seconds, summary))
            return 0
        check(cfg, world_size)
    except (ConfigError, ValueError) as e:
        print(f"megatiny plan: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    result = plan(cfg, world_size, profile)
    result["plan_seconds"] = round(time.time() - t0, 2)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_plan(result))
        print(f"(dry run of {len(result['stages'])} pipeline stage(s) on the meta device in "
              f"{result['plan_seconds']:.1f} s)")  # fmt: skip
    return 0
