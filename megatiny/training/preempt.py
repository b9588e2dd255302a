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

Outside the loop, `StartupGuard` (installed by megatiny/cli.py before `megatiny train` or
`megatiny finetune` imports or starts anything) covers the rest of the process's life;
`startup_phase(name)` says where it is:

    phase                          a signal there
    starting (imports, config)     } ends this rank at once: rank 0 prints one line naming the
    checking the config (--check)  } phase ("stopped by SIGTERM during startup (...): nothing was
    loading the pretrained model,  } trained or saved since the last checkpoint"), the run-dir
      tokenizer and data (finetune)} lock is released, and the rank exits 128 + signal, or 0
    starting the process group     } under torchrun (whose launcher then exits 128 + signal)
    building the model and data    }
    verifying the checkpoints      }
    loading checkpoint PATH        }
    claiming the run directory     } held: the lock and any moving aside finish first, then the
    preparing the run              } rank ends the same way (config.yaml, metrics rows)
    waiting for the other ranks    the ranks meet in one all-reduce before the first step: a
      to start the loop            signal held there or by "preparing" stops all; a rank whose
                                   peer ended in startup ends too (held up to MEET_HOLD_S)
    the loop                       Preemption: finish the step, agree, save (above)
    finishing                      none: the run ends as it would; a second one exits at once

Until the ranks meet nothing is agreed: they may be in different phases (no process group yet, or
a peer inside a collective), so each rank ends on its own. A watcher thread woken through
`signal.set_wakeup_fd` does it, so a rank blocked in C++ (a rendezvous, a collective, a file read)
ends at once too. MEGATINY_FAULT=startup_sleep:phase=P:ms=M (megatiny/training/faults.py) makes a
phase slow, for tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time

REPEAT_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOOP, FINISHING = "the loop", "finishing"
MEETING = "waiting for the other ranks to start the loop"
HELD = math.inf  # startup_phase(name, hold=HELD): a signal waits until the next phase
MEET_HOLD_S = 10.0  # how long a signal waits for the ranks to meet at the loop


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
        _meet(self)  # under a StartupGuard: every rank is past startup, or the run ends here
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        startup_phase(FINISHING)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.received_at = signum, now
            return
        if now - self.received_at < REPEAT_S:
            return
        name = signal.Signals(signum).name
        if self.ctx.rank == 0:
            command = _guard.command if _guard is not None else "megatiny train"
            print(f"{command}: second {name}: exiting now without saving (the last "
                  "complete checkpoint stays; continue with --resume auto)",
                  file=sys.stderr, flush=True)  # fmt: skip
        os._exit(128 + signum)

    def agreed(self, step: int) -> bool:
        """Collective: True on every rank when any rank was signalled or ran past the deadline.
        `reason` then names it ('SIGTERM', or 'train.exit_duration_mins')."""
        import torch

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


# ---- before and after the loop ------------------------------------------------------------------

_guard: StartupGuard | None = None


def startup_phase(name: str, hold: float = 0.0) -> None:
    """Main thread: the run enters phase `name`. `hold`: a signal waits up to that many seconds
    (HELD: until the next phase) for the phase's work to finish; a signal held by the
    previous phase ends the run here. No-op without a StartupGuard."""
    guard = _guard
    if guard is not None:
        with guard.lock:
            if guard.pending is not None and guard.phase != FINISHING:
                guard.stop(guard.pending)
            guard.phase, guard.hold = name, hold
    from megatiny.training.faults import startup_sleep_s

    rank = int(os.environ.get("RANK", "0"))
    seconds = startup_sleep_s(name, rank)
    if seconds:  # MEGATINY_FAULT=startup_sleep:... (tests): the phase takes this long
        print(f"fault: rank {rank} sleeps {seconds:g} s in {name}", file=sys.stderr, flush=True)
        time.sleep(seconds)


def _meet(stop: Preemption) -> None:
    """The loop starts: the ranks meet in one all-reduce of the signals held so far. Without it a
    rank still in startup would end on a signal while its peers are already in the first step's
    collectives. All stop here when any was signalled; one that cannot meet a peer (it ended in
    startup) ends too if it was signalled."""
    guard = _guard
    if guard is None:
        return
    with guard.lock:
        guard.phase, guard.hold = MEETING, MEET_HOLD_S  # keeps a signal held by "preparing"
    held = guard.pending or 0
    if stop.ctx.world_size > 1:
        import torch

        from megatiny.parallel import collectives

        flag = torch.tensor([held], dtype=torch.int64, device=stop.ctx.device)
        try:
            collectives.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        except Exception:
            if not (guard.pending or stop.signal):
                raise
            flag.fill_(guard.pending or stop.signal)
        held = int(flag.item())
    with guard.lock:
        if held:
            guard.stop(held)
        # A signal after this rank's share of the all-reduce: Preemption has it too (its handler is
        # installed), so the ranks agree on it after the first step.
        guard.phase, guard.hold, guard.pending = LOOP, 0.0, None


def at_stop(cleanup) -> None:
    """Call `cleanup()` (e.g. release the run-dir lock) when a signal ends the run outside the
    loop."""
    if _guard is not None:
        _guard.cleanups.append(cleanup)


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) neither shares the watcher nor writes to its pipe."""
    global _guard
    guard, _guard = _guard, None
    if guard is not None and guard._pipe is not None:
        with contextlib.suppress(ValueError):  # forked from a thread other than the main one
            signal.set_wakeup_fd(guard._old_fd)
            for sig, handler in guard._previous.items():
                signal.signal(sig, handler)


os.register_at_fork(after_in_child=_forget_in_child)


class StartupGuard:
    """SIGTERM / SIGINT outside the loop (module docstring), while active:

    with StartupGuard("megatiny train"):
        ...the whole command...
    """

    def __init__(self, command: str):
        self.command = command
        self.phase, self.hold = "starting (imports, config)", 0.0
        self.pending: int | None = None  # a signal held by the phase (or after the loop)
        self.pending_at = 0.0
        self.received: int | None = None  # a signal seen by the main thread's handler
        self.lock = threading.Lock()
        self.cleanups: list = []
        self._pipe: tuple[int, int] | None = None
        self._previous: dict = {}
        self._old_fd = -1

    def __enter__(self) -> StartupGuard:
        global _guard
        if threading.current_thread() is not threading.main_thread() or _guard is not None:
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        self._pipe, _guard = (r, w), self
        watcher = threading.Thread(target=self._watch, args=(r,), name="megatiny-signals")
        watcher.daemon = True
        watcher.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _guard
        if self._pipe is None:
            return
        with self.lock:  # blocks for good while the watcher ends the process
            if exc_type is not None and self.phase not in (LOOP, FINISHING):
                signum = self.pending or self.received
                if signum:  # e.g. a collective failed as a signalled peer left: no traceback
                    self.stop(signum)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_fd)
        os.write(self._pipe[1], b"\0")  # the watcher's cue to close its end and return
        os.close(self._pipe[1])
        self._pipe, _guard = None, None

    def _note(self, signum, frame) -> None:
        self.received = signum  # the watcher thread acts; this handler keeps Python's default off

    def _watch(self, fd: int) -> None:
        while True:
            for signum in os.read(fd, 64):
                if signum == 0:
                    os.close(fd)
                    return
                if signum in SIGNALS:
                    self._signal(signum)

    def _signal(self, signum: int) -> None:
        now = time.monotonic()
        with self.lock:
            if self.phase == LOOP:  # Preemption's handler has it
                return
            if self.hold or self.phase == FINISHING:
                if self.pending is None:
                    self.pending, self.pending_at = signum, now
                    if self.hold != HELD and self.phase != FINISHING:
                        timer = threading.Timer(self.hold, self._expire, (self.phase,))
                        timer.daemon = True
                        timer.start()
                    return
                if now - self.pending_at < REPEAT_S:  # a relayed copy of the same signal
                    return
                if self.phase == FINISHING:  # a second signal: exit at once
                    os._exit(128 + signum)
            self.stop(signum)

    def _expire(self, phase: str) -> None:
        with self.lock:
            if self.phase == phase and self.pending is not None:
                self.stop(self.pending)

    def stop(self, signum: int) -> None:
        """End the process now (with `lock` held): one line from rank 0, the cleanups, exit
        128 + signal, or 0 under torchrun (which would restart or report failed ranks; its
        launcher exits 128 + signal, as for a stop in the loop)."""
        name = signal.Signals(signum).name
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.command}: stopped by {name} during startup ({self.phase}): nothing "
                  "was trained or saved since the last checkpoint; continue with --resume auto",
                  file=sys.stderr, flush=True)  # fmt: skip
        for step in (*self.cleanups, sys.stdout.flush, sys.stderr.flush):
            with contextlib.suppress(Exception):  # exiting anyway: the next one still runs
                step()
        os._exit(0 if "TORCHELASTIC_RUN_ID" in os.environ else 128 + signum)
