"""megatiny._C (csrc/helpers.cpp) == the numpy reference == a literal transcription of Megatron's loop."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from megatiny import _C
from megatiny.data import helpers_ref as ref


def loop_sample_idx(
    sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, drop_last, extra
):
    """Megatron-Core's build_sample_idx, statement by statement, in plain Python (test oracle)."""
    usable = num_epochs * tokens_per_epoch - extra
    if drop_last:
        num_samples = usable // seq_length
    else:
        num_samples = int(np.ceil(np.float32(usable) / np.float32(seq_length)))
    rows = [(0, 0)]
    pos, offset = 0, 0
    while len(rows) <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            length = int(sizes[document_idx[pos]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - extra
                remaining = 0
            else:
                if pos == len(document_idx) - 1:
                    offset = int(sizes[document_idx[pos]]) - extra
                    break
                pos += 1
                offset = 0
        rows.append((pos, offset))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def make_document_index(rng, num_docs, num_epochs):
    return np.concatenate([rng.permutation(num_docs) for _ in range(num_epochs)]).astype(np.int32)


def check_all_equal(sizes, document_idx, seq_length, num_epochs, drop_last, extra):
    tokens_per_epoch = int(sizes.astype(np.int64).sum())
    args = (sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, drop_last, extra)
    want = loop_sample_idx(*args)
    if want.min() < 0:  # an empty last document: Megatron's wrapper asserts min() >= 0
        for build in (_C.build_sample_idx, _C.build_sample_idx_int64, ref.build_sample_idx):
            with pytest.raises(ValueError, match="last document of document_idx is empty"):
                build(*args)
        return None
    got_cpp = _C.build_sample_idx(*args)
    got_ref = ref.build_sample_idx(*args)
    assert got_cpp.dtype == np.int32 and got_ref.dtype == np.int32
    np.testing.assert_array_equal(got_cpp, want)
    np.testing.assert_array_equal(got_ref, want)
    np.testing.assert_array_equal(_C.build_sample_idx_int64(*args), want)
    return got_cpp


@pytest.mark.parametrize("trial", range(40))
def test_sample_idx_randomized(trial):
    rng = np.random.default_rng(trial)
    num_docs = int(rng.integers(1, 60))
    high = int(rng.choice([3, 20, 200]))
    sizes = rng.integers(0, high, size=num_docs).astype(np.int32)
    sizes[rng.integers(num_docs)] = high  # at least one non-empty document
    num_epochs = int(rng.integers(1, 5))
    seq_length = int(rng.integers(2, 50))
    extra = int(rng.integers(0, 2))
    drop_last = bool(rng.integers(0, 2))
    if num_epochs * int(sizes.sum()) - extra < 0:
        return
    check_all_equal(
        sizes,
        make_document_index(rng, num_docs, num_epochs),
        seq_length,
        num_epochs,
        drop_last,
        extra,
    )


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_idx_edge_cases(extra, drop_last):
    rng = np.random.default_rng(0)
    # Every document shorter than a sequence.
    sizes = rng.integers(1, 5, size=30).astype(np.int32)
    check_all_equal(sizes, make_document_index(rng, 30, 2), 16, 2, drop_last, extra)
    # Many epochs over a tiny split.
    sizes = np.array([7, 3, 11], dtype=np.int32)
    out = check_all_equal(sizes, make_document_index(rng, 3, 50), 8, 50, drop_last, extra)
    assert len(out) - 1 >= (50 * 21 - extra) // 8
    # One document, one epoch.
    sizes = np.array([100], dtype=np.int32)
    out = check_all_equal(sizes, np.zeros(1, np.int32), 10, 1, drop_last, extra)
    assert out[:, 0].max() == 0
    # Empty documents: first, last and in between.
    sizes = np.array([0, 5, 0, 0, 9, 0, 13, 0], dtype=np.int32)
    check_all_equal(sizes, np.arange(8, dtype=np.int32), 4, 1, drop_last, extra)
    check_all_equal(sizes, make_document_index(rng, 8, 3), 3, 3, drop_last, extra)
    # Samples that end exactly on a document boundary.
    sizes = np.full(6, 8, dtype=np.int32)
    check_all_equal(sizes, np.arange(6, dtype=np.int32), 8, 1, drop_last, extra)


def test_last_partial_sequence():
    sizes = np.array([5, 6], dtype=np.int32)  # 11 tokens, seq_length 4 -> (11-1)/4 = 2.5 samples
    doc = np.array([0, 1], dtype=np.int32)
    dropped = _C.build_sample_idx(sizes, doc, 4, 1, 11, True, 1)
    kept = _C.build_sample_idx(sizes, doc, 4, 1, 11, False, 1)
    assert dropped.tolist() == [[0, 0], [0, 4], [1, 3]]
    # The kept partial sample ends at the end of the data: last document, offset size - 1.
    assert kept.tolist() == [[0, 0], [0, 4], [1, 3], [1, 5]]
    np.testing.assert_array_equal(kept, ref.build_sample_idx(sizes, doc, 4, 1, 11, False, 1))


def test_row_semantics_match_token_stream():
    """Sample i is stream tokens [i*L, (i+1)*L + 1): rebuild each from its rows and compare."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 30, size=25).astype(np.int32)
    docs = [rng.integers(0, 1000, size=n) for n in sizes]
    document_idx = make_document_index(rng, 25, 3)
    stream = np.concatenate([docs[d] for d in document_idx])
    seq_length = 9
    idx = _C.build_sample_idx(sizes, document_idx, seq_length, 3, int(sizes.sum()), True, 1)
    for i in range(len(idx) - 1):
        (p0, o0), (p1, o1) = idx[i], idx[i + 1]
        parts = [docs[document_idx[p]] for p in range(p0, p1 + 1)]
        parts[-1] = parts[-1][: o1 + 1]
        parts[0] = parts[0][o0:] if p0 != p1 else docs[document_idx[p0]][o0 : o1 + 1]
        sample = np.concatenate(parts)
        np.testing.assert_array_equal(sample, stream[i * seq_length : (i + 1) * seq_length + 1])


def test_sample_idx_bad_input():
    sizes = np.array([5, 6], dtype=np.int32)
    doc = np.array([0, 1], dtype=np.int32)
    for impl in (_C.build_sample_idx, ref.build_sample_idx):
        with pytest.raises(ValueError, match="seq_length must be > 1"):
            impl(sizes, doc, 1, 1, 11)
        with pytest.raises(ValueError, match="out of range"):
            impl(sizes, np.array([0, 2], np.int32), 4, 1, 11)
        with pytest.raises(ValueError, match="tokens_per_epoch must be the token count"):
            impl(sizes, doc, 4, 2, 11)
        with pytest.raises(ValueError, match="document_idx is empty"):
            impl(sizes, np.zeros(0, np.int32), 4, 1, 11)


@pytest.mark.parametrize("trial", range(10))
def test_blending_matches_reference_and_weights(trial):
    rng = np.random.default_rng(100 + trial)
    k = int(rng.integers(1, 6))
    weights = rng.random(k) + 0.01
    weights = weights / weights.sum()
    size = int(rng.integers(0, 3000))
    outs = []
    for impl in (_C.build_blending_indices, ref.build_blending_indices):
        di, dsi = np.zeros(size, np.int16), np.zeros(size, np.int64)
        impl(di, dsi, weights, k, size, False)
        outs.append((di, dsi))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    di, dsi = outs[0]
    counts = np.bincount(di, minlength=k)
    assert np.all(np.abs(counts - weights * size) <= 1.0 + 1e-9)
    for d in range(k):  # each dataset's samples are drawn in order 0, 1, 2, ...
        np.testing.assert_array_equal(dsi[di == d], np.arange(counts[d]))


@pytest.mark.parametrize("trial", range(6))
def test_exhaustive_blending(trial):
    rng = np.random.default_rng(200 + trial)
    k = int(rng.integers(1, 5))
    sizes = rng.integers(1, 400, size=k).astype(np.int64)
    total = int(sizes.sum())
    outs = []
    for impl in (_C.build_exhaustive_blending_indices, ref.build_exhaustive_blending_indices):
        di, dsi = np.zeros(total, np.int16), np.zeros(total, np.int64)
        impl(di, dsi, sizes, k)
        outs.append((di, dsi))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(np.bincount(outs[0][0], minlength=k), sizes)


def test_blending_bad_input():
    w = np.array([0.5, 0.5])
    with pytest.raises(TypeError):  # a converted copy would be filled and thrown away
        _C.build_blending_indices(np.zeros(4, np.int64), np.zeros(4, np.int64), w, 2, 4, False)
    with pytest.raises(TypeError):
        ref.build_blending_indices(np.zeros(4, np.int64), np.zeros(4, np.int64), w, 2, 4, False)
    for impl in (_C.build_blending_indices, ref.build_blending_indices):
        with pytest.raises(ValueError, match="fewer than size"):
            impl(np.zeros(2, np.int16), np.zeros(2, np.int64), w, 2, 4, False)
    for impl in (_C.build_exhaustive_blending_indices, ref.build_exhaustive_blending_indices):
        with pytest.raises(ValueError, match="must be > 0"):
            impl(np.zeros(4, np.int16), np.zeros(4, np.int64), np.array([4, 0]), 2)


def test_numpy_fallback_warns_once():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from megatiny.data import helpers\n"
        "    import megatiny.data.helpers\n"
        "    import numpy as np\n"
        "    helpers.build_sample_idx(np.array([5, 6], np.int32), np.array([0, 1], np.int32), 4, 1, 11)\n"
        "print(helpers.BACKEND, len(caught), caught[0].category.__name__, caught[0].message)\n"
    )
    env = dict(os.environ, MEGATINY_DISABLE_CPP="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    backend, count, category, message = out.stdout.split(" ", 3)
    assert (backend, count, category) == ("numpy", "1", "RuntimeWarning")
    assert "numpy reference" in message and "make install" in message
    from megatiny.data import helpers

    assert helpers.BACKEND == "cpp"  # the build in this checkout works


def test_ceil_is_float32_like_megatron():
    # usable = 2**24 + 1 tokens is not a float32: Megatron's float ceil sees 2**24 and, with
    # seq_length 2**20, gives 16 samples where an exact ceil gives 17. Both must reproduce that.
    sizes = np.array([2**24 + 2], dtype=np.int32)
    args = (sizes, np.zeros(1, np.int32), 2**20, 1, 2**24 + 2, False, 1)
    assert math.ceil((2**24 + 1) / 2**20) == 17
    assert len(_C.build_sample_idx(*args)) - 1 == 16
    np.testing.assert_array_equal(_C.build_sample_idx(*args), ref.build_sample_idx(*args))
    np.testing.assert_array_equal(_C.build_sample_idx(*args), loop_sample_idx(*args))
