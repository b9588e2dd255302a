"""`megatiny config keys | show`: the configuration reference, generated from the dataclasses.

    megatiny config keys                          # every key: type, default, one line
    megatiny config keys --markdown > docs/config.md
    megatiny config show --config launch/configs/tiny-cpu.yaml train.steps=20   # * = not default

A key's line is its documentation in the source: the `name  text` table of ModelConfig's
docstring, else the comment on (or the comment lines just above) the field. tests/test_config_reference.py
fails when a key has none, and when docs/config.md differs from `config keys --markdown`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys

from megatiny.config import Config, ConfigError

_FIELD = re.compile(r"^\s+(\w+):\s*[^=#]+?(?:=.*?)?(?:\s+#\s*(?P<comment>.*))?$")
_TABLE = re.compile(r"^(\w+)\s{2,}(\S.*)$")


def _docstring_table(cls) -> dict[str, str]:
    """`name   text` rows of a class docstring (continuation lines indented), joined."""
    out, name = {}, None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _TABLE.match(line)
        if match:
            name = match.group(1)
            out[name] = match.group(2).strip()
        elif name and line.startswith(" ") and line.strip():
            out[name] += " " + line.strip()
        else:
            name = None
    return out


def _source_comments(cls) -> dict[str, str]:
    """field -> its trailing comment, else the comment lines right above it."""
    out, above = {}, []
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line)
        if match and line.startswith("    ") and not line.startswith("     "):
            text = match.group("comment") or " ".join(above)
            if text:
                out.setdefault(match.group(1), text)
        above = []
    return out


# Keys whose field carries no comment in the source (their meaning is in the class docstring's
# prose or obvious to a Megatron user); the source's own text, where it exists, wins.
UNCOMMENTED = {
    "parallel.tp": "tensor-parallel size: each block's matmuls split over tp ranks",
    "parallel.pp": "pipeline-parallel size: the blocks split into pp stages",
    "parallel.cp": "context-parallel size: the sequence split over cp ranks (parallel.cp_mode)",
    "parallel.dp": "data-parallel size; null: world_size / (tp pp cp)",
    "parallel.sequence_parallel": "shard norms / dropout activations over the TP group (tp > 1)",
    "parallel.virtual_pipeline_size": "model chunks per pipeline rank (interleaved 1F1B); null: 1",
    "train.steps": "optimizer steps of the run",
    "train.seed": "seed of initialization, data order and dropout",
    "train.micro_batch_size": "sequences per micro-batch per data-parallel rank",
    "train.global_batch_size": "sequences per optimizer step; null: micro_batch_size x dp",
    "train.lr": "peak learning rate (after warmup; cosine decay to min_lr)",
    "train.min_lr": "learning rate at the end of the decay",
    "train.warmup_steps": "linear warmup steps from 0 to lr",
    "train.weight_decay": "AdamW decoupled weight decay",
    "train.beta1": "AdamW beta1",
    "train.beta2": "AdamW beta2",
    "train.adam_eps": "AdamW epsilon",
    "train.decay_norms_and_biases": "apply weight decay to norm weights and biases too",
    "train.decay_embeddings": "apply weight decay to the embeddings too",
    "train.run_dir": "run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/",
    "train.log_interval": "steps between metrics rows and console lines",
    "train.eval_iters": "validation batches per evaluation",
    "train.tensorboard": "write run_dir/tensorboard/ scalars beside metrics.jsonl",
    "train.progress_bar": "show a progress bar on rank 0",
    "data.path": "indexed dataset prefix (PREFIX.bin/.idx) or weighted list [w1, p1, w2, p2]",
    "data.tokenizer": "tokenizer dir or .json the data was tokenized with",
    "data.split": "train,valid,test weights of Megatron's document split",
    "data.seq_length": "tokens per training sample",
    "data.cache_dir": "where the sample index caches go; null: beside the data",
}


def descriptions(section_cls, section: str = "") -> dict[str, str]:
    out = {k.split(".", 1)[1]: v for k, v in UNCOMMENTED.items() if k.startswith(section + ".")}
    for cls in reversed(section_cls.__mro__):  # a subclass's text wins over its base's
        if dataclasses.is_dataclass(cls):
            out.update(_source_comments(cls))
            out.update(_docstring_table(cls))
    return out


def _section_classes() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else type(f.default_factory())
            for f in dataclasses.fields(Config)}  # fmt: skip


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def keys() -> list[dict]:
    """Every key of a training config: {key, type, default, text} in section, field order."""
    rows = []
    for section, cls in _section_classes().items():
        text = descriptions(cls, section)
        for f in dataclasses.fields(cls):
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            rows.append({"key": f"{section}.{f.name}", "type": type_name,
                         "default": _default(f), "text": text.get(f.name, "")})  # fmt: skip
    return rows


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_keys(markdown: bool = False) -> str:
    rows = keys()
    if not markdown:
        width = max(len(r["key"]) for r in rows)
        return "\n".join(f"{r['key']:<{width}}  {r['type']:<16} {_show(r['default']):<12} "
                         f"{r['text']}" for r in rows)  # fmt: skip
    lines = [
        "# Configuration reference",
        "",
        "Generated by `megatiny config keys --markdown > docs/config.md` from the dataclasses in",
        "megatiny/config/ (tests/test_config_reference.py fails when this file is stale). Any key",
        "can be set in the YAML file or overridden on the command line as `section.key=value`;",
        "`megatiny config show --config FILE key=value ...` prints what a config resolves to,",
        "with `*` on every value that differs from the default below.",
    ]
    section = None
    for r in rows:
        name = r["key"].split(".", 1)[0]
        if name != section:
            section = name
            lines += ["", f"## {section}", "", "| key | type | default | meaning |",
                      "|---|---|---|---|"]  # fmt: skip
        text = r["text"].replace("|", "\\|")
        type_name = r["type"].replace("|", "\\|")
        lines.append(f"| `{r['key']}` | {type_name} | `{_show(r['default'])}` | {text} |")
    return "\n".join(lines) + "\n"


def format_show(cfg: Config, explicit: set[str] | None = None) -> str:
    """The resolved config, one `section.key: value` per line; `*` marks non-defaults. A key
    with a null default that was not set (`explicit`) but resolved (n_kv_heads, ffn_hidden) is
    shown as derived, unmarked."""
    defaults = {r["key"]: r["default"] for r in keys()}
    lines = []
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            key = f"{section}.{name}"
            changed = value != defaults.get(key)
            derived = changed and defaults.get(key) is None and explicit is not None
            derived = derived and key not in explicit
            note = ("   (derived)" if derived else
                    f"   (default {_show(defaults.get(key))})" if changed else "")  # fmt: skip
            lines.append(f"{'*' if changed and not derived else ' '} {key}: {_show(value)}{note}")
    return "\n".join(lines)


def explicit_keys(path: str | None, overrides: list[str]) -> set[str]:
    """The keys a YAML file and `key=value` overrides set."""
    import yaml

    out = {item.split("=", 1)[0].strip().lstrip("-") for item in overrides}
    if path:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        out |= {f"{s}.{k}" for s, values in raw.items() if isinstance(values, dict) for k in values}
    return out


# ---- command line -------------------------------------------------------------------------------

EXAMPLE = """examples:
  megatiny config keys                                   # every key: type, default, meaning
  megatiny config keys --markdown > docs/config.md
  megatiny config show --config launch/configs/tiny-cpu.yaml train.steps=20   # * = not default"""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = sub.add_parser("keys", help="every config key: type, default, one line")
    k.add_argument("--markdown", action="store_true", help="as docs/config.md")
    s = sub.add_parser("show", help="the resolved config; * marks what differs from the defaults")
    s.add_argument("--config", help="YAML config (see launch/configs/)")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")


def main(args) -> int:
    if args.action == "keys":
        print(format_keys(args.markdown), end="" if args.markdown else "\n")
        return 0
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"megatiny config: {e}", file=sys.stderr)
        return 2
    print(format_show(cfg, explicit_keys(args.config, args.overrides)))
    return 0
