"""Run a function on N fork-started gloo ranks (CPU), in tens of milliseconds.

    results = run_ranks(fn, world_size=4, args=(x,))      # fn(*args) runs on every rank
    results[r]                                             # what rank r returned

Inside `fn` the default process group is initialized (gloo, localhost, a free port), torch uses
one thread, and `torch.distributed.get_rank()` tells the rank. A rank that raises makes
`run_ranks` raise `RankError` with that rank's traceback; ranks that do not finish within
`timeout` seconds are killed and reported as a hang.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import queue
import socket
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


def _worker(rank, world_size, port, fn, args, kwargs, results, env, pg_timeout):
    try:
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
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
        )
        out = fn(*args, **kwargs)
        results.put((rank, "ok", _dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # teardown after a failure must not mask it
                dist.destroy_process_group()


def run_ranks(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, kwargs or {}, results, env or {}, timeout),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise RankError(
                    f"hang: ranks {missing} of {world_size} did not finish within {timeout:.0f}s"
                )
            try:
                rank, status, payload = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None)
                ]
                dead = [r for r in dead if r not in outputs]
                if dead:
                    # A rank died without reporting (segfault, os._exit); give others a moment.
                    time.sleep(0.2)
                    if results.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RankError(
                            f"ranks died without a result, exit codes {codes}"
                        ) from None
                continue
            if status == "error":
                raise RankError(f"rank {rank} of {world_size} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world_size)]
