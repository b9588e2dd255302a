"""Published H100 runs beside `megatiny plan`: one table per run, written into docs/scaling.md.

    .venv/bin/python benchmarks/published_runs.py                 # plans, prints, rewrites the doc
    .venv/bin/python benchmarks/published_runs.py --no-write      # print only
    .venv/bin/python benchmarks/published_runs.py --cache runs/published   # reuse dry runs

One profile per stated hardware and no per-row constant: Megatron-LM's rows on `h100-sxm` (DGX
H100), torchtitan's on `h100-hbm2e-500w` (the H100 its benchmark states), planned also at both
ends of that part's peak range (H100 NVL's and SXM's datasheet bf16). Settings a source does not
state are assumed once per source, in the config files' headers (benchmarks/plan_configs/), and
used for all its rows. The weak-scaling rows check a trend's sign only (Megatron-Core's README:
MFU rises with model size at sequence 4,096, vocabulary 131,072, data parallel 48); its model
table is an image, so the sizes here are the GPT ladder of Narayanan et al. 2021 (Table 1) at
those settings. A dry run does not depend on the profile: `--cache` keeps each (config, world
size)'s and plans every profile from it. The doc's section between the markers
`<!-- published-runs:begin -->` and `<!-- published-runs:end -->` is replaced.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.config import Config  # noqa: E402
from megatiny.plan.dryrun import dry_run  # noqa: E402
from megatiny.plan.predict import plan, prepare  # noqa: E402
from megatiny.plan.timemodel import load_profile  # noqa: E402

GPT3 = "benchmarks/plan_configs/gpt3-175b-megatron.yaml"
LLAMA = "benchmarks/plan_configs/llama3-8b-torchtitan.yaml"
MEGATRON = ("Megatron-LM README, 'Training Speed and Scalability' (strong scaling of GPT-3 175B, "
            "batch 1,152, 96 to 4,608 H100)")  # fmt: skip
TITAN = ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3 (Llama 3.1 8B, "
         "FSDP, local batch 2, sequence 8,192, selective AC, no compile)")  # fmt: skip

# (title, config, overrides, world size, profile, published metric, published value, source)
RUNS = [
    ("Megatron-LM GPT-3 175B, 96 H100", GPT3, [], 96, "h100-sxm", "mfu", 0.47, MEGATRON),
    ("Megatron-LM GPT-3 175B, 4,608 H100", GPT3, [], 4608, "h100-sxm", "mfu", 0.42, MEGATRON),
    ("torchtitan Llama-3.1-8B, 8 H100", LLAMA, [], 8, "h100-hbm2e-500w", "tokens_per_s_per_gpu",
     5762, TITAN),
    ("torchtitan Llama-3.1-8B, 128 H100", LLAMA, [], 128, "h100-hbm2e-500w",
     "tokens_per_s_per_gpu", 5605, TITAN),
]  # fmt: skip
# Megatron-Core's weak scaling, in sign: GPT ladder sizes (Narayanan et al. 2021, Table 1) at the
# README's sequence, vocabulary and data-parallel size; the GPT-3 config's other assumptions.
WEAK = [
    ("1.7B", ["model.d_model=2304", "model.n_layers=24", "model.n_heads=24", "parallel.tp=1",
              "parallel.pp=1", "parallel.virtual_pipeline_size=null",
              "parallel.sequence_parallel=false", "train.global_batch_size=384"], 48),
    ("7.5B", ["model.d_model=4096", "model.n_layers=36", "model.n_heads=32", "parallel.tp=4",
              "parallel.pp=1", "parallel.virtual_pipeline_size=null",
              "train.global_batch_size=576"], 192),
    ("18B", ["model.d_model=6144", "model.n_layers=40", "model.n_heads=48", "parallel.tp=8",
             "parallel.pp=1", "parallel.virtual_pipeline_size=null",
             "train.global_batch_size=768"], 384),
    ("175B", ["train.global_batch_size=1152"], 2304),
]  # fmt: skip
WEAK_PUBLISHED = "MFU rises from 41% (smallest model) to 47-48% (largest)"
BEGIN, END = "<!-- published-runs:begin -->", "<!-- published-runs:end -->"


def stages_of(cfg: Config, world: int, cache: str | None) -> list[dict]:
    ready = prepare(cfg, world)
    key = hashlib.sha1(pickle.dumps((repr(ready), world))).hexdigest()[:16]
    path = os.path.join(cache, f"{key}.pkl") if cache else None
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    stages = dry_run(ready, world)
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(stages, f)
    return stages


def at_peak(profile: dict, bf16: float) -> dict:
    out = copy.deepcopy(profile)
    out["peak_tflops"]["bf16"] = bf16
    return out


def run_row(title, path, overrides, world, gpu, metric, published, source, cache) -> dict:
    cfg = Config.from_yaml(path, overrides)
    stages = stages_of(cfg, world, cache)
    profile = load_profile(gpu)
    result = plan(cfg, world, profile, stages=stages)
    ends = [plan(cfg, world, at_peak(profile, x), stages=stages)
            for x in profile.get("peak_range_tflops", {}).get("bf16", [])]  # fmt: skip
    return {"title": title, "config": path, "overrides": overrides, "world": world, "gpu": gpu,
            "metric": metric, "published": published, "source": source, "plan": result,
            "ends": ends, "peak_range": profile.get("peak_range_tflops", {}).get("bf16")}  # fmt: skip


def _value(r: dict, result: dict) -> str:
    if r["metric"] == "mfu":
        return f"MFU {100 * result['mfu']:.1f}%"
    return f"{result['tokens_per_s_per_gpu']:,.0f} tok/s/GPU"


def table(r: dict) -> str:
    p = r["plan"]
    predicted = p[r["metric"]]
    error = predicted / r["published"] - 1
    pub = (f"MFU {100 * r['published']:.0f}%" if r["metric"] == "mfu"
           else f"{r['published']:,} tok/s/GPU")  # fmt: skip
    lay, t = p["layout"], p["time_s"]
    cmd = (f"megatiny plan --config {r['config']} --world-size {r['world']} --gpu {r['gpu']}"
           + "".join(f" {o}" for o in r["overrides"]))  # fmt: skip
    kinds = " + ".join(f"{k} {v:.3g}" for k, v in p["compute_s"].items())
    lines = [
        f"#### {r['title']}",
        "",
        "| | |",
        "|---|---|",
        f"| published | {pub} ({r['source']}) |",
        f"| `megatiny plan` | {_value(r, p)} (MFU {100 * p['mfu']:.1f}%, "
        f"{p['tokens_per_s_per_gpu']:,.0f} tok/s/GPU) |",
        f"| error | {100 * error:+.1f}% {'✓' if abs(error) <= 0.15 else '✗'} (within 15%?) |",
        f"| command | `{cmd}` |",
        f"| layout | tp={lay['tp']} pp={lay['pp']} v={lay['virtual_pipeline_size']} dp={lay['dp']} "
        f"sp={lay['sequence_parallel']} zero={lay['zero']} recompute={lay['recompute']} "
        f"micro-batch {lay['micro_batch_size']}, global batch {lay['global_batch_size']} |",
        f"| step | {t['step']:.3f} s = compute {t['compute']:.3f} ({kinds}) + exposed comm "
        f"{t['exposed_comm']:.3f} + bubble {t['bubble']:.3f} |",
        "| exposed / hidden comm | "
        + ", ".join(f"{g} {v:.3f}" for g, v in p["exposed_comm_s"].items())
        + " / " + ", ".join(f"{g} {v:.3f}" for g, v in p["hidden_comm_s"].items()) + " s |",
        f"| memory (worst rank) | peak {p['memory_bytes']['peak'] / 2**30:.1f} GiB of "
        f"{p['memory_usable_bytes'] / 2**30:.1f} usable: "
        f"{'fits' if p['fits'] else 'does not fit'} |",
    ]  # fmt: skip
    for peak, end in zip(r["peak_range"] or [], r["ends"], strict=False):
        lines.append(f"| at peak {peak:g} TFLOP/s | {_value(r, end)} "
                     f"({100 * (end[r['metric']] / r['published'] - 1):+.1f}%) |")  # fmt: skip
    lines.append(f"| assumptions | `{r['config']}` header |")
    return "\n".join(lines)


def weak_table(rows) -> str:
    lines = ["#### Megatron-Core weak scaling (trend, in sign)", "",
             f"Published: {WEAK_PUBLISHED} (Megatron-LM README; sequence 4,096, vocabulary "
             "131,072, data parallel 48). Planned on `h100-sxm`, the GPT-3 config's assumptions, "
             "sizes from Narayanan et al. 2021 Table 1:", "",
             "| model | GPUs | layout | MFU planned | step s | command overrides |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, world, p, overrides in rows:
        lay = p["layout"]
        lines.append(f"| {name} ({p['params'] / 1e9:.1f} B) | {world} | tp={lay['tp']} "
                     f"pp={lay['pp']} dp={lay['dp']} | {100 * p['mfu']:.1f}% | "
                     f"{p['time_s']['step']:.2f} | `{' '.join(overrides) or '(none)'}` |")  # fmt: skip
    mfus = [p["mfu"] for _, _, p, _ in rows]
    rising = all(b > a for a, b in zip(mfus, mfus[1:]))
    lines.append(f"\nSmallest to largest: MFU {'rises' if mfus[-1] > mfus[0] else 'falls'} "
                 f"({100 * mfus[0]:.1f}% -> {100 * mfus[-1]:.1f}%); at every step: "
                 f"**{'yes' if rising else 'no'}** "
                 f"({' -> '.join(f'{100 * x:.1f}%' for x in mfus)}).")  # fmt: skip
    return "\n".join(lines)


def render(results, weak) -> str:
    ok = sum(abs(r["plan"][r["metric"]] / r["published"] - 1) <= 0.15 for r in results)
    head = (f"Regenerated by `.venv/bin/python benchmarks/published_runs.py` "
            f"({time.strftime('%Y-%m-%d')}): **{ok} of {len(results)} published rows within 15%**.")  # fmt: skip
    return "\n\n".join([head, *(table(r) for r in results), weak_table(weak)])


def write_doc(text: str, path: str = "docs/scaling.md") -> None:
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section to replace")
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None, help="keep dry runs here and reuse them")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-weak", action="store_true", help="skip the weak-scaling trend")
    args = parser.parse_args()
    results = []
    for row in RUNS:
        t0 = time.time()
        results.append(run_row(*row, cache=args.cache))
        print(f"planned {row[0]} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    weak = []
    for name, overrides, world in [] if args.no_weak else WEAK:
        cfg = Config.from_yaml(GPT3, overrides)
        weak.append((name, world, plan(cfg, world, load_profile("h100-sxm"),
                                       stages=stages_of(cfg, world, args.cache)), overrides))  # fmt: skip
        print(f"planned weak {name} at {world}", file=sys.stderr, flush=True)
    text = render(results, weak)
    print(text)
    if not args.no_write:
        write_doc(text)


if __name__ == "__main__":
    main()
