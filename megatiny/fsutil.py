"""Atomic file writes: write under a temporary name in the target's directory, fsync, rename.

An interrupted run leaves either the previous file or the complete new one under the final name,
never a half-written file that looks whole; the temporary is removed when the write fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path` for any writer (`save_file(state, tmp)`, ...); when the
    block succeeds the file is fsynced and renamed to `path`. The temporary keeps `path`'s
    extension, so writers that infer the format from it (matplotlib) still work."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(directory, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str, write: Callable, mode: str = "wb", encoding: str | None = None) -> None:
    """Call `write(f)` with a file opened in `mode` under a temporary name, then fsync + rename."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        write(f)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w", "utf-8")
