"""The `train-tokenizer` and `tokenize` stages.

`tokenize` encodes every document in worker processes, appends the EOD id (`<|endoftext|>`),
and writes one sequence per document to `OUT.bin` / `OUT.idx` (Megatron MMIDIDX, uint16 when the
vocabulary fits, else int32), in input order for any number of workers.

Two edges where Megatron's `tools/preprocess_data.py` differs, available as options:
- `keep_empty=True`: a document whose text is empty or whitespace is kept as Megatron keeps it
  (we drop it by default): its ids, if any, + EOD; one that encodes to no ids at all becomes a
  document of zero sequences (a repeated entry of document_indices, no EOD). Document counts
  and the `.idx` then match Megatron's byte for byte.
- `eod_in_text=True`: special-token spellings in the text are read as those tokens, so a
  literal `<|endoftext|>` becomes the EOD id (Megatron's HuggingFaceTokenizer does this; our
  default reads it as text, so a document cannot fake a boundary).

Very long documents are encoded in pieces of about `chunk_chars` characters, cut only before a
single space that follows a non-space and precedes a non-space. Under the GPT-2 pre-tokenizer
regex such a space always starts a new pre-token (" word"), and BPE never merges across
pre-tokens, so the pieces' ids concatenate to exactly the whole text's ids, at bounded memory.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from megatiny.data.indexed import IndexedDatasetWriter, optimal_dtype
from megatiny.data.io import (
    BadItem,
    ReadStats,
    expand_inputs,
    iter_raw,
    parse_item,
    write_json_atomic,
)
from megatiny.data.stage import Result, run_stage
from megatiny.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def split_for_encoding(text: str, chunk_chars: int) -> list[str]:
    """Cut `text` into pieces of about chunk_chars at encoding-neutral spaces (see module doc)."""
    if len(text) <= chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = start + chunk_chars
        while cut < len(text) - 1 and not (
            text[cut] == " " and not text[cut - 1].isspace() and not text[cut + 1].isspace()
        ):
            cut += 1
        if cut >= len(text) - 1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_document(tok: Tokenizer, text: str, chunk_chars: int = 1 << 20) -> list[int]:
    pieces = split_for_encoding(text, chunk_chars)
    if len(pieces) == 1:
        return tok.encode(text)
    ids: list[int] = []
    for p in pieces:
        ids.extend(tok.encode(p))
    return ids


_STATE: dict = {}


def _init(tok: Tokenizer, text_key: str, dtype, append_eod: bool, chunk_chars: int,
          keep_empty: bool = False, eod_in_text: bool = False) -> None:  # fmt: skip
    _STATE.update(tok=tok, text_key=text_key, dtype=dtype, eod=append_eod, chunk=chunk_chars,
                  keep_empty=keep_empty, special=eod_in_text)  # fmt: skip


def _empty_text(it, text_key: str) -> str | None:
    """The whitespace-only text of an item parse_item dropped as empty (Megatron keeps it)."""
    import json

    try:
        return json.loads(it.data.decode("utf-8"))[text_key]
    except (ValueError, KeyError, TypeError):
        return None


def _work_batch(items) -> list[Result]:
    tok: Tokenizer = _STATE["tok"]
    out: list[Result | None] = []
    texts, slots = [], []
    for it in items:
        try:
            _, text = parse_item(it, _STATE["text_key"])
        except BadItem as e:
            text = None
            if e.args[0] == "empty" and _STATE.get("keep_empty"):
                text = _empty_text(it, _STATE["text_key"])
            if text is None:
                out.append(Result(e.args[0], nbytes=len(it.data), where=it.where))
                continue
        out.append(None)
        texts.append(text)
        slots.append(len(out) - 1)
    special = _STATE.get("special", False)
    short = [i for i, t in enumerate(texts) if len(t) <= _STATE["chunk"] or special]
    batch = tok.encode_batch([texts[i] for i in short], special=special)
    encoded: dict[int, list[int]] = dict(zip(short, batch))
    for i, t in enumerate(texts):
        if i not in encoded:
            encoded[i] = encode_document(tok, t, _STATE["chunk"])
    for i, slot in enumerate(slots):
        ids = encoded[i]
        if _STATE["eod"] and ids:  # Megatron appends no EOD to a document without ids
            ids = ids + [tok.eod_id]
        arr = np.asarray(ids, dtype=_STATE["dtype"])
        it = items[slot]
        out[slot] = Result(None, None, len(it.data), it.where, arr)
    return out  # type: ignore[return-value]


def tokenize(
    inputs,
    output_prefix: str,
    tokenizer: str | Tokenizer,
    workers: int = 1,
    text_key: str = "text",
    append_eod: bool = True,
    dtype=None,
    chunk_chars: int = 1 << 20,
    report_path: str | None = None,
    progress: bool = True,
    keep_empty: bool = False,
    eod_in_text: bool = False,
) -> dict:
    """Encode documents to `output_prefix.bin/.idx`; report to `output_prefix.tokenize.json`.
    `keep_empty` / `eod_in_text`: Megatron's preprocess_data behaviour (module docstring)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = np.dtype(dtype or optimal_dtype(tok.vocab_size))
    writer = IndexedDatasetWriter(output_prefix, dtype=dtype, vocab_size=tok.vocab_size)
    _init(tok, text_key, dtype, append_eod, chunk_chars, keep_empty, eod_in_text)

    def decide(res: Result) -> None:
        # a document without ids is a document of no sequences, as Megatron writes it
        writer.add_document(res.payload, None if res.payload.size else [])

    def finish(rep) -> None:
        writer.finalize()
        rep.output = output_prefix
        rep.bytes_out = os.path.getsize(output_prefix + ".bin") + os.path.getsize(
            output_prefix + ".idx"
        )
        secs = time.perf_counter() - rep.t0
        rep.extra.update(
            tokens=writer.num_tokens,
            tokens_per_s=round(writer.num_tokens / secs, 1),
            dtype=dtype.name,
            vocab_size=tok.vocab_size,
            eod_id=tok.eod_id if append_eod else None,
            tokenizer=tok.path,
        )

    try:
        return run_stage(
            "tokenize",
            inputs,
            None,
            _work_batch,
            workers=workers,
            decide=decide,
            finish=finish,
            report_path=report_path or f"{output_prefix}.tokenize.json",
            progress=progress,
            batch_size=64,
            window=2048,
        )
    except BaseException:
        if not writer._finalized:
            writer.abort()
        raise


def iter_texts(inputs, text_key="text", stats=None, dropped=None, progress=False):
    """Texts of every valid document; bad items are skipped and counted in `dropped`."""
    paths = expand_inputs(inputs)
    stats = stats if stats is not None else ReadStats()
    dropped = dropped if dropped is not None else Counter()
    bar = tqdm(desc="read", unit="doc", disable=not progress, mininterval=0.5)
    for it in iter_raw(paths, stats):
        try:
            _, text = parse_item(it, text_key)
        except BadItem as e:
            dropped[e.args[0]] += 1
            continue
        bar.update(1)
        yield text
    bar.close()


def train_tokenizer_stage(
    inputs,
    output_dir: str,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    text_key: str = "text",
    report_path: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a byte-level BPE on the documents; writes output_dir/tokenizer.json + a report."""
    t0 = time.perf_counter()
    stats = ReadStats()
    dropped: Counter = Counter()
    counter = {"docs": 0}

    def texts():
        for t in iter_texts(inputs, text_key, stats, dropped, progress=progress):
            counter["docs"] += 1
            yield t

    tok = train_tokenizer(
        texts(), vocab_size, output_dir, min_frequency=min_frequency, show_progress=progress
    )
    secs = time.perf_counter() - t0
    rep = {
        "stage": "train-tokenizer",
        "inputs": expand_inputs(inputs)[:50],
        "output": tok.path,
        "docs_in": counter["docs"] + sum(dropped.values()),
        "docs_kept": counter["docs"],
        "dropped_by_reason": dict(dropped),
        **stats.as_dict(),
        "seconds": round(secs, 4),
        "docs_per_s": round(counter["docs"] / secs, 2),
        "mb_per_s": round(stats.bytes / secs / 1e6, 4),
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "eod_id": tok.eod_id,
    }
    write_json_atomic(report_path or os.path.join(output_dir, "train-tokenizer.json"), rep)
    return rep
