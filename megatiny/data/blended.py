"""Weighted blends of GPT datasets, Megatron-Core style, and the train/valid/test builder.

`--data-path 0.7 a 0.3 b` (a flat weight/prefix list, as Megatron users write it) blends the
datasets with prefixes a and b so that, after any n samples, dataset d has given weights[d] * n
of them up to less than one sample too many or num_datasets - 1 too few (see
megatiny.data.helpers_ref.build_blending_indices). `build_datasets` reproduces Megatron-Core's
BlendedMegatronDatasetBuilder: every prefix is split by the same split string; for a split that
must yield N samples, dataset d is built with ceil(ceil(N * w_d) * 1.005) samples (Megatron's 0.5%
surplus) and the blend has sum_d ceil(N * w_d) samples, so the same paths, split, sample counts
and seed give the same sample order as Megatron.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from megatiny.data import helpers
from megatiny.data.gpt_dataset import SPLIT_NAMES, GPTDataset, split_ranges
from megatiny.data.indexed import IndexedDataset

SURPLUS = 0.005  # Megatron's mid_level_dataset_surplus default


def parse_data_path(data_path) -> tuple[list[str], list[float] | None]:
    """ "0.7 a 0.3 b" / ["0.7", "a", "0.3", "b"] -> (["a", "b"], [0.7, 0.3]); "a" -> (["a"], None).

    A list whose even entries are all numbers is weight/prefix pairs; otherwise it is prefixes only
    (then each dataset is weighted by its size). Weights are checked, not normalised, here.
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise ValueError("data path is empty; give a prefix or weight/prefix pairs '0.7 a 0.3 b'")
    weights = None
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            weights = None
    prefixes = [p.strip() for p in (items[1::2] if weights is not None else items)]
    if weights is not None:
        if not all(math.isfinite(w) for w in weights) or not sum(weights) > 0:
            raise ValueError(
                f"data path weights {weights} must be finite and sum to a positive number"
            )
        if any(w <= 0 for w in weights):
            raise ValueError(
                f"data path weights {weights} must all be > 0; drop a dataset instead of "
                "giving it weight 0"
            )
    return prefixes, weights


def check_prefix(prefix: str) -> None:
    if not IndexedDataset.exists(prefix):
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        raise FileNotFoundError(
            f"data prefix {prefix!r} not found (missing {', '.join(missing)}); write it with "
            "`megatiny data tokenize --output-prefix PREFIX` or fix the path"
        )


class BlendedDataset(torch.utils.data.Dataset):
    """Interleave `datasets` by `weights` (Megatron's BlendedDataset).

    With num_samples: weights are normalised and slot i comes from dataset dataset_index[i], its
    sample dataset_sample_index[i] (build_blending_indices). With num_samples=None, weights must be
    integer sample counts and exactly that many are drawn from each (exhaustive blend). The blend
    is deterministic; `seed` is accepted for interface symmetry and does not change it (each
    component's own seed decides its order). ds[i] is the component's sample plus `dataset_id`.
    """

    def __init__(self, datasets, weights, num_samples: int | None, seed: int | None = None):
        datasets, weights = list(datasets), [float(w) for w in weights]
        if not datasets or len(datasets) != len(weights):
            raise ValueError(
                f"{len(datasets)} datasets but {len(weights)} weights; give one weight per dataset"
            )
        if len(datasets) >= 32767:
            raise ValueError("at most 32766 datasets can be blended (int16 dataset index)")
        if not all(math.isfinite(w) for w in weights) or not sum(weights) > 0:
            raise ValueError(f"blend weights {weights} must be finite and sum to a positive number")
        if any(w <= 0 for w in weights):
            raise ValueError(f"blend weights {weights} must all be > 0")
        self.datasets, self.seed = datasets, seed
        if num_samples is None:
            if any(w != int(w) for w in weights):
                raise ValueError("num_samples=None needs integer weights (samples per dataset)")
            size = int(sum(weights))
            self.weights = [int(w) for w in weights]
            self.dataset_index = np.zeros(size, dtype=np.int16)
            self.dataset_sample_index = np.zeros(size, dtype=np.int64)
            helpers.build_exhaustive_blending_indices(
                self.dataset_index, self.dataset_sample_index, np.array(self.weights), len(datasets)
            )
        else:
            if num_samples < 0:
                raise ValueError(f"num_samples={num_samples} must be >= 0")
            w = np.array(weights, dtype=np.float64)
            self.weights = (w / w.sum()).tolist()
            self.dataset_index = np.zeros(num_samples, dtype=np.int16)
            self.dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
            helpers.build_blending_indices(
                self.dataset_index,
                self.dataset_sample_index,
                np.array(self.weights),
                len(datasets),
                num_samples,
                False,
            )
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (dataset, count) in enumerate(zip(datasets, counts)):
            if count > len(dataset):
                raise ValueError(
                    f"the blend takes {count} samples from dataset {d}, which has only "
                    f"{len(dataset)}; build that dataset with more samples"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        d = int(self.dataset_index[idx])
        sample = dict(self.datasets[d][int(self.dataset_sample_index[idx])])
        sample["dataset_id"] = torch.tensor(d)
        return sample


def _per_split(num_samples) -> list[int | None]:
    if isinstance(num_samples, dict):
        unknown = set(num_samples) - set(SPLIT_NAMES)
        if unknown:
            raise ValueError(f"num_samples has unknown splits {sorted(unknown)}; use {SPLIT_NAMES}")
        return [num_samples.get(name, 0) for name in SPLIT_NAMES]  # missing: not built
    values = list(num_samples)
    if len(values) != 3:
        raise ValueError("num_samples must be {'train': N, 'valid': M, 'test': K} or 3 numbers")
    return values


def build_datasets(data_path, split, seq_length, num_samples, seed, cache_dir=None, **gpt_kwargs):
    """(train, valid, test) from a prefix or a weighted list of prefixes, as Megatron builds them.

    num_samples: {"train": N, "valid": M, "test": K} (or 3 numbers); None for a split = one epoch
    of it (not for a weighted blend); a split that gets no share in `split`, asks for 0 samples or
    is missing from the dict is returned as None. gpt_kwargs go to every GPTDataset (eod_id, eod_mask_loss, ...).
    """
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        check_prefix(prefix)
    sizes = _per_split(num_samples)
    wanted = [r is not None and n != 0 for r, n in zip(split_ranges(split, 1), sizes, strict=True)]

    def gpt(prefix, n, name):
        return GPTDataset(
            prefix, split, seq_length, n, seed, name, cache_dir=cache_dir, **gpt_kwargs
        )

    if len(prefixes) == 1 and weights is None:
        return tuple(
            gpt(prefixes[0], n, name) if want else None
            for name, n, want in zip(SPLIT_NAMES, sizes, wanted)
        )
    if weights is not None:
        w = np.array(weights, dtype=np.float64)
        weights = (w / w.sum()).tolist()
    out = []
    for name, n, want in zip(SPLIT_NAMES, sizes, wanted):
        if not want:
            out.append(None)
        elif weights is not None:
            if n is None:
                raise ValueError(f"a weighted blend needs num_samples for the {name} split")
            target = [math.ceil(n * wd) for wd in weights]
            parts = [gpt(p, math.ceil(t * (1 + SURPLUS)), name) for p, t in zip(prefixes, target)]
            out.append(BlendedDataset(parts, weights, sum(target), seed))
        else:  # unweighted list: weight each dataset by its size (one epoch each)
            parts = [gpt(p, None, name) for p in prefixes]
            lengths = [len(part) for part in parts]
            size = None if n is None else min(n, sum(lengths))
            out.append(BlendedDataset(parts, lengths, size, seed))
    return tuple(out)
