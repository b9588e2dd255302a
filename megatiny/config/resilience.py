"""The train keys of the checks that find a rank which slows or corrupts a run (TrainConfig
inherits them; megatiny/training/stragglers.py, sdc.py)."""

from __future__ import annotations

from dataclasses import dataclass

from megatiny.config.io import ConfigError


@dataclass
class ResilienceConfig:
    # a rank whose compute score (vs the fastest rank of its stage, or vs its own best while the
    # others kept pace) falls below this is warned about as a straggler (0: off; e.g. 0.7)
    straggler_threshold: float = 0.0
    check_replay_every: int = 0  # replay every N-th step to catch silent data corruption (0: off)
    sdc_policy: str = "stop"  # a corruption: stop (checkpoint, exit 1) | skip the step's update

    def check_resilience(self) -> None:
        if not 0 <= self.straggler_threshold < 1:
            raise ConfigError(
                f"train.straggler_threshold={self.straggler_threshold}: a score is a fraction of "
                "the fastest rank's speed; choose a value in (0, 1), e.g. 0.7, or 0 for off"
            )
        if self.check_replay_every < 0:
            raise ConfigError(
                f"train.check_replay_every={self.check_replay_every} must be >= 0 (0: off; e.g. "
                "100 replays every 100th step)"
            )
        if self.sdc_policy not in ("stop", "skip"):
            raise ConfigError(f"train.sdc_policy={self.sdc_policy!r}; choose one of stop, skip")
