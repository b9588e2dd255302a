"""`bash benchmarks/gpu_check.sh --dry-run` runs the GPU check's plumbing on CPU: the GPU tests
collected (and skipped here), the kernel-error sweep under the interpreter, every training run
of the check (default, fused, zero 0-3, recompute modes) and the summary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900,
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["tests"] > 0 and summary["tests"]["failures"] == 0
    kernels = {row["kernel"] for row in summary["kernel_errors"]}
    assert kernels == {"softmax", "layer_norm", "rms_norm", "cross_entropy", "flash_attention"}
    assert all(row["pass"] for row in summary["kernel_errors"])
    want = {"default", "fused", "zero0", "zero1", "zero2", "zero3", "recompute_selective",
            "recompute_full", "recompute_op"}  # fmt: skip
    assert set(summary["runs"]) == want
    assert all(r["step"] == 2 and r["tokens_per_second"] > 0 for r in summary["runs"].values())
    assert "## Training runs" in (out / "summary.md").read_text()
