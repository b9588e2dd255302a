"""DocumentFilter, the driver every document filter (lang, quality, dedup, decontam) runs on."""

import json

import pytest

from megatiny.data import stage
from megatiny.data.stage import DocumentFilter


class Tagging(DocumentFilter):
    """Drops texts containing "spam" in the workers and repeats of a text in `decide`."""

    name = "tagging"

    def __init__(self, rewrites=False, text_key="text"):
        self.rewrites = rewrites
        self.text_key = text_key
        self.seen, self.observed, self.spam = set(), 0, []

    def judge(self, rec, text, where):
        if "spam" in text:
            return "spam", where
        rec["tagged"] = True  # written only when rewrites is set
        return None, text

    def decide(self, res):
        if res.payload in self.seen:
            return "repeat"
        self.seen.add(res.payload)
        return None

    def observe(self, res):
        self.observed += 1
        if res.drop == "spam":
            self.spam.append(res.payload)

    def report(self):
        return {"observed": self.observed, "spam_at": self.spam}


class Exploding(Tagging):
    def judge(self, rec, text, where):
        if text == "boom":
            raise RuntimeError("judge failed")
        return super().judge(rec, text, where)


def _corpus(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"text": "a",  "id": 1}\n'  # odd spacing: must pass through byte for byte
        b'{"text": "spam here"}\n'
        b"{broken\n"
        b'{"text": "a"}\n'
        b'{"text": "b"}'  # last line without a newline
    )
    (tmp_path / "doc.txt").write_text("c")
    return [str(src), str(tmp_path / "doc.txt")]


@pytest.mark.parametrize("workers", [1, 2])
def test_driver_keeps_bytes_runs_hooks_and_reports(tmp_path, workers):
    out = tmp_path / "out.jsonl"
    f = Tagging()
    rep = f.run(_corpus(tmp_path), str(out), workers=workers, progress=False)
    assert out.read_bytes() == (
        b'{"text": "a",  "id": 1}\n{"text": "b"}\n'  # JSONL lines as read, newline added
        b'{"text": "c", "source": "doc.txt", "tagged": true}\n'  # .txt: always its record
    )
    assert rep["stage"] == "tagging" and rep["workers"] == workers
    assert rep["docs_in"] == 6 and rep["docs_kept"] == 3
    assert rep["dropped_by_reason"] == {"invalid_json": 1, "repeat": 1, "spam": 1}
    assert rep["observed"] == 6 and rep["spam_at"] == [f"{tmp_path}/in.jsonl:2"]
    assert rep["bytes_out"] == out.stat().st_size
    assert json.load(open(tmp_path / "out.tagging.json")) == rep
    assert stage._ACTIVE == []  # the filter is not kept alive after its run


def test_rewrites_reserialises_the_edited_record(tmp_path):
    out = tmp_path / "out.jsonl"
    Tagging(rewrites=True).run(_corpus(tmp_path), str(out), progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs == [
        {"text": "a", "id": 1, "tagged": True},
        {"text": "b", "tagged": True},
        {"text": "c", "source": "doc.txt", "tagged": True},
    ]


def test_text_key_and_report_path(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "x"}\n{"text": "y"}\n')
    rep = Tagging(text_key="body").run(
        str(src), str(tmp_path / "o.jsonl"), report_path=str(tmp_path / "r.json"), progress=False
    )
    assert rep["docs_kept"] == 1 and rep["dropped_by_reason"] == {"missing_text": 1}
    assert json.load(open(tmp_path / "r.json"))["docs_kept"] == 1


def test_failure_keeps_partial_output_and_clears_the_filter(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "boom"}\n{"text": "b"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="judge failed"):
        Exploding().run(str(src), str(out), progress=False)
    assert not out.exists()
    assert (tmp_path / "out.jsonl.partial").read_text() == '{"text": "a"}\n'
    assert "judge failed" in json.load(open(tmp_path / "out.tagging.json"))["error"]
    assert stage._ACTIVE == []
