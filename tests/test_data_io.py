"""Streaming readers and the stage loop: formats, compression, globs, bad input, crash safety."""

import gzip
import json
import os

import pytest
import zstandard

from megatiny.data.io import BadItem, ReadStats, expand_inputs, iter_raw, parse_item
from megatiny.data.quality import QualityConfig, filter_quality
from megatiny.data.stage import run_stage

TEXT = "the cat sat on the mat and looked at the dog " * 10


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_formats_globs_and_directories(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one", "id": 1}) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "two"}) + "\n")
    (tmp_path / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": "three"}) + "\n").encode())
    )
    (tmp_path / "d.txt").write_text("four\nfour again")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "e.txt.gz").write_bytes(gzip.compress(b"five"))
    (sub / "ignored.csv").write_text("x")
    paths = expand_inputs([str(tmp_path / "*.jsonl*"), str(tmp_path / "d.txt"), str(sub)])
    assert [os.path.basename(p) for p in paths] == [
        "a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.txt", "e.txt.gz"
    ]  # fmt: skip
    texts = [parse_item(it)[1] for it in iter_raw(paths)]
    assert texts == ["one", "two", "three", "four\nfour again", "five"]


def test_input_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv: unknown input type"):
        expand_inputs([str(tmp_path / "x.csv")])


def test_bad_items_become_drop_reasons(tmp_path):
    p = tmp_path / "bad.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "fine", "id": "a"}\n')
        f.write(b"{not json\n")
        f.write(b'["a list"]\n')
        f.write(b'{"body": "no text field"}\n')
        f.write(b'{"text": 5}\n')
        f.write(b'{"text": "caf\xe9 latin-1"}\n')
        f.write(b'{"text": "   "}\n')
        f.write(b"\n")
    reasons = []
    for it in iter_raw([str(p)]):
        try:
            parse_item(it)
            reasons.append("ok")
        except BadItem as e:
            reasons.append(e.args[0])
    assert reasons == [
        "ok", "invalid_json", "invalid_json", "missing_text", "missing_text", "invalid_utf8",
        "empty",
    ]  # fmt: skip


def test_stage_counts_bad_input_and_keeps_fields(tmp_path):
    good = {"id": "keep-me", "meta": {"x": [1, 2]}, "text": TEXT}
    src = tmp_path / "in.jsonl"
    with open(src, "wb") as f:
        f.write((json.dumps(good) + "\n").encode())
        f.write(b"{broken\n")
        f.write(b'{"content": "other key"}\n')
        f.write(b'{"text": "\xff\xfe"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(("caf\xe9 " + TEXT).encode("latin-1"))
    out = tmp_path / "out.jsonl"
    rep = filter_quality(
        [str(src), str(tmp_path / "empty.jsonl"), str(tmp_path / "latin1.txt")],
        str(out),
        QualityConfig(),
        progress=False,
    )
    assert rep["docs_in"] == 5 and rep["docs_kept"] == 2
    assert rep["dropped_by_reason"] == {"invalid_json": 1, "invalid_utf8": 1, "missing_text": 1}
    assert rep["empty_files"] == 1 and rep["utf8_replaced"] == 0 and rep["files"] == 3
    recs = _lines(out)
    assert recs[0] == good  # every other field unchanged
    assert recs[1]["text"].startswith("caf\ufffd ")  # .txt decoded with replacement
    assert json.load(open(tmp_path / "out.quality.json"))["docs_kept"] == 2
    for key in ("bytes_in", "bytes_out", "seconds", "docs_per_s", "mb_per_s"):
        assert key in rep


def test_text_key(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"content": TEXT}) + "\n" + json.dumps({"text": TEXT}) + "\n")
    rep = filter_quality(
        str(src), str(tmp_path / "o.jsonl"), QualityConfig(text_key="content"), progress=False
    )
    assert rep["docs_kept"] == 1 and rep["dropped_by_reason"] == {"missing_text": 1}


def _boom_after_two(item):
    from megatiny.data.stage import Result

    if b"doc-3" in item.data:
        raise RuntimeError("worker crashed")
    return Result(None, item.data, len(item.data), item.where)


def test_crash_keeps_partial_output_and_report(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc-{i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="worker crashed"):
        run_stage("boom", str(src), str(out), _boom_after_two, progress=False)
    assert not out.exists()
    assert [r["text"] for r in _lines(str(out) + ".partial")] == ["doc-0", "doc-1", "doc-2"]
    rep = json.load(open(tmp_path / "out.boom.json"))
    assert "worker crashed" in rep["error"] and rep["docs_kept"] == 3


def test_truncated_gzip_is_reported_not_fatal(tmp_path):
    data = gzip.compress(
        b"".join((json.dumps({"text": f"d{i}"}) + "\n").encode() for i in range(500))
    )
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    items = list(iter_raw([str(tmp_path / "t.jsonl.gz")], stats))
    assert 0 < len(items) < 500
    assert stats.errors and "t.jsonl.gz" in stats.errors[0]


def test_windows_are_bounded_by_count_and_bytes():
    from megatiny.data.io import RawItem
    from megatiny.data.stage import batched, pmap

    items = [RawItem("jsonl", b"x" * n, str(i)) for i, n in enumerate([10, 10, 100, 5, 5, 5])]
    sizes = [[len(it.data) for it in b] for b in batched(items, 4, max_bytes=50)]
    assert sizes == [[10, 10, 100], [5, 5, 5]]
    assert [len(b) for b in batched(range(7), 3)] == [3, 3, 1]
    # ordered results for any worker count
    assert list(pmap(abs, range(-50, 50), workers=2, window=7)) == [abs(i) for i in range(-50, 50)]


def test_json_array_file(tmp_path):
    recs = [{"text": "first", "id": 1}, {"text": "second", "id": 2}, {"no_text": 3}]
    (tmp_path / "arr.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    out = []
    for it in iter_raw([str(tmp_path / "arr.json"), str(tmp_path / "lines.json")]):
        try:
            out.append(parse_item(it)[0])
        except BadItem as e:
            out.append(e.args[0])
    assert out == [recs[0], recs[1], "missing_text", recs[0], recs[1]]
    (tmp_path / "broken.json").write_text('[{"text": "x"},')
    stats = ReadStats()
    assert list(iter_raw([str(tmp_path / "broken.json")], stats)) == []
    assert "broken.json starts like a JSON array but does not parse" in stats.errors[0]
