"""Loss-spike detection: a step whose loss exceeds `factor` x the running median of the last
`window` good losses is a spike. `train.spike_policy=log` warns and counts it; `skip` also drops
that update (the optimizer does not step; the schedule and data move on), as PaLM / OLMo-style
runs skip the batches around a spike.

To skip, the decision must be made before the optimizer steps: `guard_trainer` wraps the
Trainer's schedule (to see the step's loss, averaged over dp like the logged loss) and its
optimizer's `step` (to drop the update). The history is saved in the checkpoint, so a resumed
run judges as the uninterrupted one would.
"""

from __future__ import annotations

import collections
import math
import statistics


class SpikeDetector:
    def __init__(self, factor: float, window: int, history=()):
        self.factor = factor
        self.history: collections.deque = collections.deque(history, maxlen=window)
        self.min_history = min(window, 10)

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss) or len(self.history) < self.min_history:
            return False
        return loss > self.factor * statistics.median(self.history)

    def median(self) -> float:
        return statistics.median(self.history) if self.history else float("nan")

    def observe(self, loss: float, spike: bool) -> None:
        if math.isfinite(loss) and not spike:
            self.history.append(loss)


def guard_trainer(trainer, detector: SpikeDetector) -> dict:
    """Make `trainer.train_step` skip the optimizer update of a spike; returns the state dict
    whose "spike" says whether the last step was one."""
    import torch.distributed as dist

    from megatiny.parallel import collectives

    ctx = trainer.ctx
    schedule, optimizer_step = trainer.schedule, trainer.optimizer.step
    state = {"spike": False}

    def judged_schedule(model, micro_batches, **kwargs):
        loss = schedule(model, micro_batches, **kwargs)
        if kwargs.get("forward_only"):
            return loss
        value = loss.detach().float().reshape(()).to(ctx.device)  # pp: already on every stage
        if ctx.dp_size > 1:
            collectives.all_reduce(value, ctx.dp_group)
            value = value / dist.get_world_size(ctx.dp_group)
        state["spike"] = detector.is_spike(value.item())
        return loss

    def guarded_step(*args, **kwargs):
        if state["spike"]:
            return None
        return optimizer_step(*args, **kwargs)

    trainer.schedule = judged_schedule
    trainer.optimizer.step = guarded_step
    return state
