"""Run a function on N fork-started ranks (CPU gloo by default), in tens of milliseconds.

    results = run_ranks(fn, 4, x, y)          # fn(x, y) runs on every rank; or args=(x, y)
    results[r]                                # what rank r returned

Inside `fn` the default process group is initialized (localhost, a free port), torch uses one
thread, and `torch.distributed.get_rank()` tells the rank. A rank that raises makes `run_ranks`
raise `RankError` with that rank's traceback. Ranks that do not finish within `timeout` seconds
are killed and reported as a hang naming them, with the Python stack each was stuck in (dumped by
`faulthandler` just before the kill). A rank that dies without a result (segfault, `os._exit`) is
reported with its exit code.

Ranks are forked, so `fn` may be a closure or a lambda and sees the caller's imports; its return
value travels back through `torch.save`. `backend="nccl"` puts rank r on `cuda:r`, but CUDA must not
be initialized in the parent before the fork (call `run_ranks` before touching the GPU).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch._dynamo  # noqa: F401 - optimizers import it lazily; once here, not once per fork
import torch.distributed as dist


class RankError(RuntimeError):
    """A rank raised, died without a result, or did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank, world_size, port, fn, args, kwargs, results, env, backend, pg_timeout, stacks):
    try:
        # On a hang the parent sends SIGUSR1: the stack goes to this file before the kill.
        stack_file = open(os.path.join(stacks, f"rank{rank}.txt"), "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=False)
        os.environ.update(env)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
        )
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        try:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
            )
        except Exception:  # noqa: BLE001 - e.g. a port taken between free_port() and bind
            results.put((rank, "init_error", traceback.format_exc()))
            return
        out = fn(*args, **kwargs)
        results.put((rank, "ok", _dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # teardown after a failure must not mask it
                dist.destroy_process_group()


def _hang_report(procs, missing: list[int], stacks: str) -> str:
    """The Python stack of each hung rank (faulthandler, on SIGUSR1)."""
    for r in missing:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5)
    parts = []
    for r in missing:
        path = os.path.join(stacks, f"rank{r}.txt")
        text = open(path).read().strip() if os.path.exists(path) else ""  # noqa: SIM115
        parts.append(f"--- rank {r} was in:\n{text or '(no stack: the rank did not answer)'}")
    return "\n".join(parts)


def run_ranks(
    fn: Callable,
    world_size: int,
    *fn_args: Any,
    args: tuple = (),
    kwargs: dict | None = None,
    backend: str = "gloo",
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(*fn_args, **kwargs)` (or `fn(*args, **kwargs)`) on `world_size` fork-started ranks
    of one process group (`backend`); return the per-rank results, rank order.

    `timeout` bounds the whole run and each collective (the process group's timeout). `env` is
    added to each rank's environment. Raises `RankError` on a failure, death or hang of any rank.
    """
    if fn_args and args:
        raise TypeError("run_ranks: give fn's arguments positionally or as args=(...), not both")
    args = fn_args or tuple(args)
    for attempt in range(INIT_ATTEMPTS):
        try:
            return _launch(fn, world_size, args, kwargs, backend, timeout, env)
        except _InitFailed as e:
            # Forming the process group failed (a free port grabbed by another process between
            # free_port() and bind, or a peer from another job): start afresh on a new port.
            if attempt == INIT_ATTEMPTS - 1:
                raise RankError(f"the process group never formed:\n{e}") from None
    raise AssertionError("unreachable")


INIT_ATTEMPTS = 3


class _InitFailed(Exception):
    """init_process_group failed on a rank: nothing of `fn` ran, the launch can be retried."""


def _launch(fn, world_size, args, kwargs, backend, timeout, env) -> list[Any]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="megatiny-ranks-") as stacks:
        procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    world_size,
                    port,
                    fn,
                    args,
                    kwargs or {},
                    results,
                    env or {},
                    backend,
                    timeout,
                    stacks,
                ),
                daemon=True,
            )  # fmt: skip
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            outputs = _collect(procs, results, world_size, timeout, stacks)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [outputs[r] for r in range(world_size)]


def _collect(procs, results, world_size: int, timeout: float, stacks: str) -> dict[int, Any]:
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(outputs) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(world_size)) - set(outputs))
            raise RankError(
                f"hang: ranks {missing} of {world_size} did not finish within {timeout:.0f}s\n"
                + _hang_report(procs, missing, stacks)
            )
        try:
            rank, status, payload = results.get(timeout=min(left, 0.5))
        except queue.Empty:
            dead = [
                r
                for r, p in enumerate(procs)
                if r not in outputs and not p.is_alive() and p.exitcode not in (0, None)
            ]
            if dead:
                # A rank died without reporting (segfault, os._exit); give others a moment.
                time.sleep(0.2)
                if results.empty():
                    codes = {r: procs[r].exitcode for r in dead}
                    raise RankError(f"ranks died without a result, exit codes {codes}") from None
            continue
        if status == "init_error":
            raise _InitFailed(f"rank {rank} of {world_size}:\n{payload}")
        if status == "error":
            raise RankError(f"rank {rank} of {world_size} failed:\n{payload}")
        outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return outputs


def run_in_fork(fn: Callable, *args: Any, timeout: float = 120.0) -> Any:
    """fn(*args) in one forked process, its result or its error (as RankError) returned here:
    for work that must not leak into this process, such as a fake default process group for a
    meta-device dry run."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()

    def target():
        try:
            results.put(("ok", fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put(("error", traceback.format_exc()))

    proc = ctx.Process(target=target, daemon=True)
    proc.start()
    try:
        kind, value = results.get(timeout=timeout)
    except queue.Empty:
        raise RankError(f"run_in_fork: {getattr(fn, '__name__', fn)} did not finish within "
                        f"{timeout:.0f}s") from None  # fmt: skip
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if kind == "error":
        raise RankError(f"run_in_fork: {getattr(fn, '__name__', fn)} failed:\n{value}")
    return value
