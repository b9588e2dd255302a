"""Fault injection for tests and drills, through the environment:

    MEGATINY_FAULT=slow:rank=R:ms=M
        global rank R sleeps M ms in its compute (before its forward) every training step;
    MEGATINY_FAULT=grad_bitflip:rank=R:step=S[:param=NAME][:repeat=1][:bit=B]
        on rank R at step S, after the backward and before any gradient reduction, one bit of one
        element of the local gradient of parameter NAME (default: the rank's first parameter) is
        flipped: bit B of the element's binary representation (default 22, the top mantissa bit
        of fp32: the value changes by up to 50% and stays finite, so nothing but a check sees
        it; 30 is an exponent bit: usually a huge value). `repeat=1`: on every backward pass from
        step S on, a different element each pass, as a failing chip would (so a replay of the
        step computes yet another gradient: megatiny/training/sdc.py calls that persistent).
    MEGATINY_FAULT=startup_sleep:phase=P:ms=M[:rank=R]
        rank R (default: every rank) sleeps M ms at the start of each startup phase whose name
        begins with P (`building`, `loading`, `claiming`, ...: megatiny/training/preempt.py), so
        that a test can signal a run there; read by `startup_sleep_s`, ignored by `parse`.

Several faults are separated by commas. A step whose gradient is to be flipped runs with its
gradient reduction deferred until after the backward (megatiny/training/sdc.py), so the flip
lands before any reduction. Under parallel.zero=2/3 no rank holds its whole local gradient (each
micro-batch's is reduce-scattered bucket by bucket and freed): the bit is flipped in NAME's region
of its bucket's local gradient as that bucket's reduce-scatter is launched (the first micro-batch
of the pass that launches it; `flip_bucket`, through ShardedDataParallel.local_grad_hook).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

ENV = "MEGATINY_FAULT"
FORMS = ("slow:rank=R:ms=M", "grad_bitflip:rank=R:step=S[:param=NAME][:repeat=1][:bit=B]")
_KEYS = {"slow": {"rank", "ms"}, "grad_bitflip": {"rank", "step", "param", "repeat", "bit"}}
_REQUIRED = {"slow": {"rank", "ms"}, "grad_bitflip": {"rank", "step"}}


class FaultSpecError(ValueError):
    """MEGATINY_FAULT does not parse; the message shows the accepted forms."""


@dataclass(frozen=True)
class Fault:
    kind: str  # slow | grad_bitflip
    rank: int
    ms: float = 0.0
    step: int = 0
    param: str | None = None
    repeat: bool = False
    bit: int = 22


def _specs(text: str):
    """(kind, [key=value items]) of each comma-separated fault of a MEGATINY_FAULT value."""
    for spec in filter(None, (s.strip() for s in text.split(","))):
        kind, *items = spec.split(":")
        yield kind, items


def parse(text: str) -> list[Fault]:
    """The faults of a MEGATINY_FAULT value ('' -> none)."""
    faults = []
    for kind, items in _specs(text):
        if kind == "startup_sleep":  # startup_sleep_s's
            continue
        if kind not in _KEYS:
            raise FaultSpecError(
                f"{ENV}={text!r}: unknown fault {kind!r}; use {' or '.join(FORMS)}"
            )
        values = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or key not in _KEYS[kind]:
                raise FaultSpecError(f"{ENV}={text!r}: {item!r} is not one of {kind}'s "
                                     f"key=value items; use {' or '.join(FORMS)}")  # fmt: skip
            values[key] = value
        missing = _REQUIRED[kind] - values.keys()
        if missing:
            raise FaultSpecError(f"{ENV}={text!r}: {kind} needs {', '.join(sorted(missing))}; "
                                 f"use {' or '.join(FORMS)}")  # fmt: skip
        try:
            fault = Fault(kind, int(values["rank"]), ms=float(values.get("ms", 0)),
                          step=int(values.get("step", 0)), param=values.get("param"),
                          repeat=values.get("repeat", "0") not in ("0", "false", ""),
                          bit=int(values.get("bit", 22)))  # fmt: skip
        except ValueError:
            raise FaultSpecError(f"{ENV}={text!r}: rank, step, bit must be integers and ms a "
                                 f"number; use {' or '.join(FORMS)}") from None  # fmt: skip
        if fault.rank < 0 or fault.ms < 0 or (kind == "grad_bitflip" and fault.step < 1):
            raise FaultSpecError(f"{ENV}={text!r}: need rank >= 0, ms >= 0 and step >= 1; use "
                                 f"{' or '.join(FORMS)}")  # fmt: skip
        faults.append(fault)
    return faults


def startup_sleep_s(phase: str, rank: int, environ=None) -> float:
    """Seconds `rank` sleeps entering startup phase `phase` (MEGATINY_FAULT startup_sleep)."""
    text = (environ if environ is not None else os.environ).get(ENV, "")
    total = 0.0
    for kind, items in _specs(text):
        if kind != "startup_sleep":
            continue
        values = dict(item.partition("=")[::2] for item in items)
        try:
            if set(values) - {"phase", "ms", "rank"} or not {"phase", "ms"} <= set(values):
                raise ValueError
            if phase.startswith(values["phase"]) and int(values.get("rank", rank)) == rank:
                total += float(values["ms"]) / 1000
        except ValueError:
            raise FaultSpecError(
                f"{ENV}={text!r}: use startup_sleep:phase=P:ms=M[:rank=R]"
            ) from None
    return total


class FaultInjector:
    """The faults aimed at this rank (global `rank`)."""

    def __init__(self, faults: list[Fault], rank: int):
        self.faults = [f for f in faults if f.rank == rank]
        self.sleep_s = sum(f.ms for f in self.faults if f.kind == "slow") / 1000
        self.flips = [f for f in self.faults if f.kind == "grad_bitflip"]
        self.any_rank_flips = [f for f in faults if f.kind == "grad_bitflip"]
        self.flipped: list[str] = []  # what was flipped, for the test's and the drill's record
        self._done: tuple[tuple[int, int], set[Fault]] = ((0, -1), set())  # ZeRO-2/3: this pass

    @classmethod
    def from_env(cls, rank: int, environ=None) -> FaultInjector | None:
        """The injector of this rank, or None when MEGATINY_FAULT names no fault at all."""
        faults = parse((environ if environ is not None else os.environ).get(ENV, ""))
        return cls(faults, rank) if faults else None

    def slow_down(self) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def _due(self, fault: Fault, step: int, pass_index: int) -> bool:
        if fault.repeat:
            return step >= fault.step
        return step == fault.step and pass_index == 0

    def flip_due(self, step: int, pass_index: int = 0) -> bool:
        """Is a gradient of this rank to be flipped after the backward of this step (pass 0:
        the first pass; 1, 2: the check's replays)?"""
        return any(self._due(f, step, pass_index) for f in self.flips)

    def defer_due(self, step: int) -> bool:
        """Does any rank flip a gradient at this step? Then every rank defers its reduction
        (the buckets are launched in the same order on every rank of a group)."""
        return any(self._due(f, step, 0) for f in self.any_rank_flips)

    def flip(self, step: int, pass_index: int, grads: list[tuple[str, torch.Tensor]]) -> None:
        """Flip the due bits in `grads` ((name, local gradient) pairs, before any reduction)."""
        for fault in self.flips:
            if self._due(fault, step, pass_index):
                self._flip(fault, step, pass_index, *_pick(grads, fault.param))

    def flip_bucket(self, step: int, pass_index: int, grads, first: str) -> None:
        """ZeRO-2/3: `grads` are the (name, local gradient) of one bucket's parameters as its
        reduce-scatter is launched; flip the due faults whose parameter (default `first`, the
        rank's first parameter) is among them, once per pass (at the bucket's first launch)."""
        if self._done[0] != (step, pass_index):
            self._done = ((step, pass_index), set())
        for fault in self.flips:
            name = fault.param or first
            if self._due(fault, step, pass_index) and fault not in self._done[1]:
                for have, grad in grads:
                    if have == name:
                        self._done[1].add(fault)
                        self._flip(fault, step, pass_index, name, grad)
                        break

    def check_flipped(self, step: int, pass_index: int, names: list[str]) -> None:
        """ZeRO-2/3, after a pass: a due fault that found no bucket names no parameter here."""
        done = self._done[1] if self._done[0] == (step, pass_index) else set()
        for fault in self.flips:
            if self._due(fault, step, pass_index) and fault not in done:
                _pick([(n, None) for n in names], fault.param)  # raises, naming the parameters
                raise FaultSpecError(f"{ENV}: {fault.param or names[0]}'s gradient was never "
                                     "launched for reduction on this rank")  # fmt: skip

    def _flip(self, fault: Fault, step: int, pass_index: int, name: str, grad) -> None:
        flat = grad.view(-1)
        index = (step * 7919 + pass_index * 104729) % flat.numel()
        bits = 8 * flat.element_size()
        if not 0 <= fault.bit < bits:
            raise FaultSpecError(f"{ENV}: bit={fault.bit} but {name}'s gradient has {bits}")
        ints = flat[index : index + 1].view({2: torch.int16, 4: torch.int32, 8: torch.int64}[
            flat.element_size()])  # fmt: skip
        mask = 1 << fault.bit
        ints ^= mask - (1 << bits) if mask >= 1 << (bits - 1) else mask  # two's complement
        self.flipped.append(f"step {step} pass {pass_index}: {name}[{index}] bit {fault.bit}")


def _pick(grads: list[tuple[str, torch.Tensor]], param: str | None):
    if not grads:
        raise FaultSpecError(f"{ENV}: this rank has no gradient to flip")
    if param is None:
        return grads[0]
    for name, grad in grads:
        if name == param:
            return name, grad
    names = ", ".join(n for n, _ in grads[:8])
    raise FaultSpecError(f"{ENV}: param={param!r} is not a parameter of this rank (its first: "
                         f"{names}, ...); name one this rank holds (pipeline stages differ)")  # fmt: skip
