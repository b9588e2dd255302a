"""Gopher-style quality heuristics (Rae et al. 2021, "Scaling Language Models", appendix A.1.1).

A document is dropped by the first rule it fails; each rule is off when its threshold is None.
With W = whitespace-separated words and L = non-empty lines:

    too_few_words / too_many_words   |W| outside [min_words, max_words]
    mean_word_length                 mean len(w) outside [min_mean_word_len, max_mean_word_len]
    symbol_ratio                     (#"#" + #"..." + #"…") / |W|  > max_symbol_word_ratio
    bullet_lines                     lines starting with a bullet / |L| > max_bullet_lines_ratio
    ellipsis_lines                   lines ending in an ellipsis / |L|  > max_ellipsis_lines_ratio
    alpha_words                      words with an alphabetic character / |W| < min_alpha_words_ratio
    non_alpha_chars                  non-alphabetic non-space chars / non-space chars
                                                                         > max_non_alpha_char_ratio
    dup_lines                        lines equal to an earlier line / |L| > max_dup_line_ratio
    dup_line_chars                   chars in such lines / chars in L   > max_dup_line_char_ratio
    stop_words                       distinct English stop words present < min_stop_words
                                     (applied only to documents with lang "en" or no lang field)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from megatiny.data.stage import DocumentFilter

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_PUNCT = ".,;:!?\"'()[]{}«»“”‘’"
BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "·")


@dataclass
class QualityConfig:
    enabled: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    max_non_alpha_char_ratio: float | None = 0.3
    max_dup_line_ratio: float | None = 0.3
    max_dup_line_char_ratio: float | None = 0.2
    min_stop_words: int | None = 2
    text_key: str = "text"

    @classmethod
    def from_dict(cls, d: dict | None) -> QualityConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown quality options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _gt(x, limit) -> bool:
    return limit is not None and x > limit


def _lt(x, limit) -> bool:
    return limit is not None and x < limit


def check_quality(text: str, cfg: QualityConfig, lang: str | None = None) -> str | None:
    """The first failed rule's name, or None when the document passes."""
    if not cfg.enabled:
        return None
    words = text.split()
    nw = len(words)
    if _lt(nw, cfg.min_words) or nw == 0:
        return "too_few_words"
    if _gt(nw, cfg.max_words):
        return "too_many_words"
    mean_len = sum(map(len, words)) / nw
    if _lt(mean_len, cfg.min_mean_word_len) or _gt(mean_len, cfg.max_mean_word_len):
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if _gt(symbols / nw, cfg.max_symbol_word_ratio):
        return "symbol_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    nl = max(1, len(lines))
    if _gt(sum(ln.startswith(BULLETS) for ln in lines) / nl, cfg.max_bullet_lines_ratio):
        return "bullet_lines"
    if _gt(sum(ln.endswith(("...", "…")) for ln in lines) / nl, cfg.max_ellipsis_lines_ratio):
        return "ellipsis_lines"
    if cfg.min_alpha_words_ratio is not None:
        # str.isalpha() is the fast path: most words are letters only
        no_alpha = sum(1 for w in words if not w.isalpha() and not any(map(str.isalpha, w)))
        if _lt((nw - no_alpha) / nw, cfg.min_alpha_words_ratio):
            return "alpha_words"
    if cfg.max_non_alpha_char_ratio is not None:
        chars = "".join(words)
        non_alpha = len(chars) - sum(map(str.isalpha, chars))
        if _gt(non_alpha / max(1, len(chars)), cfg.max_non_alpha_char_ratio):
            return "non_alpha_chars"
    if cfg.max_dup_line_ratio is not None or cfg.max_dup_line_char_ratio is not None:
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for ln in lines:
            if ln in seen:
                dup_lines += 1
                dup_chars += len(ln)
            else:
                seen.add(ln)
        if _gt(dup_lines / nl, cfg.max_dup_line_ratio):
            return "dup_lines"
        total_chars = max(1, sum(len(ln) for ln in lines))
        if _gt(dup_chars / total_chars, cfg.max_dup_line_char_ratio):
            return "dup_line_chars"
    if cfg.min_stop_words is not None and lang in (None, "en"):
        present = STOP_WORDS.intersection(w.lower().strip(_PUNCT) for w in words)
        if len(present) < cfg.min_stop_words:
            return "stop_words"
    return None


class QualityFilter(DocumentFilter):
    """The `quality` stage: drop a document by the first rule it fails (`check_quality`)."""

    name = "quality"

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self.text_key = cfg.text_key

    def judge(self, rec: dict, text: str, where: str) -> tuple[str | None, None]:
        lang = rec.get("lang") if isinstance(rec.get("lang"), str) else None
        reason = check_quality(text, self.cfg, lang)
        return (None if reason is None else f"quality_{reason}"), None

    def report(self) -> dict:
        return {"config": asdict(self.cfg)}


def filter_quality(
    inputs,
    output: str,
    cfg: QualityConfig | None = None,
    workers=1,
    report_path=None,
    progress=True,
) -> dict:
    """Drop documents that fail a quality rule (see module docstring)."""
    return QualityFilter(cfg or QualityConfig()).run(inputs, output, workers, report_path, progress)
