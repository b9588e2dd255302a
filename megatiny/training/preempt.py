"""Save on preemption: SIGTERM / SIGINT (a scheduler's warning, Ctrl-C) and `train.exit_duration_mins`
stop a run at a step boundary with an intact checkpoint, as Megatron's `--exit-signal-handler` and
`--exit-duration-in-mins` do.

    with Preemption(ctx, exit_duration_mins=tc.exit_duration_mins) as stop:
        while ...:
            ...one step, its logging, evaluation and periodic save...
            if stop.agreed(step):           # every rank, every step: one all-reduce (MAX)
                save(); break

A signal only sets a flag, so the step in progress (micro-batches, evaluation, a checkpoint being
written) finishes on every rank. After each step all ranks all-reduce their flags: a signal that
reached one rank, or all of them, stops every rank at the same step. The loop then saves (unless it
just did) and `megatiny train` exits 0 after printing one line; the launchers exit 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), see launch/run_local.sh.

A second signal at least `REPEAT_S` after the first exits the rank at once (code 128 + signal)
without saving: checkpoints are written to a temporary directory and renamed when complete, so
`--resume auto` finds the last complete one. Signals within `REPEAT_S` of the first count as one
(a launcher or scheduler that relays the same signal to every process).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

REPEAT_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Catches SIGTERM / SIGINT on this rank while active; `agreed(step)` is the collective check."""

    def __init__(self, ctx, exit_duration_mins: float = 0.0, clock=time.monotonic):
        self.ctx = ctx
        self.deadline = clock() + 60 * exit_duration_mins if exit_duration_mins else None
        self.clock = clock
        self.signal: int | None = None  # the first signal received
        self.received_at = 0.0
        self.reason: str | None = None  # set when the ranks agreed to stop
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signal.signal's rule
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.received_at = signum, now
            return
        if now - self.received_at < REPEAT_S:
            return
        name = signal.Signals(signum).name
        if self.ctx.rank == 0:
            print(f"megatiny train: second {name}: exiting now without saving (the last "
                  "complete checkpoint stays; continue with --resume auto)",
                  file=sys.stderr, flush=True)  # fmt: skip
        os._exit(128 + signum)

    def agreed(self, step: int) -> bool:
        """Collective: True on every rank when any rank was signalled or ran past the deadline.
        `reason` then names it ('SIGTERM', or 'train.exit_duration_mins')."""
        from megatiny.parallel import collectives

        local = 0
        if self.signal is not None:
            local = int(self.signal)
        elif self.deadline is not None and self.clock() >= self.deadline:
            local = 1000  # past the deadline: not a signal number
        if self.ctx.world_size > 1:
            flag = torch.tensor([local], dtype=torch.int64, device=self.ctx.device)
            collectives.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        if not local:
            return False
        self.reason = "train.exit_duration_mins" if local == 1000 else signal.Signals(local).name
        return True
