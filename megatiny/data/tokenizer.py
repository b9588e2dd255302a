"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, save, load.

`load_tokenizer(path)` accepts a `tokenizer.json` file, a directory holding one, or a directory
with GPT-2 style `vocab.json` + `merges.txt` (also the `encoder.json` + `vocab.bpe` spelling).
The wrapper encodes without adding special tokens; the document separator (EOD) is
`<|endoftext|>`, appended by `megatiny data tokenize`, never inserted by `encode`.

Byte-level BPE (GPT-2): text is UTF-8 bytes mapped to 256 printable symbols, split by the GPT-2
regex into word-like pieces, and merged by learned pair merges, so any string is encodable
(no unknown token) and `decode(encode(s)) == s`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from megatiny.fsutil import atomic_path

EOD_TOKEN = "<|endoftext|>"
# EOS spellings of other common tokenizers, tried when <|endoftext|> is absent.
_EOD_FALLBACKS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer:
    """Thin wrapper: `.encode(str) -> list[int]`, `.decode(ids) -> str`, `.vocab_size`, `.eod_id`."""

    def __init__(self, hf_tokenizer, path: str | None = None):
        self._tok = hf_tokenizer
        # A literal "<|endoftext|>" inside a document is text, not a document boundary: only
        # `megatiny data tokenize` inserts EOD ids.
        hf_tokenizer.encode_special_tokens = True
        self.path = path
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.eod_id = None
        for name in _EOD_FALLBACKS:
            tid = hf_tokenizer.token_to_id(name)
            if tid is not None:
                self.eod_id = int(tid)
                self.eod_token = name
                break
        if self.eod_id is None:
            raise ValueError(
                f"tokenizer {path or ''} has no end-of-document token (looked for "
                f"{', '.join(_EOD_FALLBACKS)}); train one with `megatiny data train-tokenizer`"
            )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str) -> str:
        """Save as `tokenizer.json` (path may be a directory); atomic. Returns the file path."""
        out = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        with atomic_path(out) as tmp:
            self._tok.save(tmp)
        self.path = out
        return out

    @property
    def hf(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    # Pickle by path so worker processes reload rather than ship the Rust object.
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "path": self.path}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"]), state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def _byte_level_bpe(vocab: dict, merges: list):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer(path_or_dir: str) -> Tokenizer:
    """Load a trained tokenizer (see module docstring for the accepted layouts)."""
    from tokenizers import Tokenizer as HFTokenizer

    p = str(path_or_dir)
    if os.path.isdir(p):
        tj = os.path.join(p, "tokenizer.json")
        if os.path.isfile(tj):
            p = tj
        else:
            for vname, mname in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
                v, m = os.path.join(p, vname), os.path.join(p, mname)
                if os.path.isfile(v) and os.path.isfile(m):
                    with open(v, encoding="utf-8") as f:
                        vocab = json.load(f)
                    with open(m, encoding="utf-8") as f:
                        merges = [
                            tuple(line.split())
                            for line in f.read().splitlines()
                            if line and not line.startswith("#version")
                        ]
                    return Tokenizer(_byte_level_bpe(vocab, merges), path=p)
            raise FileNotFoundError(
                f"{p} holds no tokenizer.json (nor vocab.json + merges.txt); "
                "train one with `megatiny data train-tokenizer --output DIR`"
            )
    if not os.path.isfile(p):
        raise FileNotFoundError(f"tokenizer {p} not found")
    try:
        hf = HFTokenizer.from_file(p)
    except Exception as e:  # the Rust error is terse; say which file
        raise ValueError(f"{p} is not a Hugging Face tokenizer.json: {e}") from e
    return Tokenizer(hf, path=p)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output: str | None = None,
    min_frequency: int = 2,
    special_tokens: Iterable[str] = (EOD_TOKEN,),
    show_progress: bool = True,
    length: int | None = None,
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on an iterator of texts (streamed, not held in memory).

    The vocabulary is the 256 byte symbols + `special_tokens` + learned merges, `vocab_size` in all.
    When `output` is given the result is saved to `output/tokenizer.json` (or that .json path).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if EOD_TOKEN not in special_tokens:
        special_tokens.insert(0, EOD_TOKEN)
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {floor} byte symbols + special tokens; "
            "use e.g. --vocab-size 4096"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer, length=length)
    out = Tokenizer(tok)
    if output is not None:
        out.save(output)
    return out


def _batched(texts: Iterable[str], n: int = 1000) -> Iterator[list[str]]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
