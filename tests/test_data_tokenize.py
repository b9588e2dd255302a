"""Tokenize to .bin/.idx: exact round trip, worker-count invariance, EOD, dtype, bad input."""

import json
import os

import numpy as np
import pytest

from megatiny.data.binarize import (
    encode_document,
    split_for_encoding,
    tokenize,
    train_tokenizer_stage,
)
from megatiny.data.indexed import IndexedDataset
from megatiny.data.synthetic import WordSampler
from megatiny.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    s = WordSampler(vocab_size=3000, seed=5)
    docs = [s.document(s.rng.randint(5, 120)) for _ in range(300)]
    docs[7] = "Ünïcödé — 日本語のテキスト 🙂 and a literal <|endoftext|> inside"
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    rep = train_tokenizer_stage(str(d / "docs.jsonl"), str(d / "tok"), vocab_size=600,
                                progress=False)  # fmt: skip
    assert rep["vocab_size"] == 600 and rep["docs_kept"] == 300
    return d, docs, load_tokenizer(str(d / "tok"))


def test_round_trip_exact_tokens(corpus):
    d, docs, tok = corpus
    rep = tokenize(str(d / "docs.jsonl"), str(d / "out"), str(d / "tok"), progress=False)
    ds = IndexedDataset(str(d / "out"))
    assert ds.dtype == np.uint16 and len(ds) == len(docs) == ds.num_documents
    for i, text in enumerate(docs):
        assert ds[i].tolist() == tok.encode(text) + [tok.eod_id]
    assert tok.decode(ds[7][:-1]) == docs[7]
    assert rep["tokens"] == ds.num_tokens == sum(len(tok.encode(t)) + 1 for t in docs)
    assert rep["bytes_out"] == os.path.getsize(d / "out.bin") + os.path.getsize(d / "out.idx")
    assert json.load(open(d / "out.tokenize.json"))["docs_kept"] == len(docs)


def test_two_workers_write_identical_files(corpus):
    d, _, _ = corpus
    tokenize(str(d / "docs.jsonl"), str(d / "w1"), str(d / "tok"), workers=1, progress=False)
    tokenize(str(d / "docs.jsonl"), str(d / "w2"), str(d / "tok"), workers=2, progress=False)
    for ext in (".bin", ".idx"):
        assert (d / f"w1{ext}").read_bytes() == (d / f"w2{ext}").read_bytes()


def test_no_eod_and_int32(corpus):
    d, docs, tok = corpus
    tokenize(str(d / "docs.jsonl"), str(d / "n"), str(d / "tok"), append_eod=False, dtype="int32",
             progress=False)  # fmt: skip
    ds = IndexedDataset(str(d / "n"))
    assert ds.dtype == np.int32 and ds[3].tolist() == tok.encode(docs[3])


def test_bad_input_is_counted_not_fatal(corpus, tmp_path):
    d, docs, tok = corpus
    src = tmp_path / "mixed.jsonl"
    with open(src, "wb") as f:
        f.write(json.dumps({"text": docs[0]}).encode() + b"\n")
        f.write(b"{bad json\n")
        f.write(b'{"no_text": 1}\n')
        f.write(b'{"text": "\xc3\x28"}\n')
        f.write(json.dumps({"text": docs[1]}).encode() + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    rep = tokenize([str(src), str(tmp_path / "empty.jsonl")], str(tmp_path / "o"), tok,
                   progress=False)  # fmt: skip
    assert rep["docs_kept"] == 2 and rep["empty_files"] == 1
    assert rep["dropped_by_reason"] == {"invalid_json": 1, "missing_text": 1, "invalid_utf8": 1}
    ds = IndexedDataset(str(tmp_path / "o"))
    assert ds[1].tolist() == tok.encode(docs[1]) + [tok.eod_id]


def test_chunked_encoding_is_exact(corpus):
    _, docs, tok = corpus
    text = "\n\n".join(docs) * 3
    pieces = split_for_encoding(text, 2000)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert encode_document(tok, text, chunk_chars=2000) == tok.encode(text)


def test_missing_tokenizer(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        tokenize(str(tmp_path / "a.jsonl"), str(tmp_path / "o"), str(tmp_path), progress=False)
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.slow
def test_50mb_single_document(corpus, tmp_path):
    """A 50 MB one-line document goes through quality, dedup and tokenize without blowing up."""
    from megatiny.data.dedup import DedupConfig, dedup
    from megatiny.data.quality import QualityConfig, filter_quality

    _, docs, tok = corpus
    unit = " ".join(docs[10:40]).replace("\n", " ") + " "
    big = (unit * (50_000_000 // len(unit) + 1))[:50_000_000].rstrip()
    src = tmp_path / "big.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "small", "text": docs[0]}) + "\n")
        f.write(json.dumps({"id": "big", "text": big}) + "\n")
    assert os.path.getsize(src) > 50_000_000
    q = filter_quality(str(src), str(tmp_path / "q.jsonl"),
                       QualityConfig(max_words=None, min_words=1, max_dup_line_ratio=None,
                                     max_dup_line_char_ratio=None, min_stop_words=None),
                       progress=False)  # fmt: skip
    assert q["docs_kept"] == 2
    r = dedup(str(tmp_path / "q.jsonl"), str(tmp_path / "d.jsonl"), DedupConfig(), progress=False)
    assert r["docs_kept"] == 2
    tokenize(str(tmp_path / "d.jsonl"), str(tmp_path / "t"), tok, progress=False)
    ds = IndexedDataset(str(tmp_path / "t"))
    assert len(ds) == 2 and ds[1][-1] == tok.eod_id and len(ds[1]) > 5_000_000
    head = tok.decode(ds[1][:500])
    assert big.startswith(head[:-20])
