"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, save, load.

`load_tokenizer(path)` accepts a `tokenizer.json` file, a directory holding one, or a directory
with GPT-2 style `vocab.json` + `merges.txt` (also the `encoder.json` + `vocab.bpe` spelling).
The wrapper encodes without adding special tokens.

Special tokens. A Hugging Face tokenizer directory says which tokens are its bos / eos / pad in
`tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json`; those are read
first (in that order; `eos_token=` overrides them), so SmolLM2's end of turn is `<|im_end|>` (id
2), not its unknown token `<|endoftext|>` (id 0). Only a tokenizer without any of these files --
our own `megatiny data train-tokenizer` output, GPT-2's vocab.json + merges.txt -- falls back to
the first of `<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>`, `<|im_end|>` in its vocabulary.
`eod_id` (the document separator `megatiny data tokenize` appends) is the eos id.
`stop_ids` are every id that ends generation (eos and generation_config's eos list).

Two encodings. `encode(text)` (the data pipeline's rule) reads a literal `<|endoftext|>` inside
a document as text, never as a boundary. `encode(text, special=True)` (prompts, chat turns)
reads special-token spellings as the special tokens, as transformers does: `<|im_start|>user`
is 2 ids, not 7. `apply_chat_template(messages)` renders the tokenizer's own Jinja chat
template (from tokenizer_config.json or chat_template.jinja) with transformers' renderer.

Byte-level BPE (GPT-2): text is UTF-8 bytes mapped to 256 printable symbols, split by the GPT-2
regex into word-like pieces, and merged by learned pair merges, so any string is encodable
(no unknown token) and `decode(encode(s)) == s`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence

from megatiny.fsutil import atomic_path

EOD_TOKEN = "<|endoftext|>"
# EOS spellings of other common tokenizers, tried when <|endoftext|> is absent.
_EOD_FALLBACKS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


# Files of a Hugging Face tokenizer directory that describe it (copied along by `convert`).
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja", "chat_template.json")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "encoder.json", "vocab.bpe")


class Tokenizer:
    """Thin wrapper: `.encode(str) -> list[int]`, `.decode(ids) -> str`, `.vocab_size`,
    `.eos_id` (= `.eod_id`), `.bos_id`, `.pad_id`, `.stop_ids`, `.chat_template`.

    `special` maps "bos_token" / "eos_token" / "pad_token" / "unk_token" to their spellings (from
    the tokenizer's configuration); `generation` is generation_config.json's dict."""

    def __init__(self, hf_tokenizer, path: str | None = None, special: dict | None = None,
                 chat_template: str | None = None, generation: dict | None = None):  # fmt: skip
        self._tok = hf_tokenizer
        # A literal "<|endoftext|>" inside a document is text, not a document boundary: only
        # `megatiny data tokenize` inserts EOD ids (`encode(text, special=True)` for prompts).
        hf_tokenizer.encode_special_tokens = True
        self.path = path
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.special = {k: v for k, v in (special or {}).items() if v is not None}
        self.chat_template = chat_template
        self.generation = dict(generation or {})
        gen_eos = _id_list(self.generation.get("eos_token_id"))
        self.eos_token = self.special.get("eos_token")
        if self.eos_token is None and gen_eos:
            self.eos_token = hf_tokenizer.id_to_token(gen_eos[0])
        if self.eos_token is None:  # our own BPE / a bare vocabulary: the first known spelling
            self.eos_token = next((t for t in _EOD_FALLBACKS if self.token_to_id(t) is not None),
                                  None)  # fmt: skip
        if self.eos_token is None or self.token_to_id(self.eos_token) is None:
            raise ValueError(
                f"tokenizer {path or ''} has no end-of-document token (its configuration names "
                f"{self.eos_token!r}; looked for {', '.join(_EOD_FALLBACKS)}); train one with "
                "`megatiny data train-tokenizer` or pass the eos token explicitly (--eos-token)"
            )
        self.eos_id = self.eod_id = int(self.token_to_id(self.eos_token))
        self.eod_token = self.eos_token
        self.bos_id = self._id_of("bos_token", self.generation.get("bos_token_id"))
        pad = self._id_of("pad_token", self.generation.get("pad_token_id"))
        self.pad_id = self.eos_id if pad is None else pad
        self.stop_ids = [self.eos_id] + [i for i in gen_eos if i != self.eos_id]

    def _id_of(self, name: str, fallback) -> int | None:
        token = self.special.get(name)
        if token is not None and self.token_to_id(token) is not None:
            return int(self.token_to_id(token))
        ids = _id_list(fallback)
        return ids[0] if ids else None

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; `special=True` reads special-token spellings as those tokens."""
        if not special:
            return self._tok.encode(text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        self._tok.encode_special_tokens = not special
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        finally:
            self._tok.encode_special_tokens = True

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):  # fmt: skip
        """The conversation rendered by the tokenizer's chat template (as transformers'
        `apply_chat_template`: same Jinja environment and variables), or its ids."""
        if not self.chat_template:
            raise ValueError(
                f"tokenizer {self.path or ''} has no chat template (none in tokenizer_config.json "
                "or chat_template.jinja); use a chat model's tokenizer or a plain prompt"
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        variables = {k: v for k, v in self.special.items() if k.endswith("_token")}
        rendered, _ = render_jinja_template(
            conversations=[list(messages)], chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt, **variables,
        )  # fmt: skip
        return self.encode(rendered[0], special=True) if tokenize else rendered[0]

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
        return {"json": self._tok.to_str(), "path": self.path, "special": self.special,
                "chat_template": self.chat_template, "generation": self.generation}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"]), state["path"], state["special"],
                      state["chat_template"], state["generation"])  # fmt: skip

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token!r} ({self.eos_id}), bos_id={self.bos_id}, "
                f"pad_id={self.pad_id})")  # fmt: skip


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: str) -> tuple[dict, str | None, dict]:
    """(special token spellings, chat template, generation_config) of a Hugging Face tokenizer
    directory; empty where its files are absent."""

    def load(name):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    config, tokens_map = load("tokenizer_config.json"), load("special_tokens_map.json")
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = _token_text(config.get(name)) or _token_text(tokens_map.get(name))
        if value is not None:
            special[name] = value
    template = config.get("chat_template") or load("chat_template.json").get("chat_template")
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # named templates: transformers' default is "default"
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return special, template, load("generation_config.json")


def copy_tokenizer_files(source: str, directory: str) -> list[str]:
    """Copy a tokenizer's files (TOKENIZER_FILES + CONFIG_FILES present in `source`, a
    directory or a tokenizer.json) into `directory`; returns the names copied."""
    import shutil

    src = source if os.path.isdir(source) else os.path.dirname(source) or "."
    names = [n for n in TOKENIZER_FILES + CONFIG_FILES if os.path.isfile(os.path.join(src, n))]
    if not os.path.isdir(source) and os.path.basename(source) not in names:
        names.append(os.path.basename(source))  # a lone tokenizer file of another name
    os.makedirs(directory, exist_ok=True)
    for name in names:
        target = "tokenizer.json" if name == os.path.basename(source) else name
        shutil.copyfile(os.path.join(src, name), os.path.join(directory, target))
    return names


def _byte_level_bpe(vocab: dict, merges: list):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer(path_or_dir: str, eos_token: str | None = None) -> Tokenizer:
    """Load a trained tokenizer (see module docstring for the accepted layouts and the special
    tokens); `eos_token` overrides the configured end-of-sequence spelling."""
    p = str(path_or_dir)
    directory = p if os.path.isdir(p) else os.path.dirname(p) or "."
    special, template, generation = read_tokenizer_config(directory)
    if eos_token is not None:
        special["eos_token"] = eos_token
    tok = _load_backend(p)
    try:
        return Tokenizer(tok, p if not os.path.isdir(p) else _backend_path(p), special, template,
                         generation)  # fmt: skip
    except ValueError:
        if eos_token is not None and tok.token_to_id(eos_token) is None:
            raise ValueError(f"--eos-token {eos_token!r} is not in the vocabulary of {p}") from None
        raise


def _backend_path(directory: str) -> str:
    tj = os.path.join(directory, "tokenizer.json")
    return tj if os.path.isfile(tj) else directory


def _load_backend(p: str):
    from tokenizers import Tokenizer as HFTokenizer

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
                    return _byte_level_bpe(vocab, merges)
            raise FileNotFoundError(
                f"{p} holds no tokenizer.json (nor vocab.json + merges.txt); "
                "train one with `megatiny data train-tokenizer --output DIR`"
            )
    if not os.path.isfile(p):
        raise FileNotFoundError(f"tokenizer {p} not found")
    try:
        return HFTokenizer.from_file(p)
    except Exception as e:  # the Rust error is terse; say which file
        raise ValueError(f"{p} is not a Hugging Face tokenizer.json: {e}") from e


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
    out = Tokenizer(tok, special={"eos_token": EOD_TOKEN})
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
