"""Layout checks of a ParallelConfig (`self`) against the model and the data: the grid's sizes,
the pipeline schedule's name, what context and expert parallelism need. Called by
`Config.validate` (megatiny/config/run.py); megatiny/parallel applies the same rules (grid.py,
schedule_ir.py import them from here: parallel builds on config, never the other way)."""

from __future__ import annotations

from megatiny.config.io import ConfigError
from megatiny.config.model import ModelConfig, divisors

# parallel.pipeline_schedule
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipev")
V_SCHEDULES = ("zb-v", "dualpipev")  # two chunks per rank in a V (rank r: stages r and 2p-1-r)
# the backward split into B and W (split_backward.py)
SPLIT_SCHEDULES = ("zb-h1", "zb-h2", "zb-v", "dualpipev")


def check_pipeline_schedule(kind: str, v: int | None) -> None:
    """parallel.pipeline_schedule against parallel.virtual_pipeline_size."""
    kinds, v = ("auto",) + SCHEDULES, v or 1
    need = (
        (1, 2) if kind in V_SCHEDULES else {"interleaved": tuple(range(2, v + 2))}.get(kind, (1,))
    )
    if kind not in kinds or (kind != "auto" and v not in need):
        raise ConfigError(
            f"parallel.pipeline_schedule={kind!r} with virtual_pipeline_size={v}: choose one of "
            f"{kinds}; interleaved needs virtual_pipeline_size >= 2, {' / '.join(V_SCHEDULES)} 2 "
            "or null, the others null"
        )


def min_micro_batches(kind: str, pp: int) -> int:
    """The fewest micro-batches per step a pipeline schedule runs: 2 pp for dualpipev, else 1."""
    return 2 * pp if kind == "dualpipev" and pp > 1 else 1


def pipeline_micro_batches(kind: str, pp: int, m: int | None) -> int | None:
    """Checks m micro-batches per step (None: unknown) against the schedule's minimum (raises a
    ConfigError naming the fix) and returns what the interleaved m % pp rule of
    `validate_pipeline` should check: None for the V schedules, which take any m above it."""
    least = min_micro_batches(kind, pp)
    if m is not None and m < least:
        raise ConfigError(
            f"parallel.pipeline_schedule={kind} needs at least 2 * pp = {least} micro-batches per "
            f"step, got {m} (train.global_batch_size / (micro_batch_size * dp)); raise "
            "train.global_batch_size or lower train.micro_batch_size, or use zb-v"
        )
    return None if kind in V_SCHEDULES else m


def check_grid_sizes(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
                     ep: int = 1) -> int:  # fmt: skip
    """The data-parallel size of `world_size` ranks laid out as tp x cp x dp x pp (`dp=None`
    infers it); raises ValueError, naming the fix, when a size is not a positive integer, the
    sizes do not multiply to `world_size` or `ep` does not divide dp."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer")
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)) + (
        (("dp", dp),) if dp is not None else ()
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    model = tp * pp * cp
    if dp is None:
        if world_size % model:
            raise ValueError(
                f"world_size={world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model}; "
                f"choose tp*pp*cp in {divisors(world_size)} or launch a multiple of {model} ranks"
            )
        dp = world_size // model
    elif model * dp != world_size:
        raise ValueError(
            f"tp*pp*cp*dp = {tp}*{pp}*{cp}*{dp} = {model * dp} does not equal "
            f"world_size={world_size}; pass dp=None to infer it"
            + (f" (dp={world_size // model})" if world_size % model == 0 else "")
            + f" or launch {model * dp} ranks"
        )
    if dp % ep:
        raise ValueError(
            f"ep={ep} does not divide dp={dp}: expert parallelism splits the data-parallel ranks; "
            f"choose ep in {divisors(dp)} or launch more ranks"
        )
    return dp


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
