"""BlendedDataset / build_datasets: Megatron golden blend, realised mix, data-path parsing, errors."""

import json
import os

import numpy as np
import pytest

from megatiny.data.blended import BlendedDataset, build_datasets, parse_data_path
from tests.test_gpt_dataset import CASES, CORPORA, GOLDEN, write_corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return {name: write_corpus(str(root / name), **spec) for name, spec in CORPORA.items()}


class Numbers:
    """A stand-in dataset: sample j of dataset d is {'value': (d, j)}."""

    def __init__(self, d, n):
        self.d, self.n = d, n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        assert 0 <= j < self.n
        return {"value": (self.d, j)}


def test_matches_megatron_golden_blend(corpora, tmp_path):
    arrays = np.load(os.path.join(GOLDEN, "golden.npz"))
    meta = json.load(open(os.path.join(GOLDEN, "golden.json")))
    spec = CASES["D"]
    path = [str(spec["weights"][0]), corpora["a"], str(spec["weights"][1]), corpora["b"]]
    num_samples = dict(zip(("train", "valid", "test"), spec["num_samples"]))
    splits = build_datasets(
        path, spec["split"], spec["seq_length"], num_samples, spec["seed"], str(tmp_path)
    )
    for name, ds in zip(("train", "valid", "test"), splits):
        key = f"D_{name}"
        np.testing.assert_array_equal(ds.dataset_index, arrays[f"{key}_dataset_index"])
        np.testing.assert_array_equal(
            ds.dataset_sample_index, arrays[f"{key}_dataset_sample_index"]
        )
        assert len(ds) == meta[key]["len"]
        assert [len(d) for d in ds.datasets] == meta[key]["component_lens"]
        for i in range(len(arrays[f"{key}_tokens"])):
            sample = ds[i]
            np.testing.assert_array_equal(sample["input_ids"].numpy(), arrays[f"{key}_tokens"][i])
            np.testing.assert_array_equal(sample["labels"].numpy(), arrays[f"{key}_labels"][i])
            assert int(sample["dataset_id"]) == ds.dataset_index[i]


@pytest.mark.parametrize("seed", range(5))
def test_realised_mix_follows_weights(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    weights = (rng.random(k) * 10 + 0.1).tolist()  # unnormalised on purpose
    n = 2000
    ds = BlendedDataset([Numbers(d, n) for d in range(k)], weights, n, seed=seed)
    share = np.array(weights) / sum(weights)
    onehot = np.eye(k)[ds.dataset_index]
    running = np.cumsum(onehot, axis=0)
    expected = np.outer(np.arange(1, n + 1), share)
    # at every prefix: never a whole sample ahead of the share, never k - 1 behind
    assert (running - expected).max() < 1.0
    assert (running - expected).min() > -(k - 1)
    seen = [ds[i]["value"] for i in range(n)]
    for d in range(k):  # each dataset is read in its own order 0, 1, 2, ...
        assert [j for dd, j in seen if dd == d] == list(range(int(running[-1, d])))


def test_exhaustive_and_unweighted(corpora, tmp_path):
    ds = BlendedDataset([Numbers(0, 30), Numbers(1, 10)], [30, 10], None)
    assert np.bincount(ds.dataset_index).tolist() == [30, 10]
    # prefixes without weights: weighted by their sizes (one epoch each), like Megatron
    train, valid, test = build_datasets(
        [corpora["a"], corpora["b"]], "90,8,2", 32, {"train": None, "valid": 5}, 1, str(tmp_path)
    )
    assert len(train) == sum(len(d) for d in train.datasets)
    assert len(valid) == 5 and test is None


def test_parse_data_path():
    assert parse_data_path("0.7 a 0.3 b") == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["30", "x", "70", "y"]) == (["x", "y"], [30.0, 70.0])
    assert parse_data_path("single/prefix") == (["single/prefix"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ValueError, match="sum to a positive"):
        parse_data_path("0 a 0 b")
    with pytest.raises(ValueError, match="sum to a positive"):
        parse_data_path("nan a 1 b")
    with pytest.raises(ValueError, match="must all be > 0"):
        parse_data_path("-1 a 2 b")


def test_bad_input(corpora, tmp_path):
    with pytest.raises(ValueError, match="sum to a positive"):
        BlendedDataset([Numbers(0, 5), Numbers(1, 5)], [0.0, 0.0], 4)
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([Numbers(0, 5)], [0.5, 0.5], 4)
    with pytest.raises(ValueError, match="has only 5"):
        BlendedDataset([Numbers(0, 5), Numbers(1, 50)], [0.5, 0.5], 40)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data prefix .*nope.* not found"):
        build_datasets(["0.5", corpora["a"], "0.5", missing], "1,0,0", 8, [10, 0, 0], 1)
    with pytest.raises(ValueError, match="needs num_samples"):
        build_datasets(
            ["0.5", corpora["a"], "0.5", corpora["b"]], "1,0,0", 8, [None, 0, 0], 1, str(tmp_path)
        )
    with pytest.raises(ValueError, match="train split of .*fewer than one sample"):
        build_datasets(corpora["b"], "1,0,0", 100000, [1, 0, 0], 1, str(tmp_path))
