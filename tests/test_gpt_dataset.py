"""GPTDataset: Megatron-Core golden arrays, caching, sample contents, EOD options, bad input."""

import json
import os
import warnings

import numpy as np
import pytest

from megatiny.data.gpt_dataset import GPTDataset, IndexCache, build_gpt_indices, split_ranges
from megatiny.data.indexed import IndexedDataset, IndexedDatasetWriter

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "megatron_golden")
EOD = 0

# The configurations tests/data/megatron_golden/make_golden.py ran through megatron-core.
CASES = {
    "A": dict(corpora=["a"], split="969,30,1", seq_length=32, seed=1234, num_samples=[800, 50, 3]),
    "B": dict(
        corpora=["a"],
        split="80,15,5",
        seq_length=17,
        seed=7,
        num_samples=[2500, 400, 60],
        reset_position_ids=True,
        eod_mask_loss=True,
        drop_last_valid=False,
    ),
    "C": dict(
        corpora=["a"],
        split="90,10,0",
        seq_length=24,
        seed=99,
        num_samples=[None, None, None],
        add_extra_token=False,
    ),
    "D": dict(
        corpora=["a", "b"],
        weights=[0.7, 0.3],
        split="90,8,2",
        seq_length=32,
        seed=1234,
        num_samples=[500, 20, 4],
    ),
}
CORPORA = {"a": dict(seed=3, num_docs=1000), "b": dict(seed=2, num_docs=400, min_len=1, max_len=40)}


def write_corpus(prefix, seed, num_docs, min_len=0, max_len=48, vocab=1000):
    """Documents of random length (empty ones included) ending in EOD = 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len, size=num_docs)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for n in lengths:
            doc = rng.integers(1, vocab, size=n)
            if n:
                doc[-1] = EOD
            writer.add_document(doc)
    return prefix


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {name: write_corpus(str(root / name), **spec) for name, spec in CORPORA.items()}


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN, "golden.json")) as f:
        meta = json.load(f)
    return np.load(os.path.join(GOLDEN, "golden.npz")), meta


def make_dataset(prefix, spec, split_name, cache_dir):
    return GPTDataset(
        prefix,
        split=spec["split"],
        seq_length=spec["seq_length"],
        num_samples=spec["num_samples"][("train", "valid", "test").index(split_name)],
        seed=spec["seed"],
        split_name=split_name,
        cache_dir=cache_dir,
        eod_id=EOD,
        eod_mask_loss=spec.get("eod_mask_loss", False),
        reset_position_ids=spec.get("reset_position_ids", False),
        add_extra_token=spec.get("add_extra_token", True),
        drop_last_partial_validation_sequence=spec.get("drop_last_valid", True),
    )


def check_samples(ds, arrays, key):
    for i in range(len(arrays[f"{key}_tokens"])):
        sample = ds[i]
        mask = arrays[f"{key}_loss_mask"][i]
        np.testing.assert_array_equal(sample["input_ids"].numpy(), arrays[f"{key}_tokens"][i])
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), mask)
        np.testing.assert_array_equal(
            sample["position_ids"].numpy(), arrays[f"{key}_position_ids"][i]
        )
        labels = sample["labels"].numpy()
        np.testing.assert_array_equal(labels[mask == 1], arrays[f"{key}_labels"][i][mask == 1])
        assert (labels[mask == 0] == -100).all()


@pytest.mark.parametrize("case", ["A", "B", "C"])
def test_matches_megatron_golden(case, corpora, golden, tmp_path):
    arrays, meta = golden
    np.testing.assert_array_equal(
        IndexedDataset(corpora["a"]).sequence_lengths, arrays["corpus_a_lengths"]
    )
    spec = CASES[case]
    for split_name in ("train", "valid", "test"):
        key = f"{case}_{split_name}"
        if meta[key] is None:
            assert (
                split_ranges(spec["split"], 3000)[("train", "valid", "test").index(split_name)]
                is None
            )
            continue
        ds = make_dataset(corpora["a"], spec, split_name, str(tmp_path))
        for name in ("document_index", "sample_index", "shuffle_index"):
            want = arrays[f"{key}_{name}"]
            got = getattr(ds, name)
            assert got.dtype == want.dtype, (key, name)
            np.testing.assert_array_equal(got, want, err_msg=f"{key} {name}")
        assert len(ds) == meta[key]["len"]
        check_samples(ds, arrays, key)


def test_samples_are_the_shuffled_token_stream(corpora, tmp_path):
    ds = make_dataset(corpora["a"], CASES["A"], "train", str(tmp_path))
    indexed = IndexedDataset(corpora["a"])
    stream = np.concatenate([indexed[int(d)] for d in ds.document_index]).astype(np.int64)
    for i in [0, 1, 17, len(ds) // 2, len(ds) - 1]:
        row = int(ds.shuffle_index[i])
        want = stream[row * 32 : row * 32 + 33]
        np.testing.assert_array_equal(ds.sample_tokens(i), want)
        sample = ds[i]
        np.testing.assert_array_equal(sample["input_ids"].numpy(), want[:-1])
        np.testing.assert_array_equal(sample["labels"].numpy(), want[1:])
        assert sample["loss_mask"].dtype.is_floating_point and sample["loss_mask"].all()


def test_kept_partial_validation_sample_is_padded_and_masked(corpora, tmp_path):
    ds = make_dataset(corpora["a"], CASES["B"], "valid", str(tmp_path))
    last = int(np.flatnonzero(ds.shuffle_index == len(ds) - 1)[0])
    tokens = ds.sample_tokens(last)
    assert (tokens == -1).any(), "the last validation sample should be partial"
    sample = ds[last]
    pad = tokens[1:] == -1
    assert (sample["loss_mask"].numpy()[pad] == 0).all()
    assert (sample["labels"].numpy()[pad] == -100).all()
    assert (sample["input_ids"].numpy() >= 0).all()


def cache_files(directory):
    return sorted(f for f in os.listdir(directory) if not f.startswith("."))


def test_cache_reuse_rebuild_and_keys(corpora, tmp_path, monkeypatch):
    spec = CASES["A"]
    first = make_dataset(corpora["a"], spec, "train", str(tmp_path))
    files = cache_files(tmp_path)
    assert len(files) == 4 and all(f.startswith(first.cache.key) for f in files)
    samples = [first[i]["input_ids"] for i in range(5)]

    import megatiny.data.gpt_dataset as gd

    def no_build(*args, **kwargs):
        raise AssertionError("a valid cache must be reused, not rebuilt")

    monkeypatch.setattr(gd, "build_gpt_indices", no_build)
    again = make_dataset(corpora["a"], spec, "train", str(tmp_path))
    monkeypatch.undo()
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    for i in range(5):
        assert again[i]["input_ids"].equal(samples[i])

    # A different seed or split is a different cache entry, never the same files.
    other_seed = make_dataset(corpora["a"], dict(spec, seed=5), "train", str(tmp_path))
    other_split = make_dataset(corpora["a"], dict(spec, split="90,9,1"), "train", str(tmp_path))
    keys = {first.cache.key, other_seed.cache.key, other_split.cache.key}
    assert len(keys) == 3 and len(cache_files(tmp_path)) == 12
    assert not np.array_equal(other_seed.shuffle_index, first.shuffle_index)

    # Rebuilt from scratch: identical arrays and samples.
    for f in cache_files(tmp_path):
        os.remove(tmp_path / f)
    rebuilt = make_dataset(corpora["a"], spec, "train", str(tmp_path))
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(first, name))
    for i in range(5):
        assert rebuilt[i]["input_ids"].equal(samples[i])


@pytest.mark.parametrize("damage", ["truncate", "flip", "description", "delete"])
def test_corrupt_cache_is_rebuilt(corpora, tmp_path, damage):
    spec = CASES["A"]
    good = make_dataset(corpora["a"], spec, "valid", str(tmp_path))
    want = [np.array(getattr(good, n)) for n in ("document_index", "sample_index", "shuffle_index")]
    target = good.cache.path("sample_index")
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) - 8)
    elif damage == "flip":
        with open(target, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            byte = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "description":
        record = json.load(open(good.cache.description_path))
        record["description"]["seed"] = 1  # e.g. left over from another configuration
        json.dump(record, open(good.cache.description_path, "w"))
    else:
        os.remove(target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = make_dataset(corpora["a"], spec, "valid", str(tmp_path))
    assert any("rebuilding the index cache" in str(w.message) for w in caught)
    for name, array in zip(("document_index", "sample_index", "shuffle_index"), want):
        np.testing.assert_array_equal(getattr(again, name), array)
    # ... and the repaired cache is valid again.
    assert again.cache.load(("document_index", "sample_index", "shuffle_index")) is not None


def test_index_cache_roundtrip(tmp_path):
    cache = IndexCache(str(tmp_path), "X", {"a": 1})
    assert cache.load(("v",)) is None
    cache.save({"v": np.arange(5)})
    (v,) = cache.load(("v",))
    np.testing.assert_array_equal(v, np.arange(5))
    assert IndexCache(str(tmp_path), "X", {"a": 2}).key != cache.key


def test_numpy_fallback_gives_the_same_indices(corpora, monkeypatch):
    import megatiny.data.gpt_dataset as gd
    from megatiny.data import helpers_ref

    lengths = IndexedDataset(corpora["a"]).sequence_lengths
    indices = np.arange(0, 969, dtype=np.int32)
    cpp = build_gpt_indices(lengths, indices, 32, 800, 1234)
    monkeypatch.setattr(gd.helpers, "build_sample_idx", helpers_ref.build_sample_idx)
    ref = build_gpt_indices(lengths, indices, 32, 800, 1234)
    for a, b in zip(cpp, ref):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_bad_input(corpora, tmp_path):
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(
            corpora["a"],
            split="969,30,1",
            seq_length=64,
            num_samples=3,
            split_name="test",
            cache_dir=str(tmp_path),
        )
    with pytest.raises(FileNotFoundError, match="not found"):
        GPTDataset(str(tmp_path / "missing"), seq_length=8, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no sequences"):
        GPTDataset(
            corpora["a"], split="100,0,0", seq_length=8, split_name="valid", cache_dir=str(tmp_path)
        )
    with pytest.raises(ValueError, match="sum to a positive"):
        GPTDataset(corpora["a"], split="0,0,0", seq_length=8, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="split_name"):
        GPTDataset(corpora["a"], seq_length=8, split_name="validation", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="need eod_id"):
        GPTDataset(corpora["a"], seq_length=8, eod_mask_loss=True, cache_dir=str(tmp_path))
