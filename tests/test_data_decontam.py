"""Decontamination: every planted benchmark passage is found; clean documents are kept."""

import gzip
import json

import pytest

from megatiny.data.decontam import DecontamConfig, NgramIndex, decontaminate
from megatiny.data.synthetic import contaminated_corpus


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_planted_passages_found_clean_kept(tmp_path):
    docs, bench, planted = contaminated_corpus(n_docs=800, n_benchmark=40, n_planted=30, seed=2)
    _write(tmp_path / "docs.jsonl", docs)
    with gzip.open(tmp_path / "bench.jsonl.gz", "wt", encoding="utf-8") as f:
        for b in bench:
            f.write(json.dumps(b) + "\n")
    rep = decontaminate(
        str(tmp_path / "docs.jsonl"),
        str(tmp_path / "clean.jsonl"),
        DecontamConfig(benchmarks=(str(tmp_path / "bench.jsonl.gz"),)),
        workers=2,
        progress=False,
    )
    flagged = {f["doc"] for f in rep["flagged"]}
    assert planted <= flagged  # every planted passage found
    false_flags = len(flagged - planted)
    assert false_flags <= 0.01 * (len(docs) - len(planted))
    assert rep["dropped_by_reason"] == {"contaminated": len(flagged)}
    assert rep["docs_kept"] == len(docs) - len(flagged)
    f0 = rep["flagged"][0]
    assert f0["benchmark"] == "bench.jsonl.gz" and f0["item"].startswith("B/")
    assert len(f0["ngram"].split()) == 13
    assert rep["flagged_per_benchmark"] == {"bench.jsonl.gz": len(flagged)}
    kept = {json.loads(line)["id"] for line in open(tmp_path / "clean.jsonl")}
    assert not kept & planted


def test_json_and_text_benchmarks_and_short_items(tmp_path):
    passage = "the quick brown fox jumps over the lazy dog while the cat watches from the wall"
    (tmp_path / "b.json").write_text(json.dumps({"algebra": [{"question": passage}],
                                                 "short": {"q": "too short to match"}}))  # fmt: skip
    (tmp_path / "b.txt").write_text("Once upon a time there was a very small village in a deep "
                                    "green valley far away.")  # fmt: skip
    docs = [
        {
            "id": "json-hit",
            "text": "Intro. The QUICK brown fox, jumps over the lazy dog while the "
            "cat watches from the wall! End.",
        },  # fmt: skip
        {
            "id": "txt-hit",
            "text": "once upon a time there was a very small village in a deep green valley",
        },  # fmt: skip
        {"id": "clean", "text": "the quick brown fox jumps over the lazy dog and runs away"},
    ]
    _write(tmp_path / "d.jsonl", docs)
    rep = decontaminate(
        str(tmp_path / "d.jsonl"),
        str(tmp_path / "o.jsonl"),
        DecontamConfig(benchmarks=(str(tmp_path / "b.json"), str(tmp_path / "b.txt"))),
        progress=False,
    )
    hits = {f["doc"]: (f["benchmark"], f["item"]) for f in rep["flagged"]}
    assert hits == {"json-hit": ("b.json", "algebra"), "txt-hit": ("b.txt", "text")}
    assert rep["benchmark_items_too_short"] == 1


def test_index_hash_lookup_is_exact_on_words():
    idx = NgramIndex.build([], 13)
    assert idx.first_match("a b c".split(), 13) is None


def test_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="at least one --benchmark"):
        decontaminate(str(tmp_path / "d.jsonl"), str(tmp_path / "o.jsonl"), DecontamConfig())
    with pytest.raises(FileNotFoundError, match="benchmark file .*missing.jsonl not found"):
        decontaminate(str(tmp_path / "d.jsonl"), str(tmp_path / "o.jsonl"),
                      DecontamConfig(benchmarks=(str(tmp_path / "missing.jsonl"),)))  # fmt: skip
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
        decontaminate(str(tmp_path / "d.jsonl"), str(tmp_path / "o.jsonl"),
                      DecontamConfig(benchmarks=(str(tmp_path / "bad.jsonl"),)))  # fmt: skip
