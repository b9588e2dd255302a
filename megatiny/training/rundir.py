"""Who owns a run directory: one run at a time, a fresh run never mixes with an old one, and a
resumed run's metrics hold each step once.

    run_dir/.lock             {"pid", "host", "started", "job"} while a run uses the directory
    run_dir/config.yaml       written by the loop only after every check passed
    run_dir/metrics.jsonl     on a resume at step S, rows after S move to metrics.jsonl.replaced

- A second run on the same directory stops at the lock with the first one's pid, host and start
  time. A lock is stale (taken over, with a warning) when its pid is gone on this host, or when it
  was left by an earlier attempt of this very job (torchrun restarts: same TORCHELASTIC_RUN_ID).
  A run stopped by a signal before its loop removes its lock (megatiny/training/preempt.py).
- A fresh run (`train.resume=none`) refuses a directory holding another run's checkpoints or
  metrics unless `train.overwrite` (`--overwrite`), which moves the old run aside to
  `<run_dir>.old-<time>/`: nothing is ever deleted.
- Checkpoints carry their run's id (`run_id` in meta.json); retention prunes only this run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid

LOCK = ".lock"
RUN_FILES = ("metrics.jsonl",)


class RunDirError(RuntimeError):
    """The run directory is in use, or holds another run this run would mix with."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _job_id() -> str | None:
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var) not in (None, "", "none"):
            return f"{var}={os.environ[var]}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`run_dir/.lock`, created with O_EXCL by rank 0 for the whole run."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale(self, other: dict | None) -> str | None:
        """Why the lock `other` is left over (None: its run may be alive)."""
        if other is None:
            age = time.time() - os.path.getmtime(self.path) if os.path.exists(self.path) else 99
            return "it is unreadable" if age > 10 else None
        if other.get("host") == socket.gethostname() and not _alive(int(other.get("pid", 0))):
            return f"pid {other.get('pid')} on this host is gone"
        job = _job_id()
        if job is not None and other.get("job") == job:
            return f"left by an earlier attempt of this job ({job})"
        return None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a stale one was taken over."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": _job_id(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        warning = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                reason = self._stale(other)
                if reason is None:
                    if other is None:  # being written right now
                        time.sleep(0.5)
                        continue
                    raise RunDirError(
                        f"{os.path.dirname(self.path)} is in use by another run: pid "
                        f"{other.get('pid')} on {other.get('host')}, started {other.get('started')} "
                        f"(lock file {self.path}). Wait for it to finish or choose another "
                        f"train.run_dir; if that run is gone, delete {self.path}"
                    ) from None
                warning = f"took over the stale lock {self.path} ({reason})"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
            self.held = True
            from megatiny.training.preempt import at_stop

            at_stop(self.release)  # a signal before the loop: the next run finds no lock
            return warning
        raise RunDirError(f"could not take the lock {self.path}; is another run starting?")

    def release(self) -> None:
        if self.held:
            other = self._read()
            if other is None or other.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False


# ---- the run already in the directory -----------------------------------------------------------


def describe_existing(run_dir: str) -> str | None:
    """'checkpoints step_40..step_60, metrics.jsonl (61 rows, last step 60)', or None if empty."""
    from megatiny.training.manifest import step_dirs

    parts = []
    steps = sorted(s for s, _ in step_dirs(os.path.join(run_dir, "checkpoints")))
    if steps:
        names = f"step_{steps[0]}" + (f"..step_{steps[-1]}" if len(steps) > 1 else "")
        parts.append(f"checkpoints {names}")
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            rows = _rows(path)
            last = max((r.get("step", 0) for r in rows if isinstance(r, dict)), default="?")
            parts.append(f"{name} ({len(rows)} rows, last step {last})")
    return ", ".join(parts) or None


def _rows(path: str) -> list:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(None)
    return out


def move_aside(run_dir: str) -> str:
    """Move everything but the lock to a new sibling `<run_dir>.old-<time>[-k]`; returns it."""
    base = os.path.normpath(run_dir) + ".old-" + time.strftime("%Y%m%d-%H%M%S")
    dest, k = base, 1
    while os.path.exists(dest):
        dest, k = f"{base}-{k}", k + 1
    os.makedirs(dest)
    for name in os.listdir(run_dir):
        if name != LOCK:
            os.rename(os.path.join(run_dir, name), os.path.join(dest, name))
    return dest


def claim(run_dir: str, resume: str, overwrite: bool, steps: int) -> tuple[RunLock, list[str]]:
    """Rank 0, before anything is written: lock `run_dir`, refuse (or with `overwrite` move
    aside) another run for a fresh start, and remove half-written checkpoints of crashed saves.
    Returns the held lock and warnings to print."""
    import shutil

    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    notes = [w for w in [lock.acquire()] if w]
    try:
        continuing = resume == "auto" or (
            resume not in ("none", "") and os.path.abspath(resume).startswith(
                os.path.abspath(run_dir) + os.sep)
        )  # fmt: skip
        old = describe_existing(run_dir)
        if old and not continuing:
            if not overwrite:
                raise RunDirError(
                    f"train.run_dir={run_dir} already holds a run ({old}); this fresh run "
                    f"(train.steps={steps}, train.resume={resume}) would mix with it. Continue "
                    "that run with --resume auto, move it aside and start over with --overwrite, "
                    "or choose another train.run_dir"
                )
            notes.append(f"moved the previous run in {run_dir} ({old}) to {move_aside(run_dir)}")
        checkpoints = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(checkpoints):
            for name in os.listdir(checkpoints):
                if name.startswith(".tmp_step_"):  # a save that crashed: we own the dir now
                    shutil.rmtree(os.path.join(checkpoints, name), ignore_errors=True)
    except BaseException:
        lock.release()
        raise
    return lock, notes


def agree(ctx, error: Exception | None) -> None:
    """Every rank raises when rank 0 refused the directory (rank 0 with its own message)."""
    if ctx is not None and ctx.world_size > 1:
        import torch

        from megatiny.parallel import collectives

        flag = torch.tensor([1.0 if error is not None else 0.0], device=ctx.device)
        collectives.all_reduce(flag)
        if flag.item() and error is None:
            raise RunDirError("rank 0 refused the run directory (see its message)")
    if error is not None:
        raise error


def prune(checkpoint_dir: str, keep: int, run_id: str | None) -> None:
    """Delete all but the newest `keep` checkpoints of run `run_id`, never the one `latest`
    names; checkpoints of other runs (or without a run id) are left alone."""
    import shutil

    from megatiny.training.manifest import latest_name, step_dirs

    if run_id is None:
        return
    latest = latest_name(checkpoint_dir)
    mine = []
    for _, path in step_dirs(checkpoint_dir):  # newest first
        try:
            with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
                if json.load(f).get("run_id") == run_id:
                    mine.append(path)
        except (OSError, ValueError):
            continue
    for path in mine[keep:]:
        if os.path.basename(path) != latest:
            shutil.rmtree(path, ignore_errors=True)


# ---- metrics on resume ------------------------------------------------------------------------


def drop_rows_after(path: str, step: int) -> int:
    """Keep the rows of `path` (JSONL with a `step`) up to `step`; later ones (replayed by the
    resumed run) and torn lines are appended to `path`.replaced. Returns how many moved."""
    if not os.path.exists(path):
        return 0
    from megatiny.fsutil import atomic_write_text

    keep, moved = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                later = int(row.get("step", 0)) > step
            except (ValueError, AttributeError, TypeError):
                later = True
            (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(path + ".replaced", "a", encoding="utf-8") as f:
            f.writelines(moved)
        atomic_write_text(path, "".join(keep))
    return len(moved)
