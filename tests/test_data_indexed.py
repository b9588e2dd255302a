"""MMIDIDX indexed dataset: byte layout, round trip, atomic writes, clear errors on bad files."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatiny.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    optimal_dtype,
)


def _golden_idx(lengths, doc_idx, code, itemsize):
    """The .idx bytes built field by field from Megatron-Core's documented layout."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    ptr = 0
    for n in lengths:
        out += struct.pack("<q", ptr)
        ptr += n * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


# megatron.core.datasets.indexed_dataset.DType, in declaration order (values 1, 2, ...).
MEGATRON_DTYPE_ENUM = "uint8 int8 int16 int32 int64 float64 float32 uint16".split()


def test_dtype_codes_match_megatron():
    assert DTYPE_CODES == {
        code: getattr(np, name) for code, name in enumerate(MEGATRON_DTYPE_ENUM, start=1)
    }
    assert optimal_dtype(50257) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(None) is np.int32


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_bytes_match_megatron_layout(tmp_path, dtype, code):
    docs = [[5, 6, 7], [1], [9, 9, 9, 9, 0]]
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for d in docs:
            w.add_document(d)
        # a two-sequence document through add_item / end_document
        w.add_item([3, 4])
        w.add_item([2])
        w.end_document()
    lengths = [3, 1, 5, 2, 1]
    doc_idx = [0, 1, 2, 3, 5]
    itemsize = np.dtype(dtype).itemsize
    assert open(prefix + ".idx", "rb").read() == _golden_idx(lengths, doc_idx, code, itemsize)
    flat = [t for d in docs for t in d] + [3, 4, 2]
    assert open(prefix + ".bin", "rb").read() == np.array(flat, dtype=dtype).tobytes()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_round_trip_and_accessors(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=rng.integers(0, 40)) for _ in range(200)]
    prefix = str(tmp_path / "rt")
    with IndexedDatasetWriter(prefix, vocab_size=50257) as w:
        for d in docs:
            w.add_document(d)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == 200 and ds.num_documents == 200
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document(i), d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    i = next(k for k, d in enumerate(docs) if len(d) > 10)
    np.testing.assert_array_equal(ds.get(i, offset=3, length=5), docs[i][3:8])
    np.testing.assert_array_equal(ds.get(i, offset=4), docs[i][4:])
    sl = ds[10:13]
    for a, b in zip(sl, docs[10:13]):
        np.testing.assert_array_equal(a, b)
    assert ds.sequence_lengths.dtype == np.int32
    assert ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64
    with pytest.raises(IndexError):
        ds[200]
    with pytest.raises(IndexError):
        ds.get(i, offset=len(docs[i]), length=1)
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[7], docs[7])


def test_multi_sequence_documents_and_add_index(tmp_path):
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    with IndexedDatasetWriter(a, dtype=np.int32) as w:
        w.add_document([1, 2, 3, 4], lengths=[1, 3])
        w.add_document([5])
    with IndexedDatasetWriter(b, dtype=np.int32) as w:
        w.add_document([70000, 8])
    with IndexedDatasetWriter(c, dtype=np.int32) as w:
        w.add_index(a)
        w.add_index(b)
    ds = IndexedDataset(c)
    assert list(ds.document_indices) == [0, 2, 3, 4]
    assert [list(ds[i]) for i in range(len(ds))] == [[1], [2, 3, 4], [5], [70000, 8]]
    assert list(ds.document(0)) == [1, 2, 3, 4]


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "e")
    with IndexedDatasetWriter(prefix, dtype=np.uint16):
        pass
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_token_out_of_dtype_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint16"):
        with IndexedDatasetWriter(str(tmp_path / "x"), dtype=np.uint16) as w:
            w.add_document([1, 70000])
    with pytest.raises(ValueError, match="does not fit"):
        IndexedDatasetWriter(str(tmp_path / "y"), dtype=np.uint16, vocab_size=70000)


def test_exception_leaves_previous_dataset_intact(tmp_path):
    prefix = str(tmp_path / "p")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        w.add_document([1, 2, 3])
    before = open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
            w.add_document([4, 5])
            raise RuntimeError("crash mid-write")
    assert (open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()) == before
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx"]


def _write(tmp_path, name="g"):
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for d in ([1, 2, 3], [4, 5], [6]):
            w.add_document(d)
    return prefix


def test_truncated_idx_names_file(tmp_path):
    prefix = _write(tmp_path)
    data = open(prefix + ".idx", "rb").read()
    for cut in (len(data) - 3, 20, 0):
        open(prefix + ".idx", "wb").write(data[:cut])
        with pytest.raises(ValueError, match=r"g\.idx.*truncated"):
            IndexedDataset(prefix)


def test_foreign_idx_names_file(tmp_path):
    prefix = _write(tmp_path)
    open(prefix + ".idx", "wb").write(b"TNTIDX\x00\x00" + b"\x00" * 40)  # old fairseq format
    with pytest.raises(ValueError, match=r"g\.idx is not a Megatron MMIDIDX"):
        IndexedDataset(prefix)


def test_bad_version_dtype_and_bin_size(tmp_path):
    prefix = _write(tmp_path)
    good = bytearray(open(prefix + ".idx", "rb").read())
    bad = bytearray(good)
    bad[9:17] = struct.pack("<Q", 2)
    open(prefix + ".idx", "wb").write(bad)
    with pytest.raises(ValueError, match="version 2"):
        IndexedDataset(prefix)
    bad = bytearray(good)
    bad[17] = 99
    open(prefix + ".idx", "wb").write(bad)
    with pytest.raises(ValueError, match="dtype code 99"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(good)
    open(prefix + ".bin", "ab").write(b"\x00\x00")
    with pytest.raises(ValueError, match=r"g\.bin has 14 bytes"):
        IndexedDataset(prefix)


def test_missing_files(tmp_path):
    prefix = _write(tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"g\.bin not found"):
        IndexedDataset(prefix)
