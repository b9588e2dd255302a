"""The flight recorder: the last N communication ops of this rank, dumped when the job hangs.

    recorder = FlightRecorder(ctx, run_dir, size=1000, stall_s=300).start()
    ...                                    # every collective and p2p op is recorded
    recorder.dump("timeout: ...")          # -> run_dir/debug/rank<r>.json
    recorder.stop()

An entry: op, group, this rank's op number on that group (`gi`), peer and message number for
send / recv (`pi`), shape, bytes, state (running | done), seconds (the device's clock, as
collectives.py measures them: wall time on CPU, CUDA events on a GPU), and the labels of the moment
(`collectives.set_labels`: step and phase from the loop; micro-batch, chunk and the p2p direction
such as `recv_forward(mb 7)` from the pipeline schedules). An op is recorded when it is posted,
so a rank blocked in a collective shows it as `running`.

A rank dumps its ring buffer, its per-group op counts and every thread's Python stack:
- on SIGUSR1 (`kill -USR1 <pid>`): a thread waits for the signal, so a rank whose main thread
  is blocked inside a collective still answers;
- when no op started or finished for `stall_s` seconds (a watchdog thread; the loop uses half
  of `train.timeout_s`, so every rank dumps before the process-group timeout kills the job);
- when the loop sees an exception (e.g. the collective timed out).
`megatiny debug hang RUN_DIR` (megatiny/training/hang.py) reads the dumps and says who waits for
whom.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

from megatiny.parallel import collectives

GROUPS = ("tp", "cp", "dp", "pp", "mp", "dp_cp", "embedding")


class FlightRecorder:
    def __init__(self, ctx, run_dir: str, size: int = 1000, stall_s: float | None = None):
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.groups = {name: list(getattr(ctx, f"{name}_ranks", None) or []) for name in GROUPS}
        self.groups["world"] = list(range(ctx.world_size))
        self.path = os.path.join(run_dir, "debug", f"rank{ctx.rank}.json")
        self.stall_s = stall_s
        self.ops: collections.deque = collections.deque(maxlen=size)
        self.running: dict[int, dict] = {}
        self.counts: dict[str, int] = {}  # ops posted per group
        self.pairs: dict[str, int] = {}  # "send:5" / "recv:5" messages posted per peer
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._removers: list = []
        self._threads: list[threading.Thread] = []
        self._old_handler = None
        self._main = threading.main_thread().ident

    # ---- observing -------------------------------------------------------------------------

    def _on_start(self, ev: collectives.OpEvent) -> None:
        with self._lock:
            gi = self.counts.get(ev.group, 0)
            self.counts[ev.group] = gi + 1
            entry = {"seq": ev.seq, "op": ev.op, "group": ev.group, "gi": gi,
                     "shape": list(ev.shape), "bytes": ev.bytes, "state": "running",
                     "t": time.time(), "labels": collectives.labels()}  # fmt: skip
            if ev.peer is not None:
                key = f"{ev.op}:{ev.peer}"
                entry["peer"], entry["pi"] = ev.peer, self.pairs.get(key, 0)
                self.pairs[key] = entry["pi"] + 1
                names = entry["labels"].pop("p2p", None)
                if names and ev.index < len(names):
                    entry["name"] = names[ev.index]
            entry["labels"].pop("p2p", None)
            self.ops.append(entry)
            self.running[ev.seq] = entry
            self._last = time.monotonic()

    def _on_end(self, ev: collectives.OpEvent) -> None:
        with self._lock:
            entry = self.running.pop(ev.seq, None)
            if entry is not None:
                entry["state"], entry["seconds"] = "done", round(ev.seconds, 6)
            self._last = time.monotonic()

    # ---- dumping ----------------------------------------------------------------------------

    def snapshot(self, reason: str) -> dict:
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = {}
        for ident, frame in frames.items():
            if ident == threading.get_ident() and ident != self._main:
                continue  # the dumping thread itself
            name = "main" if ident == self._main else names.get(ident, str(ident))
            stacks[name] = traceback.format_stack(frame)
        with self._lock:
            ops = [dict(e) for e in self.ops]
            counts, pairs = dict(self.counts), dict(self.pairs)
        return {"rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(),
                "pid": os.getpid(), "time": time.time(), "reason": reason,
                "groups": self.groups, "labels": collectives.labels(), "counts": counts,
                "pairs": pairs, "ops": ops, "stacks": stacks}  # fmt: skip

    def dump(self, reason: str) -> str:
        """Write run_dir/debug/rank<r>.json (atomically); returns its path."""
        from megatiny.fsutil import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(self.snapshot(reason), indent=1))
        except OSError as e:  # a full disk must not turn a hang report into a new crash
            print(f"flight recorder: cannot write {self.path}: {e}", file=sys.stderr)
        return self.path

    # ---- threads: watchdog and SIGUSR1 ------------------------------------------------------

    def _watchdog(self) -> None:
        poll = min(1.0, self.stall_s / 5)
        dumped_at = None
        while not self._stop.wait(poll):
            last = self._last
            if time.monotonic() - last > self.stall_s and dumped_at != last:
                dumped_at = last
                with self._lock:
                    running = [e for e in self.running.values()]
                what = (f"waiting in {running[0]['group']} {running[0]['op']}" if running
                        else "outside communication")  # fmt: skip
                path = self.dump(f"stall: no communication op progressed for "
                                 f"{self.stall_s:.0f}s ({what})")  # fmt: skip
                print(f"rank {self.rank}: no progress for {self.stall_s:.0f}s; flight recorder "
                      f"dumped to {path} (`megatiny debug hang` reads it)",
                      file=sys.stderr, flush=True)  # fmt: skip

    def _signal_waiter(self) -> None:
        while not self._stop.is_set():
            signal.sigwait({signal.SIGUSR1})
            if not self._stop.is_set():
                self.dump("SIGUSR1")

    def start(self) -> FlightRecorder:
        self._removers = [collectives.add_start_observer(self._on_start),
                          collectives.add_observer(self._on_end)]  # fmt: skip
        if self.stall_s:
            self._spawn(self._watchdog, "flight-watchdog")
        if threading.current_thread() is threading.main_thread():
            # SIGUSR1 goes to a thread that waits for it (the main thread may be blocked in C);
            # the handler is the fallback when another thread receives it.
            self._old_handler = signal.signal(signal.SIGUSR1, lambda *_: self.dump("SIGUSR1"))
            # Blocked here (and in threads started from now on, which inherit the mask) so the
            # kernel hands it to the waiting thread.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            self._spawn(self._signal_waiter, "flight-sigusr1")
        return self

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for remove in self._removers:
            remove()
        self._removers = []
        for t in self._threads:
            if t.name == "flight-sigusr1" and t.is_alive():
                signal.pthread_kill(t.ident, signal.SIGUSR1)
            t.join(timeout=2)
        self._threads = []
        if self._old_handler is not None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
            signal.signal(signal.SIGUSR1, self._old_handler)
            self._old_handler = None
