"""Megatron-Core compatible indexed dataset: `PREFIX.bin` (raw tokens) + `PREFIX.idx` (index).

The `.idx` layout is byte-identical to Megatron-Core's `MMIDIDX` format (little endian):

    offset  size            field
    0       9               magic b"MMIDIDX\\x00\\x00"
    9       8  (uint64)     version = 1
    17      1  (uint8)      dtype code of the tokens in .bin (see DTYPE_CODES)
    18      8  (uint64)     S = sequence count
    26      8  (uint64)     D = document count (length of document_indices, i.e. documents + 1)
    34      4*S (int32)     sequence_lengths[i]   tokens in sequence i
    ...     8*S (int64)     sequence_pointers[i]  byte offset of sequence i in .bin
    ...     8*D (int64)     document_indices      0 = d_0 < ... < d_{D-1} = S; document j is the
                                                  sequences [d_j, d_{j+1})

`.bin` is the concatenation of all sequences, `sum(sequence_lengths) * itemsize` bytes, so
`sequence_pointers[i] = itemsize * sum(sequence_lengths[:i])`. `megatiny data tokenize` writes one
sequence per document (tokens + EOD), so sequences and documents coincide.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document count

# Megatron-Core's DType enum values.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """uint16 when every token id fits (Megatron's rule: vocab < 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


class IndexedDatasetWriter:
    """Stream documents into `PREFIX.bin` / `PREFIX.idx`, atomically.

    Tokens go to a temporary `.bin` as they come (memory holds only the per-sequence lengths);
    `finalize()` writes the index to a temporary `.idx`, fsyncs both and renames them into place,
    `.bin` first, so a reader never sees a new `.idx` next to a partial `.bin`. Leaving a `with`
    block by an exception removes the temporary files and leaves any previous dataset untouched.

        with IndexedDatasetWriter("out/corpus", vocab_size=tok.vocab_size) as w:
            for text in docs:
                w.add_document(tok.encode(text) + [tok.eod_id])
    """

    def __init__(self, path_prefix: str, dtype=None, vocab_size: int | None = None):
        self.path_prefix = str(path_prefix)
        self.dtype = np.dtype(dtype if dtype is not None else optimal_dtype(vocab_size))
        if self.dtype not in CODE_OF_DTYPE:
            names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
            raise ValueError(
                f"dtype {self.dtype} is not an MMIDIDX token dtype; use one of {names}"
            )
        self.vocab_size = vocab_size
        if vocab_size is not None and self.dtype.kind in "iu":
            hi = np.iinfo(self.dtype).max
            if vocab_size - 1 > hi:
                raise ValueError(
                    f"vocab_size={vocab_size} does not fit dtype {self.dtype.name} (max id {hi}); "
                    "use dtype=numpy.int32"
                )
        parent = os.path.dirname(os.path.abspath(self.path_prefix))
        os.makedirs(parent, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = bin_path(self.path_prefix) + suffix
        self._idx_tmp = idx_path(self.path_prefix) + suffix
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array("q")  # int64 while building; checked against int32 at finalize
        self._doc_idx = array("q", [0])
        self._finalized = False
        self.num_tokens = 0

    # -- adding data ---------------------------------------------------------------------------
    def _as_array(self, tokens) -> np.ndarray:
        a = np.asarray(tokens)
        if a.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {a.shape}")
        if a.size and self.dtype.kind in "iu" and a.dtype.kind in "iu":
            lo, hi = int(a.min()), int(a.max())
            info = np.iinfo(self.dtype)
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"token ids in [{lo}, {hi}] do not fit {self.dtype.name} "
                    f"[{info.min}, {info.max}] (writing {self.path_prefix}); "
                    "pass dtype=numpy.int32 or the right vocab_size"
                )
        return a.astype(self.dtype, copy=False)

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document (close it with `end_document`)."""
        if self._finalized:
            raise RuntimeError(f"{self.path_prefix}: writer already finalized")
        a = self._as_array(tokens)
        if a.size > np.iinfo(np.int32).max:
            raise ValueError(f"a sequence of {a.size} tokens exceeds the int32 length field")
        self._bin.write(a.tobytes(order="C"))
        self._lengths.append(int(a.size))
        self.num_tokens += int(a.size)

    def end_document(self) -> None:
        """Mark the end of a document made of the sequences added since the last one."""
        self._doc_idx.append(len(self._lengths))

    def add_document(self, tokens, lengths: Iterable[int] | None = None) -> None:
        """Append one document. With `lengths` the tokens are split into several sequences."""
        if lengths is None:
            self.add_item(tokens)
        else:
            a = np.asarray(tokens)
            lengths = [int(n) for n in lengths]
            if sum(lengths) != a.size:
                raise ValueError(f"lengths sum to {sum(lengths)} but the document has {a.size}")
            start = 0
            for n in lengths:
                self.add_item(a[start : start + n])
                start += n
        self.end_document()

    def add_index(self, path_prefix: str) -> None:
        """Append every document of another indexed dataset (same dtype)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"{path_prefix} has dtype {other.dtype.name}, writer {self.dtype.name}"
            )
        base = len(self._lengths)
        self._lengths.extend(int(n) for n in other.sequence_lengths)
        self._doc_idx.extend(int(d) + base for d in other.document_indices[1:])
        with open(bin_path(path_prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)
        self.num_tokens += other.num_tokens

    # -- finishing -----------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index, then atomically move `.bin` and `.idx` into place."""
        if self._finalized:
            return
        if self._doc_idx[-1] != len(self._lengths):
            self.end_document()  # trailing items without end_document form the last document
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence length exceeds int32")
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", doc_idx.size))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, bin_path(self.path_prefix))
        os.replace(self._idx_tmp, idx_path(self.path_prefix))
        self._finalized = True

    def abort(self) -> None:
        """Drop everything written so far (temporary files only)."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._finalized = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1


class IndexedDataset:
    """Read-only view of `PREFIX.bin` / `PREFIX.idx` by mmap.

    `len(ds)` is the number of sequences; `ds[i]` (or a contiguous slice) returns token arrays
    that are views into the mapped file; `ds.get(i, offset, length)` reads part of a sequence;
    `ds.document(j)` concatenates document j's sequences. Opening checks magic, version, dtype
    code, that the `.idx` size matches its counts and the `.bin` size matches the lengths, and
    raises ValueError naming the file otherwise.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = str(path_prefix)
        self._open()

    def _open(self) -> None:
        ip, bp = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for p in (ip, bp):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"{p} not found: an indexed dataset needs both {ip} and {bp} "
                    "(write them with `megatiny data tokenize`)"
                )
        isize = os.path.getsize(ip)
        with open(ip, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head[:9] != MAGIC[: min(9, len(head))]:
            raise ValueError(
                f"{ip} is not a Megatron MMIDIDX index (bad magic {head[:9]!r}, "
                f"expected {MAGIC!r}); was it written by another tool?"
            )
        if len(head) < HEADER_SIZE:
            raise ValueError(f"{ip} is truncated: {isize} bytes, the header alone is 34")
        version = struct.unpack("<Q", head[9:17])[0]
        if version != VERSION:
            raise ValueError(f"{ip} has index version {version}; only version 1 is supported")
        code = head[17]
        if code not in DTYPE_CODES:
            raise ValueError(f"{ip} has unknown dtype code {code}; known: {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        expect = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
        # Megatron's multimodal variant appends one int8 mode per sequence.
        if isize not in (expect, expect + n_seq):
            raise ValueError(
                f"{ip} is truncated or corrupt: {isize} bytes, but its header ({n_seq} sequences, "
                f"{n_doc} document indices) needs {expect}; re-run `megatiny data tokenize`"
            )
        self._idx_mmap = np.memmap(ip, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)
        di = self.document_indices
        if n_doc < 1 or di[0] != 0 or di[-1] != n_seq or np.any(np.diff(di) < 0):
            raise ValueError(
                f"{ip} is corrupt: document_indices must rise from 0 to the sequence count {n_seq}"
            )
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bsize = os.path.getsize(bp)
        want = self.num_tokens * self.dtype.itemsize
        if bsize != want:
            raise ValueError(
                f"{bp} has {bsize} bytes but {ip} describes {self.num_tokens} tokens of "
                f"{self.dtype.name} = {want} bytes: the pair is truncated or mismatched"
            )
        if n_seq and (
            self.sequence_pointers[0] != 0
            or self.sequence_pointers[-1] + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            != bsize
        ):
            raise ValueError(f"{ip} is corrupt: sequence pointers disagree with the lengths")
        if bsize:
            self._bin_mmap = np.memmap(bp, mode="r", dtype=self.dtype)
        else:  # mmap cannot map an empty file
            self._bin_mmap = np.zeros(0, dtype=self.dtype)

    # pickling (e.g. DataLoader workers) re-opens the files rather than copying the maps
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size) - 1

    def _check(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        return i

    def _span(self, i: int, offset: int, length: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin_mmap[start : start + length]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            return [self[i] for i in range(start, stop)]
        i = self._check(idx)
        return self._span(i, 0, int(self.sequence_lengths[i]))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx (to its end when length is None)."""
        i = self._check(idx)
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"get({i}, offset={offset}, length={length}): sequence has {n} tokens")
        return self._span(i, offset, length)

    def document(self, j: int) -> np.ndarray:
        """All tokens of document j (its sequences concatenated)."""
        nd = self.num_documents
        if not -nd <= j < nd:
            raise IndexError(f"document index {j} out of range for {nd} documents")
        j %= nd
        a, b = int(self.document_indices[j]), int(self.document_indices[j + 1])
        if a == b:
            return self._bin_mmap[0:0]
        start = int(self.sequence_pointers[a]) // self.dtype.itemsize
        stop = start + int(self.sequence_lengths[a:b].sum(dtype=np.int64))
        return self._bin_mmap[start:stop]

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype.name})"
        )
