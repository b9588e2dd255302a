"""Layout checks of a ParallelConfig (`self`) against the model and the data: what context and
expert parallelism need. Called by `Config.validate` (megatiny/config/run.py)."""

from __future__ import annotations

from megatiny.config.io import ConfigError
from megatiny.config.model import ModelConfig


def check_context_parallel(self, model: ModelConfig, seq_length: int) -> None:
    """cp > 1: the sequence split (2*cp zig-zag chunks for ring, cp chunks for a2a, each
    still divisible by tp under sequence parallelism), a2a's heads, ring's no-dropout."""
    if self.cp == 1:
        return
    chunks = 2 * self.cp if self.cp_mode == "ring" else self.cp
    multiple = chunks * (self.tp if self.sequence_parallel else 1)
    if seq_length % multiple:
        why = f"{chunks} chunks for cp_mode={self.cp_mode}" + (
            f", each split over tp={self.tp} by sequence_parallel"
            if self.sequence_parallel else "")  # fmt: skip
        raise ConfigError(
            f"data.seq_length={seq_length} is not divisible by {multiple} ({why}); set "
            f"data.seq_length to a multiple of {multiple} (e.g. "
            f"{max(multiple, seq_length - seq_length % multiple)}) or change parallel.cp"
        )
    if self.cp_mode == "ring" and model.dropout > 0:
        raise ConfigError(
            f"parallel.cp_mode=ring has no attention dropout (model.dropout={model.dropout}); "
            "set model.dropout=0 or parallel.cp_mode=a2a"
        )
    if self.cp_mode == "a2a":
        n, g = model.n_heads // self.tp, model.n_kv_heads // self.tp
        if n % self.cp or (g % self.cp and self.cp % g):
            raise ConfigError(
                f"parallel.cp_mode=a2a scatters the heads over cp={self.cp}: the query heads "
                f"per tp rank (model.n_heads/tp = {n}) must be divisible by cp and the kv heads "
                f"({g}) divisible by cp or dividing it; change parallel.cp or use "
                "parallel.cp_mode=ring"
            )


def check_expert_parallel(self, model: ModelConfig, dp: int) -> None:
    """ep > 1: an MoE model whose experts split evenly, ep dividing dp; MoE without cp."""
    if self.ep > 1 and not model.moe_experts:
        raise ConfigError(
            f"parallel.ep={self.ep} splits the experts of a mixture-of-experts model, but "
            "model.moe_experts=0 (dense); set model.moe_experts or parallel.ep=1"
        )
    if model.moe_experts % self.ep:
        good = [e for e in range(1, model.moe_experts + 1) if model.moe_experts % e == 0]
        raise ConfigError(
            f"model.moe_experts={model.moe_experts} is not divisible by parallel.ep={self.ep}; "
            f"choose parallel.ep in {[e for e in good if dp % e == 0]}"
        )
    if dp % self.ep:
        raise ConfigError(
            f"parallel.ep={self.ep} does not divide dp={dp}: expert parallelism is carved "
            f"from the data-parallel ranks; launch a multiple of {self.ep} replicas or lower ep"
        )
    if model.moe_experts and self.cp > 1:
        raise ConfigError(
            f"mixture of experts with parallel.cp={self.cp} is not supported (the router "
            "statistics would be per sequence chunk); use parallel.cp=1"
        )
