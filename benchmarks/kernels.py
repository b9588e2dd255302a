"""Fused Triton kernels vs torch eager and torch.compile: time, GB/s and % of HBM bandwidth;
flash attention vs F.scaled_dot_product_attention in TFLOP/s.

    .venv/bin/python benchmarks/kernels.py                      # all kernels, bf16, PNG + JSON
    .venv/bin/python benchmarks/kernels.py --kernels softmax --dtype fp16 --no-compile

Every kernel is memory-bound, so the figure of merit is achieved bandwidth: the bytes a pass must
move (its inputs read once, its outputs written once; see each module's ``benchmark_cases``)
divided by the time ``triton.testing.do_bench`` measures (median, L2 flushed between runs).
Two passes per case: ``fwd`` and ``fwd+bwd`` (one forward and one backward; bytes of both).
The reference numbers (eager torch of the same math, and ``torch.compile`` of it) are measured in
the same run on the same tensors. Flash attention is compute-bound: its cases give FLOPs
(``flops_fwd``/``flops_bwd``, the causal half of the ``s x t`` matmuls) and are reported in TFLOP/s
and % of the dense bf16 tensor-core peak, with the ratio to SDPA (its "eager" reference).
Needs a CUDA GPU; elsewhere it says so and exits 0.
"""

import argparse
import json
import os
import sys

import torch

from megatiny.fsutil import atomic_write

# HBM bandwidth in GB/s by device name (SXM parts); override with --peak-gbs.
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense bf16/fp16 tensor-core TFLOP/s (SXM parts); override with --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
MODULES = ("softmax", "layernorm", "cross_entropy", "flash_attention")


def peak_gbs(device_name: str, table=PEAK_GBS) -> float | None:
    for key, value in table.items():
        if key in device_name:
            return value
    return None


def bench_ms(fn, x, backward: bool) -> float:
    """Median milliseconds of fn() (or fn().backward(dy)) with do_bench."""
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            fn()
            return do_bench(fn)
    y = fn()
    dy = torch.randn_like(y)

    def step():
        fn().backward(dy)

    step()
    return do_bench(step, grad_to_none=x if isinstance(x, list) else [x])


def run(modules, dtype, use_compile, peak, peak_tflops=None):
    import importlib

    from tqdm import tqdm

    cases = []
    for name in modules:
        module = importlib.import_module(f"megatiny.kernels.{name}")
        cases += module.benchmark_cases("cuda", dtype)
    rows = []
    for case in tqdm(cases, desc="kernels", unit="case"):
        inputs = case["setup"]()
        impls = {"triton": inputs["fused"], "eager": inputs["eager"]}
        if use_compile and inputs.get("compile", True):
            impls["compile"] = torch.compile(inputs["eager"], dynamic=False)
        for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
            flops = "flops_fwd" in inputs
            work = inputs["flops_fwd" if flops else "bytes_fwd"]
            work += inputs["flops_bwd" if flops else "bytes_bwd"] if backward else 0
            row = dict(kernel=case["kernel"], size=case["size"], pass_=pass_name)
            row["flops" if flops else "bytes"] = work
            for impl, fn in impls.items():
                try:
                    ms = bench_ms(fn, inputs["x"], backward)
                except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                    tqdm.write(
                        f"{case['kernel']} {case['size']} {impl} {pass_name}: {type(e).__name__}: {e}"
                    )
                    continue
                row[f"{impl}_ms"] = ms
                if flops:
                    row[f"{impl}_tflops"] = work / ms / 1e9
                else:
                    row[f"{impl}_gbs"] = work / ms / 1e6
            if peak and "triton_gbs" in row:
                row["triton_pct_peak"] = 100.0 * row["triton_gbs"] / peak
            if peak_tflops and "triton_tflops" in row:
                row["triton_pct_peak"] = 100.0 * row["triton_tflops"] / peak_tflops
            rows.append(row)
        del inputs, impls
        torch.cuda.empty_cache()
    return rows


def print_flops_table(rows, peak_tflops):
    """Flash attention rows: TFLOP/s of the Triton kernel and of SDPA, and their ratio."""
    head = f"{'kernel':<22}{'seq':>7} {'pass':<8}{'triton TFLOP/s':>15}{'% peak':>8}"
    head += f"{'sdpa TFLOP/s':>13}{'x sdpa':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["sdpa_ms"] / r["triton_ms"] if {"sdpa_ms", "triton_ms"} <= r.keys() else None
        cells = [format(r[k], spec) if k in r else format("n/a", ">" + spec.split(".")[0])
                 for k, spec in (("triton_tflops", "15.1f"), ("triton_pct_peak", "8.1f"),
                                 ("sdpa_tflops", "13.1f"))]  # fmt: skip
        print(f"{r['kernel']:<22}{r['size']:>7} {r['pass_']:<8}{''.join(cells)}"
              f"{f'{ratio:8.2f}' if ratio else '     n/a'}")  # fmt: skip
    if peak_tflops:
        print(f"(% peak of {peak_tflops:.0f} dense TFLOP/s; 'x sdpa' = SDPA time / triton time)")


def print_table(rows, peak):
    head = (
        f"{'kernel':<15}{'size':>7} {'pass':<8}{'triton GB/s':>12}{'% peak':>8}{'eager GB/s':>11}"
    )
    head += f"{'compile GB/s':>13}{'x eager':>9}{'x compile':>10}"
    print(head)
    print("-" * len(head))

    def fmt(r, key, spec="12.0f"):
        return format(r[key], spec) if key in r else format("n/a", ">" + spec.split(".")[0])

    for r in rows:
        vs_eager = r["eager_ms"] / r["triton_ms"] if {"eager_ms", "triton_ms"} <= r.keys() else None
        vs_comp = (
            r["compile_ms"] / r["triton_ms"] if {"compile_ms", "triton_ms"} <= r.keys() else None
        )
        print(
            f"{r['kernel']:<15}{r['size']:>7} {r['pass_']:<8}{fmt(r, 'triton_gbs')}"
            f"{fmt(r, 'triton_pct_peak', '8.1f')}{fmt(r, 'eager_gbs', '11.0f')}{fmt(r, 'compile_gbs', '13.0f')}"
            f"{(f'{vs_eager:9.2f}' if vs_eager else '      n/a')}{(f'{vs_comp:10.2f}' if vs_comp else '       n/a')}"
        )
    if peak:
        print(f"(% peak of {peak:.0f} GB/s HBM bandwidth; 'x eager' = eager time / triton time)")


def plot(rows, path, peak, title, peak_tflops=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels), 3.6), squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        compute = any("flops" in r for r in rows if r["kernel"] == kernel)
        unit, line = ("tflops", peak_tflops) if compute else ("gbs", peak)
        for pass_name, style in (("fwd", "-"), ("fwd+bwd", "--")):
            sel = [r for r in rows if r["kernel"] == kernel and r["pass_"] == pass_name]
            for impl, color in (
                ("triton", "C0"),
                ("eager", "C1"),
                ("sdpa", "C1"),
                ("compile", "C2"),
            ):
                pts = [(r["size"], r[f"{impl}_{unit}"]) for r in sel if f"{impl}_{unit}" in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(
                        xs, ys, style, color=color, marker="o", ms=3, label=f"{impl} {pass_name}"
                    )
        if line:
            ax.axhline(line, color="gray", lw=0.8, ls=":", label="peak")
        ax.set_xscale("log", base=2)
        ax.set_title(kernel)
        ax.set_xlabel(
            "seq"
            if "softmax" in kernel or compute
            else ("vocab" if "cross" in kernel else "hidden")
        )
        ax.set_ylabel("TFLOP/s" if compute else "GB/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", choices=MODULES, default=list(MODULES))
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument(
        "--peak-gbs", type=float, default=None, help="HBM bandwidth (default: by GPU name)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="tensor-core TFLOP/s")
    p.add_argument("--plot", default="kernels.png", help="PNG path ('' for none)")
    p.add_argument("--json", default="kernels.json", help="JSON path of the rows ('' for none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py needs a CUDA GPU (none found): the Triton kernels only run "
            "compiled on CUDA; on CPU they are tested under TRITON_INTERPRET=1 by "
            "tests/test_kernels_*.py instead. Nothing measured."
        )
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to benchmark: the interpreter is orders of magnitude slower")
        return 2
    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or peak_gbs(name)
    peak_tflops = args.peak_tflops or peak_gbs(name, PEAK_TFLOPS)
    print(f"{name}, {args.dtype}, peak {peak or 'unknown'} GB/s, torch {torch.__version__}")
    rows = run(args.kernels, DTYPES[args.dtype], not args.no_compile, peak, peak_tflops)
    for r in rows:  # attention's eager reference is SDPA: name it so
        for key in [k for k in r if k.startswith("eager_") and "flops" in r]:
            r["sdpa_" + key[len("eager_") :]] = r.pop(key)
    if any("bytes" in r for r in rows):
        print_table([r for r in rows if "bytes" in r], peak)
    if any("flops" in r for r in rows):
        print_flops_table([r for r in rows if "flops" in r], peak_tflops)
    if args.json:
        payload = dict(device=name, dtype=args.dtype, peak_gbs=peak, rows=rows)
        atomic_write(args.json, lambda f: f.write(json.dumps(payload, indent=1).encode()))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, peak, f"megatiny.kernels on {name} ({args.dtype})", peak_tflops)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
