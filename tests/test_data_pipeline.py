"""`megatiny data ...` end to end: the pipeline, each subcommand, reports, config, errors."""

import json
import os

import numpy as np
import pytest

from megatiny.cli import main as cli
from megatiny.data.indexed import IndexedDataset
from megatiny.data.shakespeare import convert
from megatiny.data.synthetic import dedup_corpus
from megatiny.data.tokenizer import load_tokenizer

ENGLISH = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. He had done "
    "this for forty years, and the ships that passed the rocky coast depended on him. One night a "
    "storm came in from the sea, and the wind howled around the tower while he worked.",
    "Farmers in the valley have noticed that the spring rains arrive later each year. They plant "
    "their seeds with care and watch the sky, hoping that the water will come in time for the "
    "young crops. The river that feeds the fields is lower than it was in their childhood.",
    "A small bakery on the corner of the square opens before dawn. The smell of fresh bread fills "
    "the street, and the first customers are the workers who start their shifts early. The baker "
    "knows most of them by name and saves the best loaves for the regulars.",
]
GERMAN = (
    "Die alte Bibliothek der Stadt wurde im letzten Jahr renoviert. Viele Bürger haben gespendet, "
    "damit die wertvollen Bücher erhalten bleiben und die Leser wieder einen ruhigen Ort zum Lernen "
    "finden. Die Eröffnung wurde mit einem großen Fest gefeiert."
)


@pytest.fixture()
def raw(tmp_path):
    recs = [{"id": f"en-{i}", "text": t} for i, t in enumerate(ENGLISH)]
    recs += [{"id": "de-0", "text": GERMAN}, {"id": "dup-0", "text": ENGLISH[1].upper()}]
    recs += [
        {
            "id": "short",
            "text": "This sentence is far too short to be kept by the quality "
            "filter of the pipeline.",
        }
    ]
    planted = dedup_corpus(n_docs=40, exact_frac=0.0, near_frac=0.0, seed=1).records
    body = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "a.jsonl").write_text(body + "{broken line\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted))
    bench = {"task_id": "T/0", "prompt": ENGLISH[2]}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.jsonl").write_text(json.dumps(bench) + "\n")
    return tmp_path


def test_pipeline_cli_end_to_end(raw, tmp_path, capsys):
    (tmp_path / "data.yaml").write_text(
        "workers: 2\n"
        "filter_lang: {keep: [en]}\n"
        "quality: {min_words: 20}\n"
        "dedup: {threshold: 0.8}\n"
        "tokenizer: {vocab_size: 300}\n"
    )
    out = str(tmp_path / "out" / "corpus")
    rc = cli(["data", "pipeline", "--input", str(raw / "a.jsonl"), str(raw / "*.jsonl"),
              "--output-prefix", out, "--config", str(tmp_path / "data.yaml"),
              "--benchmark", str(raw / "bench" / "bench.jsonl"), "--train-tokenizer",
              str(tmp_path / "tok"), "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "filter-lang:" in printed and "tokenize:" in printed
    reps = {s: json.load(open(f"{out}.{s}.json")) for s in
            ("filter-lang", "quality", "dedup", "decontam", "train-tokenizer", "tokenize")}  # fmt: skip
    # a.jsonl is named twice (path and glob): every document of it arrives twice
    fl = reps["filter-lang"]
    assert fl["dropped_by_reason"]["invalid_json"] == 2 and fl["dropped_by_reason"]["lang_de"] == 2
    assert reps["quality"]["dropped_by_reason"].get("quality_too_few_words", 0) == 2
    dd = reps["dedup"]["dropped_by_reason"]
    assert dd["exact_duplicate"] >= 3 + 1  # the second copy of a.jsonl + the upper-cased copy
    flagged = reps["decontam"]["flagged"]
    assert [f["doc"] for f in flagged] == ["en-2"] and flagged[0]["item"] == "T/0"
    for r in reps.values():
        assert r["seconds"] >= 0 and "docs_per_s" in r
    ds = IndexedDataset(out)
    kept = [json.loads(line) for line in open(f"{out}.decontam.jsonl")]
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert len(ds) == len(kept) == reps["tokenize"]["docs_kept"]
    for i, rec in enumerate(kept):
        assert ds[i].tolist() == tok.encode(rec["text"]) + [tok.eod_id]
    assert {r["id"] for r in kept} >= {"en-0", "en-1"}
    assert all(r["lang"] == "en" for r in kept)
    summary = json.load(open(f"{out}.pipeline.json"))
    assert summary["tokens"] == ds.num_tokens and ds.dtype == np.uint16


def test_single_stage_commands(raw, tmp_path, capsys):
    a = str(raw / "a.jsonl")
    assert cli(["data", "filter-lang", "--input", a, "--output", str(tmp_path / "l.jsonl"),
                "--keep", "en,de", "--no-progress", "--workers", "1"]) == 0  # fmt: skip
    assert json.load(open(tmp_path / "l.filter-lang.json"))["docs_kept"] == 6
    assert cli(["data", "quality", "--input", str(tmp_path / "l.jsonl"), "--output",
                str(tmp_path / "q.jsonl"), "--set", "min_words=5", "--set",
                "min_stop_words=none", "--no-progress"]) == 0  # fmt: skip
    assert cli(["data", "dedup", "--input", str(tmp_path / "q.jsonl"), "--output",
                str(tmp_path / "d.jsonl"), "--no-progress"]) == 0  # fmt: skip
    assert cli(["data", "decontam", "--input", str(tmp_path / "d.jsonl"), "--output",
                str(tmp_path / "c.jsonl"), "--benchmark", str(raw / "bench" / "bench.jsonl"),
                "--no-progress"]) == 0  # fmt: skip
    assert "flagged en-2: bench.jsonl item T/0" in capsys.readouterr().out
    assert cli(["data", "train-tokenizer", "--input", str(raw / "b.jsonl"), "--output",
                str(tmp_path / "tok"), "--vocab-size", "300", "--no-progress"]) == 0  # fmt: skip
    assert os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    assert cli(["data", "tokenize", "--input", str(tmp_path / "c.jsonl"), "--tokenizer",
                str(tmp_path / "tok"), "--output-prefix", str(tmp_path / "t"),
                "--no-progress"]) == 0  # fmt: skip
    assert len(IndexedDataset(str(tmp_path / "t"))) == 4  # en-0, en-1, short, de-0 (not en-2, dup)


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = cli(["data", "dedup", "--input", str(tmp_path / "missing.jsonl"), "--output",
              str(tmp_path / "o.jsonl")])  # fmt: skip
    assert rc == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("dedupe: {}\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    rc = cli(["data", "pipeline", "--input", str(tmp_path / "a.jsonl"), "--output-prefix",
              str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml")])  # fmt: skip
    assert rc == 2 and "unknown config key 'dedupe'" in capsys.readouterr().err
    assert cli(["data"]) == 2


def test_shakespeare_converter(tmp_path):
    play = (
        "THE TRAGEDY OF TESTING\n\nby Nobody\n\nPERSONS REPRESENTED.\n\nHamlet.\n\n\nACT I.\n\n"
        "Scene I. A room.\n\nHam.\nTo be, or not to be,\nthat is the question.\n\nHor.\nIndeed.\n\n"
        "Scene II. Another room.\n\nHam.\nWords, words, words.\n\nACT II.\n\nSCENE 1. A hall.\n\n"
        "Hor.\nGood night.\n"
    )
    (tmp_path / "test_gut.txt").write_text(play)
    (tmp_path / "sonnets_gut.txt").write_text("THE SONNETS\n\nI\n\nFrom fairest\ncreatures\n\nII\n\n"
                                              "When forty\nwinters\n")  # fmt: skip
    n = convert(str(tmp_path), str(tmp_path / "out.jsonl"))
    recs = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert n == len(recs) == 6
    assert [r["id"] for r in recs] == ["sonnets/I", "sonnets/II", "test/front", "test/act-1/scene-1",
                                       "test/act-1/scene-2", "test/act-2/scene-3"]  # fmt: skip
    assert "Ham. To be, or not to be,\nthat is the question." in recs[3]["text"]
    assert recs[0]["text"] == "From fairest\ncreatures"


def test_unwritable_output_is_one_line_not_a_traceback(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "a document with enough words to count"}\n')
    (tmp_path / "afile").write_text("")
    args = ["data", "dedup", "--input", str(src), "--no-progress"]
    assert cli(args + ["--output", str(tmp_path / "afile" / "out.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "afile" in err and "is a file, not a directory" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert cli(args + ["--output", str(ro / "out.jsonl")]) == 1
        err = capsys.readouterr().err
        assert "Permission denied" in err and "Traceback" not in err


def test_empty_corpus_is_reported(tmp_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    out = str(tmp_path / "out")
    assert cli(["data", "pipeline", "--input", str(src), "--output-prefix", out,
                "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"warning: {out}.bin holds 0 tokens: the input holds no documents" in err
    summary = json.load(open(out + ".pipeline.json"))
    assert summary["tokens"] == 0 and summary["warnings"]
