"""Summaries and pictures of a run: `megatiny debug comm` totals equal the planner's bytes,
`megatiny plot` overlays runs in one PNG, `plan --search` holds one global batch."""

import json
import os

import pytest

from megatiny.cli import main
from tests.test_train import REPO, make_corpus, run_training, tiny_config


@pytest.fixture(scope="module")
def tp2dp2_run(tmp_path_factory):
    """A traced tp2 x dp2 run (4 ranks) and an untraced dp2 run of the same corpus."""
    base = tmp_path_factory.mktemp("runs")
    prefix = make_corpus(base)
    traced = tiny_config(prefix, base / "tp2dp2", "parallel.tp=2", "train.trace_comm=true",
                         "train.steps=3", "train.eval_interval=2")  # fmt: skip
    run_training(traced, world_size=4)
    plain = tiny_config(prefix, base / "dp2", "train.steps=3", "train.eval_interval=2")
    run_training(plain, world_size=2)
    return traced, base / "tp2dp2", base / "dp2"


@pytest.mark.slow
def test_debug_comm_totals_equal_the_plan(tp2dp2_run, capsys):
    from megatiny.plan.predict import plan
    from megatiny.plan.timemodel import load_profile
    from megatiny.training.summary import summarize

    cfg, run_dir, _ = tp2dp2_run
    planned = plan(cfg, 4, load_profile("cpu"))["comm_bytes_per_step"]
    summary = summarize(str(run_dir))
    assert summary["steps"] == 3
    assert summary["per_step"] == planned and planned["tp"] > 0 and planned["dp"] > 0
    assert main(["debug", "comm", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "share of step" in out and f"tp {planned['tp']:,}" in out
    phases = {r["phase"] for r in summary["rows"]}
    assert {"train", "eval"} <= phases


@pytest.mark.slow
def test_plot_overlays_two_runs_in_one_png(tp2dp2_run, tmp_path, capsys):
    from megatiny.training.plot import plot_runs

    _, a, b = tp2dp2_run
    output = tmp_path / "both.png"
    lines = plot_runs([str(a), str(b)], str(output))
    # per panel one line per run; the loss panel also one validation curve per run
    assert lines == {"loss": 4, "lr": 2, "grad_norm": 2, "tokens_per_second": 2}
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(a), str(b), "--output", str(tmp_path / "cli.png")]) == 0
    assert "2 run(s)" in capsys.readouterr().out and (tmp_path / "cli.png").exists()


def test_debug_comm_without_a_trace_says_how_to_get_one(tmp_path, capsys):
    assert main(["debug", "comm", str(tmp_path)]) == 1
    assert "train.trace_comm=true" in capsys.readouterr().err


def test_plan_search_holds_the_configs_global_batch():
    # llama3-8b-torchtitan at 8 GPUs resolves to micro 2 x dp 8 = 16 sequences; every candidate
    # layout (other micro-batches, tp, pp, cp) keeps 16 (before: 4 and 8 at other layouts)
    from megatiny.config import Config
    from megatiny.plan.search import candidates, format_search, global_batch
    from megatiny.plan.timemodel import load_profile

    cfg = Config.from_yaml(os.path.join(REPO, "benchmarks/plan_configs/llama3-8b-torchtitan.yaml"))
    profile = load_profile("h100-sxm")
    assert global_batch(cfg, 8) == 16
    pool = candidates(cfg, 8, profile)
    assert pool and {c.train.global_batch_size for c in pool} == {16}
    assert len({c.train.micro_batch_size for c in pool}) > 1  # accumulation makes up the rest
    row = {"layout": {"tp": 1, "pp": 1, "virtual_pipeline_size": 1, "cp": 1, "dp": 8,
                      "sequence_parallel": False, "zero1": True, "recompute": "op",
                      "micro_batch_size": 2, "global_batch_size": 16},
           "memory_bytes": {"peak": 2**30}, "time_s": {"step": 1.0},
           "tokens_per_s_per_gpu": 1.0, "mfu": 0.5}  # fmt: skip
    text = format_search([row], 8, profile, 1.0)
    assert "gbs" in text.splitlines()[1] and "global batch of 16 sequences" in text


def test_plan_search_json_lists_one_global_batch(capsys):
    code = main(["plan", "--config", "launch/configs/tiny-cpu.yaml", "model.vocab_size=256",
                 "data.tokenizer=null", "train.global_batch_size=null", "--world-size", "4",
                 "--search", "--json", "--top", "3"])  # fmt: skip
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    # tiny-cpu: micro 16 at tp2 -> dp 2 at 4 ranks: 32 sequences for every layout
    assert code == 0 and rows and {r["layout"]["global_batch_size"] for r in rows} == {32}
    assert "global batch of 32 sequences" in captured.err


def test_console_line_shows_moe_losses_when_moe_is_on():
    from megatiny.training.metrics import format_line

    m = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_second": 100.0,
         "tflops_per_device": 0.1, "mfu": None, "peak_memory_gib": 0.0}  # fmt: skip
    assert "moe" not in format_line(5, 10, m)
    line = format_line(
        5, 10, {**m, "moe_aux_loss": 1.0123, "moe_z_loss": 0.25, "moe_dropped_fraction": 0}
    )
    assert line.endswith("moe aux 1.0123 z 0.2500")


@pytest.mark.slow
def test_convert_to_hf_of_a_run_carries_its_tokenizer_and_generates_the_same(tmp_path, capsys):
    # the README's round trip: train, `convert --to-hf --input RUN_DIR` (no --tokenizer), then
    # transformers' tokenizer gives the run's ids and its greedy output equals megatiny's
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatiny.config import Config
    from megatiny.data.tokenizer import load_tokenizer, train_tokenizer
    from megatiny.generate import generate
    from megatiny.hf import load_any

    texts = [f"the quick brown fox {i} jumps over the lazy dog {i % 7}" for i in range(200)]
    train_tokenizer(texts, vocab_size=300, output=str(tmp_path / "tok"), show_progress=False)
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    assert main(["data", "tokenize", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer",
                 str(tmp_path / "tok"), "--output-prefix", str(tmp_path / "data")]) == 0  # fmt: skip
    cfg = Config.from_dict(
        {"model": {"vocab_size": "auto", "max_seq_len": 32, "d_model": 32, "n_layers": 2,
                   "n_heads": 4}},
        [f"data.path={tmp_path / 'data'}", f"data.tokenizer={tmp_path / 'tok'}",
         "data.seq_length=16", "data.split=90,10,0", f"train.run_dir={tmp_path / 'run'}",
         "train.steps=3", "train.micro_batch_size=2", "train.eval_iters=1",
         "train.progress_bar=false", "train.tensorboard=false"],
    )  # fmt: skip
    run_training(cfg)
    hf_dir = tmp_path / "hf"
    assert (
        main(["convert", "--to-hf", "--input", str(tmp_path / "run"), "--output", str(hf_dir)]) == 0
    )
    text = "the quick brown fox 12 jumps"
    ids = load_tokenizer(str(tmp_path / "tok")).encode(text)
    assert ids and AutoTokenizer.from_pretrained(hf_dir).encode(text) == ids
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)[0].tolist()  # fmt: skip
    ours = generate(load_any(str(tmp_path / "run")), ids, 8, temperature=0)[0].tolist()
    assert theirs == ours

    # a run whose config names no tokenizer: refused, naming --tokenizer
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(tmp_path / "tok"), str(tmp_path / "gone")))
    with pytest.raises(SystemExit, match="pass --tokenizer TOKDIR"):
        main(
            [
                "convert",
                "--to-hf",
                "--input",
                str(tmp_path / "run"),
                "--output",
                str(tmp_path / "x"),
            ]
        )


def test_progress_bar_ends_at_the_reports_counts(tmp_path, capsys):
    # the bar's docs= / kept= were refreshed every 256 documents only: 300 documents ended the
    # bar at docs=256 while the report said 300
    import re

    from megatiny.data.dedup import DedupConfig, dedup
    from megatiny.data.synthetic import dedup_corpus

    records = dedup_corpus(
        n_docs=300, exact_frac=0.1, near_frac=0.0, words=(20, 40), seed=3
    ).records
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rep = dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out.jsonl"), DedupConfig(),
                progress=True)  # fmt: skip
    shown = re.findall(r"docs=(\d+), kept=(\d+)", capsys.readouterr().err)
    assert rep["docs_in"] % 256 and rep["docs_kept"] < rep["docs_in"]
    assert shown and tuple(map(int, shown[-1])) == (rep["docs_in"], rep["docs_kept"])
