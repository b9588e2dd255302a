"""The loop's one hook for the checks that find a rank which slows or corrupts a run: straggler
scores (megatiny/training/stragglers.py), step replay against silent data corruption
(megatiny/training/sdc.py) and injected faults (megatiny/training/faults.py). With every check off
and no MEGATINY_FAULT, `install` returns None and the Trainer is untouched. Every ZeRO level is
checked: under parallel.zero=2/3 at each bucket's reduce-scatter (see sdc.py)."""

from __future__ import annotations

from megatiny.training.faults import FaultInjector
from megatiny.training.sdc import ReplayCheck, SilentDataCorruption
from megatiny.training.stragglers import StragglerDetector

__all__ = ["Checks", "SilentDataCorruption", "install_checks"]


class Checks:
    def __init__(self, stragglers: StragglerDetector | None, replay: ReplayCheck | None):
        self.stragglers, self.replay = stragglers, replay

    def collect(self, step: int) -> dict:
        """Collective, at every log step: the straggler scores for metrics.jsonl."""
        return self.stragglers.report(step) if self.stragglers is not None else {}

    def close(self) -> None:
        if self.stragglers is not None:
            self.stragglers.close()


def install_checks(cfg, trainer, warn=print) -> Checks | None:
    """Wrap `trainer` for `train.straggler_threshold`, `train.check_replay_every` and the
    MEGATINY_FAULT aimed at this rank; None when there is nothing to do."""
    tc = cfg.train
    injector = FaultInjector.from_env(trainer.ctx.rank)
    if not (tc.straggler_threshold or tc.check_replay_every or injector):
        return None
    replay = None
    if tc.check_replay_every or injector:  # faults: slow compute, flipped gradients
        replay = ReplayCheck(trainer, tc.check_replay_every, tc.sdc_policy, injector, warn)
    stragglers = StragglerDetector(trainer, tc.straggler_threshold, warn) if tc.straggler_threshold else None  # fmt: skip
    return Checks(stragglers, replay)
