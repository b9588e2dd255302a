"""How each parameter is sharded: the one record that gathering, checkpoints, gradient clipping
and the equivalence harness read (instead of asking which layer class owns the parameter).

A module that holds a shard declares it next to the parameter it creates:

    self.parameter_sharding = {"weight": Sharding.split(0, "tp", tp, tp_rank, group=group)}

A parameter its module does not declare is replicated: every rank of every group holds the whole
single-device tensor (norms, a row-parallel bias, positions, a router). A declared one is split
along one or more dims, each over a named group ("tp", "ep", ...; a `ParallelContext` has a
`<name>_group` for each). One `Split` of dim d of the full tensor over p ranks (this rank: r):

    plain      rows [r n/p, (r+1) n/p) of the n = local * p rows                 (Megatron's
                                                                                 partition_dim)
    segments   the dim is a concatenation of segments (a fused [q | k | v], SwiGLU's [gate | up]),
               each split on its own: rank r holds [q_r | k_r | v_r]          (partition_stride)
    padding    the last `padding` rows of the (last segment of the) dim are zero padding that the
               full tensor lacks (a vocabulary padded to a multiple of tp x 128): dropped when
               gathering, zero-filled when slicing

Expert weights are split twice: over ep along the expert dim 0 and over tp along a feature dim.

Replicated parameters' gradients are complete on every rank after backward (the layers sum them
over tp inside autograd: `copy_to_tp` on a sequence-parallel norm or row-parallel bias), so a
reduction over the model counts a parameter that is not split over a group on one rank of that
group only (`sharded_parameter_ids`). `tied` names a group whose ranks hold copies of the same
parameter (a tied embedding on the first and last pipeline stage): those count once too.

    shard_from_full(full, sharding)       this rank's shard of a full tensor (slice; no comm)
    full_from_shard(local, sharding)      the full tensor (all-gather over each split's group)
    checkpoint_pieces(local, sharding)    the full shape and where each local piece sits in it
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from megatiny.parallel import collectives


@dataclasses.dataclass(frozen=True)
class Split:
    """Dim `dim` of the full tensor split over the `parts` ranks of group `group` (this rank:
    `rank`), per segment of sizes `segments` (padded full sizes; () is one segment), the last
    `padding` rows being padding. `process_group` is the group itself, when the layer has it."""

    dim: int
    group: str
    parts: int
    rank: int
    segments: tuple[int, ...] = ()
    padding: int = 0
    process_group: object = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        bad = [s for s in self.segments if s % self.parts]
        if not 0 <= self.rank < self.parts or bad or self.padding < 0:
            raise ValueError(f"{self}: needs 0 <= rank < parts, segments divisible by parts")

    def padded_segments(self, local_size: int) -> tuple[int, ...]:
        segments = self.segments or (local_size * self.parts,)
        if sum(segments) != local_size * self.parts:
            raise ValueError(
                f"a shard of {local_size} along dim {self.dim} over {self.parts} ranks cannot hold "
                f"segments {segments}: the declared sharding does not match the tensor"
            )
        return segments

    def pieces(self, local_size: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(full size, [(local start, length, full start)]) of this rank's real rows."""
        segments = self.padded_segments(local_size)
        real = sum(segments) - self.padding
        out, local, full = [], 0, 0
        for seg in segments:
            n = seg // self.parts
            start = full + self.rank * n
            length = min(start + n, real) - start
            if length > 0:
                out.append((local, length, start))
            local, full = local + n, full + seg
        return real, out


@dataclasses.dataclass(frozen=True)
class Sharding:
    """A parameter's layout: its `splits` (none: replicated) and the group it is `tied` over."""

    splits: tuple[Split, ...] = ()
    tied: str | None = None

    @classmethod
    def split(cls, dim, group, parts, rank, segments=(), padding=0, process_group=None):
        """One dim split over one group (see `Split`)."""
        return cls((Split(dim, group, parts, rank, tuple(segments), padding, process_group),))

    def over(self, group: str) -> Split | None:
        return next((s for s in self.splits if s.group == group), None)

    def is_split(self, group: str) -> bool:
        """Whether ranks of `group` hold different slices (a split over a group of one is not)."""
        s = self.over(group)
        return s is not None and s.parts > 1


REPLICATED = Sharding()


def sharding_of(module: nn.Module, leaf: str) -> Sharding:
    """The declared sharding of parameter `leaf` of `module` (replicated when undeclared)."""
    return getattr(module, "parameter_sharding", {}).get(leaf, REPLICATED)


def is_replicated(module: nn.Module, leaf: str) -> bool:
    return not sharding_of(module, leaf).splits


def named_shardings(model: nn.Module) -> dict[str, tuple[nn.Parameter, Sharding]]:
    """{name: (parameter, sharding)} for every parameter of `model`, a tied one once."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            owner, _, leaf = name.rpartition(".")
            out[name] = (p, sharding_of(model.get_submodule(owner), leaf))
    return out


def sharded_parameter_ids(model: nn.Module, group: str) -> set[int]:
    """ids of the parameters whose ranks of `group` hold different slices."""
    return {id(p) for p, s in named_shardings(model).values() if s.is_split(group)}


def tied_parameter_ids(model: nn.Module, group: str, rank: int) -> set[int]:
    """ids of the parameters tied over `group` that this rank (its rank in `group`) does not
    count: a reduction over the model counts a tied copy on the group's first rank only."""
    return {id(p) for p, s in named_shardings(model).values() if s.tied == group and rank > 0}


def declare_tied(module: nn.Module, leaf: str, group: str) -> None:
    """Declare parameter `leaf` of `module` a copy tied over `group` (its splits unchanged)."""
    declared = dict(getattr(module, "parameter_sharding", {}))
    declared[leaf] = dataclasses.replace(sharding_of(module, leaf), tied=group)
    module.parameter_sharding = declared


def shard_from_full(
    full: torch.Tensor, sharding: Sharding, ranks: Mapping[str, int] | None = None
) -> torch.Tensor:
    """This rank's shard of `full` (the single-device tensor): each split dim zero-padded, cut
    per segment and the rank's pieces concatenated. `ranks` ({group: rank}) slices for another
    rank than the declared one."""
    t = full
    for s in sharding.splits:
        rank = s.rank if ranks is None else ranks.get(s.group, s.rank)
        if s.padding:
            pad = list(t.shape)
            pad[s.dim] = s.padding
            t = torch.cat([t, t.new_zeros(pad)], dim=s.dim)
        segments = s.segments or (t.shape[s.dim],)
        if sum(segments) != t.shape[s.dim] or t.shape[s.dim] % s.parts:
            raise ValueError(
                f"a full tensor of shape {tuple(full.shape)} does not fit {s} (dim {s.dim} "
                f"holds {t.shape[s.dim]} rows with padding)"
            )
        pieces, start = [], 0
        for seg in segments:
            n = seg // s.parts
            pieces.append(t.narrow(s.dim, start + rank * n, n))
            start += seg
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=s.dim)
    return t


@torch.no_grad()
def full_from_shard(
    local: torch.Tensor, sharding: Sharding, groups: Mapping[str, object] | None = None
) -> torch.Tensor:
    """The single-device tensor of `local` (a shard, or a gradient or optimizer moment shaped
    like it): all-gathered over each split's group (`groups[name]`, else the split's own
    process group), segments put back in order, padding dropped. Collective over those groups;
    no autograd. A replicated tensor comes back as a copy."""
    t, copied = local, False
    for s in sharding.splits:
        group = (groups or {}).get(s.group, s.process_group)
        local_size = t.shape[s.dim]
        segments = s.padded_segments(local_size)
        if s.parts > 1:
            if group is None or dist.get_world_size(group) != s.parts:
                size = None if group is None else dist.get_world_size(group)
                raise ValueError(f"cannot gather {s} over a {s.group!r} group of size {size}")
            t, copied = collectives.all_gather_cat(t, group, s.dim), True
        if len(segments) > 1:  # rank-major [q_0 | k_0 | v_0 | q_1 | ...] -> [q | k | v]
            local_segments = [seg // s.parts for seg in segments]
            per_rank = [r.split(local_segments, s.dim) for r in t.chunk(s.parts, s.dim)]
            t = torch.cat([r[i] for i in range(len(segments)) for r in per_rank], dim=s.dim)
            copied = True
        t = t.narrow(s.dim, 0, sum(segments) - s.padding)
    return t if copied else t.clone()


def checkpoint_pieces(local: torch.Tensor, sharding: Sharding):
    """(full shape, [(view of `local`, its offsets in the full tensor)]): this rank's real
    pieces (a fused QKV shard is three, a padding-only shard none), for a layout-free checkpoint
    whose ranks of the split groups together hold every piece once."""
    shape, per_dim = list(local.shape), []
    for s in sharding.splits:
        shape[s.dim], pieces = s.pieces(local.shape[s.dim])
        per_dim.append([(s.dim, *piece) for piece in pieces])
    out = []
    for combo in itertools.product(*per_dim):
        view, offsets = local, [0] * local.dim()
        for dim, local_start, length, full_start in combo:
            view = view.narrow(dim, local_start, length)
            offsets[dim] = full_start
        out += _contiguous(view, offsets)
    return tuple(shape), out


def _contiguous(view: torch.Tensor, offsets: list[int]) -> list[tuple[torch.Tensor, tuple]]:
    """A view cut along an inner dim (a segment of experts' rows) in contiguous pieces, split
    along its leading dims: a checkpoint piece must be contiguous and still alias the shard."""
    if view.is_contiguous():
        return [(view, tuple(offsets))]
    dim = next(d for d, n in enumerate(view.shape) if n > 1)
    out = []
    for i in range(view.shape[dim]):
        at = list(offsets)
        at[dim] += i
        out += _contiguous(view.narrow(dim, i, 1), at)
    return out


def group_of(ctx, sharding: Sharding):
    """The process group of `ctx` whose ranks hold the pieces of a tensor split over the groups
    of `sharding` (one rank per piece): `ctx.tp_group`, `ctx.ep_group`, `ctx.ep_tp_group`, ..."""
    names = sorted({s.group for s in sharding.splits})
    attr = "_".join(names) + "_group"
    if not hasattr(ctx, attr):
        raise ValueError(f"the parallel context has no {attr} for a tensor split over {names}")
    return getattr(ctx, attr)
