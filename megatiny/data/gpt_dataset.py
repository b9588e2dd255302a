"""GPT pretraining dataset over a `.bin/.idx` indexed dataset, in Megatron-Core's sample order.

For the same data, split string, seq_length, num_samples and seed, `GPTDataset` builds the same
three index arrays as Megatron-Core's `GPTDataset` (tests/test_gpt_dataset.py checks them against
arrays produced by megatron-core 0.19.2), so a run can move between the two without repeating or
skipping data. The rule, step by step:

1. Split. "969,30,1" -> weights normalised to sum 1 -> bookends [(0, .969), (.969, .999),
   (.999, 1)]; split k owns the *contiguous* sequence range
   [round(b0 * N), round(b1 * N)) of the N sequences of the `.idx` (Python's round; a split whose
   weight is 0 does not exist). Megatron splits sequences; with one sequence per document, as
   `megatiny data tokenize` writes, these are the documents.
2. Epochs. tokens_per_epoch = tokens in the split; num_epochs is the smallest E with
   E * tokens_per_epoch >= num_samples * seq_length + add_extra_token (E = 1 when num_samples is
   None).
3. Separate final epoch. With E > 1, let S' = ((E-1) * tokens_per_epoch - extra) // seq_length
   samples come from the first E-1 epochs and per_epoch = (tokens_per_epoch - extra) // seq_length;
   if num_samples - S' < int(0.80 * per_epoch), the last epoch is shuffled on its own, so the
   first S' samples cover the full epochs evenly and the partly used epoch comes after them.
4. One `numpy.random.RandomState(seed)`, used in this order:
   document_index = the split's ids repeated E times (int32) and shuffled — in two independent
   blocks (first E-1 epochs, then the last) when the final epoch is separate;
   sample_index = build_sample_idx(sizes, document_index, seq_length, E, tokens_per_epoch,
   drop_last, extra) (megatiny._C; drop_last is True except for the valid split, where
   `drop_last_partial_validation_sequence` decides);
   shuffle_index = a shuffled arange (uint32; int64 when huge) over all samples — or over
   [0, S') and [S', total) separately when the final epoch is separate.
5. Sample i is the stream tokens of row shuffle_index[i] of the sample index: seq_length + 1
   tokens (with add_extra_token) -> input_ids = tokens[:-1], labels = tokens[1:].
   len(dataset) is the number of rows (>= num_samples), as in Megatron.

Index arrays are cached as .npy files (`IndexCache`), keyed by a hash of the data's sequence
lengths and every argument above, written atomically with checksums, and rebuilt when missing,
stale or corrupt; a different split, seed, ... gives a different file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zlib

import numpy as np
import torch

from megatiny.data import helpers
from megatiny.data.indexed import IndexedDataset
from megatiny.fsutil import atomic_write

SPLIT_NAMES = ("train", "valid", "test")
PAD = -1  # never a real token id; padded positions get loss_mask 0
IGNORE_INDEX = -100


def parse_split(split: str) -> list[float]:
    """ "969,30,1" -> [0.969, 0.03, 0.001] (Megatron's parse_and_normalize_split)."""
    values = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    if not values or len(values) > 3:
        raise ValueError(
            f"split={split!r} must have 1 to 3 comma-separated weights for train,valid,test, "
            "e.g. '969,30,1'"
        )
    values += [0.0] * (3 - len(values))
    w = np.array(values, dtype=np.float64)
    if not w.sum() > 0:
        raise ValueError(f"split={split!r}: the weights must sum to a positive number")
    return (w / w.sum()).tolist()


def split_ranges(split: str, num_elements: int) -> list[tuple[int, int] | None]:
    """The [begin, end) sequence range of train, valid and test (None where the weight is 0)."""
    bounds = [0]
    for w in parse_split(split):
        bounds.append(bounds[-1] + w)
    ranges = []
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        if b1 <= b0:
            ranges.append(None)
        else:
            ranges.append(
                (int(round(b0 * float(num_elements))), int(round(b1 * float(num_elements))))
            )
    return ranges


def data_fingerprint(indexed: IndexedDataset) -> dict:
    """What of the data the index arrays depend on: the sequence lengths (not the path or tokens)."""
    lengths = np.ascontiguousarray(indexed.sequence_lengths, dtype=np.int32)
    return {
        "num_sequences": int(len(lengths)),
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "lengths_sha256": hashlib.sha256(lengths.tobytes()).hexdigest(),
    }


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


class IndexCache:
    """Named .npy arrays under `<directory>/<key>-<name>-*.npy`, key = hash of `description`.

    A `-description.json` written last (after every array) records the description and a CRC32
    per array; `load` returns None — so the caller rebuilds — unless it exists, matches the
    description exactly, every checksum matches and `valid(arrays)` holds. Writes go to a temp file
    that is fsync'ed and renamed, so concurrent builders (e.g. several ranks) never see a partial
    file.
    """

    def __init__(self, directory: str, name: str, description: dict):
        self.description = json.loads(json.dumps(description))
        text = json.dumps(self.description, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:24]
        self.directory = directory
        self.base = os.path.join(directory, f"{self.key}-{name}")
        self.description_path = f"{self.base}-description.json"

    def path(self, name: str) -> str:
        return f"{self.base}-{name}.npy"

    def load(self, names, valid=lambda arrays: True):
        if not os.path.exists(self.description_path):
            return None
        try:
            with open(self.description_path) as f:
                record = json.load(f)
            if record["description"] != self.description:
                raise ValueError("its description does not match this configuration")
            arrays = {n: np.load(self.path(n), mmap_mode="r", allow_pickle=False) for n in names}
            for n in names:
                if _crc(arrays[n]) != record["crc32"][n]:
                    raise ValueError(f"{self.path(n)} fails its checksum")
            if not valid(arrays):
                raise ValueError("the arrays are inconsistent with this configuration")
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"rebuilding the index cache {self.base}-*: {error}", stacklevel=3)
            return None
        return tuple(arrays[n] for n in names)

    def save(self, arrays: dict) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            for name, array in arrays.items():
                atomic_write(self.path(name), lambda f, a=array: np.save(f, a, allow_pickle=False))
            record = {
                "description": self.description,
                "crc32": {name: _crc(a) for name, a in arrays.items()},
            }
            text = json.dumps(record, indent=1, sort_keys=True).encode()
            atomic_write(self.description_path, lambda f: f.write(text))
        except OSError as error:
            warnings.warn(f"cannot cache index arrays in {self.directory}: {error}", stacklevel=3)


def _num_epochs(tokens_per_epoch: int, num_samples: int | None, seq_length: int, extra: int) -> int:
    if num_samples is None:
        return 1
    wanted = num_samples * seq_length + extra
    return max(1, -(-wanted // tokens_per_epoch))


def _document_index(documents, num_epochs, rng, separate_final_epoch) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = _document_index(documents, num_epochs - 1, rng, False)
    last = _document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _shuffle_index(num_samples: int, total_size: int, rng) -> np.ndarray:
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    indices: np.ndarray,
    seq_length: int,
    num_samples: int | None,
    seed: int,
    add_extra_token: bool = True,
    drop_last_partial_sequence: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index, sample_index, shuffle_index) by steps 2-4 of the module docstring."""
    extra = int(add_extra_token)
    tokens_per_epoch = int(np.sum(sequence_lengths[indices], dtype=np.int64))
    if tokens_per_epoch < seq_length + extra:
        raise ValueError(
            f"the split holds {tokens_per_epoch} tokens in {len(indices)} sequences, fewer than one "
            f"sample of seq_length + {extra} = {seq_length + extra} tokens; use a shorter "
            "seq_length, more data, or a larger share for this split in the split string"
        )
    num_epochs = _num_epochs(tokens_per_epoch, num_samples, seq_length, extra)
    separate_final_epoch = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - extra) // seq_length
        separate_final_epoch = from_final < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = _document_index(indices, num_epochs, rng, separate_final_epoch)
    sample_index = helpers.build_sample_idx(
        np.ascontiguousarray(sequence_lengths, dtype=np.int32),
        document_index,
        seq_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        extra,
    )
    total = sample_index.shape[0] - 1
    first = sans_final if separate_final_epoch else total
    shuffle_index = _shuffle_index(first, total, rng)
    return document_index, sample_index, shuffle_index


class GPTDataset(torch.utils.data.Dataset):
    """Causal-LM samples of `seq_length` tokens from one split of an indexed dataset.

    indexed: an IndexedDataset or its path prefix. split: "train,valid,test" weights. split_name:
    which split this dataset is. num_samples: the minimum number of samples (None: one epoch).
    cache_dir: where index arrays are cached (default: `<data dir>/cache`).

    ds[i] -> dict of torch tensors, each of length seq_length:
      input_ids (long), labels (long; -100 where loss_mask is 0, so GPT's loss skips them),
      loss_mask (float: 1 = train on this position), position_ids (long).
    EOD options (Megatron's): eod_mask_loss -> loss_mask 0 where input_ids == eod_id;
    reset_position_ids -> position ids restart at 0 after every eod_id. Padding (only in a kept
    last partial validation sample) gets loss_mask 0 and token id 0.
    """

    def __init__(
        self,
        indexed: IndexedDataset | str,
        split: str = "969,30,1",
        seq_length: int = 1024,
        num_samples: int | None = None,
        seed: int = 1234,
        split_name: str = "train",
        cache_dir: str | None = None,
        *,
        eod_id: int | None = None,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
        add_extra_token: bool = True,
        drop_last_partial_validation_sequence: bool = True,
    ):
        if isinstance(indexed, (str, os.PathLike)):
            indexed = IndexedDataset(str(indexed))
        if split_name not in SPLIT_NAMES:
            raise ValueError(f"split_name={split_name!r}; choose one of {SPLIT_NAMES}")
        if seq_length < 2:
            raise ValueError(f"seq_length={seq_length} must be >= 2")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0 (or None for one epoch)")
        if (eod_mask_loss or reset_position_ids) and eod_id is None:
            raise ValueError("eod_mask_loss / reset_position_ids need eod_id (the tokenizer's EOD)")
        self.indexed = indexed
        self.split, self.split_name, self.seed = split, split_name, seed
        self.seq_length, self.num_samples = seq_length, num_samples
        self.eod_id, self.eod_mask_loss = eod_id, eod_mask_loss
        self.reset_position_ids = reset_position_ids
        self.add_extra_token = int(add_extra_token)
        self.drop_last = split_name != "valid" or drop_last_partial_validation_sequence

        n = len(indexed)
        bounds = split_ranges(split, n)[SPLIT_NAMES.index(split_name)]
        if bounds is None or bounds[1] <= bounds[0]:
            raise ValueError(
                f"split={split!r} gives the {split_name} split no sequences of the {n} in "
                f"{indexed.path_prefix}; give it a larger weight or use more data"
            )
        self.indices = np.arange(bounds[0], bounds[1], dtype=np.int32)

        description = {
            "class": "GPTDataset",
            "version": 1,
            "data": data_fingerprint(indexed),
            "split": parse_split(split),
            "split_name": split_name,
            "sequence_range": list(bounds),
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
            "add_extra_token": self.add_extra_token,
            "drop_last_partial_sequence": self.drop_last,
        }
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(os.path.abspath(indexed.path_prefix)), "cache")
        self.cache = IndexCache(cache_dir, f"GPTDataset-{split_name}", description)
        arrays = self.cache.load(("document_index", "sample_index", "shuffle_index"), self._valid)
        if arrays is None:
            try:
                arrays = build_gpt_indices(
                    indexed.sequence_lengths,
                    self.indices,
                    seq_length,
                    num_samples,
                    seed,
                    bool(self.add_extra_token),
                    self.drop_last,
                )
            except ValueError as error:
                raise ValueError(f"{split_name} split of {indexed.path_prefix}: {error}") from None
            self.cache.save(dict(zip(("document_index", "sample_index", "shuffle_index"), arrays)))
        self.document_index, self.sample_index, self.shuffle_index = arrays

    def _valid(self, arrays: dict) -> bool:
        doc, sample, shuffle = (
            arrays["document_index"],
            arrays["sample_index"],
            arrays["shuffle_index"],
        )
        return (
            doc.ndim == 1
            and len(doc) % len(self.indices) == 0
            and sample.ndim == 2
            and sample.shape[1] == 2
            and len(shuffle) == len(sample) - 1
            and (self.num_samples is None or len(shuffle) >= self.num_samples)
        )

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + add_extra_token token ids of sample idx (int64, padded with -1)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        row = int(self.shuffle_index[idx])
        (p0, o0), (p1, o1) = self.sample_index[row], self.sample_index[row + 1]
        p0, o0, p1, o1 = int(p0), int(o0), int(p1), int(o1)
        extra, get, doc = self.add_extra_token, self.indexed.get, self.document_index
        if p0 == p1:
            parts = [get(int(doc[p0]), offset=o0, length=o1 - o0 + extra)]
        else:
            parts = [get(int(doc[p0]), offset=o0)]
            parts += [get(int(doc[p])) for p in range(p0 + 1, p1)]
            parts.append(get(int(doc[p1]), offset=0, length=o1 + extra))
        tokens = np.full(self.seq_length + extra, PAD, dtype=np.int64)
        flat = np.concatenate(parts)
        tokens[: len(flat)] = flat
        return tokens

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        tokens = self.sample_tokens(int(idx))
        if self.add_extra_token:
            inputs, labels = tokens[:-1].copy(), tokens[1:].copy()
        else:
            inputs, labels = tokens, np.append(tokens[1:], PAD)
        loss_mask = np.ones(self.seq_length, dtype=np.float32)
        position_ids = np.arange(self.seq_length, dtype=np.int64)
        if self.eod_id is not None:
            is_eod = inputs == self.eod_id
            if self.eod_mask_loss:
                loss_mask[is_eod] = 0.0
            if self.reset_position_ids and is_eod.any():
                # position = distance to the token after the latest EOD at or before it
                starts = np.where(is_eod, np.arange(self.seq_length) + 1, 0)
                position_ids -= np.maximum.accumulate(np.concatenate(([0], starts[:-1])))
        loss_mask[labels == PAD] = 0.0
        inputs[inputs == PAD] = 0
        labels[loss_mask == 0] = IGNORE_INDEX
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
        }
