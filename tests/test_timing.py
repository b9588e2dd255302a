"""Device-true timing: one clock chosen by device (megatiny/parallel/timing.py) times steps and
every observed collective; the CUDA side is in tests/test_gpu.py."""

import time

import torch
import torch.distributed as dist

from megatiny.parallel import collectives
from megatiny.parallel.timing import DeviceClock, clock_for
from megatiny.parallel.tracer import CommTracer
from megatiny.testing import run_ranks


def test_clock_is_chosen_by_device():
    assert not DeviceClock("cpu").cuda
    assert DeviceClock(torch.device("cuda", 0)).cuda  # no GPU needed to choose
    assert not clock_for(None).cuda and not clock_for(torch.zeros(1)).cuda
    assert clock_for(torch.zeros(1, device="meta")).device.type == "meta"


def test_cpu_clock_is_wall_time():
    clock = DeviceClock("cpu")
    started = clock.start()
    time.sleep(0.05)
    assert 0.05 <= clock.seconds(started) < 1.0


class _FixedClock:
    """A clock that reads 1.25 s (CPU-like: async ops add their wait)."""

    cuda = False

    def start(self):
        return None

    def seconds(self, started):
        return 1.25


def _traced_with(fake: bool):
    if fake:
        collectives.clock_for = lambda t: _FixedClock()
    t = torch.ones(4)
    with CommTracer(dist.get_rank()) as tracer:
        collectives.all_reduce(t)
        collectives.all_reduce(t, async_op=True).wait()
    return {row["op"]: (row["calls"], row["seconds"]) for row in tracer.rows()}


def test_traced_collective_seconds_come_from_the_device_clock():
    calls, seconds = run_ranks(_traced_with, 2, True, timeout=120)[0]["all_reduce"]
    # the synchronous op reads the clock (1.25); the async one its posting (1.25) plus its wait
    assert calls == 2 and 2.5 <= seconds < 3.5
    calls, seconds = run_ranks(_traced_with, 2, False, timeout=120)[0]["all_reduce"]
    assert calls == 2 and 0 < seconds < 2.5
