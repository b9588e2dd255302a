"""The one `megatiny` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> int`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help). Modules are imported lazily so `megatiny data ...` does not
# pay for what it does not use.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": (
        "megatiny.data.cli",
        "corpus pipeline: filter-lang, dedup, decontam, tokenizer, tokenize",
    ),
    "train": ("megatiny.training.loop", "pretrain a GPT under torchrun"),
    "generate": ("megatiny.generate", "sample text from a checkpoint"),
    "finetune": (
        "megatiny.finetune.cli",
        "fine-tune a pretrained checkpoint: classification head or instruction SFT",
    ),
    "convert": ("megatiny.hf.convert", "convert checkpoints to / from Hugging Face transformers"),
    "parity": ("megatiny.parity.cli", "find the first module where a parallel layout differs"),
    "checkpoint": ("megatiny.training.manifest", "verify checkpoints against their manifests"),
    "debug": (
        "megatiny.training.hang",
        "diagnose a run: a hung job (flight-recorder dumps), slow ranks (straggler scores)",
    ),
    "plan": ("megatiny.plan.cli", "predict memory, communication and step time of a layout"),
    "config": ("megatiny.config.reference", "every config key (keys); a resolved config (show)"),
    "plot": ("megatiny.training.plot", "loss, lr, grad norm, tokens/s of runs overlaid, as a PNG"),
}

# subcommand -> {action: (module, help)}: actions added to the sub-parsers its module made (each
# module provides add_arguments(parser) and main(args)).
ACTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "debug": {
        "stragglers": (
            "megatiny.training.stragglers",
            "ranks' compute scores: table + rank x step heatmap PNG",
        ),
        "comm": (
            "megatiny.training.summary",
            "comm.jsonl totalled per group, op and phase (train.trace_comm=true)",
        ),
    },
}


def _available() -> dict[str, tuple[str, str]]:
    """Subcommands whose module exists in this checkout."""
    out = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatiny",
        description="megatiny: Megatron-style model-parallel LLM training, small enough to read.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        wanted = first if first in SUBCOMMANDS else None
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted is None or wanted == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
            _add_actions(p, ACTIONS.get(name, {}))
    return parser


def _add_actions(parser: argparse.ArgumentParser, actions: dict) -> None:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action, (module, help_text) in actions.items():
        mod = importlib.import_module(module)
        p = subs[0].add_parser(action, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["finetune"]):  # SIGTERM / SIGINT end it cleanly from here on,
        from megatiny.training.preempt import StartupGuard, startup_phase  # before any import

        with StartupGuard(f"megatiny {argv[0]}"):
            if argv[0] == "train" and "--check" in argv:  # the launchers' check, before torchrun
                startup_phase("checking the config")
            return _run(argv)
    return _run(argv)


def _run(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 0 if not argv else 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
