"""Training metrics: throughput, TFLOP/s, MFU, peak memory; one log line, JSONL and TensorBoard.

    tokens_per_second = global_batch_size * seq_length * steps / seconds
    TFLOP/s per GPU   = tokens_per_second * flops_per_token / world_size / 1e12
    MFU               = TFLOP/s per GPU / peak TFLOP/s of one device

`flops_per_token` is Megatron's training FLOPs per token (forward + backward, logits included),
`ModelConfig.flops_per_token(seq_len)`. The peak comes from `train.peak_tflops` when set, else from
the GPU model name (dense bf16 tensor-core peak); on CPU there is no reliable peak, so MFU is
reported as null unless `train.peak_tflops` is given.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s by GPU model name substring, most specific first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("4090", 165.0),
    ("3090", 71.0),
)


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """Peak TFLOP/s of one device: the configured value, else a lookup by GPU name, else None."""
    if configured:
        return float(configured)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS:
            if key in name:
                return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory (CUDA), or the peak resident set size of this process (CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Throughput:
    """Tokens/s, TFLOP/s and MFU over the interval since the last `measure()`."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._steps = 0

    def add_step(self) -> None:
        self._steps += 1

    def measure(self) -> dict:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tokens_per_second = self.tokens_per_step * self._steps / elapsed
        tflops = tokens_per_second * self.flops_per_token / self.world_size / 1e12
        out = {
            "tokens_per_second": tokens_per_second,
            "tflops_per_device": tflops,
            "mfu": (tflops / self.peak) if self.peak else None,
            "step_time_s": elapsed / max(self._steps, 1),
        }
        self.reset()
        return out


def format_line(step: int, total: int, m: dict) -> str:
    """One human line: step, loss, lr, grad norm, throughput, MFU, memory."""
    parts = [f"step {step:>6d}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}"]
    if m.get("grad_norm") is not None:
        parts.append(f"grad_norm {m['grad_norm']:.3f}")
    parts.append(f"tok/s {m['tokens_per_second']:,.0f}")
    parts.append(f"TFLOP/s/dev {m['tflops_per_device']:.3g}")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['peak_memory_gib']:.2f} GiB")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    if "moe_aux_loss" in m:  # MoE runs: the router's losses beside the LM loss
        parts.append(f"moe aux {m['moe_aux_loss']:.4f} z {m['moe_z_loss']:.4f}")
    return " | ".join(parts)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    """Rank-0 sink: `metrics.jsonl` (one object per call, flushed), `tensorboard/` scalars and,
    given `wandb` settings, a Weights & Biases run.

    Other ranks construct it with `enabled=False` and every method is then a no-op. A resumed
    run passes `purge_step` = its first step: TensorBoard drops the events the crashed run wrote
    from there on (the loop moves those rows of metrics.jsonl aside), so each step appears once.
    """

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None, wandb: dict | None = None):  # fmt: skip
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None:  # {project, name, run_id, config}: megatiny/training/wandb_sink.py
            from megatiny.training.wandb_sink import WandbSink

            self._wandb = WandbSink(run_dir, **wandb)
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = os.path.join(run_dir, "tensorboard")
            self._tb = SummaryWriter(self.tensorboard_dir, purge_step=purge_step)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        if prefix != "train":
            record["split"] = prefix
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and value is not None:
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, metrics, prefix)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar with ETA on rank 0 (stderr); `None` elsewhere. Log lines go through `bar.write`."""
    if not enabled:
        return None
    from tqdm import tqdm

    # Redirected to a file, redraw rarely instead of writing a line per step.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval)  # fmt: skip
