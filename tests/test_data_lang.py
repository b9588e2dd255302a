"""Language identification accuracy on labelled UDHR paragraphs (10 languages, >= 50 chars)."""

import json
import os

import pytest

from megatiny.data.lang_filter import LangFilterConfig, LanguageIdentifier, filter_lang

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "udhr_sample.jsonl")


def _sample():
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _accuracy(backend):
    lid = LanguageIdentifier(backend)
    recs = _sample()
    return sum(lid.identify(r["text"])[0] == r["lang"] for r in recs) / len(recs)


@pytest.mark.parametrize("backend", ["langid", "cld3", "lingua-fast"])
def test_accuracy_at_least_98_percent(backend):
    recs = _sample()
    assert len({r["lang"] for r in recs}) >= 5 and min(len(r["text"]) for r in recs) >= 50
    assert _accuracy(backend) >= 0.98


@pytest.mark.slow
def test_accuracy_lingua_high():
    assert _accuracy("lingua") >= 0.98


def test_filter_keeps_languages_and_annotates(tmp_path):
    src = tmp_path / "mixed.jsonl"
    recs = _sample()
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    out = tmp_path / "en_de.jsonl"
    rep = filter_lang(str(src), str(out), LangFilterConfig(keep=("en", "de")), progress=False)
    kept = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert {r["lang"] for r in kept} <= {"en", "de"}
    assert len(kept) >= 19 and rep["docs_kept"] == len(kept)
    assert all(0.5 <= r["lang_score"] <= 1.0 for r in kept)
    assert rep["kept_by_lang"]["en"] >= 9
    assert sum(v for k, v in rep["dropped_by_reason"].items() if k.startswith("lang_")) >= 78
    # keep=None annotates everything and drops nothing but low scores
    rep = filter_lang(str(src), str(tmp_path / "all.jsonl"), LangFilterConfig(keep=None, min_score=0.0),
                      progress=False)  # fmt: skip
    assert rep["docs_kept"] == 100


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown language-id backend"):
        LanguageIdentifier("cld9")
