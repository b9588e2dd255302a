"""`megatiny data ...`: the corpus pipeline's command line (one subcommand per stage)."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = {
    "pipeline": "megatiny data pipeline --input raw/*.jsonl.gz --output-prefix data/corpus "
    "--config data.yaml --train-tokenizer data/tokenizer",
    "filter-lang": "megatiny data filter-lang --input docs.jsonl --output en.jsonl --keep en",
    "quality": "megatiny data quality --input en.jsonl --output good.jsonl --set min_words=20",
    "dedup": "megatiny data dedup --input good.jsonl --output dedup.jsonl --threshold 0.8",
    "decontam": "megatiny data decontam --input dedup.jsonl --output clean.jsonl "
    "--benchmark HumanEval.jsonl.gz",
    "train-tokenizer": "megatiny data train-tokenizer --input clean.jsonl --vocab-size 4096 "
    "--output tok/",
    "tokenize": "megatiny data tokenize --input clean.jsonl --tokenizer tok/ --output-prefix data/corpus",
}


def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, directories or globs: .jsonl/.json/.txt, optionally .gz/.zst",
    )
    if output:
        p.add_argument("--output", required=True, help="output JSONL (.gz/.zst to compress)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: cores, max 8)")
    p.add_argument("--report", default=None, help="report path (default: OUTPUT.<stage>.json)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _sub(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="STAGE")

    p = _sub(
        sub,
        "pipeline",
        "run all stages: filter-lang, quality, dedup, decontam, tokenizer, "
        "tokenize (writes OUT.bin/.idx and OUT.<stage>.json reports)",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH")
    p.add_argument("--output-prefix", required=True, help="OUT: writes OUT.bin, OUT.idx, reports")
    p.add_argument("--config", default=None, help="data.yaml (see docs/data.md)")
    p.add_argument("--text-key", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--keep", default=None, help="languages to keep, e.g. en,de ('all': any)")
    p.add_argument("--benchmark", nargs="*", default=None, help="benchmark files to decontaminate")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer instead of training one")
    p.add_argument(
        "--train-tokenizer",
        default=None,
        metavar="DIR",
        help="where to save the trained tokenizer (default OUT.tokenizer/)",
    )
    p.add_argument("--vocab-size", type=int, default=None)
    for stage in ("lang-filter", "quality", "dedup"):
        p.add_argument(f"--no-{stage}", action="store_true", help=f"skip the {stage} stage")
    p.add_argument("--clean", action="store_true", help="delete intermediate OUT.<stage>.jsonl")
    p.add_argument("--no-progress", action="store_true")

    p = _sub(
        sub, "filter-lang", "keep documents in the given languages (adds `lang`, `lang_score`)"
    )
    _common(p)
    p.add_argument("--keep", default="en", help="comma-separated ISO 639-1 codes, or 'all'")
    p.add_argument("--min-score", type=float, default=0.5)
    p.add_argument("--backend", default="cld3", choices=["cld3", "langid", "lingua-fast", "lingua"])
    p.add_argument("--max-chars", type=int, default=2000, help="characters looked at per document")

    p = _sub(sub, "quality", "Gopher-style quality heuristics")
    _common(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a rule threshold (VALUE 'none' disables it), e.g. min_words=20",
    )

    p = _sub(sub, "dedup", "remove exact and near duplicates (MinHash LSH), keep the first")
    _common(p)
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold (default 0.8)")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--ngram", type=int, default=3, help="words per shingle (default 3)")
    p.add_argument("--no-exact", action="store_true")
    p.add_argument("--no-near", action="store_true")

    p = _sub(sub, "decontam", "remove documents sharing an n-gram with a benchmark")
    _common(p)
    p.add_argument("--benchmark", nargs="+", required=True, help="JSONL / JSON / text files")
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--fields", default=None, help="comma-separated JSON keys to use (default all)")

    p = _sub(sub, "train-tokenizer", "train a byte-level BPE (saves DIR/tokenizer.json)")
    _common(p, output=False)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--min-frequency", type=int, default=2)

    p = _sub(sub, "tokenize", "encode documents + EOD into Megatron OUT.bin / OUT.idx")
    _common(p, output=False)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--no-eod", action="store_true", help="do not append <|endoftext|>")
    p.add_argument("--dtype", default=None, choices=["uint16", "int32"], help="default: by vocab")
    p.add_argument(
        "--keep-empty",
        action="store_true",
        help="keep empty documents as zero-length documents (Megatron's preprocess_data)",
    )
    p.add_argument("--eod-in-text", action="store_true",
                   help="a literal <|endoftext|> in the text is the EOD id, not text")  # fmt: skip


def _parse_value(v: str):
    if v.lower() in ("none", "null", "off"):
        return None
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return float(v)


def _print_report(rep: dict) -> None:
    stage = rep.get("stage", "pipeline")
    parts = [f"{stage}: {rep.get('docs_in', '?')} docs in", f"{rep.get('docs_kept', '?')} kept"]
    if rep.get("dropped_by_reason"):
        parts.append(
            "dropped " + ", ".join(f"{k}={v}" for k, v in rep["dropped_by_reason"].items())
        )
    if "tokens" in rep:
        parts.append(f"{rep['tokens']} tokens")
    parts.append(f"{rep.get('seconds', 0):.1f}s")
    print("; ".join(parts))


def _run(args) -> dict:
    from megatiny.data.stage import default_workers

    cmd = args.data_command
    workers = getattr(args, "workers", None) or default_workers()
    progress = not args.no_progress
    if cmd == "pipeline":
        from megatiny.data.pipeline import load_config, run_pipeline

        cfg = load_config(args.config)
        if args.text_key:
            cfg["text_key"] = args.text_key
        if args.workers:
            cfg["workers"] = args.workers
        if args.keep:
            cfg["filter_lang"]["keep"] = None if args.keep == "all" else args.keep.split(",")
        if args.benchmark is not None:
            cfg["decontam"]["benchmarks"] = args.benchmark
        if args.tokenizer:
            cfg["tokenizer"]["path"] = args.tokenizer
        if args.train_tokenizer:
            cfg["tokenizer"]["output"] = args.train_tokenizer
        if args.vocab_size:
            cfg["tokenizer"]["vocab_size"] = args.vocab_size
        cfg["filter_lang"]["enabled"] &= not args.no_lang_filter
        cfg["quality"]["enabled"] = cfg["quality"].get("enabled", True) and not args.no_quality
        cfg["dedup"]["enabled"] &= not args.no_dedup
        if args.clean:
            cfg["keep_intermediate"] = False
        summary = run_pipeline(args.input, args.output_prefix, cfg, progress=progress)
        for rep in summary["stages"].values():
            rep.setdefault("stage", "")
        for name, rep in summary["stages"].items():
            _print_report({**rep, "stage": name})
        print(
            f"wrote {args.output_prefix}.bin/.idx ({summary['tokens']} tokens), tokenizer "
            f"{summary['tokenizer']}, summary {args.output_prefix}.pipeline.json"
        )
        return summary
    if cmd == "filter-lang":
        from megatiny.data.lang_filter import LangFilterConfig, filter_lang

        keep = None if args.keep == "all" else tuple(k.strip() for k in args.keep.split(","))
        cfg = LangFilterConfig(keep, args.min_score, args.backend, args.max_chars, args.text_key)
        return filter_lang(args.input, args.output, cfg, workers, args.report, progress)
    if cmd == "quality":
        from megatiny.data.quality import QualityConfig, filter_quality

        over = {}
        for kv in args.set:
            if "=" not in kv:
                raise ValueError(f"--set expects KEY=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            over[k.strip()] = _parse_value(v.strip())
        cfg = QualityConfig.from_dict({**over, "text_key": args.text_key})
        return filter_quality(args.input, args.output, cfg, workers, args.report, progress)
    if cmd == "dedup":
        from megatiny.data.dedup import DedupConfig, dedup

        cfg = DedupConfig(
            exact=not args.no_exact,
            near=not args.no_near,
            threshold=args.threshold,
            num_perm=args.num_perm,
            ngram=args.ngram,
            text_key=args.text_key,
        )
        return dedup(args.input, args.output, cfg, workers, args.report, progress)
    if cmd == "decontam":
        from megatiny.data.decontam import DecontamConfig, decontaminate

        fields = tuple(args.fields.split(",")) if args.fields else None
        cfg = DecontamConfig(tuple(args.benchmark), args.ngram, fields, args.text_key)
        rep = decontaminate(args.input, args.output, cfg, workers, args.report, progress)
        for f in rep["flagged"][:20]:
            print(f'flagged {f["doc"]}: {f["benchmark"]} item {f["item"]}: "{f["ngram"]}"')
        return rep
    if cmd == "train-tokenizer":
        from megatiny.data.binarize import train_tokenizer_stage

        rep = train_tokenizer_stage(
            args.input,
            args.output,
            args.vocab_size,
            args.min_frequency,
            args.text_key,
            args.report,
            progress,
        )
        print(f"saved {rep['output']} (vocab {rep['vocab_size']}, eod id {rep['eod_id']})")
        return rep
    if cmd == "tokenize":
        from megatiny.data.binarize import tokenize

        return tokenize(
            args.input,
            args.output_prefix,
            args.tokenizer,
            workers,
            args.text_key,
            append_eod=not args.no_eod,
            dtype=args.dtype,
            report_path=args.report,
            progress=progress,
            keep_empty=args.keep_empty,
            eod_in_text=args.eod_in_text,
        )
    raise ValueError(f"unknown data stage {cmd!r}")


def main(args) -> int:
    if not getattr(args, "data_command", None):
        print(
            "usage: megatiny data {pipeline,filter-lang,quality,dedup,decontam,train-tokenizer,"
            "tokenize} ... (see megatiny data STAGE --help)",
            file=sys.stderr,
        )
        return 2
    try:
        rep = _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"megatiny data {args.data_command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output: read-only directory, a parent that is a file, ...
        print(f"megatiny data {args.data_command}: error: {_os_error(e)}", file=sys.stderr)
        return 1
    if args.data_command != "pipeline":
        _print_report(rep)
    for warning in _empty_output_warnings(args.data_command, rep):
        print(f"megatiny data {args.data_command}: warning: {warning}", file=sys.stderr)
    return 0


def _os_error(e: OSError) -> str:
    """'cannot write /data/out.jsonl: Permission denied (check that ...)' in one line."""
    path = e.filename or "?"
    reason = e.strerror or str(e)
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        reason += " (a parent of the output path is a file, not a directory)"
    elif isinstance(e, PermissionError):
        reason += " (choose a writable output location)"
    return f"{path}: {reason}"


def _empty_output_warnings(command: str, rep: dict) -> list[str]:
    """An empty corpus passes every stage; say so instead of writing a 0-token dataset quietly."""
    out = list(rep.get("warnings", []))
    if command == "tokenize" and rep.get("tokens") == 0:
        out.append("0 tokens written: the input holds no documents; training on it will fail")
    elif command not in ("pipeline", "tokenize") and rep.get("docs_kept") == 0:
        out.append(f"no document kept ({rep.get('docs_in', 0)} in): the output is empty")
    return out
