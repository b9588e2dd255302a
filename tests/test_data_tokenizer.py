"""Byte-level BPE: train, save, reload (tokenizer.json and vocab.json + merges.txt), round trip."""

import os
import pickle
import random
import shutil

import pytest

from megatiny.data.tokenizer import EOD_TOKEN, load_tokenizer, train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(1500)]
    out = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(texts, vocab_size=300, output=str(out), show_progress=False)
    return tok, out


def test_train_save_load(trained):
    tok, out = trained
    assert os.path.isfile(out / "tokenizer.json")
    assert tok.vocab_size == 300
    assert tok.eod_id == tok.token_to_id(EOD_TOKEN)
    again = load_tokenizer(str(out))
    s = "the lazy wizard jumps"
    assert again.encode(s) == tok.encode(s)
    assert again.vocab_size == tok.vocab_size and again.eod_id == tok.eod_id
    # frequent words become single tokens: the merges were learned
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" wizards")) < len(" wizards")


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "Grüße, 你好, Здравствуйте 🙂", "  tabs\tand\n\nnewlines  ", "", "\x00\x7f"],
)
def test_round_trip_any_text(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_literal_eod_in_text_is_not_a_boundary(trained):
    tok, _ = trained
    ids = tok.encode(f"a {EOD_TOKEN} b")
    assert tok.eod_id not in ids
    assert tok.decode(ids) == f"a {EOD_TOKEN} b"


def test_gpt2_style_vocab_merges_dir(trained, tmp_path):
    tok, _ = trained
    tok.hf.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    shutil.move(tmp_path / "vocab.json", gdir / "encoder.json")
    shutil.move(tmp_path / "merges.txt", gdir / "vocab.bpe")
    g = load_tokenizer(str(gdir))
    s = "the quick brown fox"
    assert g.encode(s) == tok.encode(s)
    assert g.eod_id == tok.eod_id


def test_pickle(trained):
    tok, _ = trained
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode("seven wizards") == tok.encode("seven wizards")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["x"], vocab_size=100)
