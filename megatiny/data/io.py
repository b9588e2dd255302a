"""Streaming document I/O: many files and globs, JSONL / plain text, gzip / zstd, atomic output.

A *raw item* is what one input unit holds before parsing: one line of a JSONL file, one element
of a `.json` file that holds a JSON array (such a file is read whole), or one whole `.txt` file
(one document per text file). Parsing (`parse_item`) happens in the stage workers, so
JSON decoding is parallel too; a bad item becomes a drop reason, never an exception:

    invalid_utf8   the bytes are not UTF-8 (JSONL line; a .txt file is decoded with U+FFFD
                   replacement instead and counted as `utf8_replaced` in the read stats)
    invalid_json   the line is not a JSON object
    missing_text   the object has no string field `text_key`
    empty          the text is empty or whitespace only

Memory does not grow with corpus size: files are read line by line (a single line is held whole,
so a 50 MB one-line document costs 50 MB while it passes).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

TEXT_EXTS = (".txt", ".text", ".md")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
COMPRESSED_EXTS = (".gz", ".zst", ".zstd")


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Files named by paths, directories (all known files inside, recursively) or globs."""
    if isinstance(inputs, str):
        inputs = [inputs]
    out: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(
                p
                for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                if os.path.isfile(p) and _kind(p, strict=False) is not None
            )
        elif any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise FileNotFoundError(f"input {spec} does not exist")
        if not found:
            raise FileNotFoundError(f"input {spec} matches no files")
        out.extend(found)
    for p in out:
        _kind(p)  # fail early on an unknown extension, before any work is done
    return out


def _strip_compression(path: str) -> str:
    for ext in COMPRESSED_EXTS:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _kind(path: str, strict: bool = True) -> str | None:
    base = _strip_compression(path).lower()
    if base.endswith(JSONL_EXTS):
        return "jsonl"
    if base.endswith(TEXT_EXTS):
        return "txt"
    if strict:
        raise ValueError(
            f"{path}: unknown input type; use .jsonl/.json/.ndjson (one JSON object per line) or "
            ".txt/.md (one document per file), optionally .gz or .zst compressed"
        )
    return None


def open_binary(path: str):
    """A binary file object, decompressing gzip / zstd by extension."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


@dataclass
class ReadStats:
    files: int = 0
    empty_files: int = 0
    bytes: int = 0
    utf8_replaced: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "empty_files": self.empty_files,
            "bytes_in": self.bytes,
            "utf8_replaced": self.utf8_replaced,
            "read_errors": self.errors[:20],
        }


@dataclass
class RawItem:
    kind: str  # "jsonl" | "txt"
    data: bytes
    where: str  # "file:line" for reports


def iter_raw(paths: list[str], stats: ReadStats | None = None) -> Iterator[RawItem]:
    """Yield raw items from every file in order. A file that fails mid-way (e.g. a truncated
    gzip) is reported in `stats.errors` and the items read so far are kept."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        kind = _kind(path)
        stats.files += 1
        n_before = stats.bytes
        try:
            with open_binary(path) as f:
                if kind == "txt":
                    data = f.read()
                    stats.bytes += len(data)
                    if data.strip():
                        yield RawItem("txt", data, path)
                else:
                    first = f.peek(64)[:64].lstrip() if hasattr(f, "peek") else b""
                    if first.startswith(b"[") and _strip_compression(path).endswith(".json"):
                        yield from _json_array(path, f, stats)
                        continue
                    for lineno, line in enumerate(f, 1):
                        stats.bytes += len(line)
                        if line.strip():
                            yield RawItem("jsonl", line, f"{path}:{lineno}")
        except (OSError, EOFError, ValueError) as e:
            stats.errors.append(f"{path}: {type(e).__name__}: {e}")
        else:
            if stats.bytes == n_before:
                stats.empty_files += 1


def _json_array(path: str, f, stats: ReadStats) -> Iterator[RawItem]:
    """A `.json` file holding one JSON array of records (read whole: arrays do not stream)."""
    data = f.read()
    stats.bytes += len(data)
    try:
        records = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{path} starts like a JSON array but does not parse: {e}") from e
    for i, rec in enumerate(records):
        yield RawItem("jsonl", json.dumps(rec, ensure_ascii=False).encode("utf-8"), f"{path}[{i}]")


class BadItem(Exception):
    """Raised by parse_item; `args[0]` is the drop reason."""


def parse_item(item: RawItem, text_key: str = "text") -> tuple[dict, str]:
    """(record, text). For .txt the record is {text_key: text, "source": path}."""
    if item.kind == "txt":
        text = item.data.decode("utf-8", errors="replace")
        return {text_key: text, "source": os.path.basename(item.where)}, text
    try:
        line = item.data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadItem("invalid_utf8") from None
    try:
        rec = json.loads(line)
    except ValueError:
        raise BadItem("invalid_json") from None
    if not isinstance(rec, dict):
        raise BadItem("invalid_json")
    text = rec.get(text_key)
    if not isinstance(text, str):
        raise BadItem("missing_text")
    if not text.strip():
        raise BadItem("empty")
    return rec, text


def dump_record(rec: dict) -> bytes:
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def doc_name(rec: dict, where: str) -> str:
    """How reports name a document: its `id` field when it has one, else file:line."""
    for key in ("id", "doc_id", "uid"):
        if key in rec and isinstance(rec[key], str | int):
            return str(rec[key])
    return where


class AtomicWriter:
    """Binary file written under a temporary name and renamed on `close()`.

    `abort(keep_partial=True)` (used when a stage dies) keeps what was written so far as
    `PATH.partial` instead of deleting it, so a crash never loses finished work.
    Paths ending in .gz / .zst are compressed.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self._raw = open(self.tmp, "wb")
        if path.endswith(".gz"):
            self._f = gzip.GzipFile(fileobj=self._raw, mode="wb")
        elif path.endswith((".zst", ".zstd")):
            import zstandard

            self._f = zstandard.ZstdCompressor().stream_writer(self._raw, closefd=False)
        else:
            self._f = self._raw
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.bytes += len(data)

    def _close_file(self) -> None:
        if self._f is not self._raw:
            self._f.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def close(self) -> None:
        if self._raw.closed:
            return
        self._close_file()
        os.replace(self.tmp, self.path)

    def abort(self, keep_partial: bool = True) -> str | None:
        if self._raw.closed:
            return None
        self._close_file()
        if keep_partial:
            os.replace(self.tmp, self.path + ".partial")
            return self.path + ".partial"
        os.remove(self.tmp)
        return None

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json_atomic(path: str, obj) -> None:
    with AtomicWriter(path) as w:
        w.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
