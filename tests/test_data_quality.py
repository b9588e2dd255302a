"""Gopher-style quality rules: each one fires on its own defect, and each can be switched off."""

import pytest

from megatiny.data.quality import QualityConfig, check_quality

GOOD = (
    "The committee met on Tuesday to discuss the budget for the coming year. Members agreed that "
    "the library needs new shelves and that the park should have better lighting. After a long "
    "debate, the chair asked everyone to vote, and the proposal passed with a clear majority of "
    "the votes cast by those present at the meeting that evening in the town hall."
)


def test_good_text_passes():
    assert check_quality(GOOD, QualityConfig()) is None


@pytest.mark.parametrize(
    "text,reason,knob",
    [
        ("the cat and the dog", "too_few_words", "min_words"),
        ((GOOD + " ") * 4, "too_many_words", "max_words"),
        ("a b c d e f g h of the and to " * 10, "mean_word_length", "min_mean_word_len"),
        (GOOD + " #tag" * 20, "symbol_ratio", "max_symbol_word_ratio"),
        ("\n".join(f"- the item number {i} with the list" for i in range(20)), "bullet_lines",
         "max_bullet_lines_ratio"),
        ("\n".join("and then the story went on and on and on for a long time until the very end..." for _ in range(20)), "ellipsis_lines",
         "max_ellipsis_lines_ratio"),
        (GOOD + " 123 456 789 012 345 678 901 234 567 890" * 4, "alpha_words",
         "min_alpha_words_ratio"),
        (GOOD.replace(" ", "~~~ "), "non_alpha_chars", "max_non_alpha_char_ratio"),
        ("\n".join([GOOD] + ["Subscribe to the newsletter!"] * 10), "dup_lines", "max_dup_line_ratio"),
        ("\n".join(["a first line", "the second one", "and a third", GOOD[:200], GOOD[:200]]), "dup_line_chars", "max_dup_line_char_ratio"),
        (" ".join(["lorem ipsum dolor sit amet consectetur"] * 10), "stop_words", "min_stop_words"),
    ],
)  # fmt: skip
def test_each_rule_fires_and_can_be_disabled(text, reason, knob):
    cfg = QualityConfig(max_words=200) if reason == "too_many_words" else QualityConfig()
    assert check_quality(text, cfg) == reason
    off = QualityConfig(**{**cfg.__dict__, knob: None})
    assert check_quality(text, off) != reason
    assert check_quality(text, QualityConfig(enabled=False)) is None


def test_stop_words_only_for_english():
    german = " ".join(["die katze sitzt auf der matte und schaut den hund an"] * 6)
    assert check_quality(german, QualityConfig()) == "stop_words"
    assert check_quality(german, QualityConfig(), lang="de") is None


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown quality options"):
        QualityConfig.from_dict({"min_wordz": 3})
