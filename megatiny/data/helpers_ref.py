"""Pure-numpy reference of the C++ index helpers (csrc/helpers.cpp -> megatiny._C).

This module is the executable spec: every function takes the same arguments, returns (or fills)
the same dtypes and values as its C++ twin and as Megatron-Core's `helpers.cpp`, and raises the
same `ValueError` on bad input. It is also the fallback when `megatiny._C` is not built (see
megatiny/data/helpers.py), so `build_sample_idx` is the fastest vectorized formulation we know
and is the baseline of benchmarks/index_helpers.py.

The sample index (`build_sample_idx`)
-------------------------------------
Lay the documents `document_idx[0], document_idx[1], ...` (ids into `sizes`; all epochs, already
shuffled) end to end into one token stream. Sample i covers the stream tokens

    [i * seq_length, (i + 1) * seq_length + add_extra_token)

so with `add_extra_token = 1` a sample holds seq_length + 1 tokens (inputs and shifted labels) and
shares its last token with the next sample. Samples cross document and epoch boundaries freely.
Row i of the index is `(p, o)`: sample i starts at offset o of document `document_idx[p]`; it ends
where row i + 1 points, plus `add_extra_token` tokens. Walking Megatron's loop through that stream
gives the closed form used below for rows i >= 1, with s = i * seq_length:

    p = the position in document_idx of the document holding stream token s + add_extra_token - 1
        (empty documents hold no token and are never chosen)
    o = s - (first stream token of document p)          (o == size when add_extra_token == 0 and
                                                          s falls exactly on a document end)

Row 0 is always (0, 0). The row count is (num_epochs * tokens_per_epoch - add_extra_token) //
seq_length + 1; with `drop_last_partial_sequence=False` the division is Megatron's float32 ceil and
a row whose token lies past the stream is (len(document_idx) - 1, size_of_last - add_extra_token):
the final, partial sample runs to the end of the data. The dtype is int32 unless
max(len(document_idx), max(sizes)) exceeds int32, then int64 (Megatron's rule).
"""

from __future__ import annotations

import numpy as np

INT32_MAX = np.iinfo(np.int32).max


def _num_samples(seq_length, num_epochs, tokens_per_epoch, drop_last, add_extra) -> int:
    usable = int(num_epochs) * int(tokens_per_epoch) - add_extra
    if drop_last:
        return usable // seq_length
    # Megatron computes ceil(float(usable) / seq_length) in float32; keep it bit-for-bit.
    return int(np.ceil(np.float32(usable) / np.float32(seq_length)))


def build_sample_idx(
    sizes,
    document_idx,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """The [num_samples + 1, 2] sample index; see the module docstring for its meaning."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_idx = np.ascontiguousarray(document_idx, dtype=np.int32)
    extra = int(add_extra_token_to_sequence)
    if sizes.ndim != 1 or document_idx.ndim != 1:
        raise ValueError("build_sample_idx: sizes and document_idx must be 1-D arrays")
    if seq_length <= 1:
        raise ValueError(f"build_sample_idx: seq_length must be > 1, got {seq_length}")
    if num_epochs <= 0:
        raise ValueError(f"build_sample_idx: num_epochs must be > 0, got {num_epochs}")
    if tokens_per_epoch <= 1:
        raise ValueError(f"build_sample_idx: tokens_per_epoch must be > 1, got {tokens_per_epoch}")
    if extra not in (0, 1):
        raise ValueError("build_sample_idx: add_extra_token_to_sequence must be 0 or 1")
    if len(document_idx) == 0:
        raise ValueError("build_sample_idx: document_idx is empty")
    bad = np.flatnonzero((document_idx < 0) | (document_idx >= len(sizes)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"build_sample_idx: document_idx[{i}] = {int(document_idx[i])} is out of range for "
            f"{len(sizes)} sizes"
        )
    lengths = sizes[document_idx].astype(np.int64)
    if (lengths < 0).any():
        doc = int(document_idx[np.flatnonzero(lengths < 0)[0]])
        raise ValueError(f"build_sample_idx: sizes[{doc}] is negative")
    ends = np.cumsum(lengths)
    total_tokens = int(ends[-1])
    wanted = int(num_epochs) * int(tokens_per_epoch)
    if total_tokens < wanted:
        raise ValueError(
            f"build_sample_idx: document_idx holds {total_tokens} tokens but num_epochs * "
            f"tokens_per_epoch = {wanted}; tokens_per_epoch must be the token count of one pass "
            "over the split"
        )
    num_samples = _num_samples(
        seq_length, num_epochs, tokens_per_epoch, drop_last_partial_sequence, extra
    )
    if num_samples < 0:
        raise ValueError("build_sample_idx: not enough tokens for a single sample")

    largest = max(len(document_idx), int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if largest <= INT32_MAX else np.int64
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts + (extra - 1), side="right")
    past_end = position >= len(ends)
    position[past_end] = len(ends) - 1
    offset = starts - (ends[position] - lengths[position])
    offset[past_end] = lengths[-1] - extra
    if past_end.any() and lengths[-1] - extra < 0:
        raise ValueError(
            "build_sample_idx: the last document of document_idx is empty, so the kept partial "
            "last sample (drop_last_partial_sequence=False with add_extra_token_to_sequence) "
            "would start at offset -1; Megatron's wrapper rejects this too. Drop empty "
            "documents, or keep drop_last_partial_sequence=True"
        )

    sample_idx = np.empty((num_samples + 1, 2), dtype=dtype)
    sample_idx[0] = 0
    sample_idx[1:, 0] = position
    sample_idx[1:, 1] = offset
    return sample_idx


def _check_outputs(dataset_index, dataset_sample_index, size, name):
    for array, dtype in ((dataset_index, np.int16), (dataset_sample_index, np.int64)):
        if not isinstance(array, np.ndarray) or array.dtype != dtype:
            raise TypeError(f"{name}: output arrays must be numpy {np.dtype(dtype).name} arrays")
        if array.ndim != 1 or not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"{name}: output arrays must be 1-D, C-contiguous and writeable")
        if len(array) < size:
            raise ValueError(f"{name}: output arrays hold fewer than size = {size} entries")


def _check_num_datasets(num_datasets: int, name: str) -> None:
    if not 0 < num_datasets <= np.iinfo(np.int16).max:
        raise ValueError(f"{name}: num_datasets must be in [1, 32767], got {num_datasets}")


def _greedy_blend(dataset_index, dataset_sample_index, weights, size, limits=None) -> list[int]:
    """Fill the first `size` slots: slot s goes to the dataset d maximising
    weights[d] * max(s, 1) - taken[d] (lowest d on ties); with `limits`, dataset d leaves the
    choice once it has given limits[d] samples. Returns taken (samples drawn per dataset)."""
    taken = [0] * len(weights)
    live = list(range(len(weights)))
    chosen = [0] * size
    counts = [0] * size
    for s in range(size):
        n = max(float(s), 1.0)
        best = max(live, key=lambda d: (weights[d] * n - taken[d], -d))
        chosen[s] = best
        counts[s] = taken[best]
        taken[best] += 1
        if limits is not None and taken[best] == limits[best]:
            live.remove(best)
    dataset_index[:size] = chosen
    dataset_sample_index[:size] = counts
    return taken


def build_blending_indices(
    dataset_index: np.ndarray,
    dataset_sample_index: np.ndarray,
    weights,
    num_datasets: int,
    size: int,
    verbose: bool = False,
) -> None:
    """Fill `dataset_index` (int16) and `dataset_sample_index` (int64) for `size` blended samples.

    Slot s goes to the dataset d that maximises weights[d] * max(s, 1) - taken[d] (the lowest d on
    ties): the one furthest behind its target share so far. dataset_sample_index[s] = taken[d], the
    number of samples already drawn from d. After n slots no dataset is a whole sample ahead of
    weights[d] * n (the chosen d had taken[d] <= weights[d] * s, as the errors sum to 0), so none
    is more than num_datasets - 1 behind. Weights are expected normalised (sum 1).
    """
    _check_num_datasets(num_datasets, "build_blending_indices")
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) < num_datasets:
        raise ValueError("build_blending_indices: weights must be 1-D with num_datasets entries")
    _check_outputs(dataset_index, dataset_sample_index, size, "build_blending_indices")
    w = [float(x) for x in w[:num_datasets]]
    taken = _greedy_blend(dataset_index, dataset_sample_index, w, size)
    if verbose:
        for d in range(num_datasets):
            print(f"   dataset {d} weight: {w[d]} achieved: {taken[d] / size if size else 0.0}")


def build_exhaustive_blending_indices(
    dataset_index: np.ndarray, dataset_sample_index: np.ndarray, sizes, num_datasets: int
) -> None:
    """Like `build_blending_indices` with weights = sizes / sum(sizes), but draw exactly sizes[d]
    samples from dataset d (sum(sizes) slots); a dataset that is used up leaves the argmax."""
    _check_num_datasets(num_datasets, "build_exhaustive_blending_indices")
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or len(sizes) < num_datasets:
        raise ValueError(
            "build_exhaustive_blending_indices: sizes must be 1-D with num_datasets entries"
        )
    wanted = [int(x) for x in sizes[:num_datasets]]
    for d, n in enumerate(wanted):
        if n <= 0:
            raise ValueError(f"build_exhaustive_blending_indices: sizes[{d}] must be > 0, got {n}")
    total = sum(wanted)
    _check_outputs(dataset_index, dataset_sample_index, total, "build_exhaustive_blending_indices")
    weights = [n / float(total) for n in wanted]
    _greedy_blend(dataset_index, dataset_sample_index, weights, total, wanted)
