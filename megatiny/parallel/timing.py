"""The one place megatiny picks a timer by device: wall time on the CPU, CUDA events on a GPU.

A host clock around work queued on a GPU measures the launch, not the work: NCCL collectives and
kernels return to Python before they run. So on CUDA a `DeviceClock` records an event on the
current stream at `start()` and another at `seconds()`, then waits for the second
(`Event.synchronize`, a host sync each reading: the price of a true figure, paid only where a
measurement is asked for) and returns the time between them on the device.

Users: step times of the straggler detector (megatiny/training/stragglers.py), the seconds of every
observed collective (megatiny/parallel/collectives.py: `comm.jsonl` by the tracer and the flight
recorder's durations), and the scaling benchmark's split of a step (benchmarks/scaling.py).
"""

from __future__ import annotations

import time

import torch


class DeviceClock:
    """Seconds from `start()` to `seconds(started)`: CUDA event time on a CUDA device (the work
    queued on the current stream in between), wall time elsewhere."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, started) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return started.elapsed_time(end) / 1000
        return time.perf_counter() - started


def clock_for(tensor: torch.Tensor | None) -> DeviceClock:
    """The clock for work on `tensor`'s device (wall time when there is no tensor)."""
    return DeviceClock("cpu" if tensor is None else tensor.device)
