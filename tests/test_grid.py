import itertools

import pytest

from megatiny.parallel.grid import DIMS, build_grid


def _layouts(max_world=16):
    for world in range(1, max_world + 1):
        for tp, cp, pp in itertools.product(range(1, world + 1), repeat=3):
            if world % (tp * cp * pp) == 0:
                yield world, tp, cp, pp


def test_every_layout_partitions_ranks_consistently():
    n = 0
    for world, tp, cp, pp in _layouts():
        g = build_grid(world, tp=tp, pp=pp, cp=cp)
        n += 1
        assert g.dp == world // (tp * cp * pp)
        sizes = {"tp": tp, "cp": cp, "dp": g.dp, "pp": pp}
        for dim in DIMS:
            groups = g.groups[dim]
            assert len(groups) == world // sizes[dim]
            assert all(len(grp) == sizes[dim] for grp in groups)
            members = sorted(r for grp in groups for r in grp)
            assert members == list(range(world)), (world, tp, cp, pp, dim)
            for grp in groups:
                # Ordered by coordinate; members agree on every other coordinate.
                assert [g.coords(r)[dim] for r in grp] == list(range(sizes[dim]))
                for other in DIMS:
                    if other != dim:
                        assert len({g.coords(r)[other] for r in grp}) == 1
        for r in range(world):
            c = g.coords(r)
            assert g.rank_of(**c) == r
            # Megatron order: tp fastest, then cp, dp, pp.
            assert r == c["tp"] + tp * (c["cp"] + cp * (c["dp"] + g.dp * c["pp"]))
            mp = g.model_parallel_group_of(r)
            assert len(mp) == tp * cp * pp and r in mp
            assert all(g.coords(m)["dp"] == c["dp"] for m in mp)
        assert sorted(r for grp in g.model_parallel_groups for r in grp) == list(range(world))
    assert n == 204  # every (world<=16, tp, cp, pp) with tp*cp*pp dividing world


def test_known_layout_matches_megatron():
    g = build_grid(16, tp=2, pp=4)  # Megatron's docstring example: 16 GPUs, tp=2, pp=4 -> dp=2
    assert g.dp == 2
    assert g.groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert g.groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert g.groups["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert g.coords(7) == {"tp": 1, "cp": 0, "dp": 1, "pp": 1}


def test_explicit_dp_accepted():
    g = build_grid(8, tp=2, pp=2, dp=2)
    assert (g.tp, g.cp, g.dp, g.pp) == (2, 1, 2, 2)


def test_bad_sizes_raise_with_fix():
    with pytest.raises(ValueError, match=r"not divisible by tp\*pp\*cp.*choose"):
        build_grid(6, tp=4)
    with pytest.raises(ValueError, match=r"does not equal world_size=8; pass dp=None"):
        build_grid(8, tp=2, dp=2)
    with pytest.raises(ValueError, match="tp=0 must be a positive integer"):
        build_grid(4, tp=0)
    with pytest.raises(ValueError, match="world_size"):
        build_grid(0)
    with pytest.raises(ValueError, match="outside"):
        build_grid(4, tp=2).coords(4)


def test_expert_parallel_groups_are_carved_from_dp():
    """ep consecutive dp ranks hold different experts; edp groups replicate one expert shard."""
    n = 0
    for world, tp, cp, pp in _layouts():
        dp = world // (tp * cp * pp)
        for ep in (e for e in range(1, dp + 1) if dp % e == 0):
            g = build_grid(world, tp=tp, pp=pp, cp=cp, ep=ep)
            n += 1
            for name, size in (("ep", ep), ("edp", dp // ep)):
                assert sorted(r for grp in g.groups[name] for r in grp) == list(range(world))
                assert all(len(grp) == size for grp in g.groups[name])
            for r in range(world):
                c, e = g.coords(r), g.expert_coords(r)
                assert c["dp"] == e["edp"] * ep + e["ep"]
                dp_group = g.group_of("dp", r)
                ep_group, edp_group = g.group_of("ep", r), g.group_of("edp", r)
                assert set(ep_group) <= set(dp_group) and set(edp_group) <= set(dp_group)
                assert [g.expert_coords(m)["ep"] for m in ep_group] == list(range(ep))
                assert [g.expert_coords(m)["edp"] for m in edp_group] == list(range(dp // ep))
                assert set(ep_group) & set(edp_group) == {r}
                ep_tp = g.group_of("ep_tp", r)  # every expert shard once: tp x ep
                assert len(ep_tp) == tp * ep and set(ep_group) <= set(ep_tp)
                assert set(g.group_of("tp", r)) <= set(ep_tp)
    assert n > 204
    g = build_grid(8, tp=2, ep=2)  # dp=4: [0, 2, 4, 6] -> ep [0, 2], [4, 6]; edp [0, 4], [2, 6]
    assert g.groups["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert g.groups["edp"] == [[0, 4], [2, 6], [1, 5], [3, 7]]


def test_ep_must_divide_dp():
    with pytest.raises(ValueError, match=r"ep=3 does not divide dp=4.*choose ep in \[1, 2, 4\]"):
        build_grid(8, tp=2, ep=3)
    with pytest.raises(ValueError, match="ep=0 must be a positive integer"):
        build_grid(4, ep=0)
