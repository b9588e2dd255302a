"""ParallelContext: this rank's process groups and coordinates, created once and passed explicitly.

    ctx = ParallelContext.from_env(tp=2, pp=2)       # under torchrun: also starts the default group
    ctx = ParallelContext.initialize(tp=2)           # when torch.distributed is already initialized
    layer = ColumnParallelLinear(64, 256, ctx.tp_group)
    ...
    ctx.destroy()

The layout comes from the pure `build_grid` (tp fastest, then cp, dp, pp). There is no module-level
state: two contexts may coexist, and code that needs a group receives the context or the group.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatiny.parallel import collectives
from megatiny.parallel.grid import DIMS, Grid, build_grid

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _new_groups(all_ranks: list[list[int]], rank: int, members_only: bool = False, timeout=None):
    """Create one process group per rank list (on every rank, same order); return mine and its ranks.

    torch.distributed requires every rank to call `new_group` for every group, in the same order,
    even for groups it is not a member of. `timeout` (a timedelta): a new group does not inherit
    the default group's, it would get torch's 30 minutes.
    """
    mine, my_ranks = None, None
    for ranks in all_ranks:
        group = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            mine, my_ranks = group, list(ranks)
    assert mine is not None or members_only, f"rank {rank} is in none of {all_ranks}"
    return mine, my_ranks


def _attempt_store(rank: int, world_size: int, timeout_s: float):
    """Under a restarted torchrun attempt (`--max-restarts`), the env:// store with this attempt's
    own key prefix, else None (torch's env:// default).

    torchrun keeps the same agent store for every attempt, and group keys are the same each time,
    so the restarted ranks would read the dead attempt's addresses ("Connection refused")."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent_store, timeout=timedelta(seconds=timeout_s),
        multi_tenant=not agent_store,
    )  # fmt: skip
    return dist.PrefixStore(f"megatiny/attempt_{attempt}", store)


class ParallelContext:
    """The process groups of one rank for a tp x cp x dp x pp layout.

    Attributes (for each dim in tp, cp, dp, pp): `{dim}_size`, `{dim}_rank` (coordinate),
    `{dim}_group` (a ProcessGroup, real even when of size 1), `{dim}_ranks` (global ranks of the
    group, ordered by coordinate). Also `mp_group`/`mp_ranks` (the model replica: all ranks with my dp
    coordinate, for e.g. the gradient-norm all-reduce), `dp_cp_group`/`dp_cp_ranks` (ranks holding the
    same parameter shard: gradients are averaged over it), `embedding_group`/`embedding_ranks` (first
    and last pipeline stage of my pipeline, for tied embeddings), `rank`, `world_size`, `local_rank`,
    `device`, `backend`, `grid`, `is_first_stage`, `is_last_stage`.

    Expert parallelism (carved from dp, see grid.py): `ep_size`/`ep_rank`/`ep_group`/`ep_ranks` (the
    ranks that hold different experts and exchange tokens by all-to-all) and `edp_size`/`edp_rank`/
    `edp_group`/`edp_ranks` (replicas of my experts: expert gradients are averaged over it);
    `ep_tp_group`/`ep_tp_ranks` (tp x ep: every expert shard once, for checkpoints).
    """

    def __init__(
        self,
        grid: Grid,
        rank: int,
        local_rank: int,
        owns_default_group: bool = False,
        device=None,
        timeout_s: float | None = None,
    ):
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group() "
                "first, or use ParallelContext.from_env() under torchrun"
            )
        if dist.get_world_size() != grid.world_size:
            raise ValueError(
                f"grid is for world_size={grid.world_size} but the process group has "
                f"{dist.get_world_size()} ranks"
            )
        self.grid = grid
        self.rank = rank
        self.world_size = grid.world_size
        self.local_rank = local_rank
        self.backend = dist.get_backend()
        if device is not None:  # e.g. "meta" under a fake process group: a dry run of the layout
            self.device = torch.device(device)
        elif self.backend == "nccl" and torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            # Before the first collective (new_group below is one): NCCL binds a communicator to
            # the current device, and every rank would otherwise share GPU 0.
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        collectives.expect_device(self.device)
        self._owns_default_group = owns_default_group
        self._groups = []
        coords = grid.coords(rank)
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        new_groups = functools.partial(_new_groups, timeout=timeout)
        for dim in DIMS:
            group, ranks = new_groups(grid.groups[dim], rank)
            setattr(self, f"{dim}_size", grid.sizes[dim])
            setattr(self, f"{dim}_rank", coords[dim])
            setattr(self, f"{dim}_group", group)
            setattr(self, f"{dim}_ranks", ranks)
            self._groups.append(group)
        self.mp_group, self.mp_ranks = new_groups(grid.model_parallel_groups, rank)
        dp_cp = sorted(
            {tuple(sorted(_dp_cp_ranks(grid, r))) for r in range(grid.world_size)},
        )
        self.dp_cp_group, self.dp_cp_ranks = new_groups([list(g) for g in dp_cp], rank)
        emb = [sorted({g[0], g[-1]}) for g in grid.groups["pp"]]
        # Middle pipeline stages (pp > 2) are in no embedding group: theirs is None.
        self.embedding_group, self.embedding_ranks = new_groups(emb, rank, members_only=True)
        self._groups += [self.mp_group, self.dp_cp_group]
        if self.embedding_group is not None:
            self._groups.append(self.embedding_group)
        for name in DIMS + ("mp", "dp_cp", "embedding"):
            collectives.name_group(getattr(self, f"{name}_group"), name)
        expert = grid.expert_coords(rank)
        for name, size in (("ep", grid.ep), ("edp", grid.dp // grid.ep)):
            group, ranks = new_groups(grid.groups[name], rank)
            setattr(self, f"{name}_size", size)
            setattr(self, f"{name}_rank", expert[name])
            setattr(self, f"{name}_group", group)
            setattr(self, f"{name}_ranks", ranks)
            collectives.name_group(group, name)
            self._groups.append(group)
        self.ep_tp_group, self.ep_tp_ranks = new_groups(grid.groups["ep_tp"], rank)
        collectives.name_group(self.ep_tp_group, "ep_tp")
        self._groups.append(self.ep_tp_group)
        self.is_first_stage = self.pp_rank == 0
        self.is_last_stage = self.pp_rank == self.pp_size - 1

    # Attribute declarations for readers and type checkers (set in __init__ via setattr).
    tp_size: int
    tp_rank: int
    tp_ranks: list[int]
    cp_size: int
    cp_rank: int
    cp_ranks: list[int]
    dp_size: int
    dp_rank: int
    dp_ranks: list[int]
    pp_size: int
    pp_rank: int
    pp_ranks: list[int]
    ep_size: int
    ep_rank: int
    ep_ranks: list[int]
    edp_size: int
    edp_rank: int
    edp_ranks: list[int]

    @classmethod
    def initialize(
        cls, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None, device=None, ep: int = 1
    ):
        """Build the context inside an already-initialized default process group. `device`
        overrides the default (cuda:LOCAL_RANK under NCCL, else cpu), e.g. "meta" for a dry run
        under the fake process group. `ep` (expert parallelism) divides dp."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParallelContext.initialize() needs an initialized default process group: call "
                "torch.distributed.init_process_group() first, or use ParallelContext.from_env() "
                "under torchrun"
            )
        grid = build_grid(dist.get_world_size(), tp=tp, pp=pp, cp=cp, dp=dp, ep=ep)
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(grid, dist.get_rank(), local_rank, device=device)

    @classmethod
    def from_env(
        cls,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        dp: int | None = None,
        backend: str | None = None,
        timeout_s: float = 600,
        ep: int = 1,
    ):
        """Initialize the default group from torchrun's environment, then build the context.

        Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT via env://). The backend
        defaults to nccl when CUDA is available, else gloo. The grid is validated before any
        process group is created, so a bad layout fails fast on every rank. `timeout_s` bounds
        every collective (`train.timeout_s`): a rank stuck longer makes its peers fail instead of
        hanging the job.
        """
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"ParallelContext.from_env() must run under torchrun (missing environment "
                f"variables {missing}); launch with e.g. `torchrun --nproc-per-node 2 ...`, or "
                "call torch.distributed.init_process_group() yourself and use "
                "ParallelContext.initialize()"
            )
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        grid = build_grid(world_size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        owns = False
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(local_rank)  # __init__ sets it again in every path
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
                store=_attempt_store(rank, world_size, timeout_s),
            )
            owns = True
        return cls(grid, rank, local_rank, owns_default_group=owns, timeout_s=timeout_s)

    def destroy(self) -> None:
        """Destroy this context's groups (and the default group if `from_env` created it)."""
        if not dist.is_initialized():
            return
        for group in self._groups:
            dist.destroy_process_group(group)
        self._groups = []
        if self._owns_default_group:
            dist.destroy_process_group()

    def __repr__(self) -> str:
        return (
            f"ParallelContext(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
            f"cp={self.cp_rank}/{self.cp_size}, dp={self.dp_rank}/{self.dp_size}, "
            f"pp={self.pp_rank}/{self.pp_size}, ep={self.ep_rank}/{self.ep_size}, "
            f"device={self.device})"
        )


def _dp_cp_ranks(grid: Grid, rank: int) -> list[int]:
    c = grid.coords(rank)
    return [
        grid.rank_of(tp=c["tp"], cp=cp, dp=dp, pp=c["pp"])
        for dp in range(grid.dp)
        for cp in range(grid.cp)
    ]
