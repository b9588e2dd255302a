"""Compute orders of the schedules that split the backward into B and W (zb-h1, zb-h2, zb-v,
dualpipev): pure functions of p ranks, m micro-batches and the stages' placement, returning each
rank's order of ("F" | "B" | "W", micro_batch, virtual_stage) tuples. `schedule_ir` (which
imports this module, never the other way) adds the messages and checks the arguments.
"""

from __future__ import annotations


def greedy_split_orders(p: int, m: int, placement, limit, stash_limit=None) -> list[list[tuple]]:
    """Compute orders from a list scheduler with unit costs (F = B = W = 1, free messages): at
    each tick every idle rank runs a ready B (its highest stage first), else a ready F (highest
    stage first) if fewer than `limit[r]` chunk micro-batches are between F and B and fewer
    than `stash_limit[r]` between F and W, else its oldest pending W. Deterministic: every
    rank derives the same orders."""
    n = len(placement)
    done: dict[tuple, int] = {}  # (op, mb, stage) -> finish tick
    in_flight = [0] * p
    pending_w = [[] for _ in range(p)]
    next_f = {s: 0 for s in range(n)}  # each stage forwards micro-batches in order
    next_b = {s: 0 for s in range(n)}
    orders = [[] for _ in range(p)]
    busy_until = [0] * p
    t, total = 0, 3 * m * n
    while len(done) < total:
        for r in range(p):
            if busy_until[r] > t:
                continue
            pick = None
            for s in sorted((s for s in range(n) if placement[s] == r), reverse=True):
                i = next_b[s]
                if i < m and done.get(("F", i, s), t + 1) <= t:
                    after = ("B", i, s + 1) if s + 1 < n else ("F", i, s)
                    if done.get(after, t + 1) <= t:
                        pick = ("B", i, s)
                        break
            stash_ok = stash_limit is None or in_flight[r] + len(pending_w[r]) < stash_limit[r]
            if pick is None and in_flight[r] < limit[r] and stash_ok:
                for s in sorted((s for s in range(n) if placement[s] == r), reverse=True):
                    i = next_f[s]
                    before = ("F", i, s - 1) if s > 0 else None
                    if i < m and (before is None or done.get(before, t + 1) <= t):
                        pick = ("F", i, s)
                        break
            if pick is None and pending_w[r]:
                pick = pending_w[r].pop(0)
            if pick is None:
                continue
            op, i, s = pick
            if op == "F":
                next_f[s] += 1
                in_flight[r] += 1
            elif op == "B":
                next_b[s] += 1
                in_flight[r] -= 1
                pending_w[r].append(("W", i, s))
            done[pick] = t + 1
            busy_until[r] = t + 1
            orders[r].append(pick)
        t += 1
        if t > 10 * total + 10:
            raise RuntimeError(f"greedy scheduler stuck at p={p} m={m} (limits {limit})")
    return orders


def zb_h1(p: int, m: int, placement) -> list[list[tuple]]:
    # 1F1B's activations (p - r micro-batches between F and B); up to p - 1 more B's may wait
    # for their W (only the linears' inputs and output gradients are kept for it).
    return greedy_split_orders(p, m, placement, [p - r for r in range(p)],
                               [2 * p - 1 - r for r in range(p)])  # fmt: skip


def zb_h2(p: int, m: int, placement) -> list[list[tuple]]:
    # ZB-H2 (Qi et al. 2024): 2(p-r)-1 micro-batches between F and B, so that rank r's warm-up
    # forwards fill the wait for its first B, and at most 2p-1 between F and W (the paper's peak
    # memory of (2p-1) micro-batches): for m >= 2p-1 every rank then runs without a gap from its
    # first action to its last (a parallelogram: rank r idles r F's before, p-1-r after).
    return greedy_split_orders(
        p, m, placement, [2 * (p - r) - 1 for r in range(p)], [2 * p - 1] * p
    )


def zb_v(p: int, m: int, placement) -> list[list[tuple]]:
    # 2p chunk micro-batches = p stages' worth, 1F1B's first rank; one more chunk's W stash
    return greedy_split_orders(p, m, placement, [2 * p] * p, [2 * p + 1] * p)


def dualpipev(p: int, m: int) -> list[list[tuple]]:
    """DualPipeV (DeepSeek's deepseek-ai/DualPipe, dualpipev.py: DualPipe "cut in half" into a
    V): rank r holds stage r (chunk 0) and stage 2p-1-r (chunk 1); m >= 2p. Its phases on rank r:

        1. 2(p-r-1) forwards of chunk 0
        2. r+1 times F0 F1
        3. p-r-1 times B1 W1 F1
        4. m-2p+r+1 times F0 B1 F1 B0   (DualPipe overlaps each F with the B after it on two
                                         streams; the executor runs them one after the other)
        5. p-r-1 times B1 F1 B0
        6. r+1 times B1 B0              (from the middle on, their W's are deferred)
        7. p-r-1 times W B0             (B0's W deferred; W: the oldest deferred)
        8. r+1 times W

    A backward whose W is not deferred is B then its W at once."""
    return [_dualpipev_rank(p, m, r) for r in range(p)]


def _dualpipev_rank(p: int, m: int, r: int) -> list[tuple]:
    stage, count = (r, 2 * p - 1 - r), {"F": [0, 0], "B": [0, 0]}
    order, deferred = [], []

    def run(op, c, defer=False):
        key = (count[op][c], stage[c])
        count[op][c] += 1
        order.append((op, *key))
        if op == "B":
            (deferred if defer else order).append(("W", *key))

    def w():
        order.append(deferred.pop(0))

    for _ in range(2 * (p - r - 1)):
        run("F", 0)
    for _ in range(r + 1):
        run("F", 0), run("F", 1)
    for _ in range(p - r - 1):
        run("B", 1, defer=True), w(), run("F", 1)
    for _ in range(m - 2 * p + r + 1):
        run("F", 0), run("B", 1), run("F", 1), run("B", 0)
    for _ in range(p - r - 1):
        run("B", 1), run("F", 1), run("B", 0)
    defer = False
    for i in range(r + 1):
        defer = defer or (i == (r + 1) // 2 and r % 2 == 1)
        run("B", 1, defer)
        defer = defer or (i == (r + 1) // 2 and r % 2 == 0)
        run("B", 0, defer)
    for _ in range(p - r - 1):
        w(), run("B", 0, defer=True)
    for _ in range(r + 1):
        w()
    return order
