"""Data pipeline throughput per stage (1 and 2 workers), tokenization vs a plain encode loop,
and dedup / decontam accuracy on generated corpora with planted duplicates and passages.

    launch/prepare_demo_data.sh                       # once: .demo/raw/shakespeare.jsonl + tokenizer
    .venv/bin/python benchmarks/data_pipeline.py      # table + runs/bench/data_pipeline.json/.png
    .venv/bin/python benchmarks/data_pipeline.py --input my.jsonl --tokenizer tok/ --workers 1 4

Each stage runs on the same input (the demo corpus by default, before any filtering), so the
docs/s and MB/s columns compare stages and worker counts directly. The tokenization baseline is
`[tok.encode(t) for t in texts]` in one process over texts already in memory (no JSON, no
writing), measured in the same run; the ratio is tokenize-stage tokens/s over baseline tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.data.binarize import tokenize  # noqa: E402
from megatiny.data.decontam import DecontamConfig, decontaminate  # noqa: E402
from megatiny.data.dedup import DedupConfig, dedup  # noqa: E402
from megatiny.data.lang_filter import LangFilterConfig, filter_lang  # noqa: E402
from megatiny.data.quality import QualityConfig, filter_quality  # noqa: E402
from megatiny.data.synthetic import contaminated_corpus, dedup_corpus  # noqa: E402
from megatiny.data.tokenizer import load_tokenizer  # noqa: E402


def _write(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def stage_throughput(src: str, tok_path: str, workers_list, tmp: str) -> list[dict]:
    rows = []
    stages = {
        "filter-lang": lambda o, w: filter_lang(src, o, LangFilterConfig(), w, progress=False),
        "quality": lambda o, w: filter_quality(src, o, QualityConfig(), w, progress=False),
        "dedup": lambda o, w: dedup(src, o, DedupConfig(), w, progress=False),
        "tokenize": lambda o, w: tokenize(src, o, tok_path, w, progress=False),
    }
    for name, fn in stages.items():
        for w in workers_list:
            out = os.path.join(tmp, f"{name}-{w}")
            rep = fn(out + (".jsonl" if name != "tokenize" else ""), w)
            rows.append(
                {
                    "stage": name,
                    "workers": w,
                    "docs": rep["docs_in"],
                    "MB": rep["bytes_in"] / 1e6,
                    "seconds": rep["seconds"],
                    "docs_per_s": rep["docs_in"] / rep["seconds"],
                    "mb_per_s": rep["bytes_in"] / 1e6 / rep["seconds"],
                    "tokens_per_s": rep.get("tokens_per_s"),
                }
            )
            print(f"  {name:12s} workers={w}: {rows[-1]['docs_per_s']:9.1f} docs/s "
                  f"{rows[-1]['mb_per_s']:7.2f} MB/s", flush=True)  # fmt: skip
    return rows


def encode_baseline(src: str, tok_path: str) -> dict:
    with open(src, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = load_tokenizer(tok_path)
    tok.encode(texts[0])
    t0 = time.perf_counter()
    n = sum(len(tok.encode(t)) for t in texts)
    secs = time.perf_counter() - t0
    return {"tokens": n, "seconds": secs, "tokens_per_s": n / secs}


def accuracy(tmp: str) -> dict:
    c = dedup_corpus(n_docs=2000, seed=7)
    src = os.path.join(tmp, "planted_dups.jsonl")
    _write(src, c.records)
    rep = dedup(src, os.path.join(tmp, "planted_dedup.jsonl"), DedupConfig(), 2, progress=False)
    with open(os.path.join(tmp, "planted_dedup.jsonl")) as f:
        kept = {json.loads(line)["id"] for line in f}
    planted = c.exact_dups | c.near_dups
    dropped = {r["id"] for r in c.records} - kept
    tp = len(dropped & planted)
    near_found = len(dropped & c.near_dups)
    out = {
        "dedup_docs": len(c.records),
        "dedup_planted": len(planted),
        "dedup_recall": tp / len(planted),
        "dedup_precision": tp / max(1, len(dropped)),
        "dedup_near_recall": near_found / len(c.near_dups),
        "dedup_docs_per_s": rep["docs_per_s"],
    }
    docs, bench, planted_c = contaminated_corpus(n_docs=3000, n_benchmark=100, n_planted=60, seed=7)
    _write(os.path.join(tmp, "dc.jsonl"), docs)
    _write(os.path.join(tmp, "bench.jsonl"), bench)
    rep = decontaminate(os.path.join(tmp, "dc.jsonl"), os.path.join(tmp, "dc_out.jsonl"),
                        DecontamConfig(benchmarks=(os.path.join(tmp, "bench.jsonl"),)), 2,
                        progress=False)  # fmt: skip
    flagged = {f["doc"] for f in rep["flagged"]}
    out.update(
        decontam_planted=len(planted_c),
        decontam_found=len(flagged & planted_c),
        decontam_false_flag_rate=len(flagged - planted_c) / (len(docs) - len(planted_c)),
        decontam_docs_per_s=rep["docs_per_s"],
    )
    return out


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    workers = sorted({r["workers"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(workers)
    for j, w in enumerate(workers):
        vals = [next(r["mb_per_s"] for r in rows if r["stage"] == s and r["workers"] == w)
                for s in stages]  # fmt: skip
        ax.bar([i + j * width for i in range(len(stages))], vals, width, label=f"{w} worker(s)")
    ax.set_xticks([i + width * (len(workers) - 1) / 2 for i in range(len(stages))], stages)
    ax.set_ylabel("MB/s")
    ax.set_title("megatiny data pipeline throughput per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=".demo/raw/shakespeare.jsonl")
    ap.add_argument("--tokenizer", default=".demo/tokenizer")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="runs/bench/data_pipeline.json", help="JSON (+ .png)")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.input) or not os.path.exists(args.tokenizer):
        print(f"{args.input} or {args.tokenizer} missing: run launch/prepare_demo_data.sh first")
        return 1
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(f"input {args.input} ({os.path.getsize(args.input) / 1e6:.1f} MB), {cores} cores, "
          f"load average {load:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rows = stage_throughput(args.input, args.tokenizer, args.workers, tmp)
        base = encode_baseline(args.input, args.tokenizer)
        acc = {} if args.no_accuracy else accuracy(tmp)
    print(f"\n{'stage':12s} {'workers':>7s} {'docs':>6s} {'MB':>6s} {'sec':>7s} {'docs/s':>9s} "
          f"{'MB/s':>7s}")  # fmt: skip
    for r in rows:
        print(f"{r['stage']:12s} {r['workers']:7d} {r['docs']:6d} {r['MB']:6.2f} "
              f"{r['seconds']:7.2f} {r['docs_per_s']:9.1f} {r['mb_per_s']:7.2f}")  # fmt: skip
    print(f"\nplain tok.encode loop (1 process): {base['tokens_per_s']:,.0f} tokens/s")
    ratios = {}
    for r in rows:
        if r["stage"] == "tokenize":
            ratios[r["workers"]] = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"tokenize stage, {r['workers']} worker(s): {r['tokens_per_s']:,.0f} tokens/s "
                  f"= {ratios[r['workers']]:.2f}x the plain loop (incl. JSON parse + .bin write)")  # fmt: skip
    if acc:
        print(f"\ndedup on {acc['dedup_docs']} generated docs with {acc['dedup_planted']} planted "
              f"duplicates: recall {acc['dedup_recall']:.3f} (near {acc['dedup_near_recall']:.3f})"
              f", precision {acc['dedup_precision']:.3f}")  # fmt: skip
        print(f"decontam: {acc['decontam_found']}/{acc['decontam_planted']} planted passages "
              f"found, false-flag rate {acc['decontam_false_flag_rate']:.4f}")  # fmt: skip
    result = {"cores": cores, "load_average": load, "rows": rows, "encode_baseline": base,
              "tokenize_ratio": ratios, "accuracy": acc}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    png = plot(rows, os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
