"""The process grid: a pure function from (world_size, tp, cp, dp, pp) to rank groups.

Ranks are laid out in Megatron's order, tensor-parallel fastest, then context, data and pipeline:

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so the ranks of one TP group are consecutive (they talk the most and should share a node), and the
pipeline stages are the slowest-varying coordinate. A group of dimension `d` is the set of ranks
that agree on every coordinate except `d`. Nothing here touches torch.distributed, so the layout is
tested exhaustively without processes.

Expert parallelism is carved from data parallelism (Megatron's layout): the dp coordinate splits as

    dp_rank = edp_rank * ep + ep_rank

so `ep` consecutive dp ranks form an expert-parallel group (they hold different experts and swap
tokens by all-to-all) and the dp / ep ranks with the same ep_rank form an expert-data-parallel
group (replicas of the same experts: their gradients are averaged over it). groups["ep"] and
groups["edp"]; `expert_coords(rank)` gives both coordinates. groups["ep_tp"] (tp x ep ranks of one
edp replica and stage) hold every expert's shards exactly once: a checkpoint's expert tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatiny.config.layout import check_grid_sizes

DIMS = ("tp", "cp", "dp", "pp")  # fastest-varying first


@dataclass(frozen=True)
class Grid:
    """The rank layout of a `world_size`-rank job; see the module docstring for the order."""

    world_size: int
    tp: int
    cp: int
    dp: int
    pp: int
    groups: dict[str, list[list[int]]] = field(repr=False)
    ep: int = 1

    @property
    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate along every dimension: dict(tp=, cp=, dp=, pp=)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside the grid of world_size={self.world_size}")
        out = {}
        for dim in DIMS:
            size = self.sizes[dim]
            out[dim] = rank % size
            rank //= size
        return out

    def rank_of(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """The global rank at the given coordinates (inverse of `coords`)."""
        rank = 0
        for dim, coord in reversed(list(zip(DIMS, (tp, cp, dp, pp)))):
            size = self.sizes[dim]
            if not 0 <= coord < size:
                raise ValueError(f"{dim}={coord} is outside [0, {size})")
            rank = rank * size + coord
        return rank

    def expert_coords(self, rank: int) -> dict[str, int]:
        """{"ep": ep_rank, "edp": edp_rank}: the split of this rank's dp coordinate."""
        dp = self.coords(rank)["dp"]
        return {"ep": dp % self.ep, "edp": dp // self.ep}

    def group_of(self, dim: str, rank: int) -> list[int]:
        """The ranks of `rank`'s group along `dim` (sorted, `rank` included)."""
        for ranks in self.groups[dim]:
            if rank in ranks:
                return ranks
        raise ValueError(f"rank={rank} is outside the grid of world_size={self.world_size}")

    def model_parallel_group_of(self, rank: int) -> list[int]:
        """All ranks of `rank`'s model replica: every rank sharing its dp coordinate."""
        dp = self.coords(rank)["dp"]
        return [r for r in range(self.world_size) if self.coords(r)["dp"] == dp]

    @property
    def model_parallel_groups(self) -> list[list[int]]:
        """One group per data-parallel replica (tp * cp * pp ranks each), ordered by dp rank."""
        return [self.model_parallel_group_of(self.rank_of(dp=d)) for d in range(self.dp)]


def build_grid(
    world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None, ep: int = 1
) -> Grid:
    """Lay out `world_size` ranks as tp x cp x dp x pp (tp fastest). `dp=None` infers it; `ep`
    (expert parallelism) must divide dp.

    Raises ValueError, naming the fix, when a size is not a positive integer or the sizes do not
    multiply to `world_size`.
    """
    dp = check_grid_sizes(world_size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep)
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    strides, stride = {}, 1
    for dim in DIMS:
        strides[dim] = stride
        stride *= sizes[dim]
    groups: dict[str, list[list[int]]] = {}
    for dim in DIMS:
        # The group's first member is a rank whose `dim` coordinate is 0; members step by the stride.
        starts = [r for r in range(world_size) if (r // strides[dim]) % sizes[dim] == 0]
        groups[dim] = [[s + i * strides[dim] for i in range(sizes[dim])] for s in starts]
    # ep: consecutive dp coordinates; edp: the same ep coordinate, stepping by ep along dp.
    groups["ep"] = [g[i : i + ep] for g in groups["dp"] for i in range(0, dp, ep)]
    groups["edp"] = [g[i::ep] for g in groups["dp"] for i in range(ep)]
    tp_of = {r: g for g in groups["tp"] for r in g}
    groups["ep_tp"] = [
        sorted(r for m in g for r in tp_of[m]) for g in groups["ep"] if g[0] % tp == 0
    ]
    return Grid(world_size=world_size, tp=tp, cp=cp, dp=dp, pp=pp, groups=groups, ep=ep)
