"""Regenerate golden.npz from megatron-core (run by hand, never by the test suite).

See README.md in this directory. It needs megatron-core importable (PYTHONPATH) with its compiled
helpers, plus megatiny (for the corpus writer); it contains no Megatron code.
"""

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402

from tests.test_gpt_dataset import CASES, CORPORA, write_corpus  # noqa: E402


class Tokenizer:
    """The two attributes megatron-core's GPTDataset reads from a tokenizer."""

    vocab_size = 1000
    eod = 0
    unique_identifiers = {"class": "GoldenTokenizer"}


def main(out_path):
    arrays, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        prefixes = {n: write_corpus(os.path.join(tmp, n), **spec) for n, spec in CORPORA.items()}
        for name, prefix in prefixes.items():
            from megatiny.data.indexed import IndexedDataset

            arrays[f"corpus_{name}_lengths"] = np.asarray(IndexedDataset(prefix).sequence_lengths)
        for case, spec in CASES.items():
            blend = ([prefixes[c] for c in spec["corpora"]], spec.get("weights"))
            if len(spec["corpora"]) == 1:
                blend = (blend[0], None)
            config = GPTDatasetConfig(
                random_seed=spec["seed"],
                sequence_length=spec["seq_length"],
                blend=blend,
                split=spec["split"],
                path_to_cache=os.path.join(tmp, f"cache-{case}"),
                tokenizer=Tokenizer(),
                reset_position_ids=spec.get("reset_position_ids", False),
                reset_attention_mask=False,
                eod_mask_loss=spec.get("eod_mask_loss", False),
                create_attention_mask=False,
                add_extra_token_to_sequence=spec.get("add_extra_token", True),
                drop_last_partial_validation_sequence=spec.get("drop_last_valid", True),
            )
            datasets = BlendedMegatronDatasetBuilder(
                GPTDataset, spec["num_samples"], lambda: True, config
            ).build()
            for split_name, ds in zip(("train", "valid", "test"), datasets):
                key = f"{case}_{split_name}"
                if ds is None:
                    meta[key] = None
                    continue
                meta[key] = {"len": len(ds)}
                if len(spec["corpora"]) > 1:
                    arrays[f"{key}_dataset_index"] = ds.dataset_index
                    arrays[f"{key}_dataset_sample_index"] = ds.dataset_sample_index
                    meta[key]["component_lens"] = [len(d) for d in ds.datasets]
                else:
                    arrays[f"{key}_document_index"] = ds.document_index
                    arrays[f"{key}_sample_index"] = ds.sample_index
                    arrays[f"{key}_shuffle_index"] = ds.shuffle_index
                count = min(len(ds), 6)
                samples = [ds[i] for i in range(count)]
                for field in ("tokens", "labels", "loss_mask", "position_ids"):
                    arrays[f"{key}_{field}"] = np.stack([s[field].numpy() for s in samples]).astype(
                        np.int32
                    )
    np.savez_compressed(out_path, **arrays)
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print(f"wrote {out_path}: {len(arrays)} arrays")


if __name__ == "__main__":
    main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.npz"))
