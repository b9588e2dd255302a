"""Peak host memory of building a ~1.2B Llama (launch/configs/llama-1b.yaml's model, fp32) on one
rank: the whole model against a tp2 / pp2 rank's shard-only build (megatiny/parallel/build.py),
and, with --zero3, a dp2 rank under parallel.zero=3 (the data-parallel wrapper included).

Each case runs in a fresh process (`python benchmarks/build_memory.py --child CASE`) with a fake
process group of the case's world size (no communication: each rank's build is local), and
reports the process's peak resident set (VmHWM, /proc/self/status) less its resident set before
building (torch and megatiny imported), so the figure is what building added at its peak.

    python benchmarks/build_memory.py [--zero3] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {  # name: (tp, pp, world, zero)
    "one rank (full)": (1, 1, 1, 0),
    "tp2 rank 0": (2, 1, 2, 0),
    "pp2 rank 0": (1, 2, 2, 0),
    "pp2 rank 1": (1, 2, 2, 0),
    "dp2 zero=3 rank 0": (1, 1, 2, 3),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(case: str, layers: int | None) -> dict:

    from megatiny.config import load_config
    from megatiny.parallel.build import host_bytes
    from megatiny.parallel.context import ParallelContext
    from megatiny.plan.fake_group import init_fake_process_group
    from megatiny.training.step import build_model

    tp, pp, world, zero = CASES[case]
    rank = 1 if case.endswith("rank 1") else 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.sequence_parallel=false",
                 "model.fused_kernels=false"]  # fmt: skip
    if layers:
        overrides.append(f"model.n_layers={layers}")
    if zero:
        overrides.append(f"parallel.zero={zero}")
    cfg = load_config(os.path.join(root, "launch/configs/llama-1b.yaml"), overrides)
    init_fake_process_group(rank, world)
    ctx = ParallelContext.initialize(tp=tp, pp=pp, device="cpu")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    model = build_model(cfg, ctx)
    held = host_bytes(model)
    if zero:  # the data-parallel wrapper shards the parameters (megatiny/parallel/fsdp.py)
        from megatiny.parallel.zero_levels import build_data_parallel

        build_data_parallel(model, ctx, bucket_mb=cfg.parallel.ddp_bucket_mb, zero=zero,
                            reshard_after_forward=True)  # fmt: skip
        held = None  # its parameters live in the wrapper's flat shard, not in the model
    seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024,
            "held_mib": None if held is None else held / 2**20, "seconds": seconds}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--zero3", action="store_true", help="also a dp2 rank under parallel.zero=3")
    ap.add_argument("--layers", type=int, help="override the model's n_layers (a quicker run)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers)))
        return 0
    cases = [c for c in CASES if args.zero3 or "zero" not in c]
    rows = {}
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{case}: not measured ({reason})")
            continue
        rows[case] = json.loads(done.stdout.strip().splitlines()[-1])
    if not rows:
        return 1
    ref = rows.get("one rank (full)")
    print(f"{'case':<20} {'peak RSS added (MiB)':>21} {'parameters held (MiB)':>22} "
          f"{'vs one rank':>12} {'build s':>8}")  # fmt: skip
    for case, r in rows.items():
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref else "-"
        held = "-" if r["held_mib"] is None else f"{r['held_mib']:.0f}"
        print(f"{case:<20} {r['peak_mib']:>21.0f} {held:>22} {ratio:>12} "
              f"{r['seconds']:>8.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
