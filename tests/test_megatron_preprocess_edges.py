"""Where `megatiny data tokenize` can match Megatron's `tools/preprocess_data.py` byte for byte:
empty documents kept as documents of no sequences (`keep_empty`), a literal `<|endoftext|>` read
as the EOD id (`eod_in_text`); and `build_sample_idx` refusing the -1 offset of an empty last
document (C++ and the numpy reference), as Megatron's wrapper does.

The reference `.idx` is written here from Megatron's own rules, independently of our writer:
preprocess_data's `Encoder.encode` (ids of the text; EOD appended only when there are ids;
one sequence length per non-empty text) and `IndexedDatasetBuilder.add_document` (bytes, then
`sequence_lengths.extend(lengths)`, then `document_indices.append(len(sequence_lengths))`),
finalised in the MMIDIDX layout (magic, version 1, dtype code, counts, lengths int32, pointers
int64, document indices int64)."""

import json
import struct

import numpy as np
import pytest

from megatiny import _C
from megatiny.data import helpers_ref
from megatiny.data.binarize import tokenize
from megatiny.data.indexed import IndexedDataset
from megatiny.data.tokenizer import train_tokenizer

DOCS = ["first document here", "", "   ", "a literal <|endoftext|> inside", "last one"]


def megatron_idx(tok, docs, special: bool) -> tuple[bytes, bytes]:
    """(.bin, .idx) as Megatron's preprocess_data + IndexedDatasetBuilder write them (uint16)."""
    data, lengths, doc_index = b"", [], [0]
    for text in docs:
        ids = tok.encode(text, special=special)  # Encoder.encode: one "sentence" per document
        sentence_lens = [len(ids)] if ids else []
        if ids:  # append_eod only for a non-empty document
            ids, sentence_lens[-1] = ids + [tok.eod_id], sentence_lens[-1] + 1
        data += np.asarray(ids, dtype=np.uint16).tobytes()
        lengths.extend(sentence_lens)
        doc_index.append(len(lengths))
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1] * 2]).astype(np.int64)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)  # 8 = uint16
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    idx += np.asarray(lengths, np.int32).tobytes() + pointers.tobytes()
    idx += np.asarray(doc_index, np.int64).tobytes()
    return data, idx


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges")
    tok = train_tokenizer([t for t in DOCS if t.strip()] * 20, 300, output=str(d / "tok"),
                          show_progress=False)  # fmt: skip
    with open(d / "docs.jsonl", "w") as f:
        for t in DOCS:
            f.write(json.dumps({"text": t}) + "\n")
    return d, tok


@pytest.mark.parametrize("special", [False, True])
def test_keep_empty_matches_megatron_byte_for_byte(corpus, special):
    d, tok = corpus
    out = str(d / f"kept{int(special)}")
    tokenize(str(d / "docs.jsonl"), out, str(d / "tok"), progress=False, keep_empty=True,
             eod_in_text=special)  # fmt: skip
    ref_bin, ref_idx = megatron_idx(tok, DOCS, special)
    assert open(out + ".bin", "rb").read() == ref_bin
    assert open(out + ".idx", "rb").read() == ref_idx
    ds = IndexedDataset(out)
    assert ds.num_documents == len(DOCS)  # the empty text is a document of no sequences
    assert len(ds) == len(DOCS) - 1
    literal = ds[2].tolist()  # the 4th document is the 3rd sequence
    assert (literal.count(tok.eod_id) == 2) == special  # the literal EOD became the EOD id


def test_default_drops_empty_documents_and_keeps_literal_eod_as_text(corpus):
    d, tok = corpus
    tokenize(str(d / "docs.jsonl"), str(d / "dropped"), str(d / "tok"), progress=False)
    ds = IndexedDataset(str(d / "dropped"))
    assert ds.num_documents == len(ds) == 3
    assert ds[1].tolist().count(tok.eod_id) == 1


@pytest.mark.parametrize("build", [_C.build_sample_idx, helpers_ref.build_sample_idx])
def test_empty_last_document_with_kept_partial_sample_is_refused(build):
    sizes = np.array([5, 6, 0], dtype=np.int32)
    docs = np.array([0, 1, 2], dtype=np.int32)
    with pytest.raises(ValueError, match="last document of document_idx is empty"):
        build(sizes, docs, 4, 1, 11, False, 1)
    # drop_last, or no extra token: no negative offset, no error
    assert build(sizes, docs, 4, 1, 11, True, 1).min() >= 0
    assert build(sizes, docs, 4, 1, 11, False, 0).min() >= 0


def test_tokenize_cli_flags_reach_the_tokenizer(corpus):
    from megatiny.cli import main

    d, tok = corpus
    out = str(d / "cli")
    code = main(["data", "tokenize", "--input", str(d / "docs.jsonl"), "--tokenizer",
                 str(d / "tok"), "--output-prefix", out, "--keep-empty", "--eod-in-text"])  # fmt: skip
    assert code in (0, None)
    ref_bin, ref_idx = megatron_idx(tok, DOCS, True)
    assert open(out + ".bin", "rb").read() == ref_bin
    assert open(out + ".idx", "rb").read() == ref_idx
