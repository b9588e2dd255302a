"""The `megatiny` command line: every subcommand's --help shows an example, and bad arguments
end with an exit code and a message naming the argument or path, never a traceback.

The subcommands run in-process through `megatiny.cli.main(argv)` (an exception escaping it is
what a user would see as a traceback); one subprocess checks `python -m megatiny --help`."""

import os
import subprocess
import sys

import pytest

from megatiny.cli import SUBCOMMANDS, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CPU = os.path.join(REPO, "launch", "configs", "tiny-cpu.yaml")
COMMANDS = tuple(SUBCOMMANDS)  # every subcommand the CLI registers
DATA_STAGES = ("pipeline", "filter-lang", "quality", "dedup", "decontam", "train-tokenizer",
               "tokenize")  # fmt: skip


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `megatiny ARGV`, as the shell would see them."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors and --help, or SystemExit("message")
        code = e.code
        if isinstance(code, str):  # the interpreter prints the message and exits 1
            print(code, file=sys.stderr)
            code = 1
    out, err = capsys.readouterr()
    return (0 if code is None else code), out, err


def test_python_m_megatiny_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "megatiny", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: megatiny")
    for name in COMMANDS:
        assert name in proc.stdout


def test_no_subcommand_prints_usage(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == 0 and "usage: megatiny" in out


def test_unknown_subcommand_exits_2_naming_it(capsys):
    code, _, err = run_cli(["trian"], capsys)
    assert code == 2
    assert "invalid choice: 'trian'" in err and "train" in err  # the valid choices are listed


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "data"])
def test_subcommand_help_shows_an_example(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    assert f"usage: megatiny {command}" in out
    assert "example" in out and f"megatiny {command} " in out.split("example", 1)[1]


def test_data_help_lists_stages_and_bare_data_exits_2(capsys):
    code, out, _ = run_cli(["data", "--help"], capsys)
    assert code == 0 and all(stage in out for stage in DATA_STAGES)
    code, _, err = run_cli(["data"], capsys)
    assert code == 2 and "megatiny data STAGE --help" in err
    code, _, err = run_cli(["data", "dedupe"], capsys)
    assert code == 2 and "invalid choice: 'dedupe'" in err


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_data_stage_help_shows_an_example(stage, capsys):
    code, out, _ = run_cli(["data", stage, "--help"], capsys)
    assert code == 0
    assert "example:" in out and f"megatiny data {stage} --input" in out


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["data", "pipeline", "--input", "x.jsonl"], "--output-prefix"),
        (["data", "filter-lang"], "--input, --output"),
        (["data", "quality", "--input", "x.jsonl"], "--output"),
        (["data", "dedup", "--output", "o.jsonl"], "--input"),
        (["data", "decontam", "--input", "x.jsonl", "--output", "o.jsonl"], "--benchmark"),
        (["data", "train-tokenizer", "--input", "x.jsonl"], "--output"),
        (["data", "tokenize", "--input", "x.jsonl", "--output-prefix", "o"], "--tokenizer"),
        (["generate"], "--checkpoint"),
        (["generate", "--checkpoint", "ckpt"], "one of the arguments --prompt --prompt-ids"),
        (["convert", "--input", "a", "--output", "b"], "one of the arguments --to-hf --from-hf"),
        (["convert", "--to-hf"], "--input, --output"),
        (["finetune"], "--task, --checkpoint, --tokenizer, --train"),
        (["finetune", "--task", "classification", "--checkpoint", "c", "--tokenizer", "t"],
         "--train"),
    ],
)  # fmt: skip
def test_missing_required_argument_exits_2_naming_it(argv, missing, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "required" in err and missing in err
    assert f"usage: megatiny {' '.join(a for a in argv[:2] if not a.startswith('-'))}" in err


def test_bad_argument_values_exit_2(capsys):
    code, _, err = run_cli(["data", "dedup", "--input", "x", "--output", "o", "--threshold",
                            "high"], capsys)  # fmt: skip
    assert code == 2 and "--threshold: invalid float value: 'high'" in err
    code, _, err = run_cli(["finetune", "--task", "regression", "--checkpoint", "c",
                            "--tokenizer", "t", "--train", "x"], capsys)  # fmt: skip
    assert code == 2 and "--task: invalid choice: 'regression'" in err
    code, _, err = run_cli(["convert", "--to-hf", "--from-hf", "--input", "a", "--output", "b"],
                           capsys)  # fmt: skip
    assert code == 2 and "not allowed with argument" in err


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("pipeline", ["--output-prefix", "{tmp}/out"]),
        ("filter-lang", ["--output", "{tmp}/out.jsonl"]),
        ("quality", ["--output", "{tmp}/out.jsonl"]),
        ("dedup", ["--output", "{tmp}/out.jsonl"]),
        ("train-tokenizer", ["--output", "{tmp}/tok"]),
    ],
)
def test_data_stage_missing_input_names_the_path(stage, extra, tmp_path, capsys):
    missing = str(tmp_path / "no-such-corpus.jsonl")
    argv = ["data", stage, "--input", missing, "--no-progress", "--workers", "1"]
    code, _, err = run_cli(argv + [a.format(tmp=tmp_path) for a in extra], capsys)
    assert code == 2
    assert f"megatiny data {stage}: error:" in err and missing in err
    assert "Traceback" not in err


def test_data_missing_files_other_than_input_are_named(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "a few words of text"}\n')
    missing = str(tmp_path / "nothing")
    common = ["--input", str(corpus), "--no-progress", "--workers", "1"]
    cases = [
        ["data", "decontam", *common, "--output", str(tmp_path / "o.jsonl"),
         "--benchmark", missing + ".jsonl"],
        ["data", "tokenize", *common, "--tokenizer", missing, "--output-prefix",
         str(tmp_path / "o")],
        ["data", "pipeline", "--input", str(corpus), "--output-prefix", str(tmp_path / "p"),
         "--config", missing + ".yaml", "--no-progress"],
    ]  # fmt: skip
    for argv in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2, argv
        assert missing in err and "Traceback" not in err, err
    code, _, err = run_cli(["data", "quality", *common, "--output", str(tmp_path / "q.jsonl"),
                            "--set", "min_words"], capsys)  # fmt: skip
    assert code == 2 and "--set expects KEY=VALUE, got 'min_words'" in err


def test_train_missing_config_file_names_it(tmp_path, capsys):
    missing = str(tmp_path / "no-such-config.yaml")
    code, _, err = run_cli(["train", "--config", missing], capsys)
    assert code == 2 and "megatiny train: config error" in err and missing in err


def test_train_without_data_path_says_which_key(capsys):
    code, _, err = run_cli(["train", "train.steps=3"], capsys)
    assert code == 2 and "data.path is not set" in err


def test_train_bad_override_syntax(capsys):
    code, _, err = run_cli(["train", "--config", TINY_CPU, "train.steps"], capsys)
    assert code == 2 and "train.steps" in err


def test_train_missing_resume_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    """--resume DIR that does not exist: exit 1 with the path, after a clean one-rank run setup."""
    from megatiny.testing import free_port
    from tests.test_train import VOCAB, make_corpus

    prefix = make_corpus(tmp_path)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    missing = str(tmp_path / "no-such-run")
    argv = ["train", "--config", TINY_CPU, "--resume", missing, f"model.vocab_size={VOCAB}",
            "model.d_model=32", "model.n_layers=2", "model.max_seq_len=32", f"data.path={prefix}",
            "data.tokenizer=null", "data.seq_length=16", "data.split=90,10,0",
            f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.progress_bar=false", "train.tensorboard=false",
            "parallel.tp=1"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code != 0 and missing in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tmp_path_factory):
    """A tokenizer directory and a matching (untrained) model directory."""
    import torch

    from megatiny.config import ModelConfig
    from megatiny.data.tokenizer import train_tokenizer
    from megatiny.hf import save_model
    from megatiny.model import GPT

    d = tmp_path_factory.mktemp("cli")
    texts = [f"sample sentence number {i} about the command line" for i in range(200)]
    tok = train_tokenizer(texts, vocab_size=300, output=str(d / "tok"), show_progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=max(tok.vocab_size, 300), max_seq_len=32, d_model=32,
                            n_layers=1, n_heads=4))  # fmt: skip
    save_model(model, str(d / "model"))
    return str(d / "model"), str(d / "tok")


def test_finetune_missing_paths_are_named(tiny_model_and_tokenizer, tmp_path, capsys):
    model_dir, tok_dir = tiny_model_and_tokenizer
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(f'{{"text": "row {i}", "label": {i % 2}}}\n' for i in range(8)))
    missing = str(tmp_path / "nothing")
    base = ["finetune", "--task", "classification", "--output", str(tmp_path / "out"),
            "--steps", "1", "--no-progress-bar"]  # fmt: skip
    for argv in (
        [*base, "--checkpoint", missing, "--tokenizer", tok_dir, "--train", str(rows)],
        [*base, "--checkpoint", model_dir, "--tokenizer", missing, "--train", str(rows)],
        [*base, "--checkpoint", model_dir, "--tokenizer", tok_dir, "--train", missing + ".jsonl"],
    ):
        code, _, err = run_cli(argv, capsys)
        assert code != 0 and missing in err and "Traceback" not in err, (argv, err)


def test_convert_refuses_a_non_empty_output(tiny_model_and_tokenizer, tmp_path, capsys):
    model_dir, _ = tiny_model_and_tokenizer
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["convert", "--to-hf", "--input", model_dir, "--output", str(out)],
                           capsys)  # fmt: skip
    assert code != 0 and str(out) in err and "not empty" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("which", ["checkpoint", "tokenizer"])
def test_generate_missing_paths_are_named(which, tiny_model_and_tokenizer, tmp_path, capsys):
    model_dir, tok_dir = tiny_model_and_tokenizer
    missing = str(tmp_path / "nothing")
    paths = {"checkpoint": model_dir, "tokenizer": tok_dir, which: missing}
    argv = ["generate", "--checkpoint", paths["checkpoint"], "--tokenizer", paths["tokenizer"],
            "--prompt", "sample", "--max-new-tokens", "2"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code != 0 and missing in err


def test_generate_prompt_needs_a_tokenizer(tiny_model_and_tokenizer, capsys):
    model_dir, _ = tiny_model_and_tokenizer
    code, _, err = run_cli(["generate", "--checkpoint", model_dir, "--prompt", "hi"], capsys)
    assert code != 0 and "--prompt" in err and "need --tokenizer" in err.replace("needs", "need")


@pytest.mark.parametrize("way", ["--to-hf", "--from-hf"])
def test_convert_missing_input_is_named(way, tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    code, _, err = run_cli(["convert", way, "--input", missing, "--output",
                            str(tmp_path / "out")], capsys)  # fmt: skip
    assert code != 0 and missing in err
    assert not os.path.exists(tmp_path / "out")


def test_public_names_import():
    import megatiny.parallel.parallelize  # noqa: F401 - the submodule must not shadow the function
    from megatiny.parallel import ParallelContext, parallelize

    assert callable(parallelize) and not isinstance(parallelize, type(megatiny))
    assert ParallelContext.__name__ == "ParallelContext"


@pytest.mark.parametrize(
    "ids,message",
    [
        ("1,x,3", "comma-separated integers, got 'x'"),
        ("1,99999", "prompt token id 99999 is outside"),
    ],
)
def test_generate_bad_prompt_ids_are_one_line_errors(
    ids, message, tiny_model_and_tokenizer, capsys
):
    model_dir, _ = tiny_model_and_tokenizer
    code, _, err = run_cli(["generate", "--checkpoint", model_dir, "--prompt-ids", ids], capsys)
    assert code == 2 and message in err and "Traceback" not in err
