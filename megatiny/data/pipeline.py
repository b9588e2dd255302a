"""All stages chained: filter-lang -> quality -> dedup -> decontam -> train-tokenizer -> tokenize.

Each stage reads the previous stage's JSONL and writes `OUT.<stage>.jsonl` plus its report
`OUT.<stage>.json`; the last writes `OUT.bin` / `OUT.idx`; `OUT.pipeline.json` summarizes.
A stage can be switched off (`enabled: false`); decontam runs when benchmarks are given; the
tokenizer is trained unless `tokenizer.path` names an existing one.

Config (YAML, every key optional; the values shown are the defaults):

    text_key: text
    workers: 2                 # default: min(cores, 8)
    keep_intermediate: true    # false deletes OUT.<stage>.jsonl once the next stage is done
    filter_lang: {enabled: true, keep: [en], min_score: 0.5, backend: cld3, max_chars: 2000}
    quality: {enabled: true, min_words: 50, ...}           # see megatiny/data/quality.py
    dedup: {enabled: true, exact: true, near: true, threshold: 0.8, num_perm: 128, ngram: 3}
    decontam: {benchmarks: [], ngram: 13}
    tokenizer: {path: null, output: null, vocab_size: 4096, min_frequency: 2}
    tokenize: {append_eod: true, dtype: null}
"""

from __future__ import annotations

import copy
import os
import time

from megatiny.data.binarize import tokenize, train_tokenizer_stage
from megatiny.data.decontam import DecontamConfig, decontaminate
from megatiny.data.dedup import DedupConfig, dedup
from megatiny.data.io import write_json_atomic
from megatiny.data.lang_filter import LangFilterConfig, filter_lang
from megatiny.data.quality import QualityConfig, filter_quality
from megatiny.data.stage import default_workers

DEFAULTS: dict = {
    "text_key": "text",
    "workers": None,
    "keep_intermediate": True,
    "filter_lang": {
        "enabled": True,
        "keep": ["en"],
        "min_score": 0.5,
        "backend": "cld3",
        "max_chars": 2000,
    },
    "quality": {"enabled": True},
    "dedup": {
        "enabled": True,
        "exact": True,
        "near": True,
        "threshold": 0.8,
        "num_perm": 128,
        "ngram": 3,
    },
    "decontam": {"benchmarks": [], "ngram": 13, "fields": None},
    "tokenizer": {"path": None, "output": None, "vocab_size": 4096, "min_frequency": 2},
    "tokenize": {"append_eod": True, "dtype": None},
}


def merge_config(base: dict, override: dict | None, where: str = "config") -> dict:
    """Deep-merge `override` into a copy of `base`; unknown top-level sections are errors."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if k not in out and where == "config":
            raise ValueError(f"unknown {where} key {k!r}; known: {sorted(out)}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_config(path: str | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULTS)
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a data config is a YAML mapping (see `megatiny data --help`)")
    # A training config may carry the pipeline under a `data_pipeline:` section.
    raw = raw.get("data_pipeline", raw)
    return merge_config(DEFAULTS, raw)


def _lang_cfg(d: dict, text_key: str) -> LangFilterConfig:
    keep = d.get("keep")
    if isinstance(keep, str):
        keep = [k.strip() for k in keep.split(",") if k.strip()]
    return LangFilterConfig(
        keep=tuple(keep) if keep else None,
        min_score=float(d.get("min_score", 0.5)),
        backend=d.get("backend", "cld3"),
        max_chars=int(d.get("max_chars", 2000)),
        text_key=text_key,
    )


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "enabled"}


def run_pipeline(inputs, output_prefix: str, cfg: dict | None = None, progress=True) -> dict:
    """Run every enabled stage; returns the summary written to OUT.pipeline.json."""
    cfg = merge_config(DEFAULTS, cfg)
    tk = cfg["text_key"]
    workers = int(cfg["workers"] or default_workers())
    out = output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t0 = time.perf_counter()
    current = inputs
    summary: dict = {"output_prefix": out, "workers": workers, "stages": {}}
    produced: list[str] = []

    def step(name: str, fn, cfg_obj) -> None:
        nonlocal current
        dst = f"{out}.{name}.jsonl"
        rep = fn(
            current,
            dst,
            cfg_obj,
            workers=workers,
            report_path=f"{out}.{name}.json",
            progress=progress,
        )
        summary["stages"][name] = _brief(rep)
        if not cfg["keep_intermediate"]:
            for p in produced:
                os.remove(p)
            produced.clear()
        produced.append(dst)
        current = dst

    if cfg["filter_lang"].get("enabled", True):
        step("filter-lang", filter_lang, _lang_cfg(cfg["filter_lang"], tk))
    if cfg["quality"].get("enabled", True):
        step(
            "quality",
            filter_quality,
            QualityConfig.from_dict({**_strip(cfg["quality"]), "text_key": tk}),
        )
    if cfg["dedup"].get("enabled", True):
        d = _strip(cfg["dedup"])
        if "lsh_weights" in d:
            d["lsh_weights"] = tuple(d["lsh_weights"])
        step("dedup", dedup, DedupConfig(**d, text_key=tk))
    bench = cfg["decontam"].get("benchmarks") or []
    if bench and cfg["decontam"].get("enabled", True):
        fields = cfg["decontam"].get("fields")
        dc = DecontamConfig(
            benchmarks=tuple(bench),
            ngram=int(cfg["decontam"].get("ngram", 13)),
            fields=tuple(fields) if fields else None,
            text_key=tk,
        )
        step("decontam", decontaminate, dc)

    tcfg = cfg["tokenizer"]
    tok_path = tcfg.get("path")
    if not tok_path:
        tok_path = tcfg.get("output") or f"{out}.tokenizer"
        rep = train_tokenizer_stage(
            current,
            tok_path,
            vocab_size=int(tcfg.get("vocab_size", 4096)),
            min_frequency=int(tcfg.get("min_frequency", 2)),
            text_key=tk,
            report_path=f"{out}.train-tokenizer.json",
            progress=progress,
        )
        summary["stages"]["train-tokenizer"] = _brief(rep)
    rep = tokenize(
        current,
        out,
        tok_path,
        workers=workers,
        text_key=tk,
        append_eod=bool(cfg["tokenize"].get("append_eod", True)),
        dtype=cfg["tokenize"].get("dtype"),
        report_path=f"{out}.tokenize.json",
        progress=progress,
    )
    summary["stages"]["tokenize"] = _brief(rep)
    summary["tokens"] = rep.get("tokens")
    summary["warnings"] = _empty_warnings(summary["stages"], out)
    summary["tokenizer"] = tok_path
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["config"] = cfg
    write_json_atomic(f"{out}.pipeline.json", summary)
    return summary


def _empty_warnings(stages: dict, out: str) -> list[str]:
    """Name the stage that emptied the corpus when the dataset ends with 0 tokens."""
    if stages.get("tokenize", {}).get("tokens") != 0:
        return []
    emptied = next((n for n, r in stages.items() if r.get("docs_kept") == 0), "tokenize")
    docs_in = next(iter(stages.values()), {}).get("docs_in", 0)
    where = "the input holds no documents" if not docs_in else f"{emptied} kept no document"
    return [f"{out}.bin holds 0 tokens: {where}; training on it will fail"]


def _brief(rep: dict) -> dict:
    keys = (
        "docs_in",
        "docs_kept",
        "docs_dropped",
        "dropped_by_reason",
        "seconds",
        "docs_per_s",
        "mb_per_s",
        "tokens",
    )
    return {k: rep[k] for k in keys if k in rep}
