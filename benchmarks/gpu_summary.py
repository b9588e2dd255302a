"""Summarise a benchmarks/gpu_check.sh run: OUT/summary.json and OUT/summary.md.

python benchmarks/gpu_summary.py runs/gpu_check

Reads what the check wrote: gpu_tests.xml (pytest), kernel_errors.json, kernels.json (speed; absent
in --dry-run), runs/<name>/metrics.jsonl (one training run each) and settings.txt. Exit status 1
when a test failed, a training run has no metrics or a kernel's error exceeds its dtype's bound.
"""

import json
import os
import sys
import xml.etree.ElementTree as ET

from megatiny.fsutil import atomic_write

# Largest acceptable |fused - torch| per dtype (outputs and gradients of O(1) inputs).
ERROR_BOUND = {"float32": 1e-3, "bfloat16": 6e-2, "float16": 8e-3}


def _tests(out: str) -> dict:
    path = os.path.join(out, "gpu_tests.xml")
    if not os.path.exists(path):
        return {"error": "no gpu_tests.xml"}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    return {**counts, "failed": failed}


def _json(out: str, name: str) -> list:
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else []


def _runs(out: str) -> dict:
    root = os.path.join(out, "runs")
    runs = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "metrics.jsonl")
        rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        train = [r for r in rows if "tokens_per_second" in r]
        if not train:
            runs[name] = {"error": f"no training rows in {path}"}
            continue
        timed = train[1:] or train  # the first step pays for compilation and allocation
        keys = ("step", "loss", "mfu", "peak_memory_gib")
        runs[name] = {k: train[-1].get(k) for k in keys}
        runs[name]["tokens_per_second"] = sum(r["tokens_per_second"] for r in timed) / len(timed)
    return runs


def main(out: str) -> int:
    settings = open(os.path.join(out, "settings.txt")).read().strip() if os.path.exists(
        os.path.join(out, "settings.txt")) else ""  # fmt: skip
    errors = _json(out, "kernel_errors.json")
    for row in errors:
        bound = ERROR_BOUND[row["dtype"]]
        row["pass"] = row["max_err_out"] <= bound and row["max_err_grad"] <= bound
    summary = {"settings": settings, "tests": _tests(out), "kernel_errors": errors,
               "kernels": _json(out, "kernels.json"), "runs": _runs(out)}  # fmt: skip
    atomic_write(os.path.join(out, "summary.json"), lambda f: json.dump(summary, f, indent=1), "w")
    t = summary["tests"]
    lines = ["# GPU check", "", f"Produced by `benchmarks/gpu_check.sh` ({settings}).", "",
             "## Tests", "",
             f"{t.get('tests', 0)} GPU tests: {t.get('failures', 0)} failed, {t.get('errors', 0)} "
             f"errors, {t.get('skipped', 0)} skipped {t.get('failed', '')}", "",
             "## Kernels vs torch (max abs error)", "",
             "| kernel | case | dtype | output | gradients | within bound |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['max_err_out']:.2e} | "
              f"{r['max_err_grad']:.2e} | {r['pass']} |" for r in errors]  # fmt: skip
    lines += ["", "## Kernel speed", "", "| kernel | case | pass | value |", "|---|---|---|---|"]
    for row in summary["kernels"]:
        value = row.get("tflops") or row.get("gbs") or row.get("gb_per_s") or ""
        lines.append(f"| {row.get('kernel', '')} | {row.get('case', row.get('size', ''))} | "
                     f"{row.get('pass', row.get('mode', ''))} | {value} |")  # fmt: skip
    lines += ["", "## Training runs", "",
              "| run | steps | loss | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in summary["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | |")
            continue
        mfu = "" if r["mfu"] is None else f"{r['mfu']:.3f}"
        lines.append(f"| {name} | {r['step']} | {r['loss']:.4f} | {r['tokens_per_second']:.0f} | "
                     f"{mfu} | {r['peak_memory_gib']:.2f} |")  # fmt: skip
    atomic_write(os.path.join(out, "summary.md"), lambda f: f.write("\n".join(lines) + "\n"), "w")
    print("\n".join(lines))
    bad_runs = not summary["runs"] or any("error" in r for r in summary["runs"].values())
    bad_kernels = not errors or not all(r["pass"] for r in errors)
    return int(
        bool(t.get("failures") or t.get("errors") or "error" in t or bad_runs or bad_kernels)
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check"))
