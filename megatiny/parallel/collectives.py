"""The one place megatiny issues collectives and point-to-point messages.

Every all-reduce, all-gather, reduce-scatter, all-to-all, broadcast, send/recv and barrier of the
codebase (comm Functions, DP buckets, ZeRO-1, pipeline p2p, context-parallel ring and all-to-all,
loss and grad-norm reductions, checkpoints) calls a function here, so one module can check and
observe them all:

- device check: with `MEGATINY_CHECK_DEVICES=1` (on in the test suite) a tensor on another device
  than the ParallelContext's (a CPU tensor on a CUDA run, which NCCL rejects) raises at once,
  naming the op, the group and both devices;
- observers: `add_observer(fn)` registers `fn(event)` called after each op with an `OpEvent`
  (group name, op, bytes, seconds, shape, peer, seq) — the communication tracer; start observers
  (`add_start_observer(fn)`) are called with the same event (seconds 0) *before* the op is posted,
  so the flight recorder knows which op a rank is blocked in;
- labels: `set_labels(step=3, mb=7, ...)` tags the ops that follow (the loop sets the step and
  phase, the pipeline schedules the micro-batch, chunk and p2p direction); observers read them
  with `labels()`.

bytes = numel x itemsize of the full tensor the op works on, as this rank sees it: the input of
all_reduce / reduce_scatter / broadcast / all_to_all, the output of all_gather, each message of
send / recv.
seconds = the op's time by the device's clock (megatiny/parallel/timing.py, the one place that
chooses): on the CPU wall time inside the call (for async ops, posting plus `wait()` on the handle
given back); on CUDA the CUDA-event time from the op's posting to its completion on the current
stream (for async ops, to `wait()`: overlapped compute queued in between counts), each reading
synchronising on its end event — only while an observer (tracer, flight recorder) is attached.

Groups are named by the ParallelContext that made them (`name_group`): "tp", "cp", "dp", "pp",
"mp" (model replica), "dp_cp", "embedding"; the default group is "world".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatiny.parallel.timing import DeviceClock, clock_for

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); the
# fallback for older torch lives only here.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class OpEvent:
    group: str
    op: str
    bytes: int
    seconds: float
    shape: tuple
    peer: int | None = None  # send / recv: the global rank of the other side
    seq: int = 0  # this rank's op number: a start event and its end event share it
    index: int = 0  # position of a send / recv in its batch_isend_irecv call


_names: dict = {}
_expected_device: list[torch.device | None] = [None]
_observers: list[Callable[[OpEvent], None]] = []
_start_observers: list[Callable[[OpEvent], None]] = []
_labels: dict = {}
_seq = [0]


def name_group(group, name: str) -> None:
    """Give `group` the name observers see ("tp", "dp", ...)."""
    if group is not None:
        _names[group] = name


def group_name(group) -> str:
    if group is None or group is dist.group.WORLD:
        return "world"
    return _names.get(group, "other")


def expect_device(device: torch.device | str | None) -> None:
    """The device every tensor given to a collective must be on (set by ParallelContext)."""
    _expected_device[0] = None if device is None else torch.device(device)


def add_observer(fn: Callable[[OpEvent], None]) -> Callable[[], None]:
    """Call `fn(event)` after every op; returns a function that removes it."""
    _observers.append(fn)
    return lambda: _observers.remove(fn) if fn in _observers else None


def add_start_observer(fn: Callable[[OpEvent], None]) -> Callable[[], None]:
    """Call `fn(event)` (seconds 0) before every op is posted; returns a function that removes it."""
    _start_observers.append(fn)
    return lambda: _start_observers.remove(fn) if fn in _start_observers else None


def set_labels(**labels) -> None:
    """Tag the ops that follow, e.g. set_labels(step=3, phase="train"); a value None removes a
    label. Cheap (a dict update): the schedules call it per micro-batch."""
    for key, value in labels.items():
        if value is None:
            _labels.pop(key, None)
        else:
            _labels[key] = value


def labels() -> dict:
    """The current labels (a copy)."""
    return dict(_labels)


def _observed() -> bool:
    return bool(_observers or _start_observers)


def _next_seq() -> int:
    _seq[0] += 1
    return _seq[0]


def _check_devices(op: str, group, tensors) -> None:
    expected = _expected_device[0]
    if expected is None or os.environ.get("MEGATINY_CHECK_DEVICES") != "1":
        return
    for t in tensors:
        same = t.device.type == expected.type and (
            expected.index is None or t.device.index in (None, expected.index)
        )
        if not same:
            raise RuntimeError(
                f"{op} over the {group_name(group)} group got a tensor on {t.device} "
                f"(shape {tuple(t.shape)}) but the parallel context runs on {expected}: every "
                "tensor a collective touches must be on the context's device (NCCL rejects CPU "
                "tensors); create it with device=ctx.device"
            )


def _event(group, op, t, nbytes, seconds, peer=None, seq=0, index=0) -> OpEvent:
    shape = () if t is None else tuple(t.shape)
    return OpEvent(group_name(group), op, nbytes, seconds, shape, peer, seq, index)


def _start(group, op, t, nbytes, peer=None, index=0) -> int:
    seq = _next_seq()
    if _start_observers:
        event = _event(group, op, t, nbytes, 0.0, peer, seq, index)
        for fn in list(_start_observers):
            fn(event)
    return seq


def _report(group, op: str, t, nbytes: int, seconds: float, peer=None, seq=0, index=0) -> None:
    event = _event(group, op, t, nbytes, seconds, peer, seq, index)
    for fn in list(_observers):
        fn(event)


class _TimedWork:
    """An async handle that reports its op when `wait()` returns: on the CPU the blocking time,
    posting the op plus waiting for it; on CUDA the event time from posting to completion."""

    def __init__(self, work, report, clock: DeviceClock, started, posting_seconds: float):
        self._work, self._report, self._seconds = work, report, posting_seconds
        self._clock, self._started = clock, started

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        if self._clock.cuda:
            self._report(self._clock.seconds(self._started))
        else:
            self._report(self._seconds + time.perf_counter() - start)
        return out

    def is_completed(self):
        return self._work.is_completed()


def _issue(op: str, group, tensors, nbytes: int, call, async_op: bool = False):
    _check_devices(op, group, tensors)
    if not _observed():
        return call()
    t = tensors[0] if tensors else None
    seq = _start(group, op, t, nbytes)
    clock = clock_for(t)
    started = clock.start()
    result = call()

    def report(seconds):
        _report(group, op, t, nbytes, seconds, seq=seq)

    if async_op and result is not None:
        posting = 0.0 if clock.cuda else clock.seconds(started)
        return _TimedWork(result, report, clock, started, posting)
    report(clock.seconds(started))
    return result


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In place, as `dist.all_reduce`."""
    return _issue(
        "all_reduce", group, [t], _nbytes(t),
        lambda: dist.all_reduce(t, op=op, group=group, async_op=async_op), async_op,
    )  # fmt: skip


def all_gather_into(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """`out` (p x t's numel, rank-major) = every rank's `t`."""
    return _issue(
        "all_gather", group, [out, t], _nbytes(out),
        lambda: _all_gather_single(out, t, group=group, async_op=async_op), async_op,
    )  # fmt: skip


def reduce_scatter_into(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """`out` = this rank's 1/p block of the sum over ranks of `t` (split along dim 0)."""
    return _issue(
        "reduce_scatter", group, [out, t], _nbytes(t),
        lambda: _reduce_scatter_single(out, t, group=group, async_op=async_op), async_op,
    )  # fmt: skip


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    """In place from global rank `src`, as `dist.broadcast`."""
    return _issue(
        "broadcast", group, [t], _nbytes(t),
        lambda: dist.broadcast(t, src=src, group=group, async_op=async_op), async_op,
    )  # fmt: skip


def all_to_all(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """`out` block j (of p equal blocks along dim 0) = block i of rank j's `t`, as
    `dist.all_to_all_single` (i = this rank)."""
    return _issue(
        "all_to_all", group, [out, t], _nbytes(t),
        lambda: dist.all_to_all_single(out, t, group=group, async_op=async_op), async_op,
    )  # fmt: skip


def all_to_all_single(
    out: torch.Tensor, t: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None
):
    """Variable-size all-to-all along dim 0: `t`'s rows are cut into blocks of `in_splits[j]`
    rows, block j goes to rank j; `out` receives `out_splits[j]` rows from rank j, in rank order
    (`dist.all_to_all_single` with split sizes; MoE token dispatch)."""
    return _issue(
        "all_to_all", group, [out, t], _nbytes(t),
        lambda: dist.all_to_all_single(out, t, out_splits, in_splits, group=group),
    )  # fmt: skip


def batch_isend_irecv(messages: list[tuple[str, torch.Tensor, int]], group=None) -> list:
    """Post ("send" | "recv", tensor, global peer rank) messages together; returns the handles.
    Each message is reported as its own send / recv op when its handle's wait() returns."""
    ops = [
        dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, group=group)
        for kind, t, peer in messages
    ]
    for kind, t, _ in messages:
        _check_devices(kind, group, [t])
    if not ops:
        return []
    # Start events (peer and position in the batch: the flight recorder's p2p entries) before
    # posting; each message's end event carries the same seq when its handle's wait() returns.
    seqs = [_start(group, kind, t, _nbytes(t), peer, i) if _observed() else 0
            for i, (kind, t, peer) in enumerate(messages)]  # fmt: skip
    clock = clock_for(messages[0][1])
    started, start = clock.start(), time.perf_counter()
    if messages[0][1].is_meta:  # a dry run: the fake group posts ops one by one, unbatched
        works = [op.op(op.tensor, op.peer, op.group) for op in ops]
    else:
        works = dist.batch_isend_irecv(ops)
    if not _observers:
        return works
    posting = (time.perf_counter() - start) / len(works)

    def reporter(kind, t, peer, seq, i):
        return lambda sec: _report(group, kind, t, _nbytes(t), sec, peer, seq, i)

    return [
        _TimedWork(work, reporter(kind, t, peer, seq, i), clock, started, posting)
        for i, ((kind, t, peer), work, seq) in enumerate(zip(messages, works, seqs))
    ]


def all_gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `t` concatenated along `dim` (no autograd; e.g. to gather shards back to a
    full tensor). A copy of `t` on a group of one."""
    p = dist.get_world_size(group)
    if p == 1:
        return t.clone()
    out = torch.empty((p * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    all_gather_into(out, t.contiguous(), group)
    return torch.cat(out.chunk(p), dim=dim)


def barrier(group=None) -> None:
    _issue("barrier", group, [], 0, lambda: dist.barrier(group=group))
