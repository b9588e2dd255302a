"""The YAML / command-line side of megatiny.config: `ConfigError`, parsing of dotted
`section.key=value` overrides, conversion of YAML / CLI values to each field's annotated type,
and `model.vocab_size=auto` (the vocabulary of data.tokenizer). Used by `Config.from_dict`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import typing

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message that says what to change."""


def tokenizer_vocab_size(data: dict) -> int:
    path = data.get("tokenizer")
    if not path:
        raise ConfigError("model.vocab_size=auto needs data.tokenizer (a tokenizer dir or .json)")
    if not os.path.exists(path):
        raise ConfigError(
            f"data.tokenizer {path!r} not found (needed by model.vocab_size=auto); train one with "
            "`megatiny data train-tokenizer` or run `launch/prepare_demo_data.sh .demo`"
        )
    from megatiny.data.tokenizer import load_tokenizer

    return int(load_tokenizer(path).vocab_size)


def unknown_key_message(key: str, known, what: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return f"unknown {what} {key!r}{hint}"


def parse_override(item: str, sections: tuple[str, ...]) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like section.key=value (e.g. train.steps=20)"
        )
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    if "." not in key:
        raise ConfigError(
            f"override key {key!r} needs a section: one of {', '.join(sections)} "
            f"(e.g. train.{key}={text})"
        )
    if key.split(".", 1)[0] not in sections:
        raise ConfigError(unknown_key_message(key.split(".", 1)[0], sections, "config section"))
    return key, yaml.safe_load(text) if text.strip() else ""


def coerce(value, section_cls, name: str, key: str):
    """Convert a YAML/CLI value to the annotated type of `section_cls.name` (int, float, bool,
    str, list, or None for optional fields); raise ConfigError saying what was expected."""
    hint = typing.get_type_hints(section_cls)[name]
    args = typing.get_args(hint) or (hint,)
    nullable_text = isinstance(value, str) and value.lower() in ("none", "null") and str not in args
    if value is None or nullable_text:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} cannot be null")
    for target in args:
        if target is type(None):
            continue
        if target is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            continue
        if target is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    return int(value.replace("_", ""))
                with contextlib.suppress(ValueError):
                    f = float(value)  # "1e3" is an int here
                    if f.is_integer():
                        return int(f)
            continue
        if target is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    continue
            continue
        if target is str:
            if isinstance(value, str):
                return value
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value)
            continue
        if target is list or typing.get_origin(target) is list:
            if isinstance(value, list | tuple):
                return list(value)
            continue
        return value  # an annotation we do not coerce (e.g. a nested type): pass through
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise ConfigError(f"{key}={value!r} is not a valid {expected}")
