"""The config reference (megatiny/config/reference.py): every key documented, docs/config.md
current, `config show` marking non-defaults, and `megatiny train --help` pointing there."""

import dataclasses
import os

import pytest

from megatiny.cli import main
from megatiny.config import Config
from megatiny.config.reference import format_keys, format_show, keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_key_of_every_section_is_listed_with_a_line_of_text():
    rows = keys()
    expected = [f"{s}.{f.name}" for s in Config.SECTIONS
                for f in dataclasses.fields(type(getattr(Config(), s)))]  # fmt: skip
    assert [r["key"] for r in rows] == expected
    undocumented = [r["key"] for r in rows if not r["text"]]
    assert not undocumented, (
        f"{undocumented}: add a comment on the field (or a line in reference.UNCOMMENTED)"
    )
    by_key = {r["key"]: r for r in rows}
    assert by_key["train.steps"]["default"] == 100 and by_key["train.steps"]["type"] == "int"
    assert "hidden size" in by_key["model.d_model"]["text"]  # from ModelConfig's docstring table
    assert "minutes" in by_key["train.exit_duration_mins"]["text"]  # from the field's comment


def test_docs_config_md_is_current():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        assert f.read() == format_keys(markdown=True), (
            "docs/config.md is stale: run `megatiny config keys --markdown > docs/config.md`"
        )


def test_show_marks_what_differs_from_the_defaults(capsys):
    cfg = Config.from_dict({"model": {"d_model": 96}}, ["train.steps=20"])
    lines = format_show(cfg, explicit={"model.d_model", "train.steps"}).splitlines()
    assert "* train.steps: 20   (default 100)" in lines
    assert "* model.d_model: 96   (default 768)" in lines
    assert "  train.seed: 1234" in lines
    assert "  model.ffn_hidden: 384   (derived)" in lines  # resolved from d_model, not set
    assert sum(line.startswith("*") for line in lines) == 2
    code = main(["config", "show", "--config", os.path.join(REPO, "launch/configs/gpt2-124m.yaml"),
                 "train.step=3"])  # fmt: skip
    assert code == 2 and "did you mean 'train.steps'" in capsys.readouterr().err


def test_keys_and_train_help_point_to_the_reference(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    assert "train.exit_duration_mins" in out and len(out.splitlines()) == len(keys())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "megatiny config keys" in help_text and "megatiny config show" in help_text
