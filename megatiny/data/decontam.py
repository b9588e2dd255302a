"""Benchmark decontamination: drop documents sharing a word n-gram with a benchmark.

Text is normalized as for dedup (NFKC, lower case, punctuation dropped, whitespace collapsed)
and cut into word n-grams (default n = 13, as in GPT-3's contamination study). Every n-gram of
every benchmark passage goes into a sorted table of 64-bit hashes; a document is contaminated
when any of its n-grams is in the table (vectorized `searchsorted`, so the cost per document is
linear in its length). Passages shorter than n words cannot be matched and are counted in the
report as `benchmark_items_too_short`.

Benchmark files: JSONL (every string field of every object is a passage; `fields` restricts
which keys), JSON (every string anywhere in the document), or plain text (the whole file);
gzip / zstd by extension. The report lists each flagged document with the benchmark file and
item it matched and the matching n-gram.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from megatiny.data.dedup import ngram_hashes, normalize
from megatiny.data.io import doc_name, open_binary
from megatiny.data.stage import DocumentFilter, Result


def _strings(obj, fields: tuple[str, ...] | None, key: str | None = None):
    if isinstance(obj, str):
        if fields is None or key in fields:
            yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, fields, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v, fields, key)


def _item_id(obj, default: str) -> str:
    if isinstance(obj, dict):
        for k in ("task_id", "id", "question_id", "name"):
            if isinstance(obj.get(k), str | int):
                return str(obj[k])
    return default


def load_benchmark(path: str, fields: tuple[str, ...] | None = None):
    """Yield (item id, passage) pairs of one benchmark file."""
    base = path.lower()
    for ext in (".gz", ".zst", ".zstd"):
        base = base.removesuffix(ext)
    with open_binary(path) as f:
        if base.endswith((".jsonl", ".ndjson")):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from e
                for s in _strings(obj, fields):
                    yield _item_id(obj, f"line {lineno}"), s
        elif base.endswith(".json"):
            try:
                obj = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
            items = obj if isinstance(obj, list) else [obj]
            if isinstance(obj, dict):  # e.g. {"subject": {"question": ...}}: one item per key
                items = list(obj.items())
                for k, v in items:
                    for s in _strings(v, fields):
                        yield str(k), s
                return
            for i, it in enumerate(items):
                for s in _strings(it, fields):
                    yield _item_id(it, f"item {i}"), s
        else:
            yield "text", f.read().decode("utf-8", errors="replace")


@dataclass
class DecontamConfig:
    benchmarks: tuple[str, ...] = ()
    ngram: int = 13
    fields: tuple[str, ...] | None = None
    text_key: str = "text"
    max_report: int = 100_000


@dataclass
class NgramIndex:
    """Sorted n-gram hashes of all benchmark passages and who they belong to."""

    hashes: np.ndarray
    owner: np.ndarray  # index into `items`, aligned with hashes
    items: list[tuple[str, str]]  # (benchmark name, item id)
    stats: dict = field(default_factory=dict)

    @classmethod
    def build(cls, paths, n: int, fields=None) -> NgramIndex:
        hs, owners, items = [], [], []
        stats: dict = {"benchmark_items": 0, "benchmark_items_too_short": 0, "per_benchmark": {}}
        cache: dict = {}
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"benchmark file {path} not found")
            name = os.path.basename(path)
            count = 0
            for item_id, text in load_benchmark(path, fields):
                words = normalize(text).split()
                stats["benchmark_items"] += 1
                if len(words) < n:
                    stats["benchmark_items_too_short"] += 1
                    continue
                h = ngram_hashes(words, n, cache)
                hs.append(h)
                owners.append(np.full(len(h), len(items), dtype=np.int64))
                items.append((name, item_id))
                count += len(h)
            stats["per_benchmark"][name] = {"ngrams": count}
        if hs:
            h = np.concatenate(hs)
            o = np.concatenate(owners)
            order = np.argsort(h, kind="stable")
            h, o = h[order], o[order]
        else:
            h, o = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        stats["benchmark_ngrams"] = int(len(h))
        return cls(h, o, items, stats)

    def first_match(self, words: list[str], n: int, cache: dict | None = None):
        """(position of the first contaminated n-gram, item index) or None."""
        if not len(self.hashes):
            return None
        h = ngram_hashes(words, n, cache)
        if not len(h):
            return None
        pos = np.searchsorted(self.hashes, h)
        pos[pos == len(self.hashes)] = 0
        hit = np.flatnonzero(self.hashes[pos] == h)
        if not len(hit):
            return None
        i = int(hit[0])
        return i, int(self.owner[pos[i]])


class DecontamFilter(DocumentFilter):
    """The `decontam` stage: drop documents with an n-gram in the benchmarks' `NgramIndex`."""

    name = "decontam"

    def __init__(self, cfg: DecontamConfig):
        if not cfg.benchmarks:
            raise ValueError("decontam needs at least one --benchmark FILE (JSONL, JSON or text)")
        self.cfg = cfg
        self.text_key = cfg.text_key
        self.index = NgramIndex.build(cfg.benchmarks, cfg.ngram, cfg.fields)
        self.cache: dict = {}  # word -> hash, per worker
        self.flagged: list[dict] = []
        self.per_bench: dict[str, int] = {}

    def judge(self, rec: dict, text: str, where: str) -> tuple[str | None, dict | None]:
        if len(self.cache) > 2_000_000:
            self.cache.clear()
        words = normalize(text).split()
        m = self.index.first_match(words, self.cfg.ngram, self.cache)
        if m is None:
            return None, None
        pos, owner = m
        bench, item_id = self.index.items[owner]
        hit = {
            "doc": doc_name(rec, where),
            "benchmark": bench,
            "item": item_id,
            "ngram": " ".join(words[pos : pos + self.cfg.ngram]),
        }
        return "contaminated", hit

    def observe(self, res: Result) -> None:
        if res.drop == "contaminated":
            name = res.payload["benchmark"]
            self.per_bench[name] = self.per_bench.get(name, 0) + 1
            if len(self.flagged) < self.cfg.max_report:
                self.flagged.append(res.payload)

    def report(self) -> dict:
        cfg = self.cfg
        return {
            "config": {
                "benchmarks": list(cfg.benchmarks),
                "ngram": cfg.ngram,
                "fields": list(cfg.fields) if cfg.fields else None,
            },
            **self.index.stats,
            "flagged_per_benchmark": self.per_bench,
            "flagged": self.flagged,
        }


def decontaminate(
    inputs, output: str, cfg: DecontamConfig, workers=1, report_path=None, progress=True
) -> dict:
    """Drop documents that share an `cfg.ngram`-word n-gram with any benchmark passage."""
    return DecontamFilter(cfg).run(inputs, output, workers, report_path, progress)
