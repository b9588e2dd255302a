"""`megatiny debug hang RUN_DIR`: read the flight-recorder dumps (run_dir/debug/rank<r>.json,
megatiny/training/flight.py) and say who waits for whom.

    $ megatiny debug hang runs/t1
    rank 1 holds the job up: it is in no communication op, at slow_step (fault.py:12), step 3
      (its last op: dp all_reduce of step 2, done)
    rank 0 waits in the dp all_reduce of step 3 for rank 1

How: a rank whose main thread is inside megatiny/parallel/collectives.py (or whose dump was
written because an op raised, e.g. timed out) is blocked in its oldest unfinished op. A collective over group G is its k-th op on G (`gi`); a member that has
posted fewer than k+1 ops on G has not reached it and is waited for. A recv from peer P is its k-th
message from P (`pi`); P is waited for unless it posted its k-th send to this rank. Ranks that
wait for nobody (computing, sleeping, in Python code, or without a dump: killed) are the cause.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def load_dumps(run_dir: str) -> dict[int, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "debug", "rank*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                dump = json.load(f)
            out[int(dump["rank"])] = dump
        except (OSError, ValueError, KeyError):
            continue
    return out


def describe(op: dict) -> str:
    """'the dp all_reduce of step 12' / 'recv_forward(mb 7) from rank 4'."""
    labels = op.get("labels", {})
    step = f" of step {labels['step']}" if "step" in labels else ""
    if "peer" in op:
        name = op.get("name") or op["op"]
        way = "from" if op["op"] == "recv" else "to"
        return f"{name} {way} rank {op['peer']}{step}"
    where = ""
    if labels.get("mb") is not None:
        where = f" (mb {labels['mb']}, chunk {labels.get('chunk', 0)})"
    return f"the {op['group']} {op['op']}{step}{where}"


def _in_collective(dump: dict) -> bool:
    stack = dump.get("stacks", {}).get("main", [])
    return any(os.path.join("parallel", "collectives.py") in line for line in stack[-6:])


def _location(dump: dict) -> str:
    """The innermost frame of the main thread outside the recorder: 'fn (file.py:12)'."""
    for entry in reversed(dump.get("stacks", {}).get("main", [])):
        first = entry.strip().splitlines()[0]  # File "x.py", line 12, in fn
        if "flight.py" in first or "threading.py" in first:
            continue
        try:
            file_part, line_part, fn_part = first.split(", ", 2)
            file = os.path.basename(file_part.split('"')[1])
            return f"{fn_part.removeprefix('in ')} ({file}:{line_part.removeprefix('line ')})"
        except (IndexError, ValueError):
            return first
    return "unknown code"


def blocked_op(dump: dict) -> dict | None:
    """The op this rank waits in, None when it is not inside communication."""
    running = [op for op in dump.get("ops", []) if op.get("state") == "running"]
    # A dump written when an op failed (timed out) is made from the loop's exception handler:
    # its unfinished op is the one that failed.
    failed = dump.get("reason", "").startswith("exception")
    if not running or not (failed or _in_collective(dump)):
        return None
    recvs = [op for op in running if op["op"] == "recv"]
    return recvs[0] if recvs else running[0]


def waits_for(rank: int, dumps: dict[int, dict]) -> tuple[dict | None, list[int]]:
    """(the op `rank` is blocked in, the ranks it waits for)."""
    dump = dumps[rank]
    op = blocked_op(dump)
    if op is None:
        return None, []
    if "peer" in op:
        peer = op["peer"]
        other = dumps.get(peer)
        if other is None:
            return op, [peer]
        mirror = "send" if op["op"] == "recv" else "recv"
        posted = other.get("pairs", {}).get(f"{mirror}:{rank}", 0)
        return op, [] if posted > op.get("pi", 0) else [peer]
    members = dump.get("groups", {}).get(op["group"], [])
    late = []
    for m in members:
        if m == rank:
            continue
        other = dumps.get(m)
        if other is None or other.get("counts", {}).get(op["group"], 0) <= op["gi"]:
            late.append(m)
    return op, late


def analyze(dumps: dict[int, dict]) -> list[str]:
    if not dumps:
        return []
    world = max(d.get("world_size", 1) for d in dumps.values())
    lines, causes = [], []
    missing = [r for r in range(world) if r not in dumps]
    waiting = {}
    for rank in sorted(dumps):
        op, late = waits_for(rank, dumps)
        if op is None:
            causes.append(rank)
        else:
            waiting[rank] = (op, late)
    for rank in causes:
        dump = dumps[rank]
        step = dump.get("labels", {}).get("step")
        done = [op for op in dump.get("ops", []) if op.get("state") == "done"]
        last = f" (its last op: {describe(done[-1])}, done)" if done else ""
        at = f", step {step}" if step is not None else ""
        lines.append(f"rank {rank} holds the job up: it is in no communication op, at "
                     f"{_location(dump)}{at}{last}")  # fmt: skip
    for rank in missing:
        lines.append(f"rank {rank} left no dump: it died or was killed before it could write one")
    for rank, (op, late) in sorted(waiting.items()):
        whom = ", ".join(f"rank {r}" for r in late) if late else "nobody that has not arrived"
        lines.append(f"rank {rank} waits in {describe(op)} for {whom}")
    reasons = sorted({d.get("reason", "?").split(":")[0] for d in dumps.values()})
    lines.append(f"({len(dumps)} dumps from {len(dumps)}/{world} ranks; reasons: "
                 f"{', '.join(reasons)})")  # fmt: skip
    return lines


# ---- megatiny debug --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = """example:
  megatiny debug hang runs/t1        # after a timeout, or `kill -USR1 <pid>` of every rank"""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    h = sub.add_parser("hang", help="read run_dir/debug/ flight-recorder dumps: who waits for whom")
    h.add_argument("run_dir")


def main(args) -> int:
    dumps = load_dumps(args.run_dir)
    if not dumps:
        print(
            f"megatiny debug: no flight-recorder dumps in {os.path.join(args.run_dir, 'debug')}; "
            "ranks write them on a timeout, after train.timeout_s/2 without communication "
            "progress, or on `kill -USR1 <pid>`",
            file=sys.stderr,
        )
        return 1
    for line in analyze(dumps):
        print(line)
    return 0
