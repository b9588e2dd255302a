"""The SpamAssassin preparation (megatiny/finetune/spam.py) on fixture emails in the corpus's
layout (tests/data/spam/<folder>/*.txt): headers stripped but the decoded Subject kept, MIME parts
decoded, HTML reduced to visible text, attachments skipped; and the split: deduplicated,
balanced, per-class, seeded, disjoint. The evaluation report's metrics and PNG."""

import json
import os

import pytest
import torch

from megatiny.finetune.evaluate import plot_confusion, scores
from megatiny.finetune.spam import email_text, main, make_splits, read_corpus

DATA = os.path.join(os.path.dirname(__file__), "data", "spam")


def test_parser_strips_headers_and_decodes_parts():
    rows = {r["source"]: r for r in read_corpus(DATA)}
    plain = rows["easy-ham-1/00001.plain.txt"]
    assert plain["label"] == "ham"
    assert plain["text"].startswith("Re: new sequences window")  # the Subject, then the body
    assert "Return-Path" not in plain["text"] and "Postfix" not in plain["text"]
    assert plain["text"].endswith("I can't reproduce this error.")
    multi = rows["spam-1/00002.multipart.txt"]
    assert multi["label"] == "spam"
    # RFC 2047 subject and base64 utf-8 plain part decoded; the HTML twin and the attachment not used
    assert multi["text"] == "WIN a free cruise à Paris Click here to claim your prize €1000!"
    html = rows["spam-1/00003.html.txt"]["text"]
    # html only: visible text, quoted-printable decoded, unknown charset read as Latin-1
    assert html == ("Life Insurance - Why Pay More? Save up to 70% on life insurance & more. "
                    "Café prices!")  # fmt: skip
    assert "color" not in html and "hidden" not in html


def test_parser_cuts_and_can_drop_the_subject():
    raw = b"Subject: hello\nContent-Type: text/plain\n\n" + b"word " * 1000
    assert email_text(raw, max_chars=20) == "hello word word word"
    assert email_text(raw, max_chars=None, keep_subject=False).split()[0] == "word"
    assert email_text(b"Subject: only\n\n", max_chars=None) == "only"


def _rows(n_ham, n_spam, dup=0):
    rows = [{"text": f"ham {i}", "label": "ham", "source": f"h{i}"} for i in range(n_ham)]
    rows += [{"text": f"spam {i}", "label": "spam", "source": f"s{i}"} for i in range(n_spam)]
    rows += [{"text": "spam 0", "label": "spam", "source": f"dup{i}"} for i in range(dup)]
    return rows


def test_split_is_deduplicated_balanced_disjoint_and_seeded():
    splits, report = make_splits(_rows(300, 100, dup=5), seed=1)
    assert report["empty_or_duplicate_dropped"] == 5 and report["per_class"] == 100
    assert report["splits"] == {"train": 140, "valid": 20, "test": 40}
    for name, rows in splits.items():
        labels = [r["label"] for r in rows]
        assert labels.count("ham") == labels.count("spam"), name
    texts = [{r["text"] for r in rows} for rows in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert splits == make_splits(_rows(300, 100, dup=5), seed=1)[0]
    assert splits != make_splits(_rows(300, 100, dup=5), seed=2)[0]
    with pytest.raises(ValueError, match="both ham and spam"):
        make_splits(_rows(3, 0))


def test_command_writes_the_splits(tmp_path, capsys):
    assert main(["--input", DATA, "--output", str(tmp_path), "--fractions", "0,0,1"]) == 0
    report = json.load(open(tmp_path / "report.json"))
    assert report["read"] == 3 and report["per_class"] == 1
    test = [json.loads(line) for line in open(tmp_path / "test.jsonl")]
    assert sorted(r["label"] for r in test) == ["ham", "spam"]


def test_scores_and_confusion_png(tmp_path):
    confusion = torch.tensor([[8, 2], [1, 9]])  # rows: true ham, spam
    s = scores(confusion, ["ham", "spam"])
    assert s["accuracy"] == pytest.approx(17 / 20)
    assert s["per_class"]["spam"]["precision"] == pytest.approx(9 / 11)
    assert s["per_class"]["spam"]["recall"] == pytest.approx(9 / 10)
    f1_spam = 2 * (9 / 11) * (9 / 10) / (9 / 11 + 9 / 10)
    assert s["per_class"]["spam"]["f1"] == pytest.approx(f1_spam)
    from megatiny.finetune.tasks import macro_f1

    assert macro_f1(confusion.double()) == pytest.approx(s["macro_f1"])
    plot_confusion(confusion, ["ham", "spam"], str(tmp_path / "cm.png"), "test")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
