"""Language identification and the `filter-lang` stage.

Backends (all offline, measured in docs/data.md and `benchmarks/lang_id.py`):
    langid       langid.py (naive Bayes over byte n-grams, 97 languages)
    lingua-fast  lingua-language-detector, low-accuracy mode (trigram models, ~80 MB)
    lingua       lingua high-accuracy mode (1- to 5-gram models, ~1.2 GB, best on short text)
    cld3         Google's Compact Language Detector v3 (small neural net, cld3-py wheel): default

`identify(text) -> (iso639-1 code, score in [0, 1])`; "und" when nothing is detected. Only the
first `max_chars` characters are looked at: the language of a document is settled long before
its end, and this bounds the cost of huge documents. Kept documents gain `lang` and `lang_score`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from megatiny.data.stage import DocumentFilter, Result

BACKENDS = ("langid", "cld3", "lingua-fast", "lingua")
DEFAULT_BACKEND = "cld3"
# CLD3 still uses a few withdrawn ISO 639-1 codes.
_CLD3_LEGACY = {"iw": "he", "jw": "jv", "in": "id", "ji": "yi"}


@functools.cache
def _load_model(backend: str):
    """The backend's model, loaded once per process (langid unpickles ~1 s; lingua builds)."""
    if backend == "langid":
        from langid.langid import LanguageIdentifier as LangId
        from langid.langid import model

        return LangId.from_modelstring(model, norm_probs=True)
    if backend == "cld3":
        import gcld3

        return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=8192)
    from lingua import LanguageDetectorBuilder

    b = LanguageDetectorBuilder.from_all_languages()
    if backend == "lingua-fast":
        b = b.with_low_accuracy_mode()
    return b.build()


class LanguageIdentifier:
    def __init__(self, backend: str = DEFAULT_BACKEND, max_chars: int = 2000):
        if backend not in BACKENDS:
            raise ValueError(f"unknown language-id backend {backend!r}; choose from {BACKENDS}")
        self.backend = backend
        self.max_chars = max_chars
        if backend == "langid":
            self._langid = _load_model(backend)
            self._langid.nb_classprobs = self._sparse_classprobs
        elif backend == "cld3":
            self._cld3 = _load_model(backend)
        else:
            self._lingua = _load_model(backend)

    def _sparse_classprobs(self, fv):
        """langid's log P(doc | lang) over the document's few non-zero features only.

        langid computes `fv @ nb_ptc` as a dense (7480 x 97) BLAS product; with a multi-threaded
        BLAS on a busy machine that call is ~30x slower than this numpy sum over the non-zeros.
        """
        nz = np.flatnonzero(fv)
        return (fv[nz, None] * self._langid.nb_ptc[nz]).sum(axis=0) + self._langid.nb_pc

    def identify(self, text: str) -> tuple[str, float]:
        text = " ".join(text[: self.max_chars].split())
        if not text:
            return "und", 0.0
        if self.backend == "langid":
            lang, score = self._langid.classify(text)
            return lang, float(score)
        if self.backend == "cld3":
            r = self._cld3.FindLanguage(text=text)
            lang = _CLD3_LEGACY.get(r.language, r.language.split("-")[0])
            return (lang, float(r.probability)) if lang != "und" else ("und", 0.0)
        values = self._lingua.compute_language_confidence_values(text)
        if not values or values[0].value <= 0.0:
            return "und", 0.0
        top = values[0]
        return top.language.iso_code_639_1.name.lower(), float(top.value)


@dataclass
class LangFilterConfig:
    keep: tuple[str, ...] | None = ("en",)  # None: keep every language, only annotate
    min_score: float = 0.5
    backend: str = DEFAULT_BACKEND
    max_chars: int = 2000
    text_key: str = "text"


class LangFilter(DocumentFilter):
    """The `filter-lang` stage; kept documents gain `lang` and `lang_score`."""

    name = "filter-lang"
    rewrites = True

    def __init__(self, cfg: LangFilterConfig):
        self.cfg = cfg
        self.text_key = cfg.text_key
        # the models load once, here in the parent; forked workers share them copy-on-write
        self.lid = LanguageIdentifier(cfg.backend, cfg.max_chars)
        self.kept_langs: dict[str, int] = {}

    def judge(self, rec: dict, text: str, where: str) -> tuple[str | None, str | None]:
        lang, score = self.lid.identify(text)
        if self.cfg.keep is not None and lang not in self.cfg.keep:
            return f"lang_{lang}", None
        if score < self.cfg.min_score:
            return "lang_low_score", None
        rec["lang"] = lang
        rec["lang_score"] = round(score, 4)
        return None, lang

    def decide(self, res: Result) -> None:
        self.kept_langs[res.payload] = self.kept_langs.get(res.payload, 0) + 1

    def report(self) -> dict:
        cfg = self.cfg
        return {
            "config": {
                "keep": list(cfg.keep) if cfg.keep else None,
                "min_score": cfg.min_score,
                "backend": cfg.backend,
                "max_chars": cfg.max_chars,
            },
            "kept_by_lang": self.kept_langs,
        }


def filter_lang(
    inputs,
    output: str,
    cfg: LangFilterConfig | None = None,
    workers=1,
    report_path=None,
    progress=True,
) -> dict:
    """Keep documents whose identified language is in `cfg.keep` with score >= `cfg.min_score`."""
    return LangFilter(cfg or LangFilterConfig()).run(inputs, output, workers, report_path, progress)
