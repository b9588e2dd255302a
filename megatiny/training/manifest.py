"""Checkpoint integrity: a manifest of every file's size and sha256, written before `latest`
moves, verified before a resume; and `megatiny checkpoint verify DIR`.

    step_<N>/manifest.json    {"algorithm": "sha256", "files": {name: {"bytes": n, "sha256": hex}}}

Each rank hashes the DCP files it wrote itself (`__<rank>_*.distcp`), so hashing is as parallel as
writing; rank 0 adds the rest (`.metadata`, `meta.json`) and writes the manifest into the
temporary directory before the rename, so a checkpoint `latest` names always has one. Verifying
is split the same way: rank r checks every world_size-th file and the ranks agree on the first
bad file, so every rank makes the same choice.

`--resume auto` takes the newest checkpoint that verifies: on a missing, truncated or altered file
it names the file and falls back to the previous intact checkpoint of the same run, with a
warning. sha256 (hashlib, no extra dependency) reads ~1 GB/s per rank: a check costs about one
more read of the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

MANIFEST = "manifest.json"
ALGORITHM = "sha256"
_PART = ".manifest.rank{}.json"
_CHUNK = 1 << 22


class CheckpointCorrupt(Exception):
    """A checkpoint file is missing, truncated or altered (the message names the file)."""


def file_digest(path: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def _atomic_json(path: str, obj) -> None:
    from megatiny.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def write_rank_part(directory: str, rank: int) -> None:
    """Hash the DCP files this rank wrote (`__<rank>_...`) into a part for rank 0 to merge."""
    prefix = f"__{rank}_"
    files = {
        name: file_digest(os.path.join(directory, name))
        for name in sorted(os.listdir(directory))
        if name.startswith(prefix)
    }
    _atomic_json(os.path.join(directory, _PART.format(rank)), files)


def write_manifest(directory: str, world_size: int) -> dict:
    """Rank 0, after every rank's part exists: merge the parts, hash what no part covers, write
    manifest.json (atomic) and drop the parts."""
    files: dict = {}
    for r in range(world_size):
        part = os.path.join(directory, _PART.format(r))
        if os.path.exists(part):
            with open(part, encoding="utf-8") as f:
                files.update(json.load(f))
            os.unlink(part)
    for name in sorted(os.listdir(directory)):
        if name not in files and name != MANIFEST and not name.startswith(".manifest."):
            if os.path.isfile(os.path.join(directory, name)):
                files[name] = file_digest(os.path.join(directory, name))
    manifest = {"algorithm": ALGORITHM, "files": files}
    _atomic_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def read_manifest(step_dir: str) -> dict | None:
    """The manifest, None for a checkpoint written before manifests existed."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["files"].items()
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointCorrupt(f"{path}: unreadable manifest ({e})") from None
    return manifest


def check_file(step_dir: str, name: str, expected: dict) -> str | None:
    """None when `name` matches the manifest, else what is wrong with it."""
    path = os.path.join(step_dir, name)
    if not os.path.exists(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"{path} has {size} bytes, the manifest says {expected['bytes']} (truncated?)"
    if file_digest(path)[ALGORITHM] != expected[ALGORITHM]:
        return f"{path}: {ALGORITHM} differs from the manifest (the file was altered)"
    return None


def verify(step_dir: str, rank: int = 0, world_size: int = 1) -> tuple[int, str | None]:
    """Check this rank's share (every world_size-th file); (index of the first bad file or -1,
    what is wrong). A checkpoint without meta.json is incomplete; one without a manifest (older
    than manifests) passes unverified."""
    if not os.path.exists(os.path.join(step_dir, "meta.json")):
        return 0, f"{step_dir} is incomplete (no meta.json)"
    try:
        manifest = read_manifest(step_dir)
    except CheckpointCorrupt as e:
        return 0, str(e)
    if manifest is None:
        return -1, None
    items = sorted(manifest["files"].items())
    for i in range(rank, len(items), world_size):
        problem = check_file(step_dir, *items[i])
        if problem:
            return i, problem
    return -1, None


def verify_collectively(step_dir: str, ctx) -> str | None:
    """What is wrong with `step_dir` (the first bad file), the same answer on every rank."""
    world = ctx.world_size if ctx is not None else 1
    if world == 1:
        return verify(step_dir)[1]
    import torch
    import torch.distributed as dist

    from megatiny.parallel import collectives

    index, problem = verify(step_dir, ctx.rank, world)
    big = 1 << 40
    first = torch.tensor([index if index >= 0 else big], dtype=torch.int64, device=ctx.device)
    collectives.all_reduce(first, op=dist.ReduceOp.MIN)
    first = int(first.item())
    if first == big:
        return None
    if index == first:
        return problem
    manifest = read_manifest(step_dir)  # another rank found it: name the same file here
    items = sorted(manifest["files"].items()) if manifest else []
    if first < len(items):
        return check_file(step_dir, *items[first]) or f"{step_dir}: {items[first][0]} is bad"
    return f"{step_dir} is bad"


# ---- choosing a checkpoint --------------------------------------------------------------------


def step_dirs(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `step_<N>` directory, newest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    out = [
        (int(d.split("_", 1)[1]), os.path.join(checkpoint_dir, d))
        for d in os.listdir(checkpoint_dir)
        if d.startswith("step_") and d.split("_", 1)[1].isdigit()
    ]
    return sorted(out, reverse=True)


def latest_name(checkpoint_dir: str) -> str | None:
    marker = os.path.join(checkpoint_dir, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        return f.read().strip() or None


def _run_id(step_dir: str) -> str | None:
    try:
        with open(os.path.join(step_dir, "meta.json"), encoding="utf-8") as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return None


def newest_intact(checkpoint_dir: str, ctx=None, warn=None) -> str | None:
    """The step directory to resume from: the one `latest` names if it verifies, else the newest
    older checkpoint of the same run that does (each rejection is passed to `warn`). None when
    there are no checkpoints; CheckpointCorrupt when none is intact."""
    latest = latest_name(checkpoint_dir)
    candidates = step_dirs(checkpoint_dir)
    if latest is not None:
        path = os.path.join(checkpoint_dir, latest)
        step = int(latest.split("_", 1)[1]) if latest.split("_", 1)[-1].isdigit() else None
        lineage = _run_id(path)
        candidates = [(s, p) for s, p in candidates if p != path and (step is None or s < step)]
        if lineage is not None:
            candidates = [(s, p) for s, p in candidates if _run_id(p) in (lineage, None)]
        candidates.insert(0, (step, path))
    if not candidates:
        return None
    problems = []
    for _, path in candidates:
        problem = verify_collectively(path, ctx)
        if problem is None:
            if problems and warn is not None:
                warn(f"resuming from the older intact checkpoint {path}")
            return path
        problems.append(problem)
        if warn is not None:
            warn(f"checkpoint {path} is not intact: {problem}")
    raise CheckpointCorrupt(
        f"no intact checkpoint in {checkpoint_dir}: "
        + "; ".join(problems)
        + ". Start over with --overwrite (moves the run aside) or another train.run_dir"
    )


# ---- megatiny checkpoint verify ---------------------------------------------------------------


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = """example:
  megatiny checkpoint verify runs/t1                 # every checkpoint of a run
  megatiny checkpoint verify runs/t1/checkpoints/step_60"""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser(
        "verify", help="check every file of a run's checkpoints against its manifest"
    )
    v.add_argument("dir", help="a run directory, its checkpoints/ directory or one step_<N>")


def verify_tree(path: str, out=None) -> int:
    """Print one line per checkpoint under `path`; 0 when every one is intact."""
    out = out or sys.stdout
    if os.path.exists(os.path.join(path, "meta.json")) or os.path.basename(
        os.path.normpath(path)
    ).startswith(("step_", ".tmp_step_")):
        checkpoint_dir, only = os.path.dirname(os.path.normpath(path)), [path]
    else:
        checkpoint_dir = path
        if os.path.isdir(os.path.join(path, "checkpoints")):
            checkpoint_dir = os.path.join(path, "checkpoints")
        only = [p for _, p in step_dirs(checkpoint_dir)]
    if not only:
        print(f"no checkpoints in {path}", file=out)
        return 1
    latest = latest_name(checkpoint_dir)
    bad = False
    for step_dir in only:
        name = os.path.basename(os.path.normpath(step_dir))
        mark = " (latest)" if name == latest else ""
        _, problem = verify(step_dir)
        if problem is None:
            manifest = read_manifest(step_dir)
            if manifest is None:
                print(f"{name}{mark}: complete, no manifest (written before manifests)", file=out)
            else:
                files = manifest["files"]
                size = sum(f["bytes"] for f in files.values()) / 2**20
                print(f"{name}{mark}: OK, {len(files)} files, {size:.1f} MiB", file=out)
        else:
            print(f"{name}{mark}: BAD: {problem}", file=out)
            bad = True
    if latest is not None and len(only) > 1 and latest not in {os.path.basename(p) for p in only}:
        print(f"latest names {latest!r}, which does not exist", file=out)
        bad = True
    return 1 if bad else 0


def main(args) -> int:
    if not os.path.exists(args.dir):
        print(f"megatiny checkpoint: {args.dir} does not exist", file=sys.stderr)
        return 2
    return verify_tree(args.dir)
