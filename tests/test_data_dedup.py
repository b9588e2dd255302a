"""Dedup on a generated corpus with planted exact and near duplicates: recall / precision."""

import json

import numpy as np
import pytest

from megatiny.data.dedup import DedupConfig, MinHasher, dedup, normalize, shingle_hashes
from megatiny.data.synthetic import dedup_corpus


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _kept_ids(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup")
    corpus = dedup_corpus(n_docs=600, seed=3)
    _write(d / "in.jsonl", corpus.records)
    return d, corpus


def _score(corpus, kept):
    planted = corpus.exact_dups | corpus.near_dups
    dropped = {r["id"] for r in corpus.records} - set(kept)
    tp = len(dropped & planted)
    return tp / len(planted), tp / max(1, len(dropped))


def test_recall_and_precision(planted):
    d, corpus = planted
    rep = dedup(str(d / "in.jsonl"), str(d / "out.jsonl"), DedupConfig(), progress=False)
    kept = _kept_ids(d / "out.jsonl")
    recall, precision = _score(corpus, kept)
    assert recall >= 0.95, recall
    assert precision >= 0.98, precision
    # exact duplicates (case / spacing changes) are all caught by the exact stage
    assert rep["dropped_by_reason"]["exact_duplicate"] == len(corpus.exact_dups)
    # keep-first: every original survives, every survivor comes in input order
    assert all(f"orig-{i}" in kept for i in range(600))
    order = [r["id"] for r in corpus.records]
    assert kept == [i for i in order if i in set(kept)]
    ex = rep["near_duplicate_examples"][0]
    assert ex["doc"].startswith("near-") and ex["duplicate_of"].startswith("orig-")
    assert ex["doc"].split("-of-")[1].split("-")[0] == ex["duplicate_of"].split("-")[1]
    assert ex["jaccard"] >= 0.8


def test_workers_do_not_change_the_result(planted):
    d, _ = planted
    dedup(str(d / "in.jsonl"), str(d / "w1.jsonl"), DedupConfig(), workers=1, progress=False)
    dedup(str(d / "in.jsonl"), str(d / "w2.jsonl"), DedupConfig(), workers=2, progress=False)
    assert (d / "w1.jsonl").read_bytes() == (d / "w2.jsonl").read_bytes()


def test_exact_only_and_near_only(planted):
    d, corpus = planted
    rep = dedup(str(d / "in.jsonl"), str(d / "e.jsonl"), DedupConfig(near=False), progress=False)
    assert rep["dropped_by_reason"] == {"exact_duplicate": len(corpus.exact_dups)}
    rep = dedup(str(d / "in.jsonl"), str(d / "n.jsonl"), DedupConfig(exact=False), progress=False)
    # without the exact stage the near stage still removes the exact copies (J = 1)
    assert rep["dropped_by_reason"]["near_duplicate"] >= len(corpus.exact_dups)


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 10_000, size=600)]
    a = shingle_hashes(words, 3)
    b_words = words[:450] + [f"x{i}" for i in range(150)]
    b = shingle_hashes(b_words, 3)
    true_j = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
    h = MinHasher(num_perm=512, seed=0)
    est = float(np.mean(h.signature(a) == h.signature(b)))
    assert abs(est - true_j) < 0.06, (est, true_j)


def test_normalize():
    assert normalize("Hello,   WORLD!\n\tÉté") == "hello world été"
    assert normalize("ﬁne") == "fine"  # NFKC folds the ligature


def test_bad_threshold(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="threshold=1.5"):
        dedup(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), DedupConfig(threshold=1.5))
