"""`megatiny parity`: the command line of megatiny.parity."""

from __future__ import annotations

import argparse
import os

import yaml

from megatiny.config import Config, ConfigError

FALLBACK_VOCAB = 1024

EXAMPLE = """\
Runs the same seed and synthetic batch at each layout (fp32, dropout 0) on fork-started CPU gloo
ranks -- no torchrun, no data files -- and prints, per layout, the first tensors in the
reference's (single-device) execution order (module forward outputs per micro-batch, then
parameter gradients, gathered to full shape from every stage) that differ from the first layout,
each with the last collective (or pipeline send / recv) issued before it. Exit code 1 if any
differ, 2 for a layout that cannot run.

Supported layouts: tp, dp, pp, virtual_pipeline_size and sequence_parallel (e.g.
"tp=2,sequence_parallel=true,dp=2", "pp=2,virtual_pipeline_size=2", "tp=2,pp=2"); the first
layout is the reference and must have tp=1 and pp=1. Every layout runs the same micro-batches
(default: the lcm of the layouts' pp; the reference by gradient accumulation). cp and zero1 are
not supported yet (an error says so).

example:
  megatiny parity --config launch/configs/tiny-cpu.yaml \\
      --layouts "tp=1" "tp=2" "tp=2,sequence_parallel=true" "tp=2,dp=2"
  megatiny parity --config launch/configs/tiny-cpu.yaml --layouts "tp=1" "pp=2,virtual_pipeline_size=2"
  megatiny parity --config launch/configs/tiny-cpu.yaml --layouts tp=1 tp=4 --steps 3 model.n_layers=2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument(
        "--layouts", nargs="+", required=True, metavar="LAYOUT",
        help='layouts as "tp=2,sequence_parallel=true,dp=2"; the first (tp=1) is the reference',
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps (default 1)")
    parser.add_argument(
        "--micro-batches", type=int, default=None,
        help="micro-batches per step at every layout (default: lcm of the layouts' pp)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (default 4)")
    parser.add_argument(
        "--seq-length", type=int, default=None, help="tokens per sample (default data.seq_length)"
    )
    parser.add_argument(
        "--config-adam-eps", action="store_true",
        help="step with the config's AdamW eps (default: eps 1, so that steps after the first "
        "do not turn rounding-level gradients into lr-sized updates)",
    )  # fmt: skip
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (1e-4)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (1e-5)")
    parser.add_argument("--top", type=int, default=10, help="rows shown per layout (10)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per layout (300)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.n_layers=2")


def load_config(path: str, overrides: list[str]) -> Config:
    """The config, with model.vocab_size=auto resolved to FALLBACK_VOCAB when there is no
    tokenizer to read it from (parity needs no data)."""
    overrides = list(overrides)
    if os.path.exists(path) and not any(o.startswith("model.vocab_size=") for o in overrides):
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        model, data = raw.get("model") or {}, raw.get("data") or {}
        tokenizer = next((o.split("=", 1)[1] for o in overrides if o.startswith("data.tokenizer=")),
                         data.get("tokenizer"))  # fmt: skip
        if model.get("vocab_size") == "auto" and not (tokenizer and os.path.exists(tokenizer)):
            print(f"note: no tokenizer at {tokenizer!r}; using model.vocab_size={FALLBACK_VOCAB}")
            overrides.append(f"model.vocab_size={FALLBACK_VOCAB}")
    return Config.from_yaml(path, overrides)


def main(args) -> int:
    from megatiny.parity import format_report, run_parity

    # `--layouts tp=1 pp=2 model.n_layers=8`: the overrides are taken by --layouts' nargs
    # (layout keys have no dot).
    overrides = [x for x in args.layouts if "." in x.partition("=")[0]]
    layouts = [x for x in args.layouts if x not in overrides]
    try:
        cfg = load_config(args.config, args.overrides + overrides)
        report = run_parity(
            cfg, layouts, steps=args.steps, batch_size=args.batch_size,
            seq_length=args.seq_length, micro_batches=args.micro_batches, rtol=args.rtol,
            atol=args.atol, timeout=args.timeout, config_adam_eps=args.config_adam_eps,
        )  # fmt: skip
    except (ConfigError, ValueError) as e:
        print(f"megatiny parity: error: {e}")
        return 2
    print(format_report(report, top=args.top))
    return 0 if report.ok else 1
