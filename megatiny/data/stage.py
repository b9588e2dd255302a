"""The loop every stage shares: read -> parallel work -> (sequential decide) -> write.

    items --(worker processes: parse + per-document work)--> results --(main: decide)--> output

`work(item) -> Result` runs in `workers` forked processes (or inline for workers=1) over bounded
windows of items, so memory stays flat however large the corpus. Results come back in input
order, and `decide(result)` — where a stage keeps global state, e.g. dedup's LSH index — runs
in the main process, in order, so "keep the first occurrence" is deterministic for any worker
count. Every stage writes its output atomically and a JSON report `*.<stage>.json`:
documents in / kept / dropped by reason, bytes in / out, seconds, docs/s, MB/s.

The document filters (filter-lang, quality, dedup, decontam) are `DocumentFilter`s: the worker
side, parsing every item and writing what a filter keeps, is `_filter_item`, shared by all of
them; a filter only says, per parsed document, `judge(rec, text, where) -> (drop, payload)`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from megatiny.data.io import (
    COMPRESSED_EXTS,
    AtomicWriter,
    BadItem,
    RawItem,
    ReadStats,
    dump_record,
    expand_inputs,
    iter_raw,
    parse_item,
    write_json_atomic,
)


@dataclass
class Result:
    """What a worker returns for one item. `drop` is a reason or None (keep)."""

    drop: str | None
    out: bytes | None = None  # the output line when kept
    nbytes: int = 0  # raw input bytes of the item (progress and MB/s)
    where: str = ""
    payload: Any = None  # stage-specific data for `decide` (a MinHash signature, a match...)


def _nbytes(x) -> int:
    if isinstance(x, RawItem):
        return len(x.data)
    if isinstance(x, list):
        return sum(_nbytes(y) for y in x)
    return 0


def batched(items: Iterable, n: int, max_bytes: int | None = None) -> Iterator[list]:
    """Lists of up to n items, cut early once they hold max_bytes of raw input."""
    buf, size = [], 0
    for x in items:
        buf.append(x)
        if max_bytes is not None:
            size += _nbytes(x)
        if len(buf) >= n or (max_bytes is not None and size >= max_bytes):
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


WINDOW_BYTES = 64 << 20  # raw input per window in flight (two windows at most)


def pmap(
    fn: Callable,
    items: Iterable,
    workers: int = 1,
    initializer: Callable | None = None,
    initargs: tuple = (),
    window: int = 1024,
) -> Iterator:
    """Ordered map over forked workers with at most two windows of items in flight (a window
    is `window` items or WINDOW_BYTES of raw input, whichever comes first)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for x in items:
            yield fn(x)
        return
    with mp.get_context("fork").Pool(workers, _child_init, (initializer, initargs)) as pool:
        pending: deque = deque()
        for batch in batched(items, window, WINDOW_BYTES):
            chunk = max(1, len(batch) // (4 * workers))
            pending.append(pool.map_async(fn, batch, chunksize=chunk))
            if len(pending) >= 2:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _child_init(initializer, initargs) -> None:
    # Workers are the parallelism: HF tokenizers must not start its own thread pool in each
    # (and must not reuse the parent's after fork). Set here, not in the parent, so the
    # parent's own batch encoding and tokenizer training stay multi-threaded.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if initializer is not None:
        initializer(*initargs)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def report_path_for(output: str, stage: str) -> str:
    base = output
    for ext in COMPRESSED_EXTS:
        if base.endswith(ext):
            base = base[: -len(ext)]
    for ext in (".jsonl", ".json", ".ndjson"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return f"{base}.{stage}.json"


class StageReport:
    """Counters of one stage run, written as JSON."""

    def __init__(self, stage: str, inputs: list[str], output: str | None, workers: int):
        self.stage = stage
        self.inputs = inputs
        self.output = output
        self.workers = workers
        self.docs_in = 0
        self.kept = 0
        self.dropped: Counter = Counter()
        self.bytes_out = 0
        self.read = ReadStats()
        self.extra: dict = {}
        self.t0 = time.perf_counter()
        self.seconds = 0.0

    def as_dict(self) -> dict:
        secs = self.seconds or (time.perf_counter() - self.t0)
        return {
            "stage": self.stage,
            "inputs": self.inputs[:50],
            "output": self.output,
            "workers": self.workers,
            "docs_in": self.docs_in,
            "docs_kept": self.kept,
            "docs_dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            **self.read.as_dict(),
            "bytes_out": self.bytes_out,
            "seconds": round(secs, 4),
            "docs_per_s": round(self.docs_in / secs, 2) if secs > 0 else None,
            "mb_per_s": round(self.read.bytes / secs / 1e6, 4) if secs > 0 else None,
            **self.extra,
        }

    def write(self, path: str) -> dict:
        d = self.as_dict()
        write_json_atomic(path, d)
        return d


def _input_size(paths: list[str]) -> int | None:
    if any(p.endswith(COMPRESSED_EXTS) for p in paths):
        return None  # compressed: raw byte count unknown up front
    return sum(os.path.getsize(p) for p in paths)


def run_stage(
    stage: str,
    inputs: list[str] | str,
    output: str | None,
    work: Callable[[RawItem], Result],
    *,
    workers: int = 1,
    initializer: Callable | None = None,
    initargs: tuple = (),
    decide: Callable[[Result], str | None] | None = None,
    observe: Callable[[Result], None] | None = None,
    finish: Callable[[StageReport], None] | None = None,
    report_path: str | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    window: int = 1024,
) -> dict:
    """Run one filtering stage end to end; returns the report dict (also written to disk).

    `decide(res)` is called for results the worker kept and may return a drop reason;
    `observe(res)` sees every result; `finish(report)` adds stage-specific fields.
    With `batch_size`, `work` takes a list of items and returns a list of results. With
    `output=None` nothing is written here (the stage writes its own output in `decide`).

    If anything raises mid-way, the documents already written are kept as `OUTPUT.partial`,
    the report records the error, and the exception propagates.
    """
    paths = expand_inputs(inputs)
    if report_path is None:
        if output is None:
            raise ValueError("run_stage needs report_path when output is None")
        report_path = report_path_for(output, stage)
    rep = StageReport(stage, paths, output, workers)
    writer = AtomicWriter(output) if output is not None else None
    items = iter_raw(paths, rep.read)
    if batch_size:
        results = (
            r
            for batch in pmap(
                work,
                batched(items, batch_size, WINDOW_BYTES // 4),
                workers,
                initializer,
                initargs,
                window=max(1, window // batch_size),
            )
            for r in batch
        )
    else:
        results = pmap(work, items, workers, initializer, initargs, window=window)
    bar = tqdm(
        total=_input_size(paths),
        unit="B",
        unit_scale=True,
        desc=stage,
        disable=not progress,
        mininterval=0.5,
    )
    try:
        for res in results:
            rep.docs_in += 1
            if observe is not None:
                observe(res)
            drop = res.drop
            if drop is None and decide is not None:
                drop = decide(res)
            if drop is None:
                if writer is not None:
                    writer.write(res.out)
                rep.kept += 1
            else:
                rep.dropped[drop] += 1
            bar.update(res.nbytes)
            if rep.docs_in % 256 == 0:
                bar.set_postfix(docs=rep.docs_in, kept=rep.kept, refresh=False)
        if finish is not None:
            finish(rep)
        bar.set_postfix(docs=rep.docs_in, kept=rep.kept)  # the final counts = the report's
    except BaseException as e:
        bar.close()
        partial = writer.abort(keep_partial=True) if writer is not None else None
        rep.extra["error"] = f"{type(e).__name__}: {e}"
        rep.extra["partial_output"] = partial
        rep.seconds = time.perf_counter() - rep.t0
        rep.write(report_path)
        raise
    bar.close()
    if writer is not None:
        writer.close()
        rep.bytes_out = writer.bytes
    rep.seconds = time.perf_counter() - rep.t0
    return rep.write(report_path)


class DocumentFilter:
    """A stage that keeps or drops whole documents; `run` drives it through `run_stage`.

    A subclass sets `name` (the stage name: report `OUTPUT.<name>.json`, progress bar) and
    `text_key`, and defines `judge`, which runs in the worker processes (the filter object is
    inherited by fork, so per-worker caches can live on it). It may override `decide` (main
    process, in input order, for documents `judge` kept), `observe` (every result) and `report`
    (fields added to the report). A kept JSONL line is written byte for byte (a newline added
    if missing) unless `rewrites` is set, when the record `judge` may have edited is written
    as JSON; a kept `.txt` document is always written as its record, {text_key: text,
    "source": file name} plus what `judge` added.
    """

    name = ""
    text_key = "text"
    rewrites = False

    def judge(self, rec: dict, text: str, where: str) -> tuple[str | None, Any]:
        """(drop reason or None to keep, payload for `decide` / `observe` / the report)."""
        raise TypeError(f"{type(self).__name__} must define judge(rec, text, where)")

    def decide(self, res: Result) -> str | None:
        return None

    def observe(self, res: Result) -> None:
        """Called for every result in input order; the default keeps no statistics."""

    def report(self) -> dict:
        return {}

    def run(
        self, inputs, output: str, workers: int = 1, report_path: str | None = None, progress=True
    ) -> dict:
        """Filter `inputs` into `output`; returns the report (also written to disk)."""
        _ACTIVE[:] = [self]  # read by _filter_item, here and in the forked workers
        try:
            return run_stage(
                self.name,
                inputs,
                output,
                _filter_item,
                workers=workers,
                decide=self.decide,
                observe=self.observe,
                finish=lambda rep: rep.extra.update(self.report()),
                report_path=report_path,
                progress=progress,
            )
        finally:
            _ACTIVE.clear()


_ACTIVE: list[DocumentFilter] = []


def _filter_item(item: RawItem) -> Result:
    """Parse one item and let the running DocumentFilter judge it (the worker side)."""
    stage = _ACTIVE[0]
    n = len(item.data)
    try:
        rec, text = parse_item(item, stage.text_key)
    except BadItem as e:
        return Result(e.args[0], nbytes=n, where=item.where)
    drop, payload = stage.judge(rec, text, item.where)
    if drop is not None:
        return Result(drop, nbytes=n, where=item.where, payload=payload)
    if item.kind == "jsonl" and not stage.rewrites:
        out = item.data if item.data.endswith(b"\n") else item.data + b"\n"
    else:
        out = dump_record(rec)
    return Result(None, out, n, item.where, payload)
