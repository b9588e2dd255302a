"""Summarise a benchmarks/gpu_check.sh run: OUT/summary.json and OUT/summary.md.

python benchmarks/gpu_summary.py runs/gpu_check
"""

import json
import os
import sys
import xml.etree.ElementTree as ET

from megatiny.fsutil import atomic_write


def _tests(out: str) -> dict:
    path = os.path.join(out, "gpu_tests.xml")
    if not os.path.exists(path):
        return {"error": "no gpu_tests.xml"}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    return {**counts, "failed": failed}


def _kernels(out: str) -> list:
    path = os.path.join(out, "kernels.json")
    return json.load(open(path)) if os.path.exists(path) else []


def _training(out: str) -> dict:
    path = os.path.join(out, "run", "metrics.jsonl")
    if not os.path.exists(path):
        return {"error": "no run/metrics.jsonl"}
    rows = [json.loads(line) for line in open(path)]
    train = [r for r in rows if "tokens_per_second" in r]
    if not train:
        return {"error": "no training rows"}
    last = train[-1]
    keys = ("step", "loss", "tokens_per_second", "mfu", "peak_memory_gib")
    return {k: last.get(k) for k in keys}


def main(out: str) -> int:
    summary = {"tests": _tests(out), "kernels": _kernels(out), "training": _training(out)}
    atomic_write(os.path.join(out, "summary.json"), lambda f: json.dump(summary, f, indent=1), "w")
    t, tr = summary["tests"], summary["training"]
    lines = ["# GPU check", "", "Produced by `benchmarks/gpu_check.sh`.", "", "## Tests", ""]
    lines.append(f"{t.get('tests', 0)} GPU tests: {t.get('failures', 0)} failed, "
                 f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped {t.get('failed', '')}")  # fmt: skip
    lines += ["", "## Kernels", "", "| kernel | case | pass | value |", "|---|---|---|---|"]
    for row in summary["kernels"]:
        value = row.get("tflops") or row.get("gbs") or row.get("gb_per_s") or ""
        lines.append(f"| {row.get('kernel', '')} | {row.get('case', '')} | "
                     f"{row.get('pass', row.get('mode', ''))} | {value} |")  # fmt: skip
    lines += ["", "## Training (last logged step)", "", "```", json.dumps(tr, indent=1), "```", ""]
    atomic_write(os.path.join(out, "summary.md"), lambda f: f.write("\n".join(lines)), "w")
    print("\n".join(lines))
    return 0 if not t.get("failures") and not t.get("errors") and "error" not in tr else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check"))
