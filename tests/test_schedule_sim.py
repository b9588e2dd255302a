"""Pipeline schedules as data: every generated schedule over a grid is free of deadlock, keeps its
dependencies, reproduces the closed-form bubbles with unit costs, and the zero-bubble schedules
hold the activations they promise (zb-h1 and zb-v: no more than 1F1B; zb-h2: twice; dualpipev:
2p+1 chunk micro-batches). Broken schedules fail naming the rank and action."""

import pytest

from megatiny.parallel.schedule_ir import Action, Schedule, generate, interleaved_placement
from megatiny.parallel.schedule_sim import ScheduleError, simulate

GRID = [(p, m) for p in (2, 3, 4, 8) for m in (1, 2, 3, 4, 8, 16, 24)]


def unit(v):  # F = B = W = 1 per stage, a chunk costs 1/v
    return {"F": 1 / v, "B": 1 / v, "W": 1 / v}


@pytest.mark.parametrize("p,m", GRID)
def test_every_schedule_of_the_grid_runs_and_matches_its_closed_form(p, m):
    one_f_one_b = simulate(generate("1f1b", p, m), unit(1))
    assert one_f_one_b.bubble == pytest.approx((p - 1) / m, rel=1e-12)
    assert simulate(generate("gpipe", p, m), unit(1)).bubble == pytest.approx((p - 1) / m)
    assert one_f_one_b.peak_in_flight == [min(p - r, m) for r in range(p)]
    for v in (2, 3):
        if m % p == 0:
            inter = simulate(generate("interleaved", p, m, v), unit(v))
            assert inter.bubble == pytest.approx((p - 1) / (v * m), rel=1e-12)
    h1 = simulate(generate("zb-h1", p, m), unit(1))
    zbv = simulate(generate("zb-v", p, m), unit(2))
    if m >= p:  # the closed form of ZB-H1 (Qi et al.): bubble (p-1)(F+B-W) over m(F+B+W)
        assert h1.bubble == pytest.approx((p - 1) / (3 * m), rel=1e-12)
        assert zbv.bubble == pytest.approx((p - 1) / (6 * m), rel=1e-12)  # <= 1/4 of 1F1B's
    assert h1.bubble <= one_f_one_b.bubble and zbv.bubble <= one_f_one_b.bubble
    # Activations between F and B, in 1F1B-stage micro-batches: never above 1F1B's worst rank.
    assert max(h1.peak_activations) <= max(one_f_one_b.peak_activations)
    assert max(zbv.peak_activations) <= max(one_f_one_b.peak_activations)
    assert h1.peak_in_flight == one_f_one_b.peak_in_flight  # rank by rank for ZB-H1
    # ZB-H2: 2(p-r)-1 micro-batches between F and B on rank r (at most twice 1F1B's p-r), 2p-1
    # between F and W; the bubble of ZB-H1 with unit costs, never more.
    h2_sched = generate("zb-h2", p, m)
    h2 = simulate(h2_sched, unit(1))
    assert h2.peak_in_flight == [min(2 * (p - r) - 1, m) for r in range(p)]
    assert max(h2.peak_in_flight) <= 2 * max(one_f_one_b.peak_in_flight)
    assert _f_to_w(h2_sched) == [min(2 * p - 1, m)] * p
    assert h2.bubble <= h1.bubble + 1e-12
    if m >= p:
        assert h2.bubble == pytest.approx((p - 1) / (3 * m), rel=1e-12)
    if m >= 2 * p - 1:  # no gap on any rank: rank r idles r units before, p-1-r after
        assert h2.end == [3 * m + r for r in range(p)]
    # DualPipeV (m >= 2p): the bubble of zb-v; 2p+1 chunk micro-batches between F and B on every
    # rank (the DualPipe README's PP+1 for PP = 2p stages), p + 1/2 1F1B-stage micro-batches.
    if m >= 2 * p:
        dpv = simulate(generate("dualpipev", p, m), unit(2))
        assert dpv.bubble == pytest.approx((p - 1) / (6 * m), rel=1e-12)
        assert dpv.peak_in_flight == [2 * p + 1] * p
        assert dpv.peak_stashed == [r + 1 for r in range(p)]
        assert max(dpv.peak_activations) == max(one_f_one_b.peak_activations) + 0.5
    else:
        with pytest.raises(
            ValueError, match=f"dualpipev needs at least 2p = {2 * p} micro-batches"
        ):
            generate("dualpipev", p, m)


def _f_to_w(sched):
    """Peak chunk micro-batches between F and W (or BW) per rank: activations plus W stash."""
    peaks = []
    for acts in sched.actions:
        n = peak = 0
        for a in acts:
            n += {"F": 1, "W": -1, "BW": -1}.get(a.op, 0)
            peak = max(peak, n)
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("costs", [{"F": 1, "B": 2, "W": 1}, {"F": 1, "B": 1, "W": 0.5}])
def test_zb_h2_bubble_is_the_last_ranks_wait_for_its_first_forward(p, costs):
    # (p-1) F out of m (F+B+W): no one-chunk schedule starts the last rank sooner; ZB-H1 idles
    # (p-1)(F+B-W), equal only when F = B = W.
    for m in (2 * p - 1, 2 * p, 3 * p + 1):
        h2 = simulate(generate("zb-h2", p, m), costs)
        assert h2.bubble == pytest.approx((p - 1) * costs["F"] / (m * sum(costs.values())))
        h1 = simulate(generate("zb-h1", p, m), costs)
        assert h1.makespan - max(h1.busy) == pytest.approx(
            (p - 1) * (costs["F"] + costs["B"] - costs["W"])
        )


def test_dualpipev_keeps_its_idle_when_b_costs_twice_f():
    # docs/pipeline_dp.md: with B = 2F = 2W (per chunk) DualPipeV's idle does not grow with m;
    # zb-v's order, chosen for unit costs, idles more (0.39 of the compute at p = 4, m = 8).
    costs = {"F": 0.5, "B": 1, "W": 0.5}
    dpv = [simulate(generate("dualpipev", 4, m), costs) for m in (8, 16)]
    assert [r.makespan - max(r.busy) for r in dpv] == [4.0, 4.0]
    assert dpv[0].bubble == pytest.approx(0.125)
    assert simulate(generate("zb-v", 4, 8), costs).bubble == pytest.approx(0.390625)


def test_dualpipev_follows_the_published_phases():
    # p = 4, rank 1 (stages 1 and 6), m = 8: 2(p-r-1) = 4 F0; r+1 = 2 F0 F1; p-r-1 = 2 B1 W1 F1;
    # m-2p+r+1 = 2 F0 B1 F1 B0 (each B with its W); 2 B1 F1 B0; 2 B1 B0 (B0's W deferred from
    # the second pair's B1 on: rank 1 is odd); 2 W B0 (oldest deferred W first); 2 W.
    sched = generate("dualpipev", 4, 8)
    assert sched.stages_of(1) == [1, 6]
    got = " ".join(f"{a.op}{sched.chunk_of(a.stage)}" for a in sched.actions[1] if a.op in "FBW")
    want = ("F0 " * 4 + "F0 F1 " * 2 + "B1 W1 F1 " * 2 + "F0 B1 W1 F1 B0 W0 " * 2
            + "B1 W1 F1 B0 W0 " * 2 + "B1 W1 B0 W0 B1 B0 " + "W1 B0 W0 B0 " + "W0 W0")  # fmt: skip
    assert got == want


def test_zb_v_places_stages_in_a_v_and_keeps_the_turn_local():
    sched = generate("zb-v", 4, 8)
    assert [sched.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # The turn from stage 3 to stage 4 happens on rank 3: no message names it.
    msgs = {a.message() for acts in sched.actions for a in acts if a.op == "SEND"}
    assert ("act", 0, 3) not in msgs and ("act", 0, 2) in msgs and ("grad", 0, 4) not in msgs


def test_costs_shape_the_makespan():
    # 1F1B with F = 1, BW = 2 on p ranks: (m + p - 1) (F + BW).
    res = simulate(generate("1f1b", 4, 8), {"F": 1, "BW": 2})
    assert res.makespan == 3 * (8 + 3)
    assert res.idle == [res.makespan - 24] * 4
    assert simulate(generate("1f1b", 4, 8), {"F": 1, "BW": 2}, latency=0.5).makespan > 33


def _edit(sched, rank, fn):
    actions = [list(a) for a in sched.actions]
    actions[rank] = fn(actions[rank])
    return Schedule(sched.name, sched.p, sched.m, sched.v, sched.placement, actions)


def test_w_before_its_b_is_named():
    sched = generate("zb-h1", 2, 2)

    def swap(acts):
        i = next(k for k, a in enumerate(acts) if a.op == "W")
        j = max(k for k, a in enumerate(acts[:i]) if a.op == "B" and a.mb == acts[i].mb)
        acts[i], acts[j] = acts[j], acts[i]
        return acts

    with pytest.raises(ScheduleError, match=r"rank 1, action \d+ W\(mb 0, stage 1\): W before"):
        simulate(_edit(sched, 1, swap))


def test_backward_before_forward_duplicate_and_missing_are_named():
    sched = generate("1f1b", 2, 2)
    with pytest.raises(ScheduleError, match="rank 1.*BW\\(mb 0, stage 1\\): backward before"):
        simulate(_edit(sched, 1, lambda a: [x for x in a if not (x.op == "F" and x.mb == 0)]))
    with pytest.raises(ScheduleError, match="rank 0 never runs B/BW\\(mb 1, stage 0\\)"):
        simulate(_edit(sched, 0, lambda a: [x for x in a if not (x.op == "BW" and x.mb == 1)]))
    dup = Action("F", 1, 0)
    with pytest.raises(ScheduleError, match="rank 0.*F\\(mb 1, stage 0\\): runs twice"):
        simulate(_edit(sched, 0, lambda a: a + [dup]))
    with pytest.raises(ScheduleError, match="stage 1 runs on rank 1, not here"):
        simulate(_edit(sched, 0, lambda a: [Action("F", 0, 1)] + a))


def test_a_receive_cycle_is_a_deadlock_naming_every_waiting_rank():
    # Both ranks receive before they send: each waits for the other.
    sched = generate("1f1b", 2, 1)

    def recv_first(acts):
        recv = [a for a in acts if a.op == "RECV"]
        return recv + [a for a in acts if a.op != "RECV"]

    bad = _edit(_edit(sched, 0, recv_first), 1, recv_first)
    with pytest.raises(ScheduleError, match="deadlock: rank 0 waits at action 0 RECV grad.*rank 1"):
        simulate(bad)


def test_channels_must_receive_in_send_order():
    sched = generate("1f1b", 2, 4)

    def reorder(acts):
        recvs = [k for k, a in enumerate(acts) if a.op == "RECV"]
        acts[recvs[0]], acts[recvs[1]] = acts[recvs[1]], acts[recvs[0]]
        return acts

    with pytest.raises(ScheduleError, match="channel rank 0 -> rank 1, message 0"):
        simulate(_edit(sched, 1, reorder))


def test_docs_example_schedule_runs():
    """docs/pipeline_dp.md "Write a new schedule": GPipe with the backward split, W at the end."""
    from megatiny.parallel.schedule_ir import with_communication

    p, m = 4, 8
    orders = [
        [("F", i, r) for i in range(m)]
        + [("B", i, r) for i in range(m)]
        + [("W", i, r) for i in range(m)]
        for r in range(p)
    ]
    sched = with_communication("gpipe-split", p, m, 1, interleaved_placement(p), orders)
    res = simulate(sched, {"F": 1, "B": 1, "W": 1})
    # The W passes fill the drain: bubble 2(p-1) of 3m, against GPipe's 3(p-1).
    assert res.makespan == 3 * m + 2 * (p - 1)
    assert res.peak_in_flight == [m] * p
